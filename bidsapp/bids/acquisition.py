"""Acquisition records: what scanner and protocol produced an image, in BIDS units.

Every anatomical image found by discovery gets an :class:`AcquisitionRecord` built from its
(inherited) JSON sidecar by :meth:`AcquisitionRecord.from_metadata`. The record travels into
derivative sidecars (``to_dict()``, key ``"Acquisition"``) and back to the group level
(``from_dict()``), so every area reads the same fields with the same units:

* times in seconds (RepetitionTime, EchoTime, InversionTime, RepetitionTimeExcitation,
  RepetitionTimePreparation), FlipAngle in degrees, MagneticFieldStrength in tesla;
* ``sequence_family``: one of ``MPRAGE``, ``SPGR``, ``TSE``, ``FLAIR``, ``UNKNOWN``
  (see :func:`infer_sequence_family` for the rule and ``family_source`` for which field decided);
* ``site``: the participants.tsv / sessions.tsv ``site`` column if given, else InstitutionName.

Real sidecars are often incomplete or sloppy. Nothing here raises: missing fields are listed in
``missing`` and described in ``warnings``; malformed values (text, NaN, out of range) are dropped
with a warning; times that are evidently in milliseconds (``RepetitionTime: 2300``) are converted
to seconds with a warning.

Group keys (:attr:`AcquisitionRecord.group_key`) group scans of the same scanner and protocol
family: ``<vendor>-<model>-<field>T-<family>``, e.g. ``siemens-prisma-3T-MPRAGE``. Vendor is a
short canonical name (``siemens``, ``ge``, ``philips``, ``canon``, ``toshiba``, ``hitachi``,
``uih``; otherwise the first word of Manufacturer), model is ManufacturersModelName lower-cased
with everything but letters and digits removed (so ``Prisma_fit`` and ``Prisma fit`` agree),
the field strength is snapped to the nearest nominal value within 10 % (2.89 -> 3T) and printed
without trailing zeros; any unknown part reads ``unknown``. Site and serial number are not part of
the key (two sites with the same scanner model and protocol family share a group; the ``site``
column keeps them apart where needed). :attr:`protocol_key` adds the rounded sequence parameters
(``...-MPRAGE-tr2300-te2.98-ti900-fa9``, times in ms) for telling protocol versions apart.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields

SEQUENCE_FAMILIES = ("MPRAGE", "SPGR", "TSE", "FLAIR", "UNKNOWN")
WEIGHTED_SUFFIXES = ("T1w", "T2w", "FLAIR", "PDw")
QMRI_SUFFIXES = ("T1map", "R1map", "R2starmap", "PDmap")

BIDS_NAMES = {
    "manufacturer": "Manufacturer",
    "model": "ManufacturersModelName",
    "device_serial": "DeviceSerialNumber",
    "institution": "InstitutionName",
    "field_strength": "MagneticFieldStrength",
    "sequence_family": "SequenceFamily",
    "pulse_sequence_type": "PulseSequenceType",
    "scanning_sequence": "ScanningSequence",
    "sequence_variant": "SequenceVariant",
    "repetition_time": "RepetitionTime",
    "echo_time": "EchoTime",
    "inversion_time": "InversionTime",
    "flip_angle": "FlipAngle",
    "repetition_time_excitation": "RepetitionTimeExcitation",
    "repetition_time_preparation": "RepetitionTimePreparation",
    "group_key": "acq_group",
}
"""Record attribute -> BIDS sidecar field (``SequenceFamily`` and ``acq_group`` are scanbridge's table
columns): the one translation between the two vocabularies. Units are the same on both sides (SI:
seconds, degrees, tesla)."""
ATTRIBUTES = {v: k for k, v in BIDS_NAMES.items()}
"""BIDS sidecar field -> record attribute."""
FAMILY_PARAMETERS = {
    "MPRAGE": {"required": ("InversionTime",), "optional": ("InversionRepetitionTime", "MagneticFieldStrength")},
    "SPGR": {"required": ("RepetitionTime", "EchoTime", "FlipAngle"), "optional": ("MagneticFieldStrength",)},
}
"""Sequence family -> the BIDS fields the physics-aware tissue model reads (required ones, without which
it falls back to the sequence-agnostic ablation; optional ones). Kept here, beside the vocabulary, so
planning a run (which images can borrow parameters) does not load the model."""


def lookup(values, bids_name: str):
    """A parameter from a dict or table row that may use either vocabulary (BIDS name first);
    None when absent or NaN."""
    for key in (bids_name, ATTRIBUTES.get(bids_name)):
        if key is None or key not in values:
            continue
        v = values[key]
        if not _absent(v):
            return v
    return None


def _absent(value) -> bool:
    """None, NaN or pandas' NA."""
    if value is None:
        return True
    try:
        return bool(value != value)
    except TypeError:  # pandas.NA compares to NA, which has no truth value
        return True


