"""MS lesions on the real clinical scans of ``clinical-ms/``: what can be checked without a lesion reference.

The dataset has no lesion segmentation, but it has, per patient, the expert mask of the lesion CHANGE
between the two studies (new or grown lesion voxels) in a common space, and every session's affine to
it. New lesions are lesions at follow-up and were not (or smaller) at baseline, so a lesion mask should
cover the change voxels at ``ses-2`` and cover fewer of them at ``ses-1``. Per session this prints:

- lesion count and volume (ml) as the app wrote them (``desc-volumes_morph.tsv``);
- ``change covered``: the share of the patient's lesion-change voxels inside the session's lesion mask,
  taken to the common space (T1w -> FLAIR -> common with the dataset's affines), and the share of change
  components it touches;
- ``outside brain``: the share of the lesion mask outside the expert brain mask (false positives on
  the skull, scalp or meninges).

    scanbridge ../shared/data/clinical-ms/bids OUT participant -w WORK
    python benchmarks/lesion/clinical.py OUT          # writes benchmarks/results/lesion_clinical.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def to_common(mask_file: Path, chain: list[tuple[Path, Path]]) -> np.ndarray:
    """``mask_file`` resampled through ``chain`` ((fixed image, ITK transform) per step), linear, >= 0.5."""
    import ants

    cur = ants.image_read(str(mask_file)).astype("float32")
    for fixed, xfm in chain:
        cur = ants.apply_transforms(fixed=ants.image_read(str(fixed)).astype("float32"), moving=cur,
                                    transformlist=[str(xfm)], interpolator="linear")
    return cur.numpy() >= 0.5


def sessions(out_dir: Path, clinical: Path):
    for mask in sorted(out_dir.glob("sub-*/ses-*/anat/*_desc-lesion_mask.nii.gz")):
        sub, ses = mask.name.split("_")[:2]
        ref = clinical / "reference" / sub
        raw = clinical / "bids" / sub / ses / "anat"
        reference = "T1w" if (raw / f"{sub}_{ses}_T1w.nii.gz").is_file() else "FLAIR"
        change = ref / f"{sub}_space-common_desc-lesionchange_mask.nii.gz"
        brain = ref / f"{sub}_space-common_desc-brain_mask.nii.gz"
        chain = []
        if reference == "T1w":
            chain.append((raw / f"{sub}_{ses}_FLAIR.nii.gz", ref / f"{sub}_{ses}_from-T1w_to-FLAIR_xfm.txt"))
        chain.append((change, ref / f"{sub}_{ses}_from-FLAIR_to-common_xfm.txt"))
        if not all(x.is_file() for _, x in chain) or not change.is_file():
            print(f"  {sub} {ses}: transforms to the common space missing, left out")
            continue
        yield {"subject": sub, "session": ses, "reference": reference, "mask": mask, "chain": chain,
               "change": change, "brain": brain, "volumes": mask.with_name(f"{sub}_{ses}_desc-volumes_morph.tsv")}


def evaluate(case: dict) -> dict:
    import nibabel as nib
    import pandas as pd
    from scipy import ndimage as ndi

    mask = to_common(case["mask"], case["chain"])
    change = np.asarray(nib.load(str(case["change"])).dataobj) > 0
    brain = np.asarray(nib.load(str(case["brain"])).dataobj) > 0 if case["brain"].is_file() else None
    lab, n = ndi.label(change, structure=np.ones((3, 3, 3), bool))
    touched = len(np.setdiff1d(np.unique(lab[mask]), [0]))
    vol = pd.read_csv(case["volumes"], sep="\t", na_values=["n/a"])
    row = vol[(vol["method"] == "lesion") & (vol["label"] == "lesion")]
    return {"subject": case["subject"], "session": case["session"], "reference": case["reference"],
            "lesion_ml": round(float(row["volume_mm3"].iloc[0]) / 1000, 2) if len(row) else None,
            "lesion_count": int(row["count"].iloc[0]) if len(row) and "count" in row else None,
            "change_voxels": int(change.sum()), "change_lesions": int(n),
            "change_covered": round(float(mask[change].mean()), 3) if change.any() else None,
            "change_lesions_touched": round(touched / n, 3) if n else None,
            "outside_brain": (round(float((mask & ~brain).sum() / max(mask.sum(), 1)), 3)
                              if brain is not None else None)}


def main(argv=None) -> int:
    from bidsapp.devdata import clinical_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", help="a scanbridge output folder of the clinical-ms dataset")
    p.add_argument("--clinical", default=None, help="clinical-ms folder (default: $SCANBRIDGE_DATA_DIR/clinical-ms)")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "lesion_clinical.json"))
    args = p.parse_args(argv)
    clinical = Path(args.clinical) if args.clinical else clinical_dir()
    rows = [evaluate(c) for c in sessions(Path(args.out_dir), clinical)]
    if not rows:
        print(f"{args.out_dir}: no lesion masks of the clinical-ms subjects", file=sys.stderr)
        return 1
    print(f"{'session':<16}{'ref':>6}{'lesions':>9}{'ml':>8}{'change covered':>16}{'change lesions':>16}"
          f"{'outside brain':>15}")
    for r in rows:
        print(f"{r['subject'] + ' ' + r['session']:<16}{r['reference']:>6}{r['lesion_count'] or 0:>9}"
              f"{r['lesion_ml'] or 0:>8.1f}{r['change_covered'] if r['change_covered'] is not None else float('nan'):>16.2f}"
              f"{r['change_lesions_touched'] if r['change_lesions_touched'] is not None else float('nan'):>16.2f}"
              f"{r['outside_brain'] if r['outside_brain'] is not None else float('nan'):>15.3f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"out_dir": str(args.out_dir), "sessions": rows}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
