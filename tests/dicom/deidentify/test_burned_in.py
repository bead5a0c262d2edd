"""Burned-in text: which images are at risk, the site's pixel-clean rules, and masking."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    UltrasoundImageStorage,
)

from tests.dicom.conftest import bundled, ramp, strip_file_meta, synthetic
from triage_app.dicom.deidentify import DeidConfig, Deidentifier
from triage_app.dicom.deidentify.burned_in import (
    PixelCleanRule,
    apply_rule,
    burned_in_reasons,
    find_rule,
    load_pixel_clean_rules,
)
from triage_app.dicom.pseudonym import pseudonymous_uid
from triage_app.dicom.reader import quiet_pydicom, read_dataset
from triage_app.errors import ConfigError

SECRET = bytes(range(32))
BOXES = ((1, 2, 3, 4), (8, 0, 2, 2))  # x, y, width, height


def _header(**attributes: Any) -> Dataset:
    ds = Dataset()
    with quiet_pydicom():  # values as devices write them, not always valid ("yes ")
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
    return ds


def _masked(pixels: npt.NDArray[Any], boxes: Any, *, frames: int = 1) -> npt.NDArray[Any]:
    """What the pixels must be after masking: the boxes zero in every frame, nothing else."""
    expected = pixels.copy()
    view = expected if frames > 1 else expected[np.newaxis, ...]
    for x, y, width, height in boxes:
        view[:, y : y + height, x : x + width, ...] = 0
    return expected


def _round_trip(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return dcmread(io.BytesIO(buffer.getvalue()))


def _rule(boxes: tuple[tuple[int, int, int, int], ...] = BOXES, **match: Any) -> PixelCleanRule:
    return PixelCleanRule(name="test banner", rectangles=boxes, **(match or {"modality": "US"}))


# --- which images are at risk ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attributes", "reason"),
    [
        ({"BurnedInAnnotation": "YES"}, "burned_in_annotation"),
        ({"BurnedInAnnotation": "yes "}, "burned_in_annotation"),
        ({"BurnedInAnnotation": "MAYBE"}, "burned_in_annotation"),  # anything but NO
        ({"Modality": "US"}, "modality"),
        ({"Modality": "XA"}, "modality"),
        ({"Modality": "RF"}, "modality"),
        ({"Modality": "ES"}, "modality"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, "sop_class"),  # secondary capture
        ({"SOPClassUID": MultiFrameGrayscaleByteSecondaryCaptureImageStorage}, "sop_class"),
        ({"SOPClassUID": UltrasoundImageStorage}, "sop_class"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.12.1"}, "sop_class"),  # X-ray angiography
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.104.1"}, "sop_class"),  # encapsulated PDF
        ({"ConversionType": "WSD"}, "conversion_type"),
        ({"ImageType": ["DERIVED", "SECONDARY", "SCREEN SAVE"]}, "screen_capture"),
        ({"ImageType": "SCREEN SAVE"}, "screen_capture"),  # single-valued, as some write it
    ],
)
def test_reasons_for_images_at_risk(attributes: dict[str, Any], reason: str) -> None:
    base = {"Modality": "CT", "SOPClassUID": CTImageStorage, "BurnedInAnnotation": "NO"}
    assert burned_in_reasons(_header(**(base | attributes))) == (reason,)


def test_every_reason_is_reported() -> None:
    ds = _header(
        BurnedInAnnotation="YES",
        Modality="US",
        SOPClassUID="1.2.840.10008.5.1.4.1.1.7",
        ConversionType="WSD",
        ImageType=["DERIVED", "SECONDARY", "SCREEN SAVE"],
    )
    assert burned_in_reasons(ds) == (
        "burned_in_annotation",
        "modality",
        "sop_class",
        "conversion_type",
        "screen_capture",
    )


@pytest.mark.parametrize("annotation", ["NO", None])
@pytest.mark.parametrize(
    ("modality", "sop_class"),
    [("CT", CTImageStorage), ("DX", DigitalXRayImageStorageForPresentation)],
)
def test_no_reason_for_ct_or_dx_without_annotation(
    annotation: str | None, modality: str, sop_class: str
) -> None:
    ds = _header(Modality=modality, SOPClassUID=sop_class, ImageType=["ORIGINAL", "PRIMARY"])
    if annotation is not None:
        ds.BurnedInAnnotation = annotation
    assert burned_in_reasons(ds) == ()


@pytest.mark.parametrize(
    "sop_class",
    [
        "1.2.840.10008.5.1.4.1.1.77.1.6",  # VL whole slide microscopy: not secondary capture
        "1.2.840.10008.5.1.4.1.1.78.1",  # lensometry measurements
        "1.2.840.10008.5.1.4.1.1.66",  # raw data
    ],
)
def test_sop_classes_are_matched_by_whole_uid_components(sop_class: str) -> None:
    header = _header(Modality="OT", SOPClassUID=sop_class, BurnedInAnnotation="NO")
    assert burned_in_reasons(header) == ()


def test_an_empty_header_is_at_risk() -> None:
    """A header that says nothing about the image says nothing about its text either."""
    assert burned_in_reasons(Dataset()) == ("burned_in_annotation_missing",)


# Kinds the allow-list does not name (dental panoramic and intra-oral, mammography, other,
# visible light, nuclear medicine, PET, and no modality at all): silence is no answer.
NOT_ALLOW_LISTED = ["PX", "IO", "MG", "OT", "VL", "NM", "PT", "SR", ""]


@pytest.mark.parametrize("modality", NOT_ALLOW_LISTED)
def test_kinds_off_the_allow_list_without_annotation_are_at_risk(modality: str) -> None:
    header = _header(Modality=modality, ImageType=["ORIGINAL", "PRIMARY"])
    assert burned_in_reasons(header) == ("burned_in_annotation_missing",)
    header.BurnedInAnnotation = ""  # Type 2, empty: the same silence
    assert burned_in_reasons(header) == ("burned_in_annotation_missing",)


@pytest.mark.parametrize("modality", NOT_ALLOW_LISTED)
def test_kinds_off_the_allow_list_pass_when_they_say_no(modality: str) -> None:
    header = _header(Modality=modality, BurnedInAnnotation="NO")
    assert burned_in_reasons(header) == ()


@pytest.mark.parametrize("modality", ["CR", "DX", "cr "])
@pytest.mark.parametrize("image_type", [["ORIGINAL", "PRIMARY"], ["DERIVED", "PRIMARY"], None])
def test_chest_radiographs_pass_without_annotation(
    modality: str, image_type: list[str] | None
) -> None:
    header = _header(Modality=modality)
    if image_type is not None:
        header.ImageType = image_type
    assert burned_in_reasons(header) == ()


@pytest.mark.parametrize("modality", ["CT", "MR"])
@pytest.mark.parametrize(
    ("image_type", "at_risk"),
    [
        (["ORIGINAL", "PRIMARY", "AXIAL"], False),
        ("ORIGINAL", False),  # single-valued, as some write it
        (["DERIVED", "SECONDARY", "REFORMATTED"], True),  # reformats and 3D captures
        (["DERIVED", "SECONDARY", "DOSE_INFO"], True),  # a dose report screen
        (None, True),
    ],
)
def test_ct_and_mr_pass_without_annotation_only_as_acquired(
    modality: str, image_type: list[str] | str | None, at_risk: bool
) -> None:
    header = _header(Modality=modality)
    if image_type is not None:
        header.ImageType = image_type
    expected = ("burned_in_annotation_missing",) if at_risk else ()
    assert burned_in_reasons(header) == expected
    header.BurnedInAnnotation = "NO"
    assert burned_in_reasons(header) == ()


# --- rules -------------------------------------------------------------------------------------

GOOD_RULES = """
[[rule]]
name = "Acme US-3000 patient banner"
modality = "US"
manufacturer = "ACME"
model = "US-3000"
rows = 600
columns = 800
rectangles = [[0, 0, 800, 60], [700, 540, 100, 60]]

