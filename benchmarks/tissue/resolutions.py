"""One real head at several acquisition resolutions: do the app's tissue volumes stay the same brain's?

A multi-site study mixes 1 mm research scans with thick-slice clinical ones, and the same brain should
read the same whatever the voxel. This takes Colin 27 (a real 1 mm head with skull, fetched from
Debian's archive by :func:`bidsapp.devdata.registry_head`; ``--image`` names another 1 mm T1w) and makes
from it the images a coarser acquisition would have given, each voxel the mean of the 1 mm voxels it
covers (:func:`coarsen`: a thick slice averages what it spans): 1 x 1 x 3, 4 and 5 mm axial slices,
2 x 1 x 1 mm sagittal ones, 1.5 and 2 mm isotropic, and a finer 0.7 mm grid. Every image is a subject
of its own (so that no subject level runs), run through ``scanbridge participant`` as a user would (no sidecars; no Atropos
baseline), and the volumes tables are printed side by side: GM, WM, CSF and brain (ml), GM/WM, each
one's difference from the 1 mm image's, and how the volumes were read: the intensity refinement's
fractions summed (it runs when a voxel is at most half the tissue model's in volume,
:data:`bidsapp.models.tissue.REFINE_BELOW`), the network's probabilities summed (voxels finer than the
model's without it), or its labels counted (:func:`bidsapp.models.tissue.volumes_from_fractions`).

    python benchmarks/tissue/resolutions.py --work /tmp/resolutions
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

RESOLUTIONS = {"1mm": (1, 1, 1), "sag2x1x1": (2, 1, 1), "ax1x1x3": (1, 1, 3), "ax1x1x4": (1, 1, 4),
               "ax1x1x5": (1, 1, 5), "iso1.5": (1.5, 1.5, 1.5), "iso2": (2, 2, 2), "iso0.7": (0.7, 0.7, 0.7)}
"""Subject label -> voxel size (mm, RAS axes) of the acquisition. The 0.7 mm grid (as HCP-style
protocols have) is the 1 mm head interpolated, not a finer scan: it checks that a 21-million-voxel
image runs and reads the same head."""


def coarsen(img, voxel):
    """``img`` (RAS, 1 mm) as an acquisition with ``voxel`` mm voxels: whole multiples average blocks of
    voxels (thick slices); others are resampled linearly (a 1.5 or 0.7 mm grid cannot be made of whole voxels)."""
    import nibabel as nib

    img = nib.as_closest_canonical(img)
    data = np.asarray(img.dataobj, np.float32)
    zooms = np.asarray(img.header.get_zooms()[:3], float)
    k = np.asarray(voxel, float) / zooms
    if not np.allclose(k, np.round(k)):
        from nibabel.processing import resample_to_output

        return resample_to_output(img, voxel_sizes=tuple(float(v) for v in voxel), order=1)
    k = np.round(k).astype(int)
    n = np.asarray(data.shape) // k * k
    blocks = data[:n[0], :n[1], :n[2]].reshape(n[0] // k[0], k[0], n[1] // k[1], k[1], n[2] // k[2], k[2])
    step = np.diag([*k.astype(float), 1.0])
    step[:3, 3] = (k - 1) / 2.0  # a block's centre, in the 1 mm voxels it covers
    return nib.Nifti1Image(blocks.mean((1, 3, 5)).astype(np.float32), img.affine @ step)


def make_dataset(bids: Path, source: Path) -> list[str]:
    """One subject per :data:`RESOLUTIONS` entry; their labels."""
    import nibabel as nib

    bids.mkdir(parents=True, exist_ok=True)
    (bids / "dataset_description.json").write_text(json.dumps(
        {"Name": "one head at several resolutions", "BIDSVersion": "1.9.0", "DatasetType": "raw",
         "GeneratedBy": [{"Name": "benchmarks/tissue/resolutions.py"}]}, indent=1))
    subjects = [f"sub-{label.replace('.', 'p')}" for label in RESOLUTIONS]  # BIDS labels are alphanumeric
    (bids / "participants.tsv").write_text("participant_id\n" + "".join(f"{s}\n" for s in subjects))
    src = nib.load(str(source))
    for sub, voxel in zip(subjects, RESOLUTIONS.values()):
        d = bids / sub / "anat"
        f = d / f"{sub}_T1w.nii.gz"
        if not f.is_file():
            d.mkdir(parents=True, exist_ok=True)
            nib.save(coarsen(src, voxel), str(f))
    return subjects


def volumes(out: Path, sub: str) -> dict:
    """The main tissue method's volumes (ml) of one subject, and whether the refinement ran."""
    import pandas as pd

    anat = out / sub / "anat"
    t = pd.read_csv(anat / f"{sub}_desc-volumes_morph.tsv", sep="\t")
    main = t[t.method == t.method.iloc[0]].set_index("label").volume_mm3 / 1000.0
    sidecar = json.loads((anat / f"{sub}_dseg.json").read_text())
    read = ("refined fractions" if sidecar.get("IntensityRefinement") else
            "probabilities summed" if sidecar.get("VolumesFromFractions") else "labels counted")
    return {"GM": float(main["GM"]), "WM": float(main["WM"]), "CSF": float(main["CSF"]),
            "brain": float(main["brain"]), "read": read}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for the dataset, outputs and Nipype's work")
    ap.add_argument("--image", type=Path, default=None, help="a 1 mm T1w with skull (default: Colin 27)")
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tissue_resolutions.json")
    args = ap.parse_args(argv)
    from bidsapp.devdata import registry_head_or_none, run_participant

    source = args.image
    if source is None:
        head = registry_head_or_none(lambda line: print(line, file=sys.stderr))
        if head is None:
            print("error: no 1 mm head: Colin 27 could not be fetched; name one with --image", file=sys.stderr)
            return 2
        source = head["T1w"]
    subjects = make_dataset(args.work / "bids", source)
    seconds = run_participant(args.work / "bids", args.work / "out", args.work / "work", args.nprocs,
                              "--segmentation", "unet-physics", "--lesion-methods", "lesion")
    rows = {label: volumes(args.work / "out", sub) for label, sub in zip(RESOLUTIONS, subjects)}
    first = rows[next(iter(RESOLUTIONS))]
    print(f"{'voxels':<14} {'GM':>7} {'WM':>7} {'CSF':>7} {'brain':>7} {'GM/WM':>6} {'GM %':>7} {'WM %':>7} {'brain %':>8}  volumes")
    for label, r in rows.items():
        r["GM_WM"] = r["GM"] / r["WM"]
        for k in ("GM", "WM", "brain"):
            r[f"{k}_vs_first_pct"] = 100.0 * (r[k] / first[k] - 1.0)
        print(f"{label:<14} {r['GM']:>7.0f} {r['WM']:>7.0f} {r['CSF']:>7.0f} {r['brain']:>7.0f} {r['GM_WM']:>6.2f} "
              f"{r['GM_vs_first_pct']:>+7.1f} {r['WM_vs_first_pct']:>+7.1f} {r['brain_vs_first_pct']:>+8.1f}  "
              f"{r['read']}")
    print(f"participant level: {seconds:.0f} s for {len(subjects)} images")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"source": str(source), "images": rows, "seconds": seconds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
