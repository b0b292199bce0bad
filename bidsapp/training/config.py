"""A trainer's configuration is one dataclass: its command-line options and the command written into the
model card are generated from it, so the two can never disagree.

Field metadata (``dataclasses.field(metadata=...)``) refines a field: ``help``, ``choices``, ``flag``
(the option name when it is not ``--<field-name>``), ``cli=False`` (not an option) and ``card=False``
(an option that does not change the model, such as threads or the device, left out of the card's
command), ``consts`` (a field set by one of several mutually exclusive flags, ``{"--both": "both", ...}``)
and ``parse``/``format`` (a value written as text other than ``str(value)``, e.g. a tuple as ``8,16``).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing


def _option(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _base_type(f: dataclasses.Field, hints: dict):
    tp = hints.get(f.name, str)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def add_config_arguments(parser: argparse.ArgumentParser, cls, *, defaults: dict | None = None,
                         required=()) -> None:
    """One option per field of ``cls``; ``defaults`` replace the class's (e.g. a path from the
    environment), fields in ``required`` must be given. A bool field is ``--<name>`` / ``--no-<name>``."""
    hints = typing.get_type_hints(cls)
    defaults = dict(defaults or {})
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli", True) is False:
            continue
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        kind = _base_type(f, hints)
        help_text = f.metadata.get("help")
        if "consts" in f.metadata:
            group = parser.add_mutually_exclusive_group()
            for flag, const in f.metadata["consts"].items():
                group.add_argument(flag, dest=f.name, action="store_const", const=const, default=default,
                                   help=(help_text or {}).get(flag) if isinstance(help_text, dict) else None)
            continue
        if kind is bool:
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=bool(default),
                                action=argparse.BooleanOptionalAction, help=help_text)
            continue
        kwargs = {"dest": f.name, "type": f.metadata.get("parse", kind), "help": help_text,
                  "choices": f.metadata.get("choices")}
        if f.name in required:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        parser.add_argument(_option(f), **kwargs)


def config_from_args(cls, args: argparse.Namespace, **overrides):
    """The ``cls`` instance the parsed options describe (fields that are not options keep their default)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})


def command_line(prog: str, cfg, *, first=(), explicit: bool = False) -> str:
    """The command that reproduces ``cfg``: ``prog``, the fields in ``first`` always, then every other
    option whose value differs from the class default, or every one with ``explicit`` (a card that
    must survive a later change of defaults); fields marked ``card=False`` are left out."""
    parts = [prog]
    by_name = {f.name: f for f in dataclasses.fields(cfg)}
    for name in first:
        parts += _words(by_name[name], getattr(cfg, name))
    for f in dataclasses.fields(cfg):
        if f.name in first or f.metadata.get("card", True) is False or f.metadata.get("cli", True) is False:
            continue
        value = getattr(cfg, f.name)
        if value is None or (not explicit and f.default is not dataclasses.MISSING and value == f.default):
            continue
        parts += _words(f, value)
    return " ".join(parts)


def _words(f: dataclasses.Field, value) -> list[str]:
    """The option that sets field ``f`` to ``value`` (nothing for None)."""
    if value is None:
        return []
    if "consts" in f.metadata:
        return [next(flag for flag, const in f.metadata["consts"].items() if const == value and type(const) is type(value))]
    if isinstance(value, bool):
        return [_option(f) if value else "--no-" + f.name.replace("_", "-")]
    return [f"{_option(f)} {f.metadata['format'](value) if 'format' in f.metadata else value}"]


def stage_commands(cfg, cls, command_line) -> list[str]:
    """The commands that made a network trained from ``cfg`` (a ``cls``), first stage first: followed
    through ``init_from`` checkpoints, which record their recipe and iteration."""
    from pathlib import Path

    import torch

    out = [command_line(cfg)]
    path = cfg.init_from
    while path and Path(path).is_file():
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not (isinstance(state, dict) and "config" in state):
            out[:0] = _card_stages(Path(path)) or [f"(weights file {path})"]
            break
        prev = cls(**{k: v for k, v in state["config"].items() if k in cls.__dataclass_fields__})
        cmd = command_line(prev)
        if state["iteration"] < prev.iterations:
            cmd += f" --stop-after {state['iteration']}"
        out.insert(0, cmd)
        path = prev.init_from
    return out


def _card_stages(weights) -> list[str]:
    """The commands that made a shipped weights file, from the model card beside it (``<name>.json``:
    ``training.stages``, else ``training.command``); empty when there is none."""
    import json

    card = weights.with_suffix(".json")
    try:
        training = json.loads(card.read_text()).get("training", {}) if card.is_file() else {}
    except (OSError, ValueError):
        return []
    return list(training.get("stages") or ([training["command"]] if training.get("command") else []))
