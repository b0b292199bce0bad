"""Synthetic multi-site, longitudinal BIDS datasets with ground truth (``scanbridge-simulate``).

Every decision (site, age, sex, trajectory, anatomy, protocol per session) is drawn up front from the
seed, then each subject is simulated: one anatomy (the ICBM152 2009a template, or one of the label maps
of ``anatomy_dir`` in turn) is randomly deformed into the subject and given its own tissue properties;
follow-up sessions apply atrophy at the trajectory's annual rates (``atrophy.STABLE_RATES`` or
``DECLINE_RATES``) from the baseline anatomy, and lesions (optional) grow slightly and, with
``new_lesions_per_year``, new ones appear between sessions (MS follow-up); every image is
simulated with its site's protocol for that modality.  With ``protocol_change`` the second half of each
subject's sessions uses the site's upgrade protocols (a scanner or protocol change to bridge).

Layout (BIDS 1.9; derivatives in BIDS-Derivatives naming)::

    OUT/dataset_description.json  README  participants.tsv/.json  (site, age, sex, trajectory, anatomy)
    OUT/sub-01/sub-01_sessions.tsv/.json   (acq_time, age, years_since_baseline, site, scanner, protocol)
    OUT/sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz + .json   (and _FLAIR, _T2w, _PDw; int16 like a scanner)
    OUT/derivatives/truth/dataset_description.json  volumes.tsv  longitudinal.tsv
    OUT/derivatives/truth/sub-01/ses-1/anat/  on the grid of the first modality (T1w if present):
        sub-01_ses-1_desc-brain_mask  label-{CSF,GM,WM}_probseg  dseg (+ dseg.tsv: 1 CSF, 2 GM, 3 WM)
        desc-physics_dseg (R1 gold standard)  desc-lesion_mask (with lesions)  desc-volumes_morph.tsv
        desc-newlesion_mask (follow-ups, with new lesions: lesions that appeared since the previous session)
        R1map  R2starmap  PDmap  T2map  (3T values)
      and on the grid of every other modality X: space-X_desc-brain_mask, space-X_dseg,
      space-X_desc-lesion_mask.

Same configuration and seed give the same bytes (gzip with mtime 0 and no file name, fixed JSON/TSV
formatting, independent random streams per subject/session/image).  The dataset is built in a
temporary sibling folder, each file written to a temporary name and ``os.replace``-d, and the folder
renamed into place at the end, so OUT is never left half-written.

Public API
----------
``DatasetConfig(subjects=4, sites=2, sessions=2, modalities=("T1w",), lesions=False,
decline_fraction=0.5, protocol_change=False, resolution=None, seed=0, anatomy_dir=None,
interval_years=1.0, new_lesions_per_year=0.0, psf_fwhm=0.0)``  ``.validate()`` raises ``ValueError`` with a one-line message.
``plan(config) -> list[SubjectPlan]``  the drawn design (no simulation).
``write_dataset(out, config, overwrite=False, progress=None) -> dict``  returns a summary
    (``out``, ``files``, ``images``, ``seconds``); ``progress`` is called with one-line messages.
``check_output_dir(out, overwrite)``  the refusal rule, usable before any work.
``nifti_bytes(img) -> bytes``  deterministic .nii.gz bytes.
``scanner_image(img) -> Nifti1Image``  rounded int16 copy (raw images are stored like DICOM conversions:
    integers, receiver gain ~1000 for the brightest brain tissue, so rounding is far below the noise).
"""
from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from ..labels import TISSUE, VOLUME_LABELS
from .. import __version__
from . import atrophy as atrophy_mod
from . import lesions as lesion_mod
from .gold_standard import physics_gold_standard
from .phantom import Phantom, from_icbm152, from_label_map, make_subject
from .protocols import MODALITIES, SITES, Protocol
from .simulator import simulate

