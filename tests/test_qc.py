"""Quality control: the measures on arrays of known quality, the verdicts (noise fails, phantoms are flagged,
simulated heads pass), the Nipype nodes, and a failed verdict failing the session and the run."""

from __future__ import annotations

import json
import math
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bidsapp import qc
from bidsapp.physics.simulator import add_rician_noise

ZOOMS = (3.0, 3.0, 3.0)


def _load(path):
    img = nib.load(str(path))
    return np.asarray(img.dataobj, np.float32), img.header.get_zooms()[:3], img


def _ellipsoid(shape, zooms, axes_mm):
    g = np.indices(shape).astype(float)
    c = (np.array(shape) - 1) / 2
    return np.sqrt(sum(((g[i] - c[i]) * zooms[i] / a) ** 2 for i, a in enumerate(axes_mm)))


# ------------------------------------------------------------------------------------------------ measures

def test_snr_of_an_object_in_rayleigh_air_is_signal_over_sigma():
    rng = np.random.default_rng(0)
    shape, sigma, signal = (64, 64, 64), 10.0, 400.0
    r = _ellipsoid(shape, ZOOMS, (70, 85, 75))
    img = add_rician_noise(np.where(r < 1, signal, 0.0).astype(np.float32), sigma, rng)
    m = qc.measures(img, r < 0.7, ZOOMS)
    assert m["snr"] == pytest.approx(signal / sigma, rel=0.1)
    assert m["head_present"] == 1 and m["head_contrast"] > 20
    assert m["fber"] > 100
    assert m["brain_volume_ml"] == pytest.approx((r < 0.7).sum() * 27 / 1000)


def test_cnr_and_cjv_of_known_tissue_distributions():
    rng = np.random.default_rng(1)
    gm, wm = rng.normal(100, 10, 200_000), rng.normal(130, 10, 200_000)
    assert qc.cnr(gm, wm) == pytest.approx(30 / math.sqrt(200), rel=0.02)
    assert qc.cjv(gm, wm) == pytest.approx(20 / 30, rel=0.02)
    assert math.isnan(qc.cnr(gm[:1], wm))


def test_fber_and_efc_of_pure_noise_and_of_a_uniform_image():
    rng = np.random.default_rng(2)
    noise = rng.rayleigh(10.0, 100_000)
    assert qc.fber(noise[:50_000], noise[50_000:]) == pytest.approx(1.0, abs=0.05)
    assert qc.efc(np.full((10, 10, 10), 7.0)) == pytest.approx(1.0)
    peaked = np.zeros((10, 10, 10))
    peaked[5, 5, 5] = 1.0
    assert qc.efc(peaked) == pytest.approx(0.0, abs=1e-9)
    assert math.isnan(qc.fber(noise, np.zeros(0)))


def test_segmentation_measures():
    shape = (20, 20, 20)
    brain = np.zeros(shape, bool)
    brain[2:18, 2:18, 2:18] = True
    dseg = np.zeros(shape, np.uint8)
    dseg[brain] = 2
    dseg[6:14, 6:14, 6:14] = 3
    img = np.where(dseg == 3, 130.0, np.where(dseg == 2, 100.0, 0.0)).astype(np.float32)
    onehot = np.stack([(dseg == k) for k in (1, 2, 3)]).astype(np.float32)
    m = qc.measures(img, brain, (1.0, 1.0, 1.0), dseg, onehot)
    assert m["gm_wm_ratio"] == pytest.approx((16 ** 3 - 8 ** 3) / 8 ** 3)
    assert m["wm_gm_contrast"] == pytest.approx(1.3)
    assert m["seg_confidence"] == pytest.approx(1.0)
    assert qc.seg_confidence(np.full((3, *shape), 1 / 3, np.float32), brain) == pytest.approx(1 / 3)
    no_seg = qc.measures(img, brain, (1.0, 1.0, 1.0))
    assert all(math.isnan(no_seg[k]) for k in ("cnr", "cjv", "gm_wm_ratio", "wm_gm_contrast", "seg_confidence"))


