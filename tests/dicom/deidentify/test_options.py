"""The profile options end to end: what each keeps or cleans, and how the output is marked.

Expectations come from the Annex E table (what the standard says each option does to each
attribute) and from the keyed functions in ``pseudonym``; the engine's own code is not consulted.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from pydicom import config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.valuerep import validate_value

from triage_app.dicom.deidentify import (
    DeidConfig,
    Deidentifier,
    ProfileOption,
    SafePrivateTag,
    load_table,
    parse_safe_private,
)
from triage_app.dicom.deidentify.table import Action, Rule
from triage_app.dicom.deidentify.values import dummy_value, shift_date, shift_datetime
from triage_app.dicom.pseudonym import MAX_DATE_SHIFT_DAYS, date_shift_days, pseudonymous_uid

SECRET = bytes(range(32))
NAME = "Okonkwo^Adaeze"
MRN = "MRN40817263"
# PS3.16 CID 7050 De-identification Method, scheme DCM.
CID_7050 = {
    ProfileOption.CLEAN_GRAPHICS: "113103",
    ProfileOption.CLEAN_STRUCTURED_CONTENT: "113104",
    ProfileOption.CLEAN_DESCRIPTORS: "113105",
    ProfileOption.RETAIN_LONGITUDINAL_FULL_DATES: "113106",
    ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES: "113107",
    ProfileOption.RETAIN_PATIENT_CHARACTERISTICS: "113108",
    ProfileOption.RETAIN_DEVICE_IDENTITY: "113109",
    ProfileOption.RETAIN_UIDS: "113110",
    ProfileOption.RETAIN_SAFE_PRIVATE: "113111",
    ProfileOption.RETAIN_INSTITUTION_IDENTITY: "113112",
}
ALL_COMPATIBLE = frozenset(ProfileOption) - {ProfileOption.RETAIN_LONGITUDINAL_FULL_DATES}
# Values valid for each VR this test fills in; text values are built per attribute below.
_NUMBERS: dict[str, Any] = {"DS": "70.5", "IS": "12", "US": 3, "SS": -3, "FL": 1.5, "FD": 2.5}
_NUMBERS |= {"UL": 7, "SL": -7, "AS": "042Y"}
_TEXT = frozenset({"AE", "CS", "LO", "SH", "ST", "LT", "UT", "UC"})
_DATES = {"DA": "20210506", "DT": "20210506101500.25+0100", "TM": "101500"}
# Groups the data set does not carry (command, file meta, directory) and what the engine writes.
_SKIPPED_GROUPS = (0x0000, 0x0002, 0x0004)
_MARKING = frozenset({0x00120062, 0x00120063, 0x00120064, 0x00280303})


def _patient(patient_id: str = MRN, name: str = NAME) -> Dataset:
    ds = Dataset()
    ds.PatientName = name
    ds.PatientID = patient_id
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.1.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1"
    ds.Modality = "CT"
    return ds


def _deidentify(ds: Dataset, *options: ProfileOption, **config: Any) -> Dataset:
    Deidentifier(SECRET, DeidConfig(options=frozenset(options), **config)).deidentify(ds)
    return ds


def _vr(tag: int, rule: Rule) -> str | None:
    try:
        vr = str(dictionary_VR(tag))
    except KeyError:  # newer than pydicom: the table judged its VR by the keyword
        return "DT" if rule.keyword.endswith("DateTime") else None
    return vr if vr in _TEXT or vr in _DATES or vr in _NUMBERS or vr == "UI" else None


def _value(vr: str, index: int, *, identifying: bool) -> Any:
    """A valid value; text meant to be cleaned carries the patient's surname."""
    if vr in _DATES:
        return _DATES[vr]
    if vr in _NUMBERS:
        return _NUMBERS[vr]
    if vr == "UI":
        return f"1.2.826.0.1.3680043.10.9.{index}"
    return f"NOTE OKONKWO {index}" if identifying else f"KEEP {index}"


def _attributes(option: ProfileOption) -> Iterator[tuple[int, str, Rule]]:
    """Every plain attribute the option changes, with the VR a test value is written in."""
    for tag, rule in load_table().by_tag.items():
        if option not in rule.options or tag >> 16 in _SKIPPED_GROUPS or tag in _MARKING:
            continue
        vr = _vr(tag, rule)
        if vr is not None:
            yield tag, vr, rule


