"""The real-head change benchmark's known answers: injected atrophy scales the brain by exactly the
stated loss and leaves the skull in place; a pseudo-rescan moves the head without changing it."""

from __future__ import annotations

import numpy as np
import pytest

from benchmark_scripts import load
from bidsapp.physics.atrophy import warp_atrophy


@pytest.fixture(scope="module")
def bench():
    return load("longitudinal", "real_heads")


def _head(shape=(72, 72, 40), zooms=(1.5, 1.5, 3.0)):
    """A smooth-edged 'brain' ellipsoid (100) inside a 'skull' shell (60) 15 mm away, on 2D-scan voxels;
    also the radius map (1 at the brain's edge)."""
    from scipy import ndimage as ndi

    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = [-30.0, 10.0, 5.0]
    xyz = (np.indices(shape).T * np.asarray(zooms)).T
    centre = (np.asarray(shape) - 1) * np.asarray(zooms) / 2
    r = np.sqrt(sum(((xyz[i] - centre[i]) / a) ** 2 for i, a in enumerate((35.0, 40.0, 42.0))))
    skull = (r > 1.45) & (r <= 1.6)
    data = np.where(r <= 1.0, 100.0, np.where(skull, 60.0, 0.0)).astype(np.float32)
    data = ndi.gaussian_filter(data, sigma=1.5 / np.asarray(zooms)).astype(np.float32)
    return data, affine, r <= 1.0, r


def _content(x, r, zooms):
    """Brain volume (ml) as the integral of the intensity inside the skull (partial volume counted)."""
    return float(x[r < 1.28].sum() / 100.0 * np.prod(zooms) / 1000.0)


@pytest.mark.parametrize("loss", [1.0, 3.0])
def test_injected_atrophy_removes_the_stated_share_of_the_brain_and_keeps_the_skull(bench, loss):
    data, affine, brain, r = _head()
    zooms = np.diag(affine)[:3]
    # the region handed over must hold the brain's blurred edge (3 mm here) within its 1 mm margin
    out = warp_atrophy(data, affine, r <= 1.08, loss)
    change = 100 * (_content(out, r, zooms) / _content(data, r, zooms) - 1)
    assert change == pytest.approx(-loss, abs=0.05)
    skull = (r > 1.5) & (r < 1.55)
    assert np.abs(out[skull] - data[skull]).max() < 0.5  # the skull does not move


def test_pseudo_rescan_moves_the_head_but_keeps_its_volume(bench, monkeypatch):
    data, affine, brain, r = _head()
    zooms = np.diag(affine)[:3]
    noisy = bench.reimage(data, affine, brain, np.random.default_rng(0))
    gap = (r > 1.3) & (r < 1.4)
    assert noisy[gap].std() > 1.0  # new noise where there was none
    monkeypatch.setattr(bench, "NOISE", 0.0)
    moved = bench.reimage(data, affine, brain, np.random.default_rng(0))
    assert np.abs(moved - data).max() > 20  # the head moved
    assert _content(moved, r, zooms) == pytest.approx(_content(data, r, zooms), rel=0.002)


def test_true_change_of_each_pair(bench):
    assert bench.true_change(2.0, "ses-1", "ses-2") == 0.0
    assert bench.true_change(2.0, "ses-1", "ses-3") == -2.0
    assert bench.true_change(2.0, "ses-2", "ses-3") == -2.0
    assert bench.true_change(2.0, "ses-3", "ses-2") == pytest.approx(100 * (1 / 0.98 - 1))


def test_sources_names_each_clinical_scan_and_adds_the_registry_head(bench, tmp_path, monkeypatch):
    anat = tmp_path / "bids" / "sub-ms19" / "ses-2" / "anat"
    anat.mkdir(parents=True)
    (anat / "sub-ms19_ses-2_T1w.nii.gz").write_bytes(b"")
    (anat / "sub-ms19_ses-2_FLAIR.nii.gz").write_bytes(b"")
    colin = tmp_path / "colin27_T1w.nii.gz"
    monkeypatch.setattr(bench, "registry_t1w", lambda log: [("colin27", colin)])
    assert bench.sources(tmp_path) == [("ms19s2", anat / "sub-ms19_ses-2_T1w.nii.gz"), ("colin27", colin)]
    assert [s for s, _ in bench.sources(tmp_path, registry=False)] == ["ms19s2"]

    monkeypatch.setattr(bench, "registry_t1w", lambda log: log("no network") or [])
    assert [s for s, _ in bench.sources(tmp_path)] == ["ms19s2"]


def test_compare_and_summarise_read_change_and_decline_tables(bench, tmp_path):
    import pandas as pd

    out, sub = tmp_path, "sub-colin27"
    for ses, gm in (("ses-1", 600.0), ("ses-2", 600.0), ("ses-3", 594.0)):
        d = out / sub / ses / "anat"
        d.mkdir(parents=True)
        (d / f"{sub}_{ses}_desc-volumes_morph.tsv").write_text(
            f"method\tlabel\tvolume_mm3\nunet\tGM\t{gm}\nunet\tWM\t400\nunet\tCSF\t300\n")
    change = "measure\tses_from\tses_to\tpercent_change\tpercent_change_raw\n" + "".join(
        f"{m}\t{a}\t{b}\t{v}\t{v}\n" for m in ("brain", "GM", "WM")
        for a, b, v in (("ses-1", "ses-2", 0.1), ("ses-2", "ses-3", -0.8), ("ses-1", "ses-3", -0.7)))
    (out / sub / "anat").mkdir()
    (out / sub / "anat" / f"{sub}_desc-change_morph.tsv").write_text(change)
    (out / sub / "anat" / f"{sub}_desc-decline_stats.tsv").write_text(
        "ses_from\tses_to\tinterval_days\tacquisition_changed\tprobability_decline\tcall\n"
        "ses-1\tses-2\tn/a\tn/a\t0.1\tstable\nses-2\tses-3\tn/a\tn/a\t0.7\tdecline\n")
    df = bench.compare(out, pd.DataFrame({"participant_id": [sub], "loss_percent": [1.0]}))
    brain = df[df.measure == "brain"].set_index("pair")
    assert brain.loc["ses-2>ses-3", "probability_decline"] == 0.7
    assert np.isnan(brain.loc["ses-1>ses-3", "probability_decline"])  # not a consecutive pair
    rows = {(r["kind"], r["measure"]): r for r in bench.summarise(df)}
    atrophy = rows[("atrophy", "brain")]
    assert atrophy["decline_pairs"] == 1 and atrophy["decline_called"] == 1
    assert atrophy["median_ratio_measured"] == pytest.approx(0.75)
    assert rows[("rescan", "brain")]["decline_called"] == 0
    assert "decline_pairs" not in rows[("atrophy", "GM")]
