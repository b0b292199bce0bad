"""Participant report ``output_dir/sub-<label>.html``, built only from the derivatives on disk.

Reading files rather than workflow objects keeps the report reproducible (rerun it on any output
folder) and lets it describe partial results: whatever is missing becomes a visible warning, never
a crash. Sections: summary (with errors and warnings first), acquisitions (from the JSON sidecars),
one section per session (quality control, mask and segmentation overlays, registration and
co-registration checks, volumes per method) and an "About" block with versions and provenance. A
session whose quality-control verdict is ``fail`` makes the subject's status FAILED.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from bidsapp.bids.acquisition import BIDS_NAMES
from bidsapp.bids.collect import OTHER_MODALITIES, SessionFiles, session_files
from bidsapp.labels import LESION, VOLUME_LABELS
from bidsapp.physics.contrast import low_contrast_warning
from bidsapp.reports.html import (
    Section,
    figure_html,
    kv_table_html,
    messages_html,
    subsection_html,
    table_html,
    text_html,
    write_report,
)

LOG = logging.getLogger("scanbridge.reports")
# Acquisition fields shown in the table: (column title, record attribute).
ACQ_COLUMNS = (
    ("Manufacturer", "manufacturer"),
    ("Model", "model"),
    ("Field (T)", "field_strength"),
    ("Sequence", "sequence_family"),
    ("TR (ms)", "repetition_time"),
    ("TE (ms)", "echo_time"),
    ("TI (ms)", "inversion_time"),
    ("Flip (deg)", "flip_angle"),
    ("Site", "site"),
    ("Acquisition group", "group_key"),
)
_MS_KEYS = {"repetition_time", "echo_time", "inversion_time"}
# Acquisition parameters the segmentation models need; their absence is reported per image.
_NEEDED = {"MPRAGE": ("repetition_time", "inversion_time", "flip_angle"),
           "SPGR": ("repetition_time", "echo_time", "flip_angle")}


# ----------------------------------------------------------------------------------------------
# what is on disk
# ----------------------------------------------------------------------------------------------

def _sidecar(path: Path | None) -> Path | None:
    from bidsapp.bids.derivatives import sidecar_path

    return None if path is None else sidecar_path(path)


def _read_json(path: Path | None, problems: list[str]) -> dict:
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError) as exc:
        problems.append(f"{path}: unreadable sidecar ({str(exc).splitlines()[0]})")
        return {}


# ----------------------------------------------------------------------------------------------
# acquisition records from sidecars
# ----------------------------------------------------------------------------------------------

def _record_from_sidecar(meta: dict) -> dict:
    """Acquisition fields of a derivative sidecar: the ``Acquisition`` record, else BIDS keys."""
    rec = meta.get("Acquisition")
    if isinstance(rec, dict) and rec:
        return dict(rec)
    out = {}
    for _title, key in ACQ_COLUMNS:
        if key in BIDS_NAMES and BIDS_NAMES[key] in meta:
            out[key] = meta[BIDS_NAMES[key]]
    for k in ("InstitutionName", "site", "Site"):
        if k in meta:
            out["site"] = meta[k]
    for k in ("acq_group", "AcquisitionGroup", "group_key"):
        if k in meta:
            out["group_key"] = meta[k]
    return out


def _fmt_value(key: str, value) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)) or value == "":
        return "n/a"
    if key in _MS_KEYS:
        try:
            return f"{float(value) * 1000:.4g}"
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def acquisition_rows(files: list[SessionFiles], problems: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """One row per processed image with its acquisition record, plus warnings about missing fields."""
    rows, warns = [], []
    for f in files:
        images = [(f.reference, f.preproc)] + [(m, p) for m, p in f.others.items()]
        for kind, path in images:
            if path is None:
                continue
            meta = _read_json(_sidecar(path), problems)
            rec = _record_from_sidecar(meta)
            row = {"Session": f.label, "Image": kind, "File": path.name}
            for title, key in ACQ_COLUMNS:
                row[title] = _fmt_value(key, rec.get(key))
            rows.append(row)
            if not meta:
                warns.append(f"{path.name}: no JSON sidecar; acquisition parameters unknown")
                continue
            if not rec:
                warns.append(f"{path.name}: sidecar has no acquisition parameters")
                continue
            for w in rec.get("warnings") or []:
                warns.append(str(w))
            missing = list(rec.get("missing") or [])
            family = rec.get("sequence_family")
            if kind == "T1w" and family in _NEEDED:
                gaps = [k for k in _NEEDED[family] if rec.get(k) in (None, "")]
                if gaps:
                    missing += [g for g in gaps if g not in missing]
            if missing:
                warns.append(f"{path.name}: missing sidecar field(s) {', '.join(map(str, missing))}")
    return pd.DataFrame(rows), warns


# ----------------------------------------------------------------------------------------------
# template lookup for the registration check
# ----------------------------------------------------------------------------------------------

def _paths_in(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _paths_in(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _paths_in(v)


def find_template_image(name: str, hints: dict | None = None, template=None) -> Path | None:
    """A T1w image of template ``name`` from what is on disk, never downloading.

    Looks at ``template`` (a description dict such as ``bidsapp.templates.get_template`` returns, a
    T1w file or a folder of ``tpl-<name>`` files), the transform's sidecar, then TEMPLATEFLOW_HOME.
    """
    roots = []
    if isinstance(template, dict):
        if template.get("name") in (None, name):
            hints = {"template": template, **(hints or {})}
    elif template is not None:
        tp = Path(template)
        if tp.is_file() and name in tp.name:
            return tp
        if tp.is_dir():
            roots.append(tp)
    for s in _paths_in(hints or {}):
        if s.endswith((".nii", ".nii.gz")) and "T1w" in os.path.basename(s) and "mask" not in s:
            p = Path(s.replace("file://", ""))
            if p.exists():
                return p
    if os.environ.get("TEMPLATEFLOW_HOME"):
        roots.append(Path(os.environ["TEMPLATEFLOW_HOME"]))
    roots.append(Path.home() / ".cache" / "templateflow")
    try:  # the offline ICBM152 seed lives in scanbridge's own cache
        from bidsapp.templates import resolve_cache_dir

        roots.append(resolve_cache_dir() / "templateflow")
    except Exception:  # noqa: BLE001 - only a place to look
        pass
    for root in roots:
        for base in (root / f"tpl-{name}", root):
            hits = sorted(base.glob(f"tpl-{name}_res-01_*T1w.nii*")) + sorted(base.glob(f"tpl-{name}_*T1w.nii*"))
            hits = [h for h in hits if "_desc-brain" not in h.name or len(hits) == 1]
            if hits:
                return hits[0]
    return None


def _template_mask(template: Path, hints: dict | None = None) -> Path | None:
    """The template's brain mask: named in the template description, else beside the T1w."""
    for s in _paths_in(hints or {}):
        if s.endswith((".nii", ".nii.gz")) and "brain_mask" in os.path.basename(s):
            p = Path(s.replace("file://", ""))
            if p.exists() and p.parent == template.parent:
                return p
    base = template.name.split("_T1w")[0].split("_desc-")[0]
    hits = sorted(template.parent.glob(base + "*_desc-brain_mask.nii*"))
    return hits[0] if hits else None


