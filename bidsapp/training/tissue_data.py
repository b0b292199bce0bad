"""The tissue U-Nets' training data: simulated brains, random sequence parameters and patch batches.

Training data are simulated on the fly by the physics engine (``bidsapp.physics``):

* anatomies: the shared FreeSurfer-style label maps (``--anatomy-dir``; ``anat-10``, ``anat-11`` and
  ``anat-12`` are held out for the benchmark, see :data:`HELDOUT`) and nilearn's ICBM152 2009a maps,
  each as the undeformed subject plus ``--deformations`` random smooth deformations with their own
  between-subject tissue-property variation; all at ``--resolution`` mm (box-averaged fractions, so
  partial volume is exact);
* the image of a subject is the static-equation signal of each pure brain tissue mixed by its
  fractions (the brain-masked, bias-corrected T1w the participant workflow hands the model), with a
  residual smooth bias field and Rician noise;
* parameters are drawn per sample (:func:`sample_parameters`): half from the paper's ranges (MPRAGE
  TI 600-1200 ms with TD 600 ms and tau 10 ms; SPGR TR 15-100 ms, TE 4-10 ms, FA 15-75 deg), half
  from wider clinical ranges (MPRAGE inversion TR up to 3 s; SPGR TR 5-100 ms, TE 2-10 ms, FA 5-90 deg);
  field strength 1.5, 3 or 7 T; the optional parameters (B0, MPRAGE inversion TR) are dropped at random;
* labels are the physics gold standard of section 3.1, computed from each subject's 3 T R1 map
  (Gaussian R1 classes), i.e. the same labels whatever sequence the image was simulated with.

Patches are sampled with MONAI (random spatial crop and left-right flip) by :class:`PatchSampler`, whose
random state a checkpoint saves. Everything derives from the seed: the same seed gives the same batches.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bidsapp.devdata import HELDOUT_ANATOMIES, anatomy_dir
from bidsapp.physics.contrast import LOW_CONTRAST, wm_gm_signal_ratio

LOG = logging.getLogger("scanbridge.train.tissue")
HELDOUT = HELDOUT_ANATOMIES
"""Shared label maps never used for training: the benchmark's held-out subjects."""
DEFAULT_ANATOMY_DIR = anatomy_dir()
BRAIN_CLASSES = ("background", "CSF", "ventricles", "GM", "deep_GM", "WM", "lesion")
MPRAGE_TD = 0.6
MPRAGE_TAU = 0.01
ORIENTATIONS = ("native", "RAS")
"""Voxel order of the training brains: each label map's own (``native``; the shared label maps are LIA,
ICBM152 is RAS: the earlier stages), or ``RAS``, the order the participant workflow hands the model
(the stages trained in LIA lose 0.03-0.07 Dice on held-out brains given in RAS; on real scans the
order was not the main error, see docs/notebook/tissue-models.md, "Stage 10")."""
SAMPLING = ("volume", "patch")
"""How :class:`PatchSampler` forms a patch: simulate the whole brain and crop it (the shipped chain), or
simulate only the patch and a sparse sample of the brain (:func:`normalised_patch`; a fifth to a quarter of the
simulation time, an iteration 30-35 % shorter on 2 CPU threads: ``benchmarks/tissue/train_speed.py``)."""
TARGETS = ("gold-standard", "fractions")
"""What a training patch is labelled with: ``gold-standard``, the paper's R1-based probabilities (3.1),
or ``fractions``, the tissue fractions of the label map (partial volume as it is). At 2 mm the R1 gold
standard calls most partial-volume voxels grey (a CSF/WM or GM/WM mixture has a grey-matter R1), so a
network taught it reports GM 13 % above the brain's true GM before any error of its own; fractions
are what a volume measures."""
FLIP_AXES = (0,)
"""Spatial axes flipped at random in training (left-right); inference averages over the same mirrors."""


