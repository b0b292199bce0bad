"""Two lesion methods side by side: the MS lesion U-Net (``lesion``) and the FLAIR-only WMH network (``wmh``).

Registration and the per-session main answer, ``--lesion-methods``, the WMH model through the lesion
interface on a tiny FLAIR, the BIDS names of the main answer and of the baseline, and the wiring of a
subject's sessions (the group level and the report: test_group_lesions.py, test_report_lesions.py).
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from nipype.interfaces.base import isdefined

from bidsapp import methods as M
from bidsapp.labels import LESION


# ------------------------------------------------------------------------------------ registration
def test_wmh_is_a_flair_only_lesion_method_registered_after_lesion():
    assert list(M.registry(M.SESSION, LESION.key)) == ["lesion", "wmh"]
    m = M.get("wmh")
    assert m.level == M.SESSION and m.task == LESION.key and m.labels is LESION and m.default
    assert m.needs == (("FLAIR",),) and not m.optional
    assert m.outputs == ("probseg", "mask", "volumes", "stats")
    assert m.desc == "wmh" and m.title == "WMH (FLAIR)" and "Siamese content loss" in m.summary
    assert m.contrasts_used(["T1w", "FLAIR", "T2w"]) == ("FLAIR",)
    assert M.get("lesion").desc == "ms"  # as a baseline it must not take the main answer's desc-lesion
    assert M.default_methods(LESION.key) == ("lesion", "wmh")
    assert M.select() == ("unet-physics", "atropos", "lesion", "wmh")
    assert M.select(["atropos"], lesion=["wmh", "lesion"]) == ("atropos", "wmh", "lesion")
    assert M.select(lesion=["wmh"]) == ("unet-physics", "atropos", "wmh")


@pytest.mark.parametrize("chosen, contrasts, run, main", [
    (None, ["T1w", "FLAIR"], ["lesion", "wmh"], "lesion"),
    (None, ["FLAIR"], ["lesion", "wmh"], "lesion"),          # a FLAIR-only session runs both
    (None, ["T2w"], ["lesion"], "lesion"),                   # the WMH model needs a FLAIR
    (None, ["T1w"], [], None),
    (["wmh", "lesion"], ["T1w", "FLAIR"], ["wmh", "lesion"], "wmh"),
    (["wmh", "lesion"], ["T2w"], ["lesion"], "lesion"),      # per session: the first lesion method that runs
    (["wmh"], ["FLAIR", "T2w"], ["wmh"], "wmh"),
    (["wmh"], ["T2w"], [], None),
])
def test_the_main_lesion_answer_is_the_first_lesion_method_that_runs_on_the_session(chosen, contrasts, run, main):
    plan = M.plan_session(M.select(lesion=chosen), contrasts)
    lesion_run = [k for k in plan.run if M.get(k).task == LESION.key]
    assert lesion_run == run
    answers = M.main_answers(plan.run)
    assert [k for k in lesion_run if answers[k]] == ([main] if main else [])
    if "FLAIR" not in contrasts and "wmh" in M.select(lesion=chosen):
        assert any(line.startswith("wmh skipped: needs FLAIR") for line in plan.skipped)


def test_select_refuses_unknown_or_repeated_lesion_methods():
    with pytest.raises(ValueError, match="unknown lesion method.*nope; known: lesion, wmh"):
        M.select(lesion=["nope"])
    with pytest.raises(ValueError, match="unknown lesion method.*atropos"):
        M.select(lesion=["atropos"])  # a tissue method
    with pytest.raises(ValueError, match="lesion methods listed twice: wmh"):
        M.select(lesion=["wmh", "lesion", "wmh"])
    with pytest.raises(ValueError, match="unknown segmentation method.*wmh"):
        M.select(["wmh"])  # not a tissue method


# ------------------------------------------------------------------------------------ command line
def test_lesion_methods_option(capsys):
    from bidsapp.cli import build_parser

    parser = build_parser()
    opts = parser.parse_args(["b", "o", "participant"])
    assert opts.lesion_methods == ["lesion", "wmh"] and tuple(opts.lesion_methods) == M.default_methods(LESION.key)
    opts = parser.parse_args(["b", "o", "participant", "--lesion-methods", "wmh", "lesion"])
    assert opts.lesion_methods == ["wmh", "lesion"]
    assert parser.parse_args(["b", "o", "participant", "--lesion_methods", "wmh"]).lesion_methods == ["wmh"]
    for argv, words in ((["--lesion-methods", "nope"], "invalid choice: 'nope'"),
                        (["--lesion-methods", "wmh", "wmh"], "listed twice: wmh"),
                        (["--lesion-methods", "atropos"], "invalid choice: 'atropos'"),
                        (["--segmentation", "atropos", "atropos"], "listed twice: atropos")):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["b", "o", "participant", *argv])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("scanbridge: error:")]
        assert len(lines) == 1 and words in lines[0], err
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--lesion-methods METHOD" in text and "wmh: FLAIR-only white-matter hyperintensity" in text
    assert "wmh: desc-wmh" in text


def test_lesion_threshold_option_reaches_every_lesion_node(capsys):
    from bidsapp.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["b", "o", "participant"]).lesion_threshold is None
    opts = parser.parse_args(["b", "o", "participant", "--lesion-threshold", "0.7"])
    assert opts.lesion_threshold == 0.7
    assert parser.parse_args(["b", "o", "participant", "--lesion_threshold", "0.3"]).lesion_threshold == 0.3
    for value in ("0", "1", "1.5", "x"):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["b", "o", "participant", "--lesion-threshold", value])
        assert exc.value.code == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("scanbridge: error:")]
        assert len(lines) == 1 and "--lesion-threshold" in lines[0]
    for key in ("lesion", "wmh"):
        node = M.get(key).build(f"seg_{key}", {"device": "cpu", "lesion_threshold": opts.lesion_threshold})
        assert node.inputs.threshold == 0.7
        assert not isdefined(M.get(key).build(f"seg_{key}", {"device": "cpu"}).inputs.threshold)


# ------------------------------------------------------------------------------------ the interface
SHAPE = (48, 56, 20)
AFFINE = np.diag([2.0, 2.0, 4.0, 1.0])


@pytest.fixture
def tiny_flair(tmp_path):
    """A 48x56x20 FLAIR (2 x 2 x 4 mm) of an ellipsoid brain with one bright blob, its brain mask and a T1w."""
    g = np.indices(SHAPE).astype(float)
    c = (np.array(SHAPE) - 1) / 2
    r = np.sqrt(sum(((g[i] - c[i]) / (SHAPE[i] / 2.4)) ** 2 for i in range(3)))
    mask = (r < 1).astype(np.uint8)
    rng = np.random.default_rng(0)
    flair = (400 + 100 * (r < 0.6) + rng.normal(0, 10, SHAPE)) * mask + 5
    flair[20:24, 25:29, 9:12] += 500
    paths = {}
    for name, data in (("flair", flair.astype(np.float32)), ("mask", mask),
                       ("t1w", (1000 - flair).astype(np.float32))):
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, AFFINE), paths[name])
    return paths


def test_lesion_interface_runs_the_wmh_model_on_the_flair_alone(tiny_flair, tmp_path):
    from workflows.interfaces.lesion import STATS_COLUMNS, LesionSegment

    work = tmp_path / "node"
    work.mkdir()
    res = LesionSegment(in_file=str(tiny_flair["flair"]), in_contrast="FLAIR", mask_file=str(tiny_flair["mask"]),
                        t1w_file=str(tiny_flair["t1w"]), method="wmh", model="wmh", device="cpu").run(cwd=str(work))
    out = res.outputs
    (prob,) = out.probseg
    for path in (prob, out.mask, out.volumes_tsv, out.stats):
        assert str(path).startswith(str(work))
    p, m = nib.load(prob), nib.load(out.mask)
    assert p.shape == m.shape == SHAPE and np.allclose(p.affine, AFFINE) and np.allclose(m.affine, AFFINE)
    pa, ma = np.asarray(p.dataobj), np.asarray(m.dataobj)
    assert pa.dtype == np.float32 and 0 <= pa.min() <= pa.max() <= 1
    assert set(np.unique(ma)) <= {0, 1} and not ma[np.asarray(nib.load(tiny_flair["mask"]).dataobj) == 0].any()
    vols = pd.read_csv(out.volumes_tsv, sep="\t")
    assert list(vols.columns) == ["method", "label", "volume_mm3", "count"]
    assert vols[["method", "label"]].values.tolist() == [["wmh", "lesion"]]
    assert vols["volume_mm3"].iloc[0] == pytest.approx(ma.sum() * 16.0, abs=0.1)
    stats = pd.read_csv(out.stats, sep="\t")
    assert tuple(stats.columns) == STATS_COLUMNS and len(stats) == vols["count"].iloc[0]
    meta = out.metadata
    assert meta["Method"] == "wmh" and meta["Model"]["Name"] == "wmh_unet" and len(meta["Model"]["Sha256"]) == 64
    assert meta["ContrastsUsed"] == ["FLAIR"] and meta["ContrastsMissing"] == []  # the T1w is not read
    assert meta["LesionCount"] == len(stats) and meta["MinimumLesionVolume_mm3"] == 3.0
    assert out.warnings == []  # no lower-sensitivity warning: FLAIR alone is the model's design
    assert meta["Threshold"] == 0.5
    json.dumps(meta)  # sidecar-ready
    # a user's threshold cuts the same probability map and is named in the sidecar
    work2 = tmp_path / "node2"
    work2.mkdir()
    res2 = LesionSegment(in_file=str(tiny_flair["flair"]), in_contrast="FLAIR", mask_file=str(tiny_flair["mask"]),
                         method="wmh", model="wmh", device="cpu", threshold=0.2).run(cwd=str(work2))
    assert res2.outputs.metadata["Threshold"] == 0.2
    assert np.allclose(np.asarray(nib.load(res2.outputs.probseg[0]).dataobj), pa)
    ma2 = np.asarray(nib.load(res2.outputs.mask).dataobj)
    assert ma2.sum() >= ma.sum() and not (ma.astype(bool) & ~ma2.astype(bool)).any()


def test_wmh_model_without_a_flair_is_a_one_line_error(tiny_flair, tmp_path):
    from workflows.interfaces.lesion import LesionSegment

    with pytest.raises(Exception, match="the WMH model needs a FLAIR; got T2w"):
        LesionSegment(in_file=str(tiny_flair["flair"]), in_contrast="T2w", mask_file=str(tiny_flair["mask"]),
                      method="wmh", model="wmh", device="cpu").run(cwd=str(tmp_path))


def test_wmh_node_factory():
    node = M.get("wmh").build("seg_wmh", {"device": "cpu", "omp_nthreads": 2, "mem_gb": 2.0})
    assert node.inputs.model == "wmh" and node.inputs.method == "wmh" and node.inputs.device == "cpu"
    assert node.inputs.num_threads == 2 == node.n_procs  # torch keeps to the node's share of the CPUs
    node = M.get("lesion").build("seg_lesion", {"device": "cpu"})
    assert node.inputs.model == "lesion" and node.inputs.method == "lesion"


# ------------------------------------------------------------------------------------ names
def _write(method_key: str, main: bool, tmp_path) -> set[str]:
    """Run the method's derivative sinks on dummy results; the file names they write."""
    from workflows.outputs import init_method_derivatives_wf

    bids, out = tmp_path / "bids", tmp_path / "out"
    src = bids / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_FLAIR.nii.gz"
    src.parent.mkdir(parents=True, exist_ok=True)
    img = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), img)
    table = tmp_path / "stats.tsv"
    table.write_text("id\tvolume_mm3\n")
    wf = init_method_derivatives_wf(M.get(method_key), main=main, output_dir=out, bids_dir=bids,
                                    name=f"ds_{method_key}_{int(main)}")
    wf.base_dir = str(tmp_path / "work")
    wf.inputs.inputnode.source_file = str(src)
    wf.inputs.inputnode.acquisition = {}
    wf.inputs.inputnode.metadata = {"Method": method_key}
    wf.inputs.inputnode.probseg = [str(img)]
    wf.inputs.inputnode.mask = str(img)
    wf.inputs.inputnode.stats = str(table)
    wf.run(plugin="Linear")
    anat = out / "sub-01" / "ses-1" / "anat"
    names = {p.name for p in anat.iterdir() if not p.name.endswith(".json")}
    for p in list(anat.iterdir()):
        p.unlink()
    return names


