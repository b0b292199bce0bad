"""Discovery: what in a BIDS dataset scanbridge will process, what it skips and why.

Typical use (the CLI)::

    plan = discover(bids_dir, output_dir=out, work_dir=work,
                    participant_label=["01", "sub-02"], session_label=None,
                    bids_filters=load_bids_filters("filter.json"))
    print(plan.summary())
    for subject in plan.runnable_subjects:
        for session in subject.sessions:           # sessions with a usable T1w, FLAIR, T2w or PDw
            ref = session.reference                # the first T1w, else FLAIR, T2w, PDw
            record = session.acquisitions[ref]     # AcquisitionRecord (bids/acquisition.py)

Errors that stop the run raise :class:`~bidsapp.bids.errors.BIDSInputError` (one line naming
the file): nonexistent ``bids_dir``, no ``dataset_description.json``, a derivatives dataset, ``output_dir`` or
``work_dir`` inside ``bids_dir``, a participant/session label that is unknown or contains a
path separator, an unreadable or invalid filter file. Everything else is per-subject: a session
without a usable structural image, a bad image (:func:`~.validation.inspect_image`), a malformed sidecar JSON
(skipped by the index, inherited values still apply) or missing sidecar fields become entries in
``skipped`` / ``warnings`` and the others go on.

Images: T1w, T2w, FLAIR, PDw and the qMRI maps T1map, R1map, R2starmap, PDmap from ``anat/``,
selected by the default queries in :data:`DEFAULT_QUERIES` updated with the filter file (fMRIPrep
format: ``{"t1w": {"acquisition": "mprage"}, "flair": {"run": 1}}``; ``null`` means "entity
absent", ``"*"`` means "any value"; short entity keys like ``acq`` are accepted). Sidecars are
read with ``BIDSLayout.get_metadata`` (BIDS inheritance). Sites come from ``sessions.tsv`` or
``participants.tsv`` (a ``site`` column), else from InstitutionName.

Nothing here writes to ``bids_dir`` (pybids runs with an in-memory index).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bidsapp.methods import CONTRASTS

from .acquisition import QMRI_SUFFIXES, AcquisitionRecord
from .borrow import borrow_parameters
from .derivatives import LONG_NAMES
from .errors import BIDSInputError
from .validation import SKIPPED_TOP_FOLDERS, inspect_image


ANAT_SUFFIXES = {"t1w": "T1w", "t2w": "T2w", "flair": "FLAIR", "pdw": "PDw"}
QMRI_KEYS = {s.lower(): s for s in QMRI_SUFFIXES}
DEFAULT_QUERIES = {
    key: {"datatype": "anat", "suffix": suffix, "extension": [".nii", ".nii.gz"]}
    for key, suffix in {**ANAT_SUFFIXES, **QMRI_KEYS}.items()
}
"""Filter-file key -> pybids query; a filter file's entries update these."""

_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")


# ---------------------------------------------------------------------- plan dataclasses
@dataclass
class SessionPlan:
    """Usable images of one session (``session`` is None in a dataset without sessions)."""

    subject: str
    session: str | None
    t1w: list[Path] = field(default_factory=list)
    t2w: list[Path] = field(default_factory=list)
    flair: list[Path] = field(default_factory=list)
    pdw: list[Path] = field(default_factory=list)
    qmri: dict[str, list[Path]] = field(default_factory=dict)
    """Suffix (T1map, R1map, R2starmap, PDmap) -> images."""
    acquisitions: dict[Path, AcquisitionRecord] = field(default_factory=dict)
    """Every listed image -> its acquisition record."""
    entities: dict[Path, dict] = field(default_factory=dict)
    """Every listed image -> pybids entities (subject, session, acquisition, run, suffix...)."""
    site: str | None = None
    acq_time: str | None = None
    """When the session was acquired: ``acq_time`` of ``sessions.tsv``, else of ``scans.tsv`` for the
    reference image (ISO 8601 text as written there; None when neither has it)."""
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    """This session's images that failed the checks (also listed in the subject's ``skipped``)."""
    warnings: list[str] = field(default_factory=list)
    """This session's warnings (also listed in the subject's ``warnings``)."""

    @property
    def images(self) -> list[Path]:
        """All usable images of the session, T1w first."""
        out = self.t1w + self.t2w + self.flair + self.pdw
        for paths in self.qmri.values():
            out += paths
        return out

    @property
    def contrasts(self) -> list[str]:
        """The structural contrasts present, reference first (:data:`bidsapp.methods.CONTRASTS`)."""
        return [c for c in CONTRASTS if getattr(self, c.lower())]

    @property
    def reference(self) -> Path | None:
        """The image every result of the session is aligned to: the first T1w, else the first FLAIR,
        T2w or PDw (a session without a T1w gets brain extraction and the methods that need no T1w)."""
        present = self.contrasts
        return getattr(self, present[0].lower())[0] if present else None

    @property
    def runs(self) -> list[int]:
        """Run numbers of the T1w images (empty if they carry no run entity)."""
        return sorted(int(self.entities[p]["run"]) for p in self.t1w if "run" in self.entities.get(p, {}))

    @property
    def label(self) -> str:
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")


