"""The tilt benchmark's geometry: a mask made on the rotated image comes back onto the original grid, so
a method that follows the anatomy reads no change, and one that does not is caught."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from benchmark_scripts import load


@pytest.fixture(scope="module")
def bench():
    return load("brainmask", "tilt")


def _head(tmp_path, shape=(64, 72, 60)):
    """An off-centre, lopsided 'brain' (bright) in a dark 'skull' shell, 1 mm, saved as n4.nii.gz."""
    from scipy import ndimage as ndi

    z, y, x = np.indices(shape, dtype=np.float32)
    c = np.array([34.0, 38.0, 28.0])
    r = np.sqrt(((z - c[0]) / 20) ** 2 + ((y - c[1]) / 24) ** 2 + ((x - c[2]) / 17) ** 2)
    lump = np.sqrt(((z - 44) / 6) ** 2 + ((y - 30) / 6) ** 2 + ((x - 36) / 6) ** 2) < 1  # breaks the symmetry
    brain = (r < 1) | lump
    data = np.where(brain, 100.0, np.where(r < 1.25, 10.0, 0.0)).astype(np.float32)
    data = ndi.gaussian_filter(data, 0.7)
    f = tmp_path / "n4.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(f))
    t = tmp_path / "truth.nii.gz"
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), np.eye(4)), str(t))
    return f, t


def test_rotate_and_unrotate_are_inverse(bench):
    rng = np.random.default_rng(0)
    from scipy import ndimage as ndi

    data = (ndi.gaussian_filter(rng.standard_normal((40, 44, 36)), 3) > 0).astype(np.float32)
    back = bench.unrotate(bench.rotate(data, (20, -10, 15), order=1), (20, -10, 15)) >= 0.5
    inner = np.zeros(data.shape, bool)
    inner[10:-10, 10:-10, 10:-10] = True  # away from the corners the rotation moves out of the grid
    agree = (back == (data > 0.5))[inner].mean()
    assert agree > 0.97


def test_a_method_that_follows_the_anatomy_reads_no_change(bench, tmp_path):
    n4, truth = _head(tmp_path)
    angles = [(0, 0, 0), (20, 0, 0), (0, -15, 10)]
    rows = bench.tilted_masks(n4, angles, truth, method=lambda img: np.asarray(img.dataobj) > 50)
    assert [r["angles"] for r in rows] == [list(a) for a in angles]
    for r in rows:
        assert abs(r["volume_change_pct"]) < 1.5 and r["dice_vs_first"] > 0.97 and r["dice_vs_truth"] > 0.95


def test_a_method_tied_to_the_grid_is_caught(bench, tmp_path):
    """A 'mask' that cuts at a fixed slice, whatever the head's pitch, changes with the rotation."""
    n4, _ = _head(tmp_path)

    def grid_cut(img):
        m = np.asarray(img.dataobj) > 50
        m[:, :, :30] = False  # keeps the upper half of the grid, not of the brain
        return m

    rows = bench.tilted_masks(n4, [(0, 0, 0), (25, 0, 0)], method=grid_cut)
    assert abs(rows[1]["volume_change_pct"]) > 3 and rows[1]["dice_vs_first"] < 0.95
