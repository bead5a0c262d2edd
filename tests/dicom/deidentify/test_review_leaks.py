"""The de-identification review's crafted inputs, end to end through the pipeline.

Each input hides the patient (or someone else) where an earlier engine let it through to the
escalation payload: burned-in text in a dental panoramic, a JPEG comment, bytes after the pixel
data, an embedded overlay, attributes the Annex E table does not name, the file meta, an overlay
bitmap under Clean Graphics, free text under the Clean options. Every case is escalated (the
thresholds leave every score uncertain) and must either be blocked or leave nothing behind in
the payload that would go to the central server.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from tests.dcmtk import executable
from tests.helpers import BUNDLE, phantom_dataset
from triage_app.dicom.deidentify import DeidConfig, ProfileOption
from triage_app.dicom.reader import quiet_pydicom
from triage_app.escalation.envelope import Payload
from triage_app.model.manifest import Thresholds
from triage_app.pipeline import PipelineConfig, TriagePipeline
from triage_app.policy import ActiveThresholds
from triage_app.results import CaseResult

SECRET = b"p" * 32
NAME, PATIENT_ID, ACCESSION, BIRTH_DATE = "DOE^JOHN", "MRN4711", "ACC99887766", "19800215"
EVERYTHING_UNCERTAIN = ActiveThresholds(Thresholds(0.0, 1.0), "settings")


def _pipeline(*options: ProfileOption) -> TriagePipeline:
    deid = DeidConfig(options=frozenset(options))
    return TriagePipeline(
        PipelineConfig(BUNDLE, site_secret=SECRET, thresholds=EVERYTHING_UNCERTAIN, deid=deid)
    )


@pytest.fixture(scope="module")
def pipeline() -> TriagePipeline:
    return _pipeline()


def _case() -> Dataset:
    ds = phantom_dataset(61, 1)
    ds.PatientName = NAME
    ds.PatientID = PATIENT_ID
    ds.AccessionNumber = ACCESSION
    ds.PatientBirthDate = BIRTH_DATE
    return ds


def _run(pipeline: TriagePipeline, source: Dataset | bytes, folder: Path) -> CaseResult:
    path = folder / "case.dcm"
    if isinstance(source, bytes):
        path.write_bytes(source)
    else:
        source.save_as(path, enforce_file_format=True)
    result = pipeline.run(path)
    assert isinstance(result, CaseResult), result
    assert result.decision == "escalate"
    return result


def _sent(result: CaseResult) -> bytes:
    """The de-identified file the held case would send; fails if the case was blocked."""
    assert result.escalation is not None
    assert result.escalation.state == "held", result.escalation
    assert result.payload is not None
    return Payload.from_bytes(result.payload).dicom


def _read(data: bytes) -> Dataset:
    with quiet_pydicom():
        return dcmread(io.BytesIO(data))


def _absent(data: bytes, *values: str | bytes) -> None:
    lowered = data.lower()
    for value in values:
        needle = value if isinstance(value, bytes) else value.encode()
        assert needle.lower() not in lowered, value


# --- 1. burned-in text in a kind of image the risk check did not know ---------------------------


def test_a_dental_panoramic_with_text_and_no_annotation_is_blocked(
    pipeline: TriagePipeline, tmp_path: Path
) -> None:
    ds = _case()
    ds.Modality, ds.BodyPartExamined = "PX", "JAW"
    pixels = ds.pixel_array.copy()
    text = np.zeros(pixels.shape, np.uint8)
    cv2.putText(text, "DOE JOHN 15.02.1980", (5, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 255, 2)
    pixels[text > 0] = pixels.min()
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    del ds.BurnedInAnnotation

    result = _run(pipeline, ds, tmp_path)

    assert result.escalation is not None
    assert (result.escalation.state, result.escalation.reason) == ("blocked", "burned_in_risk")
    assert result.payload is None
    assert result.deidentification["burned_in_reasons"] == ["burned_in_annotation_missing"]


# --- 2. hidden identifiers in the pixel data ----------------------------------------------------


def test_a_jpeg_comment_in_the_frame_is_not_sent(pipeline: TriagePipeline, tmp_path: Path) -> None:
    source, target = tmp_path / "plain.dcm", tmp_path / "jpeg.dcm"
    _case().save_as(source, enforce_file_format=True)
    subprocess.run(
        [executable("dcmcjpeg"), str(source), str(target)], check=True, capture_output=True
    )
    with quiet_pydicom():
        ds = dcmread(target)
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    comment = f"Patient {NAME} {PATIENT_ID} DOB {BIRTH_DATE} ".encode()
    segment = b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment
    ds.PixelData = encapsulate([frame[:2] + segment + frame[2:]])
    ds["PixelData"].is_undefined_length = True

    sent = _sent(_run(pipeline, ds, tmp_path))

    _absent(sent, NAME, PATIENT_ID, BIRTH_DATE)
    with quiet_pydicom():
        assert np.array_equal(_read(sent).pixel_array, dcmread(target).pixel_array)


def test_bytes_after_the_pixel_data_are_not_sent(pipeline: TriagePipeline, tmp_path: Path) -> None:
    ds = _case()
    tail = f"{NAME} {PATIENT_ID} {BIRTH_DATE}".encode()
    ds.PixelData = ds.PixelData + tail + b"\x00" * (len(tail) % 2)

    sent = _sent(_run(pipeline, ds, tmp_path))

    _absent(sent, NAME, PATIENT_ID, BIRTH_DATE)


# --- 3. an overlay embedded in the unused high bits ----------------------------------------------


def test_an_embedded_overlay_in_the_high_bits_is_not_sent(
    pipeline: TriagePipeline, tmp_path: Path
) -> None:
    ds = _case()
    assert ds.BitsStored < 16
    pixels = ds.pixel_array.astype(np.uint16)
    marked = pixels.copy()
    marked[10:30, 10:200] |= 0x8000  # the overlay bitmap: stands for a rendered banner
    ds.PixelData = marked.tobytes()
    for element, vr, value in (
        (0x0010, "US", ds.Rows),
        (0x0011, "US", ds.Columns),
        (0x0040, "CS", "G"),
        (0x0050, "SS", [1, 1]),
        (0x0100, "US", 16),  # Overlay Bits Allocated: the overlay is in the pixel data
        (0x0102, "US", 15),  # Overlay Bit Position
        (0x0022, "LO", "patient banner"),
    ):
        ds.add_new(0x60000000 | element, vr, value)

    sent = _read(_sent(_run(pipeline, ds, tmp_path)))

    raw = np.frombuffer(sent.PixelData, dtype="<u2").reshape(pixels.shape)
    assert not np.any(raw >> 15)
    assert np.array_equal(raw, pixels)
    assert not [element.tag for element in sent if element.tag.group == 0x6000]


# --- 4. what the Annex E table does not name ----------------------------------------------------


def _item(**attributes: object) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def test_issuer_and_order_sequences_are_not_sent(pipeline: TriagePipeline, tmp_path: Path) -> None:
    ds = _case()
    ds.IssuerOfPatientID = "STMARYS"
    qualifiers = _item(
        UniversalEntityID="2.16.840.1.113883.3.72.5.9.1",
        UniversalEntityIDType="ISO",
        IdentifierTypeCode="MR",
    )
    qualifiers.AssigningFacilitySequence = Sequence(
        [_item(LocalNamespaceEntityID="St Mary's Hospital Springfield")]
    )
    ds.IssuerOfPatientIDQualifiersSequence = Sequence([qualifiers])
    issuer = _item(LocalNamespaceEntityID="STMARYS-RIS")
    issuer.UniversalEntityID = "2.16.840.1.113883.3.72.5.9.2"
    ds.IssuerOfAccessionNumberSequence = Sequence([issuer])
    ds.OrderPlacerIdentifierSequence = Sequence([_item(LocalNamespaceEntityID="STMARYS-ORDERS")])

    sent = _sent(_run(pipeline, ds, tmp_path))

    _absent(sent, "STMARYS", "St Mary", "2.16.840.1.113883.3.72.5.9")


def test_retired_order_numbers_other_names_and_uids_are_not_sent(
    pipeline: TriagePipeline, tmp_path: Path
) -> None:
    ds = _case()
    ds.add_new(0x00401006, "SH", "PLC-778899")  # Placer Order Number / Procedure (retired)
    ds.add_new(0x00401007, "SH", "FIL-112233")  # Filler Order Number / Procedure (retired)
    ds.add_new(0x00402006, "SH", "PLCI-4455")  # Placer Order Number / ISR (retired)
    ds.add_new(0x00402007, "SH", "FILI-6677")  # Filler Order Number / ISR (retired)
    ds.add_new(0x0040A067, "PN", "AUTHOR^ALICE")  # Document Author (Trial)
    ds.add_new(0x00142006, "PN", "EVALUATOR^BOB")  # Evaluator Name
    ds.add_new(0x00200242, "UI", "1.2.826.0.1.3680043.8.498.4242")  # Concatenation Source
    ds.add_new(0x00081167, "UI", "1.2.826.0.1.3680043.8.498.5151")  # Multi-frame Source

    sent = _sent(_run(pipeline, ds, tmp_path))

    _absent(sent, "778899", "112233", "4455", "6677", "ALICE", "BOB", "498.4242", "498.5151")


def test_urls_and_file_ids_are_not_sent(pipeline: TriagePipeline, tmp_path: Path) -> None:
    ds = _case()
    ds.RetrieveURL = "https://pacs.stmarys-hospital.example/wado/studies/1.2.840.99.1"
    ds.add_new(0x00041500, "CS", ["SMITH_ANNA", "IMG0001"])  # Referenced File ID

    sent = _sent(_run(pipeline, ds, tmp_path))

    _absent(sent, "stmarys", "SMITH_ANNA")


def _un_element(tag: int, item: Dataset) -> bytes:
    """A defined-length explicit VR UN element holding ``item`` as an implicit VR sequence."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, item)
    body = struct.pack("<HHI", 0xFFFE, 0xE000, len(buffer.getvalue())) + buffer.getvalue()
    return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, b"UN", 0, len(body)) + body


