"""Sequence parameters for images whose sidecar lacks them, from the dataset's other images.

Converted datasets often lose some sidecars (a re-export, a PACS pull, an anonymiser), while the same
protocol's other scans keep theirs. The physics-aware tissue model needs the sequence family and its
parameters; without them it falls back to the no-physics model. An image without usable parameters
takes them from the dataset's images of the same suffix that have them, when those images share its
``acq-`` label and its voxel grid (matrix and voxel size), and all of them agree on the family and
parameters. Anything less certain is left alone and said in one line. The record keeps where its
parameters came from (``parameters_from``); the tissue sidecar repeats it.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from .acquisition import ATTRIBUTES, FAMILY_PARAMETERS, AcquisitionRecord

SEQUENCE_FIELDS = ("sequence_family", "repetition_time", "echo_time", "inversion_time", "flip_angle",
                   "repetition_time_preparation", "field_strength")
"""What an image borrows: the family and the numbers the physics model reads (scanner identity is not
borrowed: harmonisation groups must not be guessed)."""
SUFFIXES = ("T1w",)


@functools.cache
def _required() -> dict[str, tuple[str, ...]]:
    """Family -> the record attributes the physics model needs (:data:`FAMILY_PARAMETERS`)."""
    return {fam: tuple(ATTRIBUTES[n] for n in spec["required"]) for fam, spec in FAMILY_PARAMETERS.items()}


def complete(rec: AcquisitionRecord) -> bool:
    """Whether the record has a family the physics model knows and every parameter it needs."""
    need = _required().get(rec.sequence_family)
    return need is not None and all(getattr(rec, f) is not None for f in need)


def _grid(path: Path):
    """Matrix and voxel size (0.01 mm) of an image."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception:  # an unreadable image is reported by the image checks, not here
        return None
    return tuple(img.shape[:3]), tuple(round(float(z), 2) for z in img.header.get_zooms()[:3])


def _signature(rec: AcquisitionRecord) -> tuple:
    """The parameters compared across donors (numbers to four decimals: 0.1 ms for times in seconds)."""
    return tuple(None if (v := getattr(rec, f)) is None else (v if isinstance(v, str) else round(float(v), 4))
                 for f in SEQUENCE_FIELDS)


def borrow_parameters(plan, layout, root: Path) -> None:
    """Fill in the sequence parameters of ``plan``'s images that lack them (see the module docstring);
    candidates are every image of the dataset, not only the participants in ``plan``."""
    needy = [(subject, session, path, rec) for subject in plan.subjects for session in subject.sessions
             for path, rec in session.acquisitions.items()
             if rec.suffix in SUFFIXES and not complete(rec)]
    if not needy:
        return
    donors: dict[tuple, list[tuple[Path, AcquisitionRecord]]] = {}
    for suffix in {rec.suffix for *_, rec in needy}:
        for bf in layout.get(suffix=suffix, extension=[".nii", ".nii.gz"], datatype="anat"):
            try:
                rec = AcquisitionRecord.from_metadata(layout.get_metadata(bf.path), suffix=suffix)
            except Exception:  # an unreadable sidecar gives nothing to borrow
                continue
            if complete(rec):
                donors.setdefault((suffix, bf.entities.get("acquisition")), []).append((Path(bf.path), rec))
    grids: dict[Path, tuple | None] = {}

    def grid_of(p: Path):  # each header read once per call
        if p not in grids:
            grids[p] = _grid(p)
        return grids[p]

    for subject, session, path, rec in needy:
        acq = session.entities.get(path, {}).get("acquisition")
        candidates = donors.get((rec.suffix, acq), [])
        if not candidates:
            continue
        grid = grid_of(path)
        same = [(p, r) for p, r in candidates if p != path and grid is not None and grid_of(p) == grid]
        if not same:
            continue
        signatures = {_signature(r) for _, r in same}
        if len(signatures) > 1:
            _warn(subject, session, f"{path}: no usable sequence parameters, and the {len(same)} images of the "
                  "dataset with the same acquisition label and grid disagree on theirs; none borrowed")
            continue
        donor_path, donor = sorted(same, key=lambda x: str(x[0]))[0]
        rec = dataclasses.replace(
            rec, family_source="borrowed", parameters_from=donor_path.relative_to(root).as_posix(),
            **{f: getattr(donor, f) for f in SEQUENCE_FIELDS if f == "sequence_family" or getattr(rec, f) is None})
        session.acquisitions[path] = rec
        _warn(subject, session, f"{path}: no usable sequence parameters; using {rec.parameters_from}'s "
              f"({rec.sequence_family}; {len(same)} image(s) of the dataset with the same acquisition label and "
              "grid agree)")


def _warn(subject, session, message: str) -> None:
    session.warnings.append(message)
    subject.warnings.append(message)
