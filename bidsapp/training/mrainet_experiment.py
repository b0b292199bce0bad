"""The MRAI-NET paper's experiment (sections 3.2-3.5, Fig. 2) on any labelled images of two scanners.

Give it source scans (labelled, the paper's 4 subjects), one labelled target scan (the pool of labelled
target patches) and held-out target scans (the test set): arrays, from a simulator or from outside data.
For each number ``n`` of labelled target patches per tissue and each seed it trains MRAI-NET on the
source patches and ``n`` target patches per tissue and measures

- the proxy A-distance between source and target patches before (intensities) and after (features);
- the tissue error on the held-out target scans of a linear classifier on MRAI-NET's features of the
  source and labelled target patches (the reference code's ``tiss-H-net-tt``);
- the error of SOURCE (a CNN with one branch's architecture on source + labelled target patches) and
  TARGET (the same CNN on the labelled target patches alone).

Images are used as given: how they are scaled is part of the experiment (`common_scale` is the
paper's "divide by 255" for data that does not come as 8-bit images). Tissue ids are the labels' values
(1-3 for CSF/GM/WM); 0 is background and never sampled.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from bidsapp.models.mrainet import MRAINetConfig, extract_patches, sample_centres
from bidsapp.training.mrainet import (TrainSettings, featurize, fit_linear_classifier, predict_cnn,
                                      train_mrainet, train_patch_cnn)

__all__ = ["Scan", "ExperimentData", "ExperimentSettings", "common_scale", "run_experiment", "summarise"]

log = logging.getLogger("scanbridge.mrainet.experiment")

SOURCE, TARGET = 0, 1


@dataclass
class Scan:
    """One labelled image: (X, Y) one slice, or (X, Y, S) a stack of slices (2D patches in the X-Y plane)."""

    image: np.ndarray
    labels: np.ndarray
    name: str = ""

    def __post_init__(self):
        self.image = np.asarray(self.image, dtype=np.float32)
        self.labels = np.asarray(self.labels)
        if self.image.shape != self.labels.shape or self.image.ndim not in (2, 3):
            raise ValueError(f"scan {self.name!r}: image {self.image.shape} and labels {self.labels.shape} must be "
                             "the same 2D or 3D shape")

    def patches(self, n_per_class: int, rng, classes=(1, 2, 3), patch_size: int = 15) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``n_per_class`` random patches of each tissue, and their tissue ids."""
        cen = sample_centres(self.labels, n_per_class, classes, rng=rng)
        x = [extract_patches(self.image, c, patch_size, 2, axis=2) for c in cen.values()]
        y = [np.full(len(c), k, np.int64) for k, c in cen.items()]
        return np.concatenate(x), np.concatenate(y)

    def brain_patches(self, n: int, rng, patch_size: int = 15) -> np.ndarray:
        """``n`` patches at random voxels of any tissue (the proxy A-distance's samples)."""
        vox = np.flatnonzero(self.labels > 0)
        take = rng.choice(vox, min(n, len(vox)), replace=False)
        return extract_patches(self.image, np.stack(np.unravel_index(take, self.labels.shape), 1), patch_size, 2,
                               axis=2)


@dataclass
class ExperimentData:
    """The scans of the experiment. ``pad_source``/``pad_target``: the scans the proxy A-distance compares
    (default: every source scan, and the labelled plus held-out target scans), as the paper's "all
    source and all target scans"."""

    source: list[Scan]
    target_train: Scan
    target_test: list[Scan]
    pad_source: list[Scan] | None = None
    pad_target: list[Scan] | None = None


@dataclass
class ExperimentSettings:
    """The protocol. Defaults: the paper's numbers where it gives them, the reference code's otherwise."""

    classes: tuple[int, ...] = (1, 2, 3)
    source_patches: int = 500
    """Labelled patches per tissue per source scan."""
    target_pool: int = 1000
    """Labelled patches per tissue drawn once from the target scan; each run picks ``n`` of them."""
    test_patches: int = 50
    """Test patches per tissue per held-out target scan (section 3.3)."""
    pad_patches: int = 1500
    """Patches per side for the proxy A-distance (section 3.2)."""
    network: MRAINetConfig = field(default_factory=MRAINetConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    cnn_epochs: int | None = 32
    """SOURCE/TARGET as the reference code's Keras fit: 32 epochs of batch 128 with validation_split 0.2.
    None: ``cnn_steps`` batches drawn with replacement instead."""
    cnn_steps: int = 1000
    cnn_holdout: float = 0.2


def common_scale(scans: list[Scan], percentile: float = 100.0) -> list[Scan]:
    """Divide all ``scans`` (give both scanners' together) by one constant: the ``percentile`` of their brain
    voxels, and zero the outside of the brain (the reference code strips the skull with the label map).

    This is the paper's "8-bit images divided by 255": one scale for every image, so each scanner's gain and
    contrast stay in the data, and with them the difference MRAI-NET is meant to learn away. (A per-scan
    normalisation, as the group level does, removes the gain before the network sees it.)"""
    values = np.concatenate([s.image[s.labels > 0] for s in scans])
    scale = float(np.percentile(values, percentile)) or 1.0
    return [replace(s, image=np.where(s.labels > 0, s.image / scale, 0.0).astype(np.float32)) for s in scans]


def _pick(pool_x, pool_y, n: int, classes, rng):
    idx = np.concatenate([rng.choice(np.flatnonzero(pool_y == k), min(n, int((pool_y == k).sum())), replace=False)
                          for k in classes])
    return pool_x[idx], pool_y[idx]


def _prepare(data: ExperimentData, s: ExperimentSettings, rng) -> dict:
    p = s.network.patch_size
    xs, ys = zip(*[sc.patches(s.source_patches, rng, s.classes, p) for sc in data.source])
    pool_x, pool_y = data.target_train.patches(s.target_pool, rng, s.classes, p)
    tx, ty = zip(*[sc.patches(s.test_patches, rng, s.classes, p) for sc in data.target_test])
    pad_src = data.pad_source or data.source
    pad_tgt = data.pad_target or [data.target_train, *data.target_test]
    return dict(src_x=np.concatenate(xs), src_y=np.concatenate(ys), pool_x=pool_x, pool_y=pool_y,
                test_x=np.concatenate(tx), test_y=np.concatenate(ty),
                pad_src=np.concatenate([sc.brain_patches(s.pad_patches // len(pad_src) + 1, rng, p) for sc in pad_src]),
                pad_tgt=np.concatenate([sc.brain_patches(s.pad_patches // len(pad_tgt) + 1, rng, p) for sc in pad_tgt]))


def one_run(d: dict, n: int, seed: int, s: ExperimentSettings) -> dict:
    """MRAI-NET, SOURCE and TARGET with ``n`` labelled target patches per tissue, for one seed."""
    from bidsapp.metrics.domain import proxy_a_distance

    rng = np.random.default_rng([seed, n])
    tx, ty = _pick(d["pool_x"], d["pool_y"], n, s.classes, rng)
    x = np.concatenate([d["src_x"], tx])
    y = np.concatenate([d["src_y"], ty])
    dom = np.r_[np.full(len(d["src_y"]), SOURCE), np.full(len(ty), TARGET)]
    out = {"n": n, "seed": seed}
    res = train_mrainet(x, y, dom, source_domain=SOURCE, config=s.network, settings=replace(s.train, seed=seed))
    out["mrainet_train_s"] = res.seconds
    clf = fit_linear_classifier(featurize(res.model, x, dom), y, groups=dom)
    out["mrainet"] = float((clf.predict(featurize(res.model, d["test_x"], TARGET)) != d["test_y"]).mean())
    out["pad_after"] = proxy_a_distance(featurize(res.model, d["pad_src"], SOURCE),
                                        featurize(res.model, d["pad_tgt"], TARGET), n=s.pad_patches, seed=seed).pad
    cnn = dict(settings=replace(s.train, seed=seed, steps=s.cnn_steps), config=s.network)
    if s.cnn_epochs:
        cnn.update(epochs=s.cnn_epochs, holdout=s.cnn_holdout)
    src = train_patch_cnn(x, y, **cnn)
    out["source"] = float((predict_cnn(src.model, d["test_x"]) != d["test_y"]).mean())
    tgt = train_patch_cnn(tx, ty, **cnn)
    out["target"] = float((predict_cnn(tgt.model, d["test_x"]) != d["test_y"]).mean())
    out["cnn_train_s"] = src.seconds + tgt.seconds
    return out


def run_experiment(data: ExperimentData, ns=(1, 5, 10, 50, 100, 1000), seeds=(0,),
                   settings: ExperimentSettings | None = None, data_seed: int = 0, jobs: int = 1,
                   progress=log.info) -> dict:
    """Every ``n`` x seed of the experiment, ``jobs`` at a time (one CPU thread each). Returns
    ``{"pad_before", "runs": [one row per run], "table": summarise(runs), "settings", "patches"}``; the
    patches are drawn once (``data_seed``) so that seeds vary the training and the picked target patches."""
    from bidsapp.metrics.domain import proxy_a_distance

    s = settings or ExperimentSettings()
    d = _prepare(data, s, np.random.default_rng(data_seed))
    before = proxy_a_distance(d["pad_src"], d["pad_tgt"], n=s.pad_patches, seed=data_seed).pad
    todo = [(n, seed) for n in ns for seed in seeds]
    runs = []

    def done(r):
        r["pad_before"] = before
        runs.append(r)
        progress(f"n={r['n']:5d} seed {r['seed']}: PAD {before:.2f} -> {r['pad_after']:.2f}, error MRAI-NET "
                 f"{r['mrainet']:.3f} SOURCE {r['source']:.3f} TARGET {r['target']:.3f} "
                 f"({r['mrainet_train_s']:.0f} + {r['cnn_train_s']:.0f} s) [{len(runs)}/{len(todo)}]")

    if jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        global _SHARED
        _SHARED = (d, s)          # inherited by the forked workers, never pickled
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")) as ex:
            for r in ex.map(_one_run_shared, todo):
                done(r)
    else:
        for n, seed in todo:
            done(one_run(d, n, seed, s))
    return {"pad_before": before, "runs": runs, "table": summarise(runs), "settings": asdict(s),
            "patches": {"source": int(len(d["src_y"])), "test": int(len(d["test_y"])),
                        "pad": [int(len(d["pad_src"])), int(len(d["pad_tgt"]))]}}


_SHARED: tuple | None = None


def _one_run_shared(job):
    import torch

    torch.set_num_threads(1)
    d, s = _SHARED
    return one_run(d, job[0], job[1], s)


KEYS = ("pad_before", "pad_after", "mrainet", "source", "target", "mrainet_train_s", "cnn_train_s")


def summarise(runs: list[dict]) -> list[dict]:
    """Mean, standard deviation and range over seeds of each measure, one row per ``n``."""
    rows = []
    for n in sorted({r["n"] for r in runs}):
        sel = [r for r in runs if r["n"] == n]
        row = {"n": n, "seeds": len(sel)}
        for k in KEYS:
            v = np.array([r[k] for r in sel], dtype=float)
            row[k] = float(v.mean())
            row[k + "_sd"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
            row[k + "_range"] = [float(v.min()), float(v.max())]
        rows.append(row)
    return rows
