"""Nipype node of the subject-level longitudinal method (:mod:`bidsapp.longitudinal`).

It honours the subject-method contract of :mod:`bidsapp.methods`: lists with one entry per session, in
session order (``in_files``: each session's image of the subject's common contrast on the session's
grid; ``mask_files``; ``probseg_files``: the session's main tissue answer in label order, or an empty list;
``lesion_files``: the main lesion mask or ""; ``acquisitions``: protocol keys; ``acquisition_records``:
the records as dicts, from which the sequence parameters tell whether CSF is inverted; ``acq_times``). Outputs:
the change table, the mid-space template, each session's transforms to and from the mid-space, a
report figure, the decline probability of every consecutive pair (T1w, when the 3D-SiameseNet's weights
are there), ``metadata`` and ``warnings``.
"""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, traits


class _ChangeInputSpec(BaseInterfaceInputSpec):
    in_files = traits.List(File(exists=True), mandatory=True, desc="one image per session (common contrast)")
    mask_files = traits.List(File(exists=True), mandatory=True, desc="brain masks, same grids")
    session_ids = traits.List(traits.Str(), mandatory=True)
    volumes_files = traits.List(File(exists=True), desc="each session's volume table (not used)")
    probseg_files = traits.List(traits.Any(), desc="per session: tissue probability files (TISSUE order) or []")
    lesion_files = traits.List(traits.Any(), desc="per session: the main lesion mask or ''")
    acquisitions = traits.List(traits.Any(), desc="per session: protocol key or ''")
    acquisition_records = traits.List(traits.Any(), desc="per session: acquisition record (dict) or {}")
    acq_times = traits.List(traits.Any(), desc="per session: acq_time or ''")
    contrast = traits.Str("T1w", usedefault=True, desc="contrast of in_files")
    seed = traits.Int(0, usedefault=True)
    num_threads = traits.Int(1, usedefault=True, nohash=True)
    outputs_revision = traits.Int(3, usedefault=True,
                                  desc="raised when the outputs or their reading change (2: lesionchange_masks; "
                                       "3: the reading without tissue maps, and only where every session has data), so "
                                       "that a work dir kept from before recomputes the step instead of offering "
                                       "results without them")


class _ChangeOutputSpec(TraitedSpec):
    out_tsv = File(exists=True, desc="the change table")
    template = File(exists=True, desc="mid-space template")
    to_subject_xfms = traits.List(File(exists=True), desc="per session: session -> mid-space (ITK affine)")
    from_subject_xfms = traits.List(File(exists=True), desc="per session: mid-space -> session (ITK affine)")
    figure = File(desc="report figure (SVG)")
    lesion_tsv = File(desc="lesion-by-lesion change between consecutive sessions with lesion masks")
    decline_tsv = File(desc="3D-SiameseNet's decline probability per consecutive pair (T1w, weights shipped)")
    newlesion_masks = traits.List(File(exists=True), desc="per session: its new lesions on its own grid (empty "
                                                          "for a session without lesions or the first one)")
    lesionchange_masks = traits.List(File(exists=True), desc="per session: its new or grown lesion voxels since "
                                                              "the previous lesion session, on its own grid (as "
                                                              "newlesion_masks)")
    metadata = traits.Dict()
    warnings = traits.List(traits.Str())


def _csf_inverted(record) -> bool:
    """Whether a session's sequence parameters put CSF opposite to the tissues (False when unknown)."""
    from bidsapp.models.tissue import parameter_vector

    return bool(record) and bool(parameter_vector(record).csf_inverted)


