"""End to end: simulate a tiny multi-site dataset, run participant and group level as a user would.

One module-scoped run serves every assertion (it is the slowest thing in the default suite).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path

import pandas as pd
import pytest

from bidsapp.cli import EXIT_FAILED, EXIT_OK, main
from bidsapp.devices import precision
from bidsapp.physics.cli import main as simulate


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
            h.update(str(p.stat().st_mtime_ns).encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    bids, out, work = base / "bids", base / "out", base / "work"
    assert simulate([str(bids), "--subjects", "3", "--sites", "2", "--sessions", "1",
                     "--resolution", "4", "--seed", "3"]) == 0
    # a broken scan: sub-03's T1w truncated mid-file
    t1w = next((bids / "sub-03").rglob("*_T1w.nii.gz"))
    t1w.write_bytes(t1w.read_bytes()[:200])
    # a session with only a FLAIR (its image: sub-02's T1w; the pipeline needs no particular contrast)
    flair = bids / "sub-02" / "ses-2" / "anat" / "sub-02_ses-2_FLAIR.nii.gz"
    flair.parent.mkdir(parents=True)
    src = next((bids / "sub-02").rglob("*_T1w.nii.gz"))
    flair.write_bytes(src.read_bytes())
    side = json.loads(src.with_name(src.name.replace(".nii.gz", ".json")).read_text())
    flair.with_name(flair.name.replace(".nii.gz", ".json")).write_text(json.dumps(side))
    digest = tree_digest(bids)
    args = [str(bids), str(out), "participant", "-w", str(work), "--nprocs", "2", "--omp-nthreads", "1"]
    lines: list[str] = []
    collect = logging.Handler(logging.INFO)
    collect.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("scanbridge")
    level = logger.level
    logger.addHandler(collect)
    logger.setLevel(logging.INFO)  # the command sets INFO on the root logger, which pytest's keeps at WARNING
    t0 = time.time()
    try:
        code = main(args)
    finally:
        logger.removeHandler(collect)
        logger.setLevel(level)
    first = time.time() - t0
    t0 = time.time()
    rerun_code = main(args + ["--participant-label", "01"])
    rerun = time.time() - t0
    group_code = main([str(bids), str(out), "group", "-w", str(work)])
    return dict(bids=bids, out=out, work=work, code=code, rerun_code=rerun_code, first=first, rerun=rerun,
                group_code=group_code, digest=digest, broken=t1w, log=lines)


def test_exit_code_reports_the_broken_subject(run):
    assert run["code"] == EXIT_FAILED
    assert run["rerun_code"] == EXIT_OK


def test_progress_lines_name_each_long_step_and_each_subject_end(run):
    steps = [ln for ln in run["log"] if re.search(r"^sub-0[12] .+: [0-9.]+ s  \[\d+/\d+ steps\]$", ln)]
    assert any(" n4: " in ln for ln in steps) and any("ses-2 seg_lesion" in ln for ln in steps), run["log"]
    done = [ln for ln in run["log"] if re.match(r"sub-0[12]: done after \d+ s; report ", ln)]
    assert len(done) == 2


def test_bids_dir_never_written(run):
    assert tree_digest(run["bids"]) == run["digest"]


def test_derivatives_of_good_subjects(run):
    out = run["out"]
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "scanbridge"
    for sub in ("01", "02"):
        anat = out / f"sub-{sub}" / "ses-1" / "anat"
        stem = f"sub-{sub}_ses-1"
        for name in ("desc-preproc_T1w.nii.gz", "desc-brain_mask.nii.gz", "dseg.nii.gz",
                     "label-GM_probseg.nii.gz", "label-WM_probseg.nii.gz", "label-CSF_probseg.nii.gz",
                     "desc-volumes_morph.tsv"):
            assert (anat / f"{stem}_{name}").is_file(), name
        assert (anat / f"{stem}_desc-atropos_dseg.nii.gz").is_file(), "baseline kept beside the main answer"
        methods = set(pd.read_csv(anat / f"{stem}_desc-volumes_morph.tsv", sep="\t")["method"])
        assert methods == {"unet-physics", "atropos"}
        seg = json.loads((anat / f"{stem}_dseg.json").read_text())
        assert seg["Method"] == "unet-physics" and len(seg["Model"]["Sha256"]) == 64
        assert seg["Model"]["Precision"] == precision("auto")  # which precision made it
        side = json.loads((anat / f"{stem}_desc-preproc_T1w.json").read_text())
        assert side["Sources"][0].startswith("bids:raw:sub-")
        assert list(anat.glob(f"{stem}_from-T1w_to-*_mode-image_xfm.*"))
        assert (out / f"sub-{sub}.html").is_file()
    assert not list(out.rglob("*.tmp")), "half-written files left behind"
    # sidecars describe the run, not where its scratch files lay
    assert not [p.name for p in out.rglob("*.json") if str(run["work"]) in p.read_text()]


def test_flair_only_session_gets_brain_extraction_lesions_and_no_tissue(run):
    anat = run["out"] / "sub-02" / "ses-2" / "anat"
    names = {p.name for p in anat.iterdir()}
    assert {"sub-02_ses-2_desc-preproc_FLAIR.nii.gz", "sub-02_ses-2_desc-brain_mask.nii.gz",
            "sub-02_ses-2_desc-lesion_mask.nii.gz", "sub-02_ses-2_label-lesion_probseg.nii.gz",
            "sub-02_ses-2_desc-lesions_stats.tsv", "sub-02_ses-2_desc-wmh_mask.nii.gz",
            "sub-02_ses-2_label-lesion_desc-wmh_probseg.nii.gz", "sub-02_ses-2_desc-wmh_stats.tsv"} <= names
    assert not [n for n in names if ("seg" in n and "lesion" not in n) or ("xfm" in n and "subject" not in n)], names
    # no contrast in common with ses-1 (T1w only): the subject level aligned its FLAIR, and says so
    assert {"sub-02_ses-2_from-FLAIR_to-subject_mode-image_xfm.txt",
            "sub-02_ses-2_from-subject_to-FLAIR_mode-image_xfm.txt"} <= names
    vols = pd.read_csv(anat / "sub-02_ses-2_desc-volumes_morph.tsv", sep="\t")
    assert list(vols["method"]) == ["lesion", "wmh"] and "count" in vols.columns  # main answer first
    mask = json.loads((anat / "sub-02_ses-2_desc-lesion_mask.json").read_text())
    assert mask["ContrastsUsed"] == ["FLAIR"] and len(mask["Model"]["Sha256"]) == 64
    assert mask["Method"] == "lesion" and mask["Model"]["Precision"] == precision("auto")
    wmh = json.loads((anat / "sub-02_ses-2_desc-wmh_mask.json").read_text())
    assert wmh["Method"] == "wmh" and wmh["ContrastsUsed"] == ["FLAIR"] and wmh["Model"]["Name"] == "wmh_unet"
    html = (run["out"] / "sub-02.html").read_text()
    assert "ses-2" in html and "needs T1w" in html and "preprocessed FLAIR" in html
    assert "Lesions" in html and "Lesions, baseline: WMH (FLAIR) (wmh)" in html


def test_broken_subject_is_reported(run):
    assert not list(run["out"].glob("sub-03/**/*_dseg.nii.gz"))
    assert run["broken"].name in (run["out"] / "sub-03.html").read_text()


def test_rerun_resumes(run):
    assert run["rerun"] < run["first"] / 2


def test_pybids_indexes_outputs(run):
    from bids import BIDSLayout

    layout = BIDSLayout(run["out"], validate=False, is_derivative=True)
    assert set(layout.get_subjects()) >= {"01", "02"}
    assert layout.get(suffix="dseg", extension=".nii.gz")


def test_group_level(run):
    assert run["group_code"] == EXIT_OK
    vols = pd.read_csv(run["out"] / "group_volumes.tsv", sep="\t")
    assert {"participant_id", "GM", "WM", "CSF", "acq_group", "lesion", "lesion_count"} <= set(vols.columns)
    assert set(vols["participant_id"]) == {"sub-01", "sub-02"}
    flair_only = vols[(vols["participant_id"] == "sub-02") & (vols["session_id"] == "ses-2")]
    assert list(flair_only["method"]) == ["lesion"] and flair_only["GM"].isna().all()
    html = (run["out"] / "group.html").read_text()
    assert "data:image/png;base64" in html


def test_subject_with_two_sessions_gets_its_change_table(run):
    table = pd.read_csv(run["out"] / "sub-02" / "anat" / "sub-02_desc-change_morph.tsv", sep="\t")
    assert set(table["measure"]) == {"brain", "GM", "WM", "CSF", "ventricles", "lesion"}
    assert not (run["out"] / "sub-01" / "anat" / "sub-01_desc-change_morph.tsv").exists()  # one session
    group = pd.read_csv(run["out"] / "group_change.tsv", sep="\t")
    assert set(group["participant_id"]) == {"sub-02"} and len(group) == len(table)
    assert "Longitudinal change" in (run["out"] / "group.html").read_text()
    assert "Longitudinal change" in (run["out"] / "sub-02.html").read_text()


def test_group_benchmark_replicas_are_new_sessions(run, tmp_path):
    """benchmarks/group/run.py grows a study by copying participant outputs under new labels: the group
    level must read each copy as a session of its own, with its images and acquisition record."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.group.run import replicate
    from bidsapp.bids.collect import session_files
    from bidsapp.harmonize.pipeline import gather_acquisitions, gather_volumes

    made = replicate(run["bids"], run["out"], tmp_path, sessions=7)
    assert made["sessions"] >= 7 and made["subjects"] > made["source_subjects"]
    out = tmp_path / "out"
    vols = gather_volumes(out)
    copies = sorted(vols["participant_id"].unique())
    assert len(copies) == made["subjects"] and all(re.fullmatch(r"sub-r\d{3}x\d+", p) for p in copies)
    acq = gather_acquisitions(out, tmp_path / "bids", None)
    assert set(acq["participant_id"]) <= set(copies) and len(acq)
    first = copies[0].removeprefix("sub-")
    files = [f for f in session_files(out, first) if f.t1w is not None]
    assert files and all(f"sub-{first}_" in f.t1w.name for f in files)
    participants = pd.read_csv(tmp_path / "bids" / "participants.tsv", sep="\t")
    assert sorted(participants["participant_id"]) == copies
    assert "sub-r" not in (run["bids"] / "participants.tsv").read_text()  # the source dataset is left alone
