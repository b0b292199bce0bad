"""The participant report's lesion block, on tiny hand-made lesion derivatives (24^3 voxels)."""

from __future__ import annotations

import base64
import io
import json
import re

import matplotlib

matplotlib.use("Agg")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402

from bidsapp.bids.collect import session_files  # noqa: E402
from bidsapp.labels import LESION  # noqa: E402
from bidsapp.reports import figures  # noqa: E402
from bidsapp.reports.participant import write_participant_report  # noqa: E402

SHAPE = (24, 24, 24)
ZOOMS = (2.0, 2.0, 2.0)
COLOUR = LESION.colours()["lesion"]
FILLING = "voxels of the lesion mask are counted as WM (1234 mm^3 relabelled); the lesion volume is reported separately"
# (id, volume_mm3, centroid x, y, z, location): 12 lesions, so that the "10 largest" table leaves two out
LESIONS = [
    (1, 800.0, -4, 2, 6, "periventricular"),
    (2, 16.0, 10, 8, 2, "juxtacortical"),
    (3, 400.0, 4, -2, 6, "periventricular"),
    (4, 8.0, -12, 0, 0, "juxtacortical"),
    (5, 120.0, 0, -10, -12, "infratentorial"),
    (6, 64.0, 6, 6, 10, "deep white matter"),
    (7, 32.0, -6, -6, 10, "deep white matter"),
    (8, 24.0, 12, -4, 4, "juxtacortical"),
    (9, 12.0, -10, 6, 8, "juxtacortical"),
    (10, 48.0, 2, 4, -2, "periventricular"),
    (11, 10.0, 8, -8, 6, "juxtacortical"),
    (12, 9.0, -8, 8, 12, "deep white matter"),
]


def _affine():
    aff = np.diag(list(ZOOMS) + [1.0])
    aff[:3, 3] = -(np.array(SHAPE) - 1) / 2 * np.array(ZOOMS)
    return aff


def head():
    """Ellipsoid head: (T1w, FLAIR, brain mask, dseg, lesion mask) arrays; lesions are two bright blobs."""
    g = np.indices(SHAPE).astype(float)
    c = (np.array(SHAPE) - 1) / 2
    r = np.sqrt(sum(((g[i] - c[i]) / (SHAPE[i] / 2.3)) ** 2 for i in range(3)))
    dseg = np.zeros(SHAPE, np.uint8)
    dseg[r < 1.0], dseg[r < 0.8], dseg[r < 0.5] = 1, 2, 3
    lesion = np.zeros(SHAPE, np.uint8)
    lesion[9:13, 12:15, 14:17] = 1  # the large one, high in the brain
    lesion[14:16, 9:11, 8:10] = 1
    rng = np.random.default_rng(0)
    t1 = np.choose(dseg, [10.0, 300.0, 600.0, 900.0]) + rng.normal(0, 20, SHAPE)
    flair = np.choose(dseg, [10.0, 900.0, 500.0, 400.0]) + 600.0 * lesion + rng.normal(0, 20, SHAPE)
    return t1.astype(np.float32), flair.astype(np.float32), (dseg > 0).astype(np.uint8), dseg, lesion


def _save(arr, path, sidecar=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, _affine()), str(path))
    if sidecar is not None:
        path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(sidecar))


