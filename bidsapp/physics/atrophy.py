"""Atrophy for follow-up sessions: cortical thinning and ventricle enlargement with known volumes.

Both operate on tissue fractions of a subject's baseline phantom, so the truth volumes of every
session are exact:
- *cortical thinning* removes cortical GM from the pial side (voxels closest to CSF/outside first,
  one-voxel ramp so the change is continuous) and turns it into CSF: intracranial volume is unchanged,
  as in real atrophy where CSF fills the space;
- *ventricle enlargement* grows the ventricles outwards into the surrounding tissue (WM, deep GM,
  lesion, CSF; cortical GM is left to the thinning), taking each in proportion to its fraction.
The thickness removed / the growth distance is found by bisection so the volume change matches the
requested fraction (to 0.1 % of the change).

Rates per year are compound: after ``years`` the cortical GM is ``(1 - gm_rate) ** years`` of baseline
and the ventricles ``(1 + ventricle_rate) ** years``.  Typical values: healthy ageing ~0.5 %/year
cortical GM and 1-2 %/year ventricles; Alzheimer-type decline ~2 %/year GM and 5-8 %/year ventricles.

Public API
----------
``cortical_thinning(phantom, fraction) -> Phantom``  remove ``fraction`` (0-0.5) of cortical GM.
``enlarge_ventricles(phantom, fraction) -> Phantom``  grow the ventricles by ``fraction`` (0-3).
``apply_atrophy(phantom, years, gm_rate=0.005, ventricle_rate=0.015) -> Phantom``  both, compounded.
``age_brain(phantom, gm_loss, ventricle_growth) -> Phantom``  both, by amounts.
``STABLE_RATES``, ``DECLINE_RATES``  dicts of (gm_rate, ventricle_rate) used by the dataset writer.
``warp_atrophy(data, affine, brain, loss_percent) -> array``  an *image's* brain shrunk inside a skull
  that does not move (a warp, as atrophy-injection tools make it: the space left is filled by the
  stretched rim around the brain, not by new CSF).
``shrink_brain(phantom, loss_percent) -> Phantom``  the same warp made on a phantom (every class's
  fractions), so that the scan of the shrunk brain is simulated, not interpolated.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .phantom import Phantom

STABLE_RATES = {"gm_rate": 0.004, "ventricle_rate": 0.015}
DECLINE_RATES = {"gm_rate": 0.02, "ventricle_rate": 0.06}
_TISSUE = ("GM", "deep_GM", "WM", "lesion")


def _bisect(fn, target: float, hi: float, tol: float) -> float:
    """Smallest t in [0, hi] with fn(t) ~= target, fn increasing."""
    lo = 0.0
    if fn(hi) <= target:
        return hi
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if fn(mid) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < tol:
            break
    return 0.5 * (lo + hi)


def _depth(frac_inside: np.ndarray, vs) -> np.ndarray:
    """Approximate signed depth (mm) below the 0.5-isosurface of ``frac_inside``; >= 0 inside."""
    inside = frac_inside >= 0.5
    step = float(np.mean(vs))
    d = ndi.distance_transform_edt(inside, sampling=vs) - 0.5 * step
    return np.where(inside, d, (frac_inside - 0.5) * step).astype(np.float32)


def cortical_thinning(phantom: Phantom, fraction: float, _inplace: bool = False) -> Phantom:
    if not 0 <= fraction <= 0.5:
        raise ValueError(f"cortical GM loss must be between 0 and 0.5, got {fraction}")
    out = phantom if _inplace else phantom.copy()
    out.labels = None
    if fraction == 0 or "GM" not in out.classes or "CSF" not in out.classes:
        return out
    gi, ci = out.classes.index("GM"), out.classes.index("CSF")
    gm = out.fractions[gi]
    tissue = sum(out.fraction(c) for c in _TISSUE if c in out.classes)
    step = float(np.mean(out.voxel_size))
    depth = _depth(tissue, out.voxel_size)
    band = np.flatnonzero(((gm > 0) & (depth < 8.0 * step)).ravel())
    g, dep = gm.ravel()[band], np.maximum(depth.ravel()[band], 0.0)
    target = fraction * float(gm.sum(dtype=np.float64))

    def removed(t):
        return float((g * np.clip((t - dep) / step, 0.0, 1.0)).sum(dtype=np.float64)) if t > 0 else 0.0

    t = _bisect(removed, target, 8.0 * step, 1e-4 * step)
    loss = g * np.clip((t - dep) / step, 0.0, 1.0)
    gflat, cflat = out.fractions[gi].reshape(-1), out.fractions[ci].reshape(-1)
    gflat[band] = g - loss
    cflat[band] += loss
    out.meta = dict(out.meta, cortical_thinning_mm=round(t, 4))
    return out


def enlarge_ventricles(phantom: Phantom, fraction: float) -> Phantom:
    if not 0 <= fraction <= 3:
        raise ValueError(f"ventricle growth must be between 0 and 3 (x baseline), got {fraction}")
    out = phantom.copy()
    out.labels = None
    if fraction == 0 or "ventricles" not in out.classes:
        return out
    vi = out.classes.index("ventricles")
    vent = out.fractions[vi]
    step = float(np.mean(out.voxel_size))
    dist = -_depth(vent, out.voxel_size)  # >= 0 outside the ventricles
    # Cortical GM is left to cortical_thinning so each rate controls its own volume exactly.
    donors = [out.classes.index(c) for c in ("deep_GM", "WM", "lesion", "CSF") if c in out.classes]
    avail = sum(out.fractions[i] for i in donors)
    band = np.flatnonzero(((avail > 0) & (dist < 15.0 * step)).ravel())
    a, dd = avail.ravel()[band], np.maximum(dist.ravel()[band], 0.0)
    target = fraction * float(vent.sum(dtype=np.float64))

    def gained(t):
        return float((a * np.clip((t - dd) / step, 0.0, 1.0)).sum(dtype=np.float64)) if t > 0 else 0.0

    t = _bisect(gained, target, 15.0 * step, 1e-4 * step)
    share = np.clip((t - dd) / step, 0.0, 1.0)  # fraction of each donor tissue converted
    total = np.zeros(band.size, np.float32)
    for i in donors:
        f = out.fractions[i].reshape(-1)
        take = f[band] * share
        f[band] -= take
        total += take
    out.fractions[vi].reshape(-1)[band] += total
    out.meta = dict(out.meta, ventricle_growth_mm=round(t, 4))
    return out


def apply_atrophy(phantom: Phantom, years: float, gm_rate: float = STABLE_RATES["gm_rate"],
                  ventricle_rate: float = STABLE_RATES["ventricle_rate"]) -> Phantom:
    if years < 0:
        raise ValueError("years must not be negative")
    if years == 0:
        return phantom.copy()
    out = enlarge_ventricles(phantom, (1.0 + ventricle_rate) ** years - 1.0)
    return cortical_thinning(out, 1.0 - (1.0 - gm_rate) ** years, _inplace=True)


def age_brain(phantom: Phantom, gm_loss: float, ventricle_growth: float) -> Phantom:
    """``phantom`` with ``gm_loss`` of its cortical GM thinned into CSF, then its ventricles grown by
    ``ventricle_growth``: an older brain in the same skull, given by amounts rather than yearly rates
    (:func:`apply_atrophy` grows the ventricles first)."""
    return enlarge_ventricles(cortical_thinning(phantom, gm_loss), ventricle_growth)


# ------------------------------------------------------------------------- atrophy made by a warp
WARP_MARGIN_MM = 1.0
"""The brain and this much around it shrink as one (:func:`warp_weight`)."""
WARP_TAPER_MM = 4.0
"""Beyond the margin the shrink fades to none over this distance, in the CSF around the brain."""


def world_grid(shape, affine) -> np.ndarray:
    """Voxel -> world (mm) coordinates of every voxel, (3, N)."""
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    return affine[:3, :3] @ ijk + affine[:3, 3:4]


def sample_world(data: np.ndarray, affine: np.ndarray, world: np.ndarray, order: int = 3) -> np.ndarray:
    """``data`` read at world points (3, N), zero outside its field of view."""
    ijk = np.linalg.solve(affine[:3, :3], world - affine[:3, 3:4])
    return ndi.map_coordinates(np.asarray(data, np.float32), ijk, order=order, mode="constant", cval=0.0,
                               prefilter=order > 1)


def centre_mm(brain: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The brain's centre of mass in world coordinates (mm)."""
    return affine[:3, :3] @ np.array(ndi.center_of_mass(np.asarray(brain, bool))) + affine[:3, 3]


