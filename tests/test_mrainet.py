"""MRAI-NET building blocks: network, dense featurisation, loss, pair sampler, proxy A-distance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bidsapp.metrics.domain import pad_matrix, proxy_a_distance
from bidsapp.models.mrainet import (MRAINet, MRAINetConfig, dense_features, extract_patches,
                                    l1_distance, load_mrainet, normalize_intensity, sample_centres, save_mrainet)
from bidsapp.models.pairs import PAIR_TYPES, PairSampler
from bidsapp.training.losses import ContrastiveLoss


def test_paper_architecture_defaults():
    m = MRAINet()
    convs = [l for l in m.net if isinstance(l, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 8, 2]
    assert convs[0].kernel_size == (3, 3) and convs[1].kernel_size == (13, 13)   # FC16 as a 13x13 conv
    assert [l.p for l in m.net if isinstance(l, torch.nn.Dropout)] == [0.2, 0.2, 0.2]
    assert m(torch.zeros(4, 1, 15, 15)).shape == (4, 2)
    with pytest.raises(ValueError):
        m(torch.zeros(1, 1, 17, 17))
    with pytest.raises(ValueError):
        MRAINetConfig(patch_size=14)


@pytest.mark.parametrize("cfg,axis", [
    (MRAINetConfig(), 2),
    (MRAINetConfig(), 0),
    (MRAINetConfig(conv_channels=(8, 16), hidden=(32,), out_features=4), 1),
    (MRAINetConfig(spatial_dims=3, patch_size=7), 2),
    (MRAINetConfig(pool=2), 2),                                   # the reference code's 2x2 max pooling
    (MRAINetConfig(pool=2, n_domains=3), 1),                      # ... and the scanner id
    (MRAINetConfig(spatial_dims=3, patch_size=9, pool=2, n_domains=2), 2),
])
def test_dense_equals_patchwise(cfg, axis):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = MRAINet(cfg).eval()
    if cfg.n_domains:                                 # non-zero scanner offsets, so that the id matters
        torch.nn.init.normal_(model.domain_offset.weight)
    img = rng.random((18, 20, 16)).astype(np.float32)
    mask = np.zeros(img.shape, bool)
    mask[1:17, 4:19, 0:12] = True                     # touches borders: zero padding must match
    domain = 1 if cfg.n_domains else None
    dense = dense_features(model, img, mask, axis=axis, batch_voxels=700, domain=domain)
    centres = np.argwhere(mask)
    with torch.no_grad():
        per_patch = model(torch.from_numpy(extract_patches(img, centres, cfg.patch_size, cfg.spatial_dims, axis)),
                          None if domain is None else torch.full((len(centres),), domain))
        if cfg.n_domains:
            other = model(torch.from_numpy(extract_patches(img, centres[:5], cfg.patch_size, cfg.spatial_dims,
                                                           axis)), torch.zeros(5, dtype=torch.long))
            assert not torch.allclose(other, per_patch[:5])
    np.testing.assert_allclose(dense[mask], per_patch.numpy(), atol=1e-5)
    assert (dense[~mask] == 0).all()


def test_reference_options_shapes_and_errors():
    m = MRAINet(MRAINetConfig(pool=2, n_domains=2))
    fc16 = [l for l in m.net if isinstance(l, torch.nn.Conv2d)][1]
    assert fc16.kernel_size == (6, 6)                 # 15 -> 13 (3x3 conv) -> 6 (2x2 pooling), as in Keras
    assert m(torch.zeros(4, 1, 15, 15), torch.tensor([0, 1, 1, 0])).shape == (4, 2)
    with pytest.raises(ValueError, match="domain"):
        m(torch.zeros(4, 1, 15, 15))
    # a configuration saved before the options existed still loads, as the paper's network
    old = {k: v for k, v in MRAINetConfig().to_dict().items() if k not in ("pool", "n_domains")}
    assert MRAINetConfig.from_dict(old) == MRAINetConfig()
    with pytest.raises(ValueError):
        MRAINetConfig(pool=0)


def test_extract_patches_geometry():
    img = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    p = extract_patches(img, np.array([[2, 3, 4]]), patch_size=3, axis=2)
    np.testing.assert_array_equal(p[0, 0], img[1:4, 2:5, 4])
    p = extract_patches(img, np.array([[0, 0, 0]]), patch_size=3, axis=0)
    assert p[0, 0, 0, 0] == 0 and p[0, 0, 1, 1] == img[0, 0, 0]     # zero padding outside
    p3 = extract_patches(img, np.array([[2, 2, 2]]), patch_size=3, spatial_dims=3)
    np.testing.assert_array_equal(p3[0, 0], img[1:4, 1:4, 1:4])
    # a 2D image (one slice) takes 2D centres
    sl = img[:, :, 4]
    p2 = extract_patches(sl, np.array([[2, 3], [0, 0]]), patch_size=3)
    np.testing.assert_array_equal(p2, extract_patches(img, np.array([[2, 3, 4], [0, 0, 4]]), patch_size=3))
    with pytest.raises(ValueError):
        extract_patches(sl, np.array([[2, 3]]), patch_size=3, spatial_dims=3)


def test_contrastive_loss_by_hand():
    d = torch.tensor([0.5, 2.0, 0.3, 1.5])
    y = torch.tensor([1.0, 1.0, 0.0, 0.0])
    # similar: d^2 = 0.25, 4.0 ; dissimilar, margin 1: max(0, 1 - 0.3) = 0.7, max(0, 1 - 1.5) = 0
    loss = ContrastiveLoss(margin=1.0, reduction="none")(d, y)
    np.testing.assert_allclose(loss.numpy(), [0.25, 4.0, 0.7, 0.0], atol=1e-7)
    assert ContrastiveLoss(reduction="sum")(d, y).item() == pytest.approx(4.95)
    assert ContrastiveLoss()(d, y).item() == pytest.approx(4.95 / 4)
    assert ContrastiveLoss(margin=2.0, reduction="sum")(d, y).item() == pytest.approx(0.25 + 4 + 1.7 + 0.5)
    fa, fb = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 4.0]])
    assert l1_distance(fa, fb).item() == 3.0                          # L1, not L2
    with pytest.raises(ValueError):
        ContrastiveLoss(margin=0)


def test_pair_sampler_six_types_and_labels():
    # 3 tissues; source (domain 0) many patches, two target groups with a few each; -1 = unlabelled
    tissues = np.r_[np.repeat([1, 2, 3], 50), [1, 2, 3, 1, -1], [2, 3, 1, -1]]
    domains = np.r_[np.zeros(150, int), np.ones(5, int), np.full(4, 2)]
    s = PairSampler(tissues, domains, source_domain=0, weights="balanced", seed=1)
    b = s.sample(6000)
    assert set(b.pair_type.tolist()) == set(range(6))
    counts = np.bincount(b.pair_type, minlength=6)
    assert counts.min() > 800                                        # balanced over the six types
    # the reference code's mix: ss-sim : st-sim : ss-dis : st-dis = 1 : 1 : 2 : 2, no target-target pair
    ref = np.bincount(PairSampler(tissues, domains, seed=1).sample(6000).pair_type, minlength=6) / 6000
    np.testing.assert_allclose(ref, [1 / 6, 1 / 6, 0, 1 / 3, 1 / 3, 0], atol=0.02)
    ta, tb = tissues[b.a], tissues[b.b]
    src_a, src_b = domains[b.a] == 0, domains[b.b] == 0
    assert (ta >= 0).all() and (tb >= 0).all()                       # unlabelled patches never paired
    np.testing.assert_array_equal(b.y == 1, ta == tb)                # similar <=> same tissue
    for t, (ra, rb, sim) in enumerate(PAIR_TYPES):
        sel = b.pair_type == t
        assert (src_a[sel] == (ra == "source")).all() and (src_b[sel] == (rb == "source")).all()
        assert (b.y[sel] == float(sim)).all()
    # target-target pairs join the two target scanners too
    tt = b.pair_type == 2
    assert (domains[b.a[tt]] != domains[b.b[tt]]).any()


def test_pair_sampler_counts_match_brute_force_without_enumerating():
    rng = np.random.default_rng(0)
    tissues = rng.integers(1, 4, 40)
    domains = (rng.random(40) < 0.3).astype(int)
    s = PairSampler(tissues, domains, seed=0)
    brute = np.zeros(6, int)
    for i in range(40):
        for j in range(40):
            ra = "source" if domains[i] == 0 else "target"
            rb = "source" if domains[j] == 0 else "target"
            if (ra, rb) == ("target", "source") or i == j:
                continue                                # ordered as (source, target); never a patch with itself
            brute[[k for k, (a, b, sim) in enumerate(PAIR_TYPES)
                   if (a, b, sim) == (ra, rb, tissues[i] == tissues[j])][0]] += 1
    assert [s.counts[t] for t in range(6)] == brute.tolist()
    # the paper's total: sum_k (N_k + M_k)^2 similar pairs (ordered, source-target counted both ways), less
    # the N + M pairs of a patch with itself
    n = np.bincount(tissues[domains == 0], minlength=4)[1:]
    m = np.bincount(tissues[domains == 1], minlength=4)[1:]
    assert s.counts[0] + 2 * s.counts[1] + s.counts[2] + 40 == int(((n + m) ** 2).sum())
    # a huge set is handled lazily: memory is per patch, not per pair
    big = PairSampler(np.tile([1, 2, 3], 200_000), np.r_[np.zeros(599_970, int), np.ones(30, int)], seed=0)
    assert big.total_pairs > 10 ** 11 and len(big.sample(256).a) == 256


def test_pair_sampler_weights_and_errors():
    tissues, domains = np.array([1, 2, 1, 2]), np.array([0, 0, 1, 1])
    s = PairSampler(tissues, domains, weights="combinatorial", seed=0)
    # one patch per tissue and scanner: no similar pair within a scanner exists
    np.testing.assert_allclose(s.type_probs, np.array([0, 2, 0, 2, 2, 2]) / 8)
    s = PairSampler(tissues, domains, weights=[0, 1, 0, 0, 0, 0], seed=0)
    assert set(s.sample(50).pair_type.tolist()) == {1}
    with pytest.raises(ValueError):
        PairSampler(np.array([-1, -1]), np.array([0, 1]))
    with pytest.raises(ValueError):                     # the only type asked for cannot be formed
        PairSampler(tissues, domains, weights=[1, 0, 0, 0, 0, 0])


def test_pair_sampler_never_pairs_a_patch_with_itself():
    # one labelled target patch per tissue: target-target similar pairs cannot exist; two per tissue: they
    # always join the two different patches
    for per_tissue in (1, 2):
        tissues = np.r_[np.repeat([1, 2, 3], 30), np.repeat([1, 2, 3], per_tissue)]
        domains = np.r_[np.zeros(90, int), np.ones(3 * per_tissue, int)]
        b = PairSampler(tissues, domains, weights="balanced", seed=0).sample(3000)
        similar = b.y == 1
        assert not (b.a == b.b)[similar].any()
        assert (2 in b.pair_type) == (per_tissue > 1)
        assert (tissues[b.a] == tissues[b.b])[similar].all()


def test_proxy_a_distance_limits():
    rng = np.random.default_rng(0)
    same = proxy_a_distance(rng.normal(size=(1500, 10)), rng.normal(size=(1500, 10)))
    assert abs(same.pad) < 0.2 and same.n_a == 1500
    apart = proxy_a_distance(rng.normal(size=(1500, 10)), rng.normal(size=(1500, 10)) + 4)
    assert apart.pad > 1.9
    short = proxy_a_distance(rng.normal(size=(100, 3)), rng.normal(size=(2000, 3)))
    assert short.short and short.n_a == 100 and short.n_b == 100
    m = pad_matrix({"a": rng.normal(size=(300, 2)), "b": rng.normal(size=(300, 2)) + 5,
                    "c": rng.normal(size=(300, 2))}, n=300)
    assert len(m) == 3 and m.set_index(["group_a", "group_b"]).loc[("a", "b"), "pad"] > 1.9


def test_normalize_and_sample_centres():
    img = np.full((10, 10, 4), 7.0, np.float32)
    mask = np.zeros(img.shape, bool)
    mask[2:8, 2:8] = True
    img[~mask] = 1000
    out = normalize_intensity(img, mask)
    assert out[mask].max() == pytest.approx(1.0) and (out[~mask] == 0).all()
    lab = np.zeros(img.shape, int)
    lab[2:8, 2:8] = 2
    lab[4:6, 4:6, 0] = 3
    c = sample_centres(lab, 10, classes=(1, 2, 3), rng=0)
    assert len(c[1]) == 0 and len(c[2]) == 10 and len(c[3]) == 4       # only 4 WM voxels exist
    assert (lab[tuple(c[3].T)] == 3).all()


def test_save_load_roundtrip(tmp_path):
    m = MRAINet(MRAINetConfig(hidden=(32, 8), out_features=3)).eval()
    save_mrainet(m, tmp_path / "m.pt")
    m2 = load_mrainet(tmp_path / "m.pt")
    x = torch.rand(3, 1, 15, 15)
    assert torch.equal(m(x), m2(x)) and m2.config.hidden == (32, 8)


def test_training_separates_tissues_across_scanners():
    """A few hundred steps on two toy scanners with inverted contrast: same tissue pulled together."""
    from bidsapp.training.mrainet import TrainSettings, featurize, train_mrainet

    rng = np.random.default_rng(0)
    n = 300
    tissues = np.tile([1, 2, 3], n // 3)
    level = {0: np.array([0, 0.3, 0.6, 0.9]), 1: np.array([0, 0.9, 0.5, 0.2])}
    domains = np.r_[np.zeros(n - 30, int), np.ones(30, int)]
    patches = np.stack([level[d][t] + 0.05 * rng.standard_normal((1, 15, 15)) for t, d in zip(tissues, domains)])
    res = train_mrainet(patches.astype(np.float32), tissues, domains,
                        settings=TrainSettings(steps=150, batch_size=64, seed=0))
    assert np.mean(res.losses[-20:]) < np.mean(res.losses[:20])
    f = featurize(res.model, patches.astype(np.float32))
    centroid = {(d, t): f[(domains == d) & (tissues == t)].mean(0) for d in (0, 1) for t in (1, 2, 3)}
    same = np.mean([np.abs(centroid[0, t] - centroid[1, t]).sum() for t in (1, 2, 3)])
    diff = np.mean([np.abs(centroid[0, t] - centroid[1, u]).sum() for t in (1, 2, 3) for u in (1, 2, 3) if t != u])
    assert same < diff


def test_patch_cnn_speaks_tissue_ids_and_keeps_global_generators():
    """SOURCE/TARGET CNNs take and return the same tissue ids as the rest (1-3 here); training leaves the
    caller's NumPy and torch generators where they were; the Keras-style epochs count whole passes."""
    from bidsapp.training.mrainet import TrainSettings, predict_cnn, train_patch_cnn

    rng = np.random.default_rng(0)
    tissues = np.tile([1, 2, 3], 40)
    patches = (tissues[:, None, None, None] / 3 + 0.02 * rng.standard_normal((120, 1, 15, 15))).astype(np.float32)
    np.random.seed(123)
    torch.manual_seed(123)
    before = np.random.random(), torch.rand(1).item()
    np.random.seed(123)
    torch.manual_seed(123)
    res = train_patch_cnn(patches, tissues, settings=TrainSettings(steps=150, batch_size=32, seed=0))
    assert (np.random.random(), torch.rand(1).item()) == before
    assert set(predict_cnn(res.model, patches)) <= {1, 2, 3}
    assert (predict_cnn(res.model, patches) == tissues).mean() > 0.9
    ep = train_patch_cnn(patches, tissues, settings=TrainSettings(batch_size=32, seed=0), epochs=3, holdout=0.2)
    assert ep.settings["steps"] == 3 * 3                           # 96 training patches: 3 batches per epoch


