"""``scanbridge-train wmh``: the FLAIR-only WMH generator, trained on simulated FLAIR slices.

Data (:class:`WMHSynth`), drawn from ``--seed``:

- **Scanners** (:func:`make_scanners`): ``--scanners`` simulated FLAIR protocols, each a domain: 1.5 or
  3 T, TR 6-11 s, TE 80-140 ms, TI within -10/+8 % of the CSF null, 1 mm 3D (35 %) or axial slices of
  2-6 mm, SNR 8-50, a bias field. The out-of-distribution family (``family="ood"``, the benchmark's
  CAIN-like test set) has what none of them had: 1 T or 7 T, slices of 6.5-8 mm, TE 60-80 or
  140-170 ms.
- **Heads**: the label maps of ``--anatomy-dir`` (``anat-10``..``anat-12`` held out), with skull.
- **Lesions** (:meth:`WMHSynth.lesions`): a Fazekas-like load per sample, from none or a few punctate
  deep foci to confluent periventricular bands and deep lesions of tens of millilitres; periventricular
  caps and bands (elongated ellipsoids next to the ventricles), punctate and confluent deep lesions,
  a few juxtacortical ones (:mod:`bidsapp.physics.lesions`).
- **One sample**: an axial slab of the slice thickness around a lesion (75 %) or anywhere in the brain,
  its FLAIR signal from the tissue properties (varied per subject; lesions from nearly isointense to
  bright) and the scanner's sequence, a bias field, the slab's mean (the thick slice), Rician noise;
  cropped to the square around the brain box as at inference (:func:`bidsapp.models.wmh.square_box`,
  margin varied), resized to the input size with a random rotation up to 30 degrees (the paper's),
  scaling and flip, masked by a perturbed brain mask and divided by the mean in the brain.
- **Targets**: the slice's lesion fraction >= 0.5, soft-binarised to 0.1/0.9 for the content loss (the
  paper's; :func:`lesion_target`), and the context maps (ventricles, cortex, infratentorial brain) of the
  label map.

Loss (``--loss``): ``content`` (the Siamese content loss with the frozen feature network of
``scanbridge-train wmh-features``), or the baselines ``dice`` (epsilon 1), ``tversky`` (alpha 0.3,
beta 0.7), ``gdice`` (generalised Dice), all MONAI; plus, for every variant alike, Dice + BCE on the
context maps. Adam, lr 1e-3 (the paper's) with a cosine schedule, batch 8 (the paper's); resumable
checkpoints (:mod:`bidsapp.training.engine`).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bidsapp.devdata import anatomy_dir
from bidsapp.training.engine import add_run_arguments, precision_field, run_command, run_facts
from bidsapp.training.config import stage_commands
from bidsapp.training.config import command_line as config_command_line
from bidsapp.training.lesion import CORTEX, HELDOUT, INFRATENTORIAL, VENTRICLES, Head, Scanner, class_signals
from bidsapp.training.lesion import flair_null_ti, load_heads


LOSSES = ("content", "dice", "tversky", "gdice")
FAMILIES = ("train", "ood")
GRADES = (0, 1, 2, 3)
GRADE_P = (0.15, 0.35, 0.3, 0.2)


# ------------------------------------------------------------------------------------------ scanners
def make_scanners(n: int, rng: np.random.Generator, family: str = "train") -> list[Scanner]:
    """``n`` random FLAIR scanners of ``family`` (see the module docstring)."""
    from bidsapp.physics.tissues import properties

    if family not in FAMILIES:
        raise ValueError(f"unknown scanner family {family!r}; known: {', '.join(FAMILIES)}")
    out = []
    for _ in range(int(n)):
        if family == "train":
            b0 = float(rng.choice([1.5, 3.0])) * rng.uniform(0.97, 1.03)
            te = rng.uniform(0.08, 0.14)
            thick = 1.0 if rng.random() < 0.35 else float(rng.uniform(2.0, 6.0))
        else:
            b0 = float(rng.choice([1.0, 7.0])) * rng.uniform(0.97, 1.03)
            te = rng.uniform(0.06, 0.08) if rng.random() < 0.5 else rng.uniform(0.14, 0.17)
            thick = float(rng.uniform(6.5, 8.0))
        tr = rng.uniform(6.0, 11.0)
        ti = flair_null_ti(tr, properties("CSF", b0).t1) * rng.uniform(0.9, 1.08)
        out.append(Scanner(b0, {"FLAIR": ("FLAIR", {"tr": tr, "te": te, "ti": ti})}, {"FLAIR": (2, thick)},
                           {"FLAIR": float(math.exp(rng.uniform(math.log(8.0), math.log(50.0))))},
                           float(rng.uniform(0.0, 0.4))))
    return out


# ------------------------------------------------------------------------------------------ lesions
def draw_lesions(head: Head, rng: np.random.Generator, grade: int | None = None) -> list:
    """The WMH of one subject: specs (mm = head voxel index) for a Fazekas-like ``grade`` 0-3 (drawn
    when None)."""
    from bidsapp.physics.lesions import draw_lesion

    grade = int(rng.choice(GRADES, p=GRADE_P)) if grade is None else int(grade)
    # (periventricular count, scale range), (deep count, scale range), juxtacortical count
    plan = {0: ((0, 1), (0.8, 1.0), (0, 4), (0.5, 0.9), (0, 1)),
            1: ((2, 9), (0.8, 1.2), (2, 11), (0.5, 1.1), (0, 2)),
            2: ((6, 21), (1.1, 1.8), (5, 21), (0.7, 1.6), (0, 3)),
            3: ((20, 61), (1.5, 2.5), (10, 31), (1.0, 2.4), (0, 4))}[grade]
    (pv_n, pv_s, dp_n, dp_s, jx_n) = plan
    specs = []
    for kind, count, scale in (("periventricular", pv_n, pv_s), ("deep", dp_n, dp_s),
                               ("juxtacortical", jx_n, (0.7, 1.0))):
        pool = head.pools.get(kind)
        if pool is None or not len(pool):
            continue
        for _ in range(int(rng.integers(*count))):
            centre = pool[rng.integers(len(pool))].astype(float)
            specs.append(draw_lesion(kind, centre, rng, scale=float(rng.uniform(*scale))))
    return specs


def _slab_phantom(head: Head, z_lo: int, depth: int, specs):
    """Tissue fractions (C, X, Y, depth) of the head's axial slab from ``z_lo``, lesions applied."""
    from bidsapp.physics.lesions import apply_lesions
    from bidsapp.physics.phantom import Phantom
    from bidsapp.physics.tissues import CLASSES

    cls = head.classes[:, :, z_lo:z_lo + depth]
    frac = np.zeros((len(CLASSES), *cls.shape), np.float32)
    np.put_along_axis(frac, cls[None].astype(np.int64), 1.0, axis=0)
    affine = np.eye(4)
    affine[2, 3] = z_lo
    near = [s for s in specs if z_lo - 2 * max(s.radii_mm) - 2 <= s.centre_mm[2] <= z_lo + depth + 2 * max(s.radii_mm) + 2]
    return apply_lesions(Phantom(frac, affine, CLASSES), near)


