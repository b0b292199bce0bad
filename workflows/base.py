"""The participant-level workflow: one Nipype graph per subject, one branch per session.

``init_single_subject_wf`` receives what discovery found as plain dicts (no pybids objects in the
graph, so the graph pickles for cluster plugins), one per session::

    {"session": "1" or None, "t1w": path or None, "t2w": [paths], "flair": [paths], "pdw": [paths],
     "acquisition": {AcquisitionRecord.to_dict() of the reference image},
     "acquisitions": {path: record dict} (optional, for the other images' sidecars)}

Each session has a reference image: its T1w, or without one its first FLAIR (then T2w, PDw). Per
session it runs :func:`~workflows.anatomical.init_anat_preproc_wf` on the reference, one
:func:`~workflows.anatomical.init_coregistration_wf` per other image, the session-level methods of
:mod:`bidsapp.methods` that the session's contrasts allow (:func:`workflows.methods.init_session_methods_wf`;
the others are left out with a plan line), quality control of the reference image and its main tissue
segmentation (:mod:`workflows.interfaces.qc`: a fail verdict fails the session) and the sinks of
:mod:`workflows.outputs`. Then the subject-level methods run on the sessions that have what they need.

Where a new method plugs in: declare it with :func:`bidsapp.methods.register`; nothing here changes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bidsapp import methods as M
from bidsapp.labels import TISSUE
from workflows.anatomical import ANAT_OUTPUTS, init_anat_preproc_wf, init_coregistration_wf
from workflows.interfaces.qc import QualityControl, QualityControlGate
from workflows.methods import contrast_field, init_session_methods_wf, init_subject_method_wf, output_fields
from workflows.outputs import init_anat_derivatives_wf, init_coreg_derivatives_wf, init_method_derivatives_wf, qc_sink

def _label(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in str(text))


class SessionImages(NamedTuple):
    reference: str
    """Contrast of the reference image (the T1w, else FLAIR, T2w, PDw: :data:`bidsapp.methods.CONTRASTS`)."""
    reference_path: str
    others: list
    """``(contrast, run index, path)`` of every other image."""

    @property
    def contrasts(self) -> list[str]:
        """The contrasts the session has, reference first."""
        return list(dict.fromkeys([self.reference, *(c for c, _, _ in self.others)]))


def session_images(session: dict) -> SessionImages:
    """The session dict's images (keys ``t1w``, ``flair``, ``t2w``, ``pdw``), checked to exist."""
    images = []
    for contrast in M.CONTRASTS:
        paths = session.get(contrast.lower()) or []
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        images += [(contrast, i, str(p)) for i, p in enumerate(paths)]
    if not images:
        raise ValueError(f"session {session.get('session')!r}: no T1w, FLAIR, T2w or PDw image")
    ref = images.pop(0)
    missing = [p for _, _, p in [ref, *images] if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"{missing[0]}: image file not found")
    return SessionImages(ref[0], ref[2], [(c, i - (1 if c == ref[0] else 0), p) for c, i, p in images])


