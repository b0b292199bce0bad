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
``STABLE_RATES``, ``DECLINE_RATES``  dicts of (gm_rate, ventricle_rate) used by the dataset writer.
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
