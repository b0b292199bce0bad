"""Static signal equations: hand-computed values, limits, numpy/torch agreement, tissue tables."""
import math

import numpy as np
import pytest

from bidsapp.physics import equations as eq
from bidsapp.physics import tissues
from bidsapp.physics.protocols import PROTOCOLS, SITES, Protocol, get_protocol


def test_spgr_hand_computed():
    # PD 0.8, T1 1.0 s, T2* 50 ms, TR 20 ms, TE 5 ms, flip 30 deg
    e1 = math.exp(-0.02 / 1.0)
    a = math.radians(30)
    expect = 2.0 * 0.8 * math.sin(a) * (1 - e1) / (1 - math.cos(a) * e1) * math.exp(-0.005 / 0.05)
    assert eq.spgr(0.8, 1.0, 0.05, 0.02, 0.005, 30.0, gain=2.0) == pytest.approx(expect, rel=1e-12)


def test_spgr_limits():
    pd, t1, t2s = 0.7, 0.9, 0.05
    # TE -> 0 removes T2* weighting; TR >> T1 gives PD sin(a); flip 90 gives PD (1 - E1).
    assert eq.spgr(pd, t1, t2s, 0.01, 0.0, 20.0) == pytest.approx(eq.spgr(pd, t1, 1e12, 0.01, 0.0, 20.0))
    assert eq.spgr(pd, t1, 1e12, 100.0, 0.0, 20.0) == pytest.approx(pd * math.sin(math.radians(20)))
    assert eq.spgr(pd, t1, 1e12, 0.0079, 0.0, 90.0) == pytest.approx(pd * (1 - math.exp(-0.0079 / t1)))
    # Ernst angle maximises the signal.
    ernst = math.degrees(math.acos(math.exp(-0.0138 / t1)))
    flips = np.linspace(1, 60, 600)
    s = eq.spgr(pd, t1, t2s, 0.0138, 0.0028, flips)
    assert flips[np.argmax(s)] == pytest.approx(ernst, abs=0.2)


def test_mprage_eq2_exact_and_nulling():
    pd, t1, ti, td, tau = 0.8, 1.464, 0.9, 0.6, 0.01
    expect = pd * (1 - 2 * math.exp(-ti / t1) / (1 + math.exp(-(ti + td + tau) / t1)))
    assert eq.mprage(pd, t1, ti, td, tau) == pytest.approx(expect, rel=1e-12)
    # With a very long delay the inversion is complete: null at TI = T1 ln 2, negative before it.
    assert eq.mprage(1.0, t1, t1 * math.log(2), 1e6, 0.0) == pytest.approx(0.0, abs=1e-12)
    assert eq.mprage(1.0, t1, 0.5 * t1 * math.log(2), 1e6, 0.0) < 0
    # Longer TI -> more recovery for every T1.
    assert eq.mprage(1.0, 1.0, 1.2, 0.6, 0.01) > eq.mprage(1.0, 1.0, 0.6, 0.6, 0.01)


def test_mprage_t1_contrast_wm_brighter():
    p = {k: tissues.properties(k, 3.0) for k in ("CSF", "GM", "WM")}
    s = {k: eq.mprage(v.pd, v.t1, 0.9, 0.6, 0.01) for k, v in p.items()}
    assert s["WM"] > s["GM"] > s["CSF"] >= 0


def test_spin_echo_and_flair():
    pd, t1, t2 = 1.0, 1.0, 0.1
    assert eq.spin_echo(pd, t1, t2, 100.0, 0.0) == pytest.approx(pd)
    assert eq.spin_echo(pd, t1, t2, 2.0, 0.1) == pytest.approx((1 - math.exp(-2)) * math.exp(-1))
    # Inversion recovery nulls at TI = T1 ln 2 with TR >> T1.
    assert eq.flair(pd, t1, t2, 1e6, 0.0, t1 * math.log(2)) == pytest.approx(0.0, abs=1e-12)
    # FLAIR at 3T suppresses CSF below GM and WM; T2w makes CSF brightest.
    prop = {k: tissues.properties(k, 3.0) for k in ("CSF", "GM", "WM", "lesion")}
    fl = get_protocol("siemens-3T-flair")
    s = {k: eq.signal("FLAIR", v.pd, v.t1, v.t2, v.t2s, fl) for k, v in prop.items()}
    assert s["CSF"] < 0.1 * s["WM"] and s["CSF"] < 0.1 * s["GM"]
    assert s["lesion"] > s["GM"] > s["WM"]
    t2w = get_protocol("siemens-3T-t2w")
    s2 = {k: eq.signal("TSE", v.pd, v.t1, v.t2, v.t2s, t2w) for k, v in prop.items()}
    assert s2["CSF"] > s2["GM"] > s2["WM"]


@pytest.mark.parametrize("name", [n for n, p in PROTOCOLS.items() if p.sequence == "FLAIR"])
def test_flair_presets_null_csf(name):
    p = PROTOCOLS[name]
    csf = tissues.properties("CSF", p.field_strength)
    wm = tissues.properties("WM", p.field_strength)
    s_csf = eq.signal("FLAIR", csf.pd, csf.t1, csf.t2, csf.t2s, p)
    s_wm = eq.signal("FLAIR", wm.pd, wm.t1, wm.t2, wm.t2s, p)
    assert s_csf < 0.15 * s_wm


