"""How long the app takes to plan a run of a large dataset, before any processing starts.

Builds BIDS datasets of ``--subjects`` subjects (two sessions each, a T1w and a FLAIR with sidecars per
session: 8 files per subject; the images are small valid NIfTIs), then times
``bidsapp.bids.discovery.discover`` on each in a fresh process with every scanbridge module the CLI
imports already loaded (pybids' indexing, the per-subject planning and the image header checks).
Prints a table and writes ``benchmarks/results/discovery.json``.

    python benchmarks/participant/discovery.py --subjects 25 125 250
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import sys, time
import bidsapp.cli, workflows.base  # the app's imports, as the CLI has them when it discovers
from bidsapp.bids.discovery import discover
t = time.perf_counter()
plan = discover(sys.argv[1])
print(time.perf_counter() - t, sum(len(s.sessions) for s in plan.subjects))
"""


def make_dataset(root: Path, subjects: int) -> int:
    import nibabel as nib
    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "discovery", "BIDSVersion": "1.8.0"}))
    img = nib.Nifti1Image(np.random.default_rng(0).integers(1, 100, (8, 8, 8)).astype(np.int16), np.eye(4))
    n = 1
    for i in range(subjects):
        for ses in (1, 2):
            anat = root / f"sub-{i:04d}" / f"ses-{ses}" / "anat"
            anat.mkdir(parents=True, exist_ok=True)
            for suffix in ("T1w", "FLAIR"):
                stem = anat / f"sub-{i:04d}_ses-{ses}_{suffix}"
                nib.save(img, f"{stem}.nii.gz")
                stem.with_suffix(".json").write_text(json.dumps({"RepetitionTime": 2.0}))
                n += 2
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, nargs="+", default=[25, 125, 250])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "discovery.json"))
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.subjects:
            root = Path(tmp) / f"ds{n}"
            files = make_dataset(root, n)
            t = time.perf_counter()
            res = subprocess.run([sys.executable, "-c", CHILD, str(root)], capture_output=True, text=True, cwd=ROOT)
            if res.returncode:
                print(res.stderr, file=sys.stderr)
                return 1
            seconds, sessions = res.stdout.split()
            rows.append({"subjects": n, "files": files, "sessions": int(sessions),
                         "discover_s": round(float(seconds), 2), "process_s": round(time.perf_counter() - t, 2)})
            print(f"{n:5d} subjects {files:6d} files: discover {float(seconds):6.1f} s "
                  f"(whole process {rows[-1]['process_s']:.1f} s)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
