"""Lesion metrics on hand-made masks whose answers can be counted by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bidsapp.metrics.lesions import label_lesions, lesion_scores


def _cube(vol, corner, size=2):
    x, y, z = corner
    vol[x:x + size, y:y + size, z:z + size] = 1


def test_three_true_lesions_two_found_one_false_positive():
    truth = np.zeros((20, 20, 20), np.uint8)
    pred = np.zeros_like(truth)
    for c in ((1, 1, 1), (8, 8, 8), (14, 2, 14)):
        _cube(truth, c)
    _cube(pred, (1, 1, 1))              # found exactly
    pred[8, 8, 8] = 1                   # found by one voxel
    _cube(pred, (15, 15, 15))           # a false positive
    s = lesion_scores(pred, truth, zooms=(1, 1, 1))
    assert (s.n_true, s.n_pred) == (3, 3)
    assert s.ltpr == pytest.approx(2 / 3) and s.lfpr == pytest.approx(1 / 3)
    assert s.ppv == pytest.approx(9 / 17)                    # 8 + 1 true voxels of 8 + 1 + 8
    assert s.dice == pytest.approx(2 * 9 / (24 + 17))
    assert s.lesion_f1 == pytest.approx(2 / 3)                # recall 2/3, precision 2/3
    assert s.avd == pytest.approx(abs(17 - 24) / 24 * 100)
    assert s.hd95 > 0


def test_corner_touching_voxels_are_one_lesion_and_small_ones_can_be_ignored():
    m = np.zeros((6, 6, 6), np.uint8)
    m[1, 1, 1] = m[2, 2, 2] = 1          # touch by a corner: one lesion (26-connectivity)
    m[4, 4, 4] = 1
    assert label_lesions(m)[1] == 2
    _, n = label_lesions(m, zooms=(1, 1, 1), min_volume_mm3=2)
    assert n == 1                        # the single-voxel lesion is below 2 mm3
    assert label_lesions(m, zooms=(2, 2, 2), min_volume_mm3=2)[1] == 2   # 8 mm3 voxels pass


def test_empty_masks_have_defined_scores():
    empty = np.zeros((5, 5, 5), np.uint8)
    s = lesion_scores(empty, empty, with_hd95=False)
    assert s.dice == 1 and s.ltpr == 1 and s.lfpr == 0 and s.ppv == 1 and math.isnan(s.avd)
    some = empty.copy()
    some[2, 2, 2] = 1
    missed = lesion_scores(empty, some, with_hd95=False)
    assert missed.ltpr == 0 and missed.ppv == 0 and missed.avd == 100 and missed.lesion_f1 == 0
    spurious = lesion_scores(some, empty, with_hd95=False)
    assert spurious.lfpr == 1 and spurious.n_true == 0
    with pytest.raises(ValueError, match="different grids"):
        lesion_scores(some, np.zeros((4, 4, 4)))


def test_volume_ratio_keeps_the_sign_of_the_volume_error():
    from bidsapp.metrics.lesions import volume_ratio

    assert volume_ratio(150.0, 100.0) == pytest.approx(1.5) and volume_ratio(50.0, 100.0) == pytest.approx(0.5)
    assert volume_ratio(10.0, 0.0) is None  # no true lesions: no ratio
