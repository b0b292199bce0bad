"""Acquisition protocols: sequence parameters in BIDS units, scanner identity, and BIDS sidecars.

A :class:`Protocol` is everything the simulator needs to produce one image and everything a real
sidecar would say about it.  Times are seconds, flip angles degrees, field strength tesla.  For MPRAGE
``tr`` is the inversion-to-inversion time (what Siemens reports as RepetitionTime, BIDS
RepetitionTimePreparation) and eq. 2's delay is ``td = tr - ti - tau``; give either ``tr`` or ``td``.

Public API
----------
``Protocol(name, sequence, suffix, field_strength, tr=None, te=None, ti=None, flip_angle=None, td=None,
tau=None, echo_spacing=None, manufacturer=..., model=..., institution=..., device_serial=...,
software_version=..., voxel_size=(1, 1, 1), acquisition="3D", orientation="RAS", snr=30.0, gain=1000.0,
bias=0.1, scanning_sequence=None, sequence_variant=None, scan_options=None, sequence_name=None,
pulse_sequence_type=None)``
    Frozen dataclass validated on construction: impossible parameters raise ``ValueError`` with a
    one-line message (unknown sequence, negative or zero times, TE >= TR, flip outside (0, 180],
    TI + tau > TR for MPRAGE, TI >= TR for FLAIR, field outside 0.5-11.7 T, non-positive voxel size or SNR).
    ``voxel_size`` is in mm along the R-L, A-P, S-I axes (a 2D axial protocol has its slice thickness
    last); ``orientation`` the axis codes of the stored array (e.g. ``"LIA"``, ``"RAS"``, ``"LPS"``).
    Methods: ``params() -> dict`` (short keys for :func:`bidsapp.physics.equations.signal`),
    ``sidecar() -> dict`` (BIDS JSON fields), ``replace(**changes) -> Protocol`` (re-validated; for
    MPRAGE, changing TI keeps TD and recomputes TR, as in the paper's TI sweep, unless TR is given).
``Site(name, institution, protocols, upgrade=None)``  one scanner site: ``protocols`` maps suffix
    (``T1w``, ``FLAIR``, ``T2w``, ``PDw``) -> Protocol; ``upgrade`` names the protocol set the site
    moves to in a protocol change (a dict of the same form).
``PROTOCOLS``  dict name -> Protocol of presets, among them ``mrainet-1.5T-spgr`` (1.5T SPGR, flip
    20, TR 13.8 ms, TE 2.8 ms), ``mrainet-3T-spgr`` (3T SPGR, flip 90, TR 7.9 ms, TE 4.5 ms),
    ``siemens-1.5T-mprage`` and ``siemens-3T-mprage`` (ADNI-style MPRAGE), ``paper-mprage`` (the
    physics paper's TD 600 ms, tau 10 ms, TI 900 ms), FLAIR, T2w and PDw protocols.
``SITES``  ordered dict site-id -> Site; ``--sites K`` takes the first K.
``get_protocol(name) -> Protocol``  preset lookup with a clear error.
``MODALITIES``  ("T1w", "FLAIR", "T2w", "PDw").
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .equations import SEQUENCES
from .tissues import FIELD_RANGE

MODALITIES = ("T1w", "FLAIR", "T2w", "PDw")
_AXES = {"L": "LR", "R": "LR", "A": "AP", "P": "AP", "S": "SI", "I": "SI"}


def _ms(x: float) -> str:
    return f"{x * 1000:g} ms"


@dataclass(frozen=True)
class Protocol:
    name: str
    sequence: str
    suffix: str
    field_strength: float
    tr: float | None = None
    te: float | None = None
    ti: float | None = None
    flip_angle: float | None = None
    td: float | None = None
    tau: float | None = None
    echo_spacing: float | None = None
    manufacturer: str = "Siemens"
    model: str = "unknown"
    institution: str = "unknown"
    device_serial: str = "unknown"
    software_version: str = "unknown"
    voxel_size: tuple = (1.0, 1.0, 1.0)
    acquisition: str = "3D"
    orientation: str = "RAS"
    snr: float = 30.0
    gain: float = 1000.0
    bias: float = 0.1
    scanning_sequence: str | None = None
    sequence_variant: str | None = None
    scan_options: str | None = None
    sequence_name: str | None = None
    pulse_sequence_type: str | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        seq = str(self.sequence).upper()
        if seq not in SEQUENCES:
            raise ValueError(f"protocol {self.name}: unknown sequence {self.sequence!r} "
                             f"(expected one of {', '.join(SEQUENCES)})")
        set_("sequence", seq)
        if self.suffix not in MODALITIES:
            raise ValueError(f"protocol {self.name}: unknown suffix {self.suffix!r} (expected {', '.join(MODALITIES)})")
        for k in ("field_strength", "tr", "te", "ti", "flip_angle", "td", "tau", "echo_spacing", "snr", "gain", "bias"):
            v = getattr(self, k)
            if v is None:
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"protocol {self.name}: {k} must be a finite number, got {v!r}")
            set_(k, float(v))
            if v < 0:
                raise ValueError(f"protocol {self.name}: negative {k} ({v})")
        b0 = self.field_strength
        if not FIELD_RANGE[0] <= b0 <= FIELD_RANGE[1]:
            raise ValueError(f"protocol {self.name}: field strength {b0:g} T outside {FIELD_RANGE[0]}-{FIELD_RANGE[1]} T")
        if seq == "MPRAGE":
            self._check_mprage(set_)
        else:
            need = {"SPGR": ("tr", "te", "flip_angle"), "TSE": ("tr", "te"), "FLAIR": ("tr", "te", "ti")}[seq]
            missing = [k for k in need if getattr(self, k) is None]
            if missing:
                raise ValueError(f"protocol {self.name}: {seq} needs {', '.join(missing)}")
            if self.tr <= 0:
                raise ValueError(f"protocol {self.name}: TR must be positive")
        if self.te is not None and self.tr is not None and seq != "MPRAGE" and self.te >= self.tr:
            raise ValueError(f"protocol {self.name}: TE ({_ms(self.te)}) must be shorter than TR ({_ms(self.tr)})")
        if self.te is not None and self.echo_spacing is not None and self.te >= self.echo_spacing:
            raise ValueError(f"protocol {self.name}: TE ({_ms(self.te)}) must be shorter than the echo spacing "
                             f"({_ms(self.echo_spacing)})")
        if self.flip_angle is not None and not 0 < self.flip_angle <= 180:
            raise ValueError(f"protocol {self.name}: flip angle {self.flip_angle:g} deg outside (0, 180]")
        if seq == "FLAIR" and self.ti >= self.tr:
            raise ValueError(f"protocol {self.name}: TI ({_ms(self.ti)}) must be shorter than TR ({_ms(self.tr)})")
        vs = tuple(float(v) for v in self.voxel_size)
        if len(vs) != 3 or any(not math.isfinite(v) or v <= 0 for v in vs):
            raise ValueError(f"protocol {self.name}: voxel size must be three positive numbers (mm), got {self.voxel_size!r}")
        set_("voxel_size", vs)
        o = str(self.orientation).upper()
        if len(o) != 3 or any(c not in _AXES for c in o) or len({_AXES[c] for c in o}) != 3:
            raise ValueError(f"protocol {self.name}: orientation {self.orientation!r} is not three axis codes like 'RAS'")
        set_("orientation", o)
        if self.acquisition not in ("2D", "3D"):
            raise ValueError(f"protocol {self.name}: acquisition must be '2D' or '3D'")
        if self.snr <= 0:
            raise ValueError(f"protocol {self.name}: SNR must be positive")

    def _check_mprage(self, set_):
        if self.ti is None or self.ti <= 0:
            raise ValueError(f"protocol {self.name}: MPRAGE needs a positive TI")
        tau = 0.010 if self.tau is None else self.tau
        set_("tau", tau)
        if self.tr is None and self.td is None:
            raise ValueError(f"protocol {self.name}: MPRAGE needs TR (inversion interval) or TD")
        if self.tr is None:
            set_("tr", self.ti + self.td + tau)
        elif self.td is None:
            if self.ti + tau > self.tr:
                raise ValueError(f"protocol {self.name}: TI + tau ({_ms(self.ti + tau)}) exceeds TR ({_ms(self.tr)})")
            set_("td", self.tr - self.ti - tau)
        elif not math.isclose(self.tr, self.ti + self.td + tau, rel_tol=1e-6, abs_tol=1e-9):
            raise ValueError(f"protocol {self.name}: TR ({_ms(self.tr)}) != TI + TD + tau ({_ms(self.ti + self.td + tau)})")
        if self.te is not None and self.te >= self.tr:
            raise ValueError(f"protocol {self.name}: TE ({_ms(self.te)}) must be shorter than TR ({_ms(self.tr)})")

    # ------------------------------------------------------------------
    def params(self) -> dict:
        """Parameters for :func:`bidsapp.physics.equations.signal` (seconds, degrees)."""
        keys = ("tr", "te", "ti", "flip_angle", "td", "tau")
        out = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        out["gain"] = self.gain
        return out

    def replace(self, **changes) -> "Protocol":
        if self.sequence == "MPRAGE" and "tr" not in changes and {"ti", "tau", "td"} & set(changes):
            changes["tr"] = None  # keep the delay TD (as the paper varies TI), recompute TR
        elif self.sequence == "MPRAGE" and "tr" in changes and "td" not in changes:
            changes["td"] = None  # a new inversion interval: recompute the delay
        return dataclasses.replace(self, **changes)

    @property
    def slice_thickness(self) -> float:
        return max(self.voxel_size) if self.acquisition == "2D" else self.voxel_size[2]

    def sidecar(self) -> dict:
        """BIDS sidecar fields (BIDS units), as dcm2niix writes them for a real scan of this protocol."""
        sc: dict = {
            "Modality": "MR",
            "MagneticFieldStrength": self.field_strength,
            "ImagingFrequency": round(42.577478 * self.field_strength, 4),
            "Manufacturer": self.manufacturer,
            "ManufacturersModelName": self.model,
            "DeviceSerialNumber": self.device_serial,
            "InstitutionName": self.institution,
            "SoftwareVersions": self.software_version,
            "ProtocolName": self.name,
            "SeriesDescription": self.name,
            "MRAcquisitionType": self.acquisition,
            "PulseSequenceType": self.pulse_sequence_type or _default_pulse_type(self.sequence),
            "ScanningSequence": self.scanning_sequence or _default_scanning(self.sequence),
            "SequenceVariant": self.sequence_variant or _default_variant(self.sequence),
        }
        if self.scan_options:
            sc["ScanOptions"] = self.scan_options
        if self.sequence_name:
            sc["SequenceName"] = self.sequence_name
        sc["SliceThickness"] = self.slice_thickness
        sc["RepetitionTime"] = self.tr
        if self.te is not None:
            sc["EchoTime"] = self.te
        if self.ti is not None:
            sc["InversionTime"] = self.ti
        if self.flip_angle is not None:
            sc["FlipAngle"] = self.flip_angle
        if self.sequence == "MPRAGE":
            sc["RepetitionTimePreparation"] = self.tr
            if self.echo_spacing is not None:
                sc["RepetitionTimeExcitation"] = self.echo_spacing
        elif self.sequence == "SPGR":
            sc["RepetitionTimeExcitation"] = self.tr
        if self.acquisition == "2D":
            sc["SpacingBetweenSlices"] = self.slice_thickness
        if self.sequence in ("TSE", "FLAIR"):
            sc["EchoTrainLength"] = 16
        if self.sequence in ("SPGR", "MPRAGE"):
            sc["SpoilingState"] = True
        sc["ParallelReductionFactorInPlane"] = 2 if self.field_strength >= 3 else 1
        sc["ReceiveCoilName"] = _COILS.get(self.manufacturer, "Head")
        sc["BodyPartExamined"] = "BRAIN"
        sc["PatientPosition"] = "HFS"
        sc["ImageType"] = ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"]
        sc["ConversionSoftware"] = "scanbridge-simulate"
        # Simulation-only values, so a consumer can reproduce the image from the truth maps.
        sc["SimulationParameters"] = {
            "SequenceFamily": self.sequence,
            "DelayTime": self.td,
            "SliceImagingTime": self.tau,
            "Gain": self.gain,
            "SNR": self.snr,
            "BiasFieldStrength": self.bias,
            "VoxelSize": list(self.voxel_size),
        }
        if self.sequence != "MPRAGE":
            del sc["SimulationParameters"]["DelayTime"], sc["SimulationParameters"]["SliceImagingTime"]
        return sc


_COILS = {"Siemens": "HeadNeck_20", "GE": "8HRBRAIN", "Philips": "SENSE-Head-8"}


def _default_pulse_type(seq: str) -> str:
    return {"SPGR": "Spoiled Gradient Echo", "MPRAGE": "MPRAGE", "TSE": "Turbo Spin Echo",
            "FLAIR": "Inversion Recovery Turbo Spin Echo"}[seq]


def _default_scanning(seq: str) -> str:
    return {"SPGR": "GR", "MPRAGE": "GR_IR", "TSE": "SE", "FLAIR": "SE_IR"}[seq]


def _default_variant(seq: str) -> str:
    return {"SPGR": "SS_SP", "MPRAGE": "SK_SP_MP", "TSE": "SK_SP", "FLAIR": "SK_SP_MP"}[seq]


@dataclass(frozen=True)
class Site:
    name: str
    institution: str
    protocols: dict = field(default_factory=dict)
    upgrade: dict | None = None


# ---------------------------------------------------------------------------------------- presets
_SIEMENS = dict(manufacturer="Siemens")
_GE = dict(manufacturer="GE")
_PHILIPS = dict(manufacturer="Philips")


def _siemens3t(**kw):
    return dict(_SIEMENS, field_strength=3.0, model="Prisma_fit", software_version="syngo MR E11", **kw)


def _siemens15t(**kw):
    return dict(_SIEMENS, field_strength=1.5, model="Avanto", software_version="syngo MR B17", **kw)


def _ge15t(**kw):
    return dict(_GE, field_strength=1.5, model="Signa Excite", software_version="14_LX_MR", **kw)


def _philips3t(**kw):
    return dict(_PHILIPS, field_strength=3.0, model="Achieva", software_version="3.2.3", **kw)


def _siemens7t(**kw):
    return dict(_SIEMENS, field_strength=7.0, model="MAGNETOM Terra", software_version="syngo MR E12U", **kw)


_MPRAGE_SIEMENS = dict(sequence="MPRAGE", suffix="T1w", scanning_sequence="GR_IR", sequence_variant="SK_SP_MP",
                       scan_options="IR", sequence_name="*tfl3d1_16ns", pulse_sequence_type="MPRAGE", tau=0.010)
_FLAIR2D = dict(sequence="FLAIR", suffix="FLAIR", acquisition="2D", scanning_sequence="SE_IR",
                sequence_variant="SK_SP_MP", scan_options="IR")
_TSE2D = dict(sequence="TSE", acquisition="2D", scanning_sequence="SE", sequence_variant="SK_SP")


def _p(name, **kw) -> Protocol:
    return Protocol(name=name, **kw)


_PRESETS = [
    # The two protocols of the MRAI-NET paper (section 3.1): Rotterdam Scan Study 1.5T and MRBrainS 3T.
    _p("mrainet-1.5T-spgr", sequence="SPGR", suffix="T1w", tr=0.0138, te=0.0028, flip_angle=20.0,
       orientation="LPS", snr=25.0, gain=1200.0, bias=0.08, sequence_name="efgre3d",
       scan_options="FAST_GEMS_EDR_GEMS", **_ge15t()),
    _p("mrainet-3T-spgr", sequence="SPGR", suffix="T1w", tr=0.0079, te=0.0045, flip_angle=90.0,
       orientation="LAS", snr=30.0, gain=800.0, bias=0.15, scanning_sequence="GR", sequence_variant="SP",
       sequence_name="T1FFE", **_philips3t()),
    # ADNI-style MPRAGE (ADNI MRI protocols): 3T TR 2300 ms, TI 900 ms, TE 2.98 ms, flip 9;
    # 1.5T TR 2400 ms, TI 1000 ms, TE 3.65 ms, flip 8 (1.2 mm sagittal slices).
    _p("siemens-3T-mprage", tr=2.3, ti=0.9, te=0.00298, flip_angle=9.0, echo_spacing=0.0071,
       orientation="LIA", snr=35.0, gain=1000.0, bias=0.15, **_MPRAGE_SIEMENS, **_siemens3t()),
    _p("siemens-1.5T-mprage", tr=2.4, ti=1.0, te=0.00365, flip_angle=8.0, echo_spacing=0.0087,
       voxel_size=(1.2, 1.25, 1.25), orientation="PIR", snr=25.0, gain=1100.0, bias=0.08,
       **_MPRAGE_SIEMENS, **_siemens15t()),
    # A later 3T protocol of the same site: longer TI and TR (a protocol upgrade to bridge).
    _p("siemens-3T-mprage-v2", tr=2.5, ti=1.1, te=0.00226, flip_angle=8.0, echo_spacing=0.0069,
       orientation="LIA", snr=35.0, gain=1000.0, bias=0.15, **_MPRAGE_SIEMENS, **_siemens3t()),
    # The physics-informed paper's simulation settings (TD 600 ms, tau 10 ms; TI varied 600-1200 ms).
    _p("paper-mprage", ti=0.9, td=0.6, te=0.003, flip_angle=9.0, orientation="RAS", snr=35.0, bias=0.1,
       **_MPRAGE_SIEMENS, **_siemens3t()),
    _p("siemens-7T-mprage", tr=2.8, ti=1.05, te=0.0023, flip_angle=7.0, echo_spacing=0.0065,
       orientation="LIA", snr=45.0, gain=900.0, bias=0.30, **_MPRAGE_SIEMENS, **_siemens7t()),
    # 2D FLAIR: TI chosen near the CSF null for the field's CSF T1 and the TR.
    _p("siemens-3T-flair", tr=9.0, te=0.081, ti=2.5, flip_angle=150.0, voxel_size=(1.0, 1.0, 3.0),
       orientation="LAS", snr=20.0, gain=1500.0, bias=0.15, sequence_name="*tir2d1_16", **_FLAIR2D, **_siemens3t()),
    _p("siemens-1.5T-flair", tr=8.0, te=0.100, ti=2.25, flip_angle=150.0, voxel_size=(1.0, 1.0, 4.0),
       orientation="LAS", snr=15.0, gain=1500.0, bias=0.08, sequence_name="*tir2d1_13", **_FLAIR2D, **_siemens15t()),
    _p("ge-1.5T-flair", tr=8.0, te=0.120, ti=2.25, flip_angle=90.0, voxel_size=(1.0, 1.0, 5.0),
       orientation="LPS", snr=15.0, gain=1800.0, bias=0.08, **_FLAIR2D, **_ge15t()),
    _p("philips-3T-flair", tr=11.0, te=0.125, ti=2.6, flip_angle=90.0, voxel_size=(1.0, 1.0, 3.0),
       orientation="LAS", snr=20.0, gain=1300.0, bias=0.15, **_FLAIR2D, **_philips3t()),
    _p("siemens-7T-flair", tr=10.0, te=0.090, ti=2.6, flip_angle=150.0, voxel_size=(0.8, 0.8, 2.0),
       orientation="LAS", snr=25.0, gain=1200.0, bias=0.30, **_FLAIR2D, **_siemens7t()),
    # 2D TSE: T2w (long TR, long TE) and PDw (long TR, short TE).
    _p("siemens-3T-t2w", suffix="T2w", tr=6.0, te=0.095, flip_angle=150.0, voxel_size=(1.0, 1.0, 3.0),
       orientation="LAS", snr=25.0, gain=1000.0, bias=0.15, sequence_name="*tse2d1_15", **_TSE2D, **_siemens3t()),
    _p("siemens-1.5T-t2w", suffix="T2w", tr=5.0, te=0.100, flip_angle=150.0, voxel_size=(1.0, 1.0, 4.0),
       orientation="LAS", snr=20.0, gain=1000.0, bias=0.08, sequence_name="*tse2d1_13", **_TSE2D, **_siemens15t()),
    _p("ge-1.5T-t2w", suffix="T2w", tr=4.0, te=0.100, flip_angle=90.0, voxel_size=(1.0, 1.0, 5.0),
       orientation="LPS", snr=20.0, gain=1200.0, bias=0.08, **_TSE2D, **_ge15t()),
    _p("philips-3T-t2w", suffix="T2w", tr=4.5, te=0.100, flip_angle=90.0, voxel_size=(1.0, 1.0, 3.0),
       orientation="LAS", snr=25.0, gain=900.0, bias=0.15, **_TSE2D, **_philips3t()),
    _p("siemens-7T-t2w", suffix="T2w", tr=8.0, te=0.070, flip_angle=120.0, voxel_size=(0.8, 0.8, 2.0),
       orientation="LAS", snr=30.0, gain=900.0, bias=0.30, **_TSE2D, **_siemens7t()),
    _p("siemens-3T-pdw", suffix="PDw", tr=3.0, te=0.012, flip_angle=150.0, voxel_size=(1.0, 1.0, 3.0),
       orientation="LAS", snr=30.0, gain=800.0, bias=0.15, **_TSE2D, **_siemens3t()),
    _p("siemens-1.5T-pdw", suffix="PDw", tr=3.0, te=0.015, flip_angle=150.0, voxel_size=(1.0, 1.0, 4.0),
       orientation="LAS", snr=25.0, gain=800.0, bias=0.08, **_TSE2D, **_siemens15t()),
    _p("ge-1.5T-pdw", suffix="PDw", tr=3.0, te=0.015, flip_angle=90.0, voxel_size=(1.0, 1.0, 5.0),
       orientation="LPS", snr=25.0, gain=1000.0, bias=0.08, **_TSE2D, **_ge15t()),
    _p("philips-3T-pdw", suffix="PDw", tr=3.0, te=0.012, flip_angle=90.0, voxel_size=(1.0, 1.0, 3.0),
       orientation="LAS", snr=30.0, gain=700.0, bias=0.15, **_TSE2D, **_philips3t()),
    _p("siemens-7T-pdw", suffix="PDw", tr=4.0, te=0.012, flip_angle=120.0, voxel_size=(0.8, 0.8, 2.0),
       orientation="LAS", snr=35.0, gain=700.0, bias=0.30, **_TSE2D, **_siemens7t()),
]
PROTOCOLS = {p.name: p for p in _PRESETS}


def get_protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown protocol preset {name!r}; known: {', '.join(PROTOCOLS)}") from None


def _site(sid: str, institution: str, serial: str, names: dict, upgrade: dict | None = None,
          upgrade_serial: str | None = None) -> Site:
    def resolve(d, ser):
        return {mod: get_protocol(n).replace(institution=institution, device_serial=ser) for mod, n in d.items()}

    return Site(sid, institution, resolve(names, serial),
                resolve(upgrade, upgrade_serial or serial) if upgrade else None)


_SIEMENS3T_SET = {"T1w": "siemens-3T-mprage", "FLAIR": "siemens-3T-flair", "T2w": "siemens-3T-t2w", "PDw": "siemens-3T-pdw"}
_SIEMENS3T_V2 = dict(_SIEMENS3T_SET, T1w="siemens-3T-mprage-v2")
_GE15T_SET = {"T1w": "mrainet-1.5T-spgr", "FLAIR": "ge-1.5T-flair", "T2w": "ge-1.5T-t2w", "PDw": "ge-1.5T-pdw"}
_PHILIPS3T_SET = {"T1w": "mrainet-3T-spgr", "FLAIR": "philips-3T-flair", "T2w": "philips-3T-t2w", "PDw": "philips-3T-pdw"}
_SIEMENS15T_SET = {"T1w": "siemens-1.5T-mprage", "FLAIR": "siemens-1.5T-flair", "T2w": "siemens-1.5T-t2w",
                   "PDw": "siemens-1.5T-pdw"}
_SIEMENS7T_SET = {"T1w": "siemens-7T-mprage", "FLAIR": "siemens-7T-flair", "T2w": "siemens-7T-t2w", "PDw": "siemens-7T-pdw"}

# Upgrades (--protocol-change): site1 changes its MPRAGE protocol on the same scanner (TI 900 -> 1100 ms);
# site2 replaces its 1.5T GE (MRAI-NET 1.5T SPGR) by the MRAI-NET 3T Philips; site3 replaces its Philips
# 3T SPGR by a Siemens 3T MPRAGE; site4 goes from 1.5T to 3T Siemens; site5 from 7T to the 3T set.
SITES = {
    s.name: s
    for s in (
        _site("site1", "Simulated Site 1", "SIM31001", _SIEMENS3T_SET, _SIEMENS3T_V2),
        _site("site2", "Simulated Site 2", "SIM15002", _GE15T_SET, _PHILIPS3T_SET, "SIM30002"),
        _site("site3", "Simulated Site 3", "SIM30003", _PHILIPS3T_SET, _SIEMENS3T_SET, "SIM30013"),
        _site("site4", "Simulated Site 4", "SIM15004", _SIEMENS15T_SET, _SIEMENS3T_SET, "SIM30004"),
        _site("site5", "Simulated Site 5", "SIM70005", _SIEMENS7T_SET, _SIEMENS3T_SET, "SIM30005"),
    )
}
