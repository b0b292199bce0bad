"""What every group-level step receives: the gathered participant results and where to write."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass(frozen=True)
class ReportItem:
    """What a group step hands to the report: ``kind`` names the renderer in
    :data:`bidsapp.reports.harmonization.RENDERERS`, ``data`` its keyword arguments (tables, arrays,
    warnings). Steps compute; reports draw."""

    kind: str
    data: dict


@dataclass
class GroupContext:
    output_dir: Path
    work_dir: Path
    volumes: pd.DataFrame
    """group_volumes.tsv: one row per (participant, session, method) with tissue volumes and acquisition columns."""
    acquisitions: pd.DataFrame
    """One row per processed image: participant_id, session_id, acq_group and the acquisition record fields."""
    participants: pd.DataFrame
    """participants.tsv of the input dataset (may be empty)."""
    bids_dir: Path | None = None
    options: dict = field(default_factory=dict)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("scanbridge.group"))
