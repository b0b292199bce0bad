"""The shared training loop: what a checkpoint may differ in, exact resumption, --init-from."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bidsapp.training import engine


@dataclasses.dataclass
class Cfg:
    out: str
    iterations: int = 6
    lr: float = 0.1
    threads: int = 2
    checkpoint_every: int = 2
    added_later: int = 3


class Sampler:
    def __init__(self, seed):
        self.gen = torch.Generator().manual_seed(seed)

    def state(self):
        return self.gen.get_state()

    def set_state(self, state):
        self.gen.set_state(state)


def test_same_recipe_ignores_where_it_runs_and_fields_added_later():
    cfg = Cfg(out="x")
    saved = dataclasses.asdict(cfg)
    assert engine.same_recipe(dict(saved, threads=8, checkpoint_every=50), cfg)
    older = {k: v for k, v in saved.items() if k != "added_later"}
    assert engine.same_recipe(older, cfg)
    assert not engine.same_recipe(dict(saved, lr=0.2), cfg)
    assert not engine.same_recipe(older, Cfg(out="x", added_later=4))


def _run(cfg, stop_after=None):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr)
    sampler = Sampler(1)

    def step(_it):
        x = torch.randn(4, 3, generator=sampler.gen)
        opt.zero_grad()
        loss = (net(x) ** 2).mean()
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach())}

    return engine.fit(cfg, net, opt, step, out=cfg.out, states={"sampler": sampler}, progress=lambda m: None,
                      stop_after=stop_after)


def test_a_resumed_run_is_the_uninterrupted_run(tmp_path):
    cfg = Cfg(out=str(tmp_path / "a"))
    first = _run(cfg, stop_after=3)
    assert not first["finished"] and len(first["loss"]) == 3
    resumed = _run(cfg)
    straight = _run(Cfg(out=str(tmp_path / "b")))
    assert resumed["finished"] and resumed["loss"] == pytest.approx(straight["loss"])
    with pytest.raises(SystemExit, match="another recipe"):
        _run(Cfg(out=cfg.out, lr=0.5))


def test_init_from_accepts_a_checkpoint_and_refuses_another_network(tmp_path):
    cfg = Cfg(out=str(tmp_path / "a"))
    _run(cfg)
    net = torch.nn.Linear(3, 1)
    engine.load_initial(tmp_path / "a" / "checkpoint.pt", net)
    with pytest.raises(SystemExit, match="not a network of this architecture"):
        engine.load_initial(tmp_path / "a" / "checkpoint.pt", torch.nn.Linear(4, 1))


def test_trained_weights_reuses_only_a_card_of_the_same_command(tmp_path):
    import json

    calls = []

    def train(cfg, progress=None):
        calls.append(cfg.lr)
        return {"net": None}

    def save(net, cfg, hist, weights_dir):
        weights_dir.mkdir(parents=True, exist_ok=True)
        (weights_dir / "m.json").write_text(json.dumps({"training": {"command": f"train --lr {cfg.lr}"}}))

    def command(cfg):
        return f"train --lr {cfg.lr}"

    cfg = Cfg(out=str(tmp_path / "run"))
    assert engine.trained_weights(cfg, train, save, command, "m") == tmp_path / "run" / "weights"
    engine.trained_weights(cfg, train, save, command, "m")
    engine.trained_weights(Cfg(out=cfg.out, lr=0.3), train, save, command, "m")
    assert calls == [0.1, 0.3]


def test_forward_precision_runs_the_forward_pass_in_the_configs_precision(monkeypatch):
    from bidsapp import devices

    @dataclasses.dataclass
    class P:
        precision: str = "float32"
        threads: int = 1
        device: str = "cpu"

    net, x = torch.nn.Linear(3, 2), torch.randn(4, 3)
    said = []
    with engine.forward_precision(P(), torch.device("cpu"), said.append)():
        assert net(x).dtype == torch.float32
    assert said == []
    monkeypatch.setattr(devices, "native_bfloat16", lambda device: False)
    amp = engine.forward_precision(P("bfloat16"), torch.device("cpu"), said.append)
    with amp():
        assert net(x).dtype == torch.bfloat16
    with amp():  # the factory gives a fresh context for every step
        assert net(x).dtype == torch.bfloat16
    assert len(said) == 1 and "not compute bfloat16 natively" in said[0]
    assert engine.run_facts(P("bfloat16"), {"seconds": 1.25})["precision"] == "bfloat16"