def test_train_command_needs_label_maps(tmp_path, capsys):
    from bidsapp.training.mrainet import main

    assert main(["--anatomy-dir", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "label maps" in capsys.readouterr().err


def test_shipped_weights_verify_and_load():
    from bidsapp.models import registry

    if "mrainet" not in registry.available("mrainet"):
        pytest.skip("no shipped MRAI-NET weights in this checkout")
    state, card = registry.load_state_dict("mrainet")
    model = MRAINet(MRAINetConfig.from_dict(card["architecture"]["kwargs"]))
    model.load_state_dict(state)
    assert card["architecture"]["kwargs"]["patch_size"] == 15
    assert 0 <= card["metrics"]["tissue_error_linear_on_features"] < 0.5


def test_loss_reduction_is_moot_under_rmsprop():
    """The paper sums the batch's losses, scanbridge averages them: RMSprop divides each step by the running
    size of the gradient, so a step is the same either way, up to RMSprop's epsilon (which weighs on the
    tiniest gradients: measured 0.3 % of the feature scale after one step, 3 % after 40 as the runs drift)."""
    from bidsapp.training.mrainet import TrainSettings, featurize, train_mrainet

    rng = np.random.default_rng(0)
    tissues = np.tile([1, 2, 3], 40)
    domains = np.r_[np.zeros(90, int), np.ones(30, int)]
    patches = (tissues[:, None, None, None] * (1 + domains[:, None, None, None]) / 6
               + 0.05 * rng.standard_normal((120, 1, 15, 15))).astype(np.float32)
    feats = [featurize(train_mrainet(patches, tissues, domains, settings=TrainSettings(
        steps=1, batch_size=64, seed=0, reduction=r)).model, patches) for r in ("mean", "sum")]
    untrained = featurize(train_mrainet(patches, tissues, domains, settings=TrainSettings(steps=0, seed=0)).model,
                          patches)
    step = np.abs(feats[0] - untrained).max()
    assert step > 0.01                                            # the step moved the features ...
    assert np.abs(feats[0] - feats[1]).max() < 0.1 * step        # ... the same way, whichever the reduction