def test_rule_table_is_consistent():
    names = [r.name for r in qc.RULES]
    assert len(set(names)) == len(names)
    for r in qc.RULES:
        assert r.measure in qc.MEASURES and r.severity in ("warn", "fail")
        assert r.low is not None or r.high is not None
        assert r.low is None or r.high is None or r.low < r.high
    fake = {k: 1.0 for k in qc.MEASURES}
    assert all("; " not in qc._fmt(r, fake) for r in qc.RULES), "reasons are joined with '; ' in the table"
    assert not qc.RULES[0].broken(float("nan")), "an unmeasured value breaks no rule"
    assert qc.judge({"snr": 1.0, "efc": 0.99}) == ("fail", [qc._fmt(qc.RULES[1], {"snr": 1.0})])
    assert qc.judge({"efc": 0.99})[0] == "warn"
    assert qc.judge({"wm_gm_contrast": 1.01}, "FLAIR") == ("pass", [])
    assert qc.judge({"wm_gm_contrast": 1.01}, "T1w")[0] == "warn"


def test_a_head_mostly_dark_with_a_bright_brain_is_found():
    """As a FLAIR: scalp, bone, neck and nulled CSF 4 noise SDs above the air, the brain (a sixth of the
    head) at 12. The head's median voxel is dark; the head is there all the same."""
    rng = np.random.default_rng(1)
    shape, sigma = (64, 72, 64), 10.0
    r = _ellipsoid(shape, ZOOMS, (80, 100, 90))
    img = add_rician_noise(np.where(r < 0.55, 12 * sigma, np.where(r < 1, 4 * sigma, 0.0)).astype(np.float32),
                           sigma, rng)
    m = qc.measures(img, r < 0.55, ZOOMS)
    head, _ = qc.head_and_air(img, ZOOMS, r < 0.55)
    assert np.median(img[head]) < 5 * sigma  # the median alone would call it no head
    assert m["head_present"] == 1 and m["head_contrast"] > 8


# ------------------------------------------------------------------------------------------------ verdicts

@pytest.mark.parametrize("level", [0.0, 3.0, 20.0])
def test_pure_noise_on_a_real_grid_fails(tiny_session, level):
    """Rician noise of a constant on the simulated T1w's grid, judged with a plausible mask and segmentation."""
    data, zooms, _ = _load(tiny_session["T1w"])
    brain = _load(tiny_session["T1w_mask"])[0] > 0
    dseg = _load(tiny_session["T1w_dseg"])[0].astype(np.uint8)
    sigma = 10.0
    noise = add_rician_noise(np.full(data.shape, level * sigma, np.float32), sigma, np.random.default_rng(3))
    res = qc.assess_arrays(noise, brain, zooms, dseg, contrast="T1w")
    assert res.verdict == "fail", res.measures
    assert res.measures["head_present"] == 0 and res.measures["fber"] < 3
    assert any(r.startswith("no head found") for r in res.reasons)


def test_simulated_heads_pass(tiny_session):
    data, zooms, _ = _load(tiny_session["T1w"])
    brain = _load(tiny_session["T1w_mask"])[0] > 0
    dseg = _load(tiny_session["T1w_dseg"])[0].astype(np.uint8)
    res = qc.assess_arrays(data, brain, zooms, dseg, contrast="T1w")
    assert res.verdict == "pass", res.reasons
    assert res.measures["head_present"] == 1 and res.measures["snr"] > 10 and res.measures["cnr"] > 1
    flair, fz, _ = _load(tiny_session["FLAIR"])
    res = qc.assess_arrays(flair, _load(tiny_session["FLAIR_mask"])[0] > 0, fz, contrast="FLAIR")
    assert res.verdict == "pass", res.reasons
    assert math.isnan(res.measures["cnr"])  # no tissue segmentation: n/a, not judged


