"""The whole group level (`scanbridge bids out group`) at 20 and 200 sessions: wall time, peak memory of the
process tree, time per step, and how the cost grows with the number of sessions.

The sessions are real participant-level outputs, replicated: every subject folder of a finished
participant run (default: the demo's, ``bash scripts/demo.sh``) is copied under new subject labels (files
hard-linked, names and sidecar text rewritten) until there are N sessions, with the matching raw dataset
(participants.tsv, sidecars) beside it. The group level then reads exactly what the participant level writes,
and every default group step runs: the volume tables and plots, MRAI-NET (trained on the group, its maps
and evaluation), ComBat, protocol bridging for each subject whose protocol changed, and the longitudinal
change table. Replicas carry the same images as their source subject, so the figures measure cost, not
harmonisation quality (the demo tables and benchmarks/mrainet measure that).

    python benchmarks/group/run.py [--sessions 20,200] [--bids demo/bids --derivatives demo/out] [--nprocs 2]

Prints a table and writes benchmarks/results/group_scaling.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from benchmarks.participant.run import timed  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TEXT = {".json", ".tsv", ".txt", ".html", ".svg"}
_STEP = re.compile(r"group: (?P<name>.+?) took (?P<s>\d+) s")


def _subjects(derivatives: Path) -> list[str]:
    return sorted(p.name[4:] for p in derivatives.glob("sub-*") if p.is_dir())


def _sessions_of(derivatives: Path, subject: str) -> int:
    return max(1, len(list((derivatives / f"sub-{subject}").glob("ses-*"))))


def _relabel(text: str, old: str, new: str) -> str:
    """``text`` with every ``sub-<old>`` label (not a longer one that starts with it) made ``sub-<new>``."""
    return re.sub(rf"sub-{re.escape(old)}(?![A-Za-z0-9])", f"sub-{new}", text)


def _copy_tree(src: Path, dst: Path, old: str, new: str) -> None:
    """``src`` as ``dst`` relabelled (:func:`_relabel`) in names and text files; images hard-linked."""
    for path in src.rglob("*"):
        rel = _relabel(str(path.relative_to(src)), old, new)
        target = dst / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix in TEXT:
            target.write_text(_relabel(path.read_text(), old, new))
        else:
            os.link(path, target)


def replicate(bids: Path, derivatives: Path, dest: Path, sessions: int) -> dict:
    """A raw dataset and participant outputs with ``sessions`` sessions, made of the given ones."""
    base = [s for s in _subjects(derivatives) if (bids / f"sub-{s}").is_dir()]
    if not base:
        raise SystemExit(f"{derivatives}: no participant outputs with a raw subject in {bids}; run bash scripts/demo.sh")
    out_bids, out_der = dest / "bids", dest / "out"
    out_bids.mkdir(parents=True)
    out_der.mkdir(parents=True)
    for name in ("dataset_description.json", "participants.json", "README"):
        if (bids / name).is_file():
            shutil.copy(bids / name, out_bids / name)
    shutil.copy(derivatives / "dataset_description.json", out_der / "dataset_description.json")
    with open(bids / "participants.tsv", newline="") as fh:
        rows = {r["participant_id"]: r for r in csv.DictReader(fh, delimiter="\t")}
    fields = list(next(iter(rows.values())).keys())
    made, new_rows, k = 0, [], 0
    while made < sessions:
        src = base[k % len(base)]
        new = f"r{k // len(base):03d}x{src}"
        _copy_tree(bids / f"sub-{src}", out_bids / f"sub-{new}", src, new)
        _copy_tree(derivatives / f"sub-{src}", out_der / f"sub-{new}", src, new)
        report = derivatives / f"sub-{src}.html"
        if report.is_file():
            (out_der / f"sub-{new}.html").write_text(_relabel(report.read_text(), src, new))
        new_rows.append({**rows[f"sub-{src}"], "participant_id": f"sub-{new}"})
        made += _sessions_of(derivatives, src)
        k += 1
    with open(out_bids / "participants.tsv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, delimiter="\t", lineterminator="\n")
        w.writeheader()
        w.writerows(new_rows)
    return {"subjects": k, "sessions": made, "source_subjects": len(base)}


def run_group(dest: Path, nprocs: int, seed: int) -> dict:
    cmd = [sys.executable, "-m", "bidsapp.cli", str(dest / "bids"), str(dest / "out"), "group", "-w",
           str(dest / "work"), "--nprocs", str(nprocs), "--seed", str(seed), "--skip-bids-validation"]
    proc, wall, peak_mb = timed(cmd)
    steps = {m["name"]: float(m["s"]) for m in _STEP.finditer(proc.stderr + proc.stdout)}
    return {"wall_s": wall, "peak_tree_rss_mb": peak_mb, "steps_s": steps,
            "warnings": [ln for ln in proc.stderr.splitlines() if "WARNING" in ln or "ERROR" in ln][:20]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", default="20,200", help="comma-separated session counts")
    ap.add_argument("--bids", type=Path, default=ROOT / "demo" / "bids")
    ap.add_argument("--derivatives", type=Path, default=ROOT / "demo" / "out")
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", type=Path, default=None, help="build the datasets here and keep them")
    a = ap.parse_args(argv)
    if a.keep is not None:
        a.keep.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in [int(v) for v in a.sessions.split(",")]:
        tmp = tempfile.mkdtemp(prefix=f"sb-group-{n}-", dir=a.keep)
        try:
            dest = Path(tmp)
            made = replicate(a.bids, a.derivatives, dest, n)
            r = {**made, "nprocs": a.nprocs, **run_group(dest, a.nprocs, a.seed)}
        finally:
            if a.keep is None:
                shutil.rmtree(tmp, ignore_errors=True)
        rows.append(r)
        steps = ", ".join(f"{k} {v:.0f} s" for k, v in r["steps_s"].items())
        print(f"{r['sessions']:4d} sessions ({r['subjects']} subjects): {r['wall_s']:.0f} s, peak tree RSS "
              f"{r['peak_tree_rss_mb']:.0f} MB  [{steps}]", flush=True)
    if len(rows) >= 2:
        a0, a1 = rows[0], rows[-1]
        slope = (a1["wall_s"] - a0["wall_s"]) / (a1["sessions"] - a0["sessions"])
        print(f"marginal cost {slope:.2f} s per session; fixed part {a0['wall_s'] - slope * a0['sessions']:.0f} s; "
              f"{a1['sessions']} sessions in {a1['wall_s'] / 60:.1f} min")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "group_scaling.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    merged = {r["sessions"]: r for r in old.get("runs", [])}  # a partial rerun keeps the other sizes
    merged.update({r["sessions"]: r for r in rows})
    path.write_text(json.dumps({"runs": [merged[k] for k in sorted(merged)], "cpu_count": os.cpu_count()}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
