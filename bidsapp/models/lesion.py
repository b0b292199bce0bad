"""Scanner-invariant MS lesion segmentation (scanner-invariant MS lesion paper, section 3).

The network is the paper's backbone: a 3D U-Net with four down and four up stages (MONAI's
``BasicUNet``), without dropout (the paper's BM; ``dropout > 0`` is its BDM baseline). During training
a regularisation network (three perceptron layers and a softmax) reads the bottleneck features and
predicts the acquisition domain; its auxiliary loss (:mod:`bidsapp.training.losses`, ``L_pc``,
``L_rand`` or ``L_du``) pushes the encoder to forget the scanner. At inference the head is dropped:
the shipped weights are the segmentation network alone.

Inputs are every structural contrast a session has, co-registered on one grid, as the channels
:data:`CHANNELS`; a missing contrast is a channel of zeros (the network is trained with random contrast
dropout, so FLAIR alone, FLAIR + T1w, T2w alone ... all work, and the sidecar says which were used).
Besides the lesion probability the network predicts three anatomical context maps (:data:`OUTPUTS`:
lateral ventricles, cerebral cortex, infratentorial brain) that place every lesion in its location
class (:func:`lesion_table`) on any session, a FLAIR-only one included, without a tissue segmentation.

Inference (:func:`segment`), in order:

1. every channel is put in RAS voxel order and resampled to :data:`GRID_MM` isotropic (box average
   down, linear up), cropped to the brain mask's box;
2. each channel is multiplied by the (dilated) brain mask and divided by its mean inside the mask;
3. MONAI's sliding-window inferer over the whole box (50 % overlap, Gaussian weighting);
4. the probabilities go back to the input grid (linear), the lesion mask is probability >= ``threshold``
   (:data:`THRESHOLD` unless the user chose another) inside the brain mask, without components smaller
   than :data:`MIN_LESION_MM3`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bidsapp.metrics.lesions import label_lesions

from . import registry
from .mirroring import LEFT_RIGHT, mirrored

MODEL_NAME = "lesion_unet"
CHANNELS = ("FLAIR", "T1w", "T2w", "PDw")
"""Input channels, in order; FLAIR, T2w or PDw must be present (lesions are seen as hyperintensities)."""
OUTPUTS = ("lesion", "ventricles", "cortex", "infratentorial")
"""Output channels (independent sigmoids): the lesions and the context maps that classify their location."""
NEEDS = ("FLAIR", "T2w", "PDw")
GRID_MM = 1.0
THRESHOLD = 0.5
"""Probability at which a lesion mask is cut unless the user chooses another (``--lesion-threshold``).
Higher cuts suit bright, sharply bounded lesions and lower ones faint lesions (docs/lesions.md, "The
mask threshold"); 0.5 leaves the volume of faint, clinical-like simulated lesions unbiased."""
MIN_LESION_MM3 = 3.0
"""Components smaller than this are dropped from the mask (the smallest lesion the model is trained on)."""
LOCATIONS = ("periventricular", "juxtacortical", "deep white matter", "infratentorial")
PERIVENTRICULAR_MM = 3.0
"""A lesion whose nearest voxel lies within this distance of the ventricles is periventricular
(MAGNIMS: in contact with the ventricles; 3 mm absorbs the partial volume of thick slices)."""
JUXTACORTICAL_MM = 2.0
"""Within this distance of the cortex (and not periventricular): juxtacortical."""

ARCHITECTURE = {"class": "monai.networks.nets.BasicUNet",
                "kwargs": {"spatial_dims": 3, "in_channels": len(CHANNELS), "out_channels": len(OUTPUTS),
                           "features": [12, 24, 48, 96, 160, 12], "dropout": 0.0}}

_CACHE: dict = {}


def build_network(arch: dict | None = None, n_domains: int = 0):
    """The lesion U-Net of ``arch`` (default :data:`ARCHITECTURE`), with the regularisation head for
    ``n_domains`` acquisition domains when that is > 0 (training only)."""
    from monai.networks.nets import BasicUNet
    from torch import nn

    from .layers import fixed_order

    arch = arch or ARCHITECTURE
    if arch.get("class") != ARCHITECTURE["class"]:
        raise ValueError(f"unknown lesion architecture {arch.get('class')}")

    class LesionUNet(BasicUNet):
        """``BasicUNet`` whose forward can also return the domain prediction of the bottleneck."""

        def __init__(self, kwargs, n_domains):
            super().__init__(**kwargs)
            self.final_conv = fixed_order(self.final_conv)  # outputs independent of the thread count
            width = int(kwargs["features"][4])
            self.domain_head = None
            if n_domains > 0:  # phi_R: three perceptron layers, softmax applied by the loss
                self.domain_head = nn.Sequential(
                    nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                    nn.Linear(width, 64), nn.ReLU(inplace=True),
                    nn.Linear(64, 32), nn.ReLU(inplace=True),
                    nn.Linear(32, n_domains))

        def forward(self, x, with_domain: bool = False):
            x0 = self.conv_0(x)
            x1 = self.down_1(x0)
            x2 = self.down_2(x1)
            x3 = self.down_3(x2)
            x4 = self.down_4(x3)
            u4 = self.upcat_4(x4, x3)
            u3 = self.upcat_3(u4, x2)
            u2 = self.upcat_2(u3, x1)
            logits = self.final_conv(self.upcat_1(u2, x0))
            if with_domain:
                return logits, self.domain_head(x4)
            return logits

    kw = dict(arch["kwargs"])
    kw["features"] = tuple(kw["features"])
    return LesionUNet(kw, n_domains)


def load_model(device="cpu", weights_dir=None, name: str = MODEL_NAME):
    """(network in eval mode on ``device``, card); sha256-checked, cached per process."""
    return registry.load_network(name, build_network, device, weights_dir, _CACHE)


def normalise(x, mask):
    """Divide by the mean inside ``mask`` and clip to [0, 6]: one scale for every scanner, computable
    the same way on a training patch (from the head's tissue volumes) and on a whole session."""
    m = x[mask]
    scale = float(m.mean()) if m.size else 0.0
    if not np.isfinite(scale) or scale <= 0:
        return np.zeros_like(x, dtype=np.float32)
    return np.clip(x / scale, 0.0, 6.0).astype(np.float32)


def _box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + 1 + margin, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


MIRROR = True
"""Average each window's outputs with those of its left-right mirror image (nnU-Net's test-time mirroring,
on the one axis a brain is nearly symmetric about; the network was trained with left-right flips)."""


def predict(net, channels: np.ndarray, device="cpu", roi: int = 96, overlap: float = 0.5,
            progress=None, mirror: bool | None = None) -> np.ndarray:
    """Sigmoid outputs (len(OUTPUTS), X, Y, Z) of normalised RAS ``channels`` (C, X, Y, Z) on the 1 mm grid."""
    import torch
    from monai.inferers import sliding_window_inference

    from bidsapp.devices import autocast

    mirror = MIRROR if mirror is None else mirror

    probabilities = mirrored(lambda t: torch.sigmoid(net(t).float()), LEFT_RIGHT if mirror else ())

    x = torch.as_tensor(channels[None], dtype=torch.float32).to(device)
    size = tuple(min(roi, max(16, int(np.ceil(s / 16) * 16))) for s in channels.shape[1:])
    with torch.inference_mode(), autocast(device):
        prob = sliding_window_inference(x, size, sw_batch_size=1, predictor=probabilities, overlap=overlap,
                                        mode="gaussian", padding_mode="constant", progress=bool(progress))
    return prob[0].cpu().numpy()


def check_threshold(value) -> float:
    """``value`` as a mask threshold: a probability strictly between 0 and 1."""
    t = float(value)
    if not 0.0 < t < 1.0:
        raise ValueError(f"lesion threshold {value} must lie strictly between 0 and 1")
    return t


@dataclass
class LesionResult:
    probability: np.ndarray            # lesion probability on the input grid
    mask: np.ndarray                   # bool lesion mask on the input grid
    context: dict                      # name -> probability on the input grid (ventricles, cortex, infratentorial)
    contrasts: tuple                   # the contrasts used
    model: dict = field(default_factory=dict)
    threshold: float = THRESHOLD       # the probability the mask was cut at


def segment(images: dict, brain_mask: np.ndarray, affine: np.ndarray, zooms, device="cpu",
            weights_dir=None, threshold: float | None = None) -> LesionResult:
    """Lesions of a session: ``images`` maps contrast -> array on one grid (``affine``, voxel size
    ``zooms``), ``brain_mask`` on that grid. Contrasts outside :data:`CHANNELS` are ignored; the mask is
    the probability cut at ``threshold`` (default :data:`THRESHOLD`)."""
    from scipy import ndimage as ndi

    from bidsapp.devices import resolve_device

    from .tissue import from_ras, ras_zooms, resample_shape, resample_to, to_ras

    cut = check_threshold(THRESHOLD if threshold is None else threshold)
    used = tuple(c for c in CHANNELS if c in images)
    if not any(c in used for c in NEEDS):
        raise ValueError(f"lesion segmentation needs one of {', '.join(NEEDS)}; got {', '.join(images) or 'none'}")
    device = resolve_device(device)
    net, card = load_model(device, weights_dir)
    grid = float(card.get("resolution_mm", GRID_MM))
    mask = np.asarray(brain_mask) > 0
    mask_ras, ornt = to_ras(mask.astype(np.float32), affine)
    zooms_ras = ras_zooms(zooms, ornt)
    low_mask = resample_to(mask_ras, zooms_ras, grid) >= 0.5
    if not low_mask.any():
        raise ValueError("the brain mask is empty")
    low_mask = ndi.binary_dilation(low_mask, iterations=1)
    box = _box(low_mask, 4)
    sub_mask = low_mask[box]
    stack = np.zeros((len(CHANNELS), *sub_mask.shape), np.float32)
    for i, c in enumerate(CHANNELS):
        if c not in images:
            continue
        data = np.nan_to_num(np.asarray(images[c], np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        ras, _ = to_ras(np.maximum(data, 0), affine)
        low = resample_to(ras, zooms_ras, grid)[box]
        stack[i] = normalise(low * sub_mask, sub_mask)
    prob_low = predict(net, stack, device)
    prob_low *= sub_mask[None]
    ras_shape = mask_ras.shape
    full_low = np.zeros((len(OUTPUTS), *low_mask.shape), np.float32)
    full_low[(slice(None), *box)] = prob_low
    maps = [from_ras(resample_shape(p, ras_shape, order=1), ornt) for p in full_low]
    lesion = maps[0] * mask
    return LesionResult(probability=lesion.astype(np.float32),
                        mask=label_lesions(lesion >= cut, zooms, MIN_LESION_MM3)[0] > 0,
                        context={name: m for name, m in zip(OUTPUTS[1:], maps[1:])},
                        contrasts=used,
                        model=registry.result_model(card, device),
                        threshold=cut)


def lesion_table(mask: np.ndarray, affine: np.ndarray, context: dict) -> list[dict]:
    """One row per lesion (26-connected component of ``mask``): ``id`` (its value in the labelled
    image), ``volume_mm3``, ``centroid_x/y/z_mm`` (scanner RAS mm) and ``location``.

    Location (MAGNIMS 2016 vocabulary), first rule that holds: ``infratentorial`` (most of it in the
    infratentorial map), ``periventricular`` (within :data:`PERIVENTRICULAR_MM` of the ventricles),
    ``juxtacortical`` (within :data:`JUXTACORTICAL_MM` of the cortex), else ``deep white matter``.
    ``context`` maps ``ventricles``/``cortex``/``infratentorial`` to probabilities on the mask's grid.
    """
    from scipy import ndimage as ndi

    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))
    lab, n = label_lesions(mask, zooms)
    if n == 0:
        return []
    far = np.full(mask.shape, np.inf, np.float32)

    def distance(name):
        m = np.asarray(context.get(name, 0)) >= 0.5
        return ndi.distance_transform_edt(~m, sampling=zooms) if np.any(m) else far

    d_vent, d_ctx = distance("ventricles"), distance("cortex")
    infra = np.asarray(context.get("infratentorial", np.zeros(mask.shape))) >= 0.5
    voxel = float(np.prod(zooms))
    rows = []
    for i, sl in enumerate(ndi.find_objects(lab), 1):
        comp = lab[sl] == i
        idx = np.argwhere(comp) + [s.start for s in sl]
        centre = affine[:3, :3] @ idx.mean(0) + affine[:3, 3]
        if infra[sl][comp].mean() > 0.5:
            where = "infratentorial"
        elif d_vent[sl][comp].min() <= PERIVENTRICULAR_MM:
            where = "periventricular"
        elif d_ctx[sl][comp].min() <= JUXTACORTICAL_MM:
            where = "juxtacortical"
        else:
            where = "deep white matter"
        rows.append({"id": i, "volume_mm3": round(float(comp.sum()) * voxel, 2),
                     "centroid_x_mm": round(float(centre[0]), 1), "centroid_y_mm": round(float(centre[1]), 1),
                     "centroid_z_mm": round(float(centre[2]), 1), "location": where})
    return rows
