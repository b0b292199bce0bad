"""The subject level: mid-space template, change measures, the change table and its wiring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bidsapp.longitudinal import change as C
from bidsapp.longitudinal import midspace as MS
from bidsapp.longitudinal import subject as S

SHAPE = (72, 80, 72)


@pytest.fixture(autouse=True, scope="module")
def _one_itk_thread():
    """ITK reads its thread count once per process: the first ANTs call of the test session fixes it for
    every later test, whose registrations are checked at one thread (as the workflow's nodes set it)."""
    from workflows.interfaces.ants import use_threads

    use_threads(1, seed=0)
MU = {"CSF": 0.25, "GM": 0.9, "WM": 1.4, "outside": 0.05}


def _phantom(gm_loss_mm: float = 0.0, vent_growth_mm: float = 0.0):
    """Fractions of a head-like ellipsoid at 1 mm: outer CSF, cortical GM ribbon, WM, two ventricles.
    ``gm_loss_mm`` moves the pial surface inwards (GM -> CSF); ``vent_growth_mm`` grows the ventricles
    into the WM. Partial volumes come from signed distances, so sub-voxel changes are exact."""
    z, y, x = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in SHAPE], indexing="ij")
    r = np.sqrt((z / 30) ** 2 + (y / 34) ** 2 + (x / 30) ** 2)
    scale = 31.0  # mm per unit radius, roughly

    def inside(radius_mm, rr=r):
        return np.clip((radius_mm - rr * scale) + 0.5, 0, 1)

    icv = inside(30.0)
    brain = inside(28.0 - gm_loss_mm)
    wm_core = inside(24.0)
    vz = np.sqrt(((z) / 6) ** 2 + ((np.abs(y) - 7) / 4) ** 2 + (x / 14) ** 2)
    vent = np.clip((1.0 + vent_growth_mm / 4.0 - vz) * 4 + 0.5, 0, 1) * wm_core
    gm = brain - wm_core
    wm = wm_core - vent
    csf = icv - brain + vent
    return {"GM": gm, "WM": wm, "CSF": csf, "icv": icv}


def _image(fr, mu=MU, noise=0.01, seed=0, texture=True, csf_sign=1.0):
    rng = np.random.default_rng(seed)
    img = mu["GM"] * fr["GM"] + mu["WM"] * fr["WM"] + csf_sign * mu["CSF"] * fr["CSF"] + mu["outside"] * (1 - fr["icv"])
    img = np.abs(img)  # a magnitude image: an inverted CSF signal folds at its zero
    if texture:  # something for the rigid registration to lock on to besides the ellipsoid
        from scipy import ndimage as ndi

        img = img * (1 + 0.15 * ndi.gaussian_filter(rng.standard_normal(SHAPE), 3) * fr["icv"])
    return (img + noise * rng.standard_normal(SHAPE)).astype(np.float32)


def _common(fr):
    mask = (fr["icv"] > 0.5).astype(np.float32)
    tissue = {k: fr[k].astype(np.float32) for k in ("GM", "WM", "CSF")}
    return C.common_space([mask, mask], [tissue, tissue])


def test_partial_volume_change_recovers_sub_voxel_atrophy():
    base, later = _phantom(), _phantom(gm_loss_mm=0.3, vent_growth_mm=0.5)
    truth = {k: (later[k].sum() / base[k].sum() - 1) * 100 for k in ("GM", "WM", "CSF")}
    truth_brain = ((later["GM"] + later["WM"]).sum() / (base["GM"] + base["WM"]).sum() - 1) * 100
    common = _common(base)
    a = C.normalise(_image(base, texture=False, seed=1), common)
    b = C.normalise(_image(later, texture=False, seed=2), common)
    res = C.pair_volumes(a, b, common, changed=False)
    got = {k: C.percent(res.volume_from[k], res.volume_to[k]) for k in C.MEASURES}
    assert res.correction == "none" and np.isnan(got["lesion"])
    assert truth_brain < -1.0 and got["brain"] == pytest.approx(truth_brain, rel=0.03)
    assert got["GM"] < truth["GM"] / 2 and got["ventricles"] > 3  # the losses land where they happened
    # no change: two noise draws of the same brain
    same = C.pair_volumes(a, C.normalise(_image(base, texture=False, seed=3), common), common, changed=False)
    assert abs(C.percent(same.volume_from["brain"], same.volume_to["brain"])) < 0.05


