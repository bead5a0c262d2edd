"""Pixel data carries the image and nothing else: what is cut, what is kept, what is refused.

Identifiers are planted where decoders never look (JPEG comment and application segments, bytes
after a codestream or after the last native frame, bits above Bits Stored) and must be gone,
while the image decodes exactly as before. Real codestreams come from dcmtk (``dcmcjpeg``,
``dcmcjpls``), OpenJPEG (through pydicom) and pydicom's bundled files.
"""

from __future__ import annotations

import io
import itertools
import struct
import subprocess
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    MPEG2MPML,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from tests.dcmtk import executable
from tests.dicom.conftest import bundled, decoded
from tests.helpers import BUNDLE, phantom_dataset
from triage_app.dicom.deidentify import DeidConfig, Deidentifier, PixelCleanRule
from triage_app.dicom.deidentify.files import encode
from triage_app.dicom.deidentify.pixel_data import EMBEDDED_OVERLAY, UNVERIFIED, clean_pixel_data
from triage_app.dicom.reader import quiet_pydicom, read_dataset, transfer_syntax
from triage_app.model.manifest import Thresholds
from triage_app.pipeline import PipelineConfig, TriagePipeline
from triage_app.policy import ActiveThresholds
from triage_app.results import CaseResult

SECRET = b"x" * 32
PLANTED = b"Patient DOE^JOHN MRN4711 DOB 19800215"
COM, APP0, APP1, APP14 = 0xFE, 0xE0, 0xE1, 0xEE
JFIF = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def _frames(ds: Dataset) -> list[bytes]:
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1))))


def _with_frames(ds: Dataset, frames: list[bytes]) -> Dataset:
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].is_undefined_length = True
    return ds


