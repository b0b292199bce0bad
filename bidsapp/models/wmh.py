"""White-matter hyperintensities from FLAIR alone (Siamese content loss paper, sections 2-3).

The generator is the paper's 2D encoder-decoder in the U-Net style with dense blocks: every
convolution is 3x3 conv -> batch norm -> leaky ReLU (0.1); a dense block is :data:`BLOCK_LAYERS`
such convolutions, each reading the concatenation of the block's input and all earlier outputs
(DenseNet), and the block's output is the concatenation of its layers' outputs; the first block has 32
filters and the count doubles after each 2x2 max pool; the decoder mirrors the encoder with
transposed-convolution upsampling, skip connections and one bottleneck block between them. Besides
the lesion map it predicts the same anatomical context maps as the MS model (:data:`OUTPUTS`:
ventricles, cortex, infratentorial brain) so that :func:`bidsapp.models.lesion.lesion_table` places
every lesion (periventricular or deep, the split WMH studies report) on a FLAIR-only session.

It is trained only through the Siamese content loss (:class:`ContentLoss`, the paper's equation 1):
a frozen feature network (:func:`build_feature_network`, a small VGG-style encoder trained once as an
autoencoder of MR slices and shipped with its own card) encodes FLAIR x truth and FLAIR x prediction,
features are taken after its first two max pools, and the loss is the mean squared distance of the
flattened features. The overlap-loss baselines (Dice, Tversky, generalised Dice) train the same
generator with MONAI's losses (:mod:`bidsapp.training.wmh`).

Inference (:func:`segment`), per session:

1. the FLAIR is put in RAS voxel order; its axial slices are processed one by one (as acquired, thick
   or thin);
2. each slice is cropped to a square around the brain mask's in-plane box (the same box for every
   slice, with a margin) and resized to the network's input size (:data:`INPUT_SIZE` pixels);
3. intensities are masked by the brain and divided by their mean inside the brain over the whole
   volume (:func:`bidsapp.models.lesion.normalise`, one scale for every scanner);
4. the sigmoid outputs go back to the slice's grid (linear), the lesion mask is probability
   >= ``threshold`` (:data:`bidsapp.models.lesion.THRESHOLD` unless the user chose another) inside the
   brain mask, without 3D components smaller than :data:`MIN_LESION_MM3`.
"""

from __future__ import annotations

import numpy as np

from . import registry

MODEL_NAME = "wmh_unet"
FEATURES_NAME = "wmh_features"
OUTPUTS = ("lesion", "ventricles", "cortex", "infratentorial")
INPUT_SIZE = 160
BOX_MARGIN = 0.08
"""Fraction of the brain box's larger side added on every side before the square crop."""
MIN_LESION_MM3 = 3.0
BLOCK_LAYERS = 2
SLICE_BATCH = 16
"""Slices prepared, predicted and put back at a time (bounds the memory of the square crops)."""

ARCHITECTURE = {"class": "scanbridge.DenseUNet2d",
                "kwargs": {"in_channels": 1, "out_channels": len(OUTPUTS), "features": [32, 64, 128],
                           "block_layers": BLOCK_LAYERS, "input_size": INPUT_SIZE}}
FEATURE_ARCHITECTURE = {"class": "scanbridge.VGGFeatures2d",
                        "kwargs": {"in_channels": 2, "features": [16, 32]}}

DESIGN = {
    "blocks": ("three max pools (dense blocks of 32, 64, 128 filters, bottleneck 256) rather than four: a fourth "
               "level multiplies the weights by four (19 MB) and the CPU time by 1.3 for a receptive field "
               "already larger than any WMH"),
    "input": ("slices cropped to the brain's square box and resized to 160 px (about 1.1 mm per pixel, the "
              "scale of the paper's 224 px over a 240 mm field of view); intensities divided by the mean in the "
              "brain, not the volume maximum (one voxel, which moves with fat, vessels and lesion load)"),
    "feature_network": ("ImageNet VGG19 cannot be downloaded here, and the paper's Table 2 shows that what matters is "
                        "a fixed multi-scale extractor: two VGG stages trained once as an autoencoder of masked "
                        "FLAIR slices (simulated and real, unlabelled) and frozen; they read FLAIR x mask and the "
                        "mask, so a prediction where FLAIR is black (ventricles) is not free"),
}
"""Why the shipped model departs from the paper where it does (written into the model card)."""

