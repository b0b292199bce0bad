"""The same inputs and seed give the same numbers whatever ``--nprocs``/``--omp-nthreads`` say.

Each step runs in a fresh process per thread setting: ITK fixes its thread pool at a process's first
ANTs call and torch keeps its thread count, so one process cannot stand for two settings. The
whole-workflow check (two participant runs, byte-identical NIfTI data) is slow-marked.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

N4 = """
import sys
from workflows.interfaces import ants as A
A.use_threads(int(sys.argv[1]), seed=0)
A.n4_correct(sys.argv[2], sys.argv[3])
A.rigid_coregister(sys.argv[3], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6])
"""

TISSUE = """
import sys
import nibabel as nib, numpy as np, torch
torch.set_num_threads(int(sys.argv[1]))
from bidsapp.models import tissue
img, mask = nib.load(sys.argv[2]), nib.load(sys.argv[3])
res = tissue.segment(np.asarray(img.dataobj, dtype=np.float32), np.asarray(mask.dataobj) > 0,
                     img.header.get_zooms()[:3], {"SequenceFamily": "MPRAGE", "InversionTime": 0.9}, device="cpu")
assert res.refinement is not None  # the 1.5 mm input also exercises the intensity refinement
np.save(sys.argv[4], res.probs)
"""


def _run(code: str, *args) -> None:
    subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, check=True, capture_output=True,
                   text=True)


def _data(path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def test_ants_steps_ignore_the_thread_count_asked_for(tmp_path, tiny_session):
    """N4 and a registration on 1 and 4 requested threads: identical voxels (ITK stays on one thread)."""
    outs = {}
    for n in (1, 4):
        d = tmp_path / str(n)
        d.mkdir()
        _run(N4, n, tiny_session["T1w"], d / "n4.nii.gz", tiny_session["T1w_mask"], d / "moved.nii.gz", d / "x.mat")
        outs[n] = d
    for name in ("n4.nii.gz", "moved.nii.gz"):
        assert np.array_equal(_data(outs[1] / name), _data(outs[4] / name)), name


def test_tissue_probabilities_ignore_torch_threads(tmp_path, tiny_session):
    """The U-Net and the intensity refinement on 1 and 3 torch threads: identical probabilities."""
    from scipy import ndimage

    img, mask = nib.load(str(tiny_session["T1w"])), nib.load(str(tiny_session["T1w_mask"]))
    zooms = np.asarray(img.header.get_zooms()[:3]) / 2
    aff = img.affine.copy()
    aff[:3, :3] /= 2
    up = ndimage.zoom(np.asarray(img.dataobj, dtype=np.float32), 2, order=1)
    m = ndimage.zoom(np.asarray(mask.dataobj, dtype=np.uint8), 2, order=0)
    assert np.allclose(np.sqrt((aff[:3, :3] ** 2).sum(0)), zooms)
    nib.save(nib.Nifti1Image(up, aff), tmp_path / "t1w.nii.gz")
    nib.save(nib.Nifti1Image(m, aff), tmp_path / "mask.nii.gz")
    for n in (1, 3):
        _run(TISSUE, n, tmp_path / "t1w.nii.gz", tmp_path / "mask.nii.gz", tmp_path / f"p{n}.npy")
    a, b = np.load(tmp_path / "p1.npy"), np.load(tmp_path / "p3.npy")
    assert a.shape[0] == 3 and a.sum() > 0
    assert np.array_equal(a, b)


@pytest.mark.slow
def test_participant_outputs_are_identical_whatever_nprocs_and_threads(tmp_path, tiny_session):
    """Two runs of one subject, ``--nprocs 1 --omp-nthreads 1`` and ``--nprocs 2 --omp-nthreads 3``,
    separate work folders: every NIfTI output holds the same data."""
    outs = []
    for nprocs, omp in ((1, 1), (2, 3)):
        out, work = tmp_path / f"out{nprocs}", tmp_path / f"work{nprocs}"
        run = subprocess.run([sys.executable, "-m", "bidsapp.cli", str(tiny_session["bids"]), str(out), "participant",
                              "-w", str(work), "--nprocs", str(nprocs), "--omp-nthreads", str(omp),
                              "--skip-bids-validation"], cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        outs.append(out)
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*.nii.gz"))
    assert len(files) >= 8
    assert files == sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*.nii.gz"))
    differ = [str(f) for f in files if not np.array_equal(_data(outs[0] / f), _data(outs[1] / f))]
    assert not differ, f"outputs differ between the two runs: {differ}"
