"""Accelerated atrophy from two T1w sessions of one subject (3D-SiameseNet paper, section 3).

The network (:func:`build_network`) classifies a pair (baseline, follow-up) of skull-stripped brain
volumes as ``stable`` or ``decline`` (:data:`CLASSES`):

- one branch, applied to both images (the weights are shared because it *is* one module), of three
  elementary blocks: 3x3x3 convolution (stride 1, padding 1), batch norm, leaky ReLU, 2x2x2 average
  pooling (average rather than max so the features are not biased towards edges, as in the paper);
- fusion by subtraction (follow-up features minus baseline features): the question is what changed,
  not whether two images match, so a difference rather than a concatenation or a distance;
- three fully connected layers (default 64, 32, 2), batch norm and leaky ReLU after the first two,
  dropout 0.5 before the output; logits for the cross-entropy in training, softmax at inference.

Both images go through the branch in one batch, so its batch norms see the same statistics for the
baseline and the follow-up: normalised separately (two calls in training mode), an atrophy common to
a batch would be partly normalised away and the training-time features would differ from inference.

Input (:func:`preprocess`): one channel, :data:`INPUT_SIZE` ^3 voxels of :data:`GRID_MM` mm, RAS voxel
order, the follow-up registered to the baseline (both cropped around the baseline's brain, see
:func:`brain_centre`). The paper halves 1 mm ADNI images to 102x108x75 for GPU memory; on two CPU
cores a 3 mm grid is the affordable equivalent, and 64^3 voxels (192 mm) hold a whole brain.
"""

from __future__ import annotations

import numpy as np

from . import registry
from .mirroring import LEFT_RIGHT, mirrored

MODEL_NAME = "siamese_atrophy"
CLASSES = ("stable", "decline")
INPUT_SIZE = 64
GRID_MM = 3.0
ORDER = 1
"""Interpolation order of :func:`preprocess`: linear. The paper's cubic spline overshoots at the
skull-stripped edge (a step from brain to zero) and the overshoot differs between scanners; linear
interpolation is monotone there, and three times cheaper."""
INPUTS = ("standardised", "fraction", "intensity")
"""What the branches read (the card's ``input_mode``): ``standardised``, each preprocessed image with its
own CSF, GM and WM intensities mapped onto one scale (:func:`standardise`); ``fraction``, each image of
the pair as its fraction of brain tissue per voxel (:func:`bidsapp.longitudinal.change.pair_fractions`);
``intensity``, the preprocessed image itself (the paper's input). Between two scanners the intensities of
one brain differ by far more than years of atrophy change them: on the simulated pool the CSF of an SPGR
sits at 0.39 of the 99.5th percentile and an MPRAGE's at 0.15. Standardising puts both on one scale and
keeps the change (atrophy moves how many voxels are CSF, not what CSF looks like)."""
ANCHORS = (0.15, 0.55, 0.89)
"""Where :func:`standardise` puts CSF, GM and WM: their mean intensities in the simulated MPRAGE crops."""
STANDARD_RANGE = (0.01, 1.2)
"""What a standardised brain voxel may read (above 0, so none reads as outside the brain)."""
MIRROR = True
"""Average a pair's probabilities with those of its left-right mirror image (both sessions flipped):
nnU-Net's test-time mirroring, on the axis training flipped pairs along. On the seed-1 test pool of 1200
pairs, accuracy 0.848 -> 0.855 and across a scanner change 0.777 -> 0.789 (one reading against two; the
card's ``metrics.test``, from ``benchmarks/longitudinal/siamese_tables.py``)."""
SLOPE = 0.01
"""Leaky ReLU slope of the authors' published Keras code (``LeakyReLU(alpha=0.01)``)."""

ARCHITECTURE = {"class": "scanbridge.SiameseNet3d",
                "kwargs": {"in_channels": 1, "filters": [8, 16, 32], "dense": [64, 32], "classes": len(CLASSES),
                           "input_size": INPUT_SIZE, "dropout": 0.5}}

