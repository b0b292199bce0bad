"""Digital head phantoms: per-class tissue fraction maps with known truth.

A :class:`Phantom` holds, for every voxel, the fraction of each tissue class (float32, summing to 1
with ``background``).  Signals are computed per *pure* tissue and mixed by these fractions
(:mod:`bidsapp.physics.simulator`), which is how partial volume behaves physically; averaging T1 or T2
across a border instead would create false bright rims.

Anatomies
- :func:`from_label_map`: a FreeSurfer-style label map such as the shared ``anat-XX_dseg.nii.gz``
  (mapping in :data:`LABEL_CLASSES`; labels 502-530 are extra-cerebral tissues, assigned from where
  they lie: 515 the shell around the brain -> skull, 511 the outer layer -> skin, 507 the bulk ->
  muscle, 516 next to the skull and 508 behind the eyes -> fat, 506 the two globes -> eye,
  502/514 vessels and dural sinuses -> blood, 512 below the brain stem and 530 -> nerve,
  509 the nose -> mucosa).  One-hot at the source resolution; partial volume appears when the phantom
  is resampled or deformed.
- :func:`from_icbm152`: nilearn's packaged MNI ICBM152 2009a (symmetric) GM and WM probability maps
  and T1 template.  How the other classes are derived: the intracranial volume is the closed,
  hole-filled GM+WM mask dilated by 2 mm and softened; CSF = intracranial - GM - WM; CSF deeper than
  12 mm inside the intracranial surface is ``ventricles``; GM within the central box of the basal
  ganglia/thalami (|x| < 32, -40 < y < 28, -16 < z < 22 mm) and deeper than 18 mm is ``deep_GM``;
  the probabilities are sharpened (power 2, renormalised) because population maps are blurrier than
  one brain.  The packaged T1 template is brain-only, so the head is a layered shell by distance d
  outside the intracranial volume: inner table 0-2.5 mm, diploe (half marrow fat, half bone) 2.5-5,
  outer table 5-6.5, subcutaneous fat 6.5-9, muscle 9-11.5, skin 11.5-13.5 mm (fractions from the
  overlap of each voxel with each layer).

Public API
----------
``Phantom(fractions, affine, classes=CLASSES-subset, multipliers=None, meta={})``
    ``fractions`` (C, X, Y, Z) float32 in ``classes`` order (``classes[0] == "background"``);
    ``multipliers`` (C, 4) between-subject scale of PD, R1, R2, R2* (ones if None).
    Properties: ``shape``, ``voxel_size`` (mm, array axes), ``voxel_volume`` (mm3), ``axcodes``,
    ``brain_fraction``, ``brain_mask`` (bool, brain fraction >= 0.5).
    Methods: ``fraction(name)``, ``truth_probseg() -> (3, X, Y, Z)`` CSF/GM/WM fractions inside the
    brain, ``dseg() -> uint8`` (CSF=1, GM=2, WM=3 by largest fraction within the brain mask),
    ``lesion_mask()``, ``volumes() -> dict`` (mm3 of CSF, GM, WM, brain, ventricles, lesion,
    deep_GM, intracranial), ``property_table(field_strength) -> (C, 4)``,
    ``qmri(field_strength=3.0) -> dict`` of float32 maps PD, T1, R1, T2, R2, T2star, R2star
    (water-weighted relaxation rates in mixed voxels), ``resample(voxel_size_ras, shape=None)``
    (exact box-overlap averaging: partial volume preserved), ``reorient(axcodes)``,
    ``crop(margin_mm=4)``, ``with_variation(rng, scale=1.0)``, ``to_image(array)`` -> Nifti1Image,
    ``copy()``.
``from_label_map(img_or_path, resolution=None, crop=True) -> Phantom``
``from_icbm152(resolution=None) -> Phantom``
``load_anatomy(source=None, resolution=None) -> Phantom``  ``None``/``"icbm152"`` or a label-map path.
``random_deformation(phantom, rng, displacement_mm=3.0, spacing_mm=32.0, scale_sd=0.04,
rotation_deg=4.0) -> Phantom``  a new plausible subject: random global scale/rotation plus a smooth
    displacement field (B-spline-like: random control grid, cubic upsampling), fractions warped
    trilinearly (sum to one preserved).
``make_subject(anatomy, rng, resolution=None, variation=1.0, deform=True) -> Phantom``  deform + tissue
    variation (+ optional resampling).
``sphere_phantom(shape=(32, 32, 32), voxel_size=4.0) -> Phantom``  tiny analytic head with exact partial
    volume, for tests.
``ras_to_array_axes(values_ras, affine)``  reorder an (R-L, A-P, S-I) triple into array-axis order.
``LABEL_CLASSES``  FreeSurfer/SynthSeg label -> class name.
"""
from __future__ import annotations

import copy as _copy
import functools
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
from scipy import sparse

from ..labels import BRAIN, TISSUE as TISSUE_LABELS
from .tissues import CLASSES, TISSUES, property_table as _property_table, sample_multipliers