def test_the_baseline_is_the_segmented_brain_not_the_rim_of_the_mask():
    """Dura and vessels at the mask's edge are as bright as tissue: the sum of intensity fractions counts
    them as brain, and a change divided by it reads small. The first session's tissue maps are the
    baseline; without them (a FLAIR-only session) the sum of fractions still is."""
    from scipy import ndimage as ndi

    base, later = _phantom(), _phantom(gm_loss_mm=0.3, vent_growth_mm=0.5)
    truth = ((later["GM"] + later["WM"]).sum() / (base["GM"] + base["WM"]).sum() - 1) * 100
    common = _common(base)
    mask = base["icv"] > 0.5
    rim = mask & ~ndi.binary_erosion(mask)  # the mask's outer voxels, outside the pial surface

    def with_dura(fr, seed):
        img = _image(fr, texture=False, seed=seed)
        img[rim] = MU["WM"] + 0.01 * np.random.default_rng(seed).standard_normal(int(rim.sum()))
        return C.normalise(img, common)

    a, b = with_dura(base, 1), with_dura(later, 2)
    tissue = {k: base[k].astype(np.float32) for k in ("GM", "WM", "CSF")}
    res = C.pair_volumes(a, b, common, changed=False, tissue_a=tissue)
    summed = C.pair_volumes(a, b, common, changed=False)
    assert res.volume_from["brain"] == pytest.approx((base["GM"] + base["WM"]).sum(), rel=1e-3)
    assert res.volume_from["GM"] == pytest.approx(base["GM"].sum(), rel=1e-3)
    assert res.volume_from["CSF"] == pytest.approx(mask.sum() - (base["GM"] + base["WM"]).sum(), rel=1e-3)
    assert C.percent(res.volume_from["brain"], res.volume_to["brain"]) == pytest.approx(truth, rel=0.03)
    # the rim is a tenth of the brain here: divided by the sum of fractions the same change reads small
    assert summed.volume_from["brain"] > 1.08 * res.volume_from["brain"]
    assert abs(C.percent(summed.volume_from["brain"], summed.volume_to["brain"])) < 0.93 * abs(truth)


@pytest.mark.parametrize("noise", [0.06, 0.1])
def test_noise_does_not_shrink_the_change(noise):
    """Voxels of pure tissue read 1 +- noise; clipped to [0, 1] they lose part of a small change (the
    sum of f read 0.93 and 0.89 of this atrophy); the boundary-shift window keeps all of it."""
    base, later = _phantom(), _phantom(gm_loss_mm=0.3, vent_growth_mm=0.5)
    truth = ((later["GM"] + later["WM"]).sum() / (base["GM"] + base["WM"]).sum() - 1) * 100
    common = _common(base)
    a = C.normalise(_image(base, texture=False, seed=1, noise=noise), common)
    b = C.normalise(_image(later, texture=False, seed=2, noise=noise), common)
    res = C.pair_volumes(a, b, common, changed=False)
    assert C.percent(res.volume_from["brain"], res.volume_to["brain"]) == pytest.approx(truth, rel=0.02)


def test_an_acquisition_change_is_recalibrated_and_the_raw_figure_kept():
    base = _phantom()
    common = _common(base)
    other = {"CSF": 0.1, "GM": 1.1, "WM": 1.45, "outside": 0.05}  # less GM/WM contrast, darker CSF
    a = C.normalise(_image(base, seed=1, texture=False), common)
    b = C.normalise(_image(base, mu=other, seed=2, texture=False), common)
    res = C.pair_volumes(a, b, common, changed=True)
    raw = {m: C.percent(res.raw_from[m], res.raw_to[m]) for m in ("brain", "CSF", "ventricles")}
    corrected = {m: C.percent(res.volume_from[m], res.volume_to[m]) for m in raw}
    assert res.correction == C.RECALIBRATED
    # same brain: a contrast change is not atrophy (read with pooled intensities, the darker CSF
    # moves the CSF/tissue boundaries, most visibly at the ventricles)
    assert abs(raw["ventricles"]) > 1.0 and max(abs(v) for v in corrected.values()) < 0.2


def test_csf_calibrates_on_the_ventricles_interior_not_their_partial_volume_walls():
    """Tissue maps are a segmentation's posteriors, not fractions (hard labels here), so the deep CSF set
    takes in voxels partly tissue: here a deep fissure thinner than a voxel (60 % CSF). With CSF nearly
    nulled in one session (a T1w near CSF's null point) they moved its CSF median tenfold, and a change
    to a protocol with inverted CSF read as +1.1 % brain (simulated heads: +3.7 %)."""
    base = _phantom()
    z, y, x = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in SHAPE], indexing="ij")
    fissure = ((np.abs(x - 0.5) <= 1.0) & (np.abs(z) < 10) & (np.abs(y) < 16)) * 0.6 * (base["WM"] > 0.99)
    base["CSF"], base["WM"] = base["CSF"] + fissure, base["WM"] - fissure
    labels = np.argmax([base["GM"], base["WM"], base["CSF"]], axis=0)
    hard = {k: (labels == i).astype(np.float32) * (base["icv"] > 0.5) for i, k in enumerate(("GM", "WM", "CSF"))}
    mask = (base["icv"] > 0.5).astype(np.float32)
    common = C.common_space([mask, mask], [hard, hard])
    nulled = {**MU, "CSF": 0.02}
    a = C.normalise(_image(base, mu=nulled, seed=1, texture=False, noise=0.005), common)
    b = C.normalise(_image(base, seed=2, texture=False, noise=0.005, csf_sign=-1.0), common)
    assert C.calibrate(a, common)["CSF"] == pytest.approx(nulled["CSF"] / MU["WM"], abs=0.005)
    res = C.pair_volumes(a, b, common, changed=True, csf_inverted=(False, True))
    assert abs(C.percent(res.volume_from["brain"], res.volume_to["brain"])) < 0.3


