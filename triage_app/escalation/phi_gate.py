"""The outbound PHI gate: an independent audit of every payload before it is enqueued.

The de-identification engine is one piece of code; if it has a bug, this gate must not share it.
So nothing here imports the engine, its table or its scrubber: the gate captures the original's
identifying values itself (before de-identification), then searches the finished payload — the
encoded de-identified file and the result JSON that travels with it — for any of them. Any hit
blocks the upload (reason ``phi_audit``) and the case stays on the device for review.

Two searches, so that neither encoding nor spelling hides a value:

* the file's bytes (without the pixel data, where any short string turns up by chance),
  case-insensitively, for values of at least :data:`MIN_BYTES_LENGTH` characters; name parts
  only as whole words, since kept text is full of them ("PRIMARY" holds MARY);
* every decoded text value of the parsed file and every value (not key: those are the
  device's own field names) of the parsed JSON, for whole words of at least
  :data:`MIN_WORD_LENGTH` characters (decoding applies the character set and JSON escapes).

Hits are reported by field name only: the values are PHI and never appear in results or logs.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.valuerep import PersonName

from triage_app.dicom.reader import quiet_pydicom

MIN_BYTES_LENGTH = 4
MIN_WORD_LENGTH = 2
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PATIENT_TEXT = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "AccessionNumber",
    "MedicalRecordLocator",
)
_INSTANCE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
_NAME_PARTS = re.compile(r"[\^=\s,]+")
_DATE = re.compile(r"^(\d{4})(\d{2})(\d{2})$")


def _strings(value: object) -> Iterator[str]:
    if value is None:
        return
    if isinstance(value, str | bytes | PersonName) or not isinstance(value, Iterable):
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        if text.strip():
            yield text.strip()
        return
    for item in value:
        yield from _strings(item)


_MONTH_ABBREVIATIONS = (
    "JAN",
    "FEB",
    "MAR",
    "APR",
    "MAY",
    "JUN",
    "JUL",
    "AUG",
    "SEP",
    "OCT",
    "NOV",
    "DEC",
)


def _written_dates(date: str) -> list[str]:
    """The common written forms; the gate matches case-insensitively as whole words."""
    match = _DATE.match(date)
    if not match:
        return [date]
    y, m, d = match.groups()
    forms = [f"{y}{m}{d}", f"{y}-{m}-{d}", f"{d}/{m}/{y}", f"{m}/{d}/{y}", f"{d}.{m}.{y}"]
    if 1 <= int(m) <= 12:
        mon = _MONTH_ABBREVIATIONS[int(m) - 1]
        forms += [f"{d}-{mon}-{y}", f"{d}{mon}{y}", f"{d} {mon} {y}"]
    return forms


@dataclass(frozen=True)
class IdentifyingValues:
    """The original's identifying values, by field; captured before de-identification."""

    values: tuple[tuple[str, str], ...]  # (field, value)

    @classmethod
    def capture(cls, ds: Dataset, *, uids_remapped: bool = True) -> IdentifyingValues:
        """Read the patient's identifiers (and, if they are remapped, the instance's UIDs)."""
        found: set[tuple[str, str]] = set()
        for keyword in _PATIENT_TEXT:
            for text in _strings(ds.get(keyword)):
                found.add((keyword, text))
                if "Name" in keyword:  # PatientName, OtherPatientNames, ...BirthName
                    found.update((keyword, part) for part in _NAME_PARTS.split(text) if part)
        for item in ds.get("OtherPatientIDsSequence") or []:
            found.update(("OtherPatientIDsSequence", t) for t in _strings(item.get("PatientID")))
        for text in _strings(ds.get("PatientBirthDate")):
            found.update(("PatientBirthDate", form) for form in _written_dates(text))
        if uids_remapped:
            for keyword in _INSTANCE_UIDS:
                found.update((keyword, text) for text in _strings(ds.get(keyword)))
        return cls(tuple(sorted(v for v in found if len(v[1]) >= MIN_WORD_LENGTH)))


