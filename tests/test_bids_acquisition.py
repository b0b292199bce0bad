"""Acquisition records: units, sanity conversions, sequence families, group keys, serialisation."""

from __future__ import annotations

import json

import pytest
from bids_support import MPRAGE, SPGR

from bidsapp.bids.acquisition import AcquisitionRecord, canonical_vendor, field_label, infer_sequence_family

SRC = "sub-01/anat/sub-01_T1w.nii.gz"


def rec(md, suffix="T1w", **kw):
    return AcquisitionRecord.from_metadata(md, suffix=suffix, source=SRC, **kw)


def test_complete_mprage_sidecar():
    r = rec(MPRAGE)
    assert (r.manufacturer, r.model, r.field_strength) == ("Siemens", "Prisma_fit", 3.0)
    assert (r.repetition_time, r.echo_time, r.inversion_time, r.flip_angle) == (2.3, 0.00226, 0.9, 8.0)
    assert r.sequence_family == "MPRAGE" and r.family_source == "ScanningSequence"
    assert r.missing == [] and r.warnings == []
    assert r.site == "Hospital A" and r.site_source == "InstitutionName"
    assert r.group_key == "siemens-prismafit-3T-MPRAGE"
    assert r.protocol_key == "siemens-prismafit-3T-MPRAGE-tr2300-te2.26-ti900-fa8"


def test_site_from_participants_wins_over_institution():
    r = rec(MPRAGE, site="S2", site_source="sessions.tsv")
    assert (r.site, r.site_source) == ("S2", "sessions.tsv")


def test_spgr_group_key_and_vendor_normalisation():
    r = rec(SPGR)
    assert r.sequence_family == "SPGR"
    assert r.group_key == "ge-discoverymr750-1.5T-SPGR"
    assert r.site is None and r.missing == []


def test_milliseconds_are_flagged_and_converted():
    md = dict(MPRAGE, RepetitionTime=2300, EchoTime=2.26, InversionTime=900,
              RepetitionTimeExcitation=7.1, RepetitionTimePreparation=2300)
    r = rec(md)
    assert r.repetition_time == pytest.approx(2.3) and r.echo_time == pytest.approx(0.00226)
    assert r.inversion_time == pytest.approx(0.9)
    assert r.repetition_time_excitation == pytest.approx(0.0071) and r.repetition_time_preparation == pytest.approx(2.3)
    flagged = [w for w in r.warnings if "looks like milliseconds" in w]
    assert len(flagged) == 5 and all(w.startswith(SRC + ": ") for w in flagged)
    assert any("RepetitionTime=2300 looks like milliseconds; using 2.3 s" in w for w in flagged)
    assert r.group_key == rec(MPRAGE).group_key


def test_gradient_echo_tr_in_ms_below_the_generic_threshold():
    r = rec(dict(SPGR, RepetitionTime=8.2))
    assert r.repetition_time == pytest.approx(0.0082)
    assert any("implausible for a gradient echo" in w for w in r.warnings)
    # a 8.2 s TR is fine for a spin echo
    assert rec(dict(SPGR, RepetitionTime=8.2, ScanningSequence="SE"), suffix="T2w").repetition_time == 8.2


def test_field_in_gauss_and_nominal_snapping():
    r = rec(dict(MPRAGE, MagneticFieldStrength=15000))
    assert r.field_strength == 1.5 and any("looks like gauss" in w for w in r.warnings)
    assert rec(dict(MPRAGE, MagneticFieldStrength=2.89362)).group_key == "siemens-prismafit-3T-MPRAGE"
    assert field_label(None) == "unknownT" and field_label(0.064) == "0.1T" and field_label(7) == "7T"


def test_missing_fields_are_listed_never_raised():
    r = rec({"Manufacturer": "Philips Medical Systems", "RepetitionTime": 0.0081})
    assert r.missing == ["ManufacturersModelName", "MagneticFieldStrength", "EchoTime", "FlipAngle"]
    assert r.warnings[0] == f"{SRC}: sidecar is missing or has malformed ManufacturersModelName, MagneticFieldStrength, EchoTime, FlipAngle"
    assert r.group_key == "philips-unknown-unknownT-SPGR"  # T1w with a short TR
    empty = rec({}, name="/bids/" + SRC)
    assert empty.sequence_family == "UNKNOWN"
    assert empty.warnings == [f"/bids/{SRC}: no sidecar metadata (no JSON sidecar, not even an inherited one); unknown: "
                              "Manufacturer, ManufacturersModelName, MagneticFieldStrength, RepetitionTime, EchoTime, "
                              "FlipAngle; sequence family UNKNOWN"]
    assert empty.group_key == "unknown-unknown-unknownT-UNKNOWN"


@pytest.mark.parametrize(
    "field, value, expect",
    [
        ("RepetitionTime", "abc", "is not a number"),
        ("RepetitionTime", True, "is a boolean"),
        ("RepetitionTime", -1, "is not positive"),
        ("FlipAngle", 400, "outside (0, 180]"),
        ("MagneticFieldStrength", 50, "not a plausible field"),
        ("EchoTime", None, "missing or has malformed"),
    ],
)
def test_malformed_values_are_dropped_with_a_warning(field, value, expect):
    r = rec(dict(MPRAGE, **{field: value}))
    assert field in r.missing
    assert any(expect in w and field in w for w in r.warnings), r.warnings


def test_multi_echo_list_uses_first_value():
    r = rec(dict(MPRAGE, EchoTime=[0.0016, 0.0035, 0.0054]))
    assert r.echo_time == 0.0016 and any("has 3 values" in w for w in r.warnings)