def test_an_inverted_csf_signal_is_unfolded():
    """Session a: MPRAGE before CSF's null (CSF signal opposite to the tissues', folded by the
    magnitude); session b: after it. Same brain: read linearly, a's boundary voxels look like CSF."""
    base = _phantom()
    common = _common(base)
    a = C.normalise(_image(base, seed=1, texture=False, csf_sign=-1.0), common)
    b = C.normalise(_image(base, mu={**MU, "CSF": 0.05}, seed=2, texture=False), common)
    linear = C.pair_volumes(a, b, common, changed=True)
    unfolded = C.pair_volumes(a, b, common, changed=True, csf_inverted=(True, False))
    assert abs(C.percent(linear.volume_from["brain"], linear.volume_to["brain"])) > 2.0
    for m in ("brain", "GM", "WM", "ventricles"):
        assert abs(C.percent(unfolded.volume_from[m], unfolded.volume_to[m])) < 0.3, m
    lo, hi = C.window(C.calibrate(a, common, True), C.calibrate(b, common))
    assert C.WINDOW[0] < lo < hi - 0.15  # the window starts above the folded fractions


def test_sequence_parameters_say_when_csf_is_inverted():
    from bidsapp.models.tissue import parameter_vector

    def pv(ti, tr, field=3.0):
        return parameter_vector({"sequence_family": "MPRAGE", "InversionTime": ti, "RepetitionTimePreparation": tr,
                                 "MagneticFieldStrength": field})

    assert pv(0.9, 2.3).csf_inverted is True and pv(1.1, 2.5).csf_inverted is False
    assert pv(0.9, 2.3, None).csf_inverted is None  # the field strength decides the relaxation times
    spgr = parameter_vector({"sequence_family": "SPGR", "RepetitionTime": 0.0079, "EchoTime": 0.0045,
                             "FlipAngle": 90.0, "MagneticFieldStrength": 3.0})
    assert spgr.csf_inverted is False


def test_without_tissue_maps_the_template_finds_the_csf():
    base = _phantom()
    mask = (base["icv"] > 0.5).astype(np.float32)
    img = _image(base, texture=False)
    common = C.common_space([mask, mask], [None, None], template=img)
    assert common.gm_share is None and set(common.sets) == {"CSF", "tissue"}
    vol = C.volumes(C.normalise(img, common), C.calibrate(C.normalise(img, common), common), common)
    assert np.isnan(vol["GM"]) and vol["brain"] > 0 and vol["ventricles"] > 0


def test_without_tissue_maps_grown_ventricles_calibrate_each_session_on_pure_csf():
    """The template alone called the tissue CSF once grown ventricles outweighed the deep tissue (and,
    where it did not, took the grown rim into the CSF set); the sessions' own cuts keep pure CSF."""
    a_f, b_f = _phantom(), _phantom(vent_growth_mm=3.0)
    mask = (a_f["icv"] > 0.5).astype(np.float32)
    a, b = _image(a_f, texture=False, seed=1), _image(b_f, texture=False, seed=2)
    true_csf = MU["CSF"] / MU["WM"]
    for images in (None, [a, b]):
        common = C.common_space([mask, mask], [None, None], template=(a + b) / 2, images=images)
        mus = [C.calibrate(C.normalise(x, common), common) for x in (a, b)]
        if images is None:  # the failure the sessions' cuts mend
            assert max(abs(m["CSF"] - true_csf) for m in mus) > 0.5
        else:
            assert all(m["CSF"] == pytest.approx(true_csf, abs=0.01) for m in mus)


def test_change_is_read_only_where_every_session_has_data():
    """A follow-up whose stack ends higher sees nothing below its first slice: read there, the brain the
    baseline sees would count as lost."""
    fr = _phantom()
    mask = (fr["icv"] > 0.5).astype(np.float32)
    tissue = {k: fr[k].astype(np.float32) for k in ("GM", "WM", "CSF")}
    a, b = _image(fr, texture=False, seed=1), _image(fr, texture=False, seed=2)
    seen = np.ones(SHAPE, bool)
    seen[:, :, :24] = False  # the follow-up's field of view starts at slice 24
    b[~seen], cut = 0.0, np.where(seen, mask, 0.0)
    for where, loss in ((None, True), (seen, False)):
        common = C.common_space([mask, cut], [tissue, None], template=(a + b) / 2, seen=where)
        res = C.pair_volumes(C.normalise(a, common), C.normalise(b, common), common, changed=False, tissue_a=tissue)
        change = C.percent(res.volume_from["brain"], res.volume_to["brain"])
        assert (change < -5) if loss else abs(change) < 0.3, change


