"""The group level: gather every participant's results, run the harmonisation steps, write the report.

Inputs are files on disk only (participant derivatives in ``output_dir`` and the raw dataset's
sidecars), so the group level can run long after, or far from, the participant jobs. Sessions whose
quality-control verdict is ``fail`` are left out (group_qc.tsv and the report's QC section say which).
Each step is a group-level method of :mod:`bidsapp.methods` (``run(ctx) -> list[Section]``), run in
registration order; a step that fails becomes a warning in the report, and the rest of the report is
still produced.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd

from bidsapp import methods as M
from bidsapp.bids.acquisition import BIDS_NAMES
from bidsapp.errors import UserError
from bidsapp.labels import LESION, VOLUME_LABELS
from bidsapp.harmonize.context import GroupContext, GroupOptions

LOG = logging.getLogger("scanbridge.group")

ACQ_COLUMNS = {"group_key": "acq_group", "site": "site",
               **{k: BIDS_NAMES[k] for k in ("manufacturer", "model", "field_strength", "sequence_family",
                                             "repetition_time", "echo_time", "inversion_time", "flip_angle")}}
"""Acquisition-record columns of group_acquisitions.tsv, renamed to their BIDS names."""


def lesion_columns() -> tuple[tuple[str, str], ...]:
    """(volume column, count column) of each lesion label in group_volumes.tsv: ``lesion``, ``lesion_count``."""
    return tuple((name, f"{name}_count") for name in LESION.names)


def gather_volumes(output_dir: Path, subjects: list[str] | None = None) -> pd.DataFrame:
    """One row per (participant, session, method) with a column per tissue, from the morph TSVs.

    When any session has a lesion row, ``lesion`` (mm^3) and ``lesion_count`` follow the tissue columns, the
    session's values repeated on each of its tissue-method rows; a session with lesions but no tissue rows
    (no T1w) is one row whose method is the lesion method that gave them (``lesion``, ``wmh``). The values
    are the session's main lesion answer: of its lesion rows (label ``lesion``, whatever the method), those
    of the first method in its volume table, which lists the methods main answer first; the baselines'
    rows stay in the participant's table and are not counted again here. Without lesion rows the table is
    exactly the tissue table.
    """
    from bidsapp.bids.collect import collect_volumes

    frames = [collect_volumes(output_dir, s) for s in subjects] if subjects else [collect_volumes(output_dir)]
    for f in frames:
        for msg in f.attrs.get("warnings", []):
            LOG.warning("%s", msg)
    long = pd.concat(frames, ignore_index=True)
    index = ["participant_id", "session_id", "method"]
    if long.empty:
        return pd.DataFrame(columns=[*index, *VOLUME_LABELS])
    long["session_id"] = long["session_id"].fillna("n/a")
    is_lesion = long["label"].astype(str).isin(LESION.names)
    lesions = _main_lesion_rows(long[is_lesion], index[:2])
    long = long[~is_lesion & ~long["method"].astype(str).isin(M.registry(M.SESSION, LESION.key))]
    if long.empty:
        wide = pd.DataFrame(columns=[*index, *VOLUME_LABELS])
    else:
        wide = long.pivot_table(index=index, columns="label", values="volume_mm3", aggfunc="first").reset_index()
        wide.columns.name = None
        wide = wide[[*index, *[t for t in VOLUME_LABELS if t in wide.columns]]]
    if lesions.empty:
        return wide
    return _with_lesions(wide, lesions, index)


def _main_lesion_rows(lesions: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The rows of each session's main lesion answer: its first lesion method (volume tables list the
    methods that ran main answer first, :func:`bidsapp.methods.main_answers`)."""
    if lesions.empty:
        return lesions
    main = lesions.drop_duplicates(keys)[[*keys, "method"]]
    return lesions.merge(main, how="inner", on=[*keys, "method"])


def _with_lesions(wide: pd.DataFrame, lesions: pd.DataFrame, index: list[str]) -> pd.DataFrame:
    """``wide`` with the lesion volume and count columns; sessions without tissue rows as one row of the
    lesion method that gave them."""
    keys = index[:2]
    per_session = lesions.drop_duplicates(keys)[[*keys, "method"]]
    for name, count_col in lesion_columns():
        rows = lesions[lesions["label"].astype(str) == name].drop_duplicates(keys)
        part = rows[keys].assign(**{name: pd.to_numeric(rows["volume_mm3"], errors="coerce"),
                                    count_col: pd.to_numeric(rows["count"], errors="coerce").round().astype("Int64")})
        per_session = per_session.merge(part, how="left", on=keys)
    tissue_cols = [c for c in wide.columns if c not in index]
    out = wide.merge(per_session.drop(columns="method"), how="left", on=keys)
    have = set(map(tuple, wide[keys].drop_duplicates().to_numpy().tolist()))
    only = per_session[[tuple(k) not in have for k in per_session[keys].to_numpy().tolist()]]
    if len(only):
        only = only.reindex(columns=list(out.columns))
        out = pd.concat([out, only], ignore_index=True) if len(out) else only
        out = out.sort_values(index, kind="stable").reset_index(drop=True)
    for c in tissue_cols:
        out[c] = pd.to_numeric(out[c], errors="coerce")
    return out


