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
tissue map above 0.9; the CSF set is the interior of the ventricles, which no partial volume reaches).

Volumes of the first session of a pair: brain, GM and WM are the sums of that session's own tissue
fractions (its segmentation's GM and WM maps, on the mid-space grid; KN-BSI likewise gives the change as
a share of the baseline brain's segmented volume), CSF = the union of the brain masks less the brain,
ventricles = sum of (1 - f) deep inside the brain (:func:`deep_weight`) on the deep CSF and a 3-voxel rim
around it, lesion = the lesion mask's volume in the mid-space. The sum of f itself is not the brain: it
counts the dura, vessels and skull-base tissue of the mask's rim as part tissue (on a real clinical head
1282 ml against 1213 ml of segmented GM + WM and SAMSEG's 1212), which made every percentage small (real
heads with a known injected loss read 0.80 of it, 0.88 with the segmented baseline; simulated atrophy
0.93 and 0.96). A session without tissue maps (FLAIR alone) falls back to the sum of f (brain), g f (GM)
and (1 - g) f (WM). GM and WM split each voxel's change by the same ``g`` for every session: the split
is as good as the mean tissue map, the total is not affected by it.

The change itself is a boundary-shift integral (Freeborough & Fox 1997; KN-BSI): the sum over the
region of ``(w(f_to) - w(f_from)) / (hi - lo)``, ``w`` clipping f to the window :data:`WINDOW`. A
boundary that moves by d carries its whole intensity profile with it, so the windowed sum moves by d
times the window's width, whatever the window. Reading the change this way rather than as the
difference of the two sums of f matters twice: clipping f to [0, 1] halves the reading of a voxel
that goes from pure tissue (noise around 1) to 0.9, so cortical thinning was under-read (measured /
true 0.80 on simulated two-year atrophy), and without the clip every voxel of pure tissue carries the
sessions' intensity-normalisation error (rescan error 0.3 %). Inside the window neither happens (same
benchmark: rescan median error 0.22 -> 0.08 %, atrophy ratio 0.80 -> 0.92). The second session's
volume is the first's plus the change.

Inverted CSF: an MPRAGE with its TI before CSF's null point (TI 0.9 s / TR 2.3 s at 3 T) has CSF's
signal opposite to the tissues'; the magnitude image folds it, so a voxel part CSF, part tissue is
darker than pure CSF and the linear reading above under-reads every boundary voxel of that session
(a TI 0.9 -> 1.1 s upgrade read as +5 % brain). When the sequence parameters say so
(:func:`bidsapp.physics.contrast.csf_inverted`), the reading unfolds the magnitude: the signed signal
is f mu_tissue - (1 - f) mu_CSF, read on the tissue side of its zero for intensities above mu_CSF and
on the CSF side below, and the boundary-shift window starts above the folded part.

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
MIN_SET_ML = 2.0
"""Volume a parenchymal (GM, WM) calibration set should have. A network trained on tissue fractions
gives a 2 mm cortical voxel a GM probability above 0.9 rarely (150 voxels in a demo brain), and a
median over so few, mostly deep grey matter, misreads the cortex (a stable brain read as -18 %)."""
INTERIOR_MM = 2.0
"""CSF calibrates on the voxels of its set deeper than this inside it. A segmentation's CSF above 0.9 is a
posterior, not a fraction: it takes in the ventricle walls' partial-volume voxels, and where CSF is dark
(a T1w near CSF's null point) a few per cent of tissue in them moves its median far (simulated 1.5 T
MPRAGE: 0.18 of the white matter's intensity against 0.04 for pure CSF, read as +3.7 % brain across a
scanner change; with the interior 0.045 and +0.8 %)."""
LEVELS = (0.9, 0.8, 0.7, 0.6, 0.5)
"""Purity levels tried in turn until a calibration set is large enough."""
WINDOW = (0.25, 0.75)
"""Tissue fractions between which the boundary-shift integral reads a change: 2.5 noise standard
deviations (about 0.1 in f at the simulator's SNR) from pure CSF and pure tissue."""
RECALIBRATED = "tissue intensities recalibrated per session"
"""What the ``correction`` column says for a pair whose acquisition changed."""
CSF_BRIGHT = ("T2w", "PDw")
"""Contrasts on which CSF is brighter than brain tissue (on T1w and FLAIR it is darker)."""