def test_without_tissue_maps_three_classes_keep_grey_matter_out_of_the_csf():
    """A FLAIR with a long echo: CSF nulled, white matter dark, deep grey matter bright. Split in two,
    the smaller class was the grey matter, read as CSF."""
    shape = (40, 40, 40)
    z, y, x = np.meshgrid(*[np.arange(n) - 19.5 for n in shape], indexing="ij")
    vent = (np.abs(z) < 4) & (np.abs(y) < 3) & (np.abs(x) < 6)
    nuclei = ((np.abs(z) < 8) & (np.abs(y - 10) < 6) & (np.abs(x) < 10))
    img = np.where(vent, 0.05, np.where(nuclei, 1.0, 0.55)).astype(np.float32)
    img += np.random.default_rng(0).normal(0, 0.02, shape).astype(np.float32)
    mask = np.zeros(shape, np.float32)
    mask[2:-2, 2:-2, 2:-2] = 1
    sel = mask > 0
    old = C._deep_classes(img, sel)[1]
    assert np.median(img[old]) > 0.9  # two classes: the nuclei called CSF
    new = C._deep_classes(img, sel, images=[img, img])[1]
    assert np.median(img[new]) == pytest.approx(0.05, abs=0.02)
    bright = C._deep_classes(-img + 1.1, sel, images=[-img + 1.1], csf_dark=False)[1]  # T2w-like: CSF bright
    assert np.median(img[bright]) == pytest.approx(0.05, abs=0.02)


def _write(path, data, affine):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), str(path))
    return str(path)


def _rigid_affine(angle_deg, shift):
    t = np.deg2rad(angle_deg)
    a = np.eye(4)
    a[:3, :3] = [[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]]
    a[:3, 3] = np.asarray(shift) - a[:3, :3] @ (np.asarray(SHAPE) / 2)
    return a


@pytest.fixture(scope="module")
def three_sessions(tmp_path_factory):
    """Three sessions of one phantom head, each placed differently in the scanner, the second and third
    with atrophy; the third on another acquisition with another contrast."""
    root = tmp_path_factory.mktemp("long")
    fr = [_phantom(), _phantom(0.3, 0.5), _phantom(0.6, 1.0)]
    poses = [(0, (0, 0, 0)), (4, (3, -2, 1)), (-3, (-2, 2, 0))]
    mus = [MU, MU, {"CSF": 0.1, "GM": 1.1, "WM": 1.45, "outside": 0.05}]
    out = []
    for k, (f, (angle, shift), mu) in enumerate(zip(fr, poses, mus), 1):
        aff = _rigid_affine(angle, shift)
        img = _write(root / f"ses{k}_T1w.nii.gz", _image(f, mu=mu, seed=k), aff)
        mask = _write(root / f"ses{k}_mask.nii.gz", f["icv"] > 0.5, aff)
        tissue = {c: _write(root / f"ses{k}_{c}.nii.gz", f[c], aff) for c in ("GM", "WM", "CSF")}
        out.append(S.SessionInput(str(k), img, mask, tissue, acquisition="siemens-3T-MPRAGE" if k < 3 else "ge-3T-SPGR",
                                  acq_time=f"202{k}-03-01T10:00:00"))
    return {"root": root, "sessions": out, "fractions": fr, "poses": poses}


def test_mid_space_privileges_no_session(three_sessions, tmp_path):
    import ants

    ses = three_sessions["sessions"]
    images = [ants.image_read(s.image) for s in ses[:2]]
    masks = [ants.image_read(s.mask) for s in ses[:2]]
    ms = MS.build_midspace(images, masks, work_dir=tmp_path)
    # the mean of the log transforms is the identity: no session is the reference
    mean_log = np.mean([np.real(__import__("scipy").linalg.logm(m)) for m in ms.to_session], axis=0)
    assert np.abs(mean_log).max() < 1e-3  # mm and radians
    # session 1 -> session 2 through the mid-space is the true relative pose (4 degrees, ~4 mm)
    rel = ms.to_session[1] @ np.linalg.inv(ms.to_session[0])
    angle = np.degrees(np.arccos(np.clip((np.trace(rel[:3, :3]) - 1) / 2, -1, 1)))
    assert angle == pytest.approx(4.0, abs=0.3)
    # a written transform reads back the same
    path = MS.write_transform(ms.to_session[1], tmp_path / "x.txt")
    assert np.allclose(MS.read_transform(path), ms.to_session[1], atol=1e-5)


