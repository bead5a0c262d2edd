"""Part 10 encoding with a fast path for elements that were never decoded.

Why this exists: de-identification decodes only what it changes, so most elements of a file
are still the bytes they were read as (pydicom's ``RawDataElement``). pydicom's writer spends
most of its time on per-element bookkeeping for them (a buffer, a cast and a length check per
element) and deep-copies the file meta on every call; writing a raw element is its tag, VR and
length followed by the bytes as read. This writer does exactly that and hands every decoded
element, and every case it does not handle (deflated, big endian, a change of encoding or
character set, undefined lengths), to pydicom, so its output is byte for byte what
``Dataset.save_as(..., enforce_file_format=True)`` writes.
"""

from __future__ import annotations

import struct
from typing import cast

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset, validate_file_meta
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import (
    dcmwrite,
    write_data_element,
)
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pydicom.valuerep import PersonName

_UNDEFINED_LENGTH = 0xFFFFFFFF
_EXPLICIT_VR_LENGTH_32 = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_SHORT_HEADER = struct.Struct("<HH2sH")
_LONG_HEADER = struct.Struct("<HH2sHI")
_IMPLICIT_HEADER = struct.Struct("<HHI")
_UNDEFINED = struct.pack("<I", _UNDEFINED_LENGTH)
_ITEM = struct.pack("<HH", 0xFFFE, 0xE000)
_ITEM_DELIMITER = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
_SEQUENCE_DELIMITER = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
_NUMBER_FORMATS = {"US": "H", "UL": "L", "SS": "h", "SL": "l", "FL": "f", "FD": "d"}
# Written as their characters: pydicom's DA/DT/TM, DS/IS and PN objects keep the string they
# were read as and are left to pydicom; only values that are plain strings are encoded here.
_STRING_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DT", "TM", "UI", "LO", "LT", "SH", "ST", "UC", "UT", "UR", "PN"}
)
_PLAIN_STRING_TYPES = (str, UID, PersonName)
# Character sets in which an ASCII character is its own byte (no escape sequences).
_ASCII_COMPATIBLE = frozenset({"", "ISO_IR 6", "ISO 2022 IR 6", "ISO_IR 100", "ISO_IR 192"})


def encode_part10(ds: Dataset) -> bytes:
    """``ds`` as a Part 10 file: 128-byte preamble, ``DICM``, file meta, data set.

    The file meta must name the transfer syntax. It is updated in place as pydicom's writer
    would update its copy: Media Storage SOP Class/Instance UIDs from the data set, group length
    and version added.
    """
    meta: FileMetaDataset = ds.file_meta
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    syntax = UID(str(meta.get("TransferSyntaxUID") or ""))
    if not _fast_path_applies(ds, syntax):
        return _encode_with_pydicom(ds)
    out = DicomBytesIO()
    out.is_little_endian = True
    out.is_implicit_VR = False
    preamble = getattr(ds, "preamble", None) or bytes(128)
    out.write(preamble)
    out.write(b"DICM")
    _write_file_meta(out, meta)
    out.is_implicit_VR = syntax.is_implicit_VR
    if "PixelData" in ds and not isinstance(ds.get_item(0x7FE00010), RawDataElement):
        # As pydicom's writer does: encapsulated pixel data has an undefined length.
        ds["PixelData"].is_undefined_length = syntax.is_compressed
    _write_dataset(out, ds, implicit=syntax.is_implicit_VR)
    return bytes(out.getvalue())


def ascii_compatible(ds: Dataset) -> bool:
    """Whether ``ds``'s character set writes ASCII text as ASCII bytes."""
    charset = ds.get("SpecificCharacterSet") or ""
    charsets = [charset] if isinstance(charset, str) else list(charset)
    return all(str(c).strip().upper() in _ASCII_COMPATIBLE for c in charsets)


def _fast_path_applies(ds: Dataset, syntax: UID) -> bool:
    if not syntax.is_transfer_syntax or syntax.is_private or syntax.is_deflated:
        return False
    if not syntax.is_little_endian:
        return False
    if ds.original_encoding != (syntax.is_implicit_VR, True):
        return False  # pydicom re-encodes (and corrects ambiguous VRs); leave that to it
    return bool(ds.original_character_set == ds._character_set)


def _write_dataset(
    out: DicomBytesIO,
    ds: Dataset,
    *,
    implicit: bool,
    ascii_text: bool | None = None,
    group_length: bool = True,
) -> None:
    """``ds``'s elements in tag order; ``ascii_text`` is inherited by sequence items."""
    encodings = ds.get("SpecificCharacterSet", "iso8859")
    if ascii_text is None:
        ascii_text = ascii_compatible(ds)
    for tag in sorted(ds.keys()):
        if tag & 0xFFFF == 0 and (tag >> 16 > 6 or not group_length):
            continue  # retired in a data set (PS3.5 7.2); the file meta's is written apart
        # pydicom's overload omits RawDataElement, which is what an unread element is.
        element = cast("DataElement | RawDataElement", ds.get_item(tag))
        if isinstance(element, RawDataElement):
            if element.length != _UNDEFINED_LENGTH and (implicit or element.VR):
                value = element.value or b""
                if _write_element(out, tag, element.VR or "", value, implicit=implicit):
                    continue
        elif ascii_text and element.VR == "SQ":
            if _write_sequence(out, element, implicit=implicit):
                continue
        elif ascii_text and not element.is_undefined_length:  # encapsulated: pydicom writes it
            encoded = _encode_simple_value(element)
            if encoded is not None and _write_element(
                out, tag, element.VR, encoded, implicit=implicit
            ):
                continue
        write_data_element(out, element, encodings)