# ------------------------------------------------------------------------------------------ parameters
def wm_gm_contrast(acq: dict) -> float:
    """WM/GM signal ratio - 1 of a sampled acquisition (:func:`bidsapp.physics.contrast.wm_gm_signal_ratio`)."""
    params = ({"ti": acq["TI"], "td": acq["td"], "tau": acq["tau"]} if acq["family"] == "MPRAGE"
              else {"tr": acq["TR"], "te": acq["TE"], "flip_angle": acq["FA"]})
    return wm_gm_signal_ratio(acq["family"], params, float(acq.get("field", 3.0))) - 1.0


def _spgr_draw(rng: np.random.Generator, paper: bool) -> tuple[float, float, float]:
    if paper:
        return rng.uniform(0.015, 0.1), rng.uniform(0.004, 0.01), rng.uniform(15, 75)
    tr = math.exp(rng.uniform(math.log(0.005), math.log(0.1)))
    return tr, rng.uniform(0.002, min(0.01, 0.8 * tr)), rng.uniform(5, 90)


def _low_contrast_spgr(rng: np.random.Generator, paper: bool, field: float, tries: int = 10000):
    """An SPGR draw from the same range, kept only if its GM/WM contrast is below :data:`LOW_CONTRAST`
    (rejection sampling; the last draw if none qualifies)."""
    for _ in range(tries):
        tr, te, fa = _spgr_draw(rng, paper)
        if abs(wm_gm_contrast({"family": "SPGR", "TR": tr, "TE": te, "FA": fa, "field": field})) < LOW_CONTRAST:
            break
    return tr, te, fa


def sample_parameters(rng: np.random.Generator, n: int, families=("MPRAGE", "SPGR"), paper_only: bool = False,
                      drop_optional: float = 0.25, low_contrast: float = 0.0) -> list[dict]:
    """Random acquisitions: dicts with ``family``, BIDS-unit parameters, ``td``/``tau`` for MPRAGE,
    ``field`` (simulated B0) and ``B0_known`` (whether the vector gets it).

    ``low_contrast``: the probability that an SPGR draw is restricted to settings whose GM/WM contrast is
    below :data:`LOW_CONTRAST` (hard examples: 6 % of plain draws at 3 T, more at 1.5 T). At 0 the random stream is
    the one earlier training stages used, so their commands still reproduce.
    """
    out = []
    for _ in range(n):
        fam = families[rng.integers(len(families))]
        paper = paper_only or rng.random() < 0.5
        b0 = float(rng.choice([1.5, 3.0, 7.0], p=[0.35, 0.45, 0.2]))
        d = {"family": fam, "field": b0, "B0": b0 if rng.random() >= drop_optional else None}
        if fam == "MPRAGE":
            ti = float(rng.uniform(0.6, 1.2))
            if paper:
                td = MPRAGE_TD
            else:
                td = float(rng.uniform(max(0.3, 1.2 - ti), 3.0 - ti - MPRAGE_TAU))
            trinv = ti + td + MPRAGE_TAU
            d.update(TI=ti, td=td, tau=MPRAGE_TAU, TRinv=trinv if rng.random() >= drop_optional else None)
        else:
            if low_contrast and rng.random() < low_contrast:
                tr, te, fa = _low_contrast_spgr(rng, paper, b0)
            else:
                tr, te, fa = _spgr_draw(rng, paper)
            d.update(TR=float(tr), TE=float(te), FA=float(fa))
        out.append(d)
    return out


def parameter_vectors(params: list[dict]) -> np.ndarray:
    from bidsapp.models.tissue import encode_batch

    g = lambda k: [p.get(k) for p in params]  # noqa: E731
    return encode_batch([p["family"] for p in params], TI=g("TI"), TRinv=g("TRinv"), TR=g("TR"), TE=g("TE"),
                        FA=g("FA"), B0=g("B0"))


def vector_statistics(seed: int = 12345, n: int = 20000) -> tuple[np.ndarray, np.ndarray]:
    """Per-slot centre and scale of the training parameter distribution (physics-branch buffers)."""
    v = parameter_vectors(sample_parameters(np.random.default_rng(seed), n))
    centre, scale = v.mean(0), v.std(0)
    scale = np.where(scale < 1e-3, 1.0, scale)
    return centre.astype(np.float32), scale.astype(np.float32)


