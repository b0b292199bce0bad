"""``scanbridge-train lesion``: the scanner-invariant MS lesion U-Net, trained on simulated scanners.

The paper treats each site as a domain; scanbridge's physics engine makes as many sites as wanted. A run
draws ``--scanners`` simulated scanners from ``--seed`` (:func:`make_scanners`: field strength, a
sequence and its parameters per contrast, 1 mm 3D or 2D thick slices along an axis, noise, bias), and
every training patch comes from one of them; the scanner's index is the domain the regularisation
network predicts. Heads are the label maps of ``--anatomy-dir`` (``anat-10``..``anat-12`` held out)
with MS lesions placed by :mod:`bidsapp.physics.lesions`: periventricular, deep white matter,
juxtacortical and infratentorial (brainstem, cerebellar white matter), 3 mm^3 to confluent, each with
its own T1/T2/PD so that some are black holes on T1w and all are bright on FLAIR/T2w/PDw.

Per sample (:class:`LesionSynth`): a lesion kind and its centre, a box of the head around it with 0-7
more lesions, the class fractions turned into each contrast's signal by the scanner's sequences
(tissue properties varied per subject), a rotation/scale/flip, then per contrast a bias field, the
scanner's slice thickness, Rician noise, the mean-in-brain scaling of
:func:`bidsapp.models.lesion.normalise` and masking by a perturbed brain mask. Random contrast
dropout keeps FLAIR, T2w or PDw and drops the others at random, so the model runs on what a session
has. Targets: the lesion fraction, and the context maps (ventricles, cortex, infratentorial).
``--lesion-contrast graded`` shows each lesion with part of its contrast, fading toward its edge, and
``--lesion-load wide`` gives a third of the patches a heavy load: real clinical lesions are fainter and
loads heavier than full-contrast simulated ones (the shipped model's second stage uses both).

Loss: soft Dice (+ context terms) + lambda * the auxiliary domain loss (``--domain-loss``
none/pc/rand/du; lambda defaults to the paper's); ``--dropout`` > 0 is the paper's BDM. Adam
(lr 1e-4 in the paper; here 1e-3 with a cosine schedule, the budget being ~50x smaller), a checkpoint
every ``--checkpoint-every`` iterations that resumes exactly.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bidsapp.devdata import HELDOUT_ANATOMIES, anatomy_dir
from bidsapp.training.engine import add_run_arguments, precision_field, run_command, run_facts
from bidsapp.training.augment import rotation, thick_slices
from bidsapp.training.config import stage_commands
from bidsapp.training.config import command_line as config_command_line
from bidsapp.training.loss_names import DOMAIN_LAMBDA, DOMAIN_LOSSES, LESION_LOSSES

LOG = logging.getLogger("scanbridge.train.lesion")

HELDOUT = HELDOUT_ANATOMIES
VENTRICLES = (4, 43, 5, 44, 14)
CORTEX = (3, 42)
INFRATENTORIAL = (7, 8, 46, 47, 16, 15)
INFRATENTORIAL_WM = (7, 46, 16)
CEREBRAL_WM = (2, 41)
KIND_P = {"periventricular": 0.35, "deep": 0.3, "juxtacortical": 0.2, "infratentorial": 0.15}
LESION_CONTRASTS = ("full", "graded", "mixed")
"""``full``: every lesion shows the lesion class's whole contrast up to its edge; ``graded``: each shows
0.3-1 of it at its centre, fading to half of that or more at its edge
(:func:`bidsapp.physics.lesions.draw_contrast`), as on clinical scans; ``mixed``: each patch one or the
other, half each (a network trained on graded lesions alone draws bright, sharp ones too large)."""
LESION_LOADS = ("typical", "wide")
"""Lesions per training box: ``typical`` (a lesion, 0-7 more, a fifth of them confluent) or ``wide``
(a third of the boxes a heavy load, as in advanced MS or confluent small-vessel disease)."""


# ------------------------------------------------------------------------------------------ scanners
@dataclass
class Scanner:
    """One simulated site: the domain of the samples it makes."""

    field_strength: float
    sequences: dict   # contrast -> (equation family, parameters)
    slices: dict      # contrast -> (axis, thickness mm); thickness 1 = 3D
    snr: dict         # contrast -> SNR of the brain
    bias: float

    def describe(self) -> str:
        parts = [f"{self.field_strength:.1f}T"]
        for c, (fam, _) in self.sequences.items():
            ax, th = self.slices[c]
            parts.append(f"{c}:{fam}{'' if th <= 1 else f'/{th:.1f}mm'}")
        return " ".join(parts)


def flair_null_ti(tr: float, t1_csf: float) -> float:
    """Inversion time that nulls CSF at repetition time ``tr``: TI = T1 ln(2 / (1 + exp(-TR/T1)))."""
    return t1_csf * math.log(2.0 / (1.0 + math.exp(-tr / t1_csf)))


def make_scanners(n: int, rng: np.random.Generator) -> list[Scanner]:
    """``n`` random scanners: 1.5/3 T (some 1 T and 7 T), T1w as SPGR, MPRAGE or spin echo, FLAIR with
    CSF nulled (TI within -10/+8 % of the null), T2w and PDw turbo spin echo; each contrast 1 mm 3D or
    2D slices of 3-6 mm (axial mostly)."""
    from bidsapp.physics.tissues import properties

    out = []
    for _ in range(int(n)):
        b0 = float(rng.choice([1.0, 1.5, 3.0, 7.0], p=[0.05, 0.45, 0.45, 0.05]) * rng.uniform(0.97, 1.03))
        t1_csf = properties("CSF", b0).t1
        fam = rng.choice(["SPGR", "MPRAGE", "SE"], p=[0.3, 0.4, 0.3])
        if fam == "SPGR":
            tr = rng.uniform(0.006, 0.03)
            t1w = ("SPGR", {"tr": tr, "te": rng.uniform(0.002, min(0.006, 0.5 * tr)), "flip_angle": rng.uniform(10, 40)})
        elif fam == "MPRAGE":
            t1w = ("MPRAGE", {"ti": rng.uniform(0.7, 1.2), "td": rng.uniform(0.3, 1.2), "tau": 0.01})
        else:
            t1w = ("TSE", {"tr": rng.uniform(0.4, 0.8), "te": rng.uniform(0.008, 0.02)})
        tr = rng.uniform(6.0, 11.0)
        flair = ("FLAIR", {"tr": tr, "te": rng.uniform(0.08, 0.14),
                           "ti": flair_null_ti(tr, t1_csf) * rng.uniform(0.9, 1.08)})
        t2w = ("TSE", {"tr": rng.uniform(2.5, 8.0), "te": rng.uniform(0.08, 0.12)})
        pdw = ("TSE", {"tr": rng.uniform(2.0, 4.0), "te": rng.uniform(0.01, 0.03)})
        seqs = {"FLAIR": flair, "T1w": t1w, "T2w": t2w, "PDw": pdw}
        three_d = {"FLAIR": 0.35, "T1w": 0.5 if fam != "SE" else 0.0, "T2w": 0.15, "PDw": 0.1}
        slices = {}
        for c in seqs:
            if rng.random() < three_d[c]:
                slices[c] = (2, 1.0)
            else:
                slices[c] = (int(rng.choice([2, 0, 1], p=[0.7, 0.15, 0.15])), float(rng.uniform(3.0, 6.0)))
        snr = {c: float(math.exp(rng.uniform(math.log(8.0), math.log(50.0)))) for c in seqs}
        out.append(Scanner(b0, seqs, slices, snr, float(rng.uniform(0.0, 0.4))))
    return out


# ------------------------------------------------------------------------------------------ heads
@dataclass
class Head:
    name: str
    labels: np.ndarray        # int16, RAS, 1 mm, cropped to the brain with a margin
    classes: np.ndarray       # uint8 index into bidsapp.physics.tissues.CLASSES
    pools: dict               # lesion kind -> (N, 3) voxel coordinates
    class_volume: np.ndarray  # voxels per class inside the brain (for the mean-in-brain scaling)


def load_head(path) -> Head:
    """A label map as a training head (see the module docstring)."""
    import nibabel as nib
    from scipy import ndimage as ndi

    from bidsapp.physics.lesions import lesion_pools
    from bidsapp.physics.phantom import LABEL_CLASSES
    from bidsapp.physics.tissues import CLASSES, TISSUES

    img = nib.as_closest_canonical(nib.load(str(path)))
    lab = np.asarray(img.dataobj).astype(np.int16)
    zooms = img.header.get_zooms()[:3]
    if not np.allclose(zooms, 1.0, atol=0.05):
        raise ValueError(f"{path}: label maps must be 1 mm (got {zooms})")
    lut = np.zeros(int(lab.max()) + 1, np.uint8)
    for v in np.unique(lab):
        lut[v] = CLASSES.index(LABEL_CLASSES.get(int(v), "muscle" if v >= 500 else "deep_GM"))
    brain_classes = np.array([TISSUES[c].brain for c in CLASSES])
    brain = brain_classes[lut[lab]]
    idx = np.argwhere(brain)
    lo, hi = np.maximum(idx.min(0) - 12, 0), np.minimum(idx.max(0) + 13, lab.shape)
    lab = np.ascontiguousarray(lab[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
    cls = lut[lab]
    wm = np.isin(lab, CEREBRAL_WM)
    vent = np.isin(lab, VENTRICLES)
    cortex = np.isin(lab, CORTEX)
    d_vent = ndi.distance_transform_edt(~vent)
    d_wm = ndi.distance_transform_edt(wm | np.isin(lab, INFRATENTORIAL_WM))
    d_gm = ndi.distance_transform_edt(~cortex)
    pools = lesion_pools(wm, d_vent, d_wm, d_gm, np.isin(lab, INFRATENTORIAL_WM))
    pools = {k: np.stack(np.unravel_index(v, lab.shape), 1).astype(np.int16) for k, v in pools.items() if v.size}
    inside = brain_classes[cls]
    class_volume = np.bincount(cls[inside].ravel(), minlength=len(CLASSES)).astype(np.float64)
    return Head(Path(path).name.split("_")[0], lab, cls, pools, class_volume)


def load_heads(anatomy_dir, heldout=HELDOUT, only=None) -> list[Head]:
    paths = [p for p in sorted(Path(anatomy_dir).glob("anat-*_dseg.nii.gz"))
             if p.name.split("_")[0] not in heldout and (only is None or p.name.split("_")[0] in only)]
    if not paths:
        raise FileNotFoundError(f"no anatomies: {anatomy_dir} has no anat-*_dseg.nii.gz (set --anatomy-dir or "
                                "SCANBRIDGE_DATA_DIR)")
    heads = []
    for p in paths:
        heads.append(load_head(p))
        LOG.info("anatomy %s: %s voxels", heads[-1].name, heads[-1].labels.shape)
    return heads


# ------------------------------------------------------------------------------------------ samples


def class_signals(scanner: Scanner, rng: np.random.Generator) -> tuple[dict, dict]:
    """Per contrast: the signal of every tissue class (one subject's properties, lesions varied), and the
    mean signal in the brain of the head ``None`` (filled by the caller)."""
    from bidsapp.physics import equations
    from bidsapp.physics.tissues import CLASSES, property_table, sample_multipliers

    mult = sample_multipliers(CLASSES, rng, scale=1.5)
    li = CLASSES.index("lesion")
    mult[li, 0] *= rng.uniform(0.95, 1.08)       # water content
    mult[li, 1] *= rng.uniform(0.75, 1.15)       # R1: from black holes to nearly isointense on T1w
    mult[li, 2] *= rng.uniform(0.7, 1.1)         # R2: how bright on FLAIR/T2w
    tab = property_table(CLASSES, scanner.field_strength, mult)
    out = {}
    for c, (fam, params) in scanner.sequences.items():
        s = np.asarray(equations.signal(fam, tab[:, 0], tab[:, 1], tab[:, 2], tab[:, 3], params), np.float64)
        s[0] = 0.0
        out[c] = s.astype(np.float32)
    return out


def acquire(img, contrast: str, scanner: Scanner, mean: float, rng: np.random.Generator, gen):
    """What ``scanner`` makes of the noiseless ``img`` (torch, 1 mm) for ``contrast``: a bias field, its
    slice thickness (box average along the slice axis, back to 1 mm), Rician noise at its SNR relative
    to ``mean`` (the mean signal in the brain)."""
    from bidsapp.physics.simulator import bias_field_torch, rician_noise_torch

    shape = tuple(img.shape)
    img = img * bias_field_torch(shape, scanner.bias * rng.uniform(0.5, 1.5), gen)[0]
    axis, thick = scanner.slices[contrast]
    img = thick_slices(img, axis, int(round(thick * rng.uniform(0.9, 1.1))))
    return rician_noise_torch(img, mean / (scanner.snr[contrast] * rng.uniform(0.7, 1.4)), gen)


def shown(fractions: np.ndarray, affine, specs, lesion_contrast: str, rng: np.random.Generator):
    """The class fractions the scanner sees (torch): with ``graded`` lesion contrast each lesion voxel shows
    its share of the lesion signal and the rest as white matter (the lesion fraction stays the target)."""
    import torch

    from bidsapp.physics.lesions import contrast_map, draw_contrast
    from bidsapp.physics.tissues import CLASSES

    if lesion_contrast not in LESION_CONTRASTS:
        raise ValueError(f"lesion_contrast {lesion_contrast!r}: one of {', '.join(LESION_CONTRASTS)}")
    ft = torch.from_numpy(fractions)
    if lesion_contrast == "mixed":
        lesion_contrast = "full" if rng.random() < 0.5 else "graded"
    if lesion_contrast == "full" or not specs:
        return ft
    share = torch.from_numpy(contrast_map(fractions.shape[1:], affine, specs, draw_contrast(specs, rng)))
    li, wi = CLASSES.index("lesion"), CLASSES.index("WM")
    seen = ft.clone()
    seen[li] = ft[li] * share
    seen[wi] = ft[wi] + ft[li] * (1 - share)
    return seen


def simulate_session(head: Head, scanner: Scanner, rng: np.random.Generator, gen, n_lesions=None,
                     contrasts=None, lesion_contrast: str = "full") -> dict:
    """A whole simulated session of ``head`` on ``scanner`` (the benchmark's test data): lesions of every
    kind across the brain, each contrast of ``contrasts`` (default all) acquired as in training. Returns
    ``images`` (contrast -> array, 1 mm RAS), ``brain`` (bool), ``lesion`` (bool truth: fraction >= 0.5),
    ``affine`` and ``specs``. ``lesion_contrast`` as :data:`LESION_CONTRASTS`."""
    import torch

    from bidsapp.physics.lesions import apply_lesions, draw_lesion
    from bidsapp.physics.phantom import Phantom
    from bidsapp.physics.tissues import CLASSES, TISSUES

    n = dict(zip(KIND_P, (rng.integers(3, 9), rng.integers(4, 14), rng.integers(1, 5), rng.integers(0, 3)))
             if n_lesions is None else n_lesions)
    specs = []
    for kind, k in n.items():
        pool = head.pools.get(kind)
        for _ in range(int(k) if pool is not None else 0):
            specs.append(draw_lesion(kind, pool[rng.integers(len(pool))].astype(float), rng))
    frac = np.zeros((len(CLASSES), *head.classes.shape), np.float32)
    np.put_along_axis(frac, head.classes[None].astype(np.int64), 1.0, axis=0)
    ph = apply_lesions(Phantom(frac, np.eye(4), CLASSES), specs)
    signals = class_signals(scanner, rng)
    brain_cls = np.array([TISSUES[c].brain for c in CLASSES])
    ft = shown(ph.fractions, ph.affine, specs, lesion_contrast, rng)
    images = {}
    for c in contrasts or scanner.sequences:
        clean = torch.einsum("cxyz,c->xyz", ft, torch.from_numpy(signals[c]))
        mean = float((signals[c] * head.class_volume).sum() / head.class_volume.sum())
        images[c] = acquire(clean, c, scanner, mean, rng, gen).numpy()
    return {"images": images, "brain": brain_cls[head.classes], "affine": np.eye(4),
            "lesion": ph.fractions[CLASSES.index("lesion")] >= 0.5, "specs": specs}


def simulated_sessions(heads: list[Head], n_scanners: int, seed: int, lesion_contrast: str = "full"):
    """Whole sessions (:func:`simulate_session`) of every head on ``n_scanners`` scanners drawn from ``seed``
    (not the training seed: scanners no training patch came from), yielded as (scanner index, scanner,
    head, session): the benchmark's test sessions (``benchmarks/lesion/run.py``); the same seed gives the
    same sessions."""
    import torch

    scanners = make_scanners(n_scanners, np.random.default_rng([seed, 7]))
    for si, sc in enumerate(scanners):
        for hi, head in enumerate(heads):
            gen = torch.Generator().manual_seed(seed * 1000 + si * 10 + hi)
            yield si, sc, head, simulate_session(head, sc, np.random.default_rng([seed, si, hi]), gen,
                                                 lesion_contrast=lesion_contrast)


class LesionSynth:
    """Random training patches (see the module docstring)."""

    def __init__(self, heads: list[Head], scanners: list[Scanner], size: int = 48, seed: int = 0,
                 dropout_contrasts: bool = True, lesion_contrast: str = "full", lesion_load: str = "typical"):
        import torch

        for name, value, allowed in (("lesion_contrast", lesion_contrast, LESION_CONTRASTS),
                                     ("lesion_load", lesion_load, LESION_LOADS)):
            if value not in allowed:
                raise ValueError(f"{name} {value!r}: one of {', '.join(allowed)}")
        self.heads, self.scanners, self.size = heads, scanners, int(size)
        self.dropout_contrasts = dropout_contrasts
        self.lesion_contrast, self.lesion_load = lesion_contrast, lesion_load
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(int(seed))

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "gen": self.gen.get_state()}

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.gen.set_state(state["gen"])

    def _kind(self, head: Head) -> str:
        kinds = [k for k in KIND_P if k in head.pools]
        p = np.array([KIND_P[k] for k in kinds])
        return kinds[self.rng.choice(len(kinds), p=p / p.sum())]

    def _lesions(self, head: Head, width: int):
        """Lesion specs (mm = head voxel index) and the box's first voxel: a lesion of a random kind,
        a box around it (shifted so it is not always in the middle) and 0-7 more lesions in the box,
        clustered around the first when it is confluent; with the ``wide`` load a third of the boxes
        carry a heavy load instead (the first lesion 1.5-2.5x larger, 4-12 more around it)."""
        from bidsapp.physics.lesions import draw_lesion

        rng = self.rng
        kind = self._kind(head)
        centre = head.pools[kind][rng.integers(len(head.pools[kind]))].astype(float)
        heavy = self.lesion_load == "wide" and rng.random() < 1 / 3
        confluent = heavy or rng.random() < 0.2
        scale = rng.uniform(1.5, 2.5) if heavy else rng.uniform(1.2, 1.8) if confluent else 1.0
        specs = [draw_lesion(kind, centre, rng, scale=scale)]
        lo = np.round(centre - width / 2 + rng.uniform(-width / 6, width / 6, 3)).astype(int)
        for _ in range(int(rng.integers(4, 13) if heavy else rng.integers(0, 8))):
            k = self._kind(head)
            pool = head.pools[k]
            inside = pool[np.all((pool >= lo) & (pool < lo + width), 1)]
            if len(inside) == 0:
                continue
            c = inside[rng.integers(len(inside))].astype(float)
            if confluent and rng.random() < 0.5:
                c = centre + rng.normal(0, 4.0, 3)
            specs.append(draw_lesion(k, c, rng))
        return specs, lo

    def sample(self) -> tuple:
        """(image (4, S, S, S), target (4, S, S, S), domain index, contrasts present)."""
        import torch
        import torch.nn.functional as F

        from bidsapp.models.lesion import CHANNELS, NEEDS
        from bidsapp.physics.lesions import apply_lesions
        from bidsapp.physics.phantom import Phantom
        from bidsapp.physics.tissues import CLASSES, TISSUES

        rng, S = self.rng, self.size
        domain = int(rng.integers(len(self.scanners)))
        scanner = self.scanners[domain]
        head = self.heads[rng.integers(len(self.heads))]
        W = int(math.ceil(S * 1.3)) + 2
        specs, lo = self._lesions(head, W)
        shape = np.array(head.labels.shape)
        src_lo, src_hi = np.maximum(lo, 0), np.minimum(lo + W, shape)
        dst_lo = src_lo - lo
        box = tuple(slice(a, b) for a, b in zip(src_lo, src_hi))
        dst = tuple(slice(a, a + (b - c)) for a, b, c in zip(dst_lo, src_hi, src_lo))
        cls = np.zeros((W, W, W), np.uint8)
        lab = np.zeros((W, W, W), np.int16)
        cls[dst], lab[dst] = head.classes[box], head.labels[box]
        frac = np.zeros((len(CLASSES), W, W, W), np.float32)
        np.put_along_axis(frac, cls[None].astype(np.int64), 1.0, axis=0)
        affine = np.eye(4)
        affine[:3, 3] = lo  # crop voxel -> head voxel (mm at 1 mm)
        ph = apply_lesions(Phantom(frac, affine, CLASSES), specs)
        frac = ph.fractions
        signals = class_signals(scanner, rng)
        brain_cls = np.array([TISSUES[c].brain for c in CLASSES], np.float32)
        ft = torch.from_numpy(frac)
        seen = shown(frac, affine, specs, self.lesion_contrast, rng)  # the target stays ``ft``'s lesion
        chans = [torch.einsum("cxyz,c->xyz", seen, torch.from_numpy(signals[c])) for c in CHANNELS]
        targets = [ft[CLASSES.index("lesion")],
                   torch.from_numpy(np.isin(lab, VENTRICLES).astype(np.float32)),
                   torch.from_numpy(np.isin(lab, CORTEX).astype(np.float32)),
                   torch.from_numpy(np.isin(lab, INFRATENTORIAL).astype(np.float32)),
                   torch.einsum("cxyz,c->xyz", ft, torch.from_numpy(brain_cls))]
        stack = torch.stack(chans + targets)[None]
        # rotation, scaling and a left-right flip about the box centre
        m = rotation(rng.uniform(-12, 12, 3)) @ np.diag(rng.uniform(0.9, 1.1, 3))
        if rng.random() < 0.5:
            m[:, 0] *= -1
        o = torch.stack(torch.meshgrid(*[torch.arange(S, dtype=torch.float32) - (S - 1) / 2] * 3,
                                       indexing="ij"), -1)
        p = o @ torch.as_tensor(m.T, dtype=torch.float32) + (W - 1) / 2
        grid = (2 * p / (W - 1) - 1).flip(-1)[None]
        warped = F.grid_sample(stack, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
        images, target, brain = warped[:4], warped[4:8], warped[8]
        # contrasts present: FLAIR, T2w or PDw always; the others at random
        present = list(CHANNELS)
        if self.dropout_contrasts:
            present = [c for c in CHANNELS if rng.random() < {"FLAIR": 0.75, "T1w": 0.6, "T2w": 0.45, "PDw": 0.3}[c]]
            if not any(c in NEEDS for c in present):
                present.append(str(rng.choice(["FLAIR", "FLAIR", "FLAIR", "T2w", "PDw"])))
        keep = (brain > rng.uniform(0.3, 0.7)).float()[None, None]
        r = int(rng.integers(0, 3))
        if r:
            keep = F.max_pool3d(keep, 2 * r + 1, stride=1, padding=r)
        keep = keep[0, 0]
        out = torch.zeros_like(images)
        vol = head.class_volume
        for i, c in enumerate(CHANNELS):
            if c not in present:
                continue
            mean = float((signals[c] * vol).sum() / vol.sum())
            img = acquire(images[i], c, scanner, mean, rng, self.gen)
            if c != "FLAIR" and rng.random() < 0.3:  # residual misregistration of about a voxel
                img = torch.roll(img, tuple(int(x) for x in rng.integers(-1, 2, 3)), (0, 1, 2))
            out[i] = (img / (mean * rng.uniform(0.9, 1.1)) * keep).clamp(0, 6)
        target = (target * keep[None]).clamp(0, 1)
        target[1:] = (target[1:] >= 0.5).float()
        return out.float(), target.float(), domain, present

    def batch(self, n: int):
        import torch

        items = [self.sample() for _ in range(n)]
        return (torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items]),
                torch.as_tensor([i[2] for i in items]), [i[3] for i in items])


# ------------------------------------------------------------------------------------------ training
@dataclass
class TrainConfig:
    """One training run; the options and the card's command come from these fields."""

    anatomy_dir: str = field(metadata={"help": "folder of anat-*_dseg.nii.gz label maps (default "
                                               "$SCANBRIDGE_DATA_DIR/anatomy, i.e. ../shared/data/anatomy)"})
    out: str = field(metadata={"help": "run folder: checkpoint.pt (resumable) and weights/"})
    iterations: int = 4000
    batch: int = 2
    size: int = field(default=48, metadata={"help": "training patch edge in voxels of 1 mm"})
    lr: float = 1e-3
    seed: int = 0
    scanners: int = field(default=24, metadata={"help": "simulated scanners (domains) to train on"})
    domain_loss: str = field(default="rand", metadata={
        "choices": DOMAIN_LOSSES,
        "help": "auxiliary loss of the regularisation network: none (BM/BDM), pc, rand, du"})
    domain_lambda: float | None = field(default=None, metadata={
        "help": "weight of the auxiliary loss (default: the paper's, "
                + " / ".join(f"{w} {k}" for k, w in DOMAIN_LAMBDA.items() if w) + ")"})
    dropout: float = field(default=0.0, metadata={"help": "dropout in the U-Net (> 0: the paper's BDM)"})
    features: str = field(default="8,16,32,64,128,8", metadata={"help": "BasicUNet features"})
    lesion_contrast: str = field(default="full", metadata={
        "choices": LESION_CONTRASTS,
        "help": "full: every lesion the lesion class's whole contrast; graded: each lesion 0.3-1 of it, "
                "fading toward its edge (faint lesions as on clinical scans; the target stays the whole "
                "lesion); mixed: each patch full or graded, half each"})
    lesion_load: str = field(default="typical", metadata={
        "choices": LESION_LOADS,
        "help": "typical: a lesion and 0-7 more per patch; wide: a third of the patches a heavy load (the "
                "first lesion 1.5-2.5x larger, 4-12 more around it), as in advanced MS"})
    lesion_loss: str = field(default="dice", metadata={
        "choices": LESION_LOSSES,
        "help": "dice: the paper's soft Dice; dice-bce: soft Dice + binary cross-entropy (nnU-Net's)"})
    heads: str | None = field(default=None, metadata={"help": "comma-separated anatomies to train on "
                                                              "(default: all but the held-out ones)"})
    precision: str = precision_field()
    threads: int = field(default=2, metadata={"card": False})
    device: str = field(default="cpu", metadata={"card": False, "choices": ("cpu", "cuda", "auto")})
    checkpoint_every: int = field(default=100, metadata={"card": False})
    init_from: str | None = field(default=None, metadata={
        "help": "start from the network of a checkpoint.pt (a later stage with a new schedule)"})


def command_line(cfg: TrainConfig) -> str:
    return config_command_line("scanbridge-train lesion", cfg, first=("anatomy_dir", "out"))


def architecture(cfg: TrainConfig) -> dict:
    from bidsapp.models.lesion import ARCHITECTURE

    kw = dict(ARCHITECTURE["kwargs"], features=[int(x) for x in cfg.features.split(",")], dropout=cfg.dropout)
    return {"class": ARCHITECTURE["class"], "kwargs": kw}


def train(cfg: TrainConfig, heads: list[Head] | None = None, progress=print, stop_after: int | None = None) -> dict:
    """Train (resuming from ``cfg.out``/checkpoint.pt when present); the history with the network under
    ``"net"`` and ``"finished"`` False when stopped at ``stop_after`` before the end."""
    import torch

    from bidsapp.devices import resolve_device
    from bidsapp.models.lesion import build_network
    from bidsapp.training.engine import fit, forward_precision, load_initial
    from bidsapp.training.losses import domain_loss, lesion_loss

    if cfg.lesion_loss not in LESION_LOSSES:
        raise ValueError(f"unknown lesion loss {cfg.lesion_loss!r}; known: {', '.join(LESION_LOSSES)}")
    torch.set_num_threads(int(cfg.threads))
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if heads is None:
        heads = load_heads(cfg.anatomy_dir, only=cfg.heads.split(",") if cfg.heads else None)
    scanners = make_scanners(cfg.scanners, np.random.default_rng([cfg.seed, 1]))
    synth = LesionSynth(heads, scanners, size=cfg.size, seed=cfg.seed, lesion_contrast=cfg.lesion_contrast,
                        lesion_load=cfg.lesion_load)
    use_head = cfg.domain_loss != "none"
    net = build_network(architecture(cfg), n_domains=cfg.scanners if use_head else 0)
    if cfg.init_from:
        load_initial(cfg.init_from, net, optional_prefixes=("domain_head.",))
    net = net.to(device)
    lam = DOMAIN_LAMBDA[cfg.domain_loss] if cfg.domain_lambda is None else float(cfg.domain_lambda)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    seg_loss = lesion_loss(bce=cfg.lesion_loss == "dice-bce")
    amp = forward_precision(cfg, device, progress)

    def step(_it):
        x, y, d, _ = synth.batch(cfg.batch)
        x, y, d = x.to(device), y.to(device), d.to(device)
        opt.zero_grad(set_to_none=True)
        with amp():
            out = net(x, with_domain=True) if use_head else (net(x), None)
        logits, dom = out[0].float(), out[1]
        if use_head:
            aux = domain_loss(cfg.domain_loss, dom.float(), d, generator=synth.gen)
        else:
            aux = torch.zeros(())
        loss = seg_loss(logits, y) + lam * aux
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach()), "domain": float(aux.detach())}

    hist = fit(cfg, net, opt, step, out=cfg.out, states={"synth": synth}, progress=progress,
               stop_after=stop_after, logged=("loss", "domain"))
    return dict(hist, scanners=scanners)


