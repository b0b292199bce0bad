"""The 3D-SiameseNet (stable / decline from two sessions): network, preprocessing, simulated pairs, trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bidsapp.longitudinal.change import pair_fractions
from bidsapp.models import siamese as S
from bidsapp.training import longitudinal as L


def tiny_arch(size=32, filters=(4, 8, 8), dense=(16, 8)):
    return {"class": S.ARCHITECTURE["class"],
            "kwargs": dict(S.ARCHITECTURE["kwargs"], filters=list(filters), dense=list(dense), input_size=size)}


def test_forward_shapes_and_the_papers_layers():
    torch.manual_seed(0)
    net = S.build_network(tiny_arch())
    a, b = torch.rand(2, 1, 32, 32, 32), torch.rand(2, 1, 32, 32, 32)
    assert net(a, b).shape == (2, 2)
    fused, penultimate = net.features(a, b)
    assert fused.shape == (2, 8, 4, 4, 4) and penultimate.shape == (2, 8)
    kinds = [type(m).__name__ for m in net.branch]
    assert kinds == ["Conv3d", "BatchNorm3d", "LeakyReLU", "AvgPool3d"] * 3
    assert net.branch[0].kernel_size == (3, 3, 3) and net.branch[0].stride == (1, 1, 1)
    assert net.dropout.p == 0.5 and net.out.out_features == 2
    probs = S.predict_proba(net, a[:, 0].numpy(), b[:, 0].numpy())
    assert probs.shape == (2, 2) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        S.build_network(tiny_arch(size=36))
    pooled = S.build_network({"class": S.ARCHITECTURE["class"], "kwargs": dict(tiny_arch()["kwargs"], readout=2)})
    assert pooled.dense[2].in_features == 8 * 2 ** 3 and pooled(a, b).shape == (2, 2)
    with pytest.raises(ValueError, match="readout 3"):
        S.build_network({"class": S.ARCHITECTURE["class"], "kwargs": dict(tiny_arch()["kwargs"], readout=3)})


def test_the_mirrored_reading_averages_a_pair_with_its_left_right_mirror_image():
    torch.manual_seed(0)
    net = S.build_network(tiny_arch())
    a, b = np.random.default_rng(0).random((2, 2, 32, 32, 32)).astype(np.float32)
    a[:, :12] += 2.0                       # left and right differ, so the mirror image is another view
    b[:, :12, :16] = 0.0
    both = S.predict_proba(net, a, b, mirror=True)
    flipped = S.predict_proba(net, a[:, ::-1].copy(), b[:, ::-1].copy(), mirror=True)
    np.testing.assert_allclose(flipped, both, atol=1e-5)   # a pair and its mirror image read the same
    one = S.predict_proba(net, a, b, mirror=False)
    mirror_only = S.predict_proba(net, a[:, ::-1].copy(), b[:, ::-1].copy(), mirror=False)
    np.testing.assert_allclose(both, (one + mirror_only) / 2, atol=1e-5)
    assert np.abs(one - both).max() > 1e-4
    assert S.MIRROR and np.allclose(S.predict_proba(net, a, b), both, atol=1e-6)   # the default reading


def test_branches_share_their_weights_swapping_the_inputs_negates_the_fused_features():
    torch.manual_seed(1)
    net = S.build_network(tiny_arch())
    a, b = torch.rand(3, 1, 32, 32, 32), torch.rand(3, 1, 32, 32, 32)
    for mode in (True, False):  # training (batch statistics) and inference (running statistics)
        net.train(mode)
        with torch.no_grad():
            ab, ba = net.fuse(a, b), net.fuse(b, a)
        assert ab.abs().max() > 1e-3
        assert torch.allclose(ab, -ba, atol=1e-5)
    net.eval()
    with torch.no_grad():
        assert torch.count_nonzero(net.fuse(a, a)) == 0


def _sphere(shape, centre, radius_vox):
    g = np.indices(shape).astype(float)
    return sum((g[i] - centre[i]) ** 2 for i in range(3)) <= radius_vox ** 2


def test_preprocess_strips_resamples_crops_and_scales():
    rng = np.random.default_rng(0)
    shape, spacing = (60, 70, 50), (2.0, 2.0, 2.0)
    mask = _sphere(shape, (25, 40, 22), 15)  # 30 mm radius, off-centre
    image = np.where(mask, 400 + 50 * rng.standard_normal(shape), 3000.0).astype(np.float32)  # a bright "skull"
    out = S.preprocess(image, mask, spacing, size=24, target_mm=3.0)
    assert out.shape == (24, 24, 24) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() == pytest.approx(1.0)
    g = np.indices(out.shape).astype(float)
    r_mm = 3.0 * np.sqrt(sum((g[i] - 11.5) ** 2 for i in range(3)))  # centred on the mask's centre
    assert np.all(out[r_mm > 30 + 4.5] == 0)  # nothing outside the mask, the skull least of all
    assert np.all(out[r_mm < 30 - 4.5] > 0.3)
    # A given centre moves the crop: the follow-up is cropped in the baseline's box.
    shifted = S.preprocess(image, mask, spacing, size=24, target_mm=3.0, centre=(25 + 3, 40, 22))
    assert np.allclose(shifted[:-2], out[2:], atol=1e-6)


def _ball_brain(ventricle_vox, tissue, csf, size=32, radius=12, seed=0):
    """A ball of tissue with a CSF ventricle at its centre, on a 3 mm grid, noisy: (image, tissue voxels)."""
    rng = np.random.default_rng(seed)
    g = np.indices((size,) * 3).astype(float) - (size - 1) / 2
    r = np.sqrt((g ** 2).sum(0))
    frac = np.clip(r - ventricle_vox + 0.5, 0, 1) * (r <= radius)  # partial volume at the ventricle wall
    img = np.where(r <= radius, csf + (tissue - csf) * frac + rng.normal(0, 0.02 * tissue, r.shape), 0.0)
    return np.maximum(img, 1e-3 * (r <= radius)).astype(np.float32), float(frac.sum())


def test_tissue_fractions_put_two_scanners_on_one_scale_and_keep_the_change():
    a, truth_a = _ball_brain(4.0, tissue=400.0, csf=100.0)
    b, _ = _ball_brain(4.0, tissue=900.0, csf=350.0, seed=1)  # same brain, another scanner's contrast
    fa, fb = pair_fractions(a, b, (3.0,) * 3)
    assert fa.min() >= 0 and fa.max() <= 1 and not fa[a == 0].any()
    assert abs(fb.sum() / fa.sum() - 1) < 0.01  # the intensities' sums differ by 2.3x
    assert abs(fa.sum() / truth_a - 1) < 0.02
    c, truth_c = _ball_brain(5.0, tissue=900.0, csf=350.0, seed=2)  # the ventricle grew
    fa, fc = pair_fractions(a, c, (3.0,) * 3)
    assert (fc.sum() - fa.sum()) / (truth_c - truth_a) == pytest.approx(1.0, abs=0.1)
    with pytest.raises(ValueError, match="unknown network input"):
        L.network_inputs({}, "pixels", 3.0)


def test_brain_centre_keeps_the_cortex_when_a_tail_is_longer_than_the_crop():
    mask = _sphere((40, 40, 80), (20, 20, 55), 10)
    mask[19:21, 19:21, :40] = True  # a thin canal down to the edge
    c = S.brain_centre(mask, (3.0, 3.0, 3.0), size=24, target_mm=3.0)
    assert c[:2] == pytest.approx([20, 20]) and 50 < c[2] < 56  # not the box centre (39.5)


TINY = dict(anatomy_dir="icbm152", voxel_mm=4.0, size=24, grid_mm=8.0)


def test_pairs_are_deterministic_balanced_and_cached(tmp_path):
    messages = []
    cfg = L.TrainConfig(out=str(tmp_path / "run"), pairs=2, threads=1, **TINY)
    pool = L.build_pool(cfg, progress=messages.append)
    assert pool["a"].shape == (2, 24, 24, 24) and pool["a"].dtype == np.float16
    assert list(pool["label"]) == [0, 1] and list(pool["change"]) == [0, 0]
    assert all(p.split(">")[0] == p.split(">")[1] for p in pool["protocols"])  # same scanner
    from bidsapp.physics.atrophy import DECLINE_RATES, STABLE_RATES

    for i, rates in enumerate((STABLE_RATES, DECLINE_RATES)):  # the trajectory's annual rates, compounded
        years = float(pool["years"][i])
        assert 0.5 <= years <= 3.0
        assert pool["gm_change"][i] == pytest.approx(100 * ((1 - rates["gm_rate"]) ** years - 1), rel=0.05)
        assert pool["ventricle_change"][i] == pytest.approx(100 * ((1 + rates["ventricle_rate"]) ** years - 1),
                                                            rel=0.05)
    assert 0 < float(np.abs(pool["b"][1].astype(np.float32) - pool["a"][1]).mean())
    again = L.make_pair(1, seed=0, val_every=5, **TINY)
    assert np.array_equal(again["a"].astype(np.float16), pool["a"][1])
    assert np.array_equal(again["b"].astype(np.float16), pool["b"][1])
    other = L.make_pair(1, seed=1, val_every=5, **TINY)
    assert not np.array_equal(other["a"], again["a"])
    # A larger pool extends the file: the first pairs are read back, only the new one is generated.
    messages.clear()
    bigger = L.build_pool(L.TrainConfig(out=cfg.out, pairs=3, threads=1, **TINY), progress=messages.append)
    assert messages[0].startswith("generating pairs 2..2")
    assert np.array_equal(bigger["a"][:2], pool["a"]) and bigger["change"][2] == 1
    assert bigger["protocols"][2].split(">")[0] != bigger["protocols"][2].split(">")[1]
    with pytest.raises(SystemExit, match="another recipe"):
        L.build_pool(L.TrainConfig(out=cfg.out, pairs=3, threads=1, seed=5, **TINY))


def test_warp_pairs_shrink_the_brain_by_the_trajectorys_loss_and_change_nothing_else(tmp_path):
    """``--warp-share``: drawn per pair from a stream of its own (0 leaves every pair as it was); a warp
    pair's follow-up is its baseline with the brain shrunk by the brain loss the trajectory gives."""
    plain = L.make_pair(1, seed=0, val_every=5, **TINY)
    warped = L.make_pair(1, seed=0, val_every=5, warp_share=1.0, **TINY)
    assert not plain["warp"] and warped["warp"]
    assert np.array_equal(plain["a"], warped["a"]) and not np.array_equal(plain["b"], warped["b"])
    # a uniform shrink: the ventricles shrink with the brain, by the same share as the cortex
    assert warped["gm_change"] < 0 and warped["ventricle_change"] < 0 < plain["ventricle_change"]
    assert warped["gm_change"] == pytest.approx(warped["ventricle_change"], abs=0.5)
    cfg = L.TrainConfig(out=str(tmp_path / "run"), pairs=4, threads=1, warp_share=0.5, **TINY)
    assert L.pool_recipe(cfg)["warp_share"] == 0.5
    assert "warp_share" not in L.pool_recipe(L.TrainConfig(out=str(tmp_path / "other"), pairs=4, threads=1, **TINY))
    draws = [bool(np.random.default_rng([0, 8, i]).random() < 0.5) for i in range(4)]
    assert list(L.build_pool(cfg, progress=lambda m: None)["warp"]) == draws


