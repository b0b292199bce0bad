"""Lesions, atrophy and synthesis from quantitative maps."""
import nibabel as nib
import numpy as np
import pytest

from bidsapp.physics import atrophy, lesions, qmri
from bidsapp.physics import phantom as ph_mod
from bidsapp.physics import simulator as sim_mod
from bidsapp.physics.protocols import PROTOCOLS


@pytest.fixture(scope="module")
def head():
    return ph_mod.sphere_phantom((40, 40, 40), voxel_size=3.0)


def test_lesions_in_white_matter_bright_on_flair(head):
    lp, specs = lesions.add_lesions(head, np.random.default_rng(0), n_periventricular=3, n_deep=5, n_juxtacortical=0)
    assert {s.kind for s in specs} == {"periventricular", "deep"} and len(specs) == 8
    np.testing.assert_allclose(lp.fractions.sum(0), 1.0, atol=1e-5)
    les = lp.fraction("lesion")
    assert les.sum() > 0
    # Lesions only replace white matter: every other class is unchanged.
    for c in head.classes:
        if c != "WM":
            np.testing.assert_array_equal(lp.fraction(c), head.fraction(c))
    assert lp.volumes()["WM"] == pytest.approx(head.volumes()["WM"])  # lesion counts as WM in the truth
    sizes = sorted(max(s.radii_mm) for s in specs)
    assert sizes[-1] > 1.5 * sizes[0]  # varied sizes
    kw = dict(voxel_size="native", orientation=lp.axcodes, bias=False, noise=False)
    s = sim_mod.simulate(lp, PROTOCOLS["siemens-3T-flair"], np.random.default_rng(0), **kw)
    t1 = sim_mod.simulate(lp, PROTOCOLS["siemens-3T-mprage"], np.random.default_rng(0), **kw)
    m, wm = lp.lesion_mask(), lp.fraction("WM") > 0.99
    assert m.any()
    flair, t1w = s.image.get_fdata(), t1.image.get_fdata()
    assert flair[m].mean() > 1.2 * flair[wm].mean()
    assert t1w[m].mean() < 0.9 * t1w[wm].mean()
    grown = lesions.apply_lesions(head, specs, growth=1.3)
    assert grown.volumes()["lesion"] > 1.5 * lp.volumes()["lesion"]


def test_juxtacortical_lesions_abut_the_cortex_and_leave_it_alone(head):
    import scipy.ndimage as ndi

    lp, specs = lesions.add_lesions(head, np.random.default_rng(1), n_periventricular=0, n_deep=0,
                                    n_juxtacortical=4)
    assert [s.kind for s in specs] == ["juxtacortical"] * 4
    np.testing.assert_array_equal(lp.fraction("GM"), head.fraction("GM"))  # only white matter turns lesion
    cortex = head.fraction("GM") >= 0.5
    d_cortex = ndi.distance_transform_edt(~cortex, sampling=head.voxel_size)
    lesion = lp.lesion_mask()
    assert lesion.any() and d_cortex[lesion].min() <= 3.0 + 1e-6   # within a voxel of the cortex
    vent = head.fraction("ventricles") >= 0.5
    centres = [np.linalg.inv(head.affine) @ np.r_[s.centre_mm, 1] for s in specs]
    d_vent = ndi.distance_transform_edt(~vent, sampling=head.voxel_size)
    assert all(d_vent[tuple(np.round(c[:3]).astype(int))] > 10 for c in centres)
    # the default draw keeps the periventricular and deep lesions of a seed as they were
    before = lesions.sample_lesions(head, np.random.default_rng(5), n_juxtacortical=0)
    after = lesions.sample_lesions(head, np.random.default_rng(5))
    assert after[:len(before)] == before


@pytest.mark.parametrize("years, gm_rate, vent_rate", [(1.0, 0.02, 0.06), (3.0, 0.005, 0.015)])
def test_atrophy_hits_requested_rates(head, years, gm_rate, vent_rate):
    v0 = head.volumes()
    a = atrophy.apply_atrophy(head, years, gm_rate, vent_rate)
    v1 = a.volumes()
    np.testing.assert_allclose(a.fractions.sum(0), 1.0, atol=1e-5)
    assert v1["ventricles"] / v0["ventricles"] == pytest.approx((1 + vent_rate) ** years, rel=1e-3)
    cort0, cort1 = v0["GM"] - v0["deep_GM"], v1["GM"] - v1["deep_GM"]
    assert cort1 / cort0 == pytest.approx((1 - gm_rate) ** years, rel=1e-3)
    assert v1["intracranial"] == pytest.approx(v0["intracranial"], rel=1e-6)
    assert np.all(a.fraction("background") == head.fraction("background"))


