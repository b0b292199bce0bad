"""Augmentation shared by the trainers of synthetic images (brain extraction, tissue, lesions): geometry,
and what an acquisition does to an image on top of its contrast. None of these draw random numbers:
callers draw the parameters from their own generator, so each trainer's random stream stays its own."""

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


def thick_slices(img, axis: int, k: int):
    """A 3D torch image (X, Y, Z) as a 2D acquisition of slices ``k`` voxels thick along ``axis`` sees it:
    box-averaged over each slice, then linearly interpolated back to the grid (what resampling a
    thick-slice scan to the network's grid gives)."""
    import torch.nn.functional as F

    if k < 2:
        return img
    kern = [1, 1, 1]
    kern[axis] = int(k)
    low = F.avg_pool3d(img[None, None], kern, stride=kern, ceil_mode=True)
    return F.interpolate(low, size=tuple(img.shape), mode="trilinear", align_corners=False)[0, 0]


def gaussian_blur(img, sd: float, radius: int = 2):
    """Separable Gaussian blur (``sd`` voxels, kernel of 2 ``radius`` + 1) of a 3D torch image, edges replicated."""
    import torch
    import torch.nn.functional as F

    g = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float32, device=img.device) ** 2 / (2 * sd * sd))
    g = g / g.sum()
    x = img[None, None]
    for ax in range(3):
        shp = [1, 1, 1, 1, 1]
        shp[2 + ax] = 2 * radius + 1
        pad = [0] * 6
        pad[2 * (2 - ax)] = pad[2 * (2 - ax) + 1] = radius
        x = F.conv3d(F.pad(x, pad, mode="replicate"), g.reshape(shp))
    return x[0, 0]
