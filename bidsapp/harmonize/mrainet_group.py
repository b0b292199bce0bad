"""Group step: learn MRAI-NET across the dataset's acquisition groups and report the scanner effect.

What it does, in two streaming passes over the sessions (memory holds one volume at a time):
  1. per session: normalise the preprocessed T1w inside its brain mask, sample 15x15 axial patches:
     - evaluation patches (random brain voxels, for the proxy A-distance and the embedding);
     - labelled patches: the source group (the group with the most labelled data) from its segmentation
       (manual labels from ``labels_dir`` when given, else the participant-level dseg); every other group
       from only ``target_labels_per_tissue`` voxels per tissue, taken from its manual labels or from
       high-confidence voxels (probseg > 0.95) of the participant-level segmentation.
  2. train MRAI-NET on the six pair types across the groups, fit a linear (logistic) tissue classifier on
     the features of the labelled patches;
  3. per session: dense features over the brain -> acquisition-invariant tissue maps
     (``*_desc-mrainet_dseg.nii.gz``, ``*_label-<T>_desc-mrainet_probseg.nii.gz``), agreement with the
     participant-level dseg, a per-session feature summary for outlier detection;
  4. proxy A-distance between every two groups before (intensity patches) and after (features), an
     embedding of a patch subsample, and the sessions that stand out.
Outputs (output_dir): ``models/mrainet-group.{pt,json}`` (weights and model card, incl. the classifier),
``group_mrainet_labels.tsv``, ``group_pad.tsv``,
``group_mrainet_embedding.tsv``, ``group_mrainet_sessions.tsv``, ``group_mrainet_volumes.tsv``.

Options: :class:`~bidsapp.harmonize.context.GroupOptions` (``ctx.options``): ``labels_dir``,
``target_labels_per_tissue``, ``device``, ``seed``, ``nprocs`` and the ``mrainet_*`` tuning knobs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bidsapp.bids.collect import SessionFiles, session_files
from bidsapp.harmonize.groups import choose_source_group, session_groups, summarize_groups
from bidsapp.labels import TISSUE

__all__ = ["find_session_files", "find_manual_labels", "run", "load_group_model",
           "MODEL_NAME", "TISSUE_NAMES"]

MODEL_NAME = "mrainet-group"
TISSUE_NAMES = TISSUE.by_value()
HIGH_CONFIDENCE = 0.95
LABEL_FLOOR = 0.5
"""A target tissue short of voxels above HIGH_CONFIDENCE takes its most probable others, but only voxels more
likely that tissue than not."""
AXIS = 2  # axial slices of the RAS-reoriented preprocessed T1w


def _anat_dir(root: Path, participant_id: str, session_id: str) -> Path:
    d = Path(root) / participant_id
    return (d / session_id / "anat") if session_id else (d / "anat")


def find_session_files(output_dir: Path, participant_id: str, session_id: str, acq_group: str = "") -> SessionFiles:
    """The participant-level derivatives of one session with a T1w (native space; the first run when there
    are several), read by :func:`bidsapp.bids.collect.session_files`."""
    subject = participant_id.removeprefix("sub-")
    session = session_id.removeprefix("ses-") or None
    found = [f for f in session_files(output_dir, subject, session) if f.t1w is not None and f.session == session]
    if found:
        sf = found[0]
    else:
        prefix = participant_id + (f"_{session_id}" if session else "")
        sf = SessionFiles(subject=subject, session=session, prefix=prefix,
                          anat_dir=_anat_dir(output_dir, participant_id, session_id))
    sf.acq_group = acq_group
    return sf


def find_manual_labels(labels_dir: Path | None, participant_id: str, session_id: str) -> Path | None:
    """A user's manual tissue labels for a session: the first ``*_dseg.nii.gz`` in its anat folder."""
    if not labels_dir:
        return None
    d = _anat_dir(Path(labels_dir), participant_id, session_id)
    if not d.is_dir():
        return None
    c = sorted(p for p in d.glob("*_dseg.nii.gz") if "space-" not in p.name)
    return c[0] if c else None


def _load(path: Path, like=None) -> np.ndarray:
    """Voxel data as float32; resampled (nearest) onto ``like`` when the grids differ (manual labels)."""
    import nibabel as nib

    img = nib.load(str(path))
    if like is not None and (img.shape[:3] != like.shape[:3] or not np.allclose(img.affine, like.affine, atol=1e-3)):
        from nibabel.processing import resample_from_to

        img = resample_from_to(img, (like.shape[:3], like.affine), order=0)
    data = np.asanyarray(img.dataobj, dtype=np.float32)
    return data[..., 0] if data.ndim == 4 else data


