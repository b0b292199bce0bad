"""Group report ``output_dir/group.html``: quality control, acquisition groups, tissue volumes and lesion load by
acquisition group.

The sections here describe the data as measured; harmonisation steps (ComBat, MRAI-NET,
bridging) add their own Sections and :func:`write_group_report` assembles everything into one
self-contained file. Functions never raise on thin data (one group, no age, missing columns):
they say what could not be shown instead.
"""

from __future__ import annotations

import datetime as _dt
import shlex
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from bidsapp import methods as M
from bidsapp.labels import LESION, VOLUME_LABELS
from bidsapp.bids.tables import bids_columns, normalize_ids
from bidsapp.metrics.overlap import coefficient_of_variation
from bidsapp.physics.contrast import LOW_CONTRAST, is_low_contrast
from bidsapp.reports.html import Section, figure_html, kv_table_html, table_html, text_html, write_report

GROUP_COL = "acq_group"
_PARAM_COLUMNS = (("Manufacturer", "vendor", 1), ("ManufacturersModelName", "model", 1),
                  ("MagneticFieldStrength", "field (T)", 1), ("SequenceFamily", "sequence", 1),
                  ("RepetitionTime", "TR (ms)", 1000), ("EchoTime", "TE (ms)", 1000),
                  ("InversionTime", "TI (ms)", 1000), ("FlipAngle", "flip (deg)", 1))
_MAX_METHOD_FIGURES = 3


def _normalise(df: pd.DataFrame | None) -> pd.DataFrame:
    """BIDS column names and ``sub-``/``ses-`` ids, whichever form the table came in."""
    return pd.DataFrame() if df is None else normalize_ids(bids_columns(df))


def _join(values, scale=1) -> str:
    """Distinct values of a column, compact: one value, a range of numbers, or a list of words."""
    vals = [v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v)) and v != "n/a"]
    if not vals:
        return "n/a"
    nums = pd.to_numeric(pd.Series(vals), errors="coerce")
    if nums.notna().all():
        nums = nums * scale
        lo, hi = nums.min(), nums.max()
        return f"{lo:.4g}" if np.isclose(lo, hi) else f"{lo:.4g}\u2013{hi:.4g}"
    uniq = list(dict.fromkeys(str(v) for v in vals))
    return ", ".join(uniq[:4]) + (f" (+{len(uniq) - 4})" if len(uniq) > 4 else "")


def _expected_ratios(acquisitions: pd.DataFrame) -> list[float]:
    """WM/GM signal ratio of pure tissues each image's parameters give (none where they cannot say)."""
    from bidsapp.models.tissue import parameter_vector

    ratios = []
    for rec in acquisitions.to_dict("records"):
        known = {k: v for k, v in rec.items() if not (isinstance(v, float) and np.isnan(v))}
        ratio = parameter_vector(known).wm_gm_ratio
        if ratio is not None:
            ratios.append(ratio)
    return ratios


def _groups(acquisitions_df: pd.DataFrame | None) -> list[tuple[str, pd.DataFrame, list[float]]]:
    """(acquisition group, its records, their expected WM/GM signal ratios), groups in name order; a
    missing group is "unknown"."""
    df = _normalise(acquisitions_df)
    if df.empty or GROUP_COL not in df.columns:
        return []
    df[GROUP_COL] = df[GROUP_COL].fillna("unknown").astype(str)
    return [(str(g), sub, _expected_ratios(sub)) for g, sub in df.groupby(GROUP_COL, sort=True)]


def acquisition_groups_table(acquisitions_df: pd.DataFrame) -> pd.DataFrame:
    """One row per acquisition group: scanner, sequence, parameter ranges, sites and counts."""
    return _groups_table(_groups(acquisitions_df))


def _groups_table(groups: list[tuple[str, pd.DataFrame, list[float]]]) -> pd.DataFrame:
    rows = []
    for g, sub, ratios in groups:
        row = {"acquisition group": g}
        for col, title, scale in _PARAM_COLUMNS:
            row[title] = _join(sub[col], scale) if col in sub.columns else "n/a"
        row["WM/GM signal"] = _join([round(r, 3) for r in ratios])
        row["sites"] = _join(sub["site"]) if "site" in sub.columns else "n/a"
        row["subjects"] = sub["participant_id"].nunique() if "participant_id" in sub.columns else len(sub)
        if "session_id" in sub.columns and "participant_id" in sub.columns:
            row["sessions"] = sub[["participant_id", "session_id"]].drop_duplicates().shape[0]
        row["images"] = len(sub)
        pcol = next((c for c in ("protocol_key", "protocol") if c in sub.columns), None)
        if pcol and sub[pcol].nunique() > 1:
            row["protocol versions"] = sub[pcol].nunique()
        rows.append(row)
    return pd.DataFrame(rows)


