"""Reproducible training commands of the shipped models (``scanbridge-train <model>``)."""

from __future__ import annotations

import os
from pathlib import Path


def default_anatomy_dir() -> Path:
    """Where the development label maps are: ``$SCANBRIDGE_ANATOMY_DIR``, else ``../shared/data/anatomy``
    beside the project checkout."""
    env = os.environ.get("SCANBRIDGE_ANATOMY_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "anatomy"