def test_numpy_torch_agree_and_broadcast():
    torch = pytest.importorskip("torch")
    tab = tissues.property_table(tissues.CLASSES, 1.5)
    for seq, prm in [("SPGR", get_protocol("mrainet-1.5T-spgr")), ("MPRAGE", get_protocol("siemens-1.5T-mprage")),
                     ("TSE", get_protocol("ge-1.5T-t2w")), ("FLAIR", get_protocol("ge-1.5T-flair"))]:
        a = eq.signal(seq, *tab.T, prm)
        b = eq.signal(seq, *torch.from_numpy(tab.T.copy()), prm)
        assert isinstance(b, torch.Tensor)
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-10)
    # A batch of TIs (B, 1) against tissues (C,) broadcasts to (B, C), gradients flow.
    t1 = torch.tensor(tab[1:6, 1], requires_grad=True)
    ti = torch.linspace(0.6, 1.2, 5)[:, None]
    out = eq.mprage(torch.tensor(tab[1:6, 0]), t1, ti, 0.6, 0.01)
    assert out.shape == (5, 5)
    out.sum().backward()
    assert torch.isfinite(t1.grad).all()


def test_background_zero_times_do_not_nan():
    assert eq.signal("SPGR", 0.0, 0.0, 0.0, 0.0, {"tr": 0.01, "te": 0.005, "flip_angle": 20}) == 0.0
    assert eq.signal("MPRAGE", 0.0, 0.0, 0.0, 0.0, {"ti": 0.9, "td": 0.6, "tau": 0.01}) == 0.0


def test_signal_dispatch_bids_keys_and_errors():
    sidecar = {"RepetitionTime": 2.3, "InversionTime": 0.9, "EchoTime": 0.003, "FlipAngle": 9}
    got = eq.signal("mprage", 0.7, 0.965, 0.07, 0.05, sidecar)
    assert got == pytest.approx(abs(eq.mprage(0.7, 0.965, 0.9, 1.4, 0.0)))
    with pytest.raises(ValueError, match="unknown sequence"):
        eq.signal("EPI", 1, 1, 1, 1, {})
    with pytest.raises(ValueError, match="needs parameters"):
        eq.signal("SPGR", 1, 1, 1, 1, {"tr": 0.01})


def test_tissue_reference_and_field_dependence():
    for name, (mean, _sd) in tissues.GOLD_STANDARD_R1.items():
        assert tissues.properties(name, 3.0).r1 == pytest.approx(mean, rel=1e-3)
    for name in ("GM", "WM"):
        t1 = [tissues.properties(name, b).t1 for b in (1.5, 3.0, 7.0)]
        t2s = [tissues.properties(name, b).t2s for b in (1.5, 3.0, 7.0)]
        assert t1[0] < t1[1] < t1[2] and t2s[0] > t2s[1] > t2s[2]
    mid = tissues.properties("GM", 2.0).t1
    assert tissues.properties("GM", 1.5).t1 < mid < tissues.properties("GM", 3.0).t1
    with pytest.raises(ValueError):
        tissues.properties("GM", 20.0)
    with pytest.raises(ValueError):
        tissues.properties("bone marrow", 3.0)


def test_subject_variation_seeded():
    m1 = tissues.sample_multipliers(tissues.CLASSES, np.random.default_rng(3))
    m2 = tissues.sample_multipliers(tissues.CLASSES, np.random.default_rng(3))
    np.testing.assert_array_equal(m1, m2)
    assert m1.shape == (len(tissues.CLASSES), 4) and np.all(m1 > 0.7) and np.all(m1 < 1.4)
    tab = tissues.property_table(("GM",), 3.0, np.array([[1.0, 1.1, 1.0, 1.0]]))
    assert 1.0 / tab[0, 1] == pytest.approx(0.683 * 1.1, rel=1e-3)


def test_protocol_presets_and_validation():
    rss = PROTOCOLS["mrainet-1.5T-spgr"]
    assert (rss.field_strength, rss.flip_angle, rss.tr, rss.te) == (1.5, 20.0, 0.0138, 0.0028)
    mrb = PROTOCOLS["mrainet-3T-spgr"]
    assert (mrb.field_strength, mrb.flip_angle, mrb.tr, mrb.te) == (3.0, 90.0, 0.0079, 0.0045)
    mp = PROTOCOLS["siemens-3T-mprage"]
    assert mp.td == pytest.approx(mp.tr - mp.ti - mp.tau)
    sc = mp.sidecar()
    for key in ("RepetitionTime", "EchoTime", "InversionTime", "FlipAngle", "MagneticFieldStrength", "Manufacturer",
                "ManufacturersModelName", "DeviceSerialNumber", "InstitutionName", "RepetitionTimeExcitation",
                "RepetitionTimePreparation", "PulseSequenceType", "ScanningSequence", "SequenceVariant"):
        assert key in sc, key
    assert sc["RepetitionTime"] < 10 and sc["EchoTime"] < 0.1  # seconds, not ms
    paper = PROTOCOLS["paper-mprage"].replace(ti=0.6)
    assert paper.td == pytest.approx(0.6) and paper.tr == pytest.approx(1.21)
    bad = [dict(te=0.02), dict(flip_angle=190.0), dict(flip_angle=0.0), dict(tr=-0.01), dict(sequence="EPI"),
           dict(field_strength=30.0), dict(voxel_size=(1, 0, 1)), dict(orientation="LLA")]
    for change in bad:
        with pytest.raises(ValueError, match="mrainet-1.5T-spgr"):
            rss.replace(**change)
    with pytest.raises(ValueError, match="TI"):
        mp.replace(tr=0.5)
    with pytest.raises(ValueError, match="TI"):
        Protocol("x", "FLAIR", "FLAIR", 3.0, tr=2.0, te=0.1, ti=2.5)
    assert set(SITES["site1"].protocols) == {"T1w", "FLAIR", "T2w", "PDw"}
