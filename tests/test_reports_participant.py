"""Participant report and overlay figures on tiny hand-made derivatives."""

from __future__ import annotations

import json
import re

import matplotlib

matplotlib.use("Agg")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402

from bidsapp.reports import figures  # noqa: E402
from bidsapp.bids.collect import session_files  # noqa: E402
from bidsapp.reports.participant import write_participant_report  # noqa: E402

ACQ = {"manufacturer": "Siemens", "model": "Prisma", "field_strength": 3.0, "sequence_family": "MPRAGE",
       "repetition_time": 2.3, "echo_time": 0.00298, "inversion_time": 0.9, "flip_angle": 9.0,
       "site": "siteA", "group_key": "siemens-prisma-3T-MPRAGE", "missing": [], "warnings": []}


def phantom(shape=(20, 22, 18), zooms=(2.0, 2.0, 2.5), shift=0.0):
    """Ellipsoid head: WM core, GM shell, CSF rim; returns (T1w, mask, dseg) images in RAS."""
    g = np.indices(shape).astype(float)
    c = (np.array(shape) - 1) / 2
    r = np.sqrt(sum(((g[i] - c[i] - (shift if i == 0 else 0)) / (shape[i] / 2.3)) ** 2 for i in range(3)))
    dseg = np.zeros(shape, np.uint8)
    dseg[r < 1.0] = 1
    dseg[r < 0.8] = 2
    dseg[r < 0.5] = 3
    rng = np.random.default_rng(0)
    t1 = (np.choose(dseg, [10.0, 300.0, 600.0, 900.0]) + rng.normal(0, 20, shape)).astype(np.float32)
    aff = np.diag(list(zooms) + [1.0])
    aff[:3, 3] = -c * np.array(zooms)
    return (nib.Nifti1Image(t1, aff), nib.Nifti1Image((dseg > 0).astype(np.uint8), aff),
            nib.Nifti1Image(dseg, aff))


def _save(img, path, sidecar=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    if sidecar is not None:
        path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(sidecar))


def make_derivatives(root, subject="01", sessions=("1",), dseg=True, atropos=False, flair=False,
                     acq=ACQ, template_space=None):
    """Write one subject's derivatives by the naming conventions; returns the output dir."""
    t1, mask, seg = phantom()
    for ses in sessions:
        anat = root / f"sub-{subject}" / (f"ses-{ses}" if ses else "") / "anat"
        pre = f"sub-{subject}" + (f"_ses-{ses}" if ses else "")
        side = {"Sources": [f"bids:raw:sub-{subject}/anat/{pre}_T1w.nii.gz"]}
        if acq is not None:
            side["Acquisition"] = acq
        _save(t1, anat / f"{pre}_desc-preproc_T1w.nii.gz", side)
        _save(mask, anat / f"{pre}_desc-brain_mask.nii.gz", {"Sources": []})
        methods = []
        if dseg:
            _save(seg, anat / f"{pre}_dseg.nii.gz",
                  {"Method": {"name": "unet-physics", "version": "1.0", "sha256": "ab" * 32}})
            methods.append("unet-physics")
        if atropos:
            _save(seg, anat / f"{pre}_desc-atropos_dseg.nii.gz", {"Method": "atropos"})
            methods.append("atropos")
        rows = [{"method": m, "label": lab, "volume_mm3": v * (1.05 if m == "atropos" else 1.0)}
                for m in methods for lab, v in (("CSF", 3000.0), ("GM", 5000.0), ("WM", 2000.0),
                                                  ("brain", 10000.0))]
        if rows:
            pd.DataFrame(rows).to_csv(anat / f"{pre}_desc-volumes_morph.tsv", sep="\t", index=False)
        if flair:
            _save(nib.Nifti1Image(1000.0 - np.asarray(t1.dataobj), t1.affine),
                  anat / f"{pre}_space-T1w_desc-preproc_FLAIR.nii.gz",
                  {"Acquisition": dict(acq or {}, sequence_family="FLAIR", inversion_time=2.5)})
        if template_space:
            _save(t1, anat / f"{pre}_space-{template_space}_desc-preproc_T1w.nii.gz", {})
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "scanbridge", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
         "GeneratedBy": [{"Name": "scanbridge", "Version": "0.1.0"}]}))
    return root


