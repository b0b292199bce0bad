"""Brain-volume change on real heads with a known answer: pseudo-rescans and injected atrophy.

The simulated benchmark (``change.py``) knows the truth because it made the brain. A real scan has no
truth of its own, so this one makes two from each real T1w of ``clinical-ms`` (2D clinical slices, skull,
no sidecars) and from the real 1 mm heads of package registries (Colin 27 and BrainBrowser's two scans
of one head; ``--no-registry`` leaves them out) and runs ``scanbridge participant`` on them as a user would:

``ses-1``  the real scan, re-imaged: the head moved by a random rigid transform (up to 3 degrees and
           3 mm, so the slices cut it elsewhere), resampled onto the scanner's grid and given new Rician
           noise;
``ses-2``  a pseudo-rescan: the real scan re-imaged again, with another move and other noise. True change
           from ses-1: zero. (Every session is re-imaged once, as every real session is acquired once: a
           session left untouched would be the only one never interpolated, sharper and less noisy than
           the others, a difference no real rescan has);
``ses-3``  injected atrophy, then re-imaged like ses-2: the brain (the parenchyma and what it encloses,
           with 1 mm around it) is shrunk towards its centre by a factor ``s`` per axis; the shrink fades
           to none over the next 4 mm, in the CSF around the brain, so the dura and the skull stay
           where they are and CSF takes up the space. Every tissue volume of the brain is then ``s**3``
           of the original, exactly (a uniform scaling; real atrophy has a pattern, and enlarges the
           ventricles, which this shrinks with the rest).

Pairs compared with the truth: ses-1 -> ses-2 (rescan, true change 0), ses-2 -> ses-3 and ses-1 -> ses-3
(the injected loss, 1-3 % of the brain). Printed per head and as medians: brain change error of the
rescans (target <= 0.5 percentage points) and measured / true of the injected loss (target 0.85-1.15),
each beside the difference of the sessions' own tissue volumes (two cross-sectional runs). The
region that is shrunk is where the app's tissue network calls the ses-1 scan GM or WM (holes filled):
the truth does not depend on that segmentation's accuracy, only on the brain lying inside the region
and its 1 mm margin. (Shrinking everything within 5 mm of the brain mask instead moved the dura and
the inner skull with the brain, and tissue-bright layers entered the mask: no tool reads that as
brain loss, nor should one.)

    python benchmarks/longitudinal/real_heads.py --work /tmp/real-heads
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from bidsapp.devdata import clinical_dir, registry_t1w, run_participant
from bidsapp.physics.atrophy import centre_mm, sample_world, warp_atrophy, world_grid

ROOT = Path(__file__).resolve().parents[2]
MEASURES = ("brain", "GM", "WM")
LOSS_PERCENT = (1.0, 2.0, 3.0, 1.5)
"""Injected brain-volume loss per source head, in turn (the issue's 0.5-3 % range, where a ratio is
still readable next to a rescan's error)."""
MAX_DEG, MAX_MM = 3.0, 3.0
NOISE = 0.02
"""Rician noise of each re-imaged session: sigma as a fraction of the brain's median intensity."""


# ------------------------------------------------------------------------------------ the transforms
def rigid(rng: np.random.Generator, centre: np.ndarray) -> np.ndarray:
    """A random rigid transform (4x4, world mm) about ``centre`` (mm): up to :data:`MAX_DEG` about each
    axis and :data:`MAX_MM` along it."""
    from scipy.spatial.transform import Rotation

    r = Rotation.from_euler("xyz", rng.uniform(-MAX_DEG, MAX_DEG, 3), degrees=True).as_matrix()
    out = np.eye(4)
    out[:3, :3] = r
    out[:3, 3] = centre - r @ centre + rng.uniform(-MAX_MM, MAX_MM, 3)
    return out


def reimage(data: np.ndarray, affine: np.ndarray, brain: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The head moved by :func:`rigid` and scanned again on the same grid, with new Rician noise."""
    from bidsapp.physics.simulator import add_rician_noise

    inv = np.linalg.inv(rigid(rng, centre_mm(brain, affine)))
    world = world_grid(data.shape, affine)
    moved = np.maximum(sample_world(data, affine, inv[:3, :3] @ world + inv[:3, 3:4]).reshape(data.shape), 0.0)
    return add_rician_noise(moved, NOISE * float(np.median(data[np.asarray(brain, bool)])), rng)


# ------------------------------------------------------------------------------------ the dataset
def brain_region(img) -> np.ndarray:
    """Where the app's brain mask and tissue network put the parenchyma of a head image (GM + WM
    probability above 0.5, holes filled: the ventricles are inside), on the image's own grid."""
    from scipy import ndimage as ndi

    from bidsapp.labels import TISSUE
    from bidsapp.models.brainmask import extract
    from bidsapp.models.tissue import from_ras, ras_zooms, segment, to_ras

    mask = extract(img).mask
    data = np.asarray(img.get_fdata(dtype=np.float32))
    ras, ornt = to_ras(data, img.affine)
    res = segment(ras, to_ras(mask, img.affine)[0], ras_zooms(img.header.get_zooms(), ornt), device="cpu")
    gm, wm = (res.probs[TISSUE.names.index(c)] for c in ("GM", "WM"))
    parenchyma = from_ras(gm + wm, ornt) > 0.5
    lab, n = ndi.label(parenchyma)
    if n > 1:
        parenchyma = lab == 1 + int(np.argmax(np.bincount(lab.ravel())[1:]))
    return ndi.binary_fill_holes(parenchyma)


def sources(clinical: Path, registry: bool = True) -> list[tuple[str, Path]]:
    """(subject label, real T1w): clinical-ms's T1w (sub-ms19 ses-2: ms19s2) and, when ``registry``
    the registries' real 1 mm heads that can be fetched (:func:`bidsapp.devdata.registry_t1w`)."""
    out = [(f"{f.name.split('_')[0][4:]}s{f.name.split('_')[1][4:]}", f)
           for f in sorted(clinical.glob("bids/sub-*/ses-*/anat/sub-*_ses-*_T1w.nii.gz"))]
    return out + (registry_t1w(lambda line: print(line, file=sys.stderr)) if registry else [])


def make_dataset(out: Path, files: list[tuple[str, Path]], seed: int) -> pd.DataFrame:
    """One subject per source scan, three sessions (module docstring); the truth table it returns is
    also written to ``out/derivatives/truth/injected.tsv``."""
    import nibabel as nib

    truth_file = out / "derivatives" / "truth" / "injected.tsv"
    if truth_file.is_file():
        return pd.read_csv(truth_file, sep="\t")
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset_description.json").write_text(json.dumps(
        {"Name": "real heads: pseudo-rescans and injected atrophy", "BIDSVersion": "1.9.0",
         "DatasetType": "raw", "GeneratedBy": [{"Name": "benchmarks/longitudinal/real_heads.py"}]}, indent=1))
    rows = []
    for n, (label, src) in enumerate(files):
        img = nib.load(str(src))
        data = np.asarray(img.get_fdata(dtype=np.float32))
        brain = brain_region(img)
        loss = LOSS_PERCENT[n % len(LOSS_PERCENT)]
        rng = np.random.default_rng([seed, n])
        sessions = {"1": reimage(data, img.affine, brain, rng), "2": reimage(data, img.affine, brain, rng),
                    "3": reimage(warp_atrophy(data, img.affine, brain, loss), img.affine, brain, rng)}
        sub = f"sub-{label}"
        for ses, arr in sessions.items():
            d = out / sub / f"ses-{ses}" / "anat"
            if (d / f"{sub}_ses-{ses}_T1w.nii.gz").is_file():  # kept: the run's cached steps stay valid
                continue
            d.mkdir(parents=True, exist_ok=True)
            hdr = img.header.copy()
            hdr.set_data_dtype(np.uint16)
            clipped = np.clip(np.rint(arr), 0, np.iinfo(np.uint16).max).astype(np.uint16)
            nib.save(nib.Nifti1Image(clipped, img.affine, hdr), d / f"{sub}_ses-{ses}_T1w.nii.gz")
        rows.append({"participant_id": sub, "source": src.name, "loss_percent": loss})
    (out / "participants.tsv").write_text("participant_id\n" + "".join(f"{r['participant_id']}\n" for r in rows))
    truth = pd.DataFrame(rows)
    truth_file.parent.mkdir(parents=True, exist_ok=True)
    truth.to_csv(truth_file, sep="\t", index=False)
    return truth