def test_design_balances_classes_and_scanner_changes_and_holds_out_blocks():
    d = [L.design(i, 5) for i in range(40)]
    val = [x for x in d if x["validation"]]
    assert [x["label"] for x in d[:4]] == [0, 1, 0, 1] and [x["change"] for x in d[:4]] == [0, 0, 1, 1]
    assert len(val) == 8 and sum(x["label"] for x in val) == 4 and sum(x["change"] for x in val) == 4
    assert [x["slot"] for x in d[::4]] == [0, 1, 2, 3, 0, 4, 5, 6, 7, 1]


class _ByMean(torch.nn.Module):
    """Calls a pair "decline" when the follow-up is darker on average."""

    def forward(self, a, b):
        d = (a - b).mean((1, 2, 3, 4)) * 100
        return torch.stack([-d, d], 1)


def test_evaluate_reports_accuracy_msle_and_the_scanner_split():
    a = np.ones((4, 8, 8, 8), np.float32)
    b = a.copy()
    b[1] -= 0.5  # decline seen
    b[2] -= 0.5  # a stable scanner change called decline
    pairs = {"a": a, "b": b, "label": np.array([0, 1, 0, 1]), "change": np.array([0, 0, 1, 1])}
    m = L.evaluate(_ByMean(), pairs)
    assert m["n"] == 4 and m["accuracy"] == 0.5
    assert m["accuracy_same_scanner"] == 1.0 and m["accuracy_scanner_change"] == 0.0
    assert m["stable_change_called_stable"] == 0.0
    assert L.msle(np.array([[1.0, 0.0]]), np.array([0])) == pytest.approx(0.0, abs=1e-12)
    assert L.msle(np.array([[0.5, 0.5]]), np.array([0])) == pytest.approx(
        ((np.log(1.5) - np.log(2)) ** 2 + np.log(1.5) ** 2) / 2)


