"""Native-resolution refinement of network tissue probabilities by the image's own intensities.

Why: the tissue U-Nets see the brain on a 2 mm grid. Interpolated back to a 1 mm image, their
probabilities cannot place a boundary finer than that grid, and the cortex, two to three millimetres
thick, comes out as a grey band as wide as the grid allows: GM 35-50 % above the true volume on held-out
simulated brains at 1 mm and on real clinical T1w beside SAMSEG, whatever the contrast. The image
itself, at its own resolution, says where the boundary is.

How: the network's probabilities ``P_k(x)`` are the spatial prior (as SAMSEG's atlas is) of a mixture
fitted to the brain's intensities by EM. Each tissue gets one Gaussian of intensity (``mu_k``,
``sigma_k``), and, with ``partial_volume`` (the default, as FSL FAST and Atropos model it), each pair of
tissues a mixed class: a voxel that is a fraction ``a`` of tissue i and ``1 - a`` of tissue j has intensity
``a mu_i + (1 - a) mu_j`` and variance ``a sigma_i^2 + (1 - a) sigma_j^2``, ``a`` uniform on (0, 1)
(:data:`PV_LEVELS` points). The prior of a pure voxel is the network's ``P_k`` and of a mixed one
``2 P_i P_j`` (the chance that two independent draws from the network differ), renormalised: mixtures
are likely only where the network sees a boundary, and between two pure tissues the network's odds are
kept (squaring them, as two draws that agree would, strengthened the network's excess of grey matter on
real low-contrast scans). The tissue means and variances are fitted on the pure voxels. Without the mixed classes, the voxels between
two tissues widen the tissues' Gaussians: with 3 mm slices GM's s.d. grew to four times the noise and
whole stretches of cortex went to CSF or WM (GM -19 to +22 % on simulated brains). The output is each
voxel's expected tissue fraction (as FAST's partial-volume maps), the labels its largest fraction.

Where the sequence parameters say CSF's signal is opposite to the tissues' (an MPRAGE before CSF's null,
e.g. TI 0.9 s at 3 T), a CSF/tissue voxel is the magnitude of a sum of signals of opposite sign, darker
than either: read as a line between the two intensities, the cortex's outer border goes to CSF (GM
6-15 % low on simulated 3 T MPRAGE heads once the outlier class below keeps the Gaussians tight, 1-4 %
with the sign). There every class's intensity is the magnitude of its signed mean
(``csf_sign``). Everywhere an outlier class of uniform intensity keeps what no tissue explains from
widening the tissues' Gaussians (:data:`OUTLIER_PRIOR`).

GM and WM share one variance: with thick slices and low GM/WM contrast an untied GM component widens to
take in what is left of both neighbours; CSF keeps its own (cerebrospinal fluid mixes with vessels and
dura too). The fit is contrast-agnostic (no class order is assumed, so inverted or flat contrast is left
to the prior), and where GM and WM intensities overlap the prior decides, as it should.

Where GM and WM are far apart (a 3D T1w), the fit's cut between them lies inside a real cortex, which
brightens towards the white matter: there the network says how much of the tissue is grey and the fit
only where the border lies (``tissue_split="auto"``, :data:`NETWORK_SPLIT_RAMP`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

TIED = (1, 2)
"""Classes (indices into CSF, GM, WM) that share one variance."""
PRIOR_FLOOR = 1e-4
"""Smallest prior probability a class keeps, so a strong intensity can overrule a confident network."""
PAIRS = ((0, 1), (1, 2), (0, 2))
"""Tissue pairs (CSF/GM, GM/WM, CSF/WM) whose mixtures are modelled: every boundary the brain has."""
PV_LEVELS = 5
"""Points of the mixing fraction's uniform prior (a = 0.1, 0.3, ..., 0.9)."""
GRID_POINTS = 4096
"""Intensities at which the mixed classes' densities are evaluated (then interpolated per voxel)."""
NETWORK_SPLIT_RAMP = (2.0, 2.5)
"""GM/WM separation (``|mu_WM - mu_GM| / sigma``, in s.d.) over which ``tissue_split="auto"`` hands the
amount of grey matter from the fit to the network: the fit's below the first value, the network's above
the second, linearly between. On real scans beside SAMSEG the two part with the contrast. At high
contrast (3D T1w at 1 mm: Colin 27 and BrainBrowser's two scans, separation 3.5-5.0) the fit's cut lies
halfway between the means, inside a real cortex, which brightens towards the white matter and is
blurred by the scanner: GM 6-14 % below SAMSEG, WM 14-24 % above, where the network's amount (learned
from label maps drawn as FreeSurfer draws them) reads GM within 4 %. At low contrast (the 2D clinical
T1w of ``clinical-ms``, separation 1.2-1.8) the network leans to grey (GM 9-18 % above SAMSEG) and the
fit's balance brings it to 3-8 %. The ramp lies in the gap between every 2D clinical scan seen and
every 1 mm 3D scan seen, real or simulated (2.4 and up); a ramp up to 3.5 left simulated 1.5 T
sessions half way and read them 5 points apart from the same brain at 3 T."""
OUTLIER_PRIOR = 0.01
"""Prior weight of an outlier class of uniform intensity over the brain's range. What no tissue explains
(fat or a vessel in the mask's rim, brighter than white matter) otherwise widens a tissue's Gaussian,
and the wide Gaussian takes in the border voxels its mixtures should explain: on simulated 1 mm full
heads GM came out up to 14 % low (median |error| 3.8 %; 2.0 % with the class and the magnitude model,
``benchmarks/tissue/full_heads.py``). Its share is counted as CSF, the mask's non-tissue row."""


