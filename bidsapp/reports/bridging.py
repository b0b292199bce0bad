"""Group-report section of protocol-change bridging: results table and the Fig. 4 contours."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd

from .html import Section, figure_html, table_html, text_html

TITLE = "Protocol-change bridging"
ANCHOR = "bridging"
_UNITS = {"InversionTime": ("TI", 1000.0, "ms"), "FlipAngle": ("flip angle", 1.0, "deg")}


def no_change_section(message: str, warnings=None) -> Section:
    return Section(title=TITLE, body=text_html(message), warnings=list(warnings or []), anchor=ANCHOR)


def contour_figure(grid, surface, best, test_points, parameter: str, tissues=("GM", "WM")):
    """Mean percent volume difference between sessions over (pre, post) hypothetical parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name, scale, unit = _UNITS.get(parameter, (parameter, 1.0, ""))
    g = np.asarray(grid, float) * scale
    fig, axes = plt.subplots(1, len(tissues), figsize=(5.2 * len(tissues), 4.4), squeeze=False)
    for ax, t, surf in zip(axes[0], tissues, surface):
        # surface[a, b]: pre value a (x axis), post value b (y axis)
        cs = ax.contourf(g, g, np.asarray(surf).T, levels=14, cmap="viridis")
        ax.contour(g, g, np.asarray(surf).T, levels=cs.levels, colors="k", linewidths=0.3, alpha=0.4)
        fig.colorbar(cs, ax=ax, label="mean |volume difference| (%)")
        if test_points:
            tp = np.asarray(test_points, float) * scale
            ax.scatter(tp[:, 0], tp[:, 1], c="black", s=22, label="best pair per test subject", zorder=3,
                       clip_on=False)   # an optimum at the grid's edge stays whole
        ax.scatter([best[0] * scale], [best[1] * scale], c="white", edgecolors="black", s=90, marker="o",
                   label="training optimum", zorder=4, clip_on=False)
        ax.set_xlabel(f"{name} assumed for the pre-change image ({unit})")
        ax.set_ylabel(f"{name} assumed for the post-change image ({unit})")
        ax.set_title(f"{t}")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def bridging_section(*, family: str, parameter: str, grid, surface, best, test_points, summary: pd.DataFrame,
                     subjects, scheme: str, warnings=None) -> Section:
    name, scale, unit = _UNITS.get(parameter, (parameter, 1.0, ""))
    split_text = {
        "split": "a random 55/45 split of subjects into training and test",
        "leave-one-out": "leave-one-out (each subject bridged with the pair found on the others)",
        "training-only": "a single subject (no test)",
    }.get(scheme, scheme)
    parts = [text_html(
        f"{len(subjects)} subject(s) with a {family} protocol change ({', '.join(subjects)}). Each pre- and "
        f"post-change image was segmented by the physics-aware U-Net with {len(grid)} hypothetical {name} values "
        f"({np.min(grid) * scale:g}-{np.max(grid) * scale:g} {unit}); the pair minimising the mean GM/WM volume "
        f"difference between sessions was chosen on training subjects and applied to test subjects, using "
        f"{split_text}.")]
    if np.isfinite(best[0]):
        parts.append(text_html(f"Training optimum: {name} {best[0] * scale:g} {unit} (pre) and "
                               f"{best[1] * scale:g} {unit} (post)."))
    if not summary.empty:
        show = summary.pivot_table(index=["method", "correction"], columns="tissue", values="mean_abs_diff_pct",
                                   sort=False).reset_index()
        show.columns = [str(c) if c in ("method", "correction") else f"{c} diff (%)" for c in show.columns]
        parts.append(table_html(show, float_format="{:.2f}"))
        parts.append(text_html("Mean absolute percent volume difference between the pre- and post-change session "
                               "on test subjects (paper, section 3.5: uncorrected 5 %, linear 3 %, physics 2 %)."))
    fig = contour_figure(grid, surface, best, test_points, parameter)
    parts.append(figure_html(fig, caption=f"Fig. 4 analogue: mean percent volume difference on training subjects "
                                          f"({family}); white point: training optimum; black points: each test "
                                          f"subject's own optimum."))
    return Section(title=f"{TITLE} ({html.escape(family)})", body="".join(parts), warnings=list(warnings or []),
                   anchor=f"{ANCHOR}-{family.lower()}")
