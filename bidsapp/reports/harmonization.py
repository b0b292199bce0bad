"""Group-report sections on scanner effects: acquisition groups, MRAI-NET (proxy A-distance before and after,
feature embedding, sessions that stand out, training) and ComBat on volumes.

Every function returns a ``Section``; each figure is embedded (figure_html) and each number shown is also
in a TSV that the section names, so a reader can recompute or re-plot it.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bidsapp import methods as M  # noqa: E402
from bidsapp.labels import LESION, TISSUE  # noqa: E402
from bidsapp.reports.html import Section, figure_html, table_html, text_html  # noqa: E402

__all__ = ["groups_section", "pad_section", "embedding_section", "outliers_section", "mrainet_section",
           "combat_section", "TISSUE_COLORS"]

TISSUE_COLORS = {**TISSUE.colours(), "background": "#999999", "unknown": "#999999"}


def _short(g: str, width: int = 22) -> str:
    s = str(g)
    return s if len(s) <= width else s[: width - 1] + "\u2026"


def _files_note(names) -> str:
    return text_html("Numbers shown here: " + ", ".join(names) + " (in the output folder).")


def groups_section(summary: pd.DataFrame, source: str | None = None, labels: pd.DataFrame | None = None,
                   warnings: list[str] | None = None) -> Section:
    """Which acquisition group is MRAI-NET's source and how many labelled patches each group gave.

    The groups' scanners and parameters are in the report's acquisition section; this one adds their roles."""
    body = [text_html("MRAI-NET learns from many labelled patches of a source group (the one with the most labelled "
                      "data: participant-level or manual segmentations) and a few labelled patches of every other "
                      "group (high-confidence voxels, probseg > 0.95, of the participant-level segmentation, or "
                      "manual labels).")]
    if summary is None or not len(summary):
        body.append(text_html("No acquisition records were found."))
    else:
        df = summary[[c for c in ("acq_group", "n_subjects", "n_sessions") if c in summary.columns]].copy()
        df.insert(1, "role", np.where(df["acq_group"] == source, "source", "target") if source is not None else "n/a")
        if labels is not None and len(labels):
            wide = labels.pivot_table(index="acq_group", columns="tissue", values="n_patches", aggfunc="sum")
            wide.columns = [f"labelled {c}" for c in wide.columns]
            df = df.merge(wide.reset_index(), on="acq_group", how="left")
        body.append(table_html(df))
    body.append(_files_note(["group_mrainet_labels.tsv"]))
    return Section("MRAI-NET source and target groups", "".join(body), list(warnings or []), anchor="mrainet-groups")


def _pad_square(long: pd.DataFrame, groups: list[str]) -> np.ndarray:
    m = np.full((len(groups), len(groups)), np.nan)
    np.fill_diagonal(m, 0.0)
    idx = {g: i for i, g in enumerate(groups)}
    for _, r in long.iterrows():
        i, j = idx.get(str(r["group_a"])), idx.get(str(r["group_b"]))
        if i is not None and j is not None:
            m[i, j] = m[j, i] = r["pad"]
    return m


def pad_figure(before: pd.DataFrame, after: pd.DataFrame | None, groups: list[str]):
    panels = [("before (image patches)", before)] + ([("after (MRAI-NET features)", after)] if after is not None else [])
    n = len(groups)
    fig, axes = plt.subplots(1, len(panels), figsize=(1.2 + 0.9 * n * len(panels) + 1.5 * len(panels), 0.6 + 0.8 * n + 1.2),
                             squeeze=False)
    for col, (ax, (title, long)) in enumerate(zip(axes[0], panels)):
        m = _pad_square(long, groups)
        im = ax.imshow(m, vmin=0, vmax=2, cmap="magma_r")
        for i in range(n):
            for j in range(n):
                if np.isfinite(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if m[i, j] > 1.2 else "black")
        ax.set_xticks(range(n), [_short(g) for g in groups], rotation=35, ha="right", fontsize=7)
        ax.set_yticks(range(n), [_short(g) for g in groups] if col == 0 else [], fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="proxy A-distance (0 = same, 2 = separable)")
    return fig


def pad_section(before: pd.DataFrame | None, after: pd.DataFrame | None, groups: list[str],
                warnings: list[str] | None = None) -> Section:
    body = [text_html("Proxy A-distance between acquisition groups: 2(1 - 2e), e the cross-validated error of a "
                      "linear SVM that tries to tell two groups' brain patches apart (up to 1500 per group). "
                      "0 means the groups cannot be told apart, 2 that they are perfectly separable. "
                      "Before: on the intensity patches; after: on MRAI-NET features.")]
    if before is not None and len(before):
        body.append(figure_html(pad_figure(before, after, groups), "Proxy A-distance between groups"))
        tbl = before.rename(columns={"pad": "pad_before", "error": "error_before"})[
            ["group_a", "group_b", "pad_before", "error_before", "n_a", "n_b"]]
        if after is not None and len(after):
            tbl = tbl.merge(after.rename(columns={"pad": "pad_after", "error": "error_after"})[
                ["group_a", "group_b", "pad_after", "error_after"]], on=["group_a", "group_b"], how="left")
        body.append(table_html(tbl))
    else:
        body.append(text_html("Not computed (see the messages above)."))
    body.append(_files_note(["group_pad.tsv"]))
    return Section("Scanner effect: proxy A-distance", "".join(body), list(warnings or []), anchor="pad")


def embedding_figure(emb: pd.DataFrame):
    groups = sorted(emb["acq_group"].astype(str).unique())
    cmap = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20").colors
    gcol = {g: cmap[i % len(cmap)] for i, g in enumerate(groups)}
    fig, axes = plt.subplots(2, 2, figsize=(10, 8.5))
    for row, (xc, yc, label) in enumerate((("before_1", "before_2", "image patches (PCA)"),
                                           ("after_1", "after_2", "MRAI-NET features"))):
        for col, colour_by in enumerate(("acq_group", "tissue")):
            ax = axes[row, col]
            for key, sub in emb.groupby(emb[colour_by].astype(str)):
                c = gcol.get(key) if colour_by == "acq_group" else TISSUE_COLORS.get(key, "#999")
                ax.scatter(sub[xc], sub[yc], s=5, alpha=0.5, color=c, label=_short(key, 30), rasterized=True)
            ax.set_title(f"{label}, coloured by {'scanner group' if colour_by == 'acq_group' else 'tissue'}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.legend(fontsize=7, markerscale=3, frameon=False, loc="best")
    fig.tight_layout()
    return fig


def embedding_section(emb: pd.DataFrame | None, warnings: list[str] | None = None) -> Section:
    body = [text_html("A random subsample of brain patches of every group, before (first two principal components "
                      "of the intensity patches) and after MRAI-NET. Invariant features put the same tissue of "
                      "different scanners on top of each other while keeping tissues apart.")]
    if emb is not None and len(emb):
        body.append(figure_html(embedding_figure(emb), "Patch embedding by scanner group and by tissue", dpi=80))
    else:
        body.append(text_html("Not computed (see the messages above)."))
    body.append(_files_note(["group_mrainet_embedding.tsv"]))
    return Section("Patch embedding", "".join(body), list(warnings or []), anchor="embedding")


def outliers_section(sessions: pd.DataFrame | None, warnings: list[str] | None = None) -> Section:
    body = [text_html("Each session is summarised by the mean MRAI-NET feature of each tissue and by the agreement "
                      "(Dice) of its MRAI-NET tissue map with its participant-level segmentation. A session stands "
                      "out when its robust z-score (median/MAD within its group, or over all sessions for groups "
                      "of fewer than 5) exceeds 3.5 or its agreement is far below the others'.")]
    if sessions is not None and len(sessions):
        out = sessions[sessions["outlier"]]
        if len(out):
            cols = [c for c in ("participant_id", "session_id", "acq_group", "feature_z", "dice_mean", "reason")
                    if c in out.columns]
            body.append(table_html(out[cols]))
        else:
            body.append(text_html(f"No session stands out among {len(sessions)}."))
        body.append(figure_html(_outlier_figure(sessions), "Feature distance z-score per session"))
    else:
        body.append(text_html("Not computed (see the messages above)."))
    body.append(_files_note(["group_mrainet_sessions.tsv"]))
    return Section("Sessions that stand out", "".join(body), list(warnings or []), anchor="outliers")


def _outlier_figure(sessions: pd.DataFrame):
    groups = sorted(sessions["acq_group"].astype(str).unique())
    fig, ax = plt.subplots(figsize=(max(4, 1 + 0.8 * len(groups)), 3))
    rng = np.random.default_rng(0)
    for i, g in enumerate(groups):
        s = sessions[sessions["acq_group"].astype(str) == g]
        x = i + rng.uniform(-0.2, 0.2, len(s))
        ax.scatter(x, s["feature_z"], s=14, c=np.where(s["outlier"], "#c82333", "#446"))
    ax.axhline(3.5, ls="--", color="#c82333", lw=0.8)
    ax.set_xticks(range(len(groups)), [_short(g) for g in groups], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("robust z of feature distance")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def mrainet_section(summary: dict, losses: list[float] | None = None, agreement: pd.DataFrame | None = None,
                    warnings: list[str] | None = None) -> Section:
    """Training summary (what, how long, where the model is) and agreement of the tissue maps per group."""
    from bidsapp.reports.html import kv_table_html

    body = [text_html("MRAI-NET (Kouw et al. 2018) learns patch features in which the same tissue from different "
                      "scanners looks alike. It was trained across this dataset's acquisition groups; a linear "
                      "classifier on its features gives acquisition-invariant tissue maps "
                      "(desc-mrainet dseg and probseg per session).")]
    if summary:
        body.append(kv_table_html({k: v for k, v in summary.items()}))
    if losses:
        fig, ax = plt.subplots(figsize=(5, 2.6))
        w = max(1, len(losses) // 50)
        sm = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(len(sm)) + w // 2, sm, lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("contrastive loss")
        ax.spines[["top", "right"]].set_visible(False)
        fig.tight_layout()
        body.append(figure_html(fig, "Training loss (moving average)"))
    if agreement is not None and len(agreement):
        body.append(text_html("Agreement of the MRAI-NET tissue maps with the participant-level segmentation "
                              "(Dice, median over the group's sessions):"))
        body.append(table_html(agreement))
    body.append(_files_note(["group_mrainet_sessions.tsv", "group_mrainet_volumes.tsv", "models/mrainet-group.json"]))
    return Section("MRAI-NET acquisition-invariant features", "".join(body), list(warnings or []), anchor="mrainet")


def combat_section(before: pd.DataFrame | None, after: pd.DataFrame | None, stats: pd.DataFrame | None,
                   covariates: dict | None, warnings: list[str] | None = None) -> Section:
    from bidsapp.reports.figures import volumes_by_group_figure

    body = [text_html("ComBat (neuroCombat; Johnson 2007, Fortin 2018) removes additive and multiplicative "
                      "acquisition-group effects from tissue volumes, protecting age and sex when known. "
                      "eta\u00b2 is the share of volume variance explained by the acquisition group.")]
    if before is None or after is None or not len(before):
        body.append(text_html("Not computed (see the messages above)."))
        return Section("Volumes by group before and after ComBat", "".join(body), list(warnings or []), anchor="combat")
    lesion_cols = [c for c in LESION.names if c in after.columns]
    if lesion_cols:
        body.append(text_html("Lesion volumes are harmonised once per session, over the sessions that have one: "
                              "they are skewed and often zero, so ComBat works on log(1 + volume in mm\u00b3), "
                              "transformed back afterwards (and kept \u2265 0); as a single measure, without "
                              "ComBat's empirical-Bayes pooling across measures. Lesion counts are not harmonised."))
    methods = list(dict.fromkeys(after["method"].astype(str))) if "method" in after.columns else [None]
    for m in methods:
        if lesion_cols and m in M.registry(M.SESSION, LESION.key):  # sessions without a T1w: no tissue volumes
            continue
        b = _sites_named(before[before["method"].astype(str) == m] if m is not None else before)
        a = _sites_named(after[after["method"].astype(str) == m] if m is not None else after)
        cov = (covariates or {}).get(m) or []
        title = f"{m}: " if m is not None else ""
        body.append(figure_html(volumes_by_group_figure(b, color_col="site", title=f"{title}before ComBat"),
                                f"{title}volumes by acquisition group, as measured", dpi=80))
        if (a["combat"] == "harmonised").any():
            body.append(figure_html(volumes_by_group_figure(a, color_col="site",
                                                            title=f"{title}after ComBat (covariates: {', '.join(cov) or 'none'})"),
                                    f"{title}volumes by acquisition group after ComBat", dpi=80))
    for name in lesion_cols:
        fig = _lesion_combat_figure(before, after, name, (covariates or {}).get(LESION.key) or [])
        if fig is not None:
            body.append(figure_html(fig, f"{name} volume per session by acquisition group, as measured and after "
                                         "ComBat (on log(1 + volume))", dpi=80))
    if stats is not None and len(stats):
        body.append(table_html(stats))
    body.append(_files_note(["group_volumes_combat.tsv", "group_combat_stats.tsv", "group_combat_summary.tsv"]))
    return Section("Volumes by group before and after ComBat", "".join(body), list(warnings or []), anchor="combat")


def _sites_named(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with a missing site shown as ``unknown`` when other sessions have one (points are coloured by site)."""
    if "site" not in df.columns or df["site"].isna().all() or df["site"].notna().all():
        return df
    return df.assign(site=df["site"].astype(object).where(df["site"].notna(), "unknown"))