def make_lesion_derivatives(root, *, t1w=True, lesions=LESIONS, missing=("T2w", "PDw"), filling=True,
                            lesion_outputs=True, baseline=False):
    """One session of sub-01 as the lesion method writes it: T1w reference + FLAIR on its grid (``t1w``),
    else a FLAIR-only session whose reference is the FLAIR. ``baseline``: the WMH method's outputs beside
    the main answer (desc-wmh; its first three lesions, the large blob only in its mask)."""
    t1, flair, mask, dseg, lesion = head()
    if not lesions:
        lesion = np.zeros_like(lesion)
    anat = root / "sub-01" / "ses-1" / "anat"
    pre = "sub-01_ses-1"
    used = ["FLAIR", "T1w"] if t1w else ["FLAIR"]
    missing = [m for m in ("T1w", "T2w", "PDw") if m not in used] if missing is None else list(missing)
    rows = []
    if t1w:
        _save(t1, anat / f"{pre}_desc-preproc_T1w.nii.gz", {"Sources": []})
        _save(flair, anat / f"{pre}_space-T1w_desc-preproc_FLAIR.nii.gz", {"Sources": []})
        side = {"Method": "unet", "Model": {"Name": "tissue_unet", "Version": "0.1.0"}}
        if filling and lesion_outputs:
            side["LesionFilling"] = FILLING
        _save(dseg, anat / f"{pre}_dseg.nii.gz", side)
        rows += [{"method": "unet", "label": lab, "volume_mm3": v, "count": "n/a"}
                 for lab, v in (("CSF", 3000.0), ("GM", 5000.0), ("WM", 2000.0), ("brain", 10000.0))]
    else:
        _save(flair, anat / f"{pre}_desc-preproc_FLAIR.nii.gz", {"Sources": []})
    _save(mask, anat / f"{pre}_desc-brain_mask.nii.gz", {"Sources": []})
    if lesion_outputs:
        total = float(sum(x[1] for x in lesions))
        meta = {"Method": "lesion", "Model": {"Name": "lesion_unet", "Version": "0.1.0", "Sha256": "ef" * 32},
                "ContrastsUsed": used, "ContrastsMissing": missing, "Threshold": 0.5,
                "MinimumLesionVolume_mm3": 3.0, "LesionCount": len(lesions), "LesionVolume_mm3": total}
        _save(lesion, anat / f"{pre}_desc-lesion_mask.nii.gz", meta)
        _save(lesion.astype(np.float32) * 0.9, anat / f"{pre}_label-lesion_probseg.nii.gz", meta)
        table = pd.DataFrame(lesions, columns=["id", "volume_mm3", "centroid_x_mm", "centroid_y_mm",
                                               "centroid_z_mm", "location"])
        table.to_csv(anat / f"{pre}_desc-lesions_stats.tsv", sep="\t", index=False)
        (anat / f"{pre}_desc-lesions_stats.json").write_text(json.dumps(meta))
        rows.append({"method": "lesion", "label": "lesion", "volume_mm3": total, "count": len(lesions)})
    if lesion_outputs and baseline:
        few = lesions[:3]
        total = float(sum(x[1] for x in few))
        meta = {"Method": "wmh", "Model": {"Name": "wmh_unet", "Version": "0.1.0", "Sha256": "ab" * 32},
                "ContrastsUsed": ["FLAIR"], "ContrastsMissing": [], "Threshold": 0.5,
                "MinimumLesionVolume_mm3": 3.0, "LesionCount": len(few), "LesionVolume_mm3": total}
        big = np.zeros_like(lesion)
        big[9:13, 12:15, 14:17] = lesion[9:13, 12:15, 14:17]
        _save(big, anat / f"{pre}_desc-wmh_mask.nii.gz", meta)
        _save(big.astype(np.float32) * 0.8, anat / f"{pre}_label-lesion_desc-wmh_probseg.nii.gz", meta)
        pd.DataFrame(few, columns=["id", "volume_mm3", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm",
                                   "location"]).to_csv(anat / f"{pre}_desc-wmh_stats.tsv", sep="\t", index=False)
        (anat / f"{pre}_desc-wmh_stats.json").write_text(json.dumps(meta))
        rows.append({"method": "wmh", "label": "lesion", "volume_mm3": total, "count": len(few)})
    if rows:
        pd.DataFrame(rows).to_csv(anat / f"{pre}_desc-volumes_morph.tsv", sep="\t", index=False, na_rep="n/a")
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "scanbridge", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
         "GeneratedBy": [{"Name": "scanbridge", "Version": "0.1.0"}]}))
    return root


def lesion_block(html: str) -> str:
    assert html.count("<h3>Lesions</h3>") == 1
    return html.split("<h3>Lesions</h3>", 1)[1].split("<h3>", 1)[0].split("</section>", 1)[0]


def _rows(block: str, first_cell: str) -> list[str]:
    """Cells of the table rows whose first cell is ``first_cell``."""
    out = []
    for row in re.findall(r"<tr>(.*?)</tr>", block, re.S):
        cells = [c.strip() for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)]
        if cells and cells[0] == first_cell:
            out.append(cells)
    return out


