"""Per-session quality control: is the scan a usable head image, and are its results plausible?

A pipeline that always finishes will turn noise into a plausible-looking brain; these checks are
what a person would apply before trusting the numbers. :func:`measures` computes image-quality
measures in the spirit of MRIQC (Esteban et al. 2017, PLoS ONE 12:e0184661) on the preprocessed
reference image with its brain mask and, for a T1w, the main tissue segmentation. :data:`RULES` is
the one home of the plausible ranges; :func:`judge` turns measures into a verdict:

``pass``
    every applicable rule holds;
``warn``
    usable, with one-line reasons that the participant report shows;
``fail``
    not usable (no head, pure noise, implausible brain, segmentation at chance): the session is
    reported failed and the run exits non-zero.

A measure that cannot be computed (no tissue segmentation in a FLAIR-only session, no air in a
tightly cropped field of view, a noise-free background) is NaN, and its rules do not apply.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bidsapp.labels import TISSUE
from bidsapp.models.brainmask import VOLUME_RANGE_ML
from bidsapp.physics.contrast import LOW_CONTRAST

if TYPE_CHECKING:
    import pandas as pd

RAYLEIGH_SD = math.sqrt(2.0 - math.pi / 2.0)
"""SD of magnitude-image air noise in units of the channel noise sigma (Rayleigh); MRIQC's Dietrich factor."""
ROSE_K = 5.0
"""Rose criterion: an object is reliably seen at a contrast of 5 noise SDs (Rose 1948, JOSA 38:196)."""
HEAD_PERCENTILE = 90.0
"""Where in the foreground's intensities the head's contrast with the air is read. Not its median: most of a
FLAIR's head is dark (CSF nulled, scalp, bone, neck), and a clean 1.5 T FLAIR in 5 mm slices, brain 17 noise
SDs above the air, had its median head voxel 4.6 above it and failed as "no head". The 90th percentile is
brain wherever the brain is a tenth of the foreground; pure noise keeps it within about 2 SDs of the air."""
SMOOTH_MM = 2.0
"""Gaussian smoothing (sigma) before the head is thresholded, so noise speckle does not decide it."""
AIR_MARGIN_MM = 5.0
"""Air starts this far outside the head: partial volume and ringing at the scalp are not noise."""
MIN_AIR_VOXELS = 500
"""Fewer air voxels than this (a field of view cropped to the head): air-based measures are n/a."""
BRAIN_AT_EDGE_MM2 = 1000.0
"""Brain on one face of the field of view beyond this (10 cm2, a 3 x 3 cm patch of cut cortex) means
part of the brain lies outside the image. Smaller contacts are harmless: the medulla where a stack ends
across the brainstem (under 800 mm2), a sliver of the vertex (under 650 mm2). Six of the fourteen
clinical 2D stacks here end below the vertex with 1500-4600 mm2 of brain on their last slice (one of
them also cuts the cerebellum, 2300 mm2 on its first); a real head cut 25 mm below the vertex: 9200 mm2."""

_GM = next(lab.value for lab in TISSUE if lab.name == "GM")
_WM = next(lab.value for lab in TISSUE if lab.name == "WM")

MEASURES = {
    "head_present": ("1 when the foreground holds at least a brain's volume (800 ml) and, where the air has "
                     f"noise, stands out from it by the Rose criterion ({ROSE_K:g} noise SDs above the air's median; "
                     "see head_contrast), else 0", None),
    "head_volume_ml": ("volume of the foreground (largest component of the Otsu-thresholded, smoothed image, "
                       "holes filled)", "ml"),
    "head_contrast": (f"({HEAD_PERCENTILE:g}th percentile of the foreground - median air) / noise sigma, sigma = "
                      "air SD / sqrt(2 - pi/2)", None),
    "snr": ("Dietrich SNR (MRIQC snrd): mean WM signal (brain signal without a tissue segmentation) over the "
            "noise sigma estimated from the air", None),
    "cnr": ("contrast-to-noise ratio |mean GM - mean WM| / sqrt(var GM + var WM) (MRIQC cnr)", None),
    "cjv": ("coefficient of joint variation (SD WM + SD GM) / |mean WM - mean GM| (MRIQC cjv; lower is better)",
            None),
    "fber": ("foreground-background energy ratio: median squared intensity of the head over that of the air "
             "(MRIQC fber); about 1 for pure noise", None),
    "efc": ("entropy focus criterion (Atkinson 1997): Shannon entropy of the voxel intensities relative to its "
            "maximum, 1 for a uniform image (MRIQC efc; lower is better)", None),
    "brain_volume_ml": ("volume of the brain mask", "ml"),
    "brain_at_edge_mm2": ("largest area of the brain mask on one face of the image's field of view (0 when the "
                          "whole brain lies inside it)", "mm2"),
    "gm_wm_ratio": ("GM volume over WM volume of the tissue segmentation", None),
    "wm_gm_contrast": ("mean WM signal over mean GM signal (T1w: WM brighter)", None),
    "seg_confidence": ("mean over the brain mask of the largest tissue probability (1/3 is chance for three "
                       "classes)", None),
}
"""Measure name -> (description, units): the TSV's columns and its sidecar's column descriptions."""


