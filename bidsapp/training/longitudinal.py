"""``scanbridge-train longitudinal``: the 3D-SiameseNet (stable / decline) on simulated session pairs.

Data (:func:`make_pair`), every pair drawn from ``(--seed, index)`` alone:

- **anatomy**: a label map of ``--anatomy-dir`` (``anat-10``..``anat-12`` kept for the validation
  pairs, :data:`HELDOUT`), or the ICBM152 phantom when there are none; consecutive blocks of
  :data:`BLOCK` pairs share one anatomy and hold the four designs (stable / decline x same scanner /
  scanner change), so the classes and scanner changes are balanced in every part of the pool;
  every fifth block (``--val-every``) is a validation block;
- **subject**: a random deformation and tissue-property variation of the anatomy
  (:func:`bidsapp.physics.phantom.make_subject`), the phantom on the simulation grid;
- **trajectory**: stable or decline (label 0/1) at :data:`~bidsapp.physics.atrophy.STABLE_RATES` or
  ``DECLINE_RATES``, an interval uniform in :data:`YEARS`; the follow-up phantom is
  :func:`~bidsapp.physics.atrophy.apply_atrophy` of the baseline. The network is not told the interval:
  a long stable interval and a short decline one overlap (3 years stable: -1.2 % GM, +4.6 % ventricles;
  half a year of decline: -1 % and +3 %), as in a clinic. With ``--warp-share``, that share of the
  pairs (drawn per pair, both classes alike) gets its follow-up another way: the baseline's brain shrunk
  inside a fixed skull by the brain loss the trajectory gives (:func:`~bidsapp.physics.atrophy.shrink_brain`),
  atrophy as injection tools make it on real scans (the rim around the brain stretches into the space,
  the ventricles shrink with the brain), which a network that learned only the simulator's atrophy does
  not see;
- **images**: the baseline with a random T1w protocol (:data:`T1W_PROTOCOLS`, MPRAGE and SPGR at 1.5
  and 3 T); in half of the pairs the follow-up with another one (so the network learns the change, not
  the scanner), otherwise the same protocol with new noise and bias field; simulated at ``--voxel-mm``
  (2 mm, the phantom on the same grid: a pair costs about 1 s; from a 1 mm phantom about 20 s, the
  deformation 5x, the atrophy 13x and the simulation 5x slower), in RAS order; divided by the
  simulator's bias field (standing in for the pipeline's two N4 passes, whose output the network reads:
  left in, the field moves intensities by tens of percent and the network learned nothing, validation
  accuracy 0.50-0.54 over 1000 iterations); skull-stripped with the true brain mask and prepared by :func:`bidsapp.models.siamese.preprocess` (both in the box of the
  baseline's brain).

Pairs are expensive (the atrophy bisects, the deformation warps every class), so ``--pairs`` of them
are generated once into ``OUT/pairs.npz`` (float16 images and the design of every pair, with the recipe
that made them) and reused: a rerun generates only what is missing, ``--stop-after 0`` generates the
pool and stops, generation uses ``--threads`` processes (results do not depend on it).

Training: Adam, lr 1e-3 with the engine's cosine schedule, L2 1e-4 on the convolution and dense
weights (the paper regularises its kernels), batch 8, cross-entropy; the training pairs are shuffled
every epoch and augmented per pair, both images together (an independent flip or rotation would be a
change the network ought to report): a left/right flip and a rotation up to ``--rotate-deg`` about the
left-right axis (the authors' code rotates up to 5 degrees in that plane); with ``--intensity-jitter``, each
image's standardised CSF, GM and WM levels moved on their own (:meth:`PairSampler._jitter`), so that two
sessions of one scanner differ in contrast as much as two scanners do. With ``--scanner-adversary W``, a
head on the penultimate features (training only) learns which protocols made the pair and the features
are trained against it through a reversed gradient (domain-adversarial training, the lesion model's
regulariser made adversarial): the class and the protocols are drawn independently, so features that
carry no trace of the scanners lose nothing the class needs. The validation pairs give
the accuracy and the MSLE (the paper's metrics, :func:`evaluate`) every ``--eval-every`` iterations
and in the model card.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bidsapp.devdata import HELDOUT_ANATOMIES
from bidsapp.models.siamese import INPUTS
from bidsapp.training.config import command_line as config_command_line
from bidsapp.training.engine import add_run_arguments, run_command, run_facts

HELDOUT = HELDOUT_ANATOMIES
BLOCK = 4
"""Consecutive pairs sharing an anatomy: index % 2 is the label, (index // 2) % 2 the scanner change."""
YEARS = (0.5, 3.0)
T1W_PROTOCOLS = ("mrainet-1.5T-spgr", "mrainet-3T-spgr", "siemens-1.5T-mprage", "siemens-3T-mprage",
                 "siemens-3T-mprage-v2", "paper-mprage")
"""The T1w presets of :mod:`bidsapp.physics.protocols` at 1.5 and 3 T (three scanners, two families)."""
POOL_FILE = "pairs.npz"
POOL_VERSION = 2
"""Bumped whenever :func:`make_pair` changes what it makes: an older pool is then refused."""
SAVE_SECONDS = 600.0
"""The pool file is rewritten at most this often while generating (and always at the end)."""
_ARRAYS = ("a", "b", "label", "change", "years", "validation", "anatomy", "protocols", "gm_change",
           "ventricle_change", "warp")


# ------------------------------------------------------------------------------------------ pairs
def anatomies(anatomy_dir) -> tuple[list[str], list[str]]:
    """(training anatomies, validation anatomies): label-map paths, or ``["icbm152"]`` for both when
    ``anatomy_dir`` is None, ``"icbm152"``, or holds no ``anat-*_dseg.nii.gz``."""
    if anatomy_dir is None or str(anatomy_dir).lower() == "icbm152" or not Path(anatomy_dir).is_dir():
        return ["icbm152"], ["icbm152"]
    files = sorted(Path(anatomy_dir).glob("anat-*_dseg.nii.gz"))
    train = [str(p) for p in files if p.name.split("_")[0] not in HELDOUT]
    val = [str(p) for p in files if p.name.split("_")[0] in HELDOUT]
    if not train:
        return ["icbm152"], ["icbm152"]
    return train, val or train


def design(index: int, val_every: int) -> dict:
    """The label, scanner change, validation flag and anatomy slot of pair ``index``."""
    block = index // BLOCK
    validation = val_every > 0 and block % val_every == val_every - 1
    slot = block // val_every if validation else (block - (block // val_every if val_every > 0 else 0))
    return {"label": index % 2, "change": (index // 2) % 2, "validation": bool(validation), "slot": int(slot)}


_ANATOMY: dict = {}


def _anatomy(source: str, voxel_mm: float):
    """The phantom of ``source`` on the simulation grid; one kept in memory (blocks share it)."""
    from bidsapp.physics.phantom import from_icbm152, from_label_map

    key = (source, float(voxel_mm))
    if key not in _ANATOMY:
        ph = from_icbm152(voxel_mm) if source == "icbm152" else from_label_map(source, voxel_mm)
        _ANATOMY.clear()
        _ANATOMY[key] = ph
    return _ANATOMY[key]


def make_pair(index: int, seed: int = 0, anatomy_dir=None, voxel_mm: float = 2.0, size: int = 64,
              grid_mm: float = 3.0, val_every: int = 5, sources=None, warp_share: float = 0.0) -> dict:
    """Pair ``index`` of the pool of ``seed`` (see the module docstring): ``a``, ``b`` (size^3 float32,
    baseline and follow-up), ``label`` (1 decline), ``change`` (1 another protocol), ``years``,
    ``validation``, ``anatomy``, ``protocols`` ("baseline>follow-up"), the true ``gm_change`` (cortical)
    and ``ventricle_change`` (percent) and ``warp`` (the follow-up's brain shrunk by a warp). ``sources``:
    :func:`anatomies` of ``anatomy_dir``, when known. ``warp_share`` draws ``warp`` from a stream of its
    own, so that with 0 every pair is what it was before the option existed."""
    from bidsapp.models.siamese import brain_centre, preprocess
    from bidsapp.physics.atrophy import DECLINE_RATES, STABLE_RATES, apply_atrophy, shrink_brain
    from bidsapp.physics.phantom import make_subject
    from bidsapp.physics.protocols import PROTOCOLS
    from bidsapp.physics.simulator import simulate

    d = design(index, val_every)
    train, val = sources or anatomies(anatomy_dir)
    names = val if d["validation"] else train
    source = names[d["slot"] % len(names)]
    rng = np.random.default_rng([int(seed), 7, int(index)])
    base = make_subject(_anatomy(source, voxel_mm), rng)
    years = float(rng.uniform(*YEARS))
    follow = apply_atrophy(base, years, **(DECLINE_RATES if d["label"] else STABLE_RATES))
    warp = bool(warp_share > 0 and np.random.default_rng([int(seed), 8, int(index)]).random() < warp_share)
    if warp:
        brain0, brain1 = (float(p.volumes()["brain"]) for p in (base, follow))
        follow = shrink_brain(base, 100.0 * (1.0 - brain1 / brain0))
    first = T1W_PROTOCOLS[int(rng.integers(len(T1W_PROTOCOLS)))]
    others = [p for p in T1W_PROTOCOLS if p != first]
    second = others[int(rng.integers(len(others)))] if d["change"] else first
    images = []
    for ph, name in ((base, first), (follow, second)):
        sim = simulate(ph, PROTOCOLS[name], rng, voxel_size=voxel_mm, orientation="RAS")
        # the network reads the pipeline's bias-corrected images (N4, then N4 inside the brain): the
        # simulator's own field stands in for that correction (an uncorrected field moves intensities by
        # tens of percent, far more than the atrophy the network has to see)
        image = np.asarray(sim.image.dataobj, np.float32) / np.maximum(sim.bias_field, 1e-3)
        images.append((image, sim.truth.brain_mask, sim.truth.voxel_size))
    (ia, ma, spacing), (ib, mb, _) = images
    centre = brain_centre(ma, spacing, size, grid_mm)
    gm0, gm1 = (float(p.fraction("GM").sum(dtype=np.float64)) for p in (base, follow))  # cortical GM
    v0, v1 = (float(p.fraction("ventricles").sum(dtype=np.float64)) for p in (base, follow))
    return {"a": preprocess(ia, ma, spacing, size, grid_mm, centre=centre),
            "b": preprocess(ib, mb, spacing, size, grid_mm, centre=centre),
            "label": d["label"], "change": d["change"], "years": years, "validation": d["validation"],
            "anatomy": Path(source).name.split("_")[0], "protocols": f"{first}>{second}",
            "gm_change": 100.0 * (gm1 - gm0) / gm0, "ventricle_change": 100.0 * (v1 - v0) / v0, "warp": warp}


def _pair_job(job):
    import torch

    torch.set_num_threads(1)
    index, kwargs = job
    return make_pair(index, **kwargs)


def pool_recipe(cfg) -> dict:
    """What the pool's pairs depend on (its size aside): a pool of another recipe is refused."""
    train, val = anatomies(cfg.anatomy_dir)
    recipe = {"version": POOL_VERSION, "seed": cfg.seed, "voxel_mm": cfg.voxel_mm, "grid_mm": cfg.grid_mm,
              "size": cfg.size, "val_every": cfg.val_every,
              "anatomies": [Path(p).name for p in train], "validation_anatomies": [Path(p).name for p in val]}
    return dict(recipe, warp_share=cfg.warp_share) if cfg.warp_share else recipe  # 0: pools made before it


def _stack(rows: list[dict]) -> dict:
    out = {}
    for k in _ARRAYS:
        vals = [r[k] for r in rows]
        if k in ("a", "b"):
            out[k] = np.stack(vals).astype(np.float16)
        elif k in ("anatomy", "protocols"):
            out[k] = np.asarray(vals, dtype=str)
        elif k in ("label", "change"):
            out[k] = np.asarray(vals, np.int64)
        elif k in ("validation", "warp"):
            out[k] = np.asarray(vals, bool)
        else:
            out[k] = np.asarray(vals, np.float32)
    return out


def _concat(pool: dict | None, new: dict) -> dict:
    return new if pool is None else {k: np.concatenate([pool[k], new[k]]) for k in _ARRAYS}


def subset(pool: dict, idx) -> dict:
    """The pairs ``idx`` of ``pool`` (every array indexed)."""
    return {k: pool[k][idx] for k in _ARRAYS if k in pool}


def _write_pool(path: Path, pool: dict, recipe: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, recipe=np.asarray(json.dumps(recipe, sort_keys=True)), **pool)
    os.replace(tmp, path)


def build_pool(cfg, progress=print) -> dict:
    """The first ``cfg.pairs`` pairs, read from ``cfg.out``/pairs.npz and extended there when it holds
    fewer (in index order, ``cfg.threads`` processes); refused when the file has another recipe."""
    path = Path(cfg.out) / POOL_FILE
    recipe = pool_recipe(cfg)
    pool = None
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            if json.loads(str(z["recipe"])) != recipe:
                raise SystemExit(f"{path}: a pool of another recipe (seed, grids, anatomies); "
                                 "use a new --out or delete it")
            pool = {k: z[k] for k in _ARRAYS if k in z}
            pool.setdefault("warp", np.zeros(len(pool["label"]), bool))  # a pool made before --warp-share
    have = 0 if pool is None else len(pool["label"])
    if have >= cfg.pairs:
        return subset(pool, slice(0, cfg.pairs))
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"seed": cfg.seed, "voxel_mm": cfg.voxel_mm, "size": cfg.size, "grid_mm": cfg.grid_mm,
              "val_every": cfg.val_every, "sources": anatomies(cfg.anatomy_dir), "warp_share": cfg.warp_share}
    jobs = [(i, kwargs) for i in range(have, cfg.pairs)]
    progress(f"generating pairs {have}..{cfg.pairs - 1} into {path}")
    t0 = last = time.time()
    rows: list[dict] = []
    executor = None
    try:
        if int(cfg.threads) > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            executor = ProcessPoolExecutor(int(cfg.threads), mp_context=mp.get_context("spawn"))
            results = executor.map(_pair_job, jobs, chunksize=BLOCK)
        else:
            results = (make_pair(i, **kw) for i, kw in jobs)
        for i, row in enumerate(results, start=have):
            rows.append(row)
            if (i + 1) % 10 == 0 or i + 1 == cfg.pairs:
                progress(f"pair {i + 1}/{cfg.pairs} ({(time.time() - t0) / len(rows):.1f} s/pair)")
            if time.time() - last > SAVE_SECONDS:
                pool, rows, last = _concat(pool, _stack(rows)), [], time.time()
                _write_pool(path, pool, recipe)
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
        if rows:  # an interrupted generation keeps what it made
            pool = _concat(pool, _stack(rows))
            _write_pool(path, pool, recipe)
    return pool


@functools.lru_cache(maxsize=None)
def protocol_csf_inverted(name: str) -> bool:
    """Whether protocol ``name`` of :mod:`bidsapp.physics.protocols` puts CSF's signal opposite to the
    tissues', as the app reads it from the protocol's sidecar."""
    from bidsapp.bids.acquisition import AcquisitionRecord
    from bidsapp.models.tissue import parameter_vector
    from bidsapp.physics.protocols import get_protocol

    record = AcquisitionRecord.from_metadata(get_protocol(name).sidecar(), suffix="T1w").to_dict()
    return bool(parameter_vector(record).csf_inverted)


def network_inputs(pool: dict, inputs: str, grid_mm: float) -> dict:
    """``pool`` with ``a`` and ``b`` as the network reads them (``inputs``: see
    :data:`bidsapp.models.siamese.INPUTS`); the CSF inversion of each image from its protocol."""
    from bidsapp.longitudinal.change import pair_fractions

    if inputs not in INPUTS:
        raise ValueError(f"unknown network input {inputs!r} (one of {', '.join(INPUTS)})")
    if inputs == "intensity":
        return pool
    if inputs == "standardised":
        from bidsapp.models.siamese import standardise

        a = np.stack([standardise(x.astype(np.float32)) for x in pool["a"]]).astype(np.float16)
        b = np.stack([standardise(x.astype(np.float32)) for x in pool["b"]]).astype(np.float16)
        return dict(pool, a=a, b=b)
    a, b = np.empty(pool["a"].shape, np.float16), np.empty(pool["b"].shape, np.float16)
    for k in range(len(a)):
        first, second = str(pool["protocols"][k]).split(">")
        fa, fb = pair_fractions(pool["a"][k].astype(np.float32), pool["b"][k].astype(np.float32), (grid_mm,) * 3,
                                (protocol_csf_inverted(first), protocol_csf_inverted(second)))
        a[k], b[k] = fa, fb
    return dict(pool, a=a, b=b)


# ------------------------------------------------------------------------------------------ training
class PairSampler:
    """Batches of training pairs, shuffled every epoch, augmented per pair (see the module docstring)."""

    def __init__(self, pool: dict, idx, seed: int, flip: bool = True, rotate_deg: float = 5.0,
                 mask_erode: int = 0, prepare=None, intensity_jitter: float = 0.0):
        self.pool, self.idx = pool, np.asarray(idx, np.int64)
        if not len(self.idx):
            raise ValueError("no training pairs in the pool")
        self.flip, self.rotate_deg = bool(flip), float(rotate_deg)
        self.mask_erode, self.prepare = int(mask_erode), prepare
        self.intensity_jitter = float(intensity_jitter)
        self.rng = np.random.default_rng([int(seed), 11])
        self.perm, self.pos = self.rng.permutation(len(self.idx)), 0

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "perm": self.perm.copy(), "pos": self.pos}

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.perm, self.pos = np.asarray(state["perm"]), int(state["pos"])

    def _take(self, n: int) -> np.ndarray:
        out = []
        while len(out) < n:
            if self.pos == len(self.perm):
                self.perm, self.pos = self.rng.permutation(len(self.idx)), 0
            k = min(n - len(out), len(self.perm) - self.pos)
            out.extend(self.idx[self.perm[self.pos:self.pos + k]])
            self.pos += k
        return np.asarray(out)

    def _erode(self, a: np.ndarray, b: np.ndarray):
        """Each pair's shared mask eroded by 0..``mask_erode`` voxels (both images alike), then each image
        prepared (``prepare``): a pipeline's brain mask may hold less extra-cerebral CSF than the truth's."""
        from scipy import ndimage as ndi

        prepare = self.prepare or (lambda x: x)
        a, b = a.copy(), b.copy()
        for k in range(len(a)):
            e = int(self.rng.integers(0, self.mask_erode + 1))
            if e:
                keep = ndi.binary_erosion(a[k] > 0, iterations=e)
                a[k], b[k] = np.where(keep, a[k], 0.0), np.where(keep, b[k], 0.0)
            a[k], b[k] = prepare(a[k]), prepare(b[k])
        return a, b

    def _jitter(self, x: np.ndarray) -> np.ndarray:
        """Each standardised image (zero outside the brain) remapped on its own, piecewise linearly, with
        the CSF and GM anchors moved by up to ``intensity_jitter`` and WM's by half that: between two
        protocols, what one brain's partial-volume voxels read after :func:`standardise` differs (on
        the simulated pool the share of brain voxels below 0.35 runs from 0.19 to 0.36 by protocol, far
        more than a decline moves it), so a same-scanner pair must not always read alike."""
        from bidsapp.models.siamese import ANCHORS, STANDARD_RANGE

        t = np.asarray(ANCHORS, np.float64)
        lo, hi = STANDARD_RANGE
        j = self.intensity_jitter
        out = np.empty_like(x)
        for k in range(len(x)):
            new = t + self.rng.uniform(-1.0, 1.0, 3) * np.array([j, j, j / 2.0])
            new[0] = max(new[0], 0.02)
            new[1] = max(new[1], new[0] + 0.05)
            new[2] = max(new[2], new[1] + 0.05)
            knots = np.r_[0.0, t, hi]
            values = np.r_[0.0, new, hi + new[2] - t[2]]
            inside = x[k] > 0
            out[k] = np.where(inside, np.clip(np.interp(x[k], knots, values), lo, hi), 0.0)
        return out

    def batch(self, n: int, index: bool = False):
        """(baselines, follow-ups) float tensors (n, 1, S, S, S) and labels (n,); with ``index``, the pool
        indices of the pairs as a fourth item."""
        import torch
        import torch.nn.functional as F

        pick = self._take(n)
        a, b = self.pool["a"][pick].astype(np.float32), self.pool["b"][pick].astype(np.float32)
        if self.mask_erode > 0:
            a, b = self._erode(a, b)
        if self.intensity_jitter > 0:
            a, b = self._jitter(a), self._jitter(b)
        a, b = torch.as_tensor(a)[:, None], torch.as_tensor(b)[:, None]
        y = torch.as_tensor(self.pool["label"][pick], dtype=torch.long)
        flips = self.rng.random(n) < 0.5 if self.flip else np.zeros(n, bool)
        angles = np.deg2rad(self.rng.uniform(-self.rotate_deg, self.rotate_deg, n)) if self.rotate_deg > 0 else None
        if flips.any():  # left/right is the first voxel axis (RAS)
            sel = torch.as_tensor(np.flatnonzero(flips))
            a[sel], b[sel] = a[sel].flip(2), b[sel].flip(2)
        if angles is not None:  # about the left-right axis: a rotation in the plane of the last two axes
            theta = torch.zeros((n, 3, 4))
            c = torch.as_tensor(np.cos(angles), dtype=torch.float32)
            s = torch.as_tensor(np.sin(angles), dtype=torch.float32)
            theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1], theta[:, 2, 2] = c, -s, s, c, 1.0
            grid = F.affine_grid(theta, list(a.shape), align_corners=False)
            both = F.grid_sample(torch.cat([a, b]), torch.cat([grid, grid]), mode="bilinear",
                                 padding_mode="zeros", align_corners=False)
            a, b = both[:n], both[n:]
        return (a.contiguous(), b.contiguous(), y) + ((pick,) if index else ())


