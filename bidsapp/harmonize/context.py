"""What every group-level step receives: the gathered participant results and where to write."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass(frozen=True)
class GroupOptions:
    """Every group-level setting, with the one set of defaults the command line and the library share.
    The command line exposes the first four (``--labels-dir``, ``--target-labels-per-tissue``,
    ``--device``, ``--seed``) and ``--nprocs``; the rest are tuning knobs for benchmarks and tests."""

    labels_dir: str | None = None
    """BIDS-Derivatives folder of manual tissue labels for the target scanners (MRAI-NET)."""
    target_labels_per_tissue: int = 100
    """Labelled voxels per tissue taken from each target acquisition group (MRAI-NET)."""
    device: str = "auto"
    seed: int = 0
    nprocs: int | None = None
    bridging_points: int = 25
    """Values of the swept sequence parameter per session (protocol bridging)."""
    mrainet_steps: int = 1500
    mrainet_batch_size: int = 128
    mrainet_source_patches_per_tissue: int = 3000
    """Labelled patches per tissue over the whole source group."""
    mrainet_pad_patches: int = 1500
    """Brain patches per group for the proxy A-distance."""
    mrainet_scanner_id: bool = True
    """Give each acquisition group's identity to MRAI-NET's fully connected layers (the reference design)."""
    mrainet_write_maps: bool = True
    mrainet_init: str = "none"
    """``none`` or ``default`` (start from the shipped MRAI-NET weights)."""

    @classmethod
    def from_any(cls, value) -> "GroupOptions":
        """From a GroupOptions, a dict (unknown keys are an error; None values take the default) or None."""
        if isinstance(value, cls):
            return value
        value = dict(value or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown group option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**{k: v for k, v in value.items() if v is not None})


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
    """group_volumes.tsv: one row per (participant, session, method) with tissue volumes and acquisition columns;
    with lesion results also ``lesion`` (mm^3) and ``lesion_count`` (the session's main lesion answer), repeated
    on each row of a session, and for a session without a T1w one row whose method is that lesion method."""
    acquisitions: pd.DataFrame
    """One row per processed image: participant_id, session_id, acq_group and the acquisition record fields."""
    participants: pd.DataFrame
    """participants.tsv of the input dataset (may be empty)."""
    bids_dir: Path | None = None
    options: GroupOptions = field(default_factory=GroupOptions)
    """A dict is accepted and turned into :class:`GroupOptions`."""
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("scanbridge.group"))

    def __post_init__(self):
        self.options = GroupOptions.from_any(self.options)
