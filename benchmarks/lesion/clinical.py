"""MS lesions on the real clinical scans of ``clinical-ms/``: what can be checked without a lesion reference.

The dataset has no lesion segmentation, but it has, per patient, the expert mask of the lesion CHANGE
between the two studies (new or grown lesion voxels) in a common space, and every session's affine to
it. New lesions are lesions at follow-up and were not (or smaller) at baseline, so a lesion mask should
cover the change voxels at ``ses-2`` and cover fewer of them at ``ses-1``. Per session and lesion method
(the main answer's ``desc-lesion_mask`` and each other lesion method's mask, ``desc-lesion<desc>_mask`` or
``desc-<method>_mask`` such as ``desc-wmh_mask``; the method named by the mask's sidecar ``Method``) this
prints:

- lesion count and volume (ml) as the app wrote them (the method's row of ``desc-volumes_morph.tsv``, else
  the mask's sidecar);
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
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def in_common(image_file: Path, chain: list[tuple[Path, Path]]) -> np.ndarray:
    """``image_file`` resampled through ``chain`` ((fixed image, ITK transform) per step), linear."""
    import ants

    cur = ants.image_read(str(image_file)).astype("float32")
    for fixed, xfm in chain:
        cur = ants.apply_transforms(fixed=ants.image_read(str(fixed)).astype("float32"), moving=cur,
                                    transformlist=[str(xfm)], interpolator="linear")
    return cur.numpy()


def to_common(mask_file: Path, chain: list[tuple[Path, Path]]) -> np.ndarray:
    """``mask_file`` in the common space (:func:`in_common`), >= 0.5."""
    return in_common(mask_file, chain) >= 0.5


def written_probseg(out_dir: Path, mask: Path) -> Path | None:
    """The lesion probability map the app wrote beside ``mask`` (the main answer's or another lesion
    method's), as the reports find it (:func:`bidsapp.bids.collect.session_files`); None when there is none."""
    from bidsapp.bids.collect import session_files

    sub, ses = (part.split("-", 1)[1] for part in mask.name.split("_")[:2])
    for f in session_files(out_dir, sub, ses):
        if f.lesion_mask == mask:
            return f.lesion_probseg
        for alt in f.lesion_alt.values():
            if alt.get("mask") == mask:
                return alt.get("probseg")
    return None


def at_thresholds(case: dict, thresholds) -> list[dict]:
    """The session's lesion probability cut at each threshold (as ``--lesion-threshold`` would): volume in
    ml (components under the model's minimum dropped) and the share of the change voxels covered."""
    import nibabel as nib

    from bidsapp.metrics.lesions import label_lesions
    from bidsapp.models.lesion import MIN_LESION_MM3

    prob_file = case.get("probseg")
    if prob_file is None or not Path(prob_file).is_file():
        return []
    img = nib.load(str(prob_file))
    prob = np.asarray(img.dataobj, np.float32)
    zooms = np.sqrt((img.affine[:3, :3] ** 2).sum(0))
    common = in_common(prob_file, case["chain"])
    change = np.asarray(nib.load(str(case["change"])).dataobj) > 0
    out = []
    for t in thresholds:
        kept = label_lesions(prob >= t, zooms, MIN_LESION_MM3)[0] > 0
        out.append({"threshold": float(t), "lesion_ml": round(float(kept.sum() * np.prod(zooms)) / 1000, 2),
                    "change_covered": round(float((common[change] >= t).mean()), 3) if change.any() else None})
    return out


MASK_NAME = re.compile(r"^sub-[^_]+_ses-[^_]+(?:_[a-z]+-[^_]+)*?_desc-(?P<desc>[A-Za-z0-9]+)_mask\.nii(?:\.gz)?$")
"""A session's mask file (``sub-X_ses-Y[_entity-value...]_desc-D_mask.nii.gz``)."""
MAIN_DESC = "lesion"
"""``desc`` of the main lesion answer's mask (:data:`bidsapp.labels.LESION`'s ``main_desc``)."""


def lesion_methods() -> set[str]:
    """Keys and ``desc`` of the registered lesion methods (``lesion``, ``wmh``, ...); those two always."""
    names = {"lesion", "wmh"}
    try:
        from bidsapp import methods as M
        from bidsapp.labels import LESION

        for m in M.registry(task=LESION.key).values():
            names |= {m.key, m.desc} - {""}
    except Exception:  # the registry is optional here: the file names and sidecars suffice
        pass
    return names


def _sidecar(path: Path) -> dict:
    side = path.with_name(re.sub(r"\.nii(\.gz)?$", ".json", path.name))
    try:
        return json.loads(side.read_text()) if side.is_file() else {}
    except (OSError, ValueError):
        return {}


def mask_method(path: Path, known: set[str] | None = None) -> dict | None:
    """``{"desc", "method", "main", "space"}`` of a session's lesion mask file, None when it is not one (brain
    mask, other masks). ``desc-lesion`` is the main lesion answer; another lesion method's mask has its key
    or desc as ``desc`` (``desc-wmh``), or that after ``lesion`` (``desc-lesionwmh``). The method is the
    sidecar's ``Method`` when it names one (the main answer's is whichever method ran first), else the one
    ``desc`` names."""
    m = MASK_NAME.match(path.name)
    if m is None:
        return None
    desc = m["desc"]
    known = lesion_methods() if known is None else known
    if desc == MAIN_DESC:
        method = "lesion"
    elif desc in known:
        method = desc
    elif desc.startswith(MAIN_DESC) and desc[len(MAIN_DESC):] in known:
        method = desc[len(MAIN_DESC):]
    else:
        return None
    method = str(_sidecar(path).get("Method") or method)
    space = re.search(r"_space-([^_]+)_", path.name)
    return {"desc": desc, "method": method, "main": desc == MAIN_DESC, "space": space[1] if space else None}


def sessions(out_dir: Path, clinical: Path):
    known = lesion_methods()
    for mask in sorted(out_dir.glob("sub-*/ses-*/anat/*_desc-*_mask.nii.gz")):
        kind = mask_method(mask, known)
        if kind is None:
            continue
        sub, ses = mask.name.split("_")[:2]
        ref = clinical / "reference" / sub
        raw = clinical / "bids" / sub / ses / "anat"
        reference = "T1w" if (raw / f"{sub}_{ses}_T1w.nii.gz").is_file() else "FLAIR"
        grid = kind["space"] or reference
        if grid not in ("T1w", "FLAIR"):
            print(f"  {mask.name}: in space {grid}, left out")
            continue
        change = ref / f"{sub}_space-common_desc-lesionchange_mask.nii.gz"
        brain = ref / f"{sub}_space-common_desc-brain_mask.nii.gz"
        chain = []
        if grid == "T1w":
            chain.append((raw / f"{sub}_{ses}_FLAIR.nii.gz", ref / f"{sub}_{ses}_from-T1w_to-FLAIR_xfm.txt"))
        chain.append((change, ref / f"{sub}_{ses}_from-FLAIR_to-common_xfm.txt"))
        if not all(x.is_file() for _, x in chain) or not change.is_file():
            print(f"  {sub} {ses}: transforms to the common space missing, left out")
            continue
        yield {"subject": sub, "session": ses, "reference": reference, "mask": mask, "chain": chain,
               "change": change, "brain": brain, "volumes": mask.with_name(f"{sub}_{ses}_desc-volumes_morph.tsv"),
               **{k: kind[k] for k in ("method", "desc", "main")}}


def method_volume(case: dict) -> tuple[float | None, int | None]:
    """(lesion volume in ml, lesion count) of the case's method: its ``desc-volumes_morph.tsv`` row (label
    ``lesion``, else its only row), else the mask's sidecar (``LesionVolume_mm3``, ``LesionCount``)."""
    import pandas as pd

    method = case.get("method", "lesion")
    if Path(case["volumes"]).is_file():
        vol = pd.read_csv(case["volumes"], sep="\t", na_values=["n/a"])
        rows = vol[vol["method"].astype(str) == method]
        row = rows[rows["label"].astype(str) == "lesion"]
        row = row if len(row) else rows
        if len(row):
            return (round(float(row["volume_mm3"].iloc[0]) / 1000, 2),
                    int(row["count"].iloc[0]) if "count" in row and pd.notna(row["count"].iloc[0]) else None)
    meta = _sidecar(Path(case["mask"]))
    if meta:
        ml = meta.get("LesionVolume_mm3")
        return (round(float(ml) / 1000, 2) if ml is not None else None,
                int(meta["LesionCount"]) if meta.get("LesionCount") is not None else None)
    return None, None


def evaluate(case: dict) -> dict:
    import nibabel as nib
    from scipy import ndimage as ndi

    mask = to_common(case["mask"], case["chain"])
    change = np.asarray(nib.load(str(case["change"])).dataobj) > 0
    brain = np.asarray(nib.load(str(case["brain"])).dataobj) > 0 if case["brain"].is_file() else None
    lab, n = ndi.label(change, structure=np.ones((3, 3, 3), bool))
    touched = len(np.setdiff1d(np.unique(lab[mask]), [0]))
    ml, count = method_volume(case)
    return {"subject": case["subject"], "session": case["session"], "reference": case["reference"],
            "method": case.get("method", "lesion"), "desc": case.get("desc", MAIN_DESC),
            "main": case.get("main", True), "lesion_ml": ml, "lesion_count": count,
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
    p.add_argument("--thresholds", type=float, nargs="+", default=None, metavar="P",
                   help="also cut each session's lesion probability at these thresholds (the app's "
                        "--lesion-threshold) and print volume and change covered per threshold")
    args = p.parse_args(argv)
    clinical = Path(args.clinical) if args.clinical else clinical_dir()
    cases = list(sessions(Path(args.out_dir), clinical))
    rows = [evaluate(c) for c in cases]
    if args.thresholds:
        for row, case in zip(rows, cases):  # only here: finding the probability maps reads the outputs again
            probseg = written_probseg(Path(args.out_dir), case["mask"])
            row["by_threshold"] = at_thresholds({**case, "probseg": probseg}, args.thresholds)
    if not rows:
        print(f"{args.out_dir}: no lesion masks of the clinical-ms subjects", file=sys.stderr)
        return 1
    rows.sort(key=lambda r: (r["subject"], r["session"], not r["main"], r["method"]))
    print(f"{'session':<16}{'method':<10}{'ref':>6}{'lesions':>9}{'ml':>8}{'change covered':>16}{'change lesions':>16}"
          f"{'outside brain':>15}")
    for r in rows:
        method = r["method"] + ("" if r["main"] else "*")
        print(f"{r['subject'] + ' ' + r['session']:<16}{method:<10}{r['reference']:>6}{r['lesion_count'] or 0:>9}"
              f"{r['lesion_ml'] or 0:>8.1f}{r['change_covered'] if r['change_covered'] is not None else float('nan'):>16.2f}"
              f"{r['change_lesions_touched'] if r['change_lesions_touched'] is not None else float('nan'):>16.2f}"
              f"{r['outside_brain'] if r['outside_brain'] is not None else float('nan'):>15.3f}")
    if not all(r["main"] for r in rows):
        print("* not the main lesion answer (desc-lesion<desc> / desc-<method> mask)")
    if args.thresholds:
        print("\nper threshold: lesion ml / change covered")
        print(f"{'session':<16}{'method':<10}" + "".join(f"{t:>14g}" for t in args.thresholds))
        nan = float("nan")
        for r in rows:
            cells = "".join(f"{c['lesion_ml']:>7.1f} / "
                            f"{nan if c['change_covered'] is None else c['change_covered']:.2f}"
                            for c in r["by_threshold"])
            print(f"{r['subject'] + ' ' + r['session']:<16}{r['method'] + ('' if r['main'] else '*'):<10}{cells}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"out_dir": str(args.out_dir), "sessions": rows}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