def _dataset_for(option: ProfileOption) -> tuple[Dataset, dict[int, tuple[str, Any]]]:
    ds = _patient()
    originals: dict[int, tuple[str, Any]] = {}
    for index, (tag, vr, rule) in enumerate(_attributes(option)):
        if tag in ds:
            continue
        identifying = rule.options[option] is Action.CLEAN and vr in _TEXT
        value = _value(vr, index, identifying=identifying)
        validate_value(vr, value, config.RAISE)
        ds.add(DataElement(tag, vr, value))
        originals[tag] = (vr, value)
    assert originals, option
    return ds, originals


def _is_empty(value: object) -> bool:
    return value is None or value == "" or value == []


def _check_kept_or_cleaned(
    option: ProfileOption, ds: Dataset, tag: int, vr: str, original: Any
) -> None:
    action = load_table().by_tag[tag].action(frozenset({option}))
    where = f"{tag:08X} under {option.value}"
    assert tag in ds, where
    value = ds[tag].value
    if action is Action.KEEP:
        assert value == original, where
        return
    assert action is Action.CLEAN, where
    shift = date_shift_days(SECRET, f"id:{MRN}")
    if vr == "DA" and option is ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES:
        assert value == shift_date(original, shift), where
    elif vr == "DT" and option is ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES:
        assert value == shift_datetime(original, shift), where
    elif vr == "TM":
        assert value == original, where  # whole-day shifts keep the time of day
    elif vr == "AE":
        assert value and value != original and original not in value, where
        validate_value("AE", value, config.RAISE)
    else:
        assert vr in _TEXT, where
        text = str(value)
        assert "OKONKWO" not in text.upper(), where
        assert text.startswith("NOTE") and text.split()[-1] == original.split()[-1], where


def _check_basic(ds: Dataset, tag: int, vr: str, original: Any) -> None:
    rule = load_table().by_tag[tag]
    where = f"{tag:08X} ({rule.keyword}, {rule.basic_text}) without options"
    if rule.basic is Action.REMOVE:
        assert tag not in ds, where
    elif rule.basic is Action.ZERO:
        assert tag in ds and _is_empty(ds[tag].value), where
    elif rule.basic is Action.DUMMY:
        assert tag in ds, where
        assert ds[tag].value == (
            pseudonymous_uid(SECRET, original) if vr == "UI" else dummy_value(vr)
        )
    else:
        assert rule.basic is Action.UID, where
        assert ds[tag].value == pseudonymous_uid(SECRET, original), where


# --- each option: the table's attributes, with and without it ------------------------------------

_PLAIN_OPTIONS = [o for o in ProfileOption if any(True for _ in _attributes(o))]


def test_every_option_but_safe_private_changes_plain_attributes() -> None:
    # Safe private works on private groups and the Clean options mostly on sequences: tested below.
    assert set(ProfileOption) - set(_PLAIN_OPTIONS) <= {
        ProfileOption.RETAIN_SAFE_PRIVATE,
        ProfileOption.CLEAN_STRUCTURED_CONTENT,
        ProfileOption.CLEAN_GRAPHICS,
    }


@pytest.mark.parametrize("option", _PLAIN_OPTIONS, ids=lambda o: o.value)
def test_option_keeps_or_cleans_what_the_table_says(option: ProfileOption) -> None:
    ds, originals = _dataset_for(option)
    _deidentify(ds, option)
    for tag, (vr, original) in originals.items():
        _check_kept_or_cleaned(option, ds, tag, vr, original)


@pytest.mark.parametrize("option", _PLAIN_OPTIONS, ids=lambda o: o.value)
def test_without_the_option_the_basic_profile_applies(option: ProfileOption) -> None:
    ds, originals = _dataset_for(option)
    _deidentify(ds)
    for tag, (vr, original) in originals.items():
        _check_basic(ds, tag, vr, original)


