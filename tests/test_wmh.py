"""The FLAIR-only WMH model: generator, content loss, training data, trainers and inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bidsapp.devdata import anatomy_dir
from bidsapp.models import wmh as W
from bidsapp.training import wmh as T

needs_anatomy = pytest.mark.skipif(not (anatomy_dir() / "anat-01_dseg.nii.gz").is_file(),
                                   reason="label maps not available")


@pytest.fixture(scope="module")
def head():
    from bidsapp.training.lesion import load_heads

    return load_heads(anatomy_dir(), only=["anat-01"])[0]


def tiny_arch(size=32):
    return {"class": W.ARCHITECTURE["class"],
            "kwargs": dict(W.ARCHITECTURE["kwargs"], features=[8, 16, 32], input_size=size)}


def test_generator_is_a_dense_unet_with_the_paper_widths():
    net = W.build_network()
    assert W.ARCHITECTURE["kwargs"]["features"][0] == 32
    assert [b.convs[0][0].in_channels for b in net.down] == [1, 32, 64]
    assert net.bottleneck.convs[-1][0].out_channels * W.BLOCK_LAYERS == 256
    assert isinstance(net.down[0].convs[0][2], torch.nn.LeakyReLU) and net.down[0].convs[0][2].negative_slope == 0.1
    assert isinstance(net.up[0], torch.nn.ConvTranspose2d)
    out = W.build_network(tiny_arch()).eval()(torch.zeros(2, 1, 32, 32))
    assert out.shape == (2, len(W.OUTPUTS), 32, 32)


def test_feature_network_reads_two_pooling_stages():
    net = W.build_feature_network(decoder=True)
    feats = net(torch.zeros(1, 2, 32, 32))
    assert [f.shape[1:] for f in feats] == [(16, 16, 16), (32, 8, 8)]
    assert net.reconstruct(torch.zeros(1, 2, 32, 32)).shape == (1, 2, 32, 32)
    assert not any(k.startswith("decoder.") for k in W.feature_state(net))
    assert W.build_feature_network().decoder is None


def test_content_loss_is_zero_only_for_the_truth_and_sees_dark_regions():
    torch.manual_seed(0)
    loss = W.ContentLoss(W.build_feature_network())
    image = torch.rand(1, 1, 32, 32)
    image[..., :16, :] = 0.0  # a dark region (CSF on FLAIR)
    truth = torch.zeros(1, 1, 32, 32)
    truth[..., 20:26, 10:16] = 1.0
    assert float(loss(image, truth, truth)) == pytest.approx(0.0, abs=1e-9)
    pred = truth.clone()
    pred[..., 4:10, 4:10] = 1.0  # a false positive where the image is black
    pred.requires_grad_(True)
    value = loss(image, pred, truth)
    value.backward()
    assert float(value.detach()) > 0
    assert float(pred.grad[..., 4:10, 4:10].abs().sum()) > 0
    assert all(not p.requires_grad for p in loss.net.parameters())


@pytest.mark.parametrize("kind", ["content", "dice", "tversky", "gdice"])
def test_every_loss_is_a_finite_scalar(kind):
    from bidsapp.training.losses import wmh_loss

    fn = wmh_loss(kind, W.build_feature_network())
    logits = torch.randn(2, 1, 16, 16, requires_grad=True)
    truth = 0.1 + 0.8 * (torch.rand(2, 1, 16, 16) > 0.8).float()
    value = fn(logits, truth, torch.rand(2, 1, 16, 16))
    value.backward()
    assert value.ndim == 0 and torch.isfinite(value) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("kind", ["dice", "tversky", "gdice"])
def test_overlap_losses_prefer_the_lesion_to_calling_everything_lesion(kind):
    """Each loss on the target it trains on: the truth scores better than an all-lesion prediction. On the
    paper's soft-binarised truth (0.1 background) the soft Dice inverts this, and the Dice variant trained
    on it called whole brains lesion."""
    from bidsapp.training.losses import wmh_loss

    fn = wmh_loss(kind)
    truth = torch.zeros(2, 1, 64, 64)
    truth[:, :, 30:34, 30:34] = 1.0
    target = T.lesion_target(truth, kind)
    assert set(target.unique().tolist()) == {0.0, 1.0}
    right = torch.where(truth > 0, 8.0, -8.0)  # logits: the lesion and nothing else
    everything = torch.full_like(truth, 8.0)
    assert float(fn(right, target, truth)) < float(fn(everything, target, truth))
    if kind == "dice":  # why: the soft truth rewards calling everything lesion
        soft = T.lesion_target(truth, "content")
        assert float(fn(everything, soft, truth)) < float(fn(right, soft, truth))
    assert T.lesion_target(truth, "content").min() == pytest.approx(T.SOFT[0])


@pytest.mark.parametrize("kind", ["dice", "tversky", "gdice"])
def test_overlap_losses_do_not_reward_empty_output_on_lesion_free_slices(kind):
    """A batch like training's: one slice of eight has lesion. Averaged per slice, an empty output scores
    a perfect 0 on the seven others and beats a half-found lesion; the Dice variant trained so marked
    nothing. Summed over the batch, finding half the lesion must score better than finding none."""
    from bidsapp.training.losses import wmh_loss

    fn = wmh_loss(kind)
    truth = torch.zeros(8, 1, 64, 64)
    truth[0, :, 20:36, 20:36] = 1.0
    half = torch.where(truth > 0, 8.0, -8.0)
    half[0, :, 28:36] = -8.0
    empty = torch.full_like(truth, -8.0)
    assert float(fn(half, truth, truth)) < 0.7 < float(fn(empty, truth, truth))


def test_unknown_loss_is_refused():
    from bidsapp.training.losses import wmh_loss

    with pytest.raises(ValueError, match="unknown WMH loss"):
        wmh_loss("focal")


def test_scanner_families_do_not_overlap():
    train = T.make_scanners(40, np.random.default_rng(0))
    ood = T.make_scanners(40, np.random.default_rng(1), family="ood")
    thick = [s.slices["FLAIR"][1] for s in train]
    assert max(thick) <= 6.0 and min(thick) == 1.0
    assert min(s.slices["FLAIR"][1] for s in ood) >= 6.5
    assert all(1.4 < s.field_strength < 3.1 for s in train)
    assert all(s.field_strength < 1.1 or s.field_strength > 6.7 for s in ood)
    te_train = [s.sequences["FLAIR"][1]["te"] for s in train]
    te_ood = [s.sequences["FLAIR"][1]["te"] for s in ood]
    assert all(not (min(te_train) <= t <= max(te_train)) for t in te_ood)
    with pytest.raises(ValueError):
        T.make_scanners(1, np.random.default_rng(0), family="mixed")


@needs_anatomy
def test_lesion_load_grows_with_the_grade(head):
    def volume(grade):
        specs = T.draw_lesions(head, np.random.default_rng(grade), grade)
        return sum(np.prod(s.radii_mm) for s in specs)

    assert volume(0) < volume(1) < volume(3)
    kinds = {s.kind for s in T.draw_lesions(head, np.random.default_rng(5), 3)}
    assert {"periventricular", "deep"} <= kinds


@needs_anatomy
def test_training_slices_are_reproducible_and_resumable(head):
    scanners = T.make_scanners(3, np.random.default_rng(0))
    a = T.WMHSynth([head], scanners, size=32, seed=3)
    x, y, keep, d = a.batch(4)
    assert x.shape == (4, 1, 32, 32) and y.shape == (4, 4, 32, 32) and keep.shape == (4, 1, 32, 32)
    assert float(x.min()) >= 0 and float(x.max()) <= 6
    assert set(np.unique(y.numpy())) <= {0.0, 1.0}
    assert float((x * (1 - keep)).abs().max()) == 0.0  # masked by the brain as at inference
    state = a.state()
    b = T.WMHSynth([head], scanners, size=32, seed=99)
    b.set_state(state)
    xa, xb = a.sample()[0], b.sample()[0]
    assert torch.equal(xa, xb)


@needs_anatomy
def test_whole_session_is_on_the_scanners_grid(head):
    sc = T.make_scanners(1, np.random.default_rng(2), family="ood")[0]
    ses = T.simulate_session(head, sc, np.random.default_rng(0), torch.Generator().manual_seed(0), grade=3)
    depth = int(round(sc.slices["FLAIR"][1]))
    assert ses["zooms"] == (1.0, 1.0, float(depth))
    assert ses["flair"].shape == ses["lesion"].shape == ses["brain"].shape
    assert ses["flair"].shape[2] == head.classes.shape[2] // depth
    assert ses["lesion"].any() and not (ses["lesion"] & ~ses["brain"]).any()
    fl = ses["flair"]
    assert fl[ses["lesion"]].mean() > fl[ses["brain"] & ~ses["lesion"]].mean()  # bright on FLAIR


def test_square_crop_round_trip():
    img = np.arange(30 * 40, dtype=np.float32).reshape(30, 40)
    mask = np.zeros((30, 40), bool)
    mask[5:20, 10:38] = True
    box = W.square_box(mask, margin=0.1)
    assert box[2] >= 28
    crop = W.crop_square(img, box)
    assert crop.shape == (box[2], box[2])
    back = W.uncrop_square(crop, box, img.shape)
    x0, y0, side = box
    inside = np.zeros_like(mask)
    inside[max(x0, 0):x0 + side, max(y0, 0):y0 + side] = True
    np.testing.assert_array_equal(back[inside], img[inside])


def _save_tiny(tmp_path):
    from bidsapp.models import registry

    torch.manual_seed(0)
    net = W.build_network(tiny_arch())
    card = {"version": "test", "architecture": tiny_arch(), "training": {"command": "-", "seed": 0, "data": "-"},
            "metrics": {}}
    registry.save_model(W.MODEL_NAME, net.state_dict(), card, tmp_path)
    return tmp_path


def test_segment_returns_maps_on_the_input_grid_in_any_orientation(tmp_path):
    weights = _save_tiny(tmp_path)
    rng = np.random.default_rng(0)
    shape = (40, 36, 12)
    ii, jj, kk = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    brain = ii ** 2 + jj ** 2 + kk ** 2 < 0.7
    flair = (brain * 100 + rng.normal(0, 5, shape)).astype(np.float32)
    lps = np.diag([-0.9, -0.9, 3.0, 1.0])
    res = W.segment(flair, brain, lps, (0.9, 0.9, 3.0), weights_dir=weights)
    assert res.probability.shape == shape and res.mask.shape == shape
    assert set(res.context) == {"ventricles", "cortex", "infratentorial"}
    assert not (res.mask & ~brain).any()
    assert res.contrasts == ("FLAIR",)
    flipped = W.segment(flair[::-1], brain[::-1], np.diag([0.9, -0.9, 3.0, 1.0]), (0.9, 0.9, 3.0), weights_dir=weights)
    np.testing.assert_allclose(flipped.probability[::-1], res.probability, atol=1e-5)
    with pytest.raises(ValueError, match="empty"):
        W.segment(flair, np.zeros(shape, bool), lps, (0.9, 0.9, 3.0), weights_dir=weights)


@needs_anatomy
def test_train_resumes_exactly_and_writes_a_card(tmp_path, head, monkeypatch):
    from bidsapp.models import registry

    cfg = T.TrainConfig(anatomy_dir=str(anatomy_dir()), out=str(tmp_path / "run"), loss="dice", iterations=3,
                        batch=2, size=32, scanners=2, checkpoint_every=1)
    monkeypatch.setattr(W, "ARCHITECTURE", tiny_arch())  # a small generator keeps the test fast
    first = T.train(cfg, heads=[head], progress=lambda m: None, stop_after=2)
    assert not first["finished"]
    resumed = T.train(cfg, heads=[head], progress=lambda m: None)
    straight = T.train(T.TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "straight")}), heads=[head],
                       progress=lambda m: None)
    assert resumed["finished"] and resumed["loss"] == pytest.approx(straight["loss"], rel=1e-5)
    card = T.save(resumed["net"], cfg, resumed, weights_dir=tmp_path / "w")
    assert card["training"]["loss"] == "dice" and "scanbridge-train wmh" in card["training"]["command"]
    assert registry.verify(W.MODEL_NAME, tmp_path / "w")[1]["sha256"] == card["sha256"]
    other = T.TrainConfig(**{**cfg.__dict__, "loss": "tversky"})
    with pytest.raises(SystemExit, match="another recipe"):
        T.train(other, heads=[head], progress=lambda m: None)



@needs_anatomy
def test_bfloat16_training_changes_only_the_forward_pass_rounding(tmp_path, head, monkeypatch):
    monkeypatch.setattr(W, "ARCHITECTURE", tiny_arch())
    first = [T.train(T.TrainConfig(anatomy_dir=str(anatomy_dir()), out=str(tmp_path / p), iterations=1, batch=2,
                                   size=32, scanners=2, precision=p), heads=[head], progress=lambda m: None)["loss"][0]
             for p in ("float32", "bfloat16")]
    assert first[1] != first[0] and first[1] == pytest.approx(first[0], rel=0.05)


def test_shipped_models_have_cards():
    from bidsapp.models import registry

    gen = registry.verify(W.MODEL_NAME)[1]
    feats = registry.verify(W.FEATURES_NAME)[1]
    assert gen["architecture"]["class"] == W.ARCHITECTURE["class"]
    assert feats["architecture"] == W.FEATURE_ARCHITECTURE
    assert "scanbridge-train wmh-features" in feats["training"]["command"]
