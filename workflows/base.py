"""The participant-level workflow: one Nipype graph per subject, one branch per session.

``init_single_subject_wf`` receives what discovery found as plain dicts (no pybids objects in the
graph, so the graph pickles for cluster plugins), one per session::

    {"session": "1" or None, "t1w": path, "t2w": [paths], "flair": [paths], "pdw": [paths],
     "acquisition": {AcquisitionRecord.to_dict() of the T1w},
     "acquisitions": {path: record dict} (optional, for the other images' sidecars)}

and, per session, runs :func:`~workflows.anatomical.init_anat_preproc_wf`, the tissue segmentation
methods (:func:`~workflows.segmentation.init_tissue_seg_wf`), one
:func:`~workflows.anatomical.init_coregistration_wf` per FLAIR/T2w/PDw image, and the sinks of
:mod:`workflows.outputs`.

Extension: a later stage that needs the session's preprocessed images (lesion segmentation,
longitudinal change) connects to the session workflow's ``outputnode`` (``t1w_preproc``,
``t1w_mask``, ``template_xfm``, ``coreg_<suffix>_<i>`` images, ``acquisition``, ...); new tissue
methods are added with :func:`workflows.segmentation.register_segmentation` and named in
``segmentation``.
"""

from __future__ import annotations

import os
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from workflows.anatomical import ANAT_OUTPUTS, init_anat_preproc_wf, init_coregistration_wf
from workflows.outputs import init_anat_derivatives_wf, init_coreg_derivatives_wf
from workflows.segmentation import DEFAULT_SEGMENTATION, check_methods, init_tissue_seg_wf, output_descs

COREG_MODALITIES = (("t2w", "T2w"), ("flair", "FLAIR"), ("pdw", "PDw"))


def _label(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in str(text))


def init_single_subject_wf(subject: str, sessions: list[dict], output_dir, bids_dir, work_dir=None, template=None,
                           omp_nthreads: int = 1, device: str = "auto", seed: int = 0, *,
                           segmentation=None, registration: str = "SyN", prior_weight: float = 0.25,
                           brain_extraction: str = "learned", name: str | None = None) -> pe.Workflow:
    """Build the workflow of one subject (``sub_<label>_wf``; ``base_dir`` = ``work_dir``).

    ``template``: a :func:`bidsapp.templates.get_template` dict (default: the default template at
    2 mm). ``segmentation``: method keys, main answer first (default ``("atropos",)``).
    ``registration``: ``SyN`` (default), ``Affine`` or ``Rigid``. ``brain_extraction``: ``learned``
    (default) or ``template`` (:mod:`workflows.interfaces.brainmask`).
    """
    if not sessions:
        raise ValueError(f"sub-{subject}: no session with a T1w to process")
    if template is None:
        from bidsapp.templates import get_template

        template = get_template(cache_dir=Path(work_dir) / "templates" if work_dir else None)
    methods = check_methods(segmentation or DEFAULT_SEGMENTATION)
    wf = pe.Workflow(name=name or f"sub_{_label(subject)}_wf")
    if work_dir is not None:
        wf.base_dir = str(work_dir)
        # crash reports go to the work directory, never to the (possibly read-only) current one
        wf.config["execution"]["crashdump_dir"] = str(Path(work_dir) / "crash")
    seen = set()
    for ses in sessions:
        label = ses.get("session")
        ses_name = f"ses_{_label(label)}_wf" if label else "anat_wf"
        if ses_name in seen:
            raise ValueError(f"sub-{subject}: session {label!r} listed twice")
        seen.add(ses_name)
        wf.add_nodes([init_session_wf(ses, output_dir=output_dir, bids_dir=bids_dir, template=template,
                                      omp_nthreads=omp_nthreads, device=device, seed=seed, segmentation=methods,
                                      registration=registration, prior_weight=prior_weight,
                                      brain_extraction=brain_extraction, name=ses_name)])
    return wf


