"""ComBat harmonisation of tissue volumes across acquisition groups (neuroCombat), a group-level step.

Batch = acquisition group; age (continuous) and sex (categorical) are protected covariates when the data
have them, so that a real age or sex difference between sites is not removed as if it were scanner effect.
ComBat estimates a per-batch variance, so a group with a single session cannot be harmonised: it is left
as measured and flagged. Covariates that are missing for some sessions are imputed when few are missing
(median/mode, said in the log), dropped otherwise; a covariate confounded with the batch (the design matrix
loses rank) is dropped with a message rather than letting ComBat produce meaningless numbers.

Lesion volumes (the ``lesion`` column, when the study has lesion results) are harmonised once per session,
over the sessions that have one: they are skewed and often zero, so ComBat works on log(1 + volume in mm^3)
and the result is transformed back (and kept >= 0). Lesion counts are not harmonised. Sessions without a T1w
(one row whose method is a lesion method, ``lesion`` or ``wmh``) have no tissue volumes to harmonise.

Outputs: ``group_volumes_combat.tsv`` (same rows as group_volumes.tsv, volumes harmonised, a ``combat``
status column, and ``combat_lesion`` with lesions), ``group_combat_stats.tsv`` (per method and tissue: the
between-group F test and the share of variance explained by the group, before and after; lesions as method
``lesion``) and ``group_combat_summary.tsv`` (mean and SD per group).
"""

from __future__ import annotations

import contextlib
import io
from warnings import catch_warnings, simplefilter

import numpy as np
import pandas as pd

from bidsapp import methods as M
from bidsapp.labels import LESION, VOLUME_LABELS

__all__ = ["CombatResult", "combat_volumes", "group_effect", "run"]

MAX_MISSING_FRACTION = 0.2


class CombatResult:
    def __init__(self, data: pd.DataFrame, messages: list[str], covariates: list[str], harmonized: bool):
        self.data = data
        self.messages = messages
        self.covariates = covariates
        self.harmonized = harmonized


def _usable_covariate(values: pd.Series, name: str, messages: list[str], imputed: str, fill) -> pd.Series | None:
    """``values`` with its few gaps filled by ``fill`` (the median or the mode), or None, said in ``messages``,
    when too many are missing or all sessions share one value: ComBat cannot protect such a covariate."""
    missing = int(values.isna().sum())
    if missing == len(values):
        return None
    if missing > MAX_MISSING_FRACTION * len(values):
        messages.append(f"{name} is missing for {missing} of {len(values)} sessions: not used as a ComBat covariate")
        return None
    if values.nunique() < 2:
        messages.append(f"{name} has a single value: not used as a ComBat covariate")
        return None
    if missing:
        value = fill(values)
        shown = f"{value:.3g}" if isinstance(value, float) else value
        messages.append(f"{name} is missing for {missing} sessions: imputed with the {imputed} ({shown}) for ComBat")
        values = values.fillna(value)
    return values


def _prepare_covariates(df: pd.DataFrame, messages: list[str]) -> tuple[pd.DataFrame, list[str], list[str]]:
    cont, cat = [], []
    out = pd.DataFrame(index=df.index)
    if "age" in df.columns:
        age = _usable_covariate(pd.to_numeric(df["age"], errors="coerce"), "age", messages, "median",
                                lambda v: float(v.median()))
        if age is not None:
            out["age"] = age
            cont.append("age")
    if "sex" in df.columns:
        sex = df["sex"].astype("string").str.strip().str.upper().replace({"": pd.NA, "N/A": pd.NA, "NAN": pd.NA})
        sex = _usable_covariate(sex.replace({"FEMALE": "F", "MALE": "M"}), "sex", messages, "most common value",
                                lambda v: v.mode().iloc[0])
        if sex is not None:
            out["sex"] = sex.astype(str)
            cat.append("sex")
    return out, cont, cat


def _full_rank(batch: pd.Series, cov: pd.DataFrame, cont: list[str], cat: list[str]) -> bool:
    parts = [pd.get_dummies(batch.astype(str), dtype=float)]
    for c in cont:
        parts.append(((cov[c] - cov[c].mean()) / (cov[c].std() or 1.0)).to_frame())
    for c in cat:
        parts.append(pd.get_dummies(cov[c], drop_first=True, dtype=float))
    x = pd.concat(parts, axis=1).to_numpy(float)
    return np.linalg.matrix_rank(x) == x.shape[1]


