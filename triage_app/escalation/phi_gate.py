"""The outbound PHI gate: an independent audit of every payload before it is enqueued.

The de-identification engine is one piece of code; if it has a bug, this gate must not share it.
So nothing here imports the engine, its table or its scrubber: the gate captures the original's
identifying values itself (before de-identification), then searches the finished payload — the
encoded de-identified file and the result JSON that travels with it — for any of them. Any hit
blocks the upload (reason ``phi_audit``) and the case stays on the device for review.

Two searches, so that neither encoding nor spelling hides a value:

* the file's bytes, case-insensitively, for values of at least :data:`MIN_BYTES_LENGTH`
  characters; name parts only as whole words, since kept text is full of them ("PRIMARY"
  holds MARY). The image itself is not searched (any short string turns up in it by chance),
  but everything else in the pixel data is (:func:`pixel_data_residue`): JPEG and JPEG 2000
  marker segments (comments and application data hide there), bytes after a codestream or
  after the last native frame, and whole any encapsulated data the gate cannot parse;
* every decoded text value of the parsed file and every value (not key: those are the
  device's own field names) of the parsed JSON, for whole words of at least
  :data:`MIN_WORD_LENGTH` characters (decoding applies the character set and JSON escapes).

Hits are reported by field name only: the values are PHI and never appear in results or logs.
"""

from __future__ import annotations

import io
import itertools
import json
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments, parse_basic_offsets
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.uid import RLELossless
from pydicom.valuerep import PersonName
from rle.rle import decode_segment  # type: ignore[import-not-found]  # Rust, no stubs

from triage_app.dicom.reader import is_decoder_panic, quiet_pydicom

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
        """Read the patient's identifiers (and, if they are remapped, the instance's UIDs).

        Quietly: reading a value converts it, and pydicom warns with an invalid one quoted (a
        UID with a leading-zero component, common from scanners): PHI on stderr.
        """
        found: set[tuple[str, str]] = set()
        with quiet_pydicom():
            for keyword in _PATIENT_TEXT:
                for text in _strings(ds.get(keyword)):
                    found.add((keyword, text))
                    if "Name" in keyword:  # PatientName, OtherPatientNames, ...BirthName
                        found.update((keyword, part) for part in _NAME_PARTS.split(text) if part)
            for item in ds.get("OtherPatientIDsSequence") or []:
                ids = _strings(item.get("PatientID"))
                found.update(("OtherPatientIDsSequence", text) for text in ids)
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


# --- What in the pixel data is not the image ------------------------------------------------------
# Written apart from the engine's pixel cleaning, on purpose: it finds what that code missed.

# After entropy-coded JPEG data, the next marker: 0xFF then neither stuffing (below 0x80, for
# JPEG-LS too), a restart marker (D0-D7) nor a fill byte.
_JPEG_NEXT_MARKER = re.compile(rb"\xff[\x80-\xcf\xd8-\xfe]")
_CODESTREAM_START = re.compile(rb"\xff\xd8\xff|\xff\x4f\xff\x51")


def _jpeg_headers(data: bytes, pos: int, found: list[bytes]) -> int:
    """Collect a JPEG codestream's marker segments from SOI at ``pos``; returns where it ends.

    Parsing stops at anything unexpected, and the rest of the data is then collected whole.
    """
    pos += 2
    while pos + 2 <= len(data) and data[pos] == 0xFF:
        while pos < len(data) - 1 and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes
        marker = data[pos + 1]
        if marker == 0xD9:
            return pos + 2
        if pos + 4 > len(data) or not 0xC0 <= marker <= 0xFE or 0xD0 <= marker <= 0xD8:
            break
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        found.append(data[pos:end])
        pos = end
        if marker == 0xDA:  # the scan's entropy-coded data: the image
            match = _JPEG_NEXT_MARKER.search(data, pos)
            if match is None:
                break
            pos = match.start()
    found.append(data[pos:])
    return len(data)


def _j2k_headers(data: bytes, pos: int, found: list[bytes]) -> int:
    """Collect a JPEG 2000 codestream's main and tile-part headers from SOC at ``pos``."""
    pos += 2
    while pos + 4 <= len(data):
        marker = int.from_bytes(data[pos : pos + 2], "big")
        if marker == 0xFFD9:
            return pos + 2
        if marker == 0xFF90:  # SOT: its header up to SOD is collected, its packets are not
            if pos + 10 > len(data):
                break
            length = int.from_bytes(data[pos + 6 : pos + 10], "big")
            end = data.find(b"\xff\xd9", pos) if length == 0 else pos + length
            if end <= pos:
                break
            header = pos + 12
            while header + 4 <= end and data[header : header + 2] != b"\xff\x93":
                header += 2 + int.from_bytes(data[header + 2 : header + 4], "big")
            # Up to SOD; all of the tile-part if its header does not parse.
            found.append(data[pos : header + 2] if header + 2 <= end else data[pos:end])
            pos = end
            continue
        if marker >> 8 != 0xFF:
            break
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        found.append(data[pos:end])
        pos = end
    found.append(data[pos:])
    return len(data)