def _random_pool(n=12, size=16, seed=0):
    rng = np.random.default_rng(seed)
    d = [L.design(i, 3) for i in range(n)]
    a = rng.random((n, size, size, size)).astype(np.float16)
    return {"a": a, "b": (a * rng.uniform(0.8, 1.0, (n, 1, 1, 1))).astype(np.float16),
            "label": np.array([x["label"] for x in d]), "change": np.array([x["change"] for x in d]),
            "years": np.ones(n, np.float32), "validation": np.array([x["validation"] for x in d]),
            "anatomy": np.array(["icbm152"] * n), "protocols": np.array(["p>p"] * n),
            "gm_change": np.zeros(n, np.float32), "ventricle_change": np.zeros(n, np.float32)}


@pytest.mark.parametrize("inputs,erode", [("intensity", 0), ("standardised", 1)])
def test_training_checkpoints_and_resumes_exactly(tmp_path, inputs, erode):
    pool = _random_pool()

    def cfg(out):
        return L.TrainConfig(out=str(tmp_path / out), anatomy_dir="icbm152", pairs=12, iterations=3, batch=4, size=16,
                             filters="4,4,4", dense="8,8", val_every=3, eval_every=2, threads=1, checkpoint_every=1,
                             inputs=inputs, mask_erode=erode)

    first = L.train(cfg("a"), progress=lambda m: None, stop_after=2, pool=pool)
    assert not first["finished"] and len(first["loss"]) == 2 and (tmp_path / "a" / "checkpoint.pt").is_file()
    assert first["val_at"] == [2]
    resumed = L.train(cfg("a"), progress=lambda m: None, pool=pool)
    straight = L.train(cfg("b"), progress=lambda m: None, pool=pool)
    assert resumed["finished"] and resumed["loss"] == straight["loss"] and len(straight["loss"]) == 3
    assert resumed["validation"] == straight["validation"] and resumed["validation"]["n"] == 4
    for k, v in straight["net"].state_dict().items():
        assert torch.equal(resumed["net"].state_dict()[k], v), k
    card = L.save(straight["net"], cfg("b"), straight)
    assert card["architecture"]["kwargs"]["filters"] == [4, 4, 4] and card["metrics"]["validation"]["n"] == 4
    net, _ = S.load_model(weights_dir=tmp_path / "b" / "weights")
    x = pool["a"][:2].astype(np.float32)
    assert np.allclose(S.predict_proba(net, x, x), S.predict_proba(straight["net"], x, x), atol=1e-6)


