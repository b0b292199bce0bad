"""Report figures: overlays on the scan (mask, tissues, registration and co-registration checks) and volume plots.

Overlays show several slices in each of three planes, in the RAS world frame and in neurological
convention (left hemisphere on the left), with each panel's aspect taken from the voxel sizes so that
anisotropic protocols are not distorted. Intensities are windowed on robust percentiles so that a few
hot voxels do not turn the brain grey. Every function returns a matplotlib Figure (Agg backend);
embed it with ``bidsapp.reports.html.figure_html``.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # reports are rendered headless, on clusters and in containers

import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib import patheffects  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from scipy import ndimage  # noqa: E402

from bidsapp.labels import LESION, TISSUE, VOLUME_LABELS  # noqa: E402

PLANES = ("sagittal", "coronal", "axial")
_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}
# (horizontal, vertical) voxel axes of each plane after RAS reorientation.
_DISPLAY_AXES = {"sagittal": (1, 2), "coronal": (0, 2), "axial": (0, 1)}
_WORLD = {"sagittal": "x", "coronal": "y", "axial": "z"}

TISSUE_COLORS = TISSUE.colours()
LESION_COLOR = LESION.colours()["lesion"]
LESION_PLANES = ("axial", "coronal", "sagittal")
MASK_COLOR = "#ff3030"
EDGE_COLOR = "#ff3030"
EDGE_COLOR_2 = "#00e5ff"
_TEXT = {"color": "white", "path_effects": [patheffects.withStroke(linewidth=1.5, foreground="black")]}


# ----------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------

def load_ras(img) -> nib.Nifti1Image:
    """Load (path or image) as a 3D image in the closest RAS orientation, whatever it was stored in."""
    if not isinstance(img, nib.spatialimages.SpatialImage):
        img = nib.load(str(img))
    if img.ndim > 3:
        if all(s == 1 for s in img.shape[3:]):
            img = img.slicer[..., 0] if img.ndim == 4 else nib.squeeze_image(img)
        else:
            raise ValueError(f"expected a 3D image, got shape {img.shape}")
    return nib.as_closest_canonical(img)


class ImageCache:
    """Load each image once (RAS, data in memory) when several pictures use it; ``None`` stays ``None``."""

    def __init__(self):
        self._images: dict[str, nib.Nifti1Image] = {}

    def __call__(self, path):
        if path is None or isinstance(path, nib.spatialimages.SpatialImage):
            return path
        key = str(path)
        if key not in self._images:
            img = load_ras(path)
            self._images[key] = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine)
        return self._images[key]


def resample_like(img, ref: nib.Nifti1Image, order: int = 0) -> nib.Nifti1Image:
    """Bring ``img`` onto ``ref``'s grid (a no-op when they already share it)."""
    img = load_ras(img)
    if img.shape == ref.shape and np.allclose(img.affine, ref.affine, atol=1e-3):
        return img
    from nibabel.processing import resample_from_to

    return resample_from_to(img, ref, order=order)


