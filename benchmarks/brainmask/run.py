"""Brain extraction: the learned network, the template-based method and deepbet, side by side.

Every image goes through what the participant workflow does before brain extraction (RAS
reorientation, N4), then each method runs on that same image in a fresh process (``spawn``), so
each time includes loading the method's model/template and each peak memory (VmHWM) is the
method's own:

- ``learned``: :func:`bidsapp.models.brainmask.extract` (scanbridge's default);
- ``template``: :func:`workflows.interfaces.ants.extract_brain` (scanbridge's template-based method);
- ``deepbet``: deepbet's ``BrainExtraction`` on the CPU (a peer that ships its weights in its wheel;
  benchmark-only dependency: ``pip install --no-deps deepbet connected-components-3d fill_voids fastremap``;
  left out with a note when it is not installed).

Data:

- ``simulated``: the held-out label maps (``anat-10``..``anat-12``, never seen in training) simulated
  with the physics engine under built-in protocols of every sequence family, at their own
  resolutions and orientations, plus an already skull-stripped MPRAGE and an MPRAGE of the head aged
  (``AGEING``: cortex thinned into CSF, ventricles grown, as in ageing studies); truth = the
  simulator's brain mask. Also the brain volume of the same head on a 3T MPRAGE and a 1.5T SPGR scanner.
  ``--psf FWHM`` blurs them by a scanner's point-spread function (in-plane voxels; cached apart).
- ``clinical``: the real clinical MS scans of ``clinical-ms/`` beside the label maps (thick-slice FLAIR,
  T1w, T2w with skull, no sidecars); each mask is taken to the patient's common space with the
  dataset's affines (T1w/T2w -> FLAIR -> common) and compared with the expert brain mask inside the
  image's field of view (a session's slices may cover less of the head than the expert mask).
- ``registry``: real 1 mm T1w heads with skull from package registries (:func:`bidsapp.devdata.registry_t1w`):
  Colin 27 (one adult, 27 averaged 1.5 T scans, from Debian's archive), whose reference is FSL BET's
  brain of it, shipped beside it, which leaves out most of the CSF outside the brain as the experts'
  masks do; and two scans of one adult's head from BrainBrowser's npm package, without a reference:
  there each method's brain volume on the two, which should agree.

Metrics: Dice, HD95 (mm), brain-volume error (%) and seconds / peak MB per image. Prints tables of
medians and writes ``benchmarks/results/brainmask.json``.

    python benchmarks/brainmask/run.py                      # everything (about 30 min on 2 cores)
    python benchmarks/brainmask/run.py --sets clinical --methods learned deepbet

Simulated images, masks and per-method results are cached in ``--work``: a rerun recomputes only
what changed (the learned model's results are keyed by its sha256, the mirrored reading and the
precision).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bidsapp.devdata import HELDOUT_ANATOMIES  # noqa: E402

METHODS = ("learned", "template", "deepbet")
HELDOUT = HELDOUT_ANATOMIES
PROTOCOLS = {  # sequence family -> built-in protocol (own voxel size and orientation)
    "MPRAGE 3T 1mm": "siemens-3T-mprage",
    "SPGR 1.5T 1mm": "mrainet-1.5T-spgr",
    "T2w 3T 1x1x3mm": "siemens-3T-t2w",
    "PDw 1.5T 1x1x5mm": "ge-1.5T-pdw",
    "FLAIR 1.5T 1x1x5mm": "ge-1.5T-flair",
    "MPRAGE 7T 1mm": "siemens-7T-mprage",
}
STRIPPED = "MPRAGE 3T stripped"
AGED = "MPRAGE 3T aged"
AGEING = (0.15, 1.0)
"""The aged image's head: 15 % of its cortical GM turned into CSF, its ventricles twice as large (an older
brain in the same skull, its outer CSF thick; amounts apart from the training's aged copies)."""
SETS = ("simulated", "clinical", "registry")


def data_root() -> Path:
    """The shared development data (``$SCANBRIDGE_DATA_DIR``, default ../shared/data)."""
    from bidsapp.devdata import data_dir

    return data_dir()