def test_main_answer_is_desc_lesion_and_the_baseline_keeps_its_desc(tmp_path):
    main = {"sub-01_ses-1_label-lesion_probseg.nii.gz", "sub-01_ses-1_desc-lesion_mask.nii.gz",
            "sub-01_ses-1_desc-lesions_stats.tsv"}
    assert _write("wmh", True, tmp_path) == main
    assert _write("lesion", True, tmp_path) == main
    assert _write("wmh", False, tmp_path) == {"sub-01_ses-1_label-lesion_desc-wmh_probseg.nii.gz",
                                              "sub-01_ses-1_desc-wmh_mask.nii.gz", "sub-01_ses-1_desc-wmh_stats.tsv"}
    assert _write("lesion", False, tmp_path) == {"sub-01_ses-1_label-lesion_desc-ms_probseg.nii.gz",
                                                 "sub-01_ses-1_desc-ms_mask.nii.gz", "sub-01_ses-1_desc-ms_stats.tsv"}


def test_a_baseline_may_not_take_the_main_answers_names(tmp_path):
    from workflows.outputs import init_method_derivatives_wf

    m = M.Method("lesion-copy", M.SESSION, "workflows.segmentation:lesion_node", task=LESION.key,
                 needs=(("FLAIR",),), labels=LESION, outputs=("mask",), desc="lesion")
    init_method_derivatives_wf(m, main=True, output_dir=tmp_path, bids_dir=tmp_path)
    with pytest.raises(ValueError, match="main answer's names"):
        init_method_derivatives_wf(m, main=False, output_dir=tmp_path, bids_dir=tmp_path)


