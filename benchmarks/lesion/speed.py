"""Lesion inference time and memory, CPU: the MS model on one 1 mm session, the WMH model on one FLAIR.

``--model lesion`` (default): the first call simulates the session (a held-out label map on a simulated 3T
scanner, 1 mm, FLAIR, T1w, T2w, PDw) into ``--cache``; every call then loads the shipped model and
segments it, printing the seconds of :func:`bidsapp.models.lesion.segment` (model loading included) and
the process's peak memory. Time it over several runs with a timing harness.

``--model wmh``: the FLAIR-only WMH model (:func:`bidsapp.models.wmh.segment`) on two FLAIRs of the
held-out label map ``--anatomy`` with WMH of grade 2 (:func:`bidsapp.training.wmh.simulate_session`),
zero-padded to a ``--fov`` mm field of view (a whole head's scan, not the label map's crop):
``1mm``, a 1 mm isotropic 3D FLAIR, and ``thick``, a clinical 2D FLAIR of 5 mm axial slices. Each is
simulated once into ``--cache-dir``; each run is then one fresh process that loads the FLAIR, loads the
model and segments it, as the app does for one session: the seconds of ``segment`` (model loading
included), the process's wall time from start to exit (Python, torch and the FLAIR loading included),
its CPU time (user + system: on a busy machine, what the run would take alone is about CPU time over
threads) and its peak memory (max RSS). The issue's target is <= 20 s and <= 1.5 GB per FLAIR on 2 CPU cores.

    python benchmarks/lesion/speed.py --threads 2               # lesion: seconds and peak MB; writes JSON
    python benchmarks/lesion/speed.py --model wmh --repeat 3    # writes benchmarks/results/wmh_speed.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def session(cache: Path, anatomy: Path) -> dict:
    if not cache.is_file():
        import torch

        from bidsapp.training import lesion as T

        head = T.load_head(anatomy)
        sc = T.make_scanners(1, np.random.default_rng(11))[0]
        sc.slices = {c: (2, 1.0) for c in sc.slices}  # 1 mm 3D for every contrast
        ses = T.simulate_session(head, sc, np.random.default_rng(0), torch.Generator().manual_seed(0))
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache, brain=ses["brain"], **{c: v.astype(np.float32) for c, v in ses["images"].items()})
    data = np.load(cache)
    return {"brain": data["brain"], "images": {c: data[c] for c in data.files if c != "brain"}}


WMH_CASES = {"1mm": 1.0, "thick": 5.0}
"""The WMH model's FLAIRs: slice thickness in mm (in-plane 1 mm)."""
WMH_TARGET = {"seconds": 20.0, "peak_mb": 1536}


def wmh_flair(cache: Path, anatomy: Path, thickness: float, fov_mm: int) -> Path:
    """``cache`` (.npz: flair, brain, affine, zooms), simulated when missing: grade-2 WMH of ``anatomy`` on a
    training-family 3 T-ish scanner with ``thickness`` mm axial slices, zero-padded to ``fov_mm``."""
    if not cache.is_file():
        import torch

        from bidsapp.training import lesion as L
        from bidsapp.training import wmh as W

        head = L.load_head(anatomy)
        sc = W.make_scanners(1, np.random.default_rng(11))[0]
        sc.slices = {"FLAIR": (2, float(thickness))}
        ses = W.simulate_session(head, sc, np.random.default_rng(0), torch.Generator().manual_seed(0), grade=2)
        zooms = np.asarray(ses["zooms"], float)
        want = [max(n, int(round(fov_mm / z))) for n, z in zip(ses["flair"].shape, zooms)] if fov_mm else None
        pad = [(0, 0)] * 3 if want is None else [((w - n) // 2, w - n - (w - n) // 2)
                                                  for w, n in zip(want, ses["flair"].shape)]
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache, flair=np.pad(ses["flair"].astype(np.float32), pad),
                            brain=np.pad(ses["brain"], pad), affine=ses["affine"], zooms=zooms,
                            lesion=np.pad(ses["lesion"], pad))
    return cache


def wmh_child(cache: Path, threads: int) -> dict:
    """One run in this (fresh) process: load the FLAIR, segment it (model loading included)."""
    import torch

    torch.set_num_threads(threads)
    data = np.load(cache)
    from bidsapp.models.wmh import segment

    t0 = time.perf_counter()
    res = segment(data["flair"], data["brain"], data["affine"], tuple(data["zooms"]), device="cpu")
    sec = time.perf_counter() - t0
    use = resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": round(sec, 2), "peak_mb": round(use.ru_maxrss / 1024),
            "cpu_seconds": round(use.ru_utime + use.ru_stime, 1),
            "shape": list(data["flair"].shape), "zooms": [float(z) for z in data["zooms"]],
            "lesion_voxels": int(res.mask.sum()), "truth_voxels": int(data["lesion"].sum())}


