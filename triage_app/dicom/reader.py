"""Read DICOM files and decode the one frame the triage uses.

Accepted input: Part 10 files (preamble + ``DICM`` + file meta), files whose file meta starts
without the preamble, and raw data sets without file meta (implicit or explicit VR, little or big
endian) as long as they start like DICOM (a group 0x0002 or 0x0008 tag). Anything else is refused
before pydicom's lenient ``force=True`` parsing ever sees it, so a text file or a PNG is
``not_dicom`` instead of an empty data set.

Frame policy: a multi-frame image is triaged on its middle frame, index ``n // 2`` (frame 0 for
one or two frames). Only that frame is decoded, which keeps large cine/tomo objects cheap, and the
middle of a sweep is the frame most likely to show the anatomy. The chosen index is reported in
``ImageInfo.frame_index``.

Every failure is an ``InputError`` subclass with a stable code and a one-line message that never
quotes header values (names, IDs and dates must not reach logs or records). Truncation is
detected explicitly, because pydicom accepts a short value or a missing tail without complaint.
"""

from __future__ import annotations

import io
import logging
import os
import re
import stat
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom import config
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import BytesLengthException
from pydicom.errors import InvalidDicomError as PydicomInvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import VR

from triage_app.dicom.image import DicomImage, ImageInfo, frame_attribute
from triage_app.errors import (
    CorruptPixelDataError,
    EmptyFileError,
    InvalidDicomError,
    NoPixelDataError,
    NotDicomError,
    TruncatedError,
    UnprocessableImageError,
    UnreadableFileError,
    UnsupportedPhotometricError,
    UnsupportedTransferSyntaxError,
)

logger = logging.getLogger(__name__)

Source = str | os.PathLike[str] | bytes

_PREAMBLE = 128
_HEAD = 144  # preamble + "DICM" + the (0002,0000) group length element
_UNDEFINED_LENGTH = 0xFFFFFFFF
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_EXPLICIT_VRS = frozenset(vr.value.encode("ascii") for vr in VR if len(vr.value) == 2)

_GREY = frozenset({"MONOCHROME1", "MONOCHROME2"})
_COLOUR = frozenset(
    {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_PARTIAL_422", "YBR_ICT", "YBR_RCT"}
)
_PALETTE = "PALETTE COLOR"
# Decoding limits, checked before any decoder runs. A decoder allocates the whole frame the
# header declares, whatever the file holds: 1.5 KB of RLE can declare 65535 x 65535 RGB (26 GB),
# which raises MemoryError or aborts the process when malloc fails. The largest projection
# images (full-field mammography, stitched long-leg radiographs) stay well inside both.
MAX_SIDE = 16384
MAX_FRAME_BYTES = 1 << 30  # decoded bytes of one frame: a 16384 x 16384 frame of 32-bit grey
# ITU-R BT.601 luma: the same weights DICOM uses for the Y of YBR_FULL.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

# pydicom converts raw element values lazily, on first access; a malformed value then raises one
# of these (BytesLengthException when the length does not fit the VR).
_VALUE_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    IndexError,
    OverflowError,
    NotImplementedError,
    struct.error,
    BytesLengthException,
)
# Parsing a damaged data set can fail anywhere inside pydicom's reader; these are the concrete
# types it (and the struct/zlib layers below it) raise for malformed input.
_PARSE_ERRORS: tuple[type[Exception], ...] = (
    *_VALUE_ERRORS,
    PydicomInvalidDicomError,
    RuntimeError,
)
# The decoder plugins (pylibjpeg-*, pydicom's RLE) are C extensions and third-party code with no
# common exception base; pydicom wraps plugin failures in RuntimeError, its own checks raise
# ValueError/AttributeError, and frame extraction from damaged fragments raises the rest.
_DECODE_ERRORS: tuple[type[Exception], ...] = (*_VALUE_ERRORS, RuntimeError, EOFError)


def read_dataset(source: Source, *, header_only: bool = False) -> Dataset:
    """Parse ``source`` (a path or the file's bytes) into a pydicom ``Dataset``.

    ``header_only=True`` stops before the pixel data: the fast path (well under a millisecond)
    for routing, scope checks and listings. Raises an ``InputError`` subclass for anything that
    is not a complete, parseable DICOM data set.
    """
    with _opened(source) as (fp, size):
        if not header_only and not isinstance(fp, io.BytesIO):
            # Every byte is read anyway; pydicom's many small reads are faster from memory.
            fp = io.BytesIO(fp.read())
        head = fp.read(_HEAD)
        force = _check_signature(head, size)
        fp.seek(0)
        with quiet_pydicom() as caught:
            ds = _parse(fp, force=force, header_only=header_only)
            _check_complete(ds, size, caught)
    if len(ds) == 0:
        if force:
            raise NotDicomError("not a DICOM file (no data elements could be read)")
        raise TruncatedError("DICOM file ends right after the file meta information")
    return ds


def load_image(source: Source) -> DicomImage:
    """Read ``source``, validate it as an image and decode the frame the triage uses.

    Frame policy: for ``n`` frames, frame ``n // 2`` (the middle one) is decoded; single-frame
    images use frame 0. Colour images (RGB, YBR_*, PALETTE COLOR) become float32 luminance;
    greyscale keeps the decoder's dtype. Raises an ``InputError`` subclass on any failure.
    """
    ds = read_dataset(source)
    with quiet_pydicom():
        keyword = _pixel_keyword(ds)
        syntax = transfer_syntax(ds)
        attrs = _pixel_attributes(ds, keyword)
        frame_index = attrs.frames // 2
        _check_frame_size(attrs)
        decoded, properties = _decode(ds, syntax, frame_index)
        stored = _to_grey(decoded, properties, ds, attrs)
        info = _image_info(ds, syntax, attrs, frame_index)
    logger.debug(
        "decoded frame %d of %d (%dx%d, %s)",
        frame_index,
        attrs.frames,
        attrs.rows,
        attrs.columns,
        syntax.name,
    )
    return DicomImage(info=info, stored=stored, dataset=ds)


