"""``scanbridge-train brainmask``: train the contrast-agnostic brain-extraction U-Net.

SynthStrip's recipe (Hoopes et al. 2022) on scanbridge's physics engine: every training image is a
synthetic head made on the fly, never a real scan.

* Anatomies: the full-head label maps of ``--anatomy-dir`` (FreeSurfer labels plus scalp, skull, fat,
  muscle, eyes, vessels, nerves and sinuses; ``anat-10``..``anat-12`` held out for the benchmark, as
  for the tissue models) and nilearn's ICBM152 2009a head, as tissue-fraction maps at
  :data:`~bidsapp.models.brainmask.GRID_MM` (exact partial volume), in RAS.
* Geometry per sample: random rotation (up to ``--max-rotation`` degrees about each axis), scaling
  (+-12 %), left-right flip, a smooth random displacement field, and a random field of view of
  ``--size`` voxels around the brain, or with ``--centre head`` half of them anywhere in the head
  (partial coverage comes free; the face and neck must be seen to be left out).
* Contrast per sample: 75 % physics (SPGR, MPRAGE, T2w and PDw spin echo, FLAIR at 1.5-7 T with
  random sequence parameters and tissue properties scattered 2.5 times their between-subject spread,
  each extra-cerebral class separately), 25 % a random intensity per tissue class (contrasts no
  sequence table lists); then a bias field, thick slices (4 or 6 mm along a random axis), blur, Rician
  noise (SNR 5-80) and a gamma curve.
* Inputs a user has: skull already stripped (the image masked by the brain, dilated 0-2 voxels: the
  target stays the whole brain), defaced faces and missing necks (the image zeroed there).
* Target: the brain fraction (GM, WM, deep GM, ventricles and all CSF labelled inside the brain);
  loss: MONAI's soft Dice on the sigmoid plus binary cross-entropy, both on the soft target.

Adam with a cosine learning-rate schedule; a checkpoint every ``--checkpoint-every`` iterations in
``--out`` lets an interrupted run resume exactly (the sampler's and torch's random states are saved);
``--stop-after N`` ends a run at iteration N of its schedule (a stage that a later ``--init-from`` stage
starts from).
Everything derives from ``--seed``.
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
from bidsapp.training.augment import gaussian_blur, rotation, thick_slices
from bidsapp.training.config import stage_commands
from bidsapp.training.config import command_line as config_command_line

LOG = logging.getLogger("scanbridge.train.brainmask")

HELDOUT = HELDOUT_ANATOMIES
CENTRES = ("brain", "head")
"""Where training fields of view are centred: near the brain's centre, or (``head``) half of them
anywhere in the head, so that a field of view smaller than the head still shows the network the face
and neck it must leave out."""
FAMILIES = ("SPGR", "MPRAGE", "T2w", "PDw", "FLAIR")
FAMILY_P = (0.25, 0.25, 0.17, 0.13, 0.20)


# ------------------------------------------------------------------------------------------ contrast
def sample_sequence(rng: np.random.Generator) -> tuple[str, dict, float]:
    """(equation family, parameters in seconds/degrees, field strength) of a random acquisition."""
    fam = FAMILIES[rng.choice(len(FAMILIES), p=FAMILY_P)]
    b0 = float(rng.choice([1.5, 3.0, 7.0], p=[0.4, 0.45, 0.15]) * rng.uniform(0.95, 1.05))
    if fam == "SPGR":
        tr = math.exp(rng.uniform(math.log(0.005), math.log(0.1)))
        return "SPGR", {"tr": tr, "te": rng.uniform(0.002, min(0.012, 0.8 * tr)), "flip_angle": rng.uniform(5, 60)}, b0
    if fam == "MPRAGE":
        ti = rng.uniform(0.5, 1.3)
        return "MPRAGE", {"ti": ti, "td": rng.uniform(0.2, 2.0), "tau": 0.01}, b0
    if fam == "T2w":
        return "TSE", {"tr": rng.uniform(2.5, 8.0), "te": rng.uniform(0.06, 0.14)}, b0
    if fam == "PDw":
        return "TSE", {"tr": rng.uniform(2.0, 6.0), "te": rng.uniform(0.008, 0.035)}, b0
    return "FLAIR", {"tr": rng.uniform(6.0, 11.0), "te": rng.uniform(0.07, 0.14), "ti": rng.uniform(1.8, 2.8)}, b0


def class_signals(classes, rng: np.random.Generator, physics_p: float = 0.75) -> tuple[np.ndarray, str]:
    """Signed signal per tissue class (background 0) and a description of the contrast."""
    from bidsapp.physics import equations
    from bidsapp.physics.tissues import property_table, sample_multipliers

    if rng.random() < physics_p:
        seq, params, b0 = sample_sequence(rng)
        tab = property_table(classes, b0, sample_multipliers(classes, rng, scale=2.5))
        s = np.asarray(equations.signal(seq, tab[:, 0], tab[:, 1], tab[:, 2], tab[:, 3], params, magnitude=False),
                       dtype=np.float64)
        s = s / max(np.abs(s).max(), 1e-12)
        desc = f"{seq} {b0:.1f}T"
    else:
        s = rng.uniform(0.0, 1.0, len(classes))
        desc = "random"
    s[0] = 0.0
    return s.astype(np.float32), desc


# ------------------------------------------------------------------------------------------ heads
@dataclass
class Head:
    name: str
    fractions: "object"   # torch (C, X, Y, Z) float32, RAS
    classes: tuple
    brain: "object"       # torch (X, Y, Z) brain fraction
    centre: np.ndarray    # brain centre of mass (voxels)
    head_box: np.ndarray  # (2, 3) first and last voxel of the head (non-background fraction >= 0.5)


AGED_GM_LOSS = 0.25
"""Cortical GM the most-aged copy of a head loses (turned into CSF from the pial side)."""
AGED_VENTRICLE_GROWTH = 1.5
"""How much the most-aged copy's ventricles grow (1.5: to 2.5 times their volume)."""


