"""The tissue benchmark's summaries and its sweep figure, on made-up volumes (no simulation, no model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmark_scripts import load


def _script(name: str):
    return load("tissue", name)


@pytest.fixture(scope="module")
def bench():
    return _script("run")


def _results(n=9, subjects=2, methods=("unet", "unet-physics")):
    rng = np.random.default_rng(0)
    contrast = {"MPRAGE": list(np.linspace(0.9, 0.5, n)), "SPGR": list(np.linspace(-0.03, 0.3, n))}
    per, summary = {}, {}
    for m in methods:
        per[m], summary[m] = {}, {}
        for f in ("MPRAGE", "SPGR"):
            vols = {t: [list(1000 * (1 + 0.01 * rng.standard_normal(n))) for _ in range(subjects)] for t in ("GM", "WM")}
            per[m][f] = {"volumes": vols}
            summary[m][f] = {"cov": {t: float(np.mean([np.std(v) / np.mean(v) for v in vols[t]])) for t in vols}}
    return {"settings": {"points": n}, "subjects": [f"anat-{k}" for k in range(subjects)], "per_subject": per,
            "summary": summary, "wm_gm_contrast": contrast}


def test_cov_where_keeps_only_the_chosen_acquisitions(bench):
    volumes = {"GM": [[1.0, 1.0, 5.0], [2.0, 2.0, 9.0]], "WM": [[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]]}
    keep = np.array([True, True, False])
    out = bench.cov_where(volumes, keep)
    assert out["GM"] == pytest.approx(0.0)
    assert out["WM"] == pytest.approx(np.mean([np.std([1.0, 2.0]) / 1.5, 0.0]))
    assert bench.cov_where(None, keep) == {} and bench.cov_where(volumes, np.array([True, False, False])) == {}


def test_thick_slices_average_axial_slabs_and_keep_partial_volume(bench):
    """--slices: a 2D acquisition's slab is the mean of the simulated slices it covers, so a boundary
    inside a slab becomes partial volume, and the slab count follows the thickness."""
    a = np.zeros((2, 2, 7), np.float32)
    a[..., 4:] = 1.0  # an edge between simulated slices 3 and 4
    thick = bench.slab_mean(a, 3)
    assert thick.shape == (2, 2, 2)  # the seventh slice does not fill a slab
    np.testing.assert_allclose(thick[0, 0], [0.0, 2 / 3])
    assert bench.slab_mean(a, 1) is a

    class Args:
        resolution, slices = 1.0, 3.0
    assert bench.slice_factor(Args) == 3
    Args.slices = 2.5
    with pytest.raises(SystemExit, match="not a multiple"):
        bench.slice_factor(Args)
    Args.slices = None
    assert bench.slice_factor(Args) == 1


def test_sweep_figure_is_written_for_methods_with_volumes(bench, tmp_path):
    out = _results()
    out["per_subject"]["atropos"] = {f: {} for f in ("MPRAGE", "SPGR")}  # reused without volumes: left out
    png = bench.plot_sweeps(out, tmp_path / "tissue.png")
    assert png == tmp_path / "tissue.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out["per_subject"] = {"atropos": out["per_subject"]["atropos"]}
    assert bench.plot_sweeps(out, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_low_contrast_table_lists_the_least_contrasted_settings_first(bench, tmp_path, capsys):
    out = _results(n=9, subjects=2)
    vols = out["per_subject"]["unet"]["SPGR"]["volumes"]["WM"]
    for v in vols:
        v[:] = [1000.0] * 9
        v[0] = 800.0  # the inverted setting (WM/GM 0.97) loses a fifth of its WM
    out["per_subject"]["atropos"] = {f: {} for f in ("MPRAGE", "SPGR")}  # no volumes: left out
    table = bench.low_contrast_table(out, n=3)
    assert table["wm_gm_ratio"] == pytest.approx([0.97, 0.97 + 0.33 / 8, 0.97 + 0.66 / 8])
    assert set(table) == {"wm_gm_ratio", "unet", "unet-physics"}
    assert table["unet"]["WM"] == pytest.approx([-20.0, 0.0, 0.0])
    for m in out["summary"].values():
        for f in m.values():
            f["dice"] = {"GM": [0.9, 0.01], "WM": [0.95, 0.01]}
    path = tmp_path / "result.json"
    path.write_text(__import__("json").dumps(out))
    assert bench.main(["--tables-from", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "Table 2 - coefficient of variation" in printed and "least GM/WM contrast" in printed
    assert "0.970" in printed and "-20.0" in printed
    (tmp_path / "timing.json").write_text('{"timing": {}}')
    assert bench.main(["--tables-from", str(tmp_path / "timing.json")]) == 2
    assert "no sweep results" in capsys.readouterr().err


def test_bridging_result_goes_into_the_physics_card_beside_its_other_metrics(tmp_path):
    import shutil

    from bidsapp.models import registry, tissue

    mod = _script("bridging")
    for f in registry.WEIGHTS_DIR.glob(f"{tissue.PHYSICS_MODEL}.*"):
        shutil.copy(f, tmp_path / f.name)
    before = registry.load_card(tissue.PHYSICS_MODEL, tmp_path)
    out = {"subjects": ["a#0", "a#1"], "train": [0], "test": [1], "optimum_ti_s": [0.8, 1.1],
           "mean_abs_diff_pct": {"unet-physics physics-bridge": {"GM": 1.0, "WM": 0.5, "mean": 0.75}}, "seconds": 3.0}
    mod.update_card(out, ["--points", "5"], tmp_path)
    card = registry.load_card(tissue.PHYSICS_MODEL, tmp_path)
    bridging = card["metrics"]["protocol_bridging"]
    assert bridging["benchmark"] == "python benchmarks/tissue/bridging.py --points 5"
    assert bridging["optimum_ti_s"] == [0.8, 1.1] and "seconds" not in bridging
    assert card["metrics"]["volume_cov"] == before["metrics"]["volume_cov"]
    assert card["sha256"] == before["sha256"]


def test_vector_swap_separates_what_the_vector_does_from_what_the_image_does():
    mod = _script("vector_swap")
    contrast = [0.2, -0.03, 0.1, 0.3, 0.05, 0.29]
    assert mod.chosen_settings(contrast, 3) == [1, 2, 0, 3]
    assert mod.chosen_settings([0.1, 0.1, 0.1], 2) == [0, 1, 2]  # ties: distinct settings
    # a toy segmenter: the image sets the WM/GM split, the vector adds GM at the expense of CSF
    images = [np.array([3, 3, 2, 2, 2, 1, 1, 1, 1, 1]), np.array([3, 3, 3, 2, 2, 1, 1, 1, 1, 1])]

    def segment(img, vec):
        seg = img.copy()
        seg[np.flatnonzero(seg == 1)[:vec]] = 2
        return seg

    table = mod.swap_table(images, [0, 2], segment)
    np.testing.assert_array_equal(table["GM"], [[3, 5], [2, 4]])
    np.testing.assert_array_equal(table["WM"], [[2, 2], [3, 3]])
    gm, wm = mod.spreads(table["GM"]), mod.spreads(table["WM"])
    assert gm["vector_effect"] == pytest.approx([2 / 4, 2 / 3]) and wm["vector_effect"] == [0.0, 0.0]
    assert gm["acquisition_effect"] == pytest.approx(1 / 3.5) and wm["acquisition_effect"] == pytest.approx(0.4)


def test_training_speed_benchmark_times_both_samplings_on_the_same_subjects(capsys):
    from synthetic import tiny_tissue_subject


    from bidsapp.training import tissue_data as D

    bench = _script("train_speed")
    rows = bench.measure([tiny_tissue_subject(seed=k) for k in range(2)], repeats=2, iterations=2, threads=1, patch=16,
                         features=(4, 8), batches=2)
    assert [r["sampling"] for r in rows] == list(D.SAMPLING)
    for r in rows:
        assert len(r["runs"]["batch_s"]) == len(r["runs"]["iteration_s"]) == 2
        assert r["iteration_min_s"] == round(min(r["runs"]["iteration_s"]), 3) and r["batch_median_s"] > 0
    assert capsys.readouterr().out.count("repeat 2:") == 2


FAKE_SAMSEG = '''#!{python}
"""Stands in for SAMSEG's run_samseg: writes the truth as FreeSurfer labels (cortex 3, WM 2, CSF 24)."""
import sys, pathlib
import nibabel as nib, numpy as np
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
truth = nib.load({truth!r})
lab = np.asarray(truth.dataobj)
fs = np.select([lab == 1, lab == 2, lab == 3], [24, 3, 2], 0).astype(np.int32)
out = pathlib.Path(args["--output"]); out.mkdir(parents=True)
nib.save(nib.MGHImage(fs, truth.affine), str(out / "seg.mgz"))
'''


def test_real_scan_benchmark_compares_methods_on_one_mask(tmp_path, capsys):
    """benchmarks/tissue/real.py end to end on a small simulated head, with a stand-in SAMSEG that
    returns the truth: its labels map to CSF/GM/WM and are counted in the app's mask; the table, JSON
    and overlay are written, and a second run reads SAMSEG's cached result."""
    import json
    import sys

    from synthetic import make_session

    real = _script("real")
    ses = make_session(tmp_path / "ds", flair=False)
    fake = tmp_path / "run_samseg"
    fake.write_text(FAKE_SAMSEG.format(python=sys.executable, truth=str(ses["T1w_dseg"])))
    fake.chmod(0o755)
    out = tmp_path / "out"
    assert real.main(["--images", str(ses["T1w"]), "--samseg", str(fake), "--out", str(out), "--threads", "1"]) == 0
    row = json.loads((out / "real.json").read_text())["shipped"][0]
    vols = row["volumes"]
    assert set(vols) == {"unet", "unet-network", "atropos", "samseg"}
    assert vols["samseg"]["GM_vs_samseg_pct"] == 0.0
    import nibabel as nib

    truth = np.asarray(nib.load(str(ses["T1w_dseg"])).dataobj)
    vox_ml = float(np.prod(nib.load(str(ses["T1w_dseg"])).header.get_zooms()[:3])) / 1000
    assert vols["samseg"]["GM"] == pytest.approx((truth == 2).sum() * vox_ml, rel=0.15)  # inside the app's mask
    assert Path(row["figure"]).stat().st_size > 10_000
    where = row["where_samseg_labels"]  # the stand-in labels only the truth's tissue: the rim is left out
    assert where["samseg"]["GM_vs_samseg_pct"] == 0.0
    total = {m: where[m]["CSF"] + where[m]["GM"] + where[m]["WM"] for m in where}
    assert total["unet"] == pytest.approx(total["samseg"], rel=1e-3)
    assert row["samseg_unlabelled_ml"] == pytest.approx(
        vols["unet"]["CSF"] + vols["unet"]["GM"] + vols["unet"]["WM"] - total["unet"], rel=1e-3)
    printed = capsys.readouterr().out
    assert "GM/WM" in printed and "where SAMSEG labels tissue" in printed
    fake.unlink()  # cached: no SAMSEG needed for a rerun with other weights
    assert real.main(["--images", str(ses["T1w"]), "--out", str(out), "--tag", "again", "--threads", "1"]) == 0
    assert "samseg" in json.loads((out / "real.json").read_text())["again"][0]["volumes"]
    lut = real.freesurfer_to_tissue(np.array([0, 2, 3, 4, 10, 24, 41, 42, 502]))
    assert lut.tolist() == [0, 3, 2, 1, 2, 1, 3, 2, 0]


def test_full_heads_slabs_average_axial_slices_in_place_and_score_inside_the_mask():
    """full_heads.py: thick slices average along the image's S-I axis whatever its voxel order, keep
    each slab where its slices were, and the truth is summed inside the mask on the image's grid."""
    import nibabel as nib

    fh = _script("full_heads")
    data = np.arange(4 * 6 * 5, dtype=np.float32).reshape(4, 6, 5)
    lia = np.array([[-1.0, 0, 0, 10], [0, 0, 1, -20], [0, -1, 0, 30], [0, 0, 0, 1]])  # voxel axes L, I, A
    thick = fh.axial_slabs(nib.Nifti1Image(data, lia), 3)
    assert thick.shape == (4, 2, 5)  # the second axis (I) holds the slices: 6 -> 2
    np.testing.assert_allclose(np.asarray(thick.dataobj)[:, 0], data[:, :3].mean(1))
    centre = thick.affine @ [0, 0, 0, 1]
    np.testing.assert_allclose(centre[:3], (lia @ [0, 1, 0, 1])[:3])  # the middle of slices 0-2
    assert nib.aff2axcodes(thick.affine) == ("L", "I", "A")
    frac = nib.Nifti1Image(np.full((4, 6, 5), 0.5, np.float32), lia)
    mask = np.zeros((4, 6, 5), bool)
    mask[:2] = True
    vols = fh.truth_in_mask({"GM": frac}, nib.Nifti1Image(data, lia), mask)
    assert vols["GM"] == pytest.approx(0.5 * mask.sum() / 1000) and vols["GM_all"] == pytest.approx(0.5 * 120 / 1000)
    rows = [{"session": f"sub-01_ses-{i}", "app_ml": {"GM": g, "WM": 100.0}} for i, g in ((1, 50.0), (2, 55.0))]
    assert fh.between_sessions(rows)["sub-01"] == pytest.approx({"GM": 10.0, "WM": 0.0})
