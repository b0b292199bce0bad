"""Shipped model weights and their model cards: the one place that stores, finds and verifies them.

Every model ``NAME`` is two files in ``bidsapp/models/weights/``: ``NAME.pt`` (a torch state dict)
and ``NAME.json`` (the model card: architecture, training data and command, seed, metrics and the
sha256 of the weights file). Loading recomputes the sha256 and refuses a file that does not match
its card, so a truncated download or an edited file never silently produces segmentations.

A card is a plain dict; the keys every card has are ``name``, ``version``, ``sha256``,
``weights_file``, ``architecture`` (``{"class": ..., "kwargs": {...}}``), ``training``
(``{"command", "seed", "data", ...}``) and ``metrics``; models add their own keys.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
REQUIRED_CARD_KEYS = ("name", "version", "sha256", "weights_file", "architecture", "training", "metrics")


class ModelNotFoundError(FileNotFoundError):
    """No weights/card for the requested model name."""


class WeightsIntegrityError(RuntimeError):
    """The weights file does not match the sha256 recorded in its model card."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dir(weights_dir) -> Path:
    return Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR


def card_path(name: str, weights_dir=None) -> Path:
    return _dir(weights_dir) / f"{name}.json"


def weights_path(name: str, weights_dir=None) -> Path:
    return _dir(weights_dir) / f"{name}.pt"


def available(prefix: str = "", weights_dir=None) -> list[str]:
    """Names of the models that have both a card and a weights file."""
    d = _dir(weights_dir)
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob(f"{prefix}*.json") if (d / f"{p.stem}.pt").is_file())


def load_card(name: str, weights_dir=None) -> dict:
    path = card_path(name, weights_dir)
    if not path.is_file():
        raise ModelNotFoundError(f"model card {path} not found (known models: {', '.join(available(weights_dir=weights_dir)) or 'none'})")
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsIntegrityError(f"model card {path} is not valid JSON: {exc}") from None
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise WeightsIntegrityError(f"model card {path} lacks {', '.join(missing)}")
    return card


def result_model(card: dict, device) -> dict:
    """A segmentation result's ``model`` dict: the card's name, version and sha256, and the precision the
    network inferred in on ``device`` (:func:`bidsapp.devices.precision`); :func:`sidecar_model` writes it."""
    from bidsapp.devices import precision

    return {"name": card["name"], "version": card.get("version"), "sha256": card["sha256"],
            "precision": precision(device)}


def sidecar_model(model: dict) -> dict:
    """A sidecar's ``Model`` field ({Name, Version, Sha256}, and Precision when inference ran) from a card or
    a result's ``model`` dict (``name``, ``version``, ``sha256``, ``precision``): every derivative names
    the network that made it the same way."""
    out = {"Name": model.get("name"), "Version": model.get("version"), "Sha256": model.get("sha256")}
    if model.get("precision"):
        out["Precision"] = model["precision"]
    return out


def verify(name: str, weights_dir=None) -> tuple[Path, dict]:
    """Return (weights path, card) after checking the weights' sha256 against the card."""
    card = load_card(name, weights_dir)
    path = _dir(weights_dir) / card["weights_file"]
    if not path.is_file():
        raise ModelNotFoundError(f"weights file {path} named by model card {card_path(name, weights_dir)} not found")
    digest = sha256_file(path)
    if digest != card["sha256"]:
        raise WeightsIntegrityError(
            f"weights file {path} is corrupted or was modified: sha256 {digest[:12]}... does not match "
            f"{card['sha256'][:12]}... in its model card; reinstall the package or retrain the model")
    return path, card


def load_state_dict(name: str, weights_dir=None, map_location="cpu") -> tuple[dict, dict]:
    """Verified (state dict, card) for ``name``."""
    import torch

    path, card = verify(name, weights_dir)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged archive
        raise WeightsIntegrityError(f"weights file {path} cannot be read: {exc}") from None
    return state, card


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, 0o644)  # shipped package data: readable by every user of an installed package
    os.replace(tmp, path)


def update_card(name: str, updates: dict, weights_dir=None) -> dict:
    """Merge ``updates`` into a model card (e.g. benchmark ``metrics``) after verifying the weights;
    the weights and their sha256 are untouched."""
    _, card = verify(name, weights_dir)
    protected = {"name", "weights_file", "sha256", "size_bytes"} & set(updates)
    if protected:
        raise ValueError(f"update_card cannot change {', '.join(sorted(protected))}")
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(card.get(key), dict):
            card[key] = {**card[key], **value}
        else:
            card[key] = value
    _atomic_write_bytes(card_path(name, weights_dir), (json.dumps(card, indent=2) + "\n").encode())
    return card


TRAINING_ONLY = ("domain_head.",)
"""Parameter prefixes of training-only heads (the scanner regulariser or adversary), never shipped."""


def shipped_state(net) -> dict:
    """The weights to ship: ``net``'s state without its training-only heads (:data:`TRAINING_ONLY`)."""
    return {k: v for k, v in net.state_dict().items() if not k.startswith(TRAINING_ONLY)}


def save_model(name: str, state_dict: dict, card: dict, weights_dir=None) -> dict:
    """Write ``NAME.pt`` and ``NAME.json``; fills ``name``, ``weights_file``, ``sha256`` and returns the card."""
    import torch

    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buf)
    data = buf.getvalue()
    card = dict(card)
    card.update(name=name, weights_file=f"{name}.pt", sha256=hashlib.sha256(data).hexdigest(),
                size_bytes=len(data))
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise ValueError(f"model card for {name} lacks {', '.join(missing)}")
    _atomic_write_bytes(weights_path(name, weights_dir), data)
    _atomic_write_bytes(card_path(name, weights_dir), (json.dumps(card, indent=2, sort_keys=False) + "\n").encode())
    return card


def load_network(name: str, build, device="cpu", weights_dir=None, cache: dict | None = None):
    """(network in eval mode on ``device``, card) of model ``name``: ``build(card["architecture"])``
    makes the network, the sha256-checked weights fill it; cached in ``cache`` per name, device, folder."""
    key = (name, str(device), str(weights_dir))
    if cache is not None and key in cache:
        return cache[key]
    state, card = load_state_dict(name, weights_dir)
    net = build(card["architecture"])
    net.load_state_dict(state)
    net.eval().to(device)
    if cache is not None:
        cache[key] = (net, card)
    return net, card
