"""Physics-aware GM/WM/CSF segmentation of a preprocessed T1-weighted image.

Sequence-parameter vector (one layout for every family, :data:`PARAMETER_LAYOUT`)
---------------------------------------------------------------------------------
The physics branch sees the parameters the static signal equations use and their negative
exponentials (paper, sections 2.3 and 3.4), in fixed units so the same number always means the same
physics:

* ``family_MPRAGE``, ``family_SPGR``: one-hot sequence family;
* ``TI`` in seconds and ``exp(-TI / 1 s)``;
* ``TRinv``, the MPRAGE inversion-to-inversion time (TI + TD + tau of eq. 2; BIDS
  RepetitionTimePreparation, or RepetitionTime of an MPRAGE sidecar when it exceeds TI), in seconds,
  and ``exp(-TRinv / 1 s)``;
* ``TR`` (SPGR excitation repetition time) in seconds and ``exp(-TR / 1 s)``. T1-governed times are
  scaled by a typical brain T1 of 1 s, so ``exp(-TR/1 s)`` is close to the E1 of eq. 1;
* ``TE / 50 ms`` and ``exp(-TE / 50 ms)`` (TE is governed by T2*, about 50 ms in brain at 3 T);
* ``FA`` in radians and ``sin(FA)``;
* ``B0 / 3 T``;
* a 0/1 ``has_*`` mask after each parameter group; a missing parameter has value slots 0 and mask 0.

MPRAGE uses TI (required), TRinv and B0 (optional); its TE and flip angle are left out because eq. 2
has no TE/FA term. SPGR uses TR, TE and FA (required) and B0 (optional). Optional parameters are
dropped at random during training, so a sidecar without MagneticFieldStrength (or without an MPRAGE
TR) still gets the physics model. The network standardises the vector with fixed per-slot
centre/scale buffers computed from the training parameter distribution.

Fallback
--------
The physics model is used only when the family is MPRAGE or SPGR, every required parameter is present
and lies within the training range widened by a factor 1.25 either way (:data:`TRAINING_RANGES`).
Otherwise the same U-Net trained without the physics branch (``tissue_unet``) segments the image,
the method is reported as ``unet`` instead of ``unet-physics``, and the reason is returned in
:attr:`TissueResult.fallback_reason` for the sidecar and report.

Resolution
----------
The shipped models work at 2 mm isotropic (``card["resolution_mm"]``) so they train and run on a
CPU: the image (multiplied by the mask) and the mask are box-averaged to 2 mm (exact voxel overlaps,
as the training images' tissue fractions are; the 2 mm mask is where more than half of a voxel is
brain), intensities are z-scored inside the brain mask, the softmax probabilities are
computed with MONAI's sliding-window inference (each window averaged with its mirror images along
``card["inference_mirror_axes"]``, the axes flipped in training) and resampled back to the input grid (linear), then
set to zero outside the mask. A 2 mm grid cannot place a boundary finer than itself, so these
probabilities are then the prior of an intensity fit at the input's own resolution
(:mod:`bidsapp.models.intensity_refine`) when its voxels are finer than the model's
(:data:`REFINE_BELOW`; ``refine=False`` skips it). dseg is the arg-max inside the mask
(CSF=1, GM=2, WM=3); volumes count its voxels.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from bidsapp.bids.acquisition import FAMILY_PARAMETERS, lookup
from bidsapp.devices import autocast, resolve_device
from bidsapp.labels import TISSUE, tissue_volumes_mm3
from bidsapp.physics.contrast import csf_inverted, low_contrast_warning, wm_gm_signal_ratio

from . import registry
from .mirroring import mirrored

CLASSES = TISSUE.names
"""Output channels of the tissue models, in dseg order (label = index + 1)."""

PHYSICS_MODEL = "tissue_unet_physics"
BASE_MODEL = "tissue_unet"

TE_SCALE_S = 0.05
T1_SCALE_S = 1.0
B0_SCALE_T = 3.0

PARAMETER_LAYOUT = (
    "family_MPRAGE", "family_SPGR",
    "TI_s", "exp_neg_TI", "has_TI",
    "TRinv_s", "exp_neg_TRinv", "has_TRinv",
    "TR_s", "exp_neg_TR", "has_TR",
    "TE_over_50ms", "exp_neg_TE_over_50ms", "has_TE",
    "FA_rad", "sin_FA", "has_FA",
    "B0_over_3T", "has_B0",
)
N_PARAMS = len(PARAMETER_LAYOUT)
_SLOT = {name: PARAMETER_LAYOUT.index(name) for name in PARAMETER_LAYOUT}


TRAINING_RANGES = {
    "InversionTime": (0.6, 1.2),            # s   (paper 3.3)
    "InversionRepetitionTime": (1.2, 3.0),  # s   TD 600 ms of the paper up to clinical MPRAGE (TR 2.3-2.8 s)
    "RepetitionTime": (0.005, 0.1),         # s   paper 15-100 ms, extended down to fast clinical SPGR
    "EchoTime": (0.002, 0.01),              # s   paper 4-10 ms, extended down to 2 ms
    "FlipAngle": (5.0, 90.0),               # deg paper 15-75, extended to 5-90
    "MagneticFieldStrength": (1.5, 7.0),    # T
}
RANGE_TOLERANCE = 1.25
REFINE_BELOW = 0.5
"""The intensity refinement runs when the input's voxels are at most this fraction of the model's
(1 mm and 0.9x0.9x3 mm clinical voxels are; the model's own 2 mm grid is not: there the network
already sees every voxel, and refitting its partial-volume voxels by intensity made the volumes
follow the contrast, GM CoV over the MPRAGE sweep 5 % instead of 0.3 %)."""


def voxel_mm3(zooms) -> float:
    """Volume of one voxel of size ``zooms`` (mm; the first three)."""
    return float(np.prod([float(z) for z in zooms[:3]]))


def refinement_applies(zooms, resolution_mm: float) -> bool:
    """Whether an input with voxel size ``zooms`` gets the intensity refinement (:data:`REFINE_BELOW`)."""
    return voxel_mm3(zooms) <= REFINE_BELOW * float(resolution_mm) ** 3


def volumes_from_fractions(zooms, resolution_mm: float, refined: bool) -> bool:
    """Whether the tissue volumes are the maps' sums rather than the labels' voxel counts
    (:func:`bidsapp.labels.tissue_volumes_mm3`): always after the refinement (its maps are fractions),
    and on voxels finer than the model's without it (thick slices, e.g. 1 x 1 x 5 mm). The networks
    learned the 2 mm grid's tissue fractions, so their probabilities interpolated to a finer voxel are
    its expected fractions; counting the labels there read GM a third high on a real head in 1 x 1 x 5 mm
    slices (summed: a sixth) and a quarter high on simulated heads in 5 mm slabs (summed: a sixth, the
    two scanners of a head as close). On the model's own grid or coarser the labels are counted: on the
    demo's 2 mm sessions summing read GM -17 % against -6 %."""
    return refined or voxel_mm3(zooms) < float(resolution_mm) ** 3


