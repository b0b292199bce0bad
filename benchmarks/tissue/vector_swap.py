"""What the physics branch can change: each image segmented with every other setting's parameter vector.

The SPGR sweep of ``run.py`` (same seed) holds one setting whose GM/WM contrast is inverted in the
simulator (WM/GM signal ratio 0.97). This script takes that setting and ``--others`` settings spread
over the sweep's contrasts, simulates each held-out subject's image at every one of them, and
segments every image with every setting's vector. Reading the table (rows: images, columns: vectors):
the spread along a row is what the vector can do to one image; the spread down the diagonal is what
the acquisitions do with their true vectors. A branch that only shifts the GM/CSF balance moves GM
along every row alike and cannot bring back the WM an inverted image loses.

Writes ``--out`` (JSON) and prints one table per subject and tissue.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def chosen_settings(contrast, others: int) -> list[int]:
    """The lowest-contrast setting, then the ``others`` settings nearest to evenly spaced contrasts
    up to the highest (distinct settings)."""
    c = np.asarray(contrast)
    first = int(np.argmin(c))
    targets = np.linspace(c.min(), c.max(), others + 1)[1:]
    picked = [first]
    for t in targets:
        d = np.abs(c - t)
        d[picked] = np.inf
        picked.append(int(np.argmin(d)))
    return picked


def swap_table(images, vectors, segment) -> dict:
    """{tissue: matrix[image, vector] of voxel counts}; ``segment(image, vector) -> dseg``."""
    out = {"GM": np.zeros((len(images), len(vectors))), "WM": np.zeros((len(images), len(vectors)))}
    for i, img in enumerate(images):
        for j, vec in enumerate(vectors):
            seg = segment(img, vec)
            out["GM"][i, j], out["WM"][i, j] = float((seg == 2).sum()), float((seg == 3).sum())
    return out


def spreads(table: np.ndarray) -> dict:
    """Relative range along rows (the vector's effect, per image) and along the diagonal (the
    acquisitions' with their own vectors)."""
    rows = (table.max(1) - table.min(1)) / table.mean(1)
    diag = np.diag(table)
    return {"vector_effect": [float(v) for v in rows], "acquisition_effect": float((diag.max() - diag.min()) / diag.mean())}


def main(argv=None) -> int:
    import torch

    from bidsapp.models import registry, tissue
    from bidsapp.training import tissue_data as D
    from run import (  # noqa: E402  (benchmarks/tissue/run.py)
        BIAS, SNR, acquisition_dict, gold_standard_dseg, heldout_subject, sweep, sweep_image)

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--anatomy-dir", default=str(D.DEFAULT_ANATOMY_DIR))
    p.add_argument("--subjects", type=int, default=2, help="held-out subjects (max 3)")
    p.add_argument("--points", type=int, default=121, help="size of run.py's SPGR sweep to pick from")
    p.add_argument("--others", type=int, default=3, help="settings besides the inverted one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--snr", type=float, default=SNR,
                   help=f"image SNR (run.py's sweep: {SNR:g}; training draws 20-120): is what is lost noise "
                        "or contrast?")
    p.add_argument("--bias", type=float, default=BIAS, help=f"residual bias-field log s.d. (run.py's sweep: {BIAS:g})")
    p.add_argument("--weights-dir", default=None, help="weights + cards folder (default: shipped)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tissue_vector_swap.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    acqs = sweep("SPGR", args.points, args.seed)
    contrast = [D.wm_gm_contrast(a) for a in acqs]
    picked = chosen_settings(contrast, args.others)
    result = {"snr": args.snr, "bias": args.bias,
              "settings": [dict(acqs[k], wm_gm_ratio=1 + contrast[k], index=k) for k in picked],
              "weights": {m: registry.load_card(m, args.weights_dir)["sha256"]
                          for m in (tissue.PHYSICS_MODEL, tissue.BASE_MODEL)}, "subjects": {}}
    labels = [f"{1 + contrast[k]:.2f}" for k in picked]
    for name in list(D.HELDOUT)[: args.subjects]:
        subj = heldout_subject(Path(args.anatomy_dir), name, 2.0, args.seed)
        images = [sweep_image(subj, name, acqs[k], k, args.seed, snr=args.snr, bias=args.bias) for k in picked]

        def segment(img, k, subj=subj):
            acq = None if k is None else acquisition_dict(acqs[k])
            return tissue.segment(img, subj.mask, (2.0,) * 3, acq, use_physics=k is not None,
                                  weights_dir=args.weights_dir).dseg

        table = swap_table(images, picked, segment)
        ablation = swap_table(images, [None], segment)
        gs = gold_standard_dseg(subj)
        result["subjects"][name] = {
            "gold_standard": {"GM": int((gs == 2).sum()), "WM": int((gs == 3).sum())},
            "physics": {t: v.tolist() for t, v in table.items()}, "ablation": {t: v[:, 0].tolist() for t, v in ablation.items()},
            "spread": {t: spreads(v) for t, v in table.items()}}
        for t in ("GM", "WM"):
            print(f"\n{name} {t} voxels (gold standard {result['subjects'][name]['gold_standard'][t]}); "
                  "rows: image at WM/GM ratio, columns: vector of WM/GM ratio")
            print(f"{'image':>8} " + " ".join(f"{lab:>9}" for lab in labels) + f" {'ablation':>9}")
            for i, lab in enumerate(labels):
                print(f"{lab:>8} " + " ".join(f"{v:9.0f}" for v in table[t][i]) + f" {ablation[t][i, 0]:9.0f}")
            s = result["subjects"][name]["spread"][t]
            print(f"vector effect per image {', '.join(f'{v:.1%}' for v in s['vector_effect'])}; "
                  f"acquisitions with their own vectors {s['acquisition_effect']:.1%}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
