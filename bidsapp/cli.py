"""The BIDS-App command line: ``scanbridge bids_dir output_dir participant|group``.

This is the one module that ties BIDS discovery (``bidsapp.bids``) to the Nipype graphs (``workflows``):
it validates what the user asked for, prints the plan, runs every subject's workflow in one Nipype graph
(one scheduler fills every core; a broken subject never stops the others), and turns user mistakes
into one-line messages with a non-zero exit.

Exit codes: 0 everything asked for was produced; 1 at least one subject (or group step) failed, a
session whose quality control said its scan is not usable included; 2 the run could not start (bad
arguments or input).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bidsapp import __version__
from bidsapp.errors import UserError

LOG = logging.getLogger("scanbridge")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PLUGINS = ("Linear", "MultiProc", "SLURM", "SLURMGraph", "SGE", "SGEGraph", "PBS", "LSF", "Condor")


def _lesion_threshold(text: str) -> float:
    """An argparse type: a lesion mask threshold (:func:`bidsapp.models.lesion.check_threshold`)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None
    from bidsapp.models.lesion import check_threshold

    try:
        return check_threshold(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(text: str) -> int:
    """An argparse type: a whole number of at least 1 (processes, threads)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _gigabytes(text: str) -> float:
    """An argparse type: a positive, finite amount of memory in GB."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of GB, not {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number of GB, not {text}")
    return value


class _Methods(argparse.Action):
    """``nargs="+"`` list of method keys (argparse checks each against ``choices``); a key given twice is a
    usage error, since the order says which is the main answer."""

    def __call__(self, parser, namespace, values, option_string=None):
        twice = [v for v in dict.fromkeys(values) if values.count(v) > 1]
        if twice:
            raise argparse.ArgumentError(self, f"listed twice: {', '.join(twice)}")
        setattr(namespace, self.dest, list(values))


