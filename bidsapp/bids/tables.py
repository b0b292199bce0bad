"""Table conventions shared by the group level and the reports: BIDS ids and BIDS column names.

Tables arrive from several places (derivative sidecars, participants.tsv, the acquisition records of
discovery) with ids as ``01`` or ``sub-01`` and acquisition columns under record or BIDS names; these
helpers bring them to one form.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bidsapp.bids.acquisition import BIDS_NAMES

_RENAMED = ("manufacturer", "model", "field_strength", "sequence_family", "repetition_time", "echo_time",
            "inversion_time", "flip_angle", "group_key")
"""Record attributes that tables carry under their BIDS names."""


def _prefixed(value, prefix: str) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    s = str(value).strip()
    if s in ("", "nan", "None", "n/a"):
        return ""
    return s if s.startswith(prefix) else prefix + s


def bids_columns(df: pd.DataFrame) -> pd.DataFrame:
    """AcquisitionRecord-style column names renamed to their BIDS sidecar names, where those are not there."""
    names = {k: BIDS_NAMES[k] for k in _RENAMED}
    return df.rename(columns={k: v for k, v in names.items() if k in df.columns and v not in df.columns})


def normalize_ids(df: pd.DataFrame) -> pd.DataFrame:
    """participant_id as ``sub-X`` and session_id as ``ses-Y`` or "" (no sessions), whatever the input had."""
    df = df.copy()
    if "participant_id" in df.columns:
        df["participant_id"] = [_prefixed(v, "sub-") for v in df["participant_id"]]
    if "session_id" not in df.columns:
        df["session_id"] = ""
    df["session_id"] = [_prefixed(v, "ses-") for v in df["session_id"]]
    return df
