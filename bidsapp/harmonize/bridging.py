"""Bridging a protocol change with the physics-aware model (physics-informed paper, section 3.5).

Subjects scanned before and after a protocol change (two sessions whose T1w protocol differs) give
pairs of images of the same brain. Re-running the physics model on each image with hypothetical
sequence parameters (``InversionTime`` for MPRAGE, ``FlipAngle`` for SPGR, over the training range)
gives GM/WM volume curves; on a training split of subjects we pick the (pre, post) parameter pair
that minimises the mean percent volume difference between sessions (the white point of Fig. 4),
then apply that pair to the held-out subjects. Reported, on the test subjects: the mean absolute
percent difference of GM and WM volume between sessions uncorrected, after a linear correction of
baseline volumes fitted on the training split (the paper's GIF-Corrected), and with the physics
bridge (paper: 5 %, 3 %, 2 %).

Split: with at least six subjects a seeded random split (55 % training, as the paper's 12/22);
with two to five, leave-one-out (each subject bridged with the pair found on the others); with one,
only the training contour is shown.

Outputs: ``output_dir/group_bridging.tsv`` (long format: ``method``, ``correction``, ``tissue``,
``mean_abs_diff_pct``, ``n_test``, ``split``, ``parameter``, ``pre_value``, ``post_value``) and one
report section with the Fig. 4 contours.

Library functions (no I/O): :func:`percent_difference`, :func:`bridge_from_curves`,
:func:`linear_bridge`, :func:`split_subjects`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bidsapp.bids.acquisition import lookup

BRIDGED = ("GM", "WM")
"""The tissue volumes protocol bridging corrects (CSF is too thin at 2 mm to bridge reliably)."""
SWEEP = {
    # family -> (BIDS parameter swept, lower, upper); the physics model's training range
    "MPRAGE": ("InversionTime", 0.6, 1.2),
    "SPGR": ("FlipAngle", 15.0, 75.0),
}
SWEEP_KNOTS = 13
"""Values at which the network runs; the curves on the finer ``bridging_points`` grid are interpolated
(PCHIP: smooth, and it never makes a minimum the network did not). Volume curves are smooth in the
swept parameter: on four demo sessions the interpolated 25-point curves were within 0.11 % (GM) and
0.013 % (WM) of the network run at all 25 values, whose curves span 1.3-3.9 % of the volume, in 55 %
of the time."""
TSV_NAME = "group_bridging.tsv"
TSV_COLUMNS = ("method", "correction", "tissue", "mean_abs_diff_pct", "n_test", "split", "parameter",
               "pre_value", "post_value")
_PREFERRED_METHODS = ("unet-physics", "unet", "atropos")


# ------------------------------------------------------------------------------------- pure maths
def percent_difference(a, b):
    """|a - b| / mean(a, b) * 100, elementwise (0 where both are 0)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    m = (a + b) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(m > 0, np.abs(a - b) / np.where(m > 0, m, 1) * 100.0, 0.0)


@dataclass
class BridgeResult:
    surface: np.ndarray
    """(T, A, B) mean percent difference over the training subjects per tissue and (pre, post) pair."""
    best: tuple[int, int]
    """Indices (pre, post) minimising the mean over tissues of ``surface``."""
    test_pct: np.ndarray
    """(n_test, T) percent difference of each test subject at the training optimum."""
    test_best: list = field(default_factory=list)
    """Per test subject, the (pre, post) indices that would have been best for it alone."""


