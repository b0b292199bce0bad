"""Find participant derivatives back: for reports and the group level, from files on disk only.

:func:`collect_derivatives` returns one dict per (subject, session) - more precisely per input
image, i.e. per distinct ``sub``/``ses``/``acq``/``ce``/``rec``/``run`` - with::

    subject, session (None without sessions), entities ({"acq": ..., "run": ...}), anat_dir,
    preproc      {"T1w": path, "FLAIR": path, ...}   *_desc-preproc_<suffix>.nii.gz (no space entity)
    preproc_t1w  path or None                         shortcut for preproc["T1w"]
    masks        {"brain": path, "lesion": path, ...} *_desc-<name>_mask.nii.gz
    brain_mask   path or None                         shortcut for masks["brain"]
    probseg      {"CSF": path, "GM": path, "WM": path}  main answer (no desc)
    dseg, dseg_tsv                                    main answer (no desc)
    variants     {"atropos": {"probseg": {...}, "dseg": path, "dseg_tsv": path}}  desc-<method>_* results
    morph        {"volumes": path}                    *_desc-<name>_morph.tsv
    xfms         [{"from": "T1w", "to": "MNI152NLin2009cAsym", "mode": "image", "path": path}]
    sidecars     {data file path: parsed JSON sidecar}
    other        [paths not listed above, e.g. space-<template> resampled images]
    report       output_dir/sub-<label>.html or None
    warnings     [unreadable sidecars]

:func:`collect_volumes` and :func:`collect_acquisitions` flatten these into the tables the
group level needs; :func:`session_files` turns them into :class:`SessionFiles`, the one view of a
session's derivatives that the reports and the group-level methods read. Names are parsed with
:func:`~.derivatives.parse_entities`, the same rules that wrote them; hidden temporary files of
interrupted writes are ignored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .acquisition import AcquisitionRecord
from .derivatives import MORPH_COLUMNS, SOURCE_ENTITIES, parse_entities, sidecar_path

_DATA_EXTENSIONS = (".nii.gz", ".nii", ".tsv", ".mat", ".h5", ".txt")
OTHER_MODALITIES = ("FLAIR", "T2w", "PDw")
"""Contrasts that are a session's reference only when it has no T1w."""


def collect_derivatives(output_dir: str | os.PathLike, subject: str | None = None, session: str | None = None) -> list[dict]:
    """Derivatives of one subject (``"01"`` or ``"sub-01"``) or of all, sorted by subject/session/run."""
    out = Path(output_dir)
    subject = subject[4:] if subject and subject.startswith("sub-") else subject
    session = session[4:] if session and session.startswith("ses-") else session
    groups: dict[tuple, dict] = {}
    pattern = f"sub-{subject}" if subject else "sub-*"
    for sub_dir in sorted(p for p in out.glob(pattern) if p.is_dir()):
        # a subject with sessions keeps its subject-level derivatives (longitudinal template, change tables)
        # in sub-<label>/anat: they are no session of their own
        anat_dirs = sorted(sub_dir.glob("ses-*/anat")) or [sub_dir / "anat"]
        for anat in anat_dirs:
            if not anat.is_dir():
                continue
            for path in sorted(anat.iterdir()):
                if path.name.startswith(".") or not path.is_file():
                    continue
                ents = parse_entities(path)
                if ents is None or ents["extension"] not in _DATA_EXTENSIONS:
                    continue
                if session is not None and ents.get("ses") != session:
                    continue
                key = tuple(ents.get(k) for k in SOURCE_ENTITIES)
                entry = groups.get(key)
                if entry is None:
                    entry = groups[key] = _new_entry(out, ents, anat)
                _file_into(entry, path, ents)
    return [groups[k] for k in sorted(groups, key=lambda k: tuple("" if v is None else _padded(v) for v in k))]


def _padded(value: str) -> str:
    return value.zfill(8) if value.isdigit() else value


def _new_entry(out: Path, ents: dict, anat: Path) -> dict:
    report = out / f"sub-{ents['sub']}.html"
    return {
        "subject": ents["sub"],
        "session": ents.get("ses"),
        "entities": {k: ents[k] for k in SOURCE_ENTITIES[2:] if k in ents},
        "anat_dir": anat,
        "preproc": {},
        "preproc_t1w": None,
        "masks": {},
        "brain_mask": None,
        "probseg": {},
        "dseg": None,
        "dseg_tsv": None,
        "variants": {},
        "morph": {},
        "xfms": [],
        "sidecars": {},
        "other": [],
        "report": report if report.is_file() else None,
        "warnings": [],
    }


