"""Protocol-change bridging benchmark (physics-informed paper, section 3.5) on simulated subjects.

Subjects: the held-out label maps (``anat-10..12``) with ``--deformations`` random deformations each
(own tissue properties), simulated at 2 mm with the simulator's protocol upgrade of site 1:
``siemens-3T-mprage`` (TI 900 ms, TR 2300 ms) before and ``siemens-3T-mprage-v2`` (TI 1100 ms,
TR 2500 ms) after. Both images of a subject share its anatomy, so any volume difference is the
protocol's. On a seeded 55/45 split of subjects (the paper used 12/10) we report the mean absolute
percent GM/WM volume difference between the two images on the test subjects:

* uncorrected: Atropos (k-means) and the physics U-Net given the true sidecar parameters;
* linear: post ~ a + b * pre fitted per tissue on the training subjects (the paper's GIF-Corrected);
* physics bridge: the (TI_pre, TI_post) pair minimising the training difference, applied to the test
  subjects (``bidsapp.harmonize.bridging`` library functions, ``bidsapp.models.tissue.sweep_volumes``).

Paper: 5 %, 3 %, 2 %. Writes ``benchmarks/results/tissue_bridging.json``; ``--update-cards`` copies the
result into the physics model's card (``metrics.protocol_bridging``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bidsapp.devdata import anatomy_dir  # noqa: E402


def main(argv=None) -> int:
    import torch

    from bidsapp.harmonize import bridging as B
    from bidsapp.models import tissue
    from bidsapp.physics import phantom as P
    from bidsapp.physics.protocols import get_protocol
    from bidsapp.training import tissue_data as D
    from run import atropos_dseg  # noqa: E402  (benchmarks/tissue/run.py)

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--anatomy-dir", default=str(anatomy_dir()),
                   help="label maps (default: $SCANBRIDGE_DATA_DIR/anatomy, i.e. ../shared/data/anatomy)")
    p.add_argument("--deformations", type=int, default=3, help="deformed subjects per held-out anatomy (+1 undeformed)")
    p.add_argument("--points", type=int, default=25, help="hypothetical TIs over 600-1200 ms (paper: 121)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights-dir", default=None, help="weights + cards folder (default: shipped)")
    p.add_argument("--update-cards", action="store_true", help="write the result into the physics model's card")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tissue_bridging.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    protos = [get_protocol("siemens-3T-mprage"), get_protocol("siemens-3T-mprage-v2")]
    acqs = []
    for pr in protos:
        tau = pr.tau or D.MPRAGE_TAU
        acqs.append(({"family": "MPRAGE", "TI": pr.ti, "td": pr.tr - pr.ti - tau, "tau": tau, "field": pr.field_strength},
                     {"sequence_family": "MPRAGE", "InversionTime": pr.ti, "RepetitionTime": pr.tr,
                      "MagneticFieldStrength": pr.field_strength}))
    grid = np.linspace(0.6, 1.2, args.points)
    rng = np.random.default_rng(args.seed)
    names, base, curves = [], {"atropos": [], "unet-physics": []}, []
    t0 = time.time()
    for anat_name in D.HELDOUT:
        anat = P.load_anatomy(Path(args.anatomy_dir) / f"{anat_name}_dseg.nii.gz", resolution=2.0)
        for subj in D.make_subjects(anat, anat_name, rng, args.deformations, 2.0):
            vols = {m: [] for m in base}
            cur = []
            for k, (sim_acq, sidecar) in enumerate(acqs):
                img = D.simulate(subj, sim_acq, np.random.default_rng([args.seed, len(names), k]), snr=60, bias=0.03)
                img *= subj.mask
                seg = atropos_dseg(img, subj.mask, (2.0,) * 3)
                vols["atropos"].append([float((seg == c).sum()) * 8.0 for c in (2, 3)])
                r = tissue.segment(img, subj.mask, (2.0,) * 3, sidecar, device="cpu", weights_dir=args.weights_dir)
                assert r.method == "unet-physics", r.fallback_reason
                vols["unet-physics"].append([r.volumes_mm3["GM"], r.volumes_mm3["WM"]])
                sw = tissue.sweep_volumes(img, subj.mask, (2.0,) * 3, sidecar, "InversionTime", grid, device="cpu",
                                          weights_dir=args.weights_dir)
                cur.append(sw[:, [1, 2]])
            for m in base:
                base[m].append(vols[m])
            curves.append(cur)
            names.append(subj.name)
            print(f"{subj.name}: " + "; ".join(
                f"{m} GM {B.percent_difference(*np.array(vols[m])[:, 0]):.2f}% WM {B.percent_difference(*np.array(vols[m])[:, 1]):.2f}%"
                for m in base), flush=True)
    pre = np.stack([c[0] for c in curves])
    post = np.stack([c[1] for c in curves])
    scheme, folds = B.split_subjects(len(names), args.seed)
    train, test = folds[0]
    res = B.bridge_from_curves(pre, post, train, test)
    table = {}
    for m, v in base.items():
        v = np.asarray(v)  # (S, 2 sessions, 2 tissues)
        table[f"{m} uncorrected"] = B.percent_difference(v[test, 0], v[test, 1]).mean(0)
        table[f"{m} linear"] = B.linear_bridge(v[:, 0], v[:, 1], train, test).mean(0)
    table["unet-physics physics-bridge"] = res.test_pct.mean(0)
    print(f"\n{len(names)} subjects ({len(train)} training, {len(test)} test), {args.points} TIs; "
          f"training optimum TI pre {grid[res.best[0]] * 1000:.0f} ms, post {grid[res.best[1]] * 1000:.0f} ms "
          f"(true 900 / 1100 ms)")
    print(f"{'':<32}{'GM %':>8}{'WM %':>8}{'mean %':>8}")
    for k, v in table.items():
        print(f"{k:<32}{v[0]:>8.2f}{v[1]:>8.2f}{v.mean():>8.2f}")
    print("paper (SABRE, GIF): uncorrected 5 %, linear 3 %, physics bridge 2 %")
    out = {"subjects": names, "train": train, "test": test, "points": args.points,
           "optimum_ti_s": [float(grid[res.best[0]]), float(grid[res.best[1]])],
           "mean_abs_diff_pct": {k: {"GM": float(v[0]), "WM": float(v[1]), "mean": float(v.mean())}
                                 for k, v in table.items()},
           "seconds": time.time() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out} ({out['seconds'] / 60:.1f} min)")
    if args.update_cards:
        update_card(out, sys.argv[1:] if argv is None else argv, args.weights_dir)
        print("model card updated")
    return 0


def update_card(out: dict, argv: list[str], weights_dir=None) -> dict:
    """Put this run's result under the physics model card's ``metrics.protocol_bridging``; the card's
    other metrics stay."""
    from bidsapp.models import registry, tissue

    bridging = {"benchmark": " ".join(["python benchmarks/tissue/bridging.py", *argv]),
                **{k: out[k] for k in ("subjects", "train", "test", "optimum_ti_s", "mean_abs_diff_pct")}}
    return registry.update_card(tissue.PHYSICS_MODEL, {"metrics": {"protocol_bridging": bridging}}, weights_dir)


if __name__ == "__main__":
    raise SystemExit(main())
