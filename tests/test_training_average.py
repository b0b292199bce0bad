"""``scanbridge-train average``: weighted average of trained stages, its card, and refused inputs."""

from __future__ import annotations

import pytest
import torch

from bidsapp.models import registry
from bidsapp.training.cli import main

ARCH = {"class": "torch.nn.Linear", "kwargs": {"in_features": 3, "out_features": 2}}


def _stage(folder, seed: int, arch=ARCH, shape=(2, 3), seconds=None, precision=None) -> dict:
    gen = torch.Generator().manual_seed(seed)
    state = {"weight": torch.randn(*shape, generator=gen), "bias": torch.randn(shape[0], generator=gen),
             "count": torch.tensor(seed, dtype=torch.long)}
    card = {"version": "1", "architecture": arch, "metrics": {},
            "training": {"command": f"scanbridge-train toy --seed {seed}", "seed": seed, "data": "toy",
                         **({} if seconds is None else {"seconds": seconds}),
                         **({} if precision is None else {"precision": precision})}}
    return registry.save_model("toy", state, card, folder), state


def test_average_of_two_stages_and_its_card(tmp_path, capsys):
    card_a, a = _stage(tmp_path / "a", 1)
    card_b, b = _stage(tmp_path / "b", 2)
    out = tmp_path / "avg"
    assert main(["average", "--name", "toy", "--from", str(tmp_path / "a"), str(tmp_path / "b"),
                 "--shares", "1", "3", "--out", str(out)]) == 0
    state, card = registry.load_state_dict("toy", out / "weights")  # sha256 checked against the new card
    assert torch.allclose(state["weight"], 0.25 * a["weight"] + 0.75 * b["weight"])
    assert torch.allclose(state["bias"], 0.25 * a["bias"] + 0.75 * b["bias"])
    assert int(state["count"]) == 2  # integer buffers come from the last stage
    t = card["training"]
    assert [x["sha256"] for x in t["average"]] == [card_a["sha256"], card_b["sha256"]]
    assert [x["share"] for x in t["average"]] == [0.25, 0.75]
    assert t["stages"] == ["scanbridge-train toy --seed 1", "scanbridge-train toy --seed 2", t["command"]]
    assert [x["seed"] for x in t["average"]] == [1, 2] and t["seed"] == [1, 2]
    assert t["command"].startswith("scanbridge-train average --name toy --from")
    assert card["sha256"] not in (card_a["sha256"], card_b["sha256"])


def test_the_average_card_sums_its_stages_training_times(tmp_path):
    """Parallel stages each spent their own time: the average's card says the sum, not the last one's."""
    _stage(tmp_path / "a", 1, seconds=1485.5)
    _stage(tmp_path / "b", 2, seconds=1441.3)
    _stage(tmp_path / "c", 3)
    args = ["average", "--name", "toy", "--from", str(tmp_path / "a"), str(tmp_path / "b")]
    assert main(args + ["--out", str(tmp_path / "ab")]) == 0
    t = registry.load_card("toy", tmp_path / "ab" / "weights")["training"]
    assert t["seconds"] == 2926.8 and [x["seconds"] for x in t["average"]] == [1485.5, 1441.3]
    assert "summed" in t["seconds_note"]
    assert main(args[:-1] + [str(tmp_path / "c"), "--out", str(tmp_path / "ac")]) == 0
    t = registry.load_card("toy", tmp_path / "ac" / "weights")["training"]
    assert "seconds" not in t and t["seconds_note"].startswith("not known")


def test_the_average_card_says_each_stages_training_precision(tmp_path):
    _stage(tmp_path / "a", 1)  # a card from before --precision: float32
    _stage(tmp_path / "b", 2, precision="bfloat16")
    _stage(tmp_path / "c", 3, precision="bfloat16")
    assert main(["average", "--name", "toy", "--from", str(tmp_path / "b"), str(tmp_path / "c"),
                 "--out", str(tmp_path / "bc")]) == 0
    t = registry.load_card("toy", tmp_path / "bc" / "weights")["training"]
    assert t["precision"] == "bfloat16" and [x["precision"] for x in t["average"]] == ["bfloat16"] * 2
    assert main(["average", "--name", "toy", "--from", str(tmp_path / "a"), str(tmp_path / "b"),
                 "--out", str(tmp_path / "ab")]) == 0
    t = registry.load_card("toy", tmp_path / "ab" / "weights")["training"]
    assert t["precision"] == ["float32", "bfloat16"]


def test_equal_shares_by_default(tmp_path):
    _, a = _stage(tmp_path / "a", 1)
    _, b = _stage(tmp_path / "b", 2)
    assert main(["average", "--name", "toy", "--from", str(tmp_path / "a"), str(tmp_path / "b"),
                 "--out", str(tmp_path / "avg")]) == 0
    state, _ = registry.load_state_dict("toy", tmp_path / "avg" / "weights")
    assert torch.allclose(state["weight"], 0.5 * (a["weight"] + b["weight"]))


@pytest.mark.parametrize("problem", ["shape", "architecture", "missing", "shares"])
def test_refuses_what_cannot_be_averaged(tmp_path, capsys, problem):
    _stage(tmp_path / "a", 1)
    if problem == "shape":
        _stage(tmp_path / "b", 2, shape=(4, 3))
    elif problem == "architecture":
        _stage(tmp_path / "b", 2, arch={"class": "torch.nn.Linear", "kwargs": {"in_features": 3, "out_features": 4}})
    elif problem != "missing":
        _stage(tmp_path / "b", 2)
    args = ["average", "--name", "toy", "--from", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "o")]
    if problem == "shares":
        args += ["--shares", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("scanbridge-train average:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "weights" / "toy.pt").exists()


def test_a_soup_of_parallel_runs_keeps_the_shared_history_once_and_each_run(tmp_path):
    """Two third stages from one second stage: the card lists stages 1-2 once, then both third stages."""
    history = ["scanbridge-train toy --stage 1", "scanbridge-train toy --stage 2"]
    for seed in (1, 2):
        card, state = _stage(tmp_path / f"s{seed}", seed)
        card["training"]["stages"] = history + [card["training"]["command"]]
        registry.save_model("toy", state, card, tmp_path / f"s{seed}")
    assert main(["average", "--name", "toy", "--from", str(tmp_path / "s1"), str(tmp_path / "s2"),
                 "--out", str(tmp_path / "avg")]) == 0
    _, card = registry.load_state_dict("toy", tmp_path / "avg" / "weights")
    stages = card["training"]["stages"]
    assert stages[:4] == history + ["scanbridge-train toy --seed 1", "scanbridge-train toy --seed 2"]
    assert stages[4].startswith("scanbridge-train average") and len(stages) == 5