def _round_trip(ds: Dataset) -> Dataset:
    """As a file reads: the pixel data undecoded, the encoding known."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return read_dataset(buffer.getvalue())


def _phantom(bits_stored: int | None = None) -> Dataset:
    ds = phantom_dataset(61, 1)
    if bits_stored is not None:
        ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
    return ds


@pytest.fixture(scope="module")
def dcmtk_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dcmtk")


def _dcmtk(tool: str, ds: Dataset, folder: Path, *options: str) -> Dataset:
    source, target = folder / f"{tool}-in.dcm", folder / f"{tool}-out.dcm"
    ds.save_as(source, enforce_file_format=True)
    subprocess.run(
        [executable(tool), *options, str(source), str(target)], check=True, capture_output=True
    )
    return read_dataset(target)


def _array(ds: Dataset) -> npt.NDArray[Any]:
    array = decoded(ds)
    assert array is not None, "the test image must decode"
    return array


# --- JPEG and JPEG-LS --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tool", "options"),
    [("dcmcjpeg", ()), ("dcmcjpeg", ("+ee",)), ("dcmcjpls", ())],
    ids=["jpeg-lossless", "jpeg-extended", "jpeg-ls"],
)
def test_comments_and_application_data_are_cut_from_jpeg_frames(
    dcmtk_folder: Path, tool: str, options: tuple[str, ...]
) -> None:
    compressed = _dcmtk(tool, _phantom(), dcmtk_folder, *options)
    before = _array(compressed)
    (frame,) = _frames(compressed)
    planted = (
        frame[:2]
        + _segment(COM, PLANTED)
        + _segment(APP1, b"Exif\x00\x00" + PLANTED)
        + _segment(APP0, b"JFIF\x00\x01\x02\x01\x00\x48\x00\x48\x00\x00" + PLANTED)
        + frame[2:]
        + PLANTED  # after EOI
    )
    ds = _round_trip(_with_frames(compressed, [planted]))
    assert PLANTED in ds.PixelData

    assert clean_pixel_data(ds) == ()

    assert b"DOE^JOHN" not in ds.PixelData
    (cleaned,) = _frames(ds)
    assert JFIF in cleaned  # a JFIF marker stays (decoders read it), with its fixed fields only
    assert np.array_equal(_array(ds), before)


def test_the_adobe_colour_transform_stays(tmp_path: Path) -> None:
    """libjpeg-turbo (in OpenCV) reads APP14's transform flag: without it, this RGB frame
    would decode as YCbCr. The cleaned frame keeps the flag and decodes the same."""
    ds = read_dataset(bundled("SC_rgb_jpeg_app14_dcmd.dcm"))
    (frame,) = _frames(ds)
    assert frame[2:4] == b"\xff\xee"
    adobe_end = 4 + int.from_bytes(frame[4:6], "big")
    without_adobe = frame[:2] + frame[adobe_end:]
    planted = frame[:2] + _segment(COM, PLANTED) + frame[2:]
    ds = _round_trip(_with_frames(ds, [planted]))

    assert clean_pixel_data(ds) == ()

    (cleaned,) = _frames(ds)
    assert b"Adobe" in cleaned and PLANTED not in cleaned

    def turbo(data: bytes) -> npt.NDArray[Any]:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert image is not None
        return image

    assert not np.array_equal(turbo(without_adobe), turbo(frame)), "the flag must matter"
    assert np.array_equal(turbo(cleaned.rstrip(b"\x00")), turbo(frame))


def test_an_adobe_segment_keeps_only_its_fixed_fields() -> None:
    ds = read_dataset(bundled("SC_rgb_jpeg_app14_dcmd.dcm"))
    (frame,) = _frames(ds)
    adobe_end = 4 + int.from_bytes(frame[4:6], "big")
    adobe = frame[4 + 2 : adobe_end]
    longer = frame[:2] + _segment(APP14, adobe + PLANTED) + frame[adobe_end:]
    ds = _round_trip(_with_frames(ds, [longer]))
    assert clean_pixel_data(ds) == ()
    assert PLANTED not in ds.PixelData


def test_every_frame_is_cleaned_and_bytes_between_frames_go(dcmtk_folder: Path) -> None:
    two = _phantom()
    pixels = two.pixel_array
    two.NumberOfFrames = 2
    two.PixelData = np.stack([pixels, pixels[::-1]]).tobytes()
    compressed = _dcmtk("dcmcjpeg", two, dcmtk_folder)
    before = _array(compressed)
    first, second = _frames(compressed)
    planted = [first[:2] + _segment(COM, PLANTED) + first[2:] + PLANTED, second]
    ds = _round_trip(_with_frames(compressed, planted))

    assert clean_pixel_data(ds) == ()

    assert b"DOE^JOHN" not in ds.PixelData
    assert np.array_equal(_array(ds), before)


def test_a_frame_without_jpeg_markers_to_parse_is_refused(dcmtk_folder: Path) -> None:
    compressed = _dcmtk("dcmcjpeg", _phantom(), dcmtk_folder)
    (frame,) = _frames(compressed)
    reserved = frame[:2] + _segment(0xF0, PLANTED) + frame[2:]  # JPG0: no known meaning
    ds = _round_trip(_with_frames(compressed, [reserved]))
    assert clean_pixel_data(ds) == (UNVERIFIED,)


def test_too_few_codestreams_for_the_frames_are_refused(dcmtk_folder: Path) -> None:
    compressed = _dcmtk("dcmcjpeg", _phantom(), dcmtk_folder)
    compressed.NumberOfFrames = 2
    assert clean_pixel_data(_round_trip(compressed)) == (UNVERIFIED,)


def test_a_transfer_syntax_without_a_parser_is_refused() -> None:
    ds = _phantom()
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    _with_frames(ds, [PLANTED + b"\x00"])
    assert clean_pixel_data(ds) == (UNVERIFIED,)


def test_frames_with_nothing_to_cut_are_left_byte_for_byte() -> None:
    ds = read_dataset(bundled("JPEG-lossy.dcm"))  # only coding segments, and a 0xFF pad byte
    before = bytes(ds.PixelData)
    assert clean_pixel_data(ds) == ()
    assert ds.PixelData == before


def test_cleaning_twice_changes_nothing_more(dcmtk_folder: Path) -> None:
    compressed = _dcmtk("dcmcjpeg", _phantom(), dcmtk_folder)
    (frame,) = _frames(compressed)
    ds = _round_trip(_with_frames(compressed, [frame[:2] + _segment(COM, PLANTED) + frame[2:]]))
    assert clean_pixel_data(ds) == ()
    once = bytes(ds.PixelData)
    assert clean_pixel_data(ds) == ()
    assert ds.PixelData == once


# --- JPEG 2000 ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def j2k() -> Dataset:
    ds = _phantom()
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    return _round_trip(ds)


def _main_header_com(frame: bytes, text: bytes) -> bytes:
    """A COM segment (0xFF64, Latin-1 text) right after SIZ."""
    siz_end = 4 + int.from_bytes(frame[4:6], "big")
    com = b"\xff\x64" + (len(text) + 4).to_bytes(2, "big") + b"\x00\x01" + text
    return frame[:siz_end] + com + frame[siz_end:]


def test_main_header_comments_are_cut_from_jpeg_2000_frames(j2k: Dataset) -> None:
    before = _array(j2k)
    (frame,) = _frames(j2k)
    ds = _round_trip(_with_frames(j2k.copy(), [_main_header_com(frame, PLANTED) + PLANTED]))
    assert PLANTED in ds.PixelData

    assert clean_pixel_data(ds) == ()

    assert b"DOE^JOHN" not in ds.PixelData
    assert b"\xff\x64" not in ds.PixelData[:200]
    assert np.array_equal(_array(ds), before)


def test_a_comment_in_a_tile_part_header_is_refused(j2k: Dataset) -> None:
    (frame,) = _frames(j2k)
    sot = frame.index(b"\xff\x90")
    length = int.from_bytes(frame[sot + 6 : sot + 10], "big")
    com = b"\xff\x64" + (len(PLANTED) + 4).to_bytes(2, "big") + b"\x00\x01" + PLANTED
    psot = (length + len(com)).to_bytes(4, "big")  # the tile-part grows by the comment
    crafted = frame[: sot + 6] + psot + frame[sot + 10 : sot + 12] + com + frame[sot + 12 :]
    ds = _round_trip(_with_frames(j2k.copy(), [crafted]))
    assert clean_pixel_data(ds) == (UNVERIFIED,)


def test_a_jp2_file_wrapper_is_refused() -> None:
    """DICOM wants the bare codestream; a JP2 colour box could change how it decodes."""
    ds = read_dataset(bundled("GDCMJ2K_TextGBR.dcm"))
    assert clean_pixel_data(ds) == (UNVERIFIED,)


# --- native ------------------------------------------------------------------------------------


def test_bytes_after_the_last_native_frame_are_cut() -> None:
    ds = _phantom()
    ds.PixelData = ds.PixelData + PLANTED + b"\x00"
    ds = _round_trip(ds)
    assert clean_pixel_data(ds) == ()
    assert PLANTED not in ds.PixelData
    assert len(ds.PixelData) == ds.Rows * ds.Columns * 2


def test_bytes_after_float_pixel_data_are_cut() -> None:
    ds = _phantom()
    values = np.linspace(0, 1, ds.Rows * ds.Columns, dtype=np.float32)
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = 32
    ds.FloatPixelData = values.tobytes() + PLANTED + b"\x00"
    ds = _round_trip(ds)
    assert clean_pixel_data(ds) == ()
    assert ds.FloatPixelData == values.tobytes()


@pytest.mark.parametrize("little_endian", [True, False], ids=["little", "big"])
def test_bits_above_bits_stored_are_cleared(little_endian: bool) -> None:
    ds = _phantom(bits_stored=12)
    pixels = ds.pixel_array.astype(np.uint16)
    marked = pixels.copy()
    marked[10:30, 10:200] |= 0x8000  # an embedded overlay's bitmap in bit 15
    ds.PixelData = marked.astype("<u2" if little_endian else ">u2").tobytes()
    if not little_endian:
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=little_endian, enforce_file_format=True)
    ds = read_dataset(buffer.getvalue())

    assert clean_pixel_data(ds) == ()

    raw = np.frombuffer(ds.PixelData, dtype="<u2" if little_endian else ">u2")
    assert not np.any(raw >> 12)
    assert np.array_equal(raw.reshape(pixels.shape), pixels)


def test_signed_pixels_are_sign_extended_not_cleared() -> None:
    ds = _phantom(bits_stored=12)
    ds.PixelRepresentation = 1
    values = np.array([-2048, -1, 0, 1, 2047] * 4, dtype=np.int16)
    ds.Rows, ds.Columns = 4, 5
    stored = values.view(np.uint16) & 0x0FFF  # as a writer that leaves the high bits clear
    ds.PixelData = (stored | 0x5000).astype("<u2").tobytes()  # junk in bits 12-15
    ds = _round_trip(ds)
    assert clean_pixel_data(ds) == ()
    assert np.array_equal(np.frombuffer(ds.PixelData, "<i2"), values)


def test_unparsable_native_attributes_are_refused() -> None:
    ds = _phantom()
    del ds.Rows
    assert clean_pixel_data(ds) == (UNVERIFIED,)


def test_native_pixel_data_that_is_clean_stays_undecoded() -> None:
    ds = _round_trip(_phantom())
    assert clean_pixel_data(ds) == ()
    assert type(ds.get_item(0x7FE00010)).__name__ == "RawDataElement"


# --- RLE ---------------------------------------------------------------------------------------


def _rle(ds: Dataset) -> Dataset:
    ds.compress(RLELossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    return _round_trip(ds)


def test_a_clean_rle_frame_is_kept_as_it_is() -> None:
    ds = _rle(_phantom())
    before = bytes(ds.PixelData)
    assert clean_pixel_data(ds) == ()
    assert ds.PixelData == before


def test_bytes_after_an_rle_segment_are_cut() -> None:
    ds = _rle(_phantom())
    before = _array(ds)
    (frame,) = _frames(ds)
    ds = _round_trip(_with_frames(ds, [frame + PLANTED]))
    with quiet_pydicom():  # as in the engine: pydicom warns that the segment is too long
        assert clean_pixel_data(ds) == ()
    assert PLANTED not in ds.PixelData
    assert np.array_equal(_array(ds), before)


def test_bits_above_bits_stored_in_rle_are_cleared() -> None:
    ds = _phantom(bits_stored=12)
    pixels = ds.pixel_array.astype(np.uint16)
    marked = pixels | np.uint16(0x8000)
    ds.PixelData = marked.tobytes()
    ds = _rle(ds)
    assert clean_pixel_data(ds) == ()
    raw = np.frombuffer(ds.PixelData, "<u2")  # stored natively now
    assert np.array_equal(raw.reshape(pixels.shape), pixels)


class PanicException(BaseException):
    """Stands in for pyo3's PanicException, which a Rust decoder raises and no one can import."""