def acquisitions_section(acquisitions_df: pd.DataFrame | None) -> Section:
    """The acquisition groups found in the dataset (vendor, field, sequence, parameters, counts)."""
    groups = _groups(acquisitions_df)
    table = _groups_table(groups)
    warns = []
    if table.empty:
        body = text_html("No acquisition records were found (no sidecars, or no acquisition group column); "
                         "volumes below are shown as one group.")
        warns.append("acquisition groups unknown")
        return Section("Acquisition groups", body, warns, anchor="acquisitions")
    n = len(table)
    body = text_html(f"{n} acquisition group(s): scans of the same scanner model, field strength and sequence "
                     "family share a group; parameter ranges show protocol variation inside a group.")
    if n == 1:
        warns.append("only one acquisition group: there is no scanner effect to measure or harmonise")
    unknown = table[table["acquisition group"].str.contains("unknown", case=False)]
    if len(unknown):
        warns.append(f"{int(unknown['images'].sum())} image(s) in group(s) with unknown scanner or sequence "
                     "(missing sidecar fields)")
    low = [g for g, _, ratios in groups if any(is_low_contrast(r) for r in ratios)]
    if low:
        warns.append(f"little GM/WM contrast expected in {', '.join(low)} (WM/GM signal ratio within "
                     f"{LOW_CONTRAST:.0%} of 1): every method tested moves volume between GM and WM there, so "
                     "compare their GM/WM volumes with other groups' with care")
    body += table_html(table)
    body += text_html("WM/GM signal: the ratio of pure white- to pure grey-matter signal that the sequence "
                      "parameters give with literature relaxation times at the scan's field strength; near 1, "
                      "intensity cannot separate the two tissues.")
    return Section("Acquisition groups", body, warns, anchor="acquisitions")


def _volumes_frame(volumes_df, acquisitions_df, participants_df) -> tuple[pd.DataFrame, list[str]]:
    """Volumes with acquisition group, site, age and sex attached where the inputs have them."""
    warns = []
    vol = _normalise(volumes_df)
    acq = _normalise(acquisitions_df)
    parts = _normalise(participants_df)
    keys = [k for k in ("participant_id", "session_id") if k in vol.columns]
    if GROUP_COL not in vol.columns and not acq.empty and GROUP_COL in acq.columns and keys and \
            set(keys) <= set(acq.columns):
        extra = [c for c in acq.columns if c not in vol.columns or c in keys]
        vol = vol.merge(acq[extra].drop_duplicates(keys), how="left", on=keys)
    if not parts.empty and "participant_id" in vol.columns and "participant_id" in parts.columns:
        extra = [c for c in ("age", "sex", "site") if c in parts.columns and c not in vol.columns]
        if extra:
            vol = vol.merge(parts[["participant_id", *extra]].drop_duplicates("participant_id"), how="left",
                            on="participant_id")
    if GROUP_COL not in vol.columns:
        vol[GROUP_COL] = "unknown"
        warns.append("no acquisition group column: all sessions shown as one group")
    vol[GROUP_COL] = vol[GROUP_COL].fillna("unknown").astype(str)
    if "method" not in vol.columns:
        vol["method"] = "main"
    return vol, warns


def _known_or_unknown(values: pd.Series) -> pd.Series:
    """Text labels for colouring points, a missing value as ``unknown`` (sorted with the others)."""
    return values.astype(object).where(values.notna(), "unknown").astype(str)


def _method_order(methods) -> list[str]:
    """The main answer first; the Atropos baseline after any model that replaced it."""
    methods = list(dict.fromkeys(str(m) for m in methods))
    return sorted(methods, key=lambda m: (m.lower().startswith("atropos") and len(methods) > 1, methods.index(m)))