def test_nested_values_in_an_unknown_un_element_are_not_sent(
    pipeline: TriagePipeline, tmp_path: Path
) -> None:
    item = _item(CodeValue="T-D3000", CodingSchemeDesignator="SRT", CodeMeaning="Chest")
    item.add_new(0x00100010, "PN", "OTHERNAME^PERSON")
    item.add_new(0x00080090, "PN", "REFDOCNAME^X")
    item.add_new(0x00081155, "UI", "1.2.3.4.999.777")
    item.add_new(0x00321032, "PN", "REQPHYS^Y")
    item.add_new(0x00080020, "DA", "20210304")
    buffer = io.BytesIO()
    _case().save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    pixels = data.index(struct.pack("<HH", 0x7FE0, 0x0010) + b"OW")
    crafted = data[:pixels] + _un_element(0x00540999, item) + data[pixels:]

    sent = _sent(_run(pipeline, crafted, tmp_path))

    _absent(sent, "OTHERNAME", "REFDOCNAME", "1.2.3.4.999.777", "REQPHYS", "20210304")


def test_the_file_meta_sends_only_what_a_reader_needs(
    pipeline: TriagePipeline, tmp_path: Path
) -> None:
    buffer = io.BytesIO()
    _case().save_as(buffer, enforce_file_format=True)
    ds = _read(buffer.getvalue())
    ds.file_meta.add_new(0x00020033, "UI", "1.2.826.0.1.3680043.8.498.7777")
    ds.file_meta.add_new(0x00020035, "OB", b"ws-radiology-07.stmarys.local")
    ds.file_meta.add_new(0x00020099, "LO", "host=ws-radiology-07 user=jdoe")
    crafted = io.BytesIO()
    ds.save_as(crafted, enforce_file_format=False)

    sent = _sent(_run(pipeline, crafted.getvalue(), tmp_path))

    _absent(sent, "498.7777", "ws-radiology-07", "jdoe")
    assert {int(element.tag) for element in _read(sent).file_meta} <= {
        0x00020000,
        0x00020001,
        0x00020002,
        0x00020003,
        0x00020010,
        0x00020012,
        0x00020013,
    }


def test_the_reviewers_sink_leaves_nothing_behind(pipeline: TriagePipeline, tmp_path: Path) -> None:
    """What was left of the review's catch-all input: meta, unknown tags, unlisted UIDs."""
    ds = _case()
    ds.add_new(0x00540999, "LO", "UNKNOWNEVENSECRET")
    ds.add_new(0x00200242, "UI", "1.2.3.4.5.6.7.8.4242")
    ds.add_new(0x00081167, "UI", "1.2.3.4.5.6.7.8.5151")
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    read = _read(buffer.getvalue())
    read.file_meta.add_new(0x00020099, "LO", "METAUNKNOWNSECRET")
    read.preamble = b"PREAMBLESECRET".ljust(128, b"\0")
    crafted = io.BytesIO()
    read.save_as(crafted, enforce_file_format=False)

    result = _run(pipeline, crafted.getvalue(), tmp_path)

    sent = _sent(result)
    _absent(sent, "SECRET", "1.2.3.4.5.6.7.8")
    assert b"SECRET" not in json.dumps(result.payload_json()).encode()


# --- 6. Clean Graphics and overlay bitmaps -------------------------------------------------------


def test_an_overlay_bitmap_is_not_sent_under_clean_graphics(tmp_path: Path) -> None:
    ds = _case()
    bits = np.zeros((ds.Rows, ds.Columns), dtype=np.uint8)
    bits[5:20, 5:120] = 1  # stands for a rendered name banner
    packed = np.packbits(bits.flatten(), bitorder="little").tobytes()
    for element, vr, value in (
        (0x0010, "US", ds.Rows),
        (0x0011, "US", ds.Columns),
        (0x0040, "CS", "G"),
        (0x0050, "SS", [1, 1]),
        (0x0100, "US", 1),
        (0x0102, "US", 0),
        (0x0022, "LO", "DOE JOHN banner"),
        (0x1500, "LO", "Name DOE^JOHN"),
        (0x3000, "OW", packed + b"\x00" * (len(packed) % 2)),
    ):
        ds.add_new(0x60000000 | element, vr, value)

    sent = _read(_sent(_run(_pipeline(ProfileOption.CLEAN_GRAPHICS), ds, tmp_path)))

    assert not [element.tag for element in sent if element.tag.group == 0x6000]
    codes = [item.CodeValue for item in sent.DeidentificationMethodCodeSequence]
    assert "113103" in codes