def subject_in_template(f: SessionFiles, tpl: str, template: Path):
    """The preprocessed T1w resampled into template space (saved copy, else antspyx with the saved xfm)."""
    import nibabel as nib

    if tpl in f.template_space:
        return nib.load(str(f.template_space[tpl]))
    import ants

    fixed = ants.image_read(str(template))
    moving = ants.image_read(str(f.preproc))
    moved = ants.apply_transforms(fixed=fixed, moving=moving, transformlist=[str(p) for p in f.xfm_to_template[tpl]],
                                  interpolator="linear")
    return ants.to_nibabel(moved) if hasattr(ants, "to_nibabel") else nib.Nifti1Image(
        moved.numpy(), nib.load(str(template)).affine)


# ----------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------

def _volumes_block(f: SessionFiles, problems: list[str]) -> tuple[str, list[str], pd.DataFrame | None]:
    from bidsapp.reports import figures

    warns = []
    frames = []
    for p in f.morph:
        try:
            df = pd.read_csv(p, sep="\t")
        except Exception as exc:  # noqa: BLE001 - any unreadable table is a warning
            warns.append(f"{p.name}: unreadable ({str(exc).splitlines()[0]})")
            continue
        if not {"label", "volume_mm3"} <= set(df.columns):
            warns.append(f"{p.name}: expected columns method, label, volume_mm3; found {', '.join(df.columns)}")
            continue
        if "method" not in df:
            m = re.search(r"_desc-([a-zA-Z0-9]+)_", p.name)
            df["method"] = m.group(1) if m and m.group(1) != "volumes" else "main"
        frames.append(df[["method", "label", "volume_mm3"]])
    if not frames:
        if f.reference == "T1w" or f.morph:
            warns.append("no volumes table (*_desc-volumes_morph.tsv) for this session")
        return "", warns, None
    morph = pd.concat(frames).drop_duplicates(["method", "label"], keep="first")
    morph = morph[~morph["label"].astype(str).isin(LESION.names)]  # shown in the lesion block
    if morph.empty:
        if f.reference == "T1w":
            warns.append("the volumes table has no tissue volumes for this session")
        return "", warns, None
    morph["volume_mm3"] = pd.to_numeric(morph["volume_mm3"], errors="coerce")
    wide = morph.pivot_table(index="method", columns="label", values="volume_mm3", aggfunc="first", sort=False)
    order = [c for c in VOLUME_LABELS if c in wide.columns] + [c for c in wide.columns if c not in VOLUME_LABELS]
    wide = (wide[order] / 1000.0).rename(columns={c: f"{c} (mL)" for c in order})
    wide.columns.name = None
    wide = wide.reset_index()
    body = table_html(wide, float_format="{:.1f}")
    methods = list(dict.fromkeys(morph["method"]))
    if len(methods) > 1:
        ref = morph[morph["method"] == methods[0]].set_index("label")["volume_mm3"]
        diffs = []
        for m in methods[1:]:
            other = morph[morph["method"] == m].set_index("label")["volume_mm3"]
            d = {"method": f"{m} vs {methods[0]}"}
            for lab in order:
                if lab in ref and lab in other and ref[lab]:
                    d[f"{lab} (%)"] = 100.0 * (other[lab] - ref[lab]) / ref[lab]
            diffs.append(d)
        body += text_html("Relative difference between methods:") + table_html(pd.DataFrame(diffs), "{:+.1f}")
    body += figure_html(figures.volumes_bar_figure(morph), caption="Tissue volumes by segmentation method.")
    return body, warns, morph