def volume_summary(volumes_df: pd.DataFrame, group_col: str = GROUP_COL,
                   tissues=VOLUME_LABELS) -> pd.DataFrame:
    """Mean, SD and coefficient of variation (population SD / mean, as the papers) per method, group, tissue.

    ``vs all (%)`` is the group mean's difference from the mean over every session of that method:
    a scanner effect shows as groups of the same population sitting apart.
    """
    df = volumes_df
    rows = []
    tissues = [t for t in tissues if t in df.columns]
    for method in _method_order(df["method"]):
        mdf = df[df["method"].astype(str) == method]
        for t in tissues:
            allv = pd.to_numeric(mdf[t], errors="coerce").dropna()
            overall = allv.mean() if len(allv) else np.nan
            for g, sub in mdf.groupby(group_col, sort=True):
                v = pd.to_numeric(sub[t], errors="coerce").dropna()
                if not len(v):
                    continue
                rows.append({
                    "method": method, "acquisition group": g, "tissue": t,
                    "subjects": sub.loc[v.index, "participant_id"].nunique() if "participant_id" in sub else len(v),
                    "sessions": len(v),
                    "mean (mL)": v.mean() / 1000.0,
                    "SD (mL)": v.std(ddof=0) / 1000.0,
                    "CoV (%)": 100.0 * coefficient_of_variation(v.to_numpy()),
                    "vs all (%)": 100.0 * (v.mean() - overall) / overall if overall else np.nan,
                })
    return pd.DataFrame(rows)


def summary_display(summary: pd.DataFrame) -> pd.DataFrame:
    """Compact form of :func:`volume_summary` for the page: one row per method and group, one cell per tissue."""
    rows = []
    for (method, group), sub in summary.groupby(["method", "acquisition group"], sort=False):
        row = {"method": method, "acquisition group": group, "subjects": int(sub["subjects"].max()),
               "sessions": int(sub["sessions"].max())}
        for _, r in sub.iterrows():
            diff = "" if not np.isfinite(r["vs all (%)"]) else f", {r['vs all (%)']:+.1f}%"
            row[r["tissue"]] = f"{r['mean (mL)']:.1f} \u00b1 {r['SD (mL)']:.1f} (CoV {r['CoV (%)']:.1f}%{diff})"
        rows.append(row)
    return pd.DataFrame(rows)


