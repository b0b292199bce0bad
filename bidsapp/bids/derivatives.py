"""BIDS-Derivatives naming and writing: the one home of scanbridge's output naming rules.

Naming (entities use their short BIDS keys: ``sub``, ``ses``, ``acq``, ``ce``, ``rec``, ``run``,
``from``, ``to``, ``mode``, ``space``, ``res``, ``label``, ``desc``)::

    derivative_path(out, "/bids/sub-01/ses-1/anat/sub-01_ses-1_acq-mprage_run-2_T1w.nii.gz",
                    suffix="T1w", extension=".nii.gz", desc="preproc")
    -> out/sub-01/ses-1/anat/sub-01_ses-1_acq-mprage_run-2_desc-preproc_T1w.nii.gz

The source's ``sub``, ``ses``, ``acq``, ``ce``, ``rec`` and ``run`` are kept; the derivative's own
entities follow in the order of :data:`ENTITY_ORDER` (pybids' derivatives patterns and fMRIPrep):
``..._run-2_from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm.mat``,
``..._space-MNI152NLin2009cAsym_label-GM_probseg.nii.gz``, ``..._desc-brain_mask.nii.gz``.
:func:`parse_entities` reads any such name back.

Provenance: :func:`bids_uri` turns an input path into ``bids:raw:sub-01/ses-1/anat/...`` (the
``raw`` dataset is declared in ``DatasetLinks`` by :func:`write_dataset_description`);
``bids_uri(path, output_dir, dataset="")`` gives ``bids::sub-01/...`` for files of this dataset.

Writing: everything goes through :func:`atomic_output` (temporary file in the destination
folder, fsync, ``os.replace``), so a killed run never leaves a half-written file under a final
name; only hidden ``.<name>.tmp-*`` leftovers, which pybids and the collectors ignore.
:func:`save_derivative` names, writes and describes a derivative in one call. Helpers:
:func:`atomic_write_bytes`, :func:`atomic_write_text`, :func:`atomic_copy`,
:func:`atomic_write_json`, :func:`atomic_write_tsv`, :func:`atomic_save_nifti`,
:func:`write_sidecar` (JSON next to a data file, with ``Sources`` and the acquisition record),
:func:`write_dataset_description`, :func:`write_dseg_tsv` (tissue look-up table) and
:func:`write_volumes_tsv` (the long-format ``desc-volumes_morph.tsv``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Mapping

BIDS_VERSION = "1.10.0"

ENTITY_ORDER = (
    "sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "echo", "part",
    "from", "to", "mode", "space", "cohort", "res", "den", "label", "desc",
)
"""Order of entities in every derivative file name."""

SOURCE_ENTITIES = ("sub", "ses", "acq", "ce", "rec", "run")
"""Entities of the input image that a derivative keeps."""

LONG_NAMES = {
    "sub": "subject", "ses": "session", "acq": "acquisition", "ce": "ceagent",
    "rec": "reconstruction", "run": "run", "task": "task", "dir": "direction", "echo": "echo",
    "part": "part", "space": "space", "res": "res", "den": "den", "label": "label", "desc": "desc",
    "from": "from", "to": "to", "mode": "mode", "cohort": "cohort",
}
"""Short BIDS key -> pybids entity name."""

MORPH_COLUMNS = ("method", "label", "volume_mm3")
"""Columns of ``*_desc-volumes_morph.tsv`` (long format, one row per method and label)."""

_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")


# ---------------------------------------------------------------------- names
def split_extension(path: str | os.PathLike) -> tuple[str, str]:
    """``sub-01_T1w.nii.gz`` -> (``sub-01_T1w``, ``.nii.gz``); BIDS names carry no other dots."""
    name = Path(path).name
    if "." not in name:
        return name, ""
    stem, ext = name.split(".", 1)
    return stem, "." + ext


def parse_entities(path: str | os.PathLike) -> dict | None:
    """Entities of a BIDS file name as short keys plus ``suffix`` and ``extension``; None if not BIDS-like."""
    stem, ext = split_extension(path)
    parts = stem.split("_")
    if len(parts) < 2 or not parts[0].startswith("sub-"):
        return None
    out: dict = {}
    for part in parts[:-1]:
        key, sep, value = part.partition("-")
        if not sep or not key or not value or key in out:
            return None
        out[key] = value
    out["suffix"] = parts[-1]
    out["extension"] = ext
    return out


def _check_label(key: str, value) -> str:
    text = str(value)
    if not _LABEL_RE.match(text):
        raise ValueError(f"invalid BIDS {key} label {text!r}: use letters and digits only")
    return text


def derivative_path(
    output_dir: str | os.PathLike,
    source_file: str | os.PathLike,
    *,
    suffix: str,
    extension: str,
    desc: str | None = None,
    label: str | None = None,
    space: str | None = None,
    from_: str | None = None,
    to: str | None = None,
    mode: str | None = None,
    res: str | None = None,
    datatype: str = "anat",
    keep: tuple[str, ...] = SOURCE_ENTITIES,
) -> Path:
    """Where the derivative of ``source_file`` lives: ``output_dir/sub-X/[ses-Y/]<datatype>/<name>``.

    ``source_file`` is an input image (or an earlier derivative) with a BIDS name; its
    sub/ses/acq/ce/rec/run entities are kept (``keep=("sub",)`` for a subject-level result). Raises
    ValueError for a source without ``sub-`` or
    a non-alphanumeric entity value (an underscore or dash would corrupt the name).
    """
    src = parse_entities(source_file)
    if src is None or "sub" not in src:
        raise ValueError(f"{source_file}: not a BIDS file name (no sub-<label> entity)")
    entities = {k: src[k] for k in SOURCE_ENTITIES if k in src and (k == "sub" or k in keep)}
    own = {"from": from_, "to": to, "mode": mode, "space": space, "res": res, "label": label, "desc": desc}
    entities.update({k: v for k, v in own.items() if v is not None})
    for key, value in entities.items():
        _check_label(key, value)
    _check_label("suffix", suffix)
    ext = extension if extension.startswith(".") else "." + extension
    name = "_".join(f"{k}-{entities[k]}" for k in ENTITY_ORDER if k in entities) + f"_{suffix}{ext}"
    folder = Path(output_dir) / f"sub-{entities['sub']}"
    if "ses" in entities:
        folder = folder / f"ses-{entities['ses']}"
    return folder / datatype / name


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON sidecar of a data file: same name, extension replaced by ``.json``."""
    p = Path(path)
    stem, _ = split_extension(p)
    return p.with_name(stem + ".json")


