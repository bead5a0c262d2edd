"""Reading and decoding: every pydicom test file, matched compressed pairs, and broken inputs."""

from __future__ import annotations

import io
import logging
import os
import stat
import struct
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels.processing import apply_color_lut
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from tests.dicom.conftest import (
    PATIENT_ID,
    PATIENT_NAME,
    bundled,
    ramp,
    save,
    strip_file_meta,
    synthetic,
)
from tests.helpers import phantom_dataset
from triage_app import errors
from triage_app.dicom import DicomImage, ImageInfo, load_image, read_dataset, reader
from triage_app.dicom.reader import fits_decoding_limits, view_position
from triage_app.errors import InputError


def _input_error_codes() -> set[str]:
    found: set[str] = set()
    pending: list[type[InputError]] = [InputError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls is not InputError:
            found.add(cls.code)
    return found


KNOWN_CODES = _input_error_codes()
LUMA = np.array([0.299, 0.587, 0.114])

TEST_FILES_ROOT = Path(pydicom.data.__file__).parent / "test_files"
ALL_TEST_FILES = sorted(Path(p) for p in get_testdata_files())

# What the reader refuses among pydicom's bundled test files, and why. Everything else must load.
EXPECTED_REFUSALS = {
    "ExplVR_BigEndNoMeta.dcm": "no_pixel_data",  # an RT plan
    "ExplVR_LitEndNoMeta.dcm": "no_pixel_data",
    "JPEG-lossy.dcm": "corrupt_pixel_data",  # broken codestream; JPGExtended.dcm is the fix
    "JPEG2000-embedded-sequence-delimiter.dcm": "corrupt_pixel_data",  # 266-byte codestream
    "MR_truncated.dcm": "truncated",
    "README.txt": "not_dicom",
    "UN_sequence.dcm": "no_pixel_data",
    "badVR.dcm": "invalid_dicom",  # Number of Frames '1A'
    "crayons.icc": "not_dicom",
    "empty_charset_LEI.dcm": "no_pixel_data",
    "meta_missing_tsyntax.dcm": "invalid_dicom",  # pixel data but no Rows/Columns
    "nested_priv_SQ.dcm": "invalid_dicom",
    "no_meta.dcm": "not_dicom",  # starts with bytes that are no DICOM tag
    "no_meta_group_length.dcm": "no_pixel_data",
    "priv_SQ.dcm": "no_pixel_data",
    "reportsi.dcm": "no_pixel_data",
    "reportsi_with_empty_number_tags.dcm": "no_pixel_data",
    "rtplan.dcm": "no_pixel_data",
    "rtplan.dump": "not_dicom",
    "rtplan_truncated.dcm": "truncated",
    "rtstruct.dcm": "no_pixel_data",
    "rtstruct.dump": "not_dicom",
    "test-SR.dcm": "no_pixel_data",
    "test1.json": "not_dicom",
    "test_PN.json": "not_dicom",
    "waveform_ecg.dcm": "no_pixel_data",
    "zipMR.gz": "not_dicom",
}


def expected_refusal(path: Path) -> str | None:
    """The code the reader must give ``path``, or ``None`` if it must load."""
    name = path.relative_to(TEST_FILES_ROOT).as_posix()
    if path.is_dir():
        return "unreadable"
    if name.startswith("dicomdirtests/"):
        if "README" in path.name:
            return "not_dicom"
        if "DICOMDIR" in path.name or "TINY_ALPHA" in name:
            return "no_pixel_data"  # directory records and pixel-less test instances
        return None
    return EXPECTED_REFUSALS.get(name)


def load(name: str) -> DicomImage:
    return load_image(bundled(name))


def grey(name: str) -> npt.NDArray[np.float64]:
    return load(name).stored.astype(np.float64)


def assert_consistent(image: DicomImage) -> None:
    info = image.info
    assert image.stored.ndim == 2
    assert image.stored.shape == (info.rows, info.columns)
    assert image.stored.dtype.isnative
    assert info.frame_index == info.number_of_frames // 2
    assert info.transfer_syntax_uid
    assert info.photometric == image.dataset.PhotometricInterpretation.strip().upper()
    if info.samples_per_pixel == 3 or info.photometric == "PALETTE COLOR":
        assert image.stored.dtype == np.float32


# --- Every bundled pydicom test file -----------------------------------------------------------


def test_the_bundled_test_files_are_there() -> None:
    # Guard the parametrisation below: an empty list would make it vacuous.
    assert len(ALL_TEST_FILES) > 150
    assert all(p.exists() for p in ALL_TEST_FILES)


@pytest.mark.parametrize(
    "path", ALL_TEST_FILES, ids=[p.relative_to(TEST_FILES_ROOT).as_posix() for p in ALL_TEST_FILES]
)
def test_every_pydicom_test_file_loads_or_is_refused_with_a_known_code(path: Path) -> None:
    expected = expected_refusal(path)
    try:
        image = load_image(path)
    except InputError as exc:
        assert type(exc) is not InputError
        assert exc.code in KNOWN_CODES
        assert exc.code == expected, str(exc)
        assert str(exc) and "\n" not in str(exc)
        return
    assert expected is None, f"expected {expected}, but it loaded"
    assert_consistent(image)


# --- Compressed files decode to the same pixels as their uncompressed twins --------------------


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
        "MR_small_implicit.dcm",
        "MR_small_padded.dcm",
    ],
)
def test_mr_small_encodings_decode_identically(name: str) -> None:
    reference = load("MR_small.dcm")
    image = load(name)
    assert image.stored.dtype == np.int16
    np.testing.assert_array_equal(image.stored, reference.stored)
    assert image.info.window == reference.info.window == (600.0, 1600.0)


@pytest.mark.parametrize(
    "name",
    ["SC_rgb_jpeg_gdcm.dcm", "SC_rgb_gdcm_KY.dcm"],  # JPEG lossless SV1, JPEG 2000 (lossless)
)
def test_lossless_colour_encodings_match_rle(name: str) -> None:
    np.testing.assert_array_equal(grey(name), grey("SC_rgb_rle.dcm"))


@pytest.mark.parametrize(
    ("name", "max_error"),
    [
        ("SC_rgb_dcmtk_+eb+cr.dcm", 1.0),  # JPEG baseline, RGB
        ("SC_rgb_dcmtk_+eb+cy+n1.dcm", 1.5),  # JPEG baseline, YBR_FULL: Y is used as is
        ("SC_rgb_dcmtk_+eb+cy+np.dcm", 1.5),  # YBR_FULL_422
        ("SC_rgb_dcmtk_+eb+cy+s4.dcm", 1.5),
        ("SC_rgb_jpeg_dcmtk.dcm", 1.5),
        ("SC_rgb_jpeg_lossy_gdcm.dcm", 1.5),
        ("SC_rgb_jls_lossy_line.dcm", 2.0),  # JPEG-LS near-lossless, NEAR = 2
        ("SC_rgb_jls_lossy_sample.dcm", 2.0),
        ("SC_ybr_full_422_uncompressed.dcm", 1.5),
    ],
)
def test_lossy_colour_encodings_stay_close_to_rle(name: str, max_error: float) -> None:
    # Luminance of the lossless RGB reference vs the decoded lossy image, in 8-bit grey levels.
    error = np.abs(grey(name) - grey("SC_rgb_rle.dcm"))
    assert error.max() <= max_error
    assert error.mean() <= 0.75


def test_high_bit_depth_rgb_scales_like_8_bit() -> None:
    reference = grey("SC_rgb_rle.dcm")
    np.testing.assert_allclose(grey("SC_rgb_rle_16bit.dcm") / 257, reference, atol=1e-3)
    np.testing.assert_allclose(
        grey("SC_rgb_rle_32bit.dcm") / (2**32 - 1) * 255, reference, atol=1e-3
    )


def test_jpeg_extended_12_bit_decodes_the_same_scene_as_jpeg_2000() -> None:
    # JPEG-lossy.dcm (the named pydicom sample) has a broken codestream; JPGExtended.dcm is
    # its repaired copy. No lossless twin is bundled, so compare with the JPEG 2000 encoding
    # of the same NM image: a wrong decode would not correlate.
    extended, j2k = load("JPGExtended.dcm"), load("JPEG2000.dcm")
    assert extended.info.bits_stored == 12
    assert extended.stored.shape == j2k.stored.shape == (1024, 256)
    correlation = np.corrcoef(extended.stored.ravel(), j2k.stored.ravel())[0, 1]
    assert correlation > 0.9


