"""The brain-extraction node: the learned network by default, template-based on request or as fallback.

``brain_extraction`` (plain function, testable without Nipype) runs
:func:`bidsapp.models.brainmask.extract` on the N4-corrected RAS image and keeps its mask when it
passes :func:`bidsapp.models.brainmask.sanity_check`; otherwise, or with ``method="template"``, the
template-based :func:`workflows.interfaces.ants.extract_brain` runs, and the sidecar metadata say why.
When neither finds a plausible brain the image is not a head: a one-line ``ValueError`` names the
input file, and the session stops while the others go on.

Both paths also write the starting transform of the registration to the template (subject points ->
template points): the template path's affine, or for the learned mask the translation that puts the
mask's centre of mass on the template brain's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from nipype.interfaces.base import File, SimpleInterface, TraitedSpec, isdefined, traits

from bidsapp.models.registry import sidecar_model
from workflows.interfaces.ants import (
    _TemplateInputSpec,
    _lps_points,
    _save_like,
    _translation_transform,
    extract_brain,
    use_threads,
)

METHODS = ("learned", "template")
TEMPLATE_METHOD = ("template-based: template brain affinely registered to the image (Mattes MI), template mask "
                   "warped, thresholded at 0.5 and grown over the subject's CSF up to the skull")


def _centre_translation(img_file, mask: np.ndarray, template_mask, out_xfm) -> str:
    import ants

    img = ants.image_read(str(img_file))
    tmask = ants.image_read(str(template_mask))
    s_com = _lps_points(img, np.argwhere(mask)).mean(0)
    t_com = _lps_points(tmask, np.argwhere(tmask.numpy() > 0.5)).mean(0)
    return _translation_transform(t_com - s_com, out_xfm)


def _contrast_problem(img, mask) -> str | None:
    """:func:`bidsapp.models.brainmask.contrast_problem` of a nibabel image inside ``mask``."""
    from bidsapp.models import brainmask as bm

    data = img.get_fdata(dtype=np.float32).reshape(img.shape[:3])  # cached by the image (extract read it)
    return bm.contrast_problem(data, mask, float(np.prod(img.header.get_zooms()[:3])) / 1000.0)


def brain_extraction(in_file, template_t1w, template_mask, out_mask, out_xfm, *, method: str = "learned",
                     device: str = "auto", threads: int = 1, source_file=None) -> dict:
    """Brain mask of an N4-corrected RAS image; returns the mask's sidecar metadata."""
    import nibabel as nib
    import torch

    from bidsapp.models import brainmask as bm

    if method not in METHODS:
        raise ValueError(f"brain extraction method must be one of {', '.join(METHODS)}, not {method!r}")
    name = str(source_file or in_file)
    meta = {"Type": "Brain"}
    problem = None
    if method == "learned":
        torch.set_num_threads(max(1, int(threads)))
        ref = nib.load(str(in_file))
        res = bm.extract(ref, device=device)
        problem = res.problem
        not_brain = _contrast_problem(ref, res.mask)
        if not_brain is not None:
            raise ValueError(f"{name}: no brain found ({not_brain}); is this a head image?")
        meta.update(Method="learned: contrast-agnostic U-Net (brainmask_unet) on the whole image at 2 mm, "
                           "probability >= 0.5 at native resolution, holes filled, largest component",
                    Model=sidecar_model(res.model),
                    MaskVolumeML=round(res.volume_ml, 1))
        if res.prestripped:
            meta["Method"] += (f"; the input was already skull-stripped: its own brain kept (non-zero voxels within "
                               f"{bm.PRESTRIPPED_MARGIN_MM:g} mm of the network's mask)")
        if problem is None:
            _save_like(res.mask, ref, out_mask, dtype=np.uint8)
            _centre_translation(in_file, res.mask, template_mask, out_xfm)
            return meta
    try:
        diag = extract_brain(in_file, template_t1w, template_mask, out_mask, out_xfm)
    except ValueError as exc:
        if problem is None:
            raise ValueError(f"{name}: {str(exc).split(': ', 1)[-1]}") from None
        raise ValueError(f"{name}: no brain found ({problem}; template-based extraction: "
                         f"{str(exc).split(': ', 1)[-1]}); is this a head image?") from None
    volume_ml = diag["mask_volume_mm3"] / 1000.0
    not_brain = _contrast_problem(nib.load(str(in_file)), np.asarray(nib.load(str(out_mask)).dataobj) > 0)
    if not_brain is not None:
        Path(out_mask).unlink(missing_ok=True)
        raise ValueError(f"{name}: no brain found (template-based mask: {not_brain}); is this a head image?")
    if problem is not None:
        second = bm.sanity_check(volume_ml, [volume_ml])
        if second is not None:
            Path(out_mask).unlink(missing_ok=True)
            raise ValueError(f"{name}: no brain found (learned mask: {problem}; template-based mask: {second}); "
                             "is this a head image?")
        meta["BrainExtractionFallback"] = (f"the learned mask failed the sanity check ({problem}); "
                                           "template-based mask used")
        meta["LearnedMaskVolumeML"] = meta.pop("MaskVolumeML")
    meta.update(Method=TEMPLATE_METHOD, MaskVolumeML=round(volume_ml, 1))
    return meta


class _BrainExtractionInputSpec(_TemplateInputSpec):
    in_file = File(exists=True, mandatory=True, desc="N4-corrected image in RAS")
    method = traits.Enum(*METHODS, usedefault=True, desc="learned (default) or template")
    device = traits.Enum("auto", "cpu", "cuda", usedefault=True, nohash=True, desc="torch device of the network")
    source_file = traits.Str(desc="the BIDS input, named in error messages", nohash=True)


class _BrainExtractionOutputSpec(TraitedSpec):
    out_mask = File(exists=True, desc="brain mask (uint8) on the input grid")
    out_xfm = File(exists=True, desc="start of the template registration: subject -> template points (.mat)")
    metadata = traits.Dict(desc="sidecar fields of the mask: method, model, volume, fallback reason")


class BrainExtraction(SimpleInterface):
    """Brain extraction (see :func:`brain_extraction`)."""

    input_spec = _BrainExtractionInputSpec
    output_spec = _BrainExtractionOutputSpec

    def _run_interface(self, runtime):
        threads = use_threads(self.inputs.num_threads, self.inputs.seed)
        cwd = Path(runtime.cwd)
        meta = brain_extraction(
            self.inputs.in_file, self.inputs.template_t1w, self.inputs.template_mask,
            cwd / "brain_mask.nii.gz", cwd / "subject_to_template_affine.mat", method=self.inputs.method,
            device=self.inputs.device, threads=threads,
            source_file=self.inputs.source_file if isdefined(self.inputs.source_file) else None)
        self._results.update(out_mask=str(cwd / "brain_mask.nii.gz"),
                             out_xfm=str(cwd / "subject_to_template_affine.mat"), metadata=meta)
        return runtime
