"""``scanbridge-train wmh-features``: the frozen feature network of the WMH content loss.

The paper's feature network is ImageNet VGG19, read at its first two max pools; its Table 2 shows that
what matters is a fixed, good multi-scale extractor, not ImageNet itself. Here two VGG stages
(:func:`bidsapp.models.wmh.build_feature_network`) are trained once as an autoencoder of what the
content loss shows them, a masked FLAIR slice and its mask, then frozen:

- images: simulated FLAIR slices exactly as the generator sees them (:class:`bidsapp.training.wmh.WMHSynth`,
  its own scanners and seed) and, when ``--real-dir`` holds BIDS FLAIRs, real axial slices prepared as at
  inference (brain mask from the shipped brain extraction, square crop, mean-in-brain scaling);
- masks: the slice's lesions, its ventricles or cortex, or a smooth random blob field, each either
  binary, soft-binarised (0.1/0.9) or a soft probability map (what a generator in training predicts);
- loss: mean squared reconstruction error of both channels (image x mask, mask) from the second
  stage's features (stride 4).

Only the encoder is shipped (``wmh_features.pt`` with its card); the decoder existed for training.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bidsapp.devdata import anatomy_dir
from bidsapp.training.engine import add_run_arguments, run_command, run_facts
from bidsapp.training.config import command_line as config_command_line



@dataclass
class FeaturesConfig:
    anatomy_dir: str = field(metadata={"help": "folder of anat-*_dseg.nii.gz label maps"})
    out: str = field(metadata={"help": "run folder: checkpoint.pt (resumable) and weights/"})
    real_dir: str | None = field(default=None, metadata={
        "help": "a BIDS dataset whose FLAIRs add real slices (unlabelled; default: none)"})
    iterations: int = 600
    batch: int = 16
    size: int = 160
    lr: float = 1e-3
    seed: int = 0
    real_fraction: float = field(default=0.3, metadata={"help": "share of real slices when --real-dir is given"})
    threads: int = field(default=2, metadata={"card": False})
    device: str = field(default="cpu", metadata={"card": False, "choices": ("cpu", "cuda", "auto")})
    checkpoint_every: int = field(default=100, metadata={"card": False})


def command_line(cfg: FeaturesConfig) -> str:
    return config_command_line("scanbridge-train wmh-features", cfg, first=("anatomy_dir", "out"))


def real_slices(bids_dir, size: int, progress=print) -> np.ndarray:
    """Axial slices (N, size, size) of every ``*_FLAIR.nii[.gz]`` under ``bids_dir``, prepared as the
    WMH model prepares them (brain slices only)."""
    import nibabel as nib
    import torch
    import torch.nn.functional as F

    from bidsapp.models import brainmask
    from bidsapp.models.lesion import normalise
    from bidsapp.models.tissue import to_ras
    from bidsapp.models.wmh import crop_square, square_box

    out = []
    for path in sorted(Path(bids_dir).rglob("*_FLAIR.nii*")):
        img = nib.load(str(path))
        mask = brainmask.extract(img).mask
        data, _ = to_ras(np.asarray(img.dataobj, np.float32), img.affine)
        mask, _ = to_ras(mask > 0, img.affine)
        norm = normalise(data * mask, mask)
        box = square_box(mask.any(2))
        for z in np.flatnonzero(mask.sum((0, 1)) > 0.1 * mask.sum((0, 1)).max()):
            sl = torch.as_tensor(crop_square(norm[:, :, z], box))[None, None]
            out.append(F.interpolate(sl, size=(size, size), mode="bilinear", antialias=True)[0, 0].numpy())
        progress(f"real slices: {path.name}")
    return np.stack(out).astype(np.float32) if out else np.zeros((0, size, size), np.float32)


class MaskedSlices:
    """Pairs (image x mask, mask) for the autoencoder (see the module docstring)."""

    def __init__(self, synth, real: np.ndarray, real_fraction: float, seed: int):
        import torch

        self.synth, self.real, self.real_fraction = synth, real, float(real_fraction)
        self.rng = np.random.default_rng([seed, 2])
        self.gen = torch.Generator().manual_seed(int(seed) + 2)

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "gen": self.gen.get_state(), "synth": self.synth.state()}

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.gen.set_state(state["gen"])
        self.synth.set_state(state["synth"])

    def _blobs(self, shape):
        import torch
        import torch.nn.functional as F

        coarse = torch.randn((1, 1, 10, 10), generator=self.gen)
        field = F.interpolate(coarse, size=shape, mode="bicubic", align_corners=False)[0, 0]
        return (field > float(self.rng.uniform(0.8, 2.0))).float()

    def sample(self):
        import torch

        rng = self.rng
        image, target, keep, _ = self.synth.sample()
        if len(self.real) and rng.random() < self.real_fraction:
            image = torch.as_tensor(self.real[rng.integers(len(self.real))])[None]
            keep = (image > 0).float()
            target = torch.zeros((4, *image.shape[1:]))
        choice = rng.integers(4)
        mask = self._blobs(image.shape[1:])[None] if choice == 3 or not target[choice].any() else target[choice:choice + 1]
        mask = mask * keep
        style = rng.integers(3)
        if style == 1:
            mask = 0.1 + 0.8 * mask
        elif style == 2:  # a soft probability map: the mask smoothed over a few pixels
            import torch.nn.functional as F

            k = 2 * int(rng.integers(1, 4)) + 1
            mask = F.avg_pool2d(mask[None], k, stride=1, padding=k // 2, count_include_pad=False)[0]
        return torch.cat([image * mask, mask])

    def batch(self, n: int):
        import torch

        return torch.stack([self.sample() for _ in range(n)])


def train(cfg: FeaturesConfig, progress=print, stop_after: int | None = None, heads=None) -> dict:
    import torch

    from bidsapp.devices import resolve_device
    from bidsapp.models.wmh import build_feature_network
    from bidsapp.training.engine import fit
    from bidsapp.training.lesion import load_heads
    from bidsapp.training.wmh import WMHSynth, make_scanners

    torch.set_num_threads(int(cfg.threads))
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    heads = heads if heads is not None else load_heads(cfg.anatomy_dir)
    synth = WMHSynth(heads, make_scanners(32, np.random.default_rng([cfg.seed, 3])), size=cfg.size, seed=cfg.seed)
    real = real_slices(cfg.real_dir, cfg.size, progress) if cfg.real_dir else np.zeros((0, cfg.size, cfg.size))
    data = MaskedSlices(synth, real, cfg.real_fraction, cfg.seed)
    net = build_feature_network(decoder=True).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)

    def step(_it):
        x = data.batch(cfg.batch).to(device)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(net.reconstruct(x), x)
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach())}

    hist = fit(cfg, net, opt, step, out=cfg.out, states={"data": data}, progress=progress, stop_after=stop_after)
    return dict(hist, real_slices=int(len(real)))


def save(net, cfg: FeaturesConfig, history: dict, weights_dir=None) -> dict:
    from bidsapp import __version__
    from bidsapp.models import registry
    from bidsapp.models.wmh import FEATURE_ARCHITECTURE, FEATURES_NAME, feature_state

    card = {
        "version": __version__,
        "task": "frozen feature network of the WMH Siamese content loss (training only; never run on user data)",
        "architecture": FEATURE_ARCHITECTURE,
        "input": "two channels: a normalised FLAIR slice times a mask, and the mask",
        "output": "the features after each of the two max pools (stride 2 and 4)",
        "training": {
            "command": command_line(cfg),
            "seed": cfg.seed,
            "data": ("autoencoder of simulated FLAIR slices (WMH training data, 32 simulated protocols)"
                     + (f" and {history.get('real_slices', 0)} real axial FLAIR slices of {cfg.real_dir}"
                        if cfg.real_dir else "")),
            "iterations": cfg.iterations, "batch": cfg.batch,
            **run_facts(cfg, history),
            "final_loss": float(np.mean(history["loss"][-50:])) if history.get("loss") else None,
        },
        "metrics": {"reconstruction_mse": float(np.mean(history["loss"][-50:])) if history.get("loss") else None},
    }
    return registry.save_model(FEATURES_NAME, feature_state(net), card, weights_dir or Path(cfg.out) / "weights")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, FeaturesConfig, defaults={"anatomy_dir": str(anatomy_dir())})


def _check(cfg) -> str | None:
    for folder in (cfg.anatomy_dir, cfg.real_dir):
        if folder and not Path(folder).is_dir():
            return f"{folder}: no such folder"
    return None


def run(args) -> int:
    return run_command("scanbridge-train wmh-features", FeaturesConfig, args, train, save, check=_check)
