"""Wire registered methods (:mod:`bidsapp.methods`) into a session's or a subject's workflow.

Everything here is generic: a method's node is connected from its declaration, inputs and outputs are
matched by name (``<ident>_<output>`` on the output node, :attr:`bidsapp.methods.Method.ident` being the
key with non-alphanumerics as ``_``), and its images are written from its label set by
:func:`workflows.outputs.init_method_derivatives_wf`. A new method never needs a change in this module.
"""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bidsapp import methods as M
from bidsapp.labels import TISSUE
from workflows.outputs import sink

SESSION_RESULTS = ("metadata", "warnings")


def contrast_field(contrast: str) -> str:
    """Name of a contrast's image input (``flair_file``)."""
    return f"{contrast.lower()}_file"


def output_fields(method: M.Method) -> list[str]:
    """The output-node fields a session method fills."""
    kinds = [k if k != "volumes" else "volumes_tsv" for k in method.outputs]
    return [f"{method.ident}_{k}" for k in (*kinds, *SESSION_RESULTS)]


def init_session_methods_wf(keys, available, *, options: dict, name: str = "methods_wf") -> pe.Workflow:
    """Run the session methods ``keys`` (all runnable on ``available`` contrasts) side by side.

    Inputs: ``mask_file``, ``priors``, ``acquisition`` and ``<contrast>_file`` for each contrast (on the
    reference grid). Outputs: :func:`output_fields` of each method and ``volumes`` (their volume rows
    merged into one long-format table; undefined when no method makes volumes).
    """
    from workflows.interfaces.ants import MergeVolumes
    from workflows.interfaces.lesion import FillLesions

    methods = [M.get(k) for k in keys]
    wf = pe.Workflow(name=name)
    in_fields = ["mask_file", *M.EXTRA_INPUTS, *(contrast_field(c) for c in M.CONTRASTS)]
    inputnode = pe.Node(niu.IdentityInterface(fields=in_fields), name="inputnode")
    out_fields = ["volumes"] + [f for m in methods for f in output_fields(m)]
    outputnode = pe.Node(niu.IdentityInterface(fields=out_fields), name="outputnode")
    with_volumes = [m for m in methods if "volumes" in m.outputs]
    if with_volumes:
        gather = pe.Node(niu.Merge(len(with_volumes)), name="gather_volumes", run_without_submitting=True)
        merge = pe.Node(MergeVolumes(), name="merge_volumes", run_without_submitting=True)
        wf.connect([(gather, merge, [("out", "in_files")]), (merge, outputnode, [("out_file", "volumes")])])
    nodes = {}
    for m in methods:
        missing = m.missing(available)
        if missing:
            raise ValueError(f"method {m.key} needs {', '.join(missing)}; the session has {', '.join(available)}")
        node = nodes[m.key] = m.build("seg_" + m.ident, {**options, "mem_gb": m.mem_gb})
        used = m.contrasts_used(available)
        wf.connect(inputnode, contrast_field(used[0]), node, "in_file")
        if "in_contrast" in node.inputs.copyable_trait_names():
            node.inputs.in_contrast = used[0]
        wf.connect(inputnode, "mask_file", node, "mask_file")
        for c in used[1:]:
            wf.connect(inputnode, contrast_field(c), node, contrast_field(c))
        for extra in m.inputs:
            wf.connect(inputnode, extra, node, extra)
    # lesion filling uses the main answer's mask: ``keys`` come in the user's order (bidsapp.methods.select)
    filler = next((m for m in methods if m.labels is not None and m.labels.counted_as and "mask" in m.outputs), None)
    for m in methods:
        source = {field: (nodes[m.key], field[len(m.ident) + 1:]) for field in output_fields(m)}
        if filler is not None and m.labels is not None and m.labels.key == TISSUE.key \
                and {"dseg", "probseg", "volumes"} <= set(m.outputs):
            fill = pe.Node(FillLesions(counted_as=filler.labels.counted_as), name=f"fill_{m.ident}")
            wf.connect([
                (nodes[m.key], fill, [("dseg", "dseg"), ("probseg", "probseg"), ("volumes_tsv", "volumes_tsv"),
                                      ("metadata", "metadata")]),
                (nodes[filler.key], fill, [("mask", "lesion_mask")]),
                (inputnode, fill, [("mask_file", "mask_file")]),
            ])
            for kind in ("dseg", "probseg", "volumes_tsv", "metadata"):
                source[f"{m.ident}_{kind}"] = (fill, kind)
        for field, (node, out) in source.items():
            wf.connect(node, out, outputnode, field)
        if m in with_volumes:
            node, out = source[f"{m.ident}_volumes_tsv"]
            wf.connect(node, out, gather, f"in{with_volumes.index(m) + 1}")
    return wf


