"""Dummy values valid for their VR; date shifts that keep intervals and never keep the date."""

from __future__ import annotations

import datetime as dt
import io

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.valuerep import VR, validate_value

from triage_app.dicom.deidentify.values import (
    DUMMY_BY_VR,
    dummy_value,
    shift_date,
    shift_datetime,
)
from triage_app.dicom.pseudonym import MAX_DATE_SHIFT_DAYS

# Every VR a de-identified attribute can have; SQ and UI never get a dummy (items are walked,
# UIDs remapped), and the ambiguous "US or SS"-style VRs are resolved before values are set.
PLAIN_VRS = sorted(vr.value for vr in VR if len(vr.value) == 2 and vr.value not in ("SQ", "UI"))
SHIFTS = st.integers(min_value=-MAX_DATE_SHIFT_DAYS, max_value=-1)
DATES = st.dates(min_value=dt.date(1800, 1, 1), max_value=dt.date(2100, 12, 31))
# A private tag in an odd group (its VR comes from the element, not the dictionary).
_TAG = 0x00091010


def _da(date: dt.date) -> str:
    return f"{date.year:04d}{date.month:02d}{date.day:02d}"


def _parse_da(text: str) -> dt.date:
    return dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))


# --- dummies -----------------------------------------------------------------------------------


def test_every_vr_has_a_dummy() -> None:
    assert set(PLAIN_VRS) <= set(DUMMY_BY_VR)


@pytest.mark.parametrize("vr", PLAIN_VRS)
def test_dummy_passes_pydicoms_validator(vr: str) -> None:
    value = dummy_value(vr)
    validate_value(vr, value, config.RAISE)
    if isinstance(value, str):
        assert value  # "D" means a non-empty value
        assert value.strip() == value


@pytest.mark.parametrize("vr", PLAIN_VRS)
@pytest.mark.parametrize("implicit", [True, False])
def test_dummy_encodes_and_reads_back(vr: str, implicit: bool) -> None:
    ds = Dataset()
    ds.add(DataElement(0x00090010, "LO", "TRIAGE TEST"))
    ds.add(DataElement(_TAG, vr, dummy_value(vr)))
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    with config.strict_reading():
        write_dataset(fp, ds)
    if implicit:
        return  # an implicit VR private element reads back as UN: only the encoding is checked
    back = read_dataset(io.BytesIO(fp.getvalue()), is_implicit_VR=False, is_little_endian=True)
    element = back[_TAG]
    assert vr == element.VR
    written = dummy_value(vr)
    if isinstance(written, bytes):
        assert element.value == written
    elif vr in ("DS", "IS"):
        assert float(element.value) == float(str(written))
    elif isinstance(written, str):
        assert str(element.value) == written
    else:
        assert element.value == written


@pytest.mark.parametrize("vr", ["DA", "DT", "TM"])
def test_dummy_dates_are_real_dates_and_times(vr: str) -> None:
    text = str(dummy_value(vr))
    if vr == "TM":
        assert dt.datetime.strptime(text, "%H%M%S")
    else:
        assert _parse_da(text[:8]) == dt.date(1900, 1, 1)


def test_unknown_vr_is_treated_as_unknown_bytes() -> None:
    assert dummy_value("XX") == dummy_value("UN")
    assert isinstance(dummy_value("UN"), bytes)
    assert len(dummy_value("UN")) % 2 == 0  # type: ignore[arg-type]


# --- shift_date --------------------------------------------------------------------------------


@given(DATES, DATES, SHIFTS)
def test_shift_keeps_the_interval_between_two_dates(a: dt.date, b: dt.date, days: int) -> None:
    shifted_a = _parse_da(shift_date(_da(a), days))
    shifted_b = _parse_da(shift_date(_da(b), days))
    assert shifted_b - shifted_a == b - a
    assert shifted_a - a == dt.timedelta(days=days)


@given(DATES, SHIFTS, st.sampled_from([4, 6, 8]))
def test_shift_never_returns_the_original(date: dt.date, days: int, precision: int) -> None:
    # Shifts are always backwards (date_shift_days), so even a year or a month moves.
    text = _da(date)[:precision]
    shifted = shift_date(text, days)
    assert shifted != text
    assert len(shifted) == precision
    assert shifted < text