def _write_file_meta(out: DicomBytesIO, meta: FileMetaDataset) -> None:
    """Group 2, explicit VR little endian, led by its group length (as pydicom writes it)."""
    validate_file_meta(meta, enforce_standard=True)  # adds the version; raises if incomplete
    meta.FileMetaInformationGroupLength = 0
    body = DicomBytesIO()
    body.is_little_endian = True
    body.is_implicit_VR = False
    _write_dataset(body, meta, implicit=False, ascii_text=True, group_length=False)
    encoded = bytes(body.getvalue())
    meta.FileMetaInformationGroupLength = len(encoded)
    out.write(_SHORT_HEADER.pack(0x0002, 0x0000, b"UL", 4) + struct.pack("<I", len(encoded)))
    out.write(encoded)


def _write_sequence(out: DicomBytesIO, element: DataElement, *, implicit: bool) -> bool:
    """A decoded sequence, item by item; False when an item needs pydicom's re-encoding."""
    items = []
    for item in element.value:
        if "SpecificCharacterSet" in item:
            return False
        if item.original_encoding == (None, None):
            # A new item: pydicom re-encodes it after resolving ambiguous VRs; without those
            # (and with nothing undecoded in it) that writes the same bytes.
            if any(len(new.VR or "") != 2 for new in item):
                return False
        elif (
            item.original_encoding != (implicit, True)
            or item.original_character_set != item._character_set
        ):
            return False
        body = DicomBytesIO()
        body.is_little_endian = True
        body.is_implicit_VR = implicit
        _write_dataset(body, item, implicit=implicit, ascii_text=True)
        encoded = bytes(body.getvalue())
        if getattr(item, "is_undefined_length_sequence_item", False):
            items.append(_ITEM + _UNDEFINED + encoded + _ITEM_DELIMITER)
        else:
            items.append(_ITEM + struct.pack("<I", len(encoded)) + encoded)
    value = b"".join(items)
    group, number = element.tag >> 16, element.tag & 0xFFFF
    length = _UNDEFINED_LENGTH if element.is_undefined_length else len(value)
    if implicit:
        out.write(_IMPLICIT_HEADER.pack(group, number, length))
    else:
        out.write(_LONG_HEADER.pack(group, number, b"SQ", 0, length))
    out.write(value)
    if element.is_undefined_length:
        out.write(_SEQUENCE_DELIMITER)
    return True


def _encode_simple_value(element: DataElement) -> bytes | None:
    """A plain ASCII string or binary number value encoded; None for anything else."""
    vr = element.VR
    value = element.value
    values = value if isinstance(value, list | MultiValue) else [value]
    if vr in ("OB", "UN") and type(value) is bytes:
        return value + b"\0" if len(value) % 2 and vr == "OB" else value
    if vr in _NUMBER_FORMATS:
        if value is None or value == "":
            return b""
        if not all(type(v) in (int, float) for v in values):
            return None
        return struct.pack(f"<{len(values)}{_NUMBER_FORMATS[vr]}", *values)
    if vr not in _STRING_VRS:
        return None
    if value is None or value == "":
        return b""
    texts = []
    for v in values:
        if type(v) not in _PLAIN_STRING_TYPES:
            return None
        text = str(v)
        if not text.isascii():
            return None
        texts.append(text)
    encoded = "\\".join(texts).encode("ascii")
    if len(encoded) % 2:
        encoded += b"\0" if vr == "UI" else b" "
    return encoded


def _write_element(out: DicomBytesIO, tag: int, vr: str, value: bytes, *, implicit: bool) -> bool:
    """Tag, VR, length and ``value``; False when pydicom must write it (no VR, too long)."""
    length = len(value)
    group, number = tag >> 16, tag & 0xFFFF
    if implicit:
        out.write(_IMPLICIT_HEADER.pack(group, number, length))
    else:
        if len(vr) != 2:
            return False
        code = vr.encode("ascii")
        if code in _EXPLICIT_VR_LENGTH_32:
            out.write(_LONG_HEADER.pack(group, number, code, 0, length))
        elif length <= 0xFFFF:
            out.write(_SHORT_HEADER.pack(group, number, code, length))
        else:
            return False
    out.write(value)
    return True


def _encode_with_pydicom(ds: Dataset) -> bytes:
    out = DicomBytesIO()
    dcmwrite(out, ds, enforce_file_format=True)
    return bytes(out.getvalue())
