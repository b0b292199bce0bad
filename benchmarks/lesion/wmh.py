"""FLAIR-only WMH: the Siamese content loss paper's Table 1 and Fig. 5, ours beside the paper's.

Four generators that differ only in the lesion loss (``content``, the paper's "Siamese loss", and the
overlap baselines ``dice``, ``tversky``, ``gdice``), each trained by :func:`bidsapp.training.wmh.train`
on the same ``--train-scanners`` simulated FLAIR protocols (seed ``--train-seed``), are scored on two
sets of whole simulated FLAIR sessions (:func:`bidsapp.training.wmh.simulate_session`) of the
held-out label maps (``anat-10``..``anat-12``), each (scanner, head) pair once with the Fazekas-like
lesion grade cycling 1, 2, 3:

- ``in``: in distribution, the paper's MICCAI holdout analogue: the first ``--in-scanners`` of the
  training scanners (scanners seen in training, heads not);
- ``ood``: out of distribution, the paper's CAIN analogue: ``--ood-scanners`` scanners of the ``ood``
  family (1 T / 7 T, 6.5-8 mm slices, TE outside the training range; seed ``[--seed, 7]``).

Metrics (:mod:`bidsapp.metrics.lesions`, the MICCAI WMH 2017 definitions): Dice, HD95 (mm), AVD (%),
lesion recall (``ltpr``) and lesion F1, mean (sd) over sessions; HD95 is averaged over the sessions
where it is finite (it is infinite when the prediction is empty; those are counted). Per session also
the positive class density (PCD = 100 x truth voxels / volume voxels, the paper's section 3.2.3).
Prints the paper's Table 1 beside ours, the issue's target ("content loss ahead of the three overlap
losses out of distribution on Dice and lesion recall": PASS/FAIL per metric when all four are there),
the paired differences behind it (content minus each overlap loss on the same sessions, with a bootstrap
interval: :func:`paired_differences`),
draws the paper's Fig. 5 (AVD against PCD bins on the ``ood`` set, :data:`PCD_EDGES`) to
``benchmarks/results/wmh_avd_pcd.png`` and writes ``benchmarks/results/wmh.json``.

    python benchmarks/lesion/wmh.py --shipped-only            # the shipped model, as content (minutes)
    python benchmarks/lesion/wmh.py --iterations 2000         # train the four variants (hours on 2 cores;
                                                              # resumable: rerun the same command)
    python benchmarks/lesion/wmh.py --weights content=DIR dice=DIR2  # these weights only (--variants: train others too)
    python benchmarks/lesion/wmh.py --shipped-only --recorded wmh_dice.json wmh_tversky.json

Training runs live in ``--work``/<loss> and resume from their checkpoints (``scanbridge-train wmh``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

LOSSES = ("content", "dice", "tversky", "gdice")
PAPER_NAMES = {"content": "Siamese loss", "dice": "Dice loss", "tversky": "Tversky loss", "gdice": "Gen. Dice"}
METRICS = ("dice", "hd95", "avd", "ltpr", "lesion_f1")
HEADERS = {"dice": "Dice", "hd95": "HD95 mm", "avd": "AVD %", "ltpr": "L-recall", "lesion_f1": "L-F1"}
SETS = {"in": "in distribution: training scanners, held-out heads (paper: MICCAI holdout validation)",
        "ood": "out of distribution: unseen 1 T / 7 T, 6.5-8 mm scanners, held-out heads "
               "(paper: CAIN independent validation)"}
GRADES = (1, 2, 3)
PCD_EDGES = (0.0, 0.03, 0.06, 0.09, 0.12, 0.15, 0.3, 0.6, 1.2, 2.4, 4.8)
"""Bins of Fig. 5 (PCD, %): 0.03 wide up to 0.15 as the paper's (its text names the 0.0 - 0.03 bin), then
doubling, for the confluent grade-3 loads of the simulation; the last bin is open."""
TARGET = ("dice", "ltpr")
"""The issue's target: content loss ahead of the three overlap losses out of distribution on these."""