DESIGN = {
    "filters": ("8, 16, 32 filters (the authors' code: 16, 32, 32, 32): the model trains on two CPU cores; "
                "the paper itself chose few filters for memory"),
    "dense": ("64 and 32 units (the authors' code: 2048 and 1024): the flattened difference is 32 x 8^3 "
              "values, and the training set is a simulated pool of about a thousand pairs"),
    "input": ("64^3 voxels of 3 mm (the paper: 1 mm images halved to 102x108x75); linear resampling rather "
              "than a cubic spline (no overshoot at the brain edge); intensities scaled by the 99.5th "
              "percentile in the brain, not the maximum (one bright voxel)"),
    "fusion": ("follow-up minus baseline features, both images through the branch in one batch (shared batch "
               "statistics)"),
}
"""Why the shipped model departs from the paper where it does (written into the model card)."""

_CACHE: dict = {}


def build_network(arch: dict | None = None, n_domains: int = 0):
    """The Siamese network of ``arch`` (default :data:`ARCHITECTURE`): ``net(baseline, follow_up)`` ->
    logits (N, 2) of tensors (N, 1, S, S, S); ``net.features(a, b)`` -> (fused, penultimate).

    ``n_domains`` > 0 adds the training-only scanner adversary (``domain_head``, dropped from the shipped
    weights by :func:`bidsapp.models.registry.shipped_state`): ``net(a, b, reverse=s)`` -> (logits,
    domain logits), the head reading the penultimate features through a gradient reversal of weight
    ``s``."""
    import torch
    from torch import nn

    from .layers import reverse_gradient

    arch = arch or ARCHITECTURE
    if arch.get("class") != ARCHITECTURE["class"]:
        raise ValueError(f"unknown Siamese architecture {arch.get('class')}")

    class SiameseNet3d(nn.Module):
        def __init__(self, in_channels=1, filters=(8, 16, 32), dense=(64, 32), classes=2, input_size=INPUT_SIZE,
                     dropout=0.5, slope=SLOPE, readout=0):
            super().__init__()
            if input_size % 2 ** len(filters):
                raise ValueError(f"input size {input_size} is not divisible by 2^{len(filters)} "
                                 "(one halving per block)")
            blocks, cin = [], in_channels
            for f in filters:  # the paper's elementary block (its Fig. 1)
                blocks += [nn.Conv3d(cin, f, 3, stride=1, padding=1, bias=False), nn.BatchNorm3d(f),
                           nn.LeakyReLU(slope, inplace=True), nn.AvgPool3d(2)]
                cin = f
            self.branch = nn.Sequential(*blocks)
            side = input_size // 2 ** len(filters)
            if readout and side % int(readout):
                raise ValueError(f"readout {readout} does not divide the {side}^3 feature map")
            width = cin * (int(readout) if readout else side) ** 3
            # readout N: the fused map averaged to N^3 cells (a change of volume is a sum over the brain;
            # 0 flattens the whole map, as the paper does)
            layers = ([nn.AvgPool3d(side // int(readout))] if readout else []) + [nn.Flatten()]
            for d in dense:
                layers += [nn.Linear(width, d, bias=False), nn.BatchNorm1d(d), nn.LeakyReLU(slope, inplace=True)]
                width = d
            self.dense = nn.Sequential(*layers)
            self.dropout = nn.Dropout(dropout)
            self.out = nn.Linear(width, classes)
            self.domain_head = None
            if n_domains > 0:  # three perceptron layers, as the lesion model's regularisation network
                self.domain_head = nn.Sequential(nn.Linear(width, 32), nn.LeakyReLU(slope),
                                                 nn.Linear(32, 32), nn.LeakyReLU(slope), nn.Linear(32, n_domains))

        def fuse(self, a, b):
            """Follow-up minus baseline features (N, C, s, s, s), one batch through the branch."""
            n = a.shape[0]
            f = self.branch(torch.cat([a, b]).contiguous(memory_format=torch.channels_last_3d))
            return f[n:] - f[:n]

        def features(self, a, b):
            """(fused features, penultimate dense output): what the paper's t-SNE (Fig. 5) reads."""
            fused = self.fuse(a, b)
            return fused, self.dense(fused)

        def forward(self, a, b, reverse: float | None = None):
            hidden = self.dense(self.fuse(a, b))
            logits = self.out(self.dropout(hidden))
            if reverse is None:
                return logits
            return logits, self.domain_head(reverse_gradient(hidden, reverse))

    # Channels-last: the CPU (oneDNN) backward of a 3D convolution is up to 40x slower in the default layout.
    return SiameseNet3d(**arch["kwargs"]).to(memory_format=torch.channels_last_3d)


def load_model(device="cpu", weights_dir=None, name: str = MODEL_NAME):
    """(network in eval mode on ``device``, card); sha256-checked, cached per process."""
    return registry.load_network(name, build_network, device, weights_dir, _CACHE)


def predict_proba(net, a, b, device="cpu", batch: int = 8, mirror: bool | None = None) -> np.ndarray:
    """Softmax probabilities (N, 2) of :data:`CLASSES` for preprocessed pairs ``a``, ``b`` (N, S, S, S) in
    RAS voxel order, averaged with the pair's left-right mirror image when ``mirror`` (default
    :data:`MIRROR`)."""
    import torch

    mirror = MIRROR if mirror is None else mirror
    net.eval()
    out = []
    # both sessions flipped together; the class probabilities are per pair, not a map to flip back
    probabilities = mirrored(lambda xa, xb: torch.softmax(net(xa, xb), 1), LEFT_RIGHT if mirror else (),
                             flip_output=False)
    with torch.inference_mode():
        for i in range(0, len(a), batch):
            xa = torch.as_tensor(np.asarray(a[i:i + batch], np.float32))[:, None].to(device)
            xb = torch.as_tensor(np.asarray(b[i:i + batch], np.float32))[:, None].to(device)
            out.append(probabilities(xa, xb).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(CLASSES)), np.float32)


def brain_centre(mask: np.ndarray, spacing, size: int = INPUT_SIZE, target_mm: float = GRID_MM) -> np.ndarray:
    """Voxel coordinates (on the grid of ``mask``) the crop is centred on: the centre of the mask's
    bounding box, except along an axis where the box is longer than the crop (a brainstem or spinal
    canal left in the mask), where the centre of mass is used so the cut falls on that thin tail and
    not on the cortex."""
    mask = np.asarray(mask) > 0
    if not mask.any():
        raise ValueError("the brain mask is empty")
    idx = np.argwhere(mask)
    lo, hi = idx.min(0), idx.max(0)
    centre = (lo + hi) / 2.0
    long = (hi - lo + 1) * np.asarray(spacing[:3], float) > size * target_mm
    if long.any():
        centre[long] = idx.mean(0)[long]
    return centre


def preprocess(image: np.ndarray, mask: np.ndarray, spacing, size: int = INPUT_SIZE, target_mm: float = GRID_MM,
               order: int = ORDER, centre=None) -> np.ndarray:
    """The network's input (size, size, size) float32 in [0, 1] from one image in RAS voxel order.

    Skull-stripped (image x mask), resampled to ``target_mm`` isotropic with ``scipy.ndimage.zoom``
    (a Gaussian anti-alias first when downsampling), cropped or zero-padded to ``size`` ^3 around
    ``centre`` (input voxel coordinates; default :func:`brain_centre` of ``mask``: pass the baseline's
    for the follow-up so both crops are the same box), divided by the 99.5th percentile in the mask
    and clipped to [0, 1]; zero outside the (resampled) mask.
    """
    from scipy import ndimage as ndi

    mask = np.asarray(mask) > 0
    if not mask.any():
        raise ValueError("the brain mask is empty")
    data = np.nan_to_num(np.asarray(image, np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if data.shape != mask.shape:
        raise ValueError(f"image {data.shape} and mask {mask.shape} differ in shape")
    spacing = np.asarray(spacing[:3], float)
    centre = brain_centre(mask, spacing, size, target_mm) if centre is None else np.asarray(centre, float)
    x = np.where(mask, np.maximum(data, 0.0), 0.0).astype(np.float32)
    factors = spacing / float(target_mm)
    sigma = np.maximum(0.0, (1.0 / factors - 1.0) / 2.0)  # skimage's anti-aliasing rule
    if sigma.any():
        x = ndi.gaussian_filter(x, sigma, mode="constant")
    x = ndi.zoom(x, factors, order=order, mode="grid-constant", grid_mode=True)
    m = ndi.zoom(mask.astype(np.float32), factors, order=1, mode="grid-constant", grid_mode=True) >= 0.5
    x = np.where(m, np.maximum(x, 0.0), 0.0).astype(np.float32)
    c = (centre + 0.5) * factors - 0.5  # the same point on the new grid (grid_mode: voxel boxes scale)
    out = np.zeros((size,) * 3, np.float32)
    src, dst = [], []
    for ax in range(3):
        start = int(round(c[ax] - (size - 1) / 2.0))
        s0, s1 = max(start, 0), min(start + size, x.shape[ax])
        if s1 <= s0:
            raise ValueError("the crop misses the image (centre outside it?)")
        src.append(slice(s0, s1))
        dst.append(slice(s0 - start, s1 - start))
    out[tuple(dst)] = x[tuple(src)]
    keep = np.zeros((size,) * 3, bool)
    keep[tuple(dst)] = m[tuple(src)]
    inside = out[keep]
    scale = float(np.percentile(inside, 99.5)) if inside.size else 0.0
    if scale > 0:
        out /= scale
    np.clip(out, 0.0, 1.0, out=out)
    return out


def tissue_centres(values: np.ndarray, iterations: int = 30) -> np.ndarray:
    """Three sorted intensity centres (CSF, GM, WM on a T1w) of ``values``: 1D k-means started at the
    10th, 50th and 90th percentiles (deterministic: a session reads the same on every run)."""
    x = np.asarray(values, np.float64).ravel()
    c = np.quantile(x, [0.1, 0.5, 0.9])
    for _ in range(iterations):
        edges = (c[:-1] + c[1:]) / 2.0
        label = np.searchsorted(edges, x)
        new = np.array([x[label == j].mean() if np.any(label == j) else c[j] for j in range(3)])
        if np.allclose(new, c):
            break
        c = new
    return np.sort(c)


def standardise(image: np.ndarray, anchors=ANCHORS) -> np.ndarray:
    """A preprocessed image (zero outside the brain) with its three :func:`tissue_centres` mapped
    piecewise linearly onto ``anchors``; beyond the outer centres the nearer segment's slope continues.
    Clipped to :data:`STANDARD_RANGE` in the brain, zero outside."""
    x = np.asarray(image, np.float32)
    inside = x > 0
    if inside.sum() < 3:
        return np.zeros_like(x)
    c = tissue_centres(x[inside])
    if np.any(np.diff(c) <= 1e-6):  # a flat image: no contrast to map
        return np.where(inside, np.clip(x, *STANDARD_RANGE), 0.0).astype(np.float32)
    t = np.asarray(anchors, np.float64)
    out = np.interp(x, c, t)
    low, high = x < c[0], x > c[2]
    out[low] = t[0] + (x[low] - c[0]) * (t[1] - t[0]) / (c[1] - c[0])
    out[high] = t[2] + (x[high] - c[2]) * (t[2] - t[1]) / (c[2] - c[1])
    return np.where(inside, np.clip(out, *STANDARD_RANGE), 0.0).astype(np.float32)