def test_jpeg_ls_near_lossless_greyscale_decodes_within_its_bit_depth() -> None:
    for name, dtype, bits in [
        ("JPEGLSNearLossless_08.dcm", np.uint8, 8),
        ("JPEGLSNearLossless_16.dcm", np.uint16, 16),
    ]:
        image = load(name)
        assert image.stored.dtype == dtype
        assert image.info.bits_stored <= bits
        assert int(image.stored.max()) < 2**image.info.bits_stored
        assert image.stored.std() > 0


def test_pixel_representation_mismatch_in_jpeg_2000_is_corrected() -> None:
    # Signed header, unsigned codestream: pydicom's sign correction must keep CT air negative.
    image = load("J2K_pixelrep_mismatch.dcm")
    assert image.stored.dtype == np.int16
    assert image.stored.min() < 0


def test_synthetic_rle_and_jpeg_2000_round_trip(tmp_path: Path) -> None:
    pixels = ramp(64, 64) % 4096
    for uid in (RLELossless, JPEG2000Lossless):
        ds = synthetic(pixels, bits_stored=12)
        ds.compress(uid)
        image = load_image(save(ds, tmp_path / f"{uid}.dcm"))
        assert image.info.transfer_syntax_uid == uid
        np.testing.assert_array_equal(image.stored, pixels)


# --- Encodings and file layouts ----------------------------------------------------------------


def test_big_endian_pixels_come_back_in_native_byte_order() -> None:
    image = load("MR_small_bigendian.dcm")
    assert image.stored.dtype == np.dtype("int16")  # native, not '>i2'
    assert image.info.transfer_syntax_uid == "1.2.840.10008.1.2.2"
    np.testing.assert_array_equal(image.stored, load("MR_small.dcm").stored)


@pytest.mark.parametrize(
    ("name", "transfer_syntax"),
    [
        ("MR_small_implicit.dcm", "1.2.840.10008.1.2"),
        ("MR_small.dcm", "1.2.840.10008.1.2.1"),
        ("MR_small_bigendian.dcm", "1.2.840.10008.1.2.2"),
    ],
)
def test_raw_data_set_without_preamble_or_file_meta(name: str, transfer_syntax: str) -> None:
    raw = strip_file_meta(bundled(name).read_bytes())
    image = load_image(raw)
    # The encoding is recovered from the data itself.
    assert image.info.transfer_syntax_uid == transfer_syntax
    np.testing.assert_array_equal(image.stored, load("MR_small.dcm").stored)


def test_file_meta_without_preamble() -> None:
    data = bundled("MR_small.dcm").read_bytes()
    image = load_image(data[132:])  # starts directly with the (0002,xxxx) group
    np.testing.assert_array_equal(image.stored, load("MR_small.dcm").stored)


@pytest.mark.parametrize("name", ["ExplVR_LitEndNoMeta.dcm", "ExplVR_BigEndNoMeta.dcm"])
def test_bundled_no_meta_files_parse(name: str) -> None:
    ds = read_dataset(bundled(name))
    assert ds.Modality == "RTPLAN"
    assert ds.SOPInstanceUID == "1.2.333.4444.5.6.7.8"


def test_deflated_file_loads() -> None:
    image = load("image_dfl.dcm")
    assert image.info.transfer_syntax_uid == "1.2.840.10008.1.2.1.99"
    assert image.stored.shape == (512, 512)
    assert image.stored.std() > 0


def test_bytes_and_path_give_the_same_image() -> None:
    path = bundled("CT_small.dcm")
    from_path, from_bytes = load_image(path), load_image(path.read_bytes())
    assert from_path.info == from_bytes.info
    np.testing.assert_array_equal(from_path.stored, from_bytes.stored)
    assert load_image(str(path)).info == from_path.info


def test_header_only_read_skips_the_pixel_data() -> None:
    path = bundled("CT_small.dcm")
    header = read_dataset(path, header_only=True)
    assert "PixelData" not in header
    assert header.Rows == 128
    assert "PixelData" in read_dataset(path)


def test_image_info_facts_and_json() -> None:
    image = load("CT_small.dcm")
    info = image.info
    assert (info.modality, info.rows, info.columns) == ("CT", 128, 128)
    assert (info.rescale_slope, info.rescale_intercept) == (1.0, -1024.0)
    assert (info.bits_allocated, info.bits_stored, info.pixel_representation) == (16, 16, 1)
    assert info.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    assert info.sop_instance_uid == image.dataset.SOPInstanceUID
    as_json = info.to_json()
    assert set(as_json) == {
        "rows",
        "columns",
        "frames",
        "frame_index",
        "modality",
        "body_part",
        "view_position",
        "photometric",
        "bits_stored",
        "transfer_syntax",
    }
    assert as_json["transfer_syntax"] == "1.2.840.10008.1.2.1"
    # The pseudonymisation key material stays out of records.
    assert info.sop_instance_uid not in str(as_json)


def test_image_info_is_frozen() -> None:
    info = load("MR_small.dcm").info
    assert isinstance(info, ImageInfo)
    with pytest.raises(AttributeError):
        info.rows = 1  # type: ignore[misc]


# --- View position: what the scope check compares with the model's list -----------------------
# The shipped chest model is for PA/AP only and accepts a missing view, so anything that is not
# one clear view must come out as a string in no list, never as "" (which reads as "missing").

# CID 4010 "DX View" codes (PS3.16; the same pairs as pydicom.sr's concept tables).
SCT_PA = ("272479007", "SCT", "postero-anterior")
SCT_AP = ("399348003", "SCT", "antero-posterior")
SRT_PA = ("R-10214", "SRT", "postero-anterior")
SRT_AP = ("R-10206", "SRT", "antero-posterior")
SCT_RIGHT_LATERAL = ("399198007", "SCT", "right lateral")
SCT_PA_OBLIQUE = ("399059000", "SCT", "postero-anterior oblique")


def view_code(
    value: str | None = None, scheme: str | None = None, meaning: str | None = None
) -> Dataset:
    """One View Code Sequence item; ``None`` leaves an attribute out (values may be invalid)."""
    item = Dataset()
    with pydicom.config.disable_value_validation():
        for keyword, text in [
            ("CodeValue", value),
            ("CodingSchemeDesignator", scheme),
            ("CodeMeaning", meaning),
        ]:
            if text is not None:
                setattr(item, keyword, text)
    return item


def read_view(
    view_position: Any = None, codes: list[Dataset] | None = None, *, charset: str | None = None
) -> str:
    """The view a file with these attributes is read with (``None``: attribute absent)."""
    return read_scope_info(
        {"ViewPosition": view_position, "ViewCodeSequence": codes}, charset
    ).view_position


def read_scope_info(attributes: dict[str, Any], charset: str | None) -> ImageInfo:
    """What a written and re-read file with these attributes (``None``: absent) says."""
    ds = synthetic(ramp())
    if charset is not None:
        ds.SpecificCharacterSet = charset
    with pydicom.config.disable_value_validation():
        for keyword, value in attributes.items():
            if value is not None:
                setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return load_image(buffer.getvalue()).info


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("PA", "PA"),
        (" ap ", "AP"),  # what the policy compares: stripped, upper-case
        (["PA", "PA"], "PA"),
        (["PA", "pa "], "PA"),
        (["", "PA"], "PA"),
        (["PA", "LL"], "PA\\LL"),  # was "PA": the lateral hid behind the first value
        (["", "LL"], "LL"),  # was "": read as missing, which the chest model allows
        (["PA", "", "AP"], "PA\\AP"),  # two frontal views still contradict each other
        ("LL", "LL"),
    ],
)
def test_view_position_values(value: str | list[str], expected: str) -> None:
    assert read_view(value) == expected


