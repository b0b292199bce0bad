"""Synthesise any contrast from measured quantitative maps (R1map/T1map, R2starmap, PDmap).

This is the physics-informed paper's own set-up (section 3.2: R1, R2* and PD from multi-parameter
mapping): the static equations are applied voxel by voxel to the measured maps, so partial volume is
whatever the maps measured.  Spin-echo sequences need T2, which multi-parameter mapping does not give:
a ``T2map`` is used when the dataset has one, otherwise T2 is interpolated from R1 along the
literature CSF-GM-WM relation at the protocol's field strength (an approximation stated in the
result's ``notes``).  PD maps are in arbitrary units; they are scaled so that white matter (R1 within
0.1 1/s of the 3T WM reference) has PD 0.70.

Maps are found by BIDS file name, ``sub-<label>[/ses-<label>]/anat/*_<suffix>.nii[.gz]`` with suffix
``R1map`` (1/s) or ``T1map`` (s), ``R2starmap`` (1/s) or ``T2starmap`` (s), ``PDmap`` and optional
``T2map`` (s); maps reported in milliseconds (T1map median > 20) are converted.

Public API
----------
``find_qmri_maps(bids_dir, subject, session=None) -> dict[str, Path]``  suffix -> file.
``load_qmri_maps(bids_dir, subject, session=None) -> QMRIMaps``
``QMRIMaps(pd, r1, r2s, t2, affine, notes)``  arrays in s / 1/s, float32; ``brain_mask()`` (R1 > 0 and PD > 0).
``synthesize(maps, protocol, rng, *, bias=True, noise=True) -> nib.Nifti1Image``  image on the maps' grid.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from ..labels import TISSUE
from . import equations
from .protocols import Protocol
from .simulator import add_rician_noise, random_bias_field
from .tissues import GOLD_STANDARD_R1, properties

_SUFFIXES = ("R1map", "T1map", "R2starmap", "T2starmap", "PDmap", "T2map")


def find_qmri_maps(bids_dir, subject: str, session: str | None = None) -> dict[str, Path]:
    sub = subject if subject.startswith("sub-") else f"sub-{subject}"
    anat = Path(bids_dir) / sub
    if session:
        anat = anat / (session if session.startswith("ses-") else f"ses-{session}")
    anat = anat / "anat"
    found = {}
    if anat.is_dir():
        for f in sorted(anat.iterdir()):
            m = re.match(r".*_([A-Za-z0-9]+)\.nii(\.gz)?$", f.name)
            if m and m.group(1) in _SUFFIXES and m.group(1) not in found:
                found[m.group(1)] = f
    return found


@dataclass
class QMRIMaps:
    pd: np.ndarray
    r1: np.ndarray
    r2s: np.ndarray
    t2: np.ndarray
    affine: np.ndarray
    notes: list = field(default_factory=list)

    def brain_mask(self) -> np.ndarray:
        return (self.r1 > 0) & (self.pd > 0)


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises several types for broken files
        raise ValueError(f"{path}: cannot read ({exc})") from None
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D map, got shape {data.shape}")
    return np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0), img.affine


def _rate_from(path_rate, path_time, name, notes):
    if path_rate is not None:
        return _load(path_rate)
    data, aff = _load(path_time)
    pos = data[data > 0]
    if pos.size and np.median(pos) > 20:  # milliseconds
        data = data / 1000.0
        notes.append(f"{path_time.name}: values look like milliseconds; converted to seconds")
    with np.errstate(divide="ignore"):
        return np.where(data > 0, 1.0 / np.where(data > 0, data, 1.0), 0.0).astype(np.float32), aff


def load_qmri_maps(bids_dir, subject: str, session: str | None = None) -> QMRIMaps:
    f = find_qmri_maps(bids_dir, subject, session)
    where = f"{bids_dir} sub-{subject.removeprefix('sub-')}" + (f" ses-{session.removeprefix('ses-')}" if session else "")
    if "R1map" not in f and "T1map" not in f:
        raise ValueError(f"{where}: no R1map or T1map")
    if "PDmap" not in f:
        raise ValueError(f"{where}: no PDmap")
    notes: list[str] = []
    r1, aff = _rate_from(f.get("R1map"), f.get("T1map"), "R1", notes)
    if "R2starmap" in f or "T2starmap" in f:
        r2s, _ = _rate_from(f.get("R2starmap"), f.get("T2starmap"), "R2*", notes)
    else:
        r2s = np.zeros_like(r1)
        notes.append("no R2starmap/T2starmap: no T2* decay (SPGR images as if TE -> 0)")
    pd, _ = _load(f["PDmap"])
    for name, arr in (("PDmap", pd), ("R2star", r2s)):
        if arr.shape != r1.shape:
            raise ValueError(f"{where}: {name} shape {arr.shape} differs from the R1 map {r1.shape}")
    wm = np.abs(r1 - GOLD_STANDARD_R1["WM"][0]) < 0.1
    ref = float(np.median(pd[wm & (pd > 0)])) if (wm & (pd > 0)).any() else float(np.percentile(pd[pd > 0], 99))
    pd = (pd * (0.70 / ref)).astype(np.float32) if ref > 0 else pd
    t2 = None
    if "T2map" in f:
        t2, _ = _load(f["T2map"])
        if t2.shape != r1.shape:
            raise ValueError(f"{where}: T2map shape {t2.shape} differs from the R1 map {r1.shape}")
        if (t2 > 0).any() and np.median(t2[t2 > 0]) > 5:
            t2 = t2 / 1000.0
            notes.append("T2map looks like milliseconds; converted to seconds")
    return QMRIMaps(pd, r1.astype(np.float32), r2s.astype(np.float32), t2, aff, notes)


def _t2_from_r1(r1: np.ndarray, field_strength: float) -> np.ndarray:
    """T2 interpolated from R1 through the CSF, GM, WM literature points (monotone in R1)."""
    pts = sorted((properties(c, field_strength).r1, properties(c, field_strength).t2) for c in TISSUE.names)
    xs, ys = np.array([p[0] for p in pts]), np.log([p[1] for p in pts])
    return np.exp(np.interp(r1, xs, ys)).astype(np.float32)


def synthesize(maps: QMRIMaps, protocol: Protocol, rng: np.random.Generator, *, bias: bool = True,
               noise: bool = True) -> nib.Nifti1Image:
    """Simulate ``protocol`` from the maps (voxel-wise equations, receiver gain, bias, Rician noise)."""
    t2 = maps.t2
    if t2 is None and protocol.sequence in ("TSE", "FLAIR"):
        t2 = _t2_from_r1(maps.r1, protocol.field_strength)
        maps.notes.append("no T2map: T2 interpolated from R1 along the CSF-GM-WM literature relation")
    with np.errstate(divide="ignore"):
        t1 = np.where(maps.r1 > 0, 1.0 / np.where(maps.r1 > 0, maps.r1, 1.0), 0.0)
        t2s = np.where(maps.r2s > 0, 1.0 / np.where(maps.r2s > 0, maps.r2s, 1.0), 1e6)
    prm = dict(protocol.params(), gain=1.0)
    s = equations.signal(protocol.sequence, maps.pd, t1, t2 if t2 is not None else t1, t2s, prm).astype(np.float32)
    mask = maps.brain_mask()
    ref = float(np.percentile(s[mask], 99)) if mask.any() else float(s.max() or 1.0)
    img = s * np.float32(protocol.gain / ref if ref > 0 else 1.0)
    vs = tuple(float(v) for v in np.linalg.norm(maps.affine[:3, :3], axis=0))
    if bias and protocol.bias > 0:
        img = img * random_bias_field(img.shape, rng, protocol.bias, vs)
    if noise:
        sigma = float(img[mask].mean()) / protocol.snr if mask.any() else 0.0
        img = add_rician_noise(img, sigma, rng)
    out = nib.Nifti1Image(img.astype(np.float32), maps.affine)
    out.set_qform(maps.affine, code=1)
    out.set_sform(maps.affine, code=1)
    out.header.set_xyzt_units("mm", "sec")
    return out