def msle(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean squared logarithmic error between softmax probabilities and one-hot labels (Keras's)."""
    onehot = np.eye(probs.shape[1])[np.asarray(labels, np.int64)]
    return float(np.mean((np.log1p(np.clip(probs, 1e-7, None)) - np.log1p(onehot)) ** 2))


def pair_scores(probs: np.ndarray, labels, change, warp=None, empty=None) -> dict:
    """The paper's metrics of ``probs`` against ``labels`` (accuracy, MSLE), the accuracy of the
    same-scanner and the scanner-change pairs, and the fraction of stable scanner-change pairs called
    stable (what a scanner upgrade must not turn into a decline); with ``warp``, the accuracy of the pairs
    whose loss the simulator made and of those made by a warp. ``empty`` where no pair counts."""
    y = np.asarray(labels, np.int64)
    change = np.asarray(change, bool)
    hit = probs.argmax(1) == y

    def frac(sel):
        return float(np.mean(hit[sel])) if np.any(sel) else empty

    out = {"accuracy": frac(np.ones(len(y), bool)), "msle": msle(probs, y) if len(y) else empty,
           "accuracy_same_scanner": frac(~change), "accuracy_scanner_change": frac(change),
           "stable_change_called_stable": frac(change & (y == 0))}
    if warp is not None:
        warp = np.asarray(warp, bool)
        out.update(accuracy_simulated_atrophy=frac(~warp), accuracy_warp=frac(warp))
    return out


def evaluate(net, pairs: dict, device="cpu", batch: int = 8) -> dict:
    """:func:`pair_scores` of ``net`` on ``pairs`` (``a``, ``b``, ``label``, ``change``, ``warp``), None
    where no pair counts."""
    from bidsapp.models.siamese import predict_proba

    was_training = net.training
    probs = predict_proba(net, pairs["a"], pairs["b"], device=device, batch=batch)
    net.train(was_training)
    warp = pairs.get("warp", np.zeros(len(pairs["label"]), bool))
    return {"n": int(len(pairs["label"])), **pair_scores(probs, pairs["label"], pairs["change"], warp)}


@dataclass
class TrainConfig:
    """One training run; the options and the card's command come from these fields."""

    out: str = field(metadata={"help": "run folder: pairs.npz (the pool), checkpoint.pt (resumable), weights/"})
    anatomy_dir: str | None = field(default=None, metadata={
        "help": "folder of anat-*_dseg.nii.gz label maps (default $SCANBRIDGE_DATA_DIR/anatomy when it exists, "
                "else the ICBM152 phantom; 'icbm152' forces the phantom)"})
    pairs: int = field(default=1200, metadata={"help": "simulated pairs in the pool (a fifth for validation)"})
    iterations: int = 3000
    batch: int = 8
    lr: float = 1e-3
    weight_decay: float = field(default=1e-4, metadata={"help": "L2 on the convolution and dense weights"})
    seed: int = 0
    voxel_mm: float = field(default=2.0, metadata={"help": "simulation grid (mm)"})
    grid_mm: float = field(default=3.0, metadata={"help": "network grid (mm)"})
    size: int = field(default=64, metadata={"help": "network input edge (voxels)"})
    inputs: str = field(default="standardised", metadata={
        "choices": INPUTS,
        "help": "what the branches read: intensities with each image's tissue intensities mapped onto one scale "
                "(bidsapp.models.siamese.standardise), tissue fractions (bidsapp.longitudinal.change.pair_fractions) "
                "or the intensities as preprocessed"})
    filters: str = field(default="8,16,32", metadata={"help": "filters of the three elementary blocks"})
    dense: str = field(default="64,32", metadata={"help": "units of the two hidden dense layers"})
    readout: int = field(default=0, metadata={
        "help": "the fused features averaged to N^3 cells before the dense layers (0: flattened, as the paper)"})
    flip: bool = field(default=True, metadata={"help": "random left/right flip of each pair"})
    rotate_deg: float = field(default=5.0, metadata={"help": "random rotation of each pair up to this (0: none)"})
    mask_erode: int = field(default=0, metadata={
        "help": "with --inputs standardised: each training pair's brain mask eroded by 0..N voxels of the network "
                "grid (a pipeline's mask may hold less extra-cerebral CSF than the simulator's); 0: none"})
    intensity_jitter: float = field(default=0.0, metadata={
        "help": "with --inputs standardised: each training image's CSF and GM anchors moved by up to this, WM's by "
                "half, independently for the two images of a pair (0: none)"})
    scanner_adversary: float = field(default=0.0, metadata={
        "help": "weight of a scanner adversary: a head on the penultimate features learns the pair's protocols "
                "(baseline > follow-up) through a reversed gradient of this weight, ramped up from 0 over the run "
                "(Ganin & Lempitsky 2015), so that a scanner change leaves no trace the classifier could read "
                "(0: none)"})
    warp_share: float = field(default=0.0, metadata={
        "help": "share of pairs whose follow-up is the baseline's brain shrunk by a warp inside a fixed skull, by the "
                "loss its trajectory gives (atrophy as injection tools make it; 0: none)"})
    val_every: int = field(default=5, metadata={"help": "every N-th block of 4 pairs is for validation (0: none)"})
    eval_every: int = field(default=250, metadata={"help": "validate every N iterations (0: only at the end)"})
    threads: int = field(default=2, metadata={"card": False, "help": "torch threads, and pair-generation processes"})
    device: str = field(default="cpu", metadata={"card": False, "choices": ("cpu", "cuda", "auto")})
    checkpoint_every: int = field(default=100, metadata={"card": False})

    def __post_init__(self):
        if self.anatomy_dir is None:
            from bidsapp.devdata import anatomy_dir

            self.anatomy_dir = str(anatomy_dir()) if anatomy_dir().is_dir() else "icbm152"


def _ints(text: str) -> list[int]:
    return [int(v) for v in str(text).split(",") if v.strip()]


def architecture(cfg: TrainConfig) -> dict:
    from bidsapp.models.siamese import ARCHITECTURE

    return {"class": ARCHITECTURE["class"],
            "kwargs": dict(ARCHITECTURE["kwargs"], filters=_ints(cfg.filters), dense=_ints(cfg.dense),
                           readout=int(cfg.readout),
                           input_size=cfg.size)}


def command_line(cfg: TrainConfig) -> str:
    return config_command_line("scanbridge-train longitudinal", cfg, first=("out", "anatomy_dir"))


def train(cfg: TrainConfig, progress=print, stop_after: int | None = None, pool: dict | None = None) -> dict:
    """Build or extend the pool, then train (resuming from ``cfg.out``/checkpoint.pt when present); the
    history with the network under ``"net"``, ``"finished"``, and ``"validation"`` (:func:`evaluate`)
    once finished. ``pool``: pairs to use instead of ``cfg.out``/pairs.npz (tests)."""
    import torch
    import torch.nn.functional as F

    from bidsapp.devices import resolve_device
    from bidsapp.models.siamese import build_network
    from bidsapp.training.engine import fit
    from bidsapp.training.losses import adversary_ramp

    torch.set_num_threads(int(cfg.threads))
    device = resolve_device(cfg.device)
    pool = pool if pool is not None else build_pool(cfg, progress)
    raw = pool
    pool = network_inputs(raw, cfg.inputs, cfg.grid_mm)
    torch.manual_seed(cfg.seed)
    val_idx = np.flatnonzero(pool["validation"])
    train_idx = np.flatnonzero(~pool["validation"])
    val = subset(pool, val_idx) if len(val_idx) else None
    # the adversary's classes: the pool's ordered protocol pairs ("baseline>follow-up")
    domains, domain_of = np.unique(pool["protocols"], return_inverse=True) if cfg.scanner_adversary > 0 else ([], None)
    net = build_network(architecture(cfg), n_domains=len(domains)).to(device)
    decay = [p for p in net.parameters() if p.ndim > 1]
    rest = [p for p in net.parameters() if p.ndim <= 1]
    opt = torch.optim.Adam([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                           lr=cfg.lr)
    from bidsapp.models.siamese import standardise

    # with mask erosion the sampler erodes the preprocessed crops, then standardises (as the subject level does)
    sampler = PairSampler(raw if cfg.mask_erode else pool, train_idx, cfg.seed, cfg.flip, cfg.rotate_deg,
                          cfg.mask_erode, standardise if cfg.mask_erode else None, cfg.intensity_jitter)

    def step(it):
        a, b, y, pick = sampler.batch(cfg.batch, index=True)
        a, b, y = a.to(device), b.to(device), y.to(device)
        opt.zero_grad(set_to_none=True)
        terms = {}
        if len(domains):
            logits, dom = net(a, b, reverse=cfg.scanner_adversary * adversary_ramp(it / cfg.iterations))
            d = torch.as_tensor(domain_of[pick], dtype=torch.long, device=device)
            aux = F.cross_entropy(dom, d)
            terms["adversary"] = float((dom.argmax(1) == d).float().mean())
        else:
            logits, aux = net(a, b), 0.0
        loss = F.cross_entropy(logits, y)
        (loss + aux).backward()
        opt.step()
        terms.update(loss=float(loss.detach()), accuracy=float((logits.argmax(1) == y).float().mean()))
        if val is not None and cfg.eval_every > 0 and (it + 1) % cfg.eval_every == 0:
            m = evaluate(net, val, device)
            terms.update(val_at=it + 1, val_accuracy=m["accuracy"], val_msle=m["msle"])
            progress(f"validation at {it + 1}: accuracy {m['accuracy']:.3f} msle {m['msle']:.4f} "
                     f"(same scanner {_fmt(m['accuracy_same_scanner'])}, change {_fmt(m['accuracy_scanner_change'])})")
        return terms

    hist = fit(cfg, net, opt, step, out=cfg.out, states={"sampler": sampler}, progress=progress,
               stop_after=stop_after, logged=("loss", "accuracy", "adversary"))
    hist.setdefault("loss", [])
    if hist["finished"] and val is not None:
        hist["validation"] = evaluate(net, val, device)
        progress("validation: " + " ".join(f"{k} {_fmt(v)}" for k, v in hist["validation"].items()))
    return dict(hist, pool_size=int(len(pool["label"])), train_pairs=int(len(train_idx)),
                val_pairs=int(len(val_idx)), anatomies=sorted(set(pool["anatomy"].tolist())))


def _fmt(v) -> str:
    return "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def save(net, cfg: TrainConfig, history: dict, weights_dir=None) -> dict:
    """Write the network's weights and model card."""
    from bidsapp import __version__
    from bidsapp.models import registry
    from bidsapp.models.siamese import CLASSES, DESIGN, MODEL_NAME

    card = {
        "version": __version__,
        "task": "stable vs accelerated atrophy (decline) from a baseline and a follow-up T1w of one subject",
        "architecture": architecture(cfg),
        "classes": list(CLASSES),
        "design": DESIGN,
        "input": (f"two skull-stripped T1w volumes in RAS order, the follow-up registered to the baseline, "
                  f"resampled to {cfg.grid_mm:g} mm, cropped to {cfg.size}^3 around the baseline's brain, divided "
                  "by the 99.5th percentile in the brain (bidsapp.models.siamese.preprocess)"
                  + {"fraction": "; then read as tissue fractions, each with its own CSF and tissue intensities "
                                 "(bidsapp.longitudinal.change.pair_fractions)",
                     "standardised": "; then each image's CSF, GM and WM intensities (1D k-means) mapped onto "
                                     "one scale (bidsapp.models.siamese.standardise)"}.get(cfg.inputs, "")),
        "input_mode": cfg.inputs,
        "resolution_mm": cfg.grid_mm,
        "output": "softmax probabilities of stable, decline",
        "training": {
            "command": command_line(cfg),
            "seed": cfg.seed,
            "data": (f"{history.get('pool_size')} simulated pairs ({history.get('train_pairs')} training, "
                     f"{history.get('val_pairs')} validation on held-out anatomies) of "
                     f"{', '.join(history.get('anatomies', []))}: random subject deformations, stable or "
                     f"decline atrophy over {YEARS[0]}-{YEARS[1]} years, T1w protocols {', '.join(T1W_PROTOCOLS)}, "
                     f"half the follow-ups on another protocol"
                     + (f"; in {cfg.warp_share:.0%} of the pairs the follow-up's brain shrunk by a warp inside a "
                        "fixed skull instead (bidsapp.physics.atrophy.shrink_brain)" if cfg.warp_share else "")
                     + f"; simulated at {cfg.voxel_mm:g} mm"),
            "iterations": cfg.iterations, "batch": cfg.batch,
            **run_facts(cfg, history),
            "final_loss": float(np.mean(history["loss"][-50:])) if history.get("loss") else None,
        },
        "metrics": {"validation": history.get("validation")},
    }
    return registry.save_model(MODEL_NAME, registry.shipped_state(net), card, weights_dir or Path(cfg.out) / "weights")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, TrainConfig)


def _check(cfg: TrainConfig) -> str | None:
    if str(cfg.anatomy_dir).lower() != "icbm152" and not Path(cfg.anatomy_dir).is_dir():
        return f"{cfg.anatomy_dir}: no such folder"
    try:
        filters, dense = _ints(cfg.filters), _ints(cfg.dense)
    except ValueError:
        return "--filters and --dense are comma-separated integers"
    if not filters or not dense:
        return "--filters and --dense need at least one value"
    if cfg.size % 2 ** len(filters):
        return f"--size {cfg.size} is not divisible by 2^{len(filters)} (one halving per block)"
    side = cfg.size // 2 ** len(filters)
    if cfg.readout < 0 or (cfg.readout and side % cfg.readout):
        return f"--readout {cfg.readout} does not divide the {side}^3 feature map"
    if cfg.mask_erode < 0 or (cfg.mask_erode and cfg.inputs != "standardised"):
        return "--mask-erode is a non-negative number of voxels, for --inputs standardised"
    if not 0 <= cfg.intensity_jitter < 0.2 or (cfg.intensity_jitter and cfg.inputs != "standardised"):
        return "--intensity-jitter is in [0, 0.2), for --inputs standardised"
    if cfg.scanner_adversary < 0:
        return "--scanner-adversary is a non-negative weight"
    if not 0 <= cfg.warp_share <= 1:
        return "--warp-share is a share of the pairs, in [0, 1]"
    if cfg.pairs < BLOCK:
        return f"--pairs must be at least {BLOCK}"
    return None


def run(args) -> int:
    return run_command("scanbridge-train longitudinal", TrainConfig, args, train, save, check=_check)