def build_parser() -> argparse.ArgumentParser:
    from bidsapp import methods
    from bidsapp.harmonize.context import GroupOptions
    from bidsapp.labels import LESION, TISSUE

    p = argparse.ArgumentParser(
        prog="scanbridge",
        description="Scanner- and protocol-robust structural brain MRI (BIDS App).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("bids_dir", type=Path, help="the root of the input BIDS dataset (never written)")
    p.add_argument("output_dir", type=Path, help="where BIDS-Derivatives and reports are written")
    p.add_argument("analysis_level", choices=["participant", "group"], help="processing stage")
    p.add_argument("--version", action="version", version=f"scanbridge {__version__}")

    g = p.add_argument_group("selecting data")
    g.add_argument("--participant-label", "--participant_label", nargs="+", metavar="LABEL",
                   help="subjects to process (with or without 'sub-'); default: all")
    g.add_argument("--session-label", "--session_label", nargs="+", metavar="LABEL",
                   help="sessions to process (with or without 'ses-'); default: all")
    g.add_argument("--bids-filter-file", "--bids_filter_file", type=Path, metavar="FILE",
                   help="JSON of pybids queries per image type, as in fMRIPrep, e.g. "
                        '{"t1w": {"acquisition": "mprage"}}')
    g.add_argument("--skip-bids-validation", "--skip_bids_validation", action="store_true",
                   help="do not run the BIDS validator on the input")

    g = p.add_argument_group("resources")
    g.add_argument("-w", "--work-dir", "--work_dir", type=Path,
                   help="Nipype working directory; rerunning with the same one resumes "
                        "(default: ./work, or a temporary folder when the current one is read-only)")
    g.add_argument("--nprocs", "--nthreads", "--n_cpus", "--n-cpus", type=_count, default=None,
                   help="maximum number of processes (default: all CPUs)")
    g.add_argument("--omp-nthreads", "--omp_nthreads", type=_count, default=None,
                   help="threads of a neural-network step (default: --nprocs minus one, at most 8; the "
                        "ANTs steps always use one)")
    g.add_argument("--mem-gb", "--mem_gb", type=_gigabytes, default=None, help="memory limit for the scheduler")
    g.add_argument("--plugin", choices=PLUGINS, default=None,
                   help="Nipype execution plugin (SLURM/SGE/PBS/LSF run nodes as cluster jobs)")
    g.add_argument("--plugin-args", "--plugin_args", default=None, metavar="JSON|FILE",
                   help='Nipype plugin arguments as JSON or a JSON file, e.g. {"sbatch_args": "-p short"}')
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where neural networks run")

    g = p.add_argument_group("processing")
    g.add_argument("--template", default="MNI152NLin2009cAsym",
                   help="TemplateFlow template for spatial normalisation")
    g.add_argument("--seed", type=int, default=0, help="random seed for everything stochastic")
    g.add_argument("--brain-extraction", "--brain_extraction", choices=["learned", "template"], default="learned",
                   help="learned: the contrast-agnostic brain-extraction network (default; the template-based "
                        "method runs instead, and the report says so, when its mask fails the sanity check); "
                        "template: register the template brain and warp its mask")
    tissue = methods.registry(methods.SESSION, TISSUE.key)
    g.add_argument("--segmentation", nargs="+", choices=list(tissue), default=list(methods.DEFAULT_TISSUE),
                   metavar="METHOD", action=_Methods,
                   help="tissue segmentation methods, main answer first (the others are written with "
                        "desc-<method>): " + "; ".join(f"{k}: {m.summary}" for k, m in tissue.items()))
    lesion = methods.registry(methods.SESSION, LESION.key)
    g.add_argument("--lesion-methods", "--lesion_methods", nargs="+", choices=list(lesion),
                   default=list(methods.default_methods(LESION.key)), metavar="METHOD", action=_Methods,
                   help="lesion segmentation methods, main answer first: on each session the first that its "
                        "contrasts allow is written as desc-lesion, the others beside it as desc-<method> "
                        f"({', '.join(f'{k}: desc-{m.desc}' for k, m in lesion.items())}); choices: "
                        + "; ".join(f"{k}: {m.summary}" for k, m in lesion.items()))
    g.add_argument("--lesion-threshold", "--lesion_threshold", type=_lesion_threshold, default=None, metavar="P",
                   help="probability at which every lesion method's mask is cut (default 0.5: the volume of "
                        "faint lesions as on clinical scans comes out unbiased; 0.6-0.7 suits bright, sharply "
                        "bounded lesions of 3D research FLAIR; docs/lesions.md). The probability map is "
                        "written either way")

    g = p.add_argument_group("group level")
    g.add_argument("--labels-dir", "--labels_dir", type=Path, default=None,
                   help="BIDS-Derivatives folder of manual tissue labels (dseg: CSF=1, GM=2, WM=3) "
                        "for the harmonisation's target scanners")
    g.add_argument("--target-labels-per-tissue", type=_count, default=GroupOptions.target_labels_per_tissue,
                   help="labelled voxels per tissue taken from each target acquisition group")

    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    return p


# ---------------------------------------------------------------------------- argument checks


def _resolve_paths(opts) -> None:
    from bidsapp.bids.discovery import check_paths

    if opts.work_dir is None:
        opts.work_dir = _default_work_dir()
    opts.bids_dir = check_paths(opts.bids_dir, opts.output_dir, opts.work_dir)
    opts.output_dir = opts.output_dir.expanduser().resolve()
    opts.work_dir = opts.work_dir.expanduser().resolve()
    if opts.labels_dir is not None and not opts.labels_dir.is_dir():
        raise UserError(f"{opts.labels_dir}: labels directory does not exist")
    opts.plugin_settings = _plugin_settings(opts)  # a bad --plugin-args fails before any work
    for what, path in (("output folder", opts.output_dir), ("work folder", opts.work_dir)):
        _check_writable(path, what)


def _check_writable(path: Path, what: str) -> None:
    """A folder the run will write must be writable (or creatable) before anything runs."""
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{path}: cannot be used as the {what} ({probe} is not a folder)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{path}: the {what} is not writable (no write permission on {probe})")


def _default_work_dir() -> Path:
    cwd = Path.cwd()
    if os.access(cwd, os.W_OK):
        return cwd / "work"
    wd = Path(tempfile.gettempdir()) / "scanbridge-work"
    LOG.warning("current directory %s is not writable: using %s as work directory (pass -w to resume later)",
                cwd, wd)
    return wd


def _plugin_settings(opts) -> dict:
    nprocs = opts.nprocs or os.cpu_count() or 1
    plugin = opts.plugin or ("Linear" if nprocs == 1 else "MultiProc")
    args: dict = {}
    if opts.plugin_args:
        text = opts.plugin_args
        if Path(text).is_file():
            text = Path(text).read_text()
        try:
            args = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"--plugin-args: not valid JSON ({exc.msg})") from None
        if not isinstance(args, dict):
            raise UserError("--plugin-args: must be a JSON object")
    if plugin == "MultiProc":
        args.setdefault("n_procs", nprocs)
        if opts.mem_gb:
            args.setdefault("memory_gb", opts.mem_gb)
        args.setdefault("raise_insufficient", False)
        # as fMRIPrep: forked workers deadlock when the parent has already started OpenMP/torch threads
        args.setdefault("mp_context", "forkserver")
    return {"plugin": plugin, "plugin_args": args}


