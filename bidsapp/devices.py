"""Where the neural networks run: one rule for every model, trainer and group step.

``cpu``; ``cuda`` (or ``cuda:N``), an error when no CUDA device is available, never a silent fallback;
``auto``: CUDA when available, else the CPU, and the log says which.
"""

from __future__ import annotations

import logging

LOG = logging.getLogger("scanbridge")
DEVICES = ("auto", "cpu", "cuda")


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
