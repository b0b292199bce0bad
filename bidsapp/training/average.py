"""``scanbridge-train average``: a shipped model made as the weighted average of trained stages' weights.

Why: a network fine-tuned on a new kind of data (e.g. the lesion U-Net's second stage, on faint
lesions and heavy loads) trades what it did well for what it learned. Averaging the weights of the
network before and after fine-tuning (WiSE-FT, Wortsman et al., CVPR 2022; "model soups") keeps much
of both at no cost at inference: the stages share one architecture and one training trajectory, so
their average is a working network, unlike the average of two networks trained apart.

    scanbridge-train average --name lesion_unet --from runs/lesion/weights runs/lesion-graded/weights \\
        --out runs/lesion-average

Each ``--from`` folder holds ``NAME.pt`` and its card (as every trainer writes them). The result's card
is the last input's, with the sha256 and size of the average, ``training.average`` (each input's sha256,
share, command, seed, seconds and precision), ``training.seed`` and ``training.precision`` (each input's
when they differ), ``training.seconds`` (the inputs' training times summed) and ``training.stages``: every
input's stages, each once, then this command.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--name", required=True, help="model name: the weights files are NAME.pt and NAME.json")
    parser.add_argument("--from", dest="sources", nargs="+", required=True, metavar="DIR",
                        help="weights folders of the stages to average (same architecture)")
    parser.add_argument("--shares", nargs="+", type=float, default=None, metavar="W",
                        help="each folder's share of the average (default: equal); normalised to sum to 1")
    parser.add_argument("--out", required=True, help="run folder: the average lands in OUT/weights")


def average_states(states: list[dict], shares: list[float]) -> dict:
    """The share-weighted average of state dicts with the same keys and shapes (integer buffers, such as a
    batch norm's counter, are taken from the last)."""
    keys = list(states[-1])
    for i, s in enumerate(states):
        if list(s) != keys or any(s[k].shape != states[-1][k].shape for k in keys):
            raise ValueError(f"input {i + 1} does not have the last input's parameters: not one architecture")
    out = {}
    for k in keys:
        last = states[-1][k]
        if last.is_floating_point():
            out[k] = sum(w * s[k].double() for w, s in zip(shares, states)).to(last.dtype)
        else:
            out[k] = last.clone()
    return out


def merged_stages(cards: list[dict]) -> list[str]:
    """Every input's stage commands, each once, in the order the inputs list them: a shared history
    (the stages all inputs started from) stays one line, and parallel runs (the same stage from several
    seeds, a "model soup") each keep their own command."""
    out: list[str] = []
    for card in cards:
        training = card.get("training", {})
        for stage in training.get("stages") or [training.get("command")]:
            if stage and stage not in out:
                out.append(stage)
    return out


def one_or_each(values: list):
    """The inputs' shared value, or all of them in order when they differ (a card field of an average)."""
    return values if len(set(map(str, values))) > 1 else values[-1]


def run(args) -> int:
    from bidsapp.models import registry

    n = len(args.sources)
    if n < 2:
        print("scanbridge-train average: give at least two --from folders", file=sys.stderr)
        return 2
    shares = args.shares or [1.0] * n
    if len(shares) != n or min(shares) < 0 or sum(shares) <= 0:
        print(f"scanbridge-train average: --shares needs {n} non-negative numbers, not all zero", file=sys.stderr)
        return 2
    shares = [w / sum(shares) for w in shares]
    states, cards = [], []
    for src in args.sources:
        try:
            state, card = registry.load_state_dict(args.name, src)
        except (registry.ModelNotFoundError, registry.WeightsIntegrityError) as exc:
            print(f"scanbridge-train average: {exc}", file=sys.stderr)
            return 2
        states.append(state)
        cards.append(card)
    if any(c["architecture"] != cards[-1]["architecture"] for c in cards):
        print("scanbridge-train average: the model cards name different architectures", file=sys.stderr)
        return 2
    try:
        state = average_states(states, shares)
    except ValueError as exc:
        print(f"scanbridge-train average: {exc}", file=sys.stderr)
        return 2
    card = dict(cards[-1])
    training = dict(card.get("training", {}))
    command = "scanbridge-train average " + shlex.join(
        ["--name", args.name, "--from", *args.sources] + (["--shares", *map(str, args.shares)] if args.shares else [])
        + ["--out", args.out])
    training["stages"] = merged_stages(cards) + [command]
    training["command"] = command
    seeds = [c.get("training", {}).get("seed") for c in cards]
    training["seed"] = one_or_each(seeds)   # a soup of runs has their seeds
    spent = [c.get("training", {}).get("seconds") for c in cards]
    precisions = [c.get("training", {}).get("precision", "float32") for c in cards]  # older cards: float32 only
    training["precision"] = one_or_each(precisions)
    training["average"] = [{"sha256": c["sha256"], "share": round(w, 6), "command": c.get("training", {}).get("command"),
                            "seed": seed, "seconds": sec, "precision": prec}
                           for c, w, seed, sec, prec in zip(cards, shares, seeds, spent, precisions)]
    if all(isinstance(sec, (int, float)) for sec in spent):  # each input's card holds its own stage's time
        training["seconds"] = round(sum(spent), 1)
        training["seconds_note"] = ("the averaged stages' own training times summed (each in training.average); "
                                    "the stages they started from are not counted; the average takes seconds")
    else:
        training.pop("seconds", None)
        training["seconds_note"] = "not known: an averaged stage's card has no training time"
    card["training"] = training
    out = Path(args.out) / "weights"
    card = registry.save_model(args.name, state, card, out)
    print(f"{out / card['weights_file']}: average of {n} stages (shares {', '.join(f'{w:.3g}' for w in shares)}), "
          f"sha256 {card['sha256'][:12]}")
    return 0
