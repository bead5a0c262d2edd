"""Pixel data that carries the image and nothing else.

Why this exists: the profile cleans attributes, but identifiers also hide in pixel data bytes
that no viewer shows and no header rule reaches:

* a JPEG comment (COM) or application (APPn) segment inside a compressed frame: scanners and
  PACS write names, IDs and dates there, and decoders skip them;
* bytes after the end of a JPEG or JPEG 2000 codestream, and after the last native frame;
* bytes after the runs of an RLE segment;
* bits above Bits Stored in native and RLE pixel data, where a retired *embedded* overlay keeps
  its bitmap (often a rendered patient banner) and decoders never look.

None of them is the image, so they are cut out: the decoded image stays exactly what the model
saw. JPEG (ISO 10918, every process) and JPEG-LS frames keep their coding segments (frame and
scan headers, tables, restart interval) and lose COM and APPn, except the three application
segments a decoder reads to choose the colour transform, which are rewritten to their fixed
fields only: JFIF (APP0), Adobe (APP14, its transform flag) and CharLS's colour transform
(APP8 ``mrfx``). JPEG 2000 codestreams lose their main-header COM segments. RLE frames are
decoded segment by segment to check them (only decoding finds where a segment's runs end): a
clean frame is kept as it is, one with anything more is stored decoded, natively (lossless).

What cannot be parsed is not guessed at: the image is reported (:data:`UNVERIFIED`) and so never
leaves the device without a pixel-clean rule, which stores it decoded. The same holds for an
embedded overlay whose bits are kept (:data:`EMBEDDED_OVERLAY`).
"""

from __future__ import annotations

import itertools
import logging
import re
import struct
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from numpy.typing import NDArray
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_fragments, generate_frames, parse_basic_offsets
from pydicom.errors import BytesLengthException
from pydicom.filebase import DicomBytesIO
from pydicom.uid import (
    UID,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    RLETransferSyntaxes,
)
from rle.rle import decode_segment  # type: ignore[import-not-found]  # Rust, no stubs

from triage_app.dicom.reader import fits_decoding_limits, is_decoder_panic, transfer_syntax
from triage_app.errors import InputError

log = logging.getLogger(__name__)

#: Burned-in reason: encapsulated pixel data whose markers or layout could not be parsed.
UNVERIFIED = "pixel_data_unverified"
#: Burned-in reason: an embedded overlay (60xx,0100/0102) in bits that are kept.
EMBEDDED_OVERLAY = "embedded_overlay"

_PIXEL_TAGS = {
    "PixelData": 0x7FE00010,
    "FloatPixelData": 0x7FE00008,
    "DoubleFloatPixelData": 0x7FE00009,
}
_EXTENDED_OFFSETS = ("ExtendedOffsetTable", "ExtendedOffsetTableLengths")
_JPEG_SYNTAXES = frozenset((*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes))
_J2K_SYNTAXES = frozenset(JPEG2000TransferSyntaxes)
_RLE_SYNTAXES = frozenset(RLETransferSyntaxes)
# Decoding a damaged RLE frame (to store it natively) fails inside pydicom or its plugins with
# one of these.
_DECODE_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    IndexError,
    RuntimeError,
    NotImplementedError,
    EOFError,
    struct.error,
    BytesLengthException,
)

# --- JPEG and JPEG-LS (ISO 10918-1, ISO 14495-1) -------------------------------------------------

_SOI = b"\xff\xd8"
_EOI = b"\xff\xd9"
_SOS = 0xDA
_EOI_MARKER = 0xD9
_COM = 0xFE
_APP = range(0xE0, 0xF0)
# Segments that code the image, kept as they are: SOF0-15 (not DHT C4, JPG C8, DAC CC), DHT,
# DAC, SOS, DQT, DNL, DRI, DHP, EXP, and JPEG-LS's SOF55 and LSE. Anything else is refused.
_JPEG_CODING = frozenset(
    {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)}
    | {0xC4, 0xCC, 0xDA, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0xF7, 0xF8}
)
# The end of entropy-coded data: 0xFF and a byte that is neither stuffing (0x00; JPEG-LS stuffs
# a zero bit, so anything below 0x80), a restart marker (D0-D7) nor another fill byte.
_NEXT_MARKER = re.compile(rb"\xff[\x80-\xcf\xd8-\xfe]")
# Application segments decoders read, rewritten to their fixed fields (nothing free-form kept).
_JFIF = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
_ADOBE_LENGTH = 12  # "Adobe", version, flags0, flags1, transform