@dataclass
class Refinement:
    """What the fit found (intensities in units of the brain's 99th percentile)."""

    means: list
    sds: list
    iterations: int
    gm_wm_separation: float
    """|mu_WM - mu_GM| / sigma: how well the image itself separates GM from WM (below ~1 the prior decides)."""
    partial_volume: float | None = None
    """Share of the brain's voxels (by posterior) that are tissue mixtures; None without the mixed classes."""
    csf_sign: int = 1
    """-1 when CSF's signal was modelled opposite to the tissues' (their border darker than either)."""
    outlier: float | None = None
    """Share of the brain's voxels (by posterior) that no tissue explains; None without the outlier class."""
    tissue_split: str = "intensity"
    """What set the amount of GM in the tissue: the fit (``intensity``), the network (``network``), or the
    separation's ramp (``auto``; :data:`NETWORK_SPLIT_RAMP`)."""
    network_share: float = 0.0
    """How much of the GM amount came from the network (0: the fit's; 1: the network's)."""

    def to_dict(self) -> dict:
        return asdict(self)


def _log_normal(y: np.ndarray, mu, var) -> np.ndarray:
    """log of the normal density (with its constant: the outlier class's density is compared with it)."""
    return -0.5 * ((y - mu) ** 2 / var + np.log(2 * np.pi * var))


def _log_magnitude(y: np.ndarray, mu, var) -> np.ndarray:
    """log density of |X|, X normal with signed mean ``mu``: a magnitude image's intensity, where a mixture
    of signals of opposite sign passes through zero."""
    a, b = _log_normal(y, mu, var), _log_normal(y, -mu, var)
    top = np.maximum(a, b)
    return top + np.log(np.exp(a - top) + np.exp(b - top))


class _Grid:
    """A fine grid over the brain's intensities and each voxel's place on it (fixed for the whole fit):
    a function of intensity alone is evaluated on the grid and interpolated per voxel."""

    def __init__(self, y: np.ndarray, points: int = GRID_POINTS):
        self.x = np.linspace(y.min(), y.max(), points)
        pos = (y - self.x[0]) / max(self.x[1] - self.x[0], 1e-12)
        self.i = np.clip(pos.astype(np.int64), 0, points - 2)
        self.t = (pos - self.i).astype(np.float32)

    def at_voxels(self, curve: np.ndarray) -> np.ndarray:
        c = curve.astype(np.float32)
        return c[self.i] + (c[self.i + 1] - c[self.i]) * self.t


