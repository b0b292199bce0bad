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
group level needs. Names are parsed with :func:`~.derivatives.parse_entities`, the same rules
that wrote them; hidden temporary files of interrupted writes are ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from .acquisition import AcquisitionRecord
from .derivatives import MORPH_COLUMNS, SOURCE_ENTITIES, parse_entities, sidecar_path

_DATA_EXTENSIONS = (".nii.gz", ".nii", ".tsv", ".mat", ".h5", ".txt")


def collect_derivatives(output_dir: str | os.PathLike, subject: str | None = None, session: str | None = None) -> list[dict]:
    """Derivatives of one subject (``"01"`` or ``"sub-01"``) or of all, sorted by subject/session/run."""
    out = Path(output_dir)
    subject = subject[4:] if subject and subject.startswith("sub-") else subject
    session = session[4:] if session and session.startswith("ses-") else session
    groups: dict[tuple, dict] = {}
    pattern = f"sub-{subject}" if subject else "sub-*"
    for sub_dir in sorted(p for p in out.glob(pattern) if p.is_dir()):
        anat_dirs = [sub_dir / "anat"] + sorted(sub_dir.glob("ses-*/anat"))
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
    """All morph TSVs in long format: participant_id, session_id, acq, run, method, label, volume_mm3, path.

    Unreadable tables or tables without the :data:`~.derivatives.MORPH_COLUMNS` are skipped; their
    one-line reasons are in ``df.attrs["warnings"]``.
    """
    frames, warnings = [], []
    for entry in collect_derivatives(output_dir, subject):
        for path in entry["morph"].values():
            try:
                table = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)
            except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
                warnings.append(f"{path}: unreadable volumes table ({' '.join(str(exc).split())})")
                continue
            missing = [c for c in MORPH_COLUMNS if c not in table.columns]
            if missing:
                warnings.append(f"{path}: volumes table lacks column(s) {', '.join(missing)}")
                continue
            table = table[list(MORPH_COLUMNS)].copy()
            table.insert(0, "participant_id", f"sub-{entry['subject']}")
            table.insert(1, "session_id", f"ses-{entry['session']}" if entry["session"] else None)
            table.insert(2, "acq", entry["entities"].get("acq"))
            table.insert(3, "run", entry["entities"].get("run"))
            table["path"] = str(path)
            frames.append(table)
    columns = ["participant_id", "session_id", "acq", "run", *MORPH_COLUMNS, "path"]
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
