"""Volume change between sessions of a subject, measured in the mid-space with a partial-volume model.

Why not the difference of two segmentations: a session's segmentation moves its tissue boundaries
with the scanner's contrast, noise and bias (on simulated same-scanner rescans one year apart the
tissue U-Net's grey-matter volume moved by up to 3 % where the truth moved by 0.4 %). Here every
session is resampled once into the mid-space (:mod:`bidsapp.longitudinal.midspace`) and, on the same
voxels for every session, the fraction of brain tissue in each voxel is read from its intensity,
linear between the session's own CSF and tissue intensities (the MR signal of a voxel is the
fraction-weighted sum of its tissues' signals, so a boundary that moves by a tenth of a voxel moves
the sum by exactly that much; this is what boundary-shift integrals exploit):

    f(x) = clip((I(x) - mu_CSF) / (mu_tissue(x) - mu_CSF), 0, 1),
    mu_tissue(x) = g(x) mu_GM + (1 - g(x)) mu_WM

``g`` is the grey-matter share of the parenchyma in the subject's mean tissue map, so that voxels at
the ventricle walls (CSF/WM) and at the cortex (CSF/GM) are both read against the right tissue. The
tissue intensities ``mu`` are medians over voxel sets that are the same for every session (the mean
tissue map above 0.9; the CSF set is the ventricles, which no partial volume reaches).

Volumes per session: brain = sum of f, GM = sum of g f, WM = sum of (1 - g) f, CSF = sum of (1 - f)
inside the union of the brain masks, ventricles = sum of (1 - f) deep inside the brain
(:func:`deep_weight`) on the deep CSF and a 3-voxel rim around it, lesion = the lesion mask's volume in the mid-space. GM and WM split each voxel's
change by the same ``g`` for every session: the split is as good as the mean tissue map, the total is
not affected by it.

Scanner changes: within one acquisition both sessions are read with the same (pooled) tissue
intensities; when the acquisition changed, or is unknown (no sidecars), each session is read with its
own, which undoes a change of contrast between tissues (a change the pooled reading turns into volume).
Both figures are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

MEASURES = ("brain", "GM", "WM", "CSF", "ventricles", "lesion")
"""The change table's measures, in its row order."""
DEEP_MM = 12.0
"""CSF this deep inside the brain mask counts as ventricular (sulcal CSF lies within ~10 mm of the
surface; the lateral and third ventricles deeper)."""
PURE = 0.9
"""Mean tissue probability above which a voxel calibrates that tissue's intensity."""
MIN_SET = 50
"""Voxels a calibration set should have; fewer (small ventricles, coarse images) and a less pure set is used."""
RECALIBRATED = "tissue intensities recalibrated per session"
"""What the ``correction`` column says for a pair whose acquisition changed."""


