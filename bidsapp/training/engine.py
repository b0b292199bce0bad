"""The one training loop of scanbridge's trainers: schedule, progress, checkpoints and exact resumption.

A trainer builds its network, optimiser and sampler, then hands :func:`fit` a ``step(iteration)``
function that draws a batch, computes the losses, steps the optimiser and returns the terms to log.
:func:`fit` owns everything else, the same way for every model:

- a learning-rate schedule stepped once per iteration (default :func:`cosine_schedule`; a trainer whose
  recipe has none passes :func:`constant_schedule`);
- a line of progress every :data:`LOG_EVERY` iterations (the mean of each logged term);
- a checkpoint in ``out``/checkpoint.pt every ``checkpoint_every`` iterations and at the end, written
  atomically, holding the network, the optimiser, the schedule, every sampler's random state, torch's
  random state, the history and the recipe (the config);
- resumption from that checkpoint when the recipe matches (fields that only say where it runs may
  differ; fields added to a config later keep their default), refused with one line otherwise;
- ``stop_after``: end at that iteration of the schedule, leaving a checkpoint (a chain of cluster
  jobs, or a stage that a later ``--init-from`` stage starts from); ``time_limit_s``: end, with a
  checkpoint, at the first iteration past that many seconds of training (a session's budget).

With ``out=None`` nothing is written: a network trained inside a run of the app (MRAI-NET at the group
level, in seconds) needs the same loop but no checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

LOG_EVERY = 25
RUN_FIELDS = ("threads", "device", "checkpoint_every", "stop_after", "time_limit_min")
"""Config fields that say where a run executes or where it pauses, not what it computes: a resumed run may
change them, as it may every field left out of the card's command (``card=False``: threads, device,
folders)."""


TRAIN_PRECISIONS = ("float32", "bfloat16")


def precision_field():
    """A trainer config's ``precision``: float32 (the default) or bfloat16 mixed precision for the
    network's forward pass (weights, optimiser and losses stay float32). On a CPU with AVX512-BF16 or AMX
    the network's share of an iteration takes 0.5-0.7 times as long (``benchmarks/training/steps.py``);
    it is part of the recipe and written into the card."""
    return dataclasses.field(default="float32", metadata={
        "choices": TRAIN_PRECISIONS,
        "help": "precision of the forward pass: float32, or bfloat16 mixed precision (about 1.5 times the "
                "iterations per hour where the hardware computes bfloat16 natively)"})


def forward_precision(cfg, device, progress=print):
    """A factory of the context a trainer's forward pass runs in (``with amp(): logits = net(x)``):
    :func:`bidsapp.devices.autocast` in ``cfg.precision``. Says so when bfloat16 is asked for on hardware
    that only emulates it (slower than float32)."""
    from functools import partial

    from bidsapp.devices import autocast, native_bfloat16

    name = getattr(cfg, "precision", "float32")
    if name == "bfloat16":
        native = native_bfloat16(device)
        progress("training in bfloat16 mixed precision" + ("" if native else
                 f"; {device} does not compute bfloat16 natively, expect it slower than float32"))
    return partial(autocast, device, name)


def run_facts(cfg, history: dict) -> dict:
    """Where and how a run trained, for its card: seconds, threads, device, precision, torch, platform."""
    import platform

    import torch

    return {"seconds": round(history["seconds"], 1), "threads": cfg.threads, "device": cfg.device,
            "precision": getattr(cfg, "precision", "float32"), "torch": torch.__version__,
            "platform": platform.platform()}


def cosine_schedule(opt, iterations: int, floor: float = 0.02):
    """Learning rate from its initial value down to ``floor`` times it along a half cosine."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(i, iterations) / iterations)))


def constant_schedule(opt):
    """The optimiser's learning rate, unchanged (RMSprop as MRAI-NET's reference implementation runs it)."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)


def same_recipe(saved: dict, cfg) -> bool:
    """Whether a checkpoint's config ``saved`` is the recipe of ``cfg`` (see the module docstring)."""
    current = dataclasses.asdict(cfg)
    defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}
    loose = set(RUN_FIELDS) | {f.name for f in dataclasses.fields(cfg) if f.metadata.get("card", True) is False}
    run_only = {k: saved[k] for k in loose if k in saved and k in current}
    return defaults | saved == current | run_only