def volumes_section(volumes_df: pd.DataFrame | None, acquisitions_df: pd.DataFrame | None = None,
                    participants_df: pd.DataFrame | None = None, *, title: str = "Volumes by acquisition group",
                    anchor: str = "volumes", output_dir=None) -> Section:
    """Tissue volumes by acquisition group: box/strip plots (one point per session, coloured by site),
    volumes against age when known, and a summary table (mean/SD/CoV, subjects and sessions per group).

    With ``output_dir``, the summary is also written to ``group_volumes_summary.tsv``.
    """
    from bidsapp.reports import figures

    if volumes_df is None or len(volumes_df) == 0:
        return Section(title, text_html("No participant volumes were found."), ["no volumes to show"], anchor=anchor)
    vol, warns = _volumes_frame(volumes_df, acquisitions_df, participants_df)
    if any(name in vol.columns for name in LESION.names):  # sessions without a T1w: lesion rows only
        vol = vol[~vol["method"].astype(str).isin(M.registry(M.SESSION, LESION.key))]
    tissues = [t for t in VOLUME_LABELS if t in vol.columns and pd.to_numeric(vol[t], errors="coerce").notna().any()]
    if not tissues:
        return Section(title, text_html("The volumes table has no CSF/GM/WM/brain values."),
                       warns + ["no tissue volumes"], anchor=anchor)
    groups = sorted(vol[GROUP_COL].unique())
    n_sub = vol["participant_id"].nunique() if "participant_id" in vol.columns else len(vol)
    keys = [k for k in ("participant_id", "session_id") if k in vol.columns]
    n_ses = vol[keys].drop_duplicates().shape[0] if keys else len(vol)
    body = [text_html(f"{n_sub} participant(s), {n_ses} session(s) in {len(groups)} acquisition group(s). "
                      "Each point is one session; boxes show the spread within a group. Groups of the same "
                      "population that sit apart indicate a scanner or protocol effect.")]
    if len(groups) == 1:
        warns.append("only one acquisition group: volumes cannot be compared between scanners")
    methods = _method_order(vol["method"])
    if len(methods) > _MAX_METHOD_FIGURES:
        warns.append(f"{len(methods)} methods: figures for {', '.join(methods[:_MAX_METHOD_FIGURES])} only; "
                     "the table covers all")
    has_site = "site" in vol.columns and vol["site"].notna().any()
    if has_site:
        vol = vol.assign(site=_known_or_unknown(vol["site"]))
    age = pd.to_numeric(vol["age"], errors="coerce") if "age" in vol.columns else None
    for method in methods[:_MAX_METHOD_FIGURES]:
        mdf = vol[vol["method"].astype(str) == method]
        label = f"{method}: " if len(methods) > 1 or method != "main" else ""
        try:
            body.append(figure_html(
                figures.volumes_by_group_figure(mdf, tissues, color_col="site" if has_site else GROUP_COL,
                                                title=f"{label}volumes by acquisition group"),
                f"{label}tissue volumes per acquisition group, one point per session"
                + (", coloured by site" if has_site else ""), dpi=90))
        except Exception as exc:  # noqa: BLE001 - a figure must not cost the section
            warns.append(f"{label}volume plot could not be drawn: {exc}")
        if age is not None and age[mdf.index].notna().sum() >= 2:
            try:
                body.append(figure_html(
                    figures.volumes_vs_age_figure(mdf, tissues, title=f"{label}volumes against age"),
                    f"{label}tissue volume against age, coloured by acquisition group (lines: linear fit per group)",
                    dpi=90))
            except Exception as exc:  # noqa: BLE001
                warns.append(f"{label}age plot could not be drawn: {exc}")
    if age is None or age.notna().sum() < 2:
        body.append(text_html("No age in participants.tsv: the volume-against-age plot is not shown."))
    summary = volume_summary(vol, tissues=tissues)
    if len(summary):
        body.append(text_html("Summary per acquisition group, each cell: mean \u00b1 SD in mL (coefficient of "
                              "variation = SD / mean, population SD; difference of the group mean from the mean "
                              "of all sessions of that method):"))
        body.append(table_html(summary_display(summary)))
    if output_dir is not None and len(summary):
        from bidsapp.bids.derivatives import atomic_write_tsv

        atomic_write_tsv(Path(output_dir) / "group_volumes_summary.tsv", summary)
        body.append(text_html("Numbers shown here: group_volumes.tsv, group_volumes_summary.tsv "
                              "(in the output folder)."))
    missing = vol[vol[tissues].apply(pd.to_numeric, errors="coerce").isna().any(axis=1)]
    if len(missing):
        warns.append(f"{len(missing)} row(s) with missing tissue volumes left out of the plots")
    return Section(title, "".join(body), warns, anchor=anchor)


def _lesion_sessions(vol: pd.DataFrame, name: str) -> pd.DataFrame:
    """One row per session with a ``name`` volume (the lesion columns repeat on each method row of a session)."""
    keys = [k for k in ("participant_id", "session_id") if k in vol.columns]
    have = vol[pd.to_numeric(vol[name], errors="coerce").notna()]
    return (have.drop_duplicates(keys) if keys else have).reset_index(drop=True)


def lesion_load_summary(sessions: pd.DataFrame, name: str = LESION.names[0],
                        group_col: str = GROUP_COL) -> pd.DataFrame:
    """Per acquisition group: sessions, median lesion volume (mL) and median lesion count (one row per session in
    ``sessions``)."""
    count_col = f"{name}_count"
    rows = []
    for g, sub in sessions.groupby(group_col, sort=True):
        v = pd.to_numeric(sub[name], errors="coerce").dropna()
        c = pd.to_numeric(sub[count_col], errors="coerce").dropna() if count_col in sub.columns \
            else pd.Series(dtype=float)
        rows.append({"acquisition group": g, "sessions": len(v),
                     "median volume (mL)": float(v.median()) / 1000.0 if len(v) else np.nan,
                     "median count": float(c.median()) if len(c) else np.nan})
    return pd.DataFrame(rows, columns=["acquisition group", "sessions", "median volume (mL)", "median count"])


