"""Discovery: bad inputs stop with one line naming the file; per-subject problems are skipped with reasons."""

from __future__ import annotations

import json
import math

import pytest
from bids_support import MPRAGE, SPGR, image, make_dataset, tree_digest, write_image, write_json

from bidsapp.bids.discovery import discover, load_bids_filters, normalize_labels
from bidsapp.bids.errors import BIDSInputError


@pytest.fixture
def ds(tmp_path):
    return make_dataset(tmp_path / "bids", subjects=("01", "02", "03"), sessions=("1", "2"))


# ---------------------------------------------------------------- dataset-level errors
def test_nonexistent_bids_dir(tmp_path):
    with pytest.raises(BIDSInputError, match=f"^{tmp_path / 'nope'}: bids_dir does not exist$"):
        discover(tmp_path / "nope")


def test_not_a_bids_dataset(tmp_path):
    (tmp_path / "data/sub-01/anat").mkdir(parents=True)
    with pytest.raises(BIDSInputError, match=r"data: not a BIDS dataset \(no dataset_description.json\)"):
        discover(tmp_path / "data")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BIDSInputError, match="file: bids_dir is not a directory"):
        discover(tmp_path / "file")


def test_malformed_dataset_description(tmp_path):
    root = make_dataset(tmp_path / "bids")
    (root / "dataset_description.json").write_text("{oops")
    with pytest.raises(BIDSInputError, match="dataset_description.json: invalid JSON"):
        discover(root)


def test_incomplete_dataset_description_is_a_warning(tmp_path):
    root = make_dataset(tmp_path / "bids")
    (root / "dataset_description.json").write_text("{}")
    plan = discover(root)
    assert plan.warnings == [f"{root / 'dataset_description.json'}: missing required field(s) Name, BIDSVersion"]
    assert len(plan.runnable_subjects) == 2


def test_no_subjects(tmp_path):
    root = make_dataset(tmp_path / "bids", subjects=())
    with pytest.raises(BIDSInputError, match=r"bids: no subject folders"):
        discover(root)


@pytest.mark.parametrize("inside", ["derivatives/scanbridge", ".", "sub-01/../out"])
def test_output_dir_inside_bids_dir(ds, inside):
    with pytest.raises(BIDSInputError, match="output_dir is inside bids_dir"):
        discover(ds, output_dir=ds / inside)


def test_work_dir_inside_bids_dir_and_symlinked_output(ds, tmp_path):
    with pytest.raises(BIDSInputError, match="work_dir is inside bids_dir"):
        discover(ds, output_dir=tmp_path / "out", work_dir=ds / "work")
    (tmp_path / "link").symlink_to(ds)
    with pytest.raises(BIDSInputError, match="output_dir is inside bids_dir"):
        discover(ds, output_dir=tmp_path / "link" / "out")


# ---------------------------------------------------------------- labels
def test_participant_label_forms(ds):
    assert [s.subject for s in discover(ds, participant_label=["sub-02", "01", "02"]).subjects] == ["02", "01"]
    assert [s.subject for s in discover(ds, participant_label="03").subjects] == ["03"]
    assert [s.subject for s in discover(ds).subjects] == ["01", "02", "03"]


@pytest.mark.parametrize("label", ["../01", "sub-01/ses-1", "01\\x", "/etc"])
def test_participant_label_with_path_separator(ds, label):
    with pytest.raises(BIDSInputError, match=r"participant label .* contains a path separator"):
        discover(ds, participant_label=[label])


def test_invalid_and_unknown_participant_labels(ds):
    with pytest.raises(BIDSInputError, match=r"participant label 'sub-0_1' is not a valid BIDS label"):
        discover(ds, participant_label=["sub-0_1"])
    with pytest.raises(BIDSInputError, match=r"participant label\(s\) 99, 7 not found \(available: 01, 02, 03\)"):
        discover(ds, participant_label=["01", "99", "sub-7"])


def test_session_label(ds):
    plan = discover(ds, session_label=["ses-2"])
    assert all([ses.session for ses in s.sessions] == ["2"] for s in plan.subjects)
    with pytest.raises(BIDSInputError, match=r"session label\(s\) 9 not found for the selected participants \(available: 1, 2\)"):
        discover(ds, session_label=["9"])
    with pytest.raises(BIDSInputError, match="path separator"):
        discover(ds, session_label=["../ses-1"])