@pytest.mark.parametrize("value", ["", ["", ""]])
def test_an_empty_view_position_without_view_codes_is_missing(value: str | list[str]) -> None:
    assert read_view(value) == ""
    assert read_view() == ""


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (SCT_PA, "PA"),
        (SRT_PA, "PA"),
        (("R-10214", "SNM3", "postero-anterior"), "PA"),
        (("R-10214", "99SDM", "postero-anterior"), "PA"),  # PS3.16: read 99SDM as SRT
        (SCT_AP, "AP"),
        (SRT_AP, "AP"),
        (("399348003", "SCT", "Antero-posterior projection (qualifier value)"), "AP"),
        (("272479007", "SCT", "Posteroanterior projection"), "PA"),
        ((None, None, "postero-anterior"), "PA"),  # a meaning alone is clear enough
        (("272479007", "SCT", None), "PA"),  # so is a known code alone
        (SCT_RIGHT_LATERAL, "RIGHT LATERAL"),  # was "": missing
        (SCT_PA_OBLIQUE, "POSTERO-ANTERIOR OBLIQUE"),  # an oblique is not a PA
        ((None, None, "left lateral"), "LEFT LATERAL"),
        # A known code decides whatever its meaning says (was "PA\\RIGHT LATERAL" and
        # "PA\\ANTERO-POSTERIOR"): see test_a_known_code_decides_over_its_meaning.
        (("272479007", "SCT", "right lateral"), "PA\\RIGHT LATERAL"),
        (("272479007", "SCT", "antero-posterior"), "PA"),
        # A code that is not one we know is never frontal, whatever its meaning says.
        (("399198007", "SCT", "postero-anterior"), "399198007\\POSTERO-ANTERIOR"),
        (("272479007", "99LOCAL", "PA"), "272479007\\PA"),
        (("399198007", "SCT", None), "UNKNOWN"),  # a code that is not frontal, no meaning
        ((None, None, None), ""),  # an empty item states nothing (was "UNKNOWN")
    ],
)
def test_view_code_sequence_without_view_position(
    code: tuple[str | None, str | None, str | None], expected: str
) -> None:
    assert read_view(codes=[view_code(*code)]) == expected
    assert read_view("", [view_code(*code)]) == expected  # empty View Position: the same


def test_view_code_sequence_items_must_agree() -> None:
    assert read_view(codes=[view_code(*SCT_PA), view_code(*SRT_PA)]) == "PA"
    both = [view_code(*SCT_PA), view_code(*SCT_RIGHT_LATERAL)]
    assert read_view(codes=both) == "PA\\RIGHT LATERAL"


@pytest.mark.parametrize(
    ("position", "codes", "expected"),
    [
        # Was "UNKNOWN", "UNKNOWN", "PA\\UNKNOWN", "AP\\UNKNOWN", "PA\\UNKNOWN": escalated,
        # although an empty sequence, like an empty View Position, states no view at all.
        (None, [], ""),
        ("", [], ""),
        ("PA", [], "PA"),
        ("AP", [], "AP"),
        ("PA", [view_code()], "PA"),  # an item with neither a code value nor a meaning
        ("", [view_code()], ""),
        ("PA", [view_code(scheme="SRT")], "PA"),  # a designator alone names no concept
        (None, [view_code(), view_code(*SRT_PA)], "PA"),  # empty items are dropped
        (None, [view_code(), view_code(*SCT_RIGHT_LATERAL)], "RIGHT LATERAL"),
        ("PA", [view_code(), view_code(*SCT_RIGHT_LATERAL)], "PA\\RIGHT LATERAL"),
    ],
)
def test_an_empty_view_code_sequence_states_nothing(
    position: str | None, codes: list[Dataset], expected: str
) -> None:
    assert read_view(position, codes) == expected


# Frontal headers as modalities send them. Each was escalated before (the old reading is in the
# comment): the site's local rate collapses when every chest from such a modality is escalated.
@pytest.mark.parametrize(
    ("position", "code", "expected"),
    [
        ("PA", ("R-10214", "SRT", "Posterior-Anterior"), "PA"),  # PA\PA\POSTERIOR-ANTERIOR
        ("AP", ("R-10206", "SRT", "Anterior-Posterior"), "AP"),  # AP\AP\ANTERIOR-POSTERIOR
        ("PA", ("R-10214", "SRT", "PA erect"), "PA"),  # PA\PA\PA ERECT
        ("AP", ("R-10206", "SRT", "AP supine"), "AP"),  # AP\AP\AP SUPINE
        ("PA", ("R-10214", "SRT", "postero-anterior (PA)"), "PA"),  # PA\PA\POSTERO-ANTERIOR (PA)
        ("PA", ("R-10214", None, "postero-anterior"), "PA"),  # PA\R-10214\POSTERO-ANTERIOR
        ("PA", ("R-10214", "", "postero-anterior"), "PA"),  # a blank designator: the same
        ("AP", ("399348003", None, "antero-posterior"), "AP"),  # AP\399348003\ANTERO-POSTERIOR
        ("PA", ("272479007", None, None), "PA"),  # PA\UNKNOWN
    ],
)
def test_a_frontal_code_reads_as_frontal_however_it_is_worded(
    position: str, code: tuple[str, str | None, str | None], expected: str
) -> None:
    assert read_view(position, [view_code(*code)]) == expected
    assert read_view(codes=[view_code(*code)]) == expected  # without View Position: the same


def test_a_localised_code_meaning_does_not_matter() -> None:
    """Code Meaning is display text and may be translated; the code is what DICOM defines."""
    french = [view_code("R-10214", "SRT", "post\u00e9ro-ant\u00e9rieur")]
    assert read_view("PA", french, charset="ISO_IR 192") == "PA"  # was PA\PA\POSTÉRO-ANTÉRIEUR
    assert read_view(codes=french, charset="ISO_IR 100") == "PA"
    # Without a code the meaning is all there is, and a translation is not recognised.
    text_only = [view_code(meaning="post\u00e9ro-ant\u00e9rieur")]
    assert read_view(codes=text_only, charset="ISO_IR 192") == "POST\u00c9RO-ANT\u00c9RIEUR"


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        # The code is the concept: DICOM identifies a coded entry by Coding Scheme Designator
        # and Code Value, while Code Meaning is display text that modalities reword and
        # translate freely. If the text could overrule a known code, every wording not on our
        # list would have to be escalated. Only a text that names a view no frontal image has
        # (lateral, oblique) makes the header contradict itself: escalated, never frontal.
        (("R-10206", "SNM3", "postero-anterior"), "AP"),  # was AP\POSTERO-ANTERIOR
        (("R-10214", "SRT", "PA erect"), "PA"),
        (("R-10214", "SRT", "right lateral"), "PA\\RIGHT LATERAL"),
        (("399348003", None, "left lateral"), "AP\\LEFT LATERAL"),
        (("272479007", "SCT", "postero-anterior oblique"), "PA\\POSTERO-ANTERIOR OBLIQUE"),
    ],
)
def test_a_known_code_decides_over_its_meaning(
    code: tuple[str, str | None, str], expected: str
) -> None:
    assert read_view(codes=[view_code(*code)]) == expected
    stated = expected.split("\\")[0]  # View Position as the code says
    with_position = read_view(stated, [view_code(*code)])
    if "\\" in expected:  # contradicting: still escalated, whatever View Position says
        assert with_position.endswith(expected) and with_position not in ("PA", "AP")
    else:
        assert with_position == expected


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        # Not one of our codes: never frontal, whatever its meaning says (unchanged).
        (("399198007", "SCT", "PA"), "399198007\\PA"),
        (("F-10440", "SRT", "postero-anterior"), "F-10440\\POSTERO-ANTERIOR"),
        (("R-10214", "99LOCAL", "postero-anterior"), "R-10214\\POSTERO-ANTERIOR"),  # local scheme
        (("399198007", "SCT", "right lateral"), "RIGHT LATERAL"),
        (("399198007", None, "right lateral"), "RIGHT LATERAL"),
    ],
)
def test_an_unknown_code_is_not_frontal(code: tuple[str, str | None, str], expected: str) -> None:
    assert read_view(codes=[view_code(*code)]) == expected
    assert read_view("PA", [view_code(*code)]) == f"PA\\{expected}"  # escalated either way