def test_images_enter_the_mid_space_equally_sharp_wherever_the_grid_falls(tmp_path):
    """Linear interpolation blurs by an amount set by where the grid's points fall between the voxels
    (none on the voxels, most halfway), which moved readings across a scanner change; the images'
    interpolator keeps their detail at any phase."""
    import ants
    from scipy import ndimage as ndi

    rng = np.random.default_rng(0)
    img = ants.from_numpy(ndi.gaussian_filter(rng.normal(size=(40, 40, 40)), 0.7).astype(np.float32))
    grid = ants.from_numpy(np.zeros((30, 30, 30), np.float32), origin=(5.5, 5.5, 5.5))  # halfway
    on = ants.from_numpy(np.zeros((30, 30, 30), np.float32), origin=(5.0, 5.0, 5.0))

    def sd(interpolator, g):
        return float(MS.resample(img, g, np.eye(4), interpolator, work_dir=tmp_path).numpy().std())

    linear = sd("linear", grid) / sd("linear", on)
    shipped = sd(MS.IMAGE_INTERPOLATOR, grid) / sd(MS.IMAGE_INTERPOLATOR, on)
    assert linear < 0.8  # the blur the test is about
    assert shipped > 0.9


def test_subject_change_table(three_sessions, tmp_path):
    ses = list(reversed(three_sessions["sessions"]))  # given out of order: acq_time decides
    res = S.subject_change(ses, work_dir=tmp_path)
    t = res.table
    assert list(t.columns) == list(S.COLUMNS)
    assert list(dict.fromkeys(zip(t.ses_from, t.ses_to))) == [("1", "2"), ("2", "3"), ("1", "3")]
    assert set(t.measure) == set(C.MEASURES)
    brain = t[t.measure == "brain"].set_index(["ses_from", "ses_to"])
    fr = three_sessions["fractions"]
    for (i, j) in [(0, 1), (1, 2), (0, 2)]:
        true = ((fr[j]["GM"] + fr[j]["WM"]).sum() / (fr[i]["GM"] + fr[i]["WM"]).sum() - 1) * 100
        got = brain.loc[(str(i + 1), str(j + 1)), "percent_change"]
        assert got == pytest.approx(true, abs=0.35), (i, j)
    assert brain.loc[("1", "2"), "interval_days"] == 365
    assert brain.loc[("1", "2"), "acquisition_changed"] == "false"
    assert brain.loc[("2", "3"), "acquisition_changed"] == "true"
    assert brain.loc[("2", "3"), "correction"] == C.RECALIBRATED
    assert brain.loc[("1", "2"), "percent_change_per_year"] == pytest.approx(
        brain.loc[("1", "2"), "percent_change"] * 365.25 / 365, rel=1e-6)
    assert t[t.measure == "lesion"].percent_change.isna().all()
    assert any("acquisition changed" in w for w in res.warnings)
    written = S.format_table(t)
    path = tmp_path / "t.tsv"
    written.to_csv(path, sep="\t", index=False, na_rep="n/a")
    back = pd.read_csv(path, sep="\t")
    assert (back.loc[back.measure == "lesion", "percent_change"].astype(str) == "n/a").all() or \
        back.loc[back.measure == "lesion", "percent_change"].isna().all()


def test_order_and_interval_without_dates():
    a = S.SessionInput("1", "a", "m")
    b = S.SessionInput("2", "b", "m", acq_time="2021-01-01")
    assert [s.label for s in S.order_sessions([b, a])] == ["2", "1"]  # not every session dated: as given
    assert np.isnan(S.interval_days(a, b))
    assert S.pairs(2) == [(0, 1)] and S.pairs(4) == [(0, 1), (1, 2), (2, 3), (0, 3)]
    assert S.acquisition_changed(a, b) is None


def test_correction_names_every_session_read_unfolded():
    a, b = S.SessionInput("ses-1", "a", "m"), S.SessionInput("ses-2", "b", "m", csf_inverted=True)
    assert S.correction_text("none", a, a) == "none"
    assert S.correction_text(C.RECALIBRATED, a, b).startswith(C.RECALIBRATED + "; CSF signal inverted in ses-2")
    both = S.correction_text("none", b, S.SessionInput("ses-3", "c", "m", csf_inverted=True))
    assert both.startswith("CSF signal inverted in ses-2, ses-3")


def test_lesions_are_classified_one_by_one():
    from bidsapp.longitudinal import lesions as L

    before, after = np.zeros((40, 40, 40)), np.zeros((40, 40, 40))
    before[2:5, 2:5, 2:5] = after[2:5, 2:5, 2:5] = 1  # stable (27 mm3)
    before[10:13, 10:13, 10:13] = 1
    after[10:15, 10:15, 10:15] = 1  # enlarging 27 -> 125
    after[20:23, 20:23, 20:23] = 1  # new
    before[30:33, 2:5, 2:5] = 1  # resolved
    before[30:36, 30:36, 30:36] = 1
    after[30:33, 30:33, 30:33] = 1  # shrinking 216 -> 27
    after[35:37, 19:21, 19:21] = 1  # a new 8 mm3 speck: below MIN_NEW_MM3, not counted
    table, new = L.lesion_change(before, after, ses_from="ses-1", ses_to="ses-2")
    assert L.counts(table) == {"new": 1, "enlarging": 1, "stable": 1, "shrinking": 1, "resolved": 1}
    assert new.sum() == 27 and new[21, 21, 21] and not new[36, 20, 20]
    row = table.set_index("status").loc["enlarging"]
    assert (row.volume_from_mm3, row.volume_to_mm3) == (27.0, 125.0)
    assert list(table.columns) == list(L.COLUMNS)
    # new or grown voxels: the new lesion whole, the enlarging one's rim (125 - 27), not the speck nor the rest
    changed = L.change_mask(before, after)
    assert changed.sum() == 27 + 98 and changed[21, 21, 21] and changed[14, 14, 14]
    assert not changed[11, 11, 11] and not changed[36, 20, 20] and not changed[3, 3, 3]
    assert not L.change_mask(after, after).any()


