"""Where the development data are: one setting for the trainers, the benchmarks and the tests.

``$SCANBRIDGE_DATA_DIR`` is the folder holding ``anatomy/`` (label maps ``anat-*_dseg.nii.gz``) and
``clinical-ms/`` (real clinical scans); the default is ``../shared/data`` beside the project checkout.
``$SCANBRIDGE_ANATOMY_DIR`` still points at the label maps alone when set. The app itself never needs
them: they are for training and benchmarking.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "SCANBRIDGE_DATA_DIR"
HELDOUT_ANATOMIES = ("anat-10", "anat-11", "anat-12")
"""Label maps of ``anatomy/`` that no model trains on: every trainer leaves them out, and the simulated
benchmarks test on them."""


def data_dir() -> Path:
    env = os.environ.get(ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def anatomy_dir() -> Path:
    """The label maps: ``$SCANBRIDGE_ANATOMY_DIR``, else ``<data dir>/anatomy``."""
    env = os.environ.get("SCANBRIDGE_ANATOMY_DIR")
    return Path(env) if env else data_dir() / "anatomy"


def clinical_dir() -> Path:
    return data_dir() / "clinical-ms"


def require(path: Path, what: str) -> Path:
    """``path`` if it is a folder, else a FileNotFoundError that says which setting to change."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found at {path}: set {ENV} to the folder that holds anatomy/ and "
                                "clinical-ms/ (or pass the folder on the command line)")
    return path