class LongitudinalChange(SimpleInterface):
    """Mid-space template, transforms and volume change of a subject's sessions."""

    input_spec = _ChangeInputSpec
    output_spec = _ChangeOutputSpec

    def _run_interface(self, runtime):
        import ants
        import numpy as np

        from bidsapp.longitudinal import midspace as MS
        from bidsapp.longitudinal import subject as S
        from workflows.interfaces.ants import use_threads

        use_threads(self.inputs.num_threads, self.inputs.seed)
        cwd = Path(runtime.cwd)
        ins = self.inputs
        sessions = session_inputs(ins)
        from bidsapp.longitudinal import decline as D

        result = S.subject_change(sessions, seed=ins.seed, work_dir=cwd / "midspace",
                                  decline=D.applies(ins.contrast), contrast=ins.contrast)
        out_tsv = cwd / "change.tsv"
        S.format_table(result.table).to_csv(out_tsv, sep="\t", index=False, na_rep="n/a")
        template = cwd / "template.nii.gz"
        ants.image_write(result.template, str(template))
        # outputs follow the input order, whatever order the sessions were measured in
        order = {s.label: k for k, s in enumerate(result.sessions)}
        to_subject, from_subject = [], []
        for s in sessions:
            m = result.to_session[order[s.label]]
            label = s.label or "session"
            from_subject.append(MS.write_transform(m, cwd / f"{label}_from-subject.txt"))
            to_subject.append(MS.write_transform(np.linalg.inv(m), cwd / f"{label}_to-subject.txt"))
        if result.lesions is not None:
            from bidsapp.longitudinal.lesions import COLUMNS as LESION_COLUMNS

            lesion_tsv = cwd / "lesionchange.tsv"
            result.lesions.to_csv(lesion_tsv, sep="\t", index=False, na_rep="n/a", columns=list(LESION_COLUMNS))
            self._results["lesion_tsv"] = str(lesion_tsv)
            for output, images, stem in (("newlesion_masks", result.new_lesions, "newlesions"),
                                         ("lesionchange_masks", result.lesion_changes, "lesionchange")):
                masks = []
                for s in sessions:
                    path = cwd / f"{s.label or 'session'}_{stem}.nii.gz"
                    ants.image_write(images[s.label], str(path))
                    masks.append(str(path))
                self._results[output] = masks
        if result.decline is not None:
            decline_tsv = cwd / "decline.tsv"
            result.decline.round({"probability_decline": 4, "interval_days": 1}).to_csv(
                decline_tsv, sep="\t", index=False, na_rep="n/a")
            self._results["decline_tsv"] = str(decline_tsv)
        figure = cwd / "change.svg"
        from bidsapp.reports.longitudinal import change_figure

        change_figure(result, figure)
        self._results.update(
            out_tsv=str(out_tsv), template=str(template), to_subject_xfms=to_subject,
            from_subject_xfms=from_subject, figure=str(figure), warnings=list(result.warnings),
            metadata={
                "Method": "longitudinal",
                "Description": "volume change between sessions, measured in the subject's mid-space with a "
                               "partial-volume model (bidsapp.longitudinal.change)",
                "Sessions": [s.label for s in result.sessions],
                "Contrast": ins.contrast,
                "Columns": S.COLUMN_DESCRIPTIONS,
            })
        return runtime


def session_inputs(ins) -> list:
    """The node's inputs (its ``inputs``, or the dict Nipype saved of them) as
    :class:`bidsapp.longitudinal.subject.SessionInput`, one per session, in input order."""
    from bidsapp.longitudinal import subject as S

    def get(name) -> list:  # an unset input (Undefined, None) is an empty list
        value = ins.get(name) if isinstance(ins, dict) else getattr(ins, name, None)
        return list(value) if value else []

    n = len(get("in_files"))
    if len(get("mask_files")) != n or len(get("session_ids")) != n:
        raise ValueError("in_files, mask_files and session_ids must have one entry per session")

    def per_session(name, default):
        values = get(name)
        return values + [default] * (n - len(values))

    tissue = []
    for files in per_session("probseg_files", []):
        files = [f for f in (files or []) if f]
        tissue.append(dict(zip(("GM", "WM", "CSF"), _tissue_order(files))) if len(files) >= 3 else None)
    return [S.SessionInput(label=f"ses-{sid}" if sid else "", image=img, mask=mask, tissue=t,
                           lesion=les or None, acquisition=acq or None, acq_time=when or None,
                           csf_inverted=_csf_inverted(record))
            for sid, img, mask, t, les, acq, when, record in zip(
                get("session_ids"), get("in_files"), get("mask_files"), tissue, per_session("lesion_files", ""),
                per_session("acquisitions", ""), per_session("acq_times", ""),
                per_session("acquisition_records", {}))]


def _tissue_order(files):
    """GM, WM, CSF from a probseg list in :data:`bidsapp.labels.TISSUE` order (the session-method contract)."""
    from bidsapp.labels import TISSUE

    by = dict(zip(TISSUE.names, files))
    return [by["GM"], by["WM"], by["CSF"]]


def change_node(name: str, options: dict):
    """Factory of the ``longitudinal`` subject-level method (:mod:`bidsapp.methods`)."""
    from nipype.pipeline import engine as pe

    from workflows.interfaces.ants import ITK_THREADS

    # its work is ANTs registration and resampling: one thread (ITK_THREADS), so that the scheduler runs
    # another subject's step beside it instead of leaving a core idle
    return pe.Node(LongitudinalChange(seed=int(options.get("seed", 0)), num_threads=ITK_THREADS),
                   name=name, n_procs=ITK_THREADS, mem_gb=options.get("mem_gb", 3.0))
