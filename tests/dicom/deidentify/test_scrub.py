"""The residual scrub: this patient's names, IDs and birth date, wherever text survived."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from triage_app.dicom.deidentify.scrub import PatientIdentifiers, Scrubber

NAME = "Okonkwo-Bright^Adaeze^Q^Dr"
MRN = "MRN40817263"
SHORT_ID = "A17"
ACCESSION = "ACC0099812"
BIRTH = "19650307"


def _patient(**extra: object) -> Dataset:
    ds = Dataset()
    ds.PatientName = NAME
    ds.PatientID = MRN
    ds.OtherPatientIDs = [SHORT_ID]
    ds.AccessionNumber = ACCESSION
    ds.PatientBirthDate = BIRTH
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


@pytest.fixture
def scrubber() -> Scrubber:
    return Scrubber(PatientIdentifiers.capture(_patient()))


# --- what is captured --------------------------------------------------------------------------


def test_capture_collects_name_parts_ids_and_birth_date() -> None:
    other = Dataset()
    other.PatientID = "HOSP2-556677"
    ds = _patient(OtherPatientNames="Bright^Ada", OtherPatientIDsSequence=[other])
    ids = PatientIdentifiers.capture(ds)
    assert {"Okonkwo", "Bright", "Adaeze", "Dr", "Ada"} <= set(ids.name_parts)
    assert "Q" not in ids.name_parts  # a single letter would erase every "Q" in the text
    assert {MRN, SHORT_ID, ACCESSION, "HOSP2-556677"} <= set(ids.ids)
    assert {"19650307", "1965-03-07", "07/03/1965", "03/07/1965"} <= set(ids.birth_dates)
    assert ids.patient_key == f"id:{MRN}"


def test_patient_key_falls_back_to_the_name_and_then_to_nothing() -> None:
    ds = Dataset()
    ds.PatientName = "Doe^Jane"
    assert PatientIdentifiers.capture(ds).patient_key == "name:Doe^Jane"
    assert PatientIdentifiers.capture(Dataset()).patient_key == ""


# --- scrub -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "gone"),
    [
        ("Adaeze Okonkwo-Bright, follow-up", ["Adaeze", "Okonkwo", "Bright"]),
        ("seen by ADAEZE OKONKWO", ["ADAEZE", "OKONKWO"]),  # any case
        ("Mrs Bright called", ["Bright"]),  # one half of a double-barrelled name
        ("bright^adaeze", ["bright", "adaeze"]),
        (f"patient {MRN} re-scanned", [MRN]),
        (f"ref:X{MRN}Y", [MRN]),  # long IDs are removed inside longer tokens too
        (f"{MRN.lower()}", [MRN.lower()]),
        (f"acc {ACCESSION}; ok", [ACCESSION]),
        (f"old id {SHORT_ID}.", [SHORT_ID]),
    ],
)
def test_scrub_removes_names_and_ids(scrubber: Scrubber, text: str, gone: list[str]) -> None:
    cleaned = scrubber.scrub(text)
    for token in gone:
        assert token.lower() not in cleaned.lower(), (text, cleaned)


def test_short_ids_are_only_removed_as_whole_tokens(scrubber: Scrubber) -> None:
    # "A17" is too short to hunt inside other tokens: "XA17B" and "A170" are different things.
    assert scrubber.scrub("series XA17B and A170") == "series XA17B and A170"
    assert scrubber.scrub("id A17 here") == "id here"


def test_name_parts_are_only_removed_as_whole_words(scrubber: Scrubber) -> None:
    text = "Brighter image, Adaezes, Drain placed"
    assert scrubber.scrub(text) == text


@pytest.mark.parametrize(
    "written",
    [
        "19650307",
        "1965-03-07",
        "1965/03/07",
        "1965.03.07",
        "07/03/1965",
        "07-03-1965",
        "07.03.1965",
        "03/07/1965",  # US order
        "7/3/1965",  # without leading zeros
        "3/7/1965",
        "7.3.1965",
        "07/03/65",  # two-digit year
        "3/7/65",
        "7 March 1965",  # the month by name
        "07-MAR-1965",
        "07MAR1965",
        "Mar 7, 1965",
        "march 7 1965",
    ],
)
def test_scrub_removes_the_birth_date_in_every_written_form(
    scrubber: Scrubber, written: str
) -> None:
    cleaned = scrubber.scrub(f"DOB {written} (checked)")
    assert cleaned == "DOB (checked)"


def test_scrub_keeps_other_dates_and_numbers(scrubber: Scrubber) -> None:
    text = "Study 2021-05-06, 19650308, 1965, 07/03/1966, 07/03/66, 8 March 1965, slice 7/3"
    assert scrubber.scrub(text) == text


def test_ordinary_text_is_unchanged(scrubber: Scrubber) -> None:
    text = "CHEST PA, lateral view; no acute findings. Dose 3.2 mGy."
    assert scrubber.scrub(text) is text


def test_a_name_that_is_also_a_word_is_still_removed() -> None:
    # Decision: a patient called "Chest" loses the word "Chest" from their descriptions. The scrub
    # cannot tell a name from a word, and leaving a name in place is the worse mistake; the
    # description loses a word, the classifier never reads it.
    ds = Dataset()
    ds.PatientName = "Chest^Anna"
    ds.PatientID = "ID-12"
    scrubber = Scrubber(PatientIdentifiers.capture(ds))
    assert scrubber.scrub("CHEST PA") == "PA"
    assert scrubber.scrub("Chesterfield") == "Chesterfield"  # but never inside another word


def test_scrub_tidies_spacing_only_where_it_removed_something(scrubber: Scrubber) -> None:
    assert scrubber.scrub("  untouched   spacing  ") == "  untouched   spacing  "
    assert scrubber.scrub("a  Adaeze   b") == "a b"


def test_non_ascii_names_are_removed_in_any_case() -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Zoë"
    ds.PatientID = "4711"
    scrubber = Scrubber(PatientIdentifiers.capture(ds))
    assert scrubber.scrub("Frau MÜLLER, zoë") == "Frau ,"


# --- the raw pre-check agrees with the scrub ----------------------------------------------------

_TOKENS = [
    "Adaeze",
    "OKONKWO",
    "bright",
    MRN,
    f"x{MRN}x",
    SHORT_ID,
    ACCESSION,
    "7/3/1965",
    "1965-03-07",
    "chest",
    "1965",
    "A170",
    "brighter",
]
_TEXTS = st.lists(
    st.one_of(st.sampled_from(_TOKENS), st.text(alphabet="abc XYZ019^-/.,", max_size=6)),
    max_size=6,
).map(" ".join)


@given(_TEXTS, st.sampled_from(["ascii", "latin-1", "utf-8"]))
def test_may_contain_is_true_whenever_the_scrub_changes_something(text: str, enc: str) -> None:
    scrubber = Scrubber(PatientIdentifiers.capture(_patient()))
    if scrubber.scrub(text) != text:
        assert scrubber.may_contain(text.encode(enc))
        assert scrubber.may_contain(text.upper().encode(enc))


@pytest.mark.parametrize("encoding", ["latin-1", "utf-8"])
@pytest.mark.parametrize("written", ["Müller", "MÜLLER", "müller", "mÜller", "Zoë", "ZOË"])
def test_may_contain_finds_non_ascii_names_in_every_case(encoding: str, written: str) -> None:
    ds = Dataset()
    ds.PatientName = "Müller^Zoë"
    ds.PatientID = "4711"
    scrubber = Scrubber(PatientIdentifiers.capture(ds))
    text = f"Befund {written} ok"
    assert scrubber.scrub(text) != text
    assert scrubber.may_contain(text.encode(encoding))


def test_may_contain_is_false_for_unrelated_bytes(scrubber: Scrubber) -> None:
    assert not scrubber.may_contain(b"CHEST PA\\LATERAL")
    assert not scrubber.may_contain(b"")


def test_may_contain_finds_identifiers_in_raw_multi_valued_bytes(scrubber: Scrubber) -> None:
    assert scrubber.may_contain(b"ORIGINAL\\OKONKWO ")
    assert scrubber.may_contain(b"xx" + MRN.encode() + b"\x00")


# --- clean ----------------------------------------------------------------------------------------


def test_clean_also_removes_every_written_date(scrubber: Scrubber) -> None:
    text = "Adaeze seen 2021-05-06 and 06/05/2021, before 20190101 and 1.2.2018; ok"
    cleaned = scrubber.clean(text)
    assert "Adaeze" not in cleaned
    assert not re.search(r"\d{4}|\d+[/.-]\d+[/.-]\d+", cleaned), cleaned
    assert cleaned.startswith("seen")
    assert cleaned.endswith("; ok")


def test_clean_keeps_numbers_that_are_not_dates(scrubber: Scrubber) -> None:
    text = "kVp 120, 3.5 mm, series 12/40"
    assert scrubber.clean(text) == text


# --- nothing known about the patient ------------------------------------------------------------


def test_empty_identifiers_make_the_scrub_a_no_op() -> None:
    scrubber = Scrubber(PatientIdentifiers.capture(Dataset()))
    assert scrubber.empty
    text = "Adaeze MRN40817263 19650307"
    assert scrubber.scrub(text) is text
    assert not scrubber.may_contain(text.encode())
    assert scrubber.clean("CT 2021-05-06") == "CT"  # the Clean action still removes dates


def test_blank_values_are_not_identifiers() -> None:
    ds = Dataset()
    ds.PatientName = ""
    ds.PatientID = "  "
    ds.PatientBirthDate = ""
    ids = PatientIdentifiers.capture(ds)
    assert ids.name_parts == ids.ids == ids.birth_dates == ()
    assert Scrubber(ids).empty


@pytest.mark.parametrize(
    ("text", "gone"),
    [
        ("tel 555-0199 or +44 20 7946 0958", ["555", "0199", "7946"]),
        ("ref MRN-4711, acc ACC 99887766", ["4711", "99887766"]),
        ("seen by Dr House and Mrs. Smith-Jones", ["House", "Smith"]),
        ("lives at 12 Baker Street, Springfield", ["Baker", "12"]),
        ("born 15th Feb 1980, seen Feb 15, 1980 and 07-MAR-1965", ["Feb", "1980", "MAR"]),
    ],
)
def test_clean_removes_what_identifies_anyone(text: str, gone: list[str]) -> None:
    """Clean promises text that identifies no one, not just text without this patient."""
    cleaned = Scrubber(PatientIdentifiers.capture(Dataset())).clean(text)
    for token in gone:
        assert token not in cleaned, (token, cleaned)


@pytest.mark.parametrize(
    "text", ["MR BRAIN W/O", "DR CHEST 2 VIEWS", "3 MARKERS placed", "lesion may 2 cm"]
)
def test_clean_keeps_modalities_and_measurements(text: str) -> None:
    assert Scrubber(PatientIdentifiers.capture(Dataset())).clean(text) == text


def test_a_name_with_accents_is_also_scrubbed_as_typed_without_them() -> None:
    ds = Dataset()
    ds.PatientName = "MÜLLER^JÜRGEN^^Señor"
    scrubber = Scrubber(PatientIdentifiers.capture(ds))
    for typed in ("Mueller", "MULLER", "Jürgen", "JURGEN", "Juergen", "Senor"):
        assert scrubber.scrub(f"seen {typed} today") == "seen today", typed
