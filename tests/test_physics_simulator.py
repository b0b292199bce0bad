"""Phantoms, simulator and physics gold standard on tiny volumes."""

import nibabel as nib
import numpy as np
import pytest

from bidsapp.devdata import anatomy_dir
from bidsapp.physics import equations as eq
from bidsapp.physics import gold_standard as gs
from bidsapp.physics import phantom as ph_mod
from bidsapp.physics import simulator as sim_mod
from bidsapp.physics.protocols import PROTOCOLS

ANATOMY = anatomy_dir()


@pytest.fixture(scope="module")
def spheres():
    return ph_mod.sphere_phantom((28, 30, 26), voxel_size=4.0)


def _sim(ph, name, seed=0, **kw):
    kw.setdefault("voxel_size", "native")
    kw.setdefault("orientation", ph.axcodes)
    return sim_mod.simulate(ph, PROTOCOLS[name], np.random.default_rng(seed), **kw)


def test_phantom_fractions_sum_to_one_and_truth(spheres):
    np.testing.assert_allclose(spheres.fractions.sum(0), 1.0, atol=1e-5)
    prob = spheres.truth_probseg()
    assert prob.shape == (3,) + spheres.shape
    d = spheres.dseg()
    assert set(np.unique(d)) == {0, 1, 2, 3}
    assert not d[~spheres.brain_mask].any()
    v = spheres.volumes()
    assert v["brain"] == pytest.approx(v["GM"] + v["WM"])
    assert v["CSF"] >= v["ventricles"] > 0


def test_partial_volume_mixes_pure_signals_no_bright_rims(spheres):
    for name in ("siemens-3T-mprage", "siemens-3T-t2w", "siemens-3T-flair", "mrainet-3T-spgr"):
        s = _sim(spheres, name, bias=False, noise=False)
        img = s.image.get_fdata(dtype=np.float32)
        sig = np.array([s.tissue_signals[c] for c in spheres.classes])
        np.testing.assert_allclose(img, np.abs(np.tensordot(sig, spheres.fractions, axes=1)), rtol=1e-4, atol=1e-3)
        # Every mixed voxel lies between the pure signals of the tissues it contains: no rims.
        present = spheres.fractions > 1e-3
        hi = np.where(present, np.abs(sig)[:, None, None, None], -np.inf).max(0)
        assert np.all(img <= hi + 1e-3), name
    # Averaging T1 across a GM/CSF border instead would be brighter than both tissues in T1w FLAIR:
    p = PROTOCOLS["siemens-3T-flair"]
    from bidsapp.physics.tissues import properties
    gm, csf = properties("GM", 3.0), properties("CSF", 3.0)
    wrong = eq.signal("FLAIR", 0.9, 1 / (0.5 / gm.t1 + 0.5 / csf.t1), 0.5 * (gm.t2 + csf.t2), 0, p)
    right = 0.5 * (eq.signal("FLAIR", gm.pd, gm.t1, gm.t2, 0, p, magnitude=False)
                   + eq.signal("FLAIR", csf.pd, csf.t1, csf.t2, 0, p, magnitude=False))
    assert wrong > right


def test_point_spread_blurs_the_signed_signal_and_keeps_the_mean(spheres):
    from scipy import ndimage as ndi

    sharp = _sim(spheres, "siemens-3T-mprage", bias=False, noise=False).image.get_fdata(dtype=np.float32)
    s = _sim(spheres, "siemens-3T-mprage", bias=False, noise=False, psf_fwhm=1.5)
    img = s.image.get_fdata(dtype=np.float32)
    sig = np.array([s.tissue_signals[c] for c in spheres.classes])
    signed = np.tensordot(sig, spheres.fractions, axes=1)
    expected = np.abs(ndi.gaussian_filter(signed, 1.5 / 2.3548, mode="nearest"))
    np.testing.assert_allclose(img, expected, rtol=1e-3, atol=1e-3)  # blurred before the magnitude
    edges = np.abs(np.diff(sharp, axis=0)).max()
    assert np.abs(np.diff(img, axis=0)).max() < 0.8 * edges  # edges are softer
    # a blur moves signal, it makes none (all signals of one sign: an SPGR)
    spgr = [_sim(spheres, "mrainet-3T-spgr", bias=False, noise=False, psf_fwhm=f).image.get_fdata() for f in (0, 1.5)]
    assert spgr[1].mean() == pytest.approx(spgr[0].mean(), rel=1e-3)
    assert np.array_equal(_sim(spheres, "siemens-3T-mprage", bias=False, noise=False, psf_fwhm=0).image.get_fdata(),
                          sharp)  # off by default
    # thick slices: the width is the in-plane voxel's, so a slab is barely blurred across slices
    step = np.zeros((9, 9, 9), np.float32)
    step[4:] = 1.0
    thick = sim_mod.point_spread(step, 2.0, (1.0, 1.0, 5.0))
    np.testing.assert_allclose(thick, sim_mod.point_spread(step, 2.0, (1.0, 1.0, 1.0)), atol=1e-6)  # edge along x
    slab = np.zeros((9, 9, 9), np.float32)
    slab[:, :, 4:] = 1.0
    assert sim_mod.point_spread(slab, 2.0, (1.0, 1.0, 5.0))[4, 4, 3] < 0.01 < sim_mod.point_spread(slab, 2.0)[4, 4, 3]