# Sidecar time field -> largest plausible value in seconds above which the number is read as
# milliseconds. Structural TRs reach ~15 s (TSE/FLAIR); TEs and excitation TRs stay well under 1 s;
# TIs stay under ~4 s.
_TIME_LIMITS = {"RepetitionTime": 16.0, "EchoTime": 1.0, "InversionTime": 10.0, "RepetitionTimeExcitation": 1.0,
                "RepetitionTimePreparation": 16.0}
_TIME_FIELDS = {name: (ATTRIBUTES[name], limit) for name, limit in _TIME_LIMITS.items()}
_TEXT_FIELDS = {name: ATTRIBUTES[name] for name in ("Manufacturer", "ManufacturersModelName", "DeviceSerialNumber",
                                                    "InstitutionName", "PulseSequenceType")}
_USED_FIELDS = ("Manufacturer", "ManufacturersModelName", "DeviceSerialNumber", "InstitutionName",
                "MagneticFieldStrength", "PulseSequenceType", "RepetitionTime", "EchoTime", "InversionTime",
                "FlipAngle", "RepetitionTimeExcitation", "RepetitionTimePreparation")
_SCANNER_FIELDS = ("Manufacturer", "ManufacturersModelName", "MagneticFieldStrength")
_NOMINAL_FIELDS = (0.2, 0.35, 0.5, 0.55, 1.0, 1.5, 3.0, 4.0, 7.0, 9.4, 10.5, 11.7)
_VENDORS = (
    ("siemens", "siemens"),
    ("general electric", "ge"),
    ("ge medical", "ge"),
    ("ge healthcare", "ge"),
    ("philips", "philips"),
    ("canon", "canon"),
    ("toshiba", "toshiba"),
    ("hitachi", "hitachi"),
    ("united imaging", "uih"),
    ("uih", "uih"),
)


