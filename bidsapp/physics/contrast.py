"""GM/WM contrast an acquisition should have, from its signal equation and literature tissue properties.

Long-TR, low-flip SPGR is proton-density weighted, and its GM/WM contrast crosses zero inside common
parameter ranges (TR 95 ms, flip 15 deg at 3 T: WM/GM 0.97). There, intensity alone cannot tell GM
from WM and every segmentation method's GM/WM volumes move most; the training sampler oversamples
such settings, and the participant and group reports flag them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bidsapp.physics.equations import signal
from bidsapp.physics.tissues import property_table

LOW_CONTRAST = 0.06
"""|WM/GM signal ratio - 1| below which an acquisition counts as low GM/WM contrast."""


def wm_gm_signal_ratio(sequence: str, params: Any, field_strength: float = 3.0) -> float:
    """Signal of pure WM over pure GM (nominal properties at ``field_strength`` T, magnitude images).

    ``params`` as for :func:`bidsapp.physics.equations.signal` (seconds, degrees; an MPRAGE may give
    its inversion-to-inversion TR instead of TD).
    """
    tab = property_table(("GM", "WM"), float(field_strength))
    s = np.asarray(signal(sequence, tab[:, 0], tab[:, 1], tab[:, 2], tab[:, 3], params), dtype=np.float64)
    return float(s[1] / s[0]) if s[0] > 0 else float("inf")


def is_low_contrast(ratio: float) -> bool:
    return abs(ratio - 1.0) < LOW_CONTRAST


def low_contrast_warning(ratio: float) -> str | None:
    """The one-line warning for outputs and reports, or None when the contrast is usable."""
    if not is_low_contrast(ratio):
        return None
    return (f"the sequence parameters give pure WM {ratio:.3f} times the signal of pure GM (literature relaxation "
            "times): with so little GM/WM contrast every method tested moves volume between GM and WM, so compare "
            "this scan's GM/WM volumes with other protocols' with care")
