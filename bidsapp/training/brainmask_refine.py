"""``scanbridge-train brainmask-refine``: the 1 mm refinement of the learned brain mask's outline.

Why: the brain-extraction U-Net sees the head on a 2 mm grid, where the 1-3 mm of CSF between the
cortex and the skull is one partial-volume voxel. On held-out 1 mm T1w heads its outline ran about
1 mm outside the truth (a layer of skull, the dural sinuses), although the truth itself survives a
2 mm grid (Dice 0.99 after box-averaging and interpolating back). This second, smaller U-Net looks at
the image at 1 mm next to the coarse outline and mends it; the coarse network keeps every global decision.

* Anatomies: the full-head label maps of ``--anatomy-dir`` at their own 1 mm, in RAS, as tissue-class
  indices (``anat-10``..``anat-12`` held out, as for the coarse network).
* Whole synthetic heads at 1 mm: the coarse trainer's :func:`~bidsapp.training.brainmask.class_signals`
  (physics sequences at 1.5-7 T, or a random intensity per class), partial volume as a blur of
  0.3-1 voxel, 10 % already skull-stripped (the target stays the whole brain), a bias field, thick
  slices (2-6 mm along a random axis, back on the 1 mm grid) in 40 %, Rician noise (SNR 5-80), a gamma
  curve. The coarse network then runs on each head exactly as at inference (box-averaged to 2 mm,
  probability interpolated back), so the refinement learns to mend that network's own errors.
* Fields of view: ``--size`` voxels (1 mm) centred within 8 mm of the brain's outline, rotated (up to
  ``--max-rotation`` degrees), scaled +-10 %, flipped and deformed; image and coarse probability are the
  two input channels. Each head serves 16 fields of view from a pool of 4 heads.
* Target: the brain (GM, WM, deep GM, ventricles, CSF inside the brain; holes filled, as the mask's are)
  at 1 mm; loss: soft Dice + BCE.

The training loop, checkpoints and resumption are :func:`bidsapp.training.engine.fit`'s (a resumed run
remakes its pool of heads from their seeds).
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bidsapp.devdata import anatomy_dir
from bidsapp.training.augment import gaussian_blur, rotation, thick_slices
from bidsapp.training.brainmask import HELDOUT, class_signals
from bidsapp.training.config import command_line as config_command_line
from bidsapp.training.engine import add_run_arguments, run_command

LOG = logging.getLogger("scanbridge.train.brainmask_refine")

OUTLINE_JITTER_MM = 8.0


@dataclass
class FineHead:
    name: str
    classes: tuple
    labels: "object"      # torch (1, 2, X, Y, Z) float32: class index and brain (holes filled), RAS, 1 mm
    distance: "object"    # torch (1, 1, X, Y, Z) float32 signed distance to the brain's outline (mm, + inside)
    outline: np.ndarray   # (N, 3) voxels on the brain's outline


def load_fine_heads(anatomy_dir, heldout=HELDOUT) -> list[FineHead]:
    """The training label maps at 1 mm in RAS, with their brain's signed distance map."""
    import nibabel as nib
    import torch
    from scipy import ndimage as ndi

    from bidsapp.physics import phantom as P
    from bidsapp.physics.tissues import TISSUES

    heads = []
    for src in sorted(Path(anatomy_dir).glob("anat-*_dseg.nii.gz")):
        name = src.name.split("_")[0]
        if name in heldout:
            continue
        img = nib.load(str(src))
        lab = np.rint(np.asarray(nib.as_closest_canonical(img).dataobj)).astype(np.int32)
        values = np.unique(lab)
        names = {int(v): P.LABEL_CLASSES.get(int(v), "muscle" if v >= 500 else "deep_GM") for v in values}
        classes = tuple(c for c in P.CLASSES if c in set(names.values()) or c == "background")
        lut = np.zeros(int(values.max()) + 1, np.uint8)
        for v, c in names.items():
            lut[v] = classes.index(c)
        idx = lut[lab]
        nz = np.argwhere(idx > 0)
        lo, hi = np.maximum(nz.min(0) - 4, 0), nz.max(0) + 5
        idx = idx[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        is_brain = np.array([TISSUES[c].brain for c in classes])
        brain = ndi.binary_fill_holes(is_brain[idx])  # vessels inside the brain are brain, as in the mask
        dist = (ndi.distance_transform_edt(brain) - ndi.distance_transform_edt(~brain)).astype(np.float32)
        outline = np.argwhere(brain & ~ndi.binary_erosion(brain)).astype(np.int16)
        heads.append(FineHead(name, classes, torch.from_numpy(np.stack([idx, brain]).astype(np.float32))[None],
                              torch.from_numpy(dist)[None, None], outline))
        LOG.info("anatomy %s: %s voxels at 1 mm", name, idx.shape)
    if not heads:
        raise FileNotFoundError(f"no anatomies: {anatomy_dir} has no anat-*_dseg.nii.gz outside the held-out set "
                                "(set --anatomy-dir or SCANBRIDGE_DATA_DIR)")
    return heads


class OutlineSynth:
    """Random 1 mm fields of view across the brain's outline of whole synthetic heads, each with the
    coarse network's own probability (see the module docstring)."""

    def __init__(self, heads: list[FineHead], size: int = 64, seed: int = 0, max_rotation: float = 20.0,
                 patches_per_head: int = 16, pool: int = 4, coarse=None):
        """``coarse``: the coarse network (default: the shipped one), whose errors the refinement learns to mend;
        each synthetic head serves ``patches_per_head`` fields of view from a pool of ``pool`` heads."""
        import torch

        from bidsapp.models.brainmask import load_model

        self.heads, self.size, self.max_rotation = heads, int(size), float(max_rotation)
        self.patches_per_head, self.pool_size = int(patches_per_head), int(pool)
        self.coarse = coarse if coarse is not None else load_model("cpu")[0]
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.pool: list = []
        self.served = 0

    def state(self) -> dict:
        """The random states and the pool's draws: a resumed run remakes the pool from its seeds."""
        return {"rng": self.rng.bit_generator.state, "gen": self.gen.get_state(), "served": self.served,
                "pool": [e["seed"] for e in self.pool]}

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.gen.set_state(state["gen"])
        self.served = int(state.get("served", 0))
        self.pool = [self._whole_head(int(sd)) for sd in state.get("pool", [])]

    def _whole_head(self, seed: int) -> dict:
        """A synthetic whole head at 1 mm: normalised image, the coarse network's probability on it, target."""
        import torch

        from bidsapp.models.brainmask import normalise, predict_probability
        from bidsapp.models.tissue import resample_shape, resample_to
        from bidsapp.physics.simulator import bias_field_torch, rician_noise_torch

        rng = np.random.default_rng(seed)
        gen = torch.Generator().manual_seed(seed)
        head = self.heads[rng.integers(len(self.heads))]
        idx, target = head.labels[0, 0].long(), head.labels[0, 1]
        signals, desc = class_signals(head.classes, rng)
        img = gaussian_blur(torch.from_numpy(signals)[idx].abs(), float(rng.uniform(0.3, 1.0)))
        tags = [head.name, desc]
        if rng.random() < 0.1:  # already skull-stripped by another tool (0-2 voxels of margin)
            img = img * (head.distance[0, 0] > -float(rng.uniform(0.0, 2.0))).float()
            tags.append("stripped")
        img = img * bias_field_torch(img.shape, float(rng.uniform(0.0, 0.4)), gen)[0]
        if rng.random() < 0.4:
            ax, k = int(rng.integers(3)), int(rng.integers(2, 7))
            img = thick_slices(img, ax, k)
            tags.append(f"slices{k}mm")
        snr = math.exp(rng.uniform(math.log(5.0), math.log(80.0)))
        img = rician_noise_torch(img, float(img[target > 0.5].mean()) / snr, gen)
        img = normalise(img).clamp_min(0) ** float(math.exp(rng.normal(0, 0.25)))
        vol = img.numpy()
        prob_low = predict_probability(self.coarse, resample_to(vol, (1.0, 1.0, 1.0), 2.0))
        prob = resample_shape(prob_low, vol.shape, order=1)
        return {"seed": seed, "head": head, "tags": " ".join(tags),
                "volumes": torch.stack([normalise(img), torch.from_numpy(prob), target])[None].float()}

    def _grid(self, entry: dict):
        import torch
        import torch.nn.functional as F

        rng, S = self.rng, self.size
        m = rotation(rng.uniform(-self.max_rotation, self.max_rotation, 3)) @ np.diag(rng.uniform(0.9, 1.1, 3))
        if rng.random() < 0.5:
            m = m @ np.diag([-1.0, 1.0, 1.0])
        outline = entry["head"].outline
        centre = outline[rng.integers(len(outline))] + rng.normal(0, OUTLINE_JITTER_MM / 2, 3)
        o = torch.stack(torch.meshgrid(*[torch.arange(S, dtype=torch.float32) - (S - 1) / 2] * 3, indexing="ij"), -1)
        p = o @ torch.as_tensor(m.T, dtype=torch.float32) + torch.as_tensor(centre, dtype=torch.float32)
        amp = rng.uniform(0, 2.0)
        if amp > 0:
            coarse = torch.randn((1, 3, 4, 4, 4), generator=self.gen) * amp
            p = p + F.interpolate(coarse, size=(S, S, S), mode="trilinear", align_corners=True)[0].permute(1, 2, 3, 0)
        shape = torch.as_tensor(entry["volumes"].shape[2:], dtype=torch.float32)
        return (2 * p / (shape - 1) - 1).flip(-1)[None]

    def sample(self) -> tuple:
        """(input (2, S, S, S): image and coarse probability, target (1, S, S, S), description)."""
        import torch.nn.functional as F

        if len(self.pool) < self.pool_size or self.served % self.patches_per_head == 0:
            entry = self._whole_head(int(self.rng.integers(2 ** 31)))
            self.pool = (self.pool + [entry])[-self.pool_size:]
        self.served += 1
        entry = self.pool[self.rng.integers(len(self.pool))]
        grid = self._grid(entry)
        v = F.grid_sample(entry["volumes"], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
        target = (F.grid_sample(entry["volumes"][:, 2:], grid, mode="nearest", padding_mode="zeros",
                                align_corners=True)[0] > 0.5).float()
        return v[:2], target, entry["tags"]

    def batch(self, n: int):
        import torch

        items = [self.sample() for _ in range(n)]
        return torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items]), [i[2] for i in items]