def test_session_label_missing_for_one_subject(tmp_path):
    root = make_dataset(tmp_path / "bids", subjects=("01",), sessions=("1", "2"))
    make_dataset(root, subjects=("02",), sessions=("1",), participants=[])
    plan = discover(root, session_label="2")
    assert [s.subject for s in plan.runnable_subjects] == ["01"]
    sub02 = plan.skipped_subjects[0]
    assert sub02.skipped == [(root / "sub-02", f"{root / 'sub-02'}: no session 2")]


def test_normalize_labels():
    assert normalize_labels(None, "sub-") is None
    assert normalize_labels([" sub-01 ", "sub-01", "A2"], "sub-") == ["01", "A2"]


# ---------------------------------------------------------------- filters
def test_filter_file(ds, tmp_path):
    anat = ds / "sub-01/ses-1/anat"
    write_image(anat / "sub-01_ses-1_acq-mprage_T1w.nii.gz")
    write_image(anat / "sub-01_ses-1_acq-fast_T1w.nii.gz")
    flt = tmp_path / "filter.json"
    flt.write_text(json.dumps({"T1w": {"acquisition": "mprage"}}))
    plan = discover(ds, participant_label="01", bids_filter_file=flt)
    ses1 = plan.subjects[0].sessions[0]
    assert [p.name for p in ses1.t1w] == ["sub-01_ses-1_acq-mprage_T1w.nii.gz"]
    # ses-2 has no acq-mprage T1w: that session is skipped, with the filter named in the reason
    assert [s.session for s in plan.subjects[0].sessions] == ["1"]
    assert plan.subjects[0].skipped == [(ds / "sub-01/ses-2", f"{ds / 'sub-01/ses-2'}: no usable T1w, FLAIR, T2w or PDw image matching the BIDS filter")]
    # null = entity absent, short keys accepted
    plan = discover(ds, participant_label="01", bids_filters={"t1w": {"acq": None}})
    assert [p.name for p in plan.subjects[0].sessions[0].t1w] == ["sub-01_ses-1_T1w.nii.gz"]
    plan = discover(ds, participant_label="01", bids_filters={"t1w": {"acq": "*"}})
    assert len(plan.subjects[0].sessions[0].t1w) == 2


def test_filter_with_session_entity(ds):
    plan = discover(ds, bids_filters={"t1w": {"session": "2"}})
    assert all([ses.session for ses in s.sessions] == ["2"] for s in plan.subjects)


@pytest.mark.parametrize(
    "content, expect",
    [
        ("{not json", "BIDS filter file is not valid JSON"),
        ("[1, 2]", "BIDS filter must be a JSON object"),
        ('{"bold": {"task": "rest"}}', "unknown filter key 'bold'"),
        ('{"t1w": "mprage"}', "filter 't1w' must be an object"),
    ],
)
def test_invalid_filter_file(tmp_path, content, expect):
    flt = tmp_path / "filter.json"
    flt.write_text(content)
    with pytest.raises(BIDSInputError, match=expect) as info:
        load_bids_filters(flt)
    assert str(info.value).startswith(f"{flt}: ")
    with pytest.raises(BIDSInputError, match="BIDS filter file does not exist"):
        load_bids_filters(tmp_path / "missing.json")


def test_filter_with_unknown_entity(ds):
    with pytest.raises(BIDSInputError, match=r"bids filter 't1w'.*notanentity"):
        discover(ds, bids_filters={"t1w": {"notanentity": "x"}})