def bridge_from_curves(pre: np.ndarray, post: np.ndarray, train, test) -> BridgeResult:
    """Find the (pre, post) parameter pair on ``train`` and apply it to ``test``.

    ``pre`` (S, A, T) and ``post`` (S, B, T): volumes of each subject's pre- and post-change image
    for each of A (B) hypothetical parameter values and T tissues.
    """
    pre, post = np.asarray(pre, float), np.asarray(post, float)
    train, test = list(train), list(test)
    if not train:
        raise ValueError("bridging needs at least one training subject")
    # (S, T, A, B)
    diff = percent_difference(pre[:, :, None, :].transpose(0, 3, 1, 2), post[:, None, :, :].transpose(0, 3, 1, 2))
    surface = diff[train].mean(axis=0)
    flat = int(np.argmin(surface.mean(axis=0)))
    best = np.unravel_index(flat, surface.shape[1:])
    best = (int(best[0]), int(best[1]))
    test_pct = diff[test][:, :, best[0], best[1]] if test else np.zeros((0, pre.shape[2]))
    test_best = []
    for s in test:
        i = np.unravel_index(int(np.argmin(diff[s].mean(axis=0))), diff.shape[2:])
        test_best.append((int(i[0]), int(i[1])))
    return BridgeResult(surface=surface, best=best, test_pct=test_pct, test_best=test_best)


def linear_bridge(pre: np.ndarray, post: np.ndarray, train, test) -> np.ndarray:
    """(n_test, T) percent difference after mapping baseline volumes with post ~ a + b * pre fitted on
    ``train`` per tissue (a ratio when only one training subject)."""
    pre, post = np.asarray(pre, float), np.asarray(post, float)
    train, test = list(train), list(test)
    out = np.zeros((len(test), pre.shape[1]))
    for t in range(pre.shape[1]):
        x, y = pre[train, t], post[train, t]
        if len(train) >= 2 and np.ptp(x) > 0:
            b, a = np.polyfit(x, y, 1)
        else:
            a, b = 0.0, float(np.sum(y) / np.sum(x)) if np.sum(x) > 0 else 1.0
        out[:, t] = percent_difference(a + b * pre[test, t], post[test, t])
    return out


def split_subjects(n: int, seed: int = 0) -> tuple[str, list[tuple[list[int], list[int]]]]:
    """('split'|'leave-one-out'|'training-only', [(train, test), ...]) for ``n`` subjects."""
    if n >= 6:
        perm = np.random.default_rng(seed).permutation(n)
        k = int(math.ceil(0.55 * n))
        return "split", [(sorted(perm[:k].tolist()), sorted(perm[k:].tolist()))]
    if n >= 2:
        return "leave-one-out", [([j for j in range(n) if j != i], [i]) for i in range(n)]
    return "training-only", [(list(range(n)), [])]


# ------------------------------------------------------------------------------------- dataset side
def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(s))]


def find_protocol_changes(acquisitions: pd.DataFrame) -> pd.DataFrame:
    """One row per subject whose T1w protocol changes between sessions: the first session and the
    first later session with a different protocol: ``protocol_key`` of ``group_acquisitions.tsv``
    (vendor, model, field, family and TR/TE/TI/flip, so a TI change on the same scanner counts),
    else ``protocol``, else ``acq_group``."""
    cols = ["participant_id", "pre_session", "post_session", "pre_protocol", "post_protocol"]
    if acquisitions is None or acquisitions.empty or "session_id" not in acquisitions.columns:
        return pd.DataFrame(columns=cols)
    key = next((k for k in ("protocol_key", "protocol", "acq_group") if k in acquisitions.columns), None)
    if key is None:
        return pd.DataFrame(columns=cols)
    df = acquisitions.copy()
    if "suffix" in df.columns and (df["suffix"] == "T1w").any():
        df = df[df["suffix"] == "T1w"]
    df = df[df["session_id"].astype(str).str.startswith("ses-")]
    rows = []
    for pid, sub in df.groupby("participant_id"):
        sub = sub.drop_duplicates("session_id")
        sessions = sorted(sub["session_id"], key=_natural)
        if len(sessions) < 2:
            continue
        proto = dict(zip(sub["session_id"], sub[key].astype(str)))
        first = sessions[0]
        later = [s for s in sessions[1:] if proto[s] != proto[first]]
        if later:
            rows.append([pid, first, later[0], proto[first], proto[later[0]]])
    return pd.DataFrame(rows, columns=cols)


def _acq_dict(row: pd.Series) -> dict:
    """Acquisition dict for the tissue model from a group acquisitions row (BIDS or record names)."""
    names = ("InversionTime", "RepetitionTime", "EchoTime", "FlipAngle", "MagneticFieldStrength")
    return {"sequence_family": lookup(row, "SequenceFamily"), **{n: lookup(row, n) for n in names}}


def session_images(output_dir: Path, participant: str, session: str) -> tuple[Path, Path] | None:
    """(preproc T1w, brain mask) derivatives of a session, or None."""
    from bidsapp.bids.collect import session_files

    ses = session.removeprefix("ses-") or None
    for f in session_files(output_dir, participant.removeprefix("sub-"), ses):
        if f.t1w is not None and f.mask is not None and f.session == ses:
            return f.t1w, f.mask
    return None


def _session_volumes(volumes: pd.DataFrame, pid: str, ses: str) -> dict:
    """method -> (GM, WM) volumes recorded at the participant level for a session."""
    if volumes is None or volumes.empty or not {"participant_id", "session_id", "method"} <= set(volumes.columns):
        return {}
    sub = volumes[(volumes["participant_id"] == pid) & (volumes["session_id"] == ses)]
    out = {}
    for _, r in sub.iterrows():
        vals = [r.get(t) for t in BRIDGED]
        if all(v is not None and pd.notna(v) for v in vals):
            out[str(r["method"])] = tuple(float(v) for v in vals)
    return out


def _sweep(t1: Path, mask: Path, acq: dict, parameter: str, grid, device) -> np.ndarray:
    """GM and WM volume curves of one session over ``grid`` (the network at :data:`SWEEP_KNOTS` values)."""
    import nibabel as nib
    from scipy.interpolate import PchipInterpolator

    from bidsapp.models import tissue

    grid = np.asarray(grid, float)
    knots = grid if len(grid) <= SWEEP_KNOTS else np.linspace(grid.min(), grid.max(), SWEEP_KNOTS)
    img = nib.load(str(t1))
    m = nib.load(str(mask))
    vols = tissue.sweep_volumes(np.asarray(img.dataobj, dtype=np.float32), np.asarray(m.dataobj) > 0,
                                img.header.get_zooms()[:3], acq, parameter, knots, device=device)
    vols = vols[:, [tissue.CLASSES.index(t) for t in BRIDGED]]
    return vols if knots is grid else PchipInterpolator(knots, vols, axis=0)(grid)


