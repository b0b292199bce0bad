"""Group step of the longitudinal method: every subject's change rows in one table, and the plot that shows
whether a scanner change looks like atrophy (change per year, pairs with and without an acquisition change);
with lesion masks, every subject's lesion activity (new and enlarging lesions per consecutive pair, the count
MS trials report) in a second table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .subject import COLUMNS

TSV_NAME = "group_change.tsv"
LESION_TSV_NAME = "group_lesionchange.tsv"


def collect(output_dir) -> pd.DataFrame:
    """``sub-*/anat/sub-*_desc-change_morph.tsv`` of ``output_dir``, with ``participant_id`` first."""
    frames = []
    for path in sorted(Path(output_dir).glob("sub-*/anat/sub-*_desc-change_morph.tsv")):
        table = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False,
                            dtype={"ses_from": str, "ses_to": str, "acquisition_changed": str, "correction": str})
        table.insert(0, "participant_id", path.name.split("_")[0])
        frames.append(table)
    if not frames:
        return pd.DataFrame(columns=["participant_id", *COLUMNS])
    return pd.concat(frames, ignore_index=True)


def lesion_activity(output_dir) -> pd.DataFrame:
    """:func:`.lesions.pair_counts` of every ``sub-*/anat/sub-*_desc-lesionchange_stats.tsv``, with
    ``participant_id`` first."""
    from .lesions import STATUSES, pair_counts

    frames = []
    for path in sorted(Path(output_dir).glob("sub-*/anat/sub-*_desc-lesionchange_stats.tsv")):
        rows = pair_counts(pd.read_csv(path, sep="\t", dtype={"ses_from": str, "ses_to": str}))
        rows.insert(0, "participant_id", path.name.split("_")[0])
        frames.append(rows)
    columns = ["participant_id", "ses_from", "ses_to", *STATUSES, "new_or_enlarging"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def run(ctx) -> list:
    """Write ``group_change.tsv`` and return what the report shows (nothing when no subject has two sessions)."""
    from bidsapp.bids.derivatives import atomic_write_tsv
    from bidsapp.harmonize.context import ReportItem

    table = collect(ctx.output_dir)
    if table.empty:
        ctx.logger.info("longitudinal change: no subject with a change table; %s not written", TSV_NAME)
        return []
    atomic_write_tsv(Path(ctx.output_dir) / TSV_NAME, table, columns=["participant_id", *COLUMNS])
    ctx.logger.info("longitudinal change: %d subject(s), %d rows -> %s", table.participant_id.nunique(), len(table),
                    TSV_NAME)
    lesions = lesion_activity(ctx.output_dir)
    if not lesions.empty:
        atomic_write_tsv(Path(ctx.output_dir) / LESION_TSV_NAME, lesions, columns=list(lesions.columns))
        ctx.logger.info("longitudinal change: lesion activity of %d subject(s) -> %s", lesions.participant_id.nunique(),
                        LESION_TSV_NAME)
    return [ReportItem("change", {"table": table, "tsv_name": TSV_NAME, "lesions": lesions,
                                  "lesion_tsv_name": LESION_TSV_NAME})]