# --- 7. the Clean options clean by pattern, not only the patient's own words ----------------


def _content(text: str) -> Dataset:
    return _item(ValueType="TEXT", RelationshipType="CONTAINS", TextValue=text)


def test_the_clean_options_clean_whatever_identifies_anyone(tmp_path: Path) -> None:
    ds = _case()
    ds.PatientName = "MÜLLER^JÜRGEN"
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageComments = (
        "Pt Mueller, 12 Baker Street, tel 555-0199, ref Dr House, MRN-4711, born 15th Feb 1980"
    )
    ds.StudyDescription = "CXR for MULLER JURGEN"
    ds.ContentSequence = Sequence(
        [
            _content("Wife Anna Mueller called 555-0199"),
            _content("Previous exam on 2021-03-04 at St Elsewhere"),
        ]
    )
    clean = _pipeline(ProfileOption.CLEAN_DESCRIPTORS, ProfileOption.CLEAN_STRUCTURED_CONTENT)

    sent = _read(_sent(_run(clean, ds, tmp_path)))

    texts = [
        str(sent.get("ImageComments", "")),
        str(sent.get("StudyDescription", "")),
        *(str(item.get("TextValue", "")) for item in sent.get("ContentSequence", [])),
    ]
    for gone in ("Mueller", "MULLER", "JURGEN", "Baker", "555-0199", "House", "4711", "1980"):
        assert not [text for text in texts if gone.lower() in text.lower()], gone
    assert not [text for text in texts if "2021" in text]
    assert "CXR" in texts[1]
    assert any("Previous exam" in text for text in texts)