def fit(cfg, net, opt, step: Callable[[int], dict], *, out, states: dict | None = None, sched=None,
        progress=print, stop_after: int | None = None, logged=("loss",), time_limit_s: float | None = None) -> dict:
    """Run ``step`` for iterations ``[start, end)`` of ``cfg.iterations`` (see the module docstring);
    ``out=None``: no checkpoint is read or written.

    ``states`` maps a name to an object with ``state()`` and ``set_state(state)`` (the samplers),
    saved in checkpoints and restored on resumption. ``step`` returns a dict of floats; the terms
    in ``logged`` are printed. Returns the history (a list per term, ``seconds``) with ``net`` and
    ``finished`` (False when stopped at ``stop_after`` before the end).
    """
    import torch

    states = states or {}
    sched = sched if sched is not None else cosine_schedule(opt, cfg.iterations)
    history: dict = {"seconds": 0.0}
    start = 0
    ckpt = None
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        ckpt = out / "checkpoint.pt"
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if not same_recipe(state["config"], cfg):
            raise SystemExit(f"{ckpt}: a checkpoint of another recipe; use a new --out or delete it")
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        for name, obj in states.items():
            obj.set_state(state[name])
        torch.set_rng_state(state["torch"])
        history, start = state["history"], state["iteration"]
        progress(f"resuming at iteration {start}")
    net.train()
    t0 = time.time() - history["seconds"]
    every = int(getattr(cfg, "checkpoint_every", 0) or 0)

    def checkpoint(done: int) -> None:
        history["seconds"] = time.time() - t0
        tmp = out / "checkpoint.pt.tmp"
        torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    **{name: obj.state() for name, obj in states.items()},
                    "torch": torch.get_rng_state(), "history": history, "iteration": done,
                    "config": dataclasses.asdict(cfg)}, tmp)
        os.replace(tmp, ckpt)

    end = cfg.iterations if stop_after is None else max(start, min(cfg.iterations, int(stop_after)))
    for it in range(start, end):
        if time_limit_s is not None and it > start and time.time() - t0 > time_limit_s:
            progress(f"time limit reached after iteration {it}; rerun to continue from the checkpoint")
            end = it
            if ckpt is not None and not (every > 0 and it % every == 0):
                checkpoint(it)
            break
        terms = step(it)
        sched.step()
        for k, v in terms.items():
            history.setdefault(k, []).append(float(v))
        done = it + 1
        if done % LOG_EVERY == 0 or done == cfg.iterations:
            text = " ".join(f"{k} {np.mean(history[k][-LOG_EVERY:]):.4f}" for k in logged if k in history)
            progress(f"iteration {done}/{cfg.iterations} {text} ({time.time() - t0:.0f} s)")
        if ckpt is not None and ((every > 0 and done % every == 0) or done == end):
            checkpoint(done)
    history["seconds"] = time.time() - t0
    return dict(history, net=net, finished=end == cfg.iterations)


def load_initial(path, net, optional_prefixes=()) -> None:
    """Fill ``net`` from a checkpoint.pt (its ``net``) or a state dict, for ``--init-from``; keys under
    ``optional_prefixes`` may be missing (training-only heads). One line when it does not fit."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state["net"] if isinstance(state, dict) and "net" in state else state
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError:
        raise SystemExit(f"{path}: not a network of this architecture") from None
    if unexpected or [k for k in missing if not k.startswith(tuple(optional_prefixes))]:
        raise SystemExit(f"{path}: not a network of this architecture")


def add_run_arguments(parser, cls, defaults: dict | None = None) -> None:
    """A trainer's command-line options: its config's fields and ``--stop-after``."""
    from bidsapp.training.config import add_config_arguments

    add_config_arguments(parser, cls, defaults=defaults, required=("out",))
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="stop at iteration N of the schedule, leaving a checkpoint (rerun without it to continue)")


def run_command(prog: str, cls, args, train, save, check=None) -> int:
    """``scanbridge-train <model>``: the config from ``args``, a one-line refusal when ``check(cfg)``
    names a problem (default: ``anatomy_dir`` must exist), training with progress, and the weights and
    card once the schedule is done."""
    import logging
    import sys

    from bidsapp.training.config import config_from_args

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = config_from_args(cls, args)
    if check is None:
        def check(c):
            return None if Path(c.anatomy_dir).is_dir() else f"{c.anatomy_dir}: no such folder"
    problem = check(cfg)
    if problem:
        print(f"{prog}: {problem}", file=sys.stderr)
        return 2
    hist = train(cfg, progress=lambda m: print(m, flush=True), stop_after=args.stop_after)
    if not hist["finished"]:
        print(f"stopped at iteration {len(hist['loss'])} of {cfg.iterations}; rerun the same command to continue")
        return 0
    card = save(hist["net"], cfg, hist)
    print(f"wrote {Path(cfg.out) / 'weights'} (sha256 {card['sha256'][:12]})")
    return 0


def trained_weights(cfg, train, save, command_line, model_name: str, progress=print) -> Path:
    """``cfg.out``/weights of the run ``cfg`` (benchmarks' variants): reused when its card was written by
    this very command, else trained (resuming from its checkpoint) and saved there."""
    import json

    weights = Path(cfg.out) / "weights"
    card = weights / f"{model_name}.json"
    if card.is_file() and json.loads(card.read_text())["training"]["command"] == command_line(cfg):
        return weights
    hist = train(cfg, progress=progress)
    save(hist["net"], cfg, hist, weights_dir=weights)
    return weights