def _pngs(block: str) -> list[np.ndarray]:
    import matplotlib.image as mpimg

    return [mpimg.imread(io.BytesIO(base64.b64decode(d)), format="png")
            for d in re.findall(r'src="data:image/png;base64,([^"]+)"', block)]


def _has_colour(rgba: np.ndarray, colour: str, tol: float = 0.16, min_pixels: int = 20) -> bool:
    rgb = rgba[..., :3].astype(float)
    rgb = rgb / 255.0 if rgb.max() > 1.0 else rgb
    return int((np.abs(rgb - np.array(to_rgb(colour))).max(axis=-1) < tol).sum()) >= min_pixels


# ---------------------------------------------------------------------------------------- collect

def test_session_files_find_the_lesion_outputs_and_the_flair_on_the_reference_grid(tmp_path):
    out = make_lesion_derivatives(tmp_path / "t1", t1w=True)
    (f,) = session_files(out, "01")
    anat = out / "sub-01/ses-1/anat"
    assert f.reference == "T1w"
    assert f.lesion_mask == anat / "sub-01_ses-1_desc-lesion_mask.nii.gz"
    assert f.lesion_probseg == anat / "sub-01_ses-1_label-lesion_probseg.nii.gz"
    assert f.lesion_stats == anat / "sub-01_ses-1_desc-lesions_stats.tsv"
    assert f.flair == f.on_grid["FLAIR"] == anat / "sub-01_ses-1_space-T1w_desc-preproc_FLAIR.nii.gz"
    assert "lesion" not in f.probseg  # the tissue classes only

    out = make_lesion_derivatives(tmp_path / "flair", t1w=False)
    (f,) = session_files(out, "01")
    assert f.reference == "FLAIR"
    assert f.flair == f.preproc == out / "sub-01/ses-1/anat/sub-01_ses-1_desc-preproc_FLAIR.nii.gz"
    assert f.lesion_mask is not None and f.lesion_stats is not None


def test_session_files_without_lesion_outputs(tmp_path):
    out = make_lesion_derivatives(tmp_path / "out", lesion_outputs=False)
    (f,) = session_files(out, "01")
    assert f.lesion_mask is None and f.lesion_probseg is None and f.lesion_stats is None
    assert f.flair is not None  # the FLAIR is still found on the T1w grid


# ---------------------------------------------------------------------------------------- figure

def test_lesion_slices_follow_the_lesion_load():
    les = np.zeros(SHAPE, bool)
    les[5:8, 5:8, 3] = True  # 9 voxels in axial slice 3
    les[10:15, 10:15, 17] = True  # 25 voxels in slice 17
    les[10, 10, 18] = True  # 1 voxel next to it
    assert figures.lesion_slices(les, 2, 1) == [17]
    assert figures.lesion_slices(les, 2, 2, min_gap=4) == [3, 17]  # clusters first, not neighbours
    assert figures.lesion_slices(les, 2, 3, min_gap=4) == [3, 17, 18]  # then the gap shrinks
    assert figures.lesion_slices(les, 2, 5) == [3, 17, 18]  # never a slice without lesion
    assert figures.lesion_slices(np.zeros(SHAPE, bool), 2, 4) == []


def test_lesion_figure_shows_three_planes_through_the_lesions_in_the_lesion_colour():
    _t1, flair, mask, _dseg, lesion = head()
    aff = _affine()
    fig = figures.lesion_figure(nib.Nifti1Image(flair, aff), nib.Nifti1Image(lesion, aff),
                                nib.Nifti1Image(mask, aff), n_slices=3)
    rows = [ax.texts[-1].get_text() for ax in fig.axes if ax.texts and ax.texts[-1].get_rotation() == 90]
    assert rows == ["axial", "coronal", "sagittal"]
    # every panel shows a slice with lesion: its coordinate lies inside the lesion mask's extent
    for ax in fig.axes:
        if not ax.images:
            continue
        plane, value = re.match(r"([xyz])=(-?\d+)", ax.texts[0].get_text()).groups()
        axis = "xyz".index(plane)
        world = nib.affines.apply_affine(aff, np.argwhere(lesion > 0))[:, axis]
        assert world.min() - 1 <= float(value) <= world.max() + 1
    assert _has_colour(figures.figure_to_rgba(fig) / 255.0, COLOUR)
    with pytest.raises(ValueError, match="empty"):
        figures.lesion_figure(nib.Nifti1Image(flair, aff), nib.Nifti1Image(np.zeros_like(lesion), aff))


