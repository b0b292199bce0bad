"""Group-level harmonisation cost: MRAI-NET + ComBat for 20 and 200 simulated sessions, and dense
feature-extraction throughput on a 1 mm volume.

Sessions are simulated with the physics engine (shared label maps with tissue-property variation, the
preset's bias field and noise) under four acquisition groups (the two MRAI-NET SPGR protocols and 1.5T/3T
MPRAGE) and written as participant-level derivatives (desc-preproc_T1w, desc-brain_mask, dseg, label-*
probseg from the simulation truth). Each size runs in a fresh process so that its peak memory is its own.

    OMP_NUM_THREADS=2 python benchmarks/mrainet/group_scaling.py [--sessions 20,200] [--resolution 2]

Prints a table and writes benchmarks/results/mrainet_group_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bidsapp.devdata import anatomy_dir  # noqa: E402

ANATOMY = anatomy_dir()
RESULTS = ROOT / "benchmarks" / "results"
PROTOCOLS = ("mrainet-1.5T-spgr", "mrainet-3T-spgr", "siemens-3T-mprage", "siemens-1.5T-mprage")


def make_sessions(root: Path, n: int, resolution: float, seed: int = 0):
    import nibabel as nib
    import pandas as pd

    from bidsapp.physics import phantom as ph
    from bidsapp.physics import protocols as pr
    from bidsapp.physics import simulator as sim

    rng = np.random.default_rng(seed)
    anatomies = [ph.from_label_map(p, resolution=resolution) for p in sorted(ANATOMY.glob("anat-*_dseg.nii.gz"))]
    acq, vols = [], []
    for i in range(n):
        proto = pr.get_protocol(PROTOCOLS[i % len(PROTOCOLS)])
        p = anatomies[(i // len(PROTOCOLS)) % len(anatomies)].with_variation(rng, 1.0)
        s = sim.simulate(p, proto, rng, voxel_size="native", orientation="RAS")
        sub = f"{i + 1:03d}"
        d = root / f"sub-{sub}" / "ses-1" / "anat"
        d.mkdir(parents=True, exist_ok=True)
        stem = f"sub-{sub}_ses-1"
        aff = s.image.affine
        nib.save(s.image, d / f"{stem}_desc-preproc_T1w.nii.gz")
        nib.save(nib.Nifti1Image(s.truth.brain_mask.astype(np.uint8), aff), d / f"{stem}_desc-brain_mask.nii.gz")
        nib.save(nib.Nifti1Image(s.truth.dseg(), aff), d / f"{stem}_dseg.nii.gz")
        for k, name in enumerate(("CSF", "GM", "WM")):
            nib.save(nib.Nifti1Image(s.truth.truth_probseg()[k], aff), d / f"{stem}_label-{name}_probseg.nii.gz")
        group = f"{proto.manufacturer.lower()}-{proto.field_strength:g}T-{proto.sequence}"
        acq.append({"participant_id": f"sub-{sub}", "session_id": "ses-1", "acq_group": group,
                    "Manufacturer": proto.manufacturer, "MagneticFieldStrength": proto.field_strength,
                    "SequenceFamily": proto.sequence, "RepetitionTime": proto.tr, "EchoTime": proto.te,
                    "FlipAngle": proto.flip_angle, "site": group})
        v = s.truth.volumes()
        vols.append({"participant_id": f"sub-{sub}", "session_id": "ses-1", "method": "truth", "CSF": v["CSF"],
                     "GM": v["GM"], "WM": v["WM"], "brain": v["CSF"] + v["GM"] + v["WM"], "acq_group": group,
                     "site": group, "age": float(rng.uniform(20, 80)), "sex": str(rng.choice(["F", "M"]))})
    return pd.DataFrame(acq), pd.DataFrame(vols), s.image.shape


def make(root: Path, n: int, resolution: float, seed: int) -> dict:
    t0 = time.perf_counter()
    acq, vol, shape = make_sessions(root, n, resolution, seed)
    acq.to_csv(root / "acq.tsv", sep="\t", index=False)
    vol.to_csv(root / "vol.tsv", sep="\t", index=False)
    return {"simulate_s": time.perf_counter() - t0, "volume_shape": list(shape)}


def one(root: Path, n: int, resolution: float, steps: int, seed: int) -> dict:
    """The group steps on an existing simulated folder (a fresh process: peak memory is the group's)."""
    import pandas as pd
    import torch

    from bidsapp.harmonize import combat, mrainet_group
    from bidsapp.reports.harmonization import render
    from bidsapp.harmonize.context import GroupContext

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    logging.basicConfig(level=logging.WARNING)
    if True:
        acq = pd.read_csv(root / "acq.tsv", sep="\t")
        vol = pd.read_csv(root / "vol.tsv", sep="\t")
        ctx = GroupContext(output_dir=root, work_dir=root / "work", volumes=vol, acquisitions=acq,
                           participants=vol[["participant_id", "age", "sex"]], options={
                               "seed": seed, "mrainet_steps": steps, "nprocs": torch.get_num_threads()},
                           logger=logging.getLogger("scaling"))
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        secs = render(mrainet_group.run(ctx))
        t_mrai = time.perf_counter() - t0
        t0 = time.perf_counter()
        secs += render(combat.run(ctx))
        t_combat = time.perf_counter() - t0
        card = json.loads((root / "models" / "mrainet-group.json").read_text())
        pad = pd.read_csv(root / "group_pad.tsv", sep="\t")
        return {"sessions": n, "resolution_mm": resolution, "mrainet_s": t_mrai, "combat_s": t_combat, "group_s": t_mrai + t_combat,
                "train_s": card["training"]["seconds"], "steps": steps,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "rss_before_group_mb": rss0 / 1024,
                "pad_before_median": float(pad.pad_before.median()), "pad_after_median": float(pad.pad_after.median()),
                "warnings": [w for s in secs for w in s.warnings]}


def throughput(threads: int, repeats: int = 3) -> dict:
    """Dense MRAI-NET features over the brain of a 1 mm 256^3 label map (anat-01), voxels per second."""
    import nibabel as nib
    import torch

    from bidsapp.models.mrainet import MRAINet, dense_features

    torch.set_num_threads(threads)
    lab = np.asarray(nib.load(sorted(ANATOMY.glob("anat-*_dseg.nii.gz"))[0]).dataobj)
    from bidsapp.physics.phantom import LABEL_CLASSES, _BRAIN

    mask = np.isin(lab, [k for k, c in LABEL_CLASSES.items() if c in _BRAIN])
    img = np.random.default_rng(0).random(lab.shape, dtype=np.float32) * mask
    model = MRAINet().eval()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dense_features(model, img, mask, axis=1)
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    return {"threads": threads, "brain_voxels": int(mask.sum()), "volume": list(lab.shape), "median_s": med,
            "voxels_per_s": mask.sum() / med, "times_s": times}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", default="20,200")
    ap.add_argument("--resolution", type=float, default=2.0)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--make", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--skip-throughput", action="store_true")
    a = ap.parse_args(argv)
    if a.make is not None:
        print(json.dumps(make(Path(a.dir), a.make, a.resolution, a.seed)))
        return
    if a.one is not None:
        print(json.dumps(one(Path(a.dir), a.one, a.resolution, a.steps, a.seed)))
        return
    rows = []
    for n in [int(v) for v in a.sessions.split(",")]:
        with tempfile.TemporaryDirectory(prefix="sb-scaling-") as tmp:
            base = [sys.executable, __file__, "--dir", tmp, "--resolution", str(a.resolution), "--seed", str(a.seed)]
            made = json.loads(subprocess.run(base + ["--make", str(n)], capture_output=True, text=True,
                                             check=True).stdout.strip().splitlines()[-1])
            r = json.loads(subprocess.run(base + ["--one", str(n), "--steps", str(a.steps)], capture_output=True,
                                          text=True, check=True).stdout.strip().splitlines()[-1])
        r.update(made)
        rows.append(r)
        print(f"{n:4d} sessions ({a.resolution:g} mm, {r['volume_shape']}): group {r['group_s']:.0f} s "
              f"(MRAI-NET {r['mrainet_s']:.0f} s incl. training {r['train_s']:.0f} s, ComBat {r['combat_s']:.1f} s), "
              f"peak RSS {r['peak_rss_mb']:.0f} MB; PAD {r['pad_before_median']:.2f} -> {r['pad_after_median']:.2f}",
              flush=True)
    tp = [] if a.skip_throughput else [throughput(t) for t in (1, 2)]
    for t in tp:
        print(f"dense features, 1 mm {t['volume']} ({t['brain_voxels']} brain voxels), {t['threads']} thread(s): "
              f"{t['median_s']:.1f} s, {t['voxels_per_s']:.3g} voxels/s")
    if len(rows) >= 2:
        a0, a1 = rows[0], rows[-1]
        per0 = (a0["group_s"] - a0["train_s"]) / a0["sessions"]
        per1 = (a1["group_s"] - a1["train_s"]) / a1["sessions"]
        print(f"per-session cost excluding the fixed training: {per0:.2f} s ({a0['sessions']}) vs {per1:.2f} s "
              f"({a1['sessions']}): ratio {per1 / per0:.2f} (1 = linear)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "mrainet_group_scaling.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    # a partial rerun (one size, or no throughput) updates its own entries and keeps the others
    merged = {r["sessions"]: r for r in old.get("group", [])}
    merged.update({r["sessions"]: r for r in rows})
    path.write_text(json.dumps({"group": [merged[k] for k in sorted(merged)],
                                "dense_throughput": tp or old.get("dense_throughput", []),
                                "threads": os.environ.get("OMP_NUM_THREADS")}, indent=2))
    print(f"wrote {RESULTS / 'mrainet_group_scaling.json'}")


if __name__ == "__main__":
    main()