def run_participant(bids: Path, out: Path, work: Path, nprocs: int, *extra: str) -> float:
    """Seconds ``scanbridge bids out participant`` took, run as a user runs it (one ITK thread per
    step, its own work folder, ``extra`` options appended); a failure raises."""
    import subprocess
    import time

    t = time.time()
    cmd = ["scanbridge", str(bids), str(out), "participant", "-w", str(work), "--nprocs", str(nprocs),
           "--omp-nthreads", "1", "--skip-bids-validation", *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.time() - t


# ------------------------------------------------------------------ real heads from package registries
COLIN27 = {
    "name": "colin27",
    "package": "mricron-data 1.2.20211006+dfsg-4 (Debian 12)",
    "url": "http://deb.debian.org/debian/pool/main/m/mricron/mricron-data_1.2.20211006+dfsg-4_all.deb",
    "sha256": "d40aa0ed66cf89bf6cafa049ad3884703c9d975c2ee2737525b7196528df9d6f",
    "files": {"T1w": "usr/share/mricron/templates/ch2.nii.gz",
              "bet": "usr/share/mricron/templates/ch2bet.nii.gz"},
}
"""Colin 27 (Holmes et al. 1998: one adult's head scanned 27 times on a 1.5 T scanner and averaged;
1 mm, skull and scalp, MNI space) as MRIcron ships it (``ch2``), with FSL BET's brain of it
(``ch2bet``). A real head that no simulation made, obtainable wherever Debian's archive is: the
benchmarks' real 1 mm T1w beside the thick-slice clinical scans."""


def cache_dir() -> Path:
    """Downloads for the benchmarks: ``$SCANBRIDGE_CACHE_DIR``, else ``~/.cache/scanbridge``."""
    env = os.environ.get("SCANBRIDGE_CACHE_DIR")
    return Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "scanbridge"


def _tar_members(tar_bytes: bytes, paths) -> dict:
    """``{path: bytes}`` of ``paths`` read from a tar archive (any compression; a leading ``./`` ignored)."""
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        names = {m.name.lstrip("./"): m for m in tar.getmembers()}
        missing = [p for p in paths if p not in names]
        if missing:
            raise ValueError(f"package lacks {', '.join(missing)}")
        return {p: tar.extractfile(names[p]).read() for p in paths}


def _deb_data(deb: bytes) -> bytes:
    """A Debian package's ``data.tar.*``: a .deb is an ``ar`` archive, read here without dpkg, so any
    system can."""
    if not deb.startswith(b"!<arch>\n"):
        raise ValueError("not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(deb):
        name, size = deb[pos:pos + 16].decode().strip().rstrip("/"), int(deb[pos + 48:pos + 58])
        if name.startswith("data.tar"):
            return deb[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)
    raise ValueError("Debian package without data.tar")


def _deb_members(deb: bytes, wanted: dict) -> dict:
    """The files ``wanted`` (key -> path in the package) read from a Debian package's data archive."""
    got = _tar_members(_deb_data(deb), list(wanted.values()))
    return {k: got[p] for k, p in wanted.items()}


BRAINBROWSER = {
    "name": "brainbrowser",
    "package": "brainbrowser 2.3.0 (npm)",
    "url": "https://registry.npmjs.org/brainbrowser/-/brainbrowser-2.3.0.tgz",
    "sha256": "bf3ddf344dc4f1bffb17131468ab5c27ed4e44a6adab5b6e97b81d56c30ac609",
    "files": {"scan1_T1w": "package/examples/models/structural1.mnc",
              "scan2_T1w": "package/examples/models/structural2.mnc"},
}
"""Two real 1 mm T1w of one adult's head with skull and neck (the same gyri in both; the scans' dates
and scanner are not given), native-space sagittal volumes of 160 x 224 x 256 voxels stored as 8-bit
intensities, as the BrainBrowser viewer's examples ship them (a MINC volume split into a JSON header
and raw bytes). Unlike Colin 27 each is a single acquisition, as a user's scan is; no reference mask
or segmentation comes with them."""

REGISTRY_HEADS = (COLIN27, BRAINBROWSER)


def _brainbrowser_volume(header: bytes, raw: bytes) -> bytes:
    """A BrainBrowser volume (``<file>.header.gz``: MINC's dimension order, starts, steps and direction
    cosines as JSON; ``<file>.raw.gz``: one unsigned byte per voxel in that order) as gzipped NIfTI.

    The affine is MINC's: world = sum over dimensions of (start + index * step) * direction cosines."""
    import gzip
    import json

    import nibabel as nib
    import numpy as np

    h = json.loads(gzip.decompress(header))
    order, axes = h["order"], ("xspace", "yspace", "zspace")
    if sorted(order) != sorted(axes):
        raise ValueError(f"BrainBrowser header with dimensions {order}, not x, y and z")
    shape = [int(h[d]["space_length"]) for d in order]
    data = np.frombuffer(gzip.decompress(raw), np.uint8)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"BrainBrowser volume of {data.size} bytes, not the header's {shape}")
    data = np.transpose(data.reshape(shape), [order.index(d) for d in axes])
    affine = np.eye(4)
    for j, d in enumerate(axes):
        cosines = np.asarray(h[d].get("direction_cosines", np.eye(3)[j]), float)
        affine[:3, j] = cosines * float(h[d]["step"])
        affine[:3, 3] += cosines * float(h[d]["start"])
    return gzip.compress(nib.Nifti1Image(data, affine).to_bytes(), compresslevel=6)


_MNC_PARTS = (".header.gz", ".raw.gz")
"""The two files BrainBrowser splits a ``.mnc`` volume into."""


def _package_members(blob: bytes, wanted: dict) -> dict:
    """``wanted``'s files out of a downloaded package (a .deb or an npm tarball), a BrainBrowser ``.mnc``
    pair made into NIfTI."""
    if blob.startswith(b"!<arch>\n"):
        blob = _deb_data(blob)
    elif not blob.startswith(b"\x1f\x8b"):
        raise ValueError("neither a Debian package nor a gzipped tarball")
    parts = lambda p: [p + s for s in _MNC_PARTS] if p.endswith(".mnc") else [p]  # noqa: E731
    got = _tar_members(blob, [q for p in wanted.values() for q in parts(p)])
    return {k: _brainbrowser_volume(*(got[q] for q in parts(p))) if p.endswith(".mnc") else got[p]
            for k, p in wanted.items()}


def _suffix(path: str) -> str:
    return ".nii.gz" if path.endswith(".mnc") else "".join(Path(path).suffixes)


def registry_head(spec: dict | None = None, dest: Path | None = None) -> dict:
    """Paths of a real head's files, ``<name>_<key>`` (default :data:`COLIN27`), downloaded once into
    ``<cache>/registry`` and checked against the package's sha256; a failure raises OSError or
    ValueError with one line that says what went wrong."""
    import hashlib
    import urllib.request

    spec = spec or COLIN27
    dest = Path(dest) if dest else cache_dir() / "registry" / Path(spec["url"]).stem
    out = {k: dest / f"{spec['name']}_{k}{_suffix(p)}" for k, p in spec["files"].items()}
    if all(p.is_file() for p in out.values()):
        return out
    with urllib.request.urlopen(spec["url"], timeout=300) as resp:
        blob = resp.read()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != spec["sha256"]:
        raise ValueError(f"{spec['url']}: sha256 {digest} is not the expected {spec['sha256']}")
    dest.mkdir(parents=True, exist_ok=True)
    for key, data in _package_members(blob, spec["files"]).items():
        tmp = out[key].with_name(out[key].name + ".part")
        tmp.write_bytes(data)
        tmp.replace(out[key])
    return out


def registry_head_or_none(log=print, spec: dict | None = None) -> dict | None:
    """:func:`registry_head`'s files, or None (with one line to ``log`` saying why) where it cannot be
    fetched: the benchmarks then go on with the shared data alone."""
    spec = spec or COLIN27
    try:
        return registry_head(spec)
    except (OSError, ValueError) as exc:
        log(f"{spec['package']} left out: {exc}")
        return None


def _t1w_keys(spec: dict) -> list[str]:
    return sorted(k for k in spec["files"] if k.endswith("T1w"))


def registry_label(spec: dict, n: int) -> str:
    """The label of the ``n``-th (0-based) T1w of a registry head: its name, numbered when it has several."""
    return spec["name"] + (str(n + 1) if len(_t1w_keys(spec)) > 1 else "")


def registry_repeats() -> list[tuple[str, ...]]:
    """Labels of registry T1w that are scans of one brain (a head shipped with several): their volumes
    should agree."""
    return [tuple(registry_label(spec, n) for n in range(len(_t1w_keys(spec)))) for spec in REGISTRY_HEADS
            if len(_t1w_keys(spec)) > 1]


def registry_t1w(log=print) -> list[tuple[str, Path]]:
    """(label, file) of every real T1w of :data:`REGISTRY_HEADS` that can be fetched: ``colin27``,
    ``brainbrowser1``, ``brainbrowser2``; a package that cannot be is left out with one line to ``log``."""
    out = []
    for spec in REGISTRY_HEADS:
        files = registry_head_or_none(log, spec)
        if files:
            out += [(registry_label(spec, n), files[k]) for n, k in enumerate(_t1w_keys(spec))]
    return out