def _images(html: str) -> list[str]:
    return re.findall(r'<img[^>]*src="([^"]+)"', html)


def assert_self_contained(html: str):
    for attr, value in re.findall(r'\b(src|href)="([^"]*)"', html):
        assert value.startswith("data:") or value.startswith("#"), f"external {attr}: {value[:60]}"
    assert "<link" not in html and "<script src" not in html


def _has_colour(rgba: np.ndarray, colour: str, tol: int = 40, min_pixels: int = 20) -> bool:
    target = np.array(to_rgb(colour)) * 255
    dist = np.abs(rgba[..., :3].astype(int) - target).max(axis=-1)
    return int((dist < tol).sum()) >= min_pixels


# ---------------------------------------------------------------------------------------- figures

def test_mask_overlay_draws_the_contour():
    t1, mask, _ = phantom()
    fig = figures.mask_figure(t1, mask, n_slices=3)
    rgba = figures.figure_to_rgba(fig)
    assert _has_colour(rgba, figures.MASK_COLOR)
    # the same picture without a mask has no contour-coloured pixels
    bare = figures.figure_to_rgba(figures.overlay_mosaic(t1, n_slices=3))
    assert not _has_colour(bare, figures.MASK_COLOR, min_pixels=1)


def test_segmentation_overlay_shows_each_tissue_and_three_planes():
    t1, mask, seg = phantom()
    fig = figures.segmentation_figure(t1, seg, mask, n_slices=4, alpha=1.0)
    assert len([ax for ax in fig.axes if ax.images]) == 12  # 3 planes x 4 slices
    rgba = figures.figure_to_rgba(fig)
    for tissue in ("CSF", "GM", "WM"):
        assert _has_colour(rgba, figures.TISSUE_COLORS[tissue], tol=30), tissue
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"CSF", "GM", "WM"} <= set(texts)


