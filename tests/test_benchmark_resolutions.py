"""The resolution benchmark's coarser acquisitions: a thick voxel is the mean of what it spans, centred
on it, so the same head keeps its volume and place at every resolution."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from benchmark_scripts import load


@pytest.fixture(scope="module")
def bench():
    return load("tissue", "resolutions")


def _ball(shape=(40, 44, 36)):
    """A 1 mm 'head' in LIA voxel order (the benchmark reorients it first) with an off-centre ball."""
    ijk = np.indices(shape, dtype=np.float32)
    ball = (np.sqrt(((ijk[0] - 18) ** 2 + (ijk[1] - 24) ** 2 + (ijk[2] - 15) ** 2)) < 9).astype(np.float32)
    affine = np.array([[-1.0, 0, 0, 20], [0, 0, 1, -30], [0, -1, 0, 25], [0, 0, 0, 1]])  # LIA
    return nib.Nifti1Image(100.0 * ball, affine)


def _centre_mm(img):
    data = np.asarray(img.dataobj, np.float64)
    ijk = np.array([(np.indices(data.shape)[k] * data).sum() / data.sum() for k in range(3)])
    return img.affine[:3, :3] @ ijk + img.affine[:3, 3]


@pytest.mark.parametrize("voxel", [(1, 1, 3), (2, 1, 1), (1, 1, 5), (1.5, 1.5, 1.5), (0.7, 0.7, 0.7)])
def test_a_coarser_acquisition_keeps_the_ball_where_and_as_large_as_it_was(bench, voxel):
    img = _ball()
    out = bench.coarsen(img, voxel)
    assert np.allclose(out.header.get_zooms()[:3], voxel)
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S")
    signal = lambda i: float(np.asarray(i.dataobj, np.float64).sum() * np.prod(i.header.get_zooms()[:3]))
    assert signal(out) == pytest.approx(signal(img), rel=0.01)  # the ball's volume, partial volume counted
    assert np.allclose(_centre_mm(out), _centre_mm(img), atol=0.05)


def test_every_resolution_is_a_subject_of_its_own(bench, tmp_path):
    src = tmp_path / "head.nii.gz"
    nib.save(_ball(), str(src))
    subjects = bench.make_dataset(tmp_path / "bids", src)
    assert len(subjects) == len(set(subjects)) == len(bench.RESOLUTIONS)
    for sub in subjects:
        assert (tmp_path / "bids" / sub / "anat" / f"{sub}_T1w.nii.gz").is_file()