[[rule]]
name = "  Any screen capture 1024x768 "
rows = 768
columns = 1024
rectangles = [[0, 0, 1024, 32]]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pixel_clean.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_reads_good_rules(tmp_path: Path) -> None:
    rules = load_pixel_clean_rules(_write(tmp_path, GOOD_RULES))
    assert rules == (
        PixelCleanRule(
            name="Acme US-3000 patient banner",
            rectangles=((0, 0, 800, 60), (700, 540, 100, 60)),
            modality="US",
            manufacturer="ACME",
            model="US-3000",
            rows=600,
            columns=800,
        ),
        PixelCleanRule(
            name="Any screen capture 1024x768",
            rectangles=((0, 0, 1024, 32),),
            rows=768,
            columns=1024,
        ),
    )


def test_no_rules_file_means_no_rules(tmp_path: Path) -> None:
    assert load_pixel_clean_rules(None) == ()
    assert load_pixel_clean_rules(_write(tmp_path, "")) == ()


_NAMED = '[[rule]]\nname = "Bad one"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_NAMED + 'modality = "US"\n', r"rule 1 \(Bad one\): needs at least one rectangle"),
        (_NAMED + 'modality = "US"\nrectangles = []\n', r"\(Bad one\): needs at least one"),
        (_NAMED + 'modality = "US"\nrectangles = [[0, 0, 0, 5]]\n', r"\(Bad one\): a rectangle"),
        (_NAMED + 'modality = "US"\nrectangles = [[0, 0, 5]]\n', r"\(Bad one\): a rectangle"),
        (_NAMED + 'modality = "US"\nrectangles = [[-1, 0, 5, 5]]\n', r"\(Bad one\): a rect"),
        (_NAMED + 'modality = "US"\nrectangles = [[0.5, 0, 5, 5]]\n', r"\(Bad one\): a rect"),
        (_NAMED + 'modality = "US"\nrectangles = [[true, 0, 5, 5]]\n', r"\(Bad one\): a rect"),
        (_NAMED + "rectangles = [[0, 0, 5, 5]]\n", r"\(Bad one\): must name at least one of"),
        (_NAMED + "modality = 3\nrectangles = [[0, 0, 5, 5]]\n", r"\(Bad one\): modality must"),
        (_NAMED + 'rows = "600"\nrectangles = [[0, 0, 5, 5]]\n', r"\(Bad one\): rows must"),
        (_NAMED + "columns = true\nrectangles = [[0, 0, 5, 5]]\n", r"\(Bad one\): columns must"),
        (_NAMED + 'modalty = "US"\nrectangles = [[0, 0, 5, 5]]\n', r"rule 1: unknown key\(s\)"),
        ('[[rule]]\nmodality = "US"\nrectangles = [[0, 0, 5, 5]]\n', r"rule 1: needs a name"),
        ('[[rule]]\nname = " "\nmodality = "US"\n', r"rule 1: needs a name"),
        ('rule = "US"\n', r"expected only \[\[rule\]\] tables"),
        ("[settings]\nx = 1\n", r"expected only \[\[rule\]\] tables"),
        ("[[rule]\n", r"not valid TOML"),
    ],
)
def test_load_refuses_bad_rules_naming_the_rule(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as err:
        load_pixel_clean_rules(path)
    assert err.value.code == "config_invalid"
    assert str(path) in str(err.value)


def test_the_second_bad_rule_is_named_by_its_position(tmp_path: Path) -> None:
    text = GOOD_RULES + '\n[[rule]]\nname = "Third"\nmodality = "XA"\nrectangles = [[1, 1, 0, 1]]\n'
    with pytest.raises(ConfigError, match=r"rule 3 \(Third\): a rectangle"):
        load_pixel_clean_rules(_write(tmp_path, text))


def test_an_unreadable_rules_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the pixel-clean rules") as err:
        load_pixel_clean_rules(tmp_path / "missing.toml")
    assert err.value.code == "config_invalid"


def test_rules_match_case_insensitively_on_every_named_key() -> None:
    ds = synthetic(ramp(600, 800, "uint8"), Modality="US", Manufacturer="Acme ")
    ds.ManufacturerModelName = "us-3000"
    rule = PixelCleanRule("r", ((0, 0, 1, 1),), "us", "ACME", "US-3000", 600, 800)
    assert rule.matches(ds)
    assert not PixelCleanRule("r", ((0, 0, 1, 1),), "US", rows=601).matches(ds)
    assert not PixelCleanRule("r", ((0, 0, 1, 1),), "US", model="US-3001").matches(ds)
    assert not PixelCleanRule("r", ((0, 0, 1, 1),), "XA").matches(ds)
    other = PixelCleanRule("other", ((0, 0, 1, 1),), "XA")
    assert find_rule(ds, [other, rule]) is rule
    assert find_rule(ds, [other]) is None


def test_a_rule_never_matches_an_object_without_pixel_data() -> None:
    ds = _header(Modality="US", Rows=600, Columns=800)
    assert not PixelCleanRule("r", ((0, 0, 1, 1),), "US").matches(ds)


# --- masking -----------------------------------------------------------------------------------


def _check_masked(ds: Dataset, before: npt.NDArray[Any], boxes: Any = BOXES) -> None:
    uid = ds.SOPInstanceUID
    apply_rule(ds, _rule(boxes))
    assert ds.BurnedInAnnotation == "NO"
    assert ds.SOPInstanceUID == uid  # the pseudonym (and case id) must not change per run
    after = _round_trip(ds)
    assert after.SOPInstanceUID == uid
    assert after.pixel_array.shape == before.shape
    frames = int(ds.get("NumberOfFrames") or 1)
    np.testing.assert_array_equal(after.pixel_array, _masked(before, boxes, frames=frames))


def test_masks_a_mono_image() -> None:
    pixels = ramp(16, 12) + 1  # no zero anywhere: every masked pixel shows
    _check_masked(synthetic(pixels, Modality="US"), pixels)


def test_masks_every_frame_of_a_multi_frame_image() -> None:
    pixels = (np.arange(3 * 16 * 12, dtype=np.uint16) + 1).reshape(3, 16, 12)
    ds = synthetic(pixels, Modality="US")
    assert ds.NumberOfFrames == 3
    _check_masked(ds, pixels)


def test_masks_an_rgb_image() -> None:
    pixels = (np.arange(16 * 12 * 3) % 250 + 1).astype(np.uint8).reshape(16, 12, 3)
    _check_masked(synthetic(pixels, photometric="RGB", Modality="US"), pixels)


def test_masks_a_multi_frame_rgb_image() -> None:
    pixels = (np.arange(2 * 16 * 12 * 3) % 250 + 1).astype(np.uint8).reshape(2, 16, 12, 3)
    _check_masked(synthetic(pixels, photometric="RGB", Modality="US"), pixels)


def test_rectangles_beyond_the_image_are_clipped() -> None:
    pixels = ramp(16, 12) + 1
    _check_masked(synthetic(pixels, Modality="US"), pixels, ((10, 14, 50, 50),))


def test_planar_configuration_becomes_colour_by_pixel() -> None:
    pixels = (np.arange(8 * 6 * 3) % 250 + 1).astype(np.uint8).reshape(8, 6, 3)
    ds = synthetic(pixels, photometric="RGB", Modality="US")
    ds.PixelData = np.moveaxis(pixels, -1, 0).tobytes()  # colour-by-plane
    ds.PlanarConfiguration = 1
    np.testing.assert_array_equal(ds.pixel_array, pixels)
    _check_masked(ds, pixels)
    assert ds.PlanarConfiguration == 0


def test_masks_an_uncompressed_ybr_image_consistently() -> None:
    pixels = (np.arange(8 * 6 * 3) % 250 + 1).astype(np.uint8).reshape(8, 6, 3)
    ds = synthetic(pixels, photometric="RGB", Modality="US")
    ds.PhotometricInterpretation = "YBR_FULL"
    with quiet_pydicom():
        as_rgb = ds.pixel_array.copy()  # what any viewer shows
    apply_rule(ds, _rule())
    assert ds.PhotometricInterpretation == "RGB"
    np.testing.assert_array_equal(_round_trip(ds).pixel_array, _masked(as_rgb, BOXES))


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",  # RLE, 16-bit mono
        "SC_rgb_rle_2frame.dcm",  # RLE, RGB, two frames
        "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline, YBR_FULL_422
        "JPEG2000.dcm",
        "MR_small_bigendian.dcm",  # explicit VR big endian
    ],
)
def test_masks_pydicoms_encoded_images(name: str) -> None:
    with quiet_pydicom():
        ds = dcmread(bundled(name))
        before = ds.pixel_array.copy()  # the decoded image every viewer shows
    ds.Modality = "US"
    compressed = ds.file_meta.TransferSyntaxUID.is_compressed
    _check_masked(ds, before)
    if compressed:
        assert not ds.file_meta.TransferSyntaxUID.is_compressed


