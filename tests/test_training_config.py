"""One dataclass per trainer gives its options and its card's command."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from bidsapp.training.config import add_config_arguments, command_line, config_from_args


@dataclass
class _Cfg:
    out: str = field(metadata={"help": "run folder"})
    steps: int = 10
    lr: float = 1e-3
    icbm: bool = True
    mirror: bool = False
    mode: str = field(default="a", metadata={"choices": ("a", "b")})
    threads: int = field(default=2, metadata={"card": False})
    init_from: str | None = None


def _parse(argv):
    p = argparse.ArgumentParser()
    add_config_arguments(p, _Cfg, required=("out",))
    return config_from_args(_Cfg, p.parse_args(argv))


def test_options_follow_the_fields_and_the_command_reproduces_the_config():
    cfg = _parse(["--out", "runs/x", "--steps", "20", "--no-icbm", "--mirror", "--mode", "b", "--threads", "8"])
    assert cfg == _Cfg(out="runs/x", steps=20, icbm=False, mirror=True, mode="b", threads=8)
    cmd = command_line("train x", cfg, first=("out",))
    assert cmd == "train x --out runs/x --steps 20 --no-icbm --mirror --mode b"   # threads: not in the card
    assert _parse(cmd.split()[2:]) == _Cfg(out="runs/x", steps=20, icbm=False, mirror=True, mode="b")
    explicit = command_line("train x", _Cfg(out="o"), first=("out",), explicit=True)
    assert explicit == "train x --out o --steps 10 --lr 0.001 --icbm --no-mirror --mode a"
    assert _parse(explicit.split()[2:]) == _Cfg(out="o")


def test_bad_values_are_refused_by_the_parser():
    with pytest.raises(SystemExit):
        _parse(["--out", "o", "--mode", "c"])
    with pytest.raises(SystemExit):
        _parse(["--steps", "3"])  # --out is required


def test_stages_start_from_the_card_of_a_shipped_weights_file(tmp_path):
    import json

    torch = pytest.importorskip("torch")
    from bidsapp.training.config import stage_commands

    cmd = lambda cfg: command_line("train x", cfg, first=("out",))  # noqa: E731
    weights = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, weights)
    later = _Cfg(out="runs/b", steps=5, init_from=str(weights))
    assert stage_commands(later, _Cfg, cmd) == [f"(weights file {weights})", cmd(later)]
    (tmp_path / "model.json").write_text(json.dumps({"training": {"command": "train x --out runs/a"}}))
    assert stage_commands(later, _Cfg, cmd) == ["train x --out runs/a", cmd(later)]
    (tmp_path / "model.json").write_text(json.dumps({"training": {"command": "c2", "stages": ["c1", "c2"]}}))
    assert stage_commands(later, _Cfg, cmd) == ["c1", "c2", cmd(later)]
