"""The benchmark scripts as modules, for tests of their pure parts (``benchmarks/*`` are not packages)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(folder: str, name: str):
    """``benchmarks/<folder>/<name>.py`` imported as the module ``<folder>_<name>``."""
    spec = importlib.util.spec_from_file_location(f"{folder}_{name}", ROOT / "benchmarks" / folder / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