def _context(head: Head, z_lo: int, depth: int) -> np.ndarray:
    lab = head.labels[:, :, z_lo:z_lo + depth]
    return np.stack([np.isin(lab, VENTRICLES), np.isin(lab, CORTEX), np.isin(lab, INFRATENTORIAL)]).astype(np.float32)


class WMHSynth:
    """Random training slices (see the module docstring)."""

    def __init__(self, heads: list[Head], scanners: list[Scanner], size: int = 160, seed: int = 0):
        import torch

        from bidsapp.physics.tissues import CLASSES, TISSUES

        self.heads, self.scanners, self.size = heads, scanners, int(size)
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(int(seed))
        brain_cls = np.array([TISSUES[c].brain for c in CLASSES])
        self._brain = [brain_cls[h.classes] for h in heads]
        self._brain_xy = [b.any(2) for b in self._brain]
        self._brain_z = [np.flatnonzero(b.any((0, 1))) for b in self._brain]

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "gen": self.gen.get_state()}

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.gen.set_state(state["gen"])

    def sample(self) -> tuple:
        """(image (1, S, S), target (4, S, S): lesion then context maps, brain mask (1, S, S), domain)."""
        import torch
        import torch.nn.functional as F

        from bidsapp.models.wmh import BOX_MARGIN, square_box
        from bidsapp.physics.simulator import bias_field_torch, rician_noise_torch
        from bidsapp.physics.tissues import CLASSES, TISSUES
        from bidsapp.training.augment import rotation

        rng, S = self.rng, self.size
        domain = int(rng.integers(len(self.scanners)))
        scanner = self.scanners[domain]
        h = int(rng.integers(len(self.heads)))
        head = self.heads[h]
        specs = draw_lesions(head, rng)
        thick = scanner.slices["FLAIR"][1]
        depth = max(1, int(round(thick * rng.uniform(0.9, 1.1))))
        zs = self._brain_z[h]
        if specs and rng.random() < 0.75:
            sp = specs[rng.integers(len(specs))]
            zc = sp.centre_mm[2] + rng.normal(0, max(sp.radii_mm) / 2)
        else:
            zc = rng.uniform(zs[0], zs[-1])
        z_lo = int(np.clip(round(zc - depth / 2), 0, head.classes.shape[2] - depth))
        ph = _slab_phantom(head, z_lo, depth, specs)
        signals = class_signals(scanner, rng)["FLAIR"]
        ft = torch.from_numpy(ph.fractions)
        clean = torch.einsum("cxyz,c->xyz", ft, torch.from_numpy(signals))
        clean = clean * bias_field_torch(tuple(clean.shape), scanner.bias * rng.uniform(0.5, 1.5), self.gen)[0]
        vol = head.class_volume
        mean = float((signals * vol).sum() / vol.sum())
        img = rician_noise_torch(clean.mean(2), mean / (scanner.snr["FLAIR"] * rng.uniform(0.7, 1.4)), self.gen)
        brain_cls = torch.from_numpy(np.array([TISSUES[c].brain for c in CLASSES], np.float32))
        planes = torch.stack([img, ft[CLASSES.index("lesion")].mean(2),
                              *torch.from_numpy(_context(head, z_lo, depth)).mean(3),
                              torch.einsum("cxyz,c->xyz", ft, brain_cls).mean(2)])
        # the square crop around the brain box (as at inference), rotated, scaled and flipped
        x0, y0, side = square_box(self._brain_xy[h], BOX_MARGIN * rng.uniform(0.5, 1.5))
        centre = np.array([x0, y0]) + side / 2.0 + rng.uniform(-0.03, 0.03, 2) * side
        m = rotation((0.0, 0.0, rng.uniform(-30, 30)))[:2, :2] * rng.uniform(0.9, 1.1)
        if rng.random() < 0.5:
            m[:, 0] *= -1
        o = torch.stack(torch.meshgrid(*[torch.linspace(-0.5, 0.5, S)] * 2, indexing="ij"), -1) * side
        p = o @ torch.as_tensor(m.T, dtype=torch.float32) + torch.as_tensor(centre, dtype=torch.float32)
        shape = torch.as_tensor(planes.shape[1:], dtype=torch.float32)
        grid = (2 * p / (shape - 1) - 1).flip(-1)[None]
        warped = F.grid_sample(planes[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
        image, target, brain = warped[:1], warped[1:5], warped[5:6]
        keep = (brain > rng.uniform(0.3, 0.7)).float()
        r = int(rng.integers(0, 4))
        if r:
            keep = F.max_pool2d(keep[None], 2 * r + 1, stride=1, padding=r)[0]
        image = (image / (mean * rng.uniform(0.9, 1.1)) * keep).clamp(0, 6)
        target = (target >= 0.5).float() * keep
        return image.float(), target.float(), keep, domain

    def batch(self, n: int):
        import torch

        items = [self.sample() for _ in range(n)]
        return tuple(torch.stack([i[k] for i in items]) for k in range(3)) + (torch.as_tensor([i[3] for i in items]),)


def simulate_session(head: Head, scanner: Scanner, rng: np.random.Generator, gen, grade: int | None = None) -> dict:
    """A whole simulated FLAIR session of ``head`` on ``scanner`` (the benchmark's test data): WMH of
    ``grade`` (drawn when None), acquired as in training on the scanner's grid (1 x 1 x thickness mm,
    axial slices). Returns ``flair``, ``brain`` (bool), ``lesion`` (bool truth: slice fraction >= 0.5),
    ``affine``, ``zooms``, ``specs`` and ``grade``."""
    import torch

    from bidsapp.physics.simulator import bias_field_torch, rician_noise_torch
    from bidsapp.physics.tissues import CLASSES, TISSUES

    grade = int(rng.choice(GRADES, p=GRADE_P)) if grade is None else int(grade)
    specs = draw_lesions(head, rng, grade)
    depth = max(1, int(round(scanner.slices["FLAIR"][1])))
    nz = head.classes.shape[2] // depth
    signals = class_signals(scanner, rng)["FLAIR"]
    brain_cls = np.array([TISSUES[c].brain for c in CLASSES], np.float32)
    vol = head.class_volume
    mean = float((signals * vol).sum() / vol.sum())
    shape = (*head.classes.shape[:2], nz)
    flair = np.zeros(shape, np.float32)
    lesion = np.zeros(shape, np.float32)
    brain = np.zeros(shape, np.float32)
    for k in range(nz):
        ph = _slab_phantom(head, k * depth, depth, specs)
        flair[:, :, k] = np.einsum("cxyz,c->xy", ph.fractions, signals) / depth
        lesion[:, :, k] = ph.fractions[CLASSES.index("lesion")].mean(2)
        brain[:, :, k] = np.einsum("cxyz,c->xy", ph.fractions, brain_cls) / depth
    img = torch.from_numpy(flair) * bias_field_torch(shape, scanner.bias, gen)[0]
    img = rician_noise_torch(img, mean / scanner.snr["FLAIR"], gen).numpy()
    affine = np.diag([1.0, 1.0, float(depth), 1.0])
    return {"flair": img, "brain": brain >= 0.5, "lesion": lesion >= 0.5, "affine": affine,
            "zooms": (1.0, 1.0, float(depth)), "specs": specs, "grade": grade}


# ------------------------------------------------------------------------------------------ training
@dataclass
class TrainConfig:
    """One training run; the options and the card's command come from these fields."""

    anatomy_dir: str = field(metadata={"help": "folder of anat-*_dseg.nii.gz label maps (default "
                                               "$SCANBRIDGE_DATA_DIR/anatomy, i.e. ../shared/data/anatomy)"})
    out: str = field(metadata={"help": "run folder: checkpoint.pt (resumable) and weights/"})
    loss: str = field(default="content", metadata={"choices": LOSSES, "help": "lesion loss: the Siamese content "
                                                                              "loss or an overlap baseline"})
    iterations: int = 2000
    batch: int = 8
    size: int = field(default=160, metadata={"help": "network input edge in pixels"})
    lr: float = 1e-3
    seed: int = 0
    scanners: int = field(default=24, metadata={"help": "simulated FLAIR protocols to train on"})
    context_weight: float = field(default=1.0, metadata={"help": "weight of the context maps' Dice + BCE"})
    features: str | None = field(default=None, metadata={
        "help": "folder with wmh_features.pt/.json, the content loss's frozen network (default: the shipped one)"})
    heads: str | None = field(default=None, metadata={"help": "comma-separated anatomies to train on "
                                                              "(default: all but the held-out ones)"})
    precision: str = precision_field()
    threads: int = field(default=2, metadata={"card": False})
    device: str = field(default="cpu", metadata={"card": False, "choices": ("cpu", "cuda", "auto")})
    checkpoint_every: int = field(default=50, metadata={"card": False})
    init_from: str | None = field(default=None, metadata={
        "help": "start from the network of a checkpoint.pt (a later stage with a new schedule)"})


def command_line(cfg: TrainConfig) -> str:
    return config_command_line("scanbridge-train wmh", cfg, first=("anatomy_dir", "out"))


def architecture(cfg: TrainConfig) -> dict:
    from bidsapp.models.wmh import ARCHITECTURE

    return {"class": ARCHITECTURE["class"], "kwargs": dict(ARCHITECTURE["kwargs"], input_size=cfg.size)}


def train(cfg: TrainConfig, heads: list[Head] | None = None, progress=print, stop_after: int | None = None) -> dict:
    """Train (resuming from ``cfg.out``/checkpoint.pt when present); the history with the network under
    ``"net"`` and ``"finished"`` False when stopped at ``stop_after`` before the end."""
    import torch

    from bidsapp.devices import resolve_device
    from bidsapp.models.wmh import build_network, load_features
    from bidsapp.training.engine import fit, forward_precision, load_initial
    from bidsapp.training.losses import dice_bce_loss, wmh_loss

    torch.set_num_threads(int(cfg.threads))
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if heads is None:
        heads = load_heads(cfg.anatomy_dir, only=cfg.heads.split(",") if cfg.heads else None)
    scanners = make_scanners(cfg.scanners, np.random.default_rng([cfg.seed, 1]))
    synth = WMHSynth(heads, scanners, size=cfg.size, seed=cfg.seed)
    net = build_network(architecture(cfg))
    if cfg.init_from:
        load_initial(cfg.init_from, net)
    net = net.to(device)
    features = load_features(device, cfg.features)[0] if cfg.loss == "content" else None
    lesion_term = wmh_loss(cfg.loss, features)
    context_term = dice_bce_loss()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999))

    amp = forward_precision(cfg, device, progress)

    def step(_it):
        x, y, keep, _ = (t.to(device) for t in synth.batch(cfg.batch))
        opt.zero_grad(set_to_none=True)
        with amp():  # the generator only: the content loss's frozen features stay float32
            logits = net(x)
        logits = logits.float()
        lesion = lesion_term(logits[:, :1], lesion_target(y[:, :1], cfg.loss), x)
        context = context_term(logits[:, 1:], y[:, 1:])
        loss = lesion + cfg.context_weight * context
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach()), "lesion": float(lesion.detach()), "context": float(context.detach())}

    hist = fit(cfg, net, opt, step, out=cfg.out, states={"synth": synth}, progress=progress,
               stop_after=stop_after, logged=("lesion", "context"))
    return dict(hist, scanners=scanners)