@pytest.mark.parametrize(
    ("meaning", "expected"),
    [
        # An item without a code value: the meaning, normalised, is all there is.
        ("Posterior-Anterior", "PA"),  # was POSTERIOR-ANTERIOR
        ("anterior-posterior", "AP"),  # was ANTERIOR-POSTERIOR
        ("postero-anterior (PA)", "PA"),  # was POSTERO-ANTERIOR (PA)
        ("Antero-posterior view (AP)", "AP"),  # was ANTERO-POSTERIOR VIEW (AP)
        # Not recognised, so escalated (unchanged).
        ("antero-posterior (PA)", "ANTERO-POSTERIOR (PA)"),  # the abbreviation contradicts
        ("PA erect", "PA ERECT"),
        ("(PA)", "(PA)"),
        # Obliques are never frontal, however they are worded (unchanged).
        ("postero-anterior oblique", "POSTERO-ANTERIOR OBLIQUE"),
        ("Posterior-anterior oblique", "POSTERIOR-ANTERIOR OBLIQUE"),
        ("PA oblique", "PA OBLIQUE"),
        ("oblique (PA)", "OBLIQUE (PA)"),
        ("postero-anterior oblique (PA)", "POSTERO-ANTERIOR OBLIQUE (PA)"),
        ("Oblique PA", "OBLIQUE PA"),
    ],
)
def test_a_code_meaning_without_a_code_value(meaning: str, expected: str) -> None:
    assert read_view(codes=[view_code(meaning=meaning)]) == expected
    assert read_view(codes=[view_code(scheme="SRT", meaning=meaning)]) == expected


def test_a_long_or_urn_code_value_is_a_code_not_nothing() -> None:
    """A code this reader does not look up is still a stated view: never "" and never frontal."""
    for keyword, code in [("LongCodeValue", "L-10214"), ("URNCodeValue", "urn:x:pa")]:
        item = Dataset()
        setattr(item, keyword, code)
        ds = Dataset()
        ds.ViewCodeSequence = [item]
        assert view_position(ds) == "UNKNOWN"
        item.CodeMeaning = "postero-anterior"
        assert view_position(ds) == "UNKNOWN\\POSTERO-ANTERIOR"
        item.CodeMeaning = "right lateral"
        assert view_position(ds) == "RIGHT LATERAL"


@pytest.mark.parametrize(
    ("position", "code", "expected"),
    [
        ("PA", SCT_PA, "PA"),
        ("AP", SCT_PA, "AP\\PA"),  # they disagree: in no model's list
        ("PA", SCT_RIGHT_LATERAL, "PA\\RIGHT LATERAL"),
    ],
)
def test_view_position_and_the_view_code_sequence_must_agree(
    position: str, code: tuple[str, str, str], expected: str
) -> None:
    assert read_view(position, [view_code(*code)]) == expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ("CHEST", "CHEST"),
        (" CHEST ", "CHEST"),
        ("\\CHEST", "CHEST"),
        ("CHEST\\CHEST", "CHEST"),
        ("CHEST\\SKULL", "CHEST\\SKULL"),  # no body part a chest model reads
        ("", ""),
    ],
)
def test_every_body_part_value_counts(values: str, expected: str) -> None:
    ds = phantom_dataset()
    ds.BodyPartExamined = values
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert load_image(buffer.getvalue()).info.body_part == expected


# --- Body part: Body Part Examined and the Anatomic Region Sequence ---------------------------
# A skull film with no Body Part Examined but an Anatomic Region Sequence saying "Head" was read
# as "missing", which the shipped chest models accept. Codes as PS3.16 Annex L maps them.
SCT_CHEST = ("816094009", "SCT", "Chest")  # CID 4031 now (CP 1962)
SCT_THORAX = ("51185008", "SCT", "Thorax")  # CHEST before CP 1962
SRT_CHEST = ("T-D3000", "SRT", "Chest")  # SNOMED RT
SCT_HEAD = ("69536005", "SCT", "Head")
SCT_SKULL = ("89546000", "SCT", "Skull")
LOCAL_CHEST = ("CHX1", "99LOCAL", "Chest")


def read_body_part(
    body_part: str | None = None,
    regions: list[Dataset] | None = None,
    *,
    charset: str | None = None,
) -> str:
    """The body part a file with these attributes is read with (``None``: attribute absent)."""
    return read_scope_info(
        {"BodyPartExamined": body_part, "AnatomicRegionSequence": regions}, charset
    ).body_part


def region(code: tuple[str | None, str | None, str | None]) -> Dataset:
    """One Anatomic Region Sequence item: a Code Sequence Macro item, as the view's."""
    return view_code(*code)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (SCT_CHEST, "CHEST"),
        (SCT_THORAX, "CHEST"),
        (SRT_CHEST, "CHEST"),
        (("T-D3000", "SNM3", "Chest"), "CHEST"),  # the designator SRT replaced
        (("T-D3000", "99SDM", "Chest"), "CHEST"),  # another PS3.16 says to read as SRT
        (("816094009", None, "Chest"), "CHEST"),  # no designator: the value alone is unambiguous
        (("51185008", "", "Thorax"), "CHEST"),  # a blank designator: the same
        (("T-D3000", None, None), "CHEST"),  # a known code without a meaning
        (("816094009", "SCT", "Poitrine"), "CHEST"),  # a translated meaning does not matter
        (("51185008", "SCT", "Thoracic structure"), "CHEST"),  # nor a reworded one
        # Each of these was "", missing, which the shipped chest models accept.
        (SCT_HEAD, "HEAD"),
        (SCT_SKULL, "SKULL"),
        (("T-D1100", "SRT", "Head"), "HEAD"),
        (("818981001", "SCT", "Abdomen"), "ABDOMEN"),
        (("113345001", "SCT", "Abdomen"), "ABDOMEN"),  # before CP 1962
        (("816092008", "SCT", "Pelvis"), "PELVIS"),
        (("122496007", "SCT", "Lumbar spine"), "LSPINE"),
        (("297171002", "SCT", "Cervico-thoracic spine"), "CTSPINE"),  # before 1217257000
        (("54735007", "SCT", "Sacrum"), "SSPINE"),
        (("74670003", "SCT", "Wrist joint"), "WRIST"),
        (("T-D9200", "SRT", "Knee"), "KNEE"),
        (("16982005", "SCT", "Shoulder"), "SHOULDER"),
        (("38266002", "SCT", "Entire body"), "WHOLEBODY"),
    ],
)
def test_the_anatomic_region_sequence_without_body_part_examined(
    code: tuple[str, str | None, str | None], expected: str
) -> None:
    assert read_body_part(regions=[region(code)]) == expected
    assert read_body_part("", [region(code)]) == expected  # empty: the same


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        # Stated, but not a region this mapping knows: escalated, never "" and never CHEST,
        # whatever its meaning or value says.
        (LOCAL_CHEST, "CHX1\\CHEST"),
        (("816094009", "99LOCAL", "Chest"), "816094009\\CHEST"),  # a local scheme
        (("T-D3000", "SCT", "Chest"), "T-D3000\\CHEST"),  # a SNOMED RT id is no SCT code
        (("CHEST", "99LOCAL", None), "CHEST\\UNKNOWN"),  # a local code named like the term
        (("CHEST", "99LOCAL", "CHEST"), "CHEST\\CHEST"),
        (("40983000", "SCT", "Upper arm"), "40983000\\UPPER ARM"),  # a region left out
        (("12345678", "SCT", None), "12345678\\UNKNOWN"),
        ((None, None, "Chest"), "UNKNOWN\\CHEST"),  # a meaning without a code
        ((None, "SCT", "Head"), "UNKNOWN\\HEAD"),
    ],
)
def test_an_unknown_region_code_is_in_no_models_list(
    code: tuple[str | None, str | None, str | None], expected: str
) -> None:
    assert read_body_part(regions=[region(code)]) == expected
    assert read_body_part("CHEST", [region(code)]) == f"CHEST\\{expected}"