def robust_window(data: np.ndarray, mask: np.ndarray | None = None,
                  percentiles: tuple[float, float] = (0.5, 99.5)) -> tuple[float, float]:
    """Display range from percentiles of the voxels that matter (inside the mask, else non-zero)."""
    data = np.asarray(data)
    if data.ndim == 3 and data.size > 4_000_000:  # every other voxel gives the same percentiles, 8x faster
        data = data[::2, ::2, ::2]
        mask = None if mask is None else np.asarray(mask)[::2, ::2, ::2]
    if mask is not None and np.any(mask):
        vals = data[np.asarray(mask, bool)]
    else:
        vals = data[np.isfinite(data) & (data != 0)]
    vals = vals[np.isfinite(vals)]
    if vals.size > 2_000_000:  # percentiles of a subsample are as good and much faster
        vals = vals[:: vals.size // 1_000_000]
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(vals, percentiles)
    if not hi > lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def _bbox(mask: np.ndarray, tail: float = 0.002) -> list[tuple[int, int]]:
    """Extent of a region per axis, ignoring the outermost ``tail`` fraction of its voxels on each side,
    so that a few stray voxels far from the brain do not shrink the picture."""
    mask = np.asarray(mask, bool)
    total = int(mask.sum())
    if total == 0:
        return [(0, s - 1) for s in mask.shape]
    out = []
    for ax in range(mask.ndim):
        counts = mask.sum(axis=tuple(a for a in range(mask.ndim) if a != ax))
        cum = np.cumsum(counts)
        lo = int(np.searchsorted(cum, tail * total, side="right"))
        hi = int(np.searchsorted(cum, (1 - tail) * total, side="left"))
        out.append((lo, max(lo, min(hi, mask.shape[ax] - 1))))
    return out


def _foreground(data: np.ndarray) -> np.ndarray:
    """Head/brain region of an image without a mask: above a low robust threshold."""
    finite = np.isfinite(data)
    vals = data[finite]
    if vals.size > 500_000:
        vals = vals[:: vals.size // 250_000]
    levels = otsu_levels(vals, classes=2)
    if not levels:
        return finite & (data != 0)
    return finite & (data > 0.5 * levels[0] + 0.5 * float(vals.min()))


def pick_slices(region: np.ndarray, axis: int, n: int, margin: float = 0.12, bbox=None) -> list[int]:
    """``n`` evenly spaced slice indices through the region's extent along ``axis``, off its thin ends."""
    lo, hi = (bbox or _bbox(region))[axis]
    span = hi - lo
    if span <= 0:
        return [lo] * 1
    pos = np.linspace(lo + margin * span, hi - margin * span, n)
    return sorted(set(int(round(p)) for p in pos))


def otsu_levels(values: np.ndarray, classes: int = 3, bins: int = 128) -> list[float]:
    """Multi-level Otsu thresholds (2 or 3 classes), e.g. CSF/GM and GM/WM boundaries of a T1w."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if values.size < 10:
        return []
    hist, edges = np.histogram(values, bins=bins)
    p = hist / hist.sum()
    centers = (edges[:-1] + edges[1:]) / 2
    w = np.cumsum(p)
    mu = np.cumsum(p * centers)
    mu_t = mu[-1]
    if classes == 2:
        with np.errstate(divide="ignore", invalid="ignore"):
            between = (mu_t * w - mu) ** 2 / (w * (1 - w))
        k = int(np.nanargmax(between[:-1]))
        return [float(edges[k + 1])]
    # three classes: exhaustive search over pairs of cut points (bins^2 / 2 candidates, vectorised)
    i, j = np.triu_indices(bins - 1, k=1)
    w0, w1 = w[i], w[j] - w[i]
    w2 = 1 - w[j]
    m0, m1, m2 = mu[i], mu[j] - mu[i], mu_t - mu[j]
    with np.errstate(divide="ignore", invalid="ignore"):
        score = m0 ** 2 / w0 + m1 ** 2 / w1 + m2 ** 2 / w2
    score[~np.isfinite(score)] = -np.inf
    k = int(np.argmax(score))
    return [float(edges[i[k] + 1]), float(edges[j[k] + 1])]


# ----------------------------------------------------------------------------------------------
# mosaic
# ----------------------------------------------------------------------------------------------

def _slice2d(vol: np.ndarray, plane: str, idx: int) -> np.ndarray:
    """2D slice ready for ``imshow(origin="lower")``: rows = vertical display axis."""
    index = [slice(None)] * 3
    index[_AXIS[plane]] = idx  # basic indexing: a view (np.take would copy the whole volume)
    return vol[tuple(index)].T


def _aspect(zooms, plane: str) -> float:
    h, v = _DISPLAY_AXES[plane]
    return float(zooms[v]) / float(zooms[h])


def _world_coord(img: nib.Nifti1Image, plane: str, idx: int) -> float:
    ax = _AXIS[plane]
    vox = np.array(img.shape, float) / 2
    vox[ax] = idx
    return float(nib.affines.apply_affine(img.affine, vox)[ax])


def _label_rgba(lab2d: np.ndarray, colors: dict[int, str], alpha: float) -> np.ndarray:
    rgba = np.zeros(lab2d.shape + (4,), float)
    for value, color in colors.items():
        sel = lab2d == value
        if sel.any():
            rgba[sel] = to_rgba(color, alpha)
    return rgba


def _contour(ax, data2d, levels, color, lw=1.2, smooth: float = 0.0):
    d = np.asarray(data2d, float)
    if smooth:
        d = ndimage.gaussian_filter(d, smooth)
    if d.shape[0] < 2 or d.shape[1] < 2:
        return
    lo, hi = np.nanmin(d), np.nanmax(d)
    levels = [lv for lv in levels if lo < lv < hi]
    if levels:
        ax.contour(d, levels=levels, colors=[color], linewidths=lw, origin="lower")


def overlay_mosaic(background, *, contours: Sequence[tuple] = (), labels=None,
                   label_colors: dict[int, str] | None = None, label_names: dict[int, str] | None = None,
                   region=None, n_slices: int = 5, planes: Sequence[str] = PLANES, alpha: float = 0.45,
                   title: str | None = None, legend: Sequence[tuple[str, str]] = (),
                   panel_inches: float = 2.0, window: tuple[float, float] | None = None,
                   slices: dict[str, Sequence[int]] | None = None):
    """Mosaic of ``n_slices`` per plane (rows) of ``background`` with overlays.

    contours: (image, levels, colour[, legend label]) drawn as lines at the given levels; a binary mask
    uses levels ``[0.5]``. labels: a label image filled semi-transparently with ``label_colors``.
    region: a mask that decides which slices are shown and the crop (default: the first contour's
    image, else the labels, else the image foreground). slices: voxel indices (RAS grid of the
    background) to show per plane instead of those spread evenly through the region.
    All inputs are resampled to the background grid.
    """
    bg_img = load_ras(background)
    bg = np.asarray(bg_img.dataobj, dtype=np.float32)
    zooms = bg_img.header.get_zooms()[:3]

    cont = []
    for item in contours:
        img, levels, color = item[0], item[1], item[2]
        name = item[3] if len(item) > 3 else None
        is_label = len(levels) == 1 and levels[0] == 0.5
        arr = np.asarray(resample_like(img, bg_img, order=0 if is_label else 1).dataobj, dtype=np.float32)
        cont.append((arr, list(levels), color, name, not is_label))
    lab = None
    if labels is not None:
        lab = np.asarray(resample_like(labels, bg_img, order=0).dataobj).astype(np.int16)
        label_colors = label_colors or {lab.value: lab.colour for lab in TISSUE}
        label_names = label_names or TISSUE.by_value()

    if region is not None:
        reg = np.asarray(resample_like(region, bg_img, order=0).dataobj) > 0
    elif cont and not cont[0][4]:
        reg = cont[0][0] > 0.5
    elif lab is not None and np.any(lab > 0):
        reg = lab > 0
    else:
        reg = _foreground(bg)
    if not reg.any():
        reg = np.ones(bg.shape, bool)
    vmin, vmax = window or robust_window(bg, reg if reg.sum() > 100 else None)
    box = _bbox(reg)

    planes = list(planes)
    ncol = max(1, n_slices, *(len(v) for v in (slices or {}).values()))
    fs = max(1.0, panel_inches / 2.0)  # annotations grow with larger panels, to stay readable
    fig, axes = plt.subplots(len(planes), ncol, figsize=(panel_inches * ncol, panel_inches * len(planes)),
                             squeeze=False, facecolor="black")
    for r, plane in enumerate(planes):
        idxs = (sorted(int(i) for i in slices[plane]) if slices and plane in slices
                else pick_slices(reg, _AXIS[plane], n_slices, bbox=box))
        h_ax, v_ax = _DISPLAY_AXES[plane]
        pad_h = max(2, int(0.06 * (box[h_ax][1] - box[h_ax][0])))
        pad_v = max(2, int(0.06 * (box[v_ax][1] - box[v_ax][0])))
        h0, h1 = max(0, box[h_ax][0] - pad_h), min(bg.shape[h_ax], box[h_ax][1] + pad_h + 1)
        v0, v1 = max(0, box[v_ax][0] - pad_v), min(bg.shape[v_ax], box[v_ax][1] + pad_v + 1)
        for c in range(ncol):
            ax = axes[r, c]
            ax.set_facecolor("black")
            ax.set_axis_off()
            if c >= len(idxs):
                continue
            idx = idxs[c]
            crop = (slice(v0, v1), slice(h0, h1))
            ax.imshow(_slice2d(bg, plane, idx)[crop], cmap="gray", vmin=vmin, vmax=vmax, origin="lower",
                      interpolation="bilinear", aspect=_aspect(zooms, plane))
            if lab is not None:
                ax.imshow(_label_rgba(_slice2d(lab, plane, idx)[crop], label_colors, alpha), origin="lower",
                          interpolation="nearest", aspect=_aspect(zooms, plane))
            for arr, levels, color, _name, smooth in cont:
                _contour(ax, _slice2d(arr, plane, idx)[crop], levels, color, smooth=0.7 if smooth else 0.0)
            # annotations in data coordinates, so they sit on the picture whatever its aspect
            w, h = h1 - h0, v1 - v0
            dx, dy = 0.03 * w, 0.03 * h
            ax.text(dx, dy, f"{_WORLD[plane]}={_world_coord(bg_img, plane, idx):.0f}", fontsize=7 * fs,
                    va="bottom", ha="left", **_TEXT)
            if c == 0:
                lo, hi = ("P", "A") if plane == "sagittal" else ("L", "R")
                ax.text(dx, h - 1 - dy, lo, fontsize=8 * fs, va="top", ha="left", **_TEXT)
                ax.text(w - 1 - dx, h - 1 - dy, hi, fontsize=8 * fs, va="top", ha="right", **_TEXT)
        axes[r, 0].text(-0.04, 0.5, plane, color="white", fontsize=9 * fs, rotation=90, va="center", ha="right",
                        transform=axes[r, 0].transAxes)

    handles = []
    for _arr, _levels, color, name, _ in cont:
        if name:
            handles.append(Line2D([0], [0], color=color, lw=2, label=name))
    if lab is not None:
        present = set(np.unique(lab).tolist())
        handles += [Patch(facecolor=to_rgba(label_colors[k], 0.8), label=label_names.get(k, str(k)))
                    for k in sorted(label_colors) if k in present]
    handles += [Line2D([0], [0], color=color, lw=2, label=name) for name, color in legend]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9 * fs,
                   labelcolor="white", bbox_to_anchor=(0.5, -0.01))
    if title:
        fig.suptitle(title, color="white", fontsize=11)
    fig.subplots_adjust(left=0.03, right=0.99, top=0.93 if title else 0.99, bottom=0.06 if handles else 0.01,
                        wspace=0.02, hspace=0.04)
    return fig


def mask_figure(anat, mask, **kw):
    """Brain-mask contour over the anatomical image."""
    return overlay_mosaic(anat, contours=[(mask, [0.5], MASK_COLOR, "brain mask")], region=mask, **kw)


def segmentation_figure(anat, dseg, mask=None, **kw):
    """CSF/GM/WM filled semi-transparently over the anatomical image (brain-mask contour if given)."""
    contours = [(mask, [0.5], MASK_COLOR, "brain mask")] if mask is not None else []
    return overlay_mosaic(anat, contours=contours, labels=dseg, region=mask if mask is not None else None, **kw)


def lesion_slices(lesion: np.ndarray, axis: int, n: int, min_gap: int = 1) -> list[int]:
    """Up to ``n`` slice indices along ``axis`` through the largest lesion load (lesion voxels per slice),
    ascending. Slices are first kept ``min_gap`` apart so that separate lesion clusters show; when that
    leaves fewer than ``n`` the gap is halved until it is 1. Slices without lesion are never picked."""
    les = np.asarray(lesion, bool)
    load = les.sum(axis=tuple(a for a in range(les.ndim) if a != axis))
    order = [int(i) for i in np.argsort(-load, kind="stable") if load[i] > 0]
    picked: list[int] = []
    gap = max(1, int(min_gap))
    while True:
        for i in order:
            if len(picked) >= n:
                break
            if i not in picked and all(abs(i - q) >= gap for q in picked):
                picked.append(i)
        if len(picked) >= n or gap == 1:
            break
        gap = max(1, gap // 2)
    return sorted(picked)


def lesion_figure(background, lesion, mask=None, *, n_slices: int = 4, planes: Sequence[str] = LESION_PLANES,
                  panel_inches: float = 3.0, alpha: float = 0.35, **kw):
    """Lesion mask (outline and semi-transparent fill in the LESION colour) over the FLAIR (or whatever
    ``background`` is), ``n_slices`` per plane through the largest lesion load, cropped to the brain.

    Panels are larger than the other mosaics' (small lesions must be visible at browser size). Along each
    axis the slices are kept half the spacing of ``n_slices`` evenly spread slices apart where the lesions
    allow, so that separate clusters show. Raises ValueError for an empty mask (nothing to show)."""
    bg_img = load_ras(background)
    les = np.asarray(resample_like(lesion, bg_img, order=0).dataobj) > 0
    if not les.any():
        raise ValueError("the lesion mask is empty")
    if mask is not None:
        region = np.asarray(resample_like(mask, bg_img, order=0).dataobj) > 0
    else:
        region = _foreground(np.asarray(bg_img.dataobj, dtype=np.float32))
    region |= les  # the crop always holds every lesion
    box = _bbox(region)
    slices = {}
    for plane in planes:
        ax = _AXIS[plane]
        span = box[ax][1] - box[ax][0] + 1
        slices[plane] = lesion_slices(les, ax, n_slices, min_gap=max(1, int(span / (2 * n_slices))))
    les_img = nib.Nifti1Image(les.astype(np.uint8), bg_img.affine)
    return overlay_mosaic(bg_img, contours=[(les_img, [0.5], LESION_COLOR)], labels=les_img,
                          label_colors={1: LESION_COLOR}, label_names={1: "lesion"},
                          region=nib.Nifti1Image(region.astype(np.uint8), bg_img.affine), slices=slices,
                          n_slices=n_slices, planes=planes, alpha=alpha, panel_inches=panel_inches, **kw)


def _edge_levels(img, mask=None) -> list[float]:
    data = np.asarray(load_ras(img).dataobj, dtype=np.float32)
    sel = (np.asarray(resample_like(mask, load_ras(img)).dataobj) > 0) if mask is not None else _foreground(data)
    vals = data[sel]
    if vals.size > 500_000:
        vals = vals[:: vals.size // 250_000]
    return otsu_levels(vals, classes=3)


def registration_figure(subject_in_template, template, template_mask=None, **kw):
    """Template edges over the subject resampled into template space: the grey/white boundary (red, an
    Otsu level of the template) and the brain outline (cyan, the template mask when given).

    A good registration puts the lines on the subject's own grey/white and brain boundaries.
    """
    levels = _edge_levels(template, template_mask)
    contours = [(template, levels[1:], EDGE_COLOR, "template grey/white boundary")] if levels else []
    if template_mask is not None:
        contours.append((template_mask, [0.5], EDGE_COLOR_2, "template brain outline"))
    elif levels:
        contours.append((template, levels[:1], EDGE_COLOR_2, "template outer edge"))
    return overlay_mosaic(subject_in_template, contours=contours, region=template_mask, **kw)


def coregistration_figure(moving_in_anat, anat, dseg=None, mask=None, label: str = "T1w", **kw):
    """Edges of the T1w (white-matter boundary from the segmentation, else intensity levels) over the
    co-registered FLAIR/T2w/PDw: misalignment shows as lines off the moving image's boundaries."""
    contours = []
    if dseg is not None:
        d = load_ras(dseg)
        wm = nib.Nifti1Image((np.asarray(d.dataobj) == 3).astype(np.uint8), d.affine)
        contours.append((wm, [0.5], EDGE_COLOR, f"{label} white matter"))
    else:
        levels = _edge_levels(anat, mask)
        if levels:
            contours.append((anat, levels[1:], EDGE_COLOR, f"{label} edges"))
    if mask is not None:
        contours.append((mask, [0.5], EDGE_COLOR_2, f"{label} brain mask"))
    return overlay_mosaic(moving_in_anat, contours=contours, region=mask, **kw)


# ----------------------------------------------------------------------------------------------
# volumes
# ----------------------------------------------------------------------------------------------

def _order_labels(labels) -> list[str]:
    labels = list(dict.fromkeys(labels))
    known = [x for x in VOLUME_LABELS if x in labels]
    return known + [x for x in labels if x not in known]


def volumes_bar_figure(morph: pd.DataFrame, title: str | None = None):
    """Grouped bars (mL) of each label, one bar per method: shows where methods disagree."""
    df = morph.copy()
    if "method" not in df:
        df["method"] = "main"
    labels = _order_labels(df["label"].astype(str))
    methods = list(dict.fromkeys(df["method"].astype(str)))
    tissues = [x for x in labels if x != "brain"]
    panels = [tissues] + ([["brain"]] if "brain" in labels else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 + 1.4 * len(labels), 3.2),
                             gridspec_kw={"width_ratios": [len(p) for p in panels]}, squeeze=False)
    width = 0.8 / max(1, len(methods))
    colors = plt.get_cmap("tab10").colors
    for ax, labs in zip(axes[0], panels):
        x = np.arange(len(labs))
        for k, m in enumerate(methods):
            sub = df[df["method"].astype(str) == m].groupby("label")["volume_mm3"].mean()
            vals = [sub.get(lab, np.nan) / 1000.0 for lab in labs]
            bars = ax.bar(x + (k - (len(methods) - 1) / 2) * width, vals, width, label=m,
                          color=colors[k % len(colors)])
            ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
        ax.set_xticks(x, labs)
        ax.set_ylabel("volume (mL)")
        ax.spines[["top", "right"]].set_visible(False)
    if len(methods) > 1 or methods != ["main"]:
        axes[0, -1].legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def short_labels(values, width: int = 14) -> dict:
    """Tick labels for (possibly long) group keys, wrapped at separators to stay readable."""
    out = {}
    for v in values:
        s = str(v)
        for sep in ("_", "-", "/", "|"):
            s = s.replace(sep, sep + " ")
        out[v] = "\n".join(textwrap.wrap(s, width)[:3]).replace(" ", "") if len(str(v)) > width else str(v)
    return out


def volumes_by_group_figure(df: pd.DataFrame, tissues: Sequence[str] = VOLUME_LABELS,
                            group_col: str = "acq_group", color_col: str | None = "site",
                            title: str | None = None, scale: float = 1e-3, unit: str = "mL"):
    """One panel per tissue: box per group plus one jittered point per session, coloured by ``color_col``."""
    tissues = [t for t in tissues if t in df.columns]
    groups = sorted(df[group_col].astype(str).unique())
    labels = short_labels(groups)
    color_col = color_col if color_col and color_col in df.columns and df[color_col].notna().any() else group_col
    df = df.assign(**{color_col: df[color_col].astype(object).where(df[color_col].notna(), "unknown").astype(str)})
    cats = sorted(df[color_col].unique())
    cmap = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20").colors
    ccol = {c: cmap[i % len(cmap)] for i, c in enumerate(cats)}
    rng = np.random.default_rng(0)
    fig, axes = plt.subplots(1, max(1, len(tissues)), figsize=(max(3.0, 0.6 + 0.9 * len(groups)) * max(1, len(tissues)) / 1.3 + 1, 3.6),
                             squeeze=False)
    for ax, t in zip(axes[0], tissues):
        data = [pd.to_numeric(df.loc[df[group_col].astype(str) == g, t], errors="coerce").dropna().to_numpy() * scale
                for g in groups]
        ax.boxplot(data, positions=np.arange(len(groups)), widths=0.55, showfliers=False,
                   medianprops={"color": "black"}, boxprops={"color": "#666"}, whiskerprops={"color": "#666"},
                   capprops={"color": "#666"})
        for i, g in enumerate(groups):
            sub = df[df[group_col].astype(str) == g]
            y = pd.to_numeric(sub[t], errors="coerce").to_numpy() * scale
            x = i + rng.uniform(-0.18, 0.18, len(y))
            ax.scatter(x, y, s=16, c=[ccol[str(c)] for c in sub[color_col].astype(str)], alpha=0.85,
                       edgecolors="white", linewidths=0.4, zorder=3)
        ax.set_xticks(np.arange(len(groups)), [labels[g] for g in groups], fontsize=7,
                      rotation=30 if len(groups) > 3 else 0, ha="right" if len(groups) > 3 else "center")
        ax.set_title(t, fontsize=10)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_ylabel(f"volume ({unit})" if ax is axes[0, 0] else "")
        ax.spines[["top", "right"]].set_visible(False)
    return _finish_group_figure(fig, ccol, color_col, title)


def volumes_vs_age_figure(df: pd.DataFrame, tissues: Sequence[str] = VOLUME_LABELS, age_col: str = "age",
                          group_col: str = "acq_group", title: str | None = None, scale: float = 1e-3):
    """Volume against age per tissue, coloured by acquisition group, with a per-group linear fit."""
    tissues = [t for t in tissues if t in df.columns]
    age = pd.to_numeric(df[age_col], errors="coerce")
    groups = sorted(df[group_col].astype(str).unique())
    cmap = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20").colors
    fig, axes = plt.subplots(1, max(1, len(tissues)), figsize=(3.0 * max(1, len(tissues)) + 1, 3.2), squeeze=False)
    for ax, t in zip(axes[0], tissues):
        vol = pd.to_numeric(df[t], errors="coerce") * scale
        for i, g in enumerate(groups):
            sel = (df[group_col].astype(str) == g) & age.notna() & vol.notna()
            color = cmap[i % len(cmap)]
            ax.scatter(age[sel], vol[sel], s=16, color=color, alpha=0.85, edgecolors="white", linewidths=0.4,
                       label=g)
            if sel.sum() >= 3 and age[sel].nunique() >= 2:
                k, b = np.polyfit(age[sel].to_numpy(float), vol[sel].to_numpy(float), 1)
                xs = np.array([age[sel].min(), age[sel].max()])
                ax.plot(xs, k * xs + b, color=color, lw=1)
        ax.set_xlabel("age")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_title(t, fontsize=10)
        ax.set_ylabel("volume (mL)" if ax is axes[0, 0] else "")
        ax.spines[["top", "right"]].set_visible(False)
    return _finish_group_figure(fig, {g: cmap[i % len(cmap)] for i, g in enumerate(groups)}, group_col, title)


def _finish_group_figure(fig, colors: dict, column: str, title: str | None):
    """A per-group figure's legend (one dot a group, right of the axes; left out past 20 groups, where it
    would hide the plot), title and layout."""
    if len(colors) <= 20:
        handles = [Line2D([0], [0], marker="o", ls="", color=c, label=g) for g, c in colors.items()]
        fig.legend(handles=handles, title="acquisition group" if column == "acq_group" else column,
                   loc="upper left", bbox_to_anchor=(1.0, 0.95), frameon=False, fontsize=8, title_fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def figure_to_rgba(fig, dpi: int = 80) -> np.ndarray:
    """Rasterise a figure (H x W x 4 uint8) without closing it; used to check that overlays are drawn."""
    fig.set_dpi(dpi)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba()).copy()
