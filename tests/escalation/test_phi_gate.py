"""The outbound PHI gate: what it catches, where, how it reports, and that it stands alone.

Each leak is planted into an otherwise clean de-identified payload, as a bug in the engine
would leave it, and must be reported by field name only.
"""

from __future__ import annotations

import ast
import copy
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID

from tests.helpers import ROOT, phantom_dataset
from triage_app.dicom.deidentify import Deidentifier
from triage_app.dicom.deidentify.files import encode
from triage_app.escalation import phi_gate
from triage_app.escalation.phi_gate import IdentifyingValues, audit_payload

SECRET = b"g" * 32
NAME = "DOE^JOHN"
PATIENT_ID = "MRN4711"
BIRTH_DATE = "19800215"
ACCESSION = "ACC99887766"
FIELDS = {
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "AccessionNumber",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "unreadable_payload",
}


def original_dataset(name: str = NAME) -> Dataset:
    ds = phantom_dataset(7, 0)
    ds.PatientName = name
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = BIRTH_DATE
    ds.AccessionNumber = ACCESSION
    return ds


def sidecar(**extra: object) -> bytes:
    """A result record as it travels: the device's own keys and values, plus ``extra``."""
    record = {
        "case_id": "0" * 32,
        "decision": "escalate",
        "reason": "out_of_scope",
        "model": {"name": "chest-dx-demo", "version": "1.0.0"},
        "scope": {"findings": ["atypical_input"], "in_scope": False},
        "deidentification": {"patient_pseudonym": "P0123456789ABCDE", "burned_in_risk": False},
        "timings_ms": {"read": 1.5, "deidentify": 0.7},
        **extra,
    }
    return json.dumps(record, sort_keys=True).encode()


@dataclass(frozen=True)
class Case:
    """An original's identifying values and its clean de-identified data set."""

    original: IdentifyingValues
    deidentified: Dataset
    uids: dict[str, str]  # placeholder -> the original UID

    def fresh(self) -> Dataset:
        return copy.deepcopy(self.deidentified)


def make_case(name: str = NAME) -> Case:
    ds = original_dataset(name)
    uids = {"<study>": str(ds.StudyInstanceUID), "<sop>": str(ds.SOPInstanceUID)}
    original = IdentifyingValues.capture(ds)
    Deidentifier(SECRET).deidentify(ds)
    return Case(original, ds, uids)


@pytest.fixture(scope="module")
def case() -> Case:
    return make_case()


# --- A clean payload passes ---------------------------------------------------------------------


def test_a_deidentified_payload_passes(case: Case) -> None:
    assert audit_payload(encode(case.fresh()), sidecar(), case.original) == ()


def test_names_are_captured_whole_and_by_part() -> None:
    """A PersonName is one value, not a sequence of characters (it iterates like a string)."""
    values = set(IdentifyingValues.capture(original_dataset("DOE^JOHN^Q")).values)
    assert {
        ("PatientName", "DOE^JOHN^Q"),
        ("PatientName", "DOE"),
        ("PatientName", "JOHN"),
    } <= values
    assert ("PatientID", PATIENT_ID) in values
    assert ("AccessionNumber", ACCESSION) in values
    assert ("PatientBirthDate", "15/02/1980") in values
    # Shorter than two characters is never a value (it would match everywhere).
    assert all(len(value) >= phi_gate.MIN_WORD_LENGTH for _, value in values)


def test_every_kind_of_patient_name_is_captured_by_part(case: Case) -> None:
    ds = original_dataset()
    ds.OtherPatientNames = ["ROE^JANE", "SMYTHE^JON"]
    ds.PatientMotherBirthName = "BLOGGS^MAUD"
    original = IdentifyingValues.capture(ds)
    values = set(original.values)
    assert {("OtherPatientNames", "SMYTHE"), ("PatientMotherBirthName", "BLOGGS")} <= values
    leaked = case.fresh()
    leaked.StudyDescription = "born Bloggs, aka Smythe"
    assert audit_payload(encode(leaked), sidecar(), original) == (
        "OtherPatientNames",
        "PatientMotherBirthName",
    )


def test_other_patient_ids_in_their_sequence_are_captured() -> None:
    ds = original_dataset()
    item = Dataset()
    item.PatientID = "OTHER-998877"
    ds.OtherPatientIDsSequence = [item]
    values = IdentifyingValues.capture(ds).values
    assert ("OtherPatientIDsSequence", "OTHER-998877") in values