def _panic(*args: object, **kwargs: object) -> None:
    raise PanicException("index out of bounds: the len is 0 but the index is 0")


def _rle_frame(*segments: bytes) -> bytes:
    """An RLE frame: the 64-byte header (segment count and offsets), then the segments."""
    offsets = list(itertools.accumulate((len(s) for s in segments[:-1]), initial=64))
    header = struct.pack("<16I", len(segments), *offsets, *[0] * (16 - 1 - len(segments)))
    return header + b"".join(segments)


def _plane(value: int, pixels: int = 64 * 64) -> bytes:
    """A PackBits byte plane of ``pixels`` bytes of ``value`` (runs of 128)."""
    return (b"\x81" + bytes([value])) * (pixels // 128)


def _rle_16_bit(frames: list[bytes], rows: int = 64, columns: int = 64) -> Dataset:
    """A 16-bit MONOCHROME2 RLE data set with these frames, read back as from a file."""
    ds = _phantom(bits_stored=16)
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, len(frames)
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds = _with_frames(ds, frames)
    ds["PixelData"].VR = "OB"
    return _round_trip(ds)


def _rle_with_a_one_byte_frame() -> Dataset:
    """Three frames; the first one's two segments are the single byte 0x00 each (the middle
    frame, the one the reader decodes, is sound)."""
    good = _rle_frame(_plane(0x01), _plane(0x80))
    return _rle_16_bit([_rle_frame(b"\x00", b"\x00"), good, good])


def test_an_rle_segment_of_a_single_zero_byte_is_unverified_not_a_decoder_panic() -> None:
    ds = _rle_with_a_one_byte_frame()
    with quiet_pydicom():  # as in the engine
        assert clean_pixel_data(ds) == (UNVERIFIED,)


def test_a_decoder_panic_while_checking_rle_segments_stores_the_frames_decoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ds = _rle(_phantom())
    before = _array(ds)
    monkeypatch.setattr("triage_app.dicom.deidentify.pixel_data.decode_segment", _panic)
    assert clean_pixel_data(ds) == ()
    assert transfer_syntax(ds) == ExplicitVRLittleEndian  # decoded, stored natively
    assert np.array_equal(_array(ds), before)


def test_a_decoder_panic_while_decoding_rle_is_unverified(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = _rle(_phantom())
    monkeypatch.setattr("triage_app.dicom.deidentify.pixel_data.decode_segment", _panic)
    monkeypatch.setattr(Dataset, "decompress", _panic)
    assert clean_pixel_data(ds) == (UNVERIFIED,)


@pytest.mark.parametrize(("rows", "columns"), [(32768, 32768), (16385, 64)])
def test_rle_frames_too_large_to_decode_are_unverified_without_decoding(
    monkeypatch: pytest.MonkeyPatch, rows: int, columns: int
) -> None:
    """A few bytes can declare a frame of gigabytes: decoding it to check it would exhaust the
    memory (or abort the process), so it is reported, not decoded."""

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded")

    ds = _rle_16_bit([_rle_frame(b"\x81\x00" * 4, b"\x81\x00" * 4)], rows, columns)
    monkeypatch.setattr("triage_app.dicom.deidentify.pixel_data.decode_segment", never)
    monkeypatch.setattr(Dataset, "decompress", never)
    assert clean_pixel_data(ds) == (UNVERIFIED,)


# --- embedded overlays -------------------------------------------------------------------------


def _embedded_overlay(ds: Dataset, bit: int) -> Dataset:
    ds.add_new(0x60000010, "US", ds.Rows)
    ds.add_new(0x60000011, "US", ds.Columns)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 16)  # Overlay Bits Allocated: in the pixel data
    ds.add_new(0x60000102, "US", bit)  # Overlay Bit Position
    return ds


def test_an_embedded_overlay_above_bits_stored_is_cleared_not_reported() -> None:
    ds = _phantom(bits_stored=12)
    pixels = ds.pixel_array.astype(np.uint16)
    ds.PixelData = (pixels | np.uint16(0x8000)).tobytes()
    ds = _round_trip(_embedded_overlay(ds, 15))
    assert clean_pixel_data(ds) == ()
    assert not np.any(np.frombuffer(ds.PixelData, "<u2") >> 12)


def test_an_embedded_overlay_inside_the_stored_bits_is_reported() -> None:
    ds = _round_trip(_embedded_overlay(_phantom(bits_stored=16), 15))
    assert clean_pixel_data(ds) == (EMBEDDED_OVERLAY,)


def test_an_embedded_overlay_in_compressed_pixels_is_reported(dcmtk_folder: Path) -> None:
    compressed = _dcmtk("dcmcjpeg", _phantom(), dcmtk_folder)
    assert clean_pixel_data(_round_trip(_embedded_overlay(compressed, 15))) == (EMBEDDED_OVERLAY,)


# --- in the engine -----------------------------------------------------------------------------


def test_what_cannot_be_verified_is_a_burned_in_risk(dcmtk_folder: Path) -> None:
    compressed = _dcmtk("dcmcjpeg", _phantom(), dcmtk_folder)
    (frame,) = _frames(compressed)
    ds = _round_trip(_with_frames(compressed, [frame[:2] + _segment(0xF0, PLANTED) + frame[2:]]))
    report = Deidentifier(SECRET).deidentify(ds)
    assert report.burned_in_reasons == (UNVERIFIED,)
    assert report.burned_in_risk


def test_a_pixel_clean_rule_stores_what_cannot_be_verified_decoded(dcmtk_folder: Path) -> None:
    compressed = _dcmtk("dcmcjpeg", _phantom(), dcmtk_folder)
    before = _array(compressed)
    (frame,) = _frames(compressed)
    ds = _round_trip(_with_frames(compressed, [frame[:2] + _segment(0xF0, PLANTED) + frame[2:]]))
    rule = PixelCleanRule(name="corner", rectangles=((0, 0, 1, 1),), modality=str(ds.Modality))
    report = Deidentifier(SECRET, DeidConfig(pixel_rules=(rule,))).deidentify(ds)
    assert not report.burned_in_risk
    assert PLANTED not in ds.PixelData
    with quiet_pydicom():
        after = dcmread(io.BytesIO(encode(ds))).pixel_array
    assert np.array_equal(after[1:, 1:], before[1:, 1:])


def test_an_rle_file_that_made_the_decoder_panic_is_triaged_and_blocked(tmp_path: Path) -> None:
    """The middle frame is sound, so the image is triaged; the first frame cannot be checked, so
    the case never leaves the device (it used to end the batch with pyo3's PanicException)."""
    path = tmp_path / "case.dcm"
    _rle_with_a_one_byte_frame().save_as(path, enforce_file_format=True)
    result = TriagePipeline(PipelineConfig(BUNDLE, site_secret=SECRET)).run(path)
    assert isinstance(result, CaseResult), result
    assert result.deidentification["burned_in_reasons"] == [UNVERIFIED]
    assert result.escalation is not None
    assert (result.escalation.state, result.escalation.reason) == ("blocked", "burned_in_risk")


def test_a_case_whose_pixel_data_cannot_be_checked_is_blocked_and_told_so(
    dcmtk_folder: Path, tmp_path: Path
) -> None:
    compressed = _dcmtk("dcmcjpeg", _phantom(), dcmtk_folder)
    (frame,) = _frames(compressed)
    # A JPEG-LS-style extension marker no parser here knows, placed where decoders skip it.
    ds = _with_frames(compressed, [frame[:2] + _segment(0xF0, PLANTED) + frame[2:]])
    path = tmp_path / "case.dcm"
    ds.save_as(path, enforce_file_format=True)
    pipeline = TriagePipeline(
        PipelineConfig(
            BUNDLE,
            site_secret=SECRET,
            thresholds=ActiveThresholds(Thresholds(0.0, 1.0), "settings"),
        )
    )
    result = pipeline.run(path)
    assert isinstance(result, CaseResult), result  # the decoders skip the marker
    assert result.escalation is not None
    assert (result.escalation.state, result.escalation.reason) == ("blocked", "burned_in_risk")
    assert "pixel data that cannot be checked" in (result.escalation.detail or "")
