"""The 3D-SiameseNet tables' splits and scores, on a made-up pool (no simulation, no network)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tables():
    path = ROOT / "benchmarks" / "longitudinal" / "siamese_tables.py"
    spec = importlib.util.spec_from_file_location("longitudinal_siamese_tables", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_splits_keep_each_anatomy_block_on_one_side(tables):
    blocks = np.arange(80) // 4
    for fit, test in tables.splits(blocks, runs=5, seed=1):
        assert not set(blocks[fit]) & set(blocks[test])
        assert len(test) == 16 and len(fit) == 64


def test_baselines_read_separable_changes_and_the_scores_split_by_scanner_change(tables):
    rng = np.random.default_rng(0)
    n = 120
    label = np.arange(n) % 2
    change = (np.arange(n) // 2) % 2
    features = np.stack([-0.5 - 2.5 * label + 0.2 * rng.standard_normal(n),
                         2.0 + 8.0 * label + 0.5 * rng.standard_normal(n)], 1)
    pool = {"label": label, "change": change}
    rows = tables.table(pool, {"true": features}, runs=3, seed=0)
    assert [r["model"] for r in rows] == ["logistic regression (true)", "SVM (true)", "random forest (true)"]
    for r in rows:
        assert r["accuracy"] > 0.95 and r["accuracy_scanner_change"] > 0.9 and r["msle"] < 0.05
    # a classifier that always says "decline" keeps no stable pair
    always = np.tile([0.0, 1.0], (n, 1))
    row = tables.table(pool, {}, runs=2, seed=0, siamese_probs=always)[0]
    assert row["model"] == "3D-SiameseNet" and row["stable_change_called_stable"] == 0.0
    assert row["accuracy"] == pytest.approx(0.5, abs=0.1)