def test_grown_rim_below_the_minimum_is_no_change():
    """A lesion one voxel wider on one face (a segmentation's jitter: 9 mm3) is not a change; in 1.2 mm3 voxels
    (10.8 mm3) it is."""
    from bidsapp.longitudinal import lesions as L

    before = np.zeros((20, 20, 20))
    before[5:8, 5:8, 5:8] = 1
    after = before.copy()
    after[8, 5:8, 5:8] = 1
    assert not L.change_mask(before, after).any()
    assert L.change_mask(before, after, voxel_mm3=1.2).sum() == 9


def test_a_work_dir_from_before_the_lesion_change_masks_recomputes_the_subject_step():
    """The step's cache key holds its outputs' revision: results cached before ``lesionchange_masks``
    existed (revision 1) are not offered to a workflow that connects it (nor, since revision 3, results
    read the earlier way)."""
    from workflows.interfaces.longitudinal import LongitudinalChange

    node = LongitudinalChange()
    names, now = node.inputs.get_hashval()
    assert ("outputs_revision", 3) in names
    node.inputs.outputs_revision = 1
    assert node.inputs.get_hashval()[1] != now


def test_group_step_gathers_every_subjects_change(tmp_path):
    import logging

    from bidsapp.harmonize.context import GroupContext
    from bidsapp.longitudinal import group

    for sub, changed in (("01", "false"), ("02", "true")):
        anat = tmp_path / f"sub-{sub}" / "anat"
        anat.mkdir(parents=True)
        rows = [{"measure": m, "ses_from": "ses-1", "ses_to": "ses-2", "interval_days": 365.0,
                 "volume_from_mm3": 1000.0, "volume_to_mm3": 990.0, "percent_change": -1.0,
                 "percent_change_per_year": -1.0, "percent_change_raw": -4.0 if changed == "true" else -1.0,
                 "acquisition_changed": changed, "correction": C.RECALIBRATED if changed == "true" else "none"}
                for m in C.MEASURES]
        pd.DataFrame(rows).to_csv(anat / f"sub-{sub}_desc-change_morph.tsv", sep="\t", index=False)
    lesion_rows = [{"ses_from": "ses-1", "ses_to": "ses-2", "lesion": k + 1, "status": st} for k, st in
                   enumerate(("new", "new", "enlarging", "stable", "resolved"))]
    pd.DataFrame(lesion_rows).to_csv(tmp_path / "sub-02" / "anat" / "sub-02_desc-lesionchange_stats.tsv", sep="\t",
                                     index=False)
    ctx = GroupContext(output_dir=tmp_path, work_dir=tmp_path / "w", volumes=pd.DataFrame(), acquisitions=pd.DataFrame(),
                       participants=pd.DataFrame(), logger=logging.getLogger("test"))
    from bidsapp.reports.harmonization import render

    sections = render(group.run(ctx))
    table = pd.read_csv(tmp_path / group.TSV_NAME, sep="\t", dtype={"acquisition_changed": str})
    assert len(table) == 12 and list(table.columns[:2]) == ["participant_id", "measure"]
    assert set(table.acquisition_changed) == {"false", "true"}
    assert sections and sections[0].title == "Longitudinal change" and "<img" in sections[0].body
    activity = pd.read_csv(tmp_path / group.LESION_TSV_NAME, sep="\t")
    assert activity.to_dict("records") == [{"participant_id": "sub-02", "ses_from": "ses-1", "ses_to": "ses-2",
                                            "new": 2, "enlarging": 1, "stable": 1, "shrinking": 0, "resolved": 1,
                                            "new_or_enlarging": 3}]
    assert group.LESION_TSV_NAME in sections[0].body
    empty = tmp_path / "empty"
    empty.mkdir()
    ctx.output_dir = empty
    assert group.run(ctx) == [] and not (empty / group.TSV_NAME).exists()
    assert not (empty / group.LESION_TSV_NAME).exists()