def gather_qc(output_dir: Path, subjects: list[str] | None = None) -> pd.DataFrame:
    """Every session's quality-control row (:func:`bidsapp.qc.collect_qc`): group_qc.tsv."""
    from bidsapp.qc import collect_qc

    frames = [collect_qc(output_dir, s) for s in subjects] if subjects else [collect_qc(output_dir)]
    return pd.concat(frames, ignore_index=True)


def without_failed_sessions(volumes: pd.DataFrame, qc: pd.DataFrame) -> pd.DataFrame:
    """``volumes`` less the sessions whose quality-control verdict is ``fail`` (their results are not usable)."""
    failed = qc[qc["verdict"].astype(str) == "fail"] if len(qc) else qc
    if volumes.empty or not len(failed):
        return volumes
    bad = set(zip(failed["participant_id"], failed["session_id"].fillna("n/a")))
    keep = [k not in bad for k in zip(volumes["participant_id"], volumes["session_id"].fillna("n/a"))]
    for pid, sid in sorted(bad):
        LOG.warning("%s%s failed quality control: left out of the group level", pid, "" if sid == "n/a" else f" {sid}")
    return volumes[keep].reset_index(drop=True)


def gather_acquisitions(output_dir: Path, bids_dir: Path, subjects: list[str] | None) -> pd.DataFrame:
    """The acquisition record of every processed T1w: from the derivatives' sidecars (what was used),
    else from the raw dataset's sidecars (images are not opened)."""
    from bidsapp.bids import discovery
    from bidsapp.bids.collect import collect_acquisitions

    frames = [collect_acquisitions(output_dir, s) for s in subjects] if subjects else [collect_acquisitions(output_dir)]
    table = pd.concat(frames, ignore_index=True)
    if table.empty:
        plan = discovery.discover(bids_dir, participant_label=subjects, check_images=False)
        table = plan.acquisition_table()
        if table.empty:
            return table
        table = table[table["suffix"] == "T1w"].copy()
    table["session_id"] = table["session_id"].fillna("n/a")
    return table.rename(columns={k: v for k, v in ACQ_COLUMNS.items() if k != "group_key"})


def _with_reference_acquisitions(acquisitions: pd.DataFrame, output_dir: Path,
                                 subjects: list[str] | None) -> pd.DataFrame:
    """``acquisitions`` plus, for sessions without a T1w (lesions from a FLAIR/T2w/PDw only), the acquisition
    record of their reference image, so that their lesion volume has an acquisition group. Used to label
    group_volumes.tsv rows only; group_acquisitions.tsv stays one row per T1w."""
    from bidsapp.bids.acquisition import AcquisitionRecord
    from bidsapp.bids.collect import OTHER_MODALITIES, collect_derivatives

    entries = [e for s in (subjects or [None]) for e in collect_derivatives(output_dir, s)]
    rows = []
    for e in entries:
        if e["preproc_t1w"] is not None:
            continue
        ref = next((e["preproc"][m] for m in OTHER_MODALITIES if m in e["preproc"]), None)
        doc = e["sidecars"].get(ref) if ref is not None else None
        if not doc or not isinstance(doc.get("Acquisition"), dict):
            continue
        row = {"participant_id": f"sub-{e['subject']}", "session_id": f"ses-{e['session']}" if e["session"] else "n/a"}
        row.update(AcquisitionRecord.from_dict(doc["Acquisition"]).table_row())
        rows.append(row)
    if not rows:
        return acquisitions
    extra = pd.DataFrame(rows).rename(columns={k: v for k, v in ACQ_COLUMNS.items() if k != "group_key"})
    if not acquisitions.empty:
        known = set(zip(acquisitions["participant_id"], acquisitions["session_id"]))
        extra = extra[[k not in known for k in zip(extra["participant_id"], extra["session_id"])]]
    return pd.concat([acquisitions, extra], ignore_index=True) if len(extra) else acquisitions


