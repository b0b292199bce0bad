"""MRAI-NET's simulated training data: axial slices of label maps scanned with the paper's two scanners.

The paper trains on a 1.5T SPGR source (Rotterdam Scan Study) and a 3T SPGR target (MRBrainS); here both
are simulated by the physics engine from the shared label maps (``scanbridge-train mrainet`` and
``benchmarks/mrainet/run.py``). The group level does not use this: it trains on the dataset's own scans.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bidsapp.training.mrainet_experiment import Scan

PAPER_SOURCE = "mrainet-1.5T-spgr"   # Rotterdam Scan Study: 1.5T, flip 20, TR 13.8 ms, TE 2.8 ms
PAPER_TARGET = "mrainet-3T-spgr"     # MRBrainS: 3T, flip 90, TR 7.9 ms, TE 4.5 ms


_ICBM_CACHE: dict = {}


def _axial_slab(anatomy, half_mm: float):
    """A phantom restricted to an axial slab (centred 68% up the brain's S-I extent) of +-half_mm."""
    import nibabel as nib

    from bidsapp.physics import phantom as ph

    if str(anatomy).lower() == "icbm152":
        if "p" not in _ICBM_CACHE:
            _ICBM_CACHE["p"] = ph.from_icbm152()
        full = _ICBM_CACHE["p"]
        axis = [i for i, c in enumerate(full.axcodes) if c in "SI"][0]
        brain = full.brain_mask.any(axis=tuple(a for a in range(3) if a != axis))
    else:
        img = nib.load(str(anatomy))
        axis = [i for i, c in enumerate(nib.aff2axcodes(img.affine)) if c in "SI"][0]
        lab = np.asarray(img.dataobj)
        brain_labels = [k for k, c in ph.LABEL_CLASSES.items() if c in ph._BRAIN]
        brain = np.isin(lab, brain_labels).any(axis=tuple(a for a in range(3) if a != axis))
    idx = np.flatnonzero(brain)
    lo, hi = idx.min(), idx.max()
    up = nib.aff2axcodes(full.affine if str(anatomy).lower() == "icbm152" else img.affine)[axis] == "S"
    centre = int(round(lo + (0.68 if up else 0.32) * (hi - lo)))
    vs = (full.voxel_size if str(anatomy).lower() == "icbm152" else img.header.get_zooms()[:3])[axis]
    half = int(np.ceil(half_mm / vs))
    sl = [slice(None)] * 3
    sl[axis] = slice(max(0, centre - half), centre + half + 1)
    if str(anatomy).lower() == "icbm152":
        aff = full.affine.copy()
        aff[:3, 3] += aff[:3, axis] * sl[axis].start
        return ph.Phantom(full.fractions[(slice(None), *sl)].copy(), aff, full.classes, full.multipliers.copy(),
                          dict(full.meta))
    return ph.from_label_map(img.slicer[tuple(sl)], crop=True)


def simulate_slices(anatomy, protocol: str, rng, *, n_slices: int = 3, spacing_mm: float = 12.0,
                    deform: bool = False, variation: float = 0.0, bias: bool = False, noise: bool = False,
                    voxel_size="native", normalise: bool = True) -> Scan:
    """``n_slices`` axial slices, ``spacing_mm`` apart, of one anatomy (label map path or "icbm152") scanned
    with a physics protocol preset, optionally as a new subject (random deformation, tissue variation) and
    with the scanner's bias field and Rician noise. Images are RAS, zero outside the brain; ``normalise``:
    divided by the brain's 99th percentile (the group level's per-scan normalisation), else the simulator's
    intensities (for one scale per scanner: :func:`~bidsapp.training.mrainet_experiment.common_scale`)."""
    from bidsapp.models.mrainet import normalize_intensity
    from bidsapp.physics import phantom as ph
    from bidsapp.physics import protocols as pr
    from bidsapp.physics import simulator as sim

    half = spacing_mm * (n_slices - 1) / 2 + (10.0 if deform else 2.0)
    p = _axial_slab(anatomy, half)
    if deform:
        p = ph.random_deformation(p, rng)
    if variation > 0:
        p = p.with_variation(rng, variation)
    s = sim.simulate(p, pr.get_protocol(protocol), rng, voxel_size=voxel_size, bias=bias, noise=noise,
                     orientation="RAS")
    img = np.asarray(s.image.dataobj, dtype=np.float32)
    lab = s.truth.dseg()
    zs = float(s.image.header.get_zooms()[2])
    mid = lab.shape[2] // 2
    step = max(1, int(round(spacing_mm / zs)))
    idx = [mid + (i - (n_slices - 1) / 2) * step for i in range(n_slices)]
    idx = [int(np.clip(round(i), 0, lab.shape[2] - 1)) for i in idx]
    img, lab = img[:, :, idx], lab[:, :, idx].astype(np.int64)
    img = normalize_intensity(img, lab > 0) if normalise else np.where(lab > 0, img, 0.0).astype(np.float32)
    return Scan(img, lab, f"{Path(str(anatomy)).name.split('_')[0]}@{protocol}")


def anatomy_paths(anatomy_dir) -> list[Path]:
    return sorted(Path(anatomy_dir).glob("anat-*_dseg.nii.gz"))