def bids_uri(source_file: str | os.PathLike, bids_dir: str | os.PathLike, dataset: str = "raw") -> str:
    """``bids:<dataset>:<path relative to the dataset root>`` (BIDS URI); ValueError if outside it."""
    root = Path(bids_dir).resolve()
    path = Path(source_file)
    path = path.resolve() if path.is_absolute() else (root / path).resolve()
    try:
        rel = path.relative_to(root)
    except ValueError:
        raise ValueError(f"{source_file}: not inside dataset {bids_dir}") from None
    return f"bids:{dataset}:{rel.as_posix()}"


# ---------------------------------------------------------------------- atomic writing
@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync and ``os.replace`` it into place.

    The temporary name keeps the extension (``.<stem>.tmp-<hex>.nii.gz``) so writers that pick the
    format from it (nibabel, ANTs) work. On an exception the temporary file is removed and nothing
    appears under ``path``.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    stem, ext = split_extension(dest)
    tmp = dest.with_name(f".{stem}.tmp-{secrets.token_hex(4)}{ext}")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(errno.ENOENT, "atomic write produced no file", str(tmp))
        _fsync(tmp)
        os.replace(tmp, dest)
        _fsync(dest.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (permissions follow the umask)."""
    with atomic_output(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a file's bytes atomically (no metadata: outputs get fresh timestamps and the umask)."""
    with atomic_output(dst) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
    return Path(dst)


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    """Pretty JSON (numpy numbers, Paths and records with ``to_dict`` are converted; NaN -> null)."""
    text = json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


INCOMPLETE = "ProcessingIncomplete"
"""Sidecar field set on every output of a subject whose last run failed (:func:`mark_incomplete`)."""


def mark_incomplete(output_dir: str | os.PathLike, subject: str, error: str | None) -> int:
    """Set (``error`` given) or clear (None) :data:`INCOMPLETE` in every sidecar under ``sub-<subject>``.

    A failed run keeps what its finished steps wrote (a rerun resumes from them), but none of it may
    look like a complete result. Returns the number of sidecars changed.
    """
    root = Path(output_dir) / f"sub-{subject}"
    changed = 0
    for side in sorted(root.rglob("*.json")) if root.is_dir() else ():
        try:
            doc = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict) or doc.get(INCOMPLETE) == error:
            continue
        if error is None:
            doc.pop(INCOMPLETE)
        else:
            doc[INCOMPLETE] = error
        atomic_write_json(side, doc)
        changed += 1
    return changed


