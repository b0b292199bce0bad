"""Anatomical preprocessing: a session's reference image, and its other contrasts brought onto it.

The reference is the session's T1w, or in a session without one its FLAIR (then T2w, PDw).
``init_anat_preproc_wf``: reorient to RAS -> N4 -> brain extraction (the learned, contrast-agnostic
network, or the template-based method; :mod:`workflows.interfaces.brainmask`) -> N4 inside the brain
and, for a T1w, ->
registration to the template, starting from the mask -> template tissue priors warped to the T1w.
``init_coregistration_wf``: another image reoriented, N4-corrected and rigidly registered to the
preprocessed reference. Computation only: the files get their BIDS names in :mod:`workflows.outputs`.

``template`` is the provenance dict of :func:`bidsapp.templates.get_template` (its ``files`` feed the
nodes; file inputs are hashed, so a rerun with the same work directory reuses finished nodes).
"""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from workflows.interfaces.ants import (
    ITK_THREADS,
    N4BiasFieldCorrection,
    RegistrationToTemplate,
    ReorientToRAS,
    RigidCoregistration,
    WarpPriors,
)
from workflows.interfaces.brainmask import BrainExtraction

ANAT_OUTPUTS = ("anat_ras", "anat_preproc", "anat_mask", "anat_mask_metadata", "template_xfm", "template_inv_xfm",
                "anat_template", "priors")
"""Outputs of :func:`init_anat_preproc_wf`; the template ones only for a T1w reference."""


def _check_template(template: dict) -> dict:
    files = template.get("files") or {}
    missing = [k for k in ("T1w", "mask", "CSF", "GM", "WM") if k not in files]
    if missing:
        raise ValueError(f"template {template.get('name')!r} lacks file(s): {', '.join(missing)}")
    return files


def init_anat_preproc_wf(*, template: dict, omp_nthreads: int = 1, seed: int = 0, registration: str = "SyN",
                         brain_extraction: str = "learned", device: str = "auto", to_template: bool = True,
                         priors: bool = True, name: str = "anat_preproc_wf") -> pe.Workflow:
    """Preprocess a session's reference image.

    Inputs: ``in_file`` (the raw BIDS image). Outputs: ``anat_ras`` (reoriented raw), ``anat_preproc``
    (N4 in the head, then again in the brain mask; RAS), ``anat_mask`` (``brain_extraction``: learned network or template, see
    :mod:`workflows.interfaces.brainmask`), ``anat_mask_metadata`` (its sidecar fields) and, with
    ``to_template`` (a T1w: the template and its priors are T1w), ``template_xfm``
    (from-T1w_to-template), ``template_inv_xfm`` (from-template_to-T1w), ``anat_template`` (the
    preprocessed T1w in template space), ``priors`` (template CSF/GM/WM on the T1w grid; only with
    ``priors``: no method but Atropos reads them, and warping them takes 4 s at 1 mm, 33 s at 0.5 mm).
    """
    files = _check_template(template)
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["in_file"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=list(ANAT_OUTPUTS)), name="outputnode")

    reorient = pe.Node(ReorientToRAS(), name="reorient", mem_gb=0.5)
    n4 = pe.Node(N4BiasFieldCorrection(num_threads=ITK_THREADS, seed=seed), name="n4",
                 n_procs=ITK_THREADS, mem_gb=1.0)
    brain = pe.Node(BrainExtraction(num_threads=omp_nthreads, seed=seed, template_t1w=files["T1w"],
                                    template_mask=files["mask"], method=brain_extraction, device=device),
                    name="brain_extraction", n_procs=omp_nthreads, mem_gb=1.5)
    # the second N4 runs inside the brain: the head pass leaves a bias in the brain on heads with scalp
    # and fat (workflows.interfaces.ants.n4_correct), which moves tissue boundaries and volumes
    n4_brain = pe.Node(N4BiasFieldCorrection(num_threads=ITK_THREADS, seed=seed, brain_pass=True),
                       name="n4_brain", n_procs=ITK_THREADS, mem_gb=1.0)
    wf.connect([
        (inputnode, reorient, [("in_file", "in_file")]),
        (inputnode, brain, [("in_file", "source_file")]),
        (reorient, n4, [("out_file", "in_file")]),
        (n4, brain, [("out_file", "in_file")]),
        (n4, n4_brain, [("out_file", "in_file")]),
        (brain, n4_brain, [("out_mask", "mask_file")]),
        (reorient, outputnode, [("out_file", "anat_ras")]),
        (n4_brain, outputnode, [("out_file", "anat_preproc")]),
        (brain, outputnode, [("out_mask", "anat_mask"), ("metadata", "anat_mask_metadata")]),
    ])
    if not to_template:
        return wf
    norm = pe.Node(RegistrationToTemplate(num_threads=ITK_THREADS, seed=seed, transform=registration,
                                          template_t1w=files["T1w"], template_mask=files["mask"]),
                   name="registration", n_procs=ITK_THREADS, mem_gb=2.0)
    wf.connect([
        (n4_brain, norm, [("out_file", "in_file")]),
        (brain, norm, [("out_mask", "in_mask"), ("out_xfm", "initial_xfm")]),
        (norm, outputnode, [("forward_xfm", "template_xfm"), ("inverse_xfm", "template_inv_xfm"),
                            ("warped", "anat_template")]),
    ])
    if priors:
        warp = pe.Node(WarpPriors(num_threads=ITK_THREADS, seed=seed,
                                  priors=[files["CSF"], files["GM"], files["WM"]]),
                       name="warp_priors", n_procs=ITK_THREADS, mem_gb=1.5)
        wf.connect([
            (n4_brain, warp, [("out_file", "reference")]),
            (norm, warp, [("inverse_xfm", "transform")]),
            (warp, outputnode, [("out_files", "priors")]),
        ])
    return wf


