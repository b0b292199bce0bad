"""The participant workflow of one subject: outputs, naming, resume, and no half-written derivatives."""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bidsapp.metrics.overlap import dice
from synthetic import RES, ras_array

ANAT = Path("sub-01") / "ses-1" / "anat"
STEM = "sub-01_ses-1"


def _sessions(data) -> list[dict]:
    acq = {"sequence_family": "MPRAGE", "field_strength": 3.0, "repetition_time": 2.3, "inversion_time": 0.9,
           "echo_time": 0.00298, "flip_angle": 9.0, "manufacturer": "Siemens"}
    return [{"session": "1", "t1w": str(data["T1w"]), "t2w": [], "flair": [str(data["FLAIR"])], "pdw": [],
             "acquisition": acq}]


def _build(data, out, work, template, **kw):
    from workflows.base import init_single_subject_wf

    kw.setdefault("segmentation", ["atropos"])
    return init_single_subject_wf("01", _sessions(data), out, data["bids"], work, template, omp_nthreads=1, seed=0,
                                  **kw)


def _node_outputs(work: Path) -> dict[str, int]:
    """mtime of every file written by a processing node (sinks excluded)."""
    return {str(p): p.stat().st_mtime_ns for p in work.rglob("*.nii.gz")
            if "derivatives_wf" not in str(p)} | {str(p): p.stat().st_mtime_ns for p in work.rglob("*.h5")}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_session, tiny_template):
    root = tmp_path_factory.mktemp("subject")
    data, template = tiny_session, tiny_template
    out, work = root / "out", root / "work"
    wf = _build(data, out, work, template)
    t0 = time.monotonic()
    wf.run(plugin="MultiProc", plugin_args={"n_procs": 2, "raise_insufficient": False})
    first = time.monotonic() - t0
    before = _node_outputs(work)
    t0 = time.monotonic()
    _build(data, out, work, template).run(plugin="Linear")
    rerun = time.monotonic() - t0
    return dict(data=data, out=out, work=work, template=template, first=first, rerun=rerun, before=before,
                after=_node_outputs(work), root=root)


def test_outputs_named_as_bids_derivatives(run):
    anat = run["out"] / ANAT
    tpl = run["template"]["name"]
    expected = [
        "desc-preproc_T1w.nii.gz", "desc-brain_mask.nii.gz",
        f"from-T1w_to-{tpl}_mode-image_xfm.h5", f"from-{tpl}_to-T1w_mode-image_xfm.h5",
        f"space-{tpl}_desc-preproc_T1w.nii.gz",
        "label-CSF_probseg.nii.gz", "label-GM_probseg.nii.gz", "label-WM_probseg.nii.gz",
        "dseg.nii.gz", "dseg.tsv", "desc-volumes_morph.tsv",
        "space-T1w_desc-preproc_FLAIR.nii.gz", "from-FLAIR_to-T1w_mode-image_xfm.mat",
    ]
    for name in expected:
        assert (anat / f"{STEM}_{name}").is_file(), name
        if not name.endswith(".tsv") or name.endswith("morph.tsv"):
            stem = name.split(".")[0]
            assert (anat / f"{STEM}_{stem}.json").is_file(), f"sidecar of {name}"
    leftovers = [p.name for p in run["out"].rglob("*") if p.name.startswith(".") or ".tmp-" in p.name]
    assert not leftovers


def test_sidecars_record_sources_method_and_acquisition(run):
    anat = run["out"] / ANAT
    side = json.loads((anat / f"{STEM}_dseg.json").read_text())
    assert side["Sources"] == ["bids:raw:sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"]
    assert side["Method"] == "atropos" and "ANTs Atropos" in side["Model"]["Name"]
    assert side["Priors"]["source"] == "nilearn-icbm152-2009a"
    assert side["RepetitionTime"] == 2.3 and side["FlipAngle"] == 9.0
    flair = json.loads((anat / f"{STEM}_space-T1w_desc-preproc_FLAIR.json").read_text())
    assert flair["Sources"] == ["bids:raw:sub-01/ses-1/anat/sub-01_ses-1_FLAIR.nii.gz",
                                "bids:raw:sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"]
    xfm = json.loads((anat / f"{STEM}_from-T1w_to-{run['template']['name']}_mode-image_xfm.json").read_text())
    assert xfm["Template"]["source"] == "nilearn-icbm152-2009a" and xfm["Registration"]["Type"] == "SyN"
    lut = (anat / f"{STEM}_dseg.tsv").read_text().splitlines()
    assert lut == ["index\tname", "0\tbackground", "1\tCSF", "2\tGM", "3\tWM"]


def test_results_are_right(run):
    anat = run["out"] / ANAT
    data = run["data"]
    mask = np.asarray(nib.load(anat / f"{STEM}_desc-brain_mask.nii.gz").dataobj) > 0
    assert dice(mask, ras_array(data["T1w_mask"]) > 0) >= 0.93
    dseg = np.asarray(nib.load(anat / f"{STEM}_dseg.nii.gz").dataobj)
    truth = ras_array(data["T1w_dseg"])
    assert dice(dseg == 2, truth == 2) > 0.75 and dice(dseg == 3, truth == 3) > 0.8
    flair = nib.load(anat / f"{STEM}_space-T1w_desc-preproc_FLAIR.nii.gz")
    t1w = nib.load(anat / f"{STEM}_desc-preproc_T1w.nii.gz")
    assert flair.shape == t1w.shape and np.allclose(flair.affine, t1w.affine)
    rows = (anat / f"{STEM}_desc-volumes_morph.tsv").read_text().splitlines()
    assert rows[0] == "method\tlabel\tvolume_mm3\tcount"  # count: the lesion row's number of lesions
    vols = {r.split("\t")[1]: float(r.split("\t")[2]) for r in rows[1:]}
    assert vols["brain"] == pytest.approx(mask.sum() * RES ** 3)


