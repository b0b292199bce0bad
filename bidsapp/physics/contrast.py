"""GM/WM contrast an acquisition should have, from its signal equation and literature tissue properties.

Long-TR, low-flip SPGR is proton-density weighted, and its GM/WM contrast crosses zero inside common
parameter ranges (TR 95 ms, flip 15 deg at 3 T: WM/GM 0.97). There, intensity alone cannot tell GM
from WM and every segmentation method's GM/WM volumes move most; the training sampler oversamples
such settings, and the participant and group reports flag them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bidsapp.labels import TISSUE
from bidsapp.physics.equations import signal
from bidsapp.physics.tissues import property_table

LOW_CONTRAST = 0.06
"""|WM/GM signal ratio - 1| below which an acquisition counts as low GM/WM contrast."""


CSF_NULL = 0.05
"""|CSF signal| below this fraction of the tissue's counts as nulled: its sign does not matter."""


def pure_signals(sequence: str, params: Any, field_strength: float = 3.0,
                 tissues=TISSUE.names, magnitude: bool = True) -> dict:
    """Signal of each pure tissue (nominal properties at ``field_strength`` T); signed when not
    ``magnitude`` (an inversion-recovery image before the magnitude is taken).

    ``params`` as for :func:`bidsapp.physics.equations.signal` (seconds, degrees; an MPRAGE may give
    its inversion-to-inversion TR instead of TD).
    """
    tab = property_table(tuple(tissues), float(field_strength))
    s = np.asarray(signal(sequence, tab[:, 0], tab[:, 1], tab[:, 2], tab[:, 3], params, magnitude=magnitude),
                   dtype=np.float64)
    return dict(zip(tissues, s.tolist()))


def wm_gm_signal_ratio(sequence: str, params: Any, field_strength: float = 3.0) -> float:
    """Signal of pure WM over pure GM (magnitude images)."""
    s = pure_signals(sequence, params, field_strength, ("GM", "WM"))
    return float(s["WM"] / s["GM"]) if s["GM"] > 0 else float("inf")


def csf_inverted(sequence: str, params: Any, field_strength: float = 3.0) -> bool:
    """Whether CSF's signed signal is opposite to both GM's and WM's (an MPRAGE whose TI comes before
    CSF's null point, e.g. TI 0.9 s / TR 2.3 s at 3 T): in the magnitude image a voxel half CSF, half
    tissue is then darker than either, and intensity is no longer linear in the tissue fraction."""
    s = pure_signals(sequence, params, field_strength, magnitude=False)
    tissue = max(abs(s["GM"]), abs(s["WM"]))
    return bool(s["CSF"] * s["GM"] < 0 and s["CSF"] * s["WM"] < 0 and abs(s["CSF"]) > CSF_NULL * tissue)


def is_low_contrast(ratio: float) -> bool:
    return abs(ratio - 1.0) < LOW_CONTRAST


def low_contrast_warning(ratio: float) -> str | None:
    """The one-line warning for outputs and reports, or None when the contrast is usable."""
    if not is_low_contrast(ratio):
        return None
    return (f"the sequence parameters give pure WM {ratio:.3f} times the signal of pure GM (literature relaxation "
            "times): with so little GM/WM contrast every method tested moves volume between GM and WM, so compare "
            "this scan's GM/WM volumes with other protocols' with care")