def test_retain_uids_keeps_uids_inside_reference_sequences() -> None:
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.10.1.2"
    ds = _patient()
    ds.ReferencedImageSequence = Sequence([item])
    kept = _deidentify(ds, ProfileOption.RETAIN_UIDS)
    assert kept.ReferencedImageSequence[0].ReferencedSOPInstanceUID == item.ReferencedSOPInstanceUID
    assert kept.SOPInstanceUID == "1.2.826.0.1.3680043.10.1.1"

    ds = _patient()
    ds.ReferencedImageSequence = Sequence([item])
    remapped = _deidentify(ds)
    reference = remapped.ReferencedImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == pseudonymous_uid(
        SECRET, "1.2.826.0.1.3680043.10.1.2"
    )
    assert reference.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # a class is no identity
    assert remapped.SOPInstanceUID == pseudonymous_uid(SECRET, "1.2.826.0.1.3680043.10.1.1")


def _content_item(text: str) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    concept = Dataset()
    concept.CodeValue = "121071"
    concept.CodingSchemeDesignator = "DCM"
    concept.CodeMeaning = "Finding"
    item.ConceptNameCodeSequence = Sequence([concept])
    item.TextValue = text
    return item


def test_clean_structured_content_keeps_cleaned_content() -> None:
    ds = _patient()
    ds.ContentSequence = Sequence([_content_item("Okonkwo: nodule 4 mm, seen 2021-05-06")])
    _deidentify(ds, ProfileOption.CLEAN_STRUCTURED_CONTENT)
    text = ds.ContentSequence[0].TextValue
    assert "Okonkwo" not in text and "2021" not in text
    assert "nodule 4 mm" in text
    assert ds.ContentSequence[0].ConceptNameCodeSequence[0].CodeValue == "121071"


def test_clean_structured_content_cleans_text_without_the_patients_identifiers() -> None:
    """Others' dates, phone numbers and IDs identify someone too: cleaned without a patient hit."""
    ds = _patient()
    ds.ContentSequence = Sequence(
        [_content_item("Previous exam on 2021-03-04, call 555-0199, ref Dr House, MRN-4711")]
    )
    _deidentify(ds, ProfileOption.CLEAN_STRUCTURED_CONTENT)
    text = ds.ContentSequence[0].TextValue
    for gone in ("2021", "555", "House", "4711"):
        assert gone not in text, text
    assert text.startswith("Previous exam on")
    assert ds.ContentSequence[0].ConceptNameCodeSequence[0].CodeValue == "121071"  # a code


def test_clean_descriptors_cleans_descriptions_by_pattern() -> None:
    ds = _patient()
    ds.ImageComments = "tel 555-0199, ref Dr House, born 15th Feb 1980"
    ds.StudyDescription = "CT CHEST for order 99887766"
    _deidentify(ds, ProfileOption.CLEAN_DESCRIPTORS)
    assert ds.StudyDescription == "CT CHEST for order"
    for gone in ("555", "House", "Feb", "1980"):
        assert gone not in ds.ImageComments


def test_without_clean_structured_content_free_text_does_not_survive() -> None:
    # Content Sequence is X/D: the Basic Profile removes or replaces it; only the option keeps
    # (cleaned) content. Text naming someone else, or a date, must not come through.
    ds = _patient()
    ds.ContentSequence = Sequence([_content_item("Seen by Dr Smith at St Mary, 2021-05-06")])
    _deidentify(ds)
    texts = [str(item.get("TextValue", "")) for item in ds.get("ContentSequence", [])]
    assert not any("Smith" in t or "2021" in t for t in texts), texts


def _annotated() -> Dataset:
    text = Dataset()
    text.UnformattedTextValue = "Okonkwo R"
    text.AnchorPointAnnotationUnits = "PIXEL"
    graphic = Dataset()
    graphic.GraphicAnnotationUnits = "PIXEL"
    graphic.GraphicDimensions = 2
    graphic.NumberOfGraphicPoints = 2
    graphic.GraphicData = [1.0, 2.0, 3.0, 4.0]
    graphic.GraphicType = "POLYLINE"
    layer = Dataset()
    layer.GraphicLayer = "LAYER1"
    layer.TextObjectSequence = Sequence([text])
    layer.GraphicObjectSequence = Sequence([graphic])
    ds = _patient()
    ds.GraphicAnnotationSequence = Sequence([layer])
    return ds


