"""White-matter hyperintensity-like lesions with exact masks.

Lesions are irregular ellipsoids placed in white matter: *periventricular* ones (caps and bands whose
centre lies 1.5-5 mm from the ventricles, larger and elongated), *deep* ones (punctate to confluent
foci deeper than 8 mm from the ventricles and at least 2.5 mm inside the white matter) and
*juxtacortical* ones (small, flattened foci whose centre lies in the white matter within 2 mm of the
cortex and more than 10 mm from the ventricles, so that they abut the cortical grey matter).  A lesion
replaces only white matter, so it never spills into the ventricles or cortex; its tissue class
``lesion`` has longer T1 and T2 and more water (see :mod:`bidsapp.physics.tissues`), so it is bright on
FLAIR/T2w and dark on T1w.  The lesion fraction per voxel is the overlap of the shape with the voxel
(a one-voxel ramp across its surface), so lesion volumes and masks stay correct at any resolution.

Public API
----------
``LesionSpec(kind, centre_mm, radii_mm, angles_deg, wobble)``  one lesion in world (scanner) mm.
``sample_lesions(phantom, rng, n_periventricular=None, n_deep=None, n_juxtacortical=None) -> list[LesionSpec]``
    defaults draw 2-6 periventricular, 3-11 deep and 0-3 juxtacortical lesions.
``lesion_pools(wm, d_vent, d_wm, d_gm, infratentorial=None) -> {kind: flat voxel indices}`` and
``draw_lesion(kind, centre_mm, rng) -> LesionSpec``  the two steps of sampling, for callers that place
    lesions themselves (the lesion trainer adds *infratentorial* ones, in brainstem and cerebellar white
    matter, which need the label map's regions).
``apply_lesions(phantom, specs, growth=1.0) -> Phantom``  adds (or extends) the ``lesion`` class;
    ``growth`` scales every radius (lesion progression in follow-ups).
``add_lesions(phantom, rng, **kw) -> (Phantom, list[LesionSpec])``  both steps.
``draw_contrast(specs, rng) -> [(core, edge)]`` and ``contrast_map(shape, affine, specs, contrast)``  how
    much of the lesion class's contrast each lesion shows, fading toward its edge (a trainer mixes that
    share of the lesion signal with white matter's, keeping the whole lesion as the target).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .phantom import Phantom, _rotation


@dataclass(frozen=True)
class LesionSpec:
    kind: str
    centre_mm: tuple
    radii_mm: tuple
    angles_deg: tuple
    wobble: tuple  # (amplitude, 3 direction weights, phase) of a smooth irregularity of the surface

    def to_dict(self) -> dict:
        return {"kind": self.kind, "centre_mm": [round(float(c), 2) for c in self.centre_mm],
                "radii_mm": [round(float(r), 2) for r in self.radii_mm]}


def _distances(phantom: Phantom):
    """Distance (mm) of every voxel to the ventricles, to the nearest non-WM voxel and to the cortex."""
    vs = phantom.voxel_size
    wm = phantom.fraction("WM") >= 0.5
    vent = phantom.fraction("ventricles") >= 0.5
    cortex = phantom.fraction("GM") >= 0.5
    far = np.full(phantom.shape, np.inf)
    d_vent = ndi.distance_transform_edt(~vent, sampling=vs) if vent.any() else far
    d_wm = ndi.distance_transform_edt(wm, sampling=vs)
    d_gm = ndi.distance_transform_edt(~cortex, sampling=vs) if cortex.any() else far
    return wm, d_vent, d_wm, d_gm


KINDS = ("periventricular", "deep", "juxtacortical", "infratentorial")


def lesion_pools(wm, d_vent, d_wm, d_gm, infratentorial=None) -> dict:
    """Flat voxel indices where a lesion of each kind may be centred (see the module docstring);
    ``infratentorial`` is a mask of brainstem and cerebellar white matter (absent: no such pool)."""
    pools = {
        "periventricular": np.flatnonzero((wm & (d_vent >= 1.5) & (d_vent <= 5.0)).ravel()),
        "deep": np.flatnonzero((wm & (d_vent > 8.0) & (d_wm >= 2.5)).ravel()),
        "juxtacortical": np.flatnonzero((wm & (d_gm <= 2.0) & (d_vent > 10.0)).ravel()),
    }
    if infratentorial is not None:
        pools["infratentorial"] = np.flatnonzero((infratentorial & (d_wm >= 1.5)).ravel())
    return pools


def draw_lesion(kind: str, centre_mm, rng: np.random.Generator, scale: float = 1.0) -> LesionSpec:
    """One lesion of ``kind`` centred at ``centre_mm``: size and shape drawn from the kind's
    distribution (radii times ``scale``)."""
    if kind == "periventricular":
        r = float(np.clip(rng.lognormal(np.log(4.5), 0.35), 2.0, 10.0))
        radii = (r, r * rng.uniform(0.45, 0.8), r * rng.uniform(1.1, 1.8))
    elif kind in ("juxtacortical", "infratentorial"):
        r = float(np.clip(rng.lognormal(np.log(2.5), 0.35), 1.2, 5.0))
        radii = (r, r * rng.uniform(0.4, 0.7), r * rng.uniform(1.0, 1.6))
    elif kind == "deep":
        r = float(np.clip(rng.lognormal(np.log(2.2), 0.4), 1.2, 6.0))
        radii = (r, r * rng.uniform(0.7, 1.0), r * rng.uniform(0.8, 1.3))
    else:
        raise ValueError(f"unknown lesion kind {kind!r}; known: {', '.join(KINDS)}")
    wob = (float(rng.uniform(0.05, 0.25)),) + tuple(float(x) for x in rng.normal(0, 1, 3)) + (
        float(rng.uniform(0, 2 * np.pi)),)
    return LesionSpec(kind, tuple(float(c) for c in centre_mm), tuple(float(x) * scale for x in radii),
                      tuple(float(a) for a in rng.uniform(-180, 180, 3)), wob)


def sample_lesions(phantom: Phantom, rng: np.random.Generator, n_periventricular: int | None = None,
                   n_deep: int | None = None, n_juxtacortical: int | None = None) -> list[LesionSpec]:
    n_pv = int(rng.integers(2, 7)) if n_periventricular is None else int(n_periventricular)
    n_dp = int(rng.integers(3, 12)) if n_deep is None else int(n_deep)
    pools = lesion_pools(*_distances(phantom))
    specs = []
    for kind, n in (("periventricular", n_pv), ("deep", n_dp), ("juxtacortical", n_juxtacortical)):
        if n is None:  # drawn after the others, so the periventricular and deep lesions of a seed stay
            n = int(rng.integers(0, 4))
        pool = pools[kind]
        if pool.size == 0:
            continue
        for _ in range(n):
            ijk = np.array(np.unravel_index(pool[rng.integers(pool.size)], phantom.shape), float)
            specs.append(draw_lesion(kind, phantom.affine[:3, :3] @ ijk + phantom.affine[:3, 3], rng))
    return specs


def _footprint(sp: LesionSpec, affine, shape, growth: float = 1.0):
    """(box slices, rho, voxel step mm, smallest radius mm) of lesion ``sp`` on a grid: ``rho`` is 0 at
    the lesion's centre and 1 on its (wobbled) surface; None when the lesion misses the grid."""
    vs = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))
    step = float(vs.mean())
    radii = np.array(sp.radii_mm) * growth
    reach = radii.max() * 1.35 + 2 * step
    inv = np.linalg.inv(affine)
    c_vox = inv[:3, :3] @ np.array(sp.centre_mm) + inv[:3, 3]
    half = np.ceil(reach / vs).astype(int)
    lo = np.maximum(np.floor(c_vox).astype(int) - half, 0)
    hi = np.minimum(np.floor(c_vox).astype(int) + half + 1, shape)
    if np.any(hi <= lo):
        return None
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ grid + affine[:3, 3:4] - np.array(sp.centre_mm)[:, None]
    local = _rotation(sp.angles_deg).T @ world
    dist = np.linalg.norm(world, axis=0)
    u = world / np.maximum(dist, 1e-6)
    amp, wx, wy, wz, ph = sp.wobble
    bump = 1.0 + amp * np.sin(wx * 2.0 * u[0] + wy * 2.0 * u[1] + wz * 2.0 * u[2] + ph)
    rho = np.sqrt(((local / radii[:, None]) ** 2).sum(0)) / bump  # 1 on the surface
    return tuple(slice(a, b) for a, b in zip(lo, hi)), rho.reshape(tuple(hi - lo)), step, float(radii.min())