def atomic_write_tsv(path: str | os.PathLike, table, columns: Iterable[str] | None = None) -> Path:
    """Write a DataFrame or a list of dicts as TSV; missing values are ``n/a`` as BIDS wants."""
    rows, cols = _rows_and_columns(table, columns)
    lines = ["\t".join(cols)]
    for row in rows:
        lines.append("\t".join(_tsv_cell(row.get(c)) for c in cols))
    return atomic_write_text(path, "\n".join(lines) + "\n")


def atomic_save_nifti(img, path: str | os.PathLike) -> Path:
    """``nibabel.save`` through :func:`atomic_output`."""
    import nibabel as nib

    with atomic_output(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


# ---------------------------------------------------------------------- sidecars and dataset files
def write_sidecar(
    path: str | os.PathLike,
    *,
    Sources: Iterable[str] | None = None,
    acquisition=None,
    **fields,
) -> Path:
    """Write the JSON sidecar of data file ``path`` (or to ``path`` itself if it ends in .json).

    ``Sources`` are BIDS URIs (see :func:`bids_uri`). ``acquisition`` (an AcquisitionRecord or its
    dict) adds the acquisition parameters used under their BIDS names and the full record under
    ``"Acquisition"``. Other keyword fields are written as given (e.g. ``Method``, ``Model``).
    """
    target = Path(path)
    if not target.name.endswith(".json"):
        target = sidecar_path(target)
    doc: dict = {}
    if Sources is not None:
        if isinstance(Sources, (str, os.PathLike)):
            Sources = [Sources]
        doc["Sources"] = [str(s) for s in Sources]
    if acquisition is not None:
        from .acquisition import AcquisitionRecord

        rec = acquisition if isinstance(acquisition, AcquisitionRecord) else AcquisitionRecord.from_dict(acquisition)
        for key, value in rec.to_bids_fields().items():
            doc.setdefault(key, value)
        doc["Acquisition"] = rec.to_dict()
    doc.update(fields)
    return atomic_write_json(target, doc)


def save_derivative(
    data,
    output_dir: str | os.PathLike,
    source_file: str | os.PathLike,
    *,
    bids_dir: str | os.PathLike,
    suffix: str,
    extension: str = ".nii.gz",
    sources: Iterable[str | os.PathLike] | None = None,
    acquisition=None,
    sidecar: Mapping | None = None,
    **entities,
) -> Path:
    """Name, write and describe one derivative in a single call; returns its path.

    ``data`` is a nibabel image, ``bytes``, or the path of a finished file to copy (e.g. a Nipype
    node's output). ``entities`` are those of :func:`derivative_path` (``desc``, ``label``,
    ``space``, ``from_``, ``to``, ``mode``, ``res``, ``datatype``). ``Sources`` are the BIDS URIs of
    ``sources`` (default: ``source_file``); inputs inside ``bids_dir`` become ``bids:raw:...``,
    files inside ``output_dir`` ``bids::...``. ``sidecar`` adds fields (method, model, ...).
    """
    path = derivative_path(output_dir, source_file, suffix=suffix, extension=extension, **entities)
    if isinstance(data, (bytes, bytearray)):
        atomic_write_bytes(path, bytes(data))
    elif isinstance(data, (str, os.PathLike)):
        atomic_copy(data, path)
    else:
        atomic_save_nifti(data, path)
    uris = []
    for src in (sources if sources is not None else [source_file]):
        try:
            uris.append(bids_uri(src, bids_dir))
        except ValueError:
            uris.append(bids_uri(src, output_dir, dataset=""))
    if path.name.endswith(".json"):
        return path
    write_sidecar(path, Sources=uris, acquisition=acquisition, **dict(sidecar or {}))
    return path


def container_info(env: Mapping[str, str] | None = None) -> dict | None:
    """The ``GeneratedBy.Container`` object from the environment, or None outside a container.

    Images set ``SCANBRIDGE_CONTAINER_TYPE`` (docker/singularity/apptainer),
    ``SCANBRIDGE_CONTAINER_IMAGE`` (the tag) and optionally ``SCANBRIDGE_CONTAINER_URI``;
    Singularity/Apptainer runs are also recognised from their own variables.
    """
    env = os.environ if env is None else env
    ctype = env.get("SCANBRIDGE_CONTAINER_TYPE")
    if not ctype:
        if env.get("APPTAINER_CONTAINER") or env.get("APPTAINER_NAME"):
            ctype = "apptainer"
        elif env.get("SINGULARITY_CONTAINER") or env.get("SINGULARITY_NAME"):
            ctype = "singularity"
    if not ctype:
        return None
    info = {"Type": ctype}
    tag = env.get("SCANBRIDGE_CONTAINER_IMAGE") or env.get("APPTAINER_NAME") or env.get("SINGULARITY_NAME")
    if tag:
        info["Tag"] = tag
    if env.get("SCANBRIDGE_CONTAINER_URI"):
        info["URI"] = env["SCANBRIDGE_CONTAINER_URI"]
    return info


def write_dataset_description(
    output_dir: str | os.PathLike,
    version: str | None = None,
    *,
    bids_dir: str | os.PathLike | None = None,
    container: dict | None = None,
    source_datasets: list[dict] | None = None,
    name: str = "scanbridge",
) -> Path:
    """Write ``output_dir/dataset_description.json`` for a derivative dataset.

    ``version`` defaults to scanbridge's own; ``container`` defaults to :func:`container_info`. With ``bids_dir``, ``DatasetLinks.raw``
    points at it (file URI) so ``bids:raw:`` Sources resolve, and ``SourceDatasets`` records it
    (with its DOI and version when its own description has them).
    """
    if version is None:
        from bidsapp import __version__ as version
    generated = {"Name": name, "Version": str(version)}
    container = container if container is not None else container_info()
    if container:
        generated["Container"] = container
    doc = {
        "Name": f"{name} derivatives",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
    }
    if bids_dir is not None:
        raw = Path(bids_dir).resolve()
        doc["DatasetLinks"] = {"raw": raw.as_uri()}
        if source_datasets is None:
            entry = {"URL": raw.as_uri()}
            with contextlib.suppress(OSError, ValueError, AttributeError):
                raw_desc = json.loads((raw / "dataset_description.json").read_text())
                if raw_desc.get("DatasetDOI"):
                    entry["DOI"] = raw_desc["DatasetDOI"]
                if raw_desc.get("DatasetVersion"):
                    entry["Version"] = raw_desc["DatasetVersion"]
            source_datasets = [entry]
    if source_datasets:
        doc["SourceDatasets"] = source_datasets
    return atomic_write_json(Path(output_dir) / "dataset_description.json", doc)


def dseg_tsv_path(dseg_file: str | os.PathLike) -> Path:
    """The look-up table next to a dseg image: same name with ``.tsv``."""
    p = Path(dseg_file)
    return p.with_name(split_extension(p)[0] + ".tsv")


def write_dseg_tsv(dseg_file: str | os.PathLike, labels: Mapping[int, str] | None = None) -> Path:
    """Write the ``index name`` look-up table for ``dseg_file``: 0 background, then ``labels``
    (``{value: name}``; default the tissue classes of :data:`bidsapp.labels.TISSUE`)."""
    from bidsapp.labels import TISSUE

    labels = dict(TISSUE.by_value() if labels is None else labels)
    rows = [{"index": 0, "name": "background"}] + [{"index": int(k), "name": v} for k, v in sorted(labels.items())]
    return atomic_write_tsv(dseg_tsv_path(dseg_file), rows, columns=("index", "name"))


def write_volumes_tsv(path: str | os.PathLike, rows) -> Path:
    """Write a volumes table with exactly :data:`MORPH_COLUMNS`; ValueError if a column is missing."""
    rows, cols = _rows_and_columns(rows, None)
    missing = [c for c in MORPH_COLUMNS if c not in cols]
    if missing:
        raise ValueError(f"{path}: volumes table lacks column(s) {', '.join(missing)}")
    return atomic_write_tsv(path, rows, columns=MORPH_COLUMNS)


# ---------------------------------------------------------------------- internals
def _rows_and_columns(table, columns) -> tuple[list[dict], list[str]]:
    if hasattr(table, "to_dict") and hasattr(table, "columns"):
        rows = table.to_dict(orient="records")
        cols = [str(c) for c in table.columns]
    else:
        rows = [dict(r) for r in table]
        cols = []
        for r in rows:
            cols.extend(k for k in r if k not in cols)
    if columns is not None:
        cols = list(columns)
    return rows, cols


def _tsv_cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a"
    try:
        import pandas as pd

        if pd.isna(value) is True:
            return "n/a"
    except (TypeError, ValueError, ImportError):
        pass
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    text = str(value)
    return text.replace("\t", " ").replace("\n", " ")


def _jsonable(obj):
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return str(obj)
    if hasattr(obj, "to_dict") and not isinstance(obj, type) and not hasattr(obj, "columns"):
        return _jsonable(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return _jsonable(obj.tolist())
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk; best effort."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