def test_clean_graphics_keeps_graphic_annotations_without_identifiers() -> None:
    ds = _deidentify(_annotated(), ProfileOption.CLEAN_GRAPHICS)
    layer = ds.GraphicAnnotationSequence[0]
    assert layer.GraphicLayer == "LAYER1"
    assert layer.GraphicObjectSequence[0].GraphicData == [1.0, 2.0, 3.0, 4.0]
    # Unformatted Text Value is new in 2026c (D, no option columns): it is never kept as is.
    assert "Okonkwo" not in str(layer.TextObjectSequence[0].get("UnformattedTextValue", ""))


# --- overlays and curves -----------------------------------------------------------------------

_OVERLAY = {
    0x60000010: ("US", 4),  # Overlay Rows
    0x60000011: ("US", 8),  # Overlay Columns
    0x60000040: ("CS", "G"),  # Overlay Type
    0x60000050: ("SS", [1, 1]),  # Overlay Origin
    0x60000100: ("US", 1),  # Overlay Bits Allocated
    0x60000102: ("US", 0),  # Overlay Bit Position
    0x60001500: ("LO", "Okonkwo arrow"),  # Overlay Label
    0x60003000: ("OW", b"\xff\x00\x0f\xf0"),  # Overlay Data (4 x 8 bits)
    0x60024000: ("LT", "Okonkwo note"),  # Overlay Comments, second overlay group
}
_CURVE = {
    0x50000005: ("US", 1),  # Curve Dimensions
    0x50000010: ("US", 2),  # Number of Points
    0x50000020: ("CS", "TAC"),  # Type of Data
    0x50000022: ("LO", "Okonkwo curve"),  # Curve Description
    0x50000103: ("US", 0),  # Data Value Representation
    0x50003000: ("OW", b"\x01\x00\x02\x00"),  # Curve Data
}


def _private_tags(ds: Dataset) -> list[int]:
    return [element.tag for element in ds if element.tag.is_private]


def _with_graphics() -> Dataset:
    ds = _patient()
    for tag, (vr, value) in (_OVERLAY | _CURVE).items():
        ds.add(DataElement(tag, vr, value))
    return ds


def test_default_removes_whole_overlay_and_curve_groups() -> None:
    ds = _deidentify(_with_graphics())
    assert not [element.tag for element in ds if element.tag.group >> 8 in (0x50, 0x60)]


def test_clean_graphics_keeps_curves_with_text_scrubbed() -> None:
    ds = _deidentify(_with_graphics(), ProfileOption.CLEAN_GRAPHICS)
    for tag, (_, value) in _CURVE.items():
        assert tag in ds, f"{tag:08X}"
        if isinstance(value, str) and "Okonkwo" in value:
            assert "Okonkwo" not in str(ds[tag].value)
            assert str(ds[tag].value).strip() == value.replace("Okonkwo", "").strip()
        else:
            assert ds[tag].value == value, f"{tag:08X}"


def test_clean_graphics_removes_overlays_with_their_bitmaps() -> None:
    """Clean Graphics (113103) promises graphics without identifiers; an overlay bitmap may be
    a rendered name banner that no text rule can clean, so the whole overlay goes."""
    ds = _with_graphics()
    banner = np.zeros((16, 64), dtype=np.uint8)
    banner[4:12, 2:60] = 1  # stands for rendered text
    ds.add(DataElement(0x60003000, "OW", np.packbits(banner, bitorder="little").tobytes()))
    ds = _deidentify(ds, ProfileOption.CLEAN_GRAPHICS)
    assert not [element.tag for element in ds if element.tag.group >> 8 == 0x60]
    assert "113103" in _codes(ds)


def test_clean_graphics_cleans_curve_text_like_every_clean() -> None:
    # Clean (C) text loses every written date (as Clean Descriptors does), not just the birth date.
    ds = _with_graphics()
    ds.add(DataElement(0x50000022, "LO", "arrow added 2021-05-06"))
    ds = _deidentify(ds, ProfileOption.CLEAN_GRAPHICS)
    assert "2021" not in str(ds[0x50000022].value)
    assert "arrow added" in str(ds[0x50000022].value)


# --- safe private --------------------------------------------------------------------------------


