"""``scanbridge-train <model> ...``: one reproducible training command per shipped model.

Each subcommand lives in its own module ``bidsapp.training.<name>`` exposing either
``add_arguments(parser)`` and ``run(args) -> int``, or ``main(argv) -> int``; modules are imported only when their subcommand
runs, so ``scanbridge-train --help`` stays fast and one model's dependencies never load for another.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "tissue": ("bidsapp.training.tissue", "physics-aware GM/WM/CSF U-Net (and its no-physics ablation)"),
    "mrainet": ("bidsapp.training.mrainet", "MRAI-NET acquisition-invariant patch features"),
    "brainmask": ("bidsapp.training.brainmask", "contrast-agnostic brain-extraction U-Net"),
    "lesion": ("bidsapp.training.lesion", "scanner-invariant MS lesion U-Net (and its BM/BDM baselines)"),
    "wmh": ("bidsapp.training.wmh", "FLAIR-only WMH generator (Siamese content loss, or an overlap-loss baseline)"),
    "wmh-features": ("bidsapp.training.wmh_features", "frozen feature network of the WMH content loss"),
    "longitudinal": ("bidsapp.training.longitudinal", "3D-SiameseNet: stable vs accelerated atrophy from two T1w sessions"),
    "average": ("bidsapp.training.average", "a model as the weighted average of trained stages' weights"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(prog="scanbridge-train", description=__doc__.splitlines()[0])
    top.add_argument("model", choices=sorted(SUBCOMMANDS), help="which model to train")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        top.print_help() if not argv or argv[0] in ("-h", "--help") else top.parse_args(argv[:1])
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name = argv[0]
    module_name, help_text = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            print(f"scanbridge-train: the {name} trainer is not installed in this version", file=sys.stderr)
            return 2
        raise
    if not hasattr(module, "add_arguments") and hasattr(module, "main"):
        return int(module.main(argv[1:]) or 0)
    parser = argparse.ArgumentParser(prog=f"scanbridge-train {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
