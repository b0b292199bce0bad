"""Geometric augmentation shared by the trainers that warp synthetic heads (brain extraction, lesions)."""

from __future__ import annotations

import math

import numpy as np


def rotation(angles) -> np.ndarray:
    """Rotation matrix of ``angles`` (degrees about x, y, z), composed x @ y @ z."""
    a, b, c = np.deg2rad(angles)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz
