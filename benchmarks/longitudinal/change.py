"""Precision and accuracy of the subject level's volume change on simulated heads with known truth.

Three simulated datasets of full heads (the anatomy label maps; scalp, skull, fat and neck included),
two sessions per subject, each run through ``scanbridge participant`` as a user would:

``rescan``   same scanner, a day apart: the true change is zero (precision);
``scanner``  a day apart, the second session on the site's new scanner or protocol: true change zero;
``atrophy``  same scanner, two years apart, half the subjects with accelerated atrophy: known change.

For every subject and measure the change table (``sub-*_desc-change_morph.tsv``) is compared with the
simulator's truth (``derivatives/truth/volumes.tsv``). Printed: median |error| (percentage points) per
dataset and measure, the raw figure beside the corrected one for ``scanner``, the measured / true ratio
for ``atrophy``, and, for comparison, the same figures from the difference of the sessions' own tissue
volumes (what comparing two cross-sectional runs gives). Targets (issue): rescan <= 0.3, scanner <= 0.5,
atrophy ratio 0.9-1.1. Writes ``benchmarks/results/longitudinal_change.json``.

    python benchmarks/longitudinal/change.py --subjects 4 --work /tmp/long-bench
    python benchmarks/longitudinal/change.py --subjects 4 --psf 1.2 --work /tmp/long-bench-psf

``--modalities FLAIR T2w`` simulates subjects without a T1w (the subject level reads their FLAIR);
``--no-sidecars`` removes every image's JSON sidecar, as many clinical exports come, so that the app
cannot know the acquisitions and reads every pair recalibrated per session (give each variant its own
``--work``):

    python benchmarks/longitudinal/change.py --subjects 4 --modalities FLAIR T2w --no-sidecars --work /tmp/lb-flair

``--psf FWHM`` blurs every simulated image by a Gaussian point-spread function (in-plane voxels), as a scanner
does; without it each voxel holds exactly its box average of the object, with edges sharper than any
scanner's (the same datasets otherwise: same seed, anatomies, protocols and atrophy).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from bidsapp.devdata import run_participant
from bidsapp.physics.protocols import MODALITIES

ROOT = Path(__file__).resolve().parents[2]
DATASETS = {
    "rescan": dict(interval_years=1 / 365.25, protocol_change=False, decline_fraction=0.0),
    "scanner": dict(interval_years=1 / 365.25, protocol_change=True, decline_fraction=0.0),
    "atrophy": dict(interval_years=2.0, protocol_change=False, decline_fraction=0.5),
}
MEASURES = ("brain", "GM", "WM", "ventricles")


def simulate(out: Path, subjects: int, seed: int, **kw) -> None:
    from bidsapp.devdata import anatomy_dir
    from bidsapp.physics.dataset import DatasetConfig, write_dataset

    if (out / "dataset_description.json").exists():
        return
    cfg = DatasetConfig(subjects=subjects, sites=min(subjects, 4), sessions=2, seed=seed,
                        anatomy_dir=str(anatomy_dir()), **kw)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_dataset(out, cfg, overwrite=True)


def compare(bids: Path, out: Path) -> pd.DataFrame:
    truth = pd.read_csv(bids / "derivatives" / "truth" / "volumes.tsv", sep="\t").set_index(
        ["participant_id", "session_id"])
    rows = []
    for path in sorted(out.glob("sub-*/anat/sub-*_desc-change_morph.tsv")):
        sub = path.name.split("_")[0]
        table = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)
        for _, r in table[table.measure.isin(MEASURES)].iterrows():
            t0, t1 = truth.loc[(sub, r.ses_from)], truth.loc[(sub, r.ses_to)]
            true = (t1[r.measure] / t0[r.measure] - 1) * 100
            cross = _cross_sectional(out, sub, r.ses_from, r.ses_to, r.measure)
            rows.append({"participant_id": sub, "measure": r.measure, "true": true, "measured": r.percent_change,
                         "raw": r.percent_change_raw, "cross_sectional": cross,
                         "acquisition_changed": r.acquisition_changed})
    return pd.DataFrame(rows)


def _cross_sectional(out: Path, sub: str, a: str, b: str, measure: str) -> float:
    """The change from the two sessions' own tissue-volume tables (no longitudinal processing)."""
    vols = []
    for ses in (a, b):
        t = pd.read_csv(out / sub / ses / "anat" / f"{sub}_{ses}_desc-volumes_morph.tsv", sep="\t")
        t = t[t.method == "unet-physics"].set_index("label").volume_mm3
        if measure == "brain":
            vols.append(t.get("GM", np.nan) + t.get("WM", np.nan))
        else:
            vols.append(t.get(measure, np.nan))
    return (vols[1] / vols[0] - 1) * 100 if vols[0] else float("nan")


def summarise(name: str, df: pd.DataFrame) -> list[dict]:
    out = []
    for m in MEASURES:
        d = df[df.measure == m]
        if d.empty or d.measured.isna().all():  # GM and WM of subjects without a T1w (no tissue maps)
            continue
        row = {"dataset": name, "measure": m, "pairs": len(d),
               "median_abs_error": float(np.nanmedian(np.abs(d.measured - d.true))),
               "median_abs_error_raw": float(np.nanmedian(np.abs(d.raw - d.true))),
               "median_abs_error_cross_sectional": float(np.nanmedian(np.abs(d.cross_sectional - d.true)))}
        big = d[np.abs(d.true) > 0.25]
        if name == "atrophy" and len(big):
            row["median_ratio"] = float(np.nanmedian(big.measured / big.true))
            row["median_ratio_cross_sectional"] = float(np.nanmedian(big.cross_sectional / big.true))
        out.append(row)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "longitudinal-work"))
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--modalities", nargs="+", default=["T1w"], choices=MODALITIES,
                    help="contrasts every session has (default: T1w)")
    ap.add_argument("--no-sidecars", action="store_true", help="remove the images' JSON sidecars")
    ap.add_argument("--psf", type=float, default=0.0, metavar="FWHM",
                    help="point-spread function of the simulated images, in-plane voxels (default 0: none)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "longitudinal_change.json"))
    args = ap.parse_args(argv)
    work = Path(args.work)
    summary, pairs, timing = [], {}, {}
    for name in args.datasets:
        bids, out = work / name / "bids", work / name / "out"
        simulate(bids, args.subjects, args.seed, psf_fwhm=args.psf, modalities=tuple(args.modalities),
                 **DATASETS[name])
        if args.no_sidecars:
            for sidecar in bids.glob("sub-*/ses-*/anat/*.json"):
                sidecar.unlink()
        timing[name] = run_participant(bids, out, work / name / "work", args.nprocs, "--segmentation", "unet-physics")
        df = compare(bids, out)
        pairs[name] = df.to_dict(orient="records")
        summary += summarise(name, df)
    table = pd.DataFrame(summary)
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        print(table.to_string(index=False))
    print("participant-level wall time (s):", {k: round(v) for k, v in timing.items()})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "pairs": pairs, "seconds": timing,
                                          "subjects": args.subjects, "seed": args.seed, "psf_fwhm": args.psf,
                                          "modalities": args.modalities, "sidecars": not args.no_sidecars},
                                         indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