def _decoder_app_segment(marker: int, payload: bytes) -> bytes | None:
    """The canonical form of an APPn segment a decoder needs; None for any other."""
    if marker == 0xE0 and payload.startswith(b"JFIF\x00"):
        return _JFIF
    if marker == 0xEE and payload.startswith(b"Adobe") and len(payload) >= _ADOBE_LENGTH:
        transform = payload[_ADOBE_LENGTH - 1 : _ADOBE_LENGTH]
        return b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00" + transform
    if marker == 0xE8 and payload.startswith(b"mrfx") and len(payload) >= 5:
        return b"\xff\xe8\x00\x07mrfx" + payload[4:5]
    return None


def _jpeg_codestream(data: bytes, start: int) -> tuple[bytes, int] | None:
    """The JPEG codestream at ``start`` without COM/APPn: (kept bytes, end); None if unparsed."""
    if data[start : start + 2] != _SOI:
        return None
    kept = [_SOI]
    pos = start + 2
    size = len(data)
    while True:
        if pos >= size or data[pos] != 0xFF:
            return None
        while pos < size and data[pos] == 0xFF:  # fill bytes may precede any marker
            pos += 1
        if pos >= size:
            return None
        marker = data[pos]
        pos += 1
        if marker == _EOI_MARKER:
            kept.append(_EOI)
            return b"".join(kept), pos
        end = pos + int.from_bytes(data[pos : pos + 2], "big")
        if pos + 2 > size or end < pos + 2 or end > size:
            return None
        if marker in _JPEG_CODING:
            kept.append(b"\xff" + data[pos - 1 : end])
        elif marker in _APP:
            canonical = _decoder_app_segment(marker, data[pos + 2 : end])
            if canonical is not None:
                kept.append(canonical)
        elif marker != _COM:
            return None
        pos = end
        if marker == _SOS:
            found = _NEXT_MARKER.search(data, pos)
            if found is None:
                return None
            kept.append(data[pos : found.start()])
            pos = found.start()


# --- JPEG 2000 (ISO 15444-1, -2 and -15 codestreams) ---------------------------------------------

_SOC_SIZ = b"\xff\x4f\xff\x51"
_SOT = 0xFF90
_SOD = 0xFF93
_EOC = 0xFFD9
_J2K_COM = 0xFF64
# Main-header segments (Part 1: SIZ COD COC TLM PLM QCD QCC RGN POC PPM CRG; HTJ2K: CAP CPF;
# Part 2: 0xFF70-0xFF7F) and tile-part header segments (COD COC QCD QCC RGN POC PPT PLT, Part 2).
_J2K_PART2 = frozenset(range(0xFF70, 0xFF80))
_J2K_MAIN = frozenset(
    {0xFF50, 0xFF51, 0xFF52, 0xFF53, 0xFF55, 0xFF57, 0xFF59, 0xFF5C, 0xFF5D, 0xFF5E, 0xFF5F}
    | {0xFF60, 0xFF63}
    | _J2K_PART2
)
_J2K_TILE = frozenset({0xFF52, 0xFF53, 0xFF58, 0xFF5C, 0xFF5D, 0xFF5E, 0xFF5F, 0xFF61} | _J2K_PART2)