SUBJECT_INPUTS = ("in_files", "mask_files", "volumes_files", "probseg_files", "lesion_files", "acquisitions",
                  "acquisition_records", "acq_times")
"""Per-session lists a subject-level node may take (each connected only when the node has the input)."""


def init_subject_method_wf(key: str, session_ids, *, output_dir, bids_dir, options: dict, contrast: str = "T1w",
                           contrasts=None, lesion_sessions=(), name: str | None = None) -> pe.Workflow:
    """Run the subject-level method ``key`` on the sessions ``session_ids`` and write its outputs.

    Inputs: ``source_files`` and :data:`SUBJECT_INPUTS` (one entry per session, in the order of
    ``session_ids``); ``contrast`` is that of ``in_files`` (``contrasts``: per session, when the sessions
    share no contrast and each gives its reference image). Written: ``out_tsv`` as
    ``sub-<label>_desc-<desc>_<table_suffix>.tsv``; when the node makes them, ``template`` as
    ``sub-<label>_desc-template_<contrast>.nii.gz``, ``figure`` as ``sub-<label>_desc-<desc>_figure.svg``
    (for the report), and per session ``to_subject_xfms`` / ``from_subject_xfms`` as
    ``sub-<label>_ses-<s>_from-<contrast>_to-subject_mode-image_xfm.txt`` and the inverse; with lesion
    masks on two or more sessions (``lesion_sessions``: their indices), ``lesion_tsv`` as
    ``sub-<label>_desc-lesionchange_stats.tsv``, and each later lesion session's ``newlesion_masks`` and
    ``lesionchange_masks`` entries as ``sub-<label>_ses-<s>_desc-newlesion_mask.nii.gz`` and
    ``..._desc-lesionchange_mask.nii.gz``; on T1w, ``decline_tsv`` as
    ``sub-<label>_desc-decline_stats.tsv`` when the 3D-SiameseNet's weights are there.
    """
    m = M.get(key)
    if len(session_ids) < m.min_sessions:
        raise ValueError(f"method {key} needs {m.min_sessions} sessions, not {len(session_ids)}")
    wf = pe.Workflow(name=name or f"{m.ident}_wf")
    inputnode = pe.Node(niu.IdentityInterface(fields=[*SUBJECT_INPUTS, "source_files"]), name="inputnode")
    first = pe.Node(niu.Select(index=0), name="first_source", run_without_submitting=True)
    node = m.build("subj_" + m.ident, {**options, "mem_gb": m.mem_gb})
    node.inputs.session_ids = [str(s) for s in session_ids]
    has = set(node.inputs.copyable_trait_names())
    if "contrast" in has:
        node.inputs.contrast = contrast
    ds = sink(f"ds_{m.ident}", output_dir, bids_dir, suffix=m.table_suffix, desc=m.desc, extension=".tsv",
              subject_level=True)
    wf.connect([
        (inputnode, first, [("source_files", "inlist")]),
        (inputnode, node, [(f, f) for f in SUBJECT_INPUTS if f in has]),
        (inputnode, ds, [("source_files", "sources")]),
        (first, ds, [("out", "source_file")]),
        (node, ds, [("out_tsv", "in_file"), ("metadata", "metadata")]),
    ])
    outputs = set(node.outputs.copyable_trait_names()) if node.outputs is not None else set()
    subject_files = {"template": dict(suffix=contrast, desc="template",
                                      metadata={"Description": "within-subject template: the mean of every session "
                                                               "resampled once into the subject's mid-space"}),
                     "figure": dict(suffix="figure", desc=m.desc, extension=".svg")}
    for out, kwargs in subject_files.items():
        if out in outputs:
            ds_out = sink(f"ds_{m.ident}_{out}", output_dir, bids_dir, subject_level=True, **kwargs)
            wf.connect([(first, ds_out, [("out", "source_file")]), (inputnode, ds_out, [("source_files", "sources")]),
                        (node, ds_out, [(out, "in_file")])])
    lesion_sessions = sorted(lesion_sessions)
    if "lesion_tsv" in outputs and len(lesion_sessions) >= 2:
        ds_les = sink(f"ds_{m.ident}_lesions", output_dir, bids_dir, subject_level=True, suffix="stats",
                      desc="lesionchange", extension=".tsv", metadata={
                          "Description": "lesion by lesion change between consecutive sessions with lesion masks, in "
                                         "the subject's mid-space (bidsapp.longitudinal.lesions)",
                          "status": {"Levels": {"new": "no earlier lesion touches it", "enlarging": "volume up by "
                                                "more than 25 % and 3 mm3", "stable": "within that",
                                                "shrinking": "volume down by more than 25 % and 3 mm3",
                                                "resolved": "no later lesion touches it"}}})
        wf.connect([(first, ds_les, [("out", "source_file")]), (inputnode, ds_les, [("source_files", "sources")]),
                    (node, ds_les, [("lesion_tsv", "in_file")])])
        follow_up_masks = {
            "newlesion": "lesions of this session that touch no lesion of the previous session with a lesion mask "
                         "(mid-space, brought back here)",
            "lesionchange": "new or grown lesion voxels: lesion in this session and not in the previous session with "
                            "a lesion mask, in pieces of at least 10 mm3 (mid-space, brought back here)"}
        for i in lesion_sessions[1:]:
            src_pick = pe.Node(niu.Select(index=i), name=f"newlesion_source_{i}", run_without_submitting=True)
            wf.connect(inputnode, "source_files", src_pick, "inlist")
            for desc, description in follow_up_masks.items():
                if f"{desc}_masks" not in outputs:
                    continue
                pick = pe.Node(niu.Select(index=i), name=f"{desc}_{i}", run_without_submitting=True)
                ds_mask = sink(f"ds_{m.ident}_{desc}_{i}", output_dir, bids_dir, suffix="mask", desc=desc,
                               metadata={"Description": description})
                wf.connect([(node, pick, [(f"{desc}_masks", "inlist")]), (pick, ds_mask, [("out", "in_file")]),
                            (src_pick, ds_mask, [("out", "source_file")])])
    from bidsapp.longitudinal.decline import COLUMN_DESCRIPTIONS, applies, sidecar_metadata

    if "decline_tsv" in outputs and applies(contrast):
        ds_dec = sink(f"ds_{m.ident}_decline", output_dir, bids_dir, subject_level=True, suffix="stats",
                      desc="decline", extension=".tsv", metadata={
                          "Description": "stable or accelerated atrophy (decline) of every consecutive session "
                                         "pair, from the two T1w in the subject's mid-space (3D-SiameseNet, "
                                         "bidsapp.longitudinal.decline)", **sidecar_metadata(), **COLUMN_DESCRIPTIONS})
        wf.connect([(first, ds_dec, [("out", "source_file")]), (inputnode, ds_dec, [("source_files", "sources")]),
                    (node, ds_dec, [("decline_tsv", "in_file")])])
    contrasts = list(contrasts or [contrast] * len(session_ids))
    for out in ("to_subject_xfms", "from_subject_xfms"):
        if out not in outputs:
            continue
        for i, _ in enumerate(session_ids):
            src, dst = (contrasts[i], "subject") if out == "to_subject_xfms" else ("subject", contrasts[i])
            pick = pe.Node(niu.Select(index=i), name=f"{out}_{i}", run_without_submitting=True)
            src_pick = pe.Node(niu.Select(index=i), name=f"{out}_source_{i}", run_without_submitting=True)
            ds_x = sink(f"ds_{m.ident}_{out}_{i}", output_dir, bids_dir, suffix="xfm", from_=src, to=dst, mode="image",
                        extension=".txt", metadata={
                            "Description": f"ITK affine resampling images from {src} space into {dst} space: "
                                           "ants.apply_transforms(fixed=<image of the target space>, moving=<image>, "
                                           "transformlist=[this file])",
                            "Registration": {"Software": "antspyx", "Type": "Rigid",
                                             "Method": "mid-space of all sessions (bidsapp.longitudinal.midspace)"}})
            wf.connect([(node, pick, [(out, "inlist")]), (inputnode, src_pick, [("source_files", "inlist")]),
                        (pick, ds_x, [("out", "in_file")]), (src_pick, ds_x, [("out", "source_file")])])
    return wf