LABEL_CLASSES: dict[int, str] = {
    0: "background",
    2: "WM", 41: "WM", 7: "WM", 46: "WM", 16: "WM", 85: "WM", 28: "WM", 60: "WM",
    25: "WM", 57: "WM",  # FreeSurfer "lesion" labels: normal WM unless lesions are added on purpose
    3: "GM", 42: "GM", 8: "GM", 47: "GM", 17: "GM", 53: "GM", 18: "GM", 54: "GM",
    10: "deep_GM", 49: "deep_GM", 11: "deep_GM", 50: "deep_GM", 12: "deep_GM", 51: "deep_GM",
    13: "deep_GM", 52: "deep_GM", 26: "deep_GM", 58: "deep_GM", 30: "deep_GM", 62: "deep_GM",
    136: "deep_GM", 137: "deep_GM", 163: "deep_GM", 164: "deep_GM",
    4: "ventricles", 43: "ventricles", 5: "ventricles", 44: "ventricles", 14: "ventricles",
    15: "ventricles", 72: "ventricles",
    24: "CSF",
    502: "blood", 514: "blood", 506: "eye", 507: "muscle", 508: "fat", 516: "fat",
    509: "mucosa", 511: "skin", 512: "nerve", 530: "nerve", 515: "skull",
}
_BRAIN = {c for c, t in TISSUES.items() if t.brain}


def _axis_codes(affine) -> tuple[str, ...]:
    return nib.aff2axcodes(affine)


_PAIR = {"L": "LR", "R": "LR", "A": "AP", "P": "AP", "S": "SI", "I": "SI"}
_RAS_INDEX = {"LR": 0, "AP": 1, "SI": 2}


def ras_to_array_axes(values_ras, affine) -> tuple[float, float, float]:
    """Reorder a per-axis triple given along R-L, A-P, S-I into the array axes of ``affine``."""
    codes = _axis_codes(affine)
    return tuple(float(values_ras[_RAS_INDEX[_PAIR[c]]]) for c in codes)