# ---------------------------------------------------------------- images and sidecars
def test_images_and_qmri_maps_are_listed_with_records(ds):
    anat = ds / "sub-01/ses-1/anat"
    for suffix in ("T2w", "FLAIR", "PDw", "T1map", "R1map", "R2starmap", "PDmap"):
        write_image(anat / f"sub-01_ses-1_{suffix}.nii.gz")
    write_image(anat / "sub-01_ses-1_run-2_T1w.nii.gz")
    write_image(anat / "sub-01_ses-1_run-10_T1w.nii.gz")
    write_json(ds / "FLAIR.json", dict(MPRAGE, ScanningSequence="SE_IR", InversionTime=2.5, RepetitionTime=9))
    plan = discover(ds, participant_label="01")
    ses = plan.subjects[0].sessions[0]
    assert [p.name for p in ses.t1w] == ["sub-01_ses-1_T1w.nii.gz", "sub-01_ses-1_run-2_T1w.nii.gz", "sub-01_ses-1_run-10_T1w.nii.gz"]
    assert ses.runs == [2, 10]
    # the plan printed before the run says which T1w is used and which are left out
    assert ("sub-01_ses-1: 3 T1w images; sub-01_ses-1_T1w.nii.gz is used, sub-01_ses-1_run-2_T1w.nii.gz, "
            "sub-01_ses-1_run-10_T1w.nii.gz left out") in plan.summary()
    assert [p.name for p in ses.t2w + ses.flair + ses.pdw] == ["sub-01_ses-1_T2w.nii.gz", "sub-01_ses-1_FLAIR.nii.gz", "sub-01_ses-1_PDw.nii.gz"]
    assert sorted(ses.qmri) == ["PDmap", "R1map", "R2starmap", "T1map"]
    assert len(ses.images) == 3 + 3 + 4 and set(ses.acquisitions) == set(ses.images)
    flair = ses.acquisitions[ses.flair[0]]
    assert flair.sequence_family == "FLAIR" and flair.inversion_time == 2.5
    assert flair.source == "sub-01/ses-1/anat/sub-01_ses-1_FLAIR.nii.gz"
    assert ses.entities[ses.t1w[2]]["run"] == 10


def test_sidecar_inheritance(tmp_path):
    root = make_dataset(tmp_path / "bids", subjects=("01", "02"), sessions=("1",), sidecar={"EchoTime": 0.003})
    write_json(root / "T1w.json", MPRAGE)  # dataset level
    write_json(root / "sub-02/sub-02_T1w.json", {"Manufacturer": "Philips", "ManufacturersModelName": "Achieva"})
    plan = discover(root)
    r1 = plan.subjects[0].sessions[0].acquisitions[plan.subjects[0].sessions[0].t1w[0]]
    r2 = plan.subjects[1].sessions[0].acquisitions[plan.subjects[1].sessions[0].t1w[0]]
    assert r1.echo_time == 0.003 and r1.inversion_time == 0.9 and r1.group_key == "siemens-prismafit-3T-MPRAGE"
    assert r2.group_key == "philips-achieva-3T-MPRAGE" and r2.echo_time == 0.003


def test_subject_without_structural_images_is_skipped_others_go_on(ds):
    for ses in ("1", "2"):
        (ds / f"sub-02/ses-{ses}/anat/sub-02_ses-{ses}_T1w.nii.gz").unlink()
    (ds / "sub-02/ses-1/anat/sub-02_ses-1_T1w.json").unlink(missing_ok=True)
    write_image(ds / "sub-02/ses-1/anat/sub-02_ses-1_T1map.nii.gz")
    plan = discover(ds)
    assert [s.subject for s in plan.runnable_subjects] == ["01", "03"]
    sub02 = plan.skipped_subjects[0]
    assert [r for _, r in sub02.skipped] == [f"{ds / 'sub-02/ses-1'}: no usable T1w, FLAIR, T2w or PDw image",
                                             f"{ds / 'sub-02/ses-2'}: no usable T1w, FLAIR, T2w or PDw image"]
    assert plan.has_problems
    text = plan.summary()
    assert "2 of 3 subject(s) to process" in text and "sub-02: SKIPPED" in text


