"""Participant-level speed, memory and accuracy on simulated subjects with ground truth.

For each simulated subject (``scanbridge-simulate``: 1 mm MPRAGE T1w, truth under
``derivatives/truth``):

- ``stages``: every step of the T1w workflow called in one process, in order, with ITK limited to
  ``--omp-nthreads`` threads; wall time, CPU time and peak resident memory of each step (peak RSS
  reset between steps through ``/proc/self/clear_refs``);
- ``workflow``: the whole Nipype participant workflow of the subject, as ``scanbridge`` runs it
  (MultiProc with ``--nprocs`` processes, a fresh work directory); wall time and the peak summed RSS
  of the process tree (sampled every 0.2 s);
- ``cli``: the ``scanbridge`` command itself on the subject (``--participant-label``, fresh work and
  output folders, every method that runs by default on the session's contrasts, its report
  included): wall time from start to exit and the peak summed RSS of its process tree. With
  ``--modalities T1w,FLAIR`` this is the issue's figure: a 1 mm T1w + FLAIR session. In the same run,
  unless ``--no-peer``, the same subject goes through the pipeline a user would build instead
  (antspyx N4, template brain extraction, SyN to the template, prior-guided Atropos: the stage run with
  ``--brain-extraction template``), and the table gives both times and their ratio;
- accuracy: Dice of the brain mask and of Atropos' CSF/GM/WM against the truth, and (stage run) of
  the template brain mask brought onto the subject by the registration (``--brain-extraction``
  learned, the app's default, or template: run both to see what the starting mask does to the
  registration's time and accuracy).

Prints a table of medians and writes ``benchmarks/results/participant.json``.

    python benchmarks/participant/run.py --subjects 3 --nprocs 2 --omp-nthreads 2
    python benchmarks/participant/run.py --subjects 3 --modalities T1w,FLAIR --mode cli
    python benchmarks/participant/run.py --subjects 3 --modalities T1w,FLAIR --mode stages \
        --brain-extraction template        # the peer pipeline alone
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bidsapp.devdata import anatomy_dir  # noqa: E402

DEFAULT_ANATOMY = anatomy_dir()


# ---------------------------------------------------------------------------- memory probes


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                kids.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return kids


def _tree_rss_kb(pid: int) -> int:
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        total += _rss_kb(p)
        todo.extend(_children(p))
    return total


class TreeSampler:
    """Peak summed RSS of this process and its descendants, sampled in a thread."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak_kb = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        pid = os.getpid()
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, _tree_rss_kb(pid))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------------------- data


def simulate(out: Path, subjects: int, resolution: float, anatomy_dir: Path | None, seed: int,
             modalities=("T1w",)) -> list[dict]:
    from bidsapp.physics.dataset import DatasetConfig, write_dataset

    if not (out / "dataset_description.json").is_file():
        cfg = DatasetConfig(subjects=subjects, sites=min(subjects, 3), sessions=1, resolution=resolution,
                            seed=seed, anatomy_dir=str(anatomy_dir) if anatomy_dir else None,
                            modalities=tuple(modalities))
        write_dataset(out, cfg)
    cases = []
    for t1w in sorted(out.glob("sub-*/ses-*/anat/*_T1w.nii.gz"))[:subjects]:
        rel = t1w.relative_to(out)
        truth_dir = out / "derivatives" / "truth" / rel.parent
        stem = t1w.name[: -len("_T1w.nii.gz")]
        sidecar = json.loads(t1w.with_name(stem + "_T1w.json").read_text())
        cases.append({"subject": rel.parts[0][4:], "session": rel.parts[1][4:], "t1w": t1w,
                      "mask": truth_dir / f"{stem}_desc-brain_mask.nii.gz", "dseg": truth_dir / f"{stem}_dseg.nii.gz",
                      "sidecar": sidecar})
    return cases


# ---------------------------------------------------------------------------- accuracy


def accuracy(case: dict, mask_file, dseg_file) -> dict:
    import nibabel as nib
    import numpy as np

    from bidsapp.metrics.overlap import dice

    def ras(p):
        return np.asarray(nib.as_closest_canonical(nib.load(str(p))).dataobj)

    truth_mask, truth_dseg = ras(case["mask"]) > 0, ras(case["dseg"])
    mask, dseg = ras(mask_file) > 0, ras(dseg_file)
    out = {"brain_mask_dice": dice(mask, truth_mask)}
    for k, name in enumerate(("CSF", "GM", "WM"), start=1):
        out[f"atropos_{name}_dice"] = dice(dseg == k, truth_dseg == k)
    return out