def _figure_or_warning(make, caption: str, warns: list[str], what: str, dpi: int = 90) -> str:
    try:
        return figure_html(make(), caption=caption, dpi=dpi)
    except Exception as exc:  # noqa: BLE001 - one broken image must not cost the whole report
        LOG.warning("report: %s failed: %s", what, exc)
        warns.append(f"{what} could not be drawn: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        return ""


# ----------------------------------------------------------------------------------------------
# lesions
# ----------------------------------------------------------------------------------------------

_LESION_COLUMNS = ("id", "volume_mm3", "location")
N_LARGEST_LESIONS = 10
"""Rows of the largest-lesions table."""


def _locations() -> tuple[str, ...]:
    from bidsapp.models.lesion import LOCATIONS

    return LOCATIONS


def lesion_summary(f: SessionFiles, problems: list[str], desc: str | None = None) -> dict | None:
    """What a lesion method wrote for a session, read back (None when it wrote nothing): the main answer, or
    with ``desc`` the baseline of that desc (:attr:`SessionFiles.lesion_alt`, e.g. ``wmh``).

    Keys: ``count`` and ``volume_mm3`` (from the per-lesion table, else the mask sidecar's LesionCount and
    LesionVolume_mm3; None when neither says), ``table`` (the per-lesion DataFrame or None), ``meta``
    (the mask sidecar), ``mask`` (its path), ``missing``/``used`` (contrasts) and ``warnings``.
    """
    if desc is None:
        mask, stats, mask_desc, stats_desc = f.lesion_mask, f.lesion_stats, LESION.main_desc, LESION.stats_desc
    else:
        alt = f.lesion_alt.get(desc) or {}
        mask, stats, mask_desc, stats_desc = alt.get("mask"), alt.get("stats"), desc, desc
    if mask is None and stats is None:
        return None
    warns: list[str] = []
    meta = _read_json(_sidecar(mask), problems) if mask is not None else {}
    if not meta and stats is not None:
        meta = _read_json(_sidecar(stats), problems)
    table = None
    if stats is None:
        warns.append(f"{f.prefix}: no per-lesion table (*_desc-{stats_desc}_stats.tsv)")
    else:
        try:
            table = pd.read_csv(stats, sep="\t", na_values=["n/a"], keep_default_na=False)
        except pd.errors.EmptyDataError:
            table = pd.DataFrame(columns=list(_LESION_COLUMNS))
        except Exception as exc:  # noqa: BLE001 - an unreadable table is a warning
            warns.append(f"{stats.name}: unreadable ({str(exc).splitlines()[0]})")
        if table is not None and not set(_LESION_COLUMNS) <= set(table.columns):
            warns.append(f"{stats.name}: expected columns {', '.join(_LESION_COLUMNS)}; "
                         f"found {', '.join(map(str, table.columns))}")
            table = None
    if table is not None:
        table = table.copy()
        table["volume_mm3"] = pd.to_numeric(table["volume_mm3"], errors="coerce")
        table["location"] = table["location"].fillna("n/a").astype(str)
        count, volume = len(table), float(table["volume_mm3"].sum())
        told = meta.get("LesionCount")
        if isinstance(told, int) and told != count:
            warns.append(f"{stats.name} lists {count} lesion(s), the mask sidecar says {told}")
    else:
        count, volume = meta.get("LesionCount"), meta.get("LesionVolume_mm3")
        count = count if isinstance(count, int) else None
        volume = float(volume) if isinstance(volume, (int, float)) else None
    if mask is None:
        warns.append(f"{f.prefix}: no lesion mask (*_desc-{mask_desc}_mask.nii.gz)")
    as_list = (lambda v: [str(x) for x in v] if isinstance(v, list) else ([str(v)] if v else []))
    return {"count": count, "volume_mm3": volume, "table": table, "meta": meta, "mask": mask,
            "used": as_list(meta.get("ContrastsUsed")), "missing": as_list(meta.get("ContrastsMissing")),
            "warnings": warns}


def _lesion_method(meta: dict, fallback: str = "") -> str:
    """``<title> (<key>)`` of the lesion method named in a sidecar (``MS lesions (lesion)``)."""
    from bidsapp import methods as M

    key = meta.get("Method") if isinstance(meta.get("Method"), str) else ""
    if not key:
        return fallback
    try:
        title = M.get(key).title
    except ValueError:
        return key
    return key if title == key else f"{title} ({key})"


def lesion_location_table(table: pd.DataFrame) -> pd.DataFrame:
    """Count and volume (ml) per location class (every class, in the method's order, then any other
    value found), with a final ``all`` row."""
    known = list(_locations())
    order = known + [x for x in dict.fromkeys(table["location"]) if x not in known]
    rows = []
    for loc in order:
        sel = table[table["location"] == loc]
        rows.append({"location": loc, "lesions": len(sel), "volume (ml)": float(sel["volume_mm3"].sum()) / 1000.0})
    rows.append({"location": "all", "lesions": len(table), "volume (ml)": float(table["volume_mm3"].sum()) / 1000.0})
    return pd.DataFrame(rows)


def largest_lesions(table: pd.DataFrame, n: int = N_LARGEST_LESIONS) -> pd.DataFrame:
    """The ``n`` largest lesions: id, volume (mm^3), location and centroid (mm) when the table has it."""
    top = table.sort_values("volume_mm3", ascending=False, kind="stable").head(n)
    out = pd.DataFrame({"id": top["id"].to_numpy(), "volume (mm³)": top["volume_mm3"].to_numpy(),
                        "location": top["location"].to_numpy()})
    cols = [f"centroid_{a}_mm" for a in "xyz"]
    if set(cols) <= set(top.columns):
        out["centroid x, y, z (mm)"] = [", ".join("n/a" if pd.isna(v) else f"{float(v):.0f}" for v in row)
                                        for row in top[cols].itertuples(index=False)]
    return out


def _lesion_filling_note(f: SessionFiles, problems: list[str]) -> str:
    """One line from the tissue segmentations' LesionFilling: their WM includes the lesion voxels."""
    parts = []
    for name, path in ([("main answer", f.dseg)] if f.dseg is not None else []) + list(f.dseg_alt.items()):
        meta = _read_json(_sidecar(path), problems)
        text = meta.get("LesionFilling")
        if not text:
            continue
        m = re.search(r"\(([0-9.,]+)\s*mm\^?3 relabelled\)", str(text))
        parts.append(f"{_method_name(meta) or name}: " + (f"{m.group(1)} mm³ relabelled" if m else str(text)))
    if not parts:
        return ""
    return text_html("Tissue volumes count lesion voxels as white matter (lesion filling); the lesion volume is "
                     "reported here, separately (" + "; ".join(parts) + ").")


def _words(items: list[str], conj: str) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {conj} {items[-1]}"


def _lesion_block(f: SessionFiles, img, problems: list[str], warns: list[str]) -> str:
    """The main lesion answer (``Lesions``), then one block per baseline lesion method, as the tissue
    segmentations each get theirs: numbers, locations and the mask drawn over the FLAIR."""
    info = lesion_summary(f, problems)
    alts = {desc: lesion_summary(f, problems, desc) for desc in f.lesion_alt}
    alts = {desc: a for desc, a in alts.items() if a is not None}
    out = []
    if info is not None:
        warns += info["warnings"]
        body = _lesion_body(f, info, img, warns)
        if alts:
            body.append(text_html("Beside this main answer: " + "; ".join(
                f"{_lesion_method(a['meta'], desc)}, {_lesion_numbers(a)} (desc-{desc}, below)"
                for desc, a in alts.items()) + "."))
        body.append(_lesion_filling_note(f, problems))
        out.append(subsection_html("Lesions", "".join(body)))
    for desc, a in alts.items():
        warns += a["warnings"]
        body = _lesion_body(f, a, img, warns)
        if info is not None and a["volume_mm3"] is not None and info["volume_mm3"] is not None:
            dv = (a["volume_mm3"] - info["volume_mm3"]) / 1000.0
            dn = "" if a["count"] is None or info["count"] is None else f", {a['count'] - info['count']:+d} lesions"
            body.append(text_html(f"Against the main answer ({_lesion_method(info['meta'], 'desc-lesion')}): "
                                  f"{dv:+.2f} ml{dn}."))
        out.append(subsection_html(f"Lesions, baseline: {_lesion_method(a['meta'], desc)}", "".join(body)))
    return "".join(out)


def _lesion_numbers(info: dict) -> str:
    n, v = info["count"], info["volume_mm3"]
    return ("n/a" if n is None else f"{n} lesion(s)") + ("" if v is None else f", {v / 1000.0:.2f} ml")


def _lesion_body(f: SessionFiles, info: dict, img, warns: list[str]) -> list[str]:
    """Numbers, locations, overlay and largest lesions of one lesion method's outputs (:func:`lesion_summary`)."""
    from bidsapp.reports import figures

    meta, body, mask = info["meta"], [], info["mask"]
    if info["missing"]:
        used = f" from {_words(info['used'], 'and')}," if info["used"] else ""
        body.append(messages_html([f"Lesions segmented{used} without {_words(info['missing'], 'or')}: "
                                   "expect lower sensitivity than with every contrast."]))
    model = meta.get("Model") if isinstance(meta.get("Model"), dict) else {}
    model_txt = " ".join(str(model.get(k)) for k in ("Name", "Version") if model.get(k)) or "n/a"
    thr, min_vol = meta.get("Threshold"), meta.get("MinimumLesionVolume_mm3")
    rule = ", ".join(([f"probability threshold {thr:g}"] if isinstance(thr, (int, float)) else [])
                     + ([f"minimum lesion volume {min_vol:g} mm³"] if isinstance(min_vol, (int, float)) else []))
    count, volume, table = info["count"], info["volume_mm3"], info["table"]
    items = [("lesions", "n/a" if count is None else str(count)),
             ("total lesion volume", "n/a" if volume is None else f"{volume / 1000.0:.2f} ml"),
             ("contrasts used", ", ".join(info["used"]) or "n/a"),
             ("model", model_txt)]
    if _lesion_method(meta):
        items.insert(0, ("method", _lesion_method(meta)))
    if rule:
        items.append(("detection", rule))
    body.append(kv_table_html(items))
    if count == 0:
        body.append(text_html("No lesions found" + (f" ({rule})." if rule else ".")))
    else:
        if table is not None and len(table):
            body.append(text_html("Lesions by location:") + table_html(lesion_location_table(table), "{:.2f}"))
        if mask is not None:
            bg_kind, bg = next(((m, f.on_grid[m]) for m in ("FLAIR", "T2w", "PDw") if m in f.on_grid),
                               (f.reference, f.preproc))
            if bg is None:
                warns.append(f"{f.prefix}: no image on the reference grid to draw the lesions on")
            else:
                body.append(_figure_or_warning(
                    lambda: figures.lesion_figure(img(bg), img(mask), img(f.mask)),
                    f"Lesion mask ({mask.name}) outlined and filled over the preprocessed {bg_kind} "
                    f"({bg.name}); per plane, the slices with the largest lesion load.", warns,
                    f"lesion overlay {mask.name}", dpi=100))
        if table is not None and len(table):
            n = min(N_LARGEST_LESIONS, len(table))
            body.append(text_html(f"The {n} largest of {len(table)} lesions:" if n < len(table)
                                  else ("The lesion:" if n == 1 else "Every lesion, largest first:"))
                        + table_html(largest_lesions(table), "{:.1f}"))
    return body


# ----------------------------------------------------------------------------------------------
# quality control
# ----------------------------------------------------------------------------------------------

_BADGE = {"pass": ("#d4edda", "#155724"), "warn": ("#fff3cd", "#856404"), "fail": ("#f8d7da", "#721c24"),
          "n/a": ("#eee", "#555")}


def _badge(status: str) -> str:
    import html

    bg, fg = _BADGE.get(status, _BADGE["n/a"])
    return (f'<span style="background:{bg};color:{fg};border-radius:3px;padding:0 6px;font-weight:600">'
            f"{html.escape(status.upper())}</span>")


def read_session_qc(f: SessionFiles, problems: list[str]) -> dict | None:
    """The session's QC row (:func:`bidsapp.qc.read_qc`) plus ``source`` (the input file's name, from the
    sidecar); None when the session has no QC table."""
    from bidsapp import qc

    path = qc.qc_path(f.anat_dir, f.prefix)
    if not path.is_file():
        return None
    try:
        row = qc.read_qc(path)
    except Exception as exc:  # noqa: BLE001 - an unreadable table is a warning
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        problems.append(f"{path.name}: unreadable QC table ({why})")
        return None
    sources = _read_json(_sidecar(path), problems).get("Sources") or []
    row["source"] = str(sources[0]).rsplit("/", 1)[-1] if sources else f"{f.prefix}_{f.reference}"
    return row


def qc_failure(row: dict | None) -> str | None:
    """The one-line error of a failed QC verdict (the run's own message for it), else None."""
    from bidsapp import qc

    if not row or row.get("verdict") != "fail":
        return None
    return qc.failure_message(row["source"], row.get("reasons") or [])


def _qc_block(f: SessionFiles, problems: list[str], warns: list[str], errs: list[str]) -> str:
    """Measures with their plausible ranges and a pass/warn/fail badge each, and the session's verdict."""
    import html

    from bidsapp import qc

    row = read_session_qc(f, problems)
    if row is None:
        if f.preproc is None:
            return ""
        return subsection_html("Quality control", text_html(
            f"No quality-control table (*_desc-{qc.QC_DESC}_{qc.QC_SUFFIX}.tsv) for this session."))
    verdict = row.get("verdict", "n/a")
    if (msg := qc_failure(row)) is not None:
        errs.append(msg)
    elif verdict == "warn":
        warns.extend(f"{f.prefix}: quality control: {r}" for r in row.get("reasons") or [])
    cells = []
    for name, (desc, units) in qc.MEASURES.items():
        value = row.get(name)
        rules = [r for r in qc.RULES if r.measure == name and r.applies(f.reference)]
        if value is None or pd.isna(value):
            text = "n/a"
        elif name == "head_present":
            text = "yes" if value >= 1 else "no"
        else:
            text = f"{value:.0f} {units}" if units else f"{value:.3g}"
        ranges = "; ".join(f"{r.severity} if no" if name == "head_present" else f"{r.severity} {r.limits}"
                           for r in rules) or "(not judged)"
        states = [qc.rule_status(r, row, f.reference) for r in rules]
        status = next((s for s in ("fail", "warn", "pass") if s in states), "n/a")
        cells.append(f"<tr><td title=\"{html.escape(desc)}\">{html.escape(name)}</td><td>{html.escape(text)}</td>"
                     f"<td>{html.escape(ranges)}</td><td>{_badge(status)}</td></tr>")
    table = ('<table class="tbl"><tr><th>measure</th><th>value</th><th>judged</th><th>status</th></tr>'
             + "".join(cells) + "</table>")
    head = f"<p>Verdict: {_badge(verdict)}"
    if verdict == "fail":
        head += " the scan is not usable; its results are written but must not be used."
    head += "</p>"
    note = text_html("Image-quality measures in the MRIQC sense on the preprocessed reference image, its brain "
                     "mask and main tissue segmentation; measures needing a tissue segmentation are n/a without "
                     "one. Hover a measure's name for its definition.")
    return subsection_html("Quality control", head + table + note)


def session_section(f: SessionFiles, problems: list[str], template=None, n_slices: int = 5) -> Section:
    """Quality control, overlays, registration checks and volumes of one session."""
    from bidsapp.reports import figures

    warns: list[str] = []
    errs: list[str] = []
    body = [_qc_block(f, problems, warns, errs)]
    img = figures.ImageCache()  # each file is decompressed once for all the pictures of the session
    ref = f.reference
    if f.preproc is None:
        errs.append(f"{f.prefix}: no preprocessed reference image (*_desc-preproc_T1w.nii.gz, or FLAIR/T2w/PDw "
                    "in a session without a T1w); overlays cannot be drawn")
    else:
        if f.mask is not None:
            mask_meta = _read_json(_sidecar(f.mask), problems)
            if mask_meta.get("BrainExtractionFallback"):
                warns.append(f"{f.prefix}: brain extraction: {mask_meta['BrainExtractionFallback']}")
            how = str(mask_meta.get("Method") or "").split(":")[0]
            vol = mask_meta.get("MaskVolumeML")
            how_txt = (f" Method: {how}" + (f", {vol:.0f} ml" if isinstance(vol, (int, float)) else "") + "."
                       if how else "")
            body.append(subsection_html("Brain mask", _figure_or_warning(
                lambda: figures.mask_figure(img(f.preproc), img(f.mask), n_slices=n_slices),
                f"Brain mask (red contour) over the preprocessed {ref} ({f.preproc.name}).{how_txt}", warns,
                "brain-mask overlay")))
        else:
            warns.append(f"{f.prefix}: no brain mask (*_desc-brain_mask.nii.gz)")
            body.append(subsection_html(f"Preprocessed {ref}", _figure_or_warning(
                lambda: figures.overlay_mosaic(img(f.preproc), n_slices=n_slices),
                f"The preprocessed {ref} ({f.preproc.name}); no brain mask to overlay.", warns, f"{ref} mosaic")))
        segs = ([("main answer", f.dseg)] if f.dseg is not None else []) + list(f.dseg_alt.items())
        if not segs and ref == "T1w":
            warns.append(f"{f.prefix}: no tissue segmentation (*_dseg.nii.gz)")
        elif not segs:
            body.append(text_html(f"No tissue segmentation: the tissue methods need a T1w, and this session's "
                                  f"reference image is a {ref}."))
        for name, path in segs:
            meta = _read_json(_sidecar(path), problems)
            method = _method_name(meta) or name
            if meta.get("PhysicsFallback"):
                warns.append(f"{f.prefix}: no-physics U-Net used because {meta['PhysicsFallback']}")
            if meta.get("VolumesWarning"):
                warns.append(f"{f.prefix}: {meta['VolumesWarning']}")
            ratio = meta.get("ExpectedWMGMSignalRatio")
            if isinstance(ratio, (int, float)) and (msg := low_contrast_warning(ratio)):
                warns.append(f"{f.prefix}: {msg}")
            told = meta.get("SequenceParametersUsed") or {}
            told_txt = ("; sequence parameters given to the model: "
                        + ", ".join(f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in told.items())
                        if told else "")
            if isinstance(ratio, (int, float)):
                told_txt += f"; expected WM/GM signal ratio {ratio:.3f}"
            body.append(subsection_html(f"Tissue segmentation: {method}", _figure_or_warning(
                lambda p=path: figures.segmentation_figure(img(f.preproc), img(p), img(f.mask), n_slices=n_slices),
                f"CSF/GM/WM ({path.name}) over the preprocessed T1w; red: brain mask{told_txt}.", warns,
                f"segmentation overlay {path.name}")))
        if ref == "T1w":
            body.append(_registration_block(f, problems, warns, template, n_slices))
        for mod, path in f.others.items():
            body.append(subsection_html(f"{mod} to {ref} co-registration", _figure_or_warning(
                lambda p=path: figures.coregistration_figure(img(p), img(f.preproc), dseg=img(f.dseg), mask=img(f.mask),
                                                             n_slices=n_slices),
                f"{path.name} with {ref} white-matter boundary (red) and brain mask (cyan).", warns,
                f"{mod} co-registration check")))
    body.append(_lesion_block(f, img, problems, warns))
    vol_body, vol_warns, _ = _volumes_block(f, problems)
    warns += vol_warns
    if vol_body:
        body.append(subsection_html("Volumes", vol_body))
    title = f"Session {f.session}" if f.session else "Anatomical"
    if f.label not in (f"ses-{f.session}", "(no session)"):
        title += f" ({f.label})"
    return Section(title=title, body="".join(body), warnings=warns, errors=errs,
                   anchor=re.sub(r"[^a-zA-Z0-9_-]", "-", f"ses-{f.prefix}"))


def _registration_block(f: SessionFiles, problems, warns, template_spec, n_slices) -> str:
    from bidsapp.reports import figures

    tpls = list(dict.fromkeys(list(f.template_space) + list(f.xfm_to_template)))
    if not tpls:
        warns.append(f"{f.prefix}: no transform to a template (*_from-T1w_to-<template>_mode-image_xfm.*)")
        return ""
    out = []
    for tpl in tpls:
        hints = {}
        for p in f.xfm_to_template.get(tpl, []):
            hints.update(_read_json(_sidecar(p), problems))
        template = find_template_image(tpl, hints, template_spec)
        if template is None:
            warns.append(f"registration check to {tpl} skipped: template image not found on disk")
            continue
        if isinstance(template_spec, dict):
            hints = {"template": template_spec, **hints}
        tmask = _template_mask(template, hints)

        def make(tpl=tpl, template=template, tmask=tmask):
            return figures.registration_figure(subject_in_template(f, tpl, template), template,
                                               template_mask=tmask, n_slices=n_slices)

        out.append(subsection_html(f"Registration to {tpl}", _figure_or_warning(
            make, f"{tpl} grey/white boundary (red) and brain outline (cyan) over the subject's T1w "
            "resampled into template space.", warns,
            f"registration check to {tpl}")))
    return "".join(out)


def _method_name(meta: dict) -> str | None:
    for key in ("Method", "method", "Model", "model", "SegmentationMethod"):
        v = meta.get(key)
        if isinstance(v, str):
            return v
        if isinstance(v, dict):
            name = v.get("name") or v.get("Name")
            if name:
                return f"{name} {v.get('version') or v.get('Version') or ''}".strip()
    return None


_PROVENANCE_KEYS = re.compile(r"model|template|method|software|sha256|^version|weights|prior|registration", re.I)
# Acquisition fields that match the pattern above but describe the scanner, not the processing.
_NOT_PROVENANCE = {"ManufacturersModelName", "SoftwareVersions", "DeviceSerialNumber", "InversionTime"}


def provenance_rows(files: list[SessionFiles], problems: list[str]) -> pd.DataFrame:
    """Models, templates and software recorded in the sidecars (deduplicated across sessions)."""
    rows, seen = [], set()
    for f in files:
        paths = [f.preproc, f.mask, f.dseg, *f.dseg_alt.values(), *f.probseg.values(), *f.morph,
                 *(p for ps in f.xfm_to_template.values() for p in ps), f.lesion_mask,
                 *(alt.get("mask") for alt in f.lesion_alt.values())]
        for p in paths:
            meta = _read_json(_sidecar(p), problems)
            for k, v in meta.items():
                if k in ("Sources", "Acquisition", "RawSources") or k in _NOT_PROVENANCE \
                        or not _PROVENANCE_KEYS.search(k):
                    continue
                text = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v)
                kind = re.sub(r"^sub-[^_]+_(ses-[^_]+_)?", "", p.name)
                if (kind, k, text) in seen:
                    continue
                seen.add((kind, k, text))
                rows.append({"output": kind, "field": k, "value": text})
    return pd.DataFrame(rows)