GENERATOR = "scanbridge-simulate"
LESION_GROWTH = {"stable": 0.05, "decline": 0.15}  # relative radius growth per year
_QMRI = (("R1map", "R1", "1/s"), ("R2starmap", "R2star", "1/s"), ("PDmap", "PD", "arbitrary (CSF = 1)"),
         ("T2map", "T2", "s"))


@dataclass
class DatasetConfig:
    subjects: int = 4
    sites: int = 2
    sessions: int = 2
    modalities: tuple = ("T1w",)
    lesions: bool = False
    decline_fraction: float = 0.5
    protocol_change: bool = False
    resolution: float | None = None
    seed: int = 0
    anatomy_dir: str | None = None
    interval_years: float = 1.0
    new_lesions_per_year: float = 0.0
    """Mean number of lesions that appear per year after baseline (Poisson; needs ``lesions``)."""
    psf_fwhm: float = 0.0
    """Point-spread function of every image, full width at half maximum in in-plane voxels (0: none; see
    :func:`bidsapp.physics.simulator.simulate`)."""

    def validate(self) -> None:
        def bad(msg):
            raise ValueError(msg)

        for name in ("subjects", "sites", "sessions", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                bad(f"--{name} must be an integer, got {v!r}")
        if not 1 <= self.subjects <= 999:
            bad(f"--subjects must be between 1 and 999, got {self.subjects}")
        if not 1 <= self.sites <= len(SITES):
            bad(f"--sites must be between 1 and {len(SITES)} (the built-in sites), got {self.sites}")
        if not 1 <= self.sessions <= 20:
            bad(f"--sessions must be between 1 and 20, got {self.sessions}")
        if self.seed < 0:
            bad(f"--seed must not be negative, got {self.seed}")
        mods = tuple(self.modalities)
        if not mods:
            bad("--modalities is empty")
        unknown = [m for m in mods if m not in MODALITIES]
        if unknown:
            bad(f"--modalities: unknown {', '.join(unknown)} (choose from {', '.join(MODALITIES)})")
        if len(set(mods)) != len(mods):
            bad("--modalities lists a modality twice")
        self.modalities = tuple(m for m in MODALITIES if m in mods)  # canonical order: T1w first
        if not (isinstance(self.decline_fraction, (int, float)) and 0.0 <= self.decline_fraction <= 1.0):
            bad(f"--decline-fraction must be between 0 and 1, got {self.decline_fraction}")
        if self.resolution is not None and not (isinstance(self.resolution, (int, float))
                                                and math.isfinite(self.resolution) and 0.5 <= self.resolution <= 8):
            bad(f"--resolution must be between 0.5 and 8 mm, got {self.resolution}")
        if not (isinstance(self.new_lesions_per_year, (int, float)) and 0 <= self.new_lesions_per_year <= 50):
            bad(f"--new-lesions-per-year must be between 0 and 50, got {self.new_lesions_per_year}")
        if not (isinstance(self.psf_fwhm, (int, float)) and math.isfinite(self.psf_fwhm) and 0 <= self.psf_fwhm <= 4):
            bad(f"--psf must be between 0 and 4 voxels, got {self.psf_fwhm}")
        if self.new_lesions_per_year and not self.lesions:
            bad("--new-lesions-per-year needs --lesions")
        if not 0 < self.interval_years <= 10:
            bad(f"interval between sessions must be in (0, 10] years, got {self.interval_years}")
        if self.anatomy_dir is not None:
            maps = anatomy_files(self.anatomy_dir)
            if not maps:
                bad(f"{self.anatomy_dir}: no label maps (*_dseg.nii.gz or *.nii.gz) found")


def anatomy_files(directory) -> list[Path]:
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"{directory}: anatomy directory does not exist")
    files = sorted(d.glob("*_dseg.nii.gz")) or sorted(d.glob("*.nii.gz")) + sorted(d.glob("*.nii"))
    return files


@dataclass
class SessionPlan:
    label: str
    years: float
    age: float
    protocols: dict  # modality -> Protocol
    upgraded: bool


@dataclass
class SubjectPlan:
    index: int
    label: str
    site: str
    age: float
    sex: str
    trajectory: str
    anatomy: str
    sessions: list = field(default_factory=list)