def test_lesion_slices_show_the_change_first_and_the_lesions_without_one():
    from bidsapp.reports.longitudinal import lesion_slices

    lesions, active = np.zeros((8, 8, 40), bool), np.zeros((8, 8, 40), bool)
    lesions[2:4, 2:4, [5, 20, 30]] = True
    active[2:6, 2:6, 12] = active[2:4, 2:4, 14] = active[2, 2, 33] = True
    assert lesion_slices(active, lesions) == [12, 33]  # 14 is within 5 slices of 12
    assert lesion_slices(np.zeros_like(active), lesions) == [5, 20, 30]
    assert lesion_slices(np.zeros_like(active), np.zeros_like(lesions)) == []


def test_change_figure_draws_the_lesion_row_when_there_are_lesions(tmp_path):
    import ants

    from bidsapp.longitudinal.subject import SubjectChange
    from bidsapp.reports.longitudinal import change_figure

    template = np.zeros((30, 30, 30), np.float32)
    template[5:25, 5:25, 5:25] = 1
    earlier, new = np.zeros(template.shape, bool), np.zeros(template.shape, bool)
    earlier[10:13, 10:13, 10:13] = True
    new[18:21, 18:21, 18:21] = True
    table = pd.DataFrame([{"measure": "brain", "ses_from": "1", "ses_to": "2", "percent_change": -0.5,
                           "acquisition_changed": "false"}])
    result = SubjectChange(table=table, template=ants.from_numpy(template), to_session=[], sessions=[],
                           maps={("1", "2"): np.zeros(template.shape, np.float32)})
    plain = change_figure(result, tmp_path / "plain.svg")
    result.lesion_maps = {("1", "2"): (earlier, new, new)}
    result.lesions = pd.DataFrame([{"ses_from": "1", "ses_to": "2", "status": "new"},
                                   {"ses_from": "1", "ses_to": "2", "status": "resolved"}])
    with_lesions = change_figure(result, tmp_path / "lesions.svg")
    text = Path(with_lesions).read_text()
    assert "new lesions (1)" in text and "new lesions" not in Path(plain).read_text()
    # a third session: a row for every consecutive pair, the earlier pair's too
    result.lesion_maps[("2", "3")] = (earlier | new, np.zeros_like(new), np.zeros_like(new))
    three = Path(change_figure(result, tmp_path / "three.svg")).read_text()
    assert "lesions 1 → 2" in three and "lesions 2 → 3: no new or grown lesion" in three


def test_group_change_figure_reads_the_status_as_written_or_as_read_back(tmp_path):
    """The acquisition-change column is "true"/"false" in the table and bool when pandas reads it back: both
    give the same columns, each a compact column centred on its tick."""
    from bidsapp.reports.longitudinal import group_change_figure

    rows = [{"measure": "brain", "percent_change": -1.0 - k, "percent_change_raw": -3.0 - k,
             "acquisition_changed": "true" if k % 2 else "false"} for k in range(4)]
    pd.DataFrame(rows).to_csv(tmp_path / "t.tsv", sep="\t", index=False)
    for table in (pd.DataFrame(rows), pd.read_csv(tmp_path / "t.tsv", sep="\t")):
        ax = group_change_figure(table).axes[0]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["same acquisition", "acquisition changed"]
        assert ax.get_xlim() == (-0.5, 1.5)


def _tiny_siamese(weights_dir, size=32, input_mode="fraction"):
    """A tiny untrained 3D-SiameseNet saved with a card as ``scanbridge-train longitudinal`` writes one."""
    import torch

    from bidsapp.models import registry
    from bidsapp.models import siamese as SN

    arch = {"class": SN.ARCHITECTURE["class"],
            "kwargs": dict(SN.ARCHITECTURE["kwargs"], filters=[2, 2, 2], dense=[4, 4], input_size=size)}
    torch.manual_seed(0)
    net = SN.build_network(arch)
    card = {"version": "test", "architecture": arch, "classes": list(SN.CLASSES), "input_mode": input_mode,
            "resolution_mm": 3.0,
            "training": {"command": "test"}, "metrics": {}}
    registry.save_model(SN.MODEL_NAME, net.state_dict(), card, weights_dir)


@pytest.mark.parametrize("mode", ["fraction", "standardised"])
def test_decline_inputs_follow_the_anatomy_whatever_the_voxel_order(tmp_path, mode):
    from bidsapp.longitudinal import decline as D

    _tiny_siamese(tmp_path, input_mode=mode)
    from bidsapp.models import siamese as SN

    _, card = SN.load_model(weights_dir=tmp_path)
    fa, fb = _phantom(), _phantom(0.6, 1.0)
    ia, ib = _image(fa, seed=1), _image(fb, mu={"CSF": 0.1, "GM": 1.1, "WM": 1.45, "outside": 0.05}, seed=2)
    ma, mb = (fa["icv"] > 0.5).astype(np.float32), (fb["icv"] > 0.5).astype(np.float32)
    ras = D.pair_inputs(ia, ma, ib, mb, np.eye(4), card)
    flip = np.diag([-1.0, 1.0, -1.0, 1.0])  # the same arrays stored with the first and last axes reversed
    flip[:3, 3] = (np.asarray(SHAPE) - 1) * [1, 0, 1]
    lpi = D.pair_inputs(*(x[::-1, :, ::-1] for x in (ia, ma, ib, mb)), flip, card)
    for x, y in zip(ras, lpi):
        assert x.shape == (32, 32, 32) and np.allclose(x, y, atol=1e-5)
    for x in ras:  # tissue fractions (C.pair_fractions) or standardised intensities, tested in test_siamese.py
        assert x.min() >= 0 and x.max() <= (1 if mode == "fraction" else 1.2) and x.mean() > 0.05
    if mode == "standardised":  # each image on the anchors' scale, whatever its contrast
        for x in ras:
            assert SN.tissue_centres(x[x > 0])[2] == pytest.approx(SN.ANCHORS[2], abs=0.05)


