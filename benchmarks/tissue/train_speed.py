"""Training throughput of the tissue U-Net on a CPU: whole-brain against patch-only simulation.

For each ``--sampling`` (``volume``: every training brain simulated whole, then the patch cropped, as
in the shipped chain; ``patch``: only the patch and a one-in-eight voxel sample of the brain) and each
repeat, with ``--threads`` torch threads:

* ``batch``: median seconds of one paired batch of four 32^3 patches (``PatchSampler.batch``, 40 batches);
* ``iteration``: seconds per iteration of stage 9's losses (Dice + CE, consistency, volume consistency,
  a quarter of the SPGR draws at low contrast) for the physics model alone, ``--iterations`` iterations.

The recipe is read from the shipped physics card's command, so the benchmark follows it. The two
samplings alternate within each repeat, so drift of the host hits both alike. The subjects are stage 9's
(its seed, deformations and resolution), built once; give the training run's ``--cache`` to reuse them.

    python benchmarks/tissue/train_speed.py [--anatomy-dir DIR] [--cache DIR] [--repeats 3] [--iterations 100]
    -> table on stdout, benchmarks/results/tissue_train_speed.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _config(out: str, sampling: str, iterations: int, threads: int, patch: int | None = None, features=None,
            anatomy_dir=None, cache=None):
    """Stage 9's recipe, read from the shipped physics card's command, for the physics model alone from
    scratch (the starting weights do not change the speed)."""
    import dataclasses
    import shlex

    from bidsapp.models import registry
    from bidsapp.models.tissue import PHYSICS_MODEL
    from bidsapp.training import tissue as T

    p = argparse.ArgumentParser()
    T.add_arguments(p)
    cfg = T.config_from_args(p.parse_args(shlex.split(registry.load_card(PHYSICS_MODEL)["training"]["command"])[2:]))
    return dataclasses.replace(cfg, out=out, physics=True, init_from=None, physics_from_base=False, sampling=sampling,
                               iterations=iterations, stop_after=None, threads=threads, device="cpu", checkpoint_every=0,
                               log_every=iterations, patch=patch or cfg.patch, features=tuple(features or cfg.features),
                               anatomy_dir=anatomy_dir or cfg.anatomy_dir, cache=cache, weights_dir=None)


def batch_seconds(cfg, subjects, n: int = 40) -> float:
    from bidsapp.training.tissue_data import PatchSampler

    sampler = PatchSampler(subjects, cfg.patch, seed=cfg.seed, low_contrast=cfg.low_contrast, sampling=cfg.sampling)
    sampler.batch(cfg.batch, pairs=cfg.paired)  # warm-up
    times = []
    for _ in range(n):
        t = time.perf_counter()
        sampler.batch(cfg.batch, pairs=cfg.paired)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(subjects, repeats: int, iterations: int, threads: int, patch: int | None = None, features=None,
            batches: int = 40) -> list[dict]:
    """One row per sampling: batch and iteration seconds of every repeat and their medians."""
    from bidsapp.training import tissue as T
    from bidsapp.training import tissue_data as D

    runs = {s: {"batch_s": [], "iteration_s": []} for s in D.SAMPLING}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(repeats):
            for sampling in D.SAMPLING:
                # a folder per run: one with a checkpoint would resume instead of training
                cfg = _config(str(Path(tmp) / f"{k}-{sampling}"), sampling, iterations, threads, patch, features)
                b = batch_seconds(cfg, subjects, batches)
                hist = T.train(cfg, subjects)[0]
                it = hist["seconds"] / hist["iterations"]
                runs[sampling]["batch_s"].append(b)
                runs[sampling]["iteration_s"].append(it)
                print(f"repeat {k + 1}: {sampling}: batch {b:.3f} s, iteration {it:.3f} s", flush=True)
    return [{"sampling": s, "repeats": repeats, "batch_median_s": round(statistics.median(r["batch_s"]), 4),
             "iteration_median_s": round(statistics.median(r["iteration_s"]), 3),
             "iteration_min_s": round(min(r["iteration_s"]), 3), "iteration_max_s": round(max(r["iteration_s"]), 3),
             "runs": r} for s, r in runs.items()]


def main() -> int:
    from bidsapp.training import tissue as T
    from bidsapp.training import tissue_data as D

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--anatomy-dir", default=str(D.DEFAULT_ANATOMY_DIR))
    ap.add_argument("--cache", default=None, help="subject cache of a training run (built here if missing)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tissue_train_speed.json"))
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))

    t = time.perf_counter()
    subjects = T.load_or_build_subjects(_config("", "volume", 1, args.threads, anatomy_dir=args.anatomy_dir,
                                                cache=args.cache))
    print(f"{len(subjects)} subjects in {time.perf_counter() - t:.0f} s", flush=True)
    rows = measure(subjects, args.repeats, args.iterations, args.threads)
    load = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(f".tmp{os.getpid()}")
    tmp_out.write_text(json.dumps({"threads": args.threads, "iterations": args.iterations, "cpu_count": os.cpu_count(),
                                   "loadavg_at_end": load, "rows": rows}, indent=1))
    os.replace(tmp_out, out)
    print(f"\nsampling | batch of 4 pairs, median s | s per iteration, median (min-max) of {args.repeats}")
    for r in rows:
        print(f"{r['sampling']} | {r['batch_median_s']:.3f} | {r['iteration_median_s']:.3f} "
              f"({r['iteration_min_s']:.3f}-{r['iteration_max_s']:.3f})")
    print(f"(load average at the end: {load[0]:.1f} on {os.cpu_count()} CPUs; results in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