SOFT = (0.1, 0.9)
"""The paper's soft-binarised truth (its background and lesion values), for the content loss."""


def lesion_target(truth, loss: str):
    """The lesion target a loss trains on: the paper's soft-binarised truth for ``content``; the binary
    truth for the overlap losses. With 0.1 on every background pixel an overlap loss is best served by
    calling every pixel lesion (soft Dice 0.19 against 0.13 for the target itself on a 224^2 slice with
    200 lesion pixels): trained so, the Dice variant called whole brains lesion (Dice 0.002-0.14)."""
    if loss != "content":
        return truth
    lo, hi = SOFT
    return lo + (hi - lo) * truth


def save(net, cfg: TrainConfig, history: dict, weights_dir=None, metrics: dict | None = None) -> dict:
    """Write the generator's weights and model card."""
    from bidsapp import __version__
    from bidsapp.models import registry
    from bidsapp.models.wmh import DESIGN, FEATURES_NAME, MODEL_NAME, OUTPUTS

    heads = cfg.heads.split(",") if cfg.heads else [
        p.name.split("_")[0] for p in sorted(Path(cfg.anatomy_dir).glob("anat-*_dseg.nii.gz"))
        if p.name.split("_")[0] not in HELDOUT]
    features = None
    if cfg.loss == "content":
        features = registry.load_card(FEATURES_NAME, cfg.features)
    card = {
        "version": __version__,
        "task": "white-matter hyperintensity segmentation from FLAIR alone",
        "architecture": architecture(cfg),
        "outputs": list(OUTPUTS),
        "design": DESIGN,
        "input": ("axial FLAIR slices, RAS; each cropped to the square around the brain mask's in-plane box "
                  "(8 % margin), resized to the input size, masked by the brain and divided by the volume's "
                  "mean inside the brain"),
        "output": "sigmoid per output; lesion mask = probability >= 0.5, 3D components under 3 mm^3 dropped",
        "training": {
            "command": command_line(cfg),
            "seed": cfg.seed,
            "loss": cfg.loss,
            "feature_network": None if features is None else {"name": features["name"], "sha256": features["sha256"]},
            "data": (f"simulated axial FLAIR slices from label maps {', '.join(heads)} (held out: "
                     f"{', '.join(HELDOUT)}) with simulated WMH of Fazekas-like grades 0-3, {cfg.scanners} "
                     "simulated FLAIR protocols (1.5/3 T, 1 mm 3D or 2-6 mm slices)"),
            "iterations": cfg.iterations, "batch": cfg.batch, "input_size": cfg.size,
            **run_facts(cfg, history),
            "final_loss": float(np.mean(history["loss"][-50:])) if history.get("loss") else None,
        },
        "metrics": metrics or {},
    }
    if cfg.init_from:
        card["training"]["stages"] = stage_commands(cfg, TrainConfig, command_line)
    return registry.save_model(MODEL_NAME, net.state_dict(), card, weights_dir or Path(cfg.out) / "weights")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, TrainConfig, defaults={"anatomy_dir": str(anatomy_dir())})


def run(args) -> int:
    return run_command("scanbridge-train wmh", TrainConfig, args, train, save)
