"""Training throughput of the tissue U-Net on a CPU: whole-brain against patch-only simulation.

For each ``--sampling`` (``volume``: every training brain simulated whole, then the patch cropped, as
in the shipped chain; ``patch``: only the patch and a one-in-eight voxel sample of the brain) and each
repeat, with ``--threads`` torch threads:

* ``batch``: median seconds of one paired batch of four 32^3 patches (``PatchSampler.batch``, 40 batches);
* ``iteration``: seconds per iteration of stage 9's losses (Dice + CE, consistency, volume consistency,
  a quarter of the SPGR draws at low contrast) for the physics model alone, ``--iterations`` iterations.

The two samplings alternate within each repeat, so drift of the host hits both alike. The subjects are
stage 9's (seed 8, 2 deformations of each training anatomy at 2 mm), built once; give the training run's
``--cache`` to reuse them.

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


def _config(out: str, sampling: str, iterations: int, threads: int, patch: int = 32, features=(8, 16, 32, 64),
            anatomy_dir=None, cache=None):
    from bidsapp.training import tissue as T

    return T.TrainConfig(out=out, seed=8, physics=True, anatomy_dir=anatomy_dir, cache=cache, patch=patch,
                         features=tuple(features), threads=threads, device="cpu", iterations=iterations, lr=2e-4,
                         save_every=0, log_every=iterations, consistency=1.0, volume_consistency=1.0,
                         low_contrast=0.25, physics_injection="norm_shift", sampling=sampling)


def batch_seconds(subjects, sampling: str, patch: int = 32, n: int = 40) -> float:
    from bidsapp.training.tissue import PatchSampler

    sampler = PatchSampler(subjects, patch, seed=8, low_contrast=0.25, sampling=sampling)
    sampler.batch(4, pairs=True)  # warm-up
    times = []
    for _ in range(n):
        t = time.perf_counter()
        sampler.batch(4, pairs=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(subjects, repeats: int, iterations: int, threads: int, patch: int = 32, features=(8, 16, 32, 64),
            batches: int = 40) -> list[dict]:
    """One row per sampling: batch and iteration seconds of every repeat and their medians."""
    from bidsapp.training import tissue as T

    runs = {s: {"batch_s": [], "iteration_s": []} for s in T.SAMPLING}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(repeats):
            for sampling in T.SAMPLING:
                b = batch_seconds(subjects, sampling, patch, batches)
                hist = T.train(_config(tmp, sampling, iterations, threads, patch, features), subjects)[0]
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

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--anatomy-dir", default=str(T.DEFAULT_ANATOMY_DIR))
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
