"""Tiny hand-written BIDS datasets for the bids tests (8^3 images, written in tmp_path)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np

MPRAGE = {
    "Manufacturer": "Siemens",
    "ManufacturersModelName": "Prisma_fit",
    "MagneticFieldStrength": 3,
    "RepetitionTime": 2.3,
    "EchoTime": 0.00226,
    "InversionTime": 0.9,
    "FlipAngle": 8,
    "ScanningSequence": "GR_IR",
    "SequenceVariant": "SK_SP_MP",
    "InstitutionName": "Hospital A",
}
SPGR = {
    "Manufacturer": "GE MEDICAL SYSTEMS",
    "ManufacturersModelName": "DISCOVERY MR750",
    "MagneticFieldStrength": 1.5,
    "RepetitionTime": 0.0082,
    "EchoTime": 0.0032,
    "FlipAngle": 12,
    "ScanningSequence": "GR",
    "SequenceVariant": "SS_SP",
}


def image(shape=(32, 32, 32), zooms=(2.0, 2.0, 2.0), dtype=np.float32, fill=None, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.uniform(10, 100, size=shape).astype(dtype) if fill is None else np.full(shape, fill, dtype=dtype)
    img = nib.Nifti1Image(data, np.diag(list(zooms[:3]) + [1.0]))
    img.header.set_zooms(tuple(zooms) + (1.0,) * (len(shape) - len(zooms)))
    return img


def write_image(path: Path, img=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img if img is not None else image(), str(path))
    return path


def write_json(path: Path, doc) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def make_dataset(root: Path, subjects=("01", "02"), sessions=("1",), participants=None, sidecar=None) -> Path:
    """A BIDS dataset with one T1w (and its sidecar) per subject and session."""
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "dataset_description.json", {"Name": "tiny", "BIDSVersion": "1.8.0"})
    if participants is None:
        participants = [{"participant_id": f"sub-{s}", "site": "A", "age": 30 + i, "sex": "F"} for i, s in enumerate(subjects)]
    if participants:
        cols = list(participants[0])
        lines = ["\t".join(cols)] + ["\t".join(str(r.get(c, "n/a")) for c in cols) for r in participants]
        (root / "participants.tsv").write_text("\n".join(lines) + "\n")
    for s in subjects:
        for ses in sessions or (None,):
            anat = root / f"sub-{s}" / (f"ses-{ses}" if ses else "") / "anat"
            stem = f"sub-{s}" + (f"_ses-{ses}" if ses else "") + "_T1w"
            write_image(anat / f"{stem}.nii.gz")
            write_json(anat / f"{stem}.json", MPRAGE if sidecar is None else sidecar)
    return root


def tree_digest(root: Path) -> str:
    """Hash of every path, size, mode and content under root (to prove it was not written)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        h.update(str(p.relative_to(root)).encode())
        h.update(f"{st.st_mode}:{st.st_size}:{st.st_mtime_ns}".encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()
