"""Decline probability of consecutive session pairs: the 3D-SiameseNet (:mod:`bidsapp.models.siamese`).

Each pair is read where the change table reads it: both sessions resampled once into the subject's
mid-space (no session is the reference), both skull-stripped with the two masks' intersection (the
network was trained on pairs that share one brain mask, so a mask that differs between sessions, by
more extra-cerebral CSF or a margin of skull, must not read as change), put in RAS voxel order, cropped
around that brain and prepared as the network was trained (the card's
``input_mode``: each image's tissue intensities mapped onto one scale, :func:`bidsapp.models.siamese.standardise`;
tissue fractions with each session's own CSF and tissue intensities,
:func:`bidsapp.longitudinal.change.pair_fractions`; or the intensities as preprocessed). The network is not told the interval, so a
probability is a statement about the pair, not a rate.
"""

from __future__ import annotations

import numpy as np

COLUMNS = ("ses_from", "ses_to", "interval_days", "acquisition_changed", "probability_decline", "call")
THRESHOLD = 0.5
"""Probability of decline at or above which a pair is called ``decline``."""
COLUMN_DESCRIPTIONS = {
    "probability_decline": {"Description": "3D-SiameseNet's softmax probability that the pair shows accelerated "
                                           "atrophy (decline) rather than the slow loss of a stable brain"},
    "call": {"Description": f"decline when probability_decline >= {THRESHOLD}, else stable",
             "Levels": {"stable": "no accelerated atrophy", "decline": "accelerated atrophy"}},
}


def sidecar_metadata(weights_dir=None) -> dict:
    """The sidecar fields saying which network read the pairs, and how (as the tissue and lesion sidecars
    name their model)."""
    from bidsapp.models import registry
    from bidsapp.models.siamese import MIRROR, MODEL_NAME

    card = registry.load_card(MODEL_NAME, weights_dir)
    return {"Model": registry.sidecar_model(card),
            "InputMode": card.get("input_mode", "intensity"),
            "Reading": ("each pair and its left-right mirror image, probabilities averaged" if MIRROR
                        else "each pair once"),
            "Threshold": THRESHOLD}


def available(weights_dir=None) -> bool:
    """Whether the network's weights are there (the subject level skips this step without them)."""
    from bidsapp.models import registry
    from bidsapp.models.siamese import MODEL_NAME

    return MODEL_NAME in registry.available(weights_dir=weights_dir)


def applies(contrast: str) -> bool:
    """Whether the subject level runs this step: T1w sessions (what the network was trained on) and weights."""
    return contrast == "T1w" and available()


def ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``array`` in RAS voxel order (axes permuted and flipped only) and its voxel size there."""
    from bidsapp.models.tissue import ras_zooms, to_ras

    out, ornt = to_ras(np.asarray(array), affine)
    return np.ascontiguousarray(out), ras_zooms(np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0)), ornt)


def pair_inputs(image_a, mask_a, image_b, mask_b, affine, card: dict, csf_inverted=(False, False)):
    """The network's two inputs (size^3 each) for one pair of mid-space images and masks (same grid)."""
    from bidsapp.models import siamese as S

    kw = card["architecture"]["kwargs"]
    size, grid = int(kw.get("input_size", S.INPUT_SIZE)), float(card.get("resolution_mm", S.GRID_MM))
    (ia, spacing), (ma, _), (ib, _), (mb, _) = (ras(x, affine) for x in (image_a, mask_a, image_b, mask_b))
    common = (ma > 0.5) & (mb > 0.5)
    if not common.any():
        raise ValueError("the two sessions' brain masks do not overlap in the mid-space")
    centre = S.brain_centre(common, spacing, size, grid)
    a = S.preprocess(ia, common, spacing, size, grid, centre=centre)
    b = S.preprocess(ib, common, spacing, size, grid, centre=centre)
    mode = card.get("input_mode", "intensity")
    if mode == "standardised":
        a, b = S.standardise(a), S.standardise(b)
    elif mode == "fraction":
        from .change import pair_fractions

        a, b = pair_fractions(a, b, (grid,) * 3, csf_inverted)
    return a, b


def decline_rows(images, masks, affine, pairs, *, csf_inverted, weights_dir=None, device="cpu") -> list[dict]:
    """``[{"probability_decline": p, "call": ...}]``, one per pair ``(i, j)`` of ``pairs``, in that order
    (mid-space ``images`` and ``masks`` on one grid, ``affine`` its voxel -> RAS mm)."""
    from bidsapp.models.siamese import load_model, predict_proba

    net, card = load_model(device, weights_dir)
    rows = []
    for i, j in pairs:
        a, b = pair_inputs(images[i], masks[i], images[j], masks[j], affine, card,
                           (csf_inverted[i], csf_inverted[j]))
        p = float(predict_proba(net, a[None], b[None], device=device)[0, 1])
        rows.append({"probability_decline": p, "call": "decline" if p >= THRESHOLD else "stable"})
    return rows
