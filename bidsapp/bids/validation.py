"""Checks before processing: is each image usable, and is the dataset valid BIDS?

Image checks (:func:`inspect_image`, or :func:`check_image` for just the first error) read the
header and, unless ``check_values=False``, the data once; each problem is a one-line message that
starts with the file path:

* errors (the image cannot be processed): missing/broken link, 0-byte file, a ``.nii.gz`` that
  is not gzip data, not a NIfTI image, truncated data, 2D, 4D with several volumes where 3D is
  expected, invalid/absurd voxel sizes (<= 0, < 0.05 mm, > 20 mm) or orientation matrix, all
  values NaN/inf, all zeros, or constant;
* warnings (processing goes on): a 4D image with one volume (used as 3D), some NaN/inf voxels
  (set to 0), thick voxels (> 6 mm).

:func:`load_3d` is the matching loader for processing nodes: it applies the same checks, raises
:class:`ImageError` on errors, squeezes a single-volume 4D image and zeroes non-finite voxels.

Dataset validation (:func:`validate_dataset`): the official validator (``bids-validator``, node
or deno build) when it is on PATH, else the Python ``bids_validator`` package's file-name rules
(:func:`invalid_file_names`), honouring ``.bidsignore``. The CLI skips it with
``--skip-bids-validation``.
"""

from __future__ import annotations

import fnmatch
import gzip
import json
import os
import shutil
import subprocess
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BIDSInputError

MIN_VOXEL_MM = 0.05
MAX_VOXEL_MM = 20.0
THICK_VOXEL_MM = 6.0
MIN_FOV_MM = 60.0
"""Smallest field of view, along every axis, that can hold a brain (an adult brain is about 140 x 170 x
120 mm; a thick-slice clinical stack covers 100 mm or more): anything smaller is refused at discovery
rather than crashing brain extraction."""
MIN_VOXELS = 8
"""Fewest voxels along every axis: fewer is a slab or a localiser, not an image of a head."""
SKIPPED_TOP_FOLDERS = ("derivatives", "sourcedata", "code", "stimuli", "models")
"""Top-level folders the BIDS validator does not check (and discovery never reads)."""


class ImageError(BIDSInputError):
    """An image that cannot be processed; the message names the file."""


@dataclass
class ImageCheck:
    path: Path
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    shape: tuple | None = None
    zooms: tuple | None = None

    @property
    def ok(self) -> bool:
        return not self.errors


NEGATIVE_SHARE = 0.01
"""More than this share of an image's voxels below zero means a negative background or offset (an
MP2RAGE UNI image stored from -0.5 to 0.5, a scaled integer image with an offset), not ringing."""


def negative_offset(values: np.ndarray) -> float:
    """How much to add to an image whose background lies below zero so that its darkest voxels are 0:
    minus its 0.1th percentile when more than :data:`NEGATIVE_SHARE` of the (finite) ``values`` are
    negative, else 0. Why: every step after it takes intensities as magnitudes (N4 clips what is below
    zero, the brain mask reads zero as nothing), so a head with an offset of -100 lost its dark tissue
    and failed quality control as "no head found"; the few negative voxels of interpolation ringing
    are left to those clips."""
    v = np.asarray(values).ravel()
    if v.size > 2_000_000:  # a sample, taken before any copy: this runs on every image
        v = v[:: v.size // 2_000_000]
    if np.count_nonzero(v < 0) <= NEGATIVE_SHARE * v.size:
        return 0.0
    return float(-np.percentile(v, 0.1))


def inspect_image(path: str | os.PathLike, *, expect_3d: bool = True, check_values: bool = True) -> ImageCheck:
    """Check one NIfTI image; never raises for a bad file (problems go to ``errors``/``warnings``)."""
    check = ImageCheck(Path(path))
    _inspect(check, expect_3d=expect_3d, check_values=check_values)
    return check


def check_image(path: str | os.PathLike, *, expect_3d: bool = True, check_values: bool = True) -> str | None:
    """The first error of :func:`inspect_image` (one line naming the file), or None if the image is usable."""
    check = inspect_image(path, expect_3d=expect_3d, check_values=check_values)
    return check.errors[0] if check.errors else None


def load_3d(path: str | os.PathLike):
    """Load an image for processing as a 3D float32 ``Nifti1Image``; returns ``(img, warnings)``.

    Raises :class:`ImageError` (first error message) if the image is unusable.
    """
    import nibabel as nib

    check = ImageCheck(Path(path))
    data = _inspect(check, expect_3d=True, check_values=True, keep_data=True)
    if check.errors:
        raise ImageError(check.errors[0])
    img = nib.load(str(path))
    data = np.asarray(data, dtype=np.float32)
    if data.ndim > 3:
        data = data.reshape(data.shape[:3])
    data = np.where(np.isfinite(data), data, np.float32(0))
    header = img.header.copy()
    header.set_data_dtype(np.float32)
    out = nib.Nifti1Image(data, img.affine, header)
    out.header.set_xyzt_units(*img.header.get_xyzt_units())
    return out, check.warnings


def _inspect(check: ImageCheck, *, expect_3d: bool, check_values: bool, keep_data: bool = False):
    import nibabel as nib

    p = check.path
    name = str(p)
    err = check.errors.append
    warn = check.warnings.append
    if p.is_symlink() and not p.exists():
        err(f"{name}: broken link (data not fetched, e.g. git-annex/datalad content missing)")
        return None
    if not p.exists():
        err(f"{name}: file does not exist")
        return None
    if not p.is_file():
        err(f"{name}: not a regular file")
        return None
    size = p.stat().st_size
    if size == 0:
        err(f"{name}: empty file (0 bytes)")
        return None
    if name.endswith(".gz"):
        with open(p, "rb") as fh:
            magic = fh.read(2)
        if magic != b"\x1f\x8b":
            err(f"{name}: not gzip data although named .gz (corrupt or wrongly named file)")
            return None
    try:
        img = nib.load(name)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        err(f"{name}: truncated or corrupt compressed file ({_short(exc)})")
        return None
    except Exception as exc:  # nibabel raises ImageFileError, ValueError, OSError...
        err(f"{name}: not a NIfTI image, or its header is truncated ({_short(exc)})")
        return None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        err(f"{name}: not a NIfTI image (read as {type(img).__name__})")
        return None

    shape = tuple(int(s) for s in img.shape)
    check.shape = shape
    zooms = _raw_zooms(img, name)
    check.zooms = zooms
    if len(shape) < 3 or any(s < 2 for s in shape[:3]):
        err(f"{name}: not a 3D volume (shape {shape})")
        return None
    extra = shape[3:]
    if extra and expect_3d:
        volumes = int(np.prod(extra))
        if volumes > 1:
            err(f"{name}: 4D image with {volumes} volumes (shape {shape}); a 3D image is expected")
            return None
        warn(f"{name}: 4D image with a single volume (shape {shape}); it is used as 3D")
    if not all(np.isfinite(zooms)) or min(zooms) <= 0:
        err(f"{name}: invalid voxel size {zooms}")
        return None
    if min(zooms) < MIN_VOXEL_MM or max(zooms) > MAX_VOXEL_MM:
        err(f"{name}: absurd voxel size {_mm(zooms)} mm (expected {MIN_VOXEL_MM}-{MAX_VOXEL_MM} mm)")
        return None
    fov = tuple(round(s * z, 1) for s, z in zip(shape[:3], zooms[:3]))
    if min(fov) < MIN_FOV_MM or min(shape[:3]) < MIN_VOXELS:
        err(f"{name}: field of view {_mm(fov)} mm ({'x'.join(map(str, shape[:3]))} voxels) cannot hold a head "
            f"(at least {MIN_FOV_MM:g} mm and {MIN_VOXELS} voxels along every axis)")
        return None
    if max(zooms) > THICK_VOXEL_MM:
        warn(f"{name}: thick voxels {_mm(zooms)} mm; results will be coarse")
    affine = img.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        err(f"{name}: invalid orientation matrix (affine is singular or not finite)")
        return None

    if name.endswith(".nii"):
        needed = int(img.header.get("vox_offset", 352)) + int(np.prod(shape)) * img.get_data_dtype().itemsize
        if size < needed:
            err(f"{name}: truncated file ({size} bytes, header needs {needed})")
            return None
    if not (check_values or keep_data):
        return None
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # truncated gzip streams surface here as EOFError/OSError/ValueError
        err(f"{name}: truncated or corrupt image data ({_short(exc)})")
        return None
    if np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.complexfloating):
        finite = np.isfinite(data)
        n_bad = int(finite.size - np.count_nonzero(finite))
        if n_bad == finite.size:
            err(f"{name}: no finite values (all NaN/inf)")
            return None
        if n_bad:
            warn(f"{name}: {n_bad} voxels are NaN/inf; they are set to 0")
            values = data[finite]
        else:
            values = data
    else:
        values = data
    vmin, vmax = values.min(), values.max()
    if vmin == 0 and vmax == 0:
        err(f"{name}: all voxels are zero")
        return None
    if vmin == vmax:
        err(f"{name}: constant image (every voxel is {vmin})")
        return None
    if vmin < 0 and (shift := negative_offset(values)) > 0:
        warn(f"{name}: {np.count_nonzero(values < 0) / values.size:.0%} of voxels are negative (minimum {vmin:g}); "
             f"intensities are shifted by {shift:g} so that the darkest are 0")
    return data if keep_data else None


def _raw_zooms(img, name: str) -> tuple:
    """Voxel sizes as stored: nibabel silently turns a zero pixdim into 1 when it loads a header."""
    from nibabel.openers import Opener

    try:
        with Opener(name) as fh:
            header = type(img.header).from_fileobj(fh, check=False)
        return tuple(abs(float(z)) for z in header["pixdim"][1:4])
    except Exception:  # fall back to what nibabel made of it
        return tuple(float(z) for z in img.header.get_zooms()[:3])


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _mm(zooms) -> str:
    return "x".join(f"{z:g}" for z in zooms)


# ---------------------------------------------------------------------- dataset validation
@dataclass
class ValidationReport:
    tool: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def __iter__(self):
        """All messages, errors first (each one line naming the file)."""
        return iter(self.errors + self.warnings)


def validate_dataset(bids_dir: str | os.PathLike, *, use_node: bool | None = None, timeout: float = 900) -> ValidationReport:
    """Validate ``bids_dir``; non-BIDS file names are errors (one line each, naming the file).

    ``use_node=None`` uses the official ``bids-validator`` if it is on PATH; a failure to run it
    falls back to the Python file-name rules with a warning.
    """
    root = Path(bids_dir)
    exe = shutil.which("bids-validator") if use_node is not False else None
    if exe:
        try:
            return _run_official(exe, root, timeout)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            report = _python_report(root)
            report.warnings.insert(0, f"{exe}: could not run the BIDS validator ({_short(exc)}); checked file names only")
            return report
    return _python_report(root)


def _python_report(root: Path) -> ValidationReport:
    report = ValidationReport("bids_validator (Python, file names)")
    for rel in invalid_file_names(root):
        report.errors.append(f"{root / rel}: file name is not valid BIDS")
    return report


def invalid_file_names(bids_dir: str | os.PathLike) -> list[str]:
    """Relative paths of files whose names the BIDS rules reject (skips derivatives/, code/, ..., .bidsignore)."""
    from bids_validator import BIDSValidator

    root = Path(bids_dir)
    ignore = _bidsignore(root)
    validator = BIDSValidator()
    bad = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(
            d for d in dirnames
            if not d.startswith(".")
            and not (rel_dir == Path(".") and d in SKIPPED_TOP_FOLDERS)
            and not _ignored((rel_dir / d).as_posix(), ignore)
        )
        for fname in sorted(filenames):
            if fname.startswith("."):
                continue
            rel = (rel_dir / fname).as_posix()
            if _ignored(rel, ignore):
                continue
            if not validator.is_bids("/" + rel):
                bad.append(rel)
    return bad


def _bidsignore(root: Path) -> list[str]:
    try:
        lines = (root / ".bidsignore").read_text().splitlines()
    except OSError:
        return []
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    """gitignore-like: a pattern matches the path, any leading part of it, or its base name."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        anchored = pat.startswith("/")
        pat = pat.strip("/")
        if any(fnmatch.fnmatch(p, pat) for p in prefixes):
            return True
        if not anchored and "/" not in pat and any(fnmatch.fnmatch(part, pat) for part in parts):
            return True
    return False


def _run_official(exe: str, root: Path, timeout: float) -> ValidationReport:
    proc = subprocess.run(
        [exe, str(root), "--json"], capture_output=True, text=True, timeout=timeout, check=False
    )
    try:
        doc = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise ValueError(f"unexpected output (exit {proc.returncode}): {(proc.stderr or proc.stdout)[:200]}") from None
    version = ""
    with_version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60, check=False)
    if with_version.returncode == 0 and with_version.stdout.strip():
        version = " " + with_version.stdout.strip().splitlines()[0].removeprefix("bids-validator").strip()
    report = ValidationReport(f"bids-validator{version}")
    issues = doc.get("issues", {}) if isinstance(doc, dict) else {}
    if isinstance(issues.get("issues"), list):  # schema validator (2.x): flat issue list
        grouped: dict[tuple[str, str], list[str]] = {}
        for issue in issues["issues"]:
            key = (str(issue.get("severity", "error")), str(issue.get("code", "ISSUE")))
            grouped.setdefault(key, []).append(str(issue.get("location") or ""))
        messages = issues.get("codeMessages", {}) or {}
        for (severity, code), locations in grouped.items():
            line = _issue_line(root, code, messages.get(code, ""), locations)
            (report.errors if severity == "error" else report.warnings).append(line)
    else:  # legacy validator (1.x): errors / warnings with file lists
        for severity in ("errors", "warnings"):
            for issue in issues.get(severity, []) or []:
                files = [
                    str((f.get("file") or {}).get("relativePath") or (f.get("file") or {}).get("path") or "")
                    for f in issue.get("files", []) or []
                    if isinstance(f, dict)
                ]
                line = _issue_line(root, str(issue.get("key", "ISSUE")), str(issue.get("reason", "")), files)
                (report.errors if severity == "errors" else report.warnings).append(line)
    if proc.returncode != 0 and not report.errors:
        report.errors.append(f"{root}: bids-validator exited with status {proc.returncode}")
    return report


def _issue_line(root: Path, code: str, reason: str, files: list[str]) -> str:
    files = [f.lstrip("/") for f in files if f]
    where = str(root / files[0]) if files else str(root)
    more = f" (and {len(files) - 1} more files)" if len(files) > 1 else ""
    reason = " ".join(reason.split())
    if len(reason) > 160:
        reason = reason[:157] + "..."
    return f"{where}: {code}: {reason}{more}" if reason else f"{where}: {code}{more}"
