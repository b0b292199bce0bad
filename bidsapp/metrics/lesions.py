"""Lesion segmentation metrics: the measures of the MS-lesion paper's Table 1 and of the MICCAI 2017 WMH
challenge, one definition each, for the lesion benchmarks and reports.

Lesions are the connected components of a binary mask, with 26-connectivity (voxels touching by a
face, an edge or a corner belong to one lesion, as the WMH challenge's evaluation counts them).
Components smaller than ``min_volume_mm3`` are ignored on both sides when asked for.

- ``dice``: voxel-wise Dice similarity coefficient.
- ``ltpr`` (lesion-wise true positive rate): true lesions that overlap the prediction by at least one
  voxel, over the number of true lesions.
- ``lfpr`` (lesion-wise false positive rate): predicted lesions that overlap no true lesion, over the
  number of predicted lesions.
- ``ppv``: voxel-wise positive predictive value (true-positive voxels over predicted voxels).
- ``lesion_f1`` (WMH 2017): 2 recall precision / (recall + precision), recall = ``ltpr`` and precision
  the predicted lesions that overlap a true lesion over the predicted lesions (1 - ``lfpr``).
- ``avd`` (WMH 2017): absolute volume difference, |V_pred - V_true| / V_true in percent.
- ``hd95``: 95th-percentile symmetric surface distance in mm (MONAI), as in :mod:`.overlap`.

Empty masks: with no true lesion, ``ltpr`` and ``dice`` are 1 when the prediction is empty too and
``avd`` is undefined (NaN); with no predicted lesion, ``lfpr`` is 0 and ``ppv`` 1 when the truth is
empty, else 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from .overlap import dice as _dice
from .overlap import hd95 as _hd95

CONNECTIVITY = ndimage.generate_binary_structure(3, 3)


def label_lesions(mask, zooms=(1.0, 1.0, 1.0), min_volume_mm3: float = 0.0) -> tuple[np.ndarray, int]:
    """Connected components (26-connectivity) of a binary mask, numbered 1..n, without those smaller
    than ``min_volume_mm3``."""
    mask = np.asarray(mask) > 0
    labels, n = ndimage.label(mask, structure=CONNECTIVITY)
    if min_volume_mm3 > 0 and n:
        voxel = float(np.prod(zooms[:3]))
        sizes = np.bincount(labels.ravel(), minlength=n + 1) * voxel
        small = np.flatnonzero(sizes < min_volume_mm3)
        small = small[small > 0]
        if len(small):
            labels[np.isin(labels, small)] = 0
            labels, n = ndimage.label(labels > 0, structure=CONNECTIVITY)
    return labels, int(n)


@dataclass(frozen=True)
class LesionScores:
    dice: float
    ltpr: float
    lfpr: float
    ppv: float
    lesion_f1: float
    avd: float
    hd95: float
    n_true: int
    n_pred: int
    volume_true_mm3: float
    volume_pred_mm3: float

    def as_dict(self) -> dict:
        return asdict(self)


def volume_ratio(volume_pred_mm3: float, volume_true_mm3: float) -> float | None:
    """Mask volume over true lesion volume (1: unbiased); None without true lesions. Unlike AVD it keeps
    the sign, which is what a mask threshold moves."""
    return float(volume_pred_mm3) / float(volume_true_mm3) if volume_true_mm3 > 0 else None


def lesion_scores(pred, truth, zooms=(1.0, 1.0, 1.0), min_volume_mm3: float = 0.0,
                  with_hd95: bool = True) -> LesionScores:
    """Every measure of this module for one prediction against one reference (same grid)."""
    pred_l, n_pred = label_lesions(pred, zooms, min_volume_mm3)
    true_l, n_true = label_lesions(truth, zooms, min_volume_mm3)
    p, t = pred_l > 0, true_l > 0
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape} and reference {t.shape} are on different grids")
    voxel = float(np.prod(zooms[:3]))
    detected = len(np.setdiff1d(np.unique(true_l[p]), [0]))       # true lesions the prediction touches
    matched = len(np.setdiff1d(np.unique(pred_l[t]), [0]))        # predicted lesions that touch the truth
    ltpr = detected / n_true if n_true else float(n_pred == 0)
    lfpr = (n_pred - matched) / n_pred if n_pred else 0.0
    precision = matched / n_pred if n_pred else float(n_true == 0)
    f1 = 2 * ltpr * precision / (ltpr + precision) if (ltpr + precision) > 0 else 0.0
    tp = int(np.logical_and(p, t).sum())
    ppv = tp / int(p.sum()) if p.any() else float(not t.any())
    v_true, v_pred = float(t.sum()) * voxel, float(p.sum()) * voxel
    avd = abs(v_pred - v_true) / v_true * 100.0 if v_true > 0 else float("nan")
    hd = _hd95(p, t, spacing=zooms[:3]) if with_hd95 else float("nan")
    return LesionScores(dice=_dice(p, t), ltpr=float(ltpr), lfpr=float(lfpr), ppv=float(ppv), lesion_f1=float(f1),
                        avd=float(avd), hd95=float(hd), n_true=n_true, n_pred=n_pred, volume_true_mm3=v_true,
                        volume_pred_mm3=v_pred)
