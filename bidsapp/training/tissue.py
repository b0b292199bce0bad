"""``scanbridge-train tissue``: train the physics-aware tissue U-Net (or its no-physics ablation).

The data (simulated brains, parameters, patch batches) come from :mod:`bidsapp.training.tissue_data`; the
loop is the shared one (:func:`bidsapp.training.engine.fit`: checkpoints, exact resumption); the options
and the card's command are generated from :class:`TrainConfig`. The loss is MONAI's soft Dice plus
cross-entropy on the soft target, both inside the brain mask, optionally with the paired consistency
terms of :mod:`bidsapp.training.losses`. Everything derives from ``--seed``: the same command gives the
same weights on the same hardware and library versions.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bidsapp.models.unet import INJECTIONS
from bidsapp.physics.contrast import LOW_CONTRAST
from bidsapp.training.engine import precision_field
from bidsapp.training.tissue_data import (
    DEFAULT_ANATOMY_DIR,
    FLIP_AXES,
    GM_WM_SQUEEZE,
    HELDOUT,
    ORIENTATIONS,
    PROPERTY_SCALE,
    RANDOM_CONTRAST_P,
    SAMPLING,
    SPIN_ECHO_P,
    TARGETS,
    PatchSampler,
    Subject,
    anatomy_sources,
    build_subjects,
    vector_statistics,
)

LOG = logging.getLogger("scanbridge.train.tissue")


# ------------------------------------------------------------------------------------------ config
def _ints(text) -> tuple:
    return tuple(int(x) for x in str(text).split(","))


@dataclass
class TrainConfig:
    """``scanbridge-train tissue``: its options and the card's command are generated from these fields
    (:mod:`bidsapp.training.config`)."""

    out: str = field(metadata={"help": "folder for the checkpoint, the training log and cached subjects"})
    seed: int = 0
    physics: bool | str = field(default=True, metadata={
        "consts": {"--physics": True, "--no-physics": False, "--both": "both"},
        "help": {"--physics": "train the physics-aware model (default)", "--no-physics": "train the no-physics ablation",
                 "--both": "train both on identical batches (same seed, data and budget)"}})
    anatomy_dir: str | None = field(default=str(DEFAULT_ANATOMY_DIR), metadata={
        "help": f"shared label maps (anat-XX_dseg.nii.gz); {', '.join(HELDOUT)} are held out"})
    icbm: bool = field(default=True, metadata={"help": "use nilearn's ICBM152 anatomy too"})
    deformations: int = field(default=2, metadata={"help": "random deformations per anatomy"})
    resolution: float = field(default=2.0, metadata={"help": "training/inference resolution in mm"})
    patch: int = field(default=32, metadata={"help": "patch edge in voxels"})
    batch: int = 4
    iterations: int = 1000
    lr: float = 2e-3
    features: tuple = field(default=(8, 16, 32, 64), metadata={
        "parse": _ints, "format": lambda v: ",".join(map(str, v)), "help": "channels per U-Net level"})
    precision: str = precision_field()
    device: str = field(default="auto", metadata={"card": False, "choices": ("cpu", "cuda", "auto")})
    threads: int = field(default=1, metadata={"card": False, "help": "CPU threads for torch"})
    checkpoint_every: int = field(default=100, metadata={
        "card": False, "help": "iterations between checkpoints in --out (0: only at the end); a rerun resumes"})
    log_every: int = field(default=25, metadata={"cli": False})
    time_limit_min: float | None = field(default=None, metadata={
        "card": False, "help": "stop after this many minutes, leaving a checkpoint (rerun to continue)"})
    weights_dir: str | None = field(default=None, metadata={
        "card": False, "help": "where to write weights + card (default: the package)"})
    cache: str | None = field(default=None, metadata={
        "card": False, "help": "folder to cache simulated subjects between runs (default: OUT/cache)"})
    consistency: float = field(default=0.0, metadata={
        "help": "weight of a paired consistency loss (same patch, two acquisitions); 0 = paper's loss"})
    """Weight of the paired consistency loss (0: the paper's training, Dice + CE only)."""
    init_from: str | None = field(default=None, metadata={
        "help": "continue from the weights + cards in this folder (e.g. bidsapp/models/weights)"})
    """Folder of weights + cards to continue training from (fine-tuning); None starts from scratch."""
    physics_injection: str = field(default="concat", metadata={
        "choices": INJECTIONS, "help": "how the physics channels enter the network (see bidsapp.models.unet)"})
    """How the physics channels enter the network (see :mod:`bidsapp.models.unet`)."""
    physics_from_base: bool = field(default=False, metadata={
        "help": "start the physics model from the ablation in --init-from, physics injection at zero (needs a "
                "--physics-injection other than concat)"})
    """Start the physics network from the ablation in ``init_from`` (``norm_*`` injections only)."""
    stop_after: int | None = field(default=None, metadata={
        "help": "stop after this many iterations of the --iterations schedule and save the weights (reproduces a "
                "checkpoint of a longer run; rerun without it to continue)"})
    """Stop (and save) after this many iterations of an ``iterations``-long schedule: reproduces a
    checkpoint taken part-way through a run."""
    low_contrast: float = field(default=0.0, metadata={
        "help": f"probability that an SPGR sample is drawn among settings with GM/WM contrast below {LOW_CONTRAST:g} "
                "(hard examples; 0 = plain uniform draws)"})
    """Probability that an SPGR sample is drawn among low GM/WM-contrast settings (see
    :func:`sample_parameters`); 0 = the plain uniform draw."""
    volume_consistency: float = field(default=0.0, metadata={
        "help": "weight of a paired volume-consistency loss (same patch, two acquisitions: relative difference of "
                "each class's soft volume); 0 = the paper's loss"})
    """Weight of :func:`bidsapp.training.losses.volume_consistency_loss` (0: the paper's loss)."""
    sampling: str = field(default="volume", metadata={
        "choices": SAMPLING, "help": "volume: simulate each training brain whole, then crop the patch; patch: "
                                     "simulate only the patch (same distribution, a quarter of the time or less)"})
    """How patches are simulated (:data:`SAMPLING`): the whole brain then cropped, or only the patch
    (:func:`normalised_patch`)."""
    orientation: str = field(default="native", metadata={
        "choices": ORIENTATIONS, "help": "voxel order of the training brains: native (each label map's own; earlier "
                                         "stages) or RAS (the order the participant workflow gives the model)"})
    """Voxel order of the training brains (:data:`ORIENTATIONS`); ``native`` reproduces earlier stages."""
    randomise: float = field(default=0.0, metadata={
        "help": "probability that a sample is domain-randomised (wider tissue properties, thick slices, blur, strong "
                "bias, low SNR, gamma; for --no-physics also spin-echo and random contrasts)"})
    """Probability that a sample is domain-randomised (:func:`randomised_sample`); 0 = the physics
    simulation alone, as the earlier stages trained."""
    target: str = field(default="gold-standard", metadata={
        "choices": TARGETS, "help": "what patches are labelled with: gold-standard (the paper's R1-based "
                                    "probabilities) or fractions (the label map's tissue fractions)"})
    """What patches are labelled with (:data:`TARGETS`); ``gold-standard`` reproduces stages 1-10."""
    dice_weight: float = field(default=1.0, metadata={
        "help": "weight of the soft Dice term beside the cross-entropy (0: cross-entropy alone, whose probabilities "
                "are calibrated to the targets)"})
    """Weight of the soft Dice term beside the cross-entropy. Cross-entropy alone is minimised by the
    target itself, so with ``fractions`` targets its probabilities sum to unbiased volumes; soft Dice
    pushes partial-volume voxels to 0 or 1 (stages 1-10: 1)."""
    @property
    def paired(self) -> bool:
        """Batches of paired acquisitions (what the consistency losses compare)."""
        return self.consistency > 0 or self.volume_consistency > 0

    def __post_init__(self):
        if not 0.0 <= self.low_contrast <= 1.0:
            raise ValueError(f"--low-contrast must be between 0 and 1, got {self.low_contrast:g}")
        if self.physics_from_base and not (self.init_from and self.physics_injection != "concat"):
            raise ValueError("--physics-from-base needs --init-from and a --physics-injection other than concat")
        if self.consistency < 0 or self.volume_consistency < 0:
            raise ValueError("--consistency and --volume-consistency must be >= 0")
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

    from bidsapp.models.tissue import CLASSES, N_PARAMS
    from bidsapp.models.unet import UNet3D

    torch.manual_seed(seed)
    net = UNet3D(in_channels=1, out_channels=len(CLASSES), features=tuple(cfg.features),
                 n_params=N_PARAMS if physics else 0,
                 physics_injection=cfg.physics_injection if physics else "concat")
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


def _networks(cfg: TrainConfig, device) -> list[dict]:
    """The network(s) ``cfg.physics`` asks for, initialised from ``init_from`` when given."""
    variants = [True, False] if cfg.physics == "both" else [bool(cfg.physics)]
    runs = []
    for phys in variants:
        net = build_network(cfg, cfg.seed, phys)
        init = None
        if cfg.init_from:
            from bidsapp.models import registry

            from_base = phys and cfg.physics_from_base
            state, card0 = registry.load_state_dict(_model_name(False if from_base else phys), cfg.init_from)
            net.load_weights(state, ablation=from_base)  # from the ablation: the injection starts at zero
            init = {"name": card0["name"], "sha256": card0["sha256"], "command": card0["training"]["command"],
                    "iterations": card0["training"].get("iterations_run"),
                    "as": "ablation weights + zero-initialised physics injection" if from_base else "same model"}
        net = net.to(device)
        runs.append({"model": net, "physics": phys, "init": init})
    return runs


def train(cfg: TrainConfig, subjects: list[Subject] | None = None, progress=None) -> list[dict]:
    """Train the model(s) of ``cfg.physics`` (True, False or "both") on identical batches, on the shared
    loop (:func:`bidsapp.training.engine.fit`: checkpoints in ``cfg.out``, a rerun resumes).

    Returns one history dict per model (``model``, ``physics``, ``step``, ``loss``, ``seconds``,
    ``iterations``, ``n_subjects``, ``init``, ``finished``); "both" gives the physics model and its
    ablation the same seed, the same batches and the same number of iterations: they train side by side
    as one module with one optimiser whose parameter groups are each network's own (AdamW's update is
    per weight, so each network ends exactly as it would alone). ``progress`` receives each log line.
    """
    import torch

    from bidsapp.devices import resolve_device
    from bidsapp.training.engine import fit, forward_precision
    from bidsapp.training.losses import MaskedDiceCE, consistency_loss, volume_consistency_loss

    torch.set_num_threads(max(1, int(cfg.threads)))
    device = resolve_device(cfg.device)
    subjects = subjects if subjects is not None else load_or_build_subjects(cfg)
    runs = _networks(cfg, device)
    nets = torch.nn.ModuleList([r["model"] for r in runs])
    opt = torch.optim.AdamW([{"params": list(r["model"].parameters())} for r in runs], lr=cfg.lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(cfg.iterations))
    sampler = PatchSampler(subjects, cfg.patch, seed=cfg.seed, low_contrast=cfg.low_contrast, sampling=cfg.sampling,
                           randomise=cfg.randomise, physics=cfg.physics is not False, target=cfg.target)
    loss_fn = MaskedDiceCE(dice_weight=cfg.dice_weight)
    names = ["physics" if r["physics"] else "base" for r in runs]
    amp = forward_precision(cfg, device, progress or LOG.info)

    def step(_it):
        x, m, y, p = (t.to(device) for t in sampler.batch(cfg.batch, pairs=cfg.paired))
        opt.zero_grad(set_to_none=True)
        terms = {}
        for name, net in zip(names, nets):
            with amp():
                logits = net(x, p if net.uses_physics else None)
            logits = logits.float()
            loss = loss_fn(logits, y, m)
            if cfg.consistency > 0:
                loss = loss + cfg.consistency * consistency_loss(logits, m)
            if cfg.volume_consistency > 0:
                loss = loss + cfg.volume_consistency * volume_consistency_loss(logits, m)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            terms[name] = loss.detach()
        opt.step()
        return terms

    say = progress or LOG.info
    deadline = cfg.time_limit_min * 60 if cfg.time_limit_min else None
    hist = fit(cfg, nets, opt, step, out=cfg.out, states={"sampler": sampler}, sched=sched, progress=say,
               stop_after=cfg.stop_after, logged=tuple(names), time_limit_s=deadline)
    done = len(hist[names[0]])
    marks = [i for i in range(cfg.log_every, done + 1, cfg.log_every)] if cfg.log_every > 0 else []
    if done and (not marks or marks[-1] != done):
        marks.append(done)
    for r, name in zip(runs, names):
        losses = hist[name]
        r.update(step=marks, loss=[float(np.mean(losses[max(0, b - cfg.log_every):b])) for b in marks],
                 seconds=hist["seconds"], iterations=done, n_subjects=len(subjects), finished=hist["finished"])
    return runs


def command_line(cfg: TrainConfig) -> str:
    """The card's command: the recipe (options that change the weights) of ``cfg``."""
    from bidsapp.training.config import command_line as generated

    return generated("scanbridge-train tissue", cfg, first=(
        "out", "seed", "physics", "iterations", "deformations", "resolution", "patch", "batch", "lr", "features",
        "anatomy_dir"))


def save(net, cfg: TrainConfig, history: dict, final: bool = True) -> dict:
    import torch

    from bidsapp import __version__
    from bidsapp.models import registry
    from bidsapp.models.tissue import CLASSES, PARAMETER_LAYOUT, TRAINING_RANGES

    physics = net.uses_physics
    name = _model_name(physics)
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
            "optimizer": f"AdamW lr {cfg.lr:g}, linear warm-up then cosine decay",
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
            "precision": cfg.precision,
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
    from bidsapp.training.config import add_config_arguments

    add_config_arguments(p, TrainConfig, required=("out",))


def config_from_args(args) -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``scanbridge-train tissue`` arguments (a card's ``command``
    parsed with :func:`add_arguments` gives that run's recipe); ValueError for an invalid one."""
    from bidsapp.training.config import config_from_args as from_args

    return from_args(TrainConfig, args, cache=args.cache or str(Path(args.out) / "cache"))


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"scanbridge-train tissue: {exc}", file=sys.stderr)
        return 2
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = train(cfg)
    planned = min(cfg.iterations, cfg.stop_after or cfg.iterations)
    if runs[0]["iterations"] < planned:  # the time limit: the checkpoint holds the run
        print(f"scanbridge-train tissue: stopped at iteration {runs[0]['iterations']} of {planned} (time limit); "
              f"rerun the same command to continue from {out / 'checkpoint.pt'}")
        return 0
    for run_ in runs:
        net = run_.pop("model")
        card = save(net, cfg, run_, final=True)
        log = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
               "history": run_, "card": card}
        (out / f"{card['name']}_training.json").write_text(json.dumps(log, indent=2))
        print(f"scanbridge-train tissue: wrote {card['name']} (sha256 {card['sha256'][:12]}) after "
              f"{run_['iterations']} iterations in {run_['seconds'] / 60:.1f} min")
    return 0