def init_single_subject_wf(subject: str, sessions: list[dict], output_dir, bids_dir, work_dir=None, template=None,
                           omp_nthreads: int = 1, device: str = "auto", seed: int = 0, *,
                           segmentation=None, lesion_methods=None, lesion_threshold: float | None = None,
                           methods=(), subject_methods=None, registration: str = "SyN",
                           prior_weight: float = 0.25, brain_extraction: str = "learned",
                           name: str | None = None) -> pe.Workflow:
    """Build the workflow of one subject (``sub_<label>_wf``; ``base_dir`` = ``work_dir``).

    ``template``: a :func:`bidsapp.templates.get_template` dict (default: the default template at
    2 mm). ``segmentation``: tissue method keys, main answer first (default
    :data:`bidsapp.methods.DEFAULT_TISSUE`). ``lesion_methods``: lesion method keys, main answer first
    (default: every registered default one; on each session the first that can run is the main answer).
    ``lesion_threshold``: probability at which lesion masks are cut (default: the models' 0.5).
    ``methods``: further session-level methods to run besides
    the registered defaults. ``subject_methods``: subject-level method keys (default: the registered
    defaults). ``registration``: ``SyN`` (default), ``Affine`` or ``Rigid``. ``brain_extraction``:
    ``learned`` (default) or ``template`` (:mod:`workflows.interfaces.brainmask`).
    """
    if not sessions:
        raise ValueError(f"sub-{subject}: no session to process")
    if template is None:
        from bidsapp.templates import get_template

        template = get_template(cache_dir=Path(work_dir) / "templates" if work_dir else None)
    keys = M.select(segmentation, methods, lesion=lesion_methods)
    subject_keys = M.select(level=M.SUBJECT) if subject_methods is None else tuple(subject_methods)
    wrong = [k for k in subject_keys if M.get(k).level != M.SUBJECT]
    if wrong:
        raise ValueError(f"not subject-level method(s): {', '.join(wrong)}")
    wf = pe.Workflow(name=name or f"sub_{_label(subject)}_wf")
    if work_dir is not None:
        wf.base_dir = str(work_dir)
        # crash reports go to the work directory, never to the (possibly read-only) current one
        wf.config["execution"]["crashdump_dir"] = str(Path(work_dir) / "crash")
    options = {"omp_nthreads": omp_nthreads, "seed": seed, "device": device, "template": template,
               "prior_weight": prior_weight, "lesion_threshold": lesion_threshold}
    seen, built = set(), []
    for ses in sessions:
        label = ses.get("session")
        ses_name = f"ses_{_label(label)}_wf" if label else "anat_wf"
        if ses_name in seen:
            raise ValueError(f"sub-{subject}: session {label!r} listed twice")
        seen.add(ses_name)
        ses_wf = init_session_wf(ses, output_dir=output_dir, bids_dir=bids_dir, template=template,
                                 omp_nthreads=omp_nthreads, device=device, seed=seed, method_keys=keys,
                                 registration=registration, prior_weight=prior_weight,
                                 brain_extraction=brain_extraction, lesion_threshold=lesion_threshold,
                                 name=ses_name)
        wf.add_nodes([ses_wf])
        images = session_images(ses)
        run = M.plan_session(keys, images.contrasts).run
        volumes = any("volumes" in M.get(k).outputs for k in run)
        built.append(_Built(images, ses.get("session") or "", ses_wf, volumes, run, ses))
    for key in subject_keys:
        _add_subject_method(wf, key, built, output_dir=output_dir, bids_dir=bids_dir, options=options)
    return wf


class _Built(NamedTuple):
    """A session's workflow and what the subject level needs to know of it."""

    images: SessionImages
    label: str
    wf: pe.Workflow
    volumes: bool
    run: list
    """Session-level methods that run on it, main answers first."""
    session: dict


def _main_output(run, task_labels, kind: str) -> str | None:
    """``<ident>_<kind>`` of the first method of ``run`` with that label set and output (the main answer)."""
    for k in run:
        m = M.get(k)
        if m.labels is not None and m.labels.key == task_labels.key and kind in m.outputs:
            return f"{m.ident}_{kind}"
    return None


def common_contrast(built) -> str:
    """The first contrast (T1w, FLAIR, T2w, PDw) every session has; else the first session's reference."""
    for c in M.CONTRASTS:
        if all(c in b.images.contrasts for b in built):
            return c
    return built[0].images.reference


def _add_subject_method(wf, key, built, *, output_dir, bids_dir, options) -> None:
    from bidsapp.bids.acquisition import AcquisitionRecord
    from bidsapp.labels import LESION

    m = M.get(key)
    eligible = [b for b in built if not m.missing(b.images.contrasts)]
    if len(eligible) < m.min_sessions:  # the plan says so (bidsapp.methods.plan_subject)
        return
    contrast = common_contrast(eligible)
    lesion_of = [_main_output(b.run, LESION, "mask") for b in eligible]
    sub_wf = init_subject_method_wf(key, [b.label for b in eligible], output_dir=output_dir,
                                    bids_dir=bids_dir, options=options, contrast=contrast,
                                    contrasts=[contrast if contrast in b.images.contrasts else b.images.reference
                                               for b in eligible],
                                    lesion_sessions=[i for i, out in enumerate(lesion_of) if out])
    sub_wf.inputs.inputnode.source_files = [b.images.reference_path for b in eligible]
    image_of, acquisitions, records = [], [], []
    for b in eligible:
        if b.images.reference == contrast or contrast not in b.images.contrasts:
            image_of.append("anat_preproc")
            record = b.session.get("acquisition") or {}
        else:
            i, path = next((i, p) for c, i, p in b.images.others if c == contrast)
            image_of.append(f"coreg_{contrast}_{i}")
            record = (b.session.get("acquisitions") or {}).get(path) or {}
        acquisitions.append(AcquisitionRecord.from_dict(record).protocol_key if record else "")
        records.append(dict(record))
    sub_wf.inputs.inputnode.acquisitions = acquisitions
    sub_wf.inputs.inputnode.acquisition_records = records
    sub_wf.inputs.inputnode.acq_times = [str(b.session.get("acq_time") or "") for b in eligible]
    per_session = {"in_files": image_of, "mask_files": ["anat_mask"] * len(eligible)}
    if all(b.volumes for b in eligible):
        per_session["volumes_files"] = ["volumes"] * len(eligible)
    per_session["probseg_files"] = [_main_output(b.run, TISSUE, "probseg") for b in eligible]
    per_session["lesion_files"] = lesion_of
    placeholder = {"probseg_files": [], "lesion_files": ""}
    for field, outs in per_session.items():
        merge = pe.Node(niu.Merge(len(eligible), no_flatten=True), name=f"{m.ident}_{field}",
                        run_without_submitting=True)
        for i, (b, out) in enumerate(zip(eligible, outs), 1):
            if out is None:
                setattr(merge.inputs, f"in{i}", placeholder[field])
            else:
                wf.connect(b.wf, f"outputnode.{out}", merge, f"in{i}")
        wf.connect(merge, "out", sub_wf, f"inputnode.{field}")


