"""Proxy A-distance: how well a linear classifier tells two scanners apart (MRAI-NET paper, section 3.2).

d_A = 2 (1 - 2 e), e the cross-validated error of a linear SVM trained to separate samples of scanner A
from samples of scanner B (Ben-David et al. 2007). 0 means indistinguishable (chance error 0.5), 2 means
perfectly separable. Finite-sample noise can push it slightly below 0; it is reported as measured.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

__all__ = ["PADResult", "proxy_a_distance", "pad_matrix"]


@dataclass
class PADResult:
    pad: float
    error: float
    n_a: int
    n_b: int
    requested: int

    @property
    def short(self) -> bool:
        """True when a side had fewer samples than requested."""
        return min(self.n_a, self.n_b) < self.requested

    def to_dict(self) -> dict:
        return asdict(self)


def proxy_a_distance(xa, xb, n: int = 1500, folds: int = 5, C: float = 1.0, seed: int = 0) -> PADResult:
    """Proxy A-distance between samples ``xa`` (Na, ...) and ``xb`` (Nb, ...), flattened to vectors.

    ``n`` samples are drawn from each side without replacement. Both sides always get the same number
    (the smaller side's size when it has fewer than ``n``; see ``PADResult.short``): with unequal sides a
    classifier that always answers the larger one would look like a scanner difference. The error is the ``folds``-fold stratified cross-validated error of a
    standardised linear SVM.
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    rng = np.random.default_rng(seed)
    xa = np.asarray(xa, dtype=np.float64).reshape(len(xa), -1)
    xb = np.asarray(xb, dtype=np.float64).reshape(len(xb), -1)
    if xa.shape[1] != xb.shape[1]:
        raise ValueError(f"feature sizes differ: {xa.shape[1]} vs {xb.shape[1]}")
    na = nb = min(n, len(xa), len(xb))
    if min(na, nb) < folds:
        raise ValueError(f"too few samples for a {folds}-fold proxy A-distance: {len(xa)} and {len(xb)}")
    xa = xa[rng.choice(len(xa), na, replace=False)]
    xb = xb[rng.choice(len(xb), nb, replace=False)]
    x = np.concatenate([xa, xb])
    y = np.r_[np.zeros(na), np.ones(nb)]
    clf = make_pipeline(StandardScaler(), LinearSVC(C=C, dual=False, max_iter=5000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    acc = cross_val_score(clf, x, y, cv=cv, scoring="accuracy")
    err = float(1.0 - acc.mean())
    return PADResult(pad=2.0 * (1.0 - 2.0 * err), error=err, n_a=na, n_b=nb, requested=n)


def pad_matrix(samples: dict[str, np.ndarray], n: int = 1500, folds: int = 5, seed: int = 0) -> pd.DataFrame:
    """Symmetric matrix of proxy A-distances between every two groups (0 on the diagonal).

    Returns a long table (group_a, group_b, pad, error, n_a, n_b) for the upper triangle; turn it into a
    square with ``.pivot``. A pair with fewer samples than folds gets NaN rather than an error.
    """
    names = list(samples)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if min(len(samples[a]), len(samples[b])) < folds:   # too few to cross-validate: reported as n/a
                rows.append({"group_a": a, "group_b": b, "pad": np.nan, "error": np.nan, "n_a": len(samples[a]),
                             "n_b": len(samples[b]), "requested": n})
                continue
            r = proxy_a_distance(samples[a], samples[b], n=n, folds=folds, seed=seed)
            rows.append({"group_a": a, "group_b": b, **r.to_dict()})
    return pd.DataFrame(rows, columns=["group_a", "group_b", "pad", "error", "n_a", "n_b", "requested"])