def init_session_wf(session: dict, *, output_dir, bids_dir, template: dict, omp_nthreads: int = 1,
                    device: str = "auto", seed: int = 0, segmentation=DEFAULT_SEGMENTATION,
                    registration: str = "SyN", prior_weight: float = 0.25, brain_extraction: str = "learned",
                    name: str = "anat_wf") -> pe.Workflow:
    """One session: T1w preprocessing, tissue segmentation, co-registration of other contrasts, sinks."""
    t1w = session.get("t1w")
    if not t1w or not os.path.isfile(t1w):
        raise ValueError(f"{t1w}: T1w file not found")
    methods = check_methods(segmentation)
    acquisition = dict(session.get("acquisition") or {})
    extra = [(key, suffix, i, path) for key, suffix in COREG_MODALITIES
             for i, path in enumerate(session.get(key) or [])]

    wf = pe.Workflow(name=name)
    coreg_fields = [f"coreg_{suffix}_{i}" for _, suffix, i, _ in extra]
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w", "acquisition"]), name="inputnode")
    inputnode.inputs.t1w = str(t1w)
    inputnode.inputs.acquisition = acquisition
    outputnode = pe.Node(niu.IdentityInterface(fields=[*ANAT_OUTPUTS, "acquisition", "volumes", *coreg_fields]),
                         name="outputnode")

    anat_wf = init_anat_preproc_wf(template=template, omp_nthreads=omp_nthreads, seed=seed,
                                   registration=registration, brain_extraction=brain_extraction, device=device)
    seg_wf = init_tissue_seg_wf(methods=methods, omp_nthreads=omp_nthreads, seed=seed, device=device,
                                template=template, prior_weight=prior_weight)
    ds_wf = init_anat_derivatives_wf(output_dir=output_dir, bids_dir=bids_dir, template=template,
                                     seg_descs=output_descs(methods), seg_keys=methods, registration=registration)
    wf.connect([
        (inputnode, anat_wf, [("t1w", "inputnode.t1w")]),
        (anat_wf, seg_wf, [("outputnode.t1w_preproc", "inputnode.t1w_preproc"),
                           ("outputnode.t1w_mask", "inputnode.t1w_mask"),
                           ("outputnode.priors", "inputnode.priors")]),
        (inputnode, seg_wf, [("acquisition", "inputnode.acquisition")]),
        (inputnode, ds_wf, [("t1w", "inputnode.source_file"), ("acquisition", "inputnode.acquisition")]),
        (anat_wf, ds_wf, [(f"outputnode.{f}", f"inputnode.{f}") for f in
                          ("t1w_preproc", "t1w_mask", "t1w_mask_metadata", "template_xfm", "template_inv_xfm",
                           "t1w_template")]),
        (seg_wf, ds_wf, [("outputnode.volumes", "inputnode.volumes")]),
        (anat_wf, outputnode, [(f"outputnode.{f}", f) for f in ANAT_OUTPUTS]),
        (inputnode, outputnode, [("acquisition", "acquisition")]),
        (seg_wf, outputnode, [("outputnode.volumes", "volumes")]),
    ])
    for i in range(len(methods)):
        wf.connect([(seg_wf, ds_wf, [(f"outputnode.seg{i}_{f}", f"inputnode.seg{i}_{f}")
                                     for f in ("probseg", "dseg", "metadata")])])

    for key, suffix, i, path in extra:
        tag = f"{suffix.lower()}_{i}"
        co_wf = init_coregistration_wf(omp_nthreads=omp_nthreads, seed=seed, name=f"coreg_{tag}_wf")
        co_wf.inputs.inputnode.in_file = str(path)
        co_ds = init_coreg_derivatives_wf(output_dir=output_dir, bids_dir=bids_dir, suffix=suffix,
                                          name=f"coreg_{tag}_derivatives_wf")
        co_ds.inputs.inputnode.source_file = str(path)
        acq = (session.get("acquisitions") or {}).get(str(path))
        if acq:
            co_ds.inputs.inputnode.acquisition = dict(acq)
        wf.connect([
            (anat_wf, co_wf, [("outputnode.t1w_preproc", "inputnode.t1w_preproc"),
                              ("outputnode.t1w_mask", "inputnode.t1w_mask")]),
            (inputnode, co_ds, [("t1w", "inputnode.t1w_source")]),
            (co_wf, co_ds, [("outputnode.out_file", "inputnode.out_file"),
                            ("outputnode.out_xfm", "inputnode.out_xfm")]),
            (co_wf, outputnode, [("outputnode.out_file", f"coreg_{suffix}_{i}")]),
        ])
    return wf
