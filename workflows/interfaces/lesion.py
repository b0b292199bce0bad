"""Nipype interfaces of the lesion methods: segmentation (:class:`LesionSegment`) and the step that keeps
lesions out of the tissue classes (:class:`FillLesions`).

``LesionSegment`` runs either lesion model (``model``): ``lesion``, the scanner-invariant MS lesion U-Net
of :mod:`bidsapp.models.lesion` on every contrast it is given, or ``wmh``, the FLAIR-only
white-matter-hyperintensity network of :mod:`bidsapp.models.wmh` on the FLAIR alone. It honours the
session-method contract of :mod:`bidsapp.methods`: ``in_file`` (the first of FLAIR, T2w, PDw the session
has, on the reference grid; the FLAIR for ``wmh``), ``mask_file``, and ``<contrast>_file`` for the other
contrasts (co-registered onto the same grid by the session workflow). Outputs, the same for both models:
the lesion probability (``probseg``), mask, the long-format volume rows (lesion volume and count), the
per-lesion table (``stats``), ``metadata`` for the sidecars and ``warnings`` (contrasts the MS model had to
do without; the WMH model reads the FLAIR only by design).
"""

from __future__ import annotations

import os

import numpy as np
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, isdefined, traits

from bidsapp.labels import LESION, TISSUE
from bidsapp.models.registry import sidecar_model


class LesionSegmentInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="FLAIR (else T2w, PDw) on the reference grid")
    in_contrast = traits.Enum("FLAIR", "T2w", "PDw", usedefault=True, desc="contrast of in_file")
    mask_file = File(exists=True, mandatory=True, desc="brain mask on the reference grid")
    t1w_file = File(exists=True, desc="T1w on the same grid")
    flair_file = File(exists=True, desc="FLAIR on the same grid")
    t2w_file = File(exists=True, desc="T2w on the same grid")
    pdw_file = File(exists=True, desc="PDw on the same grid")
    method = traits.Str("lesion", usedefault=True, desc="method key written in the volume table")
    model = traits.Enum("lesion", "wmh", usedefault=True,
                        desc="lesion: the MS lesion U-Net on every contrast given; wmh: the FLAIR-only WMH network")
    device = traits.Enum("auto", "cpu", "cuda", usedefault=True)
    threshold = traits.Float(desc="probability at which the mask is cut (default: the model's, "
                                  "bidsapp.models.lesion.THRESHOLD)")
    num_threads = traits.Int(1, usedefault=True, nohash=True,
                             desc="torch CPU threads (the node's n_procs); also keeps a forked worker whose "
                                  "parent started torch's thread pool from deadlocking")
    weights_dir = traits.Str(desc="alternative folder of weights + model cards (default: the packaged models)")


class LesionSegmentOutputSpec(TraitedSpec):
    probseg = traits.List(File(exists=True), desc="lesion probability (one file, label order)")
    mask = File(exists=True, desc="binary lesion mask")
    volumes_tsv = File(exists=True, desc="long-format rows: lesion volume and count")
    stats = File(exists=True, desc="one row per lesion")
    metadata = traits.Dict()
    warnings = traits.List(traits.Str())