def _decoded_texts(ds: Dataset) -> Iterator[str]:
    for element in ds:
        if element.VR == "SQ":
            for item in element.value or []:
                yield from _decoded_texts(item)
        elif element.keyword not in _PIXEL_KEYWORDS and element.VR not in ("OB", "OW", "UN"):
            yield from _strings(element.value)


# What the device itself writes from fixed vocabularies, never from the image: the model's
# name and version, the decision words, the de-identification method. A patient called "Demo"
# or "Basic" is not leaked by "chest-dx-demo" or "Basic Application Confidentiality Profile".
_OWN_MARKING_KEYWORDS = (
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "PatientIdentityRemoved",
    "LongitudinalTemporalInformationModified",
)
_OWN_RECORD_KEYS = ("model", "decision", "reason", "thresholds")


def _without_own_vocabulary(record: object) -> object:
    if not isinstance(record, dict):
        return record
    kept = {k: v for k, v in record.items() if k not in _OWN_RECORD_KEYS}
    deid = kept.get("deidentification")
    if isinstance(deid, dict):
        kept["deidentification"] = {k: v for k, v in deid.items() if k != "method"}
    return kept


def _json_values(value: object) -> Iterator[str]:
    if isinstance(value, dict):
        for item in value.values():
            yield from _json_values(item)
    elif isinstance(value, list):
        for item in value:
            yield from _json_values(item)
    elif isinstance(value, str):
        # Numbers (scores, timings, sizes) and flags are the device's own: searching them only
        # finds a short ID's digits by chance (accession "134" in a timing of 12.134 ms).
        yield value


def audit_payload(dicom: bytes, sidecar: bytes, original: IdentifyingValues) -> tuple[str, ...]:
    """The fields of ``original`` found anywhere in the payload; empty means it may leave.

    An unreadable payload is itself a finding: what cannot be checked is not sent. The file
    must be a Part 10 file, as the payload always is: forced, any bytes would read as an empty
    data set and pass.
    """
    try:
        with quiet_pydicom():  # pydicom's own warnings quote values: PHI in the logs
            ds = pydicom.dcmread(io.BytesIO(dicom))
            for keyword in (*_PIXEL_KEYWORDS, *_OWN_MARKING_KEYWORDS):
                if keyword in ds:
                    del ds[keyword]
            header = io.BytesIO()
            ds.save_as(header, enforce_file_format=False)
            texts = [*_decoded_texts(ds), *_decoded_texts(ds.file_meta)]
        texts += _json_values(_without_own_vocabulary(json.loads(sidecar)))
    except (
        InvalidDicomError,
        ValueError,
        TypeError,
        AttributeError,
        EOFError,
        OSError,
        NotImplementedError,  # an unknown VR, e.g. bytes after the data set
    ):
        return ("unreadable_payload",)
    haystack = header.getvalue().lower()
    hits: set[str] = set()
    for field, value in original.values:
        if len(value) >= MIN_BYTES_LENGTH and _in_bytes(value.lower(), haystack):
            hits.add(field)
            continue
        word = re.compile(rf"(?<![0-9A-Za-z]){re.escape(value)}(?![0-9A-Za-z])", re.IGNORECASE)
        if any(word.search(text) for text in texts):
            hits.add(field)
    return tuple(sorted(hits))


def _in_bytes(value: str, haystack: bytes) -> bool:
    """Whole words only: a name inside "PRIMARY", or an accession number's digits inside a
    128-bit pseudonymous UID, is chance, not a leak (a UID *built* from an ID has dots round it).
    """
    return any(
        re.search(rb"(?<![0-9a-z])" + re.escape(needle) + rb"(?![0-9a-z])", haystack)
        for needle in _encodings(value)
    )


def _encodings(value: str) -> set[bytes]:
    out = set()
    for encoding in ("utf-8", "latin-1"):
        try:
            out.add(value.encode(encoding))
        except UnicodeEncodeError:
            continue
    return out
