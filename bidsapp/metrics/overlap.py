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