@dataclass(frozen=True)
class QCRule:
    """One plausibility rule: ``measure`` must lie in [``low``, ``high``] (None: unbounded)."""

    name: str
    measure: str
    low: float | None
    high: float | None
    severity: str
    """``warn`` or ``fail``."""
    reason: str
    """One line saying what a broken rule means; ``{measure}`` fields are filled from the measures."""
    contrasts: tuple[str, ...] = ()
    """Reference contrasts the rule applies to (empty: all)."""

    def applies(self, contrast: str | None) -> bool:
        return not self.contrasts or contrast in self.contrasts

    def broken(self, value) -> bool:
        """True when ``value`` is measured and outside the range (NaN: not measured, the rule does not apply)."""
        if value is None or math.isnan(float(value)):
            return False
        return (self.low is not None and value < self.low) or (self.high is not None and value > self.high)

    @property
    def limits(self) -> str:
        """Where the rule breaks, as text: ``< 2``, ``> 0.8``, ``outside 800-2200``."""
        if self.low is not None and self.high is not None:
            return f"outside {self.low:g}-{self.high:g}"
        return f"< {self.low:g}" if self.low is not None else f"> {self.high:g}"


_LO_ML, _HI_ML = VOLUME_RANGE_ML
RULES: tuple[QCRule, ...] = (
    QCRule("no_head", "head_present", 1, None, "fail",
           "no head found (foreground {head_contrast:.1f} noise SD above the air, Rose criterion 5, "
           "FBER {fber:.2f})"),
    QCRule("noise_snr", "snr", 2.0, None, "fail",
           "SNR {snr:.2f} of pure noise (magnitude noise alone gives sqrt(pi/2) = 1.25)"),
    QCRule("noise_fber", "fber", 2.0, None, "fail",
           "foreground-background energy ratio {fber:.2f}: the head is no brighter than the air, as in pure noise"),
    QCRule("brain_volume", "brain_volume_ml", _LO_ML, _HI_ML, "fail",
           "brain volume {brain_volume_ml:.0f} ml outside the plausible "
           f"{_LO_ML:.0f}-{_HI_ML:.0f} ml"),
    QCRule("seg_chance", "seg_confidence", 0.5, None, "fail",
           "tissue segmentation confidence {seg_confidence:.2f} near chance (1/3 for three classes)"),
    QCRule("low_snr", "snr", ROSE_K, None, "warn",
           "low SNR {snr:.1f} (below the Rose criterion of 5): tissue boundaries are unreliable"),
    QCRule("low_fber", "fber", 10.0, None, "warn",
           "low foreground-background energy ratio {fber:.1f}: much signal in the air (noise or ghosting)"),
    QCRule("low_cnr", "cnr", 0.5, None, "warn",
           "low GM/WM contrast-to-noise ratio {cnr:.2f}: grey and white matter intensities overlap"),
    QCRule("wm_gm_contrast", "wm_gm_contrast", 1.0 + LOW_CONTRAST, None, "warn",
           "WM/GM signal ratio {wm_gm_contrast:.3f}: little T1w grey/white contrast", ("T1w",)),
    QCRule("gm_wm_ratio", "gm_wm_ratio", 0.6, 3.0, "warn",
           "GM/WM volume ratio {gm_wm_ratio:.2f} outside 0.6-3.0"),
    QCRule("seg_confidence", "seg_confidence", 0.6, None, "warn",
           "low tissue segmentation confidence {seg_confidence:.2f}"),
    QCRule("brain_cut", "brain_at_edge_mm2", None, BRAIN_AT_EDGE_MM2, "warn",
           "the brain reaches the edge of the field of view ({brain_at_edge_mm2:.0f} mm2 of brain mask on one face): "
           "part of the brain may lie outside the image, and its volumes are then lower bounds"),
    QCRule("efc", "efc", None, 0.8, "warn",
           "entropy focus criterion {efc:.2f}: signal spread over the field of view (blurring, ghosting or noise)"),
)
"""The plausible ranges, each with its reason. Fail rules mark what no usable head scan gives: pure
magnitude noise has SNR sqrt(pi/2) and FBER about 1 (Rayleigh statistics, Gudbjartsson & Patz 1995,
MRM 34:910), a head is an object seen by the Rose criterion, the brain volume is that of
:mod:`bidsapp.models.brainmask`'s sanity check, and a most-likely-class probability of 0.5 is barely
above the 1/3 of guessing. Warn ranges are wide on purpose: adult GM/WM volume ratios are about
1.1-1.6 at 1 mm (Ge et al. 2002, AJNR 23:1327), but partial volume at 3 mm slices moves voxels to GM
(2.4 measured on a clinical 3 mm T1w); the WM/GM signal limit is the project's low-contrast one
(:data:`bidsapp.physics.contrast.LOW_CONTRAST`); CNR and EFC limits sit below and above every real
and simulated head measured (CNR 0.6-2.4, EFC 0.45-0.66) and short of pure noise (EFC 0.88-1)."""


