"""Overlap and stability metrics shared by tests, benchmarks and reports."""

from __future__ import annotations

import numpy as np


def dice(a, b) -> float:
    """Dice coefficient of two binary masks (1.0 when both are empty: nothing to disagree on)."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    denom = a.sum() + b.sum()
    if denom == 0:
        return 1.0
    return float(2.0 * np.logical_and(a, b).sum() / denom)


def coefficient_of_variation(values) -> float:
    """Standard deviation over mean (population std, as the physics-informed paper's Table 2)."""
    v = np.asarray(values, dtype=float)
    m = v.mean()
    return float(v.std() / m) if m != 0 else float("nan")


def hd95(a, b, spacing=(1.0, 1.0, 1.0)) -> float:
    """95th-percentile symmetric surface distance (mm) of two binary masks (MONAI's Hausdorff
    distance at percentile 95); inf when exactly one mask is empty."""
    import torch
    from monai.metrics import compute_hausdorff_distance

    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return float("inf")
    pa = torch.from_numpy(a)[None, None]
    pb = torch.from_numpy(b)[None, None]
    return float(compute_hausdorff_distance(pa, pb, percentile=95, spacing=[float(s) for s in spacing])[0, 0])


def volume_error_percent(measured, truth) -> float:
    """Signed volume error of ``measured`` against ``truth`` in percent (masks or volumes)."""
    m = float(np.asarray(measured, dtype=bool).sum() if np.ndim(measured) else measured)
    t = float(np.asarray(truth, dtype=bool).sum() if np.ndim(truth) else truth)
    return 100.0 * (m - t) / t if t else float("nan")
