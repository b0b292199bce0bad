"""Reproduce the MRAI-NET paper's experiment (sections 3.1-3.5, Fig. 2) on physics-simulated scans.

Source: 1.5T SPGR (flip 20, TR 13.8 ms, TE 2.8 ms), 4 subjects. Target: 3T SPGR (flip 90, TR 7.9 ms,
TE 4.5 ms): 1 subject provides the labelled target patches, 7 held-out subjects are the test set. The
proxy A-distance compares the whole source and target datasets (all their scans).
Experiment "same": every scan is simulated from the shared label maps without bias, noise or partial
volume (as the paper's Brainweb1.5T -> Brainweb3T). Experiment "harder": the target subjects are other
anatomies (nilearn ICBM152 and held-out label maps, randomly deformed, with tissue-property variation),
with the 3T preset's bias field and Rician noise and 1 x 1 x 3 mm voxels (partial volume), as the paper's
MRBrainS target. Axial 15 x 15 patches, 3 slices per subject.

For 1, 5, 10, 50, 100, 1000 labelled target patches per tissue: proxy A-distance (linear SVM, 1500 vs
1500 patches, 5-fold CV) between source and target patches before and after MRAI-NET, and the tissue
classification error on the held-out target subjects (50 patches per tissue per subject) of a linear
classifier on MRAI-NET features, of SOURCE (CNN on source + labelled target patches) and TARGET (CNN on
labelled target patches), both with one MRAI-NET branch's architecture.

    OMP_NUM_THREADS=1 python benchmarks/mrainet/run.py [--quick] [--repeats R] [--experiments same,harder]

Prints the table, writes benchmarks/results/mrainet_paper.json and mrainet_fig2.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bidsapp.metrics.domain import proxy_a_distance  # noqa: E402
from bidsapp.training.mrainet_data import PAPER_SOURCE, PAPER_TARGET, anatomy_paths, simulate_slices  # noqa: E402
from bidsapp.training.mrainet import (TrainSettings,  # noqa: E402
                                      featurize, fit_linear_classifier, predict_cnn,
                                      train_mrainet, train_patch_cnn)
from bidsapp.devdata import anatomy_dir  # noqa: E402

ANATOMY = anatomy_dir()
RESULTS = ROOT / "benchmarks" / "results"
PAPER = {  # Fig. 2 / section 3.5, simulated data (Brainweb1.5T -> Brainweb3T) and MRBrainS
    "same": {10: {"mrainet": 0.17, "source": 0.66, "target": 0.40}, 100: {"mrainet": 0.11, "source": 0.21, "target": 0.37}},
    "harder": {10: {"mrainet": 0.33, "source": 0.64, "target": 0.49}, 100: {"mrainet": 0.27}},
}


def make_data(kind: str, rng, n_src_per_tissue: int, n_test_subjects: int):
    """Source dataset: every label map at 1.5T (the first 4 give the labelled source patches). Target dataset:
    "same": the same label maps at 3T (map 5 labelled, maps 6.. held out); "harder": new subjects at 3T
    (deformed ICBM152 labelled; deformed ICBM152 and held-out maps as test) with bias, noise and 3 mm slices.
    The proxy A-distance compares the whole source and target datasets, as in the paper (section 3.2)."""
    paths = anatomy_paths(ANATOMY)
    if len(paths) < 6:
        raise SystemExit(f"needs the shared label maps in {ANATOMY} (set SCANBRIDGE_DATA_DIR)")
    n_used = min(len(paths), 5 + n_test_subjects)
    t0 = time.perf_counter()
    src_all = [simulate_slices(p, PAPER_SOURCE, rng) for p in paths[:n_used]]
    source = src_all[:4]
    if kind == "same":
        tgt_all = [simulate_slices(p, PAPER_TARGET, rng) for p in paths[:n_used]]
        target_train, tests = tgt_all[4], tgt_all[5:]
    else:
        hard = dict(deform=True, variation=1.0, bias=True, noise=True, voxel_size=(1.0, 1.0, 3.0))
        target_train = simulate_slices("icbm152", PAPER_TARGET, rng, **hard)
        tests = [simulate_slices("icbm152", PAPER_TARGET, rng, **hard) for _ in range(2)]
        tests += [simulate_slices(p, PAPER_TARGET, rng, **hard) for p in paths[5:5 + max(0, n_test_subjects - 2)]]
        tgt_all = [target_train] + tests
    sim_s = time.perf_counter() - t0
    xs, ys = zip(*[s.patches(n_src_per_tissue, rng) for s in source])
    src_x, src_y = np.concatenate(xs), np.concatenate(ys)
    pool_x, pool_y = target_train.patches(1000, rng)
    tx, ty = zip(*[s.patches(50, rng) for s in tests])
    test_x, test_y = np.concatenate(tx), np.concatenate(ty)
    pad_src = np.concatenate([s.brain_patches(1500 // len(src_all) + 1, rng) for s in src_all])
    pad_tgt = np.concatenate([s.brain_patches(1500 // len(tgt_all) + 1, rng) for s in tgt_all])
    return dict(src_x=src_x, src_y=src_y, pool_x=pool_x, pool_y=pool_y, test_x=test_x, test_y=test_y,
                pad_src=pad_src, pad_tgt=pad_tgt, simulate_s=sim_s,
                subjects={"source": [s.name for s in source], "target_labelled": target_train.name,
                          "target_test": [s.name for s in tests], "pad_source": [s.name for s in src_all],
                          "pad_target": [s.name for s in tgt_all]})


def pick_target(pool_x, pool_y, n, rng):
    idx = np.concatenate([rng.choice(np.flatnonzero(pool_y == k), min(n, int((pool_y == k).sum())), replace=False)
                          for k in (1, 2, 3)])
    return pool_x[idx], pool_y[idx]


def one_run(d, n, rng, seed, steps, cnn_steps):
    tx, ty = pick_target(d["pool_x"], d["pool_y"], n, rng)
    x = np.concatenate([d["src_x"], tx])
    y = np.concatenate([d["src_y"], ty])
    dom = np.r_[np.zeros(len(d["src_y"]), int), np.ones(len(ty), int)]
    out = {"n": n}
    res = train_mrainet(x, y, dom, settings=TrainSettings(steps=steps, seed=seed))
    out["mrainet_train_s"] = res.seconds
    f = featurize(res.model, x)
    clf = fit_linear_classifier(f, y, groups=dom)
    out["mrainet"] = float((clf.predict(featurize(res.model, d["test_x"])) != d["test_y"]).mean())
    out["pad_after"] = proxy_a_distance(featurize(res.model, d["pad_src"]), featurize(res.model, d["pad_tgt"]),
                                        seed=seed).pad
    s = train_patch_cnn(x, y - 1, settings=TrainSettings(steps=cnn_steps, seed=seed))
    out["source"] = float((predict_cnn(s.model, d["test_x"]) + 1 != d["test_y"]).mean())
    t = train_patch_cnn(tx, ty - 1, settings=TrainSettings(steps=cnn_steps, seed=seed, batch_size=min(128, 8 * len(ty))))
    out["target"] = float((predict_cnn(t.model, d["test_x"]) + 1 != d["test_y"]).mean())
    out["cnn_train_s"] = s.seconds + t.seconds
    return out


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exps = list(results)
    fig, axes = plt.subplots(len(exps), 2, figsize=(10, 3.6 * len(exps)), squeeze=False)
    for r, e in enumerate(exps):
        rows = results[e]["table"]
        ns = [row["n"] for row in rows]
        ax = axes[r, 0]
        ax.plot(ns, [row["pad_before"] for row in rows], "o-", color="tab:red", label="before")
        ax.plot(ns, [row["pad_after"] for row in rows], "o-", color="tab:blue", label="after (MRAI-NET)")
        ax.set_xscale("log")
        ax.set_ylim(-0.1, 2.05)
        ax.set_ylabel("proxy A-distance")
        ax.set_title(f"{e}: {results[e]['label']}", fontsize=9)
        ax.legend(fontsize=8)
        ax = axes[r, 1]
        for key, c in (("source", "tab:orange"), ("mrainet", "tab:blue"), ("target", "tab:green")):
            ax.plot(ns, [row[key] for row in rows], "o-", color=c, label=key.upper() if key != "mrainet" else "MRAI-NET")
        ax.set_xscale("log")
        ax.set_ylim(0, 0.8)
        ax.set_ylabel("tissue classification error")
        ax.legend(fontsize=8)
        for a in axes[r]:
            a.set_xlabel("labelled target patches per tissue")
            a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiments", default="same,harder")
    ap.add_argument("--ns", default="1,5,10,50,100,1000")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1500, help="MRAI-NET training steps (batch 128 pairs)")
    ap.add_argument("--cnn-steps", type=int, default=1000)
    ap.add_argument("--source-patches", type=int, default=500, help="per tissue per source subject")
    ap.add_argument("--test-subjects", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="ns 1,10,100, 400 steps: a smoke run")
    ap.add_argument("--tag", default="", help="suffix of the result files (keeps several runs side by side)")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ns = [1, 10, 100] if a.quick else [int(v) for v in a.ns.split(",")]
    steps, cnn_steps = (400, 300) if a.quick else (a.steps, a.cnn_steps)
    labels = {"same": "1.5T SPGR -> 3T SPGR, same anatomies, no bias/noise",
              "harder": "1.5T SPGR -> 3T SPGR, other anatomies, bias, noise, 3 mm slices"}
    results = {}
    t_all = time.perf_counter()
    for e in a.experiments.split(","):
        rng = np.random.default_rng(a.seed)
        d = make_data(e, rng, a.source_patches, a.test_subjects)
        pb = proxy_a_distance(d["pad_src"], d["pad_tgt"], seed=a.seed)
        rows = []
        for n in ns:
            reps = [one_run(d, n, np.random.default_rng(a.seed + 100 * r + n), a.seed + r, steps, cnn_steps)
                    for r in range(a.repeats)]
            row = {"n": n, "pad_before": pb.pad}
            for k in ("mrainet", "source", "target", "pad_after", "mrainet_train_s", "cnn_train_s"):
                vals = [r[k] for r in reps]
                row[k] = float(np.median(vals))                 # median over repeats, each kept below
                if a.repeats > 1:
                    row[k + "_runs"] = [float(v) for v in vals]
            rows.append(row)
            print(f"[{e}] n={n:5d}  PAD {row['pad_before']:.2f} -> {row['pad_after']:.2f}   error  MRAI-NET "
                  f"{row['mrainet']:.3f}  SOURCE {row['source']:.3f}  TARGET {row['target']:.3f}   "
                  f"(train {row['mrainet_train_s']:.0f} s + CNNs {row['cnn_train_s']:.0f} s)", flush=True)
        results[e] = {"label": labels[e], "table": rows, "subjects": d["subjects"], "simulate_s": d["simulate_s"],
                      "n_source_patches": int(len(d["src_y"])), "n_test_patches": int(len(d["test_y"])),
                      "paper": {str(k): v for k, v in PAPER.get(e, {}).items()}}
    total = time.perf_counter() - t_all
    print()
    print("| experiment | target patches/tissue | PAD before | PAD after | MRAI-NET | SOURCE | TARGET | paper (MRAI-NET/SOURCE/TARGET) |")
    print("|---|---|---|---|---|---|---|---|")
    for e, res in results.items():
        for row in res["table"]:
            p = PAPER.get(e, {}).get(row["n"], {})
            ps = "/".join(f"{p[k]:.2f}" if k in p else "-" for k in ("mrainet", "source", "target")) if p else ""
            print(f"| {e} | {row['n']} | {row['pad_before']:.2f} | {row['pad_after']:.2f} | {row['mrainet']:.3f} | "
                  f"{row['source']:.3f} | {row['target']:.3f} | {ps} |")
    print(f"\ntotal {total:.0f} s; MRAI-NET training {steps} steps x 128 pairs on {torch.get_num_threads()} thread(s)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"steps": steps, "cnn_steps": cnn_steps, "repeats": a.repeats, "seed": a.seed, "total_s": total,
            "threads": torch.get_num_threads(), "command": " ".join(["python", "benchmarks/mrainet/run.py", *(argv or sys.argv[1:])])}
    tag = f"_{a.tag}" if a.tag else ""
    (RESULTS / f"mrainet_paper{tag}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    plot(results, RESULTS / f"mrainet_fig2{tag}.png")
    print(f"wrote {RESULTS / f'mrainet_paper{tag}.json'} and {RESULTS / f'mrainet_fig2{tag}.png'}")


if __name__ == "__main__":
    main()