# ---------------------------------------------------------------------------------------- report

def test_report_lesion_block_numbers_warning_and_note(tmp_path):
    out = make_lesion_derivatives(tmp_path / "out", t1w=True)
    html = write_participant_report(out, "01", n_slices=2).read_text()
    block = lesion_block(html)
    # (a) the overlay, drawn on the FLAIR on the T1w grid, in the lesion colour
    assert "sub-01_ses-1_space-T1w_desc-preproc_FLAIR.nii.gz" in block
    (png,) = _pngs(block)
    assert _has_colour(png, COLOUR)
    assert "could not be drawn" not in html
    # (b) totals, by location, the 10 largest
    total = sum(x[1] for x in LESIONS)
    assert _rows(block, "lesions") == [["lesions", "12"]]
    assert _rows(block, "total lesion volume") == [["total lesion volume", f"{total / 1000:.2f} ml"]]
    by_loc = {loc: (sum(1 for x in LESIONS if x[5] == loc), sum(x[1] for x in LESIONS if x[5] == loc))
              for loc in ("periventricular", "juxtacortical", "deep white matter", "infratentorial")}
    for loc, (n, vol) in by_loc.items():
        assert _rows(block, loc)[0][1:3] == [str(n), f"{vol / 1000:.2f}"], loc
    assert _rows(block, "all") == [["all", "12", f"{total / 1000:.2f}"]]
    assert "The 10 largest of 12 lesions" in block
    largest = [r for r in re.findall(r"<tr>(.*?)</tr>", block.split("The 10 largest")[1], re.S)
               if "<td>" in r]
    ids = [re.findall(r"<td>(.*?)</td>", r)[0] for r in largest]
    want = sorted(LESIONS, key=lambda x: -x[1])[:10]
    assert ids == [str(x[0]) for x in want]
    first = re.findall(r"<td>(.*?)</td>", largest[0])
    assert first[:4] == ["1", "800.0", "periventricular", "-4, 2, 6"]
    # (c) incomplete inputs
    assert ('<div class="warn">Lesions segmented from FLAIR and T1w, without T2w or PDw: '
            "expect lower sensitivity") in block
    # (d) lesion filling of the tissue volumes
    assert "Tissue volumes count lesion voxels as white matter" in block
    assert "unet: 1234 mm³ relabelled" in block
    # the summary says it too, and the tissue volumes table keeps to the tissues
    assert "<tr><th>lesions</th><td>ses-1: 12 (1.54 ml)</td></tr>" in html
    volumes = html.split("<h3>Volumes</h3>", 1)[1]
    assert "lesion (mL)" not in volumes and "WM (mL)" in volumes
    # the model's provenance is listed
    assert "ef" * 32 in html[html.index('id="about"'):]


def test_report_lesions_of_a_flair_only_session(tmp_path):
    out = make_lesion_derivatives(tmp_path / "out", t1w=False, missing=None)
    html = write_participant_report(out, "01", n_slices=2).read_text()
    block = lesion_block(html)
    assert "preprocessed FLAIR (sub-01_ses-1_desc-preproc_FLAIR.nii.gz)" in block
    assert len(_pngs(block)) == 1 and "could not be drawn" not in html
    assert "Lesions segmented from FLAIR, without T1w, T2w or PDw: expect lower sensitivity" in block
    assert "white matter (lesion filling)" not in block  # no tissue segmentation, no note
    assert "no volumes table" not in html and "no tissue volumes" not in html
    assert "lesion (mL)" not in html


def test_report_with_complete_inputs_has_no_lesion_warning(tmp_path):
    out = make_lesion_derivatives(tmp_path / "out", missing=())
    block = lesion_block(write_participant_report(out, "01", n_slices=2).read_text())
    assert "expect lower sensitivity" not in block and 'class="warn"' not in block


