"""Paired differences between two models scored on the same sessions.

With a dozen sessions a difference of means alone cannot tell a real lead from the spread of the
sessions; the bootstrap interval of the mean paired difference can.
"""

from __future__ import annotations

import numpy as np


def paired_difference(a, b, seed: int = 0) -> dict:
    """``a - b`` per session (NaNs dropped): ``n``, ``mean``, ``ahead`` (sessions where ``a`` is higher)
    and ``ci95``, the 95 % percentile-bootstrap interval of the mean (scipy, 2000 resamples; None with
    fewer than three sessions or no spread)."""
    from scipy.stats import bootstrap

    d = np.asarray(a, float) - np.asarray(b, float)
    d = d[np.isfinite(d)]
    out = {"n": int(d.size), "mean": float(d.mean()) if d.size else None, "ahead": int((d > 0).sum()), "ci95": None}
    if d.size >= 3 and np.ptp(d) > 0:
        ci = bootstrap((d,), np.mean, confidence_level=0.95, n_resamples=2000, method="percentile",
                       random_state=np.random.default_rng(seed)).confidence_interval
        out["ci95"] = [float(ci.low), float(ci.high)]
    return out


def describe(entry: dict) -> str:
    """A :func:`paired_difference` as text: ``+0.050 [+0.040, +0.060]`` (no interval when it has none)."""
    ci = entry["ci95"]
    return f"{entry['mean']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")
