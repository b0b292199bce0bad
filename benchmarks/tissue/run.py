"""Tissue-segmentation benchmark: the physics-informed paper's Tables 1 and 2 side by side with ours.

Held-out simulated subjects (shared label maps ``anat-10``, ``anat-11``, ``anat-12``, never used in
training) are simulated with the paper's sweeps: ``--points`` MPRAGE TIs evenly spaced over 600-1200 ms
(121 = the paper's 5 ms step; TD 600 ms, tau 10 ms) and ``--points`` random SPGR settings (TR 15-100 ms,
TE 4-10 ms, FA 15-75 deg), at 3 T, with fixed mild bias and noise. For each method:

* Dice of GM and WM against the physics gold standard (R1-based, paper 3.1), mean +- s.d. over subjects
  of each subject's mean over the sweep (Table 1);
* coefficient of variation of GM and WM volume over the sweep, mean over subjects (Table 2);
* each method's GM and WM volume error against the brain's true volume (the label map's tissue
  fractions, partial volume counted), from its labels and, for the U-Nets, from its probabilities summed
  (Table 3): a Dice against the R1 gold standard cannot show a volume bias the gold standard shares;
* each method's SPGR volume at the settings of least GM/WM contrast (where Table 2's SPGR columns come
  from; ``--tables-from earlier.json`` prints all tables again without rerunning).

Methods: ANTs Atropos (antspyx ``ants.atropos``, k-means initialisation with 3 classes inside the brain
mask, MRF 0.1; classes named by mean intensity, CSF < GM < WM, as for any T1w; no template priors
because the held-out phantoms are not registered to a template here), the U-Net without physics and
the U-Net with physics (shipped weights). Images are simulated at ``--resolution`` mm (default 2 mm,
the models' working resolution); ``--slices MM`` then averages them into axial slices MM thick, as a
clinical 2D scan is acquired, and the truth (gold standard, tissue fractions, mask) alike.

``--timing`` adds inference time and peak memory of ``bidsapp.models.tissue.segment`` on a 1 mm
session (a held-out subject simulated at 1 mm, 2 torch threads, separate process per run).

Atropos does not depend on the weights under test: ``--reuse earlier.json`` takes its results from an
earlier run of the same sweep. Writes ``benchmarks/results/tissue.json`` and, beside it, ``tissue.png`` (volume
against the sweep per method: the paper's Fig. 3); ``--update-cards`` copies the metrics into the model cards.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bidsapp.devdata import anatomy_dir  # noqa: E402

PAPER_DICE = {  # Table 1: mean (sd)
    "GIF": {"MPRAGE": {"GM": (0.851, 0.020), "WM": (0.919, 0.009)}, "SPGR": {"GM": (0.916, 0.010), "WM": (0.847, 0.018)}},
    "Base": {"MPRAGE": {"GM": (0.904, 0.024), "WM": (0.943, 0.012)}, "SPGR": {"GM": (0.946, 0.017), "WM": (0.902, 0.021)}},
    "Physics": {"MPRAGE": {"GM": (0.910, 0.017), "WM": (0.948, 0.009)}, "SPGR": {"GM": (0.948, 0.019), "WM": (0.907, 0.015)}},
}
PAPER_COV = {  # Table 2
    "GIF": {"MPRAGE": {"GM": 0.00619, "WM": 0.00783}, "SPGR": {"GM": 0.00114, "WM": 0.00091}},
    "Base": {"MPRAGE": {"GM": 0.00332, "WM": 0.01491}, "SPGR": {"GM": 0.00531, "WM": 0.00160}},
    "Physics": {"MPRAGE": {"GM": 0.00244, "WM": 0.00405}, "SPGR": {"GM": 0.00425, "WM": 0.00083}},
}
OURS = ("atropos", "unet", "unet-physics")
PAPER_ROW = {"atropos": "GIF", "unet": "Base", "unet-physics": "Physics"}
FAMILIES = ("MPRAGE", "SPGR")
SNR, BIAS = 60.0, 0.03
"""Noise (SNR at the simulated resolution) and residual bias-field log s.d. of the sweeps."""
TISSUES = ("GM", "WM")


def sweep(family: str, n: int, seed: int) -> list[dict]:
    from bidsapp.training.tissue_data import MPRAGE_TAU, MPRAGE_TD

    if family == "MPRAGE":
        return [{"family": "MPRAGE", "TI": float(ti), "td": MPRAGE_TD, "tau": MPRAGE_TAU, "field": 3.0, "B0": 3.0}
                for ti in np.linspace(0.6, 1.2, n)]
    rng = np.random.default_rng([seed, 7])
    return [{"family": "SPGR", "TR": float(rng.uniform(0.015, 0.1)), "TE": float(rng.uniform(0.004, 0.01)),
             "FA": float(rng.uniform(15, 75)), "field": 3.0, "B0": 3.0} for _ in range(n)]


def acquisition_dict(acq: dict) -> dict:
    if acq["family"] == "MPRAGE":
        return {"sequence_family": "MPRAGE", "InversionTime": acq["TI"],
                "RepetitionTimePreparation": acq["TI"] + acq["td"] + acq["tau"], "MagneticFieldStrength": acq["B0"]}
    return {"sequence_family": "SPGR", "RepetitionTime": acq["TR"], "EchoTime": acq["TE"], "FlipAngle": acq["FA"],
            "MagneticFieldStrength": acq["B0"]}


def heldout_subject(anatomy_dir: Path, name: str, resolution: float, seed: int, orientation: str = "RAS"):
    """A held-out brain in ``orientation``: RAS by default, the voxel order the participant workflow hands
    the models (``native``, the label map's LIA, is how figures before the RAS-trained weights were measured)."""
    from bidsapp.physics import phantom as P
    from bidsapp.training import tissue_data as D

    anat = P.load_anatomy(anatomy_dir / f"{name}_dseg.nii.gz", resolution=resolution)
    return D.make_subjects(anat, name, np.random.default_rng([seed, int(name.split("-")[1])]), 0, resolution,
                           orientation)[0]


def gold_standard_dseg(subj, k: int = 1) -> np.ndarray:
    """The physics gold standard as labels (1 CSF, 2 GM, 3 WM; 0 outside the brain), in slabs of ``k``
    slices (:func:`slab_mean`; the brain is where at least half the slab is)."""
    gs = slab_mean(subj.target.astype(np.float32), k).argmax(0) + 1
    gs[slab_mean(subj.mask.astype(np.float32), k) < 0.5] = 0
    return gs


def sweep_image(subj, name: str, acq: dict, i: int, seed: int, snr: float = SNR, bias: float = BIAS) -> np.ndarray:
    """The brain-masked image of sweep point ``i`` for held-out subject ``name`` (its own noise seed,
    so every script that asks for the same point gets the same image)."""
    from bidsapp.training import tissue_data as D

    rng = np.random.default_rng([seed, i, int(name.split("-")[1])])
    return D.simulate(subj, acq, rng, snr=snr, bias=bias) * subj.mask


def slab_mean(a: np.ndarray, k: int) -> np.ndarray:
    """Means of ``k`` consecutive slices along the last axis (superior-inferior in RAS): the thick axial
    slices of a 2D acquisition, made from an image simulated at ``--resolution``."""
    if k <= 1:
        return a
    n = a.shape[-1] // k * k
    return a[..., :n].reshape(*a.shape[:-1], n // k, k).mean(-1)


def atropos_dseg(img: np.ndarray, mask: np.ndarray, spacing) -> np.ndarray:
    from workflows.interfaces.ants import kmeans_dseg

    img = img / max(float(img[mask].mean()), 1e-12) * 100.0  # scanner-like range (Atropos rejects tiny variances)
    return kmeans_dseg(img, mask, spacing)


def evaluate(args) -> dict:
    import torch

    from bidsapp.metrics.overlap import coefficient_of_variation, dice
    from bidsapp.models import tissue
    from bidsapp.training import tissue_data as D

    torch.set_num_threads(args.threads)
    names = list(D.HELDOUT)[: args.subjects]
    reused, reused_seconds = reusable_results(args, names)
    run_methods = [m for m in args.methods if m not in reused]
    res: dict = {m: {f: {k: {t: [] for t in TISSUES} for k in ("dice", "cov", "soft_cov", "volumes", "error", "soft_error")}
                     for f in FAMILIES} for m in run_methods}
    contrast = {f: [D.wm_gm_contrast(a) for a in sweep(f, args.points, args.seed)] for f in FAMILIES}
    seconds = {m: 0.0 for m in run_methods}
    if reused:
        print(f"reusing {', '.join(reused)} from {', '.join(args.reuse)}", flush=True)
    k_sl = slice_factor(args)
    for name in names if run_methods else []:
        t0 = time.time()
        subj = heldout_subject(Path(args.anatomy_dir), name, args.resolution, args.seed, args.orientation)
        gs = gold_standard_dseg(subj, k_sl)
        mask = gs > 0
        zooms = (args.resolution, args.resolution, args.resolution * k_sl)
        vox = float(np.prod(np.linalg.norm(subj.affine[:3, :3], axis=0))) * k_sl
        fractions = slab_mean(subj.fraction_target().astype(np.float32), k_sl)
        truth = {t: float(fractions[k - 1][mask].astype(np.float64).sum()) * vox
                 for k, t in ((2, "GM"), (3, "WM"))}  # the brain's true volumes (partial volume counted)
        print(f"{name}: phantom {subj.mask.shape} ready in {time.time() - t0:.0f} s", flush=True)
        for fam in FAMILIES:
            acqs = sweep(fam, args.points, args.seed)
            per = {m: {k: {t: [] for t in TISSUES} for k in ("dice", "vol", "soft")} for m in run_methods}
            for i, acq in enumerate(acqs):
                img = slab_mean(sweep_image(subj, name, acq, i, args.seed, args.snr, args.bias), k_sl) * mask
                for m in run_methods:
                    t1 = time.time()
                    probs = None
                    if m == "atropos":
                        seg = atropos_dseg(img, mask, zooms)
                    else:
                        r = tissue.segment(img, mask, zooms, acquisition_dict(acq),
                                           device=args.device, use_physics=(m == "unet-physics"),
                                           weights_dir=args.weights_dir, refine=not args.no_refine)
                        if m == "unet-physics" and r.method != "unet-physics":
                            raise SystemExit(f"physics model not used for {acq}: {r.fallback_reason}")
                        seg, probs = r.dseg, r.probs
                    seconds[m] += time.time() - t1
                    for k, t in ((2, "GM"), (3, "WM")):
                        per[m]["dice"][t].append(dice(seg == k, gs == k))
                        per[m]["vol"][t].append(float((seg == k).sum()) * vox)
                        if probs is not None:  # partial-volume (soft) volume: sum of the class probability
                            per[m]["soft"][t].append(float(probs[k - 1][mask].sum()) * vox)
            for m in run_methods:
                for t in TISSUES:
                    res[m][fam]["dice"][t].append(float(np.mean(per[m]["dice"][t])))
                    res[m][fam]["cov"][t].append(coefficient_of_variation(per[m]["vol"][t]))
                    res[m][fam]["volumes"][t].append(per[m]["vol"][t])
                    res[m][fam]["error"][t].append(100.0 * (float(np.mean(per[m]["vol"][t])) / truth[t] - 1.0))
                    if per[m]["soft"][t]:
                        res[m][fam]["soft_cov"][t].append(coefficient_of_variation(per[m]["soft"][t]))
                        res[m][fam]["soft_error"][t].append(
                            100.0 * (float(np.mean(per[m]["soft"][t])) / truth[t] - 1.0))
            print(f"  {fam}: " + "; ".join(
                f"{m} Dice GM {res[m][fam]['dice']['GM'][-1]:.3f} WM {res[m][fam]['dice']['WM'][-1]:.3f} "
                f"CoV GM {res[m][fam]['cov']['GM'][-1]:.5f} WM {res[m][fam]['cov']['WM'][-1]:.5f}"
                for m in run_methods), flush=True)
    n_images = len(names) * args.points * len(FAMILIES)
    per_image = {m: seconds[m] / n_images for m in run_methods}
    for m in reused:
        res[m], per_image[m] = reused[m], reused_seconds[m]
    res = {m: res[m] for m in args.methods}
    summary = {m: {f: {"dice": {t: [float(np.mean(v)), float(np.std(v))] for t, v in res[m][f]["dice"].items()},
                       "cov": {t: float(np.mean(v)) for t, v in res[m][f]["cov"].items()},
                       "soft_cov": {t: float(np.mean(v)) for t, v in res[m][f].get("soft_cov", {}).items() if v},
                       "cov_contrast_ge_10pct": cov_where(res[m][f].get("volumes"), np.abs(contrast[f]) >= 0.10),
                       "volume_error_pct": {t: float(np.mean(v)) for t, v in res[m][f].get("error", {}).items() if v},
                       "soft_volume_error_pct": {t: float(np.mean(v)) for t, v in
                                                 res[m][f].get("soft_error", {}).items() if v}}
                   for f in FAMILIES} for m in args.methods}
    return {"subjects": names, "per_subject": res, "summary": summary, "seconds_per_image": per_image,
            "wm_gm_contrast": contrast}


def slice_factor(args) -> int:
    """How many simulated slices make one of ``--slices`` mm (1: isotropic)."""
    if not args.slices:
        return 1
    k = int(round(args.slices / args.resolution))
    if k < 1 or abs(k * args.resolution - args.slices) > 1e-6:
        raise SystemExit(f"--slices {args.slices:g} is not a multiple of --resolution {args.resolution:g}")
    return k


def cov_where(volumes, keep) -> dict:
    """CoV over the acquisitions in ``keep`` only (mean over subjects); empty without per-image volumes."""
    from bidsapp.metrics.overlap import coefficient_of_variation

    if not volumes or not all(volumes.get(t) for t in TISSUES) or keep.sum() < 2:
        return {}
    return {t: float(np.mean([coefficient_of_variation(np.asarray(v)[keep]) for v in volumes[t]])) for t in TISSUES}


SWEEP_SETTINGS = ("points", "subjects", "resolution", "snr", "bias", "seed", "anatomy_dir")


def reusable_results(args, names) -> tuple[dict, dict]:
    """Per-subject results of ``--reuse-methods`` taken from earlier runs of the same sweep (``--reuse``):
    Atropos need not be rerun for every model, and the U-Nets can be evaluated in parallel processes.
    A U-Net's results are reused only if they were computed with the weights evaluated now."""
    if not args.reuse:
        return {}, {}
    from bidsapp.models import registry, tissue

    model_of = {"unet-physics": tissue.PHYSICS_MODEL, "unet": tissue.BASE_MODEL}
    current = {m: registry.load_card(n, args.weights_dir)["sha256"] for m, n in model_of.items()}
    results, seconds = {}, {}
    for path in args.reuse:
        prev = json.loads(Path(path).read_text())
        same = all(prev.get("settings", {}).get(k) == getattr(args, k) for k in SWEEP_SETTINGS)
        if not same or prev.get("subjects") != names:
            raise SystemExit(f"{path}: sweep settings differ from this run's; cannot reuse its results")
        for m in args.reuse_methods:
            if m in results or m not in prev.get("per_subject", {}):
                continue
            if m in current and prev.get("models", {}).get(model_of[m]) != current[m]:
                raise SystemExit(f"{path}: {m} was evaluated with other weights than "
                                 f"{args.weights_dir or 'the shipped ones'}")
            results[m] = prev["per_subject"][m]
            seconds[m] = prev.get("seconds_per_image", {}).get(m, float("nan"))
    return results, seconds


def print_tables(summary: dict) -> None:
    def row(label, vals):
        return f"{label:<22}" + "".join(f"{v:>18}" for v in vals)

    print("\nTable 1 - Dice vs physics gold standard (mean +- sd over subjects)")
    print(row("", [f"{f} {t}" for f in FAMILIES for t in TISSUES]))
    for name, d in PAPER_DICE.items():
        print(row(f"paper {name}", [f"{d[f][t][0]:.3f}+-{d[f][t][1]:.3f}" for f in FAMILIES for t in TISSUES]))
    for m, d in summary.items():
        print(row(f"ours {m}", [f"{d[f]['dice'][t][0]:.3f}+-{d[f]['dice'][t][1]:.3f}" for f in FAMILIES for t in TISSUES]))
    print("\nTable 2 - coefficient of variation of volume over the sweep (mean over subjects)")
    print(row("", [f"{f} {t}" for f in FAMILIES for t in TISSUES]))
    for name, d in PAPER_COV.items():
        print(row(f"paper {name}", [f"{d[f][t]:.5f}" for f in FAMILIES for t in TISSUES]))
    for m, d in summary.items():
        print(row(f"ours {m}", [f"{d[f]['cov'][t]:.5f}" for f in FAMILIES for t in TISSUES]))
    soft = {m: d for m, d in summary.items() if all(d[f].get("soft_cov") for f in FAMILIES)}
    if soft:
        print("\nTable 2b - as Table 2 with partial-volume volumes (sum of the class probability; U-Nets only)")
        for m, d in soft.items():
            print(row(f"ours {m}", [f"{d[f]['soft_cov'][t]:.5f}" for f in FAMILIES for t in TISSUES]))
    err = {m: d for m, d in summary.items() if all(d[f].get("volume_error_pct") for f in FAMILIES)}
    if err:
        print("\nTable 3 - volume error vs the brain's true tissue volume (label-map fractions), % "
              "(mean over the sweep and subjects; labels, then probabilities summed)")
        print(row("", [f"{f} {t}" for f in FAMILIES for t in TISSUES]))
        for m, d in err.items():
            print(row(f"ours {m}", [f"{d[f]['volume_error_pct'][t]:+.1f}" for f in FAMILIES for t in TISSUES]))
            if all(d[f].get("soft_volume_error_pct") for f in FAMILIES):
                print(row(f"ours {m} (soft)",
                          [f"{d[f]['soft_volume_error_pct'][t]:+.1f}" for f in FAMILIES for t in TISSUES]))
    sub = {m: d for m, d in summary.items() if all(d[f].get("cov_contrast_ge_10pct") for f in FAMILIES)}
    if sub:
        print("\nTable 2c - as Table 2 over the acquisitions whose WM/GM signal ratio differs from 1 by >= 10 %")
        for m, d in sub.items():
            print(row(f"ours {m}", [f"{d[f]['cov_contrast_ge_10pct'][t]:.5f}" for f in FAMILIES for t in TISSUES]))


def low_contrast_table(out: dict, n: int = 8) -> dict:
    """Each method's SPGR volume at the ``n`` settings of least GM/WM contrast, in % of each subject's median
    over the sweep (mean over subjects): whether the volume follows the contrast's size or its sign."""
    contrast = np.asarray(out["wm_gm_contrast"]["SPGR"])
    order = [int(i) for i in np.argsort(contrast)[:n]]
    table = {"wm_gm_ratio": [float(1 + contrast[i]) for i in order]}
    for m, res in out["per_subject"].items():
        vols = res["SPGR"].get("volumes")
        if not vols or not all(vols.get(t) for t in TISSUES):
            continue
        table[m] = {}
        for t in TISSUES:
            v = np.asarray(vols[t], dtype=float)
            rel = 100 * (v / np.median(v, axis=1, keepdims=True) - 1)
            table[m][t] = [float(rel[:, i].mean()) for i in order]
    return table


def print_low_contrast_table(table: dict) -> None:
    methods = [m for m in table if m != "wm_gm_ratio"]
    if not methods:
        return
    print("\nSPGR volume at the settings of least GM/WM contrast (% of each subject's median, mean over subjects)")
    print(f"{'WM/GM ratio':<12}" + "".join(f"{m + ' ' + t:>20}" for m in methods for t in TISSUES))
    for k, r in enumerate(table["wm_gm_ratio"]):
        print(f"{r:<12.3f}" + "".join(f"{table[m][t][k]:>+20.1f}" for m in methods for t in TISSUES))


def plot_sweeps(out: dict, path: Path) -> Path | None:
    """Volume against the sweep (the paper's Fig. 3, for all held-out subjects): each point is the mean over
    subjects of a method's volume at one acquisition, in % of that subject's median volume over the sweep.
    MPRAGE against TI; SPGR against the WM/GM signal ratio, where the physics of the sweep crosses 1 (no
    GM/WM contrast) and every method must lean on anatomy alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in out["per_subject"] if all(out["per_subject"][m][f].get("volumes", {}).get(t)
                                                     for f in FAMILIES for t in TISSUES)]
    if not methods:
        return None
    n = out["settings"]["points"]
    x = {"MPRAGE": np.linspace(600, 1200, n), "SPGR": 1.0 + np.asarray(out["wm_gm_contrast"]["SPGR"])}
    colours = {"atropos": "tab:gray", "unet": "tab:blue", "unet-physics": "tab:red"}
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    for i, fam in enumerate(FAMILIES):
        for j, t in enumerate(TISSUES):
            ax = axes[i, j]
            for m in methods:
                v = np.asarray(out["per_subject"][m][fam]["volumes"][t], float)
                dev = 100.0 * (v / np.median(v, axis=1, keepdims=True) - 1.0)
                cov = out["summary"][m][fam]["cov"][t]
                style = {"lw": 1.5} if fam == "MPRAGE" else {"ls": "none", "marker": "o", "ms": 3, "alpha": 0.7}
                ax.plot(x[fam], dev.mean(0), color=colours.get(m), label=f"{m} (CoV {cov:.4f})", **style)
            ax.axhline(0.0, color="k", lw=0.5)
            if fam == "SPGR":
                ax.axvline(1.0, color="k", lw=0.5, ls=":")
            ax.set_xlabel("TI (ms)" if fam == "MPRAGE" else "WM/GM signal ratio")
            ax.set_ylabel(f"{t} volume, % of subject median")
            ax.set_title(f"{fam} {t}")
            ax.legend(fontsize=7)
    fig.suptitle(f"Tissue volume over the sweeps ({len(out['subjects'])} held-out subjects, {n} acquisitions each)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- presets
PRESETS = ("paper-mprage", "siemens-3T-mprage", "siemens-3T-mprage-v2", "siemens-1.5T-mprage", "siemens-7T-mprage",
           "mrainet-1.5T-spgr", "mrainet-3T-spgr")


def preset_acquisition(name: str) -> tuple[dict, dict]:
    """(simulation parameters, sidecar-like acquisition dict) of a simulator protocol preset."""
    from bidsapp.physics.protocols import get_protocol
    from bidsapp.training.tissue_data import MPRAGE_TAU

    pr = get_protocol(name)
    if pr.sequence == "MPRAGE":
        tau = pr.tau if pr.tau is not None else MPRAGE_TAU
        td = pr.td if pr.td is not None else pr.tr - pr.ti - tau
        sim = {"family": "MPRAGE", "TI": pr.ti, "td": td, "tau": tau, "field": pr.field_strength}
        side = {"sequence_family": "MPRAGE", "InversionTime": pr.ti, "RepetitionTime": pr.ti + td + tau,
                "MagneticFieldStrength": pr.field_strength}
    else:
        sim = {"family": "SPGR", "TR": pr.tr, "TE": pr.te, "FA": pr.flip_angle, "field": pr.field_strength}
        side = {"sequence_family": "SPGR", "RepetitionTime": pr.tr, "EchoTime": pr.te, "FlipAngle": pr.flip_angle,
                "MagneticFieldStrength": pr.field_strength}
    return sim, side


def presets(args) -> dict:
    """Dice of each method on the simulator's clinical protocol presets (sidecar parameters as a user has them)."""
    import torch

    from bidsapp.metrics.overlap import dice
    from bidsapp.models import tissue
    from bidsapp.training import tissue_data as D

    torch.set_num_threads(args.threads)
    names = list(D.HELDOUT)[: args.subjects]
    methods = [m for m in args.methods if m != "atropos"]
    out = {p: {m: {"GM": [], "WM": []} for m in methods} for p in PRESETS}
    for name in names:
        subj = heldout_subject(Path(args.anatomy_dir), name, args.resolution, args.seed, args.orientation)
        gs = gold_standard_dseg(subj)
        for k, preset in enumerate(PRESETS):
            sim, side = preset_acquisition(preset)
            img = D.simulate(subj, sim, np.random.default_rng([args.seed, k]), snr=args.snr, bias=args.bias) * subj.mask
            for m in methods:
                r = tissue.segment(img, subj.mask, (args.resolution,) * 3, side, device=args.device,
                                   use_physics=(m == "unet-physics"), weights_dir=args.weights_dir)
                for lab, t in ((2, "GM"), (3, "WM")):
                    out[preset][m][t].append(dice(r.dseg == lab, gs == lab))
    summary = {p: {m: {t: float(np.mean(v)) for t, v in d.items()} for m, d in pm.items()} for p, pm in out.items()}
    print("\nClinical protocol presets - Dice vs physics gold standard (mean over held-out subjects)")
    print(f"{'':<24}" + "".join(f"{m + ' GM':>18}{m + ' WM':>18}" for m in methods))
    for p, pm in summary.items():
        print(f"{p:<24}" + "".join(f"{pm[m]['GM']:>18.3f}{pm[m]['WM']:>18.3f}" for m in methods))
    return summary


# ---------------------------------------------------------------------------------------------- timing
def _timing_child(path: str, device: str) -> None:
    import nibabel as nib
    import torch

    from bidsapp.models import tissue

    torch.set_num_threads(2)
    img = nib.load(path)
    mask = nib.load(path.replace("_T1w.nii.gz", "_mask.nii.gz"))
    t0 = time.perf_counter()
    r = tissue.segment(np.asarray(img.dataobj, np.float32), np.asarray(mask.dataobj) > 0, img.header.get_zooms(),
                       {"sequence_family": "MPRAGE", "InversionTime": 0.9, "RepetitionTimePreparation": 1.51,
                        "MagneticFieldStrength": 3.0}, device=device)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    out = {"seconds": dt, "peak_rss_mb": peak, "shape": list(img.shape), "method": r.method, "device": r.device}
    if r.device.startswith("cuda"):  # a cold run pays for the CUDA context; a warm one is what a batch job sees
        torch.cuda.synchronize()
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        t0 = time.perf_counter()
        tissue.segment(np.asarray(img.dataobj, np.float32), np.asarray(mask.dataobj) > 0, img.header.get_zooms(),
                       {"sequence_family": "MPRAGE", "InversionTime": 0.9, "RepetitionTimePreparation": 1.51,
                        "MagneticFieldStrength": 3.0}, device=device)
        torch.cuda.synchronize()
        out["seconds_warm"] = time.perf_counter() - t0
    print(json.dumps(out))


def timing(args) -> dict:
    import tempfile

    import nibabel as nib

    from bidsapp.physics import phantom as P
    from bidsapp.training import tissue_data as D

    anat = P.load_anatomy(Path(args.anatomy_dir) / f"{D.HELDOUT[0]}_dseg.nii.gz", resolution=None)
    subj = D.make_subjects(anat, D.HELDOUT[0], np.random.default_rng(args.seed), 0, 1.0)[0]
    acq = sweep("MPRAGE", 121, args.seed)[60]
    img = D.simulate(subj, acq, np.random.default_rng(0), snr=30, bias=0.03) * subj.mask
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sub-01_T1w.nii.gz")
        nib.save(nib.Nifti1Image(img, subj.affine), path)
        nib.save(nib.Nifti1Image(subj.mask.astype(np.uint8), subj.affine), path.replace("_T1w", "_mask"))
        for _ in range(args.timing_runs):
            env = dict(os.environ, OMP_NUM_THREADS="2")
            out = subprocess.run([sys.executable, __file__, "--timing-child", path, "--device", args.device],
                                 capture_output=True, text=True, env=env, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    secs = [r["seconds"] for r in runs]
    mem = [r["peak_rss_mb"] for r in runs]
    result = {"shape_1mm": runs[0]["shape"], "runs": runs, "median_seconds": float(np.median(secs)),
              "median_peak_rss_mb": float(np.median(mem)), "threads": 2, "device": runs[0]["device"]}
    for key in ("seconds_warm", "peak_gpu_mb"):
        if key in runs[0]:
            result[f"median_{key}"] = float(np.median([r[key] for r in runs]))
    print(f"\n1 mm session {runs[0]['shape']}: inference median {result['median_seconds']:.1f} s, "
          f"peak RSS median {result['median_peak_rss_mb']:.0f} MB over {len(runs)} runs (target <= 60 s, 3 GB)")
    if "median_peak_gpu_mb" in result:
        print(f"  on {result['device']}: warm (second call) {result['median_seconds_warm']:.2f} s, "
              f"peak GPU memory {result['median_peak_gpu_mb']:.0f} MB")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--anatomy-dir", default=str(anatomy_dir()),
                   help="label maps (default: $SCANBRIDGE_DATA_DIR/anatomy, i.e. ../shared/data/anatomy)")
    p.add_argument("--points", type=int, default=121, help="acquisitions per sweep (paper: 121)")
    p.add_argument("--subjects", type=int, default=3, help="how many held-out subjects (max 3)")
    p.add_argument("--resolution", type=float, default=2.0)
    p.add_argument("--slices", type=float, default=None, metavar="MM",
                   help="thick axial slices of MM (a multiple of --resolution), as 2D clinical scans come")
    p.add_argument("--methods", nargs="+", default=list(OURS), choices=OURS)
    p.add_argument("--snr", type=float, default=SNR, help="SNR at the simulated resolution")
    p.add_argument("--bias", type=float, default=BIAS, help="residual bias-field log s.d.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--orientation", default="RAS", choices=("RAS", "native"),
                   help="voxel order of the held-out brains: RAS, as the workflow gives the models (default), or "
                        "the label maps' own (LIA; how figures before the RAS-trained weights were measured)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--timing", action="store_true", help="also time a 1 mm session")
    p.add_argument("--timing-only", action="store_true")
    p.add_argument("--presets", action="store_true", help="also evaluate the simulator's clinical protocol presets")
    p.add_argument("--presets-only", action="store_true")
    p.add_argument("--timing-runs", type=int, default=3)
    p.add_argument("--timing-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--reuse", nargs="+", default=None, metavar="JSON",
                   help="take --reuse-methods results from these earlier runs of the same sweep")
    p.add_argument("--reuse-methods", nargs="+", default=["atropos"], choices=OURS)
    p.add_argument("--weights-dir", default=None, help="evaluate weights + cards from this folder (default: shipped)")
    p.add_argument("--no-refine", action="store_true",
                   help="score the networks' own probabilities, without the app's intensity refinement")
    p.add_argument("--update-cards", action="store_true", help="write the metrics into the model cards")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tissue.json"))
    p.add_argument("--tables-from", default=None, metavar="JSON", help="print the tables of an earlier run and stop")
    args = p.parse_args(argv)
    if args.timing_child:
        _timing_child(args.timing_child, args.device)
        return 0
    if args.tables_from:
        try:
            prev = json.loads(Path(args.tables_from).read_text())
        except (OSError, ValueError) as exc:
            print(f"{args.tables_from}: cannot read benchmark results ({exc})", file=sys.stderr)
            return 2
        if "summary" not in prev:
            print(f"{args.tables_from}: no sweep results in it (a --timing-only or --presets-only run?)",
                  file=sys.stderr)
            return 2
        print_tables(prev["summary"])
        print_low_contrast_table(low_contrast_table(prev))
        return 0
    if not Path(args.anatomy_dir).is_dir():
        print(f"{args.anatomy_dir}: anatomy folder not found (give --anatomy-dir)", file=sys.stderr)
        return 2
    if args.update_cards and args.slices:
        print("--update-cards records the isotropic benchmark; run it without --slices", file=sys.stderr)
        return 2
    out: dict = {"settings": {k: v for k, v in vars(args).items() if k != "timing_child"}}
    if args.presets or args.presets_only:
        out["presets"] = presets(args)
    if not (args.timing_only or args.presets_only):
        t0 = time.time()
        out.update(evaluate(args))
        out["seconds"] = time.time() - t0
        print_tables(out["summary"])
        out["low_contrast"] = low_contrast_table(out)
        print_low_contrast_table(out["low_contrast"])
        print(f"\n{len(out['subjects'])} held-out subject(s) x {args.points} acquisitions per sequence at "
              f"{args.resolution:g} mm" + (f", {args.slices:g} mm axial slices" if args.slices else "")
              + f"; wall {out['seconds'] / 60:.1f} min")
    if args.timing or args.timing_only:
        out["timing"] = timing(args)
    from bidsapp.models import registry, tissue

    # a training run's weights folder may hold the physics model alone (train-tissue.sh --no-ablation)
    found = registry.available(weights_dir=args.weights_dir)
    out["models"] = {n: registry.load_card(n, args.weights_dir)["sha256"]
                     for n in (tissue.PHYSICS_MODEL, tissue.BASE_MODEL) if n in found}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    if "per_subject" in out and (png := plot_sweeps(out, Path(args.out).with_suffix(".png"))):
        print(f"wrote {png}")
    if args.update_cards and "summary" in out:
        for m, name in (("unet-physics", tissue.PHYSICS_MODEL), ("unet", tissue.BASE_MODEL)):
            if m in out["summary"]:
                command = " ".join(["python benchmarks/tissue/run.py", *(sys.argv[1:] if argv is None else argv)])
                card = registry.load_card(name, args.weights_dir)
                metrics = {"benchmark": command, "heldout_subjects": out["subjects"],
                           "points_per_sweep": args.points, "resolution_mm": args.resolution,
                           "dice_vs_physics_gold_standard": {f: {t: out["summary"][m][f]["dice"][t][0] for t in TISSUES}
                                                             for f in FAMILIES},
                           "volume_cov": {f: out["summary"][m][f]["cov"] for f in FAMILIES},
                           "volume_cov_partial_volume": {f: out["summary"][m][f].get("soft_cov") for f in FAMILIES},
                           "volume_cov_contrast_ge_10pct": {f: out["summary"][m][f].get("cov_contrast_ge_10pct")
                                                            for f in FAMILIES},
                           "volume_error_vs_true_pct": {f: out["summary"][m][f].get("volume_error_pct")
                                                        for f in FAMILIES},
                           "intensity_refinement": not args.no_refine and tissue.refinement_applies(
                               (args.resolution,) * 3, card["resolution_mm"])}
                if "presets" in out:
                    metrics["dice_on_simulator_presets"] = {pr: out["presets"][pr][m] for pr in out["presets"]}
                if "timing" in out:
                    metrics["inference_1mm_cpu2_seconds"] = out["timing"]["median_seconds"]
                    metrics["inference_1mm_peak_rss_mb"] = out["timing"]["median_peak_rss_mb"]
                kept = card.get("metrics", {})  # e.g. real-scan figures
                registry.update_card(name, {"metrics": {**kept, **metrics}}, args.weights_dir)
        print("model cards updated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
