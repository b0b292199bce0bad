"""Build the Docker image with buildah and run it on a tiny dataset (scripts/build-container.sh).

Marked ``container``: deselected by default (it needs root, apt or buildah/podman, about 8 GB of
free disk and about 15 minutes on 2 cores). Run with ``python -m pytest -m container -s
tests/test_container_build.py``; ``SCANBRIDGE_CONTAINER_WORK`` picks the scratch folder.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "build-container.sh"
WORK = Path(os.environ.get("SCANBRIDGE_CONTAINER_WORK", "/var/tmp/scanbridge-container"))
EXPECTED_PHASES = ("tools", "config", "base", "wheel", "build", "smoke", "data", "participant", "group")


def phase_table(stdout: str) -> dict[str, tuple[float, str]]:
    """{phase: (seconds, result)} from the summary the script prints."""
    rows = re.findall(r"^(\w+)\s+([0-9.]+)\s+(ok|FAILED.*)$", stdout, re.M)
    return {name: (float(sec), result) for name, sec, result in rows}


def test_phase_table_parser():
    out = "phase  seconds  result\nbase     103.6  ok\nbuild     12.0  FAILED (exit 1)\ntotal  115.6\n"
    assert phase_table(out) == {"base": (103.6, "ok"), "build": (12.0, "FAILED (exit 1)")}


@pytest.mark.container
def test_image_builds_and_runs_read_only_on_a_tiny_dataset():
    if os.geteuid() != 0:
        pytest.skip("buildah/podman with private storage need root")
    if not (shutil.which("buildah") and shutil.which("podman")) and not shutil.which("apt-get"):
        pytest.skip("neither buildah/podman nor apt-get to install them")
    WORK.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(WORK).free / 1e9
    if free_gb < 9:
        pytest.skip(f"about 9 GB of free disk needed under {WORK}, {free_gb:.1f} GB free")

    res = subprocess.run(["bash", str(SCRIPT), "--work", str(WORK)],
                         capture_output=True, text=True, timeout=3 * 3600)
    print(res.stdout)
    print(res.stderr[-5000:])
    phases = phase_table(res.stdout)
    failed = {k: v for k, v in phases.items() if v[1] != "ok"}
    assert res.returncode == 0, f"failed phases {failed}; logs in {WORK / 'logs'}\n{res.stderr[-3000:]}"
    assert set(EXPECTED_PHASES) <= set(phases), phases
    assert "all phases passed" in res.stdout
    assert re.search(r"image \S+: [0-9.]+ GB", res.stdout)
