"""Acquisition groups of a dataset: which sessions share a scanner and protocol, and which one is the source.

The group key itself is made at discovery (``AcquisitionRecord.group_key``: vendor, model, field, sequence
family) and arrives here as the ``acq_group`` column. This module summarises the groups for the report,
assigns one group to each session (its T1w's) and picks the MRAI-NET source: the group with the most
labelled data.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bidsapp.bids.tables import bids_columns, normalize_ids

__all__ = ["acquisition_table", "session_groups", "summarize_groups",
           "choose_source_group", "GROUP_FIELDS"]

GROUP_FIELDS = ("Manufacturer", "ManufacturersModelName", "MagneticFieldStrength", "SequenceFamily",
                "RepetitionTime", "EchoTime", "InversionTime", "FlipAngle")


def acquisition_table(acquisitions: pd.DataFrame | None, volumes: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per T1w image with BIDS-named acquisition columns, from the acquisitions table or, when that
    is empty, from the acquisition columns that group_volumes.tsv repeats."""
    src = acquisitions if acquisitions is not None and len(acquisitions) else volumes
    if src is None or not len(src):
        return pd.DataFrame(columns=["participant_id", "session_id", "acq_group", *GROUP_FIELDS])
    df = bids_columns(src)
    if "suffix" in df.columns and (df["suffix"] == "T1w").any():
        df = df[df["suffix"] == "T1w"]
    df = normalize_ids(df)
    if "acq_group" not in df.columns:
        df["acq_group"] = "unknown"
    df["acq_group"] = df["acq_group"].fillna("unknown").astype(str)
    for c in GROUP_FIELDS:
        if c not in df.columns:
            df[c] = np.nan
    return df.reset_index(drop=True)


def session_groups(acquisitions: pd.DataFrame | None, volumes: pd.DataFrame | None = None) -> pd.DataFrame:
    """(participant_id, session_id, acq_group, site): the group of each session's first T1w."""
    df = acquisition_table(acquisitions, volumes)
    cols = ["participant_id", "session_id", "acq_group"] + (["site"] if "site" in df.columns else [])
    out = df[cols].drop_duplicates(["participant_id", "session_id"]).reset_index(drop=True)
    if "site" not in out.columns:
        out["site"] = ""
    return out


def _summary_value(values: pd.Series):
    v = values.dropna()
    if v.empty:
        return np.nan
    num = pd.to_numeric(v, errors="coerce")
    if num.notna().all():
        return float(num.median())
    uniq = sorted(set(map(str, v)))
    return uniq[0] if len(uniq) == 1 else " / ".join(uniq[:3]) + (" ..." if len(uniq) > 3 else "")


def summarize_groups(acquisitions: pd.DataFrame | None, volumes: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per acquisition group: vendor, model, field, sequence, median TR/TE/TI (s) and flip (deg),
    number of subjects, sessions and images."""
    df = acquisition_table(acquisitions, volumes)
    rows = []
    for g, sub in df.groupby("acq_group", sort=True):
        row = {"acq_group": g}
        for c in GROUP_FIELDS:
            row[c] = _summary_value(sub[c])
        row["n_subjects"] = int(sub["participant_id"].nunique())
        row["n_sessions"] = int(sub[["participant_id", "session_id"]].drop_duplicates().shape[0])
        row["n_images"] = int(len(sub))
        rows.append(row)
    return pd.DataFrame(rows, columns=["acq_group", *GROUP_FIELDS, "n_subjects", "n_sessions", "n_images"])


def choose_source_group(labelled: dict[str, int], sessions: dict[str, int] | None = None) -> str | None:
    """The group with the most labelled voxels/patches; ties go to more sessions, then to the name."""
    candidates = [g for g, n in labelled.items() if n > 0]
    if not candidates:
        return None
    sessions = sessions or {}
    return max(candidates, key=lambda g: (labelled[g], sessions.get(g, 0), str(g)))
