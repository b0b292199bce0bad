"""The subject level: a subject's sessions -> mid-space template, transforms and change table.

:func:`subject_change` is the whole computation on plain files (the Nipype node in
:mod:`workflows.interfaces.longitudinal` wraps it). Pairs: every consecutive pair of sessions (in
acquisition order when every session has an ``acq_time``, else in label order) and the first to the
last. The table is long format, one row per measure and pair (:data:`COLUMNS`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import change as C
from . import midspace as MS

MIN_ANNUAL_DAYS = 90
"""Shortest interval given a rate per year (annualising a rescan a day apart multiplies its noise by 365)."""
COLUMNS = ("measure", "ses_from", "ses_to", "interval_days", "volume_from_mm3", "volume_to_mm3", "percent_change",
           "percent_change_per_year", "percent_change_raw", "acquisition_changed", "correction")
COLUMN_DESCRIPTIONS = {
    "measure": {"Description": "what changed",
                "Levels": {"brain": "brain tissue (parenchyma: GM + WM)", "GM": "grey matter", "WM": "white matter",
                           "CSF": "CSF inside the brain masks", "ventricles": "CSF deeper than 12 mm in the brain",
                           "lesion": "the main lesion model's lesions"}},
    "ses_from": {"Description": "earlier session"},
    "ses_to": {"Description": "later session"},
    "interval_days": {"Description": "days between the sessions' acq_time (sessions.tsv or scans.tsv)",
                      "Units": "day"},
    "volume_from_mm3": {"Description": "volume at ses_from, measured in the subject's mid-space", "Units": "mm^3"},
    "volume_to_mm3": {"Description": "volume at ses_to, measured in the subject's mid-space", "Units": "mm^3"},
    "percent_change": {"Description": "100 (volume_to / volume_from - 1), after the correction", "Units": "%"},
    "percent_change_per_year": {"Description": "percent_change / (interval_days / 365.25); n/a when the interval "
                                               "is unknown or shorter than 90 days", "Units": "%/year"},
    "percent_change_raw": {"Description": "percent_change without any correction for an acquisition change",
                           "Units": "%"},
    "acquisition_changed": {"Description": "whether the two sessions' acquisitions differ (scanner, sequence "
                                           "family or TR/TE/TI/flip angle); n/a when a session has no sidecar"},
    "correction": {"Description": "what was applied for an acquisition change, or none"},
}


@dataclass
class SessionInput:
    label: str
    image: str
    """The session's image of the subject's common contrast (preprocessed, on the session's grid)."""
    mask: str
    tissue: dict | None = None
    """GM/WM/CSF probability maps on the same grid (None: the session has no tissue segmentation)."""
    lesion: str | None = None
    acquisition: str | None = None
    """The protocol key of the image's acquisition (None: unknown)."""
    acq_time: str | None = None
    csf_inverted: bool = False
    """Whether the sequence parameters put CSF's signal opposite to the tissues' (read unfolded, see
    :mod:`.change`); False when unknown."""


@dataclass
class SubjectChange:
    table: pd.DataFrame
    template: object
    """The mid-space template (ants image)."""
    to_session: list
    """4x4 mid-space -> session matrices, in the order of ``sessions``."""
    sessions: list
    maps: dict = field(default_factory=dict)
    """(ses_from, ses_to) -> tissue-fraction change map (numpy, mid-space grid), for the report."""
    warnings: list = field(default_factory=list)
    lesions: pd.DataFrame | None = None
    """Lesion by lesion change between consecutive sessions with lesion masks (:mod:`.lesions`); None without."""
    new_lesions: dict = field(default_factory=dict)
    """Session label -> its new lesions (ants image on the session's own grid; empty where none can be new)."""
    lesion_maps: dict = field(default_factory=dict)
    """(ses_from, ses_to) -> (earlier lesions, new lesions, new or grown voxels): boolean mid-space masks of each
    consecutive pair with lesion masks, for the report."""
    lesion_changes: dict = field(default_factory=dict)
    """Session label -> its new or grown lesion voxels since the previous lesion session (:func:`.lesions.change_mask`;
    as ``new_lesions``)."""
    decline: pd.DataFrame | None = None
    """3D-SiameseNet's decline probability per consecutive pair (:mod:`.decline`); None when not run."""


def order_sessions(sessions: list[SessionInput]) -> list[SessionInput]:
    """By acquisition time when every session has one, else as given (BIDS label order)."""
    times = [parse_time(s.acq_time) for s in sessions]
    if all(t is not None for t in times):
        return [s for _, s in sorted(zip(times, sessions), key=lambda p: p[0])]
    return list(sessions)


def parse_time(text) -> dt.datetime | None:
    if text is None or (isinstance(text, float) and not np.isfinite(text)):
        return None
    try:
        return dt.datetime.fromisoformat(str(text).strip().replace("Z", "+00:00")).replace(tzinfo=None)
    except ValueError:
        return None


def interval_days(a: SessionInput, b: SessionInput) -> float:
    ta, tb = parse_time(a.acq_time), parse_time(b.acq_time)
    if ta is None or tb is None:
        return float("nan")
    return (tb - ta).total_seconds() / 86400.0


def pairs(n: int) -> list[tuple[int, int]]:
    """Consecutive pairs, then first -> last when there are more than two sessions."""
    out = [(i, i + 1) for i in range(n - 1)]
    return out + ([(0, n - 1)] if n > 2 else [])


def acquisition_changed(a: SessionInput, b: SessionInput):
    if not a.acquisition or not b.acquisition or "unknown-unknown" in a.acquisition + b.acquisition:
        return None
    return a.acquisition != b.acquisition


def correction_text(correction: str, a: SessionInput, b: SessionInput) -> str:
    """The ``correction`` column: the pair's recalibration, and, whenever it applies, which sessions
    were read with their CSF signal unfolded (part of the answer, so said even when nothing changed)."""
    folded = [s.label for s in (a, b) if s.csf_inverted]
    if not folded:
        return correction
    note = f"CSF signal inverted in {', '.join(folded)} (from the sequence parameters), read unfolded"
    return note if correction == "none" else f"{correction}; {note}"


@dataclass
class InMidspace:
    """A subject's sessions on the mid-space grid, as every reading of them starts."""

    sessions: list
    """The sessions, in measurement order (:func:`order_sessions`)."""
    midspace: object
    """:func:`bidsapp.longitudinal.midspace.build_midspace`'s result."""
    images: list
    """The sessions' images (ants), on their own grids."""
    mids: list
    """Images on the mid-space grid (numpy)."""
    masks: list
    tissues: list
    """GM/WM/CSF maps per session (dict of numpy), or None."""
    lesions: list
    common: C.Common
    norm: list
    """``mids`` normalised (:func:`bidsapp.longitudinal.change.normalise`)."""


def in_midspace(sessions: list[SessionInput], *, seed: int, work_dir, contrast: str = "T1w") -> InMidspace:
    """Order the sessions, build their mid-space and resample each session's image, mask, tissue maps and
    lesion mask onto it once; the common sets and normalised images every reading uses (``contrast``: the
    images' suffix)."""
    import ants

    sessions = order_sessions(sessions)
    work = Path(work_dir)
    images = [ants.image_read(s.image) for s in sessions]
    masks = [ants.image_read(s.mask) for s in sessions]
    ms = MS.build_midspace(images, masks, seed=seed, work_dir=work)

    def mid(img, i, interpolator="linear"):
        return MS.resample(img, ms.grid, ms.to_session[i], interpolator, work_dir=work, name=f"to_mid_{i}").numpy()

    mids = [mid(img, i, MS.IMAGE_INTERPOLATOR) for i, img in enumerate(images)]
    mask_mid = [mid(m, i) for i, m in enumerate(masks)]
    tissues = [({c: mid(ants.image_read(p), i) for c, p in s.tissue.items()} if s.tissue else None)
               for i, s in enumerate(sessions)]
    lesions = [(mid(ants.image_read(s.lesion), i) if s.lesion else None) for i, s in enumerate(sessions)]
    ones = [img.new_image_like(np.ones(img.shape, np.float32)) for img in images]
    seen = np.min([mid(one, i) for i, one in enumerate(ones)], 0) > 0.5  # inside every session's field of view
    common = C.common_space(mask_mid, tissues, spacing=tuple(ms.grid.spacing), template=ms.template.numpy(),
                           images=mids, csf_dark=contrast not in C.CSF_BRIGHT, seen=seen)
    return InMidspace(sessions=sessions, midspace=ms, images=images, mids=mids, masks=mask_mid, tissues=tissues,
                      lesions=lesions, common=common, norm=[C.normalise(m, common) for m in mids])


def subject_change(sessions: list[SessionInput], *, seed: int = 0, work_dir=None, progress=None,
                   decline: bool = False, device="cpu", contrast: str = "T1w") -> SubjectChange:
    """Mid-space, template and change table of one subject (see the module docstring); with ``decline``
    (T1w sessions and the network's weights), the decline probability of every consecutive pair.
    ``contrast``: the sessions' images' suffix."""
    if len(sessions) < 2:
        raise ValueError("longitudinal change needs at least two sessions")
    if work_dir is None:  # the transforms written on the way need a folder; leave none behind
        import tempfile

        with tempfile.TemporaryDirectory(prefix="subject_change_") as tmp:
            return subject_change(sessions, seed=seed, work_dir=tmp, progress=progress, decline=decline,
                                  device=device, contrast=contrast)
    say = progress or (lambda msg: None)
    work = Path(work_dir)
    say(f"mid-space of {len(sessions)} sessions")
    mid = in_midspace(sessions, seed=seed, work_dir=work, contrast=contrast)
    sessions, ms, images, common, norm = mid.sessions, mid.midspace, mid.images, mid.common, mid.norm
    mids, mask_mid, lesions = mid.mids, mid.masks, mid.lesions
    rows, maps, warnings = [], {}, []
    for i, j in pairs(len(sessions)):
        a, b = sessions[i], sessions[j]
        changed = acquisition_changed(a, b)
        both_lesions = lesions[i] is not None and lesions[j] is not None
        # unknown acquisitions (no sidecars) are read as changed: nothing says the contrast stayed the same (a
        # pooled reading whenever grid and tissue intensities agree read real pseudo-rescans worse, see the notebook)
        res = C.pair_volumes(norm[i], norm[j], common, changed=changed is not False,
                             lesion_a=lesions[i] if both_lesions else None,
                             lesion_b=lesions[j] if both_lesions else None,
                             csf_inverted=(a.csf_inverted, b.csf_inverted), tissue_a=mid.tissues[i])
        correction = correction_text(res.correction, a, b)
        days = interval_days(a, b)
        if changed:
            warnings.append(f"{a.label} -> {b.label}: the acquisition changed ({a.acquisition} -> {b.acquisition}); "
                            f"change corrected ({C.RECALIBRATED}), the raw figure is kept")
        for measure in C.MEASURES:
            v0, v1 = res.volume_from[measure], res.volume_to[measure]
            pct = C.percent(v0, v1)
            raw = C.percent(res.raw_from[measure], res.raw_to[measure])
            per_year = pct / (days / 365.25) if np.isfinite(days) and days >= MIN_ANNUAL_DAYS and np.isfinite(pct) \
                else float("nan")
            rows.append({"measure": measure, "ses_from": a.label, "ses_to": b.label, "interval_days": days,
                         "volume_from_mm3": v0, "volume_to_mm3": v1, "percent_change": pct,
                         "percent_change_per_year": per_year, "percent_change_raw": raw,
                         "acquisition_changed": _changed_text(changed),
                         "correction": correction})
        maps[(a.label, b.label)] = res.shift
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    result = SubjectChange(table=table, template=ms.template, to_session=ms.to_session, sessions=sessions,
                           maps=maps, warnings=warnings)
    if decline:
        from . import decline as D

        say("decline probability of consecutive pairs (3D-SiameseNet)")
        consecutive = [(i, i + 1) for i in range(len(sessions) - 1)]
        got = D.decline_rows(mids, mask_mid, _index_to_ras(ms.grid), consecutive,
                             csf_inverted=[s.csf_inverted for s in sessions], device=device)
        result.decline = pd.DataFrame([{
            "ses_from": sessions[i].label, "ses_to": sessions[j].label,
            "interval_days": interval_days(sessions[i], sessions[j]),
            "acquisition_changed": _changed_text(acquisition_changed(sessions[i], sessions[j])),
            "probability_decline": r["probability_decline"], "call": r["call"]}
            for r, (i, j) in zip(got, consecutive)], columns=list(D.COLUMNS))
    with_lesions = [i for i, les in enumerate(lesions) if les is not None]
    if len(with_lesions) >= 2:
        from . import lesions as L

        affine = _index_to_ras(ms.grid)
        tables = []
        for i, j in zip(with_lesions, with_lesions[1:]):
            t, new = L.lesion_change(lesions[i], lesions[j], voxel_mm3=common.voxel_mm3, affine=affine,
                                     ses_from=sessions[i].label, ses_to=sessions[j].label)
            tables.append(t)
            changed = L.change_mask(lesions[i], lesions[j], voxel_mm3=common.voxel_mm3)
            result.lesion_maps[(sessions[i].label, sessions[j].label)] = (lesions[i] > 0.5, new, changed)
            back = np.linalg.inv(ms.to_session[j])  # session -> mid-space: resamples the mid-space onto the session
            for masks, mask, name in ((result.new_lesions, new, "new_lesions"),
                                      (result.lesion_changes, changed, "lesion_change")):
                masks[sessions[j].label] = MS.resample(ms.grid.new_image_like(mask.astype(np.float32)), images[j],
                                                       back, interpolator="nearestNeighbor", work_dir=work,
                                                       name=f"{name}_{j}")
        result.lesions = pd.concat(tables, ignore_index=True)
        for i, s in enumerate(sessions):  # nothing new: the first session with lesions, those without any
            for masks in (result.new_lesions, result.lesion_changes):
                if s.label not in masks:
                    masks[s.label] = images[i].new_image_like(np.zeros(images[i].shape, np.float32))
    return result


def _changed_text(changed) -> str:
    return "n/a" if changed is None else str(bool(changed)).lower()


def _index_to_ras(img) -> np.ndarray:
    """4x4 voxel index -> scanner RAS mm of an ants image (ITK's physical space is LPS), as NIfTI affines."""
    d = np.asarray(img.direction, float) * np.asarray(img.spacing, float)[None, :]
    out = np.eye(4)
    out[:3, :3] = d
    out[:3, 3] = img.origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ out


def format_table(table: pd.DataFrame) -> pd.DataFrame:
    """Rounded for writing: volumes to 0.1 mm3, percents to 0.001, days to 0.1; NaN as n/a."""
    out = table.copy()
    for col, nd in (("volume_from_mm3", 1), ("volume_to_mm3", 1), ("interval_days", 1), ("percent_change", 3),
                    ("percent_change_per_year", 3), ("percent_change_raw", 3)):
        out[col] = out[col].astype(float).round(nd)
    return out
