"""Learned, contrast-agnostic brain extraction (SynthStrip's recipe, trained on the physics engine).

The network sees any head image the app reads (T1w SPGR/MPRAGE, T2w, PDw, FLAIR; 1 mm or thick
slices; with skull, defaced, or already skull-stripped) and returns the brain: every voxel of the
truth's brain labels (GM, WM, deep GM and CSF inside the brain, extra-cerebral CSF included, as the
simulator's ``derivatives/truth`` brain mask and SynthStrip's masks are).

Inference (:func:`extract`), in the order the steps run:

1. the image is put in RAS voxel order (axes permuted/flipped only) and box-averaged or linearly
   interpolated to :data:`GRID_MM` isotropic over the same field of view (``card["resolution_mm"]``);
2. intensities are scaled by :func:`normalise` (divided by the 99.5th percentile of the non-zero voxels);
3. a small 3D U-Net over the whole volume, padded to a multiple of :data:`PAD_MULTIPLE` by repeating
   its last slices (:func:`_pad`), and over its left-right mirror image, the two probabilities averaged
   (seconds on 2 CPU cores);
4. the brain probability is interpolated back to the input grid (linear), thresholded at 0.5, holes
   are filled and the largest connected component kept: the mask is refined at native resolution;
5. an input that is already skull-stripped keeps its own brain (:func:`prestripped_support`).

:func:`sanity_check` applies the app's plausibility rule (volume 800-2200 ml, a single large
component); the participant workflow falls back to template-based extraction when it fails and says so.
:func:`contrast_problem` tells a scan that is no head at all (a uniform phantom): that session stops.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import registry
from .mirroring import LEFT_RIGHT, mirrored

MODEL_NAME = "brainmask_unet"
GRID_MM = 2.0
PAD_MULTIPLE = 16
PAD_MODE = "replicate"
"""How the volume is padded to a multiple of :data:`PAD_MULTIPLE` (:func:`_pad`; ``constant`` is zeros)."""
VOLUME_RANGE_ML = (800.0, 2200.0)
SECOND_COMPONENT_ML = 25.0
"""A second connected component larger than this (ml at 0.5) means the mask is not one brain."""
UNIFORM_SPAN = 1.2
"""A brain shows tissue contrast in every MR weighting: inside its mask the 95th percentile of the
intensities is at least 1.5 times the 5th (a simulated 1.5 T PD-weighted head, the flattest weighting;
real clinical T1w, T2w and FLAIR: 2.0-6.2). A water phantom, which the network may call brain: 1.06."""
PRESTRIPPED_ZERO_FRACTION = 0.3
"""Share of exactly-zero voxels (and nearly every voxel of the image's faces) that marks an input as already
skull-stripped; a scanner's magnitude image has noise everywhere outside the head."""
PRESTRIPPED_COVER = 0.6
"""The network's mask must cover this share of the non-zero voxels: a head whose background was zeroed
(a defaced or masked full head) holds three times its brain, and keeps its own mask."""
PRESTRIPPED_MARGIN_MM = 10.0
"""An already-stripped input's mask is its non-zero voxels within this distance of the network's mask
(leftovers of the other tool farther away are dropped)."""

MIRROR = True
"""Average the network's output with that of the left-right mirrored input (test-time mirroring, as the
lesion model's; the network was trained with left-right flips). One more forward pass at 2 mm (a whole
process on a 1 mm head: 5.2 s against 5.0 s); on the 21 held-out simulated images of
``benchmarks/brainmask`` Dice rose on 18 (by 0.001 at the median, 0.004 at most) and fell on one by 0.0001."""


ARCHITECTURE = {"class": "monai.networks.nets.UNet",
                "kwargs": {"spatial_dims": 3, "in_channels": 1, "out_channels": 1,
                           "channels": [16, 32, 48, 64, 96], "strides": [2, 2, 2, 2],
                           "num_res_units": 1, "norm": "instance"}}

_CACHE: dict = {}


def build_network(arch: dict | None = None):
    """The brain-extraction U-Net (MONAI's ``UNet``) described by ``arch`` (default :data:`ARCHITECTURE`)."""
    from monai.networks.nets import UNet

    arch = arch or ARCHITECTURE
    if arch.get("class") != ARCHITECTURE["class"]:
        raise ValueError(f"unknown brain-extraction architecture {arch.get('class')}")
    kw = dict(arch["kwargs"])
    kw["channels"], kw["strides"] = tuple(kw["channels"]), tuple(kw["strides"])
    return UNet(**kw)


def load_model(device="cpu", weights_dir=None, name: str = MODEL_NAME):
    """(network in eval mode on ``device``, card); sha256-checked, cached per process."""
    return registry.load_network(name, build_network, device, weights_dir, _CACHE)


def normalise(x):
    """Scale intensities to about 0-1: clip at the 99.5th percentile of the non-zero voxels
    (sampled, so it costs the same at any size), divide by it. Works on numpy arrays and tensors."""
    import torch

    t = torch.as_tensor(x)
    flat = t.reshape(-1)
    nz = flat[flat > 0]
    if nz.numel() == 0:
        return t * 0
    if nz.numel() > 200_000:
        nz = nz[:: nz.numel() // 200_000]
    hi = torch.quantile(nz.float(), 0.995).clamp_min(1e-6)
    out = (t / hi).clamp(0, 1.5)
    return out.numpy() if isinstance(x, np.ndarray) else out


def predict_probability(net, volume: np.ndarray, device="cpu", mirror: bool | None = None) -> np.ndarray:
    """Brain probability of a RAS volume already on the network's grid (a padded forward pass, averaged
    with that of the left-right mirror image when ``mirror``, default :data:`MIRROR`)."""
    import torch

    from bidsapp.devices import autocast

    mirror = MIRROR if mirror is None else mirror
    x = torch.as_tensor(normalise(np.asarray(volume, np.float32)))[None, None]
    pads = [(-s) % PAD_MULTIPLE for s in x.shape[2:]]
    crop = tuple(slice(0, s) for s in volume.shape)
    # padded after flipping, so that the mirror image's padding lies where the original's does
    def probability(t):
        return torch.sigmoid(net(_pad(t, pads).to(device)).float()).cpu()[(slice(None), slice(None)) + crop]

    with torch.inference_mode(), autocast(device):
        prob = mirrored(probability, LEFT_RIGHT if mirror else ())(x)[0, 0]
    return prob.numpy()


def _pad(x, pads):
    """``x`` (N, C, X, Y, Z) padded at the far end of each axis by ``pads``, repeating the last slice.

    Why not zeros: the network trained on fields of view that end where the tensor ends, brain included,
    and on images zeroed below a cut with the brain cut with them. Zeros past an image whose field of
    view cuts through the brain (a 2D stack that misses the vertex) read as such a cut: the mask stopped
    one to seven slices short of the image's last one (6-14 mm of brain left out on a clinical T1w and on
    a real head cut 25 mm below the vertex). Repeated slices carry the image on; where the image ends in
    air they are air, as zeros were (a whole head's mask moved by under 0.5 %)."""
    import torch

    return torch.nn.functional.pad(x, [p for s in reversed(pads) for p in (0, s)], mode=PAD_MODE)


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scipy import ndimage as ndi

    lab, n = ndi.label(mask)
    sizes = np.bincount(lab.ravel())[1:] if n else np.zeros(0, int)
    return lab, sizes


def postprocess(prob: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Mask at 0.5 with holes filled and the largest component kept; also the component sizes (voxels,
    largest first) before that, for :func:`sanity_check`."""
    from scipy import ndimage as ndi

    lab, sizes = _components(prob >= 0.5)
    if sizes.size == 0:
        return np.zeros(prob.shape, bool), []
    keep = lab == (int(np.argmax(sizes)) + 1)
    return ndi.binary_fill_holes(keep), sorted((int(s) for s in sizes), reverse=True)


def prestripped_support(data: np.ndarray, network_mask: np.ndarray, zooms) -> np.ndarray | None:
    """The mask of an input that is already skull-stripped (None when it is not one).

    Why: on a brain stripped exactly at its CSF rim the network, which learned brains with a skull
    around them, keeps only part of the outer CSF (75 % of the ICBM152 brain). As fMRIPrep does for a
    pre-stripped T1w, the other tool's brain is then the brain: the non-zero voxels (largest component,
    holes filled), within :data:`PRESTRIPPED_MARGIN_MM` of the network's mask. An input counts as
    stripped when its faces are zero (a brainstem cut by the field of view aside: 95 % of each face),
    :data:`PRESTRIPPED_ZERO_FRACTION` of it is zero, the non-zero
    part has a brain's volume and the network's mask covers :data:`PRESTRIPPED_COVER` of it."""
    from scipy import ndimage as ndi

    nonzero = data != 0
    faces = [np.take(nonzero, i, axis=ax) for ax in range(3) for i in (0, -1)]
    if max(f.mean() for f in faces) > 0.05 or 1.0 - nonzero.mean() < PRESTRIPPED_ZERO_FRACTION:
        return None
    lab, sizes = _components(nonzero)
    if sizes.size == 0:
        return None
    support = ndi.binary_fill_holes(lab == int(np.argmax(sizes)) + 1)
    voxml = float(np.prod(zooms)) / 1000.0
    lo, hi = VOLUME_RANGE_ML
    if not lo <= support.sum() * voxml <= hi or (network_mask & support).sum() < PRESTRIPPED_COVER * support.sum():
        return None
    box = ndi.find_objects(support.astype(np.uint8))[0]  # the distance is only needed there (seconds at 1 mm)
    out = np.zeros_like(support)
    out[box] = support[box] & (ndi.distance_transform_edt(~network_mask[box], sampling=zooms) <= PRESTRIPPED_MARGIN_MM)
    return out


@dataclass
class BrainMaskResult:
    mask: np.ndarray                      # bool, on the input grid (input voxel order)
    volume_ml: float
    component_ml: list = field(default_factory=list)
    model: dict = field(default_factory=dict)
    prestripped: bool = False
    """The input was already skull-stripped and its own brain was kept (:func:`prestripped_support`)."""

    @property
    def problem(self) -> str | None:
        return sanity_check(self.volume_ml, self.component_ml)


def sanity_check(volume_ml: float, component_ml) -> str | None:
    """Why a brain mask is implausible (None when it passes): volume outside :data:`VOLUME_RANGE_ML`,
    or more than one large connected component."""
    lo, hi = VOLUME_RANGE_ML
    if not lo <= volume_ml <= hi:
        return f"brain mask volume {volume_ml:.0f} ml outside the plausible {lo:.0f}-{hi:.0f} ml"
    if len(component_ml) > 1 and component_ml[1] > SECOND_COMPONENT_ML:
        return (f"brain mask has {sum(c > SECOND_COMPONENT_ML for c in component_ml)} large components "
                f"(second: {component_ml[1]:.0f} ml)")
    return None


def contrast_problem(image: np.ndarray, mask: np.ndarray, voxel_ml: float) -> str | None:
    """Why the masked part of ``image`` cannot be a brain (None when it can): no tissue contrast
    (:data:`UNIFORM_SPAN`), as in a quality-control phantom; one mask volume or another cannot tell."""
    values = np.asarray(image, np.float32)[np.asarray(mask, bool)]
    values = values[np.isfinite(values)]
    if values.size < 100:
        return None
    p5, p95 = np.percentile(values, [5, 95])
    if p5 > 0 and p95 / p5 < UNIFORM_SPAN:
        return (f"the {values.size * voxel_ml:.0f} ml called brain has no tissue contrast (95th/5th percentile "
                f"of its intensities {p95 / p5:.2f}; a brain's is at least 1.5)")
    return None


def extract(img, device="cpu", weights_dir=None) -> BrainMaskResult:
    """Brain mask of a nibabel image on its own grid (see the module docstring for the steps)."""
    from bidsapp.devices import resolve_device

    from .tissue import from_ras, ras_zooms, resample_shape, resample_to, to_ras

    device = resolve_device(device)
    net, card = load_model(device, weights_dir)
    grid = float(card.get("resolution_mm", GRID_MM))
    data = img.get_fdata(dtype=np.float32)  # kept by the image: the contrast check reads it again
    if data.ndim > 3:
        data = data.reshape(data.shape[:3])
    data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    ras, ornt = to_ras(data, img.affine)
    zooms = ras_zooms(img.header.get_zooms(), ornt)
    low = resample_to(np.maximum(ras, 0), zooms, grid)
    prob_ras = resample_shape(predict_probability(net, low, device), ras.shape, order=1)
    mask, sizes = postprocess(from_ras(prob_ras, ornt))
    native_zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    voxml = float(np.prod(native_zooms)) / 1000.0
    own = prestripped_support(data, mask, native_zooms) if mask.any() else None
    if own is not None:
        mask, sizes = own, [int(own.sum())]
    return BrainMaskResult(mask=mask, volume_ml=float(mask.sum()) * voxml,
                           component_ml=[s * voxml for s in sizes],
                           model=registry.result_model(card, device),
                           prestripped=own is not None)
