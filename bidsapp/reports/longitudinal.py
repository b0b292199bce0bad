"""Figures of the subject level: the mid-space template with the change of brain tissue over it, and
the change table as bars (acquisition changes flagged), and the group plot of change by acquisition-change
status."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

SHOWN = ("brain", "GM", "WM", "ventricles", "lesion")


def lesion_slices(active: np.ndarray, lesions: np.ndarray, n: int = 4, apart: int = 5) -> list[int]:
    """Up to ``n`` axial slices (last axis) that show the most new or grown lesion voxels, at least
    ``apart`` slices from each other; through the most lesion when nothing changed."""
    weight = active.sum((0, 1)) if active.any() else lesions.sum((0, 1))
    chosen: list[int] = []
    for z in np.argsort(weight, kind="stable")[::-1]:
        if weight[z] == 0 or len(chosen) == n:
            break
        if all(abs(int(z) - c) >= apart for c in chosen):
            chosen.append(int(z))
    return sorted(chosen)


def change_figure(result, path) -> str:
    """Template slices (three planes) with the first -> last session change of tissue fraction in colour
    (red: tissue lost, blue: gained), and the percent change of every measure and pair; with lesion masks,
    one more row per consecutive pair: axial slices with the earlier lesions outlined and the new lesions
    and grown voxels filled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    template = result.template.numpy()
    (ses_from, ses_to), diff = list(result.maps.items())[-1]
    fg = template > 0
    vmax = float(np.percentile(template[fg], 97)) if fg.any() else 1.0
    centre = [int(np.median(ix)) for ix in np.nonzero(fg)] if fg.any() else [s // 2 for s in template.shape]
    n_rows = 1 + len(result.lesion_maps)
    fig = plt.figure(figsize=(12, 4.2 * n_rows))
    outer = fig.add_gridspec(n_rows, 1)
    grid = outer[0].subgridspec(1, 4, width_ratios=(1, 1, 1, 1.5))
    for k in range(3):
        ax = fig.add_subplot(grid[0, k])
        sl = [slice(None)] * 3
        sl[k] = centre[k]
        img = np.rot90(template[tuple(sl)])
        d = np.rot90(diff[tuple(sl)])
        ax.imshow(img, cmap="gray", vmin=0, vmax=vmax)
        shown = np.ma.masked_where(np.abs(d) < 0.05, d)
        ax.imshow(shown, cmap="RdBu", vmin=-0.5, vmax=0.5, alpha=0.8)
        ax.set_axis_off()
    fig.text(0.01, 0.97, f"tissue change {ses_from} \u2192 {ses_to} (boundary shift; red: loss, blue: gain)",
             fontsize=9, va="top")
    ax = fig.add_subplot(grid[0, 3])
    table = result.table
    pairs = list(dict.fromkeys(zip(table.ses_from, table.ses_to)))
    measures = [m for m in SHOWN if table.loc[table.measure == m, "percent_change"].notna().any()]
    width = 0.8 / max(len(pairs), 1)
    for p, (a, b) in enumerate(pairs):
        rows = table[(table.ses_from == a) & (table.ses_to == b)].set_index("measure")
        values = [float(rows.loc[m, "percent_change"]) if m in rows.index else np.nan for m in measures]
        changed = rows["acquisition_changed"].iloc[0] == "true"
        ax.bar(np.arange(len(measures)) + p * width, values, width,
               label=f"{a} \u2192 {b}" + (" (acquisition changed)" if changed else ""),
               hatch="//" if changed else None, edgecolor="black", linewidth=0.4)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(np.arange(len(measures)) + 0.4 - width / 2, measures)
    ax.set_ylabel("change (%)")
    ax.legend(fontsize=7, loc="best")
    ax.set_title("volume change", fontsize=9)
    from bidsapp.longitudinal.lesions import counts

    lesion_rows = []
    for row, (pair, masks) in enumerate(result.lesion_maps.items(), 1):
        n_new = counts(result.lesions[(result.lesions.ses_from == pair[0]) & (result.lesions.ses_to == pair[1])])["new"]
        lesion_rows.append(_lesion_row(fig, outer[row].subgridspec(1, 4), template, vmax, pair, masks, n_new))
    fig.tight_layout(h_pad=3.0)
    for lesion_row in filter(None, lesion_rows):  # each title above its row, once the layout has placed it
        first, title = lesion_row
        fig.text(0.01, first.get_position().y1 + 0.04 / n_rows, title, fontsize=9, va="bottom")
    fig.savefig(str(path), format=Path(path).suffix.lstrip(".") or "svg")
    plt.close(fig)
    return str(path)


def _lesion_row(fig, grid, template, vmax, pair, masks, n_new: int):
    """The second row of :func:`change_figure`: earlier lesions outlined (yellow), new lesions (red) and the
    grown voxels of earlier ones (orange) filled, on axial slices of the template. Returns (first axes,
    title)."""
    from matplotlib.colors import ListedColormap

    earlier, new, changed = masks
    grown = changed & ~new
    colours = ListedColormap(["#ff2020", "#ff9900"])
    axes = []
    for k, z in enumerate(lesion_slices(changed, earlier)):
        ax = fig.add_subplot(grid[0, k])
        ax.imshow(np.rot90(template[:, :, z]), cmap="gray", vmin=0, vmax=vmax)
        if earlier[:, :, z].any():
            ax.contour(np.rot90(earlier[:, :, z]).astype(float), [0.5], colors="#ffee00", linewidths=0.6)
        label = np.where(new[:, :, z], 0, np.where(grown[:, :, z], 1, -1))
        ax.imshow(np.ma.masked_less(np.rot90(label), 0), cmap=colours, vmin=0, vmax=1, alpha=0.9,
                  interpolation="nearest")
        ax.set_axis_off()
        axes.append(ax)
    if not axes:
        return None
    title = (f"lesions {pair[0]} \u2192 {pair[1]}: yellow outline, earlier lesions; red, new lesions ({n_new}); "
             "orange, grown voxels of earlier ones" if changed.any()
             else f"lesions {pair[0]} \u2192 {pair[1]}: no new or grown lesion (yellow: the lesions)")
    return axes[0], title


def group_change_figure(table: pd.DataFrame, measure: str = "brain"):
    """Percent change of ``measure`` for pairs with and without an acquisition change (one dot per pair): a
    scanner change that looks like atrophy shows as a shift between the two columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table[table.measure == measure].copy()
    value = pd.to_numeric(rows["percent_change"], errors="coerce")
    raw = pd.to_numeric(rows["percent_change_raw"], errors="coerce")
    ylabel = f"{measure} change (%)"
    status = rows["acquisition_changed"].astype(str).str.lower().map(  # "true"/"false" as written, or read back as bool
        {"true": "acquisition changed", "false": "same acquisition"})
    status = status.fillna("unknown")
    fig, ax = plt.subplots(figsize=(6, 4))
    cats = [c for c in ("same acquisition", "acquisition changed", "unknown") if (status == c).any()]
    rng = np.random.default_rng(0)
    for k, cat in enumerate(cats):
        sel = (status == cat).to_numpy()
        x = k + rng.uniform(-0.12, 0.12, sel.sum())
        ax.scatter(x, value[sel], color="#3182bd", s=22, label="corrected" if k == 0 else None, zorder=3)
        if cat != "same acquisition":  # read per session: show the pooled reading too
            labelled = "raw" in [t.get_label() for t in ax.collections]
            ax.scatter(x, raw[sel], facecolors="none", edgecolors="#de2d26", s=22, zorder=2,
                       label=None if labelled else "raw")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(cats)), cats)
    ax.set_xlim(-0.5, len(cats) - 0.5)   # each category a compact column, even when it is the only one
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def group_section(*, table: pd.DataFrame, tsv_name: str, lesions: pd.DataFrame | None = None,
                  lesion_tsv_name: str = ""):
    """The group report's section of the longitudinal group step (:mod:`bidsapp.longitudinal.group`)."""
    from bidsapp.reports.html import Section, figure_html, table_html, text_html

    brain = table[table.measure == "brain"]
    summary = (brain.assign(acquisition_changed=brain.acquisition_changed.fillna("n/a").astype(str))
               .groupby("acquisition_changed")[["percent_change", "percent_change_per_year", "percent_change_raw"]]
               .median().reset_index())
    summary.columns = ["acquisition changed", "median brain change (%)", "median (%/year)", "median raw (%)"]
    parts = [text_html(f"{table.participant_id.nunique()} subject(s) with two or more sessions; "
                       f"{len(brain)} session pair(s). Each dot is a pair's brain-volume change; where the "
                       "acquisition changed or is unknown, the open circle is the reading before correction."),
             table_html(summary, float_format="{:.2f}"),
             figure_html(group_change_figure(table), caption=f"Brain-volume change by acquisition-change status "
                                                             f"(all rows in {tsv_name})")]
    if lesions is not None and not lesions.empty:
        parts += [text_html(f"Lesion activity between consecutive sessions with lesion masks ({lesion_tsv_name}): "
                            "lesions of each status per subject and pair; new or enlarging is the count MS trials "
                            "report."), table_html(lesions)]
    return Section(title="Longitudinal change", body="".join(parts))