# ------------------------------------------------------------------------------------------ subjects
@dataclass
class Subject:
    """One simulated brain at training resolution, cropped to its brain."""

    name: str
    fractions: np.ndarray   # (C, X, Y, Z) float16, BRAIN_CLASSES present in ``classes``
    classes: tuple
    multipliers: np.ndarray  # (C, 4)
    mask: np.ndarray        # bool
    target: np.ndarray      # (3, X, Y, Z) float16 gold-standard probabilities CSF/GM/WM
    affine: np.ndarray

    def phantom(self):
        from bidsapp.physics.phantom import Phantom

        return Phantom(self.fractions32(), self.affine, self.classes, self.multipliers)

    def fractions32(self) -> np.ndarray:
        """float32 fractions, converted once (simulation runs every iteration)."""
        f = self.__dict__.get("_f32")
        if f is None:
            f = self.__dict__["_f32"] = self.fractions.astype(np.float32)
        return f

    def log_bias(self, rng: np.random.Generator, pool: int = 4) -> np.ndarray:
        """A unit-s.d. smooth log bias field of the physics engine, drawn from a per-subject pool of
        ``pool`` fields with random sign and flips (generating a new field costs more than a training step).
        The pool depends only on the subject's name, so training stays reproducible from its seed."""
        fields = self.__dict__.get("_bias")
        if fields is None:
            import zlib

            from bidsapp.physics.simulator import random_bias_field

            own = np.random.default_rng(zlib.crc32(self.name.encode()))
            vs = tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))
            fields = self.__dict__["_bias"] = [np.log(random_bias_field(self.mask.shape, own, 1.0, voxel_size=vs))
                                               for _ in range(pool)]
        f = fields[rng.integers(len(fields))] * (1 if rng.random() < 0.5 else -1)
        for ax in range(3):
            if rng.random() < 0.5:
                f = np.flip(f, axis=ax)
        return f

    def fraction_target(self) -> np.ndarray:
        """(3, X, Y, Z) float16 CSF/GM/WM fractions (lesions count as WM), computed once."""
        t = self.__dict__.get("_ft")
        if t is None:
            t = self.__dict__["_ft"] = self.phantom().truth_probseg().astype(np.float16)
        return t

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_f32", "_bias", "_ft")}