@pytest.mark.parametrize(
    ("value", "days", "expected"),
    [
        ("20200301", -1, "20200229"),  # into a leap day
        ("20200229", -1, "20200228"),  # out of one
        ("20210301", -366, "20200229"),
        ("20200229", -365, "20190301"),
        ("2020", -1, "2019"),  # a year alone stays a year
        ("2020", -366, "2018"),  # back from 1 Jan by 366 days
        ("202003", -1, "202002"),  # a month alone stays a month
        ("202003", -29, "202002"),  # 2020-03-01 - 29 days = 2020-02-01
        ("202003", -30, "202001"),
        ("10000101", -1, "09991231"),  # four-digit year, zero-padded
        (" 20200101 ", -1, "20191231"),
    ],
)
def test_shift_date_examples(value: str, days: int, expected: str) -> None:
    assert shift_date(value, days) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20200101-20200131", "20191222-20200121"),
        ("-20200131", "-20200121"),  # open start
        ("20200101-", "20191222-"),  # open end
        ("2019-2020", "2018-2019"),  # years
    ],
)
def test_shift_date_ranges(value: str, expected: str) -> None:
    assert shift_date(value, -10) == expected


@pytest.mark.parametrize(
    "value",
    [
        "notadate",
        "20201340",
        "20200230",
        "2020-01-31",
        "2020.01.31",
        "1.2.3",
        "20200101-2-3",
        "0000",
    ],
)
def test_unreadable_dates_become_the_dummy(value: str) -> None:
    shifted = shift_date(value, -10)
    assert shifted == dummy_value("DA")
    assert shifted != value


def test_a_date_that_would_leave_the_calendar_becomes_the_dummy() -> None:
    assert shift_date("00010105", -10) == dummy_value("DA")


# --- shift_datetime ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20200315123456.789012+0100", "20200305123456.789012+0100"),
        ("20200315123456-0500", "20200305123456-0500"),
        ("20200315123456", "20200305123456"),
        ("202003151234", "202003051234"),
        ("2020031512", "2020030512"),
        ("20200315", "20200305"),
        ("202003", "202002"),
        ("2020", "2019"),
        ("2020+0100", "2019+0100"),  # a partial date keeps its offset too
        ("202003+0000", "202002+0000"),
        ("20200301000000", "20200220000000"),  # across the leap day
    ],
)
def test_shift_datetime_keeps_time_and_offset(value: str, expected: str) -> None:
    shifted = shift_datetime(value, -10)
    assert shifted == expected
    validate_value("DT", shifted, config.RAISE)


@given(
    st.datetimes(min_value=dt.datetime(1900, 1, 1), max_value=dt.datetime(2100, 1, 1)),
    st.datetimes(min_value=dt.datetime(1900, 1, 1), max_value=dt.datetime(2100, 1, 1)),
    SHIFTS,
)
def test_shift_datetime_keeps_intervals(a: dt.datetime, b: dt.datetime, days: int) -> None:
    def text(moment: dt.datetime) -> str:
        return _da(moment.date()) + f"{moment:%H%M%S.%f}+0200"

    def parse(value: str) -> dt.datetime:
        return dt.datetime.strptime(value, "%Y%m%d%H%M%S.%f%z").replace(tzinfo=None)

    shifted_a, shifted_b = shift_datetime(text(a), days), shift_datetime(text(b), days)
    assert shifted_a != text(a)
    assert parse(shifted_b) - parse(shifted_a) == b - a
    assert parse(shifted_a) - a == dt.timedelta(days=days)


@pytest.mark.parametrize(
    "value",
    [
        "garbage",
        "2020-03-15T12:00:00",
        "20200315 120000",
        "20201315",
        "20200315123456.1234567",  # seven fraction digits
        "20200315+01",  # an offset needs four digits
        "2020031",
    ],
)
def test_unreadable_datetimes_become_the_dummy(value: str) -> None:
    assert shift_datetime(value, -10) == dummy_value("DT")
