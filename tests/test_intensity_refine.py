"""Intensity refinement of network probabilities (bidsapp.models.intensity_refine) on small synthetic brains."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from bidsapp.models.intensity_refine import refine


def _shells(n=40, seed=0):
    """Labels 1 CSF / 2 GM / 3 WM in concentric shells (GM a thin rim, as cortex is), and the mask."""
    g = np.linspace(-1, 1, n)
    r = np.sqrt(sum(a ** 2 for a in np.meshgrid(g, g, g, indexing="ij")))
    lab = np.zeros(r.shape, np.uint8)
    lab[r < 0.9] = 1
    lab[r < 0.8] = 2
    lab[r < 0.68] = 3
    return lab, lab > 0


def _coarse_prior(lab, sigma=1.5, gm_weight=3.0):
    """What a coarse network gives: the one-hot truth blurred and grey favoured where classes mix, a GM
    rim too thick."""
    onehot = np.stack([(lab == k).astype(np.float32) for k in (1, 2, 3)])
    p = np.stack([gaussian_filter(c, sigma) for c in onehot])
    p[1] *= gm_weight
    p[:, lab == 0] = 0
    return p / np.maximum(p.sum(0, keepdims=True), 1e-6)


def _image(lab, means, noise=0.04, seed=0):
    rng = np.random.default_rng(seed)
    img = np.zeros(lab.shape, np.float32)
    for k, m in zip((1, 2, 3), means):
        img[lab == k] = m
    return (img + noise * rng.standard_normal(lab.shape)).astype(np.float32) * (lab > 0)


def _volumes(probs, mask):
    dseg = probs.argmax(0)[mask] + 1
    return np.array([(dseg == k).sum() for k in (1, 2, 3)], float)


@pytest.mark.parametrize("means", [(0.3, 0.6, 0.9), (0.9, 0.5, 0.2)])  # T1w-like and inverted (T2w-like)
def test_refinement_moves_a_coarse_prior_to_the_image_boundaries(means):
    lab, mask = _shells()
    prior = _coarse_prior(lab)
    true = np.array([(lab == k).sum() for k in (1, 2, 3)], float)
    before = np.abs(_volumes(prior, mask) / true - 1)
    post, fit = refine(_image(lab, means), mask, prior)
    after = np.abs(_volumes(post, mask) / true - 1)
    assert before.max() > 0.1  # the blurred prior is visibly off...
    assert after.max() < 0.03  # ...the image puts the boundaries back
    np.testing.assert_allclose(fit.means, np.array(means) / np.percentile(_image(lab, means)[mask], 99), atol=0.03)
    assert fit.gm_wm_separation > 3 and fit.iterations >= 2
    np.testing.assert_allclose(post[:, mask].sum(0), 1, atol=1e-5)
    assert not post[:, ~mask].any()


def test_without_gm_wm_contrast_the_prior_decides():
    lab, mask = _shells()
    prior = _coarse_prior(lab, sigma=0.7, gm_weight=1.0)
    post, fit = refine(_image(lab, (0.3, 0.8, 0.8)), mask, prior)
    gm_wm = mask & (lab >= 2)
    agree = (post.argmax(0) == prior.argmax(0))[gm_wm].mean()
    assert agree > 0.95 and fit.gm_wm_separation < 0.5


def test_too_few_voxels_leave_the_probabilities_alone():
    probs = np.full((3, 4, 4, 4), 1 / 3, np.float32)
    mask = np.zeros((4, 4, 4), bool)
    mask[:2, :2, :2] = True
    out, fit = refine(np.ones((4, 4, 4), np.float32), mask, probs)
    assert fit is None and out is probs


def _thick_slices(n=60, k=3, means=(0.3, 0.6, 0.9), noise=0.02, seed=1):
    """Shells made on a fine grid and averaged into slices ``k`` voxels thick, as a 2D scan is: the image,
    its true tissue fractions and the mask (where at least half the slab is brain)."""
    lab, _ = _shells(n)
    onehot = np.stack([(lab == c).astype(np.float32) for c in (1, 2, 3)])
    fine = np.tensordot(np.array(means, np.float32), onehot, axes=1)
    slab = lambda a: a.reshape(*a.shape[:-1], a.shape[-1] // k, k).mean(-1)  # noqa: E731
    frac = np.stack([slab(c) for c in onehot])
    mask = frac.sum(0) >= 0.5
    img = (slab(fine) + noise * np.random.default_rng(seed).standard_normal(mask.shape)).astype(np.float32) * mask
    return img, frac, mask


@pytest.mark.parametrize("means", [(0.1, 0.4, 0.9), (0.4, 0.85, 0.95)])  # dark CSF, low GM; bright CSF, flat GM/WM
def test_partial_volume_keeps_thick_slice_volumes_where_pure_classes_cannot(means):
    img, frac, mask = _thick_slices(means=means)
    lab = np.where(mask, frac.argmax(0) + 1, 0)
    prior = _coarse_prior(lab, sigma=1.0)
    true = frac[1:, mask].sum(1)  # GM, WM (the slab mean mixes the outer CSF with the background too)
    out, fit = refine(img, mask, prior)
    pure, pure_fit = refine(img, mask, prior, partial_volume=False)
    err = np.abs(_volumes(out, mask)[1:] / true - 1)
    err_pure = np.abs(_volumes(pure, mask)[1:] / true - 1)
    assert err.max() < 0.03 and err_pure.max() > 0.1
    assert max(fit.sds) < max(pure_fit.sds) / 2  # mixtures no longer widen the tissues' Gaussians
    assert 0.2 < fit.partial_volume < 0.8 and pure_fit.partial_volume is None
    np.testing.assert_allclose(out[:, mask].sum(0), 1, atol=1e-4)
    assert out.min() >= 0 and out.max() <= 1 + 1e-6
    assert out[2][mask & (frac[2] == 1)].mean() > 0.95  # a voxel deep inside a tissue is all of it


def _inverted_csf_slabs(k=3, seed=1):
    """Thick-slice shells of an MPRAGE before CSF's null (CSF's signal negative, the image its
    magnitude): the image, the true fractions, the mask and a coarse prior."""
    lab, _ = _shells(60)
    onehot = np.stack([(lab == c).astype(np.float32) for c in (1, 2, 3)])
    signed = np.tensordot(np.array((-0.2, 0.5, 1.0), np.float32), onehot, axes=1)
    slab = lambda a: a.reshape(*a.shape[:-1], a.shape[-1] // k, k).mean(-1)  # noqa: E731
    frac = np.stack([slab(c) for c in onehot])
    mask = frac.sum(0) >= 0.5
    noise = 0.02 * np.random.default_rng(seed).standard_normal(mask.shape)
    img = np.abs(slab(signed) + noise).astype(np.float32) * mask
    return img, frac, mask, _coarse_prior(np.where(mask, frac.argmax(0) + 1, 0), sigma=1.0)


def test_csf_of_opposite_sign_makes_its_border_darker_and_the_sign_reads_it():
    """A voxel part CSF, part GM is darker than either when CSF's signal is negative. Read as a line
    between the two intensities, that border goes to CSF; with the sign given (as the sequence
    parameters give it), GM comes back."""
    img, frac, mask, prior = _inverted_csf_slabs()
    true_gm = frac[1, mask].sum()
    linear, lin_fit = refine(img, mask, prior)
    signed_out, fit = refine(img, mask, prior, csf_sign=-1.0)
    assert linear[1, mask].sum() / true_gm - 1 < -0.08
    assert abs(signed_out[1, mask].sum() / true_gm - 1) < 0.04
    assert abs(signed_out[2, mask].sum() / frac[2, mask].sum() - 1) < 0.01
    assert fit.csf_sign == -1 and lin_fit.csf_sign == 1


def test_the_outlier_class_keeps_bright_non_tissue_from_widening_the_tissues():
    """1 % of the mask far brighter than white matter (fat, a vessel): without the outlier class the
    shared GM/WM Gaussian widens to take it in and the dark border is misread."""
    img, frac, mask, prior = _inverted_csf_slabs()
    rng = np.random.default_rng(2)
    bright = mask & (rng.random(mask.shape) < 0.01)
    img[bright] = rng.uniform(1.2, 2.0, int(bright.sum()))
    true_gm = frac[1, mask].sum()
    without, fit0 = refine(img, mask, prior, csf_sign=-1.0, outlier=0.0)
    with_, fit = refine(img, mask, prior, csf_sign=-1.0)  # the default outlier class
    assert fit0.sds[1] > 3 * fit.sds[1] and fit.sds[1] < 0.03
    assert without[1, mask].sum() / true_gm - 1 > 0.05
    assert abs(with_[1, mask].sum() / true_gm - 1) < 0.03
    assert 0.005 < fit.outlier < 0.03


def test_the_network_split_keeps_the_fit_s_tissue_and_border_and_the_network_s_amount_of_grey():
    """``tissue_split="network"``: CSF and GM + WM per voxel as the fit reads them, the grey share of the
    tissue as the network's odds add up, every voxel's GM:WM odds moved by one amount (so the border still
    follows the image); ``"auto"``
    takes it only where the fit separates GM from WM well."""
    from bidsapp.models import intensity_refine as IR

    lab, mask = _shells()
    prior = _coarse_prior(lab)
    img = _image(lab, (0.3, 0.6, 0.9))
    fit_split, fit = refine(img, mask, prior, tissue_split="intensity")
    net_split, net_fit = refine(img, mask, prior, tissue_split="network")
    np.testing.assert_allclose(net_split[0], fit_split[0], atol=1e-6)
    tissue = (fit_split[1] + fit_split[2])[mask]
    np.testing.assert_allclose((net_split[1] + net_split[2])[mask], tissue, atol=1e-5)
    p = np.maximum(prior[:, mask], IR.PRIOR_FLOOR)
    want = float((tissue * p[1] / (p[1] + p[2])).sum())
    assert net_split[1, mask].sum() == pytest.approx(want, rel=1e-3)
    assert net_split[1, mask].sum() > 1.1 * fit_split[1, mask].sum()  # the coarse prior's grey excess
    logit = lambda f: np.log(f[1][mask]) - np.log(f[2][mask])  # noqa: E731
    both = (tissue > 0.5) & (np.minimum(fit_split[1], fit_split[2])[mask] > 0.01)
    shift = (logit(net_split) - logit(fit_split))[both]
    assert shift.mean() > 0.5 and shift.std() < 0.01  # one common move of every voxel's GM:WM odds
    assert net_fit.tissue_split == "network" and fit.tissue_split == "intensity"
    assert net_fit.network_share == 1.0 and fit.network_share == 0.0
    auto, auto_fit = refine(img, mask, prior, tissue_split="auto")
    assert fit.gm_wm_separation > IR.NETWORK_SPLIT_RAMP[1] and auto_fit.network_share == 1.0
    np.testing.assert_allclose(auto, net_split, atol=1e-6)
    low = _image(lab, (0.3, 0.6, 0.65), noise=0.05)  # GM and WM one s.d. apart: the fit's amount
    low_int, _ = refine(low, mask, prior, tissue_split="intensity")
    low_auto, low_fit = refine(low, mask, prior, tissue_split="auto")
    assert low_fit.gm_wm_separation < IR.NETWORK_SPLIT_RAMP[0] and low_fit.network_share == 0.0
    np.testing.assert_allclose(low_auto, low_int, atol=1e-6)
    mid = _image(lab, (0.3, 0.6, 0.7), noise=0.05)  # on the ramp: between the two amounts
    mid_int, mid_fit = refine(mid, mask, prior, tissue_split="intensity")
    mid_net, _ = refine(mid, mask, prior, tissue_split="network")
    mid_auto, mid_auto_fit = refine(mid, mask, prior, tissue_split="auto")
    w = (mid_fit.gm_wm_separation - IR.NETWORK_SPLIT_RAMP[0]) / (IR.NETWORK_SPLIT_RAMP[1] - IR.NETWORK_SPLIT_RAMP[0])
    assert 0 < w < 1 and mid_auto_fit.network_share == pytest.approx(w, abs=1e-3)
    gm = [f[1, mask].sum() for f in (mid_int, mid_auto, mid_net)]
    assert gm[1] == pytest.approx(gm[0] + w * (gm[2] - gm[0]), rel=1e-3)
    with pytest.raises(ValueError, match="tissue_split"):
        refine(img, mask, prior, tissue_split="both")