def test_a_long_or_urn_code_value_is_a_region_not_nothing() -> None:
    """A code this reader does not look up still states a region: never "", never a term."""
    for keyword, code in [("LongCodeValue", "816094009"), ("URNCodeValue", "urn:x:chest")]:
        item = Dataset()
        setattr(item, keyword, code)
        item.CodingSchemeDesignator = "SCT"
        assert read_body_part(regions=[item]) == "UNKNOWN"
        item.CodeMeaning = "Chest"
        assert read_body_part(regions=[item]) == "UNKNOWN\\CHEST"
        assert read_body_part("CHEST", [item]) == "CHEST\\UNKNOWN\\CHEST"


@pytest.mark.parametrize(
    ("body_part", "codes", "expected"),
    [
        # An empty sequence or item, like an empty Body Part Examined, states nothing.
        (None, [], ""),
        ("", [], ""),
        ("CHEST", [], "CHEST"),
        (None, [()], ""),  # an item with neither a code value nor a meaning
        ("", [()], ""),
        ("CHEST", [()], "CHEST"),
        ("CHEST", [(None, "SCT", None)], "CHEST"),  # a designator alone names no region
        (None, [(), SCT_HEAD], "HEAD"),  # empty items are dropped
        ("CHEST", [(), SCT_CHEST], "CHEST"),
    ],
)
def test_an_empty_anatomic_region_sequence_states_nothing(
    body_part: str | None, codes: list[tuple[str | None, ...]], expected: str
) -> None:
    assert read_body_part(body_part, [view_code(*code) for code in codes]) == expected


@pytest.mark.parametrize(
    ("body_part", "code", "expected"),
    [
        ("CHEST", SCT_CHEST, "CHEST"),
        ("CHEST", SCT_THORAX, "CHEST"),
        ("CHEST", SRT_CHEST, "CHEST"),
        (" chest ", SCT_CHEST, "CHEST"),
        ("HEAD", SCT_HEAD, "HEAD"),
        ("CHEST", SCT_HEAD, "CHEST\\HEAD"),  # they disagree: in no model's list
        ("SKULL", SCT_CHEST, "SKULL\\CHEST"),
        ("\\CHEST", SCT_SKULL, "CHEST\\SKULL"),
        ("THORAX", SCT_CHEST, "THORAX\\CHEST"),  # not a defined term: escalated, as it was
    ],
)
def test_body_part_examined_and_the_anatomic_region_sequence_must_agree(
    body_part: str, code: tuple[str, str, str], expected: str
) -> None:
    assert read_body_part(body_part, [region(code)]) == expected


def test_anatomic_region_sequence_items_must_agree() -> None:
    assert read_body_part(regions=[region(SCT_CHEST), region(SRT_CHEST)]) == "CHEST"
    both = [region(SCT_CHEST), region(SCT_HEAD)]
    assert read_body_part(regions=both) == "CHEST\\HEAD"


def test_a_localised_region_meaning_does_not_matter() -> None:
    chest = [region(("816094009", "SCT", "R\u00e9gion thoracique"))]
    assert read_body_part("CHEST", chest, charset="ISO_IR 192") == "CHEST"
    local = [region(("TX1", "99LOCAL", "R\u00e9gion thoracique"))]
    assert read_body_part(regions=local, charset="ISO_IR 100") == ("TX1\\R\u00c9GION THORACIQUE")


def test_an_unknown_region_is_capped_and_cleaned() -> None:
    long = "left hand, " + "very " * 30 + "long"
    read = read_body_part(regions=[region(("H1", "99LOCAL", long))])
    assert read == f"H1\\{long.upper()}"[:64]
    code = ("1234567890123456789", "99LOCAL", "left\thand\r\n")  # a value beyond SH's 16
    assert read_body_part(regions=[region(code)]) == "1234567890123456\\LEFT HAND"


def test_the_region_mapping_is_unambiguous() -> None:
    """A value with no designator is looked up alone: it must name one region under every
    scheme, and every SNOMED RT id must be known under SNM3 and 99SDM as well as SRT."""
    for (scheme, value), term in reader._REGION_CODES.items():
        assert reader._REGION_VALUES[value] == term, (scheme, value)
        if scheme == "SRT":
            assert reader._REGION_CODES["SNM3", value] == term
            assert reader._REGION_CODES["99SDM", value] == term
    assert reader._REGION_CODES["SCT", "51185008"] == "CHEST"
    assert reader._REGION_CODES["SCT", "816094009"] == "CHEST"
    assert reader._REGION_CODES["SRT", "T-D3000"] == "CHEST"


def test_anatomic_region_in_the_record(tmp_path: Path) -> None:
    ds = synthetic(ramp())
    ds.AnatomicRegionSequence = [region(SCT_SKULL)]
    image = load_image(save(ds, tmp_path / "skull.dcm"))
    assert image.info.to_json()["body_part"] == "SKULL"


def test_a_non_ascii_view_position_is_kept_and_matches_no_view() -> None:
    ds = synthetic(ramp(), SpecificCharacterSet="ISO_IR 100")
    with pydicom.config.disable_value_validation():
        ds.ViewPosition = "P\u00c4"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert load_image(buffer.getvalue()).info.view_position == "P\u00c4"


def test_view_code_meaning_is_capped_and_cleaned() -> None:
    long = "left lateral, " + "very " * 30 + "long"
    assert read_view(codes=[view_code(meaning=long)]) == long.upper()[:64]
    assert read_view(codes=[view_code(meaning="left\tlateral\r\n")]) == "LEFT LATERAL"


def test_view_position_in_the_record() -> None:
    ds = synthetic(ramp())
    ds.ViewCodeSequence = [view_code(*SCT_RIGHT_LATERAL)]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert load_image(buffer.getvalue()).info.to_json()["view_position"] == "RIGHT LATERAL"


ITEM = b"\xfe\xff\x00\xe0"  # (FFFE,E000) little endian; its 4-byte length follows
ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"  # (FFFE,E00D) item delimitation item
PA_MEANING = b"\x08\x00\x04\x01\x02\x00\x00\x00PA"  # (0008,0104) "PA", implicit VR


def raw(tag: int, vr: str, value: bytes) -> RawDataElement:
    return RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


@pytest.mark.parametrize(
    ("element", "expected"),
    [
        (raw(0x00185101, "CS", b"PA\\LL"), "PA\\LL"),
        (raw(0x00185101, "CS", b"\\LL"), "LL"),
        (raw(0x00185101, "OB", b"PA"), "PA"),  # a wrong VR: the value stays bytes
        (raw(0x00185101, "OB", b"L\xc4"), "L\ufffd"),  # not ASCII: matches no view
        (raw(0x00185101, "US", b"abc"), "UNKNOWN"),  # three bytes for a two-byte number
        (raw(0x00185101, "SQ", b"abcd"), "UNKNOWN"),  # no item tag where one must be
        (raw(0x00540220, "SQ", b"\xfe\xff\x00\xe0\x10\x00\x00\x00ab"), "UNKNOWN"),  # cut item
        # pydicom makes the items below empty data sets without a word; an empty item states
        # nothing, so these must be told apart from a real empty item (length 0).
        (raw(0x00540220, "SQ", ITEM + b"\x02\x00\x00\x00ab"), "UNKNOWN"),  # no element in it
        (raw(0x00540220, "SQ", ITEM + b"\x00\x00\x00\x00abc"), "UNKNOWN"),  # a cut header
        (raw(0x00540220, "SQ", b"\x08\x00\x04\x01\x02\x00\x00\x00PA"), "UNKNOWN"),  # no item
        (raw(0x00540220, "SQ", b""), ""),  # no items: nothing stated
        (raw(0x00540220, "SQ", ITEM + b"\x00\x00\x00\x00"), ""),  # one empty item
        (raw(0x00540220, "SQ", ITEM + b"\x00" * 4 + b"\xfe\xff\xdd\xe0" + b"\x00" * 4), ""),
        (raw(0x00540220, "SQ", ITEM + b"\x0a\x00\x00\x00" + PA_MEANING), "PA"),
        (raw(0x00540220, "SQ", ITEM + b"\xff" * 4 + PA_MEANING + ITEM_END), "PA"),
    ],
)
def test_unreadable_or_odd_raw_values_never_raise(element: RawDataElement, expected: str) -> None:
    ds = Dataset()
    ds[element.tag] = element
    assert view_position(ds) == expected