# ---------------------------------------------------------------------------- runs


def run_stages(case: dict, template: dict, work: Path, omp: int, seed: int, brain_extraction: str = "learned") -> dict:
    """The T1w steps one after the other, in this process; also how well the registration puts the
    template's brain mask on the subject's true brain (Dice), which a better starting mask should help."""
    import nibabel as nib
    import numpy as np

    from bidsapp.metrics.overlap import dice
    from workflows.interfaces import ants as A
    from workflows.interfaces.brainmask import brain_extraction as extract

    A.use_threads(omp, seed)
    f = template["files"]
    work.mkdir(parents=True, exist_ok=True)
    stages: dict[str, dict] = {}
    state: dict = {}

    def stage(name, fn):
        _reset_peak()
        t0, c0 = time.perf_counter(), _cpu_s()
        state[name] = fn()
        stages[name] = {"wall_s": time.perf_counter() - t0, "cpu_s": _cpu_s() - c0, "peak_rss_mb": _peak_kb() / 1024}

    stage("reorient", lambda: A.reorient_to_ras(case["t1w"], work / "ras.nii.gz"))
    stage("n4", lambda: A.n4_correct(state["reorient"], work / "n4.nii.gz"))
    stage("brain_extraction", lambda: extract(state["n4"], f["T1w"], f["mask"], work / "mask.nii.gz",
                                              work / "be.mat", method=brain_extraction, device="cpu", threads=omp))
    stage("registration", lambda: A.register_to_template(state["n4"], work / "mask.nii.gz", f["T1w"], f["mask"],
                                                          work / "reg_", transform="SyN",
                                                          initial_xfm=work / "be.mat"))
    stage("warp_priors", lambda: A.warp_to_subject(state["n4"], [f["CSF"], f["GM"], f["WM"]],
                                                   state["registration"]["inverse"],
                                                   [work / f"prior_{k}.nii.gz" for k in range(3)]))
    stage("atropos", lambda: A.atropos_segment(state["n4"], work / "mask.nii.gz", state["warp_priors"], work))
    acc = accuracy(case, work / "mask.nii.gz", state["atropos"]["dseg"])
    warped = A.warp_to_subject(state["n4"], [f["mask"]], state["registration"]["inverse"],
                               [work / "template_mask_on_subject.nii.gz"])[0]
    truth = np.asarray(nib.as_closest_canonical(nib.load(str(case["mask"]))).dataobj) > 0
    acc["registration_template_mask_dice"] = dice(np.asarray(nib.load(warped).dataobj) >= 0.5, truth)
    return {"stages": stages, "accuracy": acc, "brain_extraction": state["brain_extraction"].get("Method", "")}


def run_workflow(case: dict, template: dict, bids: Path, work: Path, out: Path, nprocs: int, omp: int,
                 seed: int) -> dict:
    """The subject's participant workflow, as the app runs it (MultiProc, fresh work dir)."""
    from workflows.base import init_single_subject_wf

    session = {"session": case["session"], "t1w": str(case["t1w"]), "t2w": [], "flair": [], "pdw": [],
               "acquisition": {}}
    wf = init_single_subject_wf(case["subject"], [session], out, bids, work, template, omp_nthreads=omp, seed=seed)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(omp)
    plugin = (("MultiProc", {"n_procs": nprocs, "raise_insufficient": False, "mp_context": "forkserver"})
              if nprocs > 1 else ("Linear", {}))
    with TreeSampler() as sampler:
        t0 = time.perf_counter()
        wf.run(plugin=plugin[0], plugin_args=plugin[1])
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "peak_tree_rss_mb": sampler.peak_kb / 1024, **_outputs(case, out)}


def _outputs(case: dict, out: Path) -> dict:
    """The session's images in the derivatives and their accuracy against the truth."""
    anat = out / f"sub-{case['subject']}" / f"ses-{case['session']}" / "anat"
    stem = f"sub-{case['subject']}_ses-{case['session']}"
    return {"outputs": sorted(p.name for p in anat.glob("*.nii.gz")),
            "accuracy": accuracy(case, anat / f"{stem}_desc-brain_mask.nii.gz", anat / f"{stem}_dseg.nii.gz")}