def combat_volumes(df: pd.DataFrame, tissues=VOLUME_LABELS, batch_col: str = "acq_group") -> CombatResult:
    """Harmonise the tissue columns of one method's rows; never raises for bad data, says why instead.

    Empirical Bayes pools the batch effects over the columns, so a single column (the lesion volume) is
    harmonised with ComBat's plain per-group location and scale estimates (``eb=False``).
    """
    from neuroCombat import neuroCombat

    messages: list[str] = []
    data = df.copy()
    data["combat"] = "not harmonised"
    tissues = [t for t in tissues if t in data.columns]
    eb = len(tissues) > 1
    vals = data[tissues].apply(pd.to_numeric, errors="coerce")
    ok = vals.notna().all(axis=1) & data[batch_col].notna()
    if (~ok).any():
        messages.append(f"{int((~ok).sum())} sessions lack a volume or an acquisition group: left out of ComBat")
    sizes = data.loc[ok, batch_col].astype(str).value_counts()
    single = sorted(sizes[sizes < 2].index)
    if single:
        messages.append(f"acquisition group(s) {', '.join(single)} have a single session: ComBat needs at least two "
                        "per group, so their volumes are left as measured")
        data.loc[ok & data[batch_col].astype(str).isin(single), "combat"] = "single session in group"
        ok &= ~data[batch_col].astype(str).isin(single)
    n_groups = data.loc[ok, batch_col].nunique()
    if n_groups < 2:
        messages.append("only one acquisition group with two or more sessions: there is no scanner effect to "
                        "harmonise, volumes are left as measured")
        return CombatResult(data, messages, [], False)
    sel = data.loc[ok]
    cov, cont, cat = _prepare_covariates(sel, messages)
    batch = sel[batch_col].astype(str)
    while (cont or cat) and not _full_rank(batch, cov, cont, cat):
        drop = (cat or cont)[-1]
        messages.append(f"{drop} is confounded with the acquisition group (e.g. each group has one {drop}): "
                        f"not used as a ComBat covariate")
        cont = [c for c in cont if c != drop]
        cat = [c for c in cat if c != drop]
    covars = pd.DataFrame({"batch": batch.to_numpy()})
    for c in cont + cat:
        covars[c] = cov[c].to_numpy()
    x = vals.loc[ok, tissues].to_numpy(float).T
    const = np.nanstd(x, axis=1) == 0
    try:
        with contextlib.redirect_stdout(io.StringIO()), catch_warnings():  # neuroCombat prints its progress
            if not eb:  # it still computes the (unused) priors, a variance over one column
                simplefilter("ignore", RuntimeWarning)
            res = neuroCombat(dat=x, covars=covars, batch_col="batch", categorical_cols=cat or None,
                              continuous_cols=cont or None, eb=eb)
        harmonized = np.asarray(res["data"], dtype=float)
    except Exception as exc:  # neuroCombat fails with opaque linear-algebra errors on degenerate data
        messages.append(f"ComBat failed ({type(exc).__name__}: {exc}); volumes are left as measured")
        return CombatResult(data, messages, cont + cat, False)
    if const.any() or not np.isfinite(harmonized).all():
        messages.append("ComBat gave non-finite values (a tissue with no variance?); volumes are left as measured")
        return CombatResult(data, messages, cont + cat, False)
    data.loc[ok, tissues] = harmonized.T
    data.loc[ok, "combat"] = "harmonised"
    return CombatResult(data, messages, cont + cat, True)


