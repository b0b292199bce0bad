"""``scanbridge-train lesion-threshold``: the probability at which the lesion U-Net's mask is cut.

A network's probability is calibrated to the lesions of its last training stage, not to a user's:
the shipped model's second stage learned that a faint lesion's target reaches past its visible edge, so
at 0.5 it outlines bright, sharply bounded lesions too large (a median 1.65 times their volume on the
benchmark's full-contrast lesions). The threshold is a property of the weights, so it is chosen once
per model, on data neither the training nor the benchmark uses, and kept in the model card
(``threshold``), where :func:`bidsapp.models.lesion.segment` reads it; the weights and their sha256
do not change.

Validation data: whole simulated sessions (:func:`bidsapp.training.lesion.simulated_sessions`) of
training anatomies (the held-out ones are the benchmark's) on scanners drawn from ``--seed`` (training
draws from seed 0, the benchmark from seed 1), each with new lesions, once with full-contrast and once
with graded lesions (:data:`bidsapp.training.lesion.LESION_CONTRASTS`: bright ones and the faint ones
of clinical scans count equally). Every threshold of ``--thresholds`` is scored by the mean Dice over
all sessions (components under :data:`bidsapp.models.lesion.MIN_LESION_MM3` dropped, as in the app);
the best one is written to the card with the whole table (``threshold_selection``).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

LOG = logging.getLogger("scanbridge.train.lesion_threshold")

DEFAULT_THRESHOLDS = tuple(round(0.3 + 0.05 * i, 2) for i in range(11))  # 0.30 .. 0.80
VALIDATION_SEED = 5
"""Seed of the validation scanners and lesions: neither training's (0) nor the benchmark's (1)."""


def dice_by_threshold(probability: np.ndarray, truth: np.ndarray, thresholds, min_volume_mm3: float) -> list[float]:
    """Dice of ``probability >= t`` (components under ``min_volume_mm3`` dropped) against ``truth``, per t."""
    from bidsapp.metrics.lesions import lesion_scores

    return [lesion_scores(probability >= t, truth, min_volume_mm3=min_volume_mm3, with_hd95=False).dice
            for t in thresholds]


def choose(table: dict, thresholds) -> float:
    """The threshold of highest mean Dice over every session of ``table`` ({group: [[Dice per threshold],
    ...]}), each group (lesion contrast) weighted by its sessions; the lower threshold on a tie."""
    rows = np.array([r for group in table.values() for r in group], float)
    if rows.size == 0:
        raise ValueError("no validation sessions to choose a threshold on")
    mean = np.nanmean(rows, axis=0)
    return float(thresholds[int(np.argmax(mean))])


def validation_heads(anatomy_dir, names: list[str] | None, n: int = 3):
    """The validation anatomies: ``names``, else the last ``n`` training label maps of ``anatomy_dir``."""
    from bidsapp.training import lesion as T

    paths = [p for p in sorted(Path(anatomy_dir).glob("anat-*_dseg.nii.gz")) if p.name.split("_")[0] not in T.HELDOUT]
    if names:
        paths = [p for p in paths if p.name.split("_")[0] in names]
    else:
        paths = paths[-n:]
    if not paths:
        raise FileNotFoundError(f"{anatomy_dir}: no training label maps (anat-*_dseg.nii.gz) to validate on"
                                + (f" among {', '.join(names)}" if names else ""))
    return [T.load_head(p) for p in paths]


def calibrate(weights_dir, anatomy_dir, heads: list[str] | None = None, scanners: int = 4,
              seed: int = VALIDATION_SEED, thresholds=DEFAULT_THRESHOLDS, progress=print) -> dict:
    """Score ``thresholds`` on the validation sessions with the lesion model of ``weights_dir``; returns
    the card's ``threshold_selection`` (chosen threshold, the validation data, Dice per threshold)."""
    from bidsapp.models import lesion as L
    from bidsapp.training import lesion as T

    thresholds = [float(t) for t in thresholds]
    if not thresholds or any(not 0.0 < t < 1.0 for t in thresholds):
        raise ValueError(f"thresholds must lie strictly between 0 and 1: {thresholds}")
    hs = validation_heads(anatomy_dir, heads)
    table: dict[str, list[list[float]]] = {}
    described: set[str] = set()
    t0 = time.perf_counter()
    for contrast in T.LESION_CONTRASTS:
        for si, sc, head, ses in T.simulated_sessions(hs, scanners, seed, contrast):
            res = L.segment(ses["images"], ses["brain"], ses["affine"], (1.0, 1.0, 1.0), weights_dir=weights_dir)
            dice = dice_by_threshold(res.probability, ses["lesion"], thresholds, L.MIN_LESION_MM3)
            table.setdefault(contrast, []).append(dice)
            described.add(sc.describe())
            progress(f"{contrast} lesions, {head.name} on scanner {si}: best Dice {max(dice):.3f} at "
                     f"{thresholds[int(np.argmax(dice))]:.2f} ({time.perf_counter() - t0:.0f} s)")
    chosen = choose(table, thresholds)
    means = {c: [round(float(x), 4) for x in np.mean(rows, axis=0)] for c, rows in table.items()}
    overall = np.mean([r for rows in table.values() for r in rows], axis=0)
    return {"threshold": chosen, "criterion": "mean Dice over the validation sessions",
            "heads": [h.name for h in hs], "scanners": sorted(described), "seed": seed,
            "lesion_contrasts": list(table), "sessions": sum(len(r) for r in table.values()),
            "thresholds": thresholds, "mean_dice": {**means, "all": [round(float(x), 4) for x in overall]}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from bidsapp.devdata import anatomy_dir

    p.add_argument("--weights", required=True, metavar="DIR",
                   help="folder holding lesion_unet.pt and its card (a training run's weights/); the card is "
                        "updated in place")
    p.add_argument("--anatomy-dir", default=str(anatomy_dir()),
                   help="label maps (default $SCANBRIDGE_DATA_DIR/anatomy)")
    p.add_argument("--heads", nargs="+", default=None, help="validation anatomies (default: the last three "
                                                             "training label maps)")
    p.add_argument("--scanners", type=int, default=4, help="validation scanners")
    p.add_argument("--seed", type=int, default=VALIDATION_SEED)
    p.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS))
    p.add_argument("--threads", type=int, default=2)