def _fragments(value: bytes) -> list[bytes] | None:
    try:
        buffer = DicomBytesIO(value)
        buffer.is_little_endian = True
        parse_basic_offsets(buffer)
        return list(generate_fragments(buffer))
    except (ValueError, struct.error, EOFError):
        return None


def _rle_segment_length(segment: bytes) -> int | None:
    """How many bytes a PackBits segment decodes to; None if it stops inside a run, or if
    the decoder cannot take it (an empty segment makes it panic: counted as residue)."""
    for data in (segment, segment.removesuffix(b"\x00")):
        if not data:
            continue
        try:
            return len(decode_segment(data))
        except ValueError:
            continue
        except BaseException as exc:
            if is_decoder_panic(exc):
                return None
            raise
    return None


def _rle_residue(fragments: list[bytes], pixels: int) -> bytes:
    """RLE frames: each header, and whole any segment that decodes to more or less than one
    byte plane (bytes after its runs are not the image); all of a frame without a sound layout.
    """
    found: list[bytes] = []
    for frame in fragments:
        count, *offsets = struct.unpack_from("<16I", frame) if len(frame) >= 64 else (0,)
        bounds = [*offsets[:count], len(frame)] if 0 < count <= 15 else []
        if not bounds or bounds[0] != 64 or any(b <= a for a, b in itertools.pairwise(bounds)):
            found.append(frame)
            continue
        found.append(frame[:64])
        for a, b in itertools.pairwise(bounds):
            if _rle_segment_length(frame[a:b]) != pixels:
                found.append(frame[a:b])
    return b"\x00".join(found)


def _encapsulated_residue(value: bytes) -> bytes:
    fragments = _fragments(value)
    if fragments is None:
        return value
    data = b"".join(fragments)
    found: list[bytes] = []
    pos = 0
    while pos < len(data):
        match = _CODESTREAM_START.search(data, pos)
        start = match.start() if match else len(data)
        found.append(data[pos:start])  # between codestreams: nothing belongs there
        if match is None:
            break
        parse = _jpeg_headers if data[start + 1] == 0xD8 else _j2k_headers
        pos = parse(data, start, found)
    return b"\x00".join(found)


def _native_length(ds: Dataset) -> int | None:
    """Bytes of native pixel data the Image Pixel attributes account for; None if unknown."""
    try:
        bits = int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames") or 1)
        bits *= int(ds.get("SamplesPerPixel") or 1) * int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        return None
    if str(ds.get("PhotometricInterpretation") or "").strip() == "YBR_FULL_422":
        bits = bits // 3 * 2
    length = (bits + 7) // 8
    return length + length % 2


def pixel_data_residue(ds: Dataset) -> bytes:
    """Everything in ``ds``'s pixel data but the coded image, for the byte search.

    Encapsulated: every codestream's marker segments and whatever lies outside codestreams
    (all of it for data that is no JPEG or JPEG 2000 codestream); RLE frame headers and any
    segment with more than its runs. Native: the bytes after the frames, float pixel data too.
    """
    for keyword, bits in (("FloatPixelData", 32), ("DoubleFloatPixelData", 64)):
        if keyword in ds:
            frames = int(ds.get("NumberOfFrames") or 1)
            length = int(ds.get("Rows") or 0) * int(ds.get("Columns") or 0) * frames * bits // 8
            return bytes(ds[keyword].value[length:])
    if "PixelData" not in ds:
        return b""
    value = bytes(ds.PixelData)
    syntax = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
    if syntax == RLELossless:
        fragments = _fragments(value)
        pixels = int(ds.get("Rows") or 0) * int(ds.get("Columns") or 0)
        return value if fragments is None else _rle_residue(fragments, pixels)
    if syntax is not None and syntax.is_transfer_syntax and syntax.is_encapsulated:
        return _encapsulated_residue(value)
    frames_length = _native_length(ds)
    return value if frames_length is None else value[frames_length:]


def audit_payload(dicom: bytes, sidecar: bytes, original: IdentifyingValues) -> tuple[str, ...]:
    """The fields of ``original`` found anywhere in the payload; empty means it may leave.

    An unreadable payload is itself a finding: what cannot be checked is not sent. The file
    must be a Part 10 file, as the payload always is: forced, any bytes would read as an empty
    data set and pass.
    """
    try:
        with quiet_pydicom():  # pydicom's own warnings quote values: PHI in the logs
            ds = pydicom.dcmread(io.BytesIO(dicom))
            residue = pixel_data_residue(ds)
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
    haystack = header.getvalue().lower() + b"\x00" + residue.lower()
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