# ------------------------------------------------------------------------------------ wiring
def test_lesion_methods_wire_per_session_and_lesion_filling_uses_the_main_answer(tmp_path, tiny_template):
    from workflows.base import init_single_subject_wf

    anat = tmp_path / "bids" / "sub-01"
    files = {}
    for ses, suffix in (("1", "T1w"), ("1", "FLAIR"), ("2", "T2w")):
        files[(ses, suffix)] = anat / f"ses-{ses}" / "anat" / f"sub-01_ses-{ses}_{suffix}.nii.gz"
        files[(ses, suffix)].parent.mkdir(parents=True, exist_ok=True)
        files[(ses, suffix)].write_bytes(b"")  # never opened while building
    sessions = [
        {"session": "1", "t1w": str(files[("1", "T1w")]), "flair": [str(files[("1", "FLAIR")])], "t2w": [], "pdw": [],
         "acquisition": {}},
        {"session": "2", "t1w": None, "flair": [], "t2w": [str(files[("2", "T2w")])], "pdw": [], "acquisition": {}},
    ]
    wf = init_single_subject_wf("01", sessions, tmp_path / "out", tmp_path / "bids", tmp_path / "work",
                                tiny_template, segmentation=["atropos"], lesion_methods=["wmh", "lesion"])
    ses1, ses2 = wf.get_node("ses_1_wf"), wf.get_node("ses_2_wf")
    # ses-1 (T1w + FLAIR): both run, the WMH model first, so it is desc-lesion and fills the tissue classes
    assert ses1.get_node("methods_wf.seg_wmh") is not None and ses1.get_node("methods_wf.seg_lesion") is not None
    assert ses1.get_node("ds_wmh_wf.ds_mask").inputs.desc == "lesion"
    assert ses1.get_node("ds_wmh_wf.ds_stats").inputs.desc == "lesions"
    assert ses1.get_node("ds_lesion_wf.ds_mask").inputs.desc == "ms"
    assert ses1.get_node("ds_lesion_wf.ds_probseg_lesion").inputs.desc == "ms"
    meth = ses1.get_node("methods_wf")
    edges = {(u.name, v.name) for u, v in meth._graph.edges()}
    assert ("seg_wmh", "fill_atropos") in edges and ("seg_lesion", "fill_atropos") not in edges
    assert meth.get_node("seg_wmh").inputs.in_contrast == "FLAIR"
    # ses-2 (T2w only): the WMH model cannot run; the MS model is its main answer
    assert ses2.get_node("methods_wf.seg_wmh") is None
    assert ses2.get_node("ds_lesion_wf.ds_mask").inputs.desc == "lesion"
    assert ses2.get_node("ds_lesion_wf.ds_probseg_lesion").inputs.desc is None
    assert not isdefined(ses2.get_node("methods_wf.seg_lesion").inputs.threshold)  # the model's own 0.5
    # --lesion-threshold reaches every lesion node of every session
    cut = init_single_subject_wf("01", sessions, tmp_path / "out", tmp_path / "bids", tmp_path / "work",
                                 tiny_template, segmentation=["atropos"], lesion_threshold=0.65)
    assert [cut.get_node(n).inputs.threshold for n in ("ses_1_wf.methods_wf.seg_wmh", "ses_1_wf.methods_wf.seg_lesion",
                                                      "ses_2_wf.methods_wf.seg_lesion")] == [0.65] * 3
    with pytest.raises(ValueError, match="unknown lesion method"):
        init_single_subject_wf("01", sessions, tmp_path / "out", tmp_path / "bids", tmp_path / "work",
                               tiny_template, lesion_methods=["nope"])