def run(args) -> int:
    import torch

    from bidsapp.models import registry
    from bidsapp.models.lesion import MODEL_NAME

    torch.set_num_threads(int(args.threads))
    weights = Path(args.weights)
    if not registry.card_path(MODEL_NAME, weights).is_file():
        print(f"scanbridge-train lesion-threshold: {weights} has no {MODEL_NAME} model card")
        return 2
    sel = calibrate(weights, args.anatomy_dir, args.heads, args.scanners, args.seed, args.thresholds,
                    progress=lambda m: print(m, flush=True))
    cmd = ["scanbridge-train lesion-threshold --weights", str(weights)]
    for name, default in (("scanners", 4), ("seed", VALIDATION_SEED)):
        if getattr(args, name) != default:
            cmd.append(f"--{name} {getattr(args, name)}")
    if args.heads:
        cmd.append("--heads " + " ".join(args.heads))
    if [float(t) for t in args.thresholds] != list(DEFAULT_THRESHOLDS):
        cmd.append("--thresholds " + " ".join(str(t) for t in args.thresholds))
    sel["command"] = " ".join(cmd)
    card = registry.update_card(MODEL_NAME, {
        "threshold": sel["threshold"], "threshold_selection": sel,
        "output": (f"sigmoid per output; lesion mask = probability >= {sel['threshold']:g} (threshold_selection), "
                   "components under 3 mm^3 dropped")}, weights)
    for t, d in zip(sel["thresholds"], sel["mean_dice"]["all"]):
        print(f"  threshold {t:.2f}: mean validation Dice {d:.3f}")
    print(f"threshold {card['threshold']:g} written to {registry.card_path(MODEL_NAME, weights)}")
    return 0
