"""Derivative naming, BIDS URIs, atomic writing, sidecars, dataset description, pybids indexing, collection."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from bids_support import MPRAGE, image, make_dataset

from bidsapp.bids import collect, derivatives as d
from bidsapp.bids.acquisition import AcquisitionRecord

SRC = "/bids/sub-01/ses-1/anat/sub-01_ses-1_acq-mprage_ce-gad_rec-norm_run-2_T1w.nii.gz"
TEMPLATE = "MNI152NLin2009cAsym"


def test_derivative_path_keeps_source_entities_in_bids_order(tmp_path):
    p = d.derivative_path(tmp_path, SRC, suffix="T1w", extension=".nii.gz", desc="preproc")
    assert p == tmp_path / "sub-01/ses-1/anat/sub-01_ses-1_acq-mprage_ce-gad_rec-norm_run-2_desc-preproc_T1w.nii.gz"
    p = d.derivative_path(tmp_path, SRC, suffix="probseg", extension="nii.gz", label="GM", desc="atropos", space=TEMPLATE)
    assert p.name == f"sub-01_ses-1_acq-mprage_ce-gad_rec-norm_run-2_space-{TEMPLATE}_label-GM_desc-atropos_probseg.nii.gz"
    p = d.derivative_path(tmp_path, SRC, suffix="xfm", extension=".mat", from_="T1w", to=TEMPLATE, mode="image")
    assert p.name == f"sub-01_ses-1_acq-mprage_ce-gad_rec-norm_run-2_from-T1w_to-{TEMPLATE}_mode-image_xfm.mat"


def test_derivative_path_without_session_and_other_entities_dropped(tmp_path):
    p = d.derivative_path(tmp_path, "sub-07_echo-1_part-mag_T1w.nii.gz", suffix="mask", extension=".nii.gz", desc="brain")
    assert p == tmp_path / "sub-07/anat/sub-07_desc-brain_mask.nii.gz"
    assert d.derivative_path(tmp_path, p, suffix="dseg", extension=".nii.gz", datatype="anat").name == "sub-07_dseg.nii.gz"


@pytest.mark.parametrize("bad", [{"desc": "pre_proc"}, {"label": "G-M"}, {"desc": ""}, {"suffix": "T1w_x"}])
def test_derivative_path_rejects_values_that_corrupt_names(tmp_path, bad):
    kwargs = {"suffix": "T1w", "extension": ".nii.gz", **bad}
    with pytest.raises(ValueError, match="invalid BIDS"):
        d.derivative_path(tmp_path, SRC, **kwargs)


def test_derivative_path_needs_a_bids_source(tmp_path):
    with pytest.raises(ValueError, match="scan.nii.gz"):
        d.derivative_path(tmp_path, "/data/scan.nii.gz", suffix="T1w", extension=".nii.gz")


def test_parse_entities_round_trip():
    ents = d.parse_entities(f"sub-01_ses-1_run-2_from-T1w_to-{TEMPLATE}_mode-image_xfm.mat")
    assert ents == {"sub": "01", "ses": "1", "run": "2", "from": "T1w", "to": TEMPLATE, "mode": "image",
                    "suffix": "xfm", "extension": ".mat"}
    assert d.parse_entities("README") is None
    assert d.parse_entities("sub-01_badpart_T1w.nii.gz") is None
    assert d.sidecar_path("/o/sub-01_dseg.nii.gz").name == "sub-01_dseg.json"


def test_bids_uri(tmp_path):
    raw = tmp_path / "raw"
    f = raw / "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"
    assert d.bids_uri(f, raw) == "bids:raw:sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"
    assert d.bids_uri("sub-01/anat/x.nii.gz", raw, dataset="") == "bids::sub-01/anat/x.nii.gz"
    with pytest.raises(ValueError, match="not inside"):
        d.bids_uri(tmp_path / "elsewhere/sub-01_T1w.nii.gz", raw)


def test_atomic_writes_replace_and_leave_no_temporaries(tmp_path):
    target = tmp_path / "a/b/sub-01_desc-volumes_morph.tsv"
    d.atomic_write_bytes(target, b"old")
    d.atomic_write_tsv(target, pd.DataFrame({"method": ["atropos"], "label": ["GM"], "volume_mm3": [np.float32(1.5)]}))
    assert target.read_text() == "method\tlabel\tvolume_mm3\natropos\tGM\t1.5\n"
    d.atomic_write_tsv(target, [{"a": 1, "b": None}, {"a": float("nan"), "c": "x\ty"}])
    assert target.read_text().splitlines() == ["a\tb\tc", "1\tn/a\tn/a", "n/a\tn/a\tx y"]
    copy = d.atomic_copy(target, tmp_path / "copy.tsv")
    assert copy.read_bytes() == target.read_bytes()
    assert oct(copy.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_crash_during_a_write_leaves_neither_half_file_nor_temporary(tmp_path):
    target = tmp_path / "sub-01_desc-preproc_T1w.nii.gz"
    d.atomic_write_bytes(target, b"complete old content")
    with pytest.raises(RuntimeError):
        with d.atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"complete old content"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    new = tmp_path / "sub-01_dseg.nii.gz"
    with pytest.raises(FileNotFoundError):
        with d.atomic_output(new):
            pass  # the writer produced nothing
    assert not new.exists()


def test_atomic_save_nifti_keeps_format_from_extension(tmp_path):
    import nibabel as nib

    path = d.atomic_save_nifti(image(), tmp_path / "sub-01_desc-preproc_T1w.nii.gz")
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    assert nib.load(str(path)).shape == (32, 32, 32)


def test_json_refuses_unknown_objects_and_writes_nan_as_null(tmp_path):
    p = d.atomic_write_json(tmp_path / "x.json", {"a": np.float32(0.5), "b": float("nan"), "c": tmp_path, "d": np.arange(2)})
    assert json.loads(p.read_text()) == {"a": 0.5, "b": None, "c": str(tmp_path), "d": [0, 1]}
    with pytest.raises(TypeError):
        d.atomic_write_json(tmp_path / "y.json", {"a": object()})
    assert not (tmp_path / "y.json").exists()


def test_write_sidecar_with_sources_and_acquisition(tmp_path):
    rec = AcquisitionRecord.from_metadata(MPRAGE, suffix="T1w", source="sub-01/anat/sub-01_T1w.nii.gz")
    data = tmp_path / "sub-01/anat/sub-01_label-GM_probseg.nii.gz"
    side = d.write_sidecar(data, Sources=["bids:raw:sub-01/anat/sub-01_T1w.nii.gz"], acquisition=rec,
                           Method={"Name": "atropos"}, RepetitionTime=9.9)
    assert side == data.with_name("sub-01_label-GM_probseg.json")
    doc = json.loads(side.read_text())
    assert doc["Sources"] == ["bids:raw:sub-01/anat/sub-01_T1w.nii.gz"]
    assert doc["InversionTime"] == 0.9 and doc["MagneticFieldStrength"] == 3
    assert doc["RepetitionTime"] == 9.9  # explicit fields win over the record's
    assert AcquisitionRecord.from_dict(doc["Acquisition"]) == rec
    assert doc["Method"] == {"Name": "atropos"}


def test_dataset_description_and_container(tmp_path, monkeypatch):
    raw = make_dataset(tmp_path / "raw", subjects=("01",))
    desc = json.loads((raw / "dataset_description.json").read_text())
    desc["DatasetDOI"] = "doi:10.1/x"
    (raw / "dataset_description.json").write_text(json.dumps(desc))
    monkeypatch.setenv("SCANBRIDGE_CONTAINER_TYPE", "docker")
    monkeypatch.setenv("SCANBRIDGE_CONTAINER_IMAGE", "scanbridge:0.1.0")
    path = d.write_dataset_description(tmp_path / "out", "0.1.0", bids_dir=raw)
    doc = json.loads(path.read_text())
    assert doc["DatasetType"] == "derivative" and doc["BIDSVersion"]
    assert doc["GeneratedBy"] == [{"Name": "scanbridge", "Version": "0.1.0",
                                   "Container": {"Type": "docker", "Tag": "scanbridge:0.1.0"}}]
    assert doc["DatasetLinks"] == {"raw": raw.resolve().as_uri()}
    assert doc["SourceDatasets"] == [{"URL": raw.resolve().as_uri(), "DOI": "doi:10.1/x"}]
    monkeypatch.delenv("SCANBRIDGE_CONTAINER_TYPE")
    from bidsapp import __version__

    doc = json.loads(d.write_dataset_description(tmp_path / "out2").read_text())
    assert doc["GeneratedBy"][0] == {"Name": "scanbridge", "Version": __version__}
    assert d.container_info({"APPTAINER_NAME": "scanbridge.sif"}) == {"Type": "apptainer", "Tag": "scanbridge.sif"}


def test_dseg_lookup_table_and_volumes_tsv(tmp_path):
    dseg = tmp_path / "sub-01_desc-atropos_dseg.nii.gz"
    lut = d.write_dseg_tsv(dseg)
    assert lut.name == "sub-01_desc-atropos_dseg.tsv"
    assert lut.read_text() == "index\tname\n0\tbackground\n1\tCSF\n2\tGM\n3\tWM\n"
    with pytest.raises(ValueError, match="volume_mm3"):
        d.write_volumes_tsv(tmp_path / "v.tsv", [{"method": "atropos", "label": "GM"}])


def _write_outputs(out, raw_t1w, raw_dir, *, with_atropos_variant=True):
    """What a participant run writes, through the public API only."""
    rec = AcquisitionRecord.from_metadata(MPRAGE, suffix="T1w", source=str(raw_t1w.relative_to(raw_dir)))
    src = [d.bids_uri(raw_t1w, raw_dir)]
    img = image()

    def nii(**kw):
        p = d.derivative_path(out, raw_t1w, extension=".nii.gz", **kw)
        d.atomic_save_nifti(img, p)
        d.write_sidecar(p, Sources=src, acquisition=rec)
        return p

    nii(suffix="T1w", desc="preproc")
    nii(suffix="mask", desc="brain")
    for label in ("CSF", "GM", "WM"):
        nii(suffix="probseg", label=label)
        if with_atropos_variant:
            nii(suffix="probseg", label=label, desc="atropos")
    d.write_dseg_tsv(nii(suffix="dseg"))
    if with_atropos_variant:
        d.write_dseg_tsv(nii(suffix="dseg", desc="atropos"))
    nii(suffix="T1w", desc="preproc", space=TEMPLATE)
    for a, b in (("T1w", TEMPLATE), (TEMPLATE, "T1w")):
        d.atomic_write_bytes(d.derivative_path(out, raw_t1w, suffix="xfm", extension=".mat", from_=a, to=b, mode="image"), b"\0" * 8)
    morph = d.derivative_path(out, raw_t1w, suffix="morph", extension=".tsv", desc="volumes")
    d.write_volumes_tsv(morph, [{"method": m, "label": t, "volume_mm3": v}
                                for m in ("atropos", "unet-physics") for t, v in (("GM", 600.0), ("WM", 500.0))])
    d.write_sidecar(morph, Sources=src)


@pytest.fixture
def output_tree(tmp_path):
    raw = make_dataset(tmp_path / "raw", subjects=("01", "02"), sessions=("1", "2"))
    out = tmp_path / "out"
    d.write_dataset_description(out, "0.1.0", bids_dir=raw)
    for t1w in sorted(raw.rglob("*_T1w.nii.gz")):
        _write_outputs(out, t1w, raw)
    (out / "sub-01.html").write_text("<html></html>")
    return raw, out


def test_pybids_indexes_the_output_folder(output_tree):
    import bids

    raw, out = output_tree
    layout = bids.BIDSLayout(out, validate=False, is_derivative=True)
    assert layout.get_subjects() == ["01", "02"] and layout.get_sessions() == ["1", "2"]
    gm = layout.get(subject="01", session="1", suffix="probseg", label="GM", desc=bids.layout.Query.NONE,
                    extension=".nii.gz")
    assert [f.filename for f in gm] == ["sub-01_ses-1_label-GM_probseg.nii.gz"]
    xfm = layout.get(subject="02", session="2", suffix="xfm", to=TEMPLATE, extension=".mat")
    assert len(xfm) == 1 and xfm[0].entities["from"] == "T1w"
    meta = layout.get_metadata(gm[0].path)
    assert meta["Sources"] == ["bids:raw:sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"]
    # as the derivatives of a raw layout, too
    both = bids.BIDSLayout(raw, derivatives=str(out))
    assert both.get(scope="derivatives", suffix="mask", desc="brain", extension=".nii.gz", return_type="file")


def test_collect_derivatives(output_tree):
    raw, out = output_tree
    entries = collect.collect_derivatives(out)
    assert [(e["subject"], e["session"]) for e in entries] == [("01", "1"), ("01", "2"), ("02", "1"), ("02", "2")]
    e = collect.collect_derivatives(out, subject="sub-01", session="2")[0]
    anat = out / "sub-01/ses-2/anat"
    assert e["preproc_t1w"] == anat / "sub-01_ses-2_desc-preproc_T1w.nii.gz"
    assert e["brain_mask"] == anat / "sub-01_ses-2_desc-brain_mask.nii.gz"
    assert sorted(e["probseg"]) == ["CSF", "GM", "WM"]
    assert e["dseg"].name == "sub-01_ses-2_dseg.nii.gz" and e["dseg_tsv"].name == "sub-01_ses-2_dseg.tsv"
    assert e["variants"]["atropos"]["probseg"]["WM"].name == "sub-01_ses-2_label-WM_desc-atropos_probseg.nii.gz"
    assert e["variants"]["atropos"]["dseg_tsv"].name == "sub-01_ses-2_desc-atropos_dseg.tsv"
    assert e["morph"] == {"volumes": anat / "sub-01_ses-2_desc-volumes_morph.tsv"}
    assert {(x["from"], x["to"]) for x in e["xfms"]} == {("T1w", TEMPLATE), (TEMPLATE, "T1w")}
    assert [p.name for p in e["other"]] == [f"sub-01_ses-2_space-{TEMPLATE}_desc-preproc_T1w.nii.gz"]
    assert e["sidecars"][e["preproc_t1w"]]["Acquisition"]["sequence_family"] == "MPRAGE"
    assert e["report"] == out / "sub-01.html"
    assert collect.collect_derivatives(out, subject="02")[0]["report"] is None


def test_subject_level_derivatives_are_no_session(output_tree):
    """A subject with sessions keeps its longitudinal outputs in sub-<label>/anat: not a session-less entry
    (the report drew it as a session without images, and read its change table as a volume table)."""
    raw, out = output_tree
    anat = out / "sub-01" / "anat"
    anat.mkdir()
    (anat / "sub-01_desc-change_morph.tsv").write_text("measure\tses_from\tses_to\nbrain\t1\t2\n")
    (anat / "sub-01_desc-template_T1w.nii.gz").write_bytes(b"")
    entries = collect.collect_derivatives(out, subject="01")
    assert [(e["subject"], e["session"]) for e in entries] == [("01", "1"), ("01", "2")]


def test_collect_ignores_leftover_temporaries_and_reports_bad_sidecars(output_tree):
    raw, out = output_tree
    anat = out / "sub-02/ses-1/anat"
    (anat / ".sub-02_ses-1_dseg.tmp-1234.nii.gz").write_bytes(b"half")
    (anat / "sub-02_ses-1_desc-brain_mask.json").write_text("{broken")
    e = collect.collect_derivatives(out, "02", "1")[0]
    assert all(not p.name.startswith(".") for p in e["other"])
    assert e["warnings"] == [f"{anat / 'sub-02_ses-1_desc-brain_mask.json'}: unreadable sidecar "
                             f"(Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"]


def test_collect_volumes_and_acquisitions(output_tree):
    raw, out = output_tree
    bad = out / "sub-02/ses-2/anat/sub-02_ses-2_desc-volumes_morph.tsv"
    bad.write_text("method\tvolume\natropos\t1\n")
    vols = collect.collect_volumes(out)
    assert len(vols) == 3 * 4
    assert set(vols["method"]) == {"atropos", "unet-physics"}
    assert vols.attrs["warnings"] == [f"{bad}: volumes table lacks column(s) label, volume_mm3"]
    row = vols[(vols.participant_id == "sub-01") & (vols.session_id == "ses-2") & (vols.method == "atropos") & (vols.label == "GM")]
    assert row["volume_mm3"].tolist() == [600.0]
    acq = collect.collect_acquisitions(out)
    assert len(acq) == 4 and set(acq["acq_group"]) == {"siemens-prismafit-3T-MPRAGE"}
    assert acq["repetition_time"].tolist() == [2.3] * 4


def test_save_derivative_in_one_call(tmp_path):
    import nibabel as nib

    raw = make_dataset(tmp_path / "raw", subjects=("01",))
    t1w = raw / "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"
    out = tmp_path / "out"
    rec = AcquisitionRecord.from_metadata(MPRAGE, suffix="T1w")
    pre = d.save_derivative(image(), out, t1w, bids_dir=raw, suffix="T1w", desc="preproc", acquisition=rec,
                            sidecar={"SkullStripped": False})
    assert pre == out / "sub-01/ses-1/anat/sub-01_ses-1_desc-preproc_T1w.nii.gz" and nib.load(str(pre)).shape == (32, 32, 32)
    doc = json.loads(d.sidecar_path(pre).read_text())
    assert doc["Sources"] == ["bids:raw:sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"]
    assert doc["SkullStripped"] is False and doc["Acquisition"]["group_key"] == rec.group_key
    xfm_file = tmp_path / "node_output.mat"
    xfm_file.write_bytes(b"affine")
    xfm = d.save_derivative(xfm_file, out, t1w, bids_dir=raw, suffix="xfm", extension=".mat", sources=[pre],
                            from_="T1w", to=TEMPLATE, mode="image")
    assert xfm.read_bytes() == b"affine"
    assert json.loads(d.sidecar_path(xfm).read_text())["Sources"] == ["bids::sub-01/ses-1/anat/sub-01_ses-1_desc-preproc_T1w.nii.gz"]


def test_pybids_validates_the_output_as_a_derivative_dataset(output_tree):
    import bids

    raw, out = output_tree
    layout = bids.BIDSLayout(out, validate=True, is_derivative=True)
    assert layout.get_subjects() == ["01", "02"]


def test_a_failed_subjects_outputs_are_marked_incomplete_until_a_rerun_finishes(tmp_path):
    anat = tmp_path / "sub-01" / "ses-1" / "anat"
    anat.mkdir(parents=True)
    (anat / "sub-01_ses-1_desc-preproc_T1w.json").write_text(json.dumps({"SkullStripped": False}))
    (tmp_path / "sub-02.json").write_text("{}")  # other subjects are not touched
    assert d.mark_incomplete(tmp_path, "01", "the run of sub-01 failed (boom)") == 1
    doc = json.loads((anat / "sub-01_ses-1_desc-preproc_T1w.json").read_text())
    assert doc == {"SkullStripped": False, d.INCOMPLETE: "the run of sub-01 failed (boom)"}
    assert d.mark_incomplete(tmp_path, "01", None) == 1
    assert json.loads((anat / "sub-01_ses-1_desc-preproc_T1w.json").read_text()) == {"SkullStripped": False}
    assert d.mark_incomplete(tmp_path, "01", None) == 0 and d.mark_incomplete(tmp_path, "03", "x") == 0
