"""The demo's numbers against a recorded copy: does a change leave every volume where it was?

    python benchmarks/demo/volumes.py compare demo/out          # against benchmarks/demo/recorded/
    python benchmarks/demo/volumes.py record demo/out           # replace the recorded copy

Compares every ``*_desc-volumes_morph.tsv`` (participant level) and ``group_*.tsv`` (group level) of a
``bash scripts/demo.sh`` output with the copy in ``recorded/`` (``group_mrainet_embedding.tsv`` is left
out: it holds 2-D embedding coordinates, not volumes). Numbers are compared with a relative tolerance
(``--rtol``, default 1e-4), text exactly. Prints one row per file and writes
``benchmarks/results/demo_volumes.json``; exits 1 when a file differs, is missing, or is new.

The participant level's images and tables do not depend on ``--nprocs`` or ``--omp-nthreads`` (every
ANTs step runs on one thread), so any run of ``bash scripts/demo.sh`` reproduces the recorded numbers
on the kind of CPU they were recorded on: bfloat16 inference on a CPU with AMX (``SCANBRIDGE_PRECISION=auto``).
float32 inference moves the volumes by up to 0.2 % (Atropos', from the brain mask, 0.7 %), which ``--rtol
0.01`` admits. A CPU that infers in bfloat16 with AVX512-BF16 alone computes other roundings: the
networks' volumes stay within 0.01 %, Atropos' move by up to 2.2 % (a brain mask a few voxels apart), and
the tables of the group level's MRAI-NET, a network trained on the demo's eight sessions, move by up to
18 % (with them ``group_bridging``, ``group_combat_*``, ``group_pad`` and ``group_change``'s
percentages); compare such runs with ``--noisy atropos`` and read the group tables apart.
``--noisy METHOD`` holds the rows of a method to ``--noisy-rtol`` (default 0.1) instead and reports them
apart, for comparing runs made with other settings.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
RECORDED = HERE / "recorded"
RESULTS = HERE.parent / "results"
SKIP = {"group_mrainet_embedding.tsv"}


def tables(out_dir: Path) -> dict[str, Path]:
    """Relative path -> file, for every table this check covers."""
    found = sorted(out_dir.glob("sub-*/**/*_desc-volumes_morph.tsv")) + sorted(out_dir.glob("group_*.tsv"))
    return {p.relative_to(out_dir).as_posix(): p for p in found if p.name not in SKIP}


def compare_table(new: Path, old: Path, rtol: float, noisy=(), noisy_rtol: float = 0.1) -> dict:
    a, b = pd.read_csv(new, sep="\t"), pd.read_csv(old, sep="\t")
    row = {"rows": len(a), "max_rel_diff": 0.0, "problem": None}
    if list(a.columns) != list(b.columns) or a.shape != b.shape:
        row["problem"] = f"shape/columns differ: {a.shape} {list(a.columns)} vs {b.shape} {list(b.columns)}"
        return row
    col = next((c for c in a.columns if c.lower() == "method"), None)
    if col is not None and noisy:
        is_noisy = a[col].astype(str).isin(noisy).to_numpy()
        if is_noisy.any() and (a[col].astype(str) == b[col].astype(str)).all():
            exact = _compare_frames(a[~is_noisy].reset_index(drop=True), b[~is_noisy].reset_index(drop=True), rtol)
            loose = _compare_frames(a[is_noisy].reset_index(drop=True), b[is_noisy].reset_index(drop=True), noisy_rtol)
            exact["rows"] = len(a)
            exact["noisy_max_rel_diff"] = loose["max_rel_diff"]
            exact["problem"] = exact["problem"] or loose["problem"]
            return exact
    return {**_compare_frames(a, b, rtol), "rows": len(a)}


def _compare_frames(a: pd.DataFrame, b: pd.DataFrame, rtol: float) -> dict:
    row = {"max_rel_diff": 0.0, "problem": None}
    for col in a.columns:
        x, y = pd.to_numeric(a[col], errors="coerce"), pd.to_numeric(b[col], errors="coerce")
        numeric = x.notna() & y.notna()
        text_a = a[col].astype(object).where(a[col].notna(), "").astype(str)[~numeric]
        text_b = b[col].astype(object).where(b[col].notna(), "").astype(str)[~numeric]
        if not (text_a == text_b).all():
            row["problem"] = f"column {col}: text differs"
            return row
        if numeric.any():
            xv, yv = x[numeric].to_numpy(float), y[numeric].to_numpy(float)
            rel = np.abs(xv - yv) / np.maximum(np.abs(yv), 1e-12)
            rel[np.abs(xv - yv) < 1e-9] = 0.0
            worst = float(rel.max())
            if worst > row["max_rel_diff"]:
                row["max_rel_diff"] = worst
                row["worst_column"] = col
    if row["max_rel_diff"] > rtol:
        row["problem"] = f"column {row['worst_column']}: relative difference {row['max_rel_diff']:.2e} > {rtol:g}"
    return row


def compare(out_dir: Path, recorded: Path, rtol: float, noisy=(), noisy_rtol: float = 0.1) -> list[dict]:
    new, old = tables(out_dir), tables(recorded)
    rows = []
    for name in sorted(set(new) | set(old)):
        if name not in new:
            rows.append({"file": name, "problem": "missing from the new output"})
        elif name not in old:
            rows.append({"file": name, "problem": "not in the recorded copy"})
        else:
            rows.append({"file": name, **compare_table(new[name], old[name], rtol, noisy, noisy_rtol)})
    return rows


def record(out_dir: Path, recorded: Path) -> int:
    if recorded.exists():
        shutil.rmtree(recorded)
    for name, path in tables(out_dir).items():
        dst = recorded / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dst)
    print(f"recorded {len(tables(recorded))} tables in {recorded}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["compare", "record"])
    p.add_argument("out_dir", type=Path, help="the demo's output folder (demo/out)")
    p.add_argument("--recorded", type=Path, default=RECORDED)
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--noisy", nargs="*", default=[], metavar="METHOD",
                   help="methods whose rows are compared with --noisy-rtol (e.g. atropos after a multi-threaded run)")
    p.add_argument("--noisy-rtol", type=float, default=0.1)
    args = p.parse_args(argv)
    if not args.out_dir.is_dir():
        print(f"{args.out_dir}: not a folder (run bash scripts/demo.sh first)", file=sys.stderr)
        return 2
    if args.action == "record":
        return record(args.out_dir, args.recorded)
    rows = compare(args.out_dir, args.recorded, args.rtol, tuple(args.noisy), args.noisy_rtol)
    width = max(len(r["file"]) for r in rows) if rows else 10
    noisy = "+".join(args.noisy) or "noisy"
    print(f"{'table':<{width}}  {'rows':>5}  {'max rel diff':>12}  {noisy + ' max':>14}  status")
    for r in rows:
        diff = f"{r['max_rel_diff']:.2e}" if "max_rel_diff" in r else "-"
        loose = f"{r['noisy_max_rel_diff']:.2e}" if "noisy_max_rel_diff" in r else "-"
        print(f"{r['file']:<{width}}  {r.get('rows', '-'):>5}  {diff:>12}  {loose:>14}  {r['problem'] or 'same'}")
    bad = [r for r in rows if r["problem"]]
    print(f"{len(rows) - len(bad)} of {len(rows)} tables the same (rtol {args.rtol:g})")
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = {"rtol": args.rtol, "noisy": args.noisy, "noisy_rtol": args.noisy_rtol, "tables": rows}
    (RESULTS / "demo_volumes.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