# ---------------------------------------------------------------------------------- methods
def method_worker(method: str, in_file: str, out_mask: str, threads: int, weights_dir, conn) -> None:
    """Runs in a fresh process: one method on one image; sends (seconds, peak MB, error)."""
    os.environ["OMP_NUM_THREADS"] = os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    sys.path.insert(0, str(ROOT))
    try:
        import nibabel as nib
        import torch

        torch.set_num_threads(threads)
        t0 = time.time()
        if method == "learned":
            from bidsapp.models import brainmask as bm

            img = nib.load(in_file)
            res = bm.extract(img, device="cpu", weights_dir=weights_dir)
            nib.save(nib.Nifti1Image(res.mask.astype(np.uint8), img.affine), out_mask)
        elif method == "template":
            from bidsapp.templates import get_template
            from workflows.interfaces.ants import extract_brain

            f = get_template()["files"]
            extract_brain(in_file, f["T1w"], f["mask"], out_mask, str(Path(out_mask).with_suffix("")) + ".mat")
        elif method == "deepbet":
            from deepbet.bet import BrainExtraction

            BrainExtraction(no_gpu=True).run(in_file, mask_path=out_mask)
        seconds = time.time() - t0
        peak = 0
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) // 1024
        conn.send((seconds, peak, None))
    except Exception as exc:  # noqa: BLE001 - a failed method is a result, not a crash
        conn.send((None, None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))


def run_method(method: str, in_file: Path, out_mask: Path, threads: int, weights_dir=None) -> dict:
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    p = ctx.Process(target=method_worker, args=(method, str(in_file), str(out_mask), threads,
                                                 str(weights_dir) if weights_dir else None, b))
    p.start()
    seconds, peak, err = a.recv()
    p.join()
    return {"seconds": seconds, "peak_mb": peak, "error": err}


def available_methods(requested) -> tuple[list[str], list[str]]:
    notes = []
    out = []
    for m in requested:
        if m == "deepbet":
            try:
                import deepbet.bet  # noqa: F401
            except Exception as exc:  # noqa: BLE001
                notes.append(f"deepbet left out: {exc} (pip install --no-deps deepbet connected-components-3d "
                             "fill_voids fastremap)")
                continue
        out.append(m)
    return out, notes


def preprocess(raw: Path, out_dir: Path) -> Path:
    """What the workflow does before brain extraction: RAS reorientation and N4."""
    from workflows.interfaces.ants import n4_correct, reorient_to_ras

    ras = reorient_to_ras(raw, out_dir / "ras.nii.gz")
    return Path(n4_correct(ras, out_dir / "n4.nii.gz"))


# ---------------------------------------------------------------------------------- data sets
def simulated_cases(work: Path, anatomy_dir: Path, heads, seed: int, psf_fwhm: float = 0.0) -> list[dict]:
    """Held-out heads under every protocol (+ a skull-stripped and an aged MPRAGE); truth masks in RAS."""
    import nibabel as nib

    from bidsapp.physics import phantom as P
    from bidsapp.physics.protocols import get_protocol
    from bidsapp.physics.simulator import simulate

    cases = []
    for h, head in enumerate(heads):
        src = anatomy_dir / f"{head}_dseg.nii.gz"
        if not src.is_file():
            print(f"  {src} missing: {head} left out")
            continue
        subject = None
        extra = [(STRIPPED, "siemens-3T-mprage"), (AGED, "siemens-3T-mprage")]
        for k, (family, proto) in enumerate(list(PROTOCOLS.items()) + extra):
            d = work / ("simulated" + (f"-psf{psf_fwhm:g}" if psf_fwhm else "")) / head / family.replace(" ", "_")
            d.mkdir(parents=True, exist_ok=True)
            if not (d / "truth.nii.gz").is_file():
                if subject is None:
                    subject = P.from_label_map(src)
                anatomy = subject
                if family == AGED:
                    from bidsapp.physics.atrophy import age_brain

                    anatomy = age_brain(subject, *AGEING)
                sim = simulate(anatomy, get_protocol(proto), np.random.default_rng(seed + 100 * h + k),
                               psf_fwhm=psf_fwhm)
                img, truth = sim.image, sim.truth.brain_mask
                if family == STRIPPED:  # another tool's output: the brain and a little around it
                    from scipy import ndimage as ndi

                    keep = ndi.binary_dilation(truth, iterations=1)
                    img = nib.Nifti1Image(np.asarray(img.dataobj) * keep, img.affine, img.header)
                nib.save(img, d / "raw.nii.gz")
                nib.save(nib.as_closest_canonical(nib.Nifti1Image(truth.astype(np.uint8), img.affine)),
                         d / "truth.nii.gz")
            cases.append({"set": "simulated", "head": head, "family": family, "dir": d,
                          "raw": d / "raw.nii.gz", "truth": d / "truth.nii.gz"})
    return cases