def build_context(opts) -> GroupContext:
    subjects = [s.removeprefix("sub-") for s in opts.participant_label] if opts.participant_label else None
    volumes = gather_volumes(opts.output_dir, subjects)
    if volumes.empty:
        raise UserError(f"{opts.output_dir}: no participant results found (*_desc-volumes_morph.tsv); "
                        "run the participant level first")
    volumes = without_failed_sessions(volumes, gather_qc(opts.output_dir, subjects))
    if volumes.empty:
        raise UserError(f"{opts.output_dir}: every session failed quality control (see group_qc.tsv and the "
                        "participant reports); nothing to analyse at the group level")
    acquisitions = gather_acquisitions(opts.output_dir, opts.bids_dir, subjects)
    from bidsapp.bids.discovery import read_participants

    participants, warnings = read_participants(opts.bids_dir)
    for msg in warnings:
        LOG.warning("%s", msg)
    session_acq = acquisitions
    if "method" in volumes.columns and volumes["method"].astype(str).isin(M.registry(M.SESSION, LESION.key)).any():
        session_acq = _with_reference_acquisitions(acquisitions, opts.output_dir, subjects)
    if not session_acq.empty:
        one_per_session = session_acq.drop_duplicates(["participant_id", "session_id"])
        keep = ["participant_id", "session_id", "acq_group", "protocol_key", *ACQ_COLUMNS.values()]
        keep = list(dict.fromkeys(c for c in keep if c in one_per_session.columns))
        volumes = volumes.merge(one_per_session[keep], how="left", on=["participant_id", "session_id"])
    keep = [c for c in ("participant_id", "age", "sex") if c in participants.columns]
    if len(keep) > 1:
        volumes = volumes.merge(participants[keep], how="left", on="participant_id")
    return GroupContext(
        output_dir=opts.output_dir,
        work_dir=opts.work_dir / "group",
        volumes=volumes,
        acquisitions=acquisitions,
        participants=participants,
        bids_dir=opts.bids_dir,
        options=GroupOptions(labels_dir=str(opts.labels_dir) if opts.labels_dir else None,
                             target_labels_per_tissue=opts.target_labels_per_tissue, device=opts.device,
                             seed=opts.seed, nprocs=opts.nprocs),
        logger=LOG,
    )


def run_steps(ctx: GroupContext, keys=None) -> tuple[list, list[str]]:
    """Run the group-level methods ``keys`` (default: every registered default one)."""
    from bidsapp import methods
    from bidsapp.reports.harmonization import render
    from bidsapp.reports.html import Section

    sections, failures = [], []
    for key in methods.select(level=methods.GROUP) if keys is None else keys:
        method = methods.get(key)
        name = method.title
        t0 = time.time()
        LOG.info("group: %s ...", name)
        try:
            sections.extend(render(method.build(ctx)))
        except Exception as exc:  # one step's failure must not cost the rest of the report
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            LOG.error("group step %s failed: %s", name, msg, exc_info=LOG.isEnabledFor(logging.DEBUG))
            failures.append(name)
            sections.append(Section(title=name, warnings=[f"{name} could not run: {msg}"]))
        LOG.info("group: %s took %.0f s", name, time.time() - t0)
    return sections, failures


def run_group(opts) -> int:
    from bidsapp.lifecycle import WorkFolderBusy, work_lock

    try:
        with work_lock(opts.work_dir, "group"):
            return _run_group(opts)
    except WorkFolderBusy as exc:
        raise UserError(str(exc)) from None


def _run_group(opts) -> int:
    from bidsapp.bids.derivatives import atomic_write_tsv
    from bidsapp.reports.group import (
        acquisitions_section,
        lesions_section,
        qc_section,
        volumes_section,
        write_group_report,
    )

    subjects = [s.removeprefix("sub-") for s in opts.participant_label] if opts.participant_label else None
    qc = gather_qc(opts.output_dir, subjects)
    if len(qc):  # written first: it explains a group level that finds nothing usable
        atomic_write_tsv(opts.output_dir / "group_qc.tsv", qc.drop(columns=["path"]))
    ctx = build_context(opts)
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_tsv(opts.output_dir / "group_volumes.tsv", ctx.volumes)
    if not ctx.acquisitions.empty:
        atomic_write_tsv(opts.output_dir / "group_acquisitions.tsv", ctx.acquisitions)
    n_sessions = ctx.volumes[["participant_id", "session_id"]].drop_duplicates().shape[0]
    print(f"scanbridge group: {ctx.volumes['participant_id'].nunique()} participant(s), {n_sessions} session(s), "
          f"{ctx.acquisitions['acq_group'].nunique() if not ctx.acquisitions.empty else 0} acquisition group(s)",
          flush=True)
    sections = [qc_section(qc), acquisitions_section(ctx.acquisitions),
                volumes_section(ctx.volumes, ctx.acquisitions, ctx.participants, output_dir=ctx.output_dir)]
    lesions = lesions_section(ctx.volumes, ctx.acquisitions, ctx.participants, output_dir=ctx.output_dir)
    if lesions is not None:  # only with lesion results
        sections.append(lesions)
    step_sections, failures = run_steps(ctx)
    report = write_group_report(opts.output_dir, sections + step_sections)
    print(f"scanbridge group: report {report}", flush=True)
    return 1 if failures else 0