def test_an_unreadable_view_code_sequence_is_still_unknown() -> None:
    """Nothing stated means *empty*: a sequence that cannot be parsed may hide any view."""
    ds = Dataset()
    ds.ViewPosition = "PA"
    cut = raw(0x00540220, "SQ", b"\xfe\xff\x00\xe0\x10\x00\x00\x00ab")
    ds[cut.tag] = cut
    assert view_position(ds) == "PA\\UNKNOWN"


UNDEFINED = b"\xff\xff\xff\xff"  # an item's length, to its delimiter
ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"  # (FFFE,E00D), length 0
EMPTY_REGIONS = b"\x08\x00\x18\x22SQ\x00\x00\x00\x00\x00\x00"  # (0008,2218) SQ, length 0
HEAD_ITEM = (
    b"\x08\x00\x00\x01SH\x08\x0069536005"  # Code Value
    b"\x08\x00\x02\x01SH\x04\x00SCT "  # Coding Scheme Designator
    b"\x08\x00\x04\x01LO\x04\x00Head"  # Code Meaning
)


def with_regions_value(data: bytes, value: bytes) -> bytes:
    """A file whose empty Anatomic Region Sequence is given these bytes as its value, as a
    modality or a broken copy may write them (explicit VR little endian, defined length)."""
    assert data.count(EMPTY_REGIONS) == 1
    return data.replace(EMPTY_REGIONS, EMPTY_REGIONS[:8] + struct.pack("<L", len(value)) + value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (ITEM + struct.pack("<L", len(HEAD_ITEM)) + HEAD_ITEM, "HEAD"),  # the control
        (ITEM + b"\x10\x00\x00\x00ab", "UNKNOWN"),  # an item cut short
        # pydicom makes the items below empty data sets without a word; an empty item states
        # nothing, so these must be told apart from a real empty item (length 0).
        (ITEM + b"\x02\x00\x00\x00ab", "UNKNOWN"),  # no element in the item
        (ITEM + b"\x00\x00\x00\x00abc", "UNKNOWN"),  # a cut item header after an empty item
        (HEAD_ITEM, "UNKNOWN"),  # elements with no item around them
        (ITEM + struct.pack("<L", len(HEAD_ITEM)) + HEAD_ITEM + b"ab", "UNKNOWN"),
        # The second review's: pydicom reads these as elements no code item has, or as an empty
        # undefined-length item, where a code was.
        (ITEM + struct.pack("<L", len(HEAD_ITEM)) + bytes(len(HEAD_ITEM)), "UNKNOWN"),  # zeroed
        (ITEM + UNDEFINED + b"ab" + ITEM_END, "UNKNOWN"),  # junk in an undefined-length item
        (ITEM + UNDEFINED + ITEM_END + ITEM + b"\x02\x00\x00\x00ab", "UNKNOWN"),
        (b"", ""),  # no items: nothing stated
        (ITEM + b"\x00\x00\x00\x00", ""),  # one empty item
        (ITEM + UNDEFINED + ITEM_END, ""),  # one empty item of undefined length
        (
            ITEM + UNDEFINED + ITEM_END + ITEM + struct.pack("<L", len(HEAD_ITEM)) + HEAD_ITEM,
            "HEAD",
        ),
    ],
)
def test_a_damaged_anatomic_region_sequence_is_unknown(
    tmp_path: Path, value: bytes, expected: str
) -> None:
    """A sequence that cannot be read may hide any region: escalated, never "missing"."""
    ds = synthetic(ramp())
    ds.AnatomicRegionSequence = []
    path = save(ds, tmp_path / "regions.dcm")
    path.write_bytes(with_regions_value(path.read_bytes(), value))
    assert load_image(path).info.body_part == expected
    ds.BodyPartExamined = "CHEST"
    save(ds, path)
    path.write_bytes(with_regions_value(path.read_bytes(), value))
    assert load_image(path).info.body_part == (f"CHEST\\{expected}" if expected else "CHEST")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"PA", "PA"),
        ("P\u00c4", "P\u00c4"),
        (None, ""),
        (7, "7"),
        ([b"PA", "LL"], "PA\\LL"),
    ],
)
def test_odd_python_values_give_a_string(value: Any, expected: str) -> None:
    ds = Dataset()
    ds.add(DataElement(0x00185101, "CS", value, validation_mode=pydicom.config.IGNORE))
    assert view_position(ds) == expected


def test_nothing_but_the_view_reaches_the_record() -> None:
    """A sequence where a string belongs is not dumped (its str() would list the name)."""
    item = Dataset()
    item.PatientName = PATIENT_NAME
    item.CodeMeaning = "right lateral"
    ds = Dataset()
    ds.add(DataElement(0x00185101, "SQ", [item]))
    assert view_position(ds) == "UNKNOWN"
    ds = Dataset()
    ds.ViewCodeSequence = [item]
    assert view_position(ds) == "RIGHT LATERAL"  # other attributes of the item are not read
    coded = Dataset()  # a nested data set where the meaning belongs
    coded.add(DataElement(0x00080104, "LO", [item], validation_mode=pydicom.config.IGNORE))
    ds.ViewCodeSequence = [coded]
    assert view_position(ds) == "UNKNOWN"


# --- Frame policy and photometric handling -----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "frames", "index"),
    [
        ("rtdose.dcm", 15, 7),
        ("rtdose_rle.dcm", 15, 7),
        ("rtdose_expb.dcm", 15, 7),
        ("SC_rgb_rle_2frame.dcm", 2, 1),
        ("examples_ybr_color.dcm", 30, 15),
    ],
)
def test_multi_frame_images_use_the_middle_frame(name: str, frames: int, index: int) -> None:
    image = load(name)
    assert (image.info.number_of_frames, image.info.frame_index) == (frames, index)
    everything = pydicom.dcmread(bundled(name)).pixel_array.astype(np.float64)
    if everything.ndim == 4:  # colour: compare luminance (pydicom's RGB is rounded and clipped)
        everything = everything @ LUMA
    distances = [np.abs(image.stored - frame).mean() for frame in everything]
    assert distances[index] < 0.5
    assert int(np.argmin(distances)) == index
    assert max(distances) > 1.0, "frames must differ for this check to mean anything"


def test_middle_frame_of_a_synthetic_four_frame_image(tmp_path: Path) -> None:
    frames = np.stack([np.full((8, 6), i * 100, dtype=np.uint16) for i in range(4)])
    ds = synthetic(frames)
    ds.compress(RLELossless)
    image = load_image(save(ds, tmp_path / "four.dcm"))
    assert (image.info.number_of_frames, image.info.frame_index) == (4, 2)
    assert np.all(image.stored == 200)


def test_monochrome1_is_reported_and_not_inverted_in_stored_values() -> None:
    image = load("dicomdirtests/77654033/CR1/6154")
    assert image.info.photometric == "MONOCHROME1"
    raw = pydicom.dcmread(bundled("dicomdirtests/77654033/CR1/6154")).pixel_array
    np.testing.assert_array_equal(image.stored, raw)  # inversion is a display step (pixels.py)


@pytest.mark.parametrize("name", ["SC_rgb_rle.dcm", "ExplVR_BigEnd.dcm", "examples_rgb_color.dcm"])
def test_rgb_becomes_float_luminance(name: str) -> None:
    image = load(name)
    rgb = pydicom.dcmread(bundled(name)).pixel_array.astype(np.float64)
    assert image.stored.dtype == np.float32
    np.testing.assert_allclose(image.stored, rgb @ LUMA, atol=1e-3)


def test_palette_colour_becomes_float_luminance() -> None:
    image = load("examples_palette.dcm")
    ds = pydicom.dcmread(bundled("examples_palette.dcm"))
    rgb = apply_color_lut(ds.pixel_array, ds)[..., :3].astype(np.float64)
    assert image.info.photometric == "PALETTE COLOR"
    np.testing.assert_allclose(image.stored, rgb @ LUMA, rtol=1e-5)


def test_ybr_uses_the_luma_channel(tmp_path: Path) -> None:
    ybr = np.zeros((4, 4, 3), dtype=np.uint8)
    ybr[..., 0] = np.arange(16, dtype=np.uint8).reshape(4, 4) * 10
    ybr[..., 1:] = 128  # neutral chroma: grey is Y
    ds = synthetic(ybr, photometric="YBR_FULL", bits_stored=8)
    image = load_image(save(ds, tmp_path / "ybr.dcm"))
    np.testing.assert_allclose(image.stored, ybr[..., 0], atol=1.0)