def test_scanner_adversary_reverses_its_gradient_and_is_not_shipped(tmp_path):
    from bidsapp.models.layers import reverse_gradient
    from bidsapp.training.losses import adversary_ramp

    x = torch.ones(3, requires_grad=True)
    (reverse_gradient(x, 0.5) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([-0.5, -1.0, -1.5]))
    assert adversary_ramp(0.0) == 0.0 and 0.99 < adversary_ramp(1.0) < 1.0 and adversary_ramp(0.1) < adversary_ramp(0.2)

    pool = _random_pool()
    pool["protocols"] = np.array(["p>p", "p>q", "q>q", "q>p"] * 3)
    cfg = L.TrainConfig(out=str(tmp_path / "adv"), anatomy_dir="icbm152", pairs=12, iterations=3, batch=4, size=16,
                        filters="4,4,4", dense="8,8", val_every=3, eval_every=0, threads=1, checkpoint_every=1,
                        scanner_adversary=1.0)
    first = L.train(cfg, progress=lambda m: None, stop_after=2, pool=pool)
    assert first["net"].domain_head[-1].out_features == 4 and len(first["adversary"]) == 2
    resumed = L.train(cfg, progress=lambda m: None, pool=pool)
    straight = L.train(L.TrainConfig(**dict(vars(cfg), out=str(tmp_path / "adv2"))), progress=lambda m: None, pool=pool)
    assert resumed["loss"] == straight["loss"]
    card = L.save(straight["net"], cfg, straight)
    assert "--scanner-adversary 1.0" in card["training"]["command"]
    net, _ = S.load_model(weights_dir=tmp_path / "adv" / "weights")
    assert net.domain_head is None
    straight["net"].eval()
    a = torch.as_tensor(pool["a"][:2].astype(np.float32))[:, None]
    with torch.no_grad():
        logits, dom = straight["net"](a, a, reverse=1.0)
        assert dom.shape == (2, 4) and torch.allclose(logits, straight["net"](a, a))
    x = pool["a"][:2].astype(np.float32)
    assert np.allclose(S.predict_proba(net, x, x), S.predict_proba(straight["net"], x, x), atol=1e-6)
    assert L._check(L.TrainConfig(out="x", anatomy_dir="icbm152", scanner_adversary=-1)).startswith("--scanner-adversary")