# ------------------------------------------------------------------------------------------ training
@dataclass
class TrainConfig:
    """One training run; the command-line options and the card's command come from these fields."""

    anatomy_dir: str = field(metadata={"help": "folder of anat-*_dseg.nii.gz full-head label maps (default "
                                               "$SCANBRIDGE_DATA_DIR/anatomy, i.e. ../shared/data/anatomy)"})
    out: str = field(metadata={"help": "run folder: checkpoint.pt (resumable) and weights/"})
    iterations: int = 3000
    batch: int = 2
    size: int = field(default=64, metadata={"help": "training field of view in voxels of 1 mm"})
    lr: float = 1e-3
    seed: int = 0
    threads: int = field(default=2, metadata={"card": False})
    checkpoint_every: int = field(default=100, metadata={"card": False})
    max_rotation: float = 20.0


def command_line(cfg: TrainConfig) -> str:
    return config_command_line("scanbridge-train brainmask-refine", cfg, first=("anatomy_dir", "out"))


def train(cfg: TrainConfig, heads: list[FineHead] | None = None, progress=print, stop_after: int | None = None) -> dict:
    """Train (resuming from ``cfg.out``/checkpoint.pt when present); returns the history with ``net``."""
    import torch

    from bidsapp.models.brainmask import build_refine_network
    from bidsapp.training.engine import fit
    from bidsapp.training.losses import dice_bce_loss

    torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    heads = heads if heads is not None else load_fine_heads(cfg.anatomy_dir)
    synth = OutlineSynth(heads, size=cfg.size, seed=cfg.seed, max_rotation=cfg.max_rotation)
    net = build_refine_network()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    loss_fn = dice_bce_loss()

    def step(_it):
        x, y, _ = synth.batch(cfg.batch)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach())}

    return fit(cfg, net, opt, step, out=cfg.out, states={"synth": synth}, progress=progress, stop_after=stop_after)