def wmh_main(args) -> int:
    from bidsapp.devices import precision
    from bidsapp.models import registry

    cases = list(WMH_CASES) if args.case == "both" else [args.case]
    card = registry.load_card("wmh_unet")
    out = {"model": "wmh", "sha256": card["sha256"], "threads": args.threads, "precision": precision("cpu"),
           "fov_mm": args.fov,
           "target": WMH_TARGET, "cases": {}}
    for case in cases:
        cache = wmh_flair(Path(args.cache_dir) / f"wmh_speed_{case}_fov{args.fov}.npz", Path(args.anatomy),
                          WMH_CASES[case], args.fov)
        runs = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--model", "wmh", "--child", str(cache),
                                   "--threads", str(args.threads)], capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode:
                print(proc.stderr, file=sys.stderr)
                return proc.returncode
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]) | {"process_seconds": round(wall, 2)})
        best = {k: float(np.median([r[k] for r in runs])) for k in ("seconds", "process_seconds", "peak_mb",
                                                                     "cpu_seconds")}
        res = {**{k: runs[0][k] for k in ("shape", "zooms", "lesion_voxels", "truth_voxels")},
               "seconds": round(best["seconds"], 2), "process_seconds": round(best["process_seconds"], 2),
               "peak_mb": round(best["peak_mb"]), "cpu_seconds": best["cpu_seconds"], "runs": runs,
               "meets_target": bool(best["process_seconds"] <= WMH_TARGET["seconds"]
                                    and max(r["peak_mb"] for r in runs) <= WMH_TARGET["peak_mb"])}
        out["cases"][case] = res
        print(f"wmh {case:<6} {'x'.join(map(str, res['shape']))} @ {'x'.join(f'{z:g}' for z in res['zooms'])} mm: "
              f"segment {res['seconds']:.1f} s, process {res['process_seconds']:.1f} s (CPU {res['cpu_seconds']:.0f} s), "
              f"peak {res['peak_mb']} MB "
              f"(median of {len(runs)}; target <= {WMH_TARGET['seconds']:g} s, <= {WMH_TARGET['peak_mb']} MB: "
              f"{'PASS' if res['meets_target'] else 'FAIL'})", flush=True)
    print(json.dumps({k: {m: v[m] for m in ("seconds", "process_seconds", "peak_mb", "meets_target")}
                      for k, v in out["cases"].items()}))
    path = Path(args.json or ROOT / "benchmarks" / "results" / "wmh_speed.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    from bidsapp.devdata import anatomy_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("lesion", "wmh"), default="lesion")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--anatomy", default=str(anatomy_dir() / "anat-10_dseg.nii.gz"))
    p.add_argument("--cache", default=str(ROOT / "benchmarks" / "results" / "lesion-work" / "speed_session.npz"),
                   help="lesion: the simulated session")
    p.add_argument("--cache-dir", default=str(ROOT / "benchmarks" / "results" / "wmh-work"),
                   help="wmh: folder of the simulated FLAIRs")
    p.add_argument("--case", choices=(*WMH_CASES, "both"), default="both", help="wmh: which FLAIR")
    p.add_argument("--fov", type=int, default=256, help="wmh: field of view (mm) the FLAIR is padded to; 0: none")
    p.add_argument("--repeat", type=int, default=1, help="wmh: runs per FLAIR (fresh processes; medians)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="default benchmarks/results/lesion_speed.json (lesion) or "
                                                "wmh_speed.json (wmh)")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(wmh_child(Path(args.child), args.threads)))
        return 0
    if args.model == "wmh":
        return wmh_main(args)
    import torch

    torch.set_num_threads(args.threads)
    ses = session(Path(args.cache), Path(args.anatomy))
    from bidsapp.devices import precision
    from bidsapp.models.lesion import segment

    t0 = time.perf_counter()
    res = segment(ses["images"], ses["brain"], np.eye(4), (1.0, 1.0, 1.0), device="cpu")
    sec = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"seconds": round(sec, 2), "peak_mb": round(peak_mb), "threads": args.threads,
           "precision": precision("cpu"), "shape": list(ses["brain"].shape), "lesions_voxels": int(res.mask.sum())}
    print(json.dumps(out))
    path = Path(args.json or ROOT / "benchmarks" / "results" / "lesion_speed.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