def test_overlay_handles_orientation_and_anisotropic_voxels():
    t1, mask, _ = phantom(zooms=(1.0, 1.0, 3.0))
    # store the image in LPS orientation: the figure reorients to RAS itself
    data = np.asarray(t1.dataobj)[::-1, ::-1, :]
    t1_lps = nib.Nifti1Image(data, t1.affine @ np.array(
        [[-1, 0, 0, t1.shape[0] - 1], [0, -1, 0, t1.shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float))
    assert nib.aff2axcodes(t1_lps.affine) == ("L", "P", "S")
    assert np.allclose(figures.load_ras(t1_lps).get_fdata(), t1.get_fdata())
    fig = figures.mask_figure(t1_lps, mask, n_slices=2)
    sag = fig.axes[0].images[0]
    # sagittal panel: vertical voxels are 3 mm, horizontal 1 mm -> aspect 3
    assert fig.axes[0].get_aspect() == pytest.approx(3.0)
    assert sag.get_array().shape[1] <= t1.shape[1]
    # axial panel (third row): 1 mm x 1 mm
    assert fig.axes[4].get_aspect() == pytest.approx(1.0)


def test_robust_window_ignores_hot_voxels():
    data = np.full((10, 10, 10), 100.0)
    data[:5] = 50.0
    data[0, 0, 0] = 1e6
    lo, hi = figures.robust_window(data)
    assert lo == pytest.approx(50.0) and hi == pytest.approx(100.0)


def test_registration_and_coregistration_figures_draw_edges():
    t1, mask, seg = phantom()
    rgba = figures.figure_to_rgba(figures.registration_figure(t1, t1, n_slices=3))
    assert _has_colour(rgba, figures.EDGE_COLOR)
    flair = nib.Nifti1Image(1000.0 - np.asarray(t1.dataobj), t1.affine)
    rgba = figures.figure_to_rgba(figures.coregistration_figure(flair, t1, dseg=seg, mask=mask, n_slices=3))
    assert _has_colour(rgba, figures.EDGE_COLOR) and _has_colour(rgba, figures.EDGE_COLOR_2)


def test_otsu_levels_separate_three_classes():
    vals = np.concatenate([np.full(100, 10.0), np.full(100, 50.0), np.full(100, 90.0)])
    lo, hi = figures.otsu_levels(vals)
    assert 10 < lo < 50 < hi < 90


# ---------------------------------------------------------------------------------------- report

def test_participant_report_is_complete_and_self_contained(tmp_path):
    out = make_derivatives(tmp_path / "out", sessions=("1", "2"), atropos=True, flair=True)
    path = write_participant_report(out, "01", warnings=["skipped sub-01_ses-2_T2w.nii.gz: 4D image"], n_slices=3,
                                    errors=[], command_line="scanbridge bids out participant")
    assert path == out / "sub-01.html" and path.exists()
    html = path.read_text()
    assert_self_contained(html)
    imgs = _images(html)
    # per session: mask, 2 segmentations, FLAIR co-registration, volume chart
    assert len(imgs) >= 10 and all(s.startswith("data:image/png;base64,") for s in imgs)
    for value in ("Siemens", "Prisma", "MPRAGE", "siemens-prisma-3T-MPRAGE", "siteA", ">2300<", ">900<",
                  ">2.98<", "skipped sub-01_ses-2_T2w.nii.gz: 4D image", "Session 1", "Session 2",
                  "unet-physics", "atropos", "scanbridge bids out participant", "About",
                  "ab" * 32):
        assert value in html, value
    assert 'class="warn"' in html
    assert not list(out.glob(".sub-01.html*")), "temporary file left behind"


def test_report_flags_missing_sidecar_fields_and_errors(tmp_path):
    acq = dict(ACQ, inversion_time=None, missing=["InversionTime"])
    out = make_derivatives(tmp_path / "out", acq=acq)
    html = write_participant_report(out, "sub-01", errors=["node n4 failed: bad image"]).read_text()
    assert "missing sidecar field(s) InversionTime" in html
    assert '<div class="err">node n4 failed: bad image</div>' in html
    assert "FAILED" in html


def test_report_copes_with_missing_pieces(tmp_path):
    # no dseg, no volumes, no sidecar acquisition, no sessions
    out = make_derivatives(tmp_path / "out", sessions=(None,), dseg=False, acq=None)
    html = write_participant_report(out, "01").read_text()
    assert_self_contained(html)
    assert "no tissue segmentation" in html
    assert "no volumes table" in html
    assert "no transform to a template" in html
    assert "sidecar has no acquisition parameters" in html
    assert len(_images(html)) == 1  # the brain-mask overlay still shows


def test_report_without_mask_still_shows_the_scan_and_clean_provenance(tmp_path):
    out = make_derivatives(tmp_path / "out", dseg=False)
    anat = out / "sub-01/ses-1/anat"
    for p in anat.glob("*_desc-brain_mask.*"):
        p.unlink()
    side = anat / "sub-01_ses-1_desc-preproc_T1w.json"
    side.write_text(json.dumps({"Acquisition": ACQ, "ManufacturersModelName": "Prisma", "InversionTime": 0.9,
                                "Template": "MNI152NLin2009aSym"}))
    html = write_participant_report(out, "01", n_slices=2).read_text()
    assert "no brain mask" in html and len(_images(html)) == 1
    about = html[html.index('id="about"'):]
    assert "MNI152NLin2009aSym" in about
    assert ">InversionTime<" not in about and ">ManufacturersModelName<" not in about


def test_report_for_subject_without_outputs(tmp_path):
    (tmp_path / "out").mkdir()
    html = write_participant_report(tmp_path / "out", "07", errors=["no usable T1w"]).read_text()
    assert "no derivatives found for sub-07" in html and "no usable T1w" in html


def test_registration_check_from_template_space_image(tmp_path, monkeypatch):
    out = make_derivatives(tmp_path / "out", template_space="Fake")
    tpl_dir = tmp_path / "tf" / "tpl-Fake"
    t1, mask, _ = phantom()
    _save(t1, tpl_dir / "tpl-Fake_res-01_T1w.nii.gz")
    _save(mask, tpl_dir / "tpl-Fake_res-01_desc-brain_mask.nii.gz")
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "tf"))
    html = write_participant_report(out, "01").read_text()
    assert "Registration to Fake" in html
    assert "template image not found" not in html