def run_cli(case: dict, bids: Path, work: Path, out: Path, nprocs: int, omp: int | None, seed: int) -> dict:
    """``scanbridge bids out participant`` on one subject, as a user runs it."""
    cmd = [sys.executable, "-m", "bidsapp.cli", str(bids), str(out), "participant", "--participant-label",
           case["subject"], "-w", str(work), "--nprocs", str(nprocs), "--seed", str(seed), "--skip-bids-validation"]
    cmd += ["--omp-nthreads", str(omp)] if omp else []  # else the app's default
    _, wall, peak_mb = timed(cmd)
    return {"wall_s": wall, "peak_tree_rss_mb": peak_mb, **_outputs(case, out)}


def timed(cmd: list[str]):
    """Run a command to its end: (the finished process, wall seconds, peak summed RSS of its process tree
    in MB); RuntimeError with the end of its stderr when it fails."""
    import subprocess

    with TreeSampler() as sampler:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:6])} ... exited with {proc.returncode}: {proc.stderr[-3000:]}")
    return proc, wall, sampler.peak_kb / 1024


# ---------------------------------------------------------------------------- report


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def summarise(results: list[dict]) -> dict:
    summary: dict = {"stages": {}, "workflow": {}, "accuracy": {}}
    stage_runs = [r["stages"]["stages"] for r in results if "stages" in r]
    if stage_runs:
        for name in stage_runs[0]:
            summary["stages"][name] = {k: _median([s[name][k] for s in stage_runs])
                                       for k in ("wall_s", "cpu_s", "peak_rss_mb")}
        summary["stages"]["total"] = {
            "wall_s": _median([sum(s[n]["wall_s"] for n in s) for s in stage_runs]),
            "cpu_s": _median([sum(s[n]["cpu_s"] for n in s) for s in stage_runs]),
            "peak_rss_mb": _median([max(s[n]["peak_rss_mb"] for n in s) for s in stage_runs]),
        }
    peer = [r["peer"]["stages"] for r in results if "peer" in r]
    if peer:
        summary["peer"] = {"wall_s": _median([sum(s[n]["wall_s"] for n in s) for s in peer]),
                           "max_wall_s": max(sum(s[n]["wall_s"] for n in s) for s in peer),
                           "peak_rss_mb": _median([max(s[n]["peak_rss_mb"] for n in s) for s in peer]),
                           "stages_wall_s": {n: _median([s[n]["wall_s"] for s in peer]) for n in peer[0]},
                           "accuracy": {k: _median([r["peer"]["accuracy"][k] for r in results if "peer" in r])
                                        for k in next(r for r in results if "peer" in r)["peer"]["accuracy"]}}
    for mode in ("workflow", "cli"):
        runs = [r[mode] for r in results if mode in r]
        if runs:
            summary[mode] = {"wall_s": _median([w["wall_s"] for w in runs]),
                             "peak_tree_rss_mb": _median([w["peak_tree_rss_mb"] for w in runs]),
                             "max_wall_s": max(w["wall_s"] for w in runs),
                             "max_peak_tree_rss_mb": max(w["peak_tree_rss_mb"] for w in runs)}
    # one value per subject: the command's or workflow's outputs when it ran, else the stage run's
    accs = [next(r[m] for m in ("cli", "workflow", "stages") if m in r)["accuracy"] for r in results
            if any(m in r for m in ("cli", "workflow", "stages"))]
    if accs:
        for key in accs[0]:
            vals = [a[key] for a in accs]
            summary["accuracy"][key] = {"median": _median(vals), "min": min(vals), "n": len(vals)}
    return summary


