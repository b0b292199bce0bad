"""What a T1w's sidecar is worth to the tissue segmentation: the true sequence parameters against none.

A T1w without a sidecar (or without the parameters the physics model reads) is segmented by the
no-physics U-Net. Before estimating the missing parameters from the image's contrast, this measures
the most such an estimate could gain: each simulated scan is segmented twice by ``segment()``, as the
participant level does (1 mm, with the native-resolution refinement), once with the true parameters
(the physics model) and once with none (the fallback), and both are scored against the simulation's
truth. If the two agree, a perfect estimate would change nothing.

Scans: held-out label maps (tissue-property variation) under the MPRAGE and SPGR presets and a few
settings off the presets (a short-TI MPRAGE whose CSF is inverted, a 30-degree SPGR).

    python benchmarks/tissue/sidecar_value.py [--subjects 8,9] [--voxel 1.0]

Prints one row per scan and writes benchmarks/results/tissue_sidecar_value.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CASES = (("siemens-3T-mprage", {}), ("siemens-1.5T-mprage", {}), ("mrainet-1.5T-spgr", {}),
         ("mrainet-3T-spgr", {}), ("siemens-3T-mprage", {"ti": 0.65}),
         ("mrainet-3T-spgr", {"flip_angle": 30.0, "tr": 0.02}))


def protocol(name: str, change: dict):
    from bidsapp.physics import protocols as pr

    p = pr.get_protocol(name)
    if "ti" in change and p.tau is not None:     # keep the preset's TR: TD = TR - TI - tau
        change = {**change, "td": p.tr - change["ti"] - p.tau}
    return dataclasses.replace(p, **change) if change else p


def score(dseg, truth) -> dict:
    out = {}
    for k, name in ((1, "CSF"), (2, "GM"), (3, "WM")):
        a, b = dseg == k, truth == k
        out[f"dice_{name}"] = float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))
        out[f"vol_err_{name}"] = float(100 * (a.sum() - b.sum()) / max(1, b.sum()))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", default="8", help="label-map indices (0-based, sorted anat-*_dseg)")
    ap.add_argument("--voxel", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    import nibabel as nib
    import torch

    from bidsapp.devdata import anatomy_dir
    from bidsapp.models import tissue
    from bidsapp.physics import phantom as ph
    from bidsapp.physics import simulator as sim

    torch.set_num_threads(2)
    paths = sorted(anatomy_dir().glob("anat-*_dseg.nii.gz"))
    rng = np.random.default_rng(a.seed)
    rows = []
    print("| subject | protocol | change | model with the true parameters | Dice GM/WM | GM/WM volume error | "
          "no-physics fallback: Dice GM/WM | GM/WM volume error |")
    print("|---|---|---|---|---|---|---|---|")
    for idx in (int(i) for i in a.subjects.split(",")):
        phantom = ph.from_label_map(nib.load(str(paths[idx])), crop=True).with_variation(rng, 1.0)
        for name, change in CASES:
            prot = protocol(name, change)
            s = sim.simulate(phantom, prot, rng, voxel_size=a.voxel, orientation="RAS")
            img = np.asarray(s.image.dataobj, np.float32)
            truth = s.truth.dseg()
            acq = {**prot.sidecar(), "sequence_family": "MPRAGE" if prot.ti is not None else "SPGR"}
            row = {"subject": paths[idx].name.split("_")[0], "protocol": name, "change": change}
            for label, acquisition in (("true", acq), ("none", None)):
                t0 = time.perf_counter()
                r = tissue.segment(img, truth > 0, (a.voxel,) * 3, acquisition, device="cpu")
                row[label] = {"method": r.method, "seconds": time.perf_counter() - t0, **score(r.dseg, truth)}
            rows.append(row)
            t, n = row["true"], row["none"]
            print(f"| {row['subject']} | {name} | {change or '-'} | {t['method']} | {t['dice_GM']:.3f}/{t['dice_WM']:.3f} | "
                  f"{t['vol_err_GM']:+.1f}/{t['vol_err_WM']:+.1f} % | {n['dice_GM']:.3f}/{n['dice_WM']:.3f} | "
                  f"{n['vol_err_GM']:+.1f}/{n['vol_err_WM']:+.1f} % |", flush=True)
    diff = [abs(r["true"][f"vol_err_{t}"] - r["none"][f"vol_err_{t}"]) for r in rows for t in ("GM", "WM")]
    print(f"\nlargest GM/WM volume difference between the true parameters and none: {max(diff):.1f} points "
          f"(median {np.median(diff):.1f})")
    out = ROOT / "benchmarks" / "results" / "tissue_sidecar_value.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["python", "benchmarks/tissue/sidecar_value.py",
                                                    *(argv if argv is not None else sys.argv[1:])]),
                               "rows": rows}, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
