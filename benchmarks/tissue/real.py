"""Tissue volumes on real T1w scans: the U-Net beside Atropos and SAMSEG, on one brain mask.

Simulated benchmarks cannot show whether a network trained on simulated heads reads real contrast;
this one can. For every real T1w (default: every T1w of ``clinical-ms``, real clinical 2D scans with
skull and no sidecars; Colin 27, a real 1 mm head with skull fetched from Debian's archive; and two
real 1 mm scans of one head from BrainBrowser's npm package, fetched by :func:`bidsapp.devdata.registry_t1w`;
``--images`` names others instead), it runs the participant
level's steps as a user gets them (N4, the learned brain mask, N4 inside it) and then, on that one mask:

* ``unet``: the tissue U-Net the app uses without a sidecar (or ``--weights-dir``'s, to compare a
  candidate before shipping it), refined by the image's intensities as the app does
  (:mod:`bidsapp.models.intensity_refine`); ``unet-network``, its probabilities before that step;
* ``atropos``: prior-free three-class Atropos (k-means start, MRF 0.1), the classical reference;
* ``samseg``: FreeSurfer's SAMSEG (contrast-adaptive Bayesian segmentation; ``--samseg`` names its
  ``run_samseg``, installed from the ``samseg`` wheel in a separate environment; a benchmark-only peer),
  its labels mapped to CSF/GM/WM as the simulator maps FreeSurfer labels
  (:data:`bidsapp.physics.phantom.LABEL_CLASSES`) and counted inside the same brain mask.

The U-Net rows are the app's own volumes, as its volumes table gives them (``unet``: the refined
fractions summed inside the mask; ``unet-network``: the network's probabilities summed, as the app reads
voxels finer than the network's 2 mm without the refinement), in both tables; Atropos and SAMSEG count
their labels.

It prints GM, WM, CSF (ml), the GM/WM ratio (adults: about 1.1-1.6) and each method's GM and WM
difference from SAMSEG's, first inside the app's brain mask and then where SAMSEG labels tissue inside
it (SAMSEG calls part of the mask's rim neither: dura, vessels, skull; counted there, that rim would
read as the app's CSF and GM excess); writes ``real.json`` and one overlay per scan (``<name>_tissue.png``: the
three segmentations over the image) under ``--out``. SAMSEG's results are cached in ``--out``, so a
rerun with new U-Net weights takes seconds per scan.

    python3 -m venv samseg-env && samseg-env/bin/pip install samseg     # once; its own environment
    python benchmarks/tissue/real.py --samseg samseg-env/bin/run_samseg
    python benchmarks/tissue/real.py --weights-dir RUN/weights --tag candidate
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TISSUE_OF_CLASS = {"CSF": "CSF", "ventricles": "CSF", "GM": "GM", "deep_GM": "GM", "WM": "WM"}
"""Simulator tissue class -> label of :data:`bidsapp.labels.TISSUE`."""


def default_images() -> list[Path]:
    """clinical-ms's T1w and the real 1 mm heads of package registries (Colin 27 and BrainBrowser's two
    scans of one head, those that can be fetched)."""
    from bidsapp.devdata import clinical_dir, registry_t1w

    bids = Path(clinical_dir()) / "bids"
    images = sorted(bids.glob("sub-*/ses-*/anat/*_T1w.nii.gz")) if bids.is_dir() else []
    return images + [path for _, path in registry_t1w()]


def freesurfer_to_tissue(seg: np.ndarray) -> np.ndarray:
    """FreeSurfer labels -> 1 CSF / 2 GM / 3 WM (0 elsewhere), by the simulator's label classes."""
    from bidsapp.labels import TISSUE
    from bidsapp.physics.phantom import LABEL_CLASSES

    value = {lab.name: lab.value for lab in TISSUE}
    lut = np.zeros(int(max(seg.max(), max(LABEL_CLASSES))) + 1, np.uint8)
    for label, cls in LABEL_CLASSES.items():
        lut[label] = value.get(TISSUE_OF_CLASS.get(cls), 0)
    return lut[np.clip(seg, 0, len(lut) - 1).astype(np.int64)]


