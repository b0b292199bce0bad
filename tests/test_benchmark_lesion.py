"""benchmarks/lesion/run.py: one probability map scored at several mask thresholds."""

from __future__ import annotations

import numpy as np
import pytest

from benchmark_scripts import load


def test_thresholds_cut_one_probability_and_the_summary_keeps_them_apart(monkeypatch):
    from bidsapp.models import lesion as L

    run = load("lesion", "run")
    g = np.arange(32) - 16
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    r = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    truth = r < 5
    prob = np.where(truth, 0.8, np.where(r < 7, 0.55, 0.0)).astype(np.float32)  # a 2 mm rim at 0.55
    calls = []

    def fake_segment(images, brain, affine, zooms, device="cpu", weights_dir=None, threshold=None):
        calls.append(1)
        return L.LesionResult(probability=prob, mask=prob >= 0.5, context={}, contrasts=("FLAIR",))

    monkeypatch.setattr(L, "segment", fake_segment)
    sessions = [{"head": "anat-10", "scanner": 0, "subset": "all", "images": {}, "brain": truth, "lesion": truth}]
    rows = run.evaluate(None, sessions, [0.5, 0.6])
    assert len(calls) == 1 and [r["threshold"] for r in rows] == [0.5, 0.6]
    at_05, at_06 = run.summary(rows, "all", 0.5), run.summary(rows, "all", 0.6)
    assert at_06["dice"] == pytest.approx(1.0) and at_05["dice"] < 0.8
    assert at_05["volume_ratio_median"] > 2 and at_06["volume_ratio_median"] == pytest.approx(1.0)
    assert run.summary(rows, "all") == at_05  # the app's threshold by default
    result = {"ours": {"BM": {"sessions": [dict(rows[1])]}}, "shipped": {"sessions": rows}}
    paired = run.paired_vs(result)
    assert paired["shipped"]["dice"]["n"] == 1  # only the app's threshold is paired with BM