STATS_COLUMNS = ("id", "volume_mm3", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm", "location")


def _inputs(inputs) -> dict:
    """``{contrast: path}`` of the images given to the node."""
    out = {inputs.in_contrast: inputs.in_file}
    for contrast, name in (("T1w", "t1w_file"), ("FLAIR", "flair_file"), ("T2w", "t2w_file"), ("PDw", "pdw_file")):
        value = getattr(inputs, name)
        if value and value is not traits.Undefined and contrast not in out:
            out[contrast] = value
    return out


def _run_model(model: str, images: dict, mask, affine, zooms, device, weights_dir, threshold=None):
    """(:class:`bidsapp.models.lesion.LesionResult`, minimum lesion volume, contrasts missing) of ``model``."""
    if model == "wmh":
        from bidsapp.models import wmh

        result = wmh.segment(images["FLAIR"], mask, affine, zooms, device=device, weights_dir=weights_dir,
                             threshold=threshold)
        return result, wmh.MIN_LESION_MM3, []
    from bidsapp.models import lesion

    result = lesion.segment(images, mask, affine, zooms, device=device, weights_dir=weights_dir,
                            threshold=threshold)
    return result, lesion.MIN_LESION_MM3, [c for c in lesion.CHANNELS if c not in result.contrasts]


class LesionSegment(SimpleInterface):
    """Lesion segmentation by the MS lesion U-Net (:mod:`bidsapp.models.lesion`) or the FLAIR-only WMH
    network (:mod:`bidsapp.models.wmh`); one writer of the images, volume rows, per-lesion table and sidecar."""

    input_spec = LesionSegmentInputSpec
    output_spec = LesionSegmentOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib

        from bidsapp.bids.derivatives import atomic_write_tsv
        from bidsapp.bids.validation import load_3d
        from bidsapp.models.lesion import lesion_table

        import torch

        torch.set_num_threads(max(1, int(self.inputs.num_threads)))
        paths = _inputs(self.inputs)
        if self.inputs.model == "wmh":  # the FLAIR only: other contrasts are not even read
            if "FLAIR" not in paths:
                raise ValueError(f"the WMH model needs a FLAIR; got {', '.join(paths)}")
            paths = {"FLAIR": paths["FLAIR"]}
        ref = nib.load(self.inputs.mask_file)
        mask = np.asarray(ref.dataobj) > 0
        images = {}
        for contrast, path in paths.items():
            img, _ = load_3d(path)  # one-line errors for NaN, all-zero or constant images
            data = np.asarray(img.dataobj)
            if data.shape != mask.shape or not np.allclose(img.affine, ref.affine, atol=1e-3):
                raise ValueError(f"{path}: not on the reference grid of {self.inputs.mask_file} "
                                 "(co-register it first)")
            images[contrast] = data
        zooms = np.sqrt((ref.affine[:3, :3] ** 2).sum(0))
        threshold = self.inputs.threshold if isdefined(self.inputs.threshold) else None
        result, min_volume, missing = _run_model(self.inputs.model, images, mask, ref.affine, zooms,
                                                 self.inputs.device, self.inputs.weights_dir or None, threshold)
        cwd = runtime.cwd
        prob = nib.Nifti1Image(result.probability.astype(np.float32), ref.affine)
        prob.header.set_xyzt_units("mm")
        prob_path = os.path.join(cwd, "label-lesion_probseg.nii.gz")
        nib.save(prob, prob_path)
        mask_img = nib.Nifti1Image(result.mask.astype(np.uint8), ref.affine)
        mask_img.header.set_xyzt_units("mm")
        mask_path = os.path.join(cwd, "desc-lesion_mask.nii.gz")
        nib.save(mask_img, mask_path)
        rows = lesion_table(result.mask, ref.affine, result.context)
        stats = os.path.join(cwd, "lesions_stats.tsv")
        atomic_write_tsv(stats, rows, columns=STATS_COLUMNS)
        volume = float(result.mask.sum() * np.prod(zooms))
        tsv = os.path.join(cwd, "volumes.tsv")
        with open(tsv, "w") as fh:
            fh.write("method\tlabel\tvolume_mm3\tcount\n")
            fh.write(f"{self.inputs.method}\t{LESION.labels[0].name}\t{volume:.1f}\t{len(rows)}\n")
        warnings = []
        if missing:
            warnings.append(f"lesions segmented without {', '.join(missing)} (the session has "
                            f"{', '.join(result.contrasts)}); expect lower sensitivity")
        self._results.update(
            probseg=[prob_path], mask=mask_path, volumes_tsv=tsv, stats=stats, warnings=warnings,
            metadata={
                "Method": self.inputs.method,
                "Model": sidecar_model(result.model),
                "ContrastsUsed": list(result.contrasts),
                "ContrastsMissing": missing,
                "Threshold": float(result.threshold),
                "MinimumLesionVolume_mm3": min_volume,
                "LesionCount": len(rows),
                "LesionVolume_mm3": round(volume, 1),
            })
        return runtime


# ------------------------------------------------------------------------------------------ filling
class FillLesionsInputSpec(BaseInterfaceInputSpec):
    dseg = File(exists=True, mandatory=True, desc="tissue dseg (CSF/GM/WM)")
    probseg = traits.List(File(exists=True), mandatory=True, desc="tissue probabilities, label order")
    volumes_tsv = File(exists=True, mandatory=True, desc="the tissue method's volume rows")
    lesion_mask = File(exists=True, mandatory=True, desc="lesion mask on the same grid")
    mask_file = File(exists=True, mandatory=True, desc="brain mask (the brain row of the table)")
    metadata = traits.Dict(desc="the tissue method's sidecar fields, extended here")
    counted_as = traits.Str("WM", usedefault=True, desc="tissue label lesion voxels are counted as")


class FillLesionsOutputSpec(TraitedSpec):
    dseg = File(exists=True)
    probseg = traits.List(File(exists=True))
    volumes_tsv = File(exists=True)
    metadata = traits.Dict()


def fill_lesions(dseg: np.ndarray, probs: np.ndarray, lesion: np.ndarray, counted_as: str = "WM"):
    """(dseg, probs) with every tissue voxel of ``lesion`` relabelled ``counted_as`` and its probability
    moved there (lesion filling: a lesion is white matter that is damaged, never grey matter or CSF)."""
    target = TISSUE.names.index(counted_as)
    inside = lesion & (dseg > 0)
    dseg = dseg.copy()
    dseg[inside] = TISSUE.labels[target].value
    probs = probs.copy()
    total = probs[:, inside].sum(0)
    probs[:, inside] = 0.0
    probs[target, inside] = total
    return dseg, probs


class FillLesions(SimpleInterface):
    """Count lesion voxels as white matter in a tissue method's dseg, probabilities and volumes."""

    input_spec = FillLesionsInputSpec
    output_spec = FillLesionsOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib

        from workflows.interfaces.ants import tissue_volumes

        img = nib.load(self.inputs.dseg)
        dseg = np.asarray(img.dataobj).astype(np.uint8)
        lesion = np.asarray(nib.load(self.inputs.lesion_mask).dataobj) > 0
        if lesion.shape != dseg.shape:
            raise ValueError(f"{self.inputs.lesion_mask}: lesion mask not on the grid of {self.inputs.dseg}")
        probs = np.stack([np.asarray(nib.load(p).dataobj, dtype=np.float32) for p in self.inputs.probseg])
        filled, probs = fill_lesions(dseg, probs, lesion, self.inputs.counted_as)
        moved = int((filled != dseg).sum())
        dseg = filled
        cwd = runtime.cwd
        out_dseg = os.path.join(cwd, "dseg.nii.gz")
        nib.save(nib.Nifti1Image(dseg, img.affine, img.header), out_dseg)
        out_probs = []
        for lab, p, src in zip(TISSUE, probs, self.inputs.probseg):
            ref = nib.load(src)
            path = os.path.join(cwd, f"label-{lab.name}_probseg.nii.gz")
            nib.save(nib.Nifti1Image(p.astype(np.float32), ref.affine, ref.header), path)
            out_probs.append(path)
        with open(self.inputs.volumes_tsv) as fh:
            rows = fh.read().splitlines()
        method = rows[1].split("\t")[0] if len(rows) > 1 else "tissue"
        meta = dict(self.inputs.metadata or {})
        tsv = tissue_volumes(out_probs, self.inputs.mask_file, method, os.path.join(cwd, "volumes.tsv"),
                             fractions=bool(meta.get("VolumesFromFractions", meta.get("IntensityRefinement"))))
        zooms = np.sqrt((img.affine[:3, :3] ** 2).sum(0))
        meta["LesionFilling"] = (f"voxels of the lesion mask are counted as {self.inputs.counted_as} "
                                 f"({moved * float(np.prod(zooms)):.0f} mm^3 relabelled); the lesion volume "
                                 "is reported separately")
        self._results.update(dseg=out_dseg, probseg=out_probs, volumes_tsv=tsv, metadata=meta)
        return runtime