# --- Leaks are caught wherever they survive -----------------------------------------------------


def _in_description(ds: Dataset, value: str) -> bytes:
    ds.StudyDescription = f"follow-up {value} chest"
    return encode(ds)


def _in_nested_sequence(ds: Dataset, value: str) -> bytes:
    inner = Dataset()
    inner.ValueType = "TEXT"
    inner.TextValue = f"seen before as {value}"
    outer = Dataset()
    outer.ValueType = "CONTAINER"
    outer.ContentSequence = [inner]
    ds.ContentSequence = [outer]
    return encode(ds)


def _in_private_tag(ds: Dataset, value: str) -> bytes:
    block = ds.private_block(0x0011, "LEAKY VENDOR", create=True)
    block.add_new(0x10, "LO", value)
    return encode(ds)


def _in_file_meta(ds: Dataset, value: str) -> bytes:
    if value.startswith("2.25."):
        ds.file_meta.PrivateInformationCreatorUID = UID(value)
    else:
        ds.file_meta.SourceApplicationEntityTitle = value
    return encode(ds)


PLACES: dict[str, Callable[[Dataset, str], bytes]] = {
    "description": _in_description,
    "nested_sequence": _in_nested_sequence,
    "private_tag": _in_private_tag,
    "file_meta": _in_file_meta,
    "sidecar_only": lambda ds, value: encode(ds),
}
LEAKS = [
    ("DOE^JOHN", "PatientName"),
    ("John Doe", "PatientName"),
    ("Doe", "PatientName"),  # shorter than the byte search: found as a decoded word
    (PATIENT_ID, "PatientID"),
    (BIRTH_DATE, "PatientBirthDate"),
    ("1980-02-15", "PatientBirthDate"),
    ("15/02/1980", "PatientBirthDate"),
    ("02/15/1980", "PatientBirthDate"),
    ("15-FEB-1980", "PatientBirthDate"),
    ("15feb1980", "PatientBirthDate"),
    ("15.02.1980", "PatientBirthDate"),
    (ACCESSION, "AccessionNumber"),
    ("<study>", "StudyInstanceUID"),
    ("<sop>", "SOPInstanceUID"),
]


@pytest.mark.parametrize("place", list(PLACES))
@pytest.mark.parametrize(("value", "field"), LEAKS)
def test_a_surviving_identifier_is_caught_and_named_by_field_only(
    case: Case, place: str, value: str, field: str
) -> None:
    value = case.uids.get(value, value)
    dicom = PLACES[place](case.fresh(), value)
    side = sidecar(note=f"clinical note: {value}") if place == "sidecar_only" else sidecar()
    assert value.encode() in dicom + side  # the plant took

    hits = audit_payload(dicom, side, case.original)

    assert hits == (field,)
    assert value.lower() not in " ".join(hits).lower()


def test_a_name_hidden_by_json_escapes_is_caught(case: Case) -> None:
    original = IdentifyingValues.capture(original_dataset("MÜLLER^JÖRG"))
    side = sidecar(note="MÜLLER")
    assert b"\\u00dc" in side and "MÜLLER".encode() not in side
    assert audit_payload(encode(case.fresh()), side, original) == ("PatientName",)


def test_several_leaks_are_all_named(case: Case) -> None:
    ds = case.fresh()
    ds.StudyDescription = f"{PATIENT_ID} {ACCESSION}"
    hits = audit_payload(encode(ds), sidecar(note="John"), case.original)
    assert hits == ("AccessionNumber", "PatientID", "PatientName")


# --- What is not searched, and what is not a leak ----------------------------------------------


def test_pixel_data_is_not_searched(case: Case) -> None:
    ds = case.fresh()
    planted = f"{NAME} {PATIENT_ID} {ACCESSION} {BIRTH_DATE} {case.uids['<sop>']}".encode()
    pixels = bytearray(ds.PixelData)
    pixels[1000 : 1000 + len(planted)] = planted
    ds.PixelData = bytes(pixels)
    dicom = encode(ds)
    assert planted in dicom
    assert audit_payload(dicom, sidecar(), case.original) == ()