def test_resample_preserves_volumes_and_partial_volume(spheres):
    coarse = spheres.resample((6.0, 5.0, 10.0))
    assert coarse.voxel_size == pytest.approx((6.0, 5.0, 10.0))
    np.testing.assert_allclose(coarse.fractions.sum(0), 1.0, atol=1e-5)
    a, b = spheres.volumes(), coarse.volumes()
    for k in ("GM", "WM", "CSF"):
        assert b[k] == pytest.approx(a[k], rel=0.02)
    # The centre of the field of view stays put.
    c0 = spheres.affine @ np.r_[(np.array(spheres.shape) - 1) / 2, 1]
    c1 = coarse.affine @ np.r_[(np.array(coarse.shape) - 1) / 2, 1]
    assert np.abs(c0 - c1).max() < 6.0


def test_protocol_grid_orientation_and_noise(spheres):
    p = PROTOCOLS["siemens-3T-flair"].replace(voxel_size=(4.0, 4.0, 8.0), orientation="LPS", snr=20.0)
    s = sim_mod.simulate(spheres, p, np.random.default_rng(1))
    assert "".join(nib.aff2axcodes(s.image.affine)) == "LPS"
    assert np.allclose(s.image.header.get_zooms(), (4.0, 4.0, 8.0))
    assert s.truth.shape == s.image.shape and np.allclose(s.truth.affine, s.image.affine)
    img = s.image.get_fdata()
    bg = img[s.truth.fraction("background") > 0.999]
    # Rayleigh background: mean sigma sqrt(pi/2).
    assert bg.mean() == pytest.approx(s.noise_sigma * np.sqrt(np.pi / 2), rel=0.15)
    assert s.noise_sigma == pytest.approx(img[s.truth.brain_mask].mean() / 20.0, rel=0.25)
    assert s.image.get_data_dtype() == np.float32
    sc = s.sidecar()
    assert sc["InversionTime"] == p.ti and sc["SliceThickness"] == 8.0


def test_bias_field_smooth_and_scaled(spheres):
    f = sim_mod.random_bias_field((30, 30, 30), np.random.default_rng(0), 0.2, (4, 4, 4))
    assert np.log(f).std() == pytest.approx(0.2, rel=1e-3)
    assert np.abs(np.diff(np.log(f), axis=0)).max() / 4.0 < 0.05  # smooth: < 5 % change per mm


