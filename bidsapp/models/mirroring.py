"""Test-time mirroring: a network's output averaged over mirror images of its input.

Every network here was trained with random left-right flips, so an input and its mirror image are two
equally valid views of one head; averaging the two outputs (nnU-Net's default at inference) removes
part of the network's view-to-view noise at the cost of one more pass. The tissue, lesion, brain-mask
and decline networks all read their inputs through :func:`mirrored`, so the rule is written once.

Inputs are tensors (N, C, X, Y, Z) in RAS voxel order: spatial axis 0 (tensor dimension 2) is
left-right.
"""

from __future__ import annotations

import itertools

LEFT_RIGHT = (0,)
"""The spatial axis a brain is nearly symmetric about, the one every network's training flipped."""


def mirrored(predictor, axes=LEFT_RIGHT, *, flip_output: bool = True):
    """``predictor`` averaged over its mirror images along the spatial ``axes``.

    Each non-empty subset of ``axes`` is one more pass (``axes=()`` returns ``predictor`` itself). Every
    positional input is flipped together (a pair of sessions stays a pair); the output is flipped back
    when it is a map on the input's grid (``flip_output``), not when it is per-input, such as class
    probabilities of a pair.
    """
    dims = [[2 + a for a in c] for r in range(1, len(axes) + 1) for c in itertools.combinations(axes, r)]
    if not dims:
        return predictor

    def averaged(*inputs):
        total = predictor(*inputs)
        for d in dims:
            out = predictor(*(x.flip(d) for x in inputs))
            total = total + (out.flip(d) if flip_output else out)
        return total / (len(dims) + 1)

    return averaged