def warp_weight(brain: np.ndarray, zooms) -> np.ndarray:
    """1 within :data:`WARP_MARGIN_MM` of ``brain``, falling smoothly to 0 over :data:`WARP_TAPER_MM`."""
    dist = ndi.distance_transform_edt(~np.asarray(brain, bool), sampling=zooms)
    t = np.clip((dist - WARP_MARGIN_MM) / WARP_TAPER_MM, 0.0, 1.0)
    return (0.5 * (1.0 + np.cos(np.pi * t))).astype(np.float32)  # 1 -> 0, smooth at both ends


def _shrink_factor(brain: np.ndarray, zooms, loss_percent: float) -> np.ndarray:
    """Per voxel, how much farther from the centre the warp reads: ``1 + w (1/s - 1)``, ``s`` the linear
    scale of a ``loss_percent`` volume loss and ``w`` :func:`warp_weight`."""
    s = (1.0 - loss_percent / 100.0) ** (1.0 / 3.0)
    return 1.0 + warp_weight(brain, zooms) * (1.0 / s - 1.0)


def warp_atrophy(data: np.ndarray, affine: np.ndarray, brain: np.ndarray, loss_percent: float,
                 order: int = 3) -> np.ndarray:
    """``data`` with every volume inside the ``brain`` region (the parenchyma and what it encloses)
    scaled by ``1 - loss_percent / 100``.

    Pull-back warp: the new image at x reads the old one at ``c + (x - c) (1 + w(x) (1/s - 1))``, with
    ``s`` the linear scale, ``c`` the brain's centre and ``w`` :func:`warp_weight`. Where ``w`` is 1 the
    map is the scaling by ``s`` about ``c``, so a structure there keeps its shape at ``s**3`` of its
    volume; the skull, where ``w`` is 0, does not move."""
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    c = centre_mm(brain, affine)
    world = world_grid(data.shape, affine)
    factor = _shrink_factor(brain, zooms, loss_percent).reshape(-1)
    src = c[:, None] + (world - c[:, None]) * factor
    return sample_world(data, affine, src, order=order).reshape(data.shape)


def shrink_brain(phantom: Phantom, loss_percent: float) -> Phantom:
    """``phantom`` with its brain region (every voxel with parenchyma, holes filled: the ventricles
    shrink with it) shrunk by ``loss_percent`` with :func:`warp_atrophy`'s map, every class's fractions
    warped (the skull and the scalp do not move). The tissue volumes of the region become
    ``1 - loss_percent / 100`` of what they were, up to the interpolation of the fractions."""
    from .phantom import warp

    tissue = sum(phantom.fraction(c) for c in _TISSUE if c in phantom.classes)
    region = ndi.binary_fill_holes(tissue > 0.01)  # the partial-volume edge too: all of it scales
    centre = np.array(ndi.center_of_mass(region))  # scaling about a point is the same map in voxel units
    factor = _shrink_factor(region, phantom.voxel_size, loss_percent)
    idx = np.indices(phantom.shape, dtype=np.float32)
    coords = np.stack([centre[k] + (idx[k] - centre[k]) * factor for k in range(3)]).astype(np.float32)
    out = warp(phantom, coords)
    out.meta = dict(out.meta, shrunk_percent=float(loss_percent))
    return out
