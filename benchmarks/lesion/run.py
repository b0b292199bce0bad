"""MS lesion segmentation: the paper's Table 1 (BM, BDM, L_pc, L_rand, L_du) on scanners none of them saw.

Each variant is trained by ``scanbridge-train lesion`` on the same ``--train-scanners`` simulated
scanners (seed 0; the regularisation head predicts which), then tested on whole simulated sessions of
the held-out label maps (``anat-10``..``anat-12``) acquired on ``--test-scanners`` scanners drawn from
another seed (leave-scanners-out, the paper's cross-validation over sites), with every contrast, and
for the shipped model also FLAIR alone and FLAIR + T1w. Metrics (:mod:`bidsapp.metrics.lesions`): DSC,
LTPR, LFPR, PPV as in the paper's Table 1, plus lesion-wise F1, AVD and HD95 for the WMH benchmark;
means over sessions. Prints the paper's table beside ours and writes ``benchmarks/results/lesion.json``.

    python benchmarks/lesion/run.py --shipped-only          # the shipped model (minutes)
    python benchmarks/lesion/run.py --shipped-only --weights runs/x/weights   # a candidate in its place
    python benchmarks/lesion/run.py --iterations 4000       # train all five variants (hours on 2 cores;
                                                            # resumable: rerun the same command)

Training runs live in ``--work`` and resume from their checkpoints.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

PAPER = {  # Table 1 of the scanner-invariant MS lesion paper (test folds, 56 sites)
    "pc": {"dice": 0.4638, "ltpr": 0.4267, "lfpr": 0.3954, "ppv": 0.4865},
    "rand": {"dice": 0.5001, "ltpr": 0.4618, "lfpr": 0.3348, "ppv": 0.5193},
    "du": {"dice": 0.4893, "ltpr": 0.4670, "lfpr": 0.3525, "ppv": 0.5182},
    "BM": {"dice": 0.4540, "ltpr": 0.4318, "lfpr": 0.3383, "ppv": 0.5088},
    "BDM": {"dice": 0.4598, "ltpr": 0.5821, "lfpr": 0.5151, "ppv": 0.4577},
}
VARIANTS = {"BM": {"domain_loss": "none"}, "BDM": {"domain_loss": "none", "dropout": 0.2},
            "pc": {"domain_loss": "pc"}, "rand": {"domain_loss": "rand"}, "du": {"domain_loss": "du"}}
SUBSETS = {"all": None, "FLAIR": ("FLAIR",), "FLAIR+T1w": ("FLAIR", "T1w")}
METRICS = ("dice", "ltpr", "lfpr", "ppv", "lesion_f1", "avd", "hd95")


def test_sessions(anatomy_dir, n_scanners: int, seed: int, subsets, lesion_contrast: str = "full") -> list[dict]:
    """Whole simulated sessions of the held-out heads on unseen scanners, one per (head, scanner, subset)."""
    from bidsapp.training import lesion as T

    heads = [T.load_head(p) for p in sorted(Path(anatomy_dir).glob("anat-*_dseg.nii.gz"))
             if p.name.split("_")[0] in T.HELDOUT]
    if not heads:
        raise SystemExit(f"{anatomy_dir}: none of the held-out label maps {', '.join(T.HELDOUT)}")
    out = []
    for si, sc, head, ses in T.simulated_sessions(heads, n_scanners, seed, lesion_contrast):
        for name, keep in subsets.items():
            images = {c: v for c, v in ses["images"].items() if keep is None or c in keep}
            out.append({"head": head.name, "scanner": si, "describe": sc.describe(), "subset": name,
                        "images": images, "brain": ses["brain"], "lesion": ses["lesion"]})
    return out


def evaluate(weights_dir, sessions, thresholds=None) -> list[dict]:
    """One row per session and mask threshold (default: the app's, :data:`bidsapp.models.lesion.THRESHOLD`);
    the thresholds cut the same probability map."""
    from bidsapp.metrics.lesions import lesion_scores
    from bidsapp.models import lesion as L

    L._CACHE.clear()
    rows = []
    for s in sessions:
        t0 = time.perf_counter()
        res = L.segment(s["images"], s["brain"], np.eye(4), (1.0, 1.0, 1.0), device="cpu", weights_dir=weights_dir)
        sec = time.perf_counter() - t0
        for t in thresholds or (res.threshold,):
            sc = lesion_scores(res.probability >= t, s["lesion"], min_volume_mm3=L.MIN_LESION_MM3).as_dict()
            rows.append({"head": s["head"], "scanner": s["scanner"], "subset": s["subset"], "threshold": float(t),
                         "seconds": round(sec, 2),
                         **{k: sc[k] for k in (*METRICS, "n_true", "n_pred", "volume_true_mm3", "volume_pred_mm3")}})
    return rows


def summary(rows, subset="all", threshold=None) -> dict:
    """Means over the sessions of ``subset`` at ``threshold`` (default: the app's), and the median ratio of
    the masks' volume to the true lesion volume."""
    from bidsapp.metrics.lesions import volume_ratio
    from bidsapp.models.lesion import THRESHOLD

    t = THRESHOLD if threshold is None else threshold
    sel = [r for r in rows if r["subset"] == subset and r.get("threshold", THRESHOLD) == t]
    ratio = [v for v in (volume_ratio(r["volume_pred_mm3"], r["volume_true_mm3"]) for r in sel) if v is not None]
    return ({k: float(np.nanmean([r[k] for r in sel])) for k in (*METRICS, "seconds")}
            | {"volume_ratio_median": float(np.median(ratio)) if ratio else float("nan"), "n": len(sel)})


def paired_vs(result: dict, ref: str = "BM", metrics=("dice", "ltpr", "lfpr", "ppv")) -> dict:
    """Every other model (the trained variants and the shipped one) minus ``ref`` on the same whole-input
    sessions, per metric (:func:`bidsapp.metrics.paired.paired_difference`); empty when ``ref`` was not
    trained. The paper's claim is that the regularised models lead BM."""
    from bidsapp.metrics.paired import paired_difference

    if ref not in result["ours"]:
        return {}
    key = lambda r: (r["head"], r["scanner"])  # noqa: E731
    base = {key(r): r for r in result["ours"][ref]["sessions"]}
    models = {k: v["sessions"] for k, v in result["ours"].items() if k != ref}
    from bidsapp.models.lesion import THRESHOLD

    models["shipped"] = [r for r in result["shipped"].get("sessions", [])
                         if r["subset"] == "all" and r.get("threshold", THRESHOLD) == THRESHOLD]
    out = {}
    for name, rows in models.items():
        pairs = [(r, base[key(r)]) for r in rows if key(r) in base]
        if pairs:
            out[name] = {m: paired_difference([a[m] for a, _ in pairs], [b[m] for _, b in pairs]) for m in metrics}
    return out


def train_variant(name: str, args) -> Path:
    from bidsapp.models.lesion import MODEL_NAME
    from bidsapp.training import lesion as T
    from bidsapp.training.engine import trained_weights

    cfg = T.TrainConfig(anatomy_dir=args.anatomy_dir, out=str(Path(args.work) / name), iterations=args.iterations,
                        scanners=args.train_scanners, threads=args.threads, **VARIANTS[name])
    return trained_weights(cfg, T.train, T.save, T.command_line, MODEL_NAME,
                           progress=lambda m: print(f"[{name}] {m}", flush=True))


def main(argv=None) -> int:
    from bidsapp.devdata import anatomy_dir
    from bidsapp.training.lesion import LESION_CONTRASTS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--anatomy-dir", default=str(anatomy_dir()))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--iterations", type=int, default=4000)
    p.add_argument("--train-scanners", type=int, default=24)
    p.add_argument("--test-scanners", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "lesion-work"))
    p.add_argument("--shipped-only", action="store_true", help="evaluate the shipped model only (no training)")
    p.add_argument("--lesion-contrast", default="full", choices=LESION_CONTRASTS,
                   help="test lesions with the lesion class's whole contrast, or graded (faint to bright, fading "
                        "toward the edge)")
    p.add_argument("--subsets", nargs="+", default=list(SUBSETS), choices=list(SUBSETS),
                   help="inputs to score the shipped model on")
    p.add_argument("--thresholds", type=float, nargs="+", default=None, metavar="P",
                   help="score the shipped model's masks cut at each of these probabilities (default: the app's "
                        "0.5; the app's --lesion-threshold)")
    p.add_argument("--weights", default=None, metavar="DIR",
                   help="score the lesion_unet of this weights folder (a training run's weights/) as the shipped model")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lesion.json"))
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from bidsapp.models import registry

    shipped_card = registry.load_card("lesion_unet", args.weights)
    subsets = {k: SUBSETS[k] for k in args.subsets}
    sessions = test_sessions(args.anatomy_dir, args.test_scanners, args.seed, subsets, args.lesion_contrast)
    from bidsapp.devices import precision

    result = {"command": " ".join(["python benchmarks/lesion/run.py", *(argv or sys.argv[1:])]),
              "lesion_contrast": args.lesion_contrast, "precision": precision("cpu"),
              "platform": platform.platform(), "test": {"heads": sorted({s["head"] for s in sessions}),
                                                         "scanners": sorted({s["describe"] for s in sessions})},
              "paper": PAPER, "ours": {}, "shipped": {}}
    from bidsapp.models.lesion import THRESHOLD, check_threshold

    thresholds = [check_threshold(t) for t in (args.thresholds or [THRESHOLD])]
    rows = evaluate(args.weights, sessions, thresholds)
    result["shipped"] = {"sha256": shipped_card["sha256"], "domain_loss": shipped_card["training"].get("domain_loss"),
                         "by_subset": {k: summary(rows, k) for k in subsets}, "sessions": rows}
    if thresholds != [THRESHOLD]:
        result["shipped"]["by_threshold"] = {f"{t:g}": {k: summary(rows, k, t) for k in subsets} for t in thresholds}
    if not args.shipped_only:
        full = [s for s in sessions if s["subset"] == "all"]
        for name in args.variants:
            weights = train_variant(name, args)
            rows = evaluate(weights, full)
            result["ours"][name] = {"summary": summary(rows), "sessions": rows,
                                    "iterations": args.iterations, "train_scanners": args.train_scanners}
    print(f"\nMS lesions on {len(result['test']['scanners'])} unseen simulated scanners x "
          f"{len(result['test']['heads'])} held-out heads (means)")
    print(f"{'model':<26}{'DSC':>8}{'LTPR':>8}{'LFPR':>8}{'PPV':>8}{'F1':>8}{'AVD%':>8}{'HD95':>8}{'s':>7}"
          f"   paper DSC/LTPR/LFPR/PPV")
    for name, res in result["ours"].items():
        s, pp = res["summary"], PAPER[name]
        print(f"{name:<26}{s['dice']:8.3f}{s['ltpr']:8.3f}{s['lfpr']:8.3f}{s['ppv']:8.3f}{s['lesion_f1']:8.3f}"
              f"{s['avd']:8.1f}{s['hd95']:8.1f}{s['seconds']:7.1f}   "
              f"{pp['dice']:.3f}/{pp['ltpr']:.3f}/{pp['lfpr']:.3f}/{pp['ppv']:.3f}")
    by_threshold = result["shipped"].get("by_threshold", {f"{THRESHOLD:g}": result["shipped"]["by_subset"]})
    for t, by_subset in by_threshold.items():
        for subset, s in by_subset.items():
            name = f"shipped ({subset})" + (f" @{t}" if "by_threshold" in result["shipped"] else "")
            print(f"{name:<26}{s['dice']:8.3f}{s['ltpr']:8.3f}{s['lfpr']:8.3f}{s['ppv']:8.3f}"
                  f"{s['lesion_f1']:8.3f}{s['avd']:8.1f}{s['hd95']:8.1f}{s['seconds']:7.1f}"
                  f"   volume x{s['volume_ratio_median']:.2f}")
    result["paired_vs_BM"] = paired_vs(result)
    if result["paired_vs_BM"]:
        print("\npaired on the same sessions, minus BM: mean difference [95 % bootstrap interval], "
              "sessions where the model is higher")
        from bidsapp.metrics.paired import describe

        for name, by_metric in result["paired_vs_BM"].items():
            cells = [f"{m} {describe(e)} {e['ahead']}/{e['n']}" for m, e in by_metric.items()]
            print(f"  {name:<8} " + "; ".join(cells))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=float))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