def true_change(loss_percent: float, ses_from: str, ses_to: str) -> float:
    """Percent change of every brain volume between two sessions (ses-3 is the shrunk one)."""
    lost = {"ses-1": False, "ses-2": False, "ses-3": True}
    if lost[ses_from] == lost[ses_to]:
        return 0.0
    return -loss_percent if lost[ses_to] else 100.0 * (1.0 / (1.0 - loss_percent / 100.0) - 1.0)


# ------------------------------------------------------------------------------------ run and compare
def _tissue_volume(out: Path, sub: str, ses: str, measure: str) -> float:
    t = pd.read_csv(out / sub / ses / "anat" / f"{sub}_{ses}_desc-volumes_morph.tsv", sep="\t")
    main = t[t.method == t.method.iloc[0]].set_index("label").volume_mm3
    return float(main.get("GM", np.nan) + main.get("WM", np.nan)) if measure == "brain" else float(
        main.get(measure, np.nan))


def _decline(out: Path, sub: str) -> dict:
    """The decline classifier's (probability, call) per consecutive pair ("ses-1>ses-2"), if it ran."""
    path = out / sub / "anat" / f"{sub}_desc-decline_stats.tsv"
    if not path.is_file():
        return {}
    t = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)
    return {f"{r.ses_from}>{r.ses_to}": (float(r.probability_decline), r.call) for r in t.itertuples()}


