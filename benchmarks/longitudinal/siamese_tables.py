"""The 3D-SiameseNet paper's Tables 1 and 2 on scanbridge's simulated session pairs: stable vs decline.

Rows, as in the paper: logistic regression, SVM and random forest on the volume changes (the paper's
imaging-only baselines), and 3D-SiameseNet when trained weights are given (``--weights``). Metrics:
accuracy and MSLE over ``--runs`` random sub-samplings (80 % of the pairs to fit, 20 % to test, split
by anatomy block so a brain never sits on both sides), overall and split by pairs with and without a
scanner change, plus the share of stable scanner-change pairs called stable; for a pool made with
``--warp-share``, also split by how the follow-up lost its volume (the simulator's atrophy or a warp).

The pairs are a pool of ``scanbridge-train longitudinal`` (``RUN/pairs.npz``; made with
``scanbridge-train longitudinal --out RUN --stop-after 0`` when missing). With ``--weights`` the pool
must come from another seed than the network's training pool (new subjects, noise and protocols;
``--seed 1`` for the shipped model, trained on seed 0), or the network would be scored on pairs it
learnt; the paper's Fig. 5, a t-SNE of the network's fused features (follow-up minus baseline), is then
drawn to ``--figure``. Volume changes are measured
by the subject level's own reading (:mod:`bidsapp.longitudinal.change`: boundary-shift integral,
tissue intensities per session when the protocol changed, inverted CSF unfolded from the protocol's
parameters) on the pool's skull-stripped, co-registered images, and, as the ceiling, taken from the
simulator's truth. The network is not told the interval, and neither are the baselines.

    scanbridge-train longitudinal --out RUN --seed 1 --pairs 1200 --stop-after 0
    python benchmarks/longitudinal/siamese_tables.py --run RUN --weights bidsapp/models/weights
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

FEATURES = ("brain", "CSF", "ventricles")


def measured_changes(pool: dict, grid_mm: float) -> np.ndarray:
    """Percent change of :data:`FEATURES` for every pair, read as the subject level reads it."""
    from bidsapp.longitudinal import change as C
    from bidsapp.training.longitudinal import protocol_csf_inverted

    out = np.zeros((len(pool["label"]), len(FEATURES)), np.float64)
    for k in range(len(out)):
        a, b = pool["a"][k].astype(np.float32), pool["b"][k].astype(np.float32)
        first, second = str(pool["protocols"][k]).split(">")
        common = C.pair_common(a, b, (grid_mm,) * 3)
        na, nb = C.normalise(a, common), C.normalise(b, common)
        res = C.pair_volumes(na, nb, common, changed=first != second,
                             csf_inverted=(protocol_csf_inverted(first), protocol_csf_inverted(second)))
        out[k] = [C.percent(res.volume_from[m], res.volume_to[m]) for m in FEATURES]
    return out


def splits(blocks: np.ndarray, runs: int, seed: int):
    """``runs`` (fit, test) index pairs: 20 % of the anatomy blocks to test, drawn at random."""
    rng = np.random.default_rng(seed)
    ids = np.unique(blocks)
    for _ in range(runs):
        test_blocks = rng.choice(ids, size=max(1, len(ids) // 5), replace=False)
        test = np.isin(blocks, test_blocks)
        yield np.flatnonzero(~test), np.flatnonzero(test)


def baselines():
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    return {"logistic regression": lambda s: make_pipeline(StandardScaler(), LogisticRegression()),
            "SVM": lambda s: make_pipeline(StandardScaler(), CalibratedClassifierCV(SVC(random_state=s), ensemble=False)),
            "random forest": lambda s: RandomForestClassifier(n_estimators=200, random_state=s)}


def table(pool: dict, features: dict, runs: int, seed: int, siamese_probs=None) -> list[dict]:
    from bidsapp.training.longitudinal import BLOCK, pair_scores

    y = np.asarray(pool["label"], np.int64)
    change = np.asarray(pool["change"], bool)
    warp = np.asarray(pool["warp"], bool) if "warp" in pool and np.any(pool["warp"]) else None
    blocks = np.arange(len(y)) // BLOCK
    rows = []
    models = [(f"{name} ({source})", make, X) for source, X in features.items() for name, make in baselines().items()]
    if siamese_probs is not None:
        models.append(("3D-SiameseNet", None, siamese_probs))
    for name, make, X in models:
        per_run = []
        for r, (fit, test) in enumerate(splits(blocks, runs, seed)):
            if make is None:
                probs = X[test]
            else:
                probs = make(seed + r).fit(X[fit], y[fit]).predict_proba(X[test])
            per_run.append(pair_scores(probs, y[test], change[test], None if warp is None else warp[test],
                                       empty=float("nan")))
        row = {"model": name}
        for key in per_run[0]:
            vals = np.array([p[key] for p in per_run], float)
            row[key] = float(np.nanmean(vals))
            row[key + "_sd"] = float(np.nanstd(vals))
        rows.append(row)
    return rows


def fused_features(net, a, b, batch: int = 16) -> np.ndarray:
    """The network's fused features (follow-up minus baseline), flattened: what the paper's Fig. 5 maps."""
    import torch

    net.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(a), batch):
            xa = torch.as_tensor(np.asarray(a[i:i + batch], np.float32))[:, None]
            xb = torch.as_tensor(np.asarray(b[i:i + batch], np.float32))[:, None]
            out.append(net.fuse(xa, xb).flatten(1).numpy())
    return np.concatenate(out)


def tsne_figure(features: np.ndarray, label: np.ndarray, change: np.ndarray, path, seed: int = 0) -> Path:
    """The paper's Fig. 5: a 2D t-SNE of ``features``, colour the truth, filled markers the same-scanner
    pairs and open ones the scanner changes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = PCA(n_components=min(50, *features.shape), random_state=seed).fit_transform(features)
    xy = TSNE(2, perplexity=min(30.0, (len(x) - 1) / 3), init="pca", random_state=seed).fit_transform(x)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for y, colour, name in ((0, "tab:blue", "stable"), (1, "tab:red", "decline")):
        for c, face, how in ((0, colour, "same scanner"), (1, "none", "scanner change")):
            sel = (label == y) & (change == c)
            ax.scatter(xy[sel, 0], xy[sel, 1], s=14, facecolors=face, edgecolors=colour, label=f"{name}, {how}")
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title("3D-SiameseNet fused features (t-SNE)")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default=str(ROOT / "benchmarks" / "results" / "siamese-run"),
                    help="scanbridge-train longitudinal run folder (its pairs.npz)")
    ap.add_argument("--weights", help="trained 3D-SiameseNet weights folder (adds its row)")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "longitudinal_siamese_tables.json"))
    ap.add_argument("--figure", default=str(ROOT / "benchmarks" / "results" / "longitudinal_siamese_tsne.png"),
                    help="the t-SNE of the fused features (with --weights)")
    args = ap.parse_args(argv)
    path = Path(args.run) / "pairs.npz"
    if not path.is_file():
        print(f"{path}: no pool; make it with: scanbridge-train longitudinal --out {args.run} --stop-after 0",
              file=sys.stderr)
        return 2
    with np.load(path, allow_pickle=False) as z:
        pool = {k: z[k] for k in z.files}
    recipe = json.loads(str(pool["recipe"]))
    grid_mm = float(recipe["grid_mm"])
    features = {"measured": measured_changes(pool, grid_mm),
                "true": np.stack([pool["gm_change"], pool["ventricle_change"]], 1).astype(np.float64)}
    probs = None
    if args.weights:
        from bidsapp.models.siamese import load_model, predict_proba
        from bidsapp.training.longitudinal import network_inputs

        net, card = load_model(weights_dir=args.weights)
        trained_on = card.get("training", {}).get("seed")
        if trained_on is not None and int(trained_on) == int(recipe["seed"]):
            print(f"{path}: a pool of seed {recipe['seed']}, the network's training seed; make a test pool "
                  f"with another: scanbridge-train longitudinal --out RUN --seed {int(trained_on) + 1} --stop-after 0",
                  file=sys.stderr)
            return 2
        seen = network_inputs(pool, card.get("input_mode", "intensity"), grid_mm)
        probs = predict_proba(net, seen["a"], seen["b"])
        figure = tsne_figure(fused_features(net, seen["a"], seen["b"]), np.asarray(pool["label"]),
                             np.asarray(pool["change"]), args.figure, args.seed)
        print(f"t-SNE of the fused features: {figure}")
    rows = table(pool, features, args.runs, args.seed, probs)
    warped = int(np.sum(pool["warp"])) if "warp" in pool else 0
    print(f"{len(pool['label'])} pairs ({int(np.sum(pool['change']))} with a scanner change"
          + (f", {warped} with the follow-up's brain shrunk by a warp" if warped else "")
          + f"), {args.runs} random sub-samplings by anatomy block; mean (sd)")
    print(f"{'model':<36} {'accuracy':>14} {'MSLE':>14} {'same scanner':>14} {'scanner change':>15} "
          f"{'stable kept':>12}" + (f" {'sim. atrophy':>12} {'warp':>6}" if warped else ""))
    for r in rows:
        print(f"{r['model']:<36} {r['accuracy']:.3f} ({r['accuracy_sd']:.3f}) {r['msle']:.3f} ({r['msle_sd']:.3f})"
              f"  {r['accuracy_same_scanner']:.3f} ({r['accuracy_same_scanner_sd']:.3f})"
              f"  {r['accuracy_scanner_change']:.3f} ({r['accuracy_scanner_change_sd']:.3f})"
              f"  {r['stable_change_called_stable']:.3f}"
              + (f"  {r['accuracy_simulated_atrophy']:12.3f} {r['accuracy_warp']:6.3f}" if warped else ""))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"pairs": int(len(pool["label"])), "runs": args.runs,
                                          "features": {"measured": list(FEATURES),
                                                       "true": ["gm_change", "ventricle_change"]},
                                          "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