def group_effect(df: pd.DataFrame, tissue: str, batch_col: str = "acq_group") -> dict:
    """One-way ANOVA of a volume on the acquisition group: F, p and eta^2 (share of variance of the group)."""
    from scipy.stats import f_oneway

    v = pd.to_numeric(df[tissue], errors="coerce")
    groups = [v[(df[batch_col].astype(str) == g) & v.notna()].to_numpy(float)
              for g in sorted(df[batch_col].dropna().astype(str).unique())]
    groups = [g for g in groups if len(g) > 0]
    if len(groups) < 2 or sum(len(g) for g in groups) <= len(groups):
        return {"F": np.nan, "p": np.nan, "eta2": np.nan}
    allv = np.concatenate(groups)
    ss_tot = ((allv - allv.mean()) ** 2).sum()
    ss_b = sum(len(g) * (g.mean() - allv.mean()) ** 2 for g in groups)
    with np.errstate(all="ignore"):
        f, p = f_oneway(*groups) if all(len(g) > 1 for g in groups) or ss_tot > 0 else (np.nan, np.nan)
    return {"F": float(f), "p": float(p), "eta2": float(ss_b / ss_tot) if ss_tot > 0 else np.nan}


def _with_covariates(vol: pd.DataFrame, participants: pd.DataFrame | None) -> pd.DataFrame:
    from bidsapp.bids.tables import normalize_ids

    vol = normalize_ids(vol)
    if participants is None or not len(participants) or "participant_id" not in participants.columns:
        return vol
    p = normalize_ids(participants.drop(columns=["session_id"], errors="ignore"))
    add = [c for c in ("age", "sex") if c in p.columns and (c not in vol.columns or vol[c].isna().all())]
    if not add:
        return vol
    vol = vol.drop(columns=[c for c in add if c in vol.columns])
    return vol.merge(p[["participant_id", *add]].drop_duplicates("participant_id"), on="participant_id", how="left")


def _summary_rows(method: str, tissue: str, before: pd.DataFrame, after: pd.DataFrame) -> list[dict]:
    rows = []
    for when, d in (("before", before), ("after", after)):
        for g, gs in d.groupby(d["acq_group"].astype(str)):
            v = pd.to_numeric(gs[tissue], errors="coerce")
            rows.append({"method": method, "tissue": tissue, "acq_group": g, "when": when, "n": int(v.notna().sum()),
                         "mean_mm3": v.mean(), "sd_mm3": v.std()})
    return rows


def combat_lesions(vol: pd.DataFrame, out: pd.DataFrame, name: str = LESION.names[0],
                   batch_col: str = "acq_group") -> tuple[pd.DataFrame, CombatResult]:
    """Harmonise the lesion volume column ``name`` once per session, over the sessions that have one, and write
    it back on every row of ``out`` (with its status in ``combat_<name>``).

    ComBat runs on log(1 + volume in mm^3), transformed back with exp(x) - 1 and kept >= 0: lesion loads are
    skewed and often zero. The result's ``data`` has one row per session: ``name`` harmonised (as measured
    where ComBat could not run), ``<name>_before`` as measured; None without any lesion volume.
    """
    keys = [k for k in ("participant_id", "session_id") if k in vol.columns]
    status_col = f"combat_{name}"
    measured = pd.to_numeric(vol[name], errors="coerce")
    sessions = vol.drop_duplicates(keys) if keys else vol
    have = vol[measured.notna()]
    have = have.drop_duplicates(keys) if keys else have
    messages = []
    out = out.copy()
    out[status_col] = "no lesion volume"
    if have.empty:
        return out, CombatResult(None, [f"no session has a {name} volume: nothing to harmonise"], [], False)
    if len(have) < len(sessions):
        messages.append(f"{len(sessions) - len(have)} session(s) have no {name} volume (no FLAIR/T2w/PDw): "
                        f"{name} volumes are harmonised over the {len(have)} that have one")
    raw = pd.to_numeric(have[name], errors="coerce").clip(lower=0)
    logged = have.assign(**{name: np.log1p(raw)})
    res = combat_volumes(logged, tissues=(name,), batch_col=batch_col)
    messages += [m.replace("volumes are left as measured", f"{name} volumes are left as measured")
                 for m in res.messages]
    done = (res.data["combat"] == "harmonised").to_numpy()
    after = raw.to_numpy(float).copy()
    after[done] = np.clip(np.expm1(pd.to_numeric(res.data[name], errors="coerce").to_numpy(float)[done]), 0, None)
    data = have.assign(**{f"{name}_before": raw.to_numpy(), name: after, status_col: res.data["combat"].to_numpy()})
    if keys:
        index = pd.MultiIndex.from_frame(data[keys].astype(str))
        rows = pd.MultiIndex.from_frame(out[keys].astype(str))
        pos = index.get_indexer(rows)
        found = pos >= 0
        values = np.array(pd.to_numeric(out[name], errors="coerce"), dtype=float)
        values[found] = after[pos[found]]
        out[name] = values
        status = np.array(out[status_col], dtype=object)
        status[found] = data[status_col].to_numpy(object)[pos[found]]
        out[status_col] = status
    return out, CombatResult(data, messages, res.covariates, res.harmonized)


