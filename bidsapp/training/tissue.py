"""``scanbridge-train tissue``: train the physics-aware tissue U-Net (or its no-physics ablation).

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

Patches are sampled with MONAI (random spatial crop and left-right flip); the loss is MONAI's soft
Dice plus cross-entropy on the soft gold standard, both inside the brain mask. Everything derives
from ``--seed``: the same command gives the same weights on the same hardware and library versions.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bidsapp.physics.contrast import LOW_CONTRAST, wm_gm_signal_ratio
from bidsapp.devdata import anatomy_dir

LOG = logging.getLogger("scanbridge.train.tissue")

HELDOUT = ("anat-10", "anat-11", "anat-12")
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
TARGETS = ("gold-standard", "fractions")
"""What a training patch is labelled with: ``gold-standard``, the paper's R1-based probabilities (3.1),
or ``fractions``, the tissue fractions of the label map (partial volume as it is). At 2 mm the R1 gold
standard calls most partial-volume voxels grey (a CSF/WM or GM/WM mixture has a grey-matter R1), so a
network taught it reports GM 13 % above the brain's true GM before any error of its own; fractions
are what a volume measures."""
"""How :class:`PatchSampler` forms a patch: simulate the whole brain and crop it (the shipped chain), or
simulate only the patch and a sparse sample of the brain (:func:`normalised_patch`; a fifth to a quarter of the
simulation time, an iteration 30-35 % shorter on 2 CPU threads: ``benchmarks/tissue/train_speed.py``)."""
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


# ------------------------------------------------------------------------------------------ training
TRAINABLE = ("all", "top", "physics", "gated")


@dataclass
class TrainConfig:
    out: str
    seed: int = 0
    physics: bool | str = True
    anatomy_dir: str | None = str(DEFAULT_ANATOMY_DIR)
    icbm: bool = True
    deformations: int = 2
    resolution: float = 2.0
    patch: int = 32
    batch: int = 4
    iterations: int = 1000
    lr: float = 2e-3
    features: tuple = (8, 16, 32, 64)
    device: str = "auto"
    threads: int = 1
    save_every: int = 100
    log_every: int = 25
    time_limit_min: float | None = None
    weights_dir: str | None = None
    cache: str | None = None
    consistency: float = 0.0
    """Weight of the paired consistency loss (0: the paper's training, Dice + CE only)."""
    init_from: str | None = None
    """Folder of weights + cards to continue training from (fine-tuning); None starts from scratch."""
    physics_injection: str = "concat"
    """How the physics channels enter the network (see :mod:`bidsapp.models.unet`)."""
    physics_from_base: bool = False
    """Start the physics network from the ablation in ``init_from`` (``norm_*`` injections only)."""
    stop_after: int | None = None
    """Stop (and save) after this many iterations of an ``iterations``-long schedule: reproduces a
    checkpoint taken part-way through a run."""
    low_contrast: float = 0.0
    """Probability that an SPGR sample is drawn among low GM/WM-contrast settings (see
    :func:`sample_parameters`); 0 = the plain uniform draw."""
    train: str = "all"
    """Which weights train, the rest frozen: ``all``; ``top``, what follows the last skip connection
    (:meth:`UNet3D.top_parameters`: last decoder block, head, physics branch), for both networks alike
    so the ablation gets exactly the same capacity and batches; ``physics``, only the physics branch
    and its injection (:meth:`UNet3D.physics_parameters`), a physics model only: it recalibrates how
    the parameters move the output and leaves everything the ablation shares as it was; ``gated``, only
    the conditioning that ``physics_trunk_gate``'s family alone uses (:meth:`UNet3D.gated_parameters`),
    so the other family's output stays exactly as it was."""
    volume_consistency: float = 0.0
    """Weight of :func:`bidsapp.training.losses.volume_consistency_loss` (0: the paper's loss)."""
    physics_trunk_gate: str | None = None
    """A 0/1 slot of the parameter vector (e.g. ``family_SPGR``) that switches ``norm_film_all``'s
    conditioning before the last decoder block on (:class:`~bidsapp.models.unet.UNet3D` ``trunk_gate``)."""
    sampling: str = "volume"
    """How patches are simulated (:data:`SAMPLING`): the whole brain then cropped, or only the patch
    (:func:`normalised_patch`)."""
    orientation: str = "native"
    """Voxel order of the training brains (:data:`ORIENTATIONS`); ``native`` reproduces earlier stages."""
    randomise: float = 0.0
    """Probability that a sample is domain-randomised (:func:`randomised_sample`); 0 = the physics
    simulation alone, as the earlier stages trained."""
    target: str = "gold-standard"
    """What patches are labelled with (:data:`TARGETS`); ``gold-standard`` reproduces stages 1-10."""
    dice_weight: float = 1.0
    """Weight of the soft Dice term beside the cross-entropy. Cross-entropy alone is minimised by the
    target itself, so with ``fractions`` targets its probabilities sum to unbiased volumes; soft Dice
    pushes partial-volume voxels to 0 or 1 (stages 1-10: 1)."""
    physics_lr: float | None = None
    """Peak learning rate of the physics branch and its injections (None: ``lr``). Zero-initialised
    gains and shifts continued at a trunk's fine-tuning rate hardly move (``norm_film`` from stage 9:
    largest gain weight 0.026 after 3000 iterations). With ``physics_trunk_gate``, only the gated
    conditioning gets it (:func:`parameter_groups`)."""

    @property
    def paired(self) -> bool:
        """Batches of paired acquisitions (what the consistency losses compare)."""
        return self.consistency > 0 or self.volume_consistency > 0

    def __post_init__(self):
        if not 0.0 <= self.low_contrast <= 1.0:
            raise ValueError(f"--low-contrast must be between 0 and 1, got {self.low_contrast:g}")
        if self.physics_from_base and not (self.init_from and self.physics_injection != "concat"):
            raise ValueError("--physics-from-base needs --init-from and a --physics-injection other than concat")
        if self.train not in TRAINABLE:
            raise ValueError(f"--train must be one of {', '.join(TRAINABLE)}, not {self.train!r}")
        if self.train != "all" and not self.init_from:
            raise ValueError(f"--train {self.train} needs --init-from (the frozen part must come from trained weights)")
        if self.train in ("physics", "gated") and self.physics is not True:
            raise ValueError(f"--train {self.train} trains only physics-model weights: use it with --physics "
                             "(the ablation has no branch)")
        if self.consistency < 0 or self.volume_consistency < 0:
            raise ValueError("--consistency and --volume-consistency must be >= 0")
        if self.train == "gated" and not self.physics_trunk_gate:
            raise ValueError("--train gated trains the gated trunk conditioning: use it with --physics-trunk-gate")
        if self.physics_trunk_gate is not None and self.physics_injection != "norm_film_all":
            raise ValueError("--physics-trunk-gate needs --physics-injection norm_film_all")
        if self.sampling not in SAMPLING:
            raise ValueError(f"--sampling must be one of {', '.join(SAMPLING)}, not {self.sampling!r}")
        if self.orientation not in ORIENTATIONS:
            raise ValueError(f"--orientation must be one of {', '.join(ORIENTATIONS)}, not {self.orientation!r}")
        if not 0.0 <= self.randomise <= 1.0:
            raise ValueError(f"--randomise must be between 0 and 1, got {self.randomise:g}")
        if self.target not in TARGETS:
            raise ValueError(f"--target must be one of {', '.join(TARGETS)}, not {self.target!r}")
        if self.dice_weight < 0:
            raise ValueError(f"--dice-weight must be >= 0, got {self.dice_weight:g}")
        if self.physics_lr is not None and not self.physics_lr > 0:
            raise ValueError(f"--physics-lr must be positive, got {self.physics_lr:g}")


def _model_name(physics: bool) -> str:
    from bidsapp.models.tissue import BASE_MODEL, PHYSICS_MODEL

    return PHYSICS_MODEL if physics else BASE_MODEL


def load_or_build_subjects(cfg: TrainConfig) -> list[Subject]:
    import pickle

    sources = anatomy_sources(Path(cfg.anatomy_dir) if cfg.anatomy_dir else None, cfg.icbm)
    if not sources:
        raise SystemExit("scanbridge-train tissue: no training anatomies (give --anatomy-dir or keep ICBM152)")
    key = (f"subjects_seed{cfg.seed}_def{cfg.deformations}_res{cfg.resolution:g}"
           f"{'' if cfg.orientation == 'native' else '_' + cfg.orientation}_{'-'.join(n for n, _ in sources)}.pkl")
    path = Path(cfg.cache) / key if cfg.cache else None
    if path is not None and path.is_file():
        LOG.info("subjects from cache %s", path)
        with open(path, "rb") as fh:
            return pickle.load(fh)
    rng = np.random.default_rng([cfg.seed, 1])
    subjects = build_subjects(sources, rng, cfg.deformations, cfg.resolution, cfg.orientation)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as fh:
            pickle.dump(subjects, fh, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    return subjects


def build_network(cfg: TrainConfig, seed: int, physics: bool):
    import torch

    from bidsapp.models.tissue import CLASSES, N_PARAMS, PARAMETER_LAYOUT
    from bidsapp.models.unet import UNet3D

    torch.manual_seed(seed)
    gate = PARAMETER_LAYOUT.index(cfg.physics_trunk_gate) if physics and cfg.physics_trunk_gate else None
    net = UNet3D(in_channels=1, out_channels=len(CLASSES), features=tuple(cfg.features),
                 n_params=N_PARAMS if physics else 0,
                 physics_injection=cfg.physics_injection if physics else "concat", trunk_gate=gate)
    if net.physics is not None:
        centre, scale = vector_statistics()
        net.physics.center.copy_(torch.from_numpy(centre))
        net.physics.scale.copy_(torch.from_numpy(scale))
    return net


def lr_schedule(iterations: int):
    """Linear warm-up over 5 % of the iterations (at most 50), then cosine decay to 5 % of the peak."""
    warm = max(1, min(50, iterations // 20))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, iterations - warm))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

    return factor


def parameter_groups(net, cfg: TrainConfig) -> list[dict]:
    """The trainable weights, the physics branch and injections in their own group at ``physics_lr``.

    With a trunk gate only the gated conditioning (every block's but the last decoder block's) gets
    ``physics_lr``: the branch and the last block's injection serve every family and keep ``lr``."""
    trainable = [prm for prm in net.parameters() if prm.requires_grad]
    if cfg.physics_lr is None or not net.uses_physics:
        return [{"params": trainable}]
    fast = net.gated_parameters() if net.trunk_gate is not None else net.physics_parameters()
    physics = {id(prm) for prm in fast}
    groups = [{"params": [prm for prm in trainable if id(prm) not in physics]},
              {"params": [prm for prm in trainable if id(prm) in physics], "lr": cfg.physics_lr}]
    return [g for g in groups if g["params"]]


def train(cfg: TrainConfig, subjects: list[Subject] | None = None, progress=None) -> list[dict]:
    """Train the model(s) of ``cfg.physics`` (True, False or "both") on identical batches.

    Returns one history dict per model (``model``, ``physics``, ``step``, ``loss``, ``seconds``,
    ``iterations``, ``n_subjects``); "both" gives the physics model and its ablation the same seed,
    the same batches and the same number of iterations.
    """
    import torch

    from bidsapp.devices import resolve_device
    from bidsapp.training.losses import MaskedDiceCE, consistency_loss, volume_consistency_loss

    torch.set_num_threads(max(1, int(cfg.threads)))
    device = resolve_device(cfg.device)
    subjects = subjects if subjects is not None else load_or_build_subjects(cfg)
    variants = [True, False] if cfg.physics == "both" else [bool(cfg.physics)]
    runs = []
    for phys in variants:
        net = build_network(cfg, cfg.seed, phys)
        init = None
        if cfg.init_from:
            from bidsapp.models import registry

            from_base = phys and cfg.physics_from_base
            state, card0 = registry.load_state_dict(_model_name(False if from_base else phys), cfg.init_from)
            zeroed = net.load_weights(state, ablation=from_base)  # new injection weights start at zero
            init = {"name": card0["name"], "sha256": card0["sha256"], "command": card0["training"]["command"],
                    "iterations": card0["training"].get("iterations_run"),
                    "as": ("ablation weights + zero-initialised physics injection" if from_base
                           else f"same model, zero-initialised {', '.join(zeroed)}" if zeroed else "same model")}
        net = net.to(device)
        if cfg.train != "all":
            net.requires_grad_(False)
            for prm in {"top": net.top_parameters, "physics": net.physics_parameters,
                        "gated": net.gated_parameters}[cfg.train]():
                prm.requires_grad_(True)
        opt = torch.optim.AdamW(parameter_groups(net, cfg), lr=cfg.lr, weight_decay=1e-5)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(cfg.iterations))
        runs.append({"model": net, "opt": opt, "sched": sched, "physics": phys, "init": init, "step": [], "loss": [],
                     "running": [], "seconds": 0.0, "iterations": 0, "n_subjects": len(subjects)})
    sampler = PatchSampler(subjects, cfg.patch, seed=cfg.seed, low_contrast=cfg.low_contrast, sampling=cfg.sampling,
                           randomise=cfg.randomise, physics=cfg.physics is not False, target=cfg.target)
    loss_fn = MaskedDiceCE(dice_weight=cfg.dice_weight)
    t0 = time.time()
    for it in range(1, cfg.iterations + 1):
        x, m, y, p = (t.to(device) for t in sampler.batch(cfg.batch, pairs=cfg.paired))
        for r in runs:
            net = r["model"].train()
            logits = net(x, p if net.uses_physics else None)
            loss = loss_fn(logits, y, m)
            if cfg.consistency > 0:
                loss = loss + cfg.consistency * consistency_loss(logits, m)
            if cfg.volume_consistency > 0:
                loss = loss + cfg.volume_consistency * volume_consistency_loss(logits, m)
            r["opt"].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            r["opt"].step()
            r["sched"].step()
            r["running"].append(float(loss.detach()))
            r["iterations"] = it
        if it % cfg.log_every == 0 or it == cfg.iterations:
            for r in runs:
                r["step"].append(it)
                r["loss"].append(float(np.mean(r["running"])))
                r["running"] = []
            LOG.info("iter %d loss %s (%.0f s)", it,
                     " / ".join(f"{'physics' if r['physics'] else 'base'} {r['loss'][-1]:.4f}" for r in runs),
                     time.time() - t0)
            if progress:
                progress(it, [r["loss"][-1] for r in runs])
        stop = bool(cfg.time_limit_min and time.time() - t0 > cfg.time_limit_min * 60)
        if cfg.stop_after and it >= cfg.stop_after and it < cfg.iterations:
            LOG.info("stopping after %d of %d scheduled iterations (--stop-after)", it, cfg.iterations)
            break
        if cfg.save_every and it % cfg.save_every == 0 and it < cfg.iterations and not stop:
            for r in runs:
                r["seconds"] = time.time() - t0
                save(r["model"], cfg, r, final=False)
        if stop:
            LOG.warning("time limit of %.0f min reached after %d iterations", cfg.time_limit_min, it)
            break
    for r in runs:
        r["seconds"] = time.time() - t0
        for k in ("opt", "sched", "running"):
            r.pop(k)
    return runs


def command_line(cfg: TrainConfig) -> str:
    flag = {"both": "--both", True: "--physics", False: "--no-physics"}[cfg.physics]
    parts = ["scanbridge-train tissue", f"--out {cfg.out}", f"--seed {cfg.seed}", flag,
             f"--iterations {cfg.iterations}",
             f"--deformations {cfg.deformations}", f"--resolution {cfg.resolution:g}", f"--patch {cfg.patch}",
             f"--batch {cfg.batch}", f"--lr {cfg.lr:g}", f"--features {','.join(map(str, cfg.features))}"]
    if cfg.anatomy_dir:
        parts.append(f"--anatomy-dir {cfg.anatomy_dir}")
    if not cfg.icbm:
        parts.append("--no-icbm")
    if cfg.time_limit_min:
        parts.append(f"--time-limit-min {cfg.time_limit_min:g}")
    if cfg.consistency:
        parts.append(f"--consistency {cfg.consistency:g}")
    if cfg.physics_injection != "concat":
        parts.append(f"--physics-injection {cfg.physics_injection}")
    if cfg.physics_from_base:
        parts.append("--physics-from-base")
    if cfg.stop_after:
        parts.append(f"--stop-after {cfg.stop_after}")
    if cfg.low_contrast:
        parts.append(f"--low-contrast {cfg.low_contrast:g}")
    if cfg.train != "all":
        parts.append(f"--train {cfg.train}")
    if cfg.volume_consistency:
        parts.append(f"--volume-consistency {cfg.volume_consistency:g}")
    if cfg.physics_lr is not None:
        parts.append(f"--physics-lr {cfg.physics_lr:g}")
    if cfg.physics_trunk_gate:
        parts.append(f"--physics-trunk-gate {cfg.physics_trunk_gate}")
    if cfg.sampling != "volume":
        parts.append(f"--sampling {cfg.sampling}")
    if cfg.randomise:
        parts.append(f"--randomise {cfg.randomise:g}")
    if cfg.orientation != "native":
        parts.append(f"--orientation {cfg.orientation}")
    if cfg.target != "gold-standard":
        parts.append(f"--target {cfg.target}")
    if cfg.dice_weight != 1.0:
        parts.append(f"--dice-weight {cfg.dice_weight:g}")
    if cfg.init_from:
        parts.append(f"--init-from {cfg.init_from}")
    return " ".join(parts)


def save(net, cfg: TrainConfig, history: dict, final: bool = True) -> dict:
    import torch

    from bidsapp import __version__
    from bidsapp.models import registry
    from bidsapp.models.tissue import CLASSES, PARAMETER_LAYOUT, TRAINING_RANGES

    physics = net.uses_physics
    name = _model_name(physics)
    fast = "gated trunk conditioning" if cfg.physics_trunk_gate else "physics branch and injections"  # physics_lr's
    sources = anatomy_sources(Path(cfg.anatomy_dir) if cfg.anatomy_dir else None, cfg.icbm)
    card = {
        "version": __version__,
        "description": ("3D U-Net for CSF/GM/WM of a brain-masked, bias-corrected T1w "
                        + ("with the physics branch (two FC layers of 10 units on the sequence-parameter vector, "
                           "broadcast as channels after the last skip connection; paper section 2.3)"
                           if physics else "without the physics branch (the paper's ablation and the fallback)")),
        "architecture": {"class": "UNet3D", "kwargs": net.config},
        "classes": list(CLASSES),
        "resolution_mm": cfg.resolution,
        "inference_roi": cfg.patch,
        "inference_overlap": 0.25,
        "inference_mirror_axes": list(FLIP_AXES),
        "parameter_layout": list(PARAMETER_LAYOUT) if physics else [],
        "training_ranges": TRAINING_RANGES,
        "training": {
            "command": command_line(cfg),
            "seed": cfg.seed,
            "data": ("simulated on the fly by bidsapp.physics: static-equation MPRAGE/SPGR images of brain tissue "
                     "fractions, residual bias and Rician noise; labels = "
                     + ("physics gold standard from the 3 T R1 map" if cfg.target == "gold-standard"
                        else "the label map's CSF/GM/WM fractions (partial volume kept)")
                     + ("; only each patch simulated, normalised by statistics of a one-in-eight voxel sample of the "
                        "brain" if cfg.sampling == "patch" else "")
                     + (f"; {cfg.randomise:.0%} of the samples domain-randomised (tissue properties {PROPERTY_SCALE:g}x "
                        f"their between-subject spread, half of them with the GM/WM contrast scaled by "
                        f"{GM_WM_SQUEEZE[0]:g}-{GM_WM_SQUEEZE[1]:g}, 4-6 mm slices, blur, bias up to 30 %, SNR 8-100, gamma"
                        + ("" if cfg.physics is not False else
                           f"; {RANDOM_CONTRAST_P:.0%} of them random intensities per class, "
                           f"{SPIN_ECHO_P:.0%} of the rest T1-weighted spin echo") + ")" if cfg.randomise else "")),
            "anatomies": [n for n, _ in sources],
            "heldout_anatomies": list(HELDOUT),
            "subjects": history["n_subjects"],
            "deformations_per_anatomy": cfg.deformations,
            "iterations_planned": cfg.iterations,
            "iterations_run": history["iterations"],
            "batch": cfg.batch,
            "patch_voxels": cfg.patch,
            "optimizer": f"AdamW lr {cfg.lr:g}"
                         + (f" ({fast} {cfg.physics_lr:g})" if cfg.physics_lr is not None and physics else "")
                         + ", linear warm-up then cosine decay"
                         + {"all": "",
                            "top": " (last decoder block, head and physics branch only; the rest frozen)",
                            "physics": " (physics branch and its injection only; the rest frozen)",
                            "gated": " (the gated trunk conditioning only; the rest frozen)"}[cfg.train],
            "loss": ("MONAI soft Dice + soft cross-entropy" if cfg.dice_weight == 1.0 else
                     f"soft cross-entropy + {cfg.dice_weight:g} x MONAI soft Dice" if cfg.dice_weight else
                     "soft cross-entropy") + " inside the brain mask"
                    + (f" + {cfg.consistency:g} x mean squared softmax difference between two acquisitions of the "
                       "same patch (consistency; not in the paper)" if cfg.consistency else "")
                    + (f" + {cfg.volume_consistency:g} x relative soft-volume difference per class between the two "
                       "acquisitions of a patch (volume consistency; not in the paper)" if cfg.volume_consistency else ""),
            "seconds": round(history["seconds"], 1),
            "device": str(next(net.parameters()).device),
            "threads": cfg.threads,
            "host": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine()},
            "final_loss": history["loss"][-1] if history["loss"] else None,
            "init_from": history.get("init"),
            "retrain_shipped": "bash scripts/train-tissue.sh ANATOMY_DIR OUT_DIR (every stage of the shipped weights)",
            "cpu_run": ("bash scripts/train-tissue.sh ANATOMY_DIR OUT_DIR --no-ablation --sampling patch --threads 2 "
                        "(every stage of the shipped physics model, simulating only each patch: 76 min measured on "
                        "2 CPU threads; figures in docs/notebook/tissue-models.md)"),
            "short_cpu_run": ("bash scripts/train-tissue.sh ANATOMY_DIR OUT_DIR --short --threads 2 "
                              "(two stages that fit two hours on 2 CPU threads; figures in "
                              "docs/notebook/tissue-models.md)"),
            "longer_run": ("scanbridge-train tissue --out runs/tissue --seed 0 --both --iterations 20000 --patch 64 "
                           "--batch 4 --features 16,32,64,128 --device cuda --weights-dir runs/tissue/weights "
                           "(then copy the .pt/.json pairs into bidsapp/models/weights/)"),
            "complete": final,
        },
        "metrics": {},
        "limitations": [
            "trained on simulated images only (static equations, no motion, no real-scanner artefacts)",
            "works at 2 mm: inputs are box-averaged to 2 mm and probabilities interpolated back",
            "short CPU training budget; retrain with more iterations on a GPU for better accuracy",
        ],
    }
    old = None
    try:
        old = registry.load_card(name, cfg.weights_dir)
    except (registry.ModelNotFoundError, registry.WeightsIntegrityError):
        pass
    if old and final and old.get("training", {}).get("command") == card["training"]["command"]:
        card["metrics"] = old.get("metrics", {})
    return registry.save_model(name, net.state_dict(), card, weights_dir=cfg.weights_dir)


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    from bidsapp.models.unet import INJECTIONS

    p.add_argument("--out", required=True, help="folder for the training log (and cached subjects)")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--physics", dest="physics", action="store_const", const=True, default=True,
                   help="train the physics-aware model (default)")
    g.add_argument("--no-physics", dest="physics", action="store_const", const=False,
                   help="train the no-physics ablation")
    g.add_argument("--both", dest="physics", action="store_const", const="both",
                   help="train both on identical batches (same seed, data and budget)")
    p.add_argument("--anatomy-dir", default=str(DEFAULT_ANATOMY_DIR),
                   help=f"shared label maps (anat-XX_dseg.nii.gz); {', '.join(HELDOUT)} are held out")
    p.add_argument("--no-icbm", dest="icbm", action="store_false", help="do not use nilearn's ICBM152 anatomy")
    p.add_argument("--deformations", type=int, default=2, help="random deformations per anatomy")
    p.add_argument("--resolution", type=float, default=2.0, help="training/inference resolution in mm")
    p.add_argument("--patch", type=int, default=32, help="patch edge in voxels")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--features", default="8,16,32,64", help="channels per U-Net level")
    p.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    p.add_argument("--time-limit-min", type=float, default=None, help="stop (and save) after this many minutes")
    p.add_argument("--weights-dir", default=None, help="where to write weights + card (default: the package)")
    p.add_argument("--cache", default=None, help="folder to cache simulated subjects between runs")
    p.add_argument("--consistency", type=float, default=0.0,
                   help="weight of a paired consistency loss (same patch, two acquisitions); 0 = paper's loss")
    p.add_argument("--init-from", default=None,
                   help="continue from the weights + cards in this folder (e.g. bidsapp/models/weights)")
    p.add_argument("--physics-injection", default="concat", choices=INJECTIONS,
                   help="how the physics channels enter the network (see bidsapp.models.unet)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many iterations of the --iterations schedule (reproduces a checkpoint)")
    p.add_argument("--low-contrast", type=float, default=0.0, metavar="P",
                   help=f"probability that an SPGR sample is drawn among settings with GM/WM contrast below "
                        f"{LOW_CONTRAST:g} (hard examples; 0 = plain uniform draws)")
    p.add_argument("--train", default="all", choices=TRAINABLE,
                   help="which weights train, the rest frozen (needs --init-from): top = last decoder block, head "
                        "and physics branch of each network; physics = the physics branch alone (--physics only); "
                        "gated = the --physics-trunk-gate conditioning alone (--physics only)")
    p.add_argument("--volume-consistency", type=float, default=0.0, metavar="W",
                   help="weight of a paired volume-consistency loss (same patch, two acquisitions: relative "
                        "difference of each class's soft volume); 0 = the paper's loss")
    p.add_argument("--physics-trunk-gate", default=None, choices=("family_SPGR", "family_MPRAGE"), metavar="SLOT",
                   help="with --physics-injection norm_film_all: condition the blocks before the last decoder "
                        "block only for this sequence family (family_SPGR or family_MPRAGE)")
    p.add_argument("--physics-lr", type=float, default=None, metavar="LR",
                   help="peak learning rate of the physics branch and its injections, or with "
                        "--physics-trunk-gate of the gated trunk conditioning only (default: --lr)")
    p.add_argument("--sampling", default="volume", choices=SAMPLING,
                   help="volume: simulate each training brain whole, then crop the patch (the shipped chain); "
                        "patch: simulate only the patch and a one-in-eight voxel sample of the brain for the "
                        "noise level and normalisation (same distribution, a quarter or less of the simulation time)")
    p.add_argument("--orientation", default="native", choices=ORIENTATIONS,
                   help="voxel order of the training brains: native (each label map's own; earlier stages) or RAS "
                        "(the order the participant workflow gives the model)")
    p.add_argument("--randomise", type=float, default=0.0, metavar="P",
                   help="probability that a sample is domain-randomised (wider tissue properties, thick slices, "
                        "blur, strong bias, low SNR, gamma; for --no-physics also spin-echo and random contrasts): "
                        "what makes real scans look like training data; 0 = the physics simulation alone")
    p.add_argument("--target", default="gold-standard", choices=TARGETS,
                   help="what patches are labelled with: gold-standard (the paper's R1-based probabilities; "
                        "stages 1-10) or fractions (the label map's tissue fractions: unbiased volumes)")
    p.add_argument("--dice-weight", type=float, default=1.0, metavar="W",
                   help="weight of the soft Dice term beside the cross-entropy (0: cross-entropy alone, "
                        "whose probabilities are calibrated to the targets)")
    p.add_argument("--physics-from-base", action="store_true",
                   help="start the physics model from the ablation in --init-from, physics injection at zero "
                        "(needs a --physics-injection other than concat)")


def config_from_args(args) -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``scanbridge-train tissue`` arguments (a card's ``command``
    parsed with :func:`add_arguments` gives that run's recipe); ValueError for an invalid one."""
    return TrainConfig(out=args.out, seed=args.seed, physics=args.physics, anatomy_dir=args.anatomy_dir,
                       icbm=args.icbm, deformations=args.deformations, resolution=args.resolution, patch=args.patch,
                       batch=args.batch, iterations=args.iterations, lr=args.lr,
                       features=tuple(int(x) for x in str(args.features).split(",")), device=args.device,
                       threads=args.threads, time_limit_min=args.time_limit_min, weights_dir=args.weights_dir,
                       cache=args.cache or str(Path(args.out) / "cache"), init_from=args.init_from,
                       consistency=args.consistency, physics_injection=args.physics_injection,
                       physics_from_base=args.physics_from_base, stop_after=args.stop_after,
                       low_contrast=args.low_contrast, train=args.train,
                       volume_consistency=args.volume_consistency, physics_lr=args.physics_lr,
                       physics_trunk_gate=args.physics_trunk_gate, sampling=args.sampling,
                       randomise=args.randomise, orientation=args.orientation, target=args.target,
                       dice_weight=args.dice_weight)


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"scanbridge-train tissue: {exc}", file=sys.stderr)
        return 2
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for run_ in train(cfg):
        net = run_.pop("model")
        card = save(net, cfg, run_, final=True)
        log = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
               "history": run_, "card": card}
        (out / f"{card['name']}_training.json").write_text(json.dumps(log, indent=2))
        print(f"scanbridge-train tissue: wrote {card['name']} (sha256 {card['sha256'][:12]}) after "
              f"{run_['iterations']} iterations in {run_['seconds'] / 60:.1f} min")
    return 0