def test_registration_check_applies_saved_transform(tmp_path):
    ants = pytest.importorskip("ants")
    out = make_derivatives(tmp_path / "out")
    tpl = tmp_path / "tpl" / "tpl-Fake_res-01_T1w.nii.gz"
    _save(phantom()[0], tpl)
    xfm = out / "sub-01/ses-1/anat/sub-01_ses-1_from-T1w_to-Fake_mode-image_xfm.mat"
    ants.write_transform(ants.create_ants_transform(transform_type="AffineTransform", dimension=3), str(xfm))
    xfm.with_suffix(".json").write_text(json.dumps({"Template": {"name": "Fake", "T1w": str(tpl)}}))
    files = session_files(out, "01")
    assert files[0].xfm_to_template == {"Fake": [xfm]}
    html = write_participant_report(out, "01").read_text()
    assert "Registration to Fake" in html and "could not be drawn" not in html


def test_template_given_as_description_dict(tmp_path):
    out = make_derivatives(tmp_path / "out", template_space="Fake")
    tpl = tmp_path / "anywhere" / "fake_T1w.nii.gz"
    _save(phantom()[0], tpl)
    html = write_participant_report(out, "01", template={"name": "Fake", "T1w": str(tpl)}, n_slices=2).read_text()
    assert "Registration to Fake" in html and "template image not found" not in html
    html = write_participant_report(out, "01", template={"name": "Other", "T1w": str(tpl)}, n_slices=2).read_text()
    assert "template image not found" in html


def test_overlays_survive_bad_images():
    t1, mask, _ = phantom()
    zero = nib.Nifti1Image(np.zeros(t1.shape, np.float32), t1.affine)
    figures.mask_figure(zero, mask, n_slices=2)
    nan = nib.Nifti1Image(np.full(t1.shape, np.nan, np.float32), t1.affine)
    figures.segmentation_figure(nan, mask, None, n_slices=2)
    # co-registration check without a segmentation falls back to T1w intensity edges
    rgba = figures.figure_to_rgba(figures.coregistration_figure(t1, t1, mask=mask, n_slices=2))
    assert _has_colour(rgba, figures.EDGE_COLOR)
    with pytest.raises(ValueError, match="3D"):
        figures.load_ras(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)))


def test_unreadable_image_becomes_a_warning(tmp_path):
    out = make_derivatives(tmp_path / "out", dseg=False)
    (out / "sub-01/ses-1/anat/sub-01_ses-1_desc-brain_mask.nii.gz").write_bytes(b"not a nifti")
    html = write_participant_report(out, "01", n_slices=2).read_text()
    assert "brain-mask overlay could not be drawn" in html


def test_reports_are_readable_by_the_group(tmp_path):
    """Reports are written atomically with umask permissions (not mkstemp's 0600): on a shared
    cluster folder the lab must be able to open them."""
    import os

    from bidsapp.reports.html import Section, write_report

    old = os.umask(0o022)
    try:
        path = write_report(tmp_path / "sub-01.html", "t", [Section("s", "<p>x</p>")])
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["sub-01.html"]  # no temporary left behind


def test_report_says_what_the_tissue_model_was_told_and_when_it_fell_back(tmp_path):
    out = make_derivatives(tmp_path / "out")
    side = out / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_dseg.json"
    side.write_text(json.dumps({"Method": {"name": "unet", "version": "1.0", "sha256": "cd" * 32},
                                "SequenceParametersUsed": {}, "PhysicsFallback": "SPGR sidecar lacks EchoTime"}))
    html = write_participant_report(out, "01").read_text()
    assert "no-physics U-Net used because SPGR sidecar lacks EchoTime" in html
    side.write_text(json.dumps({"Method": {"name": "unet-physics", "version": "1.0", "sha256": "cd" * 32},
                                "SequenceParametersUsed": {"InversionTime": 0.9, "MagneticFieldStrength": 3.0},
                                "PhysicsFallback": None}))
    html = write_participant_report(out, "01").read_text()
    assert "sequence parameters given to the model: InversionTime 0.9, MagneticFieldStrength 3" in html
    assert "no-physics U-Net used" not in html