def test_masks_a_data_set_read_without_file_meta() -> None:
    pixels = ramp(16, 12) + 1
    ds = synthetic(pixels, Modality="US")
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    raw = read_dataset(strip_file_meta(buffer.getvalue()))
    assert "TransferSyntaxUID" not in getattr(raw, "file_meta", {})
    apply_rule(raw, _rule())
    assert raw.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    with quiet_pydicom():
        np.testing.assert_array_equal(raw.pixel_array, _masked(pixels, BOXES))


# --- through the engine ------------------------------------------------------------------------


def _covered() -> tuple[Dataset, npt.NDArray[Any]]:
    pixels = (np.arange(16 * 12 * 3) % 250 + 1).astype(np.uint8).reshape(16, 12, 3)
    ds = synthetic(pixels, photometric="RGB", Modality="US", BurnedInAnnotation="YES")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds, pixels


def test_a_covered_image_is_cleaned_and_marked_by_the_engine() -> None:
    ds, _ = _covered()
    report = Deidentifier(SECRET, DeidConfig(pixel_rules=(_rule(),))).deidentify(ds)
    assert report.pixel_rule == "test banner"
    assert report.burned_in_reasons[:2] == ("burned_in_annotation", "modality")
    assert not report.burned_in_risk
    assert report.to_json()["pixel_clean_rule"] == "test banner"
    assert ds.BurnedInAnnotation == "NO"
    codes = [
        (item.CodeValue, item.CodingSchemeDesignator)
        for item in ds.DeidentificationMethodCodeSequence
    ]
    assert ("113100", "DCM") in codes
    assert ("113101", "DCM") in codes