def run(ctx) -> list:
    """Group step: bridge every protocol change found in the dataset; returns what the report shows."""
    from bidsapp.bids.derivatives import atomic_write_tsv
    from bidsapp.harmonize.context import ReportItem

    log = ctx.logger
    changes = find_protocol_changes(ctx.acquisitions)
    if changes.empty:
        return [ReportItem("bridging_none", {"message": "No subject has sessions acquired with different T1w "
                                                        "protocols, so there is no protocol change to bridge."})]
    from bidsapp.harmonize.context import GroupOptions

    opts = GroupOptions.from_any(ctx.options)
    n_points = int(opts.bridging_points)
    device = opts.device
    acq = ctx.acquisitions
    warnings, by_family = [], {}
    for _, ch in changes.iterrows():
        pid = ch["participant_id"]
        rows = {s: acq[(acq["participant_id"] == pid) & (acq["session_id"] == s)].iloc[0]
                for s in (ch["pre_session"], ch["post_session"])}
        acqs = {s: _acq_dict(r) for s, r in rows.items()}
        fams = {a["sequence_family"] for a in acqs.values()}
        if len(fams) != 1 or next(iter(fams)) not in SWEEP:
            warnings.append(f"{pid}: {' -> '.join(str(a['sequence_family']) for a in acqs.values())} change; "
                            "bridging needs the same MPRAGE or SPGR family before and after")
            continue
        fam = next(iter(fams))
        images = {s: session_images(ctx.output_dir, pid, s) for s in acqs}
        if any(v is None for v in images.values()):
            warnings.append(f"{pid}: preprocessed T1w or brain mask missing for {', '.join(s for s, v in images.items() if v is None)}")
            continue
        by_family.setdefault(fam, []).append((pid, ch, acqs, images))

    sections, rows = [], []
    n_done, n_all = 0, sum(len(v) for v in by_family.values())
    for fam, items in by_family.items():
        parameter, lo, hi = SWEEP[fam]
        grid = np.linspace(lo, hi, n_points)
        pre_c, post_c, base, kept = [], [], {}, []
        for pid, ch, acqs, images in items:
            n_done += 1
            try:
                cur = [_sweep(*images[s], acqs[s], parameter, grid, device) for s in (ch["pre_session"], ch["post_session"])]
            except ValueError as exc:
                warnings.append(f"{pid}: {exc}")
                continue
            pre_c.append(cur[0])
            post_c.append(cur[1])
            kept.append((pid, ch, acqs))
            pv, qv = (_session_volumes(ctx.volumes, pid, ch[k]) for k in ("pre_session", "post_session"))
            for method in set(pv) & set(qv):
                base.setdefault(method, {})[pid] = (pv[method], qv[method])
            log.info("bridging: %s swept %d %s values per session  [%d/%d subjects]", pid, n_points, parameter,
                     n_done, n_all)
        if not kept:
            continue
        pre_c, post_c = np.stack(pre_c), np.stack(post_c)
        pids = [k[0] for k in kept]
        scheme, folds = split_subjects(len(kept), int(opts.seed or 0))
        results = [bridge_from_curves(pre_c, post_c, tr, te) for tr, te in folds]
        # the contour and white point: the training split, or every subject for leave-one-out
        shown = results[0] if scheme == "split" else bridge_from_curves(pre_c, post_c, range(len(kept)), [])
        pre_val, post_val = float(grid[shown.best[0]]), float(grid[shown.best[1]])
        test_ids = [i for _, te in folds for i in te]
        fam_rows = []
        if test_ids:
            common = dict(n_test=len(test_ids), split=scheme, parameter=parameter)
            for method in sorted(base, key=lambda m: (_PREFERRED_METHODS + (m,)).index(m)):
                if not all(p in base[method] for p in pids):
                    continue
                pre_v = np.array([base[method][p][0] for p in pids])
                post_v = np.array([base[method][p][1] for p in pids])
                fam_rows += _rows(method, "uncorrected", percent_difference(pre_v[test_ids], post_v[test_ids]),
                                  common, np.nan, np.nan)
                lin = np.concatenate([linear_bridge(pre_v, post_v, tr, te) for tr, te in folds])
                fam_rows += _rows(method, "linear", lin, common, np.nan, np.nan)
            phys = np.concatenate([r.test_pct for r in results])
            fam_rows += _rows("unet-physics", "physics-bridge", phys, common,
                              pre_val if scheme == "split" else np.nan, post_val if scheme == "split" else np.nan)
        else:
            warnings.append(f"only one subject with a {fam} protocol change: the optimum is shown but not tested")
        rows += fam_rows
        test_points = [(float(grid[a]), float(grid[b])) for r in results for a, b in r.test_best]
        sections.append(ReportItem("bridging", dict(
            family=fam, parameter=parameter, grid=grid, surface=shown.surface, best=(pre_val, post_val),
            test_points=test_points, summary=pd.DataFrame(fam_rows, columns=TSV_COLUMNS),
            subjects=pids, scheme=scheme, warnings=warnings)))
        warnings = []
    table = pd.DataFrame(rows, columns=TSV_COLUMNS)
    atomic_write_tsv(Path(ctx.output_dir) / TSV_NAME, table, columns=TSV_COLUMNS)
    if not sections:
        return [ReportItem("bridging_none", {"message": "Protocol changes were found but none could be bridged.",
                                             "warnings": warnings})]
    return sections


def _rows(method, correction, arr, common, pre_value, post_value) -> list[dict]:
    arr = np.asarray(arr, float)
    out = []
    for j, t in enumerate(BRIDGED):
        out.append(dict(method=method, correction=correction, tissue=t, mean_abs_diff_pct=float(np.mean(arr[:, j])),
                        pre_value=pre_value, post_value=post_value, **common))
    out.append(dict(method=method, correction=correction, tissue="mean", mean_abs_diff_pct=float(np.mean(arr)),
                    pre_value=pre_value, post_value=post_value, **common))
    return out
