"""The lesion benchmarks' helpers on made-up numbers: WMH (PCD, bins, summaries, the target check, Fig. 5,
the threshold sweep), the MS benchmark's pairing with BM and its scoring at several mask thresholds, and the
clinical benchmark's lesion-mask discovery and threshold cuts on fake files (no simulation, no model)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmark_scripts import load


def _script(name: str):
    return load("lesion", name)


@pytest.fixture(scope="module")
def wmh():
    return _script("wmh")


def _rows(dice, ltpr, n=4, hd95=5.0):
    return [{"dice": dice, "hd95": hd95, "avd": 10.0 * (k + 1), "ltpr": ltpr, "lesion_f1": 0.5, "pcd": 0.02 * k,
             "seconds": 1.0} for k in range(n)]


def test_pcd_and_bins(wmh):
    truth = np.zeros((10, 10, 10), bool)
    truth[:2, :5] = True                                   # 100 of 1000 voxels
    assert wmh.pcd(truth) == pytest.approx(10.0)
    assert list(wmh.pcd_bins([0.0, 0.029, 0.03, 0.149, 0.2, 0.59, 7.0])) == [0, 0, 1, 4, 5, 6, 10]
    assert wmh.bin_label(0) == "0-0.03" and wmh.bin_label(10) == ">= 4.8"
    bins = wmh.binned_avd([{"pcd": 0.01, "avd": 10.0}, {"pcd": 0.02, "avd": 30.0}, {"pcd": 0.5, "avd": 100.0},
                           {"pcd": 0.7, "avd": float("nan")}])
    assert [(b["label"], b["avd"], b["n"]) for b in bins] == [("0-0.03", 20.0, 2), ("0.3-0.6", 100.0, 1)]


def test_summary_counts_infinite_hd95(wmh):
    rows = _rows(0.5, 0.4) + _rows(0.0, 0.0, n=1, hd95=float("inf"))
    s = wmh.summarise(rows)
    assert s["n"] == 5 and s["hd95_inf"] == 1
    assert s["hd95"] == {"mean": 5.0, "sd": 0.0, "n": 4}
    assert s["dice"]["mean"] == pytest.approx(0.4)


def test_target_check(wmh):
    ood = {k: wmh.summarise(_rows(d, r)) for k, (d, r) in
           {"content": (0.5, 0.8), "dice": (0.45, 0.5), "tversky": (0.55, 0.4), "gdice": (0.4, 0.6)}.items()}
    check = wmh.target_check(ood)
    assert check["dice"]["pass"] is False and check["dice"]["best_other_loss"] == "tversky"
    assert check["ltpr"]["pass"] is True and check["ltpr"]["best_other"] == pytest.approx(0.6)
    assert wmh.target_check({"content": ood["content"]}) is None
    assert all(c["pass"] for c in wmh.paper_target().values())      # the paper's CAIN rows meet it
    lines = wmh.table("ood", {"content": {"ood": {"summary": ood["content"]}}}, {"n_scanners": 1, "n_heads": 4})
    assert any(line.startswith("content (ours)") for line in lines)
    assert sum("(paper)" in line for line in lines) == 4


def test_fig5_and_json(wmh, tmp_path):
    res = {k: {"ood": {"sessions": [{"pcd": p, "avd": a} for p, a in ((0.01, 50.0), (0.2, 120.0), (1.0, 30.0))]}}
           for k in ("content", "dice")}
    path = wmh.plot_avd_pcd(res, tmp_path / "fig.png")
    assert path.is_file() and path.stat().st_size > 5000
    assert json.loads(json.dumps(wmh._jsonable({"a": [float("inf"), np.float32(1.5)]}))) == {"a": [None, 1.5]}


def test_recorded_variants_join_only_when_measured_on_the_same_sets(wmh, tmp_path):
    sets = {w: {"scanners": ["3.0T FLAIR"], "heads": ["anat-10"], "grades": [1], "pcd": [0.02]} for w in ("in", "ood")}
    summary = {w: {"summary": wmh.summarise(_rows(0.4, 0.5)), "sessions": _rows(0.4, 0.5)} for w in ("in", "ood")}
    earlier = {"sets": sets, "results": {"dice": summary, "content": summary},
               "models": {"dice": {"sha256": "ab" * 32}, "content": {"sha256": "cd" * 32}}}
    path = tmp_path / "wmh_dice.json"
    path.write_text(json.dumps(earlier))
    now = {"sets": json.loads(json.dumps(sets)), "results": {"content": {"in": {}, "ood": {}}}, "models": {"content": {}}}
    wmh.merge_recorded(now, path)
    assert set(now["results"]) == {"content", "dice"} and now["results"]["content"] == {"in": {}, "ood": {}}
    assert now["models"]["dice"]["recorded"] == str(path)
    other = {"sets": {**sets, "ood": {**sets["ood"], "heads": ["anat-11"]}}, "results": {}, "models": {}}
    wmh.merge_recorded(other, path)
    assert other["results"] == {}


def test_clinical_lesion_masks(tmp_path):
    clinical = _script("clinical")
    known = {"lesion", "wmh"}
    anat = tmp_path / "sub-ms01" / "ses-1" / "anat"
    anat.mkdir(parents=True)
    names = ["sub-ms01_ses-1_desc-brain_mask.nii.gz", "sub-ms01_ses-1_desc-lesion_mask.nii.gz",
             "sub-ms01_ses-1_desc-wmh_mask.nii.gz", "sub-ms01_ses-1_desc-lesionwmh_mask.nii.gz",
             "sub-ms01_ses-1_space-FLAIR_desc-lesion_mask.nii.gz", "sub-ms01_ses-1_desc-other_mask.nii.gz"]
    for n in names:
        (anat / n).touch()
    kinds = {n: clinical.mask_method(anat / n, known) for n in names}
    assert kinds[names[0]] is None and kinds[names[5]] is None
    assert kinds[names[1]] == {"desc": "lesion", "method": "lesion", "main": True, "space": None}
    assert kinds[names[2]]["method"] == "wmh" and not kinds[names[2]]["main"]
    assert kinds[names[3]]["method"] == "wmh"
    assert kinds[names[4]]["space"] == "FLAIR"
    # a session where WMH is the main lesion answer: desc-lesion, the sidecar names the method
    (anat / "sub-ms01_ses-1_desc-lesion_mask.json").write_text(json.dumps({"Method": "wmh", "LesionCount": 3,
                                                                           "LesionVolume_mm3": 1500.0}))
    assert clinical.mask_method(anat / names[1], known)["method"] == "wmh"
    case = {"mask": anat / names[1], "volumes": anat / "sub-ms01_ses-1_desc-volumes_morph.tsv", "method": "wmh"}
    assert clinical.method_volume(case) == (1.5, 3)                   # no table: the sidecar
    case["volumes"].write_text("method\tlabel\tvolume_mm3\tcount\nlesion\tlesion\t2000\t4\nwmh\tlesion\t2500\t6\n")
    assert clinical.method_volume(case) == (2.5, 6)
    assert clinical.method_volume(case | {"method": "lesion"}) == (2.0, 4)


def test_paired_differences_match_sessions_and_bound_the_lead(wmh):
    def sessions(dice):
        return [{"head": f"anat-{10 + k % 3}", "scanner": f"scanner {k // 3}", "grade": 1 + k % 3, "dice": d,
                 "ltpr": 0.5} for k, d in enumerate(dice)]

    content = sessions([0.6, 0.5, 0.7, 0.4, 0.65, 0.55])
    other = sessions([0.5, 0.45, 0.6, 0.35, 0.6, 0.5])[::-1]          # same sessions, another order
    res = {"content": {"ood": {"sessions": content}}, "dice": {"ood": {"sessions": other}}}
    p = wmh.paired_differences(res)["dice"]
    assert p["dice"]["n"] == 6 and p["dice"]["content_ahead"] == 6
    assert p["dice"]["mean"] == pytest.approx(0.0667, abs=1e-3)
    lo, hi = p["dice"]["ci95"]
    assert 0 < lo < p["dice"]["mean"] < hi                             # ahead on every session: excludes 0
    assert p["ltpr"]["mean"] == 0 and p["ltpr"]["ci95"] is None        # no spread, no interval
    mixed = sessions([0.9, 0.1, 0.9, 0.1, 0.9, 0.1])
    q = wmh.paired_differences({"content": {"ood": {"sessions": mixed}},
                                "dice": {"ood": {"sessions": sessions([0.5] * 6)}}})["dice"]["dice"]
    assert q["ci95"][0] < 0 < q["ci95"][1] and q["content_ahead"] == 3
    assert any("content - dice" in line for line in wmh.paired_lines({"dice": p}))
    assert wmh.paired_differences({"dice": {"ood": {"sessions": other}}}) == {}


def test_the_ms_lesion_benchmark_pairs_every_model_with_bm_on_the_same_sessions():
    run = _script("run")
    rows = lambda dice: [{"head": h, "scanner": s, "subset": "all", "dice": dice + 0.01 * s, "ltpr": 0.5,  # noqa: E731
                          "lfpr": 0.3, "ppv": 0.6} for h in ("anat-10", "anat-11") for s in range(3)]
    shipped = rows(0.70) + [dict(r, subset="FLAIR", dice=0.1) for r in rows(0.0)]
    result = {"ours": {"BM": {"sessions": rows(0.65)}, "pc": {"sessions": rows(0.60)[:4]}},
              "shipped": {"sessions": shipped}}
    p = run.paired_vs(result)
    assert set(p) == {"pc", "shipped"}
    assert p["shipped"]["dice"]["n"] == 6 and p["shipped"]["dice"]["mean"] == pytest.approx(0.05)
    assert p["pc"]["dice"]["n"] == 4 and p["pc"]["dice"]["ahead"] == 0 and p["pc"]["dice"]["ci95"] is None  # no spread
    assert p["shipped"]["ltpr"]["mean"] == 0.0
    assert run.paired_vs({"ours": {"pc": {"sessions": rows(0.6)}}, "shipped": {}}) == {}


def test_thresholds_cut_one_probability_and_the_summary_keeps_them_apart(monkeypatch):
    from bidsapp.models import lesion as L

    run = _script("run")
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


def test_clinical_check_cuts_the_written_probability_at_each_threshold(tmp_path):
    import ants
    import nibabel as nib

    clin = _script("clinical")
    anat = tmp_path / "sub-ms01" / "ses-2" / "anat"
    anat.mkdir(parents=True)
    main = anat / "sub-ms01_ses-2_desc-lesion_mask.nii.gz"
    wmh_mask = anat / "sub-ms01_ses-2_desc-wmh_mask.nii.gz"
    wmh_prob = anat / "sub-ms01_ses-2_label-lesion_desc-wmh_probseg.nii.gz"
    g = np.arange(24) - 12
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    r = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    prob = np.where(r < 4, 0.8, np.where(r < 6, 0.45, 0.0)).astype(np.float32)
    nib.save(nib.Nifti1Image(prob, np.eye(4)), anat / "sub-ms01_ses-2_label-lesion_probseg.nii.gz")
    nib.save(nib.Nifti1Image((prob >= 0.5).astype(np.uint8), np.eye(4)), main)
    nib.save(nib.Nifti1Image((prob >= 0.5).astype(np.uint8), np.eye(4)), wmh_mask)
    assert clin.written_probseg(tmp_path, main).name == "sub-ms01_ses-2_label-lesion_probseg.nii.gz"
    assert clin.written_probseg(tmp_path, wmh_mask) is None  # no probability written beside it
    nib.save(nib.Nifti1Image(prob, np.eye(4)), wmh_prob)
    assert clin.written_probseg(tmp_path, wmh_mask) == wmh_prob
    change = tmp_path / "change.nii.gz"
    nib.save(nib.Nifti1Image((r < 6).astype(np.uint8), np.eye(4)), change)
    xfm = tmp_path / "identity.mat"
    ants.write_transform(ants.create_ants_transform(transform_type="AffineTransform", dimension=3), str(xfm))
    case = {"mask": main, "probseg": clin.written_probseg(tmp_path, main), "chain": [(change, xfm)],
            "change": change}
    low, high = clin.at_thresholds(case, [0.4, 0.5])
    inner, outer = (r < 4).sum(), (r < 6).sum()
    assert low["threshold"] == 0.4 and low["change_covered"] == pytest.approx(1.0)
    assert high["change_covered"] == pytest.approx(inner / outer, abs=0.01)
    assert low["lesion_ml"] == pytest.approx(outer / 1000, abs=0.01) and high["lesion_ml"] == pytest.approx(inner / 1000, abs=0.01)
    assert clin.at_thresholds({**case, "probseg": None}, [0.5]) == []


def test_wmh_threshold_sweep_averages_each_cut_over_sessions(wmh):
    rows = [{"by_threshold": {"0.5": {"dice": d, "ltpr": 0.5, "lesion_f1": 0.4, "avd": 20.0, "volume_ratio": v},
                              "0.7": {"dice": d + 0.1, "ltpr": 0.4, "lesion_f1": 0.5, "avd": 10.0, "volume_ratio": None}}}
            for d, v in ((0.6, 1.2), (0.8, 1.6), (0.7, 0.9))]
    sweep = wmh.threshold_sweep(rows)
    assert list(sweep) == ["0.5", "0.7"]
    assert sweep["0.5"]["dice"] == pytest.approx(0.7) and sweep["0.5"]["volume_ratio_median"] == pytest.approx(1.2)
    assert sweep["0.7"]["dice"] == pytest.approx(0.8) and sweep["0.7"]["volume_ratio_median"] is None
    assert wmh.threshold_sweep([]) == {} and wmh.threshold_sweep([{"dice": 0.5}]) == {}


def test_wmh_benchmark_scores_each_cut_of_one_probability(wmh, monkeypatch):
    from bidsapp.metrics import lesions as M
    from bidsapp.models import lesion as L
    from bidsapp.models import wmh as W

    g = np.arange(32) - 16
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    r = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    truth = r < 5
    prob = np.where(truth, 0.8, np.where(r < 7, 0.55, 0.0)).astype(np.float32)  # a 2 mm rim at 0.55

    def fake_segment(flair, brain, affine, zooms, device="cpu", weights_dir=None, threshold=None):
        return L.LesionResult(probability=prob, mask=prob >= 0.5, context={}, contrasts=("FLAIR",), threshold=0.5)

    scored = []
    real_scores = M.lesion_scores

    def counting_scores(pred, *args, **kwargs):
        scored.append(int(np.asarray(pred).sum()))
        return real_scores(pred, *args, **kwargs)

    monkeypatch.setattr(W, "segment", fake_segment)
    monkeypatch.setattr(M, "lesion_scores", counting_scores)
    session = {"set": "in", "head": "anat-10", "scanner": 0, "describe": "FLAIR", "grade": 1, "pcd": 0.1,
               "flair": prob, "brain": r < 14, "affine": np.eye(4), "zooms": (1.0, 1.0, 1.0), "lesion": truth}
    row = wmh.evaluate(None, [session], progress=lambda m: None, thresholds=[0.5, 0.6])[0]
    assert len(scored) == 2  # the app's own cut (0.5) is scored once, 0.6 once more
    assert row["by_threshold"]["0.5"]["dice"] == pytest.approx(row["dice"]) and row["dice"] < 1.0
    assert row["by_threshold"]["0.6"]["dice"] == pytest.approx(1.0)
    assert row["by_threshold"]["0.6"]["volume_ratio"] == pytest.approx(1.0)
    assert row["by_threshold"]["0.5"]["volume_ratio"] > 2


def test_weights_alone_evaluate_only_those_weights(wmh):
    assert wmh.chosen_models(None, {"content": "run/weights"}, False) == {"content": "run/weights"}
    assert wmh.chosen_models(None, {}, False) == {k: None for k in wmh.LOSSES}  # all four, trained
    assert wmh.chosen_models(["content", "dice"], {"content": "w"}, False) == {"content": "w", "dice": None}
    assert wmh.chosen_models(None, {"dice": "w"}, True) == {"content": None}