_CACHE: dict = {}


def _conv(cin: int, cout: int):
    from torch import nn

    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.LeakyReLU(0.1, inplace=True))


def build_network(arch: dict | None = None):
    """The generator of ``arch`` (default :data:`ARCHITECTURE`): logits (N, len(OUTPUTS), H, W)."""
    import torch
    from torch import nn

    arch = arch or ARCHITECTURE
    if arch.get("class") != ARCHITECTURE["class"]:
        raise ValueError(f"unknown WMH architecture {arch.get('class')}")
    kw = arch["kwargs"]

    class DenseBlock(nn.Module):
        """``layers`` convolutions of ``width // layers`` filters, each on everything before it."""

        def __init__(self, cin, width, layers):
            super().__init__()
            grow = width // layers
            self.convs = nn.ModuleList(_conv(cin + i * grow, grow) for i in range(layers))

        def forward(self, x):
            outs = [self.convs[0](x)]
            for conv in self.convs[1:]:
                outs.append(conv(torch.cat([x, *outs], 1)))
            return torch.cat(outs, 1)

    class DenseUNet2d(nn.Module):
        def __init__(self, in_channels, out_channels, features, block_layers, input_size=INPUT_SIZE):
            super().__init__()
            f = list(features)
            self.down = nn.ModuleList()
            cin = in_channels
            for w in f:
                self.down.append(DenseBlock(cin, w, block_layers))
                cin = w
            self.pool = nn.MaxPool2d(2)
            self.bottleneck = DenseBlock(f[-1], 2 * f[-1], block_layers)
            self.up, self.dec = nn.ModuleList(), nn.ModuleList()
            cin = 2 * f[-1]
            for w in reversed(f):
                self.up.append(nn.ConvTranspose2d(cin, w, 2, stride=2))
                self.dec.append(DenseBlock(2 * w, w, block_layers))
                cin = w
            self.head = nn.Conv2d(f[0], out_channels, 1)

        def forward(self, x):
            skips = []
            for block in self.down:
                x = block(x)
                skips.append(x)
                x = self.pool(x)
            x = self.bottleneck(x)
            for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
                x = dec(torch.cat([up(x), skip], 1))
            return self.head(x)

    return DenseUNet2d(**kw)


def build_feature_network(arch: dict | None = None, decoder: bool = False):
    """The frozen feature network of the content loss: two VGG stages (two 3x3 conv + ReLU, then a
    2x2 max pool); ``forward`` returns the features after each pool. ``decoder``: with the
    autoencoder's decoder (``reconstruct``), for its training only."""
    from torch import nn

    arch = arch or FEATURE_ARCHITECTURE
    if arch.get("class") != FEATURE_ARCHITECTURE["class"]:
        raise ValueError(f"unknown feature architecture {arch.get('class')}")
    kw = arch["kwargs"]

    class VGGFeatures2d(nn.Module):
        def __init__(self, in_channels, features):
            super().__init__()
            stages, cin = [], in_channels
            for w in features:
                stages.append(nn.Sequential(nn.Conv2d(cin, w, 3, padding=1), nn.ReLU(inplace=True),
                                            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(inplace=True),
                                            nn.MaxPool2d(2)))
                cin = w
            self.stages = nn.ModuleList(stages)
            self.decoder = None
            if not decoder:
                return
            ups = []
            for w_in, w_out in zip(reversed(features), list(reversed(features))[1:] + [16]):
                ups += [nn.ConvTranspose2d(w_in, w_out, 2, stride=2), nn.ReLU(inplace=True),
                        nn.Conv2d(w_out, w_out, 3, padding=1), nn.ReLU(inplace=True)]
            self.decoder = nn.Sequential(*ups, nn.Conv2d(16, in_channels, 1))

        def forward(self, x):
            feats = []
            for stage in self.stages:
                x = stage(x)
                feats.append(x)
            return feats

        def reconstruct(self, x):
            return self.decoder(self.forward(x)[-1])

    return VGGFeatures2d(**kw)