@dataclass
class QCResult:
    measures: dict
    verdict: str
    reasons: list[str] = field(default_factory=list)
    contrast: str | None = None

    def row(self) -> dict:
        """One TSV row: the measures, ``verdict`` and ``reasons`` (joined with "; ")."""
        return {**self.measures, "verdict": self.verdict, "reasons": "; ".join(self.reasons) or None}


# ---------------------------------------------------------------------------------------------- measures

def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the cut maximising the between-class variance of a histogram."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w1 = np.cumsum(hist)
    w2 = w1[-1] - w1
    m = np.cumsum(hist * centres)
    mu1 = m / np.maximum(w1, 1)
    mu2 = (m[-1] - m) / np.maximum(w2, 1)
    return float(centres[np.argmax(w1 * w2 * (mu1 - mu2) ** 2)])


def otsu_thresholds3(values: np.ndarray, bins: int = 256) -> tuple[float, float]:
    """Otsu's two cuts into three classes (maximal between-class variance): where two classes would
    split a brain's deep region between white and grey matter, three keep the CSF a class of its own."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w = np.concatenate([[0.0], np.cumsum(hist, dtype=np.float64)])
    m = np.concatenate([[0.0], np.cumsum(hist * centres, dtype=np.float64)])
    i, j = np.triu_indices(bins + 1, k=1)  # classes [0, i), [i, j), [j, bins)
    keep = (i > 0) & (j < bins)
    i, j = i[keep], j[keep]
    score = np.zeros(i.size)
    for lo, hi in ((np.zeros_like(i), i), (i, j), (j, np.full_like(j, bins))):
        wk, mk = w[hi] - w[lo], m[hi] - m[lo]
        score += np.where(wk > 0, mk ** 2 / np.maximum(wk, 1e-12), 0.0)
    best = int(np.argmax(score))
    return float(edges[i[best]]), float(edges[j[best]])


def head_and_air(data: np.ndarray, zooms, brain=None) -> tuple[np.ndarray, np.ndarray]:
    """Head (Otsu on the log of the smoothed image, largest component, holes filled, plus the brain) and air
    (everything :data:`AIR_MARGIN_MM` beyond it; beyond the head itself when that leaves too little)."""
    from scipy import ndimage as ndi

    zooms = np.asarray(zooms, float)[:3]
    smooth = ndi.gaussian_filter(np.maximum(data, 0).astype(np.float32), SMOOTH_MM / zooms)
    logs = np.log1p(smooth)
    sample = logs.ravel()[:: max(1, logs.size // 1_000_000)]
    fg = logs > otsu_threshold(sample)
    lab, n = ndi.label(fg)
    if n > 1:
        fg = lab == (int(np.argmax(np.bincount(lab.ravel())[1:])) + 1)
    head = ndi.binary_fill_holes(fg)
    if brain is not None:
        head |= brain
    outside = ndi.distance_transform_edt(~head, sampling=zooms)
    air = outside > AIR_MARGIN_MM
    if air.sum() < MIN_AIR_VOXELS:
        air = ~head
    return head, air


def noise_sigma(air_values: np.ndarray) -> float:
    """Channel noise sigma from (non-zero) magnitude air voxels: their SD over sqrt(2 - pi/2), as air is
    Rayleigh-distributed; 0 when there are too few to tell."""
    if air_values.size < MIN_AIR_VOXELS:
        return 0.0
    return float(np.std(air_values) / RAYLEIGH_SD)


def snr(signal_values: np.ndarray, sigma: float) -> float:
    """Dietrich SNR (MRIQC snrd): mean tissue signal over the noise sigma; NaN without a noise estimate."""
    return float(np.mean(signal_values) / sigma) if sigma > 0 and signal_values.size else float("nan")


def cnr(gm: np.ndarray, wm: np.ndarray) -> float:
    """Contrast-to-noise ratio |mean GM - mean WM| / sqrt(var GM + var WM) (MRIQC cnr)."""
    if gm.size < 2 or wm.size < 2:
        return float("nan")
    spread = math.sqrt(float(np.var(gm) + np.var(wm)))
    return abs(float(np.mean(gm) - np.mean(wm))) / spread if spread > 0 else float("inf")


def cjv(gm: np.ndarray, wm: np.ndarray) -> float:
    """Coefficient of joint variation (SD WM + SD GM) / |mean WM - mean GM| (Ganzetti 2016; MRIQC cjv)."""
    if gm.size < 2 or wm.size < 2:
        return float("nan")
    diff = abs(float(np.mean(wm) - np.mean(gm)))
    return float(np.std(wm) + np.std(gm)) / diff if diff > 0 else float("inf")


def fber(head_values: np.ndarray, air_values: np.ndarray) -> float:
    """Foreground-background energy ratio: median squared head intensity over median squared air intensity
    (MRIQC fber); NaN when the air is empty or noise-free."""
    if head_values.size == 0 or air_values.size == 0:
        return float("nan")
    bg = float(np.median(np.square(air_values, dtype=np.float64)))
    return float(np.median(np.square(head_values, dtype=np.float64)) / bg) if bg > 0 else float("nan")


def efc(data: np.ndarray) -> float:
    """Entropy focus criterion (Atkinson 1997; MRIQC efc): the entropy of the intensities normalised by the
    total energy, over its maximum (a uniform image, 1)."""
    x = np.abs(np.asarray(data, dtype=np.float64)).ravel()
    n = x.size
    bmax = math.sqrt(float(np.sum(x * x)))
    if n < 2 or bmax == 0:
        return float("nan")
    p = x[x > 0] / bmax
    efc_max = n * (1.0 / math.sqrt(n)) * math.log(1.0 / math.sqrt(n))
    return float(np.sum(p * np.log(p)) / efc_max)


def brain_at_edge_mm2(brain: np.ndarray, zooms) -> float:
    """Largest area (mm2) of ``brain`` on one of the six faces of its array: a brain that the field of
    view cuts touches it (a 2D stack ending below the vertex; the brain mask keeps the brain to the
    last slice, :func:`bidsapp.models.brainmask._pad`)."""
    z = np.asarray(zooms, float)[:3]
    areas = [float(np.take(brain, i, axis=ax).sum()) * float(np.prod(np.delete(z, ax)))
             for ax in range(3) for i in (0, -1)]
    return max(areas)


def seg_confidence(probseg: np.ndarray, brain: np.ndarray) -> float:
    """Mean over the brain of the largest class probability (classes on the first axis)."""
    if not brain.any():
        return float("nan")
    return float(np.mean(np.max(probseg[:, brain], axis=0)))


def measures(data: np.ndarray, brain: np.ndarray, zooms, dseg: np.ndarray | None = None,
             probseg: np.ndarray | None = None) -> dict:
    """Every :data:`MEASURES` entry of an image (``data``) with its brain mask, tissue dseg (1 CSF, 2 GM,
    3 WM) and probseg (classes first), all on one grid; NaN where an input is missing."""
    data = np.nan_to_num(np.asarray(data, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    brain = np.asarray(brain) > 0
    voxel_ml = float(np.prod(np.asarray(zooms, float)[:3])) / 1000.0
    head, air = head_and_air(data, zooms, brain)
    head_vals, air_vals = data[head], data[air]
    air_vals = air_vals[air_vals != 0]  # masked or zero-filled background carries no noise
    sigma = noise_sigma(air_vals)
    if sigma > 0:
        contrast = (float(np.percentile(head_vals, HEAD_PERCENTILE)) - float(np.median(air_vals))) / sigma
    else:  # a background of zeros: any signal stands out
        contrast = float("inf") if head_vals.size and np.percentile(head_vals, HEAD_PERCENTILE) > 0 else float("nan")
    head_ml = float(head.sum()) * voxel_ml
    present = float(head_ml >= _LO_ML and (np.isnan(contrast) or contrast >= ROSE_K))
    out = {k: float("nan") for k in MEASURES}
    out.update(head_present=present, head_volume_ml=head_ml, head_contrast=contrast,
               fber=fber(head_vals, air_vals) if sigma > 0 else float("nan"), efc=efc(data),
               brain_volume_ml=float(brain.sum()) * voxel_ml, brain_at_edge_mm2=brain_at_edge_mm2(brain, zooms))
    signal = data[brain]
    if dseg is not None:
        dseg = np.asarray(dseg)
        gm, wm = data[(dseg == _GM) & brain], data[(dseg == _WM) & brain]
        out.update(cnr=cnr(gm, wm), cjv=cjv(gm, wm),
                   gm_wm_ratio=float(gm.size / wm.size) if wm.size else float("nan"),
                   wm_gm_contrast=float(np.mean(wm) / np.mean(gm)) if gm.size and wm.size and np.mean(gm) > 0
                   else float("nan"))
        if wm.size:
            signal = wm
    out["snr"] = snr(signal, sigma)
    if probseg is not None:
        out["seg_confidence"] = seg_confidence(np.asarray(probseg), brain)
    return out


# ---------------------------------------------------------------------------------------------- verdict

class _Measured(dict):
    """Measures for a reason's format fields; a missing one reads as NaN."""

    def __missing__(self, key):
        return float("nan")


