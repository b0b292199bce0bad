"""Lesion change between two sessions, lesion by lesion, in the subject's mid-space.

Both sessions' lesion masks are resampled into the mid-space (linear, then > 0.5) and split into
connected lesions (26-connectivity, as the session-level lesion tables). A later lesion that touches no
earlier lesion is *new*; one that does is *enlarging*, *stable* or *shrinking* by its volume against the
earlier lesions it touches (:data:`GROWTH`); an earlier lesion that touches no later one is *resolved*.
New lesions are the clinical question of MS follow-up (MSSEG-2), so they also get a mask of their own;
:func:`change_mask` marks every new or grown lesion voxel, the "new or enlarging T2 lesion" activity of MS
trials and what the lesion-change masks of longitudinal MS databases mark.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

STATUSES = ("new", "enlarging", "stable", "shrinking", "resolved")
GROWTH = 0.25
"""Relative volume change beyond which a lesion is enlarging (or shrinking); smaller changes are within
the segmentation's reproducibility."""
MIN_CHANGE_MM3 = 3.0
"""An absolute change below this is stable whatever its relative size (a 2-voxel lesion that gains a voxel)."""
MIN_NEW_MM3 = 10.0
"""Smallest new lesion counted: about 3 mm across (the size from which MS follow-up counts a new T2
lesion). Smaller "new" lesions are mostly a voxel or two of one session's segmentation that the other
lacks: on simulated follow-ups 11 of 18 false new lesions were under 10 mm3, and one of the 15 true
ones, a 1 mm3 sliver (benchmarks/longitudinal/new_lesions.py)."""
COLUMNS = ("ses_from", "ses_to", "lesion", "status", "volume_from_mm3", "volume_to_mm3", "centroid_x_mm",
           "centroid_y_mm", "centroid_z_mm")

_STRUCTURE = np.ones((3, 3, 3), bool)


def lesion_change(before: np.ndarray, after: np.ndarray, *, voxel_mm3: float = 1.0, affine=None,
                  ses_from: str = "", ses_to: str = "") -> tuple[pd.DataFrame, np.ndarray]:
    """``(table, new_mask)``: one row per lesion of either session (:data:`COLUMNS`), and the mask of the
    new lesions (on the grid of ``after``). ``affine`` (4x4, voxel -> mm) places the centroids."""
    a = np.asarray(before) > 0.5
    b = np.asarray(after) > 0.5
    la, na = ndi.label(a, _STRUCTURE)
    lb, nb = ndi.label(b, _STRUCTURE)
    vol_a = np.bincount(la.ravel(), minlength=na + 1) * voxel_mm3
    vol_b = np.bincount(lb.ravel(), minlength=nb + 1) * voxel_mm3
    aff = np.eye(4) if affine is None else np.asarray(affine, float)
    rows, new = [], np.zeros(b.shape, bool)
    pairs = np.stack([la[a & b], lb[a & b]], 1) if (a & b).any() else np.zeros((0, 2), int)
    touched_a = set(pairs[:, 0].tolist())
    centres_b = ndi.center_of_mass(b, lb, range(1, nb + 1)) if nb else []
    for k in range(1, nb + 1):
        earlier = sorted(set(pairs[pairs[:, 1] == k, 0].tolist()))
        v_to = float(vol_b[k])
        v_from = float(sum(vol_a[j] for j in earlier))
        if not earlier:
            if v_to < MIN_NEW_MM3:
                continue
            status = "new"
            new |= lb == k
        else:
            diff = v_to - v_from
            if abs(diff) < MIN_CHANGE_MM3 or abs(diff) <= GROWTH * v_from:
                status = "stable"
            else:
                status = "enlarging" if diff > 0 else "shrinking"
        rows.append(_row(ses_from, ses_to, len(rows) + 1, status, v_from, v_to, centres_b[k - 1], aff))
    centres_a = ndi.center_of_mass(a, la, range(1, na + 1)) if na else []
    for j in range(1, na + 1):
        if j not in touched_a and vol_a[j] >= MIN_NEW_MM3:
            rows.append(_row(ses_from, ses_to, len(rows) + 1, "resolved", float(vol_a[j]), 0.0, centres_a[j - 1], aff))
    return pd.DataFrame(rows, columns=list(COLUMNS)), new


def change_mask(before: np.ndarray, after: np.ndarray, *, voxel_mm3: float = 1.0) -> np.ndarray:
    """New or grown lesion voxels: lesion in ``after`` and not in ``before``, kept in 26-connected pieces of
    at least :data:`MIN_NEW_MM3` (a voxel or two that one session's segmentation has and the other lacks is
    not a change). A new lesion is such a piece whole; an enlarging one adds its grown rim, whatever its
    status by :data:`GROWTH`."""
    grown = (np.asarray(after) > 0.5) & ~(np.asarray(before) > 0.5)
    labels, n = ndi.label(grown, _STRUCTURE)
    if not n:
        return grown
    keep = np.bincount(labels.ravel(), minlength=n + 1) * voxel_mm3 >= MIN_NEW_MM3
    keep[0] = False
    return keep[labels]


def _row(ses_from, ses_to, k, status, v_from, v_to, centre, aff) -> dict:
    xyz = aff[:3, :3] @ np.asarray(centre, float) + aff[:3, 3]
    return {"ses_from": ses_from, "ses_to": ses_to, "lesion": k, "status": status, "volume_from_mm3": round(v_from, 1),
            "volume_to_mm3": round(v_to, 1), "centroid_x_mm": round(float(xyz[0]), 1),
            "centroid_y_mm": round(float(xyz[1]), 1), "centroid_z_mm": round(float(xyz[2]), 1)}


def counts(table: pd.DataFrame) -> dict:
    """``{status: number of lesions}`` for every status (0 when absent)."""
    got = table["status"].value_counts().to_dict() if len(table) else {}
    return {s: int(got.get(s, 0)) for s in STATUSES}


def pair_counts(table: pd.DataFrame) -> pd.DataFrame:
    """One row per consecutive pair of a lesion-change table: ``ses_from``, ``ses_to``, the number of lesions
    of each status and ``new_or_enlarging`` (the count MS trials report)."""
    rows = []
    for (a, b), pair in table.groupby(["ses_from", "ses_to"], sort=False):
        n = counts(pair)
        rows.append({"ses_from": a, "ses_to": b, **n, "new_or_enlarging": n["new"] + n["enlarging"]})
    return pd.DataFrame(rows, columns=["ses_from", "ses_to", *STATUSES, "new_or_enlarging"])