def _lesion_combat_figure(before: pd.DataFrame, after: pd.DataFrame, name: str, covariates: list[str]):
    """Lesion volume (mL) per session by acquisition group: as measured and after ComBat, side by side."""
    from bidsapp.reports.figures import volumes_by_group_figure

    keys = [k for k in ("participant_id", "session_id") if k in after.columns and k in before.columns]
    if not keys or "acq_group" not in after.columns:
        return None
    a = after[pd.to_numeric(after[name], errors="coerce").notna()].drop_duplicates(keys)
    if a.empty:
        return None
    measured = before[[*keys, name]].drop_duplicates(keys).rename(columns={name: "as measured"})
    df = a.merge(measured, how="left", on=keys)
    panels = ["as measured"]
    status = f"combat_{name}"
    if status not in df.columns or (df[status] == "harmonised").any():
        panels.append(f"after ComBat ({', '.join(covariates) or 'no covariates'})")
        df[panels[-1]] = df[name]
    return volumes_by_group_figure(_sites_named(df), panels, color_col="site",
                                   title=f"{name} volume before and after ComBat")


def _bridging(**kw) -> Section:
    from bidsapp.reports.bridging import bridging_section

    return bridging_section(**kw)


def _bridging_none(**kw) -> Section:
    from bidsapp.reports.bridging import no_change_section

    return no_change_section(**kw)


def _change(**kw) -> Section:
    from bidsapp.reports.longitudinal import group_section

    return group_section(**kw)


RENDERERS = {
    "combat": combat_section,
    "mrainet_groups": groups_section,
    "mrainet_pad": pad_section,
    "mrainet_embedding": embedding_section,
    "mrainet_outliers": outliers_section,
    "mrainet": mrainet_section,
    "bridging": _bridging,
    "bridging_none": _bridging_none,
    "change": _change,
}
"""Report item kind (:class:`bidsapp.harmonize.context.ReportItem`) -> the function that draws it."""


def render(items) -> list[Section]:
    """Sections for what a group step returned: its report items drawn, sections kept as they are."""
    out = []
    for item in items:
        if isinstance(item, Section):
            out.append(item)
        else:
            out.append(RENDERERS[item.kind](**item.data))
    return out