def _with_private() -> Dataset:
    ds = _patient()
    ds.add(DataElement(0x00190010, "LO", "ACME TEST"))
    ds.add(DataElement(0x00191010, "LO", "SAFE VALUE"))
    ds.add(DataElement(0x00191011, "LO", "UNLISTED"))
    ds.add(DataElement(0x00191012, "LO", f"ref {MRN} done"))
    ds.add(DataElement(0x00190011, "LO", "OTHER VENDOR"))
    ds.add(DataElement(0x00191110, "LO", "same element, other creator"))
    ds.add(DataElement(0x00210010, "LO", "ACME TEST"))
    ds.add(DataElement(0x00211010, "LO", "same creator, other group"))
    ds.add(DataElement(0x00290012, "LO", "ACME MR"))  # creator in a later block
    ds.add(DataElement(0x00291230, "DS", "1.5"))
    return ds


_SAFE = parse_safe_private(["0019,ACME TEST,10", "0019,ACME TEST,12", "0029,ACME MR,30"])


def test_retain_safe_private_keeps_only_the_configured_attributes() -> None:
    ds = _deidentify(_with_private(), ProfileOption.RETAIN_SAFE_PRIVATE, safe_private=_SAFE)
    private = {tag: ds[tag].value for tag in _private_tags(ds)}
    assert private.pop(0x00190010) == "ACME TEST"
    assert private.pop(0x00191010) == "SAFE VALUE"
    scrubbed = private.pop(0x00191012)
    assert MRN not in scrubbed and scrubbed.startswith("ref")
    assert private.pop(0x00290012) == "ACME MR"
    assert private.pop(0x00291230) == "1.5"
    assert private == {}


def test_safe_private_needs_the_option() -> None:
    ds = _deidentify(_with_private(), safe_private=_SAFE)
    assert not _private_tags(ds)


def test_the_option_without_a_safe_list_removes_every_private_attribute() -> None:
    ds = _deidentify(_with_private(), ProfileOption.RETAIN_SAFE_PRIVATE)
    assert not _private_tags(ds)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0019,SIEMENS MR HEADER,0A", SafePrivateTag(0x0019, "SIEMENS MR HEADER", 0x0A)),
        (" 0029 , ACME , ff ", SafePrivateTag(0x0029, "ACME", 0xFF)),
        ("7fe1,GEMS_XR3DCAL_01,10", SafePrivateTag(0x7FE1, "GEMS_XR3DCAL_01", 0x10)),
    ],
)
def test_safe_private_tag_parses(text: str, expected: SafePrivateTag) -> None:
    assert SafePrivateTag.parse(text) == expected
    assert SafePrivateTag.parse(str(expected)) == expected


@pytest.mark.parametrize(
    "text",
    [
        "0018,ACME,10",  # even group: not private
        "0019,,10",  # no creator
        "0019,ACME,100",  # element is one byte
        "0019,ACME",
        "19,ACME,10",
        "0019;ACME;10",
        "",
        "GGGG,ACME,10",
    ],
)
def test_safe_private_tag_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="GGGG,CREATOR,EE"):
        SafePrivateTag.parse(text)


def test_parse_safe_private_sorts_and_removes_duplicates() -> None:
    tags = parse_safe_private(["0029,B,01", "0019,A,02", "0029,B,01"])
    assert tags == (SafePrivateTag(0x19, "A", 2), SafePrivateTag(0x29, "B", 1))


# --- marking -------------------------------------------------------------------------------------


def _codes(ds: Dataset) -> list[str]:
    items = ds.DeidentificationMethodCodeSequence
    assert all(item.CodingSchemeDesignator == "DCM" and item.CodeMeaning for item in items)
    return [item.CodeValue for item in items]


@pytest.mark.parametrize("option", list(ProfileOption), ids=lambda o: o.value)
def test_marking_names_the_profile_and_the_option(option: ProfileOption) -> None:
    ds = _deidentify(_patient(), option)
    assert ds.PatientIdentityRemoved == "YES"
    method = list(ds.DeidentificationMethod)
    assert len(method) == 2
    assert "Basic Profile" in method[0]
    assert method[1] == option.value
    assert sorted(_codes(ds)) == sorted(["113100", CID_7050[option]])


def test_marking_without_options() -> None:
    ds = _deidentify(_patient())
    assert ds.PatientIdentityRemoved == "YES"
    assert "Basic Profile" in str(ds.DeidentificationMethod)
    assert _codes(ds) == ["113100"]
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"