@dataclass(frozen=True)
class AcquisitionRecord:
    """Scanner and protocol of one image; all numbers in BIDS units (SI: seconds and tesla; flip angle in
    degrees), ``None`` when unknown. Frozen: a record is what the sidecar said (or what was borrowed, as a
    new record: :mod:`bidsapp.bids.borrow`), passed as this object and turned into a dict only for a
    sidecar or a Nipype input (:meth:`to_dict`)."""

    source: str | None = None
    """Path of the image relative to the BIDS root (posix), e.g. ``sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz``."""
    suffix: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    device_serial: str | None = None
    institution: str | None = None
    field_strength: float | None = None
    sequence_family: str = "UNKNOWN"
    family_source: str = "none"
    """Which field decided the family: PulseSequenceType, ScanningSequence, InversionTime, RepetitionTime, suffix,
    borrowed (from another image of the dataset: :mod:`bidsapp.bids.borrow`) or none."""
    repetition_time: float | None = None
    echo_time: float | None = None
    inversion_time: float | None = None
    flip_angle: float | None = None
    repetition_time_excitation: float | None = None
    repetition_time_preparation: float | None = None
    pulse_sequence_type: str | None = None
    scanning_sequence: str | None = None
    sequence_variant: str | None = None
    site: str | None = None
    site_source: str | None = None
    """Where ``site`` came from: participants.tsv, sessions.tsv, InstitutionName or None."""
    missing: list[str] = field(default_factory=list)
    """Sidecar fields the app would use but did not find (or found malformed)."""
    parameters_from: str | None = None
    """Where the sequence parameters came from when the image's own sidecar lacked them (a path relative to
    the BIDS root; :mod:`bidsapp.bids.borrow`), else None."""
    warnings: list[str] = field(default_factory=list)
    """One-line messages, each naming the image."""

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_metadata(
        cls,
        metadata: dict | None,
        *,
        suffix: str | None = None,
        source: str | None = None,
        site: str | None = None,
        site_source: str | None = None,
        name: str | None = None,
        sidecar_problem: str | None = None,
    ) -> "AcquisitionRecord":
        """Build a record from a sidecar dict (as ``BIDSLayout.get_metadata`` returns it); never raises.

        ``name`` is how warnings refer to the image (default: ``source``); ``sidecar_problem`` says why
        the image's own sidecar gave nothing (e.g. ``"x.json is not valid JSON (ignored)"``), so that
        the warning does not claim there is none.
        """
        md = dict(metadata or {})
        v: dict = {"source": source, "suffix": suffix}  # the fields, gathered before the (frozen) record
        name = name or source or "image"
        problems: list[str] = []
        malformed: list[str] = []

        for key, attr in _TEXT_FIELDS.items():
            v[attr] = _text(md.get(key))
        for key, attr in (("ScanningSequence", "scanning_sequence"), ("SequenceVariant", "sequence_variant")):
            tokens = _tokens(md.get(key))
            v[attr] = "_".join(tokens) if tokens else None

        for key, (attr, limit_s) in _TIME_FIELDS.items():
            if key not in md:
                continue
            value, note = _number(md[key])
            if note:
                problems.append(f"{key} {note}")
            if value is None:
                malformed.append(key)
                continue
            if value > limit_s:
                problems.append(f"{key}={_fmt(value)} looks like milliseconds; using {_fmt(value / 1000.0)} s")
                value = value / 1000.0
            if value <= 0:
                problems.append(f"{key}={_fmt(value)} is not positive; ignored")
                malformed.append(key)
                continue
            v[attr] = value

        if "FlipAngle" in md:
            value, note = _number(md["FlipAngle"])
            if note:
                problems.append(f"FlipAngle {note}")
            if value is None or not (0 < value <= 180):
                if value is not None:
                    problems.append(f"FlipAngle={_fmt(value)} is outside (0, 180] degrees; ignored")
                malformed.append("FlipAngle")
            else:
                v["flip_angle"] = value

        if "MagneticFieldStrength" in md:
            value, note = _number(md["MagneticFieldStrength"])
            if note:
                problems.append(f"MagneticFieldStrength {note}")
            if value is not None and 1000 <= value <= 120000:
                problems.append(f"MagneticFieldStrength={_fmt(value)} looks like gauss; using {_fmt(value / 1e4)} T")
                value = value / 1e4
            if value is None or not (0 < value <= 12):
                if value is not None:
                    problems.append(f"MagneticFieldStrength={_fmt(value)} is not a plausible field in tesla; ignored")
                malformed.append("MagneticFieldStrength")
            else:
                v["field_strength"] = value

        v["sequence_family"], v["family_source"] = infer_sequence_family(
            suffix=suffix,
            pulse_sequence_type=v.get("pulse_sequence_type"),
            scanning_sequence=v.get("scanning_sequence"),
            sequence_variant=v.get("sequence_variant"),
            inversion_time=v.get("inversion_time"),
            repetition_time=v.get("repetition_time"),
        )
        family, tr = v["sequence_family"], v.get("repetition_time")
        # Gradient-echo TRs are tens of ms: 1..100 read as seconds is a millisecond value.
        if family == "SPGR" and tr is not None and 1.0 <= tr <= 100.0:
            problems.append(f"RepetitionTime={_fmt(tr)} is implausible for a gradient echo; using {_fmt(tr / 1000.0)} s")
            v["repetition_time"] = tr / 1000.0

        if site:
            v["site"], v["site_source"] = str(site), site_source or "participants.tsv"
        elif v.get("institution"):
            v["site"], v["site_source"] = v["institution"], "InstitutionName"

        wanted = list(_SCANNER_FIELDS)
        if suffix is None or suffix in WEIGHTED_SUFFIXES:
            wanted += ["RepetitionTime", "EchoTime", "FlipAngle"]
            if family in ("MPRAGE", "FLAIR"):
                wanted.append("InversionTime")
        present = {k for k, v in md.items() if v not in (None, "", [])}
        missing = [k for k in wanted if k not in present or k in malformed]
        missing += [k for k in malformed if k not in missing]
        warnings: list[str] = []

        if not md:
            why = (f"its sidecar {sidecar_problem}" if sidecar_problem
                   else "no sidecar metadata (no JSON sidecar, not even an inherited one)")
            warnings.append(f"{name}: {why}; unknown: {', '.join(missing)}; sequence family {family}")
        elif missing:
            warnings.append(f"{name}: sidecar is missing or has malformed {', '.join(missing)}")
        for p in problems:
            warnings.append(f"{name}: {p}")
        if md and family == "UNKNOWN" and (suffix is None or suffix in WEIGHTED_SUFFIXES):
            warnings.append(
                f"{name}: sequence family unknown (no usable PulseSequenceType, ScanningSequence or InversionTime)"
            )
        return cls(**v, missing=missing, warnings=warnings)

    # ------------------------------------------------------------------ keys
    @property
    def vendor(self) -> str:
        """Short canonical vendor name (``siemens``, ``ge``, ``philips``...) or ``unknown``."""
        return canonical_vendor(self.manufacturer)

    @property
    def field_label(self) -> str:
        """Nominal field strength as text, e.g. ``3T``, ``1.5T``, ``unknownT``."""
        return field_label(self.field_strength)

    @property
    def group_key(self) -> str:
        """``<vendor>-<model>-<field>T-<family>``, e.g. ``siemens-prisma-3T-MPRAGE`` (rule in the module docstring)."""
        model = _slug(self.model) or "unknown"
        return f"{self.vendor}-{model}-{self.field_label}-{self.sequence_family}"

    @property
    def protocol_key(self) -> str:
        """group_key plus rounded TR/TE/TI (ms) and flip angle (deg): tells protocol versions apart."""
        parts = [
            "tr" + _ms(self.repetition_time_preparation or self.repetition_time),
            "te" + _ms(self.echo_time),
            "ti" + _ms(self.inversion_time),
            "fa" + ("na" if self.flip_angle is None else f"{round(self.flip_angle):d}"),
        ]
        return self.group_key + "-" + "-".join(parts)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        """Plain JSON-ready dict of all fields plus ``group_key`` and ``protocol_key``."""
        d = asdict(self)
        d["group_key"] = self.group_key
        d["protocol_key"] = self.protocol_key
        return d

    def table_row(self) -> dict:
        """:meth:`to_dict` flattened for one row of an acquisitions table: ``acq_group`` first, the missing
        fields as one comma-separated cell, no warnings (they belong in the log, not in a table)."""
        row = {"acq_group": self.group_key, **self.to_dict()}
        row["missing"] = ",".join(self.missing)
        row.pop("warnings", None)
        return row

    @classmethod
    def from_dict(cls, d: dict) -> "AcquisitionRecord":
        """Inverse of :meth:`to_dict`; derived keys and unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in (d or {}).items() if k in names}
        for k in ("missing", "warnings"):
            kwargs[k] = list(kwargs.get(k) or [])
        return cls(**kwargs)

    def to_bids_fields(self) -> dict:
        """The known values under their BIDS sidecar names (for "acquisition parameters used")."""
        out = {name: getattr(self, ATTRIBUTES[name]) for name in _USED_FIELDS}
        return {k: v for k, v in out.items() if v is not None}


# ---------------------------------------------------------------------- family inference
def infer_sequence_family(
    *,
    suffix: str | None,
    pulse_sequence_type: str | None = None,
    scanning_sequence: str | None = None,
    sequence_variant: str | None = None,
    inversion_time: float | None = None,
    repetition_time: float | None = None,
) -> tuple[str, str]:
    """Return ``(family, deciding_field)``; the first rule that applies wins.

    1. suffix ``FLAIR`` -> FLAIR (the BIDS suffix is explicit).
    2. PulseSequenceType keywords: MP(2)RAGE/IR-(F)SPGR/BRAVO/TFE -> MPRAGE; FLAIR -> FLAIR (not for
       T1w); SPGR/FLASH/FFE/GRE/VIBE -> SPGR; TSE/FSE/SPACE/CUBE/VISTA/RARE/spin echo -> TSE.
    3. ScanningSequence (DICOM codes): GR with IR, a magnetization-prepared variant (MP) or an
       InversionTime -> MPRAGE; GR alone -> SPGR; SE with IR -> FLAIR for T2w/PDw or TI > 1.2 s;
       SE alone -> TSE.
    4. Without a sequence description: T1w with InversionTime -> MPRAGE; T1w with TR < 0.1 s -> SPGR;
       T2w with TI > 1.2 s -> FLAIR; T2w/PDw -> TSE (structural T2w/PDw are spin-echo trains).
    5. Otherwise (qMRI maps, unknown T1w) UNKNOWN.
    """
    if suffix == "FLAIR":
        return "FLAIR", "suffix"
    pst = re.sub(r"[^A-Z0-9]", "", (pulse_sequence_type or "").upper())
    if pst:
        if any(k in pst for k in ("MPRAGE", "MP2RAGE", "IRFSPGR", "IRSPGR", "BRAVO", "TFE")):
            return "MPRAGE", "PulseSequenceType"
        if "FLAIR" in pst and suffix != "T1w":
            return "FLAIR", "PulseSequenceType"
        if any(k in pst for k in ("SPGR", "FLASH", "FFE", "GRE", "GRADIENTECHO", "VIBE")):
            return "SPGR", "PulseSequenceType"
        if any(k in pst for k in ("TSE", "FSE", "SPACE", "CUBE", "VISTA", "RARE", "SPINECHO", "HASTE")):
            return "TSE", "PulseSequenceType"
    seq = set(_tokens(scanning_sequence))
    var = set(_tokens(sequence_variant))
    long_ti = inversion_time is not None and inversion_time > 1.2
    if "GR" in seq:
        if "IR" in seq or "MP" in var or inversion_time is not None:
            return "MPRAGE", "ScanningSequence"
        return "SPGR", "ScanningSequence"
    if "SE" in seq:
        if "IR" in seq:
            if suffix in ("T2w", "PDw") or long_ti:
                return "FLAIR", "ScanningSequence"
            return "UNKNOWN", "ScanningSequence"
        return "TSE", "ScanningSequence"
    if suffix == "T1w":
        if inversion_time is not None:
            return "MPRAGE", "InversionTime"
        if repetition_time is not None and repetition_time < 0.1:
            return "SPGR", "RepetitionTime"
    if suffix == "T2w" and long_ti:
        return "FLAIR", "InversionTime"
    if suffix in ("T2w", "PDw"):
        return "TSE", "suffix"
    return "UNKNOWN", "none"


# ---------------------------------------------------------------------- helpers
def canonical_vendor(manufacturer: str | None) -> str:
    """``"SIEMENS"``/``"Siemens Healthineers"`` -> ``siemens``, ``"GE MEDICAL SYSTEMS"`` -> ``ge``..."""
    text = " ".join(str(manufacturer or "").lower().replace("_", " ").split())
    if not text:
        return "unknown"
    for needle, name in _VENDORS:
        if text.startswith(needle) or f" {needle}" in f" {text}":
            return name
    if text.split()[0] == "ge":
        return "ge"
    return _slug(text.split()[0]) or "unknown"


def field_label(tesla: float | None) -> str:
    """Snap to a nominal field within 10 % and format without trailing zeros: 2.89 -> ``3T``."""
    if tesla is None or not math.isfinite(tesla) or tesla <= 0:
        return "unknownT"
    nominal = min(_NOMINAL_FIELDS, key=lambda f: abs(f - tesla))
    value = nominal if abs(nominal - tesla) <= 0.1 * nominal else round(tesla, 1)
    return f"{value:g}T"


def _slug(text: str | None) -> str:
    return re.sub(r"[^a-z0-9]", "", str(text or "").lower())


def _text(value) -> str | None:
    if value is None or isinstance(value, (dict, list)):
        return None
    text = str(value).strip()
    return text or None


def _tokens(value) -> list[str]:
    """DICOM multi-valued codes arrive as "GR\\IR", "GR_IR", "['GR', 'IR']" or a list."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value)
    return [t for t in re.split(r"[^A-Za-z0-9]+", str(value).upper()) if t]


def _number(value) -> tuple[float | None, str | None]:
    """Parse a sidecar number; returns (value or None, note about what was odd)."""
    note = None
    if isinstance(value, (list, tuple)):
        if not value:
            return None, "is an empty list"
        note = f"has {len(value)} values; using the first"
        value = value[0]
    if isinstance(value, bool):
        return None, "is a boolean, not a number"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None, f"is not a number ({str(value)[:30]!r})"
    if not math.isfinite(number):
        return None, "is not finite"
    return number, note


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "na"
    return f"{float(f'{seconds * 1000.0:.3g}'):g}"
