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


def _deb_members(deb: bytes, wanted: dict) -> dict:
    """The files ``wanted`` (key -> path in the package) read from a Debian package's data archive.

    A .deb is an ``ar`` archive holding ``data.tar.*``; read here without dpkg, so any system can."""
    import io
    import tarfile

    if not deb.startswith(b"!<arch>\n"):
        raise ValueError("not a Debian package (no ar header)")
    pos, data = 8, None
    while pos + 60 <= len(deb):
        name, size = deb[pos:pos + 16].decode().strip().rstrip("/"), int(deb[pos + 48:pos + 58])
        if name.startswith("data.tar"):
            data = deb[pos + 60:pos + 60 + size]
            break
        pos += 60 + size + (size % 2)
    if data is None:
        raise ValueError("Debian package without data.tar")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = {m.name.lstrip("./"): m for m in tar.getmembers()}
        missing = [p for p in wanted.values() if p not in names]
        if missing:
            raise ValueError(f"package lacks {', '.join(missing)}")
        return {k: tar.extractfile(names[p]).read() for k, p in wanted.items()}


def registry_head(spec: dict | None = None, dest: Path | None = None) -> dict:
    """Paths of a real head's files, ``<name>_<key>`` (default :data:`COLIN27`), downloaded once into
    ``<cache>/registry`` and checked against the package's sha256; a failure raises OSError or
    ValueError with one line that says what went wrong."""
    import hashlib
    import urllib.request

    spec = spec or COLIN27
    dest = Path(dest) if dest else cache_dir() / "registry" / Path(spec["url"]).stem
    out = {k: dest / f"{spec['name']}_{k}{''.join(Path(p).suffixes)}" for k, p in spec["files"].items()}
    if all(p.is_file() for p in out.values()):
        return out
    with urllib.request.urlopen(spec["url"], timeout=120) as resp:
        deb = resp.read()
    digest = hashlib.sha256(deb).hexdigest()
    if digest != spec["sha256"]:
        raise ValueError(f"{spec['url']}: sha256 {digest} is not the expected {spec['sha256']}")
    dest.mkdir(parents=True, exist_ok=True)
    for key, blob in _deb_members(deb, spec["files"]).items():
        tmp = out[key].with_name(out[key].name + ".part")
        tmp.write_bytes(blob)
        tmp.replace(out[key])
    return out


def registry_head_or_none(log=print) -> dict | None:
    """:func:`registry_head`'s files, or None (with one line to ``log`` saying why) where it cannot be
    fetched: the benchmarks then go on with the shared data alone."""
    try:
        return registry_head()
    except (OSError, ValueError) as exc:
        log(f"Colin 27 left out: {exc}")
        return None