def deep_weight(mask: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """1 deeper than :data:`DEEP_MM` inside ``mask``, 0 within ``DEEP_MM - 2`` mm of its edge, linear between."""
    depth = ndi.distance_transform_edt(mask > 0.5, sampling=spacing)
    return np.clip((depth - DEEP_MM) / 4.0 + 0.5, 0.0, 1.0).astype(np.float32)


@dataclass
class Common:
    """What every session of a subject is read with, on the mid-space grid."""

    region: np.ndarray
    """Union of the sessions' brain masks (where volumes are counted)."""
    core: np.ndarray
    """Intersection of the masks (where intensities are normalised and calibrated)."""
    deep: np.ndarray
    """Where CSF counts as ventricular: deeper than DEEP_MM, on the deep CSF and a 3-voxel rim around it."""
    gm_share: np.ndarray | None
    """g: GM / (GM + WM) of the mean tissue map; None without any tissue map."""
    sets: dict
    """Calibration voxel sets: tissue name -> boolean array (``CSF`` always; ``GM``/``WM`` with tissue maps;
    ``tissue`` without, the parenchyma as one class)."""
    voxel_mm3: float = 1.0


def common_space(masks, tissues=None, spacing=(1.0, 1.0, 1.0), template: np.ndarray | None = None) -> Common:
    """The subject's :class:`Common` from its sessions' ``masks`` (soft, mid-space) and the tissue maps
    of the sessions that have them (``tissues``: list of dicts GM/WM/CSF -> array, or None per session).
    Without any tissue map, ``template`` (the mid-space template image) is split in two by Otsu's
    threshold inside the deep region, the smaller class being the ventricles' CSF."""
    masks = [np.asarray(m, np.float32) for m in masks]
    region = np.max(masks, 0) > 0.5
    core = ndi.binary_erosion(np.min(masks, 0) > 0.5, iterations=2)
    deep = deep_weight(np.min(masks, 0), spacing)
    have = [t for t in (tissues or []) if t]
    sets = {}
    if have:
        mean = {c: np.mean([t[c] for t in have], 0) for c in ("GM", "WM", "CSF")}
        par = mean["GM"] + mean["WM"]
        gm_share = np.where(par > 1e-3, mean["GM"] / np.maximum(par, 1e-3), 0.5).astype(np.float32)
        for tissue in ("GM", "WM", "CSF"):
            # the purest voxels that are enough: ventricular CSF first (no partial volume reaches it)
            for level, where in ((PURE, deep > 0.99), (PURE, True), (0.5, True)):
                sets[tissue] = core & (mean[tissue] > level) & (where if tissue == "CSF" else True)
                if sets[tissue].sum() >= MIN_SET:
                    break
    else:
        if template is None:
            raise ValueError("without tissue maps the mid-space template is needed to find the CSF")
        gm_share = None
        sel = core & (deep > 0.99)
        vals = template[sel]
        from bidsapp.qc import otsu_threshold

        t = otsu_threshold(vals) if vals.size else 0.0
        low = sel & (template <= t)
        high = sel & (template > t)
        csf, par = (low, high) if low.sum() < high.sum() else (high, low)
        sets["CSF"] = csf
        sets["tissue"] = par
    # the ventricles: deep CSF and a 3-voxel rim around it (where they grow); without the rim restriction the
    # deep region's tissue, which does not change, dilutes the ventricles' change
    csf_deep = (np.mean([t["CSF"] for t in have], 0) > 0.5) if have else sets["CSF"]
    deep = deep * ndi.binary_dilation(csf_deep & (deep > 0.5), iterations=3)
    empty = [k for k, v in sets.items() if v.sum() < MIN_SET // 2]
    if empty:
        raise ValueError(f"too few voxels to calibrate {', '.join(empty)} intensities in the mid-space")
    return Common(region=region, core=core, deep=deep, gm_share=gm_share, sets=sets,
                  voxel_mm3=float(np.prod(spacing)))


def normalise(image: np.ndarray, common: Common) -> np.ndarray:
    """Intensities divided by their median in the white matter (or the parenchyma without tissue maps):
    removes the receiver's global scale with a reference that atrophy does not change (the median of the
    whole brain moves when CSF replaces tissue, and would move every voxel's reading with it)."""
    ref = common.sets.get("WM", common.sets.get("tissue"))
    return (image / max(float(np.median(image[ref])), 1e-6)).astype(np.float32)


def calibrate(image: np.ndarray, common: Common) -> dict:
    """Tissue intensities of one (normalised) session: median over each calibration set."""
    return {k: float(np.median(image[s])) for k, s in common.sets.items()}


def pooled(*mus) -> dict:
    return {k: float(np.mean([m[k] for m in mus])) for k in mus[0]}


def tissue_fraction(image: np.ndarray, mu: dict, common: Common) -> np.ndarray:
    """f: the fraction of brain tissue in each voxel (module docstring)."""
    if common.gm_share is not None:
        tissue = common.gm_share * mu["GM"] + (1.0 - common.gm_share) * mu["WM"]
    else:
        tissue = mu["tissue"]
    span = tissue - mu["CSF"]
    span = np.where(np.abs(span) < 1e-6, 1e-6, span)
    return np.clip((image - mu["CSF"]) / span, 0.0, 1.0).astype(np.float32)


def volumes(image: np.ndarray, mu: dict, common: Common, lesion: np.ndarray | None = None) -> dict:
    """mm3 of every measure of :data:`MEASURES` for one session (NaN where it cannot be measured)."""
    f = tissue_fraction(image, mu, common) * common.region
    v = common.voxel_mm3
    out = {"brain": float(f.sum(dtype=np.float64)) * v}
    if common.gm_share is not None:
        out["GM"] = float((f * common.gm_share).sum(dtype=np.float64)) * v
        out["WM"] = out["brain"] - out["GM"]
    else:
        out["GM"] = out["WM"] = float("nan")
    csf = (1.0 - f) * common.region
    out["CSF"] = float(csf.sum(dtype=np.float64)) * v
    out["ventricles"] = float((csf * common.deep).sum(dtype=np.float64)) * v
    out["lesion"] = float(np.asarray(lesion, np.float64).sum()) * v if lesion is not None else float("nan")
    return out


@dataclass
class PairResult:
    volume_from: dict
    volume_to: dict
    raw_from: dict = field(default_factory=dict)
    raw_to: dict = field(default_factory=dict)
    correction: str = "none"


def pair_volumes(a: np.ndarray, b: np.ndarray, common: Common, *, changed: bool,
                 lesion_a=None, lesion_b=None) -> PairResult:
    """Volumes of sessions ``a`` -> ``b`` (normalised mid-space images): read with pooled tissue
    intensities, and, when the acquisition ``changed``, also with each session's own (the answer)."""
    mu_a, mu_b = calibrate(a, common), calibrate(b, common)
    mu = pooled(mu_a, mu_b)
    raw_a, raw_b = volumes(a, mu, common, lesion_a), volumes(b, mu, common, lesion_b)
    if not changed:
        return PairResult(raw_a, raw_b, raw_a, raw_b, "none")
    return PairResult(volumes(a, mu_a, common, lesion_a), volumes(b, mu_b, common, lesion_b), raw_a, raw_b,
                      RECALIBRATED)


def percent(v_from: float, v_to: float) -> float:
    if not (np.isfinite(v_from) and np.isfinite(v_to)) or v_from <= 0:
        return float("nan")
    return (v_to / v_from - 1.0) * 100.0