def test_simulation_deterministic(spheres):
    a = _sim(spheres, "mrainet-1.5T-spgr", seed=5).image.get_fdata()
    b = _sim(spheres, "mrainet-1.5T-spgr", seed=5).image.get_fdata()
    c = _sim(spheres, "mrainet-1.5T-spgr", seed=6).image.get_fdata()
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_dict_params_and_bad_params(spheres):
    s = sim_mod.simulate(spheres, {"sequence": "SPGR", "field_strength": 3.0, "tr": 0.0079, "te": 0.0045,
                                   "flip_angle": 90.0}, np.random.default_rng(0), voxel_size="native")
    assert s.protocol.name == "custom-spgr"
    with pytest.raises(ValueError, match="TE"):
        sim_mod.simulate(spheres, {"sequence": "SPGR", "field_strength": 3.0, "tr": 0.005, "te": 0.01,
                                   "flip_angle": 20.0}, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown sequence"):
        sim_mod.simulate(spheres, {"sequence": "EPI", "field_strength": 3.0, "tr": 1.0}, np.random.default_rng(0))


def test_torch_path_matches_numpy(spheres):
    torch = pytest.importorskip("torch")
    p = PROTOCOLS["paper-mprage"]
    ref = _sim(spheres, "paper-mprage", bias=False, noise=False).image.get_fdata()
    fr = torch.from_numpy(spheres.fractions)
    tab = spheres.property_table(3.0)
    w = spheres.classes.index("WM")
    receiver = sim_mod.tissue_signals(spheres, p)[w] / eq.mprage(tab[w, 0], tab[w, 1], p.ti, p.td, p.tau)
    img = sim_mod.simulate_torch(fr, tab, "MPRAGE", p.params(), gain=float(receiver))
    np.testing.assert_allclose(img.numpy(), ref, rtol=1e-4, atol=1e-2)
    # Batched TIs with noise and bias stay finite and have the batch shape.
    g = torch.Generator().manual_seed(0)
    out = sim_mod.simulate_torch(fr, tab, "MPRAGE", {"ti": torch.tensor([0.6, 1.2]), "td": 0.6, "tau": 0.01},
                                 bias_field=sim_mod.bias_field_torch(spheres.shape, 0.1, g, batch=2),
                                 noise_sigma=0.01, generator=g)
    assert out.shape == (2,) + spheres.shape and torch.isfinite(out).all()


def test_gold_standard_values_and_phantom(spheres):
    r1 = np.array([0.240, 0.683, 1.036, 0.86, 3.0, 0.0])
    mask = np.array([1, 1, 1, 1, 1, 0], bool)
    prob, lab = gs.physics_gold_standard(r1, mask)
    assert list(lab) == [1, 2, 3, 3, 3, 0]
    np.testing.assert_allclose(prob[:, mask].sum(0), 1.0, rtol=1e-6)
    assert not prob[:, ~mask].any()
    assert prob[1, 1] > 0.99 and prob[2, 2] > 0.99
    q = spheres.qmri(3.0)
    wm_pure = spheres.fraction("WM") > 0.999
    assert np.allclose(q["R1"][wm_pure], 1.036, rtol=1e-3)
    assert np.allclose(q["T1"][wm_pure] * q["R1"][wm_pure], 1.0, rtol=1e-4)
    prob, lab = gs.gold_standard_from_phantom(spheres)
    truth = spheres.dseg()
    m = spheres.brain_mask
    assert (lab[m] == truth[m]).mean() > 0.85
    with pytest.raises(ValueError, match="shape"):
        gs.physics_gold_standard(r1, mask[:3])


def test_deformation_makes_new_plausible_subject(spheres):
    a = ph_mod.make_subject(spheres, np.random.default_rng(0))
    b = ph_mod.make_subject(spheres, np.random.default_rng(0))
    c = ph_mod.make_subject(spheres, np.random.default_rng(1))
    assert np.array_equal(a.fractions, b.fractions) and not np.array_equal(a.fractions, c.fractions)
    np.testing.assert_allclose(a.fractions.sum(0), 1.0, atol=1e-5)
    va, v0 = a.volumes(), spheres.volumes()
    assert va["brain"] == pytest.approx(v0["brain"], rel=0.2) and va["brain"] != v0["brain"]
    assert not np.allclose(a.multipliers, 1.0)


def test_one_hot_warp_equals_trilinear_of_each_map(spheres):
    lab = np.argmax(spheres.fractions, 0).astype(np.uint8)
    hard = ph_mod.Phantom(ph_mod._one_hot(lab, len(spheres.classes)), spheres.affine, spheres.classes, labels=lab)
    soft = ph_mod.Phantom(hard.fractions.copy(), spheres.affine, spheres.classes)
    coords = ph_mod.sample_coordinates(hard, np.random.default_rng(2), displacement_mm=6.0)
    np.testing.assert_allclose(ph_mod.warp(hard, coords).fractions, ph_mod.warp(soft, coords).fractions, atol=1e-4)


@pytest.mark.skipif(not ANATOMY.is_dir(), reason="development label maps not present (set SCANBRIDGE_DATA_DIR)")
def test_label_map_phantom_volumes_and_classes():
    path = ANATOMY / "anat-03_dseg.nii.gz"
    lab = np.asarray(nib.load(path).dataobj)
    ph = ph_mod.from_label_map(path, resolution=4.0)
    assert ph.voxel_size == pytest.approx((4.0, 4.0, 4.0))
    brain_labels = (lab > 0) & (lab < 500)
    assert ph.brain_fraction.sum() * 64 == pytest.approx(brain_labels.sum(), rel=0.01)
    wm = np.isin(lab, [2, 41, 7, 46, 16, 85, 28, 60, 25, 57]).sum()
    assert ph.volumes()["WM"] == pytest.approx(wm, rel=0.01)
    for c in ("skull", "skin", "fat", "muscle", "eye"):
        assert c in ph.classes
    s = _sim(ph, "siemens-3T-mprage", voxel_size=4.0)
    assert s.image.shape == s.truth.shape