# Table 1 of the paper: (mean, sd) over volumes; HD is the 95th-percentile Hausdorff distance in mm, AVD in %.
PAPER = {
    "in": {
        "dice": {"dice": (0.73, 0.07), "hd95": (9.33, 3.17), "avd": (17.54, 10.77), "ltpr": (0.46, 0.18),
                 "lesion_f1": (0.55, 0.18)},
        "tversky": {"dice": (0.78, 0.06), "hd95": (5.39, 2.28), "avd": (10.79, 9.33), "ltpr": (0.53, 0.13),
                    "lesion_f1": (0.63, 0.14)},
        "gdice": {"dice": (0.80, 0.06), "hd95": (4.43, 1.61), "avd": (5.57, 5.33), "ltpr": (0.61, 0.18),
                  "lesion_f1": (0.68, 0.17)},
        "content": {"dice": (0.79, 0.06), "hd95": (9.14, 9.96), "avd": (11.82, 7.52), "ltpr": (0.79, 0.14),
                    "lesion_f1": (0.62, 0.17)},
    },
    "ood": {
        "dice": {"dice": (0.45, 0.22), "hd95": (26.76, 16.67), "avd": (55.69, 38.24), "ltpr": (0.48, 0.20),
                 "lesion_f1": (0.47, 0.16)},
        "tversky": {"dice": (0.43, 0.24), "hd95": (28.8, 20.54), "avd": (52.52, 29.36), "ltpr": (0.47, 0.25),
                    "lesion_f1": (0.48, 0.21)},
        "gdice": {"dice": (0.44, 0.27), "hd95": (21.40, 17.50), "avd": (56.33, 28.79), "ltpr": (0.50, 0.28),
                  "lesion_f1": (0.51, 0.25)},
        "content": {"dice": (0.52, 0.18), "hd95": (24.26, 16.40), "avd": (39.76, 27.77), "ltpr": (0.75, 0.15),
                    "lesion_f1": (0.54, 0.13)},
    },
}
# The MICCAI 2017 leaderboard row of Table 1 (top entry then); its AVD reads "1 8.58" in the text
# extraction (18.58 or 8.58 with a footnote mark), so it is left out.
PAPER_LEADERBOARD = {"dice": 0.81, "hd95": 5.63, "avd": None, "ltpr": 0.82, "lesion_f1": 0.79}


# ------------------------------------------------------------------------------------------ sessions
def set_scanners(which: str, n: int, seed: int, train_seed: int, train_scanners: int) -> list:
    """The scanners of test set ``which``: the first ``n`` training scanners of a run with ``train_seed`` and
    ``train_scanners`` (``in``), or ``n`` out-of-distribution scanners drawn from ``[seed, 7]`` (``ood``)."""
    from bidsapp.training.wmh import make_scanners

    if which == "in":
        return make_scanners(train_scanners, np.random.default_rng([train_seed, 1]))[:n]
    return make_scanners(n, np.random.default_rng([seed, 7]), family="ood")


def held_out_heads(anatomy_dir) -> list:
    from bidsapp.training import lesion as T

    paths = [p for p in sorted(Path(anatomy_dir).glob("anat-*_dseg.nii.gz")) if p.name.split("_")[0] in T.HELDOUT]
    if not paths:
        raise SystemExit(f"{anatomy_dir}: none of the held-out label maps {', '.join(T.HELDOUT)}")
    return [T.load_head(p) for p in paths]


def pcd(truth) -> float:
    """Positive class density (the paper's section 3.2.3): truth voxels over volume voxels, in percent."""
    truth = np.asarray(truth, bool)
    return 100.0 * float(truth.sum()) / float(truth.size)