@dataclass
class SubjectPlan:
    subject: str
    sessions: list[SessionPlan] = field(default_factory=list)
    """Sessions with at least one usable T1w, FLAIR, T2w or PDw image (the ones to process)."""
    participant: dict = field(default_factory=dict)
    """This subject's participants.tsv row (``n/a`` -> None)."""
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    """(file or folder, reason naming it) for everything of this subject left out: sessions
    without a usable structural image and every image that failed the checks."""
    warnings: list[str] = field(default_factory=list)
    """Every warning about this subject's files (one line each, naming the file)."""

    @property
    def runnable(self) -> bool:
        return bool(self.sessions)


@dataclass
class DatasetPlan:
    bids_dir: Path
    subjects: list[SubjectPlan] = field(default_factory=list)
    participants: pd.DataFrame = field(default_factory=pd.DataFrame)
    warnings: list[str] = field(default_factory=list)
    """Dataset-level warnings (malformed JSON files, participants.tsv problems)."""
    filters: dict = field(default_factory=dict)

    @property
    def runnable_subjects(self) -> list[SubjectPlan]:
        return [s for s in self.subjects if s.runnable]

    @property
    def skipped_subjects(self) -> list[SubjectPlan]:
        return [s for s in self.subjects if not s.runnable]

    @property
    def has_problems(self) -> bool:
        """True if any subject, session or image was skipped (the exit code should say so)."""
        return any(s.skipped for s in self.subjects)

    def acquisition_table(self) -> pd.DataFrame:
        """One row per usable image: participant_id, session_id, path, acq_group + record fields."""
        rows = []
        for sub in self.subjects:
            for ses in sub.sessions:
                for path, rec in ses.acquisitions.items():
                    row = {
                        "participant_id": f"sub-{sub.subject}",
                        "session_id": f"ses-{ses.session}" if ses.session else None,
                        "path": str(path),
                    }
                    row.update(rec.table_row())
                    rows.append(row)
        return pd.DataFrame(rows)

    def summary(self) -> str:
        """Human-readable account of what will be processed, what is skipped and why."""
        lines = [f"{self.bids_dir}: {len(self.runnable_subjects)} of {len(self.subjects)} subject(s) to process"]
        for sub in self.runnable_subjects:
            parts = []
            for ses in sub.sessions:
                kinds = [
                    f"{name} x{len(paths)}"
                    for name, paths in (("T1w", ses.t1w), ("T2w", ses.t2w), ("FLAIR", ses.flair), ("PDw", ses.pdw))
                    if paths
                ] + [f"{k} x{len(v)}" for k, v in ses.qmri.items() if v]
                groups = sorted({ses.acquisitions[ses.reference].group_key})
                parts.append(f"{ses.session and 'ses-' + ses.session or '(no session)'}: {', '.join(kinds)} [{', '.join(groups)}]")
            lines.append(f"  sub-{sub.subject}: " + "; ".join(parts))
        for sub in self.skipped_subjects:
            lines.append(f"  sub-{sub.subject}: SKIPPED (no session with a usable T1w, FLAIR, T2w or PDw image)")
        skipped = [item for sub in self.subjects for item in sub.skipped]
        if skipped:
            lines.append(f"skipped ({len(skipped)}):")
            lines += [f"  {reason}" if str(path) in reason else f"  {path}: {reason}" for path, reason in skipped]
        warnings = self.warnings + [w for sub in self.subjects for w in sub.warnings]
        if warnings:
            lines.append(f"warnings ({len(warnings)}):")
            lines += [f"  {w}" for w in warnings]
        return "\n".join(lines)