def _occupancy(rho, step: float, rmin: float) -> np.ndarray:
    """The lesion's share of each voxel of a footprint: the signed distance to the surface is about
    (1 - rho) * smallest radius; a ramp one voxel wide."""
    return np.clip((1.0 - rho) * rmin / step + 0.5, 0.0, 1.0).astype(np.float32)


def apply_lesions(phantom: Phantom, specs, growth: float = 1.0) -> Phantom:
    if "lesion" not in phantom.classes:  # insert the class (one new array, no extra copy)
        k = phantom.classes.index("WM") + 1 if "WM" in phantom.classes else len(phantom.classes)
        out = Phantom(np.insert(phantom.fractions, k, 0.0, axis=0), phantom.affine.copy(),
                      phantom.classes[:k] + ("lesion",) + phantom.classes[k:],
                      np.insert(phantom.multipliers, k, 1.0, axis=0), dict(phantom.meta))
    else:
        out = phantom.copy()
        out.labels = None
    if "WM" not in out.classes or not specs:
        return out
    wi, li = out.classes.index("WM"), out.classes.index("lesion")
    for sp in specs:
        fp = _footprint(sp, out.affine, out.shape, growth)
        if fp is None:
            continue
        sl, rho, step, rmin = fp
        occ = _occupancy(rho, step, rmin)
        wm = out.fractions[wi][sl]
        have = out.fractions[li][sl]
        take = np.clip(np.minimum(occ - have, wm), 0.0, None)  # only white matter turns into lesion
        out.fractions[wi][sl] = wm - take
        out.fractions[li][sl] = have + take
    out.meta = dict(out.meta, lesions=[s.to_dict() for s in specs], lesion_growth=growth)
    return out