def coarse_voxels_warning(zooms, resolution_mm: float, summed: bool) -> str:
    """What a user should know when the refinement could not run: how the volumes were read and how far
    off that reading was on a real head whose 1 mm scan it reads right (``benchmarks/tissue/resolutions.py``)."""
    how, off = (("probabilities summed", "a sixth high and WM a sixth low in 1 x 1 x 5 mm slices") if summed else
                ("labels counted", "a quarter to a third high and WM a fifth low at 2 mm"))
    return (f"voxels of {voxel_mm3(zooms):.1f} mm3 are too coarse for the intensity refinement (it needs at most "
            f"{REFINE_BELOW * float(resolution_mm) ** 3:g} mm3): the volumes are the {resolution_mm:g} mm network's "
            f"{how}, which read GM {off} on a real head (docs/tissue-segmentation.md, Limits)")


@dataclass
class ParameterVector:
    """What the physics branch gets for one image, and why."""

    values: np.ndarray | None
    """float32 vector laid out as :data:`PARAMETER_LAYOUT`; None when the physics model cannot be used."""
    family: str
    used: dict = field(default_factory=dict)
    """BIDS name -> value (BIDS units) that went into the vector."""
    ignored: dict = field(default_factory=dict)
    """Parameters present but not used, with the reason."""
    missing: list = field(default_factory=list)
    fallback_reason: str | None = None
    wm_gm_ratio: float | None = None
    """WM/GM signal ratio the sidecar's parameters give pure tissues (:mod:`bidsapp.physics.contrast`);
    None without a family, its equation's parameters and the field strength."""
    parameters_from: str | None = None
    """The image whose sidecar gave the parameters when this image's own lacked them (:mod:`bidsapp.bids.borrow`)."""
    csf_inverted: bool | None = None
    """Whether the parameters put CSF's signal opposite to the tissues' (:func:`~bidsapp.physics.contrast.csf_inverted`);
    None when the ratio is None."""