def test_report_says_no_lesions_found_without_a_figure(tmp_path):
    out = make_lesion_derivatives(tmp_path / "out", lesions=[])
    html = write_participant_report(out, "01", n_slices=2).read_text()
    block = lesion_block(html)
    assert "No lesions found (probability threshold 0.5, minimum lesion volume 3 mm³)." in block
    assert _rows(block, "lesions") == [["lesions", "0"]]
    assert not _pngs(block) and "could not be drawn" not in html
    assert "Tissue volumes count lesion voxels as white matter" in block
    assert "<tr><th>lesions</th><td>ses-1: 0</td></tr>" in html


def test_session_without_lesion_outputs_looks_as_before(tmp_path):
    out = make_lesion_derivatives(tmp_path / "out", lesion_outputs=False)
    html = write_participant_report(out, "01", n_slices=2).read_text()
    assert "<h3>Lesions</h3>" not in html and "<th>lesions</th>" not in html
    assert "lesion filling" not in html and "expect lower sensitivity" not in html


def test_missing_lesion_table_falls_back_to_the_sidecar(tmp_path):
    out = make_lesion_derivatives(tmp_path / "out")
    (out / "sub-01/ses-1/anat/sub-01_ses-1_desc-lesions_stats.tsv").unlink()
    html = write_participant_report(out, "01", n_slices=2).read_text()
    block = lesion_block(html)
    assert _rows(block, "lesions") == [["lesions", "12"]]
    assert "no per-lesion table" in html
    assert len(_pngs(block)) == 1  # the overlay still shows


def test_a_baseline_lesion_method_gets_its_own_block_like_a_tissue_baseline(tmp_path):
    out = make_lesion_derivatives(tmp_path / "out", t1w=True, baseline=True)
    (f,) = session_files(out, "01")
    anat = out / "sub-01/ses-1/anat"
    assert f.lesion_mask == anat / "sub-01_ses-1_desc-lesion_mask.nii.gz"  # the main answer as before
    assert f.lesion_stats == anat / "sub-01_ses-1_desc-lesions_stats.tsv"
    assert f.lesion_alt == {"wmh": {"mask": anat / "sub-01_ses-1_desc-wmh_mask.nii.gz",
                                    "probseg": anat / "sub-01_ses-1_label-lesion_desc-wmh_probseg.nii.gz",
                                    "stats": anat / "sub-01_ses-1_desc-wmh_stats.tsv"}}
    assert not f.dseg_alt and "lesion" not in f.probseg
    html = write_participant_report(out, "01", n_slices=2).read_text()
    block = lesion_block(html)  # the main answer's block, once
    assert _rows(block, "method") == [["method", "MS lesions (lesion)"]]
    assert _rows(block, "lesions") == [["lesions", "12"]]
    assert "Beside this main answer: WMH (FLAIR) (wmh), 3 lesion(s), 1.22 ml (desc-wmh, below)." in block
    title = "<h3>Lesions, baseline: WMH (FLAIR) (wmh)</h3>"
    assert html.count(title) == 1
    base = html.split(title, 1)[1].split("<h3>", 1)[0].split("</section>", 1)[0]
    assert _rows(base, "lesions") == [["lesions", "3"]] and _rows(base, "model") == [["model", "wmh_unet 0.1.0"]]
    assert _rows(base, "contrasts used") == [["contrasts used", "FLAIR"]]
    assert "expect lower sensitivity" not in base  # the WMH model reads the FLAIR alone by design
    assert "sub-01_ses-1_desc-wmh_mask.nii.gz" in base
    (png,) = _pngs(base)
    assert _has_colour(png, COLOUR)
    diff = sum(x[1] for x in LESIONS[:3]) - sum(x[1] for x in LESIONS)
    assert f"Against the main answer (MS lesions (lesion)): {diff / 1000:+.2f} ml, -9 lesions." in base
    assert "could not be drawn" not in html and "no per-lesion table" not in html
    assert "<tr><th>lesions</th><td>ses-1: 12 (1.54 ml)</td></tr>" in html  # the summary: the main answer
    assert "ab" * 32 in html[html.index('id="about"'):]  # the baseline's model in the provenance
    volumes = html.split("<h3>Volumes</h3>", 1)[1]
    assert "lesion (mL)" not in volumes
