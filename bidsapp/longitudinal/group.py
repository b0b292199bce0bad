"""Group step of the longitudinal method: every subject's change rows in one table, and the plot that shows
whether a scanner change looks like atrophy (change per year, pairs with and without an acquisition change)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .subject import COLUMNS

TSV_NAME = "group_change.tsv"


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


def run(ctx) -> list:
    """Write ``group_change.tsv`` and return the report section (nothing when no subject has two sessions)."""
    from bidsapp.bids.derivatives import atomic_write_tsv
    from bidsapp.reports.html import Section, figure_html, table_html, text_html
    from bidsapp.reports.longitudinal import group_change_figure

    table = collect(ctx.output_dir)
    if table.empty:
        ctx.logger.info("longitudinal change: no subject with a change table; %s not written", TSV_NAME)
        return []
    atomic_write_tsv(Path(ctx.output_dir) / TSV_NAME, table, columns=["participant_id", *COLUMNS])
    ctx.logger.info("longitudinal change: %d subject(s), %d rows -> %s", table.participant_id.nunique(), len(table),
                    TSV_NAME)
    brain = table[table.measure == "brain"]
    summary = (brain.assign(acquisition_changed=brain.acquisition_changed.astype(str))
               .groupby("acquisition_changed")[["percent_change", "percent_change_per_year", "percent_change_raw"]]
               .median().reset_index())
    summary.columns = ["acquisition changed", "median brain change (%)", "median (%/year)", "median raw (%)"]
    parts = [text_html(f"{table.participant_id.nunique()} subject(s) with two or more sessions; "
                       f"{len(brain)} session pair(s). Each dot is a pair's brain-volume change; for pairs whose "
                       "acquisition changed, the open circle is the change before correction."),
             table_html(summary, float_format="{:.2f}"),
             figure_html(group_change_figure(table), caption=f"Brain-volume change by acquisition-change status "
                                                             f"(all rows in {TSV_NAME})")]
    return [Section(title="Longitudinal change", body="".join(parts))]