def _j2k_codestream(data: bytes, start: int) -> tuple[bytes, int] | None:
    """The JPEG 2000 codestream at ``start`` without main-header COM: (kept bytes, end).

    None if unparsed, and for a COM in a tile-part header: removing it would change the
    tile-part's length (and any TLM table), which is not worth the risk for what no known
    encoder writes.
    """
    if data[start : start + 4] != _SOC_SIZ:
        return None
    kept = [data[start : start + 2]]
    pos = start + 2
    size = len(data)
    marker = 0
    while pos + 4 <= size:  # the main header, up to the first tile-part
        marker = int.from_bytes(data[pos : pos + 2], "big")
        if marker == _SOT:
            break
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if end < pos + 4 or end > size:
            return None
        if marker in _J2K_MAIN:
            kept.append(data[pos:end])
        elif marker != _J2K_COM:
            return None
        pos = end
    while marker == _SOT:
        if pos + 12 > size or data[pos + 2 : pos + 4] != b"\x00\x0a":
            return None
        length = int.from_bytes(data[pos + 6 : pos + 10], "big")
        # Psot 0: the last tile-part runs to EOC, which packet data never contains (bit stuffing
        # keeps a byte after 0xFF below 0x90).
        end = data.find(_EOI, pos) if length == 0 else pos + length
        if end < pos + 14 or end + 2 > size or not _j2k_tile_header_ok(data, pos + 12, end):
            return None
        kept.append(data[pos:end])
        pos = end
        marker = int.from_bytes(data[pos : pos + 2], "big")
    if marker != _EOC:
        return None
    kept.append(_EOI)
    return b"".join(kept), pos + 2


def _j2k_tile_header_ok(data: bytes, pos: int, end: int) -> bool:
    """Whether the tile-part header from ``pos`` has only coding segments up to its SOD."""
    while pos + 2 <= end:
        marker = int.from_bytes(data[pos : pos + 2], "big")
        if marker == _SOD:
            return True
        if marker not in _J2K_TILE or pos + 4 > end:
            return False
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return False


# --- Encapsulated pixel data ------------------------------------------------------------------


def _codestreams(ds: Dataset, syntax: UID, frames: int) -> tuple[list[bytes], bool] | None:
    """Each frame's codestream without what is not the image, and whether anything was cut.

    The fragments are read as one stream of back-to-back codestreams, one per frame, the first
    at the start (a JP2 file wrapper is refused: its colour box can change the decoding); bytes
    between codestreams or after the last frame are dropped, whatever the offset tables say.
    None when the pixel data cannot be parsed.
    """
    parse, start_marker = (
        (_jpeg_codestream, _SOI + b"\xff")
        if syntax in _JPEG_SYNTAXES
        else (_j2k_codestream, _SOC_SIZ)
    )
    try:
        buffer = DicomBytesIO(ds.PixelData)
        buffer.is_little_endian = True
        parse_basic_offsets(buffer)
        stream = b"".join(generate_fragments(buffer))
    except (ValueError, struct.error, EOFError):
        return None
    cleaned: list[bytes] = []
    changed = False
    pos = 0
    while len(cleaned) < frames:
        start = stream.find(start_marker, pos) if cleaned else 0
        if start < 0:
            return None
        changed |= not _is_padding(stream[pos:start])
        parsed = parse(stream, start)
        if parsed is None:
            return None
        codestream, pos = parsed
        changed |= codestream != stream[start:pos]
        cleaned.append(codestream)
    return cleaned, changed or not _is_padding(stream[pos:])


def _is_padding(gap: bytes) -> bool:
    """The one byte (NUL, or a JPEG fill byte) that evens an odd-length frame, or nothing."""
    return gap in (b"", b"\x00", b"\xff")


def _clean_encapsulated(ds: Dataset, syntax: UID, frames: int) -> bool:
    """Strip what is not the image from JPEG, JPEG-LS and JPEG 2000 frames; False if unparsed."""
    parsed = _codestreams(ds, syntax, frames)
    if parsed is None:
        return False
    cleaned, changed = parsed
    if changed:
        ds.PixelData = encapsulate(cleaned, has_bot=frames > 1)
        ds["PixelData"].is_undefined_length = True
        for keyword in _EXTENDED_OFFSETS:  # the offsets changed; the basic table has them
            if keyword in ds:
                del ds[keyword]
    return True


