"""The label sets scanbridge writes: one home for their names, values, colours and BIDS entities.

A :class:`LabelSet` is what a method produces (tissue classes, lesions, ...). Writers take from it the
``label-<name>`` of each probseg, the values and names of a dseg look-up table, the ``desc-<mask_desc>``
of a binary mask and the colour of each label in a figure; volume tables take the column names.
Nothing else in the code base spells out the tissue classes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Label:
    name: str
    """BIDS ``label-`` value and volume-table column (letters and digits)."""
    value: int
    """Value in a dseg image (0 is background)."""
    colour: str
    """Hex colour in report figures."""
    description: str = ""


@dataclass(frozen=True)
class LabelSet:
    key: str
    """Short name of the set (``tissue``, ``lesion``); also its name in the dseg look-up registry."""
    labels: tuple[Label, ...]
    description: str = ""
    main_desc: str | None = None
    """``desc`` of the main answer's dseg and mask (None: plain ``dseg``, as fMRIPrep writes tissue)."""
    stats_desc: str | None = None
    """``desc`` of the main answer's per-object table (``desc-lesions_stats.tsv``)."""
    counted_as: str | None = None
    """Tissue label its voxels count as in the tissue classes (lesions are damaged white matter: a tissue
    segmentation's lesion voxels are relabelled WM, and the lesion volume is reported on its own)."""

    def __post_init__(self):
        values = [lab.value for lab in self.labels]
        if len(set(values)) != len(values) or 0 in values:
            raise ValueError(f"label set {self.key!r}: values must be distinct and non-zero, not {values}")
        for lab in self.labels:
            if not lab.name.isalnum():
                raise ValueError(f"label set {self.key!r}: label name {lab.name!r} must be letters and digits")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(lab.name for lab in self.labels)

    @property
    def values(self) -> tuple[int, ...]:
        return tuple(lab.value for lab in self.labels)

    def by_value(self) -> dict[int, str]:
        """``{dseg value: name}``: the rows of a dseg look-up table."""
        return {lab.value: lab.name for lab in self.labels}

    def colours(self) -> dict[str, str]:
        """``{name: hex colour}``."""
        return {lab.name: lab.colour for lab in self.labels}

    def __iter__(self):
        return iter(self.labels)

    def __len__(self) -> int:
        return len(self.labels)


TISSUE = LabelSet("tissue", (
    Label("CSF", 1, "#2c7fb8", "cerebrospinal fluid"),
    Label("GM", 2, "#31a354", "grey matter"),
    Label("WM", 3, "#fdae61", "white matter"),
), "brain tissue classes")

LESION = LabelSet("lesion", (
    Label("lesion", 1, "#e31a1c", "white-matter lesion (hyperintense on FLAIR/T2w)"),
), "white-matter lesions", main_desc="lesion", stats_desc="lesions", counted_as="WM")

BRAIN = "brain"
"""Volume-table row of the brain mask (the intracranial brain volume the tissue classes sum to)."""

VOLUME_LABELS = (*TISSUE.names, BRAIN)
"""Columns of the wide volume tables (group level), in report order."""


def tissue_volumes_mm3(probs, mask, voxel_mm3: float, fractions: bool) -> dict:
    """The rows of a volumes table: each tissue's volume inside ``mask``, and :data:`BRAIN`, the mask's.

    ``probs`` is (len(TISSUE), ...) on the mask's grid. When the maps are tissue fractions
    (``fractions``: the partial-volume refinement ran), a tissue's volume is its summed fraction, as
    SynthSeg and SAMSEG report soft volumes: a border voxel holds some of each tissue, and counting it
    whole for the likelier one moves volumes with the contrast and the voxel size. When they are a
    classifier's probabilities (Atropos' posteriors, a network's on its own 2 mm grid) they are not
    fractions, and the voxels of each label (the largest probability) are counted. A mask voxel given no
    probability at all counts as CSF, as the dseg labels it; the tissues always sum to the brain row.
    """
    import numpy as np

    m = np.asarray(mask) > 0
    p = np.asarray(probs, dtype=np.float64)[:, m]
    if not fractions:
        p = (np.arange(len(p))[:, None] == p.argmax(0)[None]).astype(np.float64)
    vols = {lab.name: float(p[k].sum() * voxel_mm3) for k, lab in enumerate(TISSUE)}
    if fractions:
        vols[TISSUE.names[0]] += float((p.sum(0) <= 0).sum() * voxel_mm3)
    vols[BRAIN] = float(m.sum() * voxel_mm3)
    return vols