def _dataset_description(output_dir: Path, problems) -> dict:
    return _read_json(Path(output_dir) / "dataset_description.json", problems)


def about_section(output_dir: Path, files: list[SessionFiles], problems: list[str],
                  command_line: str | None = None) -> Section:
    from bidsapp import __version__

    dd = _dataset_description(output_dir, problems)
    gen = dd.get("GeneratedBy") or []
    gen0 = gen[0] if isinstance(gen, list) and gen and isinstance(gen[0], dict) else {}
    container = gen0.get("Container")
    items = [
        ("scanbridge version", __version__),
        ("derivatives generated by", " ".join(str(gen0.get(k, "")) for k in ("Name", "Version")).strip() or "n/a"),
        ("container", json.dumps(container) if isinstance(container, dict) else (container or "none recorded")),
        ("command line", command_line if command_line is not None else shlex.join(sys.argv)),
        ("report date", _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")),
        ("output folder", str(Path(output_dir).resolve())),
        ("python", sys.version.split()[0]),
    ]
    body = kv_table_html(items)
    prov = provenance_rows(files, problems)
    if len(prov):
        body += subsection_html("Provenance of templates and models", table_html(prov))
    else:
        body += text_html("No model or template provenance was recorded in the sidecars.")
    return Section(title="About", body=body, anchor="about")


def _summary_section(subject, files, acq, output_dir, problems, warnings, errors, notes=()) -> Section:
    sessions = sorted({f.session for f in files if f.session})
    images = {"T1w": sum(f.preproc is not None and f.reference == "T1w" for f in files)}
    for mod in OTHER_MODALITIES:
        n = sum(mod in f.others or (f.reference == mod and f.preproc is not None) for f in files)
        if n:
            images[mod] = n
    templates = sorted({t for f in files for t in list(f.xfm_to_template) + list(f.template_space)})
    methods = set()
    for f in files:
        for p in f.morph:
            try:
                methods.update(pd.read_csv(p, sep="\t", usecols=["method"])["method"].astype(str))
            except Exception:  # noqa: BLE001 - reported by the session section
                pass
    t1w = acq[acq["Image"] == "T1w"] if len(acq) else acq
    groups = sorted(set(t1w["Acquisition group"]) - {"n/a"}) if len(t1w) else []
    items = [
        ("subject", f"sub-{subject}"),
        ("sessions", ", ".join(sessions) if sessions else ("none (single-session layout)" if files else "none")),
        ("images processed", ", ".join(f"{k} x{v}" for k, v in images.items() if v) or "none"),
        ("template", ", ".join(templates) or "none found"),
        ("segmentation methods", ", ".join(sorted(methods)) or "none found"),
        ("acquisition group (T1w)", ", ".join(groups) or "n/a"),
        *_lesion_summary_items(files, problems),
        *_qc_summary_items(files),
        ("status", "FAILED" if errors else ("completed with warnings" if warnings else "completed")),
    ]
    body = kv_table_html(items)
    if notes:
        body += text_html("Processing plan: " + "; ".join(notes) + ".")
    return Section(title="Summary", body=body, warnings=list(warnings), errors=list(errors), anchor="summary")


def _qc_summary_items(files: list[SessionFiles]) -> list[tuple[str, str]]:
    """A "quality control" line: each session's verdict."""
    parts = []
    for f in files:
        row = read_session_qc(f, [])  # problems are reported by the session section
        if row is not None:
            verdict = str(row.get("verdict", "n/a"))
            parts.append(f"{f.label}: {verdict}" if f.label != "(no session)" else verdict)
    return [("quality control", "; ".join(parts))] if parts else []


def _lesion_summary_items(files: list[SessionFiles], problems: list[str]) -> list[tuple[str, str]]:
    """A "lesions" line for the summary when any session has lesion outputs: count and volume per session."""
    parts = []
    for f in files:
        info = lesion_summary(f, [])  # problems are reported by the session section
        if info is None:
            continue
        n, v = info["count"], info["volume_mm3"]
        what = "n/a" if n is None else (f"{n}" + (f" ({v / 1000.0:.2f} ml)" if v is not None and n else ""))
        parts.append(f"{f.label}: {what}" if f.label != "(no session)" else what)
    return [("lesions", "; ".join(parts))] if parts else []


def write_participant_report(output_dir, subject: str, *, warnings=None, errors=None, notes=None,
                             command_line: str | None = None, template=None, n_slices: int = 5) -> Path:
    """Write ``output_dir/sub-<subject>.html`` from the subject's derivatives and return its path.

    ``notes`` are the run's plan lines (methods a session's contrasts leave out, and why).
    ``warnings``/``errors`` come from the run (skipped images, failed nodes) and are shown first,
    together with problems found while reading the outputs (missing files, missing sidecar fields).
    ``template`` helps the registration check find the template image offline (see
    :func:`find_template_image`); without it the transform's sidecar and TEMPLATEFLOW_HOME are used.
    """
    output_dir = Path(output_dir)
    subject = str(subject)
    subject = subject[4:] if subject.startswith("sub-") else subject
    problems: list[str] = []
    errors = list(errors or [])
    files = session_files(output_dir, subject, problems=problems)
    if not files:
        errors.append(f"no derivatives found for sub-{subject} in {output_dir}")
    for f in files:  # a failed QC verdict fails the subject, whether or not this run raised it
        msg = qc_failure(read_session_qc(f, []))
        if msg is not None and not any(msg in e for e in errors):
            errors.append(msg)
    acq, acq_warns = acquisition_rows(files, problems)
    sessions = [session_section(f, problems, template=template, n_slices=n_slices) for f in files]
    all_warn = list(dict.fromkeys([*(warnings or []), *acq_warns]))
    if acq.empty:
        acq_body = text_html("No processed images with sidecars were found.")
    else:
        acq_body = table_html(acq)
    acq_sec = Section(title="Acquisitions", body=acq_body, anchor="acquisitions")
    about = about_section(output_dir, files, problems, command_line)
    all_warn += [p for p in problems if p not in all_warn]
    summary = _summary_section(subject, files, acq, output_dir, problems, all_warn,
                               list(dict.fromkeys(errors)), notes=list(notes or []))
    n_msgs = sum(len(s.warnings) + len(s.errors) for s in sessions)
    if n_msgs:
        summary.body += text_html(f"{n_msgs} further message(s) in the session sections below.")
    change = change_section(output_dir, subject)
    return write_report(output_dir / f"sub-{subject}.html", f"scanbridge: sub-{subject}",
                        [summary, acq_sec, *([change] if change else []), *sessions, about],
                        subtitle=f"Participant report, scanbridge {_version()}")


def change_section(output_dir: Path, subject: str) -> Section | None:
    """The subject level (:mod:`bidsapp.longitudinal`): template with the tissue change over it, the change
    table, and a warning for every pair whose acquisition changed and for a change read on another contrast than
    the T1w (its sidecar's ``Contrast``). None when the subject has no change table."""
    import html

    anat = Path(output_dir) / f"sub-{subject}" / "anat"
    table_path = anat / f"sub-{subject}_desc-change_morph.tsv"
    if not table_path.is_file():
        return None
    table = pd.read_csv(table_path, sep="\t", na_values=["n/a"], keep_default_na=False,
                        dtype={"ses_from": str, "ses_to": str, "acquisition_changed": str, "correction": str})
    warns = []
    contrast = _read_json(table_path.with_suffix(".json"), warns).get("Contrast") or "T1w"
    if contrast != "T1w":
        warns.append(f"Read on the {contrast}, since not every session has a T1w: the brain change is less precise "
                     "than on T1w and the ventricles' change across a protocol change can be several points off "
                     "(docs/longitudinal.md, Limits). Treat these percentages as rough.")
    for (a, b), rows in table.groupby(["ses_from", "ses_to"], sort=False):
        if str(rows["acquisition_changed"].iloc[0]) == "true":
            brain = rows[rows.measure == "brain"]
            raw = float(brain["percent_change_raw"].iloc[0]) if len(brain) else float("nan")
            cor = float(brain["percent_change"].iloc[0]) if len(brain) else float("nan")
            warns.append(f"{a} \u2192 {b}: the acquisition changed; brain change {cor:+.2f} % after correction "
                         f"({rows['correction'].iloc[0]}), {raw:+.2f} % raw. A scanner change can look like atrophy: "
                         "read this pair with care.")
    shown = table.copy()
    for col in ("volume_from_mm3", "volume_to_mm3"):
        shown[col] = shown[col] / 1000.0
    shown = shown.rename(columns={"volume_from_mm3": "from (ml)", "volume_to_mm3": "to (ml)",
                                  "percent_change": "change (%)", "percent_change_per_year": "per year (%)",
                                  "percent_change_raw": "raw (%)", "interval_days": "days"})
    body = [text_html("Every session resampled once into the subject's mid-space (no session is the reference); "
                      "volumes read there with a partial-volume model, so a change smaller than a voxel counts.")]
    figure = anat / f"sub-{subject}_desc-change_figure.svg"
    if figure.is_file():
        svg = figure.read_text(encoding="utf-8")
        body.append(f'<figure>{svg[svg.find("<svg"):]}<figcaption>Mid-space template with the change of brain '
                    f"tissue between the first and last session (red: tissue lost), and the change of each measure "
                    f"and pair (hatched: acquisition changed). Table: {html.escape(table_path.name)}</figcaption>"
                    "</figure>")
    body.append(table_html(shown, float_format="{:.2f}"))
    decline_path = anat / f"sub-{subject}_desc-decline_stats.tsv"
    if decline_path.is_file():
        decline = pd.read_csv(decline_path, sep="\t", na_values=["n/a"], keep_default_na=False,
                              dtype={"ses_from": str, "ses_to": str, "acquisition_changed": str})
        body.append(text_html(f"Stable or accelerated atrophy (decline) of each consecutive pair, from the two T1w "
                              f"in the mid-space (3D-SiameseNet, trained on simulated pairs, half of them across "
                              f"scanners; it is not told the interval; {html.escape(decline_path.name)}):"))
        body.append(table_html(decline.rename(columns={"probability_decline": "P(decline)",
                                                       "interval_days": "days"}), float_format="{:.2f}"))
        for _, r in decline.iterrows():
            if r["call"] == "decline" and str(r["acquisition_changed"]) == "true":
                warns.append(f"{r['ses_from']} \u2192 {r['ses_to']}: called decline (P {r['probability_decline']:.2f}) "
                             "across an acquisition change: check the change table's corrected figures.")
    lesion_path = anat / f"sub-{subject}_desc-lesionchange_stats.tsv"
    if lesion_path.is_file():
        from bidsapp.longitudinal.lesions import STATUSES, pair_counts

        pairs = pair_counts(pd.read_csv(lesion_path, sep="\t", dtype={"ses_from": str, "ses_to": str}))
        rows = pairs.assign(pair=pairs.ses_from + " \u2192 " + pairs.ses_to)[["pair", *STATUSES]]
        body.append(text_html(f"Lesions between consecutive sessions with lesion masks ({html.escape(lesion_path.name)}; "
                              "the new ones also as each follow-up's desc-newlesion_mask, its new or grown lesion voxels as "
                              "desc-lesionchange_mask):"))
        if len(rows):
            body.append(table_html(rows))
    return Section(title="Longitudinal change", body="".join(body), warnings=warns, anchor="change")


def _version() -> str:
    from bidsapp import __version__

    return __version__


__all__ = ["write_participant_report", "session_section",
           "about_section", "acquisition_rows", "find_template_image"]