def _fmt(rule: QCRule, values: dict) -> str:
    try:
        return rule.reason.format_map(_Measured(values))
    except (ValueError, TypeError):
        return rule.reason


def judge(values: dict, contrast: str | None = None, rules=RULES) -> tuple[str, list[str]]:
    """(verdict, reasons): ``fail`` when a fail rule is broken (only the fail reasons are given), else
    ``warn`` with the warn reasons, else ``pass``."""
    broken = [r for r in rules if r.applies(contrast) and r.broken(values.get(r.measure))]
    fails = list(dict.fromkeys(_fmt(r, values) for r in broken if r.severity == "fail"))
    if fails:
        return "fail", fails
    warns = list(dict.fromkeys(_fmt(r, values) for r in broken if r.severity == "warn"))
    return ("warn", warns) if warns else ("pass", [])


def rule_status(rule: QCRule, values: dict, contrast: str | None = None) -> str:
    """``n/a``, ``pass`` or the rule's severity, for one rule and a session's measures."""
    v = values.get(rule.measure)
    if not rule.applies(contrast) or v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return rule.severity if rule.broken(v) else "pass"


def assess_arrays(data, brain, zooms, dseg=None, probseg=None, contrast: str | None = None) -> QCResult:
    """Measures and verdict of arrays on one grid (see :func:`measures`)."""
    values = measures(data, brain, zooms, dseg, probseg)
    verdict, reasons = judge(values, contrast)
    return QCResult(values, verdict, reasons, contrast)


