"""The MRAI-NET paper's experiment as a library function, on small made-up scans of two scanners."""

from __future__ import annotations

import numpy as np
import pytest

from bidsapp.models.mrainet import MRAINetConfig
from bidsapp.training.mrainet import TrainSettings
from bidsapp.training.mrainet_experiment import (ExperimentData, ExperimentSettings, Scan, common_scale,
                                                 run_experiment, summarise)


def _scan(rng, levels, name, shape=(48, 48)):
    """Concentric tissues (WM core, GM ring, CSF rim) of random size; ``levels`` = CSF/GM/WM intensities."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    r = np.hypot(yy - shape[0] / 2 + rng.normal(0, 2), xx - shape[1] / 2 + rng.normal(0, 2))
    outer = rng.uniform(18, 21)
    lab = np.select([r < outer - 10, r < outer - 4, r < outer], [3, 2, 1], 0)
    img = np.asarray(levels, np.float32)[np.maximum(lab - 1, 0)] * (lab > 0)
    img = img + 0.02 * rng.standard_normal(shape).astype(np.float32) * (lab > 0)
    return Scan(img, lab, name)


def test_experiment_on_arrays_gives_every_measure_per_n_and_seed():
    rng = np.random.default_rng(0)
    src = [_scan(rng, (300, 900, 1200), f"s{i}") for i in range(3)]
    tgt = [_scan(rng, (150, 350, 500), f"t{i}") for i in range(3)]       # another gain and contrast
    scaled = common_scale(src + tgt)
    src, tgt = scaled[:3], scaled[3:]
    assert max(s.image.max() for s in src + tgt) == pytest.approx(1.0, abs=0.05)
    assert all((s.image[s.labels == 0] == 0).all() for s in src + tgt)
    data = ExperimentData(source=src[:2], target_train=tgt[0], target_test=tgt[1:])
    settings = ExperimentSettings(source_patches=40, target_pool=30, test_patches=20, pad_patches=60,
                                  network=MRAINetConfig(pool=2, n_domains=2),
                                  train=TrainSettings(steps=60, batch_size=32), cnn_epochs=2)
    res = run_experiment(data, ns=(3, 10), seeds=(0, 1), settings=settings, progress=lambda m: None)
    assert [(r["n"], r["seed"]) for r in res["runs"]] == [(3, 0), (3, 1), (10, 0), (10, 1)]
    assert res["pad_before"] > 0.8                     # one scale for both: the gain tells the scanners apart
    for r in res["runs"]:
        for k in ("pad_after", "mrainet", "source", "target"):
            assert np.isfinite(r[k])
        assert 0 <= r["mrainet"] <= 1 and 0 <= r["target"] <= 1
    assert [row["n"] for row in res["table"]] == [3, 10] and res["table"][0]["seeds"] == 2
    assert res["patches"]["test"] == 2 * 3 * 20
    # two workers give the runs of one worker
    par = run_experiment(data, ns=(3,), seeds=(0, 1), settings=settings, jobs=2, progress=lambda m: None)
    for a, b in zip(par["runs"], res["runs"][:2]):
        assert a["mrainet"] == b["mrainet"] and a["pad_after"] == b["pad_after"]


def test_summarise_means_and_spread():
    runs = [{"n": 10, "seed": s, "pad_before": 1.0, "pad_after": v, "mrainet": 0.1, "source": 0.5, "target": 0.4,
             "mrainet_train_s": 1.0, "cnn_train_s": 1.0} for s, v in enumerate((0.0, 0.2, 0.4))]
    row = summarise(runs)[0]
    assert row["pad_after"] == pytest.approx(0.2) and row["pad_after_sd"] == pytest.approx(0.2)
    assert row["pad_after_range"] == [0.0, 0.4]


def test_scan_checks_shapes():
    with pytest.raises(ValueError, match="same"):
        Scan(np.zeros((4, 4)), np.zeros((4, 5)), "bad")