_PARAMETERS = ("InversionTime", "RepetitionTime", "EchoTime", "FlipAngle", "MagneticFieldStrength",
               "RepetitionTimePreparation")
"""Sequence parameters the physics model reads (BIDS names; an acquisition dict may use either vocabulary)."""


def _get(acq: dict, name: str):
    v = lookup(acq, name)
    if v is None:
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None
    return None


def _family(acq: dict) -> str:
    fam = acq.get("sequence_family") or acq.get("SequenceFamily") or acq.get("family")
    return str(fam).upper() if fam else "UNKNOWN"


def _in_range(name: str, v: float) -> bool:
    lo, hi = TRAINING_RANGES[name]
    return lo / RANGE_TOLERANCE <= v <= hi * RANGE_TOLERANCE


def encode(family: str, TI=None, TRinv=None, TR=None, TE=None, FA=None, B0=None) -> np.ndarray:
    """Raw vector from parameters in BIDS units (s, deg, T); None marks a missing value."""
    return encode_batch([family], TI=[TI], TRinv=[TRinv], TR=[TR], TE=[TE], FA=[FA], B0=[B0])[0]


def encode_batch(family, TI=None, TRinv=None, TR=None, TE=None, FA=None, B0=None) -> np.ndarray:
    """Vectorised :func:`encode`: sequences of equal length; None or NaN marks a missing value."""
    family = np.asarray(family)
    n = family.shape[0]
    out = np.zeros((n, N_PARAMS), dtype=np.float32)
    out[:, _SLOT["family_MPRAGE"]] = family == "MPRAGE"
    out[:, _SLOT["family_SPGR"]] = family == "SPGR"

    def values(x):
        if x is None:
            return np.full(n, np.nan)
        return np.array([np.nan if v is None else float(v) for v in np.ravel(np.asarray(x, dtype=object))])

    def put(first: str, x, fn_value, fn_second):
        x = values(x)
        ok = np.isfinite(x)
        xs = np.where(ok, x, 0.0)
        i = _SLOT[first]
        out[:, i] = np.where(ok, fn_value(xs), 0)
        out[:, i + 1] = np.where(ok, fn_second(xs), 0)
        out[:, i + 2] = ok

    put("TI_s", TI, lambda t: t / T1_SCALE_S, lambda t: np.exp(-t / T1_SCALE_S))
    put("TRinv_s", TRinv, lambda t: t / T1_SCALE_S, lambda t: np.exp(-t / T1_SCALE_S))
    put("TR_s", TR, lambda t: t / T1_SCALE_S, lambda t: np.exp(-t / T1_SCALE_S))
    put("TE_over_50ms", TE, lambda t: t / TE_SCALE_S, lambda t: np.exp(-t / TE_SCALE_S))
    put("FA_rad", FA, np.radians, lambda a: np.sin(np.radians(a)))
    b = values(B0)
    ok = np.isfinite(b)
    out[:, _SLOT["B0_over_3T"]] = np.where(ok, np.where(ok, b, 0) / B0_SCALE_T, 0)
    out[:, _SLOT["has_B0"]] = ok
    return out


def _expected_contrast(family: str, v: dict) -> tuple[float | None, bool | None]:
    """(WM/GM signal ratio of pure tissues, CSF inverted) for the parameters ``v`` (BIDS names) of
    ``family``; None when the equation lacks a parameter or the field strength is unknown (both depend on it)."""
    if family == "MPRAGE":
        params = {"ti": v["InversionTime"], "tr": v["InversionRepetitionTime"], "tau": 0.0}
    elif family == "SPGR":
        params = {"tr": v["RepetitionTime"], "te": v["EchoTime"], "flip_angle": v["FlipAngle"]}
    else:
        return None, None
    if v["MagneticFieldStrength"] is None or any(x is None for x in params.values()):
        return None, None
    try:
        return (wm_gm_signal_ratio(family, params, v["MagneticFieldStrength"]),
                csf_inverted(family, params, v["MagneticFieldStrength"]))
    except (ValueError, KeyError):  # a field strength outside the tissue tables, etc.
        return None, None


def parameter_vector(acquisition: dict | None) -> ParameterVector:
    """Build the physics vector from an acquisition dict (BIDS names or AcquisitionRecord fields).

    The dict needs the sequence family (``sequence_family``, as the acquisition record infers it).
    Never raises: when the physics model cannot be used, ``values`` is None and ``fallback_reason``
    says why.
    """
    acq = dict(acquisition or {})
    fam = _family(acq)
    pv = ParameterVector(values=None, family=fam, parameters_from=acq.get("parameters_from"))
    present = {n: _get(acq, n) for n in _PARAMETERS}
    # MPRAGE inversion-to-inversion time: RepetitionTimePreparation, else an MPRAGE RepetitionTime > TI
    trinv = present.pop("RepetitionTimePreparation")
    if fam == "MPRAGE":
        tr = present.pop("RepetitionTime")
        ti = present["InversionTime"]
        if trinv is None and tr is not None:
            if ti is not None and tr > ti:
                trinv = tr
            else:
                pv.ignored["RepetitionTime"] = f"{tr:g} (shorter than TI: an excitation TR, not the inversion TR)"
    present["InversionRepetitionTime"] = trinv
    pv.wm_gm_ratio, pv.csf_inverted = _expected_contrast(fam, present)
    if fam not in FAMILY_PARAMETERS:
        pv.fallback_reason = f"sequence family {fam} is not one the physics model was trained on (MPRAGE, SPGR)"
        pv.ignored.update({k: v for k, v in present.items() if v is not None})
        return pv
    spec = FAMILY_PARAMETERS[fam]
    wanted = spec["required"] + spec["optional"]
    for name, v in present.items():
        if v is not None and name not in wanted:
            pv.ignored[name] = f"{v:g} (not an input of the {fam} model)"
    pv.missing = [n for n in wanted if present[n] is None]
    req_missing = [n for n in spec["required"] if present[n] is None]
    if req_missing:
        pv.fallback_reason = f"{fam} sidecar lacks {', '.join(req_missing)}"
        return pv
    bad = [f"{n}={present[n]:g}" for n in spec["required"] if not _in_range(n, present[n])]
    if bad:
        pv.fallback_reason = (f"{', '.join(bad)} outside the physics model's training range "
                              f"({'; '.join(f'{n} {TRAINING_RANGES[n][0]:g}-{TRAINING_RANGES[n][1]:g}' for n in spec['required'])})")
        return pv
    used = {n: present[n] for n in spec["required"]}
    for name in spec["optional"]:
        v = present[name]
        if v is None:
            continue
        if _in_range(name, v):
            used[name] = v
        else:
            pv.ignored[name] = f"{v:g} (outside the training range; treated as missing)"
    pv.used = used
    pv.values = encode(fam, TI=used.get("InversionTime"), TRinv=used.get("InversionRepetitionTime"),
                       TR=used.get("RepetitionTime"), TE=used.get("EchoTime"), FA=used.get("FlipAngle"),
                       B0=used.get("MagneticFieldStrength"))
    return pv