def aged_count(n: int) -> str:
    """``"1 aged copy"`` / ``"n aged copies"``: the training log's and the card's words."""
    return f"{n} aged {'copy' if n == 1 else 'copies'}"


def aged_copies(phantom, n: int) -> list:
    """``n`` copies of ``phantom`` with the look of an ageing brain in the same skull: the k-th loses
    ``k / n`` of :data:`AGED_GM_LOSS` of its cortical GM to CSF and its ventricles grow by ``k / n`` of
    :data:`AGED_VENTRICLE_GROWTH`. The brain target does not change (its CSF is brain), but the dark
    band between cortex and skull on T1w widens, as it does in the older brains of ageing studies: the
    anatomies are young and the network, trained on them alone, left out part of a thick outer CSF."""
    from bidsapp.physics.atrophy import age_brain

    return [age_brain(phantom, AGED_GM_LOSS * k / n, AGED_VENTRICLE_GROWTH * k / n) for k in range(1, n + 1)]


TRANSPLANT_SHRINK = (0.96, 1.0)
"""Range of the linear shrink a transplanted brain gets inside its new cavity (0.96: 12 % less brain)."""


def transplants(phantoms: list, names: list[str], n: int, seed: int) -> list[tuple[str, object]]:
    """``n`` new anatomies, each one training anatomy's brain in another's skull
    (:func:`bidsapp.physics.phantom.transplant_brain`), pairs and shrink drawn from ``seed``: ten label maps
    give ten brain-to-skull layers; a held-out head's layer of outer CSF was guessed from them (its brain
    volume off by its own sign, -4 to +6 %), so the pairs give the network more layers to read."""
    from bidsapp.physics.phantom import transplant_brain

    rng = np.random.default_rng([int(seed), 11])
    same = [i for i, ph in enumerate(phantoms) if ph.classes == phantoms[0].classes]
    out = []
    if len(same) < 2:
        return out
    for _ in range(int(n)):
        h, d = rng.choice(same, 2, replace=False)
        shrink = float(rng.uniform(*TRANSPLANT_SHRINK))
        out.append((f"{names[h]}+{names[d]}", transplant_brain(phantoms[h], phantoms[d], shrink)))
    return out


