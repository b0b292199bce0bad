"""MRAI-NET: a Siamese patch network whose features are invariant to the scanner (Kouw et al., ISBI 2018).

One branch maps a 15x15 patch through 8 3x3 ReLU kernels and fully connected layers of 16, 8 and 2 units;
the Siamese pair shares that branch and compares the two outputs with an L1 distance. The fully connected
layers are written as convolutions (the first one with a kernel as large as what the convolutions leave of a
patch, the others 1x1), so the very same weights featurise a whole slice or volume densely in one pass
instead of patch by patch. ``dense == per-patch`` holds exactly (tested) because every layer is "valid".

Two options follow the authors' reference implementation (github.com/wmkouw/mrai-net), which the paper's
text leaves out: ``pool=2`` puts a 2x2 max pooling after the convolutions (densely, a stride-1 pooling and a
first fully connected layer dilated by 2: still exact), and ``n_domains`` feeds the scanner's identity to the
fully connected layers (a one-hot scanner vector concatenated to the flattened convolution output, i.e. a
learned offset per scanner on the first fully connected layer), so the network can move one scanner's
features onto another's. Features then depend on the scanner id: pass ``domain`` wherever the model runs.

The defaults are the paper's text; ``MRAINetConfig`` widens the network or switches to 3D patches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

__all__ = [
    "MRAINetConfig", "MRAINet", "l1_distance", "normalize_intensity",
    "extract_patches", "sample_centres", "dense_features", "save_mrainet", "load_mrainet",
]


@dataclass
class MRAINetConfig:
    """Architecture of one branch. Defaults: section 2.3 of the paper."""

    patch_size: int = 15
    spatial_dims: int = 2
    in_channels: int = 1
    conv_channels: tuple[int, ...] = (8,)
    kernel_size: int = 3
    hidden: tuple[int, ...] = (16, 8)
    out_features: int = 2
    dropout: float = 0.2
    pool: int = 1
    """Max pooling (kernel = stride) after the convolutions; 1 = none (the paper's text), 2 = the reference code."""
    n_domains: int = 0
    """Scanners whose identity the fully connected layers see (0 = none: features of the image alone)."""

    def __post_init__(self):
        self.conv_channels = tuple(int(c) for c in self.conv_channels)
        self.hidden = tuple(int(h) for h in self.hidden)
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if self.patch_size % 2 == 0:
            raise ValueError(f"patch_size must be odd so that a patch has a centre voxel, got {self.patch_size}")
        if self.pool < 1 or self.n_domains < 0:
            raise ValueError(f"pool must be >= 1 and n_domains >= 0, got {self.pool} and {self.n_domains}")
        if self.receptive_remainder < 1:
            raise ValueError(f"patch_size {self.patch_size} is too small for {len(self.conv_channels)} "
                             f"convolutions of size {self.kernel_size} and pooling {self.pool}")

    @property
    def receptive_remainder(self) -> int:
        """Spatial size left of a patch after the valid convolutions and the pooling: the first FC layer's kernel."""
        return (self.patch_size - len(self.conv_channels) * (self.kernel_size - 1)) // self.pool

    def to_dict(self) -> dict:
        d = asdict(self)
        d["conv_channels"] = list(self.conv_channels)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MRAINetConfig":
        """Also reads configurations saved before ``pool`` and ``n_domains`` existed (their defaults)."""
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


class MRAINet(nn.Module):
    """One branch of the Siamese network; also the SOURCE/TARGET CNN when ``out_features`` is the class count.

    ``forward`` takes patches (N, C, p, p[, p]) and returns (N, out_features). ``dense`` takes whole images
    (N, C, H, W[, D]) and returns feature maps (N, out_features, H-p+1, W-p+1[, D-p+1]): the feature of
    the patch centred at each valid position. Both take ``domain`` (N,) scanner ids when ``n_domains`` > 0.
    """

    def __init__(self, config: MRAINetConfig | None = None):
        super().__init__()
        self.config = config = config or MRAINetConfig()
        conv = nn.Conv2d if config.spatial_dims == 2 else nn.Conv3d
        pool = nn.MaxPool2d if config.spatial_dims == 2 else nn.MaxPool3d
        layers: list[nn.Module] = []
        c_in = config.in_channels
        for c_out in config.conv_channels:
            layers += [conv(c_in, c_out, config.kernel_size), nn.ReLU(inplace=True)]
            c_in = c_out
        if config.pool > 1:
            layers.append(pool(config.pool))
        if config.dropout > 0:
            layers.append(nn.Dropout(config.dropout))
        self._first_fc = len(layers)
        k = config.receptive_remainder
        for i, h in enumerate(config.hidden):
            layers += [conv(c_in, h, k if i == 0 else 1), nn.ReLU(inplace=True)]
            if config.dropout > 0:
                layers.append(nn.Dropout(config.dropout))
            c_in = h
        layers.append(conv(c_in, config.out_features, k if not config.hidden else 1))
        self.net = nn.Sequential(*layers)
        if config.n_domains:
            width = config.hidden[0] if config.hidden else config.out_features
            self.domain_offset = nn.Embedding(config.n_domains, width)
            nn.init.zeros_(self.domain_offset.weight)       # starts as the network without the scanner id

    def _run(self, x: torch.Tensor, domain, dense: bool) -> torch.Tensor:
        cfg = self.config
        if cfg.n_domains:
            if domain is None:
                raise ValueError("this MRAI-NET sees the scanner id: pass domain")
            domain = torch.as_tensor(domain, dtype=torch.long, device=x.device).reshape(-1)
            if domain.numel() == 1 and len(x) > 1:
                domain = domain.expand(len(x))
        nd = cfg.spatial_dims
        in_shape = tuple(x.shape[2:])
        for i, layer in enumerate(self.net):
            if dense and cfg.pool > 1 and isinstance(layer, (nn.MaxPool2d, nn.MaxPool3d)):
                # every pooling phase at once: a stride-1 pooling, read by a first FC layer dilated by ``pool``
                x = (nn.functional.max_pool2d if nd == 2 else nn.functional.max_pool3d)(x, cfg.pool, stride=1)
            elif dense and cfg.pool > 1 and i == self._first_fc:
                x = (nn.functional.conv2d if nd == 2 else nn.functional.conv3d)(
                    x, layer.weight, layer.bias, dilation=cfg.pool)
            else:
                x = layer(x)
            if i == self._first_fc and cfg.n_domains:
                x = x + self.domain_offset(domain).reshape(len(x), -1, *([1] * nd))
        if dense and cfg.pool > 1:   # the last rows a floor pooling leaves unread: one output per patch position
            x = x[(slice(None), slice(None)) + tuple(slice(0, s - cfg.patch_size + 1) for s in in_shape)]
        return x

    def dense(self, x: torch.Tensor, domain=None) -> torch.Tensor:
        return self._run(x, domain, dense=True)

    def forward(self, x: torch.Tensor, domain=None) -> torch.Tensor:
        p = self.config.patch_size
        if tuple(x.shape[2:]) != (p,) * self.config.spatial_dims:
            raise ValueError(f"expected patches of size {p}, got {tuple(x.shape[2:])}")
        return self._run(x, domain, dense=False).flatten(1)


def l1_distance(fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    """Distance between paired feature vectors, section 2.1: the L1 norm of the difference."""
    return (fa - fb).abs().sum(dim=1)


def normalize_intensity(image: np.ndarray, mask: np.ndarray | None = None, percentile: float = 99.0) -> np.ndarray:
    """Scale an image so that the brain's ``percentile`` is 1 and zero the outside of the mask.

    Scanners differ in arbitrary gain; this removes the gain but keeps contrast (what MRAI-NET must learn
    away). Zeroing outside the brain keeps skull and neck signal, which differs by sequence, out of patches.
    """
    image = np.asarray(image, dtype=np.float32)
    inside = np.isfinite(image) if mask is None else (np.asarray(mask) > 0) & np.isfinite(image)
    values = image[inside]
    scale = float(np.percentile(values, percentile)) if values.size else 0.0
    out = np.where(inside, image, 0.0).astype(np.float32)
    if scale > 0:
        out /= scale
    return out


def extract_patches(image: np.ndarray, centres: np.ndarray, patch_size: int = 15,
                    spatial_dims: int = 2, axis: int = 2) -> np.ndarray:
    """Patches around voxel ``centres`` of an image, zero-padded at the borders.

    A 3D image takes centres (N, 3); 2D patches lie in the plane orthogonal to ``axis`` (axis 2 = axial
    slices of a RAS image). A 2D image (one slice) takes centres (N, 2) and gives 2D patches.
    Returns (N, 1, p, p) or (N, 1, p, p, p) float32.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        if spatial_dims != 2:
            raise ValueError("a 2D image gives 2D patches only (spatial_dims=2)")
        centres = np.asarray(centres, dtype=np.int64).reshape(-1, 2)
        return extract_patches(image[:, :, None], np.c_[centres, np.zeros(len(centres), np.int64)],
                               patch_size, 2, axis=2)
    if image.ndim != 3:
        raise ValueError(f"extract_patches needs a 2D or 3D image, got {image.ndim} dimensions")
    centres = np.asarray(centres, dtype=np.int64).reshape(-1, image.ndim)
    r = patch_size // 2
    pad = [(r, r)] * 3
    if spatial_dims == 2:
        pad[axis] = (0, 0)                      # 2D patches never read beyond their own slice
    padded = np.pad(image, pad)
    offs = np.arange(-r, r + 1)
    c = centres + np.array([p[0] for p in pad])
    if spatial_dims == 3:
        ii = c[:, 0, None, None, None] + offs[None, :, None, None]
        jj = c[:, 1, None, None, None] + offs[None, None, :, None]
        kk = c[:, 2, None, None, None] + offs[None, None, None, :]
        out = padded[ii, jj, kk]
    else:
        in_plane = [d for d in range(3) if d != axis]
        grids = [None, None, None]
        grids[in_plane[0]] = c[:, in_plane[0], None, None] + offs[None, :, None]
        grids[in_plane[1]] = c[:, in_plane[1], None, None] + offs[None, None, :]
        grids[axis] = np.broadcast_to(c[:, axis, None, None], (len(c), 1, 1))
        out = padded[grids[0], grids[1], grids[2]]
    return np.ascontiguousarray(out[:, None], dtype=np.float32)


@torch.no_grad()
def dense_features(model: MRAINet, image: np.ndarray, mask: np.ndarray | None = None, axis: int = 2,
                   batch_voxels: int = 4_000_000, device: str | torch.device = "cpu",
                   domain: int | None = None) -> np.ndarray:
    """Featurise every voxel of a 3D image: (X, Y, Z, out_features) float32, zeros outside ``mask``.

    The image is cropped to the mask's bounding box plus half a patch of context (the rest of the head is
    never featurised), zero-padded only beyond the image, and passed through the fully convolutional branch a batch of slices (2D) or a slab (3D) at a time.
    Same result as ``model(extract_patches(...))`` at every voxel. ``domain``: the image's scanner id, for a
    model that sees it.
    """
    cfg = model.config
    model = model.eval().to(device)
    image = np.asarray(image, dtype=np.float32)
    out = np.zeros(image.shape + (cfg.out_features,), dtype=np.float32)
    m = np.ones(image.shape, bool) if mask is None else np.asarray(mask) > 0
    if not m.any():
        return out
    lo = [int(np.flatnonzero(m.any(axis=tuple(d for d in range(3) if d != k))).min()) for k in range(3)]
    hi = [int(np.flatnonzero(m.any(axis=tuple(d for d in range(3) if d != k))).max()) + 1 for k in range(3)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    r = cfg.patch_size // 2
    # crop the box plus half a patch of real context; pad with zeros only beyond the image (as extract_patches)
    ctx = [r if (cfg.spatial_dims == 3 or k != axis) else 0 for k in range(3)]
    src = tuple(slice(max(0, a - c), min(n, b + c)) for a, b, c, n in zip(lo, hi, ctx, image.shape))
    pads = [(c - (a - s.start), c - (s.stop - b)) for a, b, c, s in zip(lo, hi, ctx, src)]
    crop = np.pad(image[src], pads)
    if cfg.spatial_dims == 2:
        planes = np.moveaxis(crop, axis, 0)                         # (S, A+2r, B+2r)
        per = planes.shape[1] * planes.shape[2]
        step = max(1, batch_voxels // per)
        feats = []
        for s in range(0, planes.shape[0], step):
            x = torch.from_numpy(np.ascontiguousarray(planes[s:s + step, None])).to(device)
            feats.append(model.dense(x, domain).permute(0, 2, 3, 1).cpu().numpy())
        f = np.concatenate(feats, axis=0)                           # (S, A, B, F)
        f = np.moveaxis(f, 0, axis)
    else:
        vol = crop
        depth = crop.shape[2] - 2 * r
        per = vol.shape[0] * vol.shape[1]
        step = max(1, batch_voxels // per)
        feats = []
        for s in range(0, depth, step):
            e = min(depth, s + step)
            x = torch.from_numpy(np.ascontiguousarray(vol[None, None, :, :, s:e + 2 * r])).to(device)
            feats.append(model.dense(x, domain)[0].permute(1, 2, 3, 0).cpu().numpy())
        f = np.concatenate(feats, axis=2)
    out[box] = f
    out[~m] = 0
    return out


def save_mrainet(model: MRAINet, path, extra: dict | None = None) -> None:
    """Save weights with the architecture, so loading never needs to guess the configuration."""
    torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict(), "extra": extra or {}}, path)


def load_mrainet(path, map_location: str | torch.device = "cpu") -> MRAINet:
    blob = torch.load(path, map_location=map_location, weights_only=True)
    model = MRAINet(MRAINetConfig.from_dict(blob["config"]))
    model.load_state_dict(blob["state_dict"])
    return model.eval()


def sample_centres(labels: np.ndarray, n_per_class: int, classes=(1, 2, 3), rng=None,
                   allowed: np.ndarray | None = None, border: int = 0, axis: int | None = None) -> dict[int, np.ndarray]:
    """Random voxel coordinates of each class, at most ``n_per_class`` each, without replacement.

    ``allowed`` restricts candidates (e.g. high-confidence voxels); ``border`` keeps centres that far from
    the image edges in-plane (``axis`` is the slice axis for 2D patches, None for 3D). Returns
    {class: (n_k, 3) int array}; n_k < n_per_class when the image has fewer candidates (the caller says so).
    """
    rng = np.random.default_rng(rng)
    labels = np.asarray(labels)
    ok = np.ones(labels.shape, bool) if allowed is None else np.asarray(allowed, bool).copy()
    if border > 0:
        for d in range(labels.ndim):
            if d == axis:
                continue
            idx = [slice(None)] * labels.ndim
            idx[d] = slice(0, border)
            ok[tuple(idx)] = False
            idx[d] = slice(labels.shape[d] - border, None)
            ok[tuple(idx)] = False
    out = {}
    for k in classes:
        flat = np.flatnonzero((labels == k) & ok)
        take = flat if len(flat) <= n_per_class else rng.choice(flat, n_per_class, replace=False)
        out[int(k)] = np.stack(np.unravel_index(np.sort(take), labels.shape), axis=1).astype(np.int64)
    return out