def brain_only(ph):
    """The phantom restricted to brain classes (what a brain-masked image contains), cropped to the brain."""
    from bidsapp.physics.phantom import Phantom

    keep = [i for i, c in enumerate(ph.classes) if c in BRAIN_CLASSES]
    frac = ph.fractions[keep].copy()
    frac[0] = np.clip(1.0 - frac[1:].sum(0), 0, 1)
    out = Phantom(frac, ph.affine, tuple(ph.classes[i] for i in keep), ph.multipliers[keep])
    mask = out.brain_mask
    idx = np.argwhere(mask)
    lo, hi = np.maximum(idx.min(0) - 2, 0), np.minimum(idx.max(0) + 3, mask.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    aff = out.affine.copy()
    aff[:3, 3] = out.affine[:3, :3] @ lo + out.affine[:3, 3]
    return Phantom(np.ascontiguousarray(out.fractions[(slice(None),) + sl]), aff, out.classes, out.multipliers)


def make_subjects(anatomy, name: str, rng: np.random.Generator, deformations: int, resolution: float,
                  orientation: str = "native") -> list[Subject]:
    """The undeformed anatomy plus ``deformations`` deformed ones, each with its own tissue variation,
    in their label map's voxel order or reoriented (``orientation``, :data:`ORIENTATIONS`)."""
    from bidsapp.physics import phantom as P

    out = []
    for k in range(deformations + 1):
        ph = P.make_subject(anatomy, rng, deform=k > 0)
        if not np.allclose(ph.voxel_size, resolution):
            ph = ph.resample((resolution,) * 3)
        ph = brain_only(ph)
        if orientation != "native":
            ph = ph.reorient(orientation)
        out.append(Subject(name=f"{name}#{k}", fractions=ph.fractions.astype(np.float16), classes=ph.classes,
                           multipliers=ph.multipliers, mask=ph.brain_mask,
                           target=gold_standard(ph).astype(np.float16), affine=ph.affine))
    return out


def gold_standard(ph) -> np.ndarray:
    """(3, X, Y, Z) physics gold-standard probabilities (paper 3.1) from the subject's 3 T R1 map."""
    from bidsapp.physics.gold_standard import gold_standard_from_phantom

    return gold_standard_from_phantom(ph)[0]


def anatomy_sources(anatomy_dir: Path | None, use_icbm: bool = True, heldout=HELDOUT) -> list[tuple[str, object]]:
    """(name, source) of the training anatomies: label maps not held out, then ICBM152."""
    srcs = []
    if anatomy_dir is not None and Path(anatomy_dir).is_dir():
        for p in sorted(Path(anatomy_dir).glob("anat-*_dseg.nii.gz")):
            name = p.name.split("_")[0]
            if name not in heldout:
                srcs.append((name, p))
    if use_icbm:
        srcs.append(("icbm152", "icbm152"))
    return srcs


def build_subjects(sources, rng, deformations: int, resolution: float, orientation: str = "native") -> list[Subject]:
    from bidsapp.physics import phantom as P

    subjects = []
    for name, src in sources:
        t0 = time.time()
        anat = P.load_anatomy(None if src == "icbm152" else src, resolution=resolution)
        subjects += make_subjects(anat, name, rng, deformations, resolution, orientation)
        LOG.info("anatomy %s: %d subject(s) in %.0f s", name, deformations + 1, time.time() - t0)
    return subjects


# ------------------------------------------------------------------------------------------ images
def tissue_signals(subject: Subject, acq: dict) -> np.ndarray:
    """Signed pure-tissue signals of ``subject``'s classes for acquisition ``acq`` (background 0)."""
    from bidsapp.physics.equations import signal
    from bidsapp.physics.tissues import property_table

    tab = property_table(subject.classes, acq["field"], subject.multipliers)  # (C, 4) PD, T1, T2, T2*
    if acq["family"] == "MPRAGE":
        params = {"ti": acq["TI"], "td": acq["td"], "tau": acq["tau"]}
    else:
        params = {"tr": acq["TR"], "te": acq["TE"], "flip_angle": acq["FA"]}
    sig = np.asarray(signal(acq["family"], tab[:, 0], tab[:, 1], tab[:, 2], tab[:, 3], params, magnitude=False),
                     dtype=np.float64)
    sig[0] = 0.0
    return sig


def simulate(subject: Subject, acq: dict, rng: np.random.Generator, snr: float | None = None,
             bias: float | None = None) -> np.ndarray:
    """Brain-masked T1w image of ``subject`` for acquisition ``acq`` (see :func:`sample_parameters`).

    The physics engine's signed pure-tissue signals are mixed by the tissue fractions (magnitude of
    the sum), then a residual smooth bias field (log-field s.d. 0-8 %: what N4 leaves) and Rician
    noise (SNR 20-120 relative to the mean brain signal at 2 mm, i.e. about 7-40 at 1 mm) are added;
    ``snr``/``bias`` fix them instead (benchmarks).
    """
    from bidsapp.physics.simulator import add_rician_noise, mix_signals

    img = mix_signals(subject.fractions32(), tissue_signals(subject, acq))
    strength = float(rng.uniform(0.0, 0.08)) if bias is None else float(bias)
    if strength > 0:
        img *= np.exp(strength * subject.log_bias(rng))
    sigma = float(img[subject.mask].mean()) / (float(rng.uniform(20, 120)) if snr is None else float(snr))
    return add_rician_noise(img, sigma, rng)


def normalised_sample(subject: Subject, acq: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from bidsapp.models.tissue import normalise

    img = simulate(subject, acq, rng) * subject.mask
    return normalise(img, subject.mask), subject.mask, subject.target


def normalised_patch(subject: Subject, acq: dict, rng: np.random.Generator, region: tuple, stride: int = 2):
    """The ``region`` of :func:`normalised_sample`'s image without simulating the rest of the brain.

    The same draws (bias strength and field, SNR, Rician noise) are made, but the image is formed only
    in ``region`` and on every ``stride``-th voxel of the brain, whose own noisy sample gives the mean
    signal (noise level) and the whole-brain normalisation window; at stride 2 that is an eighth of
    the brain, so percentiles and moments match the full image's to sampling error. A 32^3 patch of a
    2 mm brain costs a fifth to a quarter of the full simulation."""
    from bidsapp.models.tissue import intensity_window, normalise
    from bidsapp.physics.simulator import add_rician_noise, mix_signals

    sig = tissue_signals(subject, acq)
    strength = float(rng.uniform(0.0, 0.08))
    log_bias = subject.log_bias(rng) if strength > 0 else None

    def image(sl):
        img = mix_signals(subject.fractions32()[(slice(None),) + sl], sig)
        if log_bias is not None:
            img *= np.exp(strength * log_bias[sl])
        return img

    sub = (slice(None, None, stride),) * 3
    brain, sample = subject.mask[sub], image(sub)
    sigma = float(sample[brain].mean()) / float(rng.uniform(20, 120))
    window = intensity_window(add_rician_noise(sample, sigma, rng)[brain])
    mask = subject.mask[region]
    return normalise(add_rician_noise(image(region), sigma, rng) * mask, mask, window)


# ------------------------------------------------------------------------------------------ domain randomisation
PROPERTY_SCALE = 2.5
"""Tissue relaxation times and proton density of a randomised sample scatter this many times their
between-subject spread (:func:`bidsapp.physics.tissues.sample_multipliers`), on top of the subject's own."""
RANDOM_CONTRAST_P = 0.25
"""Randomised samples of the no-physics model whose classes get random intensities (SynthSeg's
contrasts: shape, not a sequence, tells the tissues apart)."""
SPIN_ECHO_P = 0.3
"""Randomised samples of the no-physics model acquired as a T1-weighted spin echo (TR 0.35-0.9 s,
TE 8-25 ms: the clinical 2D T1w, whose GM/WM contrast is lower than an MPRAGE's)."""

GM_WM_SQUEEZE_P = 0.5
GM_WM_SQUEEZE = (0.2, 1.0)
"""Half of the randomised physics contrasts have their GM/WM signal difference scaled by a factor in
this range: real clinical T1w (2D spin echo, 1.5 T, older brains) separate GM from WM by half as many
standard deviations of the brain's intensities as the simulated MPRAGE and SPGR do (0.5 against 1.3 on
``clinical-ms``), and a network that never saw such contrast calls most of their WM grey."""


def randomised_signals(subject: Subject, acq: dict, rng: np.random.Generator, physics: bool) -> np.ndarray:
    """Pure-class signals of a domain-randomised sample: ``acq``'s sequence with tissue properties
    scattered :data:`PROPERTY_SCALE` times wider; for the no-physics model also T1-weighted spin echoes
    and random intensities per class (the physics model is told ``acq``, so its contrast must be ``acq``'s)."""
    from bidsapp.physics.equations import signal
    from bidsapp.physics.tissues import property_table, sample_multipliers

    if not physics and rng.random() < RANDOM_CONTRAST_P:
        sig = rng.uniform(0.0, 1.0, len(subject.classes))
        sig[0] = 0.0
        return sig
    mult = subject.multipliers * sample_multipliers(subject.classes, rng, scale=PROPERTY_SCALE)
    tab = property_table(subject.classes, acq["field"], mult)
    if not physics and rng.random() < SPIN_ECHO_P:
        family, params = "TSE", {"tr": rng.uniform(0.35, 0.9), "te": rng.uniform(0.008, 0.025)}
    elif acq["family"] == "MPRAGE":
        family, params = "MPRAGE", {"ti": acq["TI"], "td": acq["td"], "tau": acq["tau"]}
    else:
        family, params = "SPGR", {"tr": acq["TR"], "te": acq["TE"], "flip_angle": acq["FA"]}
    sig = np.asarray(signal(family, tab[:, 0], tab[:, 1], tab[:, 2], tab[:, 3], params, magnitude=False),
                     dtype=np.float64)
    sig[0] = 0.0
    if rng.random() < GM_WM_SQUEEZE_P:
        sig = squeeze_gm_wm(sig, subject.classes, float(rng.uniform(*GM_WM_SQUEEZE)))
    return sig


def squeeze_gm_wm(sig: np.ndarray, classes, factor: float) -> np.ndarray:
    """``sig`` with the brain's non-CSF classes (GM, deep GM, WM, lesion) pulled towards the GM/WM midpoint by
    ``factor`` (1: unchanged): a lower GM/WM contrast, CSF's place untouched."""
    idx = {c: i for i, c in enumerate(classes)}
    if "GM" not in idx or "WM" not in idx:
        return sig
    out = np.asarray(sig, dtype=np.float64).copy()
    mid = 0.5 * (out[idx["GM"]] + out[idx["WM"]])
    for c in ("GM", "deep_GM", "WM", "lesion"):
        if c in idx:
            out[idx[c]] = mid + factor * (out[idx[c]] - mid)
    return out


def randomised_sample(subject: Subject, acq: dict, rng: np.random.Generator, physics: bool = False) -> np.ndarray:
    """A domain-randomised, normalised brain image of ``subject`` (issue: tissue segmentation on real
    scans): :func:`randomised_signals`' contrast, then what scanners and preprocessing do to it and
    :func:`simulate` leaves out: a residual bias field up to 30 % (log s.d.), slices 4 or 6 mm thick
    along a random axis (half the samples), blur (a third), Rician noise at SNR 8-100 and a gamma
    curve (intensity non-linearity). In the manner of SynthSeg: a real scan should look like one more
    sample of this distribution."""
    import torch

    from bidsapp.models.tissue import normalise
    from bidsapp.physics.simulator import add_rician_noise, mix_signals
    from bidsapp.training.augment import gaussian_blur, thick_slices

    img = mix_signals(subject.fractions32(), randomised_signals(subject, acq, rng, physics))
    img = img * np.exp(float(rng.uniform(0.0, 0.3)) * subject.log_bias(rng)).astype(np.float32)
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))
    if rng.random() < 0.5:
        t = thick_slices(t, int(rng.integers(3)), int(rng.choice([2, 3])))
    if rng.random() < 0.3:
        t = gaussian_blur(t, float(rng.uniform(0.3, 1.0)))
    img = t.numpy()
    mean = max(float(img[subject.mask].mean()), 1e-6)
    img = add_rician_noise(img, mean / math.exp(rng.uniform(math.log(8.0), math.log(100.0))), rng)
    img = (img / mean) ** float(math.exp(rng.normal(0.0, 0.25)))
    return normalise(img * subject.mask, subject.mask)