def make_sessions(which: str, scanners, heads, seed: int) -> list[dict]:
    """One whole simulated FLAIR session per (scanner, head), lesion grade cycling through :data:`GRADES`."""
    import torch

    from bidsapp.training.wmh import simulate_session

    code = {"in": 0, "ood": 1}[which]
    out = []
    for si, sc in enumerate(scanners):
        for hi, head in enumerate(heads):
            k = si * len(heads) + hi
            grade = GRADES[k % len(GRADES)]
            ses = simulate_session(head, sc, np.random.default_rng([seed, code, si, hi]),
                                   torch.Generator().manual_seed(seed * 100000 + code * 10000 + si * 100 + hi),
                                   grade=grade)
            out.append({"set": which, "head": head.name, "scanner": si, "describe": sc.describe(), "grade": grade,
                        "pcd": pcd(ses["lesion"]), **{key: ses[key] for key in ("flair", "brain", "lesion",
                                                                                  "affine", "zooms")}})
    return out


# ------------------------------------------------------------------------------------------ scoring
def evaluate(weights_dir, sessions, progress=print, thresholds=()) -> list[dict]:
    """Per-session scores of the WMH model in ``weights_dir`` (None: the shipped one); with ``thresholds``,
    also the same probability cut at each (``by_threshold``: Dice, lesion recall and F1, AVD, volume ratio)."""
    from bidsapp.metrics.lesions import lesion_scores, volume_ratio
    from bidsapp.models import wmh as W

    W._CACHE.clear()
    rows = []
    for s in sessions:
        t0 = time.perf_counter()
        res = W.segment(s["flair"], s["brain"], s["affine"], s["zooms"], device="cpu", weights_dir=weights_dir)
        sec = time.perf_counter() - t0
        sc = lesion_scores(res.mask, s["lesion"], s["zooms"], min_volume_mm3=W.MIN_LESION_MM3).as_dict()
        rows.append({k: s[k] for k in ("set", "head", "scanner", "describe", "grade", "pcd")}
                    | {"seconds": round(sec, 2)}
                    | {k: sc[k] for k in (*METRICS, "lfpr", "ppv", "n_true", "n_pred", "volume_true_mm3",
                                          "volume_pred_mm3")})
        if thresholds:
            rows[-1]["by_threshold"] = {}
            for t in thresholds:
                st = sc if t == res.threshold else lesion_scores(  # the model's own cut is scored above
                    res.probability >= t, s["lesion"], s["zooms"], min_volume_mm3=W.MIN_LESION_MM3,
                    with_hd95=False).as_dict()
                rows[-1]["by_threshold"][f"{t:g}"] = {
                    "dice": st["dice"], "ltpr": st["ltpr"], "lesion_f1": st["lesion_f1"], "avd": st["avd"],
                    "volume_ratio": volume_ratio(st["volume_pred_mm3"], st["volume_true_mm3"])}
        progress(f"  {s['set']:>3} {s['head']} {s['describe']:<24} grade {s['grade']} PCD {s['pcd']:.3f}: "
                 f"Dice {sc['dice']:.3f} L-recall {sc['ltpr']:.3f} AVD {sc['avd']:.1f} ({sec:.1f} s)")
    return rows


def summarise(rows) -> dict:
    """Mean, sd and count of each metric over sessions (finite values only; ``hd95_inf``: sessions with an
    infinite HD95, i.e. an empty prediction against lesions), the mean PCD and seconds."""
    out = {"n": len(rows)}
    for k in (*METRICS, "pcd", "seconds"):
        v = np.array([r[k] for r in rows if r.get(k) is not None], float)
        v = v[np.isfinite(v)]
        out[k] = {"mean": float(v.mean()) if len(v) else None, "sd": float(v.std()) if len(v) else None,
                  "n": int(len(v))}
    out["hd95_inf"] = int(sum(1 for r in rows if r.get("hd95") is not None and np.isinf(r["hd95"])))
    return out


