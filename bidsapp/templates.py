"""Where the spatial template comes from: TemplateFlow when its files are there, else nilearn's ICBM152.

The participant workflow needs five files of one template at one resolution: the T1w image, a brain
mask and the CSF/GM/WM tissue probability maps (Atropos priors). :func:`get_template` returns them
with their provenance, which the workflow writes into sidecars and transform names:

    {"name": "MNI152NLin2009cAsym", "requested": "MNI152NLin2009cAsym", "source": "templateflow",
     "resolution": 2, "zooms": [2.0, 2.0, 2.0], "files": {"T1w": ..., "mask": ..., "CSF": ...,
     "GM": ..., "WM": ...}, "home": <folder>, "description": ..., "version": ..., "warnings": [...]}

Sources, in order:

1. ``templateflow``: the files already in ``$TEMPLATEFLOW_HOME`` (the container image pre-fetches
   them at build time, like fMRIPrep). A populated home is read directly by its documented layout
   (``tpl-<name>/tpl-<name>_res-<r>_<entities>.nii.gz``), which needs no write access and no pybids
   index. Files that are missing are fetched with ``templateflow.api.get`` only when the network
   may be used (not with ``offline=True``, ``SCANBRIDGE_OFFLINE=1`` or ``TEMPLATEFLOW_AUTOUPDATE=0``)
   and only after a 2-second reachability check, so an offline machine fails over at once.
2. ``nilearn-icbm152-2009a``: a TemplateFlow-layout folder ``tpl-MNI152NLin2009aSym`` seeded in the
   cache from the ICBM152 2009a (symmetric) files that nilearn ships (T1, GM, WM at 1 mm). The
   template is named what it is (MNI152NLin2009aSym, not the 2009c asymmetric one that was asked
   for), so transforms and sidecars never claim a space the data are not in. Derived files:
   brain mask = voxels where nilearn's T1 (already brain-extracted, CSF included) is non-zero,
   holes filled, largest connected component; CSF prior = mask - GM - WM, clipped to [0, 1].

Lower resolutions (2, 3, 4 mm, ...) are exact block averages of the 1 mm files (masks: average
>= 0.5), unless TemplateFlow has that resolution itself. Everything derived is cached under
``cache_dir`` (default ``$SCANBRIDGE_CACHE_DIR``, ``$XDG_CACHE_HOME/scanbridge`` or
``~/.cache/scanbridge``; a temporary folder when none is writable, as in a read-only container with
``HOME=/tmp`` unset) and written atomically, so concurrent jobs can share one cache.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import socket
import tempfile
from pathlib import Path

import numpy as np

from bidsapp.errors import UserError

LOG = logging.getLogger("scanbridge.templates")

DEFAULT_TEMPLATE = "MNI152NLin2009cAsym"
OFFLINE_TEMPLATE = "MNI152NLin2009aSym"
OFFLINE_SOURCE = "nilearn-icbm152-2009a"
FILE_KEYS = ("T1w", "mask", "CSF", "GM", "WM")
"""Keys of the ``files`` dict: template image, brain mask, tissue priors."""

# Templates the ICBM152 2009a fallback can stand in for (same MNI152 2009 family and space family).
_FALLBACK_OK = {"MNI152NLin2009cAsym", "MNI152NLin2009aSym", "MNI152NLin2009cSym", "MNI152NLin2009aAsym"}
_TF_ENTITIES = {
    "T1w": "T1w",
    "mask": "desc-brain_mask",
    "CSF": "label-CSF_probseg",
    "GM": "label-GM_probseg",
    "WM": "label-WM_probseg",
}
_TF_QUERY = {
    "T1w": dict(suffix="T1w", desc=None),
    "mask": dict(suffix="mask", desc="brain"),
    "CSF": dict(suffix="probseg", label="CSF"),
    "GM": dict(suffix="probseg", label="GM"),
    "WM": dict(suffix="probseg", label="WM"),
}
_NILEARN_FILES = {
    "T1w": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "GM": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "WM": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
_CACHE_FORMAT = 1  # bump when the derivation changes, so stale caches are rebuilt
_S3_HOST = "templateflow.s3.amazonaws.com"


def get_template(
    name: str = DEFAULT_TEMPLATE,
    *,
    resolution: int = 2,
    cache_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
) -> dict:
    """The template ``name`` at ``resolution`` mm, as a provenance dict (see the module docstring).

    Raises :class:`bidsapp.errors.UserError` when the template is neither in TemplateFlow's home
    nor replaceable by the offline ICBM152 2009a files.
    """
    res = _check_resolution(resolution)
    cache = resolve_cache_dir(cache_dir)
    warnings: list[str] = []
    tf = _from_templateflow(name, res, cache, offline, warnings)
    if tf is not None:
        return tf
    if name not in _FALLBACK_OK:
        raise UserError(
            f"template {name!r} is not in TemplateFlow's home ({templateflow_home()}) and cannot be "
            f"fetched offline; use {DEFAULT_TEMPLATE} (an offline stand-in exists) or pre-fetch it"
        )
    prov = nilearn_template(res, cache)
    prov["requested"] = name
    if name != OFFLINE_TEMPLATE:
        warnings.append(
            f"{name} is not available offline: using {OFFLINE_TEMPLATE} seeded from nilearn's ICBM152 2009a files"
        )
    prov["warnings"] = warnings + prov.get("warnings", [])
    for w in prov["warnings"]:
        LOG.warning("template: %s", w)
    return prov


def template_at(template: dict, resolution: int, cache_dir: str | os.PathLike | None = None) -> dict:
    """The same template as ``template`` (a :func:`get_template` result) at another resolution."""
    return get_template(template.get("requested", template["name"]), resolution=resolution,
                        cache_dir=cache_dir or template.get("cache_dir"), offline=True)


# ------------------------------------------------------------------ locations


def templateflow_home() -> Path:
    """``$TEMPLATEFLOW_HOME`` or TemplateFlow's own default (``~/.cache/templateflow``)."""
    env = os.environ.get("TEMPLATEFLOW_HOME")
    if env:
        return Path(env).expanduser().absolute()
    try:
        from platformdirs import user_cache_dir

        return Path(user_cache_dir("templateflow")).absolute()
    except ImportError:  # pragma: no cover - platformdirs comes with templateflow
        return Path.home() / ".cache" / "templateflow"


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """A writable cache folder: the argument, then the environment, then a temporary folder."""
    candidates = []
    if cache_dir is not None:
        candidates.append(Path(cache_dir))
    if os.environ.get("SCANBRIDGE_CACHE_DIR"):
        candidates.append(Path(os.environ["SCANBRIDGE_CACHE_DIR"]))
    if os.environ.get("XDG_CACHE_HOME"):
        candidates.append(Path(os.environ["XDG_CACHE_HOME"]) / "scanbridge")
    candidates.append(Path.home() / ".cache" / "scanbridge")
    candidates.append(Path(tempfile.gettempdir()) / f"scanbridge-cache-{os.getuid()}")
    for cand in candidates:
        cand = cand.expanduser()
        try:
            cand.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(cand, os.W_OK | os.X_OK):
            return cand.absolute()
    raise UserError("no writable cache folder for templates: set SCANBRIDGE_CACHE_DIR")


def network_allowed(offline: bool | None = None) -> bool:
    """False when told to stay offline (argument or environment)."""
    if offline is not None:
        return not offline
    if _env_true("SCANBRIDGE_OFFLINE"):
        return False
    return os.environ.get("TEMPLATEFLOW_AUTOUPDATE", "1").strip().lower() not in {"0", "false", "off", "no", "n"}


def _env_true(var: str) -> bool:
    return os.environ.get(var, "").strip().lower() in {"1", "true", "on", "yes", "y"}


def _check_resolution(resolution) -> int:
    try:
        res = int(resolution)
    except (TypeError, ValueError):
        raise UserError(f"template resolution must be a whole number of mm, not {resolution!r}") from None
    if res != resolution or not 1 <= res <= 8:
        raise UserError(f"template resolution must be a whole number of mm from 1 to 8, not {resolution!r}")
    return res


# ------------------------------------------------------------------ TemplateFlow


def _tf_name(name: str, res_label: str, key: str) -> str:
    return f"tpl-{name}_res-{res_label}_{_TF_ENTITIES[key]}.nii.gz"


def _tf_present(home: Path, name: str, res: int) -> dict | None:
    """The five files of ``name`` at ``res`` in a TemplateFlow home, if all are there and non-empty."""
    folder = home / f"tpl-{name}"
    for label in (f"{res:02d}", str(res)):
        files = {k: folder / _tf_name(name, label, k) for k in FILE_KEYS}
        if all(p.is_file() and p.stat().st_size > 0 for p in files.values()):
            return files
    return None


def _reachable(host: str, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _tf_fetch(name: str, res: int) -> dict | None:
    """Fetch the five files with ``templateflow.api.get``; None on any failure."""
    try:
        from templateflow import api as tf_api

        files = {}
        for key in FILE_KEYS:
            got = tf_api.get(name, resolution=res, extension=".nii.gz", raise_empty=True, **_TF_QUERY[key])
            if isinstance(got, list):
                if len(got) != 1:
                    return None
                got = got[0]
            files[key] = Path(got)
        return files
    except Exception as exc:  # network, layout or unknown-template errors all mean "not available"
        LOG.info("TemplateFlow fetch of %s res-%d failed: %s", name, res, exc)
        return None


def _from_templateflow(name, res, cache, offline, warnings) -> dict | None:
    home = templateflow_home()
    files = _tf_present(home, name, res)
    derived_from = None
    if files is None and res > 2:
        # TemplateFlow has 1 and 2 mm tissue maps; coarser grids are block averages of 1 mm.
        base = _tf_present(home, name, 1)
        if base is not None:
            files = _block_average_set(base, res, cache / "templateflow-derived" / f"tpl-{name}", name,
                                       f"{res:02d}")
            derived_from = {k: str(v) for k, v in base.items()}
    if files is None and network_allowed(offline):
        if _reachable(_S3_HOST):
            files = _tf_fetch(name, res)
        else:
            warnings.append(f"TemplateFlow is not reachable: {name} could not be fetched")
    if files is None:
        return None
    desc = f"TemplateFlow {name} at res-{res}"
    if derived_from:
        desc += f" (block average of the 1 mm files in {home})"
    return {
        "name": name,
        "requested": name,
        "source": "templateflow",
        "resolution": res,
        "zooms": [float(res)] * 3,
        "files": {k: str(v) for k, v in files.items()},
        "home": str(home),
        "cache_dir": str(cache),
        "description": desc,
        "version": _dist_version("templateflow"),
        "warnings": warnings,
        **({"derived_from": derived_from} if derived_from else {}),
    }


# ------------------------------------------------------------------ nilearn ICBM152 2009a


def nilearn_data_dir() -> Path:
    """nilearn's packaged data folder, located without importing nilearn (slow)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("no template available: TemplateFlow files are missing and nilearn is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def nilearn_template(resolution: int = 1, cache_dir: str | os.PathLike | None = None) -> dict:
    """Seed (once) and return the TemplateFlow-layout ICBM152 2009a folder in the cache."""
    res = _check_resolution(resolution)
    cache = resolve_cache_dir(cache_dir)
    folder = cache / "templateflow" / f"tpl-{OFFLINE_TEMPLATE}"
    base = {k: folder / _tf_name(OFFLINE_TEMPLATE, "1", k) for k in FILE_KEYS}
    marker = folder / "template_description.json"
    if not _cache_valid(marker, base):
        for old in folder.glob("*.nii.gz") if folder.is_dir() else []:
            old.unlink(missing_ok=True)  # an older derivation: rebuild every resolution
        _seed_icbm152(folder, base)
    files = base if res == 1 else _block_average_set(base, res, folder, OFFLINE_TEMPLATE, str(res))
    desc = json.loads(marker.read_text())
    return {
        "name": OFFLINE_TEMPLATE,
        "requested": OFFLINE_TEMPLATE,
        "source": OFFLINE_SOURCE,
        "resolution": res,
        "zooms": [float(res)] * 3,
        "files": {k: str(v) for k, v in files.items()},
        "home": str(folder.parent),
        "cache_dir": str(cache),
        "description": desc["Description"],
        "version": f"nilearn {_dist_version('nilearn')}",
        "warnings": [],
    }


def _cache_valid(marker: Path, files: dict) -> bool:
    try:
        desc = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return desc.get("ScanbridgeCacheFormat") == _CACHE_FORMAT and all(p.is_file() for p in files.values())


_ICBM_DESCRIPTION = (
    "ICBM 152 Nonlinear Symmetrical template version 2009a (Fonov et al. 2009/2011), from the 1 mm "
    "files packaged with nilearn (mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted, uint8 scaled to "
    "[0, 1] for the probability maps). T1w: nilearn's T1 (brain-extracted, CSF included). Brain mask: "
    "T1 > 0, holes filled, largest connected component. CSF probability: brain mask - GM - WM, clipped "
    "to [0, 1]. Coarser resolutions are exact block averages of the 1 mm grid (masks: average >= 0.5)."
)


def _seed_icbm152(folder: Path, files: dict) -> None:
    import nibabel as nib
    from scipy import ndimage as ndi

    data = nilearn_data_dir()
    src = {k: data / v for k, v in _NILEARN_FILES.items()}
    missing = [str(p) for p in src.values() if not p.is_file()]
    if missing:
        raise UserError(f"nilearn's ICBM152 2009a files are missing ({', '.join(missing)}); reinstall nilearn")
    t1_img = nib.load(src["T1w"])
    affine = t1_img.affine
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    gm = np.asarray(nib.load(src["GM"]).dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(nib.load(src["WM"]).dataobj, dtype=np.float32) / 255.0
    mask = ndi.binary_fill_holes(t1 > 0)
    lab, n = ndi.label(mask)
    if n > 1:
        sizes = ndi.sum(mask, lab, index=np.arange(1, n + 1))
        mask = lab == (int(np.argmax(sizes)) + 1)
    csf = np.clip(mask.astype(np.float32) - gm - wm, 0.0, 1.0)
    arrays = {"T1w": t1, "mask": mask.astype(np.uint8), "CSF": csf, "GM": gm, "WM": wm}
    for key, arr in arrays.items():
        _save(arr, affine, files[key])
    _write_description(folder / "template_description.json", {1: (affine, mask.shape)})


def _write_description(path: Path, grids: dict) -> None:
    from bidsapp.bids.derivatives import atomic_write_json

    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        doc = {}
    if doc.get("ScanbridgeCacheFormat") != _CACHE_FORMAT:
        doc = {
            "Identifier": OFFLINE_TEMPLATE,
            "Name": "ICBM 152 Nonlinear Symmetrical template version 2009a",
            "Authors": ["Fonov V", "Evans AC", "Botteron K", "Almli CR", "McKinstry RC", "Collins DL"],
            "ReferencesAndLinks": ["https://doi.org/10.1016/j.neuroimage.2010.07.033",
                                   "https://doi.org/10.1016/S1053-8119(09)70884-5"],
            "Species": "Homo sapiens",
            "Description": _ICBM_DESCRIPTION,
            "GeneratedBy": [{"Name": "scanbridge", "Description": "seeded from nilearn's packaged files",
                             "Source": OFFLINE_SOURCE}],
            "ScanbridgeCacheFormat": _CACHE_FORMAT,
            "res": {},
        }
    for res, (affine, shape) in grids.items():
        doc["res"][str(res)] = {
            "origin": [float(v) for v in affine[:3, 3]],
            "shape": [int(s) for s in shape],
            "zooms": [float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(0))],
        }
    atomic_write_json(path, doc)


def _save(arr: np.ndarray, affine, path: Path) -> None:
    import nibabel as nib

    from bidsapp.bids.derivatives import atomic_save_nifti

    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=4)  # MNI152
    img.header.set_sform(affine, code=4)
    atomic_save_nifti(img, path)


def block_average(arr: np.ndarray, affine: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Average ``factor``^3 blocks (exact partial volume); the grid is padded with zeros to a multiple."""
    pad = [(0, (-s) % factor) for s in arr.shape]
    a = np.pad(arr.astype(np.float32), pad)
    sx, sy, sz = (s // factor for s in a.shape)
    out = a.reshape(sx, factor, sy, factor, sz, factor).mean(axis=(1, 3, 5), dtype=np.float64)
    new = affine.copy()
    new[:3, :3] = affine[:3, :3] * factor
    new[:3, 3] = affine[:3, :3] @ np.full(3, (factor - 1) / 2.0) + affine[:3, 3]
    return out.astype(np.float32), new


def _block_average_set(base: dict, res: int, folder: Path, name: str, res_label: str) -> dict:
    """The five files at ``res`` mm from their 1 mm versions (cached)."""
    import nibabel as nib

    out = {k: folder / _tf_name(name, res_label, k) for k in FILE_KEYS}
    if all(p.is_file() for p in out.values()):
        return out
    grid = None
    for key in FILE_KEYS:
        img = nib.load(base[key])
        zoom = float(np.sqrt((img.affine[:3, :3] ** 2).sum(0)).mean())
        factor = int(round(res / zoom))
        arr, aff = block_average(np.asarray(img.dataobj, dtype=np.float32), img.affine, factor)
        if key == "mask":
            arr = (arr >= 0.5).astype(np.uint8)
        _save(arr, aff, out[key])
        grid = (aff, arr.shape)
    if name == OFFLINE_TEMPLATE:
        _write_description(folder / "template_description.json", {res: grid})
    return out


def _dist_version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001 - provenance only
        return "unknown"