# --- Native and RLE pixel data -----------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """What a decoder reads of uncompressed pixels: the frame geometry and the bits that count."""

    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    subsampled: bool  # YBR_FULL_422: two chroma samples per pair of pixels (PS3.3 C.7.6.3.1.2)

    @property
    def pixels(self) -> int:
        """Rows x columns: the samples of one plane of one frame."""
        return self.rows * self.columns

    @property
    def native_length(self) -> int:
        """Bytes of all frames as native pixel data, without the pad byte."""
        bits = self.pixels * self.frames * self.samples * self.bits_allocated
        return ((bits // 3 * 2 if self.subsampled else bits) + 7) // 8

    @property
    def has_unused_bits(self) -> bool:
        return self.bits_stored < self.bits_allocated and self.bits_allocated in (8, 16, 32, 64)


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _layout(ds: Dataset, keyword: str) -> _Layout | None:
    """The layout from the Image Pixel attributes; None if they do not describe one."""
    rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
    frames = _int(ds, "NumberOfFrames", 1)
    samples = _int(ds, "SamplesPerPixel", 1)
    if keyword == "PixelData":
        allocated, stored = _int(ds, "BitsAllocated"), _int(ds, "BitsStored")
        signed = _int(ds, "PixelRepresentation", 0) == 1
    else:  # float pixel data: every allocated bit is the value
        allocated = 32 if keyword == "FloatPixelData" else 64
        stored, signed = allocated, True
    if rows is None or columns is None or frames is None or samples is None:
        return None
    if allocated is None or stored is None or min(rows, columns, frames, samples, stored) < 1:
        return None
    if stored > allocated or (allocated != 1 and allocated % 8):
        return None
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    subsampled = photometric == "YBR_FULL_422"
    return _Layout(rows, columns, frames, samples, allocated, stored, signed, subsampled)


def _with_unused_bits_cleared(values: NDArray[Any], layout: _Layout) -> NDArray[Any]:
    """``values`` (unsigned integers) with bits above Bits Stored cleared, or sign-extended for
    signed pixels: a reader that ignores Bits Stored then reads the same number, and the unused
    bits carry nothing of their own either way."""
    dtype = values.dtype
    mask = (1 << layout.bits_stored) - 1
    kept: NDArray[Any] = values & dtype.type(mask)
    if layout.signed:
        negative = (kept >> dtype.type(layout.bits_stored - 1)) & dtype.type(1)
        kept |= negative * dtype.type(((1 << layout.bits_allocated) - 1) ^ mask)
    return kept


def _clean_native(ds: Dataset, keyword: str, little_endian: bool) -> bool:
    """Cut bytes after the last frame and clear bits above Bits Stored; False if unparsed."""
    layout = _layout(ds, keyword)
    if layout is None:
        return False
    tag = _PIXEL_TAGS[keyword]
    # The value as read (an undecoded element stays undecoded unless it changes).
    data = cast("DataElement | RawDataElement", ds.get_item(tag)).value
    if not isinstance(data, bytes):
        return False
    new = data[: layout.native_length + layout.native_length % 2]  # its even length
    if layout.has_unused_bits:
        size = layout.bits_allocated // 8
        usable = len(new) - len(new) % size
        dtype = np.dtype(f"{'<' if little_endian else '>'}u{size}")
        values = np.frombuffer(new, dtype=dtype, count=usable // size)
        kept = _with_unused_bits_cleared(values, layout)
        if not np.array_equal(kept, values):
            new = bytes(kept.astype(dtype, copy=False).tobytes()) + new[usable:]
    if new != data:
        ds[tag].value = new
    return True


def _rle_segment(segment: bytes) -> bytes | None:
    """A PackBits segment decoded in full; None if it stops inside a run or has none."""
    for data in (segment, segment[:-1] if segment.endswith(b"\x00") else None):
        if not data:
            continue  # no runs at all (the Rust decoder panics on an empty segment)
        try:
            return bytes(decode_segment(data))
        except ValueError:
            continue  # an odd segment's pad byte reads as a run cut short
        except BaseException as exc:
            if not is_decoder_panic(exc):
                raise
            return None
    return None


def _rle_is_clean(ds: Dataset, layout: _Layout) -> bool:
    """Whether each RLE frame is its header and segments that decode to the image exactly.

    Each segment must decode to one byte plane of the frame (PS3.5 Annex G), with nothing
    after its runs but the pad byte, and the planes must leave the bits above Bits Stored
    clear (or sign-extended).
    """
    size = layout.bits_allocated // 8
    count = layout.samples * size
    try:
        frames = list(generate_frames(ds.PixelData, number_of_frames=layout.frames))
    except (ValueError, struct.error, EOFError):
        return False
    if len(frames) != layout.frames or layout.bits_allocated % 8 or not 0 < count <= 15:
        return False
    for frame in frames:
        if len(frame) < 64:
            return False
        declared, *offsets = struct.unpack_from("<16I", frame)
        bounds = [*offsets[:count], len(frame)]
        if declared != count or any(offsets[count:]) or bounds[0] != 64:
            return False
        if any(end <= start for start, end in itertools.pairwise(bounds)):
            return False
        planes = [_rle_segment(frame[a:b]) for a, b in itertools.pairwise(bounds)]
        if any(plane is None or len(plane) != layout.pixels for plane in planes):
            return False
        if layout.has_unused_bits and not _rle_bits_clear(cast("list[bytes]", planes), layout):
            return False
    return True


def _rle_bits_clear(planes: list[bytes], layout: _Layout) -> bool:
    """Whether the byte planes (most significant first, per sample) leave unused bits clear."""
    size = layout.bits_allocated // 8
    dtype = np.dtype(f"u{size}")
    for sample in range(layout.samples):
        values = np.zeros(layout.pixels, dtype=dtype)
        for index in range(size):
            plane = np.frombuffer(planes[sample * size + index], dtype=np.uint8)
            values |= plane.astype(dtype) << dtype.type(8 * (size - 1 - index))
        if not np.array_equal(_with_unused_bits_cleared(values, layout), values):
            return False
    return True


def _embedded_overlay_bits(ds: Dataset) -> list[int]:
    """Bit positions of embedded overlays (60xx,0100/0102 without Overlay Data, retired)."""
    positions = []
    for group in range(0x6000, 0x6020, 2):
        allocated = ds.get((group, 0x0100))
        position = ds.get((group, 0x0102))
        if (group, 0x3000) in ds or allocated is None:
            continue
        try:
            if int(allocated.value) > 1:
                positions.append(int(position.value) if position is not None else 0)
        except (TypeError, ValueError):
            positions.append(0)
    return positions


def clean_pixel_data(ds: Dataset) -> tuple[str, ...]:
    """Cut what is not the image out of ``ds``'s pixel data; the reasons it may still hide some.

    Returns :data:`UNVERIFIED` for pixel data that cannot be parsed (or a transfer syntax with
    no parser: MPEG, HEVC, JPEG XL, deflated frames) and :data:`EMBEDDED_OVERLAY` for an
    embedded overlay in bits that are kept. Never raises for bad pixel data.
    """
    keyword = next((k for k in _PIXEL_TAGS if k in ds), None)
    if keyword is None:
        return ()
    overlay_bits = _embedded_overlay_bits(ds)
    try:
        syntax = transfer_syntax(ds)
    except InputError:
        return (UNVERIFIED,)
    layout = _layout(ds, keyword)
    if (
        syntax in _RLE_SYNTAXES
        and layout is not None
        and not fits_decoding_limits(
            layout.rows, layout.columns, layout.samples, layout.bits_allocated
        )
    ):
        log.debug("RLE frames too large to decode and check")
        return (UNVERIFIED,)
    if syntax in _RLE_SYNTAXES and (layout is None or not _rle_is_clean(ds, layout)):
        try:
            # What decoding cannot see goes: the same values, stored natively.
            ds.decompress(as_rgb=False, generate_instance_uid=False)
        except BaseException as exc:
            if not isinstance(exc, _DECODE_ERRORS) and not is_decoder_panic(exc):
                raise
            log.debug("RLE pixel data cannot be decoded: %s", type(exc).__name__)
            return (UNVERIFIED,)
        syntax = transfer_syntax(ds)
    if not syntax.is_transfer_syntax:
        return (UNVERIFIED,)
    if syntax.is_encapsulated and syntax not in _RLE_SYNTAXES:
        parsed = syntax in _JPEG_SYNTAXES | _J2K_SYNTAXES and _clean_encapsulated(
            ds, syntax, _int(ds, "NumberOfFrames", 1) or 1
        )
        reasons = () if parsed else (UNVERIFIED,)
        return reasons + ((EMBEDDED_OVERLAY,) if overlay_bits else ())
    if not syntax.is_encapsulated and not _clean_native(ds, keyword, syntax.is_little_endian):
        return (UNVERIFIED,)
    # Bits above Bits Stored are clear now: only an overlay inside the stored bits remains.
    stored = layout.bits_stored if layout is not None else 0
    return (EMBEDDED_OVERLAY,) if any(bit < stored for bit in overlay_bits) else ()