def _add_quality_control(wf, inputnode, anat_wf, reference: str, *, output_dir, bids_dir) -> pe.Node:
    """QC of the preprocessed reference (:mod:`workflows.interfaces.qc`): its table is written, and a fail
    verdict fails the session. Returns the QC node, for the caller to connect a tissue segmentation."""
    qc = pe.Node(QualityControl(contrast=reference), name="quality_control", mem_gb=1.5)
    gate = pe.Node(QualityControlGate(), name="quality_gate", run_without_submitting=True)
    ds = qc_sink(output_dir, bids_dir)
    wf.connect([
        (anat_wf, qc, [("outputnode.anat_preproc", "in_file"), ("outputnode.anat_mask", "mask_file")]),
        (inputnode, ds, [("in_file", "source_file")]),
        (qc, ds, [("out_tsv", "in_file")]),
        (inputnode, gate, [("in_file", "source_file")]),
        (qc, gate, [("verdict", "verdict"), ("reasons", "reasons")]),
    ])
    return qc


def init_session_wf(session: dict, *, output_dir, bids_dir, template: dict, omp_nthreads: int = 1,
                    device: str = "auto", seed: int = 0, method_keys=None, registration: str = "SyN",
                    prior_weight: float = 0.25, brain_extraction: str = "learned",
                    lesion_threshold: float | None = None, name: str = "anat_wf") -> pe.Workflow:
    """One session: preprocessing of the reference image, co-registration of the others onto it, the
    session-level methods its contrasts allow, quality control, sinks."""
    images = session_images(session)
    ref, ref_path, others = images
    available = images.contrasts
    plan = M.plan_session(M.select() if method_keys is None else method_keys, available)
    main = M.main_answers(plan.run)
    acquisition = dict(session.get("acquisition") or {})
    to_template = ref == "T1w"
    needs_priors = to_template and any("priors" in M.get(k).inputs for k in plan.run)

    wf = pe.Workflow(name=name)
    coreg_fields = [f"coreg_{c}_{i}" for c, i, _ in others]
    method_fields = [f for k in plan.run for f in output_fields(M.get(k))]
    inputnode = pe.Node(niu.IdentityInterface(fields=["in_file", "acquisition"]), name="inputnode")
    inputnode.inputs.in_file = ref_path
    inputnode.inputs.acquisition = acquisition
    outputnode = pe.Node(niu.IdentityInterface(
        fields=[*ANAT_OUTPUTS, "acquisition", "volumes", *coreg_fields, *method_fields]), name="outputnode")

    anat_wf = init_anat_preproc_wf(template=template, omp_nthreads=omp_nthreads, seed=seed,
                                   registration=registration, brain_extraction=brain_extraction, device=device,
                                   to_template=to_template, priors=needs_priors)
    with_volumes = [k for k in plan.run if "volumes" in M.get(k).outputs]
    ds_wf = init_anat_derivatives_wf(output_dir=output_dir, bids_dir=bids_dir, template=template, suffix=ref,
                                     methods=with_volumes, registration=registration)
    anat_fields = ["anat_preproc", "anat_mask", "anat_mask_metadata"]
    if to_template:
        anat_fields += ["template_xfm", "template_inv_xfm", "anat_template"]
    made = ANAT_OUTPUTS if to_template else ["anat_ras", *anat_fields]  # no template outputs without a T1w
    wf.connect([
        (inputnode, anat_wf, [("in_file", "inputnode.in_file")]),
        (inputnode, ds_wf, [("in_file", "inputnode.source_file"), ("acquisition", "inputnode.acquisition")]),
        (anat_wf, ds_wf, [(f"outputnode.{f}", f"inputnode.{f}") for f in anat_fields]),
        (anat_wf, outputnode, [(f"outputnode.{f}", f) for f in made]),
        (inputnode, outputnode, [("acquisition", "acquisition")]),
    ])
    qc = _add_quality_control(wf, inputnode, anat_wf, ref, output_dir=output_dir, bids_dir=bids_dir)

    first_of = {}
    for contrast, i, path in others:
        tag = f"{contrast.lower()}_{i}"
        co_wf = init_coregistration_wf(seed=seed, name=f"coreg_{tag}_wf")
        co_wf.inputs.inputnode.in_file = path
        co_ds = init_coreg_derivatives_wf(output_dir=output_dir, bids_dir=bids_dir, suffix=contrast, reference=ref,
                                          name=f"coreg_{tag}_derivatives_wf")
        co_ds.inputs.inputnode.source_file = path
        acq = (session.get("acquisitions") or {}).get(path)
        if acq:
            co_ds.inputs.inputnode.acquisition = dict(acq)
        wf.connect([
            (anat_wf, co_wf, [("outputnode.anat_preproc", "inputnode.reference"),
                              ("outputnode.anat_mask", "inputnode.reference_mask")]),
            (inputnode, co_ds, [("in_file", "inputnode.reference_source")]),
            (co_wf, co_ds, [("outputnode.out_file", "inputnode.out_file"),
                            ("outputnode.out_xfm", "inputnode.out_xfm")]),
            (co_wf, outputnode, [("outputnode.out_file", f"coreg_{contrast}_{i}")]),
        ])
        first_of.setdefault(contrast, co_wf)

    if not plan.run:
        return wf
    meth_wf = init_session_methods_wf(plan.run, available, options={
        "omp_nthreads": omp_nthreads, "seed": seed, "device": device, "template": template,
        "prior_weight": prior_weight, "lesion_threshold": lesion_threshold})
    wf.connect([
        (anat_wf, meth_wf, [("outputnode.anat_mask", "inputnode.mask_file"),
                            ("outputnode.anat_preproc", f"inputnode.{contrast_field(ref)}")]),
        (inputnode, meth_wf, [("acquisition", "inputnode.acquisition")]),
    ])
    if needs_priors:
        wf.connect(anat_wf, "outputnode.priors", meth_wf, "inputnode.priors")
    for contrast, co_wf in first_of.items():
        if contrast != ref:
            wf.connect(co_wf, "outputnode.out_file", meth_wf, f"inputnode.{contrast_field(contrast)}")
    wf.connect([(meth_wf, outputnode, [(f"outputnode.{f}", f) for f in method_fields])])
    tissue = next((m for m in map(M.get, plan.run)
                   if m.labels is not None and m.labels.key == TISSUE.key and "dseg" in m.outputs), None)
    if tissue is not None:  # the main tissue answer (the first of its task) is what QC judges
        wf.connect(meth_wf, f"outputnode.{tissue.ident}_dseg", qc, "dseg")
        if "probseg" in tissue.outputs:
            wf.connect(meth_wf, f"outputnode.{tissue.ident}_probseg", qc, "probseg")
    if with_volumes:
        wf.connect([(meth_wf, ds_wf, [("outputnode.volumes", "inputnode.volumes")]),
                    (meth_wf, outputnode, [("outputnode.volumes", "volumes")])])
    for key in plan.run:
        m = M.get(key)
        images = [k for k in m.outputs if k != "volumes"]
        if not images:
            continue
        m_ds = init_method_derivatives_wf(m, main=main[key], output_dir=output_dir, bids_dir=bids_dir)
        wf.connect([
            (inputnode, m_ds, [("in_file", "inputnode.source_file"), ("acquisition", "inputnode.acquisition")]),
            (meth_wf, m_ds, [(f"outputnode.{m.ident}_{k}", f"inputnode.{k}") for k in (*images, "metadata")]),
        ])
    return wf
