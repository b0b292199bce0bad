"""Simulate an MR image of a phantom under a protocol: static equations + scanner effects.

Order of operations (each step is what a scanner does to the object, in the order it happens):
1. the phantom is averaged onto the protocol's voxel grid (voxel size and slice thickness; exact box
   overlap, so partial volume follows the true fractions);
2. the signed signal of every *pure* tissue is computed with the protocol's equation and the subject's
   tissue properties at the protocol's field strength, and voxels mix these signals by their tissue
   fractions (the magnitude of the sum: opposite-sign tissues of an inversion-recovery image cancel at
   borders as they do in real magnitude images); with ``psf_fwhm`` the signed sum is first blurred by a
   Gaussian point-spread function of that full width at half maximum, in units of the grid's finest
   voxel (in-plane for a 2D protocol, whose slice profile the box average already is), as the finite
   k-space sampling of a real scanner blurs its image (off by default: each voxel then holds exactly
   its box average of the object, sharper than any scanner's image);
3. receiver gain (the brightest pure brain tissue reaches ``protocol.gain``, as auto-prescan scaling
   does) and a smooth multiplicative bias field (log-field with standard deviation ``protocol.bias``);
4. Rician noise: Gaussian noise of standard deviation ``sigma`` on the real and imaginary channels,
   ``sigma = mean brain signal / SNR``, then the magnitude;
5. image and truth are stored with the protocol's array orientation (e.g. LIA, LPS).

Public API
----------
``simulate(phantom, protocol_or_params, rng, *, voxel_size=None, orientation=None, bias=True,
noise=True, snr=None, psf_fwhm=0.0) -> Simulation``
    ``protocol_or_params``: a :class:`~bidsapp.physics.protocols.Protocol` or a dict with
    ``sequence``, ``field_strength`` and the sequence parameters (seconds, degrees; optional
    ``voxel_size``, ``snr``, ``gain``, ``bias``, ``orientation``).  ``voxel_size``: mm along R-L, A-P,
    S-I (default the protocol's; ``"native"`` keeps the phantom grid).  ``rng``: numpy Generator.
``Simulation``  dataclass: ``image`` (float32 Nifti1Image), ``truth`` (Phantom on the image grid, same
    orientation: ``truth.brain_mask``, ``truth.truth_probseg()``, ``truth.dseg()``,
    ``truth.lesion_mask()``, ``truth.volumes()``, ``truth.qmri()``), ``protocol``, ``bias_field``
    (float32 array), ``noise_sigma``, ``tissue_signals`` (class -> signed pure-tissue signal incl. gain);
    ``sidecar()`` (the protocol's BIDS sidecar).
``protocol_from_params(params) -> Protocol``
``tissue_signals(phantom, protocol) -> np.ndarray (C,)``  signed pure-tissue signals, receiver-scaled so
    the brightest of CSF/GM/WM equals ``protocol.gain``.
``mix_signals(fractions, signals, magnitude=True) -> np.ndarray``  magnitude of the fraction-weighted sum
    (the signed sum with ``magnitude=False``).
``random_bias_field(shape, rng, strength, voxel_size=(1,1,1), spacing_mm=60.0) -> np.ndarray``
``add_rician_noise(image, sigma, rng) -> np.ndarray``
Torch path (on-the-fly training, same equations):
``simulate_torch(fractions, props, sequence, params, *, gain=1.0, bias_field=None, noise_sigma=None,
generator=None) -> Tensor``  ``fractions`` (B, C, X, Y, Z) or (C, X, Y, Z); ``props`` (C, 4) or
    (B, C, 4) PD, T1, T2, T2* (s); ``params`` mapping of floats or (B,) tensors (short or BIDS keys);
    returns (B, X, Y, Z) (or (X, Y, Z)) magnitude images.
``bias_field_torch(shape, strength, generator=None, batch=1, control=4) -> Tensor`` (B, X, Y, Z)
``rician_noise_torch(image, sigma, generator=None) -> Tensor``
"""
from __future__ import annotations

from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from ..labels import TISSUE
from . import equations
from .phantom import Phantom, ras_to_array_axes
from .protocols import Protocol


@dataclass
class Simulation:
    image: nib.Nifti1Image
    truth: Phantom
    protocol: Protocol
    bias_field: np.ndarray
    noise_sigma: float
    tissue_signals: dict = field(default_factory=dict)

    def sidecar(self) -> dict:
        return self.protocol.sidecar()


_SUFFIX = {"SPGR": "T1w", "MPRAGE": "T1w", "TSE": "T2w", "FLAIR": "FLAIR"}