# ---------------------------------------------------------------------- input checks
def check_paths(
    bids_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    work_dir: str | os.PathLike | None = None,
) -> Path:
    """Check bids_dir is a BIDS dataset and output/work dirs lie outside it; returns bids_dir resolved."""
    raw = Path(bids_dir)
    if not raw.exists():
        raise BIDSInputError(f"{raw}: bids_dir does not exist")
    if not raw.is_dir():
        raise BIDSInputError(f"{raw}: bids_dir is not a directory")
    root = raw.resolve()
    desc = root / "dataset_description.json"
    if not desc.is_file():
        raise BIDSInputError(f"{raw}: not a BIDS dataset (no dataset_description.json)")
    try:
        doc = json.loads(desc.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BIDSInputError(f"{desc}: invalid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise BIDSInputError(f"{desc}: must be a JSON object")
    if str(doc.get("DatasetType", "")).lower() == "derivative":
        gen = doc.get("GeneratedBy") if isinstance(doc.get("GeneratedBy"), list) else []
        by = ", ".join(str(g.get("Name")) for g in gen if isinstance(g, dict) and g.get("Name"))
        raise BIDSInputError(f"{raw}: a derivatives dataset (DatasetType \"derivative\"{', made by ' + by if by else ''}), "
                             "not raw BIDS data; give the raw dataset's folder as bids_dir")
    for name, other in (("output_dir", output_dir), ("work_dir", work_dir)):
        if other is None:
            continue
        resolved = Path(other).resolve()
        if resolved == root or root in resolved.parents:
            raise BIDSInputError(
                f"{other}: {name} is inside bids_dir {raw}; the input dataset is never written, choose a folder outside it"
            )
    return root


def normalize_labels(labels, prefix: str, what: str = "participant") -> list[str] | None:
    """``["sub-01", "02"]`` -> ``["01", "02"]``; None stays None. Rejects path separators and non-alphanumerics."""
    if labels is None:
        return None
    if isinstance(labels, str):
        labels = [labels]
    out: list[str] = []
    for raw in labels:
        text = str(raw).strip()
        if "/" in text or "\\" in text or os.sep in text:
            raise BIDSInputError(f"{what} label {text!r} contains a path separator; give the label only, e.g. 01")
        label = text[len(prefix):] if text.startswith(prefix) else text
        if not _LABEL_RE.match(label):
            raise BIDSInputError(f"{what} label {text!r} is not a valid BIDS label (letters and digits only)")
        if label not in out:
            out.append(label)
    return out


def load_bids_filters(value) -> dict:
    """Read a ``--bids-filter-file`` (path) or take a dict; returns ``{key: {entity: value}}`` validated.

    Keys are case-insensitive names of :data:`DEFAULT_QUERIES` (t1w, t2w, flair, pdw, t1map,
    r1map, r2starmap, pdmap). Raises BIDSInputError naming the file for unreadable/invalid JSON,
    unknown keys or non-object queries.
    """
    if value is None:
        return {}
    source = "bids filter"
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        source = str(path)
        if not path.is_file():
            raise BIDSInputError(f"{path}: BIDS filter file does not exist")
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BIDSInputError(f"{path}: BIDS filter file is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise BIDSInputError(f"{source}: BIDS filter must be a JSON object like {{\"t1w\": {{\"acquisition\": \"mprage\"}}}}")
    out: dict = {}
    for key, query in value.items():
        k = str(key).lower()
        if k not in DEFAULT_QUERIES:
            raise BIDSInputError(
                f"{source}: unknown filter key {key!r} (known: {', '.join(DEFAULT_QUERIES)})"
            )
        if not isinstance(query, dict):
            raise BIDSInputError(f"{source}: filter {key!r} must be an object of entity: value")
        out[k] = {LONG_NAMES.get(str(e), str(e)): v for e, v in query.items()}
    return out


def _to_pybids(value):
    from bids.layout import Query

    if value is None:
        return Query.NONE
    if value == "*":
        return Query.ANY
    if isinstance(value, list):
        return [_to_pybids(v) for v in value]
    return value


# ---------------------------------------------------------------------- layout
def malformed_json_files(bids_dir: str | os.PathLike) -> list[tuple[Path, str]]:
    """JSON files pybids would index that fail to parse: (path, one-line reason)."""
    root = Path(bids_dir)
    bad = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = [
            d for d in dirnames if not d.startswith(".") and not (rel == Path(".") and d in SKIPPED_TOP_FOLDERS)
        ]
        for name in filenames:
            if not name.endswith(".json") or name.startswith(".") or name == "dataset_description.json":
                continue
            path = Path(dirpath) / name
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                bad.append((path, " ".join(str(exc).split())))
                continue
            if not isinstance(doc, dict):
                bad.append((path, "not a JSON object"))
    return bad


def open_layout(bids_dir: str | os.PathLike, *, ignore_files=()):
    """A pybids layout of the raw dataset (validated names only, in-memory index, never writes)."""
    from bids import BIDSLayout, BIDSLayoutIndexer
    from bids.layout.validation import DEFAULT_LOCATIONS_TO_IGNORE

    root = Path(bids_dir)
    ignore = list(DEFAULT_LOCATIONS_TO_IGNORE) + [
        re.compile("^/" + re.escape(Path(p).resolve().relative_to(root.resolve()).as_posix()) + "$")
        for p in ignore_files
    ]
    # The indexer drops non-BIDS file names; dataset_description.json is checked by check_paths
    # (pybids' own check would make a missing Name fatal).
    indexer = BIDSLayoutIndexer(validate=True, ignore=ignore)
    try:
        return BIDSLayout(str(root), validate=False, indexer=indexer)
    except Exception as exc:  # pybids raises BIDSValidationError, ValueError, OSError for broken datasets
        raise BIDSInputError(f"{root}: pybids could not index the dataset ({' '.join(str(exc).split())})") from None


# ---------------------------------------------------------------------- tables
def read_participants(bids_dir: str | os.PathLike) -> tuple[pd.DataFrame, list[str]]:
    """participants.tsv as a DataFrame (``participant_id`` always ``sub-<label>``); warnings, never errors."""
    path = Path(bids_dir) / "participants.tsv"
    if not path.exists():
        return pd.DataFrame(columns=["participant_id"]), []
    table, warnings = _read_tsv(path)
    if table is None:
        return pd.DataFrame(columns=["participant_id"]), warnings
    if "participant_id" not in table.columns:
        return pd.DataFrame(columns=["participant_id"]), warnings + [f"{path}: no participant_id column; ignored"]
    table["participant_id"] = [pid if str(pid).startswith("sub-") else f"sub-{pid}" for pid in table["participant_id"]]
    dup = table["participant_id"][table["participant_id"].duplicated()].tolist()
    if dup:
        warnings.append(f"{path}: duplicate participant_id {', '.join(dup)}; the first row is used")
        table = table.drop_duplicates("participant_id")
    return table.reset_index(drop=True), warnings


def _read_tsv(path: Path) -> tuple[pd.DataFrame | None, list[str]]:
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_values=["n/a", ""])
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        return None, [f"{path}: cannot read TSV ({' '.join(str(exc).split())}); ignored"]
    table.columns = [str(c).strip() for c in table.columns]
    for col in table.columns:
        if col.endswith("_id"):
            continue
        numeric = pd.to_numeric(table[col], errors="coerce")
        if numeric.notna().sum() == table[col].notna().sum():
            table[col] = numeric
    return table, []


def _site_column(table: pd.DataFrame) -> str | None:
    for col in table.columns:
        if col.lower() == "site":
            return col
    return None


def _row_dict(table: pd.DataFrame, column: str, value: str) -> dict:
    rows = table[table[column] == value]
    if rows.empty:
        return {}
    return {k: (None if pd.isna(v) else (v.item() if hasattr(v, "item") else v)) for k, v in rows.iloc[0].items()}


# ---------------------------------------------------------------------- discovery
def discover(
    bids_dir: str | os.PathLike,
    *,
    participant_label=None,
    session_label=None,
    bids_filters=None,
    bids_filter_file: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    work_dir: str | os.PathLike | None = None,
    check_images: bool = True,
    layout=None,
) -> DatasetPlan:
    """Plan the run: see the module docstring.

    ``bids_filters`` is a dict or a filter-file path (``bids_filter_file`` is the same, by its CLI
    name). ``check_images=False`` skips reading the images (the group level, which only needs
    the acquisition records).
    """
    root = check_paths(bids_dir, output_dir, work_dir)
    if bids_filters is not None and bids_filter_file is not None:
        raise BIDSInputError(f"{bids_filter_file}: give either bids_filters or bids_filter_file, not both")
    filters = load_bids_filters(bids_filters if bids_filters is not None else bids_filter_file)
    plan = DatasetPlan(bids_dir=root, filters=filters)
    desc = json.loads((root / "dataset_description.json").read_text(encoding="utf-8"))
    missing = [k for k in ("Name", "BIDSVersion") if not desc.get(k)]
    if missing:
        plan.warnings.append(f"{root / 'dataset_description.json'}: missing required field(s) {', '.join(missing)}")

    bad_json = malformed_json_files(root)
    for path, reason in bad_json:
        plan.warnings.append(f"{path}: malformed JSON sidecar, ignored ({reason})")
    if layout is None:
        layout = open_layout(root, ignore_files=[p for p, _ in bad_json])

    plan.participants, tsv_warnings = read_participants(root)
    plan.warnings += tsv_warnings

    on_disk = sorted(p.name[4:] for p in root.glob("sub-*") if p.is_dir() and _LABEL_RE.match(p.name[4:]))
    sessions_of = _sessions_by_subject(layout)
    indexed = set(sessions_of)
    available = sorted(set(on_disk) | indexed)
    if not available:
        raise BIDSInputError(f"{root}: no subject folders (sub-<label>) found")
    wanted = normalize_labels(participant_label, "sub-", "participant")
    if wanted is not None:
        unknown = [w for w in wanted if w not in available]
        if unknown:
            raise BIDSInputError(
                f"{root}: participant label(s) {', '.join(unknown)} not found (available: {_listing(available)})"
            )
    subjects = wanted if wanted is not None else available

    wanted_sessions = normalize_labels(session_label, "ses-", "session")
    if wanted_sessions is not None:
        known = set()
        for s in subjects:
            known.update(x for x in sessions_of.get(s, ()) if x)
            known.update(p.name[4:] for p in (root / f"sub-{s}").glob("ses-*") if p.is_dir())
        unknown = [w for w in wanted_sessions if w not in known]
        if unknown:
            raise BIDSInputError(
                f"{root}: session label(s) {', '.join(unknown)} not found for the selected participants "
                f"(available: {_listing(sorted(known)) or 'none'})"
            )

    site_col = _site_column(plan.participants)
    found = _query_images(layout, [s for s in subjects if s in sessions_of], filters)
    for subject in subjects:
        plan.subjects.append(
            _plan_subject(layout, root, subject, sessions_of, found.get(subject), wanted_sessions, filters,
                          plan.participants, site_col, check_images)
        )
    borrow_parameters(plan, layout, root)
    return plan


_SUB_SES_RE = re.compile(r"(?:^|/)sub-([A-Za-z0-9]+)(?:/ses-([A-Za-z0-9]+))?/")


def _sessions_by_subject(layout) -> dict[str, list]:
    """Subject -> its session labels (``[None]`` without sessions), from the indexed files' folders.

    pybids' per-subject ``get_sessions`` reloads every entity of the dataset on each call (discovery
    grew quadratically with the number of files), and reading each file's entities costs a database
    query per file; the folder names (``sub-<label>/ses-<label>/``) say the same for nothing."""
    out: dict[str, set] = {}
    for path in layout.get(return_type="filename"):
        rel = Path(os.path.relpath(path, layout.root)).as_posix()  # not resolved: annexed files are links
        m = _SUB_SES_RE.match(rel)
        if m:
            out.setdefault(m.group(1), set()).add(m.group(2))
    return {sub: sorted(s for s in ses if s) or [None] for sub, ses in out.items()}


def _plan_subject(layout, root, subject, sessions_of, found, wanted_sessions, filters, participants, site_col,
                  check_images):
    sub_dir = root / f"sub-{subject}"
    plan = SubjectPlan(subject=subject, participant=_row_dict(participants, "participant_id", f"sub-{subject}"))
    if subject not in sessions_of:
        plan.skipped.append((sub_dir, f"{sub_dir}: no valid BIDS files"))
        return plan
    sessions_table, warnings = _read_sessions_table(sub_dir, subject)
    plan.warnings += warnings
    sessions = sessions_of[subject]
    if wanted_sessions is not None:
        sessions = [s for s in sessions if s in wanted_sessions]
        if not sessions:
            plan.skipped.append((sub_dir, f"{sub_dir}: no session {', '.join(wanted_sessions)}"))
            return plan
    site, site_source = None, None
    if site_col and plan.participant.get(site_col) is not None:
        site, site_source = str(plan.participant[site_col]), "participants.tsv"

    for session in sorted(sessions, key=_natural):
        ses_site, ses_source, acq_time = site, site_source, None
        if session and sessions_table is not None:
            row = _row_dict(sessions_table, "session_id", f"ses-{session}")
            col = _site_column(sessions_table)
            if col and row.get(col) is not None:
                ses_site, ses_source = str(row[col]), "sessions.tsv"
            acq_time = row.get("acq_time")
        ses_plan = _plan_session(layout, root, subject, session, found, ses_site, ses_source, check_images)
        ses_plan.acq_time = str(acq_time) if acq_time is not None else _scan_time(sub_dir, subject, session,
                                                                                   ses_plan.reference)
        if ses_plan.reference is not None:
            plan.sessions.append(ses_plan)
            if len(ses_plan.t1w) > 1:  # the reference is the first; sMRIPrep would average them, not done here
                ses_plan.warnings.append(
                    f"{ses_plan.label}: {len(ses_plan.t1w)} T1w images; {ses_plan.t1w[0].name} is used, "
                    f"{', '.join(p.name for p in ses_plan.t1w[1:])} left out (a --bids-filter-file picks another)")
        else:
            where = sub_dir / f"ses-{session}" if session else sub_dir
            failed = [p for p, _ in ses_plan.skipped
                      if ses_plan.entities.get(p, {}).get("suffix") in ("T1w", "FLAIR", "T2w", "PDw")]
            reason = (f"{where}: no usable T1w, FLAIR, T2w or PDw image"
                      + (f" ({len(failed)} failed the image checks)" if failed else ""))
            if any(filters.get(k) for k in ANAT_SUFFIXES):
                reason += " matching the BIDS filter"
            plan.skipped.append((where, reason))
        plan.skipped += ses_plan.skipped
        plan.warnings += ses_plan.warnings
    return plan


def _query_images(layout, subjects, filters: dict) -> dict[str, dict[str, list]]:
    """Subject -> filter key -> its BIDSFiles, in one pybids query per kind for all ``subjects``
    (unfiltered kinds share one; a query costs about as much for one subject as for all)."""
    found: dict[str, dict[str, list]] = {s: {k: [] for k in DEFAULT_QUERIES} for s in subjects}
    plain = [k for k in DEFAULT_QUERIES if k not in filters]
    by_suffix = {DEFAULT_QUERIES[k]["suffix"]: k for k in plain}
    queries = [(None, {**DEFAULT_QUERIES[plain[0]], "suffix": list(by_suffix)})] if plain else []
    queries += [(key, {**DEFAULT_QUERIES[key], **{k: _to_pybids(v) for k, v in filters[key].items()}})
                for key in filters]
    for key, query in queries if subjects else ():
        if key is None:
            files = layout.get(subject=list(subjects), **query)
        else:
            try:
                files = layout.get(subject=list(subjects), invalid_filters="error", **query)
            except (ValueError, KeyError) as exc:
                raise BIDSInputError(f"bids filter {key!r}: {' '.join(str(exc).split())}") from None
        for bf in files:
            sub = str(bf.entities.get("subject"))
            if sub in found:
                found[sub][key or by_suffix[bf.entities["suffix"]]].append(bf)
    return found


def _sidecar_problem(image: Path) -> str | None:
    """Why the image's own sidecar gave no metadata (unreadable, not JSON, empty); None without one."""
    side = image.with_name(image.name.split(".")[0] + ".json")
    if not side.is_file():
        return None
    try:
        doc = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"{side.name} is not valid JSON (ignored)"
    return f"{side.name} is empty" if not doc else None


def _plan_session(layout, root, subject, session, found, site, site_source, check_images) -> SessionPlan:
    plan = SessionPlan(subject=subject, session=session, site=site)
    for key, default in DEFAULT_QUERIES.items():
        files = [f for f in found[key] if f.entities.get("session") == session]
        for bf in sorted(files, key=lambda f: f.path):
            path = Path(bf.path)
            entities = {k: v for k, v in bf.get_entities().items() if k != "extension"}
            plan.entities[path] = entities
            if check_images:
                result = inspect_image(path)
                plan.warnings += result.warnings
                if not result.ok:
                    plan.skipped += [(path, e) for e in result.errors]
                    continue
            rel = path.relative_to(root).as_posix()
            try:
                metadata = layout.get_metadata(bf.path)
            except Exception as exc:  # a sidecar pybids cannot read: keep the image, say why
                metadata = {}
                plan.warnings.append(f"{path}: cannot read sidecar metadata ({' '.join(str(exc).split())})")
            suffix = default["suffix"]
            record = AcquisitionRecord.from_metadata(
                metadata, suffix=suffix, source=rel, site=site, site_source=site_source, name=str(path),
                sidecar_problem=None if metadata else _sidecar_problem(path),
            )
            plan.acquisitions[path] = record
            plan.warnings += record.warnings
            if key in ANAT_SUFFIXES:
                getattr(plan, key).append(path)
            else:
                plan.qmri.setdefault(suffix, []).append(path)
    for paths in (plan.t1w, plan.t2w, plan.flair, plan.pdw, *plan.qmri.values()):
        paths.sort(key=lambda p: (int(plan.entities[p].get("run", 0) or 0), str(p)))
    return plan


def _scan_time(sub_dir: Path, subject: str, session: str | None, reference: Path | None) -> str | None:
    """``acq_time`` of the reference image in the session's ``scans.tsv`` (None when absent or unreadable)."""
    if reference is None:
        return None
    folder = sub_dir / f"ses-{session}" if session else sub_dir
    path = folder / f"sub-{subject}{f'_ses-{session}' if session else ''}_scans.tsv"
    if not path.exists():
        return None
    table, _ = _read_tsv(path)
    if table is None or not {"filename", "acq_time"} <= set(table.columns):
        return None
    rel = Path(reference).relative_to(folder).as_posix() if Path(reference).is_relative_to(folder) else None
    value = _row_dict(table, "filename", rel).get("acq_time") if rel else None
    return None if value is None else str(value)


def _read_sessions_table(sub_dir: Path, subject: str):
    path = sub_dir / f"sub-{subject}_sessions.tsv"
    if not path.exists():
        return None, []
    table, warnings = _read_tsv(path)
    if table is not None and "session_id" not in table.columns:
        return None, warnings + [f"{path}: no session_id column; ignored"]
    return table, warnings


def _natural(label):
    text = label or ""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _listing(labels, limit: int = 12) -> str:
    shown = ", ".join(labels[:limit])
    return shown + (f", ... ({len(labels)} in all)" if len(labels) > limit else "")