def _file_into(entry: dict, path: Path, ents: dict) -> None:
    suffix, ext, desc = ents["suffix"], ents["extension"], ents.get("desc")
    own = {k for k in ents if k not in SOURCE_ENTITIES and k not in ("suffix", "extension")}
    side = sidecar_path(path)
    if side.is_file():
        try:
            entry["sidecars"][path] = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            entry["warnings"].append(f"{side}: unreadable sidecar ({' '.join(str(exc).split())})")
    image = ext in (".nii.gz", ".nii")
    if "space" in ents:
        entry["other"].append(path)
    elif suffix == "xfm":
        entry["xfms"].append({"from": ents.get("from"), "to": ents.get("to"), "mode": ents.get("mode"), "path": path})
    elif image and desc == "preproc" and own == {"desc"}:
        entry["preproc"][suffix] = path
        if suffix == "T1w":
            entry["preproc_t1w"] = path
    elif image and suffix == "mask" and own <= {"desc"}:
        name = desc or "brain"
        entry["masks"][name] = path
        if name == "brain":
            entry["brain_mask"] = path
    elif suffix in ("probseg", "dseg") and own <= {"desc", "label"}:
        target = entry if desc is None else entry["variants"].setdefault(desc, {"probseg": {}, "dseg": None, "dseg_tsv": None})
        if suffix == "probseg" and image and "label" in ents:
            target["probseg"][ents["label"]] = path
        elif suffix == "dseg" and image and "label" not in ents:
            target["dseg"] = path
        elif suffix == "dseg" and ext == ".tsv":
            target["dseg_tsv"] = path
        else:
            entry["other"].append(path)
    elif suffix == "morph" and ext == ".tsv" and own <= {"desc"}:
        entry["morph"][desc or "volumes"] = path
    else:
        entry["other"].append(path)


def collect_volumes(output_dir: str | os.PathLike, subject: str | None = None) -> pd.DataFrame:
    """Every session's ``desc-volumes_morph.tsv`` in long format: participant_id, session_id, acq, run, method,
    label, volume_mm3, count, path (subject-level tables, with other ``desc``, are not volume tables).
    ``count`` is the optional fourth column of tables with a lesion row (the number of lesions); NaN where a
    table has no such column or leaves it ``n/a``.

    Unreadable tables or tables without the :data:`~.derivatives.MORPH_COLUMNS` are skipped; their
    one-line reasons are in ``df.attrs["warnings"]``.
    """
    frames, warnings = [], []
    for entry in collect_derivatives(output_dir, subject):
        for path in [entry["morph"]["volumes"]] if "volumes" in entry["morph"] else []:
            try:
                table = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)
            except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
                warnings.append(f"{path}: unreadable volumes table ({' '.join(str(exc).split())})")
                continue
            missing = [c for c in MORPH_COLUMNS if c not in table.columns]
            if missing:
                warnings.append(f"{path}: volumes table lacks column(s) {', '.join(missing)}")
                continue
            count = pd.to_numeric(table["count"], errors="coerce") if "count" in table.columns else float("nan")
            table = table[list(MORPH_COLUMNS)].copy()
            table["count"] = count
            table.insert(0, "participant_id", f"sub-{entry['subject']}")
            table.insert(1, "session_id", f"ses-{entry['session']}" if entry["session"] else None)
            table.insert(2, "acq", entry["entities"].get("acq"))
            table.insert(3, "run", entry["entities"].get("run"))
            table["path"] = str(path)
            frames.append(table)
    columns = ["participant_id", "session_id", "acq", "run", *MORPH_COLUMNS, "count", "path"]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    df.attrs["warnings"] = warnings
    return df