# --- Reading -----------------------------------------------------------------------------------


@contextmanager
def _opened(source: Source) -> Iterator[tuple[IO[bytes], int]]:
    """Yield a binary file object and its size, mapping file-system failures to input errors."""
    if isinstance(source, bytes | bytearray | memoryview):
        if not source:
            raise EmptyFileError("file is empty (0 bytes)")
        yield io.BytesIO(source), len(source)
        return
    path = Path(source)
    try:
        st = path.stat()
        if stat.S_ISDIR(st.st_mode):
            raise UnreadableFileError("path is a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            # A FIFO or device would block or never end.
            raise UnreadableFileError("path is not a regular file")
        if st.st_size == 0:
            raise EmptyFileError("file is empty (0 bytes)")
        fp = path.open("rb")
    except FileNotFoundError as exc:
        raise UnreadableFileError("file not found") from exc
    except PermissionError as exc:
        raise UnreadableFileError("permission denied") from exc
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UnreadableFileError(f"cannot open file ({reason})") from exc
    with fp:
        try:
            yield fp, st.st_size
        except OSError as exc:  # pydicom's own bare OSError never gets here (see _parse)
            raise UnreadableFileError(f"cannot read file ({exc.strerror})") from exc


def _check_signature(head: bytes, size: int) -> bool:
    """Decide how to parse: ``False`` for a Part 10 file, ``True`` for ``force=True``.

    ``force=True`` makes pydicom accept any bytes, so it is used only when the content starts
    like a DICOM data set (or file meta without the preamble).
    """
    if head[_PREAMBLE : _PREAMBLE + 4] == b"DICM":
        _check_meta_length(head, size)
        return False
    if _looks_like_raw_dataset(head, size):
        return True
    if size < _PREAMBLE + 4 and not any(head[:_PREAMBLE]) and b"DICM".startswith(head[_PREAMBLE:]):
        raise TruncatedError("DICOM file ends inside the 128-byte preamble")
    raise NotDicomError("not a DICOM file (no 'DICM' marker and no DICOM data set at the start)")


def _check_meta_length(head: bytes, size: int) -> None:
    """Refuse a file that ends inside the file meta group, using its declared group length."""
    if head[132:138] != b"\x02\x00\x00\x00UL":
        return  # no group length element: pydicom finds the end of the group itself
    group_length = int.from_bytes(head[140:144], "little")
    if size < _HEAD + group_length:
        raise TruncatedError("DICOM file ends inside the file meta information")


def _looks_like_raw_dataset(head: bytes, size: int) -> bool:
    """True when the first element is a group 0x0002/0x0008 tag in a DICOM encoding."""
    if len(head) < 8:
        return False
    for order in ("little", "big"):
        group = int.from_bytes(head[0:2], order)
        if group not in (0x0002, 0x0008):
            continue
        if head[4:6] in _EXPLICIT_VRS:
            return True
        # Implicit VR exists only in little endian: a 4-byte length that fits the file.
        if order == "little" and int.from_bytes(head[4:8], "little") <= size - 8:
            return True
    return False


@contextmanager
def quiet_pydicom() -> Iterator[list[warnings.WarningMessage]]:
    """Read without pydicom's value validation and collect its remaining warnings.

    Validation would warn *and log* with the offending value quoted (a UID, a name: PHI), and
    the checks that matter here are done by this module. The other warnings (malformed but
    readable data) are logged at debug level by category only; really broken input is turned
    into errors by the callers. Both switches are process-wide state (not thread-safe before
    Python 3.14: concurrent use from threads can lose warnings): fine for one image per worker.
    """
    validation = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.IGNORE
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        config.settings.reading_validation_mode = validation
    if caught:
        categories = sorted({w.category.__name__ for w in caught})
        logger.debug("suppressed %d reader warning(s): %s", len(caught), ", ".join(categories))


def _parse(fp: IO[bytes], *, force: bool, header_only: bool) -> Dataset:
    """Run pydicom's reader, translating its exceptions into input errors."""
    try:
        return pydicom.dcmread(fp, force=force, stop_before_pixels=header_only)
    except (EOFError, struct.error) as exc:
        raise TruncatedError("DICOM file ends inside a data element") from exc
    except zlib.error as exc:
        if "truncated" in str(exc):
            raise TruncatedError("deflated DICOM data set is cut short") from exc
        raise InvalidDicomError("deflated DICOM data set cannot be inflated") from exc
    except OSError as exc:
        if exc.errno is not None:
            raise UnreadableFileError(f"cannot read file ({exc.strerror})") from exc
        # pydicom raises a bare OSError when a sequence item's tag is missing at the end.
        raise TruncatedError("DICOM file ends inside a sequence") from exc
    except _PARSE_ERRORS as exc:
        logger.debug("parse failure: %s", type(exc).__name__)
        raise InvalidDicomError("DICOM data set cannot be parsed") from exc


def _check_complete(ds: Dataset, size: int, caught: list[warnings.WarningMessage]) -> None:
    """Raise ``TruncatedError`` if the file stops before its last element does.

    pydicom keeps a value that is shorter than its declared length, silently stops at a partial
    element header, and only warns when an undefined-length value has no delimiter.
    """
    if any("End of file reached" in str(w.message) for w in caught):
        raise TruncatedError("DICOM file ends before an undefined-length value is closed")
    if len(ds) == 0:
        return
    tag = list(ds.keys())[-1]  # file order: the element read last
    # pydicom's overload omits RawDataElement, which is what an unread element is.
    elem = cast("DataElement | RawDataElement", ds.get_item(tag, keep_deferred=True))
    if not isinstance(elem, RawDataElement):
        return  # converted while reading (undefined-length sequence): its end is not known
    where = "the pixel data" if tag in _PIXEL_TAGS else "the header"
    value_length = 0 if elem.value is None else len(elem.value)  # None: an empty value
    if elem.length != _UNDEFINED_LENGTH and value_length < elem.length:
        raise TruncatedError(f"DICOM file ends inside {where}")
    file_meta = getattr(ds, "file_meta", None)
    if file_meta and file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return  # offsets refer to the inflated stream; zlib catches a cut stream
    end = elem.value_tell + (value_length + 8 if elem.length == _UNDEFINED_LENGTH else elem.length)
    # 1-7 bytes left over are an element header cut short (pydicom stops there silently).
    # Only decisive when the pixel data never came: junk after complete pixel data is harmless.
    if 0 < size - end < 8 and not _PIXEL_TAGS.intersection(ds.keys()):
        raise TruncatedError("DICOM file ends inside a data element header")


# --- Validation --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PixelAttributes:
    rows: int
    columns: int
    frames: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    photometric: str


def _pixel_keyword(ds: Dataset) -> str:
    present = [kw for kw in _PIXEL_KEYWORDS if kw in ds]
    if not present:
        raise NoPixelDataError("DICOM file has no pixel data (not an image)")
    if len(present) > 1:
        raise InvalidDicomError("DICOM file has more than one pixel data element")
    return present[0]


def transfer_syntax(ds: Dataset) -> UID:
    """The file meta's transfer syntax, or the encoding pydicom found for a raw data set."""
    file_meta = getattr(ds, "file_meta", None)
    uid = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if uid:
        return UID(str(uid).strip())
    implicit, little = ds.original_encoding[:2]
    if implicit and little:
        return ImplicitVRLittleEndian
    if implicit is False:
        return ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    raise UnsupportedTransferSyntaxError("transfer syntax cannot be determined")


def ensure_file_meta(ds: Dataset) -> UID:
    """Give a data set read without file meta the transfer syntax it was read in.

    pydicom decodes and writes pixel data by the file meta's transfer syntax only; a raw data
    set (no preamble or meta) needs it filled in first. Returns the transfer syntax.
    """
    syntax = transfer_syntax(ds)
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        meta = ds.file_meta = FileMetaDataset(meta or {})
        meta.TransferSyntaxUID = syntax
    return syntax


def _required_int(
    ds: Dataset, keyword: str, low: int, high: int, default: int | None = None
) -> int:
    """An integer attribute within ``[low, high]``; ``default`` (if any) when absent or empty."""
    try:
        raw = ds.get(keyword)
        value = default if raw is None or raw == "" else int(_first(raw))
    except _VALUE_ERRORS as exc:
        raise InvalidDicomError(f"{keyword} has an unreadable value") from exc
    if value is None:
        raise InvalidDicomError(f"required attribute {keyword} is missing")
    if not low <= value <= high:
        raise InvalidDicomError(f"{keyword} has an impossible value ({value})")
    return value


def _pixel_attributes(ds: Dataset, keyword: str) -> _PixelAttributes:
    """Check the Image Pixel attributes the decoder needs, naming the one that is wrong."""
    rows = _required_int(ds, "Rows", 1, 0xFFFF)
    columns = _required_int(ds, "Columns", 1, 0xFFFF)
    samples = _required_int(ds, "SamplesPerPixel", 1, 4)
    bits_allocated = _required_int(ds, "BitsAllocated", 1, 64)
    if bits_allocated != 1 and bits_allocated % 8:
        raise InvalidDicomError(f"BitsAllocated has an impossible value ({bits_allocated})")
    if keyword == "PixelData":
        bits_stored = _required_int(ds, "BitsStored", 1, bits_allocated)
        representation = _required_int(ds, "PixelRepresentation", 0, 1)
    else:  # float pixel data: no stored bits or sign to declare
        bits_stored, representation = bits_allocated, 1
    frames = _required_int(ds, "NumberOfFrames", 1, 2**31, default=1)
    photometric = _text(ds, "PhotometricInterpretation").upper()
    if not photometric:
        raise InvalidDicomError("required attribute PhotometricInterpretation is missing")
    if photometric not in _GREY | _COLOUR and photometric != _PALETTE:
        raise UnsupportedPhotometricError(
            f"photometric interpretation {photometric!r} cannot be converted to greyscale"
        )
    if samples != (3 if photometric in _COLOUR else 1):
        raise InvalidDicomError(
            f"SamplesPerPixel {samples} does not match photometric interpretation {photometric}"
        )
    if samples == 3:
        _required_int(ds, "PlanarConfiguration", 0, 1)
    return _PixelAttributes(
        rows=rows,
        columns=columns,
        frames=frames,
        samples_per_pixel=samples,
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        pixel_representation=representation,
        photometric=photometric,
    )


# --- Decoding ----------------------------------------------------------------------------------


def fits_decoding_limits(rows: int, columns: int, samples: int, bits_allocated: int) -> bool:
    """Whether one frame of this geometry is small enough to decode (``MAX_SIDE``,
    ``MAX_FRAME_BYTES``): decoders allocate what the header declares."""
    frame_bytes = rows * columns * samples * max(1, bits_allocated // 8)
    return max(rows, columns) <= MAX_SIDE and frame_bytes <= MAX_FRAME_BYTES


def _check_frame_size(attrs: _PixelAttributes) -> None:
    """Refuse a frame too large to decode, before a decoder tries to allocate it."""
    if not fits_decoding_limits(
        attrs.rows, attrs.columns, attrs.samples_per_pixel, attrs.bits_allocated
    ):
        raise UnprocessableImageError(
            f"image too large to decode ({attrs.rows} x {attrs.columns}, "
            f"{attrs.samples_per_pixel} sample(s) of {attrs.bits_allocated} bits; the limit is "
            f"{MAX_SIDE} pixels per side and {MAX_FRAME_BYTES >> 30} GiB per frame)"
        )


def _decode(
    ds: Dataset, transfer_syntax: UID, frame_index: int
) -> tuple[npt.NDArray[Any], dict[str, str | int]]:
    """Decode one frame with pydicom's decoder for ``transfer_syntax`` (pylibjpeg plugins)."""
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError as exc:
        label = transfer_syntax.name if transfer_syntax.is_valid else "an invalid UID"
        raise UnsupportedTransferSyntaxError(
            f"transfer syntax {label} ({transfer_syntax}) is not supported"
        ) from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin"
        raise UnsupportedTransferSyntaxError(
            f"no decoder installed for {transfer_syntax.name} ({missing})"
        )
    try:
        try:
            # as_rgb=False: YBR stays YBR, and its Y is the luminance we want (no round trip
            # through RGB, whose rounding and clipping only add error). The ignore: pydicom
            # annotates **kwargs as DecodeOptions rather than Unpack[DecodeOptions].
            return decoder.as_array(ds, index=frame_index, as_rgb=False)  # type: ignore[arg-type]
        except BaseException as exc:
            if not is_decoder_panic(exc):
                raise
            raise CorruptPixelDataError(f"decoder panicked: {exc}") from exc
    except _DECODE_ERRORS as exc:
        detail = " ".join(str(exc).split())[:300]
        raise CorruptPixelDataError(
            f"pixel data cannot be decoded ({transfer_syntax.name}): {detail}"
        ) from exc


def is_decoder_panic(exc: BaseException) -> bool:
    """Whether ``exc`` is a Rust decoder (pylibjpeg-rle, via pyo3) aborting on corrupt input.

    pyo3's PanicException derives from BaseException (``except Exception`` misses it) and
    cannot be imported by name, so it is recognised by its type name.
    """
    return type(exc).__name__ == "PanicException"


def _to_grey(
    arr: npt.NDArray[Any],
    properties: dict[str, str | int],
    ds: Dataset,
    attrs: _PixelAttributes,
) -> npt.NDArray[Any]:
    """Return the decoded frame as a 2-D array: colour becomes float32 luminance."""
    if attrs.photometric == _PALETTE:
        try:
            arr = apply_color_lut(arr, ds)
        except _DECODE_ERRORS as exc:
            raise UnsupportedPhotometricError(
                "PALETTE COLOR image without a usable colour lookup table"
            ) from exc
        arr = arr[..., :3].astype(np.float32) @ _LUMA
    elif arr.ndim == 3:
        decoded_as = str(properties.get("photometric_interpretation", attrs.photometric))
        if decoded_as.startswith("YBR"):
            arr = arr[..., 0].astype(np.float32)  # Y is the luminance already
        else:
            arr = arr.astype(np.float32) @ _LUMA
    if not arr.dtype.isnative:  # big endian data: OpenCV and friends want native order
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.shape != (attrs.rows, attrs.columns):
        raise CorruptPixelDataError(
            f"decoded frame has shape {arr.shape}, expected ({attrs.rows}, {attrs.columns})"
        )
    return arr


# --- Header facts ------------------------------------------------------------------------------


def _image_info(
    ds: Dataset, transfer_syntax: UID, attrs: _PixelAttributes, frame_index: int
) -> ImageInfo:
    file_meta = getattr(ds, "file_meta", None)
    sop_class = _text(ds, "SOPClassUID")
    if not sop_class and file_meta is not None:
        sop_class = _text(file_meta, "MediaStorageSOPClassUID")
    slope = _frame_float(ds, frame_index, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _frame_float(
        ds, frame_index, "PixelValueTransformationSequence", "RescaleIntercept"
    )
    if slope == 0.0:
        raise InvalidDicomError("RescaleSlope is zero")
    center = _frame_float(ds, frame_index, "FrameVOILUTSequence", "WindowCenter")
    width = _frame_float(ds, frame_index, "FrameVOILUTSequence", "WindowWidth")
    return ImageInfo(
        sop_class_uid=sop_class,
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        modality=_text(ds, "Modality").upper(),
        body_part=body_part(ds),
        view_position=view_position(ds),
        photometric=attrs.photometric,
        rows=attrs.rows,
        columns=attrs.columns,
        number_of_frames=attrs.frames,
        frame_index=frame_index,
        samples_per_pixel=attrs.samples_per_pixel,
        bits_stored=attrs.bits_stored,
        bits_allocated=attrs.bits_allocated,
        pixel_representation=attrs.pixel_representation,
        transfer_syntax_uid=str(transfer_syntax),
        rescale_slope=1.0 if slope is None else slope,
        rescale_intercept=0.0 if intercept is None else intercept,
        window=(center, width) if center is not None and width is not None and width >= 1 else None,
        has_voi_lut_sequence=_has_items(ds, "VOILUTSequence"),
        has_modality_lut_sequence=_has_items(ds, "ModalityLUTSequence"),
    )


#: The designators of legacy SNOMED RT codes: SRT, and SNM3 and 99SDM, which PS3.16 (section 8)
#: says are to be read as SRT (older modalities still send them).
_SNOMED_RT_SCHEMES = ("SRT", "SNM3", "99SDM")
# View Code Sequence (0054,0220) codes that say "frontal, PA" or "frontal, AP" (CID 4010 DX View:
# SNOMED CT, and the legacy SNOMED RT codes under any of its designators).
# In DICOM the concept is the (Coding Scheme Designator, Code Value) pair; Code Meaning is only
# display text, which modalities reword ("Posterior-Anterior", "PA erect") and localise
# ("postéro-antérieur"), so a known pair decides the view whatever its meaning says. Any other
# pair is read as "not a view this mapping knows", never as frontal.
_FRONTAL_CODES: dict[tuple[str, str], str] = {
    ("SCT", "272479007"): "PA",  # postero-anterior
    ("SCT", "399348003"): "AP",  # antero-posterior
    **{(scheme, "R-10214"): "PA" for scheme in _SNOMED_RT_SCHEMES},
    **{(scheme, "R-10206"): "AP" for scheme in _SNOMED_RT_SCHEMES},
}
# The same values for an item whose designator is missing or blank: each value names the same
# view under every scheme above and no value is shared between views, so it is unambiguous
# alone. A value under any *other* designator ("99LOCAL") is a local code that may mean
# anything: not frontal.
_FRONTAL_VALUES: dict[str, str] = {value: view for (_, value), view in _FRONTAL_CODES.items()}
# Used only for an item without a code value: Code Meanings with hyphens, spaces, a trailing
# "projection"/"view"/"(qualifier value)" and a trailing abbreviation that agrees ("(PA)")
# removed: "postero-anterior" (CID 4010), "Posteroanterior projection (qualifier value)" (SCT),
# "Posterior-Anterior", "postero-anterior (PA)". Obliques ("postero-anterior oblique") never
# match; other wordings ("PA erect", localised text) stay unrecognised, hence escalated.
_FRONTAL_MEANINGS: dict[str, str] = {
    "POSTEROANTERIOR": "PA",
    "POSTERIORANTERIOR": "PA",
    "PA": "PA",
    "ANTEROPOSTERIOR": "AP",
    "ANTERIORPOSTERIOR": "AP",
    "AP": "AP",
}
_MEANING_SUFFIXES = ("(QUALIFIER VALUE)", "PROJECTION", "VIEW")
_ABBREVIATION = re.compile(r"\(([A-Z]{1,4})\)$")  # a trailing "(PA)" (meanings are upper-case)

# Anatomic Region Sequence (0008,2218) codes and the Body Part Examined defined term each stands
# for, from DICOM PS3.16 Annex L (Table L-1, "Correspondence of Anatomic Region Codes and Body
# Part Examined Defined Terms"), for the regions a radiography site meets. Each row: defined
# term, SNOMED CT code (SCT, as CID 4031 has it now), the SNOMED RT code Annex L gave it before
# (under any of ``_SNOMED_RT_SCHEMES``). Code values as CID 4031 in PS3.16 (as pydicom 3.0
# ships it; SNOMED RT ids as DCMTK's table generated from PS3.16-2015c), terms as DCMTK's mapping
# of PS3.16-2023b Table L-1. A region whose term differs between editions and sources (upper arm
# ARM/UPPERARM, lower leg LEG/LOWERLEG, mandible JAW/MANDIBLE) is left out: its code reads as
# unknown, hence escalated.
_REGIONS: tuple[tuple[str, str, str], ...] = (
    # Trunk and combined regions
    ("CHEST", "816094009", "T-D3000"),
    ("ABDOMEN", "818981001", "T-D4000"),
    ("PELVIS", "816092008", "T-D6000"),
    ("ABDOMENPELVIS", "818982008", "R-FAB57"),
    ("CHESTABDOMEN", "416550000", "R-FAB55"),
    ("CHESTABDPELVIS", "416775004", "R-FAB56"),
    ("NECKCHEST", "417437006", "R-FAB52"),
    ("NECKCHESTABDOMEN", "416152001", "R-FAB53"),
    ("NECKCHESTABDPELV", "416319003", "R-FAB54"),
    ("WHOLEBODY", "38266002", "T-D0010"),
    ("BREAST", "76752008", "T-04000"),
    ("HEART", "80891009", "T-32000"),
    ("MEDIASTINUM", "72410000", "T-D3300"),
    ("RIB", "113197003", "T-11300"),
    ("STERNUM", "56873002", "T-11210"),
    # Head and neck
    ("HEAD", "69536005", "T-D1100"),
    ("SKULL", "89546000", "T-11100"),
    ("HEADNECK", "774007", "T-D1000"),
    ("NECK", "45048000", "T-D1600"),
    ("JAW", "661005", "T-D1213"),  # jaw region
    ("MAXILLA", "70925003", "T-11170"),
    ("ZYGOMA", "13881006", "T-11166"),
    ("ORBIT", "363654007", "T-D14AE"),
    ("SELLA", "42575006", "T-D1460"),
    ("TMJ", "53620006", "T-15290"),
    ("MASTOID", "59066005", "T-11133"),
    ("IAC", "361078006", "T-AB959"),
    # Spine
    ("SPINE", "421060004", "T-D04FF"),
    ("CSPINE", "122494005", "T-11501"),
    ("CTSPINE", "1217257000", "T-D00F7"),
    ("TSPINE", "122495006", "T-11502"),
    ("TLSPINE", "1217256009", "T-D00F8"),
    ("LSPINE", "122496007", "T-11503"),
    ("LSSPINE", "1217253001", "T-D00F9"),
    ("SSPINE", "54735007", "T-11AD0"),  # sacrum
    ("COCCYX", "64688005", "T-11BF0"),
    # Pelvic girdle and lower limb
    ("SIJOINT", "39723000", "T-15680"),
    ("ILIUM", "22356005", "T-12340"),
    ("HIP", "24136001", "T-15710"),  # hip joint
    ("FEMUR", "71341001", "T-12710"),
    ("THIGH", "68367000", "T-D9100"),
    ("KNEE", "72696002", "T-D9200"),
    ("PATELLA", "64234005", "T-12730"),
    ("FIBULA", "87342007", "T-12750"),
    ("ANKLE", "70258002", "T-15750"),
    ("FOOT", "56459004", "T-D9700"),
    ("CALCANEUS", "80144004", "T-12770"),
    ("TOE", "29707007", "T-D9800"),
    ("LOWERLIMB", "61685007", "T-D9000"),
    # Shoulder girdle and upper limb
    ("SHOULDER", "16982005", "T-D2220"),
    ("CLAVICLE", "51299004", "T-12310"),
    ("SCAPULA", "79601000", "T-12280"),
    ("ACJOINT", "85856004", "T-15420"),
    ("SCJOINT", "7844006", "T-15610"),
    ("HUMERUS", "85050009", "T-12410"),
    ("ELBOW", "16953009", "T-15430"),
    ("FOREARM", "14975008", "T-D8500"),
    ("WRIST", "74670003", "T-15460"),
    ("HAND", "85562004", "T-D8700"),
    ("FINGER", "7569003", "T-D8800"),
    ("THUMB", "76505004", "T-D8810"),
    ("UPPERLIMB", "53120007", "T-D8000"),
    ("EXTREMITY", "66019005", "T-D0300"),
)
# SNOMED CT codes Annex L gave before the cross-sectional concepts above replaced them (CP 1962;
# chest was 51185008, the SCT twin of T-D3000), and those of the spine sections before theirs
# (the SCT twins of T-D00F7/8/9 by pydicom's SNOMED RT to CT map): modalities still send them,
# and they name the same region.
_RETIRED_SCT: tuple[tuple[str, str], ...] = (
    ("51185008", "CHEST"),
    ("113345001", "ABDOMEN"),
    ("12921003", "PELVIS"),
    ("416949008", "ABDOMENPELVIS"),
    ("297171002", "CTSPINE"),
    ("297172009", "TLSPINE"),
    ("297173004", "LSSPINE"),
)
_REGION_CODES: dict[tuple[str, str], str] = {
    **{("SCT", code): term for term, code, _ in _REGIONS},
    **{("SCT", code): term for code, term in _RETIRED_SCT},
    **{(scheme, old): term for term, _, old in _REGIONS for scheme in _SNOMED_RT_SCHEMES},
}
# For an item whose designator is missing or blank, as with the view: SNOMED CT ids are digits,
# SNOMED RT ids are not, and no value names two regions, so a value alone is unambiguous.
_REGION_VALUES: dict[str, str] = {value: term for (_, value), term in _REGION_CODES.items()}
# Code Sequence Macro attributes that state a code this mapping does not look up (Long Code
# Value, URN Code Value): an item with one states *something*, so it is never "nothing stated".
# Only their presence is checked; their values are never read.
_OTHER_CODE_VALUES = ("LongCodeValue", "URNCodeValue")
# What a code item may hold (PS3.3 Table 8.8-1, the Code Sequence Macro with its Enhanced
# attributes, and the modifier sequences of the two sequences read here). An item whose only
# elements are others (a zeroed block parses as (0000,0000), junk as private or unknown tags)
# is damaged, not empty: it states something unreadable, never "nothing".
_CODE_ITEM_TAGS = frozenset(
    {
        *range(0x00080100, 0x00080123),  # Code Value ... Mapping Resource Name
        0x00082220,  # Anatomic Region Modifier Sequence
        0x00540222,  # View Modifier Code Sequence
    }
)
_VIEW_CODE_SEQUENCE = 0x00540220
_ANATOMIC_REGION_SEQUENCE = 0x00082218
_ITEM = (0xFFFE, 0xE000)
_SEQUENCE_DELIMITER = (0xFFFE, 0xE0DD)
_ITEM_DELIMITER = (0xFFFE, 0xE00D)
_MAX_SCOPE_CHARS = 64  # Code Meaning is LO (64 chars): a terminology string, capped all the same
_UNKNOWN = "UNKNOWN"  # a view or body part is stated but cannot be read: in no model's list
# An element's value is converted on first access; one stored as a sequence (as it should be, or
# by mistake) is parsed only then, so a damaged one fails there with any parse error.
_ELEMENT_ERRORS: tuple[type[Exception], ...] = (*_PARSE_ERRORS, EOFError, OSError)


def view_position(ds: Dataset) -> str:
    r"""The view the scope check compares with the model's list, upper-case; "" if none stated.

    The check must fail safe: anything that is not one clear view comes out as a string that is
    in no model's list (so the image is escalated as ``view_not_intended``), never as "", which
    a model may accept as "missing". But a header that states nothing must stay "": escalating
    every image of a modality that sends, say, an empty View Code Sequence would collapse the
    local rate for that site. Rules:

    * View Position (0018,5101), values stripped and upper-cased, empty ones dropped: one
      distinct value is the view (``PA``, ``PA\PA``, ``\PA`` give ``PA``); several distinct
      values are joined with a backslash (``PA\LL``); an unreadable element is ``UNKNOWN``.
    * The View Code Sequence (0054,0220), each item read as ``_coded_view`` says; items that
      state nothing are dropped, the rest must agree, else their readings are joined as above.
      Present but empty (no items, or only empty items): nothing stated. Unreadable:
      ``UNKNOWN``.
    * Both state something: they must agree too (``PA`` and a postero-anterior code, however
      its meaning is worded, give ``PA``; ``PA`` and a right lateral code give
      ``PA\RIGHT LATERAL``). One states something: that one. Neither: "".
    """
    stated = _scope_values(ds, "ViewPosition")
    coded = (
        _coded_readings(ds, "ViewCodeSequence", _VIEW_CODE_SEQUENCE, _coded_view)
        if "ViewCodeSequence" in ds
        else []
    )
    return _agreed(stated + coded) if stated or coded else ""


def body_part(ds: Dataset) -> str:
    r"""The body part the scope check compares with the model's list, upper-case; "" if none.

    Body Part Examined is optional and often empty while the Anatomic Region Sequence says what
    was imaged: read alone, a skull film coded "Head" would be "missing", which a chest model
    may accept. The view's rules apply, with the same reasons:

    * Body Part Examined (0018,0015): as View Position (``CHEST\SKULL`` is ``CHEST\SKULL``, an
      unreadable element ``UNKNOWN``).
    * The Anatomic Region Sequence (0008,2218), each item read as ``_coded_body_part`` says
      (the PS3.16 Annex L defined term of a known code); items that state nothing are dropped,
      the rest must agree. Present but empty: nothing stated. Unreadable: ``UNKNOWN``.
    * Both state something: they must agree (``CHEST`` and a thorax code give ``CHEST``;
      ``CHEST`` and a head code give ``CHEST\HEAD``). One states something: that one.
    """
    stated = _scope_values(ds, "BodyPartExamined")
    coded = (
        _coded_readings(ds, "AnatomicRegionSequence", _ANATOMIC_REGION_SEQUENCE, _coded_body_part)
        if "AnatomicRegionSequence" in ds
        else []
    )
    return _agreed(stated + coded) if stated or coded else ""


def _scope_values(ds: Dataset, keyword: str) -> list[str]:
    """The element's non-empty values, cleaned and upper-case; ``[UNKNOWN]`` if unreadable."""
    if keyword not in ds:
        return []
    try:
        return _texts(ds.get(keyword))
    except _ELEMENT_ERRORS:
        logger.debug("unreadable %s", keyword)
        return [_UNKNOWN]


def _coded_readings(
    ds: Dataset, keyword: str, tag: int, reading: Callable[[Any], str]
) -> list[str]:
    """The readings of a code sequence's items that state something (none for an empty
    sequence); ``[UNKNOWN]`` if the sequence cannot be read or its items are damaged."""
    try:
        # pydicom's overload omits RawDataElement, which is what a not yet parsed sequence is.
        stored = cast("DataElement | RawDataElement | None", ds.get_item(tag, keep_deferred=True))
        items = list(ds.get(keyword) or ())
        damaged = isinstance(stored, RawDataElement) and _items_damaged(stored, items)
        readings = [] if damaged else [reading(item) for item in items]
    except _ELEMENT_ERRORS:
        damaged = True
    if damaged:
        logger.debug("unreadable %s", keyword)
        return [_UNKNOWN]
    return [value for value in readings if value]


def _items_damaged(stored: RawDataElement, items: list[Any]) -> bool:
    """Whether the stored sequence's item headers disagree with the items pydicom made of them.

    pydicom reads an item that claims more bytes than there are, or bytes that hold no element,
    as an empty item and says nothing. An empty item states nothing, so a damaged one must not
    pass for one: it could have held any view or body part. Only the item headers are read.
    """
    value = bytes(stored.value or b"")
    header = struct.Struct("<HHL" if stored.is_little_endian else ">HHL")
    lengths: list[int] = []
    position = 0
    while position < len(value):
        if len(value) - position < header.size:
            return True
        group, element, length = header.unpack_from(value, position)
        if (group, element) == _SEQUENCE_DELIMITER and position + header.size == len(value):
            break  # a needless delimiter at the end of a defined-length sequence: harmless
        if (group, element) != _ITEM:
            return True
        if length == _UNDEFINED_LENGTH:
            index = len(lengths)
            item = items[index] if index < len(items) else None
            if not isinstance(item, Dataset) or len(item):
                return False  # its end is a delimiter pydicom found past its elements: unchecked
            # An item pydicom read as empty must be its delimiter and nothing else: bytes before
            # it are an element pydicom could not read.
            end = position + header.size
            if len(value) - end < header.size:
                return True
            if header.unpack_from(value, end) != (*_ITEM_DELIMITER, 0):
                return True
            lengths.append(0)
            position = end + header.size
            continue
        lengths.append(length)
        position += header.size + length
    if position > len(value) or len(lengths) != len(items):
        return True
    return any(
        length and isinstance(item, Dataset) and not len(item)
        for length, item in zip(lengths, items, strict=True)
    )


def _agreed(values: list[str]) -> str:
    r"""The one distinct value, or all of them joined with "\" (in no model's list)."""
    distinct = list(dict.fromkeys(values))
    return _capped("\\".join(distinct))


def _coded_view(item: Any) -> str:
    r"""The view a View Code Sequence item states; "" when it states nothing.

    * A Code Value: the code decides, because (scheme, value) is the concept and the meaning
      only display text (reworded, localised). A known CID 4010 code (``_FRONTAL_CODES``, or a
      value from ``_FRONTAL_VALUES`` with no designator) is ``PA``/``AP`` whatever its meaning
      says, unless the meaning says lateral or oblique (a contradiction: both, joined). An
      unknown code is never frontal: its meaning upper-cased (``RIGHT LATERAL``), ``UNKNOWN``
      without one, and code and meaning joined with "\" when the meaning alone would read as
      frontal (a bare ``PA`` must not come out of a local code).
    * No Code Value: the meaning, normalised (``_meaning_view``), if it says PA/AP; else the
      meaning upper-cased. A Long or URN Code Value counts as an unknown code.
    * Neither a code value nor a meaning (an empty item): "", nothing stated.
    """
    if not isinstance(item, Dataset):
        return _UNKNOWN
    value, scheme, meaning = _item_code(item)
    by_meaning = _meaning_view(meaning) if meaning else None
    if not value:
        return by_meaning or meaning
    by_code = _FRONTAL_CODES.get((scheme, value)) if scheme else _FRONTAL_VALUES.get(value)
    if by_code and any(word in meaning for word in _NOT_FRONTAL_WORDS):
        # A frontal code whose text says lateral or oblique: the header contradicts itself,
        # and a frontal model must not decide such an image.
        return _capped(f"{by_code}\\{meaning}")
    if by_code:
        return by_code
    if by_meaning:  # an unknown code with a meaning that reads as frontal
        return _capped(f"{value[:16]}\\{meaning}")  # CodeValue is SH: 16
    return meaning or _UNKNOWN


#: Words in a Code Meaning that no frontal view has: with a frontal code, a contradiction.
_NOT_FRONTAL_WORDS = ("LATERAL", "OBLIQUE")


def _meaning_view(meaning: str) -> str | None:
    """``PA``/``AP`` when a Code Meaning (upper-case) names a frontal view, else ``None``.

    A trailing abbreviation ("(PA)") is dropped only when it names the same view as the rest,
    and anything oblique is never frontal.
    """
    if any(word in meaning for word in _NOT_FRONTAL_WORDS):
        return None
    key = meaning
    abbreviation = _ABBREVIATION.search(key)
    if abbreviation:
        key = key[: abbreviation.start()].strip()
    view = _FRONTAL_MEANINGS.get(_meaning_key(key))
    if abbreviation and _FRONTAL_MEANINGS.get(abbreviation.group(1)) != view:
        return None
    return view


def _meaning_key(meaning: str) -> str:
    """A Code Meaning reduced to the word that names the view (see ``_FRONTAL_MEANINGS``)."""
    key = meaning
    for suffix in _MEANING_SUFFIXES:
        key = key.removesuffix(suffix).strip()
    return key.replace("-", "").replace(" ", "")


def _coded_body_part(item: Any) -> str:
    r"""The Body Part Examined term an Anatomic Region Sequence item states; "" for nothing.

    * A known code (``_REGION_CODES``, or a value from ``_REGION_VALUES`` with no designator) is
      its Annex L term whatever its meaning says: meanings are reworded and translated
      ("Thorax", "Poitrine"), the (scheme, value) pair is the concept.
    * Anything else that states something (a local code, a Long or URN Code Value, a meaning
      without a code) is a region this mapping does not know. It comes out as code and meaning
      joined with "\" (``99X\HEAD``, ``UNKNOWN\CHEST``, ``HD1\UNKNOWN``; ``UNKNOWN`` alone when
      neither can be read): a region may be called anything a model lists, so neither part may
      pass alone for a term, and a local code saying "Chest" must not read as CHEST.
    * Neither a code value nor a meaning (an empty item): "", nothing stated.
    """
    if not isinstance(item, Dataset):
        return _UNKNOWN
    value, scheme, meaning = _item_code(item)
    if not value and not meaning:
        return ""
    term = _REGION_CODES.get((scheme, value)) if scheme else _REGION_VALUES.get(value)
    if term:
        return term
    parts = (value[:16] or _UNKNOWN, meaning or _UNKNOWN)  # CodeValue is SH: 16
    return _UNKNOWN if parts == (_UNKNOWN, _UNKNOWN) else _capped("\\".join(parts))


def _item_code(item: Dataset) -> tuple[str, str, str]:
    """A code item's value, designator and meaning, cleaned and upper-case ("" if absent).

    The value is ``UNKNOWN`` when the item states a code this mapping does not read (a Long or
    URN Code Value) or, lacking any code or meaning, holds elements no code item has (a damaged
    item: see ``_CODE_ITEM_TAGS``). Only an item with nothing but code attributes, all of them
    empty, states nothing.
    """
    value = _agreed(_texts(item.get("CodeValue")))
    scheme = _agreed(_texts(item.get("CodingSchemeDesignator")))
    meaning = _agreed(_texts(item.get("CodeMeaning")))
    if not value and (
        any(keyword in item for keyword in _OTHER_CODE_VALUES)
        # keys(): the tags only; iterating a Dataset would parse every element's value.
        or (not meaning and any(int(tag) not in _CODE_ITEM_TAGS for tag in item.keys()))  # noqa: SIM118
    ):
        value = _UNKNOWN
    return value, scheme, meaning


def _texts(value: Any) -> list[str]:
    """The non-empty values of a string element, cleaned and upper-case.

    All values, not just the first: a second value (VM 1 attributes are malformed with two) must
    not be hidden behind a harmless first one.
    """
    values = value if isinstance(value, MultiValue | list | tuple) else [value]
    return [text for text in (_cleaned(v).upper() for v in values) if text]


def _cleaned(value: Any) -> str:
    """A header value as printable text with single spaces; "" for None or empty.

    Bytes (a value pydicom left undecoded) are read as ASCII with replacement characters, so
    odd encodings still give a string that matches no view instead of an exception. Anything
    that is not text or a number (a sequence item where a string belongs) is ``UNKNOWN``: its
    ``str()`` would dump other attributes, names included, into the record.
    """
    if value is None:
        return ""
    if isinstance(value, bytes):
        text = value.decode("ascii", "replace")
    elif isinstance(value, str | int | float):
        text = str(value)
    else:
        return _UNKNOWN
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def _capped(text: str) -> str:
    """At most ``_MAX_SCOPE_CHARS`` characters: records and logs get no free text of any size."""
    return text[:_MAX_SCOPE_CHARS]


def _first(value: Any) -> Any:
    """The first value of a multi-valued element (VM > 1), else the value itself."""
    if isinstance(value, MultiValue | list | tuple):
        return value[0] if value else None
    return value


def _text(ds: Dataset, keyword: str) -> str:
    """An optional string attribute, stripped; "" when absent or unreadable."""
    try:
        value = _first(ds.get(keyword))
    except _VALUE_ERRORS:
        logger.debug("unreadable optional attribute %s", keyword)
        return ""
    return "" if value is None else str(value).strip()


def _frame_float(ds: Dataset, frame_index: int, sequence: str, keyword: str) -> float | None:
    """An optional numeric attribute for the frame; ``None`` when absent or not a finite number."""
    try:
        value = _first(frame_attribute(ds, frame_index, sequence, keyword))
        number = None if value is None or value == "" else float(value)
    except _VALUE_ERRORS:
        logger.debug("unreadable optional attribute %s", keyword)
        return None
    return number if number is not None and np.isfinite(number) else None


def _has_items(ds: Dataset, keyword: str) -> bool:
    try:
        return bool(ds.get(keyword))
    except _VALUE_ERRORS:
        return False