def save(net, cfg: TrainConfig, history: dict, weights_dir=None) -> dict:
    """Write the weights and model card (to ``weights_dir``, default ``cfg.out``/weights)."""
    import torch

    from bidsapp import __version__
    from bidsapp.models import registry
    from bidsapp.models.brainmask import BAND_MM, REFINE_ARCHITECTURE, REFINE_MM, REFINE_NAME

    names = [p.name.split("_")[0] for p in sorted(Path(cfg.anatomy_dir).glob("anat-*_dseg.nii.gz"))
             if p.name.split("_")[0] not in HELDOUT]
    card = {
        "version": __version__,
        "task": "brain extraction, second stage: the brain's outline at 1 mm next to the coarse network's",
        "architecture": REFINE_ARCHITECTURE,
        "resolution_mm": REFINE_MM,
        "band_mm": BAND_MM,
        "input": ("channel 0: the image in RAS at 1 mm, intensities / 99.5th percentile of non-zero voxels; "
                  "channel 1: the coarse network's brain probability interpolated to 1 mm"),
        "output": (f"brain probability, used within {BAND_MM:g} mm of the coarse mask's outline; "
                   "mask = probability >= 0.5 at native resolution"),
        "target": "truth brain mask of the label maps at 1 mm (extra-cerebral CSF included)",
        "training": {
            "command": command_line(cfg),
            "seed": cfg.seed,
            "data": f"synthetic 1 mm fields of view across the brain's outline, label maps {', '.join(names)} "
                    f"(held out: {', '.join(HELDOUT)})",
            "iterations": cfg.iterations, "batch": cfg.batch, "patch_voxels": cfg.size,
            "seconds": round(history["seconds"], 1), "threads": cfg.threads, "device": "cpu",
            "torch": torch.__version__, "platform": platform.platform(),
            "final_loss": float(np.mean(history["loss"][-50:])) if history["loss"] else None,
        },
        "metrics": {},
    }
    return registry.save_model(REFINE_NAME, net.state_dict(), card, weights_dir or Path(cfg.out) / "weights")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, TrainConfig, defaults={"anatomy_dir": str(anatomy_dir())})


def _check(cfg) -> str | None:
    return None if Path(cfg.anatomy_dir).is_dir() else f"{cfg.anatomy_dir}: no such folder"


def run(args) -> int:
    return run_command("scanbridge-train brainmask-refine", TrainConfig, args, train, save, check=_check)
