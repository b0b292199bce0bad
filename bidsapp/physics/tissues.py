"""Tissue classes and their MR properties (PD, T1, T2, T2*) at 1.5T, 3T and 7T.

Values are literature means (rounded), in seconds; PD is water content relative to CSF (= 1).
Between 1.5T and 7T (and a little beyond) a property is interpolated log-linearly in field strength,
i.e. a piecewise power law, which is how T1 and T2* behave over that range.  At 3T the brain T1 values
are the paper's physics gold standard (section 3.1: R1 GM 0.683, WM 1.036, CSF 0.240 1/s, taken there
from multiparameter-mapping work), so simulated R1 maps agree with the gold-standard Gaussians.

Sources (T1 / T2 / T2* / PD):
- [S05] Stanisz GJ et al., T1, T2 relaxation and magnetization transfer in tissue at 3T.
  Magn Reson Med 2005;54:507-12 (1.5T and 3T: WM, GM, muscle, blood).
- [W08] Wright PJ et al., Water proton T1 measurements in brain tissue at 7, 3 and 1.5T using IR-EPI,
  IR-TSE and MPRAGE. MAGMA 2008;21:121-30 (7T brain T1).
- [R07] Rooney WD et al., Magnetic field and tissue dependencies of human brain longitudinal 1H2O
  relaxation in vivo. Magn Reson Med 2007;57:308-18 (CSF and blood T1 vs field).
- [P07] Peters AM et al., T2* measurements in human brain at 1.5, 3 and 7 T.
  Magn Reson Imaging 2007;25:748-53 (GM/WM T2*).
- [G04] Gold GE et al., Musculoskeletal MRI at 3.0 T: relaxation times and image contrast.
  AJR 2004;183:343-51 (fat T1/T2).
- [N06] Neeb H, Zilles K, Shah NJ, A new method for fast quantitative mapping of absolute water
  content in vivo. NeuroImage 2006;31:1156-68 (PD: WM ~0.69-0.70, GM ~0.80).
- [B02] Bartha R et al., In vivo 1H2O T2+ measurement in the human occipital lobe at 4T and 7T.
  Magn Reson Med 2002;47:742-50 (7T tissue T2 around 50 ms).
- [PG] Physics gold standard of the physics-informed segmentation paper (section 3.1).
Where no single source gives a value (deep grey matter, lesions, extra-cerebral tissues at 7T, CSF
T2/T2*), the number is an estimate inside the published ranges and marked "est." below; these tissues
only need plausible, distinct contrast.

Public API
----------
``TissueProperties(pd, t1, t2, t2s)``  frozen dataclass (seconds); ``.r1``, ``.r2``, ``.r2s`` (1/s),
    ``.as_array()`` -> ``[pd, t1, t2, t2s]``.
``Tissue(name, truth, brain, pd, t1, t2, t2s, cv)``  one class: ``truth`` is the dseg label it counts
    towards (0 none, 1 CSF, 2 GM, 3 WM), ``brain`` whether it belongs to the brain mask, ``t1/t2/t2s``
    map field strength (T) -> seconds, ``cv`` the between-subject coefficients of variation of
    (PD, R1, R2, R2*).  ``Tissue.properties(field_strength) -> TissueProperties``.
``TISSUES``  dict name -> Tissue, in class order; ``CLASSES`` the names (``"background"`` first).
``TRUTH_LABELS``  {1: "CSF", 2: "GM", 3: "WM"}.
``GOLD_STANDARD_R1``  {"CSF": (0.240, 0.03), "GM": (0.683, 0.080), "WM": (1.036, 0.080)} (1/s).
``properties(name, field_strength) -> TissueProperties``
``property_table(classes, field_strength, multipliers=None) -> np.ndarray (C, 4)``  columns
    PD, T1, T2, T2*; ``multipliers`` (C, 4) scale PD, R1, R2, R2* (between-subject variation).
``sample_multipliers(classes, rng, scale=1.0) -> np.ndarray (C, 4)``  one subject's variation,
    log-normal with each tissue's ``cv`` (times ``scale``), drawn from a ``numpy.random.Generator``.
``FIELD_RANGE``  (min, max) supported field strength in tesla.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

FIELD_RANGE = (0.5, 11.7)
TRUTH_LABELS = {1: "CSF", 2: "GM", 3: "WM"}
# [PG] mean and standard deviation of R1 (1/s) per class at 3T.
GOLD_STANDARD_R1 = {"CSF": (0.240, 0.03), "GM": (0.683, 0.080), "WM": (1.036, 0.080)}


@dataclass(frozen=True)
class TissueProperties:
    pd: float
    t1: float
    t2: float
    t2s: float

    @property
    def r1(self) -> float:
        return 1.0 / self.t1 if self.t1 > 0 else 0.0

    @property
    def r2(self) -> float:
        return 1.0 / self.t2 if self.t2 > 0 else 0.0

    @property
    def r2s(self) -> float:
        return 1.0 / self.t2s if self.t2s > 0 else 0.0

    def as_array(self) -> np.ndarray:
        return np.array([self.pd, self.t1, self.t2, self.t2s], dtype=np.float64)


def _interp(table: dict[float, float], b0: float) -> float:
    """Log-log interpolation in field strength (extrapolating with the end segment)."""
    fields = sorted(table)
    if len(fields) == 1:
        return table[fields[0]]
    i = 0
    while i < len(fields) - 2 and b0 > fields[i + 1]:
        i += 1
    lo, hi = fields[i], fields[i + 1]
    ylo, yhi = math.log(table[lo]), math.log(table[hi])
    w = (math.log(b0) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return math.exp(ylo + w * (yhi - ylo))


@dataclass(frozen=True)
class Tissue:
    name: str
    truth: int
    brain: bool
    pd: float
    t1: dict = field(default_factory=dict)
    t2: dict = field(default_factory=dict)
    t2s: dict = field(default_factory=dict)
    cv: tuple = (0.02, 0.04, 0.04, 0.06)

    def properties(self, field_strength: float) -> TissueProperties:
        b0 = float(field_strength)
        if not FIELD_RANGE[0] <= b0 <= FIELD_RANGE[1]:
            raise ValueError(f"field strength {b0} T outside the supported {FIELD_RANGE[0]}-{FIELD_RANGE[1]} T")
        if self.pd == 0:
            return TissueProperties(0.0, 0.0, 0.0, 0.0)
        return TissueProperties(self.pd, _interp(self.t1, b0), _interp(self.t2, b0), _interp(self.t2s, b0))


def _t(v15: float, v3: float, v7: float) -> dict:
    return {1.5: v15, 3.0: v3, 7.0: v7}


_NONBRAIN_CV = (0.05, 0.06, 0.06, 0.08)

_TISSUE_LIST = [
    Tissue("background", 0, False, 0.0),
    # CSF: T1 3T = 1/0.240 [PG]; 1.5T/7T after [R07] (weakly field dependent); T2, T2* est.
    Tissue("CSF", 1, True, 1.0, _t(4.00, 4.167, 4.425), _t(2.00, 1.60, 1.00), _t(0.40, 0.30, 0.15),
           (0.01, 0.03, 0.05, 0.08)),
    # Ventricular CSF: same water, kept separate so atrophy can enlarge the ventricles.
    Tissue("ventricles", 1, True, 1.0, _t(4.00, 4.167, 4.425), _t(2.00, 1.60, 1.00), _t(0.40, 0.30, 0.15),
           (0.01, 0.03, 0.05, 0.08)),
    # Cortical GM: T1 1.5T [S05] 1.124 s, 3T 1/0.683 [PG], 7T [W08] 1.939 s; T2 [S05] 95/99 ms, 7T [B02];
    # T2* [P07] 84.0/66.0/33.2 ms; PD [N06].
    Tissue("GM", 2, True, 0.80, _t(1.124, 1.464, 1.939), _t(0.095, 0.099, 0.055), _t(0.084, 0.066, 0.0332)),
    # Deep GM (thalamus, basal ganglia): T1 between GM and WM, iron shortens T2/T2* (est.).
    Tissue("deep_GM", 2, True, 0.78, _t(0.98, 1.25, 1.60), _t(0.080, 0.075, 0.045), _t(0.060, 0.040, 0.020)),
    # WM: T1 1.5T [S05] 0.884 s, 3T 1/1.036 [PG], 7T [W08] 1.126 s; T2 [S05] 72/69 ms, 7T [B02];
    # T2* [P07] 66.2/53.2/26.8 ms; PD [N06].
    Tissue("WM", 3, True, 0.70, _t(0.884, 0.965, 1.126), _t(0.072, 0.069, 0.046), _t(0.0662, 0.0532, 0.0268)),
    # White-matter hyperintensity-like lesion: longer T1 and T2, higher water content (est.).
    # Counted as WM in the tissue truth (like FreeSurfer's WM-hypointensities), masked separately.
    Tissue("lesion", 3, True, 0.82, _t(1.15, 1.40, 1.75), _t(0.150, 0.140, 0.090), _t(0.100, 0.080, 0.040),
           (0.04, 0.08, 0.10, 0.10)),
    # Extra-cerebral classes (labels 502-530 of the shared maps and the ICBM152 head).
    # Skin / scalp (est.).
    Tissue("skin", 0, False, 0.75, _t(0.80, 0.95, 1.30), _t(0.045, 0.040, 0.030), _t(0.035, 0.025, 0.015),
           _NONBRAIN_CV),
    # Skeletal muscle: T1 [S05] 1.008/1.412 s, T2 [S05] 44/50 ms; 7T est.
    Tissue("muscle", 0, False, 0.75, _t(1.008, 1.412, 1.70), _t(0.044, 0.050, 0.030), _t(0.030, 0.025, 0.015),
           _NONBRAIN_CV),
    # Fat (subcutaneous, marrow, orbital): T1 [G04] 343/382 ms, T2 [G04] 58/68 ms; 7T est.
    Tissue("fat", 0, False, 0.90, _t(0.343, 0.382, 0.58), _t(0.058, 0.068, 0.050), _t(0.040, 0.030, 0.020),
           _NONBRAIN_CV),
    # Cortical bone: most of its water has T2* < 1 ms, so the PD visible at echo times of milliseconds is
    # tiny (est.); this keeps bone dark also in eq. 2, which has no T2* term.
    Tissue("skull", 0, False, 0.02, _t(0.25, 0.30, 0.40), _t(0.001, 0.001, 0.001), _t(0.0005, 0.0004, 0.0003),
           _NONBRAIN_CV),
    # Vitreous humour: nearly free water, close to CSF (est.).
    Tissue("eye", 0, False, 0.98, _t(3.60, 3.90, 4.20), _t(1.00, 0.90, 0.60), _t(0.25, 0.15, 0.08), _NONBRAIN_CV),
    # Blood (vessels, dural sinuses): T1 [S05] 1.441/1.932 s, 7T [R07] 2.587 s; T2 [S05] 290/275 ms, 7T est.
    Tissue("blood", 0, False, 0.85, _t(1.441, 1.932, 2.587), _t(0.290, 0.275, 0.100), _t(0.100, 0.050, 0.020),
           _NONBRAIN_CV),
    # Spinal cord and optic nerve: white-matter-like, outside the brain mask.
    Tissue("nerve", 0, False, 0.72, _t(0.90, 1.00, 1.20), _t(0.075, 0.072, 0.048), _t(0.060, 0.045, 0.025),
           _NONBRAIN_CV),
    # Nasal cavity and sinuses: mucosa mixed with air (est.).
    Tissue("mucosa", 0, False, 0.30, _t(1.00, 1.20, 1.50), _t(0.080, 0.070, 0.050), _t(0.010, 0.006, 0.003),
           _NONBRAIN_CV),
]

TISSUES = {t.name: t for t in _TISSUE_LIST}
CLASSES = tuple(TISSUES)


def properties(name: str, field_strength: float) -> TissueProperties:
    """Literature properties of tissue ``name`` at ``field_strength`` tesla."""
    try:
        return TISSUES[name].properties(field_strength)
    except KeyError:
        raise ValueError(f"unknown tissue {name!r}; known: {', '.join(CLASSES)}") from None


def property_table(classes, field_strength: float, multipliers: np.ndarray | None = None) -> np.ndarray:
    """(C, 4) array of PD, T1, T2, T2* (s) for ``classes``; ``multipliers`` scale PD, R1, R2, R2*."""
    tab = np.stack([properties(c, field_strength).as_array() for c in classes])
    if multipliers is not None:
        m = np.asarray(multipliers, dtype=np.float64)
        tab[:, 0] *= m[:, 0]
        tab[:, 1:] /= m[:, 1:]  # a rate multiplied by m is a time divided by m
    return tab


def sample_multipliers(classes, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """One subject's multiplicative deviation of PD, R1, R2, R2* per class (log-normal, median 1)."""
    cv = np.array([TISSUES[c].cv for c in classes], dtype=np.float64)
    return np.exp(rng.standard_normal(cv.shape) * cv * scale)
