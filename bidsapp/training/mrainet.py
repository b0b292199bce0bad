"""Training MRAI-NET and its baselines, and the ``scanbridge-train mrainet`` command.

Library part (used by the group level and :mod:`bidsapp.training.mrainet_experiment`):
  ``train_mrainet``  Siamese training on labelled patch pairs (RMSprop, contrastive loss, L1 distance).
  ``train_patch_cnn`` the SOURCE/TARGET baselines: one MRAI-NET branch with a class output, cross-entropy.
  ``fit_linear_classifier`` the linear tissue classifier on MRAI-NET features.
Both loops run on :func:`bidsapp.training.engine.fit` (in memory, at a constant learning rate).
Command part: ``scanbridge-train mrainet`` simulates the paper's two scanners with the physics engine
(:mod:`bidsapp.training.mrainet_data`), trains the reference design (:data:`SHIPPED_DESIGN`) and writes
weights plus a model card (the weights are an initialisation; the group level trains on the user's own
scanners).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bidsapp.devices import resolve_device
from bidsapp.models.mrainet import MRAINet, MRAINetConfig, l1_distance
from bidsapp.training.config import add_config_arguments, config_from_args
from bidsapp.training.config import command_line as config_command_line
from bidsapp.training.losses import ContrastiveLoss
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
    reduction: str = "mean"
    """How the batch's contrastive losses combine: "mean" or the paper's "sum" (under RMSprop a step is the
    same either way, up to its epsilon: tested)."""
    weight_decay: float = 0.0
    pair_weights: str | tuple = "reference"
    """:class:`~bidsapp.models.pairs.PairSampler` weights: "reference", "balanced", "combinatorial" or six
    numbers."""
    rmsprop_alpha: float = 0.9
    """RMSprop's smoothing constant: Keras' (the reference code's library) 0.9; PyTorch's default is 0.99."""
    seed: int = 0
    device: str = "cpu"
    threads: int = 1
    """CPU threads while training: a step of this tiny network is too small to share, and on a busy machine
    two threads were measured 6x slower than one."""

    @property
    def iterations(self) -> int:
        """The length of the schedule, as :func:`bidsapp.training.engine.fit` reads it."""
        return self.steps


@dataclass
class TrainResult:
    model: MRAINet
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    pair_counts: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)


class _Threads:
    """Run a block with a given number of torch CPU threads, then restore the caller's setting."""

    def __init__(self, n: int):
        self.n = max(1, int(n))

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def _domain_ids(model: MRAINet, domains, n: int, device) -> torch.Tensor | None:
    """Scanner ids for a model that sees them (``n_domains`` > 0), None for one that does not."""
    if not model.config.n_domains:
        return None
    if domains is None:
        raise ValueError("this MRAI-NET sees the scanner id: pass the patches' domains")
    d = torch.as_tensor(np.broadcast_to(np.asarray(domains, dtype=np.int64), (n,)).copy(), device=device)
    if len(d) and (int(d.min()) < 0 or int(d.max()) >= model.config.n_domains):
        raise ValueError(f"domain ids must be 0..{model.config.n_domains - 1}, got {int(d.min())}..{int(d.max())}")
    return d


def train_mrainet(patches: np.ndarray, tissues: np.ndarray, domains: np.ndarray, source_domain: int = 0,
                  config: MRAINetConfig | None = None, settings: TrainSettings | None = None,
                  init: MRAINet | None = None) -> TrainResult:
    """Train the Siamese network on pairs drawn lazily from labelled patches of several scanners.

    patches (P, 1, p, p[, p]) float32; tissues (P,) class ids, negative = unlabelled (ignored);
    domains (P,) scanner ids. ``init`` continues from existing weights (e.g. the shipped default).
    """
    s = settings or TrainSettings()
    device = resolve_device(s.device)
    with torch.random.fork_rng(devices=[]):     # the seed fixes this run only, never the caller's generators
        torch.manual_seed(s.seed)
        model = init if init is not None else MRAINet(config or MRAINetConfig())
        return _train_mrainet(model.to(device).train(), patches, tissues, domains, source_domain, s, device)


def _train_mrainet(model, patches, tissues, domains, source_domain, s: TrainSettings, device) -> TrainResult:
    sampler = PairSampler(tissues, domains, source_domain=source_domain, weights=s.pair_weights, seed=s.seed)
    x = torch.as_tensor(np.ascontiguousarray(patches, dtype=np.float32), device=device)
    dom = _domain_ids(model, domains, len(x), device)
    opt = torch.optim.RMSprop(model.parameters(), lr=s.lr, alpha=s.rmsprop_alpha, weight_decay=s.weight_decay)
    crit = ContrastiveLoss(margin=s.margin, reduction=s.reduction)

    def step(_it):
        batch = sampler.sample(s.batch_size)
        ia = torch.as_tensor(batch.a, device=device)
        ib = torch.as_tensor(batch.b, device=device)
        both = torch.cat([ia, ib])
        f = model(x[both], None if dom is None else dom[both])
        loss = crit(l1_distance(f[: len(ia)], f[len(ia):]), torch.as_tensor(batch.y, device=device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.detach()}

    hist = _fit(s, model, opt, step)
    counts = {"-".join(map(str, PAIR_TYPES[t][:2])) + ("-similar" if PAIR_TYPES[t][2] else "-dissimilar"): c
              for t, c in sampler.counts.items()}
    return TrainResult(model=model.eval().cpu(), losses=hist.get("loss", []), seconds=hist["seconds"],
                       pair_counts=counts, settings=asdict(s))


def train_patch_cnn(patches: np.ndarray, labels: np.ndarray, config: MRAINetConfig | None = None,
                    settings: TrainSettings | None = None, balance: np.ndarray | None = None,
                    epochs: int | None = None, holdout: float = 0.0) -> TrainResult:
    """A plain patch CNN with one MRAI-NET branch's architecture (the paper's SOURCE and TARGET classifiers).

    ``labels`` are tissue ids as everywhere else (any integers; the classes are ``np.unique(labels)``, kept
    as ``model.classes`` so that :func:`predict_cnn` answers in the same ids). ``balance`` (P,) optional group
    ids whose total sampling weight is made equal (None: every patch equally likely; steps mode only). Two
    ways to train:
    ``settings.steps`` batches drawn with replacement, or, with ``epochs``, the reference code's Keras
    ``fit``: ``epochs`` passes over a shuffled training set in batches of at most ``settings.batch_size``,
    after ``holdout`` (Keras' ``validation_split``) of the patches are set aside and never trained on.
    """
    s = settings or TrainSettings()
    labels = np.asarray(labels, dtype=np.int64)
    classes = np.unique(labels)
    base = config or MRAINetConfig()
    cfg = MRAINetConfig.from_dict({**base.to_dict(), "out_features": len(classes), "n_domains": 0})
    device = resolve_device(s.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        gen = torch.Generator().manual_seed(s.seed)
        model = MRAINet(cfg).to(device).train()
        keep = np.arange(len(labels))
        if holdout > 0:
            n_val = int(round(holdout * len(keep)))
            keep = np.sort(np.random.default_rng(s.seed).permutation(len(keep))[n_val:])
        x = torch.as_tensor(np.ascontiguousarray(patches[keep], dtype=np.float32), device=device)
        y = torch.as_tensor(np.searchsorted(classes, labels[keep]), device=device)
        opt = torch.optim.RMSprop(model.parameters(), lr=s.lr, alpha=s.rmsprop_alpha, weight_decay=s.weight_decay)
        crit = nn.CrossEntropyLoss()
        if epochs:
            per_epoch = max(1, math.ceil(len(keep) / s.batch_size))
            s = replace(s, steps=epochs * per_epoch)
            order: list[torch.Tensor] = []

            def batch_indices(it):
                if it % per_epoch == 0:
                    order[:] = list(torch.randperm(len(keep), generator=gen).split(s.batch_size))
                return order[it % per_epoch]
        else:
            w = np.ones(len(keep))
            if balance is not None:
                b = np.asarray(balance)[keep]
                for g in np.unique(b):
                    w[b == g] = 1.0 / (b == g).sum()
            w = torch.as_tensor(w / w.sum())

            def batch_indices(_it):
                return torch.multinomial(w, s.batch_size, replacement=True, generator=gen)

        def step(it):
            idx = batch_indices(it).to(device)
            loss = crit(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"loss": loss.detach()}

        hist = _fit(s, model, opt, step)
    model = model.eval().cpu()
    model.classes = classes
    return TrainResult(model=model, losses=hist.get("loss", []), seconds=hist["seconds"], settings=asdict(s))


def _fit(s: TrainSettings, model, opt, step) -> dict:
    """The shared training loop (:func:`bidsapp.training.engine.fit`), in memory: these networks train in
    seconds inside a group-level run, at a constant learning rate (as the reference code's RMSprop), with
    ``s.threads`` CPU threads."""
    from bidsapp.training.engine import constant_schedule, fit

    with _Threads(s.threads):
        return fit(s, model, opt, step, out=None, sched=constant_schedule(opt), progress=log.debug)


@torch.no_grad()
def featurize(model: MRAINet, patches: np.ndarray, domains=None, batch: int = 8192) -> np.ndarray:
    """Features (or logits, for a classifier CNN) of patches, in eval mode (no dropout). ``domains``: the
    patches' scanner ids (one id or one per patch), for a model that sees them."""
    model = model.eval()
    dev = next(model.parameters()).device
    dom = _domain_ids(model, domains, len(patches), dev)
    out = [model(torch.as_tensor(np.ascontiguousarray(patches[i:i + batch], dtype=np.float32), device=dev),
                 None if dom is None else dom[i:i + batch]).cpu()
           for i in range(0, len(patches), batch)]
    return torch.cat(out).numpy() if out else np.zeros((0, model.config.out_features), np.float32)


def predict_cnn(model: MRAINet, patches: np.ndarray) -> np.ndarray:
    """Tissue ids (those :func:`train_patch_cnn` was given) of patches, from a SOURCE/TARGET CNN."""
    return np.asarray(model.classes)[featurize(model, patches).argmax(axis=1)]


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


# ---------------------------------------------------------------------------------------------- command
@dataclass
class CommandConfig:
    """``scanbridge-train mrainet``: its options and the card's command come from these fields."""

    anatomy_dir: str | None = field(default=None, metadata={
        "card": False, "help": "folder of anat-*_dseg.nii.gz label maps (default: $SCANBRIDGE_DATA_DIR/anatomy, "
                               "i.e. ../shared/data/anatomy)"})
    source_subjects: int = field(default=4, metadata={"help": "label maps scanned with the 1.5T source protocol"})
    source_patches: int = field(default=500, metadata={"help": "labelled source patches per tissue per subject"})
    target_labels: int = field(default=100, metadata={"help": "labelled target patches per tissue"})
    test_subjects: int = field(default=4, metadata={"help": "held-out 3T subjects for the card's metrics"})
    steps: int = 5000
    batch_size: int = 128
    seed: int = 0
    device: str = field(default="auto", metadata={"card": False, "choices": ("auto", "cpu", "cuda")})
    name: str = field(default="mrainet", metadata={"help": "model name in the registry"})
    out: str | None = field(default=None, metadata={
        "card": False, "help": "weights folder (default: the package's bidsapp/models/weights)"})


SHIPPED_DESIGN = MRAINetConfig(pool=2, n_domains=2)
"""The shipped network: the reference code's design for two scanners (the group level keeps every weight
but the per-scanner offsets when it starts from it)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, CommandConfig)


def _anatomy_dir(arg) -> Path:
    from bidsapp.devdata import anatomy_dir

    return Path(arg) if arg else anatomy_dir()


def run(args) -> int:
    """Simulate the paper's two scanners, train the default MRAI-NET, evaluate it, save weights and card."""
    from bidsapp.metrics.domain import proxy_a_distance
    from bidsapp.models import registry
    from bidsapp.training.mrainet_data import PAPER_SOURCE, PAPER_TARGET, anatomy_paths, simulate_slices

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = anatomy_paths(_anatomy_dir(args.anatomy_dir))
    need = args.source_subjects + 1 + args.test_subjects
    if len(paths) < need:
        print(f"scanbridge-train mrainet: needs {need} label maps (anat-*_dseg.nii.gz) in "
              f"{_anatomy_dir(args.anatomy_dir)}, found {len(paths)}", file=__import__("sys").stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    src = [simulate_slices(p, PAPER_SOURCE, rng) for p in paths[:args.source_subjects]]
    hard = dict(deform=True, variation=1.0, bias=True, noise=True)
    tgt = [simulate_slices(paths[args.source_subjects], PAPER_TARGET, rng),
           simulate_slices(paths[args.source_subjects], PAPER_TARGET, rng, **hard)]
    tests = [simulate_slices(p, PAPER_TARGET, rng, **(hard if i % 2 else {}))
             for i, p in enumerate(paths[args.source_subjects + 1: need])]
    log.info("simulated %d scans in %.0f s", len(src) + len(tgt) + len(tests), time.perf_counter() - t0)
    xs, ys = zip(*[s.patches(args.source_patches, rng) for s in src])
    txs, tys = zip(*[s.patches(max(1, args.target_labels // len(tgt)), rng) for s in tgt])
    x = np.concatenate(xs + txs)
    y = np.concatenate(ys + tys)
    dom = np.r_[np.zeros(sum(len(v) for v in ys), int), np.ones(sum(len(v) for v in tys), int)]
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, seed=args.seed, device=args.device)
    res = train_mrainet(x, y, dom, config=SHIPPED_DESIGN, settings=settings)
    log.info("trained %d steps in %.0f s", args.steps, res.seconds)
    clf = fit_linear_classifier(featurize(res.model, x, dom), y, groups=dom)
    test = [s.patches(50, rng) for s in tests]
    tx, ty = np.concatenate([t[0] for t in test]), np.concatenate([t[1] for t in test])
    err = float((clf.predict(featurize(res.model, tx, 1)) != ty).mean())
    ps = np.concatenate([s.brain_patches(400, rng) for s in src])
    pt = np.concatenate([s.brain_patches(400, rng) for s in tests])
    pad_b = proxy_a_distance(ps, pt, seed=args.seed).pad
    pad_a = proxy_a_distance(featurize(res.model, ps, 0), featurize(res.model, pt, 1), seed=args.seed).pad
    from bidsapp import __version__

    card = {
        "version": __version__,
        "description": "MRAI-NET (Kouw et al., ISBI 2018): acquisition-invariant 15x15 patch features, trained on "
                       "physics-simulated 1.5T SPGR (source) and 3T SPGR (target) scans. An initialisation for the "
                       "group level, which retrains on the dataset's own scanners.",
        "architecture": {"class": "bidsapp.models.mrainet.MRAINet", "kwargs": res.model.config.to_dict()},
        "training": {"command": config_command_line("scanbridge-train mrainet", config_from_args(CommandConfig, args),
                                                explicit=True),
                     "seed": args.seed, "settings": res.settings, "seconds": round(res.seconds, 1),
                     "data": {"source": [s.name for s in src], "target_labelled": [s.name for s in tgt],
                              "target_labels_per_tissue": args.target_labels,
                              "source_patches_per_tissue_per_subject": args.source_patches,
                              "protocols": [PAPER_SOURCE, PAPER_TARGET],
                              "note": "axial slices of the shared label maps; the second target scan is a randomly "
                                      "deformed subject with bias field and Rician noise"},
                     "pair_counts": res.pair_counts},
        "metrics": {"heldout_target_subjects": [s.name for s in tests],
                    "tissue_error_linear_on_features": round(err, 4),
                    "proxy_a_distance_before": round(pad_b, 4), "proxy_a_distance_after": round(pad_a, 4)},
        "input": "T1w divided by its 99th percentile inside the brain mask, zero outside; axial 15x15 patches; "
                 "the scanner id (0 source, 1 target)",
        "design": "the authors' reference code: 2x2 max pooling after the convolution, the scanner id fed to the "
                  "fully connected layers, pairs in the reference code's mix (no target-target pairs), RMSprop "
                  "lr 1e-3 with Keras' rho 0.9",
        "deviations": "contrastive loss averaged over the batch (the paper sums; RMSprop makes the scale moot); "
                      "pairs drawn lazily, a patch never with itself; the scanner id as a learned offset per "
                      "scanner (the same as a one-hot id concatenated to the first fully connected layer's input)",
    }
    card = registry.save_model(args.name, res.model.state_dict(), card, weights_dir=args.out)
    log.info("saved %s (sha256 %s): held-out error %.3f, proxy A-distance %.2f -> %.2f",
             registry.weights_path(args.name, args.out), card["sha256"][:12], err, pad_b, pad_a)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scanbridge-train mrainet", description="Train the default MRAI-NET weights")
    add_arguments(p)
    return run(p.parse_args(argv))