def test_the_trainer_is_a_subcommand():
    from bidsapp.training import cli

    assert cli.SUBCOMMANDS["longitudinal"][0] == "bidsapp.training.longitudinal"
    with pytest.raises(SystemExit) as exc:
        cli.main(["longitudinal", "--help"])
    assert exc.value.code == 0
    assert L._check(L.TrainConfig(out="x", anatomy_dir="icbm152", size=60)).startswith("--size 60")
    assert L._check(L.TrainConfig(out="x", anatomy_dir="/no/such/folder")) == "/no/such/folder: no such folder"


def _three_tissue_brain(ventricle_vox, csf, gm, wm, size=32, seed=0):
    """A ball brain on a 3 mm grid: a CSF ventricle, a WM core, a GM shell and a rim of CSF outside it,
    noisy; (image, CSF voxels)."""
    rng = np.random.default_rng(seed)
    g = np.indices((size,) * 3).astype(float) - (size - 1) / 2
    r = np.sqrt((g ** 2).sum(0))
    ventricle = np.clip(ventricle_vox + 0.5 - r, 0, 1) + np.clip(r - 10.5, 0, 1)
    grey = np.clip(r - 8.5, 0, 1) * (1 - ventricle)
    img = ventricle * csf + grey * gm + (1 - ventricle - grey) * wm
    img = np.where(r <= 12, img + rng.normal(0, 0.01 * wm, r.shape), 0.0)
    return np.maximum(img, 1e-3 * (r <= 12)).astype(np.float32), float(ventricle[r <= 12].sum())


def test_standardise_puts_two_scanners_on_one_scale_and_keeps_the_change():
    mprage, _ = _three_tissue_brain(4.0, csf=0.15, gm=0.5, wm=0.9)
    spgr, _ = _three_tissue_brain(4.0, csf=0.4, gm=0.7, wm=0.92, seed=1)  # same brain, another contrast
    sa, sb = S.standardise(mprage), S.standardise(spgr)
    assert not sa[mprage == 0].any() and sa[mprage > 0].min() >= 0.01
    brain = mprage > 0
    assert np.abs(sa - sb)[brain].mean() < 0.2 * np.abs(mprage - spgr)[brain].mean()
    for got, anchor in zip(S.tissue_centres(sa[sa > 0]), S.ANCHORS):
        assert got == pytest.approx(anchor, abs=0.02)
    grown, _ = _three_tissue_brain(5.5, csf=0.4, gm=0.7, wm=0.92, seed=2)  # the ventricle grew, new scanner
    dark = [int(((x > 0) & (x < 0.35)).sum()) for x in (sa, S.standardise(grown))]
    assert dark[1] - dark[0] > 150  # (5.5^3 - 4^3) * 4/3 pi ~ 430 voxels of CSF more
    assert not S.standardise(np.zeros((4, 4, 4), np.float32)).any()