def compare(out: Path, truth: pd.DataFrame) -> pd.DataFrame:
    rows = []
    loss = truth.set_index("participant_id").loss_percent
    for sub in loss.index:
        path = out / sub / "anat" / f"{sub}_desc-change_morph.tsv"
        if not path.is_file():
            print(f"{sub}: no change table ({path})", file=sys.stderr)
            continue
        table = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)
        decline = _decline(out, sub)
        for _, r in table[table.measure.isin(MEASURES)].iterrows():
            v0, v1 = (_tissue_volume(out, sub, s, r.measure) for s in (r.ses_from, r.ses_to))
            pair = f"{r.ses_from}>{r.ses_to}"
            p_decline, call = decline.get(pair, (np.nan, None))
            rows.append({"participant_id": sub, "measure": r.measure, "pair": pair,
                         "kind": "rescan" if r.ses_to == "ses-2" else "atrophy",
                         "true": true_change(loss[sub], r.ses_from, r.ses_to), "measured": r.percent_change,
                         "raw": r.percent_change_raw, "cross_sectional": 100.0 * (v1 / v0 - 1.0),
                         "probability_decline": p_decline, "decline_call": call})
    return pd.DataFrame(rows)


def summarise(df: pd.DataFrame) -> list[dict]:
    """Medians per kind of pair and measure; the decline classifier's median probability and how many
    pairs it called decline, where it read the pair."""
    out = []
    for (kind, measure), d in df.groupby(["kind", "measure"]):
        row = {"kind": kind, "measure": measure, "pairs": len(d)}
        for col in ("measured", "raw", "cross_sectional"):
            if kind == "rescan":
                row[f"median_abs_error_{col}"] = float(np.nanmedian(np.abs(d[col] - d.true)))
            else:
                row[f"median_ratio_{col}"] = float(np.nanmedian(d[col] / d.true))
        read = d[d.probability_decline.notna()]
        if measure == "brain" and len(read):
            row.update(decline_pairs=len(read), decline_median_probability=float(read.probability_decline.median()),
                       decline_called=int((read.decline_call == "decline").sum()))
        out.append(row)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clinical", type=Path, default=None, help="the clinical-ms folder (default: from $SCANBRIDGE_DATA_DIR)")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "real-heads-work")
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--no-registry", action="store_true", help="leave out the registries' heads (clinical-ms's only)")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "longitudinal_real_heads.json")
    args = ap.parse_args(argv)
    clinical = args.clinical or clinical_dir()
    files = sources(clinical, registry=not args.no_registry)
    if not files:
        print(f"{clinical}: no real T1w scans found (bids/sub-*/ses-*/anat/*_T1w.nii.gz)", file=sys.stderr)
        return 2
    bids, out = args.work / "bids", args.work / "out"
    truth = make_dataset(bids, files, args.seed)
    seconds = run_participant(bids, out, args.work / "work", args.nprocs)
    df = compare(out, truth)
    summary = summarise(df)
    with pd.option_context("display.width", 200, "display.float_format", "{:.2f}".format):
        print(df.to_string(index=False))
        print()
        print(pd.DataFrame(summary).to_string(index=False))
    print(f"participant and subject levels: {seconds:.0f} s for {3 * len(truth)} sessions")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "pairs": df.to_dict(orient="records"),
                                    "truth": truth.to_dict(orient="records"), "seconds": seconds,
                                    "seed": args.seed}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