@pytest.mark.parametrize(
    "name",
    [
        "SMITH^MARY",  # in PRIMARY (Image Type)
        "ROSSI^GINA",  # in ORIGINAL (Image Type)
        "DENT^ARTHUR",  # in "Basic Application Confidentiality Profile"
        "READ^MODEL",  # record keys: timings_ms.read, model
        "WANG^MING",  # in the key timings_ms
        "NGUYEN^TIEN",  # in the key patient_pseudonym
        "DEMO^ALICE",  # in the model name chest-dx-demo (whole word between hyphens)
        "BASIC^BOB",  # a whole word of the De-identification Method
        "ESCALATE^EVE",  # the decision word
    ],
)
def test_names_inside_the_payloads_own_words_are_not_leaks(name: str) -> None:
    """The payload's fixed vocabulary must not block every patient with a common name."""
    named = make_case(name)
    dicom = encode(named.fresh())
    assert b"PRIMARY" in dicom and b"Confidentiality" in dicom
    assert audit_payload(dicom, sidecar(), named.original) == ()


def test_short_id_digits_in_the_devices_own_numbers_are_not_leaks() -> None:
    """A three- or four-digit accession number turns up by chance in timings and in 128-bit
    pseudonymous UIDs; neither is a leak (pydicom's own test files carry accession "134")."""
    ds = original_dataset()
    ds.AccessionNumber = "4321"
    original = IdentifyingValues.capture(ds)
    Deidentifier(SECRET).deidentify(ds)
    ds.add_new(0x00081155, "UI", "2.25.9943210987")  # the digits inside a longer number
    record = sidecar(timings_ms={"read": 12.4321, "infer": 4321.5}, score=0.4321)
    assert audit_payload(encode(ds), record, original) == ()


def test_original_uids_pass_when_they_are_kept_on_purpose(case: Case) -> None:
    """Under Retain UIDs the pipeline captures without UIDs: they are meant to survive."""
    original_ds = original_dataset()
    ds = case.fresh()
    ds.StudyInstanceUID = original_ds.StudyInstanceUID
    ds.SOPInstanceUID = original_ds.SOPInstanceUID
    dicom = encode(ds)

    kept = IdentifyingValues.capture(original_ds, uids_remapped=False)
    assert not {field for field, _ in kept.values} & {"StudyInstanceUID", "SOPInstanceUID"}
    assert audit_payload(dicom, sidecar(), kept) == ()
    remapped = IdentifyingValues.capture(original_ds)
    assert audit_payload(dicom, sidecar(), remapped) == ("SOPInstanceUID", "StudyInstanceUID")


# --- Unreadable payloads are findings -----------------------------------------------------------


@pytest.mark.parametrize(
    ("dicom", "side"),
    [
        (b"", None),
        (b"Patient notes: not an image\n", None),
        ("trailing", None),  # bytes after the data set: an element with an unknown VR
        ("clean", b"{not json"),
        ("clean", '{"note": "\xe9"}'.encode("latin-1")),  # not UTF-8
    ],
    ids=["empty", "not_dicom", "trailing_bytes", "sidecar_not_json", "sidecar_not_utf8"],
)
def test_an_unreadable_payload_is_a_finding(
    case: Case, dicom: bytes | str, side: bytes | None
) -> None:
    clean = encode(case.fresh())
    payload = {"clean": clean, "trailing": clean + b"DOE^JOHN"}.get(str(dicom), dicom)
    assert isinstance(payload, bytes)
    hits = audit_payload(payload, side if side is not None else sidecar(), case.original)
    assert hits == ("unreadable_payload",)


# --- Independence -------------------------------------------------------------------------------


def test_the_gate_imports_nothing_from_the_engine() -> None:
    source = Path(phi_gate.__file__).read_text(encoding="utf-8")
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
    assert "pydicom" in imported  # the walk saw the imports
    engine = ("triage_app.dicom.deidentify", "triage_app.dicom.pseudonym")
    assert not [name for name in imported if name.startswith(engine)]


def test_importing_the_gate_loads_no_engine_module() -> None:
    """Not even indirectly, through a package it imports."""
    code = (
        "import sys, triage_app.escalation.phi_gate; "
        "print(','.join(m for m in sys.modules if m.startswith('triage_app')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = result.stdout.strip().split(",")
    assert "triage_app.escalation.phi_gate" in loaded
    assert not [m for m in loaded if m.startswith("triage_app.dicom.deidentify")]