def run(ctx) -> list:
    """Group step: ComBat per segmentation method; writes the TSVs and returns what the report shows."""
    from bidsapp.bids.derivatives import atomic_write_tsv
    from bidsapp.harmonize.context import ReportItem

    log = ctx.logger
    vol = ctx.volumes if ctx.volumes is not None else pd.DataFrame()
    warnings: list[str] = []
    if not len(vol) or "acq_group" not in vol.columns:
        msg = "ComBat: group_volumes.tsv has no rows with an acquisition group; nothing to harmonise"
        log.warning(msg)
        return [ReportItem("combat", {"before": None, "after": None, "stats": None, "covariates": None,
                                      "warnings": [msg]})]
    vol = _with_covariates(vol, ctx.participants)
    methods = list(dict.fromkeys(vol["method"].astype(str))) if "method" in vol.columns else ["all"]
    lesion_cols = [c for c in LESION.names if c in vol.columns]
    lesion_methods = set(M.registry(M.SESSION, LESION.key))  # the method of a session's lesion-only row
    outs, stats, summary = [], [], []
    used = {}
    for m in methods:
        sub = vol[vol["method"].astype(str) == m] if "method" in vol.columns else vol
        if lesion_cols and m in lesion_methods:  # sessions without a T1w: lesions only, no tissue volumes
            outs.append(sub.assign(combat="no tissue volumes"))
            continue
        res = combat_volumes(sub)
        for msg in res.messages:
            line = f"ComBat ({m}): {msg}"
            log.warning(line)
            warnings.append(line)
        used[m] = res.covariates
        outs.append(res.data)
        for t in [t for t in VOLUME_LABELS if t in sub.columns]:
            b, a = group_effect(sub, t), group_effect(res.data, t)
            stats.append({"method": m, "tissue": t, "F_before": b["F"], "p_before": b["p"], "eta2_before": b["eta2"],
                          "F_after": a["F"], "p_after": a["p"], "eta2_after": a["eta2"],
                          "covariates": ",".join(res.covariates) or "none", "harmonised": res.harmonized})
            summary.extend(_summary_rows(m, t, sub, res.data))
    out = pd.concat(outs, ignore_index=True)
    for name in lesion_cols:
        out, lesion = combat_lesions(vol, out, name)
        for msg in lesion.messages:
            line = f"ComBat ({LESION.key}): {msg}"
            log.warning(line)
            warnings.append(line)
        if lesion.data is None:
            continue
        used[LESION.key] = lesion.covariates
        b, a = group_effect(lesion.data, f"{name}_before"), group_effect(lesion.data, name)
        stats.append({"method": LESION.key, "tissue": name, "F_before": b["F"], "p_before": b["p"],
                      "eta2_before": b["eta2"], "F_after": a["F"], "p_after": a["p"], "eta2_after": a["eta2"],
                      "covariates": ",".join(lesion.covariates) or "none", "harmonised": lesion.harmonized})
        before = lesion.data.drop(columns=[name]).rename(columns={f"{name}_before": name})
        summary.extend(_summary_rows(LESION.key, name, before, lesion.data))
    stats_df, summary_df = pd.DataFrame(stats), pd.DataFrame(summary)
    od = ctx.output_dir
    atomic_write_tsv(od / "group_volumes_combat.tsv", out)
    atomic_write_tsv(od / "group_combat_stats.tsv", stats_df)
    atomic_write_tsv(od / "group_combat_summary.tsv", summary_df)
    log.info("ComBat: wrote group_volumes_combat.tsv, group_combat_stats.tsv, group_combat_summary.tsv")
    return [ReportItem("combat", {"before": vol, "after": out, "stats": stats_df, "covariates": used,
                                  "warnings": warnings})]
