"""The 3D-SiameseNet tables' splits and scores, on a made-up pool (no simulation, no network)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmark_scripts import load


@pytest.fixture(scope="module")
def tables():
    return load("longitudinal", "siamese_tables")


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
    # a pool with warped follow-ups is also split by how the volume was lost
    warped = dict(pool, warp=(np.arange(n) // 4) % 2 == 1)
    probs = np.where(warped["warp"][:, None], np.eye(2)[1 - label], np.eye(2)[label])
    row = tables.table(warped, {}, runs=2, seed=0, siamese_probs=probs)[0]
    assert row["accuracy_simulated_atrophy"] == 1.0 and row["accuracy_warp"] == 0.0


def _ball(ventricle, size=32, seed=0):
    rng = np.random.default_rng(seed)
    g = np.indices((size,) * 3).astype(float) - (size - 1) / 2
    r = np.sqrt((g ** 2).sum(0))
    csf = np.clip(ventricle + 0.5 - r, 0, 1) + np.clip(r - 10.5, 0, 1)
    img = csf * 0.15 + (1 - csf) * np.where(r > 8.5, 0.5, 0.9) + rng.normal(0, 0.01, r.shape)
    return np.where(r <= 12, np.maximum(img, 1e-3), 0.0).astype(np.float16)


def test_siamese_rows_and_tsne_only_on_a_pool_the_network_did_not_learn(tables, tmp_path):
    import json

    import torch

    from bidsapp.models import registry
    from bidsapp.models import siamese as SN

    n = 40
    label, change = np.arange(n) % 2, (np.arange(n) // 2) % 2
    a = np.stack([_ball(4.0, seed=k) for k in range(n)])
    b = np.stack([_ball(4.0 + 1.5 * label[k], seed=100 + k) for k in range(n)])
    pool = {"a": a, "b": b, "label": label, "change": change, "validation": np.zeros(n, bool),
            "protocols": np.array(["siemens-1.5T-mprage>siemens-1.5T-mprage"] * n),
            "gm_change": -1.0 - 2 * label.astype(np.float32), "ventricle_change": 2.0 + 8 * label.astype(np.float32)}
    arch = {"class": SN.ARCHITECTURE["class"],
            "kwargs": dict(SN.ARCHITECTURE["kwargs"], filters=[2, 2, 2], dense=[4, 4], input_size=32)}
    torch.manual_seed(0)
    card = {"version": "test", "architecture": arch, "classes": list(SN.CLASSES), "input_mode": "standardised",
            "resolution_mm": 3.0, "training": {"command": "test", "seed": 0}, "metrics": {}}
    registry.save_model(SN.MODEL_NAME, SN.build_network(arch).state_dict(), card, tmp_path / "weights")
    for seed in (0, 1):
        run = tmp_path / f"run{seed}"
        run.mkdir()
        np.savez(run / "pairs.npz", recipe=np.asarray(json.dumps({"seed": seed, "grid_mm": 3.0})), **pool)
        args = ["--run", str(run), "--weights", str(tmp_path / "weights"), "--runs", "2",
                "--out", str(run / "tables.json"), "--figure", str(run / "tsne.png")]
        assert tables.main(args) == (2 if seed == 0 else 0)  # seed 0: the network's own training pool
    rows = json.loads((tmp_path / "run1" / "tables.json").read_text())["rows"]
    assert rows[-1]["model"] == "3D-SiameseNet" and 0 <= rows[-1]["accuracy"] <= 1
    assert (tmp_path / "run1" / "tsne.png").stat().st_size > 5000
    assert not (tmp_path / "run0" / "tsne.png").exists()
