"""The change-reading comparison's own pieces: the boundary region and Jacobian integration read a
known answer."""

from __future__ import annotations

import numpy as np
import pytest

from benchmark_scripts import load


@pytest.fixture(scope="module")
def bench():
    return load("longitudinal", "readings")


def _ball(scale: float = 1.0, shape=(48, 48, 48)):
    """A smooth-edged bright ellipsoid (radii 14, 12, 10 voxels times ``scale``) on a dark background."""
    from scipy import ndimage as ndi

    xyz = np.indices(shape).astype(np.float32) - (np.asarray(shape, np.float32)[:, None, None, None] - 1) / 2
    r = np.sqrt(sum((xyz[i] / (a * scale)) ** 2 for i, a in enumerate((14.0, 12.0, 10.0))))
    return ndi.gaussian_filter((r <= 1.0).astype(np.float32), 1.0), r <= 1.0


def test_boundary_region_holds_both_sides_of_the_edge_and_nothing_far(bench):
    _, inside = _ball()
    region = np.ones_like(inside)
    got = bench.boundary_region(inside, region, (1.0, 1.0, 1.0), mm=2.0)
    from scipy import ndimage as ndi

    deep = ndi.distance_transform_edt(inside) > 3
    far = ndi.distance_transform_edt(~inside) > 3
    edge = inside & ~ndi.binary_erosion(inside)
    assert got[edge].all() and not got[deep].any() and not got[far].any()
    assert not bench.boundary_region(inside, np.zeros_like(inside), (1.0, 1.0, 1.0)).any()


def _shrunk(image: np.ndarray, scale: float) -> np.ndarray:
    """``image`` scaled by ``scale`` per axis about its centre."""
    from scipy import ndimage as ndi

    c = (np.asarray(image.shape, float) - 1) / 2
    return ndi.affine_transform(image, np.full(3, 1.0 / scale), offset=c - c / scale, order=1)


def test_jacobian_integration_reads_a_uniform_shrink(bench):
    from scipy import ndimage as ndi

    ball, inside = _ball(1.0, shape=(56, 56, 56))
    texture = ndi.gaussian_filter(np.random.default_rng(0).normal(size=ball.shape), 2.0)
    a = (ball * (1.0 + 4.0 * texture)).astype(np.float32)  # inner structure, as a brain's folds
    b = _shrunk(a, 0.97 ** (1 / 3)).astype(np.float32)  # 3 % less volume
    got = bench.jacobian_change(a, b, inside.astype(np.float32), np.ones_like(a), (1.0, 1.0, 1.0))
    assert -3.5 < got < -1.5  # the method reads a shrink, under-read by its regularisation
    same = bench.jacobian_change(a, a.copy(), inside.astype(np.float32), np.ones_like(a), (1.0, 1.0, 1.0))
    assert abs(same) < 0.2