def draw_contrast(specs, rng: np.random.Generator, core=(0.3, 1.0), fade=(0.5, 1.0)) -> list[tuple]:
    """Per lesion, the share of the lesion class's contrast it shows at its centre (drawn from ``core``)
    and at its surface (that times a draw from ``fade``): real lesions range from faint to bright and
    fade toward their edge. ``fade`` >= 0.5 keeps the surface where a reader draws the edge, at half the
    core's contrast, so the lesion mask means the same for faint and bright lesions."""
    out = []
    for _ in specs:
        c = float(rng.uniform(*core))
        out.append((c, c * float(rng.uniform(*fade))))
    return out


def contrast_map(shape, affine, specs, contrast, growth: float = 1.0) -> np.ndarray:
    """Per voxel, the share of the lesion contrast shown (1 outside every lesion): each lesion's
    ``(core, edge)`` of :func:`draw_contrast`, falling from core at its centre to edge at its surface as
    1 - rho^2; the brightest wins where lesions overlap."""
    out = np.full(tuple(shape), -1.0, np.float32)
    for sp, (core, edge) in zip(specs, contrast):
        fp = _footprint(sp, affine, shape, growth)
        if fp is None:
            continue
        sl, rho, step, rmin = fp
        share = core + (edge - core) * np.clip(rho, 0.0, 1.0) ** 2
        inside = _occupancy(rho, step, rmin) > 0  # where apply_lesions gives the lesion any fraction
        out[sl] = np.maximum(out[sl], np.where(inside, share, -1.0).astype(np.float32))
    out[out < 0] = 1.0
    return out


def add_lesions(phantom: Phantom, rng: np.random.Generator, **kw):
    specs = sample_lesions(phantom, rng, **kw)
    return apply_lesions(phantom, specs), specs