def test_a_brain_cut_by_the_field_of_view_is_flagged(tiny_session):
    """The simulated head, its top slices removed through the brain: the brain mask's area on the last
    slice is measured and the session warns that its volumes are lower bounds; the whole head does not."""
    data, zooms, _ = _load(tiny_session["T1w"])
    brain = _load(tiny_session["T1w_mask"])[0] > 0
    dseg = _load(tiny_session["T1w_dseg"])[0].astype(np.uint8)
    assert qc.brain_at_edge_mm2(brain, zooms) == 0
    # a quarter of the brain cut off the far end of its longest axis
    ax = int(np.argmax([brain.any(axis=tuple(i for i in range(3) if i != a)).sum() for a in range(3)]))
    idx = np.nonzero(brain.any(axis=tuple(i for i in range(3) if i != ax)))[0]
    keep = [slice(None)] * 3
    keep[ax] = slice(0, int(idx.max()) - len(idx) // 4)
    cut = tuple(keep)
    area = float(np.take(brain[cut], -1, axis=ax).sum()) * float(np.prod(np.delete(np.asarray(zooms, float), ax)))
    assert area > qc.BRAIN_AT_EDGE_MM2
    res = qc.assess_arrays(data[cut], brain[cut], zooms, dseg[cut], contrast="T1w")
    assert res.measures["brain_at_edge_mm2"] == pytest.approx(area)
    assert res.verdict == "warn" and any("reaches the edge of the field of view" in r for r in res.reasons)


def test_sphere_phantom_fails():
    from bidsapp.physics.phantom import sphere_phantom
    from bidsapp.physics.protocols import get_protocol
    from bidsapp.physics.simulator import simulate

    sim = simulate(sphere_phantom(), get_protocol("siemens-3T-mprage"), np.random.default_rng(4), voxel_size="native")
    truth = sim.truth
    res = qc.assess_arrays(sim.image.get_fdata(), truth.brain_mask, sim.image.header.get_zooms(), truth.dseg(),
                           truth.truth_probseg(), contrast="T1w")
    assert res.verdict == "fail" and any("brain volume" in r for r in res.reasons)


def test_uniform_head_sized_phantom_is_flagged():
    """A uniform water ellipsoid segmented into plausible shells: head and brain sizes are fine, the tissue
    contrast is not."""
    rng = np.random.default_rng(5)
    shape = (64, 72, 64)
    r = _ellipsoid(shape, ZOOMS, (75, 95, 85))
    img = add_rician_noise(np.where(r < 1, 500.0, 0.0).astype(np.float32), 20.0, rng)
    brain = r < 0.8
    dseg = np.zeros(shape, np.uint8)
    dseg[brain] = 1
    dseg[r < 0.75] = 2
    dseg[r < 0.55] = 3
    res = qc.assess_arrays(img, brain, ZOOMS, dseg, contrast="T1w")
    assert res.measures["head_present"] == 1 and res.verdict != "pass"
    assert any("contrast" in x for x in res.reasons)


# ------------------------------------------------------------------------------------------------ nodes

def _qc_inputs(tmp_path, tiny_session, noise: bool):
    data, _, img = _load(tiny_session["T1w"])
    if noise:
        data = add_rician_noise(np.zeros(data.shape, np.float32), 20.0, np.random.default_rng(6))
    path = tmp_path / ("noise.nii.gz" if noise else "head.nii.gz")
    nib.save(nib.Nifti1Image(data, img.affine), path)
    return path, tiny_session["T1w_mask"], tiny_session["T1w_dseg"]


def test_interface_writes_its_table(tmp_path, tiny_session):
    from workflows.interfaces.qc import QualityControl

    in_file, mask, dseg = _qc_inputs(tmp_path, tiny_session, noise=False)
    (tmp_path / "run").mkdir()
    res = QualityControl(in_file=str(in_file), mask_file=str(mask), dseg=str(dseg), contrast="T1w").run(
        cwd=str(tmp_path / "run"))
    table = pd.read_csv(res.outputs.out_tsv, sep="\t")
    assert list(table.columns) == list(qc.COLUMNS) and len(table) == 1
    assert res.outputs.verdict == "pass" == table["verdict"][0] and res.outputs.warnings == []
    row = qc.read_qc(res.outputs.out_tsv)
    assert row["reasons"] == [] and math.isnan(row["seg_confidence"]) and row["snr"] > 10


def test_gate_raises_one_line_naming_the_input(tmp_path):
    from workflows.interfaces.qc import QualityControlGate

    src = "/data/sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"
    assert QualityControlGate(verdict="warn", reasons=["low SNR"], source_file=src).run().outputs.verdict == "warn"
    with pytest.raises(qc.QualityControlError) as err:
        QualityControlGate(verdict="fail", reasons=["no head found (x)", "SNR 1.2 of pure noise"],
                           source_file=src).run()
    assert str(err.value) == ("sub-01 ses-1: sub-01_ses-1_T1w.nii.gz: quality control failed: no head found (x); "
                              "SNR 1.2 of pure noise; results not usable")


# ------------------------------------------------------------------------------------------------ status and exit

def _dataset(root, tiny_session):
    """sub-01 with ses-1 (a noise T1w on the simulated head's grid) and ses-2 (the simulated head)."""
    bids = root / "bids"
    data, _, img = _load(tiny_session["T1w"])
    sidecar = json.loads(tiny_session["T1w"].with_name("sub-01_ses-1_T1w.json").read_text())
    for ses in ("1", "2"):
        anat = bids / "sub-01" / f"ses-{ses}" / "anat"
        anat.mkdir(parents=True)
        arr = add_rician_noise(np.zeros(data.shape, np.float32), 20.0, np.random.default_rng(7)) if ses == "1" \
            else data
        nib.save(nib.Nifti1Image(arr, img.affine), anat / f"sub-01_ses-{ses}_T1w.nii.gz")
        (anat / f"sub-01_ses-{ses}_T1w.json").write_text(json.dumps(sidecar))
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "qc", "BIDSVersion": "1.9.0"}))
    return bids