def lesion_load_figure(sessions: pd.DataFrame, name: str = LESION.names[0], group_col: str = GROUP_COL,
                       color_col: str | None = "site", title: str | None = None):
    """Two panels, lesion volume (mL) and lesion count: a box per acquisition group and one jittered point per
    session, coloured by ``color_col`` (the acquisition group when that column is missing)."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from bidsapp.reports.figures import short_labels

    count_col = f"{name}_count"
    groups = sorted(sessions[group_col].astype(str).unique())
    labels = short_labels(groups)
    color_col = color_col if color_col and color_col in sessions.columns and sessions[color_col].notna().any() \
        else group_col
    colour_of = _known_or_unknown(sessions[color_col])
    cats = sorted(colour_of.unique())
    cmap = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20").colors
    ccol = {c: cmap[i % len(cmap)] for i, c in enumerate(cats)}
    panels = [(name, 1e-3, f"{name} volume (mL)", "lesion volume")]
    if count_col in sessions.columns and pd.to_numeric(sessions[count_col], errors="coerce").notna().any():
        panels.append((count_col, 1.0, "number of lesions", "lesion count"))
    rng = np.random.default_rng(0)
    width = max(3.2, 0.8 + 0.9 * len(groups))
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels) + 1.2, 3.8), squeeze=False)
    for ax, (col, scale, ylabel, panel_title) in zip(axes[0], panels):
        values = pd.to_numeric(sessions[col], errors="coerce") * scale
        data = [values[sessions[group_col].astype(str) == g].dropna().to_numpy() for g in groups]
        ax.boxplot(data, positions=np.arange(len(groups)), widths=0.55, showfliers=False,
                   medianprops={"color": "black"}, boxprops={"color": "#666"}, whiskerprops={"color": "#666"},
                   capprops={"color": "#666"})
        for i, g in enumerate(groups):
            sel = (sessions[group_col].astype(str) == g) & values.notna()
            x = i + rng.uniform(-0.18, 0.18, int(sel.sum()))
            ax.scatter(x, values[sel], s=18, c=[ccol[c] for c in colour_of[sel]],
                       alpha=0.85, edgecolors="white", linewidths=0.4, zorder=3)
        ax.set_xticks(np.arange(len(groups)), [labels[g] for g in groups], fontsize=7,
                      rotation=30 if len(groups) > 3 else 0, ha="right" if len(groups) > 3 else "center")
        ax.set_ylim(bottom=0)
        ax.set_title(panel_title, fontsize=10)
        ax.set_ylabel(ylabel)
        if col == count_col:
            ax.yaxis.get_major_locator().set_params(integer=True)
        ax.spines[["top", "right"]].set_visible(False)
    if len(cats) <= 20:
        handles = [Line2D([0], [0], marker="o", ls="", color=ccol[c], label=c) for c in cats]
        fig.legend(handles=handles, title="acquisition group" if color_col == group_col else color_col,
                   loc="upper left", bbox_to_anchor=(1.0, 0.95), frameon=False, fontsize=8, title_fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def lesions_section(volumes_df: pd.DataFrame | None, acquisitions_df: pd.DataFrame | None = None,
                    participants_df: pd.DataFrame | None = None, *, title: str = "Lesion load by acquisition group",
                    anchor: str = "lesions", output_dir=None) -> Section | None:
    """Lesion volume and count per acquisition group (box/strip plots, one point per session) and a table of
    sessions, median volume and median count per group; None when no session has a lesion volume.

    With ``output_dir``, the table is also written to ``group_lesions_summary.tsv``.
    """
    if volumes_df is None or len(volumes_df) == 0:
        return None
    name = LESION.names[0]
    if name not in volumes_df.columns or not pd.to_numeric(volumes_df[name], errors="coerce").notna().any():
        return None
    vol, warns = _volumes_frame(volumes_df, acquisitions_df, participants_df)
    sessions = _lesion_sessions(vol, name)
    keys = [k for k in ("participant_id", "session_id") if k in vol.columns]
    n_all = vol[keys].drop_duplicates().shape[0] if keys else len(vol)
    groups = sorted(sessions[GROUP_COL].unique())
    body = [text_html(f"{len(sessions)} session(s) with a lesion segmentation (from a FLAIR, T2w or PDw) in "
                      f"{len(groups)} acquisition group(s). Lesion volume is the volume of the lesion mask, "
                      "lesion count the number of separate lesions; each point is one session. Lesion loads "
                      "differ between people far more than tissue volumes do, so compare groups of similar "
                      "populations only.")]
    if n_all > len(sessions):
        body.append(text_html(f"{n_all - len(sessions)} session(s) have no lesion result (no FLAIR, T2w or PDw "
                              "image) and are not shown."))
    if "unknown" in groups:
        warns.append("some sessions with lesions have no acquisition group (no acquisition record of their images)")
    try:
        body.append(figure_html(lesion_load_figure(sessions, name, title="lesion load by acquisition group"),
                                "lesion volume (mL) and number of lesions per acquisition group, one point per "
                                "session" + (", coloured by site" if "site" in sessions.columns
                                             and sessions["site"].notna().any() else ""), dpi=90))
    except Exception as exc:  # noqa: BLE001 - a figure must not cost the section
        warns.append(f"lesion plot could not be drawn: {exc}")
    summary = lesion_load_summary(sessions, name)
    body.append(text_html("Per acquisition group: sessions with a lesion result, median lesion volume (mL) and "
                          "median number of lesions:"))
    body.append(table_html(summary))
    if output_dir is not None:
        from bidsapp.bids.derivatives import atomic_write_tsv

        atomic_write_tsv(Path(output_dir) / "group_lesions_summary.tsv", summary)
        body.append(text_html("Numbers shown here: group_volumes.tsv (columns lesion, lesion_count), "
                              "group_lesions_summary.tsv (in the output folder)."))
    return Section(title, "".join(body), warns, anchor=anchor)


def qc_section(qc_df: pd.DataFrame | None, *, title: str = "Quality control", anchor: str = "qc") -> Section:
    """Counts of pass/warn/fail verdicts and the sessions that failed or warned, with their reasons (one row
    per session in ``qc_df``: :func:`bidsapp.qc.collect_qc`)."""
    if qc_df is None or len(qc_df) == 0:
        return Section(title, text_html("No quality-control tables (*_desc-iqm_qc.tsv) were found."),
                       ["no quality-control results: rerun the participant level to add them"], anchor=anchor)
    verdicts = qc_df["verdict"].astype(str)
    counts = {v: int((verdicts == v).sum()) for v in ("pass", "warn", "fail")}
    other = len(qc_df) - sum(counts.values())
    body = [text_html(f"{len(qc_df)} session(s): {counts['pass']} pass, {counts['warn']} warn, {counts['fail']} fail"
                      + (f", {other} without a verdict" if other else "") + ". Sessions that failed are not "
                      "usable and are left out of the group tables and harmonisation; warnings are worth a look "
                      "at the participant report. Every measure: group_qc.tsv (in the output folder).")]
    warns = []
    flagged = qc_df[verdicts.isin(["fail", "warn"])].sort_values(["verdict", "participant_id", "session_id"])
    if len(flagged):
        cols = ["participant_id", "session_id", "verdict", "reasons"]
        body.append(table_html(flagged[cols].fillna("n/a")))
    if counts["fail"]:
        warns.append(f"{counts['fail']} session(s) failed quality control and were left out: "
                     + ", ".join(f"{r.participant_id} {r.session_id}".replace(" n/a", "")
                                 for r in qc_df[verdicts == "fail"].itertuples()))
    return Section(title, "".join(body), warns, anchor=anchor)


def write_group_report(output_dir, sections: list[Section], *, title: str = "scanbridge group report",
                       subtitle: str | None = None, command_line: str | None = None, about: bool = True) -> Path:
    """Write ``output_dir/group.html`` (self-contained) from the given sections, plus an About block."""
    from bidsapp import __version__

    sections = list(sections)
    if about:
        items = [("scanbridge version", __version__),
                 ("command line", command_line if command_line is not None else shlex.join(sys.argv)),
                 ("report date", _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")),
                 ("output folder", str(Path(output_dir).resolve()))]
        sections.append(Section("About", kv_table_html(items) + text_html(
            "Tables of every number shown are written next to this report (group_*.tsv)."), anchor="about"))
    return write_report(Path(output_dir) / "group.html", title, sections,
                        subtitle=subtitle or f"Group report, scanbridge {__version__}")


def run(ctx) -> list[Section]:
    """Group step form of the sections (``ctx``: bidsapp.harmonize.context.GroupContext); the lesion section only
    when there are lesion results."""
    lesions = lesions_section(ctx.volumes, ctx.acquisitions, ctx.participants)
    return [acquisitions_section(ctx.acquisitions), volumes_section(ctx.volumes, ctx.acquisitions, ctx.participants),
            *([lesions] if lesions is not None else [])]