def save(net, cfg: TrainConfig, history: dict, weights_dir=None, metrics: dict | None = None) -> dict:
    """Write the segmentation weights (without the regularisation head) and the model card."""
    from bidsapp import __version__
    from bidsapp.models import registry
    from bidsapp.models.lesion import CHANNELS, GRID_MM, MODEL_NAME, OUTPUTS

    heads = cfg.heads.split(",") if cfg.heads else [
        p.name.split("_")[0] for p in sorted(Path(cfg.anatomy_dir).glob("anat-*_dseg.nii.gz"))
        if p.name.split("_")[0] not in HELDOUT]
    card = {
        "version": __version__,
        "task": "MS / white-matter lesion segmentation from any of FLAIR, T1w, T2w, PDw",
        "architecture": architecture(cfg),
        "resolution_mm": GRID_MM,
        "channels": list(CHANNELS),
        "outputs": list(OUTPUTS),
        "input": ("contrasts co-registered on one grid, RAS, 1 mm; each masked by the brain and divided by its "
                  "mean inside the brain; a missing contrast is zeros"),
        "output": "sigmoid per output; lesion mask = probability >= 0.5, components under 3 mm^3 dropped",
        "training": {
            "command": command_line(cfg),
            "seed": cfg.seed,
            "data": (f"synthetic patches of {cfg.size}^3 mm from label maps {', '.join(heads)} (held out: "
                     f"{', '.join(HELDOUT)}) with simulated MS lesions, {cfg.scanners} simulated scanners "
                     "(the domains)"),
            "domain_loss": cfg.domain_loss,
            "iterations": cfg.iterations, "batch": cfg.batch, "patch_voxels": cfg.size,
            **run_facts(cfg, history),
            "final_loss": float(np.mean(history["loss"][-50:])) if history["loss"] else None,
        },
        "metrics": metrics or {},
    }
    if cfg.init_from:
        card["training"]["stages"] = stage_commands(cfg, TrainConfig, command_line)
    return registry.save_model(MODEL_NAME, registry.shipped_state(net), card, weights_dir or Path(cfg.out) / "weights")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, TrainConfig, defaults={"anatomy_dir": str(anatomy_dir())})


def run(args) -> int:
    return run_command("scanbridge-train lesion", TrainConfig, args, train, save)