def reference_problem(mask_file: Path) -> str | None:
    """Why an expert mask cannot be a brain mask (the app's own plausibility rule), or None."""
    import nibabel as nib

    from bidsapp.models.brainmask import sanity_check

    img = nib.load(str(mask_file))
    ml = float((np.asarray(img.dataobj) > 0).sum() * np.prod(img.header.get_zooms()[:3]) / 1000)
    return sanity_check(ml, [ml])


def clinical_cases(work: Path, clinical: Path) -> list[dict]:
    cases = []
    problems: dict[Path, str | None] = {}
    for img in sorted((clinical / "bids").glob("sub-*/ses-*/anat/*.nii.gz")):
        sub, ses, mod = img.name.split("_")[0], img.name.split("_")[1], img.name.split("_")[-1].split(".")[0]
        ref = clinical / "reference" / sub
        d = work / "clinical" / f"{sub}_{ses}_{mod}"
        d.mkdir(parents=True, exist_ok=True)
        chain = []
        if mod != "FLAIR":
            chain.append(ref / f"{sub}_{ses}_from-{mod}_to-FLAIR_xfm.txt")
        chain.append(ref / f"{sub}_{ses}_from-FLAIR_to-common_xfm.txt")
        flair = img.with_name(f"{sub}_{ses}_FLAIR.nii.gz")
        if not all(p.is_file() for p in chain) or not flair.is_file():
            print(f"  {img.name}: transforms to the common space missing, left out")
            continue
        truth = ref / f"{sub}_space-common_desc-brain_mask.nii.gz"
        if truth not in problems:
            problems[truth] = reference_problem(truth)
            if problems[truth]:
                print(f"  {truth.name}: reference left out of the summary: {problems[truth]}")
        cases.append({"set": "clinical", "head": sub, "session": ses, "family": mod, "dir": d, "raw": img,
                      "truth": truth, "chain": chain, "flair": flair, "reference_problem": problems[truth]})
    return cases


NO_REFERENCE = "T1w 1mm (no reference)"


def registry_cases(work: Path) -> list[dict]:
    """The registries' real 1 mm T1w heads with skull (:func:`bidsapp.devdata.registry_t1w`): Colin 27,
    whose reference is FSL BET's brain of it (which, as the clinical experts' masks, leaves out most of
    the CSF outside the brain), and BrainBrowser's two scans of one head, which have none: there the
    benchmark gives each method's brain volume on the two scans and their difference."""
    import nibabel as nib

    from bidsapp.devdata import COLIN27, registry_head_or_none, registry_t1w

    cases = []
    for label, t1w in registry_t1w():
        d = work / "registry" / label
        d.mkdir(parents=True, exist_ok=True)
        case = {"set": "registry", "head": label, "family": NO_REFERENCE, "dir": d, "raw": t1w,
                "truth": None}
        if label == COLIN27["name"]:
            truth = d / "truth.nii.gz"
            if not truth.is_file():
                bet = nib.as_closest_canonical(nib.load(str(registry_head_or_none()["bet"])))
                nib.save(nib.Nifti1Image((np.asarray(bet.dataobj) > 0).astype(np.uint8), bet.affine), truth)
            case.update(family="T1w 1mm (BET reference)", truth=truth)
        cases.append(case)
    return cases


def to_common(mask_file: Path, case: dict) -> tuple[np.ndarray, np.ndarray]:
    """A mask on the image's grid resampled into the common space (one linear resampling per step),
    and the image's field of view there (the expert mask covers the patient's whole brain; a session
    whose slices cover less can only be judged where it has them)."""
    import ants

    cur = ants.image_read(str(mask_file)).astype("float32")
    fov = cur.new_image_like(np.ones(cur.shape, np.float32))
    steps = [(ants.image_read(str(case["flair"])), case["chain"][0])] if len(case["chain"]) == 2 else []
    steps.append((ants.image_read(str(case["truth"])), case["chain"][-1]))
    for ref, xfm in steps:
        cur, fov = (ants.apply_transforms(fixed=ref.astype("float32"), moving=im, transformlist=[str(xfm)],
                                          interpolator="linear") for im in (cur, fov))
    return cur.numpy() >= 0.5, fov.numpy() >= 0.5