def interior(voxels: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """The voxels of a set more than :data:`INTERIOR_MM` from its edge (its partial-volume rim removed)."""
    return ndi.distance_transform_edt(voxels, sampling=spacing) > INTERIOR_MM


def deep_weight(mask: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """1 deeper than :data:`DEEP_MM` inside ``mask``, 0 within ``DEEP_MM - 2`` mm of its edge, linear between."""
    depth = ndi.distance_transform_edt(mask > 0.5, sampling=spacing)
    return np.clip((depth - DEEP_MM) / 4.0 + 0.5, 0.0, 1.0).astype(np.float32)


@dataclass
class Common:
    """What every session of a subject is read with, on the mid-space grid."""

    region: np.ndarray
    """Union of the sessions' brain masks, inside every session's field of view (where volumes are counted)."""
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


def common_space(masks, tissues=None, spacing=(1.0, 1.0, 1.0), template: np.ndarray | None = None,
                 images=None, csf_dark: bool = True, seen: np.ndarray | None = None) -> Common:
    """The subject's :class:`Common` from its sessions' ``masks`` (soft, mid-space) and the tissue maps
    of the sessions that have them (``tissues``: list of dicts GM/WM/CSF -> array, or None per session).
    Without any tissue map, the deep region of ``template`` (the mid-space template image) is split into
    the ventricles' CSF and the tissue (:func:`_deep_classes`, with the sessions' ``images`` on the grid and
    whether the contrast has CSF dark). ``seen``: the voxels inside every session's field of view; the
    region is kept to them (a stack that ends higher in one session reads nothing below its last slice,
    which the other sessions' brain would count as change)."""
    masks = [np.asarray(m, np.float32) for m in masks]
    region = np.max(masks, 0) > 0.5
    if seen is not None:
        region &= np.asarray(seen, bool)
    core = ndi.binary_erosion(np.min(masks, 0) > 0.5, iterations=2)
    deep = deep_weight(np.min(masks, 0), spacing)
    have = [t for t in (tissues or []) if t]
    sets = {}
    if have:
        mean = {c: np.mean([t[c] for t in have], 0) for c in ("GM", "WM", "CSF")}
        par = mean["GM"] + mean["WM"]
        gm_share = np.where(par > 1e-3, mean["GM"] / np.maximum(par, 1e-3), 0.5).astype(np.float32)
        voxel_mm3 = float(np.prod(spacing))
        for tissue in ("GM", "WM", "CSF"):
            # the purest voxels that are enough: the interior of the ventricles first for CSF
            enough = MIN_SET if tissue == "CSF" else max(MIN_SET, int(MIN_SET_ML * 1000.0 / voxel_mm3))
            tries = [(PURE, deep > 0.99)] if tissue == "CSF" else []
            for level, where in tries + [(lv, True) for lv in LEVELS]:
                sets[tissue] = core & (mean[tissue] > level) & (where if tissue == "CSF" else True)
                if tissue == "CSF":
                    inner = interior(sets[tissue], spacing)
                    sets[tissue] = inner if inner.sum() >= enough else sets[tissue]
                if sets[tissue].sum() >= enough:
                    break
    else:
        if template is None:
            raise ValueError("without tissue maps the mid-space template is needed to find the CSF")
        gm_share = None
        csf_deep, sets["CSF"], sets["tissue"] = _deep_classes(template, core & (deep > 0.99), images, spacing,
                                                              csf_dark)
    # the ventricles: deep CSF and a 3-voxel rim around it (where they grow); without the rim restriction the
    # deep region's tissue, which does not change, dilutes the ventricles' change
    if have:
        csf_deep = np.mean([t["CSF"] for t in have], 0) > 0.5
    deep = deep * ndi.binary_dilation(csf_deep & (deep > 0.5), iterations=3)
    empty = [k for k, v in sets.items() if v.sum() < MIN_SET // 2]
    if empty:
        raise ValueError(f"too few voxels to calibrate {', '.join(empty)} intensities in the mid-space")
    return Common(region=region, core=core, deep=deep, gm_share=gm_share, sets=sets,
                  voxel_mm3=float(np.prod(spacing)))


def _deep_classes(template: np.ndarray, sel: np.ndarray, images=None, spacing=(1.0, 1.0, 1.0), csf_dark=True):
    """Without tissue maps: the ventricles' CSF in the deep region ``sel`` of the mid-space ``template``.
    Returns (the CSF, its calibration set, the tissue's calibration set).

    With the sessions' ``images`` (the subject level), ``sel`` is cut into three classes by Otsu's two
    cuts and the CSF is the darkest (``csf_dark``: T1w, FLAIR) or the brightest (T2w, PDw). Two classes,
    the smaller taken as CSF, split white from grey matter where a long echo darkens the white matter,
    and called the grey matter CSF (a FLAIR read as 40 % brain loss); where grown ventricles outweigh the
    deep tissue, they called the tissue CSF. The calibration sets then keep the voxels on their class's
    side of every session's own cut (half-way between its CSF and tissue medians): on the template alone,
    ventricle grown between the sessions is part CSF and joins the set, so the earlier session's CSF reads
    brighter and a recalibrated reading absorbs the growth. The CSF set is then its interior (:func:`interior`).

    Without ``images`` the region is split in two and the smaller class is the CSF: what the Siamese
    network's input (:func:`pair_common`) was trained with."""
    from bidsapp.qc import otsu_threshold, otsu_thresholds3

    vals = template[sel]
    if images is None or vals.size < 3 * MIN_SET:
        t = otsu_threshold(vals) if vals.size else 0.0
        low, high = sel & (template <= t), sel & (template > t)
        csf, par = (low, high) if low.sum() < high.sum() else (high, low)
        return csf, csf, par
    t1, t2 = otsu_thresholds3(vals)
    found = csf = sel & (template <= t1) if csf_dark else sel & (template > t2)
    par = sel & ~csf
    for img in images:
        img = np.asarray(img, np.float32)
        cut = (float(np.median(img[csf])) + float(np.median(img[par]))) / 2.0 if csf.any() and par.any() else 0.0
        on_csf_side = (img <= cut) if csf_dark else (img >= cut)
        csf_i, par_i = csf & on_csf_side, par & ~on_csf_side
        if csf_i.sum() >= MIN_SET and par_i.sum() >= MIN_SET:
            csf, par = csf_i, par_i
    inner = interior(csf, spacing)
    return found, (inner if inner.sum() >= MIN_SET else csf), par


def pair_common(a: np.ndarray, b: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Common:
    """The :class:`Common` of two skull-stripped images alone (zero outside each brain), without tissue
    maps: what a pair is read with when nothing but the two images is known (the Siamese network's
    input, the decline benchmark's volume changes)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    masks = [(a > 0).astype(np.float32), (b > 0).astype(np.float32)]
    a, b = (x / max(float(np.median(x[x > 0])), 1e-6) if (x > 0).any() else x for x in (a, b))
    # calibration voxels that are CSF in both images (dark in the brighter of the two) and tissue in both
    # (bright in the darker): on their mean, voxels that atrophy turned from tissue to CSF would join the
    # CSF set of the one image and the tissue set of the other (a grown ventricle read at two thirds)
    common = common_space(masks, None, spacing=spacing, template=np.maximum(a, b))
    common.sets["tissue"] = common_space(masks, None, spacing=spacing, template=np.minimum(a, b)).sets["tissue"]
    return common


def pair_fractions(a: np.ndarray, b: np.ndarray, spacing=(1.0, 1.0, 1.0), csf_inverted=(False, False)):
    """Two skull-stripped images of one brain (same grid) as brain-tissue fractions in [0, 1] (0: CSF or
    outside the brain, 1: pure tissue), each read with its own CSF and tissue intensities calibrated on
    the voxel sets of :func:`pair_common` (the 3D-SiameseNet's ``fraction`` input). ``csf_inverted``: per
    image, whether its CSF signal is opposite to the tissues' (read unfolded)."""
    common = pair_common(a, b, spacing)
    out = []
    for x, inverted in zip((a, b), csf_inverted):
        x = np.asarray(x, np.float32)
        n = normalise(x, common)
        f = tissue_fraction(n, calibrate(n, common, bool(inverted)), common)
        out.append(np.where(x > 0, f, 0.0).astype(np.float32))
    return out[0], out[1]


def normalise(image: np.ndarray, common: Common) -> np.ndarray:
    """Intensities divided by their median in the white matter (or the parenchyma without tissue maps):
    removes the receiver's global scale with a reference that atrophy does not change (the median of the
    whole brain moves when CSF replaces tissue, and would move every voxel's reading with it)."""
    ref = common.sets.get("WM", common.sets.get("tissue"))
    return (image / max(float(np.median(image[ref])), 1e-6)).astype(np.float32)


def calibrate(image: np.ndarray, common: Common, csf_inverted: bool = False) -> dict:
    """Tissue intensities of one (normalised) session: median over each calibration set; with
    ``csf_inverted`` (the session's CSF signal is opposite to the tissues', module docstring)."""
    mu = {k: float(np.median(image[s])) for k, s in common.sets.items()}
    mu["csf_inverted"] = 1.0 if csf_inverted else 0.0
    return mu


def pooled(*mus) -> dict:
    """Mean tissue intensities; CSF is read as inverted only when it is in every session."""
    out = {k: float(np.mean([m[k] for m in mus])) for k in mus[0] if k != "csf_inverted"}
    out["csf_inverted"] = min(m.get("csf_inverted", 0.0) for m in mus)
    return out


def tissue_fraction(image: np.ndarray, mu: dict, common: Common, clip=(0.0, 1.0)) -> np.ndarray:
    """f: the fraction of brain tissue in each voxel (module docstring), clipped to ``clip``."""
    if common.gm_share is not None:
        tissue = common.gm_share * mu["GM"] + (1.0 - common.gm_share) * mu["WM"]
    else:
        tissue = mu["tissue"]
    if mu.get("csf_inverted"):  # signed signal f*tissue - (1-f)*CSF, folded at its zero by the magnitude
        span = np.maximum(tissue + mu["CSF"], 1e-6)
        f = np.where(image >= mu["CSF"], image + mu["CSF"], mu["CSF"] - image) / span
        return np.clip(f, *clip).astype(np.float32)
    span = tissue - mu["CSF"]
    span = np.where(np.abs(span) < 1e-6, 1e-6, span)
    return np.clip((image - mu["CSF"]) / span, *clip).astype(np.float32)


def window(*mus) -> tuple[float, float]:
    """The boundary-shift window for sessions read with ``mus``: :data:`WINDOW`, its lower end raised
    above the folded fractions of an inverted-CSF reading (up to twice the fold's zero), so that every
    session reads the window's fractions unambiguously."""
    lo, hi = WINDOW
    for mu in mus:
        if mu.get("csf_inverted"):
            darkest = min(v for k, v in mu.items() if k in ("GM", "WM", "tissue"))
            lo = max(lo, 2.0 * mu["CSF"] / max(darkest + mu["CSF"], 1e-6) + 0.05)
    return min(lo, hi - 0.2), hi


def volumes(image: np.ndarray, mu: dict, common: Common, lesion: np.ndarray | None = None,
            tissue: dict | None = None) -> dict:
    """mm3 of every measure of :data:`MEASURES` for one session (NaN where it cannot be measured): brain,
    GM and WM from the session's ``tissue`` maps (GM/WM fractions on the mid-space grid) when it has them,
    else from its intensities (module docstring)."""
    f = tissue_fraction(image, mu, common) * common.region
    v = common.voxel_mm3
    if tissue is not None:
        out = {c: float((tissue[c] * common.region).sum(dtype=np.float64)) * v for c in ("GM", "WM")}
        out["brain"] = out["GM"] + out["WM"]
    else:
        out = {"brain": float(f.sum(dtype=np.float64)) * v}
        if common.gm_share is not None:
            out["GM"] = float((f * common.gm_share).sum(dtype=np.float64)) * v
            out["WM"] = out["brain"] - out["GM"]
        else:
            out["GM"] = out["WM"] = float("nan")
    out["CSF"] = float(common.region.sum(dtype=np.float64)) * v - out["brain"]
    out["ventricles"] = float(((1.0 - f) * common.region * common.deep).sum(dtype=np.float64)) * v
    out["lesion"] = float(np.asarray(lesion, np.float64).sum()) * v if lesion is not None else float("nan")
    return out


def shift_map(a: np.ndarray, b: np.ndarray, mu_a: dict, mu_b: dict, common: Common) -> np.ndarray:
    """Per-voxel tissue gained from ``a`` to ``b`` (fraction of a voxel), the boundary-shift integrand
    (module docstring), zero outside the region."""
    lo, hi = window(mu_a, mu_b)
    fa = tissue_fraction(a, mu_a, common, clip=(lo, hi))
    fb = tissue_fraction(b, mu_b, common, clip=(lo, hi))
    return ((fb - fa) / (hi - lo) * common.region).astype(np.float32)


def shifted(volume: dict, shift: np.ndarray, common: Common, lesion=None) -> dict:
    """``volume`` (of the first session) plus the change that ``shift`` (:func:`shift_map`) reads."""
    v = common.voxel_mm3
    brain = float(shift.sum(dtype=np.float64)) * v
    out = dict(volume, brain=volume["brain"] + brain, CSF=volume["CSF"] - brain,
               ventricles=volume["ventricles"] - float((shift * common.deep).sum(dtype=np.float64)) * v)
    if common.gm_share is not None:
        gm = float((shift * common.gm_share).sum(dtype=np.float64)) * v
        out["GM"], out["WM"] = volume["GM"] + gm, volume["WM"] + brain - gm
    out["lesion"] = float(np.asarray(lesion, np.float64).sum()) * v if lesion is not None else float("nan")
    return out


@dataclass
class PairResult:
    volume_from: dict
    volume_to: dict
    raw_from: dict = field(default_factory=dict)
    raw_to: dict = field(default_factory=dict)
    correction: str = "none"
    shift: np.ndarray | None = None
    """The answer's :func:`shift_map` (the report's change map)."""


def pair_volumes(a: np.ndarray, b: np.ndarray, common: Common, *, changed: bool,
                 lesion_a=None, lesion_b=None, csf_inverted=(False, False), tissue_a: dict | None = None) -> PairResult:
    """Volumes of sessions ``a`` -> ``b`` (normalised mid-space images): read with pooled tissue
    intensities, and, when the acquisition ``changed``, also with each session's own (the answer).
    ``csf_inverted``: per session, whether its CSF signal is opposite to the tissues' (module docstring);
    ``tissue_a``: session ``a``'s GM/WM maps on the mid-space grid, its baseline volumes (:func:`volumes`)."""
    mu_a, mu_b = calibrate(a, common, csf_inverted[0]), calibrate(b, common, csf_inverted[1])
    mu = pooled(mu_a, mu_b)
    raw_a = volumes(a, mu, common, lesion_a, tissue_a)
    raw_shift = shift_map(a, b, mu, mu, common)
    raw_b = shifted(raw_a, raw_shift, common, lesion_b)
    if not changed:
        return PairResult(raw_a, raw_b, raw_a, raw_b, "none", raw_shift)
    own_a = volumes(a, mu_a, common, lesion_a, tissue_a)
    own_shift = shift_map(a, b, mu_a, mu_b, common)
    return PairResult(own_a, shifted(own_a, own_shift, common, lesion_b), raw_a, raw_b, RECALIBRATED, own_shift)


def percent(v_from: float, v_to: float) -> float:
    if not (np.isfinite(v_from) and np.isfinite(v_to)) or v_from <= 0:
        return float("nan")
    return (v_to / v_from - 1.0) * 100.0
