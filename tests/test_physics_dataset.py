"""scanbridge-simulate: a valid BIDS dataset with truth, deterministic bytes, clear refusals."""
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bidsapp.devdata import anatomy_dir
from bidsapp.physics import cli

ANATOMY = anatomy_dir()
ARGS = ["--subjects", "2", "--sites", "2", "--sessions", "2", "--modalities", "T1w,FLAIR", "--lesions",
        "--protocol-change", "--resolution", "4", "--seed", "3", "--quiet"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "bids"
    assert cli.main([str(out)] + ARGS + ["--jobs", "2"]) == 0  # two worker processes
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_every_path_is_valid_bids(dataset):
    from bids_validator import BIDSValidator

    v = BIDSValidator()
    files = [p for p in dataset.rglob("*") if p.is_file()]
    assert len(files) > 100
    bad = [str(p.relative_to(dataset)) for p in files if not v.is_bids("/" + str(p.relative_to(dataset)))]
    assert not bad
    assert not [p for p in dataset.rglob("*") if ".tmp" in p.name or "partial" in p.name]
    from bidsapp.bids.validation import validate_dataset

    report = validate_dataset(dataset)  # the official validator when on PATH, else file-name rules
    assert report.ok, list(report)


def test_pybids_indexes_raw_and_truth(dataset):
    import bids

    layout = bids.BIDSLayout(dataset, validate=True)
    assert layout.get_subjects() == ["01", "02"] and layout.get_sessions() == ["1", "2"]
    t1 = layout.get(suffix="T1w", extension=".nii.gz")
    flair = layout.get(suffix="FLAIR", extension=".nii.gz")
    assert len(t1) == 4 and len(flair) == 4
    md = flair[0].get_metadata()
    for key in ("RepetitionTime", "EchoTime", "InversionTime", "FlipAngle", "MagneticFieldStrength", "Manufacturer",
                "ManufacturersModelName", "InstitutionName", "DeviceSerialNumber", "ScanningSequence",
                "SequenceVariant", "PulseSequenceType"):
        assert key in md, key
    assert md["RepetitionTime"] < 20 and md["EchoTime"] < 1 and md["InversionTime"] < md["RepetitionTime"]
    truth = bids.BIDSLayout(dataset / "derivatives" / "truth", validate=False, is_derivative=True)
    assert len(truth.get(suffix="probseg", label="GM", extension=".nii.gz")) == 4
    assert len(truth.get(suffix="mask", desc="lesion", extension=".nii.gz")) == 8  # T1w grid + FLAIR grid
    assert len(truth.get(suffix="R1map", extension=".nii.gz")) == 4
    desc = json.loads((dataset / "derivatives/truth/dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"


def test_participants_sessions_and_protocol_change(dataset):
    part = pd.read_csv(dataset / "participants.tsv", sep="\t")
    assert list(part.columns[:5]) == ["participant_id", "site", "age", "sex", "trajectory"]
    assert sorted(part.site) == ["site1", "site2"]
    assert sorted(part.trajectory) == ["decline", "stable"]
    ses = pd.read_csv(dataset / "sub-01" / "sub-01_sessions.tsv", sep="\t")
    assert list(ses.protocol_changed) == ["no", "yes"] and ses.age[1] == pytest.approx(ses.age[0] + 1)
    sc1 = json.loads((dataset / "sub-02/ses-1/anat/sub-02_ses-1_T1w.json").read_text())
    sc2 = json.loads((dataset / "sub-02/ses-2/anat/sub-02_ses-2_T1w.json").read_text())
    assert (sc1["MagneticFieldStrength"], sc1["FlipAngle"], sc1["RepetitionTime"]) == (1.5, 20.0, 0.0138)
    assert (sc2["MagneticFieldStrength"], sc2["FlipAngle"], sc2["RepetitionTime"]) == (3.0, 90.0, 0.0079)
    assert sc1["SimulationParameters"]["VoxelSize"] == [4.0, 4.0, 4.0]


def test_truth_consistent_with_images(dataset):
    d = dataset / "derivatives/truth/sub-01/ses-1/anat"
    img = nib.load(dataset / "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz")
    probs = [nib.load(d / f"sub-01_ses-1_label-{k}_probseg.nii.gz") for k in ("CSF", "GM", "WM")]
    assert all(np.allclose(p.affine, img.affine) and p.shape == img.shape for p in probs)
    total = sum(np.asarray(p.dataobj) for p in probs)
    assert total.max() <= 1.0 + 1e-5
    dseg = np.asarray(nib.load(d / "sub-01_ses-1_dseg.nii.gz").dataobj)
    assert set(np.unique(dseg)) == {0, 1, 2, 3}
    lesion = np.asarray(nib.load(d / "sub-01_ses-1_desc-lesion_mask.nii.gz").dataobj)
    assert lesion.any() and np.all(dseg[lesion > 0] == 3)
    vol = pd.read_csv(dataset / "derivatives/truth/volumes.tsv", sep="\t")
    row = vol[(vol.participant_id == "sub-01") & (vol.session_id == "ses-1")].iloc[0]
    gm = float(np.asarray(probs[1].dataobj, dtype=np.float64).sum()) * 64.0
    assert row.GM == pytest.approx(gm, rel=1e-3)
    morph = pd.read_csv(d / "sub-01_ses-1_desc-volumes_morph.tsv", sep="\t")
    assert list(morph.columns) == ["method", "label", "volume_mm3"]
    long = pd.read_csv(dataset / "derivatives/truth/longitudinal.tsv", sep="\t").set_index("label")
    assert long.loc["decline", "GM_change_percent"] < long.loc["stable", "GM_change_percent"] < 0
    assert long.loc["decline", "ventricles_change_percent"] > long.loc["stable", "ventricles_change_percent"] > 0
    r1 = nib.load(d / "sub-01_ses-1_R1map.nii.gz")
    assert json.loads((d / "sub-01_ses-1_R1map.json").read_text())["Units"] == "1/s"
    assert 0.2 < np.median(np.asarray(r1.dataobj)[dseg == 3]) < 1.2


def test_same_seed_same_bytes_and_overwrite(dataset, tmp_path):
    import shutil

    first = _files(dataset)
    out = tmp_path / "again"
    (out / "stale").mkdir(parents=True)
    (out / "stale" / "x.txt").write_text("not ours")
    assert cli.main([str(out)] + ARGS) == 2  # non-empty: refused
    assert cli.main([str(out)] + ARGS + ["--overwrite"]) == 2  # a non-simulator folder is never replaced
    assert (out / "stale" / "x.txt").read_text() == "not ours"
    shutil.rmtree(out)
    shutil.copytree(dataset, out)
    (out / "sub-01" / "extra.txt").write_text("left from an earlier run")
    assert cli.main([str(out)] + ARGS) == 2
    # a previous simulator output is replaced; in this process, one subject after the other
    assert cli.main([str(out)] + ARGS + ["--overwrite", "--jobs", "1"]) == 0
    assert _files(out) == first  # same seed, same bytes whatever --jobs (and nothing stale left)


@pytest.mark.parametrize("bad, needle", [
    (["--subjects", "0"], "--subjects"),
    (["--jobs", "0"], "--jobs"),
    (["--sites", "9"], "--sites"),
    (["--modalities", "T1w,DWI"], "DWI"),
    (["--decline-fraction", "1.5"], "--decline-fraction"),
    (["--resolution", "0"], "--resolution"),
    (["--psf", "-1"], "--psf"),
    (["--anatomy-dir", "/nonexistent/anatomy"], "/nonexistent/anatomy"),
])
def test_bad_parameters_write_nothing(tmp_path, capsys, bad, needle):
    out = tmp_path / "out"
    assert cli.main([str(out), "--quiet"] + bad) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_entry_point_exit_code_and_list_sites(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bidsapp.physics.cli", str(tmp_path / "o"), "--sessions", "0"],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2 and "--sessions" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "bidsapp.physics.cli", "--list-sites"], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0 and "mrainet-1.5T-spgr" in r.stdout and "site5" in r.stdout


@pytest.mark.skipif(not ANATOMY.is_dir(), reason="development label maps not present (set SCANBRIDGE_DATA_DIR)")
def test_anatomy_dir_label_maps(tmp_path):
    out = tmp_path / "lab"
    assert cli.main([str(out), "--subjects", "1", "--sites", "1", "--sessions", "1", "--resolution", "4",
                     "--anatomy-dir", str(ANATOMY), "--quiet"]) == 0
    part = pd.read_csv(out / "participants.tsv", sep="\t")
    assert part.anatomy[0] == "anat-01_dseg.nii.gz"
    img = nib.load(out / "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz")
    assert "".join(nib.aff2axcodes(img.affine)) == "LIA" and img.shape[0] > 30


def test_new_lesions_appear_in_follow_ups_with_their_truth(tmp_path, dataset):
    """--new-lesions-per-year: the follow-up's truth marks lesions absent from the baseline; everything
    else keeps its bytes (the new lesions draw from their own random stream)."""
    out = tmp_path / "new"
    assert cli.main([str(out)] + ARGS + ["--new-lesions-per-year", "12"]) == 0
    truth = out / "derivatives" / "truth"
    assert not list(truth.glob("sub-*/ses-1/anat/*newlesion*"))  # nothing is new at baseline
    for sub in ("sub-01", "sub-02"):
        new = np.asarray(nib.load(truth / f"{sub}/ses-2/anat/{sub}_ses-2_desc-newlesion_mask.nii.gz").dataobj) > 0
        before = np.asarray(nib.load(truth / f"{sub}/ses-1/anat/{sub}_ses-1_desc-lesion_mask.nii.gz").dataobj) > 0
        after = np.asarray(nib.load(truth / f"{sub}/ses-2/anat/{sub}_ses-2_desc-lesion_mask.nii.gz").dataobj) > 0
        assert new.any() and not (new & before).any() and (new <= after).all()
    plain, with_new = _files(dataset), _files(out)
    assert all(with_new[k] == v for k, v in plain.items() if "ses-1" in k)
    assert cli.main([str(tmp_path / "bad"), "--new-lesions-per-year", "2", "--quiet"]) == 2  # needs --lesions