def test_unused_high_bits_are_masked(tmp_path: Path) -> None:
    pixels = ramp(4, 4)
    ds = synthetic(pixels, bits_stored=12)
    ds.PixelData = (pixels | 0xF000).astype(np.uint16).tobytes()  # overlay junk in bits 12-15
    image = load_image(save(ds, tmp_path / "junk.dcm"))
    np.testing.assert_array_equal(image.stored, pixels)


def test_enhanced_functional_groups_give_rescale_and_window(tmp_path: Path) -> None:
    frames = np.stack([np.full((4, 4), i, dtype=np.uint16) for i in range(3)])
    ds = synthetic(frames)
    shared, transform = pydicom.Dataset(), pydicom.Dataset()
    transform.RescaleSlope, transform.RescaleIntercept = "2", "-100"
    shared.PixelValueTransformationSequence = [transform]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for center in (10, 20, 30):
        item, voi = pydicom.Dataset(), pydicom.Dataset()
        voi.WindowCenter, voi.WindowWidth = str(center), "50"
        item.FrameVOILUTSequence = [voi]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    info = load_image(save(ds, tmp_path / "enhanced.dcm")).info
    assert (info.rescale_slope, info.rescale_intercept) == (2.0, -100.0)
    assert info.window == (20.0, 50.0)  # the middle frame's own window


def test_window_narrower_than_one_is_ignored(tmp_path: Path) -> None:
    ds = synthetic(ramp(), WindowCenter="100", WindowWidth="0")
    assert load_image(save(ds, tmp_path / "w.dcm")).info.window is None


# --- Broken inputs map to the right code -------------------------------------------------------


def code_of(source: str | os.PathLike[str] | bytes) -> str:
    with pytest.raises(InputError) as caught:
        load_image(source)
    assert "\n" not in str(caught.value)
    return caught.value.code


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "empty.dcm").write_bytes(b"")
    assert code_of(tmp_path / "empty.dcm") == "empty_file"
    assert code_of(b"") == "empty_file"
    with pytest.raises(errors.EmptyFileError):
        read_dataset(tmp_path / "empty.dcm", header_only=True)


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("Patient Doe^Jane came in on Monday.\n" * 20)
    assert code_of(path) == "not_dicom"


def test_png_like_binary(tmp_path: Path) -> None:
    path = tmp_path / "image.dcm"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    assert code_of(path) == "not_dicom"


def test_binary_that_does_not_start_like_a_data_set(tmp_path: Path) -> None:
    # Both would pass as implicit VR elements with a small length; their groups give them away.
    assert code_of(bytes(1000)) == "not_dicom"  # e.g. a preallocated, never written file
    assert code_of(b"\x00\x01\x02\x03\x04\x00\x00\x00" + bytes(200)) == "not_dicom"


def test_zeros_shorter_than_the_preamble_are_truncated(tmp_path: Path) -> None:
    assert code_of(bytes(100)) == "truncated"
    assert code_of(bytes(128) + b"DI") == "truncated"


@pytest.mark.parametrize(
    ("name", "cut", "where"),
    [
        ("CT_small.dcm", 150, "file meta"),
        ("CT_small.dcm", 1000, "header"),
        ("CT_small.dcm", 30000, "pixel data"),
        ("MR_small_RLE.dcm", 6000, "encapsulated pixel data"),
        ("MR_small_implicit.dcm", 9000, "pixel data"),
        ("MR_small_bigendian.dcm", 9000, "pixel data"),
        ("rtdose_rle.dcm", 3000, "multi-frame fragments"),
        ("image_dfl.dcm", 3000, "deflated stream"),
    ],
)
def test_truncated_copies(tmp_path: Path, name: str, cut: int, where: str) -> None:
    data = bundled(name).read_bytes()
    assert cut < len(data)
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[:cut])
    assert code_of(path) == "truncated", where


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_implicit.dcm"])
def test_every_cut_is_an_input_error_and_cuts_in_the_pixel_data_are_truncated(name: str) -> None:
    data = bundled(name).read_bytes()
    pixels = read_dataset(data)["PixelData"]
    pixel_start = pixels.file_tell
    assert pixel_start is not None
    pixel_end = pixel_start + len(pixels.value) + (8 if pixels.is_undefined_length else 0)
    codes: dict[str, int] = {}
    for cut in [*range(1, 600), *range(600, len(data), 5)]:
        try:
            load_image(data[:cut])
        except InputError as exc:
            codes[exc.code] = codes.get(exc.code, 0) + 1
            if pixel_start <= cut < pixel_end:
                assert exc.code == "truncated", cut
        else:
            # Only elements after the pixel data (or its closing delimiter) may be lost.
            assert cut >= pixel_end - 8, cut
    # Cuts at exact element boundaries cannot be told from a shorter file: no pixel data.
    assert set(codes) <= {"truncated", "not_dicom", "no_pixel_data"}
    assert codes["truncated"] > 0.8 * sum(codes.values())


def test_cut_inside_an_element_header_is_truncated() -> None:
    data = bundled("CT_small.dcm").read_bytes()
    study_date = read_dataset(data)["StudyDate"]
    assert study_date.file_tell is not None
    next_element = study_date.file_tell + len(study_date.value)
    for partial in range(1, 8):  # pydicom stops silently on a short tag/length
        assert code_of(data[: next_element + partial]) == "truncated"
    # A cut exactly between two elements looks like a complete, shorter data set.
    assert code_of(data[:next_element]) == "no_pixel_data"


def test_raw_data_set_cut_inside_undefined_length_pixel_data() -> None:
    # Without file meta an empty parse would otherwise look like "not DICOM".
    raw = strip_file_meta(bundled("MR_small_RLE.dcm").read_bytes())
    assert code_of(raw[: len(raw) - 500]) == "truncated"


def test_header_only_read_of_a_truncated_header(tmp_path: Path) -> None:
    data = bundled("CT_small.dcm").read_bytes()
    with pytest.raises(errors.TruncatedError):
        read_dataset(data[:1000], header_only=True)
    # Header-only reads do not look at the (cut) pixel data.
    assert read_dataset(data[:30000], header_only=True).Rows == 128


def test_dicom_without_pixel_data(tmp_path: Path) -> None:
    ds = pydicom.dcmread(bundled("MR_small.dcm"))
    del ds.PixelData
    assert code_of(save(ds, tmp_path / "nopix.dcm")) == "no_pixel_data"


def test_unknown_transfer_syntax(tmp_path: Path) -> None:
    data = bundled("MR_small.dcm").read_bytes()
    explicit_le = ExplicitVRLittleEndian.encode() + b"\x00"  # 20 bytes, padded
    assert data.count(explicit_le) == 1
    path = tmp_path / "private_ts.dcm"
    path.write_bytes(data.replace(explicit_le, b"1.2.3.4.5.6.7.8.9.10"))
    assert code_of(path) == "unsupported_transfer_syntax"


def test_decoder_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    class Unavailable:
        is_available = False
        missing_dependencies = ("plugin X",)

    monkeypatch.setattr("triage_app.dicom.reader.get_decoder", lambda uid: Unavailable())
    with pytest.raises(errors.UnsupportedTransferSyntaxError, match="plugin X"):
        load("MR_small_RLE.dcm")


def test_directory_missing_path_and_fifo(tmp_path: Path) -> None:
    assert code_of(tmp_path) == "unreadable"
    assert code_of(tmp_path / "missing.dcm") == "unreadable"
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert code_of(fifo) == "unreadable"  # and must not block