def test_marking_lists_every_selected_option_once() -> None:
    ds = _deidentify(_patient(), *ALL_COMPATIBLE)
    assert sorted(_codes(ds)) == sorted(["113100", *(CID_7050[o] for o in ALL_COMPATIBLE)])
    assert set(ds.DeidentificationMethod[1:]) == {o.value for o in ALL_COMPATIBLE}
    for value in ds.DeidentificationMethod:
        validate_value("LO", value, config.RAISE)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ((), "REMOVED"),
        ((ProfileOption.RETAIN_UIDS,), "REMOVED"),
        ((ProfileOption.RETAIN_LONGITUDINAL_FULL_DATES,), "UNMODIFIED"),
        ((ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES,), "MODIFIED"),
    ],
)
def test_longitudinal_temporal_information_modified(
    options: tuple[ProfileOption, ...], expected: str
) -> None:
    ds = _deidentify(_patient(), *options)
    assert ds.LongitudinalTemporalInformationModified == expected


# --- modified dates ------------------------------------------------------------------------------


def _dated(patient_id: str, study: str, content: str, scheduled: str) -> Dataset:
    ds = _patient(patient_id)
    ds.StudyDate = study
    ds.ContentDate = content
    ds.AcquisitionDateTime = content + "083000"
    ds.StudyTime = "083000"
    step = Dataset()
    step.ScheduledProcedureStepStartDate = scheduled
    ds.ScheduledProcedureStepSequence = Sequence([step])
    return ds


def _date(text: str) -> dt.date:
    return dt.datetime.strptime(text[:8], "%Y%m%d").date()


def test_modified_dates_shift_one_patient_by_one_keyed_offset() -> None:
    modified = ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES
    first = _deidentify(_dated(MRN, "20210506", "20210507", "20210401"), modified)
    later = _deidentify(_dated(MRN, "20230228", "20230301", "20230101"), modified)
    shift = _date(first.StudyDate) - _date("20210506")
    assert -MAX_DATE_SHIFT_DAYS <= shift.days <= -1
    for ds, (study, content, scheduled) in [
        (first, ("20210506", "20210507", "20210401")),
        (later, ("20230228", "20230301", "20230101")),
    ]:
        assert _date(ds.StudyDate) - _date(study) == shift
        assert _date(ds.ContentDate) - _date(content) == shift
        assert _date(ds.AcquisitionDateTime) - _date(content) == shift
        assert ds.AcquisitionDateTime[8:] == "083000"
        assert ds.StudyTime == "083000"
        nested = ds.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate
        assert _date(nested) - _date(scheduled) == shift
    # Intervals between studies survive: two years minus a few days, as before.
    assert _date(later.StudyDate) - _date(first.StudyDate) == _date("20230228") - _date("20210506")


def test_another_patient_gets_another_offset() -> None:
    modified = ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES
    shifts = set()
    for patient in ("MRN1", "MRN2", "MRN3"):
        ds = _deidentify(_dated(patient, "20210506", "20210506", "20210506"), modified)
        shifts.add(_date(ds.StudyDate) - _date("20210506"))
    assert len(shifts) == 3


def test_the_offset_depends_on_the_site_secret() -> None:
    modified = ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES
    dates = set()
    for secret in (SECRET, bytes(range(1, 33)), bytes(range(2, 34))):
        ds = _dated(MRN, "20210506", "20210506", "20210506")
        Deidentifier(secret, DeidConfig(options=frozenset({modified}))).deidentify(ds)
        dates.add(ds.StudyDate)
    assert len(dates) == 3


def test_full_dates_keep_every_date() -> None:
    ds = _deidentify(
        _dated(MRN, "20210506", "20210507", "20210401"),
        ProfileOption.RETAIN_LONGITUDINAL_FULL_DATES,
    )
    assert (ds.StudyDate, ds.ContentDate, ds.StudyTime) == ("20210506", "20210507", "083000")
    assert ds.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate == "20210401"


def test_without_a_date_option_dates_are_gone() -> None:
    ds = _deidentify(_dated(MRN, "20210506", "20210507", "20210401"))
    for keyword in ("StudyDate", "ContentDate", "AcquisitionDateTime", "StudyTime"):
        value = ds.get(keyword)
        assert value is None or str(value) in ("", "19000101", "000000", "19000101000000")
