"""Seconds per training iteration of each segmentation network, float32 against ``--precision bfloat16``.

Times the network's share of one iteration (forward pass, backward pass, Adam step; no data synthesis)
at the batch and patch size of the shipped recipes' last stages, in one process, median of ``--repeat``
iterations after one warm-up, for each precision in turn. Whether ``--precision bfloat16`` pays on a
machine depends on its hardware (AVX512-BF16 or AMX on CPUs): run this before a long training run.
The losses are a plain mean square of the logits: what this measures is the network, not the loss.

    python benchmarks/training/steps.py --threads 2        # table; writes benchmarks/results/training_steps.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def networks():
    """(name, network, input, extra forward argument) at each shipped recipe's last-stage batch and size."""
    import torch

    from bidsapp.models import brainmask, lesion, registry, wmh
    from bidsapp.models.tissue import N_PARAMS, PHYSICS_MODEL, build_model

    tissue = build_model(registry.load_card(PHYSICS_MODEL))  # the shipped physics model's architecture
    return [
        ("lesion U-Net, 64^3, batch 2", lesion.build_network(), torch.randn(2, 4, 64, 64, 64), None),
        ("brain-mask U-Net, 112^3, batch 2", brainmask.build_network(), torch.randn(2, 1, 112, 112, 112), None),
        ("WMH generator, 160^2, batch 8", wmh.build_network(), torch.randn(8, 1, 160, 160), None),
        ("tissue U-Net + physics, 32^3, batch 4", tissue, torch.randn(4, 1, 32, 32, 32), torch.randn(4, N_PARAMS)),
    ]


def seconds_per_iteration(net, x, extra, precision: str, repeat: int) -> float:
    import torch

    from bidsapp.devices import autocast

    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    times = []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast("cpu", precision):
            logits = net(x) if extra is None else net(x, extra)
        logits.float().square().mean().backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5, help="timed iterations per network and precision")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "training_steps.json"))
    args = ap.parse_args(argv)

    import torch

    from bidsapp.devices import native_bfloat16

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    print(f"{'network':40s} {'float32 s':>10s} {'bfloat16 s':>11s} {'ratio':>6s}")
    for name, net, x, extra in networks():
        fp32, bf16 = (seconds_per_iteration(net, x, extra, p, args.repeat) for p in ("float32", "bfloat16"))
        rows.append({"network": name, "float32_s": round(fp32, 4), "bfloat16_s": round(bf16, 4),
                     "ratio": round(bf16 / fp32, 3)})
        print(f"{name:40s} {fp32:10.3f} {bf16:11.3f} {bf16 / fp32:6.2f}", flush=True)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "repeat": args.repeat, "torch": torch.__version__,
                               "native_bfloat16": native_bfloat16("cpu"), "machine": platform.machine(),
                               "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