def threshold_sweep(rows) -> dict:
    """``{threshold: {metric: mean}}`` over the sessions' ``by_threshold`` (the volume ratio as a median)."""
    out = {}
    for t in (rows[0].get("by_threshold") or {}) if rows else ():
        cells = [r["by_threshold"][t] for r in rows]
        out[t] = {m: float(np.nanmean([c[m] for c in cells])) for m in ("dice", "ltpr", "lesion_f1", "avd")}
        ratio = [c["volume_ratio"] for c in cells if c["volume_ratio"] is not None]
        out[t]["volume_ratio_median"] = float(np.median(ratio)) if ratio else None
    return out


def target_check(ood: dict) -> dict | None:
    """The issue's target on ``{loss: summary}`` of the out-of-distribution set: per metric of :data:`TARGET`,
    ``{"content", "best_other", "best_other_loss", "pass"}``; None unless all four losses are there."""
    if not all(k in ood for k in LOSSES):
        return None
    out = {}
    for m in TARGET:
        others = {k: ood[k][m]["mean"] for k in LOSSES if k != "content"}
        best = max(others, key=lambda k: -math.inf if others[k] is None else others[k])
        c = ood["content"][m]["mean"]
        out[m] = {"content": c, "best_other": others[best], "best_other_loss": best,
                  "pass": bool(c is not None and others[best] is not None and c > others[best])}
    return out


def session_key(row: dict) -> tuple:
    return row["head"], row["scanner"], row["grade"]


def paired_differences(results: dict, which: str = "ood", metrics=TARGET, seed: int = 0) -> dict:
    """Content minus each other loss on the same sessions of ``which``, per metric of ``metrics``
    (:func:`bidsapp.metrics.paired.paired_difference`: mean difference, 95 % bootstrap interval, sessions
    where content is ahead). ``{loss: {metric: {...}}}``; empty without content."""
    from bidsapp.metrics.paired import paired_difference

    if which not in results.get("content", {}):
        return {}
    mine = {session_key(r): r for r in results["content"][which]["sessions"]}
    out = {}
    for loss in (k for k in results if k != "content" and which in results[k]):
        pairs = [(mine[session_key(r)], r) for r in results[loss][which]["sessions"] if session_key(r) in mine]
        out[loss] = {}
        for m in metrics:
            kept = [(a[m], b[m]) for a, b in pairs if a.get(m) is not None and b.get(m) is not None]
            e = paired_difference([a for a, _ in kept], [b for _, b in kept], seed=seed)
            out[loss][m] = {"n": e["n"], "mean": e["mean"], "content_ahead": e["ahead"], "ci95": e["ci95"]}
    return out


def paired_lines(paired: dict) -> list[str]:
    from bidsapp.metrics.paired import describe

    lines = []
    for loss, by_metric in paired.items():
        for m, e in by_metric.items():
            if e["mean"] is None:
                continue
            lines.append(f"  content - {loss:<8} {HEADERS[m]:<9} {describe(e)}, content ahead in "
                         f"{e['content_ahead']} of {e['n']} sessions")
    return (["paired on the same out-of-distribution sessions: mean difference [95 % bootstrap interval]"]
            + lines) if lines else []


def paper_target() -> dict:
    """The same check on the paper's CAIN rows (what the paper reports)."""
    return target_check({k: {m: {"mean": v[0]} for m, v in PAPER["ood"][k].items()} for k in LOSSES})


def pcd_bins(values, edges=PCD_EDGES) -> np.ndarray:
    """Bin index of each PCD value: ``k`` for ``edges[k] <= v < edges[k + 1]``, the last bin open."""
    return np.clip(np.searchsorted(np.asarray(edges, float), np.asarray(values, float), side="right") - 1,
                   0, len(edges) - 1)


def bin_label(k: int, edges=PCD_EDGES) -> str:
    return f"{edges[k]:g}-{edges[k + 1]:g}" if k + 1 < len(edges) else f">= {edges[k]:g}"


