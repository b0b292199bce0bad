"""benchmarks/training/steps.py: seconds per training iteration in both precisions, on tiny networks."""

from __future__ import annotations

import json

import torch

from benchmark_scripts import load

steps = load("training", "steps")


def test_the_table_times_every_network_in_both_precisions(tmp_path, monkeypatch, capsys):
    seen = []

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(1, 2, 3)

        def forward(self, x, extra=None):
            out = self.conv(x)
            seen.append(out.dtype)
            return out

    monkeypatch.setattr(steps, "networks", lambda: [("tiny", Net(), torch.randn(1, 1, 8, 8, 8), None)])
    assert steps.main(["--threads", "1", "--repeat", "2", "--json", str(tmp_path / "t.json")]) == 0
    assert seen == [torch.float32] * 3 + [torch.bfloat16] * 3  # a warm-up and two timed iterations each
    data = json.loads((tmp_path / "t.json").read_text())
    row = data["rows"][0]
    assert row["network"] == "tiny" and row["float32_s"] > 0 and row["bfloat16_s"] > 0 and row["ratio"] > 0
    assert "tiny" in capsys.readouterr().out


def test_the_shipped_networks_take_their_inputs():
    for name, net, x, extra in steps.networks():
        with torch.no_grad():
            out = net.eval()(x[:1, ..., :32, :32, :32] if x.dim() == 5 else x[:1, ..., :32, :32],
                             *([] if extra is None else [extra[:1]]))
        assert out.shape[0] == 1, name