def test_decline_reads_both_sessions_inside_the_masks_intersection(tmp_path):
    """A follow-up mask with a margin of bright skull the baseline's lacks changes neither input: the
    network was trained on pairs that share one mask, and a mask is not atrophy."""
    from scipy import ndimage as ndi

    from bidsapp.longitudinal import decline as D
    from bidsapp.models import siamese as SN

    _tiny_siamese(tmp_path, input_mode="standardised")
    _, card = SN.load_model(weights_dir=tmp_path)
    fr = _phantom()
    img = _image(fr, seed=1)
    mask = fr["icv"] > 0.5
    wider = ndi.binary_dilation(mask, iterations=3)
    skull = np.where(wider & ~mask, 3.0 * img.max(), img).astype(np.float32)
    same = D.pair_inputs(img, mask.astype(np.float32), img, mask.astype(np.float32), np.eye(4), card)
    wide = D.pair_inputs(img, mask.astype(np.float32), skull, wider.astype(np.float32), np.eye(4), card)
    for x, y in zip(same, wide):
        assert np.array_equal(x, y)
    with pytest.raises(ValueError, match="do not overlap"):
        D.pair_inputs(img, mask.astype(np.float32), img, np.zeros_like(img), np.eye(4), card)


def test_subject_change_gives_a_decline_probability_per_consecutive_pair(three_sessions, tmp_path, monkeypatch):
    from bidsapp.longitudinal import decline as D
    from bidsapp.models import registry

    assert not D.available(tmp_path)
    _tiny_siamese(tmp_path / "weights")
    from bidsapp.models import siamese as SN

    monkeypatch.setattr(registry, "WEIGHTS_DIR", tmp_path / "weights")
    monkeypatch.setattr(SN, "_CACHE", {})  # nothing of this test's model outlives it
    assert D.available()
    res = S.subject_change(three_sessions["sessions"], work_dir=tmp_path / "w", decline=True)
    d = res.decline
    assert list(d.columns) == list(D.COLUMNS)
    assert list(zip(d.ses_from, d.ses_to)) == [("1", "2"), ("2", "3")]
    assert list(d.acquisition_changed) == ["false", "true"] and list(d.interval_days) == [365, 365]
    assert d.probability_decline.between(0, 1).all()
    assert list(d.call) == ["decline" if p >= D.THRESHOLD else "stable" for p in d.probability_decline]
    side = D.sidecar_metadata()   # what the decline table's sidecar says made it
    card = registry.load_card(SN.MODEL_NAME)
    assert side["Model"] == {"Name": SN.MODEL_NAME, "Version": card.get("version"), "Sha256": card["sha256"]}
    assert side["Threshold"] == D.THRESHOLD and "mirror" in side["Reading"]


def test_session_inputs_read_the_node_inputs_as_saved_or_as_traits(tmp_path):
    """The subject-level node's inputs become one SessionInput per session, whether they come as the node's
    traits or as the dict Nipype saved (the readings benchmark reads a finished run's)."""
    from bidsapp.labels import TISSUE
    from workflows.interfaces.longitudinal import LongitudinalChange, session_inputs

    def f(name):  # the node's File traits want files that exist
        (tmp_path / name).touch()
        return str(tmp_path / name)

    probs = [f(f"p_{name}.nii.gz") for name in TISSUE.names]
    saved = {"in_files": [f("a.nii.gz"), f("b.nii.gz")], "mask_files": [f("ma.nii.gz"), f("mb.nii.gz")],
             "session_ids": ["1", "2"], "probseg_files": [probs, []], "acquisitions": ["siemens-3T-MPRAGE"]}
    got = session_inputs(saved)
    assert [s.label for s in got] == ["ses-1", "ses-2"]
    assert got[0].tissue == {c: str(tmp_path / f"p_{c}.nii.gz") for c in ("GM", "WM", "CSF")}
    assert got[1].tissue is None and got[1].acquisition is None and got[0].acquisition == "siemens-3T-MPRAGE"
    node = LongitudinalChange(**saved)
    assert session_inputs(node.inputs) == got
    with pytest.raises(ValueError, match="one entry per session"):
        session_inputs(dict(saved, mask_files=saved["mask_files"][:1]))
