"""Native-resolution refinement of network tissue probabilities by the image's own intensities.

Why: the tissue U-Nets see the brain on a 2 mm grid. Interpolated back to a 1 mm image, their
probabilities cannot place a boundary finer than that grid, and the cortex, two to three millimetres
thick, comes out as a grey band as wide as the grid allows: GM 35-50 % above the true volume on held-out
simulated brains at 1 mm and on real clinical T1w beside SAMSEG, whatever the contrast. The image
itself, at its own resolution, says where the boundary is.

How: the network's probabilities are the spatial prior ``P_k(x)`` (as SAMSEG's atlas is) and each class
gets one Gaussian of intensity, fitted to the brain by EM:
``p(k | y, x) ∝ P_k(x) N(y; mu_k, sigma_k^2)``. GM and WM share one variance: with thick slices and low
GM/WM contrast an untied GM component widens to take in the partial-volume voxels of both neighbours
(on simulated 1.5 T, 3 mm-slice brains its s.d. grew to five times WM's and WM came out 50 % too
large); CSF keeps its own (cerebrospinal fluid mixes with everything in a thick slice). The fit is
contrast-agnostic (no class order is assumed, so inverted or flat contrast is left to the prior), and
where GM and WM intensities overlap the prior decides, as it should.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

TIED = (1, 2)
"""Classes (indices into CSF, GM, WM) that share one variance."""
PRIOR_FLOOR = 1e-4
"""Smallest prior probability a class keeps, so a strong intensity can overrule a confident network."""


@dataclass
class Refinement:
    """What the fit found (intensities in units of the brain's 99th percentile)."""

    means: list
    sds: list
    iterations: int
    gm_wm_separation: float
    """|mu_WM - mu_GM| / sigma: how well the image itself separates GM from WM (below ~1 the prior decides)."""

    def to_dict(self) -> dict:
        return asdict(self)


def refine(image: np.ndarray, mask: np.ndarray, probs: np.ndarray, max_iterations: int = 50,
           tol: float = 1e-4) -> tuple[np.ndarray, Refinement | None]:
    """Posterior (3, ...) probabilities inside ``mask`` given the prior ``probs`` (same grid) and ``image``.

    Returns ``probs`` unchanged (and None) when the mask holds too few voxels to fit three classes.
    """
    mask = np.asarray(mask, bool)
    y = np.asarray(image, np.float64)[mask]
    if y.size < 100:
        return probs, None
    scale = float(np.percentile(y, 99)) or 1.0
    y = y / scale
    prior = np.maximum(np.asarray(probs, np.float64)[:, mask], PRIOR_FLOOR)
    prior /= prior.sum(0, keepdims=True)
    log_prior = np.log(prior)
    post = prior
    mu = np.zeros(len(prior))
    var = np.ones(len(prior))
    tied = list(TIED)
    it = 0
    for it in range(1, max_iterations + 1):
        w = post.sum(1) + 1e-9
        new_mu = (post @ y) / w
        ss = np.einsum("kn,kn->k", post, (y[None] - new_mu[:, None]) ** 2)
        var = ss / w
        var[tied] = ss[tied].sum() / w[tied].sum()
        var = np.maximum(var, 1e-8)
        log_post = log_prior - 0.5 * ((y[None] - new_mu[:, None]) ** 2 / var[:, None] + np.log(var)[:, None])
        log_post -= log_post.max(0, keepdims=True)
        post = np.exp(log_post)
        post /= post.sum(0, keepdims=True)
        done = np.max(np.abs(new_mu - mu)) < tol
        mu = new_mu
        if done:
            break
    out = np.zeros_like(probs, dtype=np.float32)
    out[:, mask] = post
    sd = np.sqrt(var)
    fit = Refinement(means=[round(float(m), 4) for m in mu], sds=[round(float(s), 4) for s in sd], iterations=it,
                     gm_wm_separation=round(float(abs(mu[2] - mu[1]) / sd[1]), 3))
    return out, fit