def test_report_flags_a_protocol_with_little_gm_wm_contrast(tmp_path):
    out = make_derivatives(tmp_path / "out")
    side = out / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_dseg.json"
    meta = {"Method": {"name": "unet-physics", "version": "1.0", "sha256": "cd" * 32},
            "SequenceParametersUsed": {"RepetitionTime": 0.095}, "PhysicsFallback": None}
    side.write_text(json.dumps({**meta, "ExpectedWMGMSignalRatio": 0.969}))
    html = write_participant_report(out, "01").read_text()
    assert "expected WM/GM signal ratio 0.969" in html
    assert "pure WM 0.969 times the signal of pure GM (literature relaxation times): with so little GM/WM contrast" in html
    side.write_text(json.dumps({**meta, "ExpectedWMGMSignalRatio": 1.25}))
    html = write_participant_report(out, "01").read_text()
    assert "expected WM/GM signal ratio 1.250" in html and "so little GM/WM contrast" not in html


def test_report_warns_when_the_voxels_were_too_coarse_to_refine(tmp_path):
    from bidsapp.models.tissue import coarse_voxels_warning

    out = make_derivatives(tmp_path / "out")
    side = out / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_dseg.json"
    meta = {"Method": {"name": "unet", "version": "1.0", "sha256": "cd" * 32}, "SequenceParametersUsed": {}}
    side.write_text(json.dumps({**meta, "VolumesWarning": coarse_voxels_warning((1.0, 1.0, 5.0), 2.0, True)}))
    html = write_participant_report(out, "01").read_text()
    assert "voxels of 5.0 mm3 are too coarse for the intensity refinement" in html
    side.write_text(json.dumps({**meta, "VolumesWarning": None}))
    assert "too coarse" not in write_participant_report(out, "01").read_text()


def _change_table(out, *rows: str):
    """``sub-01``'s change table in ``out`` with ``rows`` (tab-separated, in the table's column order); its folder."""
    anat = out / "sub-01" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    (anat / "sub-01_desc-change_morph.tsv").write_text(
        "measure\tses_from\tses_to\tinterval_days\tvolume_from_mm3\tvolume_to_mm3\tpercent_change\t"
        "percent_change_per_year\tpercent_change_raw\tacquisition_changed\tcorrection\n"
        + "".join(r + "\n" for r in rows))
    return anat


def test_change_section_shows_the_decline_table_and_flags_a_call_across_scanners(tmp_path):
    from bidsapp.reports.participant import change_section

    recalibrated = "tissue intensities recalibrated per session"
    anat = _change_table(tmp_path, "brain\t1\t2\t365\t1000000\t990000\t-1.0\t-1.0\t-1.0\tfalse\tnone",
                         f"brain\t2\t3\t365\t990000\t985000\t-0.5\t-0.5\t3.0\ttrue\t{recalibrated}")
    assert "decline" not in change_section(tmp_path, "01").body.lower()
    (anat / "sub-01_desc-decline_stats.tsv").write_text(
        "ses_from\tses_to\tinterval_days\tacquisition_changed\tprobability_decline\tcall\n"
        "1\t2\t365\tfalse\t0.2\tstable\n2\t3\tn/a\ttrue\t0.81\tdecline\n")
    sec = change_section(tmp_path, "01")
    assert "P(decline)" in sec.body and "0.81" in sec.body and "sub-01_desc-decline_stats.tsv" in sec.body
    assert any("called decline (P 0.81) across an acquisition change" in w for w in sec.warnings)
    assert not any("1 \u2192 2: called decline" in w for w in sec.warnings)


def test_change_section_says_when_the_change_was_read_without_a_t1w(tmp_path):
    from bidsapp.reports.participant import change_section

    anat = _change_table(tmp_path, "brain\t1\t2\tn/a\t1000000\t990000\t-1.0\tn/a\t-1.0\tn/a\t"
                                   "tissue intensities recalibrated per session")
    side = anat / "sub-01_desc-change_morph.json"
    for contrast, warned in (("T1w", False), ("FLAIR", True)):
        side.write_text(json.dumps({"Method": "longitudinal", "Contrast": contrast}))
        assert any(w.startswith("Read on the FLAIR") for w in change_section(tmp_path, "01").warnings) is warned
    side.write_text("{not json")
    assert any("unreadable sidecar" in w for w in change_section(tmp_path, "01").warnings)
