"""Tissue volumes on simulated 1 mm full heads, against the truth inside the app's own brain mask.

``run.py`` segments brains simulated voxel by voxel from the label maps, where no voxel is a mixture of
tissues. A user's scan is a head: scalp, skull and neck around the brain, and at every tissue border
voxels that hold some of each. Here the simulator makes such heads (tissue fractions, each voxel the
magnitude of its tissues' summed signed signals, so that in an MPRAGE whose CSF signal is negative a
CSF/GM border is darker than either; bias, noise) from the label maps the tissue networks never saw,
two sessions per subject on different scanners or protocols, and each T1w goes through the participant
level's steps (RAS, N4, the learned brain mask, N4 inside it) and the tissue model with its sidecar, as
the app runs it. The truth is the simulator's tissue fractions resampled onto the image and summed
inside the same mask, so the brain mask's own error is left out; the mask's share of the true brain is
printed beside it.

``--slices K`` averages each 1 mm head (and its truth) into K mm axial slices first, the slice
profile of a 2D clinical acquisition as a box, as ``run.py --slices`` does for brains. ``--psf FWHM``
blurs every simulated image by a Gaussian point-spread function (in-plane voxels), as a scanner does; without it
each voxel is exactly its box average of the head, with edges sharper than any scanner's.

Printed: per session the protocol, the model that ran, GM / WM / CSF error (%) of the app's volumes
(summed refined probabilities) and of the network alone, and per subject the GM and WM difference
between its two sessions (the truth's is zero). Writes ``benchmarks/results/tissue_full_heads.json``.

    python benchmarks/tissue/full_heads.py --subjects 4 --work /tmp/full-heads
    python benchmarks/tissue/full_heads.py --subjects 4 --work /tmp/full-heads --slices 3
    python benchmarks/tissue/full_heads.py --subjects 4 --work /tmp/full-heads-psf --psf 1.2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))


def simulate(out: Path, subjects: int, seed: int, psf_fwhm: float = 0.0) -> None:
    """Two sessions a day apart per subject, the second on another scanner or protocol, from the label
    maps the tissue networks never saw (``anat-10..12`` in turn, each subject randomly deformed)."""
    from bidsapp.devdata import HELDOUT_ANATOMIES, anatomy_dir
    from bidsapp.physics.dataset import DatasetConfig, write_dataset

    if (out / "dataset_description.json").exists():
        return
    held_out = out.parent / "anatomy"
    held_out.mkdir(parents=True, exist_ok=True)
    for name in HELDOUT_ANATOMIES:
        link = held_out / f"{name}_dseg.nii.gz"
        if not link.exists():
            link.symlink_to(Path(anatomy_dir()) / link.name)
    cfg = DatasetConfig(subjects=subjects, sites=min(subjects, 4), sessions=2, seed=seed, interval_years=1 / 365.25,
                        protocol_change=True, decline_fraction=0.0, anatomy_dir=str(held_out), psf_fwhm=psf_fwhm)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_dataset(out, cfg, overwrite=True)


def axial_slabs(img, k: int):
    """``img`` averaged over every ``k`` consecutive axial (S-I) slices: a 2D acquisition's thick slices."""
    import nibabel as nib

    axis = [c in "SI" for c in nib.aff2axcodes(img.affine)].index(True)
    data = np.asarray(img.dataobj, np.float32)
    n = data.shape[axis] // k * k
    data = np.take(data, range(n), axis=axis)
    shape = list(data.shape)
    shape[axis:axis + 1] = [n // k, k]
    data = data.reshape(shape).mean(axis + 1)
    step = np.eye(4)
    step[axis, axis] = k
    step[axis, 3] = (k - 1) / 2.0
    return nib.Nifti1Image(data, img.affine @ step)


def truth_in_mask(truth_maps: dict, ref, mask: np.ndarray) -> dict:
    """ml of the simulator's CSF/GM/WM fractions (``{name: image}``) inside ``mask`` (resampled onto
    ``ref``'s grid) and in all."""
    from nibabel.processing import resample_from_to

    vml = float(np.prod(ref.header.get_zooms()[:3])) / 1000.0
    out = {}
    for name, img in truth_maps.items():
        on_ref = np.asarray(resample_from_to(img, ref, order=1).dataobj, np.float64)
        out[name] = float(on_ref[mask].sum() * vml)
        out[f"{name}_all"] = float(np.asarray(img.dataobj, np.float64).sum() * np.prod(img.header.get_zooms()[:3]) / 1000)
    return out


def evaluate(t1w: Path, bids: Path, work: Path, slices: int = 1) -> dict:
    import nibabel as nib

    from bidsapp.bids.acquisition import AcquisitionRecord
    from bidsapp.labels import TISSUE
    from bidsapp.models.tissue import segment
    from real import prepare

    stem = t1w.name.split("_T1w")[0]
    sub, ses = stem.split("_")[:2]
    sidecar = json.loads(t1w.with_name(f"{stem}_T1w.json").read_text())
    acq = AcquisitionRecord.from_metadata(sidecar, suffix="T1w").to_dict()
    truth_dir = bids / "derivatives" / "truth" / sub / ses / "anat"
    truth_maps = {n: nib.load(str(truth_dir / f"{stem}_label-{n}_probseg.nii.gz")) for n in TISSUE.names}
    if slices > 1:
        (work / stem).mkdir(parents=True, exist_ok=True)
        t1w = work / stem / f"{stem}_slices{slices}_T1w.nii.gz"
        if not t1w.exists():
            nib.save(axial_slabs(nib.load(str(bids / sub / ses / "anat" / f"{stem}_T1w.nii.gz")), slices), str(t1w))
        truth_maps = {n: axial_slabs(img, slices) for n, img in truth_maps.items()}
    prep = prepare(t1w, work / stem)
    ref = nib.load(str(prep["n4"]))
    img = np.asarray(ref.dataobj, np.float32)
    mask = np.asarray(nib.load(str(prep["mask"])).dataobj) > 0
    zooms = ref.header.get_zooms()[:3]
    truth = truth_in_mask(truth_maps, ref, mask)
    res = segment(img, mask, zooms, acq, device="cpu")
    raw = segment(img, mask, zooms, acq, device="cpu", refine=False)
    row = {"session": stem, "slices_mm": slices, "protocol": sidecar.get("ProtocolName"), "method": res.method,
           "refinement": res.refinement, "truth_ml": truth,
           "mask_share_of_true_brain": (truth["GM"] + truth["WM"]) / (truth["GM_all"] + truth["WM_all"])}
    for key, r in (("app", res), ("network", raw)):
        ml = {n: r.volumes_mm3[n] / 1000.0 for n in TISSUE.names}
        row[f"{key}_ml"] = ml
        row[f"{key}_error_pct"] = {n: 100.0 * (ml[n] / truth[n] - 1.0) for n in TISSUE.names}
    return row


def between_sessions(rows: list[dict], key: str = "app") -> dict:
    """Per subject, the % difference of GM and WM between its two sessions (second over first)."""
    by_sub: dict[str, list[dict]] = {}
    for r in rows:
        by_sub.setdefault(r["session"].split("_")[0], []).append(r)
    out = {}
    for sub, rs in sorted(by_sub.items()):
        if len(rs) == 2:
            a, b = sorted(rs, key=lambda r: r["session"])
            out[sub] = {n: 100.0 * (b[f"{key}_ml"][n] / a[f"{key}_ml"][n] - 1.0) for n in ("GM", "WM")}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "tissue-full-heads"))
    ap.add_argument("--slices", type=int, default=1, help="average the heads into axial slices this many mm thick")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--psf", type=float, default=0.0, metavar="FWHM",
                    help="point-spread function of the simulated images, in-plane voxels (default 0: none)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tissue_full_heads.json"))
    args = ap.parse_args(argv)
    from workflows.interfaces.ants import use_threads

    use_threads(args.threads, seed=0)
    work = Path(args.work)
    bids = work / "bids"
    simulate(bids, args.subjects, args.seed, args.psf)
    rows = []
    for t1w in sorted(bids.glob("sub-*/ses-*/anat/*_T1w.nii.gz")):
        rows.append(evaluate(t1w, bids, work / f"prep-slices{args.slices}", args.slices))
        r = rows[-1]
        e, n = r["app_error_pct"], r["network_error_pct"]
        print(f"{r['session']:<14}{r['protocol']:<24}{r['method']:<13}"
              f"app GM {e['GM']:+6.1f} WM {e['WM']:+6.1f} CSF {e['CSF']:+6.1f} | "
              f"network GM {n['GM']:+6.1f} WM {n['WM']:+6.1f} | mask holds {100 * r['mask_share_of_true_brain']:.1f} %",
              flush=True)
    summary = {}
    for key in ("app", "network"):
        errs = np.array([[r[f"{key}_error_pct"][n] for n in ("GM", "WM")] for r in rows])
        diffs = np.array([[d[n] for n in ("GM", "WM")] for d in between_sessions(rows, key).values()])
        summary[key] = {"median_abs_error_pct": dict(zip(("GM", "WM"), np.median(np.abs(errs), 0).tolist())),
                        "largest_abs_error_pct": dict(zip(("GM", "WM"), np.abs(errs).max(0).tolist())),
                        "median_abs_between_sessions_pct": dict(zip(("GM", "WM"), np.median(np.abs(diffs), 0).tolist()))}
        s = summary[key]
        print(f"{key:<8} |error| GM/WM median {s['median_abs_error_pct']['GM']:.1f} / {s['median_abs_error_pct']['WM']:.1f}"
              f", largest {s['largest_abs_error_pct']['GM']:.1f} / {s['largest_abs_error_pct']['WM']:.1f}; "
              f"between a subject's sessions median {s['median_abs_between_sessions_pct']['GM']:.1f} / "
              f"{s['median_abs_between_sessions_pct']['WM']:.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "sessions": rows, "between_sessions": between_sessions(rows),
                                          "subjects": args.subjects, "seed": args.seed, "slices_mm": args.slices,
                                          "psf_fwhm": args.psf}, indent=1, default=float))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
