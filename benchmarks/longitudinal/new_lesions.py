"""New-lesion detection on simulated MS follow-ups with known new lesions.

A simulated dataset (the anatomy label maps, T1w + FLAIR, two sessions a year apart, lesions that grow
and, with ``--new-lesions-per-year``, new ones that appear between the sessions; ground truth in
``derivatives/truth/.../*_desc-newlesion_mask``) is run through ``scanbridge participant`` as a user
would, and each follow-up's ``desc-newlesion_mask`` is compared with the truth on the session's grid (and
its ``desc-lesionchange_mask`` with the truth's new or grown lesion voxels: the session's true lesion mask
less the previous session's):
lesion-wise recall, precision and F1 (:func:`bidsapp.metrics.lesions.lesion_scores`, 26-connected
components that overlap; lesions under :data:`bidsapp.longitudinal.lesions.MIN_NEW_MM3` ignored on both
sides, as the subject level ignores them), pooled over subjects and per subject. Target (issue): lesion-wise F1 >= 0.6.
Writes ``benchmarks/results/longitudinal_new_lesions.json``.

    python benchmarks/longitudinal/new_lesions.py --subjects 4 --work /tmp/newlesion-bench
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
import sys
from pathlib import Path

import numpy as np

from bidsapp.devdata import run_participant

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def simulate(bids: Path, subjects: int, seed: int, rate: float, resolution: float | None) -> None:
    from bidsapp.devdata import anatomy_dir
    from bidsapp.physics.dataset import DatasetConfig, write_dataset

    if (bids / "dataset_description.json").exists():
        return
    cfg = DatasetConfig(subjects=subjects, sites=min(subjects, 2), sessions=2, modalities=("T1w", "FLAIR"),
                        lesions=True, new_lesions_per_year=rate, seed=seed, anatomy_dir=str(anatomy_dir()),
                        resolution=resolution)
    bids.parent.mkdir(parents=True, exist_ok=True)
    write_dataset(bids, cfg, overwrite=True)


def true_change(truth_path: Path) -> np.ndarray:
    """The truth's new or grown lesion voxels of a follow-up: its lesion mask less the previous session's
    (the previous one resampled onto its grid when they differ)."""
    import nibabel as nib
    from nibabel.processing import resample_from_to

    anat = truth_path.parent
    sub, ses = anat.parent.parent.name, anat.parent.name
    sessions = sorted(p.name for p in anat.parent.parent.glob("ses-*"))
    previous = sessions[sessions.index(ses) - 1]
    now_img = nib.load(anat / f"{sub}_{ses}_desc-lesion_mask.nii.gz")
    before_img = nib.load(anat.parent.parent / previous / "anat" / f"{sub}_{previous}_desc-lesion_mask.nii.gz")
    before = np.asarray(resample_from_to(before_img, now_img, order=0).dataobj) > 0
    return (np.asarray(now_img.dataobj) > 0) & ~before


def evaluate(bids: Path, out: Path, desc: str = "newlesion") -> list[dict]:
    import nibabel as nib
    from nibabel.processing import resample_from_to

    from bidsapp.longitudinal.lesions import MIN_NEW_MM3
    from bidsapp.metrics.lesions import lesion_scores

    rows = []
    for truth_path in sorted((bids / "derivatives" / "truth").glob("sub-*/ses-*/anat/*_desc-newlesion_mask.nii.gz")):
        sub, ses = truth_path.parts[-4], truth_path.parts[-3]
        ours_path = out / sub / ses / "anat" / truth_path.name.replace("desc-newlesion", f"desc-{desc}")
        truth_img = nib.load(str(truth_path))
        truth = np.asarray(truth_img.dataobj) > 0 if desc == "newlesion" else true_change(truth_path)
        if ours_path.is_file():
            ours = np.asarray(resample_from_to(nib.load(str(ours_path)), truth_img, order=0).dataobj) > 0
        else:
            ours = np.zeros_like(truth)
        zooms = truth_img.header.get_zooms()[:3]
        scores = asdict(lesion_scores(ours, truth, zooms, min_volume_mm3=MIN_NEW_MM3, with_hd95=False))
        scores.pop("hd95", None)
        scores["detected"] = int(round(scores["ltpr"] * scores["n_true"]))
        scores["matched"] = int(round((1.0 - scores["lfpr"]) * scores["n_pred"]))
        rows.append({"participant_id": sub, "session_id": ses, "mask": desc, "found": ours_path.is_file(), **scores})
    return rows


def pooled_scores(rows: list[dict]) -> dict:
    pooled = {k: int(sum(r[k] for r in rows)) for k in ("detected", "n_true", "matched", "n_pred")}
    recall = pooled["detected"] / max(pooled["n_true"], 1)
    precision = pooled["matched"] / max(pooled["n_pred"], 1)
    pooled.update(recall=recall, precision=precision,
                  f1=2 * recall * precision / (recall + precision) if recall + precision else 0.0)
    return pooled


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--new-lesions-per-year", type=float, default=4.0)
    ap.add_argument("--resolution", type=float, default=None, help="mm (default: the protocols' own, about 1 mm)")
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "newlesion-work"))
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "longitudinal_new_lesions.json"))
    args = ap.parse_args(argv)
    work = Path(args.work)
    bids, out = work / "bids", work / "out"
    simulate(bids, args.subjects, args.seed, args.new_lesions_per_year, args.resolution)
    wall = run_participant(bids, out, work / "work", args.nprocs)
    rows = evaluate(bids, out) + evaluate(bids, out, "lesionchange")
    keys = [k for k in rows[0] if k not in ("participant_id", "session_id", "mask", "found")] if rows else []
    print(f"{'subject':<10} {'session':<8} {'mask':<13}" + " ".join(f"{k:>14}" for k in keys))
    for r in rows:
        print(f"{r['participant_id']:<10} {r['session_id']:<8} {r['mask']:<13}"
              + " ".join(f"{r[k]:>14.3f}" if isinstance(r[k], float) else f"{r[k]!s:>14}" for k in keys))
    pooled = {desc: pooled_scores([r for r in rows if r["mask"] == desc]) for desc in ("newlesion", "lesionchange")}
    for desc, p in pooled.items():
        print(f"pooled, desc-{desc}:", json.dumps(p))
    print(f"participant level {wall:.0f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "pooled": pooled["newlesion"],
                                          "pooled_lesionchange": pooled["lesionchange"], "participant_seconds": wall,
                                          "config": vars(args)}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
