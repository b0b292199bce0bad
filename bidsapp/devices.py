"""Where and in what precision the neural networks run: one rule for every model, trainer and group step.

Device: ``cpu``; ``cuda`` (or ``cuda:N``), an error when no CUDA device is available, never a silent
fallback; ``auto``: CUDA when available, else the CPU, and the log says which.

Precision of inference (:func:`autocast`): bfloat16 mixed precision where the hardware computes it natively
(CPUs with AVX512-BF16 or AMX, CUDA devices with bfloat16), float32 elsewhere. On 2 CPU cores it halves
the time of the lesion network, and its masks agree with float32's to Dice 0.999 (README.md, options).
``SCANBRIDGE_PRECISION=float32`` forces float32 everywhere, for outputs that do not depend on the CPU's
instruction set; every sidecar's ``Model`` says which precision made it. The decline network (one pair per
reading) always runs in float32. Training runs in float32 unless a trainer is given ``--precision bfloat16``
(:func:`bidsapp.training.engine.precision_field`), which its model card records.
"""

from __future__ import annotations

import contextlib
import logging
import os

LOG = logging.getLogger("scanbridge")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "float32", "bfloat16")
PRECISION_ENV = "SCANBRIDGE_PRECISION"


class DeviceUnavailableError(RuntimeError):
    """``cuda`` was asked for on a machine without a usable CUDA device."""


_SAID: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        LOG.info("%s", message)


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def resolve_device(device=None):
    """A ``torch.device`` for ``device`` (``auto`` when None); a torch.device is returned as it is."""
    import torch

    if isinstance(device, torch.device):
        return device
    name = str(device or "auto").lower()
    if name == "auto":
        if cuda_available():
            return torch.device("cuda")
        _say_once("device auto: no CUDA device available, running on the CPU")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not cuda_available():
            raise DeviceUnavailableError("--device cuda was requested but no CUDA device is available "
                                         "(use --device cpu or auto)")
        return torch.device(name)
    if name != "cpu":
        raise ValueError(f"unknown device {device!r}: use {', '.join(DEVICES)}")
    return torch.device("cpu")


def requested_precision() -> str:
    """The precision asked for in :data:`PRECISION_ENV` (``auto`` when unset); a ValueError naming the
    variable for anything but :data:`PRECISIONS`."""
    name = os.environ.get(PRECISION_ENV, "").strip().lower() or "auto"
    if name not in PRECISIONS:
        raise ValueError(f"{PRECISION_ENV}={os.environ[PRECISION_ENV]!r} is not a precision: use "
                         f"{', '.join(PRECISIONS)}")
    return name


def native_bfloat16(device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware (emulated bfloat16 would be slower than float32)."""
    import torch

    device = resolve_device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":  # the probes are private in torch 2.x: absent means "not known to be native"
        return any(bool(getattr(torch.cpu, probe, lambda: False)())
                   for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def precision(device) -> str:
    """``bfloat16`` or ``float32``: the precision inference runs in on ``device`` (see the module)."""
    name = requested_precision()
    if name == "auto":
        return "bfloat16" if native_bfloat16(device) else "float32"
    return name


def autocast(device, name: str | None = None):
    """A context in which a network's forward pass runs in precision ``name`` (default: :func:`precision`,
    the rule for inference); wrap the forward pass only and cast its outputs to float32 for losses."""
    import torch

    device = resolve_device(device)
    if (name or precision(device)) == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
