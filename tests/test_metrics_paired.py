"""The paired difference of two models on the same sessions."""

import numpy as np
import pytest

from bidsapp.metrics.paired import paired_difference


def test_a_paired_difference_has_a_bootstrap_interval_around_its_mean():
    rng = np.random.default_rng(0)
    b = rng.uniform(0.4, 0.8, 12)
    e = paired_difference(b + 0.05 + rng.normal(0, 0.01, 12), b)
    assert e["n"] == 12 and e["ahead"] == 12 and e["mean"] == pytest.approx(0.05, abs=0.01)
    assert e["ci95"][0] < e["mean"] < e["ci95"][1] and e["ci95"][0] > 0


def test_nans_are_dropped_and_too_few_sessions_give_no_interval():
    e = paired_difference([0.5, np.nan, 0.7], [0.4, 0.3, np.nan])
    assert e["n"] == 1 and e["mean"] == pytest.approx(0.1) and e["ci95"] is None