# ---------------------------------------------------------------------------------------------
# model loading
# ---------------------------------------------------------------------------------------------
_CACHE: dict = {}


def build_model(card_or_arch: dict):
    """Instantiate the network described by a model card's ``architecture`` entry."""
    from .unet import UNet3D

    arch = card_or_arch.get("architecture", card_or_arch)
    if arch.get("class", "UNet3D") != "UNet3D":
        raise ValueError(f"unknown tissue architecture {arch.get('class')}")
    return UNet3D(**arch["kwargs"])


def load_model(name: str, device="cpu", weights_dir=None):
    """(model in eval mode on ``device``, card); weights are sha256-checked and cached per process."""
    key = (name, str(device), str(weights_dir))
    if key not in _CACHE:
        state, card = registry.load_state_dict(name, weights_dir)
        model = build_model(card)
        model.load_state_dict(state)
        model.eval().to(device)
        _CACHE[key] = (model, card)
    return _CACHE[key]


# ---------------------------------------------------------------------------------------------
# resampling and normalisation
# ---------------------------------------------------------------------------------------------
def to_ras(data: np.ndarray, affine) -> tuple[np.ndarray, np.ndarray]:
    """``data`` in RAS voxel order (axes permuted and flipped, never resampled, so any of the 48
    orientations maps back exactly with :func:`from_ras`) and the nibabel orientation that did it."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    return nib.orientations.apply_orientation(data, ornt), ornt


def from_ras(data: np.ndarray, ornt) -> np.ndarray:
    """Undo :func:`to_ras` for an array computed on its RAS voxel grid."""
    import nibabel as nib

    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    return np.ascontiguousarray(nib.orientations.apply_orientation(data, back))


def ras_zooms(zooms, ornt) -> np.ndarray:
    """Voxel sizes along the axes of ``nibabel.orientations.apply_orientation(data, ornt)``: output axis
    ``j`` is input axis ``argsort(ornt[:, 0])[j]`` (indexing by ``ornt[:, 0]`` itself is right only when the
    axes are swapped, not cycled, as in a sagittal acquisition stored A-S-L)."""
    return np.asarray(zooms[:3], float)[np.argsort(np.asarray(ornt)[:, 0])]


def resample_to(volume: np.ndarray, zooms, target_mm: float) -> np.ndarray:
    """Resample a 3D array from voxel size ``zooms`` to isotropic ``target_mm`` over the same field of view.

    Downsampling averages the exact overlap of input and output voxels (what the training images are:
    box-averaged tissue fractions); upsampling interpolates linearly.
    """
    zooms = np.asarray(zooms[:3], dtype=float)
    shape = np.maximum(1, np.round(np.asarray(volume.shape) * zooms / target_mm)).astype(int)
    out = np.asarray(volume, dtype=np.float32)
    for ax in range(3):
        if shape[ax] < out.shape[ax]:
            out = _box_average(out, ax, int(shape[ax]))
    if np.any(np.asarray(out.shape) != shape):
        out = resample_shape(out, shape, order=1)
    return out


def _box_average(a: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """Average along ``axis`` onto ``n_out`` equal bins spanning the same extent (exact overlaps)."""
    n_in = a.shape[axis]
    f = n_in / n_out
    i = np.arange(n_out)[:, None]
    j = np.arange(n_in)[None, :]
    w = (np.clip(np.minimum((i + 1) * f, j + 1) - np.maximum(i * f, j), 0, None) / f).astype(np.float32)
    moved = np.moveaxis(a, axis, 0)
    out = w @ moved.reshape(n_in, -1)
    return np.ascontiguousarray(np.moveaxis(out.reshape((n_out,) + moved.shape[1:]), 0, axis))


def resample_shape(volume: np.ndarray, shape, order: int = 1) -> np.ndarray:
    """Interpolate to ``shape`` covering the same field of view (grid_mode: voxel edges aligned)."""
    from scipy import ndimage

    vol = np.asarray(volume, dtype=np.float32)
    factors = np.asarray(shape, dtype=float) / np.asarray(vol.shape, dtype=float)
    if np.allclose(factors, 1):
        return vol.astype(np.float32, copy=False)
    out = ndimage.zoom(vol, factors, order=order, mode="grid-constant" if order == 0 else "nearest",
                       grid_mode=True, prefilter=False)
    if out.shape != tuple(shape):  # zoom rounds; pad/crop the last voxel if needed
        fixed = np.zeros(shape, dtype=out.dtype)
        sl = tuple(slice(0, min(a, b)) for a, b in zip(out.shape, shape))
        fixed[sl] = out[sl]
        out = fixed
    return out.astype(np.float32, copy=False)


def intensity_window(values: np.ndarray) -> tuple[float, float, float, float]:
    """(lo, hi, mean, sd) of brain intensities: the 0.5-99.5 percentile clip and the clipped z-score."""
    lo, hi = np.percentile(values, [0.5, 99.5])
    vals = np.clip(values, lo, hi)
    return lo, hi, float(vals.mean()), float(vals.std()) or 1.0


def normalise(image: np.ndarray, mask: np.ndarray, window: tuple | None = None) -> np.ndarray:
    """Z-score inside the brain mask (scanner gain and offset removed), zero outside, clipped to +-6.

    ``window`` (:func:`intensity_window`) gives statistics of the whole brain when ``image`` is only a
    patch of it (training simulates patches); by default they come from ``image`` itself."""
    m = mask > 0
    out = np.zeros_like(image, dtype=np.float32)
    if window is None:
        if m.sum() < 2:
            return out
        window = intensity_window(image[m])
    lo, hi, mu, sd = window
    out[m] = np.clip((np.clip(image[m], lo, hi) - mu) / sd, -6, 6)
    return out


def prepare(image: np.ndarray, mask: np.ndarray, zooms, res: float) -> tuple[np.ndarray, np.ndarray]:
    """(normalised image, boolean mask) at the model resolution ``res`` mm."""
    mask_b = np.asarray(mask) > 0
    img = np.asarray(image, dtype=np.float32)
    if np.allclose(zooms[:3], res, atol=1e-3):
        return normalise(img, mask_b), mask_b
    img_r = resample_to(img * mask_b, zooms, res)
    mask_r = resample_to(mask_b.astype(np.float32), zooms, res) > 0.5
    return normalise(img_r, mask_r), mask_r


# ---------------------------------------------------------------------------------------------
# inference
# ---------------------------------------------------------------------------------------------
@dataclass
class TissueResult:
    probs: np.ndarray
    """float32 (3, X, Y, Z) probabilities of CSF, GM, WM on the input grid (0 outside the mask)."""
    dseg: np.ndarray
    """uint8 (X, Y, Z): 0 background, 1 CSF, 2 GM, 3 WM."""
    volumes_mm3: dict
    method: str
    """``unet-physics`` or ``unet`` (fallback/ablation)."""
    model: dict
    """name, version, sha256 of the weights used."""
    parameters: ParameterVector
    device: str
    seconds: float
    warnings: list = field(default_factory=list)
    refinement: dict | None = None
    """The intensity fit of :mod:`~bidsapp.models.intensity_refine` (None: the network's probabilities as they are)."""
    volumes_summed: bool = False
    """Whether ``volumes_mm3`` sums the maps (:func:`volumes_from_fractions`) or counts the labels."""
    volumes_warning: str | None = None
    """:func:`coarse_voxels_warning` where the refinement was asked for and could not run."""

    @property
    def fallback_reason(self) -> str | None:
        return self.parameters.fallback_reason


def channel_softmax(logits):
    """Softmax over the class axis (1) written out element-wise.

    ``torch.softmax`` over a non-last axis splits its vectorised loop at thread boundaries, so the
    probabilities changed in their last bits with the thread count (``--omp-nthreads``); element-wise
    operations and a three-term reduction per voxel do not.
    """
    e = (logits - logits.amax(dim=1, keepdim=True)).exp()
    return e / e.sum(dim=1, keepdim=True)


def predict_probs(model, image: np.ndarray, mask: np.ndarray, params: np.ndarray | None,
                  device, roi: int = 64, overlap: float = 0.5, sw_batch_size: int = 8,
                  mirror_axes=()) -> np.ndarray:
    """Softmax (3, ...) of a normalised image at model resolution (cropped to the mask's box)."""
    import torch
    from monai.inferers import sliding_window_inference

    out = np.zeros((len(CLASSES),) + image.shape, dtype=np.float32)
    idx = np.nonzero(mask)
    if len(idx[0]) == 0:
        return out
    margin = 4
    box = tuple(slice(max(0, int(i.min()) - margin), min(s, int(i.max()) + margin + 1))
                for i, s in zip(idx, image.shape))
    crop = image[box]
    div = model.divisor
    pad = [(0, (-s) % div) for s in crop.shape]
    x = torch.from_numpy(np.pad(crop, pad))[None, None].to(device)
    p = None if params is None else torch.as_tensor(params, dtype=torch.float32).reshape(1, -1).to(device)
    roi_size = [min(roi, s) if s % div == 0 else roi for s in x.shape[2:]]
    roi_size = [r - r % div if r % div else r for r in roi_size]
    def predictor(window):  # windows are blended as probabilities
        return channel_softmax(model(window, p).float() if model.uses_physics else model(window).float())

    with torch.inference_mode(), autocast(device):
        prob = sliding_window_inference(x, roi_size, sw_batch_size, mirrored(predictor, mirror_axes),
                                        overlap=overlap, mode="gaussian")[0].cpu().numpy()
    sl = tuple(slice(0, s) for s in crop.shape)
    out[(slice(None),) + box] = prob[(slice(None),) + sl]
    return out


def segment(image: np.ndarray, mask: np.ndarray, zooms, acquisition: dict | None = None, *,
            device: str = "auto", use_physics: bool = True, weights_dir=None, refine: bool = True) -> TissueResult:
    """Segment a preprocessed (bias-corrected) T1w volume inside its brain mask.

    ``acquisition`` gives the sequence family and parameters (see :func:`parameter_vector`);
    ``use_physics=False`` forces the no-physics model (the ablation); ``refine=False`` keeps the
    network's interpolated probabilities (:mod:`bidsapp.models.intensity_refine` otherwise).
    """
    t0 = time.perf_counter()
    dev = resolve_device(device)
    pv = parameter_vector(acquisition)
    warnings = []
    if not use_physics and pv.values is not None:
        pv.fallback_reason = "physics model disabled by the caller"
        pv.values = None
    name = PHYSICS_MODEL if pv.values is not None else BASE_MODEL
    if pv.fallback_reason and use_physics:
        warnings.append(f"tissue model: using the no-physics U-Net because {pv.fallback_reason}")
    if pv.wm_gm_ratio is not None and (msg := low_contrast_warning(pv.wm_gm_ratio)):
        warnings.append(f"tissue model: {msg}")
    model, card = load_model(name, dev, weights_dir)
    res = float(card.get("resolution_mm", 2.0))
    mask_b = np.asarray(mask) > 0
    img = np.asarray(image, dtype=np.float32)
    zooms = tuple(float(z) for z in zooms[:3])
    native = np.allclose(zooms, res, atol=1e-3)
    x, mask_r = prepare(img, mask_b, zooms, res)
    probs_r = predict_probs(model, x, mask_r, pv.values, dev, roi=int(card.get("inference_roi", 64)),
                            overlap=float(card.get("inference_overlap", 0.5)),
                            mirror_axes=tuple(card.get("inference_mirror_axes", ())))
    if native:
        probs = probs_r
    else:
        probs = np.stack([resample_shape(p, img.shape, order=1) for p in probs_r])
    probs *= mask_b[None]
    tot = probs.sum(0, keepdims=True)
    probs = np.where(tot > 0, probs / np.maximum(tot, 1e-8), 0).astype(np.float32)
    fit = None
    if refine and refinement_applies(zooms, res):
        from .intensity_refine import refine as refine_probs

        probs, fit = refine_probs(img, mask_b, probs, csf_sign=-1.0 if pv.csf_inverted else 1.0, tissue_split="auto")
    dseg = np.where(mask_b, probs.argmax(0) + 1, 0).astype(np.uint8)
    summed = volumes_from_fractions(zooms, res, fit is not None)
    coarse = coarse_voxels_warning(zooms, res, summed) if refine and fit is None else None
    if coarse:
        warnings.append(f"tissue model: {coarse}")
    volumes = tissue_volumes_mm3(probs, mask_b, voxel_mm3(zooms), fractions=summed)
    method = "unet-physics" if name == PHYSICS_MODEL else "unet"
    return TissueResult(probs=probs, dseg=dseg, volumes_mm3=volumes, method=method,
                        model={**registry.result_model(card, dev), "resolution_mm": res},
                        parameters=pv, device=str(dev), seconds=time.perf_counter() - t0, warnings=warnings,
                        refinement=None if fit is None else fit.to_dict(), volumes_summed=summed,
                        volumes_warning=coarse)


def sweep_volumes(image: np.ndarray, mask: np.ndarray, zooms, acquisition: dict, parameter: str, values, *,
                  device: str = "auto", weights_dir=None, chunk: int = 16) -> np.ndarray:
    """Soft CSF/GM/WM volumes (mm^3, shape ``(len(values), 3)``) of one image segmented by the physics
    model as if ``parameter`` (a BIDS name, e.g. ``InversionTime``) had each of ``values``.

    Windows are the same as :func:`segment`'s; each window is run for ``chunk`` values at a time,
    sharing the parameter-free part of the network where it has one
    (:meth:`~bidsapp.models.unet.UNet3D.forward_each`). No test-time mirroring: the sweep is read
    as volumes relative to each other, and the mirror image's view noise is the same for every value
    (on a demo session its curves moved by at most 0.04 % without it, in less than half the time).
    Raises ValueError when a hypothetical acquisition cannot use the physics model.
    """
    import torch
    from monai.inferers import sliding_window_inference

    dev = resolve_device(device)
    model, card = load_model(PHYSICS_MODEL, dev, weights_dir)
    res = float(card.get("resolution_mm", 2.0))
    x, mask_r = prepare(image, mask, tuple(float(z) for z in zooms[:3]), res)
    vectors = []
    for v in values:
        pv = parameter_vector({**acquisition, parameter: float(v)})
        if pv.values is None:
            raise ValueError(f"cannot bridge with {parameter}={v:g}: {pv.fallback_reason}")
        vectors.append(pv.values)
    out = np.zeros((len(vectors), len(CLASSES)))
    idx = np.nonzero(mask_r)
    if len(idx[0]) == 0:
        return out
    box = tuple(slice(max(0, int(i.min()) - 4), min(s, int(i.max()) + 5)) for i, s in zip(idx, x.shape))
    div = model.divisor
    pad = [(0, (-(b.stop - b.start)) % div) for b in box]
    xt = torch.from_numpy(np.pad(x[box], pad))[None, None].to(dev)
    mt = torch.from_numpy(np.pad(mask_r[box], pad)).to(dev)
    roi = int(card.get("inference_roi", 64))
    roi_size = [min(roi, s) - min(roi, s) % div or div for s in xt.shape[2:]]
    n_cls = len(CLASSES)
    with torch.inference_mode(), autocast(dev):
        for start in range(0, len(vectors), chunk):
            params = torch.from_numpy(np.stack(vectors[start:start + chunk])).to(dev)

            def predictor(window, params=params):
                logits = model.forward_each(window, params).float()
                return torch.cat([channel_softmax(z) for z in logits.split(n_cls, dim=1)], dim=1)

            prob = sliding_window_inference(xt, roi_size, 8, predictor,
                                            overlap=float(card.get("inference_overlap", 0.5)), mode="gaussian")[0]
            prob = prob.reshape(params.shape[0], n_cls, *prob.shape[1:])
            out[start:start + params.shape[0]] = (prob * mt).sum(dim=(2, 3, 4)).cpu().numpy() * res ** 3
    return out