def protocol_from_params(params: dict) -> Protocol:
    """A :class:`Protocol` from a plain dict (``sequence``, ``field_strength``, ``tr``/``te``/... )."""
    p = dict(params)
    seq = str(p.pop("sequence", "")).upper()
    if "field_strength" not in p:
        raise ValueError("simulation parameters need field_strength (tesla)")
    p.setdefault("name", f"custom-{seq.lower() or 'unknown'}")
    p.setdefault("suffix", _SUFFIX.get(seq, "T1w"))
    known = set(Protocol.__dataclass_fields__)
    extra = sorted(set(p) - known)
    if extra:
        raise ValueError(f"unknown simulation parameters: {', '.join(extra)}")
    return Protocol(sequence=seq, **p)


def mix_signals(fractions: np.ndarray, signals, magnitude: bool = True) -> np.ndarray:
    """|sum_c fractions[c] * signals[c]| in a fixed order (deterministic bytes); the signed sum when not
    ``magnitude``."""
    out = np.zeros(fractions.shape[1:], np.float32)
    for f, s in zip(fractions, signals):
        if s != 0:
            out += f * np.float32(s)
    if magnitude:
        np.abs(out, out=out)
    return out


def point_spread(signal: np.ndarray, fwhm: float, voxel_size=(1.0, 1.0, 1.0)) -> np.ndarray:
    """``signal`` (signed) blurred by a Gaussian point-spread function ``fwhm`` finest voxels wide (the
    same width in mm on every axis: on a thick-slice grid the slices are barely blurred further)."""
    if fwhm <= 0:
        return signal
    vs = np.asarray(voxel_size, float)
    sigma = fwhm * vs.min() / vs / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    return ndi.gaussian_filter(signal, tuple(sigma), mode="nearest").astype(np.float32)


def random_bias_field(shape, rng: np.random.Generator, strength: float, voxel_size=(1.0, 1.0, 1.0),
                      spacing_mm: float = 60.0) -> np.ndarray:
    """exp(b): b a smooth random field (control points ~``spacing_mm`` apart, cubic), std ``strength``."""
    shape = np.asarray(shape)
    if strength <= 0:
        return np.ones(tuple(shape), np.float32)
    ctrl = np.maximum(np.ceil(shape * np.asarray(voxel_size) / spacing_mm).astype(int) + 1, 3)
    coarse = rng.standard_normal(tuple(ctrl))
    mid = np.minimum(np.maximum(shape // 4, ctrl), shape)
    b = ndi.zoom(coarse, mid / ctrl, order=3, mode="nearest", grid_mode=False)
    b = _upsample_linear(b.astype(np.float32), tuple(shape))
    b -= b.mean()
    sd = b.std()
    if sd > 0:
        b *= strength / sd
    return np.exp(b).astype(np.float32)


def _upsample_linear(a: np.ndarray, shape) -> np.ndarray:
    if a.shape == tuple(shape):
        return a
    import torch

    with torch.no_grad():
        t = torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(a))[None, None], size=tuple(shape),
                                            mode="trilinear", align_corners=True)
    return t[0, 0].numpy()