def test_numbers_given_as_text_are_accepted():
    assert rec(dict(MPRAGE, RepetitionTime="2.3")).repetition_time == 2.3


@pytest.mark.parametrize(
    "kwargs, family, source",
    [
        ({"suffix": "FLAIR"}, "FLAIR", "suffix"),
        ({"suffix": "T1w", "pulse_sequence_type": "MPRAGE"}, "MPRAGE", "PulseSequenceType"),
        ({"suffix": "T1w", "pulse_sequence_type": "IR-FSPGR"}, "MPRAGE", "PulseSequenceType"),
        ({"suffix": "T1w", "pulse_sequence_type": "Spoiled Gradient Echo (SPGR)"}, "SPGR", "PulseSequenceType"),
        ({"suffix": "T2w", "pulse_sequence_type": "Turbo Spin Echo"}, "TSE", "PulseSequenceType"),
        ({"suffix": "T2w", "pulse_sequence_type": "T2 FLAIR SPACE"}, "FLAIR", "PulseSequenceType"),
        ({"suffix": "T1w", "scanning_sequence": "GR", "sequence_variant": "SP"}, "SPGR", "ScanningSequence"),
        ({"suffix": "T1w", "scanning_sequence": "['GR', 'IR']"}, "MPRAGE", "ScanningSequence"),
        ({"suffix": "T1w", "scanning_sequence": "GR", "sequence_variant": "SK\\SP\\MP"}, "MPRAGE", "ScanningSequence"),
        ({"suffix": "T2w", "scanning_sequence": "SE_IR", "inversion_time": 2.5}, "FLAIR", "ScanningSequence"),
        ({"suffix": "PDw", "scanning_sequence": "SE"}, "TSE", "ScanningSequence"),
        ({"suffix": "T1w", "inversion_time": 1.0}, "MPRAGE", "InversionTime"),
        ({"suffix": "T1w", "repetition_time": 0.02}, "SPGR", "RepetitionTime"),
        ({"suffix": "T1w", "repetition_time": 0.5}, "UNKNOWN", "none"),
        ({"suffix": "T2w", "inversion_time": 2.2}, "FLAIR", "InversionTime"),
        ({"suffix": "T2w"}, "TSE", "suffix"),
        ({"suffix": "T1map"}, "UNKNOWN", "none"),
    ],
)
def test_sequence_family_rules(kwargs, family, source):
    assert infer_sequence_family(**kwargs) == (family, source)


def test_qmri_maps_only_need_scanner_fields():
    r = rec({"Manufacturer": "Siemens", "ManufacturersModelName": "Skyra", "MagneticFieldStrength": 3}, suffix="R1map")
    assert r.missing == [] and r.warnings == []
    assert r.group_key == "siemens-skyra-3T-UNKNOWN"


def test_vendor_names():
    assert canonical_vendor("SIEMENS") == canonical_vendor("Siemens Healthineers") == "siemens"
    assert canonical_vendor("GE MEDICAL SYSTEMS") == canonical_vendor("GE") == "ge"
    assert canonical_vendor("Philips Healthcare") == "philips"
    assert canonical_vendor("UIH") == "uih" and canonical_vendor("Bruker BioSpin") == "bruker"
    assert canonical_vendor(None) == "unknown"


def test_model_spelling_variants_share_a_group():
    keys = {rec(dict(MPRAGE, ManufacturersModelName=m)).group_key for m in ("Prisma_fit", "Prisma fit", "PRISMA-FIT")}
    assert keys == {"siemens-prismafit-3T-MPRAGE"}
    assert rec(dict(MPRAGE, ManufacturersModelName="Skyra")).group_key != rec(MPRAGE).group_key


def test_dict_round_trip_through_json():
    r = rec(dict(MPRAGE, RepetitionTime=2300), site="A", site_source="participants.tsv")
    d = json.loads(json.dumps(r.to_dict()))
    assert d["group_key"] == r.group_key and d["protocol_key"] == r.protocol_key
    back = AcquisitionRecord.from_dict(d)
    assert back == r and back.group_key == r.group_key
    assert AcquisitionRecord.from_dict({"sequence_family": "SPGR", "unknown_key": 1}).sequence_family == "SPGR"


def test_bids_fields_for_sidecars():
    f = rec(dict(MPRAGE, RepetitionTimePreparation=2.3)).to_bids_fields()
    assert f["RepetitionTime"] == 2.3 and f["RepetitionTimePreparation"] == 2.3 and f["MagneticFieldStrength"] == 3.0
    assert "RepetitionTimeExcitation" not in f


def test_one_vocabulary_reads_either_spelling():
    import numpy as np
    import pandas as pd

    from bidsapp.bids.acquisition import ATTRIBUTES, BIDS_NAMES, lookup

    assert BIDS_NAMES["repetition_time"] == "RepetitionTime" and ATTRIBUTES["RepetitionTime"] == "repetition_time"
    row = pd.Series({"SequenceFamily": pd.NA, "sequence_family": "MPRAGE", "EchoTime": np.nan, "echo_time": 0.003,
                     "FlipAngle": 9.0})
    assert lookup(row, "SequenceFamily") == "MPRAGE"       # NA under the BIDS name: the record name is read
    assert lookup(row, "EchoTime") == 0.003 and lookup(row, "FlipAngle") == 9.0
    assert lookup({"inversion_time": 0.9}, "InversionTime") == 0.9 and lookup({}, "InversionTime") is None