NIPYPE_SETTINGS = {"execution": {"crashfile_format": "txt", "remove_unnecessary_outputs": "false",
                                  # Nipype checks for finished nodes every 2 s by default: each link of a
                                  # chain of short nodes (sinks, merges, the methods' many small steps) then
                                  # waits up to 2 s, about 20 s of a 70 s demo subject
                                  "poll_sleep_duration": "0.2"},
                   "monitoring": {"enabled": "false"}}
NIPYPE_LOGGERS = ("workflow", "interface", "utils")


def _nipype_level(verbose: int) -> str:
    return "INFO" if verbose >= 1 else "WARNING"


class _NoTraceback(logging.Filter):
    """Keep a Nipype crash record's lines before its traceback on the terminal: the record names the
    crash file, which holds the whole traceback (``-v`` shows it here too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "Traceback" in msg:
            record.msg, record.args = msg.split("Traceback", 1)[0].rstrip(), ()
        return True


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose + 1, 2)
    logging.basicConfig(level=level, format="%(asctime)s scanbridge %(levelname)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    from nipype import config, logging as nlogging

    logging.getLogger("bidsschematools").setLevel(logging.WARNING)

    for section, values in NIPYPE_SETTINGS.items():
        for key, value in values.items():
            config.set(section, key, value)
    for name in NIPYPE_LOGGERS:
        logger = nlogging.getLogger(f"nipype.{name}")
        logger.setLevel(_nipype_level(verbose))
        logger.propagate = False  # Nipype prints its own records; do not print them twice
        if verbose < 1 and not any(isinstance(f, _NoTraceback) for f in logger.filters):
            logger.addFilter(_NoTraceback())


def _configure_nipype_workers(work_dir: Path, verbose: int) -> None:
    """Give MultiProc workers the CLI's Nipype settings and log level.

    Workers start from a forkserver and import Nipype afresh, so what was set in this process does
    not reach them; Nipype reads ``$NIPYPE_CONFIG_DIR/nipype.cfg`` on import. A user's own
    NIPYPE_CONFIG_DIR is left alone.
    """
    if os.environ.get("NIPYPE_CONFIG_DIR"):
        return
    from bidsapp.bids.derivatives import atomic_write_text

    sections = {"logging": {f"{k}_level": _nipype_level(verbose) for k in NIPYPE_LOGGERS}, **NIPYPE_SETTINGS}
    text = "".join(f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())
                   for name, values in sections.items())
    cfg_dir = work_dir / "nipype"
    atomic_write_text(cfg_dir / "nipype.cfg", text)
    os.environ["NIPYPE_CONFIG_DIR"] = str(cfg_dir)


def _set_threads(omp_nthreads: int | None, nprocs: int | None) -> int:
    """Threads of a network node (default, as fMRIPrep's: one fewer than the processes, at most 8). A
    node takes as many Nipype slots as it has threads: with every slot a network would stop the
    single-threaded ANTs steps of the same or another session (on 2 CPUs the 1 mm T1w + FLAIR
    session's lesion networks waited 76 s for Atropos) instead of running beside them."""
    procs = nprocs or os.cpu_count() or 1
    n = omp_nthreads or max(1, min(8, procs - 1))
    os.environ["OMP_NUM_THREADS"] = str(n)
    from workflows.interfaces.ants import ITK_THREADS

    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(ITK_THREADS)
    return n


# ---------------------------------------------------------------------------- participant level


def run_participant(opts) -> int:
    from bidsapp import methods
    from bidsapp.bids import derivatives, discovery, validation
    from bidsapp.lifecycle import WorkFolderBusy, work_lock
    from bidsapp.reports.participant import write_participant_report

    if not opts.skip_bids_validation:
        report = validation.validate_dataset(opts.bids_dir)
        for msg in report.warnings:
            LOG.warning("BIDS validation: %s", msg)
        if not report.ok:
            for msg in report.errors:
                print(f"scanbridge: BIDS validation: {msg}", file=sys.stderr)
            raise UserError(f"{opts.bids_dir}: not a valid BIDS dataset ({len(report.errors)} error(s) above); "
                            "fix them or pass --skip-bids-validation")
    plan = discovery.discover(
        opts.bids_dir,
        participant_label=opts.participant_label,
        session_label=opts.session_label,
        bids_filter_file=opts.bids_filter_file,
        output_dir=opts.output_dir,
        work_dir=opts.work_dir,
    )
    print(plan.summary(), flush=True)
    segmentation = tuple(opts.segmentation)
    lesion_methods = tuple(opts.lesion_methods)
    keys = methods.select(segmentation, lesion=lesion_methods)
    plan_lines = {subj.subject: subject_plan_lines(subj, keys) for subj in plan.runnable_subjects}
    if any(plan_lines.values()):
        print("methods left out:", flush=True)
        for lines in plan_lines.values():
            for line in lines:
                print(f"  {line}", flush=True)

    if not plan.runnable_subjects:  # nothing to run: leave the output folder as it was
        print(f"scanbridge: nothing to process in {opts.bids_dir} (see above); no outputs written", file=sys.stderr)
        return EXIT_FAILED

    from bidsapp.templates import get_template
    from workflows.base import init_single_subject_wf

    opts.output_dir.mkdir(parents=True, exist_ok=True)
    derivatives.write_dataset_description(opts.output_dir, bids_dir=opts.bids_dir)
    template = get_template(opts.template, cache_dir=opts.work_dir / "templates")
    LOG.info("template: %s (%s)", template["name"], template["source"])

    command_line = " ".join(["scanbridge", *sys.argv[1:]])
    omp = _set_threads(opts.omp_nthreads, opts.nprocs)
    _configure_nipype_workers(opts.work_dir, opts.verbose)
    failed = [s.subject for s in plan.skipped_subjects]
    t0 = time.time()

    def finish(subj, errors: list[str]) -> None:
        """Mark a subject's outputs, write its report and say so (as soon as its last step ends)."""
        label = subj.subject
        if errors:
            failed.append(label)
            for msg in errors:
                LOG.error("sub-%s failed: %s", label, msg)
            LOG.error("sub-%s: details in %s", label, _crash_dir(opts, label))
        try:
            derivatives.mark_incomplete(opts.output_dir, label, None if not errors else (
                f"the run of sub-{label} failed ({errors[0]}); this output is from a step that finished, "
                "others are missing; rerun to complete"))
        except OSError as exc:
            LOG.error("sub-%s: could not mark its outputs incomplete: %s", label, _first_line(exc))
        warnings = list(subj.warnings) + [reason for _, reason in subj.skipped]
        try:
            report = write_participant_report(opts.output_dir, label, warnings=warnings, errors=errors,
                                              notes=plan_lines[label],
                                              template=template, command_line=command_line)
            LOG.info("sub-%s: %s after %.0f s; report %s", label, "FAILED" if errors else "done",
                     time.time() - t0, report)
            if not errors:
                opts.finished.append(f"sub-{label}")
        except Exception as exc:
            LOG.error("sub-%s: report could not be written: %s", label, _first_line(exc))

    # reports are written on one thread of their own (matplotlib is used from one thread only), so
    # that Nipype goes on scheduling the other subjects' steps while a finished subject's is drawn
    with contextlib.ExitStack() as locks, ThreadPoolExecutor(1, thread_name_prefix="report") as reports:
        built = {}
        for subj in plan.runnable_subjects:
            label = subj.subject
            try:
                locks.enter_context(work_lock(opts.work_dir, f"sub-{label}"))
            except WorkFolderBusy as exc:  # another run is on this subject: leave it (and its report) alone
                LOG.error("sub-%s not processed: %s", label, exc)
                failed.append(label)
                continue
            try:
                built[label] = init_single_subject_wf(
                    subject=label,
                    sessions=[_session_inputs(ses) for ses in subj.sessions],
                    output_dir=opts.output_dir,
                    bids_dir=opts.bids_dir,
                    work_dir=opts.work_dir,
                    template=template,
                    omp_nthreads=omp,
                    device=opts.device,
                    seed=opts.seed,
                    segmentation=segmentation,
                    lesion_methods=lesion_methods,
                    lesion_threshold=opts.lesion_threshold,
                    brain_extraction=opts.brain_extraction,
                )
            except Exception as exc:  # one subject's failure must not stop the others
                reports.submit(finish, subj, [_first_line(exc)])
        subjects = {s.subject: s for s in plan.runnable_subjects if s.subject in built}
        if built:
            run_error = _run_subjects(opts, built, lambda label: reports.submit(finish, subjects[label], []))
            for label, subj in subjects.items():
                if label in opts.progress.complete:
                    continue
                found = _crash_messages(_crash_dir(opts, label), since=t0)
                why = _first_line(run_error) if run_error else "the run ended before its last step"
                reports.submit(finish, subj, found or [why])
    for subj in plan.skipped_subjects:  # the report says why nothing was produced
        try:
            write_participant_report(opts.output_dir, subj.subject, warnings=list(subj.warnings),
                                     errors=[reason for _, reason in subj.skipped] or ["no usable structural image"],
                                     template=template, command_line=command_line)
        except Exception as exc:
            LOG.error("sub-%s: report could not be written: %s", subj.subject, _first_line(exc))
    if failed:
        LOG.error("finished with errors for: %s", ", ".join(f"sub-{s}" for s in failed))
    if failed or plan.has_problems:
        return EXIT_FAILED
    return EXIT_OK


def _crash_dir(opts, label: str) -> Path:
    """Where Nipype writes a subject's crash files (the tracebacks its one-line errors point to)."""
    return opts.work_dir / "crash" / f"sub-{label}"


def _run_subjects(opts, subject_wfs: dict, on_subject_end) -> Exception | None:
    """Run every subject's workflow in one Nipype graph (one scheduler keeps every core busy across
    subjects), each subject's crash files in its own folder; returns the run's error, if any."""
    import nipype.pipeline.engine as pe

    from bidsapp.progress import RunProgress, subjects_in_turn

    top = pe.Workflow(name="scanbridge_wf", base_dir=str(opts.work_dir))
    for label, wf in subject_wfs.items():
        wf.config["execution"]["crashdump_dir"] = str(_crash_dir(opts, label))
        for node in wf._get_all_nodes():  # a nested workflow's config does not reach its nodes
            node.config = copy.deepcopy(wf.config)
        top.add_nodes([wf])
    opts.progress = RunProgress(subject_wfs, on_subject_end)
    plugin = opts.plugin_settings["plugin"]
    plugin_args = {**opts.plugin_settings.get("plugin_args", {}), "status_callback": opts.progress}
    if plugin == "MultiProc":
        plugin = subjects_in_turn(plugin_args, [wf.name for wf in subject_wfs.values()])
    LOG.info("running %d subject(s): %d steps", len(subject_wfs), opts.progress.total)
    try:
        top.run(plugin=plugin, plugin_args=plugin_args)
    except Exception as exc:  # a failed step: its subject is reported below, the others have finished
        return exc
    return None


def _session_inputs(ses) -> dict:
    """The workflow's plain-dict input for one session (the first usable T1w run is the reference; a
    session without a T1w is aligned to its first FLAIR, T2w or PDw)."""
    return {
        "session": ses.session,
        "t1w": str(ses.t1w[0]) if ses.t1w else None,
        "t2w": [str(p) for p in ses.t2w],
        "flair": [str(p) for p in ses.flair],
        "pdw": [str(p) for p in ses.pdw],
        "acquisition": ses.acquisitions[ses.reference].to_dict(),
        "acquisitions": {str(p): ses.acquisitions[p].to_dict() for p in (*ses.t2w, *ses.flair, *ses.pdw)},
        "acq_time": ses.acq_time,
    }


def subject_plan_lines(subj, keys) -> list[str]:
    """One line per method that a subject's session contrasts, or its sessions, leave out (and why)."""
    from bidsapp import methods

    lines = []
    for ses in subj.sessions:
        for why in methods.plan_session(keys, ses.contrasts).skipped:
            lines.append(f"{ses.label}: {why}; reference image {ses.reference.name}")
    if len(subj.sessions) < 2:  # a cross-sectional subject: nothing to say about the subject-level methods
        return lines
    _, skipped = methods.plan_subject(methods.select(level=methods.SUBJECT), [ses.contrasts for ses in subj.sessions])
    return lines + [f"sub-{subj.subject}: {why}" for why in skipped]


def _crash_messages(crash_dir: Path, since: float) -> list[str]:
    """The final error line of each Nipype crash file written by this run (what a user needs first)."""
    out = []
    for crash in sorted(crash_dir.glob("crash-*.txt")) if crash_dir.is_dir() else []:
        if crash.stat().st_mtime < since:
            continue
        lines = [ln.strip() for ln in crash.read_text(errors="replace").splitlines() if ln.strip()]
        node = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Node:")), crash.name)
        last = next((ln for ln in reversed(lines) if "Error:" in ln or "Exception:" in ln), lines[-1] if lines else "")
        if "QualityControlError: " in last:  # a failed QC verdict: its message names session, file and reasons
            out.append(last.split("QualityControlError: ", 1)[1][:1000])
            continue
        out.append(f"{node}: {last}"[:500])
    return out


def _first_line(exc: BaseException) -> str:
    """The line of an exception that names the problem (Nipype's messages end with it)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.startswith("Traceback")]
    return (lines[-1] if lines else type(exc).__name__)[:500]


# ---------------------------------------------------------------------------- entry point


def _check_device(device: str) -> None:
    """``--device cuda`` on a machine without CUDA, or a precision that is not one, stops before anything
    runs; the log says which precision the networks will use."""
    from bidsapp.devices import PRECISION_ENV, cuda_available, precision, requested_precision

    try:
        requested_precision()
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if device == "cuda" and not cuda_available():
        raise UserError("--device cuda: no CUDA device is available on this machine (use --device cpu or auto)")
    LOG.info("neural networks infer in %s (%s=float32 forces float32)", precision(device), PRECISION_ENV)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit, preemption) stops the run like Ctrl-C does."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    import signal

    opts = build_parser().parse_args(argv)
    opts.finished = []
    _setup_logging(opts.verbose)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        _resolve_paths(opts)
        _check_device(opts.device)
        if opts.analysis_level == "participant":
            return run_participant(opts)
        from bidsapp.harmonize.pipeline import run_group

        return run_group(opts)
    except UserError as exc:
        print(f"scanbridge: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        what = "terminated" if isinstance(exc, _Terminated) else "interrupted"
        done = ", ".join(opts.finished) or "no subject"
        print(f"scanbridge: {what}; finished: {done}; rerun with the same --work-dir ({opts.work_dir}) to resume "
              "the rest", file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