def binned_avd(rows, edges=PCD_EDGES) -> list[dict]:
    """Fig. 5's points: per PCD bin with sessions, the bin's range, the mean AVD and the count."""
    rows = [r for r in rows if r.get("avd") is not None and np.isfinite(r["avd"])]
    if not rows:
        return []
    idx = pcd_bins([r["pcd"] for r in rows], edges)
    avd = np.array([r["avd"] for r in rows], float)
    return [{"bin": int(b), "label": bin_label(int(b), edges), "lo": float(edges[b]),
             "hi": float(edges[b + 1]) if b + 1 < len(edges) else None,
             "avd": float(avd[idx == b].mean()), "n": int((idx == b).sum())} for b in np.unique(idx)]


def plot_avd_pcd(results: dict, path: Path, edges=PCD_EDGES) -> Path | None:
    """The paper's Fig. 5 on the ``ood`` set: AVD against PCD bins per loss (bin means large and joined,
    sessions small, placed inside their bin by their PCD)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [k for k in LOSSES if "ood" in results.get(k, {})] + \
        [k for k in results if k not in LOSSES and "ood" in results[k]]
    if not losses:
        return None
    colours = {"content": "#d62728", "dice": "#1f77b4", "tversky": "#2ca02c", "gdice": "#9467bd"}
    markers = {"content": "o", "dice": "s", "tversky": "^", "gdice": "D"}

    def position(v):  # bin index + the fraction of the bin below v (the open last bin: one more width)
        k = int(pcd_bins([v], edges)[0])
        hi = edges[k + 1] if k + 1 < len(edges) else 2 * edges[k] - edges[k - 1]
        return k + min((v - edges[k]) / (hi - edges[k]), 0.999)

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    top = 0
    for j, k in enumerate(losses):
        rows = [r for r in results[k]["ood"]["sessions"] if r.get("avd") is not None and np.isfinite(r["avd"])]
        c, mk = colours.get(k, f"C{j}"), markers.get(k, "v")
        ax.scatter([position(r["pcd"]) for r in rows], [r["avd"] for r in rows], s=16, color=c, marker=mk,
                   alpha=0.35, linewidths=0)
        bins = binned_avd(rows, edges)
        off = (j - (len(losses) - 1) / 2) * 0.08
        ax.plot([b["bin"] + 0.5 + off for b in bins], [b["avd"] for b in bins], color=c, marker=mk, markersize=9,
                linestyle="none", markeredgecolor="k", markeredgewidth=0.6, label=f"{k} ({PAPER_NAMES.get(k, k)})")
        top = max([top] + [b["bin"] for b in bins])
    n_bins = top + 1
    for e in range(n_bins + 1):
        ax.axvline(e, color="0.85", linewidth=0.6, zorder=0)
    ax.axhline(100, color="0.4", linestyle="--", linewidth=0.8)
    ax.text(0.05, 101, "AVD 100 %: nothing found (or twice the volume)", ha="left", va="bottom", fontsize=7,
            color="0.3")
    ax.set_xlim(0, n_bins)
    ax.set_xticks([k + 0.5 for k in range(n_bins)])
    ax.set_xticklabels([bin_label(k, edges) for k in range(n_bins)], fontsize=8)
    ax.set_ylim(0, max(115.0, ax.get_ylim()[1]))
    ax.set_xlabel("positive class density PCD bin (% of the volume's voxels that are lesion)")
    ax.set_ylabel("AVD (% of the true lesion volume)")
    ax.set_title("WMH on out-of-distribution scanners: AVD vs positive class density (paper Fig. 5)", fontsize=10)
    ax.legend(fontsize=8, title="large: bin mean; small: sessions", title_fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ report
def _cell(v, sd=None, prec=2) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return f"{v:.{prec}f}" + (f" ({sd:.{prec}f})" if sd is not None else "")


def table(which: str, results: dict, info: dict) -> list[str]:
    """Lines of one dataset's table: per loss our row then the paper's."""
    prec = {"dice": 2, "hd95": 1, "avd": 1, "ltpr": 2, "lesion_f1": 2}
    lines = [f"\n{SETS[which]}", f"  {info.get('n_scanners', '?')} scanners x {info.get('n_heads', '?')} heads; "
             f"mean (sd) over sessions"]
    lines.append(f"{'model':<24}" + "".join(f"{HEADERS[m]:>16}" for m in METRICS) + f"{'PCD %':>8}{'s':>7}")
    names = [k for k in LOSSES if which in results.get(k, {})] + \
        [k for k in results if k not in LOSSES and which in results[k]]
    for k in names + [k for k in LOSSES if k not in names]:
        if k in names:
            s = results[k][which]["summary"]
            cells = [_cell(s[m]["mean"], s[m]["sd"], prec[m]) for m in METRICS]
            if s.get("hd95_inf"):  # empty predictions: HD95 infinite, left out of the mean and counted
                cells[1] = ("inf" if s["hd95"]["mean"] is None else cells[1]) + f" [{s['hd95_inf']} inf]"
            lines.append(f"{k + ' (ours)':<24}" + "".join(f"{c:>16}" for c in cells)
                         + f"{_cell(s['pcd']['mean'], None, 3):>8}{_cell(s['seconds']['mean'], None, 1):>7}")
        if k in PAPER[which]:
            p = PAPER[which][k]
            lines.append(f"{PAPER_NAMES[k] + ' (paper)':<24}"
                         + "".join(f"{_cell(p[m][0], p[m][1], prec[m]):>16}" for m in METRICS))
    if which == "in":
        lines.append(f"{'leaderboard (paper)':<24}"
                     + "".join(f"{_cell(PAPER_LEADERBOARD[m], None, prec[m]):>16}" for m in METRICS))
    return lines


def target_lines(check: dict | None, have) -> list[str]:
    head = "target: content loss ahead of dice, tversky and gdice out of distribution"
    if check is None:
        return [f"{head}: needs all four variants (have: {', '.join(have) or 'none'})"]
    lines = [head]
    for m, c in check.items():
        lines.append(f"  {HEADERS[m]:<9} {'PASS' if c['pass'] else 'FAIL'}: content {_cell(c['content'], None, 3)}, "
                     f"best overlap loss {c['best_other_loss']} {_cell(c['best_other'], None, 3)}")
    return lines


def _jsonable(x):
    """NaN and infinities as None (strict JSON)."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