def assess(in_file, mask_file, dseg_file=None, probseg_files=None, contrast: str | None = None) -> QCResult:
    """Measures and verdict of a preprocessed image with its brain mask and optional tissue dseg and
    probseg files (CSF, GM, WM), all on the image's grid."""
    import nibabel as nib

    img = nib.load(str(in_file))
    data = np.asarray(img.dataobj, dtype=np.float32)
    data = data.reshape(data.shape[:3])
    brain = np.asarray(nib.load(str(mask_file)).dataobj) > 0
    dseg = np.asarray(nib.load(str(dseg_file)).dataobj) if dseg_file else None
    probseg = None
    if probseg_files:
        probseg = np.stack([np.asarray(nib.load(str(p)).dataobj, dtype=np.float32) for p in probseg_files])
    for name, arr in (("brain mask", brain), ("dseg", dseg), ("probseg", probseg)):
        if arr is not None and tuple(arr.shape[-3:]) != tuple(data.shape):
            raise ValueError(f"{in_file}: QC {name} grid {arr.shape[-3:]} differs from the image's {data.shape}")
    return assess_arrays(data, brain, img.header.get_zooms()[:3], dseg, probseg, contrast)


def rules_metadata(rules=RULES) -> list[dict]:
    """The rules as JSON-ready dicts (for the QC table's sidecar)."""
    return [{k: v for k, v in asdict(r).items() if v not in (None, ())} for r in rules]