def collect_acquisitions(output_dir: str | os.PathLike, subject: str | None = None) -> pd.DataFrame:
    """One row per session: the acquisition record stored in the preprocessed T1w's sidecar.

    Columns: participant_id, session_id, acq, run, acq_group, protocol_key and the
    :class:`~.acquisition.AcquisitionRecord` fields. Sessions whose sidecar has no
    ``Acquisition`` object are left out.
    """
    rows = []
    for entry in collect_derivatives(output_dir, subject):
        t1w = entry["preproc_t1w"]
        doc = entry["sidecars"].get(t1w) if t1w else None
        if not doc or not isinstance(doc.get("Acquisition"), dict):
            continue
        rec = AcquisitionRecord.from_dict(doc["Acquisition"])
        row = {
            "participant_id": f"sub-{entry['subject']}",
            "session_id": f"ses-{entry['session']}" if entry["session"] else None,
            "acq": entry["entities"].get("acq"),
            "run": entry["entities"].get("run"),
        }
        row.update(rec.table_row())
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass
class SessionFiles:
    """Derivatives of one session's reference image (its T1w, or without one its FLAIR/T2w/PDw)."""

    subject: str
    session: str | None
    prefix: str
    anat_dir: Path
    preproc: Path | None = None
    mask: Path | None = None
    dseg: Path | None = None
    dseg_alt: dict[str, Path] = field(default_factory=dict)
    """Other segmentations kept beside the main answer, by desc (e.g. ``atropos``)."""
    probseg: dict[str, Path] = field(default_factory=dict)
    morph: list[Path] = field(default_factory=list)
    xfm_to_template: dict[str, list[Path]] = field(default_factory=dict)
    """Forward transforms by template name, in the order antspyx applies them."""
    template_space: dict[str, Path] = field(default_factory=dict)
    """T1w already resampled into a template space, by template name."""
    others: dict[str, Path] = field(default_factory=dict)
    """Preprocessed FLAIR/T2w/PDw in the reference grid, by suffix."""
    on_grid: dict[str, Path] = field(default_factory=dict)
    """Preprocessed FLAIR/T2w/PDw known to lie on the reference grid, by suffix: ``space-<reference>`` images,
    and the reference itself in a session without a T1w."""
    lesion_mask: Path | None = None
    """The lesion method's binary mask (``desc-lesion_mask``), on the reference grid."""
    lesion_probseg: Path | None = None
    """The lesion probability (``label-lesion_probseg``), on the reference grid."""
    lesion_stats: Path | None = None
    """The per-lesion table (``desc-lesions_stats.tsv``)."""
    lesion_alt: dict[str, dict[str, Path]] = field(default_factory=dict)
    """Other lesion methods kept beside the main answer, by desc (e.g. ``wmh``): ``{"mask": path,
    "probseg": path, "stats": path}`` with the kinds found (``desc-wmh_mask``, ``label-lesion_desc-wmh_probseg``,
    ``desc-wmh_stats.tsv``)."""
    reference: str = "T1w"
    """Suffix of the reference image (``preproc``)."""
    acq_group: str = ""
    """The session's acquisition group, when the caller knows it (group level)."""

    @property
    def participant_id(self) -> str:
        return f"sub-{self.subject}"

    @property
    def session_id(self) -> str:
        return f"ses-{self.session}" if self.session else ""

    @property
    def t1w(self) -> Path | None:
        """The preprocessed T1w (None in a session without one)."""
        return self.preproc if self.reference == "T1w" else None

    @property
    def flair(self) -> Path | None:
        """The preprocessed FLAIR on the reference grid (the reference itself in a FLAIR-only session)."""
        return self.on_grid.get("FLAIR")

    @property
    def label(self) -> str:
        rest = self.prefix[len(f"sub-{self.subject}"):].lstrip("_")
        return rest or "(no session)"