def test_pybids_indexes_the_outputs(run):
    from bids import BIDSLayout

    desc = {"Name": "scanbridge derivatives", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "scanbridge"}]}
    (run["out"] / "dataset_description.json").write_text(json.dumps(desc))
    layout = BIDSLayout(run["out"], validate=False, is_derivative=True)
    probseg = layout.get(subject="01", session="1", suffix="probseg", extension=".nii.gz")
    assert sorted((f.entities["label"], f.entities.get("desc", "")) for f in probseg) == [
        ("CSF", ""), ("GM", ""), ("WM", ""), ("lesion", ""), ("lesion", "wmh")]  # the WMH baseline beside
    assert layout.get(subject="01", suffix="mask", desc="brain", extension=".nii.gz")


def test_rerun_resumes_without_recomputing(run):
    assert run["before"] and run["before"] == run["after"], "a finished node ran again"
    assert run["rerun"] < max(0.5 * run["first"], 20)


def test_failed_node_leaves_no_partial_derivatives(run, monkeypatch, tmp_path):
    """Atropos fails (a different prior weight makes it rerun): earlier nodes stay cached,
    no segmentation file appears, and everything that was written is complete."""
    import workflows.interfaces.ants as A

    def boom(*args, **kwargs):
        raise RuntimeError("simulated Atropos crash")

    monkeypatch.setattr(A, "atropos_segment", boom)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    wf = _build(run["data"], out, run["work"], run["template"], prior_weight=0.3)
    with pytest.raises(RuntimeError):
        wf.run(plugin="Linear")
    assert list((run["work"] / "crash").glob("crash-*seg_atropos*")), "crash report belongs in the work dir"
    assert not list(tmp_path.glob("crash-*"))
    anat = out / ANAT
    tissue = [p for p in anat.glob("*probseg*") if "lesion" not in p.name]  # the lesion method finished
    assert not tissue and not list(anat.glob("*dseg*")) and not list(anat.glob("*morph*"))
    written = sorted(p for p in anat.iterdir())
    assert any(p.name.endswith("desc-preproc_T1w.nii.gz") for p in written)
    for p in written:
        assert not p.name.startswith("."), f"temporary file left: {p.name}"
        if p.name.endswith(".nii.gz"):
            assert np.isfinite(np.asarray(nib.load(p).dataobj)).all()
            assert (anat / (p.name[: -len(".nii.gz")] + ".json")).is_file()
        if p.suffix == ".json":
            json.loads(p.read_text())


def test_main_answer_switch_gives_atropos_a_desc(run, tmp_path):
    """With another method as the main answer, Atropos outputs keep desc-atropos."""
    from bidsapp import methods as M
    from bidsapp.labels import TISSUE

    def fake_model(name, options):
        from nipype.pipeline import engine as pe

        from workflows.interfaces.ants import Atropos

        return pe.Node(Atropos(prior_weight=0.5, template={"name": "x"}), name=name)

    M.register(M.Method("fake-model", M.SESSION, fake_model, task=TISSUE.key, needs=(("T1w",),), inputs=("priors",),
                        labels=TISSUE, outputs=("probseg", "dseg", "volumes"), desc="fake"))
    try:
        assert M.main_answers(["fake-model", "atropos"]) == {"fake-model": True, "atropos": False}
        out = tmp_path / "out"
        _build(run["data"], out, run["work"], run["template"], segmentation=["fake-model", "atropos"]).run(
            plugin="Linear")
        anat = out / ANAT
        assert (anat / f"{STEM}_dseg.nii.gz").is_file()
        assert (anat / f"{STEM}_desc-atropos_dseg.nii.gz").is_file()
        assert (anat / f"{STEM}_desc-atropos_label-GM_probseg.nii.gz").is_file() is False
        assert (anat / f"{STEM}_label-GM_desc-atropos_probseg.nii.gz").is_file()
        methods = [r.split("\t")[0] for r in (anat / f"{STEM}_desc-volumes_morph.tsv").read_text().splitlines()[1:]]
        assert methods.count("atropos") == 8  # both nodes are Atropos here; the table keeps every row
    finally:
        M.unregister("fake-model")


def test_bad_inputs_fail_at_build_time(run, tmp_path):
    from workflows.base import init_single_subject_wf

    with pytest.raises(ValueError, match="no session"):
        init_single_subject_wf("01", [], tmp_path, run["data"]["bids"], tmp_path, run["template"])
    with pytest.raises(ValueError, match="unknown segmentation"):
        _build(run["data"], tmp_path, tmp_path, run["template"], segmentation=["nope"])
    bad = _sessions(run["data"])
    bad[0]["t1w"] = str(tmp_path / "missing_T1w.nii.gz")
    from workflows.base import init_single_subject_wf as build

    with pytest.raises(ValueError, match="missing_T1w"):
        build("01", bad, tmp_path, run["data"]["bids"], tmp_path, run["template"])
