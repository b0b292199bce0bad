"""Reproducible training commands of the shipped models (``scanbridge-train <model>``)."""

from __future__ import annotations

from pathlib import Path


def default_anatomy_dir() -> Path:
    """Where the development label maps are (:func:`bidsapp.devdata.anatomy_dir`)."""
    from bidsapp.devdata import anatomy_dir

    return anatomy_dir()