# ------------------------------------------------------------------------------------------ models
def train_variant(loss: str, args) -> Path:
    """Weights of the ``loss`` variant in ``--work``/<loss>: reused when the card's command is this run's,
    else trained (resuming from the checkpoint) and saved."""
    from bidsapp.models.wmh import MODEL_NAME
    from bidsapp.training import wmh as T
    from bidsapp.training.engine import trained_weights

    cfg = T.TrainConfig(anatomy_dir=args.anatomy_dir, out=str(Path(args.work) / loss), loss=loss,
                        iterations=args.iterations, seed=args.train_seed, scanners=args.train_scanners,
                        threads=args.threads)
    return trained_weights(cfg, T.train, T.save, T.command_line, MODEL_NAME,
                           progress=lambda m: print(f"[{loss}] {m}", flush=True))


def card_training(card: dict) -> dict:
    """Loss, seed, scanners and iterations of a WMH model card (seed/scanners from its command when set)."""
    from bidsapp.training.wmh import TrainConfig

    tr = card.get("training", {})
    words = shlex.split(tr.get("command", ""))
    opt = {w: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--")}
    return {"loss": tr.get("loss"), "iterations": tr.get("iterations"), "command": tr.get("command"),
            "seed": int(opt.get("--seed", tr.get("seed", TrainConfig.seed))),
            "scanners": int(opt.get("--scanners", TrainConfig.scanners))}


def merge_recorded(result: dict, path: Path) -> None:
    """Add the variants of an earlier run's result file that this run did not evaluate. Its test sets must
    be this run's (same scanners, heads, lesion grades and loads), else it is left out with a note."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--recorded {path}: cannot read it ({exc})")
    keys = ("scanners", "heads", "grades", "pcd")
    if any({k: old.get("sets", {}).get(w, {}).get(k) for k in keys} != {k: result["sets"][w][k] for k in keys}
           for w in ("in", "ood")):
        print(f"note: {path} was measured on other test sets (seed, scanners or heads differ): left out", flush=True)
        return
    for loss, res in old.get("results", {}).items():
        if loss in result["results"]:
            continue
        result["results"][loss] = res
        result["models"][loss] = {**old["models"][loss], "recorded": str(path)}
        print(f"{loss}: from {path} ({old['models'][loss]['sha256'][:12]})", flush=True)


def parse_weights(items) -> dict:
    out = {}
    for it in items or []:
        loss, sep, path = it.partition("=")
        if not sep or loss not in LOSSES:
            raise SystemExit(f"--weights {it!r}: expected LOSS=DIR with LOSS one of {', '.join(LOSSES)}")
        if not (Path(path) / "wmh_unet.json").is_file():
            raise SystemExit(f"--weights {it!r}: {path} has no wmh_unet.json")
        out[loss] = Path(path)
    return out


def chosen_models(variants, given: dict, shipped_only: bool) -> dict:
    """Loss -> weights folder (None: the shipped model for ``shipped_only``, else train it). Without
    ``variants``, the losses given weights, or all four when none are: evaluating one trained folder
    never starts an hour-long training of the others."""
    if shipped_only:
        return {"content": None}
    variants = variants or ([k for k in LOSSES if k in given] if given else list(LOSSES))
    return {k: given.get(k) for k in variants}


def main(argv=None) -> int:
    from bidsapp.devdata import anatomy_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--anatomy-dir", default=str(anatomy_dir()))
    p.add_argument("--variants", nargs="+", default=None, choices=LOSSES,
                   help="losses to evaluate (default: those given with --weights, else all four, training "
                        "the ones without weights)")
    p.add_argument("--weights", nargs="+", metavar="LOSS=DIR", default=[],
                   help="evaluate these trained weights folders (wmh_unet.pt/.json) instead of training")
    p.add_argument("--iterations", type=int, default=2000, help="training budget of each variant")
    p.add_argument("--train-scanners", type=int, default=24, help="simulated FLAIR protocols of training")
    p.add_argument("--train-seed", type=int, default=0, help="seed of the training runs (and their scanners)")
    p.add_argument("--in-scanners", type=int, default=2, help="training scanners in the in-distribution set")
    p.add_argument("--ood-scanners", type=int, default=4, help="unseen scanners in the out-of-distribution set")
    p.add_argument("--seed", type=int, default=1, help="seed of the test sessions and the unseen scanners")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "wmh-work"))
    p.add_argument("--shipped-only", action="store_true", help="evaluate the shipped model only, as content")
    p.add_argument("--recorded", nargs="+", default=[], metavar="JSON",
                   help="results of earlier runs (this script's --out) on the same test sets: their variants "
                        "join the table (each variant trains in about an hour on 2 cores)")
    p.add_argument("--thresholds", type=float, nargs="+", default=(), metavar="P",
                   help="also cut each model's probability at these thresholds (the app's --lesion-threshold) "
                        "and print the sweep")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "wmh.json"))
    p.add_argument("--figure", default=str(ROOT / "benchmarks" / "results" / "wmh_avd_pcd.png"))
    args = p.parse_args(argv)
    import torch

    from bidsapp.models import registry

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    given = parse_weights(args.weights)
    models = chosen_models(args.variants, given, args.shipped_only)

    heads = held_out_heads(args.anatomy_dir)
    sessions, info = {}, {}
    for which, n in (("in", args.in_scanners), ("ood", args.ood_scanners)):
        scanners = set_scanners(which, n, args.seed, args.train_seed, args.train_scanners)
        t0 = time.perf_counter()
        sessions[which] = make_sessions(which, scanners, heads, args.seed)
        info[which] = {"description": SETS[which], "n_scanners": len(scanners), "n_heads": len(heads),
                       "scanners": [s.describe() for s in scanners], "heads": [h.name for h in heads],
                       "grades": [s["grade"] for s in sessions[which]],
                       "pcd": [round(s["pcd"], 4) for s in sessions[which]]}
        print(f"{which}: {len(sessions[which])} sessions simulated in {time.perf_counter() - t0:.0f} s "
              f"({'; '.join(info[which]['scanners'])})", flush=True)

    from bidsapp.devices import precision

    result = {"command": " ".join(["python benchmarks/lesion/wmh.py", *(sys.argv[1:] if argv is None else argv)]),
              "platform": platform.platform(), "threads": args.threads, "precision": precision("cpu"),
              "seed": args.seed,
              "train_seed": args.train_seed, "train_scanners": args.train_scanners, "sets": info,
              "paper": {"table1": PAPER, "leaderboard": PAPER_LEADERBOARD, "target": paper_target()},
              "models": {}, "results": {}}
    for loss, weights in models.items():
        if weights is None and not args.shipped_only:
            weights = train_variant(loss, args)
        card = registry.load_card("wmh_unet", weights)
        tr = card_training(card)
        if (tr["seed"], tr["scanners"]) != (args.train_seed, args.train_scanners):
            print(f"note: {loss} was trained with seed {tr['seed']} on {tr['scanners']} scanners, the "
                  f"in-distribution set is of seed {args.train_seed} / {args.train_scanners} scanners", flush=True)
        if tr["loss"] != loss:
            print(f"note: the weights evaluated as {loss} were trained with the {tr['loss']} loss", flush=True)
        result["models"][loss] = {"weights": "shipped" if weights is None else str(weights),
                                  "sha256": card["sha256"], "training": tr}
        print(f"{loss}: {result['models'][loss]['weights']} ({card['sha256'][:12]}, {tr['loss']} loss, "
              f"{tr['iterations']} iterations)", flush=True)
        result["results"][loss] = {}
        for which in ("in", "ood"):
            rows = evaluate(weights, sessions[which], progress=lambda m: print(m, flush=True),
                            thresholds=args.thresholds)
            result["results"][loss][which] = {"summary": summarise(rows), "sessions": rows}
            if args.thresholds:
                result["results"][loss][which]["threshold_sweep"] = threshold_sweep(rows)

    for path in args.recorded:
        merge_recorded(result, Path(path))
    ood = {k: v["ood"]["summary"] for k, v in result["results"].items()}
    result["target"] = target_check(ood)
    result["paired_ood"] = paired_differences(result["results"], "ood")
    lines = []
    for which in ("in", "ood"):
        lines += table(which, result["results"], info[which])
    lines.append("")
    lines += target_lines(result["target"], list(result["results"]))
    lines += paired_lines(result["paired_ood"])
    for loss, by_set in result["results"].items():
        for which, res in by_set.items():
            for t, m in res.get("threshold_sweep", {}).items():
                lines.append(f"  {loss} {which} cut at {t}: Dice {m['dice']:.3f}, lesion recall {m['ltpr']:.3f}, "
                             f"lesion F1 {m['lesion_f1']:.3f}, AVD {m['avd']:.1f} %, volume x"
                             f"{m['volume_ratio_median'] if m['volume_ratio_median'] is not None else float('nan'):.2f}")
    pt = result["paper"]["target"]
    lines.append("  (paper's CAIN rows: " + ", ".join(f"{HEADERS[m]} {'PASS' if c['pass'] else 'FAIL'}"
                                                   for m, c in pt.items()) + ")")
    result["fig5"] = {k: binned_avd(v["ood"]["sessions"]) for k, v in result["results"].items()}
    fig = plot_avd_pcd(result["results"], Path(args.figure))
    result["figure"] = str(fig) if fig else None
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(_jsonable(result), indent=1))
    print(f"wrote {args.out}" + (f" and {fig}" if fig else "") + f" ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