@dataclass
class _Collected:
    patches: list = field(default_factory=list)      # labelled patches
    tissues: list = field(default_factory=list)
    domains: list = field(default_factory=list)
    eval_patches: list = field(default_factory=list)
    eval_tissue: list = field(default_factory=list)
    eval_domain: list = field(default_factory=list)
    below_confidence: dict = field(default_factory=dict)   # (domain, tissue) -> labels taken below HIGH_CONFIDENCE


class _Warnings:
    """One-line messages, logged and kept for the report section they concern."""

    def __init__(self, log):
        self.log = log
        self.by_kind: dict[str, list[str]] = {"groups": [], "pad": [], "outliers": [], "mrainet": []}

    def __call__(self, msg: str, kind: str = "mrainet") -> None:
        self.log.warning("MRAI-NET: %s", msg)
        self.by_kind[kind].append(msg)

    def everything(self) -> list[str]:
        return [w for ws in self.by_kind.values() for w in ws]


@dataclass
class _State:
    """What the stages of :func:`run` hand on: the plan (sessions, groups, source), then the labelled
    patches, the trained model and the per-session results."""

    opts: object
    out_dir: Path
    cache: Path
    rng: np.random.Generator
    warn: _Warnings
    summary: pd.DataFrame
    files: list = field(default_factory=list)
    manual: dict = field(default_factory=dict)
    groups: list = field(default_factory=list)
    by_group: dict = field(default_factory=dict)
    use_manual: bool = False
    source: str | None = None
    dom: dict = field(default_factory=dict)
    col: _Collected = field(default_factory=_Collected)
    labels_df: pd.DataFrame | None = None
    patches: np.ndarray | None = None
    tissues: np.ndarray | None = None
    domains: np.ndarray | None = None
    seconds: dict = field(default_factory=dict)


def _not_trained(st: _State, source=None, labels=None) -> list:
    from bidsapp.harmonize.context import ReportItem

    return [ReportItem("mrainet_groups", dict(summary=st.summary, source=source, labels=labels,
                                              warnings=st.warn.everything()))]


def run(ctx) -> list:
    """Train MRAI-NET across the acquisition groups; write models, maps and TSVs; return what the report shows.

    Four stages: :func:`_plan` (sessions, groups, source), :func:`_sample` (labelled and evaluation
    patches), :func:`_fit` + :func:`_map` (network, classifier, tissue maps) and :func:`_evaluate` (proxy
    A-distance, embedding, outliers).
    """
    import torch

    from bidsapp.harmonize.context import GroupOptions, ReportItem

    t_start = time.perf_counter()
    opts = GroupOptions.from_any(ctx.options)
    st = _State(opts=opts, out_dir=Path(ctx.output_dir), cache=Path(ctx.work_dir) / "mrainet_cache",
                rng=np.random.default_rng(int(opts.seed or 0)), warn=_Warnings(ctx.logger),
                summary=summarize_groups(ctx.acquisitions, ctx.volumes))
    if not _plan(ctx, st):
        return _not_trained(st)
    ctx.logger.info("MRAI-NET: %d sessions in %d groups; source group %s", len(st.files), len(st.groups), st.source)
    if not _sample(ctx, st):
        return _not_trained(st, st.source, st.labels_df)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(opts.nprocs or threads)))
    try:
        model, clf, res, device = _fit(ctx, st)
        card, session_rows, volume_rows = _map(ctx, st, model, clf, res, device)
    finally:
        torch.set_num_threads(threads)
        for f in st.cache.glob("*.npz"):  # transient: a rerun samples again
            f.unlink(missing_ok=True)
    ev = _evaluate(ctx, st, model, session_rows, volume_rows)
    src_pad = ev["pad"][(ev["pad"].group_a == st.source) | (ev["pad"].group_b == st.source)]
    total = time.perf_counter() - t_start
    sec = st.seconds
    info = {
        "source group": st.source,
        "groups": len(st.groups), "sessions": len(st.files),
        "labelled patches (source / others)": f"{int((st.domains == 0).sum())} / {int((st.domains != 0).sum())}",
        "labels from": "manual labels (labels_dir)" if st.use_manual else "participant-level segmentation",
        "target labels per tissue": int(opts.target_labels_per_tissue),
        "training steps x batch": f"{int(opts.mrainet_steps)} x {int(opts.mrainet_batch_size)}",
        "training time (s)": round(res.seconds, 1),
        "sampling / maps / proxy A-distance time (s)": f"{sec['io']:.1f} / {sec['maps']:.1f} / {sec['pad']:.1f}",
        "total time (s)": round(total, 1),
        "median proxy A-distance to source, before -> after":
            f"{src_pad.pad_before.median():.2f} -> {src_pad.pad_after.median():.2f}" if len(src_pad) else "n/a",
        "model": f"models/{MODEL_NAME}.pt (sha256 {card['sha256'][:12]}...)",
        "tissue maps": "sub-*/[ses-*/]anat/*_desc-mrainet_dseg.nii.gz and *_label-<tissue>_desc-mrainet_probseg.nii.gz"
        if opts.mrainet_write_maps else "not written (mrainet_write_maps = False)",
    }
    ctx.logger.info("MRAI-NET: done in %.1f s", total)
    w = st.warn.by_kind
    return [
        ReportItem("mrainet_groups", dict(summary=st.summary, source=st.source, labels=st.labels_df,
                                          warnings=w["groups"])),
        ReportItem("mrainet_pad", dict(before=ev["before"], after=ev["after"], groups=ev["order"], warnings=w["pad"])),
        ReportItem("mrainet_embedding", dict(emb=ev["embedding"])),
        ReportItem("mrainet_outliers", dict(sessions=ev["sessions"], warnings=w["outliers"])),
        ReportItem("mrainet", dict(summary=info, losses=res.losses, agreement=ev["agreement"], warnings=w["mrainet"])),
    ]


def _plan(ctx, st: _State) -> bool:
    """Sessions with usable derivatives, the acquisition groups, and the source group (the one with the
    most labels). False when there is nothing to train on (the warnings say why)."""
    warn, out_dir = st.warn, st.out_dir
    sess = session_groups(ctx.acquisitions, ctx.volumes)
    groups = sorted(sess["acq_group"].unique())
    if len(groups) < 2:
        warn(f"the dataset has a single acquisition group ({groups[0] if groups else 'none'}): there is no scanner "
             "effect to learn or measure, so MRAI-NET was not trained", "groups")
        return False
    labels_dir = st.opts.labels_dir
    if labels_dir and not Path(labels_dir).is_dir():
        warn(f"labels directory {labels_dir} does not exist; using the participant-level segmentations", "groups")
        labels_dir = None
    for r in sess.itertuples():
        sf = find_session_files(out_dir, r.participant_id, r.session_id, r.acq_group)
        missing = [n for n, v in (("desc-preproc_T1w", sf.t1w), ("desc-brain_mask", sf.mask)) if v is None]
        if missing:
            warn(f"{sf.prefix}: no {' or '.join(missing)} in {_anat_dir(out_dir, r.participant_id, r.session_id)}; "
                 "session skipped")
            continue
        st.manual[sf.prefix] = find_manual_labels(labels_dir, r.participant_id, r.session_id)
        st.files.append(sf)
    by_group = {g: [f for f in st.files if f.acq_group == g] for g in groups}
    for g in groups:
        if not by_group[g]:
            warn(f"acquisition group {g} has no session with usable derivatives; left out", "groups")
    groups = [g for g in groups if by_group[g]]
    if len(groups) < 2:
        warn("fewer than two acquisition groups have usable derivatives; MRAI-NET was not trained", "groups")
        return False
    manual_counts = {g: sum(st.manual[f.prefix] is not None for f in by_group[g]) for g in groups}
    if labels_dir and not any(manual_counts.values()):
        warn(f"no manual labels in {labels_dir} match the sessions (expected "
             "sub-<label>/[ses-<label>/]anat/*_dseg.nii.gz); using the participant-level segmentations", "groups")
    st.use_manual = any(manual_counts.values())
    labelled = manual_counts if st.use_manual else {g: sum(f.dseg is not None for f in by_group[g]) for g in groups}
    source = choose_source_group(labelled, {g: len(by_group[g]) for g in groups})
    if source is None:
        warn("no acquisition group has labels (no participant-level dseg and no manual labels); MRAI-NET was "
             "not trained", "groups")
        return False
    st.groups, st.by_group, st.source = groups, by_group, source
    st.dom = {g: i for i, g in enumerate([source] + [g for g in groups if g != source])}
    return True


def _sample(ctx, st: _State) -> bool:
    """Labelled patches of every group (the target budget per group) and evaluation patches; writes
    group_mrainet_labels.tsv. False when the source group has fewer than two tissues."""
    from bidsapp.bids.derivatives import atomic_write_tsv
    from bidsapp.models.mrainet import MRAINetConfig

    opts, warn, rng = st.opts, st.warn, st.rng
    n_target, pad_n = int(opts.target_labels_per_tissue), int(opts.mrainet_pad_patches)
    src_total = int(opts.mrainet_source_patches_per_tissue)
    st.cache.mkdir(parents=True, exist_ok=True)
    col = st.col
    n_src_sessions = sum(1 for f in st.by_group[st.source]
                         if (st.manual[f.prefix] if st.use_manual else f.dseg) is not None)
    per_src = max(1, math.ceil(src_total / max(1, n_src_sessions)))
    cfg = MRAINetConfig()
    t_io = time.perf_counter()
    unreadable = set()
    for i, sf in enumerate(st.files):
        try:
            _sample_session(sf, st.manual[sf.prefix], sf.acq_group == st.source, st.dom[sf.acq_group],
                            len(st.by_group[sf.acq_group]), per_src, n_target, pad_n, st.use_manual, cfg, rng, col,
                            st.cache, warn)
        except Exception as exc:  # a damaged file costs one session, not the step
            warn(f"{sf.prefix}: could not be read ({type(exc).__name__}: {exc}); session skipped")
            unreadable.add(sf.prefix)
        if (i + 1) % 20 == 0:
            ctx.logger.info("MRAI-NET: sampled %d/%d sessions", i + 1, len(st.files))
    st.files = [f for f in st.files if f.prefix not in unreadable]
    st.seconds["io"] = time.perf_counter() - t_io
    names = {d: g for g, d in st.dom.items()}
    for (d, k), count in sorted(col.below_confidence.items()):
        warn(f"group {names[d]}: {count} labelled {TISSUE_NAMES[k]} voxels taken below probseg {HIGH_CONFIDENCE} "
             "(too few above it): its most probable ones", "groups")

    empty = np.zeros((0, 1, cfg.patch_size, cfg.patch_size), np.float32)
    patches = np.concatenate(col.patches) if col.patches else empty
    tissues = np.concatenate(col.tissues) if col.tissues else np.zeros(0, np.int64)
    domains = np.concatenate(col.domains) if col.domains else np.zeros(0, np.int64)
    # the target budget is per group: keep n_target of each tissue, spread over sessions
    keep = np.ones(len(tissues), bool)
    label_rows = []
    for g, d in st.dom.items():
        for k, name in TISSUE_NAMES.items():
            idx = np.flatnonzero((domains == d) & (tissues == k))
            if d != 0 and len(idx) > n_target:
                drop = rng.choice(idx, len(idx) - n_target, replace=False)
                keep[drop] = False
                idx = np.setdiff1d(idx, drop)
            asked = src_total if d == 0 else n_target
            label_rows.append({"acq_group": g, "role": "source" if d == 0 else "target", "tissue": name,
                               "n_patches": int(len(idx)), "asked": asked})
            if len(idx) < asked:
                warn(f"group {g}: {len(idx)} labelled {name} patches, fewer than the {asked} asked for", "groups")
    st.patches, st.tissues, st.domains = patches[keep], tissues[keep], domains[keep]
    st.labels_df = pd.DataFrame(label_rows)
    atomic_write_tsv(st.out_dir / "group_mrainet_labels.tsv", st.labels_df)
    for g, d in st.dom.items():
        if d != 0 and not (st.domains == d).any():
            warn(f"group {g} has no usable labels (no voxel with probseg > {HIGH_CONFIDENCE} and no manual labels); "
                 "it is mapped by MRAI-NET but not aligned to the others", "groups")
    if len(set(st.tissues[st.domains == 0].tolist())) < 2:
        warn(f"the source group {st.source} has labelled patches of fewer than two tissues; MRAI-NET was not trained",
             "groups")
        return False
    return True


def _fit(ctx, st: _State):
    """The Siamese network on the labelled patches, then the linear tissue classifier on its features."""
    from bidsapp.devices import resolve_device
    from bidsapp.models.mrainet import MRAINetConfig
    from bidsapp.training.mrainet import TrainSettings, featurize, fit_linear_classifier, train_mrainet

    opts = st.opts
    cfg = MRAINetConfig(pool=2, n_domains=len(st.dom) if opts.mrainet_scanner_id else 0)
    device = str(resolve_device(opts.device))
    init = _initial_model(opts.mrainet_init, cfg, st.warn)
    settings = TrainSettings(steps=int(opts.mrainet_steps), batch_size=int(opts.mrainet_batch_size),
                             seed=int(opts.seed or 0), device=device)
    res = train_mrainet(st.patches, st.tissues, st.domains, source_domain=0, config=cfg, settings=settings, init=init)
    feats = featurize(res.model, st.patches, st.domains)
    clf = fit_linear_classifier(feats, st.tissues, groups=st.domains)
    ctx.logger.info("MRAI-NET: trained in %.1f s on %d labelled patches", res.seconds, len(st.patches))
    return res.model, clf, res, device


def _map(ctx, st: _State, model, clf, res, device):
    """Save the model with its card, then every session's tissue map and summary rows."""
    from bidsapp.models import registry

    t_maps = time.perf_counter()
    card = _model_card(model, clf, st.source, st.dom, st.labels_df, res, int(st.opts.seed or 0),
                       int(st.opts.target_labels_per_tissue))
    card = registry.save_model(MODEL_NAME, model.state_dict(), card, weights_dir=st.out_dir / "models")
    session_rows, volume_rows = [], []
    for i, sf in enumerate(st.files):
        try:
            row, vol = _map_session(sf, model, clf, st.cache, st.out_dir, card, bool(st.opts.mrainet_write_maps),
                                    device, st.dom[sf.acq_group])
        except Exception as exc:
            st.warn(f"{sf.prefix}: tissue map failed ({type(exc).__name__}: {exc})")
            continue
        session_rows.append(row)
        volume_rows.append(vol)
        if (i + 1) % 20 == 0:
            ctx.logger.info("MRAI-NET: mapped %d/%d sessions", i + 1, len(st.files))
    st.seconds["maps"] = time.perf_counter() - t_maps
    return card, session_rows, volume_rows


def _evaluate(ctx, st: _State, model, session_rows, volume_rows) -> dict:
    """Proxy A-distance between groups before and after, the embedding, the outlying sessions; writes
    group_pad.tsv, group_mrainet_embedding.tsv, group_mrainet_sessions.tsv and group_mrainet_volumes.tsv."""
    from bidsapp.bids.derivatives import atomic_write_tsv
    from bidsapp.metrics.domain import pad_matrix
    from bidsapp.training.mrainet import featurize

    col, warn, pad_n, seed = st.col, st.warn, int(st.opts.mrainet_pad_patches), int(st.opts.seed or 0)
    ev_p = np.concatenate(col.eval_patches)
    ev_t = np.concatenate(col.eval_tissue)
    ev_d = np.concatenate(col.eval_domain)
    ev_f = featurize(model, ev_p, ev_d)
    names = {d: g for g, d in st.dom.items()}
    for d, g in names.items():
        n = int((ev_d == d).sum())
        if n < pad_n:
            warn(f"group {g}: {n} brain patches for the proxy A-distance, fewer than the {pad_n} asked for", "pad")
    t_pad = time.perf_counter()
    order = [names[d] for d in sorted(names)]
    before = pad_matrix({names[d]: ev_p[ev_d == d] for d in sorted(names)}, n=pad_n, seed=seed)
    after = pad_matrix({names[d]: ev_f[ev_d == d] for d in sorted(names)}, n=pad_n, seed=seed)
    st.seconds["pad"] = time.perf_counter() - t_pad
    pad = before.rename(columns={"pad": "pad_before", "error": "error_before"}).merge(
        after[["group_a", "group_b", "pad", "error"]].rename(columns={"pad": "pad_after", "error": "error_after"}),
        on=["group_a", "group_b"])
    out_dir = st.out_dir
    atomic_write_tsv(out_dir / "group_pad.tsv", pad)
    emb = _embedding(ev_p, ev_f, ev_t, ev_d, names, st.rng)
    atomic_write_tsv(out_dir / "group_mrainet_embedding.tsv", emb)
    sessions_df = _outliers(pd.DataFrame(session_rows), warn)
    atomic_write_tsv(out_dir / "group_mrainet_sessions.tsv", sessions_df)
    atomic_write_tsv(out_dir / "group_mrainet_volumes.tsv", pd.DataFrame(volume_rows))
    agreement = None
    if len(sessions_df):
        dcols = [c for c in sessions_df.columns if c.startswith("dice_")]
        agreement = sessions_df.groupby("acq_group")[dcols].median().reset_index()
    return {"pad": pad, "before": before, "after": after, "order": order, "embedding": emb,
            "sessions": sessions_df, "agreement": agreement}


def _sample_session(sf: SessionFiles, manual_file: Path | None, is_source: bool, domain: int, n_in_group: int, per_src: int, n_target: int,
                    pad_n: int, use_manual: bool, cfg, rng, col: _Collected, cache: Path, warn) -> None:
    import nibabel as nib

    from bidsapp.models.mrainet import extract_patches, normalize_intensity, sample_centres

    ref = nib.load(str(sf.t1w))
    img = _load(sf.t1w)
    mask = _load(sf.mask, like=ref) > 0.5
    if mask.shape != img.shape:
        raise ValueError(f"brain mask {sf.mask.name} has shape {mask.shape}, T1w {img.shape}")
    if not mask.any():
        raise ValueError(f"brain mask {sf.mask.name} is empty")
    img = normalize_intensity(img, mask)
    dseg = _load(sf.dseg, like=ref).astype(np.int16) if sf.dseg is not None else None
    manual = _load(manual_file, like=ref).astype(np.int16) if manual_file is not None else None
    # cache the brain for the second pass (uncompressed, half precision; outside the mask the image is 0)
    np.savez(cache / f"{sf.prefix}.npz", img=img[mask].astype(np.float16), mask=np.packbits(mask),
             shape=np.array(mask.shape), dseg=(dseg[mask].astype(np.int8) if dseg is not None else np.zeros(0, np.int8)))
    # evaluation patches: random brain voxels, centre tissue from the participant-level dseg for display
    n_eval = int(min(3000, max(20, math.ceil(1.1 * pad_n / n_in_group))))
    vox = np.flatnonzero(mask)
    take = rng.choice(vox, min(n_eval, len(vox)), replace=False)
    centres = np.stack(np.unravel_index(take, mask.shape), axis=1)
    ev = (extract_patches(img, centres, cfg.patch_size, cfg.spatial_dims, AXIS),
          dseg.reshape(-1)[take].astype(np.int64) if dseg is not None else np.zeros(len(take), np.int64),
          np.full(len(take), domain, np.int64))
    # labelled patches
    if manual is not None:
        labels, allowed = manual, mask
    elif is_source and not use_manual:
        labels, allowed = dseg, mask
    elif not is_source and dseg is not None:
        labels = dseg
        allowed = mask.copy()
        if len(sf.probseg) == 3:
            conf = np.zeros(mask.shape, bool)
            prob = {}
            for k, name in TISSUE_NAMES.items():
                prob[k] = _load(sf.probseg[name], like=ref)
                conf |= (dseg == k) & (prob[k] > HIGH_CONFIDENCE)
            allowed &= conf
        else:
            warn(f"{sf.prefix}: no label-CSF/GM/WM probseg; target labels come from the dseg without a confidence check")
    else:
        labels = None
    lab = []
    if labels is not None:
        n = per_src if is_source else max(1, math.ceil(n_target / n_in_group))
        picked = sample_centres(labels, n, classes=tuple(TISSUE_NAMES), rng=rng, allowed=allowed)
        if not is_source and manual is None and dseg is not None and len(sf.probseg) == 3:
            _fill_below_confidence(picked, n, dseg, mask & ~allowed, prob, domain, col)
        lab = [(extract_patches(img, c, cfg.patch_size, cfg.spatial_dims, AXIS), np.full(len(c), k, np.int64),
                np.full(len(c), domain, np.int64)) for k, c in picked.items() if len(c)]
    # append only once the whole session was read: a damaged file adds nothing
    col.eval_patches.append(ev[0])
    col.eval_tissue.append(ev[1])
    col.eval_domain.append(ev[2])
    for x, t, d in lab:
        col.patches.append(x)
        col.tissues.append(t)
        col.domains.append(d)


def _fill_below_confidence(picked: dict, n: int, dseg, candidates, prob: dict, domain: int, col: _Collected):
    """A target tissue with fewer than ``n`` voxels above :data:`HIGH_CONFIDENCE` (a low-contrast scanner's
    GM, say) is topped up with its most probable other voxels above :data:`LABEL_FLOOR`: with the scanner id
    as an input, a group without labels of one tissue would have that tissue's features placed by the other
    tissues alone."""
    for k in picked:
        short = n - len(picked[k])
        if short <= 0:
            continue
        cand = np.flatnonzero((dseg == k) & candidates & (prob[k] > LABEL_FLOOR))
        if not len(cand):
            continue
        top = cand[np.argsort(-prob[k].reshape(-1)[cand], kind="stable")[:short]]
        extra = np.stack(np.unravel_index(np.sort(top), dseg.shape), axis=1).astype(np.int64)
        picked[k] = np.concatenate([picked[k], extra])
        key = (domain, k)
        col.below_confidence[key] = col.below_confidence.get(key, 0) + len(extra)


def _initial_model(choice, cfg, warn):
    """The shipped weights as a starting point. They were trained on two scanners; a dataset has its own
    number of groups, so every weight but the per-scanner offsets is taken (the offsets start at zero)."""
    if choice in (None, "none", False):
        return None
    from dataclasses import replace

    from bidsapp.models import registry
    from bidsapp.models.mrainet import MRAINet, MRAINetConfig

    try:
        state, card = registry.load_state_dict("mrainet")
        c = MRAINetConfig.from_dict(card["architecture"]["kwargs"])
        if replace(c, n_domains=cfg.n_domains) != cfg:
            warn("the shipped MRAI-NET weights have another architecture; training from scratch")
            return None
        m = MRAINet(cfg)
        m.load_state_dict({k: v for k, v in state.items() if not k.startswith("domain_offset.")}, strict=False)
        return m
    except Exception as exc:
        warn(f"shipped MRAI-NET weights unavailable ({exc}); training from scratch")
        return None


