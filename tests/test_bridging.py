"""Protocol-change bridging on small synthetic tables (no images, no model)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from bidsapp.harmonize import bridging
from bidsapp.reports.harmonization import render


def _curves(n=8, grid=np.linspace(0.6, 1.2, 13), shift=0.2, seed=0):
    """GM/WM volume curves of a fake model whose volume depends on (true TI - assumed TI).

    Pre-change images were acquired at TI 0.8, post-change at 1.0; volumes agree whenever both
    images are given the same offset from their true TI, i.e. on the line post = pre + 0.2.
    """
    rng = np.random.default_rng(seed)
    base = rng.uniform([550e3, 450e3], [700e3, 550e3], size=(n, 2))
    def vols(true_ti):
        d = grid[None, :, None] - true_ti
        return base[:, None, :] * np.exp(0.3 * d)
    return grid, vols(0.8), vols(0.8 + shift)


def test_percent_difference():
    np.testing.assert_allclose(bridging.percent_difference([100, 0], [110, 0]), [100 * 10 / 105, 0])


def test_bridge_finds_the_true_pair_and_bridges_test_subjects():
    grid, pre, post = _curves()
    res = bridging.bridge_from_curves(pre, post, train=range(5), test=[5, 6, 7])
    assert grid[res.best[1]] - grid[res.best[0]] == pytest.approx(0.2)
    assert res.surface.shape == (2, 13, 13)
    assert res.test_pct.shape == (3, 2)
    assert res.test_pct.max() < 1e-9
    assert all(grid[b] - grid[a] == pytest.approx(0.2) for a, b in res.test_best)
    # without bridging (same assumed TI for both) the volumes differ
    same = bridging.percent_difference(pre[:, 4], post[:, 4])
    assert same.mean() > 1.0


def test_linear_bridge_removes_a_linear_protocol_effect():
    rng = np.random.default_rng(1)
    pre = rng.uniform(400e3, 700e3, size=(10, 2))
    post = 1.05 * pre + 10e3
    unc = bridging.percent_difference(pre[6:], post[6:]).mean()
    lin = bridging.linear_bridge(pre, post, train=range(6), test=range(6, 10))
    assert unc > 4 and lin.max() < 1e-6
    one = bridging.linear_bridge(pre, 1.05 * pre, train=[0], test=[1, 2])  # ratio with one subject
    assert one.max() < 1e-6


@pytest.mark.parametrize("n, scheme, n_folds", [(8, "split", 1), (3, "leave-one-out", 3), (1, "training-only", 1)])
def test_split_subjects(n, scheme, n_folds):
    got, folds = bridging.split_subjects(n, seed=3)
    assert got == scheme and len(folds) == n_folds
    for train, test in folds:
        assert not set(train) & set(test)
        assert train
    if scheme == "split":
        assert len(folds[0][0]) == 5 and len(folds[0][1]) == 3
        assert folds == bridging.split_subjects(n, seed=3)[1]


def _acq_table():
    rows = []
    for i, (p1, p2) in enumerate([("A", "B"), ("A", "A"), ("A", "B")]):
        for ses, proto in (("ses-1", p1), ("ses-2", p2)):
            rows.append({"participant_id": f"sub-{i:02d}", "session_id": ses, "protocol": proto,
                         "acq_group": "siemens-x-3T-MPRAGE", "SequenceFamily": "MPRAGE",
                         "InversionTime": 0.8 if proto == "A" else 1.0})
    rows.append({"participant_id": "sub-09", "session_id": "n/a", "protocol": "A", "acq_group": "g",
                 "SequenceFamily": "MPRAGE", "InversionTime": 0.8})
    return pd.DataFrame(rows)


def test_find_protocol_changes():
    ch = bridging.find_protocol_changes(_acq_table())
    assert list(ch["participant_id"]) == ["sub-00", "sub-02"]
    assert list(ch["pre_session"]) == ["ses-1", "ses-1"] and list(ch["post_session"]) == ["ses-2", "ses-2"]
    assert bridging.find_protocol_changes(pd.DataFrame()).empty


def test_a_ti_change_on_the_same_scanner_is_a_protocol_change():
    """group_acquisitions.tsv keeps the scanner in acq_group and the sequence settings in protocol_key:
    the paper's case (same scanner, TI 900 -> 1100 ms) must be found."""
    rows = [{"participant_id": "sub-01", "session_id": ses, "suffix": "T1w", "acq_group": "siemens-prismafit-3T-MPRAGE",
             "protocol_key": f"siemens-prismafit-3T-MPRAGE-tr{tr}-te2.98-ti{ti}-fa9"}
            for ses, tr, ti in (("ses-1", 2300, 900), ("ses-2", 2500, 1100))]
    ch = bridging.find_protocol_changes(pd.DataFrame(rows))
    assert list(ch["participant_id"]) == ["sub-01"] and ch["post_protocol"].iloc[0].endswith("ti1100-fa9")