def feature_state(net) -> dict:
    """The encoder's weights (what the content loss uses; the decoder was for its training only)."""
    return {k: v for k, v in net.state_dict().items() if not k.startswith("decoder.")}


class ContentLoss:
    """The Siamese content loss (paper, equation 1): mean squared distance between the frozen
    features of ``image * truth`` and ``image * prediction``, summed over the feature stages.

    The feature network reads two channels, the masked image and the mask itself. The paper's VGG19
    reads the masked FLAIR three times (RGB); on FLAIR, CSF and the background are dark, so there
    ``image * prediction`` is zero whatever the prediction and a lesion predicted in the ventricles
    would cost nothing; the mask channel closes that gap and is zero where the image is.
    """

    def __init__(self, features_net):
        for p in features_net.parameters():
            p.requires_grad_(False)
        self.net = features_net.eval()

    def __call__(self, image, prediction, truth):
        import torch

        fa = self.net(torch.cat([image * truth, truth], 1))
        fb = self.net(torch.cat([image * prediction, prediction], 1))
        return sum(((a - b) ** 2).mean() for a, b in zip(fa, fb))


def load_model(device="cpu", weights_dir=None, name: str = MODEL_NAME):
    """(generator in eval mode on ``device``, card); sha256-checked, cached per process."""
    return registry.load_network(name, build_network, device, weights_dir, _CACHE)


def inference_model(device="cpu", weights_dir=None):
    """(generator with its batch norms folded into the convolutions, card): the same outputs, about
    1.5x faster on a CPU, and the same on any thread count (:func:`~bidsapp.models.layers.fixed_order`
    head); cached per process."""
    key = ("fused", str(device), str(weights_dir))
    if key not in _CACHE:
        from torch.fx.experimental.optimization import fuse

        from .layers import fixed_order

        net, card = load_model(device, weights_dir)
        fused = fuse(net)
        fused.head = fixed_order(fused.head)  # after tracing: fx would trace through its forward
        _CACHE[key] = (fused, card)
    return _CACHE[key]


def load_features(device="cpu", weights_dir=None):
    """(frozen feature network, card) of the content loss."""
    return registry.load_network(FEATURES_NAME, build_feature_network, device, weights_dir, _CACHE)


def square_box(mask2d: np.ndarray, margin: float = BOX_MARGIN) -> tuple[int, int, int]:
    """(x0, y0, side) of the square crop around a 2D brain mask's box, centred, ``margin`` of the
    larger side added on every side (may extend beyond the image: padded with zeros)."""
    idx = np.argwhere(mask2d)
    lo, hi = idx.min(0), idx.max(0) + 1
    side = int(np.ceil(max(hi - lo) * (1 + 2 * margin)))
    centre = (lo + hi) / 2.0
    x0, y0 = (np.round(centre - side / 2.0)).astype(int)
    return int(x0), int(y0), side


def crop_square(img: np.ndarray, box) -> np.ndarray:
    """The square ``box`` of the first two axes of ``img`` (zeros outside the image)."""
    x0, y0, side = box
    out = np.zeros((side, side) + img.shape[2:], img.dtype)
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + side, img.shape[0]), min(y0 + side, img.shape[1])
    if sx1 > sx0 and sy1 > sy0:
        out[sx0 - x0:sx1 - x0, sy0 - y0:sy1 - y0] = img[sx0:sx1, sy0:sy1]
    return out


