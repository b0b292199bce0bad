"""Training MRAI-NET and its baselines, and the ``scanbridge-train mrainet`` command.

Library part (used by the group level and the benchmark):
  ``train_mrainet``  Siamese training on the six pair types (RMSprop, contrastive loss, L1 distance).
  ``train_patch_cnn`` the SOURCE/TARGET baselines: one MRAI-NET branch with a class output, cross-entropy.
  ``fit_linear_classifier`` the linear tissue classifier on MRAI-NET features.
Command part: ``scanbridge-train mrainet`` simulates the paper's two scanners with the physics engine, trains
the default network and writes weights plus a model card (the weights are an initialisation; the group level
trains on the user's own scanners).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bidsapp.models.mrainet import ContrastiveLoss, MRAINet, MRAINetConfig, l1_distance
from bidsapp.models.pairs import PAIR_TYPES, PairSampler

__all__ = ["TrainSettings", "TrainResult", "train_mrainet", "train_patch_cnn", "predict_cnn",
           "featurize", "fit_linear_classifier", "main"]

log = logging.getLogger("scanbridge.train.mrainet")


@dataclass
class TrainSettings:
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3            # Keras' RMSprop default, as in the reference implementation
    margin: float = 1.0
    weight_decay: float = 0.0
    pair_weights: str = "balanced"
    seed: int = 0
    device: str = "cpu"


@dataclass
class TrainResult:
    model: MRAINet
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    pair_counts: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)


def _seed_all(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % (2 ** 32))
    return torch.Generator().manual_seed(seed)


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        log.warning("CUDA requested but not available; using the CPU")
        return "cpu"
    return device


def train_mrainet(patches: np.ndarray, tissues: np.ndarray, domains: np.ndarray, source_domain: int = 0,
                  config: MRAINetConfig | None = None, settings: TrainSettings | None = None,
                  init: MRAINet | None = None) -> TrainResult:
    """Train the Siamese network on pairs drawn lazily from labelled patches of several scanners.

    patches (P, 1, p, p[, p]) float32; tissues (P,) class ids, negative = unlabelled (ignored);
    domains (P,) scanner ids. ``init`` continues from existing weights (e.g. the shipped default).
    """
    s = settings or TrainSettings()
    _seed_all(s.seed)
    device = resolve_device(s.device)
    model = init if init is not None else MRAINet(config or MRAINetConfig())
    model = model.to(device).train()
    sampler = PairSampler(tissues, domains, source_domain=source_domain, weights=s.pair_weights, seed=s.seed)
    x = torch.as_tensor(np.ascontiguousarray(patches, dtype=np.float32), device=device)
    opt = torch.optim.RMSprop(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    crit = ContrastiveLoss(margin=s.margin)
    losses = []
    t0 = time.perf_counter()
    for step in range(s.steps):
        batch = sampler.sample(s.batch_size)
        ia = torch.as_tensor(batch.a, device=device)
        ib = torch.as_tensor(batch.b, device=device)
        f = model(torch.cat([x[ia], x[ib]]))
        d = l1_distance(f[: len(ia)], f[len(ia):])
        loss = crit(d, torch.as_tensor(batch.y, device=device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - t0
    counts = {"-".join(map(str, PAIR_TYPES[t][:2])) + ("-similar" if PAIR_TYPES[t][2] else "-dissimilar"): c
              for t, c in sampler.counts.items()}
    return TrainResult(model=model.eval().cpu(), losses=losses, seconds=seconds, pair_counts=counts,
                       settings=asdict(s))


def train_patch_cnn(patches: np.ndarray, labels: np.ndarray, n_classes: int = 3,
                    config: MRAINetConfig | None = None, settings: TrainSettings | None = None,
                    balance: np.ndarray | None = None) -> TrainResult:
    """A plain patch CNN with one MRAI-NET branch's architecture (the paper's SOURCE and TARGET classifiers).

    labels are 0..n_classes-1. ``balance`` (P,) optional group ids whose total sampling weight is made equal
    (None: every patch equally likely, as a plain CNN trained on the pooled set).
    """
    s = settings or TrainSettings()
    gen = _seed_all(s.seed)
    base = config or MRAINetConfig()
    cfg = MRAINetConfig.from_dict({**base.to_dict(), "out_features": n_classes})
    device = resolve_device(s.device)
    model = MRAINet(cfg).to(device).train()
    x = torch.as_tensor(np.ascontiguousarray(patches, dtype=np.float32), device=device)
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=device)
    w = np.ones(len(y))
    if balance is not None:
        balance = np.asarray(balance)
        for g in np.unique(balance):
            w[balance == g] = 1.0 / (balance == g).sum()
    w = torch.as_tensor(w / w.sum())
    opt = torch.optim.RMSprop(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    crit = nn.CrossEntropyLoss()
    losses = []
    t0 = time.perf_counter()
    for _ in range(s.steps):
        idx = torch.multinomial(w, s.batch_size, replacement=True, generator=gen).to(device)
        loss = crit(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return TrainResult(model=model.eval().cpu(), losses=losses, seconds=time.perf_counter() - t0,
                       settings=asdict(s))


@torch.no_grad()
def featurize(model: MRAINet, patches: np.ndarray, batch: int = 8192) -> np.ndarray:
    """Features (or logits, for a classifier CNN) of patches, in eval mode (no dropout)."""
    model = model.eval()
    dev = next(model.parameters()).device
    out = [model(torch.as_tensor(np.ascontiguousarray(patches[i:i + batch], dtype=np.float32), device=dev)).cpu()
           for i in range(0, len(patches), batch)]
    return torch.cat(out).numpy() if out else np.zeros((0, model.config.out_features), np.float32)


def predict_cnn(model: MRAINet, patches: np.ndarray) -> np.ndarray:
    return featurize(model, patches).argmax(axis=1)


def fit_linear_classifier(features: np.ndarray, labels: np.ndarray, groups: np.ndarray | None = None):
    """Multinomial logistic regression on features: linear like the paper's SVM, and it gives probabilities.

    ``groups`` (scanner ids) re-weights samples so that each scanner counts equally: a few target patches
    are otherwise outweighed by thousands of source patches.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    w = None
    if groups is not None:
        groups = np.asarray(groups)
        w = np.ones(len(groups))
        for g in np.unique(groups):
            w[groups == g] = len(groups) / (len(np.unique(groups)) * (groups == g).sum())
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=10.0, max_iter=2000))
    clf.fit(features, labels, logisticregression__sample_weight=w)
    return clf