def session_files(output_dir, subject: str | None = None, session: str | None = None, *,
                  problems: list[str] | None = None) -> list[SessionFiles]:
    """Derivatives of one subject (or all), one entry per preprocessed reference image, as the reports and
    the group level read them. A co-registered image whose own entities (acq, run) differ from its
    reference's is attached to the session's entry. Unreadable sidecars go to ``problems``."""
    from ..labels import LESION
    from ..methods import SESSION, registry

    lesion_descs = [m.desc for m in registry(SESSION, LESION.key).values()]
    entries = collect_derivatives(output_dir, subject, session)
    out: list[SessionFiles] = []
    orphans = []
    for e in entries:
        ents = e["entities"]
        prefix = "_".join([f"sub-{e['subject']}"] + ([f"ses-{e['session']}"] if e["session"] else [])
                          + [f"{k}-{v}" for k, v in ents.items()])
        f = SessionFiles(subject=e["subject"], session=e["session"], prefix=prefix, anat_dir=Path(e["anat_dir"]))
        f.preproc = e["preproc_t1w"]
        if f.preproc is None:  # a session without a T1w: its reference is the first FLAIR, T2w or PDw
            ref = next((m for m in OTHER_MODALITIES if m in e["preproc"]), None)
            if ref is not None:
                f.reference, f.preproc = ref, e["preproc"][ref]
        f.mask = e["brain_mask"]
        f.dseg = e["dseg"]
        f.probseg = {k: v for k, v in e["probseg"].items() if k not in LESION.names}  # the tissue classes
        f.lesion_probseg = next((e["probseg"][k] for k in LESION.names if k in e["probseg"]), None)
        f.lesion_mask = e["masks"].get(LESION.main_desc)
        stats = {}
        for path in e["other"]:
            pe = parse_entities(path) or {}
            if pe.get("suffix") == "stats" and pe.get("extension") == ".tsv" and "space" not in pe and pe.get("desc"):
                stats.setdefault(pe["desc"], path)
        lesion_probseg = {d: next((v["probseg"][k] for k in LESION.names if k in v["probseg"]), None)
                          for d, v in e["variants"].items()}
        for desc in dict.fromkeys([*lesion_descs, *(d for d, p in lesion_probseg.items() if p is not None)]):
            alt = {"mask": e["masks"].get(desc), "probseg": lesion_probseg.get(desc), "stats": stats.get(desc)}
            if alt["mask"] is not None or alt["probseg"] is not None:  # the baselines: other lesion methods
                f.lesion_alt[desc] = {k: v for k, v in alt.items() if v is not None}
        if f.preproc is not None and f.reference in OTHER_MODALITIES:
            f.on_grid[f.reference] = f.preproc
        f.dseg_alt = {desc: v["dseg"] for desc, v in e["variants"].items() if v.get("dseg")}
        f.morph = [Path(p) for p in e["morph"].values()]
        for x in e["xfms"]:
            if x.get("from") == "T1w" and x.get("to") and x.get("mode") in (None, "image"):
                f.xfm_to_template.setdefault(x["to"], []).append(Path(x["path"]))
        for paths in f.xfm_to_template.values():
            paths.sort(key=lambda q: q.name.endswith(".mat"))  # antspyx order: warp fields, then the affine
        f.others = {m: p for m, p in e["preproc"].items() if m in OTHER_MODALITIES and m != f.reference}
        for path in e["other"]:
            pe = parse_entities(path) or {}
            if (pe.get("suffix") == "stats" and pe.get("desc") == LESION.stats_desc and "space" not in pe
                    and pe.get("extension") == ".tsv"):
                f.lesion_stats = path
                continue
            if pe.get("desc") != "preproc" or pe.get("extension") not in (".nii.gz", ".nii"):
                continue
            if pe.get("suffix") == "T1w" and pe.get("space") not in (None, "T1w"):
                f.template_space[pe["space"]] = path
            elif pe.get("suffix") in OTHER_MODALITIES and pe.get("space") in ("T1w", *OTHER_MODALITIES):
                f.others.setdefault(pe["suffix"], path)
                if pe.get("space") == f.reference:
                    f.on_grid.setdefault(pe["suffix"], path)
        if problems is not None:
            problems.extend(e.get("warnings") or [])
        if f.preproc is None and not (f.mask or f.dseg or f.morph) and f.others:
            orphans.append(f)  # e.g. a FLAIR whose own acq/run entities differ from the T1w's
        else:
            out.append(f)
    for o in orphans:
        host = next((f for f in out if f.session == o.session and f.preproc is not None), None)
        if host is not None:
            for mod, path in o.others.items():
                host.others.setdefault(mod, path)
            if host.reference == o.reference:  # an orphan's images are on the grid its space entity names
                for mod, path in o.on_grid.items():
                    host.on_grid.setdefault(mod, path)
        else:
            out.append(o)
    return out