def add_rician_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of (image + N(0, sigma)) + i N(0, sigma)."""
    if sigma <= 0:
        return image.astype(np.float32)
    re = rng.standard_normal(image.shape, dtype=np.float32)
    re *= np.float32(sigma)
    re += image
    im = rng.standard_normal(image.shape, dtype=np.float32)
    im *= np.float32(sigma)
    return np.hypot(re, im).astype(np.float32)


def simulate(phantom: Phantom, protocol_or_params, rng: np.random.Generator, *, voxel_size=None,
             orientation: str | None = None, bias: bool = True, noise: bool = True,
             snr: float | None = None, psf_fwhm: float = 0.0) -> Simulation:
    """Simulate one image of ``phantom``; see the module docstring for the model."""
    protocol = protocol_or_params if isinstance(protocol_or_params, Protocol) else protocol_from_params(protocol_or_params)
    if voxel_size is None:
        voxel_size = protocol.voxel_size
    if isinstance(voxel_size, str) and voxel_size == "native":
        grid = phantom
    else:
        vs = (float(voxel_size),) * 3 if np.isscalar(voxel_size) else tuple(float(v) for v in voxel_size)
        target = ras_to_array_axes(vs, phantom.affine)
        grid = phantom if np.allclose(target, phantom.voxel_size) else phantom.resample(vs)
    signed = tissue_signals(grid, protocol)
    clean = np.abs(point_spread(mix_signals(grid.fractions, signed, magnitude=False), psf_fwhm, grid.voxel_size))
    if bias and protocol.bias > 0:
        field_ = random_bias_field(grid.shape, rng, protocol.bias, grid.voxel_size)
    else:
        field_ = np.ones(grid.shape, np.float32)
    biased = clean * field_
    mask = grid.brain_mask
    ref = float(clean[mask].mean()) if mask.any() else float(clean[clean > 0].mean() if (clean > 0).any() else 1.0)
    sigma = ref / float(snr or protocol.snr) if noise else 0.0
    data = add_rician_noise(biased, sigma, rng) if noise else biased.astype(np.float32)
    axcodes = orientation or protocol.orientation
    truth = grid.reorient(axcodes)  # a new Phantom (a copy when no reorientation is needed)
    data = _reorient_like(data, grid.affine, axcodes)
    field_ = _reorient_like(field_, grid.affine, axcodes)
    img = truth.to_image(data.astype(np.float32))
    signals = {c: float(s) for c, s in zip(grid.classes, signed)}
    return Simulation(img, truth, protocol, field_, sigma, signals)


def tissue_signals(phantom: Phantom, protocol: Protocol) -> np.ndarray:
    """Signed signal of each of the phantom's pure tissues, scaled as the scanner's receiver does.

    Real scanners set the receiver gain so that images fill their range; here the brightest pure brain
    tissue (CSF, GM or WM) gets intensity ``protocol.gain`` (the equation's own scale is arbitrary:
    an SPGR with flip 90 and TR 7.9 ms yields ~0.5 % of PD).
    """
    tab = phantom.property_table(protocol.field_strength)
    prm = dict(protocol.params(), gain=1.0)
    signed = np.asarray(equations.signal(protocol.sequence, tab[:, 0], tab[:, 1], tab[:, 2], tab[:, 3], prm,
                                         magnitude=False), dtype=np.float64)
    ref = max(abs(signed[i]) for i, c in enumerate(phantom.classes) if c in (*TISSUE.names, "ventricles"))
    return signed * (protocol.gain / ref if ref > 0 else protocol.gain)


def _reorient_like(arr: np.ndarray, affine: np.ndarray, axcodes: str) -> np.ndarray:
    cur = nib.orientations.io_orientation(affine)
    tr = nib.orientations.ornt_transform(cur, nib.orientations.axcodes2ornt(tuple(axcodes.upper())))
    return np.ascontiguousarray(nib.orientations.apply_orientation(arr, tr))


# ---------------------------------------------------------------------------------------- torch path
def _batch_param(v, torch, ref):
    if isinstance(v, torch.Tensor):
        v = v.to(dtype=ref.dtype, device=ref.device)
        return v.reshape(-1, 1) if v.ndim == 1 else v
    return v


def simulate_torch(fractions, props, sequence: str, params, *, gain=1.0, bias_field=None, noise_sigma=None,
                   generator=None):
    """Differentiable image synthesis from fraction maps (same equations as :func:`simulate`)."""
    import torch

    squeeze = fractions.ndim == 4
    if squeeze:
        fractions = fractions[None]
    props = torch.as_tensor(props, dtype=fractions.dtype, device=fractions.device)
    if props.ndim == 2:
        props = props[None]
    p = equations._normalise_params(params)
    p = {k: _batch_param(v, torch, fractions) for k, v in p.items()}
    p["gain"] = _batch_param(gain if not isinstance(gain, (int, float)) else torch.tensor(float(gain)), torch,
                             fractions)
    s = equations.signal(sequence, props[..., 0], props[..., 1], props[..., 2], props[..., 3], p, magnitude=False)
    s = s.reshape(-1, s.shape[-1])
    b = max(fractions.shape[0], s.shape[0])
    if b > 1:
        squeeze = False
    img = torch.einsum("bc...,bc->b...", fractions.expand((b,) + fractions.shape[1:]),
                       s.to(fractions.dtype).expand(b, -1)).abs()
    if bias_field is not None:
        img = img * bias_field
    if noise_sigma is not None:
        img = rician_noise_torch(img, noise_sigma, generator)
    return img[0] if squeeze else img


def bias_field_torch(shape, strength, generator=None, batch: int = 1, control: int = 4, dtype=None, device=None):
    """Smooth multiplicative fields exp(b), std(b) ~ ``strength`` (float or (B,) tensor)."""
    import torch

    dtype = dtype or torch.get_default_dtype()
    coarse = torch.randn((batch, 1, control, control, control), generator=generator, dtype=dtype, device=device)
    b = torch.nn.functional.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[:, 0]
    b = b - b.mean(dim=(1, 2, 3), keepdim=True)
    b = b / b.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    st = torch.as_tensor(strength, dtype=dtype, device=device).reshape(-1, 1, 1, 1)
    return torch.exp(b * st)


def rician_noise_torch(image, sigma, generator=None):
    """Rician noise: |image + n_re + i n_im|, ``sigma`` float or (B,) tensor."""
    import torch

    sig = torch.as_tensor(sigma, dtype=image.dtype, device=image.device)
    if sig.ndim == 1:
        sig = sig.reshape((-1,) + (1,) * (image.ndim - 1))
    re = image + sig * torch.randn(image.shape, generator=generator, dtype=image.dtype, device=image.device)
    im = sig * torch.randn(image.shape, generator=generator, dtype=image.dtype, device=image.device)
    return torch.sqrt(re * re + im * im)