# ---------------------------------------------------------------------------------- evaluation
def _cache_key(method: str, weights_dir) -> str:
    """What a cached result depends on besides the image: the learned model's weights, whether it reads
    the mirror image too, the precision it infers in and how it pads (float32 and zeros keep the key
    they had before)."""
    if method != "learned":
        return method
    from bidsapp.devices import precision
    from bidsapp.models import registry
    from bidsapp.models.brainmask import MIRROR, MODEL_NAME, PAD_MODE

    mode = precision("cpu")
    return ("learned-" + registry.load_card(MODEL_NAME, weights_dir)["sha256"] + ("-mirror" if MIRROR else "")
            + ("" if mode == "float32" else f"-{mode}") + ("" if PAD_MODE == "constant" else f"-pad{PAD_MODE}"))


def evaluate(case: dict, method: str, threads: int, weights_dir=None) -> dict:
    """One method on one case; a result cached in the work folder under the same key is reused."""
    d = case["dir"]
    cache = d / f"row_{method}.json"
    key = _cache_key(method, weights_dir)
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached["row"]
    row = _evaluate(case, method, threads, weights_dir)
    cache.write_text(json.dumps({"key": key, "row": row}, default=str))
    return row


def _evaluate(case: dict, method: str, threads: int, weights_dir=None) -> dict:
    import nibabel as nib

    from bidsapp.metrics.overlap import dice, hd95, volume_error_percent

    d = case["dir"]
    n4 = d / "n4.nii.gz"
    if not n4.is_file():
        preprocess(case["raw"], d)
    out = d / f"mask_{method}.nii.gz"
    row = {"set": case["set"], "head": case["head"], "family": case["family"], "method": method,
           "session": case.get("session"), "reference_problem": case.get("reference_problem")}
    row.update(run_method(method, n4, out, threads, weights_dir))
    if row["error"] or not out.is_file():
        return row
    if case["truth"] is None:  # a real head without a reference: its volume alone
        m_img = nib.as_closest_canonical(nib.load(str(out)))
        row["volume_ml"] = float((np.asarray(m_img.dataobj) > 0).sum() * np.prod(m_img.header.get_zooms()[:3]) / 1000)
        return row
    if case["set"] == "clinical":
        truth_img = nib.load(str(case["truth"]))
        mask, fov = to_common(out, case)
        truth = (np.asarray(truth_img.dataobj) > 0) & fov
        mask &= fov
        zooms = truth_img.header.get_zooms()[:3]
        # volume from the image's own grid (no resampling loss)
        m_img = nib.load(str(out))
        own = np.asarray(m_img.dataobj).astype(bool)
        row["volume_ml"] = float(own.sum() * np.prod(m_img.header.get_zooms()[:3]) / 1000)
    else:
        truth_img = nib.load(str(case["truth"]))
        truth = np.asarray(truth_img.dataobj) > 0
        mask = np.asarray(nib.as_closest_canonical(nib.load(str(out))).dataobj) > 0
        zooms = truth_img.header.get_zooms()[:3]
        row["volume_ml"] = float(mask.sum() * np.prod(zooms) / 1000)
    row["dice"] = dice(mask, truth)
    row["hd95_mm"] = hd95(mask, truth, zooms)
    row["volume_error_pct"] = volume_error_percent(mask, truth)
    row["truth_ml"] = float(truth.sum() * np.prod(zooms) / 1000)
    return row


COLORS = {"truth": "#ffffff", "learned": "#ff3030", "template": "#30d0ff", "deepbet": "#ffd000"}