def load_heads(anatomy_dir, use_icbm: bool = True, heldout=HELDOUT, grid_mm: float | None = None,
               aged: int = 0, hybrids: int = 0, seed: int = 0) -> list[Head]:
    """The training anatomies as RAS fraction maps on the network's grid, each followed by ``aged``
    aged copies (:func:`aged_copies`), then ``hybrids`` transplants (:func:`transplants`, from ``seed``)."""
    import torch

    from bidsapp.models.brainmask import GRID_MM
    from bidsapp.physics import phantom as P

    grid_mm = grid_mm or GRID_MM
    srcs = []
    if anatomy_dir is not None and Path(anatomy_dir).is_dir():
        srcs += [(p.name.split("_")[0], p) for p in sorted(Path(anatomy_dir).glob("anat-*_dseg.nii.gz"))
                 if p.name.split("_")[0] not in heldout]
    if use_icbm:
        srcs.append(("icbm152", None))
    if not srcs:
        raise FileNotFoundError(f"no anatomies: {anatomy_dir} has no anat-*_dseg.nii.gz and ICBM152 is off "
                                "(set --anatomy-dir or SCANBRIDGE_DATA_DIR)")
    heads = []
    loaded = [(name, P.load_anatomy(src, resolution=grid_mm).reorient("RAS")) for name, src in srcs]
    extra = transplants([ph for _, ph in loaded], [n for n, _ in loaded], hybrids, seed) if hybrids else []
    for i, (name, ph) in enumerate(loaded + extra):
        ages = aged if i < len(loaded) else 0  # a transplant's layer of CSF is already its own
        for k, copy in enumerate([ph] + (aged_copies(ph, ages) if ages else [])):
            frac = torch.from_numpy(np.ascontiguousarray(copy.fractions))
            brain = torch.from_numpy(np.ascontiguousarray(copy.brain_fraction.astype(np.float32)))
            idx = np.argwhere(copy.brain_mask)
            head = np.argwhere(copy.fractions[0] < 0.5)
            heads.append(Head(name if k == 0 else f"{name}-aged{k}", frac, tuple(copy.classes), brain, idx.mean(0),
                              np.stack([head.min(0), head.max(0)])))
        LOG.info("anatomy %s: %s voxels%s", name, tuple(ph.shape), f", {aged_count(ages)}" if ages else "")
    return heads


class HeadSynth:
    """Random synthetic heads with their brain target (see the module docstring)."""

    def __init__(self, heads: list[Head], size: int = 96, seed: int = 0, max_rotation: float = 20.0,
                 centre: str = "brain", device="cpu"):
        """``device``: where the heads live and the images are made. On a GPU the synthesis runs there
        too, or the processor that feeds it becomes the bottleneck (its random stream then differs from
        the CPU's for the same seed)."""
        import dataclasses

        import torch

        if centre not in CENTRES:
            raise ValueError(f"centre must be one of {', '.join(CENTRES)}, not {centre!r}")
        self.device = torch.device(device)
        self.heads = [h if self.device.type == "cpu" else
                      dataclasses.replace(h, fractions=h.fractions.to(self.device), brain=h.brain.to(self.device))
                      for h in heads]
        self.size, self.max_rotation, self.centre = int(size), float(max_rotation), centre
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator(device=self.device).manual_seed(int(seed))

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "gen": self.gen.get_state()}

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        try:
            self.gen.set_state(state["gen"])
        except RuntimeError:  # a CPU generator's state does not fit a GPU's, nor the reverse
            raise SystemExit(f"the checkpoint's random state was made on another device than {self.device}: "
                             "resume the run with the --device it started on") from None

    def _grid(self, head: Head):
        """Sampling grid (1, S, S, S, 3) for grid_sample: output voxel -> head voxel, normalised."""
        import torch

        rng, S = self.rng, self.size
        shape = np.asarray(head.brain.shape, float)
        rot = rotation(rng.uniform(-self.max_rotation, self.max_rotation, 3))
        scale = np.diag(rng.uniform(0.88, 1.12, 3))
        if rng.random() < 0.5:
            scale[0, 0] *= -1  # left-right flip
        m = rot @ scale
        if self.centre == "head" and rng.random() < 0.5:  # anywhere in the head: face, neck, vertex
            centre = rng.uniform(head.head_box[0], head.head_box[1])
        else:
            centre = head.centre + rng.normal(0, 6.0, 3)  # voxels (12 mm at 2 mm)
        dev = self.device
        o = torch.stack(torch.meshgrid(*[torch.arange(S, dtype=torch.float32, device=dev) - (S - 1) / 2] * 3,
                                       indexing="ij"), -1)
        p = (o @ torch.as_tensor(m.T, dtype=torch.float32, device=dev)
             + torch.as_tensor(centre, dtype=torch.float32, device=dev))
        amp = rng.uniform(0, 2.0)
        if amp > 0:
            coarse = torch.randn((1, 3, 5, 5, 5), generator=self.gen, device=dev) * amp
            disp = torch.nn.functional.interpolate(coarse, size=(S, S, S), mode="trilinear", align_corners=True)
            p = p + disp[0].permute(1, 2, 3, 0)
        norm = 2 * p / torch.as_tensor(shape - 1, dtype=torch.float32, device=dev) - 1
        return norm.flip(-1)[None]  # grid_sample wants (x=W, y=H, z=D)

    def sample(self) -> tuple:
        """(image (1, S, S, S), target (1, S, S, S), description)."""
        import torch
        import torch.nn.functional as F

        from bidsapp.models.brainmask import normalise
        from bidsapp.physics.simulator import bias_field_torch, rician_noise_torch

        rng = self.rng
        head = self.heads[rng.integers(len(self.heads))]
        signals, desc = class_signals(head.classes, rng)
        signed = torch.einsum("cxyz,c->xyz", head.fractions, torch.from_numpy(signals).to(self.device))
        stack = torch.stack([signed, head.brain])[None]
        warped = F.grid_sample(stack, self._grid(head), mode="bilinear", padding_mode="zeros", align_corners=True)[0]
        img, target = warped[0].abs(), warped[1].clamp(0, 1)
        brain = target > 0.5
        tags = [desc]
        if brain.any():
            idx = brain.nonzero()
            lo, hi, mid = idx.min(0).values, idx.max(0).values, idx.float().mean(0)
            if rng.random() < 0.25:  # field of view or neck cut below (may clip the cerebellum)
                cut = int(lo[2] + rng.integers(-15, 6))
                if cut > 0:
                    img[:, :, :cut] = 0
                    target[:, :, :cut] = 0
                    tags.append("cut")
            if rng.random() < 0.2:  # defaced: zero the face in front of and below the brain
                front = int(hi[1] - rng.integers(0, 12))
                below = int(mid[2] + rng.integers(-5, 8))
                face = torch.zeros_like(brain)
                face[:, max(front, 0):, :max(below, 0)] = True
                img[face & (target < 0.05)] = 0
                tags.append("defaced")
        if rng.random() < 0.12:  # already skull-stripped by another tool
            r = int(rng.integers(0, 3))
            keep = (target > rng.uniform(0.2, 0.6)).float()[None, None]
            if r:
                keep = F.max_pool3d(keep, 2 * r + 1, stride=1, padding=r)
            img = img * keep[0, 0]
            tags.append(f"stripped{r}")
        img = img * bias_field_torch(img.shape, float(rng.uniform(0.0, 0.6)), self.gen, device=self.device)[0]
        if rng.random() < 0.5:  # thick slices along a random axis
            ax, k = int(rng.integers(3)), int(rng.choice([2, 3]))
            img = thick_slices(img, ax, k)
            tags.append(f"slices{2 * k}mm")
        if rng.random() < 0.3:
            img = gaussian_blur(img, float(rng.uniform(0.3, 1.0)))
        ref = img[brain].mean() if brain.any() else img.mean()
        snr = math.exp(rng.uniform(math.log(5.0), math.log(80.0)))
        img = rician_noise_torch(img, float(ref) / snr, self.gen)
        img = normalise(img)
        img = img.clamp_min(0) ** float(math.exp(rng.normal(0, 0.25)))
        return img[None].float(), target[None].float(), " ".join(tags)

    def batch(self, n: int):
        import torch

        items = [self.sample() for _ in range(n)]
        return torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items]), [i[2] for i in items]


