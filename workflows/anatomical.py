"""Anatomical preprocessing: the T1w of a session, and other contrasts brought onto it.

``init_anat_preproc_wf``: reorient to RAS -> N4 -> brain extraction (the learned network, or the
template-based method; :mod:`workflows.interfaces.brainmask`) -> registration to the template, starting
from the mask -> template tissue priors warped to the T1w. ``init_coregistration_wf``: a FLAIR, T2w or
PDw image reoriented, N4-corrected and rigidly registered to the session's preprocessed T1w.
Computation only: the files get their BIDS names in :mod:`workflows.outputs`.

``template`` is the provenance dict of :func:`bidsapp.templates.get_template` (its ``files`` feed the
nodes; file inputs are hashed, so a rerun with the same work directory reuses finished nodes).
"""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from workflows.interfaces.ants import (
    N4BiasFieldCorrection,
    RegistrationToTemplate,
    ReorientToRAS,
    RigidCoregistration,
    WarpPriors,
)
from workflows.interfaces.brainmask import BrainExtraction

ANAT_OUTPUTS = ("t1w_ras", "t1w_preproc", "t1w_mask", "t1w_mask_metadata", "template_xfm", "template_inv_xfm",
                "t1w_template", "priors")


def _check_template(template: dict) -> dict:
    files = template.get("files") or {}
    missing = [k for k in ("T1w", "mask", "CSF", "GM", "WM") if k not in files]
    if missing:
        raise ValueError(f"template {template.get('name')!r} lacks file(s): {', '.join(missing)}")
    return files


def init_anat_preproc_wf(*, template: dict, omp_nthreads: int = 1, seed: int = 0, registration: str = "SyN",
                         brain_extraction: str = "learned", device: str = "auto",
                         name: str = "anat_preproc_wf") -> pe.Workflow:
    """Preprocess one T1w.

    Inputs: ``t1w`` (raw BIDS T1w). Outputs: ``t1w_ras`` (reoriented raw), ``t1w_preproc`` (N4, RAS),
    ``t1w_mask`` (``brain_extraction``: learned network or template, see
    :mod:`workflows.interfaces.brainmask`), ``t1w_mask_metadata`` (its sidecar fields),
    ``template_xfm`` (from-T1w_to-template), ``template_inv_xfm`` (from-template_to-T1w),
    ``t1w_template`` (the preprocessed T1w in template space), ``priors`` (template CSF/GM/WM on the
    T1w grid).
    """
    files = _check_template(template)
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=list(ANAT_OUTPUTS)), name="outputnode")

    reorient = pe.Node(ReorientToRAS(), name="reorient", mem_gb=0.5)
    n4 = pe.Node(N4BiasFieldCorrection(num_threads=omp_nthreads, seed=seed), name="n4",
                 n_procs=omp_nthreads, mem_gb=1.0)
    brain = pe.Node(BrainExtraction(num_threads=omp_nthreads, seed=seed, template_t1w=files["T1w"],
                                    template_mask=files["mask"], method=brain_extraction, device=device),
                    name="brain_extraction", n_procs=omp_nthreads, mem_gb=1.5)
    norm = pe.Node(RegistrationToTemplate(num_threads=omp_nthreads, seed=seed, transform=registration,
                                          template_t1w=files["T1w"], template_mask=files["mask"]),
                   name="registration", n_procs=omp_nthreads, mem_gb=2.0)
    priors = pe.Node(WarpPriors(num_threads=omp_nthreads, seed=seed,
                                priors=[files["CSF"], files["GM"], files["WM"]]),
                     name="warp_priors", n_procs=omp_nthreads, mem_gb=1.5)

    wf.connect([
        (inputnode, reorient, [("t1w", "in_file")]),
        (inputnode, brain, [("t1w", "source_file")]),
        (reorient, n4, [("out_file", "in_file")]),
        (n4, brain, [("out_file", "in_file")]),
        (n4, norm, [("out_file", "in_file")]),
        (brain, norm, [("out_mask", "in_mask"), ("out_xfm", "initial_xfm")]),
        (n4, priors, [("out_file", "reference")]),
        (norm, priors, [("inverse_xfm", "transform")]),
        (reorient, outputnode, [("out_file", "t1w_ras")]),
        (n4, outputnode, [("out_file", "t1w_preproc")]),
        (brain, outputnode, [("out_mask", "t1w_mask"), ("metadata", "t1w_mask_metadata")]),
        (norm, outputnode, [("forward_xfm", "template_xfm"), ("inverse_xfm", "template_inv_xfm"),
                            ("warped", "t1w_template")]),
        (priors, outputnode, [("out_files", "priors")]),
    ])
    return wf


def init_coregistration_wf(*, omp_nthreads: int = 1, seed: int = 0, name: str = "coregistration_wf") -> pe.Workflow:
    """Bring a FLAIR/T2w/PDw image onto the session's T1w (rigid, Mattes MI).

    Inputs: ``in_file`` (raw image), ``t1w_preproc``, ``t1w_mask``. Outputs: ``out_file`` (N4-corrected
    image resampled onto the T1w grid: ``space-T1w_desc-preproc_<suffix>``) and ``out_xfm`` (rigid
    ``.mat`` resampling the image into T1w space: ``from-<suffix>_to-T1w_mode-image_xfm``).
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["in_file", "t1w_preproc", "t1w_mask"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["out_file", "out_xfm"]), name="outputnode")
    reorient = pe.Node(ReorientToRAS(), name="reorient", mem_gb=0.5)
    n4 = pe.Node(N4BiasFieldCorrection(num_threads=omp_nthreads, seed=seed), name="n4",
                 n_procs=omp_nthreads, mem_gb=1.0)
    coreg = pe.Node(RigidCoregistration(num_threads=omp_nthreads, seed=seed), name="coregister",
                    n_procs=omp_nthreads, mem_gb=1.5)
    wf.connect([
        (inputnode, reorient, [("in_file", "in_file")]),
        (reorient, n4, [("out_file", "in_file")]),
        (n4, coreg, [("out_file", "in_file")]),
        (inputnode, coreg, [("t1w_preproc", "reference"), ("t1w_mask", "reference_mask")]),
        (coreg, outputnode, [("out_file", "out_file"), ("out_xfm", "out_xfm")]),
    ])
    return wf
