"""The physics gold standard (physics-informed segmentation paper, section 3.1).

Each tissue's R1 is modelled as a normal distribution with literature mean and standard deviation
(3T: CSF 0.240 +- 0.03, GM 0.683 +- 0.080, WM 1.036 +- 0.080 1/s).  Inside the brain mask a voxel's
class probabilities are the normalised Gaussian likelihoods of its R1; the hard labels are the most
likely class.  It depends only on the quantitative R1 map, so it is the same for every simulated
acquisition of a subject.  The reference values are for 3T R1 maps.

Public API
----------
``physics_gold_standard(r1, brain_mask, reference=GOLD_STANDARD_R1) -> (probseg, dseg)``
    ``r1`` array (1/s), ``brain_mask`` bool array; returns float32 (3, ...) probabilities in the order
    CSF, GM, WM (0 outside the mask) and uint8 labels CSF=1, GM=2, WM=3 (0 outside).
``gold_standard_from_phantom(phantom) -> (probseg, dseg)``  from the phantom's 3T R1 map and brain mask.
``GOLD_STANDARD_R1``  re-exported from :mod:`bidsapp.physics.tissues`.
"""
from __future__ import annotations

import numpy as np

from ..labels import TISSUE
from .tissues import GOLD_STANDARD_R1

_ORDER = TISSUE.names


def physics_gold_standard(r1, brain_mask, reference: dict = GOLD_STANDARD_R1):
    r1 = np.asarray(r1, dtype=np.float64)
    mask = np.asarray(brain_mask, dtype=bool)
    if r1.shape != mask.shape:
        raise ValueError(f"R1 map {r1.shape} and brain mask {mask.shape} differ in shape")
    missing = [k for k in _ORDER if k not in reference]
    if missing:
        raise ValueError(f"gold-standard reference lacks {', '.join(missing)}")
    x = r1[mask]
    # Log-likelihoods, normalised with log-sum-exp so voxels far from every mean stay well defined.
    ll = np.stack([-0.5 * ((x - m) / s) ** 2 - np.log(s) for m, s in (reference[k] for k in _ORDER)])
    ll -= ll.max(axis=0, keepdims=True)
    p = np.exp(ll)
    p /= p.sum(axis=0, keepdims=True)
    prob = np.zeros((3,) + r1.shape, np.float32)
    prob[:, mask] = p
    dseg = np.zeros(r1.shape, np.uint8)
    dseg[mask] = np.argmax(p, axis=0).astype(np.uint8) + 1
    return prob, dseg


def gold_standard_from_phantom(phantom):
    return physics_gold_standard(phantom.qmri(3.0)["R1"], phantom.brain_mask)
