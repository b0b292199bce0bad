"""Inference precision (bidsapp.devices): bfloat16 only where the hardware has it, float32 on request."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bidsapp import devices
from bidsapp.models.registry import sidecar_model


def test_the_variable_picks_the_precision(monkeypatch):
    monkeypatch.setenv(devices.PRECISION_ENV, "float32")
    assert devices.precision("cpu") == "float32"
    monkeypatch.setenv(devices.PRECISION_ENV, " BFloat16 ")
    assert devices.precision("cpu") == "bfloat16"
    monkeypatch.delenv(devices.PRECISION_ENV)
    assert devices.requested_precision() == "auto"


@pytest.mark.parametrize("native", [True, False])
def test_auto_uses_bfloat16_only_where_it_is_native(monkeypatch, native):
    monkeypatch.delenv(devices.PRECISION_ENV, raising=False)
    monkeypatch.setattr(devices, "native_bfloat16", lambda device: native)
    assert devices.precision("cpu") == ("bfloat16" if native else "float32")
    with devices.autocast("cpu"):
        y = torch.nn.Linear(4, 4)(torch.ones(2, 4))
    assert y.dtype == (torch.bfloat16 if native else torch.float32)


def test_an_unknown_precision_names_the_variable(monkeypatch):
    monkeypatch.setenv(devices.PRECISION_ENV, "fp16")
    with pytest.raises(ValueError, match="SCANBRIDGE_PRECISION='fp16' is not a precision: use auto, float32"):
        devices.precision("cpu")


def test_sidecars_name_the_precision_only_when_inference_ran():
    card = {"name": "m", "version": "1", "sha256": "ab"}
    assert "Precision" not in sidecar_model(card)
    assert sidecar_model({**card, "precision": "bfloat16"})["Precision"] == "bfloat16"


def test_bfloat16_lesion_inference_agrees_with_float32(monkeypatch):
    """The same network in both precisions: probabilities within 0.05 of each other (and not identical:
    the request reached the forward pass), returned as float32."""
    from bidsapp.models import lesion

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(len(lesion.CHANNELS), 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv3d(8, len(lesion.OUTPUTS), 3, padding=1)).eval()
    x = np.random.default_rng(0).normal(size=(len(lesion.CHANNELS), 20, 24, 18)).astype(np.float32)
    monkeypatch.setenv(devices.PRECISION_ENV, "float32")
    full = lesion.predict(net, x, mirror=False)
    monkeypatch.setenv(devices.PRECISION_ENV, "bfloat16")
    half = lesion.predict(net, x, mirror=False)
    assert full.dtype == half.dtype == np.float32 and full.shape == half.shape == (len(lesion.OUTPUTS), 20, 24, 18)
    assert 0 < np.abs(full - half).max() < 0.05
