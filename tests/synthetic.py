"""Synthetic test data shared by several test modules (helpers; fixtures live in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

RES = 3.0


def _tilt(affine, degrees, shift):
    """World-space rotation about the left-right axis plus a translation, applied to ``affine``."""
    a = np.deg2rad(degrees)
    rot = np.eye(4)
    rot[1:3, 1:3] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    rot[:3, 3] = shift
    return rot @ affine


def make_session(root: Path, *, flair: bool = True, seed: int = 3) -> dict:
    """A one-session BIDS dataset (T1w MPRAGE, optional FLAIR) of a deformed ICBM152 phantom.

    Returns paths of the images and of their truth (brain mask, dseg) on the same grids.
    """
    from bidsapp.physics.phantom import from_icbm152, make_subject
    from bidsapp.physics.protocols import get_protocol
    from bidsapp.physics.simulator import simulate

    rng = np.random.default_rng(seed)
    ph = make_subject(from_icbm152(resolution=2), rng, resolution=RES)
    anat = root / "bids" / "sub-01" / "ses-1" / "anat"
    truth = root / "truth"
    anat.mkdir(parents=True)
    truth.mkdir(parents=True)
    (root / "bids" / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.9.0"}))
    out = {"bids": root / "bids"}
    images = [("T1w", "siemens-3T-mprage", 8.0, (3.0, -6.0, 4.0))]
    if flair:
        images.append(("FLAIR", "siemens-3T-flair", -6.0, (-4.0, 5.0, -3.0)))
    for suffix, proto, tilt, shift in images:
        sim = simulate(ph, get_protocol(proto), rng, voxel_size=RES, orientation="LIA")
        aff = _tilt(sim.image.affine, tilt, shift)
        path = anat / f"sub-01_ses-1_{suffix}.nii.gz"
        nib.save(nib.Nifti1Image(sim.image.get_fdata().astype(np.float32), aff), path)
        (anat / f"sub-01_ses-1_{suffix}.json").write_text(json.dumps(sim.sidecar()))
        nib.save(nib.Nifti1Image(sim.truth.brain_mask.astype(np.uint8), aff), truth / f"{suffix}_mask.nii.gz")
        nib.save(nib.Nifti1Image(sim.truth.dseg(), aff), truth / f"{suffix}_dseg.nii.gz")
        out[suffix] = path
        out[f"{suffix}_mask"] = truth / f"{suffix}_mask.nii.gz"
        out[f"{suffix}_dseg"] = truth / f"{suffix}_dseg.nii.gz"
    return out


def ras_array(path) -> np.ndarray:
    return np.asarray(nib.as_closest_canonical(nib.load(str(path))).dataobj)


def tiny_tissue_subject(n=24, seed=0):
    """Concentric WM / GM / CSF shells at 2 mm, with the physics engine's property variation
    (a :class:`bidsapp.training.tissue.Subject`)."""
    from bidsapp.training import tissue_data as D
    from bidsapp.physics.phantom import Phantom
    from bidsapp.physics.tissues import sample_multipliers

    rng = np.random.default_rng(seed)
    g = np.linspace(-1, 1, n)
    r = np.sqrt(sum(a ** 2 for a in np.meshgrid(g, g, g, indexing="ij")))
    r = r * (1 + 0.08 * rng.standard_normal())
    wm = np.clip((0.45 - r) / 0.08 + 0.5, 0, 1)
    gm = np.clip((0.7 - r) / 0.08 + 0.5, 0, 1) - wm
    csf = np.clip((0.85 - r) / 0.08 + 0.5, 0, 1) - wm - gm
    classes = ("background", "CSF", "GM", "WM")
    frac = np.stack([1 - wm - gm - csf, csf, gm, wm]).astype(np.float32)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    ph = Phantom(frac, aff, classes, sample_multipliers(classes, rng))
    return D.Subject(name="tiny", fractions=frac.astype(np.float16), classes=classes, multipliers=ph.multipliers,
                     mask=ph.brain_mask, target=D.gold_standard(ph).astype(np.float16), affine=aff)