def test_session_without_t1w_is_processed_on_its_flair_or_t2w(ds):
    """A FLAIR-only (or T2w-only) session is kept: its first FLAIR (then T2w, PDw) is the reference."""
    for ses in ("1", "2"):
        (ds / f"sub-02/ses-{ses}/anat/sub-02_ses-{ses}_T1w.nii.gz").unlink()
    write_image(ds / "sub-02/ses-1/anat/sub-02_ses-1_T2w.nii.gz")
    write_image(ds / "sub-02/ses-1/anat/sub-02_ses-1_FLAIR.nii.gz")
    plan = discover(ds)
    sub02 = plan.subjects[1]
    assert [s.session for s in sub02.sessions] == ["1"]
    ses = sub02.sessions[0]
    assert ses.contrasts == ["FLAIR", "T2w"] and ses.reference.name == "sub-02_ses-1_FLAIR.nii.gz"
    assert [r for _, r in sub02.skipped] == [f"{ds / 'sub-02/ses-2'}: no usable T1w, FLAIR, T2w or PDw image"]
    assert "ses-1: T2w x1, FLAIR x1" in plan.summary()


def test_empty_subject_folder_is_skipped(ds):
    (ds / "sub-04/anat").mkdir(parents=True)
    plan = discover(ds)
    assert [s.subject for s in plan.skipped_subjects] == ["04"]
    assert plan.skipped_subjects[0].skipped[0][1] == f"{ds / 'sub-04'}: no valid BIDS files"
    assert discover(ds, participant_label="04").subjects[0].runnable is False