# ------------------------------------------------------------------------------------------ training
@dataclass
class TrainConfig:
    """One training run; the command-line options and the card's command come from these fields
    (:mod:`bidsapp.training.config`)."""

    anatomy_dir: str = field(metadata={"help": "folder of anat-*_dseg.nii.gz full-head label maps (default "
                                               "$SCANBRIDGE_DATA_DIR/anatomy, i.e. ../shared/data/anatomy)"})
    out: str = field(metadata={"help": "run folder: checkpoint.pt (resumable) and weights/"})
    iterations: int = 3000
    batch: int = 1
    size: int = field(default=96, metadata={"help": "training field of view in voxels of 2 mm"})
    lr: float = 1e-3
    seed: int = 0
    precision: str = precision_field()
    threads: int = field(default=2, metadata={"card": False})
    device: str = field(default="cpu", metadata={"card": False, "choices": ("cpu", "cuda", "auto")})
    checkpoint_every: int = field(default=100, metadata={"card": False})
    max_rotation: float = 20.0
    icbm: bool = field(default=True, metadata={"help": "train on the ICBM152 head too (--no-icbm: leave it out)"})
    centre: str = field(default="brain", metadata={
        "choices": CENTRES,
        "help": "centre of the training fields of view: brain, or head (half of them anywhere in the head)"})
    init_from: str | None = field(default=None, metadata={
        "help": "start from the network of a checkpoint.pt or weights file (a later stage of a chain)"})
    aged: int = field(default=0, metadata={
        "help": "aged copies of each anatomy (cortical GM thinned into CSF, ventricles grown; the k-th of N "
                "loses k/N of 25 %% of its cortex): heads with the thick outer CSF of older brains"})
    hybrids: int = field(default=0, metadata={
        "help": "heads made by transplanting one training anatomy's brain into another's skull (pairs drawn "
                "from --seed): more layers of outer CSF between brain and skull than the label maps have"})