def init_coregistration_wf(*, seed: int = 0, name: str = "coregistration_wf") -> pe.Workflow:
    """Bring an image onto the session's reference (rigid, Mattes MI).

    Inputs: ``in_file`` (raw image), ``reference`` (preprocessed reference), ``reference_mask``.
    Outputs: ``out_file`` (N4-corrected image resampled onto the reference grid, then N4 again inside the
    reference's brain mask:
    ``space-<reference>_desc-preproc_<suffix>``) and ``out_xfm`` (rigid ``.mat`` resampling the image
    into the reference's space: ``from-<suffix>_to-<reference>_mode-image_xfm``).
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["in_file", "reference", "reference_mask"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["out_file", "out_xfm"]), name="outputnode")
    reorient = pe.Node(ReorientToRAS(), name="reorient", mem_gb=0.5)
    n4 = pe.Node(N4BiasFieldCorrection(num_threads=ITK_THREADS, seed=seed), name="n4",
                 n_procs=ITK_THREADS, mem_gb=1.0)
    coreg = pe.Node(RigidCoregistration(num_threads=ITK_THREADS, seed=seed), name="coregister",
                    n_procs=ITK_THREADS, mem_gb=1.5)
    n4_brain = pe.Node(N4BiasFieldCorrection(num_threads=ITK_THREADS, seed=seed, brain_pass=True),
                       name="n4_brain", n_procs=ITK_THREADS, mem_gb=1.0)
    wf.connect([
        (inputnode, reorient, [("in_file", "in_file")]),
        (reorient, n4, [("out_file", "in_file")]),
        (n4, coreg, [("out_file", "in_file")]),
        (inputnode, coreg, [("reference", "reference"), ("reference_mask", "reference_mask")]),
        (coreg, n4_brain, [("out_file", "in_file")]),
        (inputnode, n4_brain, [("reference_mask", "mask_file")]),
        (n4_brain, outputnode, [("out_file", "out_file")]),
        (coreg, outputnode, [("out_xfm", "out_xfm")]),
    ])
    return wf