class PatchSampler:
    """Random (image, mask, target, parameter vector) patches, reproducible from one generator."""

    def __init__(self, subjects: list[Subject], patch: int, seed: int, families=("MPRAGE", "SPGR"),
                 paper_only: bool = False, low_contrast: float = 0.0, sampling: str = "volume",
                 randomise: float = 0.0, physics: bool = True, target: str = "gold-standard"):
        from monai.transforms import Compose, RandFlipd, RandSpatialCropd, SpatialPadd

        self.subjects = subjects
        self.patch = patch
        self.sampling = sampling
        self.rng = np.random.default_rng(seed)
        self.families = families
        self.paper_only = paper_only
        self.low_contrast = low_contrast
        self.randomise, self.physics = float(randomise), bool(physics)
        self.target = (lambda s: s.target) if target == "gold-standard" else (lambda s: s.fraction_target())
        keys = ["image", "mask", "target"]
        self.transform = Compose([
            SpatialPadd(keys, spatial_size=(patch,) * 3),
            RandSpatialCropd(keys, roi_size=(patch,) * 3, random_size=False),
            RandFlipd(keys, prob=0.5, spatial_axis=list(FLIP_AXES)),
        ])
        self.transform.set_random_state(seed=seed)

    def _random_states(self) -> list:
        """The transforms' generators, including those of the transforms they wrap (MONAI's dictionary
        crop draws from its inner array crop's)."""
        out: list = []
        for t in self.transform.transforms:
            for obj in (t, *vars(t).values()):
                r = getattr(obj, "R", None)
                if isinstance(r, np.random.RandomState) and not any(r is o for o in out):
                    out.append(r)
        return out

    def state(self) -> dict:
        """Every random state a batch draws from (a checkpoint's, so a resumed run draws what the whole
        run would have)."""
        return {"rng": self.rng.bit_generator.state, "transforms": [r.get_state() for r in self._random_states()]}

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        for r, st in zip(self._random_states(), state["transforms"]):
            r.set_state(st)

    def batch(self, n: int, pairs: bool = False):
        """``n`` patches; with ``pairs``, samples 2k and 2k+1 are the same subject, patch and flip seen with
        two different acquisitions of one sequence family (for the consistency loss)."""
        import torch

        if not pairs:
            acqs = sample_parameters(self.rng, n, self.families, self.paper_only, low_contrast=self.low_contrast)
            groups = [[a] for a in acqs]
        else:
            groups = []
            for _ in range((n + 1) // 2):
                fam = self.families[self.rng.integers(len(self.families))]
                groups.append(sample_parameters(self.rng, 2, (fam,), self.paper_only, low_contrast=self.low_contrast))
        xs, ms, ts, acqs = [], [], [], []
        for group in groups:
            s = self.subjects[self.rng.integers(len(self.subjects))]
            # drawn only when asked for, so that the random stream of earlier (unrandomised) runs is unchanged
            randomised = self.randomise > 0 and self.rng.random() < self.randomise
            if self.sampling == "patch":
                d = self._patch(s, group, randomised)
            else:
                imgs = [randomised_sample(s, acq, self.rng, self.physics) if randomised
                        else normalised_sample(s, acq, self.rng)[0] for acq in group]
                d = self.transform({"image": np.stack(imgs), "mask": s.mask[None].astype(np.float32),
                                    "target": self.target(s)})
            for k, acq in enumerate(group):
                xs.append(torch.as_tensor(np.asarray(d["image"][k:k + 1]), dtype=torch.float32))
                ms.append(torch.as_tensor(np.asarray(d["mask"]), dtype=torch.float32))
                ts.append(torch.as_tensor(np.asarray(d["target"], dtype=np.float32)))
                acqs.append(acq)
        xs, ms, ts, acqs = xs[:n], ms[:n], ts[:n], acqs[:n]
        return torch.stack(xs), torch.stack(ms), torch.stack(ts), torch.from_numpy(parameter_vectors(acqs))

    def _patch(self, s: Subject, group: list[dict], randomised: bool = False) -> dict:
        """``sampling="patch"``: the crop and flip drawn first, then only that patch simulated
        (:func:`normalised_patch`; a ``randomised`` sample is made whole, its slices and blur span the
        brain, and cropped); padded symmetrically where the brain is smaller than the patch."""
        region = tuple(slice(a, a + self.patch) for a in
                       (int(self.rng.integers(max(n - self.patch, 0) + 1)) for n in s.mask.shape))
        flip = self.rng.random() < 0.5
        image = ((lambda acq: randomised_sample(s, acq, self.rng, self.physics)[region]) if randomised
                 else (lambda acq: normalised_patch(s, acq, self.rng, region)))
        d = {"image": np.stack([image(acq) for acq in group]),
             "mask": s.mask[region][None].astype(np.float32),
             "target": self.target(s)[(slice(None),) + region].astype(np.float32)}
        pad = [(0, 0)] + [((self.patch - n) // 2, self.patch - n - (self.patch - n) // 2) for n in d["mask"].shape[1:]]
        for k, v in d.items():
            v = np.pad(v, pad) if any(sum(p) for p in pad) else v
            d[k] = np.ascontiguousarray(np.flip(v, axis=tuple(a + 1 for a in FLIP_AXES))) if flip else v
        return d