def print_table(summary: dict, args) -> None:
    threads = args.omp_nthreads or ("the app's default" if args.mode == "cli" else 2)
    print(f"\nParticipant level, {args.resolution:g} mm {args.modalities}, omp-nthreads={threads}, "
          f"nprocs={args.nprocs}; load average at end {os.getloadavg()[0]:.1f}")
    if summary["stages"]:
        print(f"{'stage':<18}{'wall s':>9}{'CPU s':>9}{'peak RSS MB':>13}")
        for name, s in summary["stages"].items():
            print(f"{name:<18}{s['wall_s']:>9.1f}{s['cpu_s']:>9.1f}{s['peak_rss_mb']:>13.0f}")
    for mode, what in (("workflow", "whole subject workflow (Nipype MultiProc)"),
                       ("cli", "scanbridge participant, one subject (the command)")):
        if summary.get(mode):
            w = summary[mode]
            print(f"\n{what}: median {w['wall_s']:.0f} s (max {w['max_wall_s']:.0f} s), "
                  f"peak memory {w['peak_tree_rss_mb']:.0f} MB (max {w['max_peak_tree_rss_mb']:.0f} MB)")
    if summary.get("peer"):
        w = summary["peer"]
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in w["stages_wall_s"].items())
        print(f"peer pipeline on the same subjects (antspyx N4 + template brain extraction + SyN + Atropos, T1w only): "
              f"median {w['wall_s']:.0f} s (max {w['max_wall_s']:.0f} s), peak memory {w['peak_rss_mb']:.0f} MB "
              f"[{stages}]")
        print("peer accuracy vs truth (median): " + ", ".join(f"{k} {v:.3f}" for k, v in w["accuracy"].items()))
        if summary.get("cli"):
            print(f"scanbridge / peer wall time: {summary['cli']['wall_s'] / w['wall_s']:.2f}")
    if summary["accuracy"]:
        print(f"\n{'accuracy vs truth':<24}{'median':>8}{'min':>8}{'n':>4}")
        for key, a in summary["accuracy"].items():
            print(f"{key:<24}{a['median']:>8.3f}{a['min']:>8.3f}{a['n']:>4}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", type=int, default=3)
    p.add_argument("--resolution", type=float, default=1.0)
    p.add_argument("--anatomy-dir", type=Path, default=DEFAULT_ANATOMY if DEFAULT_ANATOMY.is_dir() else None,
                   help="label maps for the simulated anatomies (default: the shared development set if present)")
    p.add_argument("--nprocs", type=int, default=2)
    p.add_argument("--omp-nthreads", type=int, default=None,
                   help="threads per step (default: 2 for stages and workflow, the app's own default for cli)")
    p.add_argument("--mode", choices=["stages", "workflow", "both", "cli"], default="both")
    p.add_argument("--modalities", default="T1w", help="simulated contrasts, e.g. T1w,FLAIR")
    p.add_argument("--brain-extraction", choices=["learned", "template"], default="learned",
                   help="brain-extraction method of the stage run (the workflow uses the app's default)")
    p.add_argument("--no-peer", action="store_true", help="cli mode: skip the peer pipeline run")
    p.add_argument("--template-resolution", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=None, help="reuse or create the simulated dataset here")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "participant.json")
    args = p.parse_args(argv)
    omp = args.omp_nthreads or 2  # the stage and workflow runs

    from bidsapp.templates import get_template

    scratch = Path(tempfile.mkdtemp(prefix="scanbridge-bench-"))
    data = args.data or scratch / "bids"
    t0 = time.perf_counter()
    cases = simulate(data, args.subjects, args.resolution, args.anatomy_dir, args.seed,
                     [m.strip() for m in args.modalities.split(",") if m.strip()])
    print(f"simulated {len(cases)} subject(s) in {time.perf_counter() - t0:.0f} s under {data}", flush=True)
    template = get_template(resolution=args.template_resolution, cache_dir=scratch / "templates")
    results = []
    for case in cases:
        res: dict = {"subject": case["subject"], "protocol": case["sidecar"].get("ProtocolName")}
        tag = f"sub-{case['subject']}"
        if args.mode in ("stages", "both"):
            res["stages"] = run_stages(case, template, scratch / "stages" / tag, omp, args.seed,
                                       args.brain_extraction)
            print(tag, "stages", json.dumps(res["stages"], default=float), flush=True)
        if args.mode in ("workflow", "both"):
            res["workflow"] = run_workflow(case, template, data, scratch / "work" / tag, scratch / "out",
                                           args.nprocs, omp, args.seed)
            print(tag, "workflow", json.dumps(res["workflow"], default=float), flush=True)
        if args.mode == "cli":
            res["cli"] = run_cli(case, data, scratch / "work" / tag, scratch / "out", args.nprocs, args.omp_nthreads,
                                 args.seed)
            print(tag, "cli", json.dumps(res["cli"], default=float), flush=True)
            if not args.no_peer:
                res["peer"] = run_stages(case, template, scratch / "peer" / tag, omp, args.seed, "template")
                print(tag, "peer", json.dumps(res["peer"], default=float), flush=True)
        results.append(res)
    summary = summarise(results)
    print_table(summary, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]), "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "template": {k: template[k] for k in ("name", "source", "resolution")},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_end": os.getloadavg()},
        "summary": summary, "runs": results}
    args.out.write_text(json.dumps(doc, indent=2, default=float))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
