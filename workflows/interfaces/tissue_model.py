"""Nipype node around the physics-aware tissue U-Net (``bidsapp.models.tissue``).

Inputs: the preprocessed (bias-corrected) T1w, its brain mask and the image's acquisition record
(``AcquisitionRecord.to_dict()`` or a dict with BIDS sidecar names). Outputs, in the node's working
directory: CSF/GM/WM probability maps, a dseg (CSF=1, GM=2, WM=3), a long-format volumes table
(``method``, ``label``, ``volume_mm3``) and ``metadata``, the dict that belongs in every output
sidecar: method (``unet-physics``, or ``unet`` when the physics model cannot be used), model name,
version and sha256, the sequence parameters used / ignored / missing, the fallback reason and the
WM/GM signal ratio the parameters should give (low values are flagged in the report).
The derivatives writer of the participant workflow gives the files their BIDS names.
"""

from __future__ import annotations

import os

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    traits,
)

from bidsapp.labels import BRAIN, TISSUE
from bidsapp.models.registry import sidecar_model
from workflows.interfaces.ants import SegmentationOutputSpec



class TissueModelInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="preprocessed (N4-corrected) T1w")
    mask_file = File(exists=True, mandatory=True, desc="brain mask on the same grid")
    acquisition = traits.Dict(desc="acquisition record dict (sequence_family, TR/TE/TI/FA in BIDS units, B0)")
    device = traits.Enum("auto", "cpu", "cuda", usedefault=True, desc="torch device")
    use_physics = traits.Bool(True, usedefault=True, desc="False forces the no-physics U-Net")
    weights_dir = traits.Str(desc="alternative folder of weights + model cards (default: the packaged models)")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="torch CPU threads (the node's n_procs)")


class TissueModelOutputSpec(SegmentationOutputSpec):
    method = traits.Str(desc="unet-physics or unet")
    metadata = traits.Dict(desc="sidecar fields: method, model (name, version, sha256), parameters used")


def sidecar_metadata(result) -> dict:
    """The sidecar fields describing how a :class:`~bidsapp.models.tissue.TissueResult` was made."""
    pv = result.parameters
    return {
        "Method": result.method,
        "Model": sidecar_model(result.model),
        "SequenceFamily": pv.family,
        "SequenceParametersUsed": dict(pv.used),
        "SequenceParametersIgnored": dict(pv.ignored),
        "SequenceParametersMissing": list(pv.missing),
        "SequenceParametersFrom": pv.parameters_from,
        "PhysicsFallback": pv.fallback_reason,
        "ExpectedWMGMSignalRatio": None if pv.wm_gm_ratio is None else round(pv.wm_gm_ratio, 3),
        "ModelResolution": result.model["resolution_mm"],
        "Resampling": (f"input box-averaged to {result.model['resolution_mm']:g} mm isotropic for the network; "
                       "probabilities linearly interpolated back to the input grid"
                       + ("; then refined at the input's resolution by the image's intensities (one Gaussian per "
                          "tissue, a mixed class per pair of tissues and an outlier class counted as CSF, fitted "
                          "by EM with the network's probabilities as the prior); the maps are the expected "
                          "tissue fractions, and the volumes their sums"
                          if result.refinement else "")),
        "IntensityRefinement": result.refinement,
        "VolumesFromFractions": bool(result.volumes_summed),
        "VolumesWarning": result.volumes_warning,
        "Device": result.device,
    }


class TissueModel(SimpleInterface):
    """Segment CSF/GM/WM with the physics-aware U-Net, falling back to the no-physics U-Net."""

    input_spec = TissueModelInputSpec
    output_spec = TissueModelOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib
        import numpy as np
        import torch

        from bidsapp.models import tissue

        torch.set_num_threads(max(1, int(self.inputs.num_threads)))
        img = nib.load(self.inputs.in_file)
        mask_img = nib.load(self.inputs.mask_file)
        data = np.asarray(img.dataobj, dtype=np.float32)
        mask = np.asarray(mask_img.dataobj) > 0
        if data.shape[:3] != mask.shape[:3]:
            raise ValueError(f"{self.inputs.mask_file}: mask shape {mask.shape} differs from T1w {data.shape}")
        acq = dict(self.inputs.acquisition) if self.inputs.acquisition else {}
        result = tissue.segment(data, mask, img.header.get_zooms()[:3], acq, device=self.inputs.device,
                                use_physics=self.inputs.use_physics,
                                weights_dir=self.inputs.weights_dir or None)
        cwd = runtime.cwd
        prob_files = []
        for k, name in enumerate(TISSUE.names):
            out = nib.Nifti1Image(result.probs[k], img.affine, img.header)
            out.set_data_dtype(np.float32)
            path = os.path.join(cwd, f"label-{name}_probseg.nii.gz")
            nib.save(out, path)
            prob_files.append(path)
        dseg = nib.Nifti1Image(result.dseg, img.affine, img.header)
        dseg.set_data_dtype(np.uint8)
        dseg_path = os.path.join(cwd, "dseg.nii.gz")
        nib.save(dseg, dseg_path)
        tsv = os.path.join(cwd, "volumes.tsv")
        with open(tsv, "w") as fh:
            fh.write("method\tlabel\tvolume_mm3\n")
            for label in (*TISSUE.names, BRAIN):
                fh.write(f"{result.method}\t{label}\t{result.volumes_mm3[label]:.1f}\n")
        self._results.update(probseg=prob_files, dseg=dseg_path, volumes_tsv=tsv, method=result.method,
                             metadata=sidecar_metadata(result), warnings=list(result.warnings))
        return runtime


def tissue_model_node(name: str = "tissue_model", device: str = "auto"):
    """A ready Node: connect ``in_file``, ``mask_file`` and ``acquisition``."""
    from nipype.pipeline import engine as pe

    return pe.Node(TissueModel(device=device), name=name)