class _Ctx:
    def __init__(self, tmp_path, acquisitions, volumes=None):
        self.output_dir = tmp_path
        self.work_dir = tmp_path / "work"
        self.acquisitions = acquisitions
        self.volumes = volumes if volumes is not None else pd.DataFrame()
        self.participants = pd.DataFrame()
        self.options = {"bridging_points": 13, "device": "cpu", "seed": 0}
        self.logger = logging.getLogger("test")


def test_run_without_protocol_change_says_so(tmp_path):
    acq = _acq_table()
    acq["protocol"] = "A"
    sections = render(bridging.run(_Ctx(tmp_path, acq)))
    assert len(sections) == 1 and "no protocol change" in sections[0].body.lower()


def test_run_with_fake_sweeps_writes_tsv_and_contour(tmp_path, monkeypatch):
    grid, pre, post = _curves(n=2, grid=np.linspace(0.6, 1.2, 13))
    acq = _acq_table()
    curves = {("sub-00", "ses-1"): pre[0], ("sub-00", "ses-2"): post[0],
              ("sub-02", "ses-1"): pre[1], ("sub-02", "ses-2"): post[1]}

    def fake_images(output_dir, pid, ses):
        return (pid, ses), None

    def fake_sweep(key, _mask, acq_dict, parameter, g, device):
        assert parameter == "InversionTime" and len(g) == 13
        return curves[key]

    monkeypatch.setattr(bridging, "session_images", fake_images)
    monkeypatch.setattr(bridging, "_sweep", fake_sweep)
    vols = pd.DataFrame([{"participant_id": p, "session_id": s, "method": "atropos",
                          "GM": v[4, 0], "WM": v[4, 1]} for (p, s), v in curves.items()])
    sections = render(bridging.run(_Ctx(tmp_path, acq, vols)))
    assert len(sections) == 1 and "data:image/png;base64" in sections[0].body
    tsv = pd.read_csv(tmp_path / bridging.TSV_NAME, sep="\t")
    assert list(tsv.columns) == list(bridging.TSV_COLUMNS)
    phys = tsv[(tsv.correction == "physics-bridge") & (tsv.tissue == "mean")]["mean_abs_diff_pct"].item()
    unc = tsv[(tsv.correction == "uncorrected") & (tsv.tissue == "mean")]["mean_abs_diff_pct"].item()
    assert phys < 1e-6 < unc
    assert set(tsv["split"]) == {"leave-one-out"}


def test_sweep_runs_the_network_at_the_knots_and_interpolates_the_grid(tmp_path, monkeypatch):
    import nibabel as nib

    from bidsapp.models import tissue

    for name in ("t1", "mask"):
        nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), tmp_path / f"{name}.nii.gz")
    asked = []

    def network(image, mask, zooms, acq, parameter, values, device="auto"):
        asked.append(np.asarray(values))
        v = np.asarray(values, float)[:, None]
        # smooth, non-polynomial curves (CSF, GM, WM) like the model's
        return np.hstack([np.full_like(v, 1e5), 6e5 * (1 + 0.02 * np.sin(v / 20)), 5e5 * np.exp(-v / 400)])

    monkeypatch.setattr(tissue, "sweep_volumes", network)
    grid = np.linspace(15.0, 75.0, 25)
    curves = bridging._sweep(tmp_path / "t1.nii.gz", tmp_path / "mask.nii.gz", {}, "FlipAngle", grid, "cpu")
    assert len(asked) == 1 and len(asked[0]) == bridging.SWEEP_KNOTS
    assert asked[0][0] == grid[0] and asked[0][-1] == grid[-1]
    exact = network(None, None, None, None, None, grid)[:, [tissue.CLASSES.index(t) for t in bridging.BRIDGED]]
    assert curves.shape == (25, 2)
    np.testing.assert_allclose(curves, exact, rtol=2e-4)
    # a grid no finer than the knots is run as it is
    few = np.linspace(15.0, 75.0, 5)
    np.testing.assert_array_equal(bridging._sweep(tmp_path / "t1.nii.gz", tmp_path / "mask.nii.gz", {}, "FlipAngle",
                                                  few, "cpu"), network(None, None, None, None, None, few)[:, 1:])
    assert len(asked[-1]) == 5