def plan(config: DatasetConfig) -> list[SubjectPlan]:
    config.validate()
    rng = np.random.default_rng([config.seed, 0])
    n = config.subjects
    n_decline = int(round(config.decline_fraction * n))
    decline = set(rng.permutation(n)[:n_decline].tolist())
    ages = np.round(rng.uniform(58.0, 80.0, n), 1)
    sexes = rng.choice(["F", "M"], n)
    site_ids = list(SITES)[: config.sites]
    anat = [p.name for p in anatomy_files(config.anatomy_dir)] if config.anatomy_dir else ["icbm152"]
    width = max(2, len(str(n)))
    change_from = max(1, math.ceil(config.sessions / 2)) if config.protocol_change else None
    plans = []
    for i in range(n):
        site = SITES[site_ids[i % len(site_ids)]]
        sp = SubjectPlan(i, f"{i + 1:0{width}d}", site.name, float(ages[i]), str(sexes[i]),
                         "decline" if i in decline else "stable", anat[i % len(anat)])
        for j in range(config.sessions):
            upgraded = change_from is not None and j >= change_from and site.upgrade is not None
            protos = site.upgrade if upgraded else site.protocols
            years = round(j * config.interval_years, 3)
            sp.sessions.append(SessionPlan(str(j + 1), years, round(sp.age + years, 1),
                                           {m: protos[m] for m in config.modalities}, upgraded))
        plans.append(sp)
    return plans