@dataclass
class Phantom:
    fractions: np.ndarray
    affine: np.ndarray
    classes: tuple = CLASSES
    multipliers: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    labels: np.ndarray | None = None  # uint8 class index, only while the fractions are exactly one-hot

    def __post_init__(self):
        self.fractions = np.asarray(self.fractions, dtype=np.float32)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        self.classes = tuple(self.classes)
        if self.classes[0] != "background":
            raise ValueError("the first phantom class must be 'background'")
        if self.fractions.ndim != 4 or self.fractions.shape[0] != len(self.classes):
            raise ValueError(f"fractions must be (C, X, Y, Z) with C={len(self.classes)}")
        unknown = [c for c in self.classes if c not in TISSUES]
        if unknown:
            raise ValueError(f"unknown tissue classes {unknown}")
        if self.multipliers is None:
            self.multipliers = np.ones((len(self.classes), 4))
        if self.labels is not None and self.labels.shape != self.shape:
            raise ValueError("labels must have the shape of the fraction maps")

    # ------------------------------------------------------------------ basic geometry
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.fractions.shape[1:])

    @property
    def voxel_size(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def voxel_volume(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3])))

    @property
    def axcodes(self) -> str:
        return "".join(_axis_codes(self.affine))

    def copy(self) -> "Phantom":
        return Phantom(self.fractions.copy(), self.affine.copy(), self.classes, self.multipliers.copy(),
                       _copy.deepcopy(self.meta), None if self.labels is None else self.labels.copy())

    def index(self, name: str) -> int | None:
        return self.classes.index(name) if name in self.classes else None

    def fraction(self, name: str) -> np.ndarray:
        i = self.index(name)
        return self.fractions[i] if i is not None else np.zeros(self.shape, np.float32)

    def _sum(self, names) -> np.ndarray:
        out = np.zeros(self.shape, np.float32)
        for i, c in enumerate(self.classes):
            if c in names:
                out += self.fractions[i]
        return out

    # ------------------------------------------------------------------ truth
    @property
    def brain_fraction(self) -> np.ndarray:
        return self._sum(_BRAIN)

    @property
    def brain_mask(self) -> np.ndarray:
        return self.brain_fraction >= 0.5

    def truth_probseg(self) -> np.ndarray:
        """(3, X, Y, Z) fractions of CSF, GM, WM (brain classes only; lesions count as WM)."""
        out = np.zeros((3,) + self.shape, np.float32)
        for i, c in enumerate(self.classes):
            t = TISSUES[c]
            if t.brain and t.truth:
                out[t.truth - 1] += self.fractions[i]
        return out

    def dseg(self) -> np.ndarray:
        prob = self.truth_probseg()
        lab = (np.argmax(prob, axis=0) + 1).astype(np.uint8)
        lab[~self.brain_mask] = 0
        return lab

    def lesion_mask(self) -> np.ndarray:
        return self.fraction("lesion") >= 0.5

    def volumes(self) -> dict[str, float]:
        """Exact tissue volumes (mm3) from the fractions (partial volume included)."""
        v = self.voxel_volume
        prob = self.truth_probseg()
        out = {name: float(prob[k].sum(dtype=np.float64) * v) for k, name in enumerate(TISSUE_LABELS.names)}
        out[BRAIN] = out["GM"] + out["WM"]
        out["intracranial"] = float(self.brain_fraction.sum(dtype=np.float64) * v)
        for c in ("ventricles", "lesion", "deep_GM"):
            out[c] = float(self.fraction(c).sum(dtype=np.float64) * v)
        return out

    # ------------------------------------------------------------------ properties
    def property_table(self, field_strength: float) -> np.ndarray:
        """(C, 4) PD, T1, T2, T2* (s) of this subject's pure tissues at ``field_strength``."""
        return _property_table(self.classes, field_strength, self.multipliers)

    def with_variation(self, rng: np.random.Generator, scale: float = 1.0) -> "Phantom":
        out = self.copy()
        out.multipliers = sample_multipliers(self.classes, rng, scale)
        return out

    def qmri(self, field_strength: float = 3.0) -> dict[str, np.ndarray]:
        """Quantitative maps as a multi-parameter mapping acquisition would measure them.

        PD mixes linearly; relaxation rates mix weighted by each tissue's water (PD x fraction),
        the fast-exchange limit.  Background voxels are 0.
        """
        tab = self.property_table(field_strength)
        pd = np.zeros(self.shape, np.float32)
        rates = np.zeros((3,) + self.shape, np.float32)
        for i in range(len(self.classes)):
            p, t1, t2, t2s = tab[i]
            if p == 0:
                continue
            f = self.fractions[i]
            if not f.any():
                continue
            w = f * np.float32(p)
            pd += w
            for k, t in enumerate((t1, t2, t2s)):
                rates[k] += w * np.float32(1.0 / t)
        pos = pd > 0
        safe = np.where(pos, pd, np.float32(1.0))
        out = {"PD": pd}
        for k, (rname, tname) in enumerate((("R1", "T1"), ("R2", "T2"), ("R2star", "T2star"))):
            r = np.where(pos, rates[k] / safe, np.float32(0.0)).astype(np.float32)
            out[rname] = r
            out[tname] = np.where(r > 0, np.float32(1.0) / np.where(r > 0, r, np.float32(1.0)), np.float32(0.0))
        return out

    # ------------------------------------------------------------------ geometry operations
    def to_image(self, array, dtype=None) -> nib.Nifti1Image:
        arr = np.asarray(array)
        if dtype is not None:
            arr = arr.astype(dtype)
        img = nib.Nifti1Image(arr, self.affine)
        img.set_qform(self.affine, code=1)
        img.set_sform(self.affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
        return img

    def resample(self, voxel_size_ras, shape=None) -> "Phantom":
        """Average onto a grid with ``voxel_size_ras`` (mm along R-L, A-P, S-I), same field of view.

        Every output voxel gets the volume-weighted mean of the input fractions it overlaps (exact box
        overlap, separable), so tissue volumes and partial volume are preserved.
        """
        new_vs = ras_to_array_axes(voxel_size_ras, self.affine)
        old_vs = self.voxel_size
        if shape is None:
            shape = tuple(max(1, int(round(n * o / v))) for n, o, v in zip(self.shape, old_vs, new_vs))
        if shape == self.shape and np.allclose(new_vs, old_vs):
            return self.copy()
        data = _resample_maps(lambda c: self.fractions[c], len(self.classes), self.shape, old_vs, shape, new_vs)
        aff = _scaled_affine(self.affine, np.array(new_vs) / np.array(old_vs))
        meta = dict(self.meta, voxel_size=list(new_vs))
        return Phantom(data, aff, self.classes, self.multipliers.copy(), meta)

    def reorient(self, axcodes: str) -> "Phantom":
        """Same phantom stored with array axes ``axcodes`` (e.g. 'LIA')."""
        cur = nib.orientations.io_orientation(self.affine)
        tgt = nib.orientations.axcodes2ornt(tuple(axcodes.upper()))
        tr = nib.orientations.ornt_transform(cur, tgt)
        if np.array_equal(tr, [[0, 1], [1, 1], [2, 1]]):
            return self.copy()
        first = nib.orientations.apply_orientation(self.fractions[0], tr)
        data = np.empty((len(self.classes),) + first.shape, np.float32)  # filled class by class: low peak memory
        data[0] = first
        for c in range(1, len(self.classes)):
            data[c] = nib.orientations.apply_orientation(self.fractions[c], tr)
        aff = self.affine @ nib.orientations.inv_ornt_aff(tr, self.shape)
        lab = None if self.labels is None else np.ascontiguousarray(nib.orientations.apply_orientation(self.labels, tr))
        return Phantom(data, aff, self.classes, self.multipliers.copy(), dict(self.meta), lab)

    def crop(self, margin_mm: float = 4.0) -> "Phantom":
        """Smallest box holding all non-background tissue plus ``margin_mm``."""
        fg = self.fractions[0] < 0.999
        if not fg.any():
            return self.copy()
        idx = np.argwhere(fg)
        m = [int(np.ceil(margin_mm / v)) for v in self.voxel_size]
        lo = np.maximum(idx.min(0) - m, 0)
        hi = np.minimum(idx.max(0) + 1 + m, self.shape)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        aff = self.affine.copy()
        aff[:3, 3] = self.affine[:3, :3] @ lo + self.affine[:3, 3]
        lab = None if self.labels is None else np.ascontiguousarray(self.labels[sl])
        return Phantom(np.ascontiguousarray(self.fractions[(slice(None),) + sl]), aff, self.classes,
                       self.multipliers.copy(), dict(self.meta), lab)


# ---------------------------------------------------------------------------------------- helpers
def _overlap_matrix(n_in: int, v_in: float, n_out: int, v_out: float) -> sparse.csr_matrix:
    """(n_out, n_in) weights: overlap length of output voxel i with input voxel j / v_out."""
    rows, cols, vals = [], [], []
    for i in range(n_out):
        a, b = i * v_out, (i + 1) * v_out
        j0, j1 = int(np.floor(a / v_in)), int(np.ceil(b / v_in))
        for j in range(max(j0, 0), min(j1, n_in)):
            ov = min(b, (j + 1) * v_in) - max(a, j * v_in)
            if ov > 1e-9:
                rows.append(i)
                cols.append(j)
                vals.append(ov / v_out)
    return sparse.csr_matrix((vals, (rows, cols)), shape=(n_out, n_in), dtype=np.float32)


def _scaled_affine(affine: np.ndarray, scale: np.ndarray) -> np.ndarray:
    aff = affine.copy()
    aff[:3, :3] = affine[:3, :3] * scale
    centre0 = scale / 2.0 - 0.5  # centre of new voxel 0 in old index coordinates
    aff[:3, 3] = affine[:3, :3] @ centre0 + affine[:3, 3]
    return aff


def _resample_maps(get_map, n_maps: int, shape_in, vs_in, shape_out, vs_out) -> np.ndarray:
    """Box-overlap average of ``n_maps`` maps (``get_map(c)``), one at a time to bound memory;
    integer down-sampling factors use a reshape-mean."""
    ratio = np.array(vs_out) / np.array(vs_in)
    k = np.rint(ratio).astype(int)
    integer = np.allclose(ratio, k, atol=1e-6) and np.all(k >= 1)
    if not integer:
        mats = [_overlap_matrix(shape_in[ax], vs_in[ax], shape_out[ax], vs_out[ax]) for ax in range(3)]
    out = np.empty((n_maps,) + tuple(shape_out), np.float32)
    for c in range(n_maps):
        m = get_map(c)
        if integer:
            need = np.array(shape_out) * k
            crop = tuple(slice(0, min(a, b)) for a, b in zip(need, shape_in))
            buf = np.zeros(tuple(need), np.float32)
            buf[tuple(slice(0, s_.stop) for s_ in crop)] = m[crop]
            out[c] = buf.reshape(shape_out[0], k[0], shape_out[1], k[1], shape_out[2], k[2]).mean(axis=(1, 3, 5))
        else:
            d = m[None]
            for ax in range(3):
                d = _apply_along(d, mats[ax], ax + 1)
            out[c] = d[0]
    return _renormalise(out)


def _apply_along(data: np.ndarray, w: sparse.csr_matrix, axis: int) -> np.ndarray:
    moved = np.moveaxis(data, axis, 0)
    shp = moved.shape
    out = w @ moved.reshape(shp[0], -1)
    out = np.asarray(out, dtype=np.float32).reshape((w.shape[0],) + shp[1:])
    return np.ascontiguousarray(np.moveaxis(out, 0, axis))


def _renormalise(data: np.ndarray) -> np.ndarray:
    """Clip tiny negatives, give any missing fraction (outside the field of view) to background."""
    np.clip(data, 0.0, 1.0, out=data)
    rest = data[1:].sum(axis=0)
    over = rest > 1.0
    if over.any():
        data[1:, over] /= rest[over]
        rest = np.minimum(rest, 1.0)
    data[0] = 1.0 - rest
    return data


def _one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    n = labels.size
    out = np.zeros((n_classes, n), np.float32)
    out[labels.ravel(), np.arange(n)] = 1.0
    return out.reshape((n_classes,) + labels.shape)


def _block_fractions(idx: np.ndarray, n_classes: int, k, shape_out) -> np.ndarray:
    """Class fractions of k[0] x k[1] x k[2] blocks of a label-index map, in one counting pass."""
    need = np.array(shape_out) * np.asarray(k)
    lab = np.zeros(tuple(need), np.uint8)  # background where the grid extends past the map
    crop = tuple(slice(0, min(a, b)) for a, b in zip(need, idx.shape))
    lab[crop] = idx[crop]
    blocks = [np.arange(n) // kk for n, kk in zip(need, k)]
    bid = (blocks[0][:, None, None] * shape_out[1] + blocks[1][None, :, None]) * shape_out[2] + blocks[2][None, None, :]
    nb = int(np.prod(shape_out))
    counts = np.bincount((lab.astype(np.int64) * nb + bid).ravel(), minlength=n_classes * nb)
    frac = counts.reshape((n_classes,) + tuple(shape_out)).astype(np.float32) / float(np.prod(k))
    return _renormalise(frac)


def _bbox(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    sl = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        hit = np.flatnonzero(mask.any(axis=other))
        if hit.size == 0:
            return tuple(slice(0, n) for n in mask.shape)
        sl.append(slice(max(hit[0] - margin, 0), min(hit[-1] + 1 + margin, mask.shape[ax])))
    return tuple(sl)


# ---------------------------------------------------------------------------------------- builders
def from_label_map(img, resolution: float | tuple | None = None, crop: bool = True) -> Phantom:
    """Phantom from a FreeSurfer-style integer label map (path or image)."""
    src = str(img) if isinstance(img, (str, os.PathLike)) else None
    if src is not None:
        try:
            img = nib.load(src)
        except Exception as exc:  # nibabel raises several types for unreadable files
            raise ValueError(f"{src}: cannot read label map ({exc})") from None
    lab = np.asarray(img.dataobj)
    if lab.ndim != 3:
        raise ValueError(f"{src or 'label map'}: expected a 3D label map, got shape {lab.shape}")
    affine = img.affine.copy()
    if crop:  # crop before expanding into one map per class
        sl = _bbox(lab != 0, 4)
        lab = lab[sl]
        affine[:3, 3] = img.affine[:3, :3] @ [s.start for s in sl] + img.affine[:3, 3]
    lab = np.rint(lab).astype(np.int32)
    if lab.min() < 0:
        raise ValueError(f"{src or 'label map'}: negative labels")
    values = np.unique(lab)
    names = {int(v): LABEL_CLASSES.get(int(v), "muscle" if v >= 500 else "deep_GM") for v in values}
    classes = tuple(c for c in CLASSES if c in set(names.values()) or c == "background")
    lut = np.zeros(int(values.max()) + 1, np.uint8)
    for v, c in names.items():
        lut[v] = classes.index(c)
    idx = lut[lab]
    meta = {"anatomy": os.path.basename(src) if src else "label map",
            "unknown_labels": sorted(int(v) for v in values if int(v) not in LABEL_CLASSES)}
    if resolution is None:
        return Phantom(_one_hot(idx, len(classes)), affine, classes, meta=meta, labels=idx)
    # Straight to the coarser grid, one class at a time (no full-resolution one-hot in memory).
    tmp = Phantom(np.zeros((1, 1, 1, 1), np.float32), affine, ("background",))
    new_vs = ras_to_array_axes(_triple(resolution), affine)
    old_vs = tmp.voxel_size
    shape = tuple(max(1, int(round(n * o / v))) for n, o, v in zip(idx.shape, old_vs, new_vs))
    ratio = np.array(new_vs) / np.array(old_vs)
    k = np.rint(ratio).astype(int)
    if np.allclose(ratio, k) and np.all(k >= 1):
        frac = _block_fractions(idx, len(classes), k, shape)
    else:
        frac = _resample_maps(lambda c: (idx == c).astype(np.float32), len(classes), idx.shape, old_vs, shape, new_vs)
    aff = _scaled_affine(affine, np.array(new_vs) / np.array(old_vs))
    return Phantom(frac, aff, classes, meta=dict(meta, voxel_size=list(new_vs)))


def _triple(r) -> tuple[float, float, float]:
    if np.isscalar(r):
        return (float(r),) * 3
    r = tuple(float(x) for x in r)
    if len(r) != 3:
        raise ValueError("resolution must be one number or three (mm)")
    return r


def from_icbm152(resolution: float | tuple | None = None) -> Phantom:
    """Phantom from nilearn's packaged ICBM152 2009a maps (see the module docstring for how)."""
    res = None if resolution is None else _triple(resolution)
    # Coarse requests start from a template built at 2 mm (8x less work than 1 mm).
    ph = _icbm152(2 if res is not None and min(res) >= 2 else 1)
    ph = ph.copy() if res is None or np.allclose(res, ph.voxel_size) else ph.resample(res)
    return ph


def _nilearn_data_file(name: str) -> str:
    """Path of a file nilearn ships in ``nilearn/datasets/data`` (found without importing nilearn,
    whose import takes seconds)."""
    import importlib.util

    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("nilearn is not installed: the ICBM152 anatomy needs it (or use a label map)")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / name
    if not path.is_file():
        raise ValueError(f"{path}: nilearn's packaged ICBM152 2009a file is missing")
    return str(path)


def _block_mean(a: np.ndarray, k: int) -> np.ndarray:
    shape = tuple(-(-n // k) * k for n in a.shape)
    buf = np.zeros(shape, np.float32)
    buf[tuple(slice(0, n) for n in a.shape)] = a
    return buf.reshape(shape[0] // k, k, shape[1] // k, k, shape[2] // k, k).mean(axis=(1, 3, 5))


@functools.lru_cache(maxsize=2)
def _icbm152(step: int) -> Phantom:
    """The template phantom at ``step`` mm (1 or 2); morphology always runs on a 2 mm grid."""
    def load(name):
        im = nib.load(_nilearn_data_file(name))
        return np.asarray(im.dataobj, dtype=np.float32), im.affine

    gm, aff = load("mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")
    wm, _ = load("mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")
    pad = 18  # room for the synthetic skull and scalp (mm)
    sl = _bbox(gm + wm > 0, 2)
    gm = np.pad(gm[sl] / 255.0, pad)
    wm = np.pad(wm[sl] / 255.0, pad)
    aff = aff.copy()
    aff[:3, 3] = aff[:3, :3] @ (np.array([s.start for s in sl]) - pad) + aff[:3, 3]
    # Sharpen population probabilities towards one brain's fractions (keeping GM + WM per voxel).
    gm2, wm2 = gm**2, wm**2
    tot, s2 = gm + wm, gm2 + wm2
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.where(s2 > 0, tot / np.where(s2 > 0, s2, 1), 0)
    gm, wm = (gm2 * scale).astype(np.float32), (wm2 * scale).astype(np.float32)
    if step > 1:
        gm, wm = _block_mean(gm, step), _block_mean(wm, step)
        aff = _scaled_affine(aff, np.full(3, float(step)))
    tissue = gm + wm
    # Morphology on a 2 mm grid (8x fewer voxels than 1 mm), brought back with linear interpolation.
    down = _half if step == 1 else (lambda m: m)
    up = (lambda a: _resize(a, gm.shape)) if step == 1 else (lambda a: a.astype(np.float32))
    core = up(ndi.binary_fill_holes(ndi.binary_closing(down(tissue > 0.5), iterations=2))) > 0.5
    core |= tissue > 0.5
    icv_mask = ndi.binary_dilation(core, iterations=max(1, round(2 / step)))
    icv = np.clip(ndi.gaussian_filter(icv_mask.astype(np.float32), 0.7 / step), 0, 1)
    icv = np.maximum(icv, np.minimum(tissue, 1.0))
    csf = np.clip(icv - tissue, 0, 1)
    coarse = down(icv_mask)
    depth = up(ndi.distance_transform_edt(coarse).astype(np.float32) * 2.0)
    outside = up(ndi.distance_transform_edt(~coarse).astype(np.float32) * 2.0)
    vent = np.where(depth > 12, csf, 0).astype(np.float32)
    csf = csf - vent
    i, j, k = (np.arange(n, dtype=np.float64) for n in gm.shape)
    x = aff[0, 0] * i + aff[0, 3]  # the packaged maps are RAS with a diagonal affine
    y = aff[1, 1] * j + aff[1, 3]
    z = aff[2, 2] * k + aff[2, 3]
    box = ((np.abs(x) < 32)[:, None, None] & ((y > -40) & (y < 28))[None, :, None]
           & ((z > -16) & (z < 22))[None, None, :]) & (depth > 18)
    deep = np.where(box, gm, 0).astype(np.float32)
    gm = gm - deep
    # The packaged T1 template is brain-only, so the head is a layered shell around the intracranial
    # volume, by distance from it (mm): inner table, diploe (marrow fat), outer table, subcutaneous
    # fat, muscle/galea, skin.  Each voxel gets the overlap of [d - step/2, d + step/2] with each layer.
    nonbrain = np.clip(1.0 - icv, 0, 1)
    layers = (("skull", 0.0, 2.5, 1.0), ("fat", 2.5, 5.0, 0.5), ("skull", 2.5, 5.0, 0.5), ("skull", 5.0, 6.5, 1.0),
              ("fat", 6.5, 9.0, 1.0), ("muscle", 9.0, 11.5, 1.0), ("skin", 11.5, 13.5, 1.0))
    shell = {}
    for name, lo, hi, share in layers:
        h = step / 2.0
        w = np.clip(np.minimum(outside + h, hi) - np.maximum(outside - h, lo), 0, step) / step * nonbrain * share
        shell[name] = shell.get(name, 0) + w
    classes = ("background", "CSF", "ventricles", "GM", "deep_GM", "WM", "skin", "muscle", "fat", "skull")
    maps = [None, csf, vent, gm, deep, wm, shell["skin"], shell["muscle"], shell["fat"], shell["skull"]]
    frac = np.zeros((len(classes),) + gm.shape, np.float32)
    for k, m in enumerate(maps[1:], start=1):
        frac[k] = m
    frac = _renormalise(frac)
    return Phantom(frac, aff, classes, meta={"anatomy": "ICBM152 2009a (nilearn)"}).crop()


def _half(mask: np.ndarray) -> np.ndarray:
    """2x2x2 block mean > 0.5 (a mask at half the resolution)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    with torch.no_grad():
        return (torch.nn.functional.avg_pool3d(t, 2, ceil_mode=True)[0, 0] > 0.5).numpy()


def _resize(arr: np.ndarray, shape) -> np.ndarray:
    """Linear interpolation of ``arr`` onto ``shape`` voxels covering the same extent."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None]
    with torch.no_grad():
        return torch.nn.functional.interpolate(t, size=tuple(shape), mode="trilinear", align_corners=False)[0, 0].numpy()


def sphere_phantom(shape=(32, 32, 32), voxel_size: float = 4.0, supersample: int = 4) -> Phantom:
    """A small analytic head of concentric shells (ventricles, WM, GM, CSF, skull, skin) with exact
    partial volume (each voxel averaged from ``supersample``^3 sub-voxels); for tests and examples."""
    shape = tuple(int(n) for n in shape)
    radius = min(shape) * voxel_size / 2.0
    shells = (("ventricles", 0.15), ("WM", 0.50), ("GM", 0.62), ("CSF", 0.70), ("skull", 0.80), ("skin", 0.90))
    classes = ("background", "CSF", "ventricles", "GM", "WM", "skin", "skull")
    fine = [np.arange(n * supersample) for n in shape]
    axes = [((g + 0.5) / supersample - n / 2.0) * voxel_size for g, n in zip(fine, shape)]
    # A slightly flattened ellipsoid so that the three axes differ.
    r = np.sqrt((axes[0][:, None, None] / 0.9) ** 2 + axes[1][None, :, None] ** 2
                + (axes[2][None, None, :] / 0.95) ** 2) / radius
    idx = np.zeros(r.shape, np.uint8)
    for name, outer in reversed(shells):
        idx[r < outer] = classes.index(name)
    frac = _one_hot(idx, len(classes)).reshape((len(classes), shape[0], supersample, shape[1], supersample,
                                                shape[2], supersample)).mean(axis=(2, 4, 6))
    aff = np.diag([voxel_size, voxel_size, voxel_size, 1.0])
    aff[:3, 3] = -np.array(shape) * voxel_size / 2.0 + voxel_size / 2.0
    return Phantom(_renormalise(frac.astype(np.float32)), aff, classes, meta={"anatomy": "spheres"})


def load_anatomy(source=None, resolution=None) -> Phantom:
    """``None`` or ``"icbm152"``: the packaged template; otherwise a label-map path."""
    if source is None or str(source).lower() == "icbm152":
        return from_icbm152(resolution)
    return from_label_map(source, resolution)


# ---------------------------------------------------------------------------------------- deformation
def _rotation(angles_deg) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def sample_coordinates(phantom: Phantom, rng: np.random.Generator, displacement_mm: float = 3.0,
                       spacing_mm: float = 32.0, scale_sd: float = 0.04, rotation_deg: float = 4.0) -> np.ndarray:
    """For every output voxel, the (fractional) source index to sample: (3, X, Y, Z) float32."""
    shape = np.array(phantom.shape)
    vs = np.array(phantom.voxel_size)
    centre = (shape - 1) / 2.0
    scale = np.exp(rng.normal(0.0, scale_sd, 3) * np.array([1.0, 1.0, 1.0]))
    rot = _rotation(rng.normal(0.0, rotation_deg, 3))
    # Work in mm about the centre: source = R^-1 S^-1 (target) + displacement.
    lin = np.linalg.inv(rot @ np.diag(scale))
    ctrl = np.maximum(np.ceil(shape * vs / spacing_mm).astype(int) + 1, 4)
    disp = rng.normal(0.0, displacement_mm, (3,) + tuple(ctrl))
    # Cubic upsampling of the control grid to a quarter of the resolution, then trilinear to full:
    # smooth, and much cheaper than cubic at full resolution.
    import torch

    mid = np.maximum(shape // 4, ctrl)
    smooth = np.stack([ndi.zoom(disp[k], mid / ctrl, order=3, mode="nearest", grid_mode=False) for k in range(3)])
    with torch.no_grad():
        full = torch.nn.functional.interpolate(torch.from_numpy(smooth.astype(np.float32))[None], size=tuple(shape),
                                               mode="trilinear", align_corners=True)[0].numpy()
    grids = [np.arange(n, dtype=np.float32) - c for n, c in zip(shape, centre)]
    mm = [g * v for g, v in zip(grids, vs)]
    for k in range(3):
        src = (lin[k, 0] * mm[0][:, None, None] + lin[k, 1] * mm[1][None, :, None] + lin[k, 2] * mm[2][None, None, :])
        full[k] += src
        full[k] /= vs[k]
        full[k] += centre[k]
    return full


def warp(phantom: Phantom, coords: np.ndarray, chunk: int = 4) -> Phantom:
    """Resample every fraction map at ``coords`` (trilinear; outside the grid is background)."""
    if phantom.labels is not None:
        out = _warp_one_hot(phantom.labels, coords, len(phantom.classes))
        return Phantom(out, phantom.affine.copy(), phantom.classes, phantom.multipliers.copy(), dict(phantom.meta))
    import torch

    shape = phantom.shape
    grid = np.empty(tuple(shape) + (3,), np.float32)
    for k in range(3):  # grid_sample wants (x, y, z) = (last, middle, first) axis, normalised to [-1, 1]
        grid[..., 2 - k] = coords[k] * (2.0 / max(shape[k] - 1, 1)) - 1.0
    g = torch.from_numpy(grid)[None]
    out = np.empty_like(phantom.fractions)
    with torch.no_grad():
        for s in range(1, len(phantom.classes), chunk):
            e = min(s + chunk, len(phantom.classes))
            inp = torch.from_numpy(np.ascontiguousarray(phantom.fractions[s:e]))[None]
            out[s:e] = torch.nn.functional.grid_sample(inp, g, mode="bilinear", padding_mode="zeros",
                                                       align_corners=True)[0].numpy()
    out = _renormalise(out)
    return Phantom(out, phantom.affine.copy(), phantom.classes, phantom.multipliers.copy(), dict(phantom.meta))


def _warp_one_hot(labels: np.ndarray, coords: np.ndarray, n_classes: int) -> np.ndarray:
    """Trilinear warp of one-hot maps, computed from the label map: identical to warping each class
    map, but voxels whose eight source neighbours share a label are filled directly."""
    src = labels.shape
    pad = np.pad(labels, 1)  # background border: samples outside the grid become background
    p1, p2 = src[1] + 2, src[2] + 2
    frac, lows = [], []
    for k in range(3):
        c = np.clip(coords[k], -1.0, float(src[k]))
        lo = np.minimum(np.floor(c).astype(np.int64) + 1, src[k])  # padded index of the lower corner
        frac.append((c + 1.0 - lo).astype(np.float32))
        lows.append(lo)
    base = (lows[0] * p1 + lows[1]) * p2 + lows[2]
    del lows
    flat = pad.ravel()
    corners = list(itertools.product((0, 1), repeat=3))
    labs = [np.take(flat, base + (dx * p1 + dy) * p2 + dz) for dx, dy, dz in corners]
    del base
    same = np.ones(labs[0].shape, bool)
    for lab in labs[1:]:
        same &= lab == labs[0]
    n = labs[0].size
    out = np.zeros((n_classes, n), np.float32)
    inner = np.flatnonzero(same.ravel())
    out[labs[0].ravel()[inner], inner] = 1.0
    edge = np.flatnonzero(~same.ravel())
    fx, fy, fz = (f.ravel()[edge] for f in frac)
    flat_out = out.ravel()
    for (dx, dy, dz), lab in zip(corners, labs):
        w = (fx if dx else 1 - fx) * (fy if dy else 1 - fy) * (fz if dz else 1 - fz)
        flat_out[lab.ravel()[edge].astype(np.int64) * n + edge] += w
    return _renormalise(out.reshape((n_classes,) + coords.shape[1:]))


def random_deformation(phantom: Phantom, rng: np.random.Generator, displacement_mm: float = 3.0,
                       spacing_mm: float = 32.0, scale_sd: float = 0.04, rotation_deg: float = 4.0) -> Phantom:
    """A new subject from one anatomy: random global scale and rotation plus a smooth warp."""
    coords = sample_coordinates(phantom, rng, displacement_mm, spacing_mm, scale_sd, rotation_deg)
    out = warp(phantom, coords)
    out.meta["deformation"] = {"displacement_mm": displacement_mm, "spacing_mm": spacing_mm,
                               "scale_sd": scale_sd, "rotation_deg": rotation_deg}
    return out


def make_subject(anatomy: Phantom, rng: np.random.Generator, resolution=None, variation: float = 1.0,
                 deform: bool = True) -> Phantom:
    """Deform ``anatomy`` into a new subject, draw its tissue-property variation, optionally resample."""
    ph = random_deformation(anatomy, rng) if deform else anatomy.copy()
    ph.multipliers = sample_multipliers(ph.classes, rng, variation)
    if resolution is not None:
        ph = ph.resample(_triple(resolution))
    return ph


# ---------------------------------------------------------------------------------------- brain transplant
def _symmetric_sqrt(cov: np.ndarray, inverse: bool = False) -> np.ndarray:
    vals, vecs = np.linalg.eigh(cov)
    vals = np.maximum(vals, 1e-9) ** (-0.5 if inverse else 0.5)
    return (vecs * vals) @ vecs.T


def _moments_mm(weight: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre (mm) and covariance (mm^2) of the voxels where ``weight`` exceeds 0.5."""
    idx = np.argwhere(weight > 0.5)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    return world.mean(0), np.cov(world.T)


def transplant_brain(head: Phantom, donor: Phantom, shrink: float = 1.0) -> Phantom:
    """``head``'s scalp, skull and cranial cavity with ``donor``'s brain inside: a new anatomy.

    The donor's cavity (its brain fraction, outer CSF included) is mapped onto the head's by the affine
    that matches their centres and second moments (both in RAS, so no rotation is sought), and its
    parenchyma (GM, deep GM, WM, ventricles) is read there, shrunk about the centre by ``shrink``; what
    the cavity holds besides is CSF. The brain target is the head's own cavity, so the layer of CSF
    between cortex and skull varies with the pair (and ``shrink``) instead of being each label map's
    own. Both phantoms need the same classes."""
    if head.classes != donor.classes:
        raise ValueError("transplant_brain needs two phantoms with the same classes")
    if not 0.5 < shrink <= 1.0:
        raise ValueError(f"shrink {shrink} must lie in (0.5, 1]")
    cavity = np.clip(head.brain_fraction, 0.0, 1.0)
    c_h, cov_h = _moments_mm(cavity, head.affine)
    c_d, cov_d = _moments_mm(donor.brain_fraction, donor.affine)
    to_donor = _symmetric_sqrt(cov_d) @ _symmetric_sqrt(cov_h, inverse=True) / shrink  # head mm -> donor mm
    from .atrophy import sample_world, world_grid  # atrophy imports this module

    donor_world = to_donor @ (world_grid(head.shape, head.affine) - c_h[:, None]) + c_d[:, None]
    out = head.copy()
    parenchyma = [c for c in donor.classes if c in _BRAIN and c != "CSF"]
    maps = {c: sample_world(donor.fraction(c), donor.affine, donor_world, order=1).reshape(head.shape)
            for c in parenchyma}
    total = sum(maps.values())
    scale = cavity / np.maximum(total, 1.0)  # inside the cavity only, never more than it holds
    for c, m in maps.items():
        out.fractions[out.index(c)] = m * scale
    out.fractions[out.index("CSF")] = np.clip(cavity - total * scale, 0.0, None)
    out.labels = None
    out.meta = dict(head.meta, transplant={"head": head.meta.get("anatomy"), "donor": donor.meta.get("anatomy"),
                                           "shrink": float(shrink)})
    return out