def _classifier_dict(clf) -> dict:
    sc, lr = clf.named_steps["standardscaler"], clf.named_steps["logisticregression"]
    return {"type": "standardised multinomial logistic regression on MRAI-NET features",
            "classes": [int(c) for c in lr.classes_], "mean": sc.mean_.tolist(), "scale": sc.scale_.tolist(),
            "coef": lr.coef_.tolist(), "intercept": lr.intercept_.tolist()}


def _model_card(model, clf, source, dom, labels_df, res, seed, n_target) -> dict:
    from bidsapp import __version__

    return {
        "version": __version__,
        "description": "MRAI-NET feature network trained at the group level across this dataset's acquisition "
                       "groups (Kouw et al., ISBI 2018), with the linear tissue classifier used for the "
                       "desc-mrainet tissue maps.",
        "architecture": {"class": "bidsapp.models.mrainet.MRAINet", "kwargs": model.config.to_dict()},
        "training": {"command": "scanbridge <bids_dir> <output_dir> group", "seed": seed,
                     "data": {"source_group": source, "groups": list(dom), "target_labels_per_tissue": n_target,
                              "labelled_patches": labels_df.to_dict(orient="records")},
                     "settings": res.settings, "pair_counts": res.pair_counts, "seconds": round(res.seconds, 2)},
        "metrics": {"final_loss": float(np.mean(res.losses[-50:])) if res.losses else None},
        "classifier": _classifier_dict(clf),
        "input": "preprocessed T1w divided by its 99th percentile inside the brain mask, zero outside; "
                 "axial 15x15 patches; the session's acquisition group as the scanner id (its position in "
                 "training.data.groups, the source group first)",
    }


def _map_session(sf: SessionFiles, model, clf, cache: Path, out_dir: Path, card: dict, write_maps: bool, device,
                 domain: int):
    import nibabel as nib

    from bidsapp.bids.derivatives import (atomic_save_nifti, bids_uri, derivative_path, write_dseg_tsv,
                                          write_sidecar)
    from bidsapp.metrics.overlap import dice
    from bidsapp.models.mrainet import dense_features

    z = np.load(cache / f"{sf.prefix}.npz")
    shape = tuple(int(s) for s in z["shape"])
    mask = np.unpackbits(z["mask"])[: int(np.prod(shape))].reshape(shape).astype(bool)
    img = np.zeros(shape, np.float32)
    img[mask] = z["img"]
    ref_lab = None
    if z["dseg"].size:
        ref_lab = np.zeros(shape, np.int8)
        ref_lab[mask] = z["dseg"]
    feats = dense_features(model, img, mask, axis=AXIS, device=device, domain=domain)
    fm = feats[mask]
    prob = clf.predict_proba(fm).astype(np.float32)
    classes = [int(c) for c in clf.classes_]
    lab = np.zeros(shape, np.uint8)
    lab[mask] = np.asarray(classes, np.uint8)[prob.argmax(1)]
    ref = nib.load(str(sf.t1w))
    zooms = ref.header.get_zooms()[:3]
    vox_mm3 = float(np.prod(zooms))
    row = {"participant_id": sf.participant_id, "session_id": sf.session_id, "acq_group": sf.acq_group}
    vol = {"participant_id": sf.participant_id, "session_id": sf.session_id, "method": "mrainet",
           "acq_group": sf.acq_group}
    for k, name in TISSUE_NAMES.items():
        vol[name] = float((lab == k).sum() * vox_mm3)
        sel = (ref_lab == k) if ref_lab is not None else (lab == k)
        sel = sel[mask]
        for j in range(fm.shape[1]):
            row[f"f{j + 1}_{name}"] = float(fm[sel, j].mean()) if sel.any() else np.nan
        if ref_lab is not None:
            row[f"dice_{name}"] = dice(lab == k, ref_lab == k)
    vol["brain"] = vol["CSF"] + vol["GM"] + vol["WM"]
    if ref_lab is not None:
        row["dice_mean"] = float(np.mean([row[f"dice_{n}"] for n in TISSUE_NAMES.values()]))
    if write_maps:
        src = [bids_uri(sf.t1w, out_dir, dataset="")]
        model_info = {"Name": MODEL_NAME, "Path": f"models/{MODEL_NAME}.pt", "sha256": card["sha256"]}
        hdr = ref.header.copy()
        hdr.set_data_dtype(np.uint8)
        path = derivative_path(out_dir, sf.t1w, suffix="dseg", extension=".nii.gz", desc="mrainet")
        atomic_save_nifti(nib.Nifti1Image(lab, ref.affine, hdr), path)
        write_dseg_tsv(path)
        write_sidecar(path, Sources=src, Method="mrainet", Model=model_info,
                      Description="acquisition-invariant tissue map: linear classifier on MRAI-NET features")
        for j, k in enumerate(classes):
            p = np.zeros(shape, np.float32)
            p[mask] = prob[:, j]
            hdr = ref.header.copy()
            hdr.set_data_dtype(np.float32)
            path = derivative_path(out_dir, sf.t1w, suffix="probseg", extension=".nii.gz", desc="mrainet",
                                   label=TISSUE_NAMES[k])
            atomic_save_nifti(nib.Nifti1Image(p, ref.affine, hdr), path)
            write_sidecar(path, Sources=src, Method="mrainet", Model=model_info)
    return row, vol


