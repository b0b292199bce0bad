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
