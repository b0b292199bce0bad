"""Time and peak memory of the simulator: one 1 mm image, one 1 mm session, the default dataset.

Each case runs in a fresh child process (so peak RSS is that case's own), with 2 threads:
- ``image``: ``simulate()`` of one 1 mm 3T MPRAGE from a ready 1 mm subject phantom (ICBM152-based);
  the target is < 10 s on 2 cores;
- ``subject``: making that subject (template anatomy, random deformation, tissue variation);
- ``session``: a 1 mm follow-up session end to end (atrophy, lesions, simulation, truth maps);
- ``dataset``: ``scanbridge-simulate OUT --subjects 4 --sites 2 --sessions 2`` (the default demo).

    python benchmarks/physics/simulate_speed.py [--repeats 3] [--skip-dataset]
    -> table on stdout, benchmarks/results/physics_simulate_speed.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _threads(n: int = 2) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)


def _case(name: str, queue) -> None:
    _threads()
    import numpy as np

    from bidsapp.physics import atrophy, lesions, phantom, simulator
    from bidsapp.physics.dataset import DatasetConfig, write_dataset
    from bidsapp.physics.protocols import PROTOCOLS

    out = {}
    if name == "dataset":
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            res = write_dataset(Path(tmp) / "demo", DatasetConfig(subjects=4, sites=2, sessions=2))
            out["seconds"] = time.perf_counter() - t
            out["images"] = res["images"]
            out["files"] = len(res["files"])
    else:
        anatomy = phantom.from_icbm152()
        t = time.perf_counter()
        subj = phantom.make_subject(anatomy, np.random.default_rng(0))
        t_subject = time.perf_counter() - t
        if name == "subject":
            out["seconds"] = t_subject
        elif name == "image":
            t = time.perf_counter()
            sim = simulator.simulate(subj, PROTOCOLS["siemens-3T-mprage"], np.random.default_rng(1))
            out["seconds"] = time.perf_counter() - t
            out["shape"] = list(sim.image.shape)
        elif name == "session":
            from bidsapp.physics.dataset import _Writer, _write_truth_primary, scanner_image

            t = time.perf_counter()
            ph = atrophy.apply_atrophy(subj, 1.0, **atrophy.DECLINE_RATES)
            ph, _ = lesions.add_lesions(ph, np.random.default_rng(2))
            sim = simulator.simulate(ph, PROTOCOLS["siemens-3T-mprage"], np.random.default_rng(1))
            with tempfile.TemporaryDirectory() as tmp:
                w = _Writer(Path(tmp))
                w.nifti("sub-01_ses-2_T1w.nii.gz", scanner_image(sim.image))
                _write_truth_primary(w, "truth", "sub-01_ses-2", sim.truth, ["bids:raw:x"], True)
            out["seconds"] = time.perf_counter() - t
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    queue.put(out)


def run_case(name: str) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_case, args=(name, q))
    p.start()
    res = q.get()
    p.join()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-dataset", action="store_true")
    args = ap.parse_args()
    cases = ["image", "subject", "session"] + ([] if args.skip_dataset else ["dataset"])
    rows = []
    for name in cases:
        runs = [run_case(name) for _ in range(1 if name == "dataset" else args.repeats)]
        secs = [r["seconds"] for r in runs]
        rows.append({"case": name, "runs": len(runs), "median_s": round(statistics.median(secs), 2),
                     "min_s": round(min(secs), 2), "max_s": round(max(secs), 2),
                     "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs)),
                     **{k: v for k, v in runs[0].items() if k not in ("seconds", "peak_rss_mb")}})
        print(rows[-1], flush=True)
    load = os.getloadavg()
    res = ROOT / "benchmarks" / "results"
    res.mkdir(parents=True, exist_ok=True)
    (res / "physics_simulate_speed.json").write_text(json.dumps(
        {"threads": 2, "cpu_count": os.cpu_count(), "loadavg_at_end": load, "rows": rows}, indent=1))
    print("\ncase | runs | median s | min s | max s | peak RSS MB")
    for r in rows:
        print(f"{r['case']} | {r['runs']} | {r['median_s']} | {r['min_s']} | {r['max_s']} | {r['peak_rss_mb']}")
    print(f"(load average at the end: {load[0]:.1f} on {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
