"""The method protocol: a tiny method of each level is registered, wired and written without touching
any other module; a FLAIR-only session runs brain extraction and the methods that need no T1w."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, traits

from bidsapp import methods as M
from bidsapp.labels import LESION, TISSUE, Label, LabelSet

BRIGHT = LabelSet("bright", (Label("bright", 1, "#ff00ff", "brightest tenth of the brain"),), main_desc="bright")


# ------------------------------------------------------------------ a session-level example method
class _BrightInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="FLAIR on the session's reference grid")
    mask_file = File(exists=True, mandatory=True)
    t1w_file = File(exists=True, desc="optional T1w on the same grid")


class _BrightOutputSpec(TraitedSpec):
    mask = File(exists=True)
    volumes_tsv = File(exists=True)
    metadata = traits.Dict()
    warnings = traits.List(traits.Str)


class Bright(SimpleInterface):
    """The brightest 10 % of the brain on the FLAIR: a stand-in for a lesion method."""

    input_spec = _BrightInputSpec
    output_spec = _BrightOutputSpec

    def _run_interface(self, runtime):
        img = nib.load(self.inputs.in_file)
        data = np.asarray(img.dataobj, dtype=np.float32)
        brain = np.asarray(nib.load(self.inputs.mask_file).dataobj) > 0
        out = (data > np.percentile(data[brain], 90)) & brain
        path = f"{runtime.cwd}/bright.nii.gz"
        nib.save(nib.Nifti1Image(out.astype(np.uint8), img.affine), path)
        vox = float(np.prod(img.header.get_zooms()[:3]))
        tsv = f"{runtime.cwd}/volumes.tsv"
        pd.DataFrame([{"method": "bright", "label": "bright", "volume_mm3": out.sum() * vox}]).to_csv(
            tsv, sep="\t", index=False)
        used = ["FLAIR"] + (["T1w"] if self.inputs.t1w_file else [])
        self._results.update(mask=path, volumes_tsv=tsv, metadata={"Method": "bright", "ContrastsUsed": used},
                             warnings=[])
        return runtime


def bright_node(name, options):
    from nipype.pipeline import engine as pe

    return pe.Node(Bright(), name=name)


# ------------------------------------------------------------------ a subject-level example method
class _ChangeInputSpec(BaseInterfaceInputSpec):
    in_files = traits.List(File(exists=True))
    mask_files = traits.List(File(exists=True), mandatory=True)
    volumes_files = traits.List(File(exists=True))
    session_ids = traits.List(traits.Str, mandatory=True)


class _ChangeOutputSpec(TraitedSpec):
    out_tsv = File(exists=True)
    metadata = traits.Dict()
    warnings = traits.List(traits.Str)


class MaskChange(SimpleInterface):
    """Brain-mask volume of every session and its change from the first: a stand-in for a longitudinal method."""

    input_spec = _ChangeInputSpec
    output_spec = _ChangeOutputSpec

    def _run_interface(self, runtime):
        rows = []
        for ses, path in zip(self.inputs.session_ids, self.inputs.mask_files):
            img = nib.load(path)
            ml = float((np.asarray(img.dataobj) > 0).sum() * np.prod(img.header.get_zooms()[:3]) / 1000)
            rows.append({"session_id": f"ses-{ses}", "brain_ml": round(ml, 1)})
        table = pd.DataFrame(rows)
        table["change_ml"] = (table["brain_ml"] - table["brain_ml"].iloc[0]).round(1)
        path = f"{runtime.cwd}/change.tsv"
        table.to_csv(path, sep="\t", index=False)
        self._results.update(out_tsv=path, metadata={"Method": "maskchange"}, warnings=[])
        return runtime


def change_node(name, options):
    from nipype.pipeline import engine as pe

    return pe.Node(MaskChange(), name=name)


# ------------------------------------------------------------------ a group-level example method
def session_count(ctx):
    from bidsapp.reports.html import Section, table_html

    counts = ctx.volumes.groupby("participant_id")["session_id"].nunique().rename("sessions").reset_index()
    return [Section(title="sessions per participant", body=table_html(counts))]


def register_examples() -> list:
    return [
        M.register(M.Method("bright", M.SESSION, bright_node, task="bright", needs=(("FLAIR",),), optional=("T1w",),
                            labels=BRIGHT, outputs=("mask", "volumes"), default=False)),
        M.register(M.Method("maskchange", M.SUBJECT, change_node, needs=(("FLAIR", "T1w"),), min_sessions=2,
                            default=False)),
        M.register(M.Method("sessioncount", M.GROUP, session_count, title="session count", default=False)),
    ]


@pytest.fixture
def example_methods():
    added = register_examples()
    yield added
    for m in added:
        M.unregister(m.key)


def test_a_method_declares_what_it_needs_and_the_plan_says_why_it_is_left_out(example_methods):
    keys = M.select(["atropos"], ["bright"])
    assert keys == ("atropos", "lesion", "wmh", "bright")  # lesion, wmh: built-in defaults
    flair_only = M.plan_session(keys, ["FLAIR"])
    assert flair_only.reference == "FLAIR" and flair_only.run == ["lesion", "wmh", "bright"]
    assert flair_only.skipped == ["atropos skipped: needs T1w (session has FLAIR)"]
    t1_only = M.plan_session(keys, ["T1w"])
    assert t1_only.run == ["atropos"] and "bright skipped: needs FLAIR" in t1_only.skipped[-1]
    assert M.get("bright").contrasts_used(["T1w", "FLAIR"]) == ("FLAIR", "T1w")
    run, why = M.plan_subject(["maskchange"], [["T1w"], ["FLAIR"]])
    assert run == ["maskchange"] and not why
    run, why = M.plan_subject(["maskchange"], [["T1w", "FLAIR"]])
    assert run == [] and why == ["maskchange skipped: needs 2 session(s) with FLAIR or T1w, the subject has 1"]
    assert M.main_answers(["unet-physics", "atropos", "bright"]) == {"unet-physics": True, "atropos": False,
                                                                   "bright": True}
    with pytest.raises(ValueError, match="unknown segmentation method"):
        M.select(["bright"])  # not a tissue method
    with pytest.raises(ValueError, match="unknown contrast"):
        M.Method("x", M.SESSION, bright_node, needs=(("DWI",),))
    with pytest.raises(ValueError, match="one-label set"):
        M.Method("x", M.SESSION, bright_node, labels=TISSUE, outputs=("mask",))


def test_built_in_methods_are_registered_at_their_levels():
    assert list(M.registry(M.SESSION, TISSUE.key)) == ["unet-physics", "atropos"]
    assert M.DEFAULT_TISSUE == ("unet-physics", "atropos")
    assert list(M.registry(M.SESSION, LESION.key)) == ["lesion", "wmh"]
    assert list(M.registry(M.GROUP)) == ["combat", "mrainet", "bridging", "change"]
    assert list(M.registry(M.SUBJECT)) == ["longitudinal"] and M.select(level=M.SUBJECT) == ("longitudinal",)
    from bidsapp.cli import build_parser

    opts = build_parser().parse_args(["/bids", "/out", "participant"])
    assert tuple(opts.segmentation) == M.DEFAULT_TISSUE  # the library and the command line agree
    assert tuple(opts.lesion_methods) == M.default_methods(LESION.key) == ("lesion", "wmh")


@pytest.fixture(scope="module")
def two_sessions(tmp_path_factory, tiny_session):
    """sub-01: ses-1 with T1w + FLAIR, ses-2 with only a FLAIR (the same head)."""
    root = tmp_path_factory.mktemp("two_sessions")
    bids = root / "bids"
    shutil.copytree(tiny_session["bids"], bids)
    ses2 = bids / "sub-01" / "ses-2" / "anat"
    ses2.mkdir(parents=True)
    for ext in (".nii.gz", ".json"):
        shutil.copy(bids / "sub-01" / "ses-1" / "anat" / f"sub-01_ses-1_FLAIR{ext}", ses2 / f"sub-01_ses-2_FLAIR{ext}")
    anat1 = bids / "sub-01" / "ses-1" / "anat"
    return [
        {"session": "1", "t1w": str(anat1 / "sub-01_ses-1_T1w.nii.gz"), "flair": [str(anat1 / "sub-01_ses-1_FLAIR.nii.gz")],
         "t2w": [], "pdw": [], "acquisition": {"sequence_family": "MPRAGE", "field_strength": 3.0}},
        {"session": "2", "t1w": None, "flair": [str(ses2 / "sub-01_ses-2_FLAIR.nii.gz")], "t2w": [], "pdw": [],
         "acquisition": {"field_strength": 3.0}},
    ], bids


@pytest.fixture(scope="module")
def example_run(tmp_path_factory, two_sessions, tiny_template):
    from workflows.base import init_single_subject_wf

    sessions, bids = two_sessions
    root = tmp_path_factory.mktemp("example_run")
    added = register_examples()
    try:
        wf = init_single_subject_wf("01", sessions, root / "out", bids, root / "work", tiny_template,
                                    # the WMH network is the lesion method here: the MS lesion U-Net
                                    # (40 s a session) is run end to end by test_cli_e2e
                                    segmentation=["atropos"], lesion_methods=["wmh"], methods=["bright"],
                                    subject_methods=["maskchange", "longitudinal"])
        wf.run(plugin="MultiProc", plugin_args={"n_procs": 2, "raise_insufficient": False})
    finally:
        for m in added:
            M.unregister(m.key)
    return root / "out"


def test_template_priors_are_warped_only_for_a_method_that_reads_them(two_sessions, tiny_template, tmp_path):
    from workflows.base import init_session_wf

    sessions, bids = two_sessions
    for keys, warped in ((["unet-physics"], False), (["unet-physics", "atropos"], True), (["atropos"], True)):
        wf = init_session_wf(sessions[0], output_dir=tmp_path / "out", bids_dir=bids, template=tiny_template,
                             method_keys=keys)
        names = {n.fullname.split(".")[-1] for n in wf._get_all_nodes()}
        assert ("warp_priors" in names) is warped, (keys, sorted(names))
        assert "registration" in names  # the template registration itself always runs on a T1w


def test_session_and_subject_examples_are_wired_and_written(example_run):
    anat1 = example_run / "sub-01" / "ses-1" / "anat"
    names1 = {p.name for p in anat1.iterdir()}
    # the T1w session: tissue as before, plus the example's mask from the co-registered FLAIR
    assert {"sub-01_ses-1_dseg.nii.gz", "sub-01_ses-1_desc-bright_mask.nii.gz",
            "sub-01_ses-1_desc-bright_mask.json", "sub-01_ses-1_desc-volumes_morph.tsv"} <= names1
    side = pd.read_json(anat1 / "sub-01_ses-1_desc-bright_mask.json", typ="series")
    assert side["ContrastsUsed"] == ["FLAIR", "T1w"]
    vols = pd.read_csv(anat1 / "sub-01_ses-1_desc-volumes_morph.tsv", sep="\t")
    assert set(vols["method"]) == {"atropos", "bright", "wmh"}
    # the subject-level table: no session entity, one row per session
    table = pd.read_csv(example_run / "sub-01" / "anat" / "sub-01_desc-maskchange_morph.tsv", sep="\t")
    assert list(table["session_id"]) == ["ses-1", "ses-2"] and table["change_ml"].iloc[0] == 0
    assert (example_run / "sub-01" / "anat" / "sub-01_desc-maskchange_morph.json").is_file()


def test_longitudinal_method_runs_on_the_contrast_every_session_has(example_run):
    anat = example_run / "sub-01" / "anat"
    table = pd.read_csv(anat / "sub-01_desc-change_morph.tsv", sep="\t", na_values=["n/a"], keep_default_na=False)
    assert list(table.columns[:3]) == ["measure", "ses_from", "ses_to"]
    assert set(table.measure) == {"brain", "GM", "WM", "CSF", "ventricles", "lesion"}
    assert (table.ses_from == "ses-1").all() and (table.ses_to == "ses-2").all()
    # the same image twice: no change; tissue maps from the T1w session split GM and WM
    brain = table.set_index("measure").loc["brain"]
    assert abs(brain.percent_change) < 1.0, table
    assert np.isfinite(table.set_index("measure").loc["GM", "percent_change"])
    assert (anat / "sub-01_desc-template_FLAIR.nii.gz").is_file()  # FLAIR: the contrast both sessions have
    assert (anat / "sub-01_desc-change_figure.svg").is_file()
    for ses in ("1", "2"):
        folder = example_run / "sub-01" / f"ses-{ses}" / "anat"
        assert (folder / f"sub-01_ses-{ses}_from-FLAIR_to-subject_mode-image_xfm.txt").is_file()
        assert (folder / f"sub-01_ses-{ses}_from-subject_to-FLAIR_mode-image_xfm.txt").is_file()
    side = pd.read_json(anat / "sub-01_desc-change_morph.json", typ="series")
    assert side["Contrast"] == "FLAIR" and side["Sessions"] == ["ses-1", "ses-2"]
    # both sessions have lesion masks: the lesion-by-lesion table, and the follow-up's new lesions
    lesions = pd.read_csv(anat / "sub-01_desc-lesionchange_stats.tsv", sep="\t")
    assert list(lesions.columns[:4]) == ["ses_from", "ses_to", "lesion", "status"]
    new = example_run / "sub-01" / "ses-2" / "anat" / "sub-01_ses-2_desc-newlesion_mask.nii.gz"
    assert new.is_file() and not (example_run / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_desc-newlesion_mask.nii.gz").exists()
    changed = new.with_name("sub-01_ses-2_desc-lesionchange_mask.nii.gz")
    assert changed.is_file() and not (example_run / "sub-01" / "ses-1" / "anat" /
                                      "sub-01_ses-1_desc-lesionchange_mask.nii.gz").exists()
    grid = nib.load(example_run / "sub-01" / "ses-2" / "anat" / "sub-01_ses-2_desc-brain_mask.nii.gz").shape
    assert nib.load(new).shape == grid and nib.load(changed).shape == grid
    # a new lesion is new or grown voxels whole
    new_v, changed_v = (np.asarray(nib.load(f).dataobj) > 0 for f in (new, changed))
    assert not (new_v & ~changed_v).any()


def test_flair_only_session_gets_brain_extraction_and_flair_methods_only(example_run):
    anat2 = example_run / "sub-01" / "ses-2" / "anat"
    names = {p.name for p in anat2.iterdir()}
    assert {"sub-01_ses-2_desc-preproc_FLAIR.nii.gz", "sub-01_ses-2_desc-brain_mask.nii.gz",
            "sub-01_ses-2_desc-bright_mask.nii.gz", "sub-01_ses-2_desc-volumes_morph.tsv"} <= names
    assert not [n for n in names if "dseg" in n or ("probseg" in n and "lesion" not in n)
                or ("xfm" in n and "subject" not in n) or "space-" in n], names  # no template outputs
    side = pd.read_json(anat2 / "sub-01_ses-2_desc-bright_mask.json", typ="series")
    assert side["ContrastsUsed"] == ["FLAIR"]
    mask = np.asarray(nib.load(anat2 / "sub-01_ses-2_desc-brain_mask.nii.gz").dataobj) > 0
    ml = mask.sum() * np.prod(nib.load(anat2 / "sub-01_ses-2_desc-brain_mask.nii.gz").header.get_zooms()) / 1000
    assert 800 < ml < 2200, f"FLAIR brain mask {ml:.0f} ml"
    vols = pd.read_csv(anat2 / "sub-01_ses-2_desc-volumes_morph.tsv", sep="\t")
    assert set(vols["method"]) == {"bright", "wmh"}


def test_group_example_runs_from_the_registry(example_methods, tmp_path):
    from bidsapp.harmonize.context import GroupContext
    from bidsapp.harmonize.pipeline import run_steps

    assert "sessioncount" in M.registry(M.GROUP) and "sessioncount" not in M.select(level=M.GROUP)
    volumes = pd.DataFrame({"participant_id": ["sub-01", "sub-01", "sub-02"], "session_id": ["ses-1", "ses-2", "n/a"],
                            "method": "atropos", "GM": [1.0, 2.0, 3.0]})
    ctx = GroupContext(output_dir=tmp_path, work_dir=tmp_path / "w", volumes=volumes, acquisitions=pd.DataFrame(),
                       participants=pd.DataFrame(), bids_dir=tmp_path)
    sections, failures = run_steps(ctx, ["sessioncount"])
    assert not failures and sections[0].title == "sessions per participant"
    assert "<td>2</td>" in sections[0].body.replace(" ", "")
