"""New-lesion detection on the real clinical MS pairs (``shared/data/clinical-ms``) against the experts'
lesion-change masks.

Runs ``scanbridge participant`` on the subjects with two sessions (or reads an existing output folder),
brings each follow-up's ``desc-newlesion_mask`` (new lesions) and ``desc-lesionchange_mask`` (new or grown
lesion voxels) into the patient's common space with the dataset's affines (reference image -> FLAIR ->
common), and compares each with the expert mask of new or grown lesion voxels: lesion-wise recall,
precision and F1 (26-connected components that overlap), and voxel Dice. Prints a table and writes
``benchmarks/results/longitudinal_clinical_lesions.json``.

    python benchmarks/longitudinal/clinical_lesions.py --out /tmp/clin-out --work /tmp/clin-work
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


MASKS = ("newlesion", "lesionchange")


def evaluate(sub: str, out: Path, clinical: Path, desc: str = "newlesion") -> dict | None:
    import ants
    from scipy import ndimage as ndi

    ref = clinical / "reference" / f"sub-{sub}"
    new = out / f"sub-{sub}" / "ses-2" / "anat" / f"sub-{sub}_ses-2_desc-{desc}_mask.nii.gz"
    if not new.is_file():
        return None
    truth_img = ants.image_read(str(ref / f"sub-{sub}_space-common_desc-lesionchange_mask.nii.gz"))
    chain = [str(ref / f"sub-{sub}_ses-2_from-FLAIR_to-common_xfm.txt")]
    anat = clinical / "bids" / f"sub-{sub}" / "ses-2" / "anat"
    if list(anat.glob("*_T1w.nii.gz")):  # the session's results are on its T1w grid
        chain.append(str(ref / f"sub-{sub}_ses-2_from-T1w_to-FLAIR_xfm.txt"))
    ours = ants.apply_transforms(fixed=truth_img, moving=ants.image_read(str(new)), transformlist=chain,
                                 interpolator="nearestNeighbor").numpy() > 0.5
    truth = truth_img.numpy() > 0.5
    s = np.ones((3, 3, 3), bool)
    lt, nt = ndi.label(truth, s)
    lo, no = ndi.label(ours, s)
    both = truth & ours
    recall = len(set(lt[both].tolist())) / nt if nt else float("nan")
    precision = len(set(lo[both].tolist())) / no if no else float("nan")
    f1 = 2 * recall * precision / (recall + precision) if recall + precision > 0 else 0.0
    ml = float(np.prod(truth_img.spacing)) / 1000
    return {"subject": sub, "mask": desc, "reference_lesions": nt, "reference_ml": round(truth.sum() * ml, 2),
            "lesions": no, "ml": round(ours.sum() * ml, 2), "lesion_recall": recall, "lesion_precision": precision,
            "lesion_f1": f1, "voxel_dice": 2 * both.sum() / max(truth.sum() + ours.sum(), 1)}


def main(argv=None) -> int:
    from bidsapp.devdata import clinical_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="participant output folder (made when missing)")
    ap.add_argument("--work", help="work folder for the participant run")
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "longitudinal_clinical_lesions.json"))
    args = ap.parse_args(argv)
    clinical = clinical_dir()
    subjects = sorted(p.name[4:] for p in (clinical / "bids").glob("sub-*")
                      if len(list(p.glob("ses-*"))) >= 2)
    out = Path(args.out)
    if args.work:
        subprocess.run(["scanbridge", str(clinical / "bids"), str(out), "participant", "-w", args.work, "--nprocs",
                        str(args.nprocs), "--omp-nthreads", "1", "--participant-label", *subjects],
                       check=True, stdout=subprocess.DEVNULL)
    rows = [r for r in (evaluate(s, out, clinical, desc) for s in subjects for desc in MASKS) if r]
    for r in rows:
        print(f"sub-{r['subject']} desc-{r['mask']}: reference {r['reference_lesions']} lesions "
              f"({r['reference_ml']} ml), ours "
              f"{r['lesions']} ({r['ml']} ml); lesion recall {r['lesion_recall']:.2f} precision "
              f"{r['lesion_precision']:.2f} F1 {r['lesion_f1']:.2f}; voxel Dice {r['voxel_dice']:.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
