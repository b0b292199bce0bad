"""Static MRI signal equations (physics-informed segmentation paper, section 2.1).

Every function is vectorised and backend-agnostic: pass numpy arrays / Python floats, or torch tensors
(anything broadcastable).  If any argument is a torch tensor the computation runs in torch (same dtype
and device as that tensor, differentiable), otherwise in numpy.  Times are in seconds, flip angles in
degrees, exactly as in BIDS sidecars.

The equations return the *signed* steady-state signal (longitudinal magnetisation weighting); inversion
sequences are negative before the null point.  Magnitude images are ``abs`` of it, which is what
:func:`signal` returns by default and what the simulator writes.

Public API
----------
``spgr(pd, t1, t2s, tr, te, flip_angle, gain=1.0)``
    Spoiled gradient echo, paper eq. 1:
    ``G PD sin(a) (1 - E1) / (1 - cos(a) E1) exp(-TE/T2*)``, ``E1 = exp(-TR/T1)``.
``mprage(pd, t1, ti, td, tau, gain=1.0)``
    MPRAGE, paper eq. 2 exactly: ``G PD (1 - 2 exp(-TI/T1) / (1 + exp(-(TI + TD + tau)/T1)))``.
``spin_echo(pd, t1, t2, tr, te, gain=1.0)``
    Spin echo / turbo spin echo (T2w with long TR and TE, PDw with long TR and short TE):
    ``G PD (1 - exp(-TR/T1)) exp(-TE/T2)``.
``flair(pd, t1, t2, tr, te, ti, gain=1.0)``
    Inversion recovery spin echo (FLAIR): ``G PD (1 - 2 exp(-TI/T1) + exp(-TR/T1)) exp(-TE/T2)``;
    a tissue is nulled at ``TI = T1 ln(2 / (1 + exp(-TR/T1)))`` (``T1 ln 2`` for ``TR >> T1``).
``signal(sequence, pd, t1, t2, t2s, params, magnitude=True)``
    Dispatch by family name (``SPGR``, ``MPRAGE``, ``TSE``, ``FLAIR``; case-insensitive).  ``params`` is a
    mapping with short keys ``tr, te, ti, flip_angle, td, tau, gain`` or BIDS keys (``RepetitionTime``,
    ``EchoTime``, ``InversionTime``, ``FlipAngle``), or any object with a ``params()`` method returning
    such a mapping (e.g. :class:`bidsapp.physics.protocols.Protocol`).
``required_params(sequence) -> tuple[str, ...]``
    The short parameter names a family needs.
``SEQUENCES``
    The supported family names.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

SEQUENCES = ("SPGR", "MPRAGE", "TSE", "FLAIR")

_REQUIRED = {
    "SPGR": ("tr", "te", "flip_angle"),
    "MPRAGE": ("ti", "td", "tau"),
    "TSE": ("tr", "te"),
    "FLAIR": ("tr", "te", "ti"),
}

# BIDS sidecar names accepted by signal() as aliases of the short names.
_ALIASES = {
    "RepetitionTime": "tr",
    "RepetitionTimePreparation": "tr_prep",
    "EchoTime": "te",
    "InversionTime": "ti",
    "FlipAngle": "flip_angle",
    "DelayTime": "td",
    "ReadoutTime": "tau",
    "Gain": "gain",
}


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


class _Ops:
    """The few elementwise operations the equations need, for one backend."""

    def __init__(self, *args: Any):
        self.ref = next((a for a in args if _is_torch(a)), None)
        if self.ref is not None:
            import torch

            self.xp = torch
            self.dtype = self.ref.dtype if self.ref.is_floating_point() else torch.get_default_dtype()
        else:
            self.xp = np

    def arr(self, x: Any):
        if self.ref is not None:
            if _is_torch(x):
                return x if x.is_floating_point() else x.to(self.dtype)
            return self.xp.as_tensor(x, dtype=self.dtype, device=self.ref.device)
        a = np.asarray(x)
        return a.astype(np.float64) if a.dtype.kind in "iub" else a

    def exp(self, x):
        return self.xp.exp(x)

    def rate(self, dt, t):
        """exp(-dt / t) that is 0 (not NaN) for t == 0 (no signal memory)."""
        dt, t = self.arr(dt), self.arr(t)
        if self.ref is not None:
            safe = self.xp.where(t > 0, t, self.xp.ones_like(t))
            return self.xp.where(t > 0, self.xp.exp(-dt / safe), self.xp.zeros_like(safe))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            out = np.exp(-dt / np.where(t > 0, t, 1.0))
        return np.where(t > 0, out, 0.0)

    def sin_cos_deg(self, a):
        a = self.arr(a) * (math.pi / 180.0)
        return self.xp.sin(a), self.xp.cos(a)


def spgr(pd, t1, t2s, tr, te, flip_angle, gain=1.0):
    """Spoiled gradient echo (SPGR/FLASH), paper eq. 1."""
    o = _Ops(pd, t1, t2s, tr, te, flip_angle, gain)
    e1 = o.rate(tr, t1)
    s, c = o.sin_cos_deg(flip_angle)
    return o.arr(gain) * o.arr(pd) * s * (1.0 - e1) / (1.0 - c * e1) * o.rate(te, t2s)


def mprage(pd, t1, ti, td, tau, gain=1.0):
    """MPRAGE, paper eq. 2 exactly (TD: delay time, tau: slice imaging time)."""
    o = _Ops(pd, t1, ti, td, tau, gain)
    ti_, td_, tau_ = o.arr(ti), o.arr(td), o.arr(tau)
    return o.arr(gain) * o.arr(pd) * (1.0 - 2.0 * o.rate(ti_, t1) / (1.0 + o.rate(ti_ + td_ + tau_, t1)))


def spin_echo(pd, t1, t2, tr, te, gain=1.0):
    """Spin echo / TSE: T1 saturation recovery times T2 decay."""
    o = _Ops(pd, t1, t2, tr, te, gain)
    return o.arr(gain) * o.arr(pd) * (1.0 - o.rate(tr, t1)) * o.rate(te, t2)


def flair(pd, t1, t2, tr, te, ti, gain=1.0):
    """Inversion recovery spin echo (FLAIR when TI nulls CSF)."""
    o = _Ops(pd, t1, t2, tr, te, ti, gain)
    mz = 1.0 - 2.0 * o.rate(ti, t1) + o.rate(tr, t1)
    return o.arr(gain) * o.arr(pd) * mz * o.rate(te, t2)


def required_params(sequence: str) -> tuple[str, ...]:
    """Short parameter names the sequence family needs (raises ValueError for unknown families)."""
    return _REQUIRED[_family(sequence)]


def _family(sequence: str) -> str:
    fam = str(sequence).upper()
    if fam not in _REQUIRED:
        raise ValueError(f"unknown sequence family {sequence!r}; expected one of {', '.join(SEQUENCES)}")
    return fam


def _normalise_params(params: Any) -> dict:
    if hasattr(params, "params") and callable(params.params):
        params = params.params()
    if not isinstance(params, Mapping):
        raise TypeError("params must be a mapping or an object with a params() method")
    out = {}
    for k, v in params.items():
        out[_ALIASES.get(k, k)] = v
    return out


def signal(sequence: str, pd, t1, t2, t2s, params: Any, magnitude: bool = True):
    """Signal of any supported family; ``abs`` of the signed signal when ``magnitude``."""
    fam = _family(sequence)
    p = _normalise_params(params)
    if fam == "MPRAGE" and "td" not in p and "tr" in p and "ti" in p:
        # A BIDS sidecar gives the inversion-to-inversion time: TD = TR - TI - tau.
        p.setdefault("tau", 0.0)
        p["td"] = p["tr"] - p["ti"] - p["tau"]
    missing = [k for k in _REQUIRED[fam] if p.get(k) is None]
    if missing:
        raise ValueError(f"{fam} needs parameters {', '.join(missing)}")
    gain = p.get("gain", 1.0)
    if fam == "SPGR":
        s = spgr(pd, t1, t2s, p["tr"], p["te"], p["flip_angle"], gain)
    elif fam == "MPRAGE":
        s = mprage(pd, t1, p["ti"], p["td"], p["tau"], gain)
    elif fam == "TSE":
        s = spin_echo(pd, t1, t2, p["tr"], p["te"], gain)
    else:
        s = flair(pd, t1, t2, p["tr"], p["te"], p["ti"], gain)
    return abs(s) if magnitude else s