def test_shipped_model_has_a_card_that_regenerates_its_command():
    import argparse
    import shlex

    from bidsapp.models import registry
    from bidsapp.training.config import config_from_args

    card = registry.verify(S.MODEL_NAME)[1]  # sha256 of the weights checked
    assert card["architecture"]["class"] == S.ARCHITECTURE["class"] and card["input_mode"] in S.INPUTS
    assert card["metrics"]["validation"]["accuracy"] > 0.5
    cmd = card["training"]["command"]
    parser = argparse.ArgumentParser()
    L.add_arguments(parser)
    args = parser.parse_args(shlex.split(cmd)[2:])
    assert L.command_line(config_from_args(L.TrainConfig, args)) == cmd


def test_sampler_erodes_the_shared_mask_then_prepares_each_image():
    x = np.zeros((4, 12, 12, 12), np.float16)
    x[:, 2:10, 2:10, 2:10] = 0.5
    pool = {"a": x, "b": x.copy(), "label": np.array([0, 1, 0, 1])}
    calls = []

    def prepare(img):
        calls.append(int((img > 0).sum()))
        return img * 2

    sampler = L.PairSampler(pool, [0, 1, 2, 3], seed=0, flip=False, rotate_deg=0, mask_erode=2, prepare=prepare)
    a, b, _ = sampler.batch(16)
    assert torch.equal(a, b) and len(calls) == 32 and set(calls) <= {512, 216, 64} and len(set(calls)) > 1
    assert a.max() == 1.0  # prepared
    plain = L.PairSampler(pool, [0, 1, 2, 3], seed=0, flip=False, rotate_deg=0).batch(4)[0]
    assert (plain > 0).sum() == 4 * 512
    assert "standardised" in L._check(L.TrainConfig(out="x", anatomy_dir="icbm152", inputs="intensity", mask_erode=1))


def test_sampler_jitters_each_image_of_a_pair_on_its_own():
    rng = np.random.default_rng(0)
    x = np.zeros((4, 12, 12, 12), np.float32)
    x[:, 2:10, 2:10, 2:10] = rng.choice(S.ANCHORS, size=(8, 8, 8))  # the batch's order is shuffled
    pool = {"a": x, "b": x.copy(), "label": np.array([0, 1, 0, 1])}
    plain = L.PairSampler(pool, [0, 1, 2, 3], seed=0, flip=False, rotate_deg=0).batch(4)
    assert torch.equal(plain[0], plain[1])
    a, b, _ = L.PairSampler(pool, [0, 1, 2, 3], seed=0, flip=False, rotate_deg=0, intensity_jitter=0.1).batch(4)
    assert not torch.equal(a, b)  # the two images of a pair are remapped independently
    assert torch.equal(a > 0, b > 0) and torch.equal(a > 0, torch.as_tensor(x[:, None] > 0))  # the mask is kept
    for img in (a, b):
        for k in range(4):
            values = [img[k][torch.as_tensor(x[k][None] == np.float32(t))] for t in S.ANCHORS]
            assert all(float(v.max() - v.min()) < 1e-5 for v in values)  # one tissue, one value
            csf, gm, wm = (float(v.mean()) for v in values)
            assert csf < gm < wm  # order kept
            assert abs(csf - S.ANCHORS[0]) <= 0.1 + 1e-6 and abs(wm - S.ANCHORS[2]) <= 0.05 + 1e-6
    again = L.PairSampler(pool, [0, 1, 2, 3], seed=0, flip=False, rotate_deg=0, intensity_jitter=0.1).batch(4)
    assert torch.equal(again[0], a) and torch.equal(again[1], b)  # from the seed alone
    assert "standardised" in L._check(L.TrainConfig(out="x", anatomy_dir="icbm152", inputs="intensity",
                                                    intensity_jitter=0.1))
    assert L._check(L.TrainConfig(out="x", anatomy_dir="icbm152", intensity_jitter=0.3)) is not None