def _likelihoods(grid: _Grid, mu: np.ndarray, var: np.ndarray, pairs, signs=(1.0, 1.0, 1.0),
                 outlier_log_density: float | None = None) -> tuple[np.ndarray, list]:
    """Each class's intensity likelihood at every voxel (pure tissues, mixtures of ``pairs`` with ``a``
    uniform, then the outlier class when ``outlier_log_density`` is given), scaled by a common factor per
    voxel, and each mixture's E[a | y]. A mixture's signal is the fraction-weighted sum of the tissues'
    signed signals (``signs`` times ``mu``), its intensity that sum's magnitude. All depend on the
    intensity alone: evaluated on ``grid`` (steps far below any tissue's s.d.) and interpolated."""
    x = grid.x
    signed = np.asarray(signs, float) * mu
    logs = [_log_magnitude(x, signed[k], var[k]) for k in range(len(mu))]
    expected = []
    a = (np.arange(PV_LEVELS) + 0.5) / PV_LEVELS
    for i, j in pairs:
        mix = np.stack([_log_magnitude(x, f * signed[i] + (1 - f) * signed[j], f * var[i] + (1 - f) * var[j])
                        for f in a])
        top = mix.max(0)
        w = np.exp(mix - top)
        logs.append(top + np.log(w.mean(0)))
        expected.append((a @ w) / w.sum(0))
    if outlier_log_density is not None:
        logs.append(np.full_like(x, outlier_log_density))
    logs = np.stack(logs)
    curves = np.exp(logs - logs.max(0))
    return np.stack([grid.at_voxels(c) for c in curves]), [grid.at_voxels(e) for e in expected]