# ---------------------------------------------------------------------------------------------- outputs

QC_SUFFIX, QC_DESC = "qc", "iqm"
"""The QC table is ``<source entities>_desc-iqm_qc.tsv`` (see :mod:`workflows.interfaces.qc`)."""
COLUMNS = (*MEASURES, "verdict", "reasons")


def read_qc(path) -> dict:
    """A QC table's first row as a dict (measures as floats, NaN for ``n/a``)."""
    import pandas as pd

    df = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)
    if df.empty:
        raise ValueError(f"{path}: empty QC table")
    row = df.iloc[0].to_dict()
    for k in MEASURES:
        if k in row:
            row[k] = pd.to_numeric(pd.Series([row[k]]), errors="coerce").iloc[0]
    row["verdict"] = str(row.get("verdict") or "n/a")
    reasons = row.get("reasons")
    row["reasons"] = [] if not isinstance(reasons, str) or not reasons else reasons.split("; ")
    return row


def qc_path(anat_dir, prefix: str) -> Path:
    """Where a session's QC table lives (``prefix``: ``sub-X[_ses-Y][_acq-...]``)."""
    return Path(anat_dir) / f"{prefix}_desc-{QC_DESC}_{QC_SUFFIX}.tsv"


class QualityControlError(ValueError):
    """A session's scan is not usable (a ``fail`` verdict)."""


def failure_message(source_file, reasons) -> str:
    """The one line a ``fail`` verdict becomes: whose session, which input file, why, and what it means."""
    from bidsapp.bids.derivatives import parse_entities

    name = Path(str(source_file)).name
    ents = parse_entities(name) or {}
    who = " ".join(f"{k}-{ents[k]}" for k in ("sub", "ses") if ents.get(k))
    why = "; ".join(reasons) or "a fail rule is broken"
    return f"{who + ': ' if who else ''}{name}: quality control failed: {why}; results not usable"


def check_verdict(verdict: str, reasons, source_file) -> None:
    """Raise :class:`QualityControlError` with :func:`failure_message` when ``verdict`` is ``fail``."""
    if verdict == "fail":
        raise QualityControlError(failure_message(source_file, list(reasons)))


def collect_qc(output_dir, subject: str | None = None) -> pd.DataFrame:
    """Every session's QC row (``participant_id``, ``session_id`` (``n/a`` without sessions), the table's
    columns and its ``path``), one row per QC table under ``output_dir``; an unreadable table is a row
    with verdict ``n/a`` and the reason."""
    import pandas as pd

    from bidsapp.bids.derivatives import parse_entities

    out = Path(output_dir)
    subject = subject[4:] if subject and subject.startswith("sub-") else subject
    rows = []
    for sub_dir in sorted(p for p in out.glob(f"sub-{subject}" if subject else "sub-*") if p.is_dir()):
        for path in sorted([*sub_dir.glob(f"anat/*_desc-{QC_DESC}_{QC_SUFFIX}.tsv"),
                            *sub_dir.glob(f"ses-*/anat/*_desc-{QC_DESC}_{QC_SUFFIX}.tsv")]):
            ents = parse_entities(path) or {}
            try:
                row = read_qc(path)
            except Exception as exc:  # noqa: BLE001 - an unreadable table is reported, not fatal
                why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                row = {"verdict": "n/a", "reasons": [f"unreadable QC table ({why})"]}
            rows.append({"participant_id": f"sub-{ents.get('sub')}",
                         "session_id": f"ses-{ents['ses']}" if ents.get("ses") else "n/a",
                         **{k: row.get(k, float("nan")) for k in MEASURES},
                         "verdict": row.get("verdict", "n/a"), "reasons": "; ".join(row.get("reasons") or []),
                         "path": str(path)})
    columns = ["participant_id", "session_id", *COLUMNS, "path"]
    return pd.DataFrame(rows, columns=columns)