def test_an_uncovered_image_at_risk_is_reported_and_left_alone() -> None:
    ds, _ = _covered()
    rule = PixelCleanRule("elsewhere", BOXES, modality="XA")
    report = Deidentifier(SECRET, DeidConfig(pixel_rules=(rule,))).deidentify(ds)
    assert report.pixel_rule is None
    assert report.burned_in_risk
    assert ds.BurnedInAnnotation == "YES"  # the attribute is kept: the image still has text
    codes = [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]
    assert "113101" not in codes


def test_the_engine_keeps_the_masked_pixels() -> None:
    # The masked PixelData is a decoded element: the residual scrub must not search image bytes.
    ds, pixels = _covered()
    Deidentifier(SECRET, DeidConfig(pixel_rules=(_rule(),))).deidentify(ds)
    assert "PixelData" in ds
    np.testing.assert_array_equal(_round_trip(ds).pixel_array, _masked(pixels, BOXES))


def test_a_compressed_image_keeps_its_pseudonym_when_cleaned() -> None:
    # Decoding must not mint a new instance UID: the case id would change on every run.
    with quiet_pydicom():
        ds = dcmread(bundled("SC_rgb_rle_2frame.dcm"))
        before = ds.pixel_array.copy()
    ds.Modality = "US"
    original = ds.SOPInstanceUID
    report = Deidentifier(SECRET, DeidConfig(pixel_rules=(_rule(),))).deidentify(ds)
    assert report.pixel_rule == "test banner"
    assert report.sop_instance_uid == pseudonymous_uid(SECRET, original)
    assert ds.SOPInstanceUID == report.sop_instance_uid
    assert ds.file_meta.MediaStorageSOPInstanceUID == report.sop_instance_uid
    np.testing.assert_array_equal(_round_trip(ds).pixel_array, _masked(before, BOXES, frames=2))