def command_line(cfg: TrainConfig) -> str:
    return config_command_line("scanbridge-train brainmask", cfg, first=("anatomy_dir", "out"))


def train(cfg: TrainConfig, heads: list[Head] | None = None, progress=print, stop_after: int | None = None) -> dict:
    """Train (resuming from ``cfg.out``/checkpoint.pt when present); returns the history with the
    network under ``"net"`` and ``"finished"`` False when the run stopped at iteration ``stop_after``
    before the end (a checkpoint is written there: a chain of cluster jobs, or a training stage that
    a later one starts from)."""
    import torch

    from bidsapp.devices import resolve_device
    from bidsapp.models.brainmask import build_network
    from bidsapp.training.engine import fit, forward_precision, load_initial
    from bidsapp.training.losses import dice_bce_loss

    torch.set_num_threads(int(cfg.threads))
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    heads = heads if heads is not None else load_heads(cfg.anatomy_dir, use_icbm=cfg.icbm, aged=cfg.aged,
                                                       hybrids=cfg.hybrids, seed=cfg.seed)
    synth = HeadSynth(heads, size=cfg.size, seed=cfg.seed, max_rotation=cfg.max_rotation, centre=cfg.centre,
                      device=device)
    net = build_network()
    if cfg.init_from:
        load_initial(cfg.init_from, net)
    net = net.to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    loss_fn = dice_bce_loss()
    amp = forward_precision(cfg, device, progress)

    def step(_it):
        x, y, _ = synth.batch(cfg.batch)
        x, y = x.to(device), y.to(device)
        opt.zero_grad(set_to_none=True)
        with amp():
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach())}

    return fit(cfg, net, opt, step, out=cfg.out, states={"synth": synth}, progress=progress, stop_after=stop_after)


def save(net, cfg: TrainConfig, history: dict, weights_dir=None) -> dict:
    """Write the weights and model card (to ``weights_dir``, default ``cfg.out``/weights)."""
    from bidsapp import __version__
    from bidsapp.models import registry
    from bidsapp.models.brainmask import ARCHITECTURE, GRID_MM, MODEL_NAME

    card = {
        "version": __version__,
        "task": "brain extraction (binary brain mask) of any structural head MRI",
        "architecture": ARCHITECTURE,
        "resolution_mm": GRID_MM,
        "input": "whole image in RAS, box-averaged to 2 mm, intensities / 99.5th percentile of non-zero voxels",
        "output": "brain probability; mask = probability >= 0.5 at native resolution, holes filled, largest component",
        "target": ("truth brain mask of the label maps: GM, WM, deep GM, ventricles and CSF labelled inside the "
                   "brain (extra-cerebral CSF included)"),
        "training": {
            "command": command_line(cfg),
            "seed": cfg.seed,
            "data": ("synthetic heads from the physics engine: label maps "
                     f"{', '.join(sorted(h for h in _anatomy_names(cfg)))} (held out: {', '.join(HELDOUT)})"
                     + (" and the ICBM152 2009a head" if cfg.icbm else "")
                     + (f", each with {aged_count(cfg.aged)} (cortical GM thinned into CSF, ventricles grown)"
                        if cfg.aged else "")
                     + (f", and {cfg.hybrids} transplants (one label map's brain in another's skull)"
                        if cfg.hybrids else "")),
            "iterations": cfg.iterations, "batch": cfg.batch, "patch_voxels": cfg.size,
            **run_facts(cfg, history),
            "final_loss": float(np.mean(history["loss"][-50:])) if history["loss"] else None,
        },
        "metrics": {},
    }
    if cfg.init_from:
        card["training"]["stages"] = stage_commands(cfg, TrainConfig, command_line)
    return registry.save_model(MODEL_NAME, net.state_dict(), card, weights_dir or Path(cfg.out) / "weights")


def _anatomy_names(cfg: TrainConfig) -> list[str]:
    d = Path(cfg.anatomy_dir)
    return [p.name.split("_")[0] for p in sorted(d.glob("anat-*_dseg.nii.gz")) if p.name.split("_")[0] not in HELDOUT]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, TrainConfig, defaults={"anatomy_dir": str(anatomy_dir())})


def _check(cfg) -> str | None:
    return None if cfg.icbm or Path(cfg.anatomy_dir).is_dir() else f"{cfg.anatomy_dir}: no such folder"


def run(args) -> int:
    return run_command("scanbridge-train brainmask", TrainConfig, args, train, save, check=_check)