def refine(image: np.ndarray, mask: np.ndarray, probs: np.ndarray, max_iterations: int = 50,
           tol: float = 1e-4, partial_volume: bool = True, csf_sign: float = 1.0,
           outlier: float | None = None, tissue_split: str = "intensity") -> tuple[np.ndarray, Refinement | None]:
    """Tissue fractions (3, ...) inside ``mask`` given the prior ``probs`` (same grid) and ``image``
    (posterior probabilities of the three pure classes with ``partial_volume=False``).

    ``csf_sign`` -1 says CSF's signal is opposite to the tissues' (an MPRAGE before CSF's null, known from
    the sequence parameters): a CSF/tissue border voxel is then darker than either, not between them.
    ``outlier`` is the uniform class's prior weight (default :data:`OUTLIER_PRIOR`; 0: none).
    ``tissue_split="network"`` keeps the fit's CSF and tissue (GM + WM) in each voxel and the order in
    which the fit makes voxels grey, but takes how much of the tissue is grey from the network (the sum of
    tissue times ``P_GM / (P_GM + P_WM)``): every voxel's GM:WM log-odds move by one amount until the GM
    adds up to that. ``"auto"`` moves from the fit's amount to the network's as the fit's GM/WM
    separation rises along :data:`NETWORK_SPLIT_RAMP`.

    Returns ``probs`` unchanged (and None) when the mask holds too few voxels to fit three classes.
    """
    mask = np.asarray(mask, bool)
    y = np.asarray(image, np.float64)[mask]
    if y.size < 100:
        return probs, None
    scale = float(np.percentile(y, 99)) or 1.0
    y = y / scale
    p = np.maximum(np.asarray(probs, np.float64)[:, mask], PRIOR_FLOOR)
    p /= p.sum(0, keepdims=True)
    pairs = PAIRS if partial_volume else ()
    prior = np.concatenate([p, np.stack([2 * p[i] * p[j] for i, j in pairs])]) if pairs else p
    outlier = OUTLIER_PRIOR if outlier is None else float(outlier)
    prior = prior / prior.sum(0, keepdims=True) * (1.0 - outlier)
    if outlier > 0:
        prior = np.concatenate([prior, np.full((1, y.size), outlier)])
    prior = prior.astype(np.float32)
    span = float(y.max() - y.min()) or 1.0
    outlier_log = -np.log(span) if outlier > 0 else None
    signs = (float(csf_sign), 1.0, 1.0)
    tied = list(TIED)
    mu, var = _fit(y, p, tied)
    grid = _Grid(y)
    it = 0
    for it in range(1, max_iterations + 1):
        lik, expected = _likelihoods(grid, mu, var, pairs, signs, outlier_log)
        post = prior * lik
        post /= post.sum(0, keepdims=True)
        new_mu, var = _fit(y, post[:3], tied)
        done = np.max(np.abs(new_mu - mu)) < tol
        mu = new_mu
        if done:
            break
    frac = post[:3].copy()
    for n, (i, j) in enumerate(pairs):
        frac[i] += post[3 + n] * expected[n]
        frac[j] += post[3 + n] * (1 - expected[n])
    if outlier > 0:
        frac[0] += post[-1]
    sd = np.sqrt(var)
    separation = float(abs(mu[2] - mu[1]) / sd[1])
    lo, hi = NETWORK_SPLIT_RAMP
    share = {"intensity": 0.0, "network": 1.0, "auto": float(np.clip((separation - lo) / (hi - lo), 0.0, 1.0))}
    if tissue_split not in share:
        raise ValueError(f"tissue_split must be 'intensity', 'network' or 'auto', not {tissue_split!r}")
    if share[tissue_split] > 0:
        own = float(frac[1].sum())
        network = float(((frac[1] + frac[2]) * p[1] / (p[1] + p[2])).sum())
        frac[1], frac[2] = _rebalance(frac[1], frac[2], own + share[tissue_split] * (network - own))
    out = np.zeros_like(probs, dtype=np.float32)
    out[:, mask] = frac
    fit = Refinement(means=[round(float(m), 4) for m in mu], sds=[round(float(s), 4) for s in sd], iterations=it,
                     gm_wm_separation=round(separation, 3),
                     partial_volume=round(float(post[3:3 + len(pairs)].sum() / y.size), 4) if pairs else None,
                     csf_sign=int(csf_sign), outlier=round(float(post[-1].sum() / y.size), 4) if outlier > 0 else None,
                     tissue_split=tissue_split, network_share=round(share[tissue_split], 3))
    return out, fit


def _rebalance(gm: np.ndarray, wm: np.ndarray, target: float, steps: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """GM and WM fractions whose GM sums to ``target``: every voxel's GM:WM log-odds moved by one common
    amount (a global GM/WM prior weight, found by bisection), so their tissue and the intensities' order
    of the voxels stay and the border moves along the image's intensities."""
    tissue = gm + wm
    share = np.clip(gm / np.maximum(tissue, 1e-12), 1e-6, 1 - 1e-6)
    logit = np.log(share) - np.log1p(-share)
    lo, hi = -20.0, 20.0
    for _ in range(steps):
        shift = 0.5 * (lo + hi)
        if float((tissue / (1.0 + np.exp(-(logit + shift)))).sum()) < target:
            lo = shift
        else:
            hi = shift
    gm = tissue / (1.0 + np.exp(-(logit + 0.5 * (lo + hi))))
    return gm, tissue - gm


def _fit(y: np.ndarray, weights: np.ndarray, tied: list) -> tuple[np.ndarray, np.ndarray]:
    """Weighted means and variances of the three tissues (``tied`` classes pooled)."""
    w = weights.sum(1) + 1e-9
    mu = (weights @ y) / w
    ss = np.einsum("kn,kn->k", weights, (y[None] - mu[:, None]) ** 2)
    var = ss / w
    if tied:
        var[tied] = ss[tied].sum() / w[tied].sum()
    return mu, np.maximum(var, 1e-8)