def test_atrophy_thins_cortex_from_outside(head):
    a = atrophy.cortical_thinning(head, 0.2)
    lost = head.fraction("GM") - a.fraction("GM")
    assert lost.min() >= -1e-6
    # GM is lost next to the outer CSF, not next to the white matter.
    near_wm = head.fraction("WM") > 0.05
    near_csf = head.fraction("CSF") > 0.05
    assert lost[near_csf].sum() > 5 * lost[near_wm & ~near_csf].sum()
    assert atrophy.apply_atrophy(head, 0).volumes() == head.volumes()
    with pytest.raises(ValueError):
        atrophy.cortical_thinning(head, 0.9)


@pytest.mark.parametrize("loss", [1.0, 3.0])
def test_shrink_brain_removes_the_stated_share_of_the_brain_and_keeps_the_skull(loss):
    """Atrophy as a warp (as injection tools make it on real scans): the brain region shrinks by exactly
    the stated share, the ventricles with it; the skull and what lies beyond stay where they were."""
    head = ph_mod.from_icbm152(3.0)
    v0 = head.volumes()
    a = atrophy.shrink_brain(head, loss)
    v1 = a.volumes()
    np.testing.assert_allclose(a.fractions.sum(0), 1.0, atol=1e-4)
    assert v1["brain"] / v0["brain"] == pytest.approx(1 - loss / 100, abs=0.002)
    assert v1["ventricles"] < v0["ventricles"]  # a uniform shrink: unlike apply_atrophy's
    # beyond the taper nothing moves
    from scipy import ndimage as ndi

    tissue = sum(head.fraction(c) for c in ("GM", "deep_GM", "WM", "lesion") if c in head.classes)
    dist = ndi.distance_transform_edt(~ndi.binary_fill_holes(tissue > 0.01), sampling=head.voxel_size)
    far = dist > atrophy.WARP_MARGIN_MM + atrophy.WARP_TAPER_MM + 3.0
    assert np.abs(a.fractions - head.fractions)[:, far].max() < 1e-5
    assert a.meta["shrunk_percent"] == loss


def _write_maps(root, phantom, ms=False):
    d = root / "sub-01" / "ses-1" / "anat"
    d.mkdir(parents=True)
    q = phantom.qmri(3.0)
    t1 = q["T1"] * (1000.0 if ms else 1.0)
    for suffix, arr in (("T1map", t1), ("R2starmap", q["R2star"]), ("PDmap", q["PD"] * 123.0)):
        nib.save(nib.Nifti1Image(arr.astype(np.float32), phantom.affine), d / f"sub-01_ses-1_{suffix}.nii.gz")
    return d


def test_synthesis_from_qmri_maps(tmp_path, head):
    _write_maps(tmp_path, head, ms=True)
    maps = qmri.load_qmri_maps(tmp_path, "01", "1")
    assert any("milliseconds" in n for n in maps.notes)
    wm = head.fraction("WM") > 0.999
    assert np.allclose(maps.r1[wm], 1.036, rtol=1e-3)
    assert np.allclose(maps.pd[wm], 0.70, rtol=1e-3)  # PD rescaled from arbitrary units
    img = qmri.synthesize(maps, PROTOCOLS["siemens-3T-mprage"], np.random.default_rng(0), bias=False, noise=False)
    ref = sim_mod.simulate(head, PROTOCOLS["siemens-3T-mprage"], np.random.default_rng(0), voxel_size="native",
                           orientation=head.axcodes, bias=False, noise=False).image.get_fdata()
    a = img.get_fdata()
    gm = head.fraction("GM") > 0.999
    csf = head.fraction("CSF") > 0.999
    # Pure-tissue voxels give the same contrast as the phantom simulation.
    assert a[wm].mean() / a[gm].mean() == pytest.approx(ref[wm].mean() / ref[gm].mean(), rel=1e-3)
    assert a[csf].mean() < a[gm].mean() < a[wm].mean()
    flair = qmri.synthesize(maps, PROTOCOLS["siemens-3T-flair"], np.random.default_rng(0)).get_fdata()
    assert flair[csf].mean() < 0.3 * flair[gm].mean()
    assert any("T2 interpolated" in n for n in maps.notes)


def test_qmri_missing_maps_clear_error(tmp_path):
    (tmp_path / "sub-02" / "anat").mkdir(parents=True)
    with pytest.raises(ValueError, match="no R1map or T1map"):
        qmri.load_qmri_maps(tmp_path, "sub-02")
