"""Lesion inference time and memory on one 1 mm session (FLAIR, T1w, T2w, PDw), CPU.

The first call simulates the session (a held-out label map on a simulated 3T scanner, 1 mm) into
``--cache``; every call then loads the shipped model and segments it, printing the seconds of
:func:`bidsapp.models.lesion.segment` (model loading included) and the process's peak memory.
Time it over several runs with a timing harness, e.g.::

    python benchmarks/lesion/speed.py --threads 2          # prints seconds and peak MB; writes JSON
"""

from __future__ import annotations

import argparse
import json
import resource
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


def main(argv=None) -> int:
    from bidsapp.devdata import anatomy_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--anatomy", default=str(anatomy_dir() / "anat-10_dseg.nii.gz"))
    p.add_argument("--cache", default=str(ROOT / "benchmarks" / "results" / "lesion-work" / "speed_session.npz"))
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "lesion_speed.json"))
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    ses = session(Path(args.cache), Path(args.anatomy))
    from bidsapp.models.lesion import segment

    t0 = time.perf_counter()
    res = segment(ses["images"], ses["brain"], np.eye(4), (1.0, 1.0, 1.0), device="cpu")
    sec = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"seconds": round(sec, 2), "peak_mb": round(peak_mb), "threads": args.threads,
           "shape": list(ses["brain"].shape), "lesions_voxels": int(res.mask.sum())}
    print(json.dumps(out))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