# ---------------------------------------------------------------------------------------- writing
def nifti_bytes(img: nib.Nifti1Image) -> bytes:
    """Deterministic .nii.gz bytes (no timestamp, no file name in the gzip header; fast level 1)."""
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def scanner_image(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """The image as a scanner stores it: rounded to int16 (as DICOM conversions give), same geometry."""
    data = np.clip(np.rint(np.asarray(img.dataobj)), 0, np.iinfo(np.int16).max).astype(np.int16)
    out = nib.Nifti1Image(data, img.affine, img.header)
    out.set_data_dtype(np.int16)
    out.header.set_slope_inter(1.0, 0.0)
    return out


class _Writer:
    """Writes files under ``root`` atomically and remembers what it wrote."""

    def __init__(self, root: Path):
        self.root = root
        self.written: list[str] = []

    def bytes(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        self.written.append(rel)

    def text(self, rel: str, text: str) -> None:
        self.bytes(rel, text.encode("utf-8"))

    def json(self, rel: str, obj) -> None:
        self.text(rel, json.dumps(obj, indent=2) + "\n")

    def tsv(self, rel: str, rows: list[dict], columns: list[str]) -> None:
        lines = ["\t".join(columns)]
        for r in rows:
            lines.append("\t".join(_cell(r.get(c)) for c in columns))
        self.text(rel, "\n".join(lines) + "\n")

    def nifti(self, rel: str, img: nib.Nifti1Image) -> None:
        self.bytes(rel, nifti_bytes(img))


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.10g}"
    return str(v)


def check_output_dir(out, overwrite: bool) -> None:
    """Refuse an existing non-empty ``out`` unless ``overwrite`` and it is a previous simulator output."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out}: directory exists and is not empty (use --overwrite to replace it)")
        desc = out / "dataset_description.json"
        try:
            made_here = any(g.get("Name") == GENERATOR for g in json.loads(desc.read_text()).get("GeneratedBy", []))
        except (OSError, ValueError, AttributeError):
            made_here = False
        if not made_here:
            raise ValueError(f"{out}: not a {GENERATOR} dataset (no matching dataset_description.json); "
                             "refusing to overwrite it")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise ValueError(f"{parent}: parent directory does not exist")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{parent}: not writable")


DEFAULT_JOBS = 4
"""Most subjects simulated at once by default: each process holds its anatomy and phantoms at the working
resolution (about 2.4 GB at 1 mm)."""


def default_jobs(subjects: int) -> int:
    return max(1, min(os.cpu_count() or 1, DEFAULT_JOBS, subjects))


_WORKER_CACHE: dict = {}
"""A worker process's anatomy, kept for its next subject (:func:`_load_anatomy` holds one at a time)."""


def _subject_job(root: str, config: DatasetConfig, sp: SubjectPlan, first: int, total: int, loud: bool):
    """One subject in a worker process: (files written, truth volume rows, longitudinal rows). Its images
    are numbered from ``first``; the anatomy stays cached in the worker for its next subject."""
    w = _Writer(Path(root))
    volumes_rows, long_rows = [], []
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if loud else (lambda msg: None)
    _write_subject(w, config, sp, _WORKER_CACHE, volumes_rows, long_rows, [first], total, say)
    return w.written, volumes_rows, long_rows


def write_dataset(out, config: DatasetConfig, overwrite: bool = False, progress=None, jobs: int | None = None) -> dict:
    """Simulate and write the whole dataset; nothing is written if the configuration is invalid.

    ``jobs`` subjects are simulated at once in worker processes (default :func:`default_jobs`); every
    subject has its own random stream, so the bytes written do not depend on ``jobs``. With a
    ``progress`` callable and ``jobs`` > 1 the workers print their progress lines to stderr.
    """
    config.validate()
    out = Path(out)
    check_output_dir(out, overwrite)
    plans = plan(config)
    say = progress or (lambda msg: None)
    tmp = out.resolve().parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    t0 = time.time()
    try:
        w = _Writer(tmp)
        _write_top(w, config, plans)
        images = [len(sp.sessions) * len(config.modalities) for sp in plans]
        total = sum(images)
        counter = [0]
        volumes_rows, long_rows = [], []
        jobs = default_jobs(len(plans)) if jobs is None else max(1, min(int(jobs), len(plans)))
        if jobs == 1:
            anatomy_cache: dict[str, Phantom] = {}
            for sp in plans:
                _write_subject(w, config, sp, anatomy_cache, volumes_rows, long_rows, counter, total, say)
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            firsts = np.concatenate([[0], np.cumsum(images)[:-1]]).tolist()
            # spawn: workers start clean (no threads or torch state inherited from this process)
            with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [pool.submit(_subject_job, str(tmp), config, sp, int(first), total, progress is not None)
                           for sp, first in zip(plans, firsts)]
                for fut in futures:  # rows in subject order, whatever order the workers finish in
                    written, vrows, lrows = fut.result()
                    w.written += written
                    volumes_rows += vrows
                    long_rows += lrows
            counter[0] = total
        _write_truth_tables(w, volumes_rows, long_rows)
        if out.exists():
            shutil.rmtree(out) if any(out.iterdir()) else out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    secs = time.time() - t0
    say(f"wrote {len(w.written)} files ({counter[0]} images) to {out} in {secs:.1f} s")
    return {"out": str(out), "files": sorted(w.written), "images": counter[0], "seconds": secs}


def _write_top(w: _Writer, config: DatasetConfig, plans) -> None:
    gen = [{"Name": GENERATOR, "Version": __version__, "Description": "static-equation MRI simulation"}]
    w.json("dataset_description.json", {
        "Name": "scanbridge synthetic multi-site longitudinal dataset",
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["scanbridge-simulate"],
        "GeneratedBy": gen,
        "HowToAcknowledge": "Synthetic data; anatomy from " + (
            "the SynthSeg training label maps (Apache-2.0)" if config.anatomy_dir else
            "the MNI ICBM152 2009a template shipped with nilearn"),
    })
    sites = sorted({sp.site for sp in plans})
    w.text("README", "\n".join([
        "Synthetic multi-site longitudinal structural MRI made by scanbridge-simulate.",
        "",
        f"Subjects: {config.subjects}; sites: {', '.join(sites)}; sessions per subject: {config.sessions};",
        f"modalities: {', '.join(config.modalities)}; lesions: {'yes' if config.lesions else 'no'};",
        f"protocol change between sessions: {'yes' if config.protocol_change else 'no'}; seed: {config.seed}.",
        "Images are static-equation simulations (SPGR, MPRAGE, TSE, FLAIR) of tissue-fraction phantoms with",
        "partial volume, bias field and Rician noise; sidecars carry the acquisition parameters in BIDS units.",
        *([f"Every image is blurred by a Gaussian point-spread function of {config.psf_fwhm:g} in-plane voxels (FWHM)."]
          if config.psf_fwhm else []),
        "The ground truth (tissue fractions, labels, lesion masks, quantitative maps, volumes, longitudinal",
        "trajectories) is in derivatives/truth.",
        "",
    ]))
    rows = [{"participant_id": f"sub-{sp.label}", "site": sp.site, "age": sp.age, "sex": sp.sex,
             "trajectory": sp.trajectory, "anatomy": sp.anatomy} for sp in plans]
    w.tsv("participants.tsv", rows, ["participant_id", "site", "age", "sex", "trajectory", "anatomy"])
    w.json("participants.json", {
        "participant_id": {"Description": "subject label"},
        "site": {"Description": "acquisition site (one scanner and protocol set, see sessions.tsv)"},
        "age": {"Description": "age at the first session", "Units": "year"},
        "sex": {"Description": "sex", "Levels": {"F": "female", "M": "male"}},
        "trajectory": {"Description": "simulated longitudinal course",
                       "Levels": {"stable": "healthy-ageing atrophy rates", "decline": "accelerated atrophy"}},
        "anatomy": {"Description": "anatomy the subject was deformed from"},
    })


def _voxel_size(p: Protocol, resolution) -> tuple:
    if resolution is None:
        return p.voxel_size
    r = float(resolution)
    if p.acquisition == "2D":
        return (r, r, max(r, p.slice_thickness))
    return (r, r, r)


def _working_resolution(config: DatasetConfig) -> float:
    return 1.0 if config.resolution is None else max(1.0, float(config.resolution) / 2.0)


def _load_anatomy(config: DatasetConfig, name: str, cache: dict) -> Phantom:
    if name not in cache:
        res = _working_resolution(config)
        if name == "icbm152":
            ph = from_icbm152(None if res == 1.0 else res)
        else:
            ph = from_label_map(Path(config.anatomy_dir) / name, None if res == 1.0 else res)
        cache.clear()  # keep one anatomy in memory at a time
        cache[name] = ph
    return cache[name]


def _write_subject(w, config, sp: SubjectPlan, cache, volumes_rows, long_rows, counter, total, say) -> None:
    sub = f"sub-{sp.label}"
    rng = np.random.default_rng([config.seed, 1, sp.index])
    base = make_subject(_load_anatomy(config, sp.anatomy, cache), rng)
    specs = lesion_mod.sample_lesions(base, rng) if config.lesions else []
    new_specs, onsets = _new_lesions(config, sp, base)
    rates = atrophy_mod.DECLINE_RATES if sp.trajectory == "decline" else atrophy_mod.STABLE_RATES
    ses_rows, baseline_vol = [], None
    for j, ses in enumerate(sp.sessions):
        anat = atrophy_mod.apply_atrophy(base, ses.years, **rates)
        new_masks = None  # (lesions that appeared, earlier lesions) on the phantom grid
        if config.lesions:
            growth = 1.0 + LESION_GROWTH[sp.trajectory] * ses.years
            since = sp.sessions[j - 1].years if j else 0.0
            present = [spec for spec, t in zip(new_specs, onsets) if t < ses.years]
            appeared = [spec for spec, t in zip(new_specs, onsets) if since <= t < ses.years]
            if j and config.new_lesions_per_year:
                before = [spec for spec, t in zip(new_specs, onsets) if t < since]
                old = lesion_mod.apply_lesions(anat, specs + before, growth).lesion_mask()
                new = (lesion_mod.apply_lesions(anat, appeared, growth).lesion_mask() if appeared
                       else np.zeros(anat.shape, bool))
                new_masks = (new, old)
            anat = lesion_mod.apply_lesions(anat, specs + present, growth=growth)
        prefix = f"{sub}_ses-{ses.label}"
        raw_dir = f"{sub}/ses-{ses.label}/anat"
        truth_dir = f"derivatives/truth/{sub}/ses-{ses.label}/anat"
        primary = None
        for k, (mod, proto) in enumerate(ses.protocols.items()):
            t = time.time()
            proto = proto.replace(voxel_size=_voxel_size(proto, config.resolution))
            sim = simulate(anat, proto, np.random.default_rng([config.seed, 2, sp.index, j, k]),
                           psf_fwhm=config.psf_fwhm)
            raw_rel = f"{raw_dir}/{prefix}_{mod}.nii.gz"
            w.nifti(raw_rel, scanner_image(sim.image))
            w.json(f"{raw_dir}/{prefix}_{mod}.json", sim.sidecar())
            source = [f"bids:raw:{raw_rel}"]
            if primary is None:
                primary = mod
                vol = _write_truth_primary(w, truth_dir, prefix, sim.truth, source, config.lesions)
                if new_masks is not None:
                    _write_new_lesions(w, truth_dir, prefix, anat, new_masks, sim.truth, source)
                volumes_rows.append({"participant_id": sub, "session_id": f"ses-{ses.label}",
                                     "years_since_baseline": ses.years, **{k2: round(v, 1) for k2, v in vol.items()}})
                if baseline_vol is None:
                    baseline_vol = vol
                else:
                    long_rows.append(_long_row(sub, sp, sp.sessions[0], ses, baseline_vol, vol))
            else:
                _write_truth_secondary(w, truth_dir, prefix, mod, sim.truth, source, config.lesions)
            counter[0] += 1
            say(f"[{counter[0]}/{total}] {sub} ses-{ses.label} {mod}: {sp.site} {proto.name} "
                f"{proto.field_strength:g}T {'x'.join(f'{v:g}' for v in sim.truth.voxel_size)} mm "
                f"({time.time() - t:.1f} s)")
        first = ses.protocols[next(iter(ses.protocols))]
        ses_rows.append({"session_id": f"ses-{ses.label}", "acq_time": _acq_time(ses.years),
                         "age": ses.age, "years_since_baseline": ses.years,
                         "site": sp.site, "scanner": f"{first.manufacturer} {first.model} {first.field_strength:g}T",
                         "protocol": first.name, "protocol_changed": "yes" if ses.upgraded else "no"})
    w.tsv(f"{sub}/{sub}_sessions.tsv", ses_rows,
          ["session_id", "acq_time", "age", "years_since_baseline", "site", "scanner", "protocol", "protocol_changed"])
    w.json(f"{sub}/{sub}_sessions.json", {
        "acq_time": {"Description": "acquisition date and time of the session (baseline on 2020-01-06)"},
        "age": {"Description": "age at the session", "Units": "year"},
        "years_since_baseline": {"Description": "time since the first session", "Units": "year"},
        "site": {"Description": "acquisition site"},
        "scanner": {"Description": "manufacturer, model and field strength of the first modality's scanner"},
        "protocol": {"Description": "protocol preset of the first modality"},
        "protocol_changed": {"Description": "whether the site's upgrade protocols were used",
                             "Levels": {"yes": "after the protocol change", "no": "original protocols"}},
    })


def _new_lesions(config: DatasetConfig, sp: SubjectPlan, base: Phantom):
    """(lesion specs, onset in years) of the lesions that appear after baseline: Poisson in number
    (``new_lesions_per_year`` times the follow-up time), periventricular or deep, onsets uniform over the
    follow-up. Their own random stream, so datasets without them keep their bytes."""
    last = max(s.years for s in sp.sessions)
    if not (config.lesions and config.new_lesions_per_year > 0 and last > 0):
        return [], []
    rng = np.random.default_rng([config.seed, 3, sp.index])
    n = int(rng.poisson(config.new_lesions_per_year * last))
    if not n:
        return [], []
    n_pv = int(rng.integers(0, n + 1))
    specs = lesion_mod.sample_lesions(base, rng, n_periventricular=n_pv, n_deep=n - n_pv, n_juxtacortical=0)
    return specs, rng.uniform(0.0, last, len(specs)).tolist()


def _write_new_lesions(w, d, prefix, phantom: Phantom, masks, truth: Phantom, source) -> None:
    """The lesions that appeared since the previous session, on the truth grid of the session: voxels of
    the session's lesion mask where the new lesions' share (masks[0], on the phantom grid) exceeds the
    earlier lesions' (masks[1]) and a quarter of the voxel."""
    from nibabel.processing import resample_from_to

    lesion = truth.lesion_mask()
    ref = truth.to_image(lesion.astype(np.uint8))
    new, old = (np.asarray(resample_from_to(phantom.to_image(m.astype(np.float32)), ref, order=1).dataobj)
                for m in masks)
    mask = lesion & (new > old) & (new > 0.25)
    w.nifti(f"{d}/{prefix}_desc-newlesion_mask.nii.gz", truth.to_image(mask.astype(np.uint8)))
    w.json(f"{d}/{prefix}_desc-newlesion_mask.json",
           _truth_json("lesions that appeared since the previous session (lesion fraction >= 0.5, not part of an "
                       "earlier lesion)", source, Type="Lesion"))


def _acq_time(years: float) -> str:
    """BIDS ``acq_time`` of a session ``years`` after the (fixed) baseline date, 09:00."""
    import datetime as dt

    day = dt.date(2020, 1, 6) + dt.timedelta(days=round(years * 365.25))
    return f"{day.isoformat()}T09:00:00"


def _truth_json(desc: str, source, **extra) -> dict:
    return {"Description": desc, "Sources": source, "GeneratedBy": GENERATOR, **extra}


def _write_truth_primary(w, d, prefix, truth: Phantom, source, lesions: bool) -> dict:
    mask = truth.brain_mask
    w.nifti(f"{d}/{prefix}_desc-brain_mask.nii.gz", truth.to_image(mask.astype(np.uint8)))
    w.json(f"{d}/{prefix}_desc-brain_mask.json", _truth_json("brain mask: brain tissue + CSF fraction >= 0.5",
                                                             source, Type="Brain"))
    prob = truth.truth_probseg()
    for k, lab in enumerate(TISSUE.names):
        w.nifti(f"{d}/{prefix}_label-{lab}_probseg.nii.gz", truth.to_image(prob[k].astype(np.float32)))
        w.json(f"{d}/{prefix}_label-{lab}_probseg.json",
               _truth_json(f"true {lab} volume fraction per voxel (partial volume exact)", source))
    w.nifti(f"{d}/{prefix}_dseg.nii.gz", truth.to_image(truth.dseg()))
    w.json(f"{d}/{prefix}_dseg.json", _truth_json("largest true tissue fraction within the brain mask", source))
    w.tsv(f"{d}/{prefix}_dseg.tsv", [{"index": v, "name": n} for v, n in TISSUE.by_value().items()],
          ["index", "name"])
    q = truth.qmri(3.0)
    _, gold = physics_gold_standard(q["R1"], mask)
    w.nifti(f"{d}/{prefix}_desc-physics_dseg.nii.gz", truth.to_image(gold))
    w.json(f"{d}/{prefix}_desc-physics_dseg.json", _truth_json(
        "physics gold standard: most likely class of the 3T R1 under Gaussians CSF 0.240+-0.03, "
        "GM 0.683+-0.080, WM 1.036+-0.080 1/s", source))
    if lesions:
        w.nifti(f"{d}/{prefix}_desc-lesion_mask.nii.gz", truth.to_image(truth.lesion_mask().astype(np.uint8)))
        w.json(f"{d}/{prefix}_desc-lesion_mask.json", _truth_json("lesion fraction >= 0.5", source, Type="Lesion"))
    for suffix, key, units in _QMRI:
        w.nifti(f"{d}/{prefix}_{suffix}.nii.gz", truth.to_image(q[key]))
        w.json(f"{d}/{prefix}_{suffix}.json", _truth_json(f"true {key} of the simulated tissues", source,
                                                          Units=units, MagneticFieldStrength=3.0))
    vol = truth.volumes()
    rows = [{"method": "truth", "label": lab, "volume_mm3": round(vol[lab], 1)}
            for lab in VOLUME_LABELS]
    rows += [{"method": "truth", "label": lab, "volume_mm3": round(vol[lab], 1)}
             for lab in ("ventricles", "lesion", "intracranial") if lab != "lesion" or lesions]
    w.tsv(f"{d}/{prefix}_desc-volumes_morph.tsv", rows, ["method", "label", "volume_mm3"])
    keep = (*VOLUME_LABELS, "ventricles", "lesion", "intracranial")
    return {k: vol[k] for k in keep}


def _write_truth_secondary(w, d, prefix, mod, truth: Phantom, source, lesions: bool) -> None:
    w.nifti(f"{d}/{prefix}_space-{mod}_desc-brain_mask.nii.gz", truth.to_image(truth.brain_mask.astype(np.uint8)))
    w.json(f"{d}/{prefix}_space-{mod}_desc-brain_mask.json", _truth_json(f"brain mask on the {mod} grid", source))
    w.nifti(f"{d}/{prefix}_space-{mod}_dseg.nii.gz", truth.to_image(truth.dseg()))
    w.json(f"{d}/{prefix}_space-{mod}_dseg.json", _truth_json(f"tissue labels on the {mod} grid", source))
    if lesions:
        w.nifti(f"{d}/{prefix}_space-{mod}_desc-lesion_mask.nii.gz",
                truth.to_image(truth.lesion_mask().astype(np.uint8)))
        w.json(f"{d}/{prefix}_space-{mod}_desc-lesion_mask.json",
               _truth_json(f"lesion mask on the {mod} grid", source))


def _long_row(sub, sp, s0, s1, v0, v1) -> dict:
    pct = lambda k: round(100.0 * (v1[k] - v0[k]) / v0[k], 3) if v0[k] else None  # noqa: E731
    return {"participant_id": sub, "session_from": f"ses-{s0.label}", "session_to": f"ses-{s1.label}",
            "years": round(s1.years - s0.years, 3), "label": sp.trajectory, "GM_change_percent": pct("GM"),
            "WM_change_percent": pct("WM"), "brain_change_percent": pct("brain"),
            "ventricles_change_percent": pct("ventricles"), "protocol_changed": "yes" if s1.upgraded else "no"}


def _write_truth_tables(w, volumes_rows, long_rows) -> None:
    w.json("derivatives/truth/dataset_description.json", {
        "Name": "scanbridge-simulate ground truth",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": GENERATOR, "Version": __version__}],
        "SourceDatasets": [{"URL": "bids:raw:"}],
    })
    cols = ["participant_id", "session_id", "years_since_baseline", "CSF", "GM", "WM", "brain", "ventricles",
            "lesion", "intracranial"]
    w.tsv("derivatives/truth/volumes.tsv", volumes_rows, cols)
    w.json("derivatives/truth/volumes.json", {c: {"Description": f"true {c} volume", "Units": "mm^3"}
                                              for c in cols[3:]})
    w.tsv("derivatives/truth/longitudinal.tsv", long_rows,
          ["participant_id", "session_from", "session_to", "years", "label", "GM_change_percent",
           "WM_change_percent", "brain_change_percent", "ventricles_change_percent", "protocol_changed"])
    w.json("derivatives/truth/longitudinal.json", {
        "label": {"Description": "true trajectory", "Levels": {"stable": "healthy ageing", "decline": "accelerated atrophy"}},
        "GM_change_percent": {"Description": "true GM volume change from the first session", "Units": "percent"},
    })