def uncrop_square(crop: np.ndarray, box, shape) -> np.ndarray:
    """Inverse of :func:`crop_square` onto an array of ``shape`` (zeros outside the box)."""
    x0, y0, side = box
    out = np.zeros(tuple(shape) + crop.shape[2:], crop.dtype)
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + side, shape[0]), min(y0 + side, shape[1])
    if sx1 > sx0 and sy1 > sy0:
        out[sx0:sx1, sy0:sy1] = crop[sx0 - x0:sx1 - x0, sy0 - y0:sy1 - y0]
    return out


def predict_slices(net, slices: np.ndarray, size: int, device="cpu", batch: int = 8) -> np.ndarray:
    """Sigmoid outputs (N, len(OUTPUTS), S, S) of square normalised ``slices`` (N, S, S), each resized
    to ``size`` for the network and back."""
    import torch
    import torch.nn.functional as F

    from bidsapp.devices import autocast

    out = np.zeros((len(slices), len(OUTPUTS), *slices.shape[1:]), np.float32)
    with torch.inference_mode(), autocast(device):
        for i in range(0, len(slices), batch):
            x = torch.as_tensor(slices[i:i + batch, None], dtype=torch.float32).to(device)
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            p = torch.sigmoid(net(x).float())
            p = F.interpolate(p, size=slices.shape[1:], mode="bilinear", align_corners=False)
            out[i:i + batch] = p.cpu().numpy()
    return out


def segment(flair: np.ndarray, brain_mask: np.ndarray, affine: np.ndarray, zooms, device="cpu",
            weights_dir=None, threshold: float | None = None):
    """WMH of one FLAIR (any grid; ``brain_mask`` on the same grid): a
    :class:`bidsapp.models.lesion.LesionResult`, the mask cut at ``threshold`` (default
    :data:`bidsapp.models.lesion.THRESHOLD`)."""
    from bidsapp.devices import resolve_device
    from bidsapp.metrics.lesions import label_lesions

    from .lesion import THRESHOLD, LesionResult, check_threshold, normalise
    from .tissue import from_ras, to_ras

    cut = check_threshold(THRESHOLD if threshold is None else threshold)
    device = resolve_device(device)
    net, card = inference_model(device, weights_dir)
    size = int(card["architecture"]["kwargs"].get("input_size", INPUT_SIZE))
    mask = np.asarray(brain_mask) > 0
    if not mask.any():
        raise ValueError("the brain mask is empty")
    data = np.nan_to_num(np.asarray(flair, np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    ras, ornt = to_ras(np.maximum(data, 0), affine)
    del data
    mask_ras, _ = to_ras(mask, affine)
    norm = normalise(ras * mask_ras, mask_ras)
    box = square_box(mask_ras.any(2))
    zs = np.flatnonzero(mask_ras.any((0, 1)))
    lesion = np.zeros(ras.shape, np.float32)
    context = np.zeros((len(OUTPUTS) - 1, *ras.shape), np.float16)  # only thresholded at 0.5
    for start in range(0, len(zs), SLICE_BATCH):
        chunk = zs[start:start + SLICE_BATCH]
        probs = predict_slices(net, np.stack([crop_square(norm[:, :, z], box) for z in chunk]), size, device)
        for k, z in enumerate(chunk):
            full = uncrop_square(np.moveaxis(probs[k], 0, -1), box, ras.shape[:2])
            lesion[:, :, z] = full[..., 0] * mask_ras[:, :, z]
            context[:, :, :, z] = np.moveaxis(full[..., 1:], -1, 0)
    del norm, ras
    maps = [from_ras(lesion, ornt)] + [from_ras(c, ornt) for c in context]
    lesion = maps[0]
    zooms_in = np.asarray(zooms[:3], float)
    return LesionResult(probability=lesion,
                        mask=label_lesions(lesion >= cut, zooms_in, MIN_LESION_MM3)[0] > 0,
                        context={name: m for name, m in zip(OUTPUTS[1:], maps[1:])},
                        contrasts=("FLAIR",),
                        model=registry.result_model(card, device),
                        threshold=cut)