def test_permission_denied_maps_to_unreadable(monkeypatch: pytest.MonkeyPatch) -> None:
    # Runs as root too (root ignores file modes): simulate the refusal at open().
    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(errors.UnreadableFileError, match="permission denied"):
        load_image(bundled("MR_small.dcm"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied(tmp_path: Path) -> None:
    path = tmp_path / "locked.dcm"
    path.write_bytes(bundled("MR_small.dcm").read_bytes())
    path.chmod(0)
    try:
        assert code_of(path) == "unreadable"
    finally:
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"Rows": 0}, "Rows"),
        ({"BitsStored": 20}, "BitsStored"),
        ({"BitsAllocated": 12}, "BitsAllocated"),
        ({"PixelRepresentation": 2}, "PixelRepresentation"),
        ({"SamplesPerPixel": 3}, "SamplesPerPixel"),
        ({"NumberOfFrames": "0"}, "NumberOfFrames"),
        ({"PhotometricInterpretation": None}, "PhotometricInterpretation"),
        ({"Columns": None}, "Columns"),
        ({"RescaleSlope": "0"}, "RescaleSlope"),
    ],
)
def test_impossible_or_missing_attributes(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    ds = synthetic(ramp())
    for keyword, value in change.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    path = tmp_path / "bad.dcm"
    ds.save_as(path)  # not enforce_file_format: the point is a broken header
    with pytest.raises(errors.InvalidDicomError, match=message):
        load_image(path)


def test_two_pixel_data_elements(tmp_path: Path) -> None:
    ds = synthetic(ramp())
    ds.FloatPixelData = ramp().astype(np.float32).tobytes()
    with pytest.raises(errors.InvalidDicomError, match="more than one pixel data"):
        load_image(save(ds, tmp_path / "two.dcm"))


def test_float_pixel_data(tmp_path: Path) -> None:
    values = np.linspace(-1.5, 2.5, 12 * 16, dtype=np.float32).reshape(16, 12)
    ds = synthetic(ramp())
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = 32
    ds.FloatPixelData = values.tobytes()
    image = load_image(save(ds, tmp_path / "float.dcm"))
    assert image.stored.dtype == np.float32
    np.testing.assert_array_equal(image.stored, values)


@pytest.mark.parametrize("photometric", ["HSV", "ARGB", "CMYK", "XYZ"])
def test_unsupported_photometric(tmp_path: Path, photometric: str) -> None:
    ds = synthetic(ramp())
    ds.PhotometricInterpretation = photometric
    assert code_of(save(ds, tmp_path / "p.dcm")) == "unsupported_photometric"


def test_palette_without_lookup_table_is_refused(tmp_path: Path) -> None:
    ds = synthetic(ramp(dtype="uint8"), bits_stored=8)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    assert code_of(save(ds, tmp_path / "p.dcm")) == "unsupported_photometric"


def test_pixel_data_shorter_than_the_image(tmp_path: Path) -> None:
    ds = pydicom.dcmread(bundled("MR_small.dcm"))
    ds.PixelData = ds.PixelData[:-64]  # consistent element, too few pixels
    assert code_of(save(ds, tmp_path / "short.dcm")) == "corrupt_pixel_data"


def test_more_frames_declared_than_present(tmp_path: Path) -> None:
    ds = synthetic(ramp())
    ds.NumberOfFrames = 5
    assert code_of(save(ds, tmp_path / "frames.dcm")) == "corrupt_pixel_data"


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm"])
def test_garbage_codestream(tmp_path: Path, name: str) -> None:
    ds = pydicom.dcmread(bundled(name))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    if name.endswith("RLE.dcm"):
        bad = frame[:8] + (10**6).to_bytes(4, "little") + frame[12:]  # segment 2 out of range
    else:
        bad = frame[:4] + bytes(len(frame) - 4)  # SOI/SOC marker, then nothing valid
    ds.PixelData = encapsulate([bad])
    assert code_of(save(ds, tmp_path / "garbage.dcm")) == "corrupt_pixel_data"


def _rle_declaring(rows: int, columns: int, photometric: str) -> Dataset:
    """An RLE file of a few hundred bytes whose header declares ``rows`` x ``columns``."""
    samples = 3 if photometric == "RGB" else 1
    ds = synthetic(ramp(), Rows=rows, Columns=columns, PhotometricInterpretation=photometric)
    ds.SamplesPerPixel = samples
    if samples == 3:
        ds.PlanarConfiguration = 1
    segment = b"\x81\x00" * 4
    count = 2 * samples
    offsets = [64 + i * len(segment) for i in range(count)]
    header = struct.pack("<16I", count, *offsets, *[0] * (15 - count))
    ds.PixelData = encapsulate([header + segment * count])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = RLELossless
    return ds


@pytest.mark.parametrize(
    ("rows", "columns", "photometric"),
    [
        (32768, 32768, "MONOCHROME2"),  # 2 GiB: malloc failed and the process aborted
        (65535, 65535, "RGB"),  # 26 GB: MemoryError
        (16385, 8, "MONOCHROME2"),  # small, but wider than any image this app is for
        (16384, 16384, "RGB"),  # 1.5 GiB
    ],
)
def test_a_frame_too_large_to_decode_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows: int, columns: int, photometric: str
) -> None:
    def never(uid: object) -> None:
        raise AssertionError("a decoder was asked")

    path = save(_rle_declaring(rows, columns, photometric), tmp_path / "bomb.dcm")
    assert path.stat().st_size < 4096
    monkeypatch.setattr("triage_app.dicom.reader.get_decoder", never)
    with pytest.raises(errors.UnprocessableImageError, match="too large to decode") as caught:
        load_image(path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("rows", "columns", "samples", "bits", "fits"),
    [
        (16384, 16384, 1, 16, True),
        (16384, 16384, 1, 32, True),  # exactly 1 GiB
        (16384, 16384, 1, 64, False),
        (16384, 16384, 3, 8, True),
        (16384, 16384, 3, 16, False),
        (16385, 1, 1, 1, False),
        (1, 16385, 1, 8, False),
    ],
)
def test_decoding_limits(rows: int, columns: int, samples: int, bits: int, fits: bool) -> None:
    assert fits_decoding_limits(rows, columns, samples, bits) is fits


def test_bit_flips_never_escape_as_other_exceptions() -> None:
    data = bundled("MR_small_RLE.dcm").read_bytes()
    rng = np.random.default_rng(7)
    outcomes = set()
    for _ in range(300):
        flipped = bytearray(data)
        position = int(rng.integers(len(flipped)))
        flipped[position] ^= 1 << int(rng.integers(8))
        try:
            load_image(bytes(flipped))
            outcomes.add("ok")
        except InputError as exc:
            outcomes.add(exc.code)
    assert outcomes <= KNOWN_CODES | {"ok"}
    assert "ok" in outcomes


# --- No PHI in messages or logs ----------------------------------------------------------------


def test_messages_and_logs_never_quote_patient_identifiers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, pydicom's included
    broken = []
    for keyword, value in [("Rows", 0), ("PhotometricInterpretation", "HSV"), ("Modality", "CT")]:
        ds = synthetic(ramp())
        with pydicom.config.disable_value_validation():
            # Invalid values that pydicom's validation would quote in a warning and a log record
            # (new elements: an existing one keeps the validation mode it was created with).
            del ds.SOPInstanceUID
            ds.SOPInstanceUID = f"1.2.{PATIENT_ID}"
            ds.BodyPartExamined = f"{PATIENT_NAME} chest, far longer than a CS value may be"
            setattr(ds, keyword, value)
            ds.save_as(tmp_path / f"{keyword}.dcm")
        broken.append(tmp_path / f"{keyword}.dcm")
    caplog.clear()  # only what reading logs counts
    data = broken[-1].read_bytes()
    messages = []
    sources: list[Path | bytes] = [*broken, data[: len(data) - 10], data[:400]]
    for source in sources:
        try:
            load_image(source)
        except InputError as exc:
            messages.append(str(exc))
    assert len(messages) == 4  # everything but the valid "Modality" file
    assert load_image(broken[-1]).info.body_part.startswith("DOE^JANE")  # values still read
    logged = [record.getMessage() for record in caplog.records]
    for text in messages + logged:
        assert PATIENT_NAME.split("^")[0] not in text
        assert PATIENT_ID not in text


def test_reader_warnings_do_not_escape() -> None:
    # badVR.dcm makes pydicom warn; the suite runs with warnings as errors, so a leak would fail.
    with pytest.raises(errors.InvalidDicomError):
        load("badVR.dcm")
    assert load("SC_rgb_jpeg.dcm").stored.shape == (256, 256)  # pydicom warns about its VR