def _embedding(ev_p, ev_f, ev_t, ev_d, names, rng, per_group: int = 400) -> pd.DataFrame:
    """2D views of a patch subsample: PCA of intensity patches (before) and of MRAI-NET features (after)."""
    from sklearn.decomposition import PCA

    idx = np.concatenate([rng.choice(np.flatnonzero(ev_d == d), min(per_group, int((ev_d == d).sum())), replace=False)
                          for d in sorted(names)])
    x = ev_p[idx].reshape(len(idx), -1)
    before = PCA(2, random_state=0).fit_transform(x) if len(idx) > 2 else np.zeros((len(idx), 2))
    f = ev_f[idx]
    after = f[:, :2] if f.shape[1] <= 2 else PCA(2, random_state=0).fit_transform(f)
    if after.shape[1] == 1:
        after = np.c_[after, np.zeros(len(after))]
    tissue = {0: "background", **TISSUE_NAMES}
    return pd.DataFrame({"acq_group": [names[int(d)] for d in ev_d[idx]],
                         "tissue": [tissue.get(int(t), "unknown") for t in ev_t[idx]],
                         "before_1": before[:, 0], "before_2": before[:, 1],
                         "after_1": after[:, 0], "after_2": after[:, 1]})


def _robust_z(x: np.ndarray) -> np.ndarray:
    med = np.nanmedian(x)
    mad = 1.4826 * np.nanmedian(np.abs(x - med))
    if not np.isfinite(mad) or mad <= 1e-12:
        mad = np.nanstd(x) or 1.0
    return (x - med) / mad


def _outliers(df: pd.DataFrame, warn) -> pd.DataFrame:
    """Sessions whose tissue-mean features lie far from everyone's (features are meant to be scanner-free,
    so one reference for all groups) or whose tissue map disagrees with their segmentation."""
    if not len(df):
        return df.assign(feature_distance=[], feature_z=[], outlier=[], reason=[])
    fcols = [c for c in df.columns if c.startswith("f") and "_" in c and c[1].isdigit()]
    v = df[fcols].to_numpy(float)
    v = np.where(np.isfinite(v), v, np.nanmedian(v, axis=0))
    dist = np.abs(v - np.median(v, axis=0)).sum(axis=1)
    df = df.copy()
    df["feature_distance"] = dist
    df["feature_z"] = _robust_z(dist)
    reasons = [[] for _ in range(len(df))]
    if len(df) < 5:
        warn(f"only {len(df)} sessions: too few to say which stand out", "outliers")
        df["outlier"] = False
        df["reason"] = ""
        return df
    for i, z in enumerate(df["feature_z"]):
        if z > 3.5:
            reasons[i].append(f"features far from the other sessions (z={z:.1f})")
    if "dice_mean" in df.columns:
        dz = _robust_z(df["dice_mean"].to_numpy(float))
        df["dice_z"] = dz
        for i, z in enumerate(dz):
            if z < -3.5:
                reasons[i].append(f"tissue map disagrees with its segmentation (Dice {df['dice_mean'].iloc[i]:.2f}, z={z:.1f})")
    df["outlier"] = [bool(r) for r in reasons]
    df["reason"] = ["; ".join(r) for r in reasons]
    return df


def load_group_model(output_dir: Path):
    """(MRAINet, card) saved by the group level in ``output_dir/models``."""
    from bidsapp.models import registry
    from bidsapp.models.mrainet import MRAINet, MRAINetConfig

    state, card = registry.load_state_dict(MODEL_NAME, weights_dir=Path(output_dir) / "models")
    model = MRAINet(MRAINetConfig.from_dict(card["architecture"]["kwargs"]))
    model.load_state_dict(state)
    return model.eval(), card