def _qc_only_subject_wf(mask):
    """Stands in for workflows.base.init_single_subject_wf: per session only the QC part of the real graph
    (the raw image as "preprocessed", the simulated head's truth mask)."""
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    from workflows.base import _add_quality_control

    def build(subject, sessions, output_dir, bids_dir, work_dir=None, **_):
        wf = pe.Workflow(name=f"sub_{subject}_wf", base_dir=str(work_dir))
        for ses in sessions:
            ses_wf = pe.Workflow(name=f"ses_{ses['session']}_wf")
            inputnode = pe.Node(niu.IdentityInterface(fields=["in_file"]), name="inputnode")
            inputnode.inputs.in_file = ses["t1w"]
            anat_wf = pe.Workflow(name="anat_preproc_wf")
            out = pe.Node(niu.IdentityInterface(fields=["anat_preproc", "anat_mask"]), name="outputnode")
            out.inputs.anat_preproc, out.inputs.anat_mask = ses["t1w"], str(mask)
            anat_wf.add_nodes([out])
            _add_quality_control(ses_wf, inputnode, anat_wf, "T1w", output_dir=output_dir, bids_dir=bids_dir)
            wf.add_nodes([ses_wf])
        return wf

    return build


def test_failed_verdict_fails_the_session_and_the_run_while_other_sessions_go_on(tmp_path, tiny_session,
                                                                                  tiny_template, monkeypatch,
                                                                                  caplog):
    import workflows.base
    from bidsapp import templates
    from bidsapp.cli import EXIT_FAILED, main

    bids = _dataset(tmp_path, tiny_session)
    monkeypatch.setattr(workflows.base, "init_single_subject_wf", _qc_only_subject_wf(tiny_session["T1w_mask"]))
    monkeypatch.setattr(templates, "get_template", lambda *a, **k: tiny_template)
    out = tmp_path / "out"
    code = main([str(bids), str(out), "participant", "-w", str(tmp_path / "work"), "--nprocs", "1",
                 "--skip-bids-validation"])
    assert code == EXIT_FAILED
    line = "sub-01 ses-1: sub-01_ses-1_T1w.nii.gz: quality control failed: no head found"
    said = [r.getMessage() for r in caplog.records if r.name == "scanbridge" and "sub-01 failed" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"sub-01 failed: {line}") and "results not usable" in said[0]
    tables = {ses: qc.read_qc(out / "sub-01" / f"ses-{ses}" / "anat" / f"sub-01_ses-{ses}_desc-iqm_qc.tsv")
              for ses in ("1", "2")}
    assert tables["1"]["verdict"] == "fail" and tables["2"]["verdict"] == "pass"  # ses-2 went on
    sidecar = json.loads((out / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_desc-iqm_qc.json").read_text())
    assert "snr" in sidecar and sidecar["QCRules"][0]["name"] == "no_head"
    html = (out / "sub-01.html").read_text()
    assert "FAILED" in html and line in html and "Quality control" in html

    # the report alone, rebuilt from the files on disk, says the same
    from bidsapp.reports.participant import write_participant_report

    html = write_participant_report(out, "01").read_text()
    assert "FAILED" in html and line in html


def test_warn_keeps_the_session_completed_with_the_warning_in_the_report(tmp_path):
    from bidsapp.reports.participant import write_participant_report
    from test_reports_participant import make_derivatives

    out = make_derivatives(tmp_path / "out")
    anat = out / "sub-01" / "ses-1" / "anat"
    row = {k: float("nan") for k in qc.MEASURES} | {"head_present": 1.0, "snr": 4.0, "verdict": "warn",
                                                      "reasons": "low SNR 4.0 (below the Rose criterion of 5)"}
    pd.DataFrame([row]).to_csv(anat / "sub-01_ses-1_desc-iqm_qc.tsv", sep="\t", index=False, na_rep="n/a")
    html = write_participant_report(out, "01").read_text()
    assert "FAILED" not in html and "completed" in html
    assert "quality control: low SNR 4.0" in html and "WARN" in html


def test_group_level_summarises_and_leaves_out_failed_sessions(tmp_path):
    from bidsapp.harmonize.pipeline import gather_qc, without_failed_sessions
    from bidsapp.reports.group import qc_section

    for sub, verdict in (("01", "pass"), ("02", "fail"), ("03", "warn")):
        anat = tmp_path / f"sub-{sub}" / "ses-1" / "anat"
        anat.mkdir(parents=True)
        row = {k: 1.0 for k in qc.MEASURES} | {"verdict": verdict, "reasons": "" if verdict == "pass" else "why"}
        pd.DataFrame([row]).to_csv(anat / f"sub-{sub}_ses-1_desc-iqm_qc.tsv", sep="\t", index=False)
    table = gather_qc(tmp_path)
    assert list(table["participant_id"]) == ["sub-01", "sub-02", "sub-03"]
    assert list(table["session_id"]) == ["ses-1"] * 3 and list(table["verdict"]) == ["pass", "fail", "warn"]
    volumes = pd.DataFrame({"participant_id": ["sub-01", "sub-02", "sub-03"], "session_id": ["ses-1"] * 3,
                            "method": ["m"] * 3, "GM": [1.0, 2.0, 3.0]})
    assert list(without_failed_sessions(volumes, table)["participant_id"]) == ["sub-01", "sub-03"]
    section = qc_section(table)
    assert "1 pass, 1 warn, 1 fail" in section.body and "sub-02" in section.warnings[0]
    assert qc_section(table.iloc[:0]).warnings


def test_collect_qc_copes_with_an_unreadable_table(tmp_path):
    anat = tmp_path / "sub-01" / "anat"
    anat.mkdir(parents=True)
    (anat / "sub-01_desc-iqm_qc.tsv").write_text("")
    table = qc.collect_qc(tmp_path)
    assert table["verdict"].tolist() == ["n/a"] and "unreadable" in table["reasons"][0]
    assert table["session_id"].tolist() == ["n/a"]
    shutil.rmtree(anat)
    assert qc.collect_qc(tmp_path).empty


def test_group_level_writes_group_qc_and_reports_it(tmp_path, monkeypatch):
    from bidsapp.harmonize import pipeline
    from test_group_lesions import make_study

    study = make_study(tmp_path, lesions=False, n_subjects=4, flair_only=0)
    flagged = {("02", "1"): ("fail", "no head found (x)"), ("03", "2"): ("warn", "low SNR 4.0")}
    for sub in ("01", "02", "03", "04"):
        for ses in ("1", "2"):
            verdict, why = flagged.get((sub, ses), ("pass", None))
            row = {k: 1.0 for k in qc.MEASURES} | {"verdict": verdict, "reasons": why}
            pd.DataFrame([row]).to_csv(study.out / f"sub-{sub}/ses-{ses}/anat/sub-{sub}_ses-{ses}_desc-iqm_qc.tsv",
                                       sep="\t", index=False, na_rep="n/a")
    run_steps = pipeline.run_steps
    monkeypatch.setattr(pipeline, "run_steps", lambda ctx, keys=None: run_steps(ctx, ["combat"]))
    assert pipeline._run_group(study.opts) == 0
    table = pd.read_csv(study.out / "group_qc.tsv", sep="\t", na_values=["n/a"], keep_default_na=False)
    assert len(table) == 8 and list(table.columns[:2]) == ["participant_id", "session_id"]
    assert table.set_index(["participant_id", "session_id"]).loc[("sub-02", "ses-1"), "verdict"] == "fail"
    vols = pd.read_csv(study.out / "group_volumes.tsv", sep="\t")
    assert ("sub-02", "ses-1") not in set(zip(vols["participant_id"], vols["session_id"]))
    assert ("sub-02", "ses-2") in set(zip(vols["participant_id"], vols["session_id"]))
    html = (study.out / "group.html").read_text()
    assert html.index('id="qc"') < html.index('id="acquisitions"')
    assert "8 session(s): 6 pass, 1 warn, 1 fail" in html and "no head found (x)" in html