def overlay(case: dict, methods, out_png: Path) -> None:
    """Every method's mask (and the truth where it is on the image grid) over the image, three planes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bidsapp.reports.figures import overlay_mosaic

    d = case["dir"]
    contours = [(str(d / f"mask_{m}.nii.gz"), [0.5], COLORS[m], m) for m in methods
                if (d / f"mask_{m}.nii.gz").is_file()]
    if case["set"] in ("simulated", "registry") and case["truth"] is not None:
        label = "truth" if case["set"] == "simulated" else "BET"
        contours.insert(0, (str(case["truth"]), [0.5], COLORS["truth"], label))
    if not contours:
        return
    fig = overlay_mosaic(str(d / "n4.nii.gz"), contours=contours, region=contours[0][0], n_slices=4,
                         title=f"{case['set']} {case['head']} {case.get('session') or ''} {case['family']}")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=60, facecolor="black")
    plt.close(fig)


def _median(rows, key):
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and np.isfinite(r[key])]
    return statistics.median(vals) if vals else float("nan")


def summarise(rows: list[dict], methods) -> tuple[list[str], dict]:
    lines, table = [], {}
    for set_name in SETS:
        sub = [r for r in rows if r["set"] == set_name and not r.get("reference_problem")
               and r["family"] != NO_REFERENCE]
        if not sub:
            continue
        lines.append(f"\n{set_name}: median (min Dice) per family and method")
        lines.append(f"{'family':22s} {'method':9s} {'n':>2s} {'Dice':>6s} {'minDice':>7s} {'HD95mm':>7s} "
                     f"{'|vol err|%':>10s} {'s/img':>6s} {'peakMB':>7s} fails")
        fams = list(dict.fromkeys(r["family"] for r in sub)) + ["all"]
        for fam in fams:
            for m in methods:
                rr = [r for r in sub if r["method"] == m and (fam == "all" or r["family"] == fam)]
                if not rr:
                    continue
                ok = [r for r in rr if r.get("dice") is not None]
                ad = [dict(r, abs_err=abs(r["volume_error_pct"])) for r in ok]
                entry = {"n": len(rr), "failed": len(rr) - len(ok), "dice": _median(ok, "dice"),
                         "min_dice": min((r["dice"] for r in ok), default=float("nan")),
                         "hd95_mm": _median(ok, "hd95_mm"), "abs_volume_error_pct": _median(ad, "abs_err"),
                         "seconds": _median(rr, "seconds"), "peak_mb": _median(rr, "peak_mb")}
                table.setdefault(set_name, {}).setdefault(fam, {})[m] = entry
                lines.append(f"{fam:22s} {m:9s} {entry['n']:2d} {entry['dice']:6.3f} {entry['min_dice']:7.3f} "
                             f"{entry['hd95_mm']:7.2f} {entry['abs_volume_error_pct']:10.2f} {entry['seconds']:6.1f} "
                             f"{entry['peak_mb']:7.0f} {entry['failed']}")
    bad = sorted({(r["head"], r["reference_problem"]) for r in rows if r.get("reference_problem")})
    for head, why in bad:
        lines.append(f"left out: {head}'s expert mask ({why})")
        table.setdefault("left_out", {})[head] = why
    sim = [r for r in rows if r["set"] == "simulated" and r.get("volume_ml")]
    pairs = {}
    for m in methods:
        diffs = []
        for head in sorted({r["head"] for r in sim}):
            v = {r["family"]: r["volume_ml"] for r in sim if r["head"] == head and r["method"] == m}
            a, b = v.get("MPRAGE 3T 1mm"), v.get("SPGR 1.5T 1mm")
            if a and b:
                diffs.append(100 * abs(a - b) / ((a + b) / 2))
        if diffs:
            pairs[m] = {"median_pct": statistics.median(diffs), "max_pct": max(diffs), "n": len(diffs)}
    if pairs:
        lines.append("\nsame head, 3T MPRAGE vs 1.5T SPGR: brain-volume difference % (median, max)")
        for m, p in pairs.items():
            lines.append(f"  {m:9s} {p['median_pct']:.2f} {p['max_pct']:.2f} (n={p['n']})")
        table["two_scanners"] = pairs
    from bidsapp.devdata import registry_repeats

    repeats = {}
    for a, b in (pair for group in registry_repeats() for pair in zip(group, group[1:])):
        for m in methods:
            v = {r["head"]: r.get("volume_ml") for r in rows if r["set"] == "registry" and r["method"] == m}
            if v.get(a) and v.get(b):
                repeats.setdefault(f"{a}-{b}", {})[m] = {
                    "ml": [v[a], v[b]], "difference_pct": 100 * (v[b] - v[a]) / ((v[a] + v[b]) / 2)}
    for pair, by_method in repeats.items():
        lines.append(f"\nreal head scanned twice ({pair}): brain volume ml, and the difference %")
        for m, p in by_method.items():
            lines.append(f"  {m:9s} {p['ml'][0]:7.0f} {p['ml'][1]:7.0f} {p['difference_pct']:+6.2f}")
    if repeats:
        table["real_repeats"] = repeats
    return lines, table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--heads", nargs="+", default=list(HELDOUT), help="held-out label maps to simulate")
    ap.add_argument("--data", type=Path, default=None,
                    help="shared data folder with anatomy/ and clinical-ms/ (default: the parent of "
                         "$SCANBRIDGE_DATA_DIR, or ../shared/data)")
    ap.add_argument("--work", type=Path, default=None, help="cache of simulated images and masks")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights-dir", type=Path, default=None,
                    help="learned: a folder with brainmask_unet.pt/.json (default: the shipped model)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--psf", type=float, default=0.0, metavar="FWHM",
                    help="blur the simulated heads by a scanner's point-spread function of this FWHM, in-plane voxels "
                         "(default 0: none)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "brainmask.json")
    ap.add_argument("--figures", action="store_true", help="write an overlay PNG per image beside --out")
    ap.add_argument("--update-card", action="store_true",
                    help="write the learned model's headline figures into its model card's metrics")
    args = ap.parse_args(argv)
    data = args.data or data_root()
    work = args.work or Path(tempfile.gettempdir()) / "scanbridge-bench-brainmask"
    methods, notes = available_methods(args.methods)
    for n in notes:
        print(n)
    cases = []
    if "simulated" in args.sets:
        cases += simulated_cases(work, data / "anatomy", args.heads, args.seed, args.psf)
    if "clinical" in args.sets:
        if (data / "clinical-ms").is_dir():
            cases += clinical_cases(work, data / "clinical-ms")
        else:
            print(f"{data / 'clinical-ms'} not found: clinical set left out")
    if "registry" in args.sets:
        cases += registry_cases(work)
    rows = []
    t0 = time.time()
    for i, case in enumerate(cases, 1):
        for m in methods:
            row = evaluate(case, m, args.threads, args.weights_dir)
            rows.append(row)
            txt = (f"Dice {row['dice']:.3f} HD95 {row['hd95_mm']:.1f} vol {row['volume_error_pct']:+.1f}%"
                   if row.get("dice") is not None else f"{row['volume_ml']:.0f} ml" if row.get("volume_ml")
                   else f"failed: {row['error']}")
            print(f"[{i}/{len(cases)}] {case['set']} {case['head']} {case['family']:20s} {m:9s} {txt} "
                  f"({row['seconds'] or 0:.1f} s, {row['peak_mb'] or 0} MB)", flush=True)
    if args.figures:
        fig_dir = args.out.with_suffix("")
        for case in cases:
            overlay(case, methods, fig_dir / f"{case['dir'].parent.name}_{case['dir'].name}.png")
        print(f"overlays in {fig_dir}/")
    lines, table = summarise(rows, methods)
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from bidsapp.devices import precision

    result = {"command": " ".join(["python benchmarks/brainmask/run.py", *(argv or sys.argv[1:])]),
              "threads": args.threads, "precision": precision("cpu"),
              "platform": platform.platform(), "cpu_count": os.cpu_count(), "seconds": time.time() - t0,
              "notes": notes, "summary": table, "rows": [{k: v for k, v in r.items()} for r in rows]}
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    if args.update_card and "learned" in methods:
        from bidsapp.models import registry
        from bidsapp.models.brainmask import MODEL_NAME

        headline = {s: {fam: v["learned"] for fam, v in t.items() if "learned" in v}
                    for s, t in table.items() if s in SETS}
        if "two_scanners" in table and "learned" in table["two_scanners"]:
            headline["two_scanners_volume_difference_pct"] = table["two_scanners"]["learned"]
        registry.update_card(MODEL_NAME, {"metrics": {"benchmark": result["command"], **headline}},
                             args.weights_dir)
        print(f"updated the metrics of {MODEL_NAME}'s model card")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