def prepare(image: Path, work: Path) -> dict:
    """The participant level's preprocessing (``workflows.anatomical.init_anat_preproc_wf``): RAS, N4 in
    the head, the learned brain mask of that image, then N4 again inside the brain (``BRAIN_N4``)."""
    import nibabel as nib

    from bidsapp.models import brainmask as BM
    from workflows.interfaces.ants import BRAIN_N4, n4_correct, reorient_to_ras

    work.mkdir(parents=True, exist_ok=True)
    ras = Path(reorient_to_ras(image, work / "ras.nii.gz"))
    head_n4 = Path(n4_correct(ras, work / "n4_head.nii.gz"))
    img = nib.load(str(head_n4))
    bm = BM.extract(img)
    mask = work / "mask.nii.gz"
    nib.save(nib.Nifti1Image(bm.mask.astype(np.uint8), img.affine), str(mask))
    n4 = Path(n4_correct(head_n4, work / "n4.nii.gz", mask_file=mask, **BRAIN_N4))
    return {"ras": ras, "mask": mask, "n4": n4, "brain_ml": bm.volume_ml}


def run_samseg(run_samseg: str, image: Path, out: Path, threads: int) -> Path | None:
    """SAMSEG's label volume for ``image`` (cached in ``out``); None when it fails."""
    seg = out / "seg.mgz"
    if seg.exists():
        return seg
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [run_samseg, "--input", str(image), "--output", str(tmp), "--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode or not (tmp / "seg.mgz").exists():
        print(f"  samseg failed on {image.name}: {(res.stderr or res.stdout).strip().splitlines()[-1:]}")
        return None
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return seg


def resample_labels(src: Path, ref) -> np.ndarray:
    """A label image (any format nibabel reads) on ``ref``'s grid, nearest neighbour, world coordinates."""
    import nibabel as nib
    from nibabel.processing import resample_from_to

    img = nib.load(str(src))
    img = nib.Nifti1Image(np.asarray(img.dataobj).astype(np.int32), img.affine)
    return np.asarray(resample_from_to(img, ref, order=0).dataobj).astype(np.int32)


def volumes(dseg: np.ndarray, mask: np.ndarray, voxel_ml: float) -> dict:
    """ml of each label inside ``mask`` (the peers' labels: Atropos, SAMSEG)."""
    from bidsapp.labels import TISSUE

    return _with_ratio({lab.name: float(((dseg == lab.value) & mask).sum()) * voxel_ml for lab in TISSUE})


def app_volumes(result, region: np.ndarray | None = None, voxel_ml: float = 0.0) -> dict:
    """ml of each tissue as the app's volumes table gives them (:attr:`TissueResult.volumes_mm3`), or
    counted the same way (:func:`bidsapp.labels.tissue_volumes_mm3`) inside ``region`` alone."""
    from bidsapp.labels import TISSUE, tissue_volumes_mm3

    mm3 = result.volumes_mm3 if region is None else tissue_volumes_mm3(
        result.probs, region, voxel_ml * 1000.0, fractions=result.volumes_summed)
    return _with_ratio({name: mm3[name] / 1000.0 for name in TISSUE.names})


def against_samseg(table: dict) -> None:
    """Add each method's GM and WM difference (%) from SAMSEG's row of the same ``table``."""
    s = table["samseg"]
    for v in table.values():
        v["GM_vs_samseg_pct"] = 100.0 * (v["GM"] / s["GM"] - 1.0)
        v["WM_vs_samseg_pct"] = 100.0 * (v["WM"] / s["WM"] - 1.0)


def _with_ratio(out: dict) -> dict:
    out["GM/WM"] = out["GM"] / out["WM"] if out["WM"] else float("nan")
    return out


def evaluate(image: Path, args) -> dict:
    import nibabel as nib

    from bidsapp.models.tissue import segment
    from workflows.interfaces.ants import kmeans_dseg

    name = image.name.split("_T1w")[0]
    work = Path(args.out) / name
    prep = prepare(image, work)
    ref = nib.load(str(prep["n4"]))
    img = np.asarray(ref.dataobj, np.float32)
    mask = np.asarray(nib.load(str(prep["mask"])).dataobj) > 0
    zooms = ref.header.get_zooms()[:3]
    vox_ml = float(np.prod(zooms)) / 1000.0
    segs, seconds = {}, {}
    t0 = time.perf_counter()
    res = segment(img, mask, zooms, None, use_physics=False, weights_dir=args.weights_dir, device="cpu")
    segs["unet"], seconds["unet"] = res.dseg, time.perf_counter() - t0
    t0 = time.perf_counter()
    raw = segment(img, mask, zooms, None, use_physics=False, weights_dir=args.weights_dir, device="cpu", refine=False)
    segs["unet-network"], seconds["unet-network"] = raw.dseg, time.perf_counter() - t0
    t0 = time.perf_counter()
    hi = np.percentile(img[mask], 99.5)
    segs["atropos"] = kmeans_dseg(np.clip(img, 0, hi) / hi, mask, zooms)
    seconds["atropos"] = time.perf_counter() - t0
    if args.samseg or (work / "samseg" / "seg.mgz").exists():  # a cached result needs no SAMSEG installed
        seg = run_samseg(args.samseg, prep["ras"], work / "samseg", args.threads)
        if seg is not None:
            segs["samseg"] = freesurfer_to_tissue(resample_labels(seg, ref))
    row = {"image": str(image), "name": name, "brain_ml": prep["brain_ml"], "seconds": seconds,
           "zooms": [round(float(z), 2) for z in zooms],
           "volumes": {"unet": app_volumes(res), "unet-network": app_volumes(raw),
                       **{m: volumes(d, mask, vox_ml) for m, d in segs.items() if m in ("atropos", "samseg")}}}
    if "samseg" in segs:
        labelled = mask & (segs["samseg"] > 0)
        row["samseg_unlabelled_ml"] = float((mask & ~labelled).sum()) * vox_ml
        row["where_samseg_labels"] = {
            "unet": app_volumes(res, labelled, vox_ml), "unet-network": app_volumes(raw, labelled, vox_ml),
            **{m: volumes(d, labelled, vox_ml) for m, d in segs.items() if m in ("atropos", "samseg")}}
        for table in (row["volumes"], row["where_samseg_labels"]):
            against_samseg(table)
    row["figure"] = str(figure(prep, ref.affine, segs, Path(args.out) / f"{name}_{args.tag}_tissue.png", name))
    return row


def figure(prep: dict, affine, segs: dict, path: Path, title: str) -> Path:
    """One mosaic per method (axial and coronal), stacked: the segmentations side by side for a reader."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    from bidsapp.reports.figures import figure_to_rgba, segmentation_figure

    panels = []
    for method, dseg in segs.items():
        fig = segmentation_figure(prep["n4"], nib.Nifti1Image(dseg.astype(np.uint8), affine), prep["mask"],
                                  n_slices=5, planes=("axial", "coronal"), title=f"{title}: {method}")
        panels.append(figure_to_rgba(fig))
        plt.close(fig)
    width = max(p.shape[1] for p in panels)
    rows = [np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0))) for p in panels]
    plt.imsave(str(path), np.concatenate(rows, axis=0))
    return path


def print_table(rows: list[dict], key: str, title: str) -> None:
    """One line per scan and method of ``row[key]``: ml, GM/WM and the difference from SAMSEG."""
    methods = [m for m in ("unet", "unet-network", "atropos", "samseg") if any(m in r.get(key, {}) for r in rows)]
    width = max([16] + [len(r["name"]) + 2 for r in rows])
    print(f"\nGM / WM / CSF {title}")
    print(f"{'scan':<{width}}{'method':<13}{'GM ml':>8}{'WM ml':>8}{'CSF ml':>8}{'GM/WM':>7}{'GM vs S':>9}{'WM vs S':>9}")
    for r in rows:
        for m in methods:
            v = r.get(key, {}).get(m)
            if v is None:
                continue
            gs = f"{v['GM_vs_samseg_pct']:+8.1f}%" if "GM_vs_samseg_pct" in v else f"{'':>9}"
            ws = f"{v['WM_vs_samseg_pct']:+8.1f}%" if "WM_vs_samseg_pct" in v else f"{'':>9}"
            print(f"{r['name']:<{width}}{m:<13}{v['GM']:8.0f}{v['WM']:8.0f}{v['CSF']:8.0f}{v['GM/WM']:7.2f}{gs}{ws}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", nargs="*", default=None, help="real T1w files (default: clinical-ms's T1w and the registries' 1 mm heads)")
    p.add_argument("--samseg", default=None, help="path of SAMSEG's run_samseg (a separate environment)")
    p.add_argument("--weights-dir", default=None, help="tissue weights to test instead of the shipped ones")
    p.add_argument("--tag", default="shipped", help="name of this run's figures and JSON entry")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tissue_real"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    from workflows.interfaces.ants import use_threads

    use_threads(args.threads, seed=0)
    images = [Path(i) for i in args.images] if args.images else default_images()
    if not images:
        print("no real T1w found: give --images or set SCANBRIDGE_DATA_DIR")
        return 1
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = []
    for image in images:
        print(f"{image.name} ...", flush=True)
        rows.append(evaluate(image, args))
    print_table(rows, "volumes", "inside the app's brain mask")
    if any("where_samseg_labels" in r for r in rows):
        print_table(rows, "where_samseg_labels", "where SAMSEG labels tissue inside that mask "
                    "(SAMSEG leaves " + ", ".join(f"{r['samseg_unlabelled_ml']:.0f}" for r in rows
                                                  if "samseg_unlabelled_ml" in r) + " ml of it unlabelled)")
    out = Path(args.out) / "real.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    results[args.tag] = rows
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