@pytest.mark.parametrize(
    "make, expect",
    [
        (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
        (lambda p: p.write_bytes(p.read_bytes()[:60]), "truncated"),
        (lambda p: p.write_text("not an image"), "not gzip data"),
        (lambda p: write_image(p, image(shape=(32, 32, 32, 2), zooms=(2, 2, 2))), "4D image with 2 volumes"),
        (lambda p: write_image(p, image(fill=0)), "all voxels are zero"),
        (lambda p: write_image(p, image(fill=math.nan)), "no finite values"),
    ],
)
def test_bad_t1w_is_skipped_with_a_message_naming_it(ds, make, expect):
    bad = ds / "sub-03/ses-2/anat/sub-03_ses-2_T1w.nii.gz"
    make(bad)
    plan = discover(ds)
    sub03 = plan.subjects[2]
    assert [s.session for s in sub03.sessions] == ["1"]  # the other session still runs
    reasons = dict(sub03.skipped)
    assert expect in reasons[bad] and reasons[bad].startswith(f"{bad}: ")
    assert reasons[bad.parent.parent] == (f"{bad.parent.parent}: no usable T1w, FLAIR, T2w or PDw image "
                                          "(1 failed the image checks)")
    assert f"{bad}: " in plan.summary()


def test_single_volume_4d_is_kept_with_a_warning(ds):
    p = ds / "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"
    write_image(p, image(shape=(32, 32, 32, 1), zooms=(2, 2, 2)))
    sub = discover(ds, participant_label="01").subjects[0]
    assert p in sub.sessions[0].t1w
    assert any(w.startswith(f"{p}: 4D image with a single volume") for w in sub.warnings)


def test_missing_and_malformed_sidecars_are_warnings(ds):
    (ds / "sub-01/ses-1/anat/sub-01_ses-1_T1w.json").unlink()
    bad = ds / "sub-01/ses-2/anat/sub-01_ses-2_T1w.json"
    bad.write_text('{"RepetitionTime": 2.3,')
    write_json(ds / "sub-02/ses-1/anat/sub-02_ses-1_T1w.json", {"Manufacturer": "Siemens", "RepetitionTime": 2300})
    plan = discover(ds)
    assert [s.subject for s in plan.runnable_subjects] == ["01", "02", "03"]
    assert plan.warnings == [f"{bad}: malformed JSON sidecar, ignored (Expecting property name enclosed in double quotes: "
                             "line 1 column 24 (char 23))"]
    sub01, sub02 = plan.subjects[0], plan.subjects[1]
    t1 = ds / "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"
    assert any(w.startswith(f"{t1}: no sidecar metadata") for w in sub01.warnings)
    # the image whose sidecar is broken is not described as having none
    t1b = ds / "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz"
    assert any(w.startswith(f"{t1b}: its sidecar sub-01_ses-2_T1w.json is not valid JSON (ignored); unknown: ")
               for w in sub01.warnings)
    assert not any(w.startswith(f"{t1b}: no sidecar metadata") for w in sub01.warnings)
    t2 = ds / "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz"
    assert f"{t2}: sidecar is missing or has malformed ManufacturersModelName, MagneticFieldStrength, EchoTime, FlipAngle" in sub02.warnings
    assert f"{t2}: RepetitionTime=2300 looks like milliseconds; using 2.3 s" in sub02.warnings
    assert sub02.sessions[0].acquisitions[t2].repetition_time == 2.3


def test_non_bids_names_are_not_processed(ds):
    write_image(ds / "sub-01/ses-1/anat/sub-01_T1w_copy.nii.gz")
    ses = discover(ds, participant_label="01").subjects[0].sessions[0]
    assert [p.name for p in ses.t1w] == ["sub-01_ses-1_T1w.nii.gz"]


# ---------------------------------------------------------------- participants and sites
def test_participants_columns_and_sites(tmp_path):
    participants = [
        {"participant_id": "sub-01", "site": "Leiden", "age": 61, "sex": "F", "group": "control"},
        {"participant_id": "02", "site": "n/a", "age": "n/a", "sex": "M", "group": "patient"},
    ]
    root = make_dataset(tmp_path / "bids", subjects=("01", "02", "03"), sessions=("1", "2"), participants=participants)
    (root / "sub-01/sub-01_sessions.tsv").write_text("session_id\tsite\nses-1\tLeiden\nses-2\tDelft\n")
    plan = discover(root)
    assert list(plan.participants.columns) == ["participant_id", "site", "age", "sex", "group"]
    assert plan.participants["age"].tolist()[0] == 61 and math.isnan(plan.participants["age"].tolist()[1])
    sub01, sub02, sub03 = plan.subjects
    assert sub01.participant == {"participant_id": "sub-01", "site": "Leiden", "age": 61, "sex": "F", "group": "control"}
    assert sub02.participant["participant_id"] == "sub-02" and sub02.participant["age"] is None
    assert sub03.participant == {}
    sites = [(s.session, s.site, s.acquisitions[s.t1w[0]].site_source) for s in sub01.sessions]
    assert sites == [("1", "Leiden", "sessions.tsv"), ("2", "Delft", "sessions.tsv")]
    rec02 = sub02.sessions[0].acquisitions[sub02.sessions[0].t1w[0]]
    assert (rec02.site, rec02.site_source) == ("Hospital A", "InstitutionName")
    table = plan.acquisition_table()
    assert len(table) == 6 and set(table["acq_group"]) == {"siemens-prismafit-3T-MPRAGE"}
    assert table.loc[1, ["participant_id", "session_id", "site"]].tolist() == ["sub-01", "ses-2", "Delft"]


def test_bad_participants_tsv_is_a_warning(tmp_path):
    root = make_dataset(tmp_path / "bids", participants=[{"subject": "01", "site": "A"}])
    plan = discover(root)
    assert plan.warnings == [f"{root / 'participants.tsv'}: no participant_id column; ignored"]
    assert len(plan.runnable_subjects) == 2


def test_multi_site_groups(tmp_path):
    root = make_dataset(tmp_path / "bids", subjects=("01",), sessions=("1",))
    make_dataset(root, subjects=("02",), sessions=("1",), participants=[], sidecar=SPGR)
    groups = sorted(set(discover(root).acquisition_table()["acq_group"]))
    assert groups == ["ge-discoverymr750-1.5T-SPGR", "siemens-prismafit-3T-MPRAGE"]


def test_dataset_without_sessions(tmp_path):
    root = make_dataset(tmp_path / "bids", subjects=("01",), sessions=())
    ses = discover(root).subjects[0].sessions[0]
    assert ses.session is None and ses.label == "sub-01" and len(ses.t1w) == 1


def test_check_images_false_does_not_read_images(ds):
    (ds / "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz").write_bytes(b"")
    plan = discover(ds, participant_label="01", check_images=False)
    assert len(plan.subjects[0].sessions) == 2 and not plan.has_problems


# ---------------------------------------------------------------- read-only input
def test_bids_dir_is_never_written(ds, tmp_path):
    (ds / "sub-01/ses-2/anat/sub-01_ses-2_T1w.json").write_text("{broken")
    (ds / "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz").write_bytes(b"")
    before = tree_digest(ds)
    ds.chmod(0o555)
    try:
        plan = discover(ds, output_dir=tmp_path / "out", work_dir=tmp_path / "work")
        plan.summary()
        plan.acquisition_table()
    finally:
        ds.chmod(0o755)
    assert tree_digest(ds) == before


def test_make_dataset_is_valid_bids(tmp_path):
    from bids_validator import BIDSValidator

    root = make_dataset(tmp_path / "ds")
    v = BIDSValidator()
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files and all(v.is_bids("/" + p.relative_to(root).as_posix()) for p in files)


def test_session_dates_come_from_sessions_tsv_else_scans_tsv(tmp_path):
    root = make_dataset(tmp_path / "bids", subjects=("01", "02"), sessions=("1", "2"))
    (root / "sub-01/sub-01_sessions.tsv").write_text("session_id\tacq_time\nses-1\t2019-05-02T09:30:00\nses-2\tn/a\n")
    (root / "sub-01/ses-2/sub-01_ses-2_scans.tsv").write_text(
        "filename\tacq_time\nanat/sub-01_ses-2_T1w.nii.gz\t2020-05-04T10:00:00\n")
    plan = discover(root)
    times = {(s.subject, s.session): s.acq_time for sub in plan.subjects for s in sub.sessions}
    assert times[("01", "1")] == "2019-05-02T09:30:00"
    assert times[("01", "2")] == "2020-05-04T10:00:00"  # sessions.tsv has n/a: the scan's time
    assert times[("02", "1")] is None


def test_an_image_without_sequence_parameters_borrows_those_of_its_protocol(tmp_path):
    """A T1w whose sidecar was lost takes the family and parameters of the dataset's T1w with the same
    acq- label and grid, when they agree; run for one participant, the donors are still the whole
    dataset's. Scanner identity is not borrowed; a different grid, or donors that disagree, give nothing."""
    root = make_dataset(tmp_path / "bids", subjects=("01", "02", "03", "04"), sessions=None)
    lost = root / "sub-03" / "anat" / "sub-03_T1w.json"
    lost.unlink()
    write_json(root / "sub-04" / "anat" / "sub-04_T1w.json", {"Manufacturer": "Siemens"})  # parameters stripped
    plan = discover(root, participant_label=["03", "04"])
    for sub in ("03", "04"):
        path = root / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz"
        rec = plan.subjects[["03", "04"].index(sub)].sessions[0].acquisitions[path]
        assert rec.sequence_family == "MPRAGE" and rec.family_source == "borrowed"
        assert rec.inversion_time == 0.9 and rec.field_strength == 3
        assert rec.parameters_from == "sub-01/anat/sub-01_T1w.nii.gz"
        assert any("using sub-01/anat/sub-01_T1w.nii.gz's (MPRAGE; 2 image(s)" in w
                   for w in plan.subjects[["03", "04"].index(sub)].warnings)
    assert plan.subjects[0].sessions[0].acquisitions[root / "sub-03/anat/sub-03_T1w.nii.gz"].manufacturer is None
    from bidsapp.models.tissue import parameter_vector

    pv = parameter_vector(plan.subjects[0].sessions[0].acquisitions[root / "sub-03/anat/sub-03_T1w.nii.gz"].to_dict())
    assert pv.values is not None and pv.parameters_from == "sub-01/anat/sub-01_T1w.nii.gz"

    write_image(root / "sub-03" / "anat" / "sub-03_T1w.nii.gz", image(zooms=(2.5, 2.5, 2.5)))  # another grid
    rec = discover(root, participant_label=["03"]).subjects[0].sessions[0].acquisitions[
        root / "sub-03/anat/sub-03_T1w.nii.gz"]
    assert rec.sequence_family == "UNKNOWN" and rec.parameters_from is None

    write_json(root / "sub-02" / "anat" / "sub-02_T1w.json", SPGR)  # the donors now disagree
    plan = discover(root, participant_label=["04"])
    rec = plan.subjects[0].sessions[0].acquisitions[root / "sub-04/anat/sub-04_T1w.nii.gz"]
    assert rec.parameters_from is None and any("disagree" in w for w in plan.subjects[0].warnings)
