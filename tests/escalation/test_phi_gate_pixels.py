"""The PHI gate searches everything in the pixel data that is not the image.

The image itself is not searched (any short string turns up in pixel values by chance), but
JPEG and JPEG 2000 marker segments, bytes after a codestream and bytes after the last native
frame are: identifiers hide there. Each leak is planted into a clean de-identified payload, as
an engine bug would leave it; the gate must find it on its own.
"""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import MPEG2MPML, JPEG2000Lossless, RLELossless

from tests.dcmtk import executable
from tests.helpers import phantom_dataset
from triage_app.dicom.deidentify import Deidentifier
from triage_app.dicom.deidentify.files import encode
from triage_app.dicom.reader import read_dataset
from triage_app.escalation.phi_gate import IdentifyingValues, audit_payload

SECRET = b"g" * 32
NAME = "DOE^JOHN"
PATIENT_ID = "MRN4711"
BIRTH_DATE = "19800215"
PLANTED = f"Patient {NAME} {PATIENT_ID} DOB {BIRTH_DATE}".encode()
ALL_THREE = ("PatientBirthDate", "PatientID", "PatientName")
SIDECAR = json.dumps({"case_id": "0" * 32, "decision": "escalate"}).encode()


def _original() -> Dataset:
    ds = phantom_dataset(7, 0)
    ds.PatientName = NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = BIRTH_DATE
    return ds


def _deidentified(ds: Dataset) -> tuple[Dataset, IdentifyingValues]:
    original = IdentifyingValues.capture(ds)
    Deidentifier(SECRET).deidentify(ds)
    return ds, original


def _with_frame(ds: Dataset, frame: bytes) -> bytes:
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].is_undefined_length = True
    return encode(ds)


def _frame(ds: Dataset) -> bytes:
    return next(generate_frames(ds.PixelData, number_of_frames=1))


@pytest.fixture(scope="module")
def jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gate-jpeg")
    source, target = folder / "plain.dcm", folder / "jpeg.dcm"
    _original().save_as(source, enforce_file_format=True)
    subprocess.run(
        [executable("dcmcjpeg"), str(source), str(target)], check=True, capture_output=True
    )
    return target


def test_a_clean_jpeg_payload_passes(jpeg: Path) -> None:
    ds, original = _deidentified(read_dataset(jpeg))
    assert audit_payload(encode(ds), SIDECAR, original) == ()


@pytest.mark.parametrize(
    "segment",
    [b"\xff\xfe", b"\xff\xe1", b"\xff\xed"],
    ids=["COM", "APP1", "APP13"],
)
def test_identifiers_in_a_jpeg_marker_segment_are_found(jpeg: Path, segment: bytes) -> None:
    ds, original = _deidentified(read_dataset(jpeg))
    frame = _frame(ds)
    planted = frame[:2] + segment + (len(PLANTED) + 2).to_bytes(2, "big") + PLANTED + frame[2:]
    assert audit_payload(_with_frame(ds, planted), SIDECAR, original) == ALL_THREE


def test_identifiers_after_the_end_of_a_jpeg_frame_are_found(jpeg: Path) -> None:
    ds, original = _deidentified(read_dataset(jpeg))
    payload = _with_frame(ds, _frame(ds).rstrip(b"\x00") + PLANTED)
    assert audit_payload(payload, SIDECAR, original) == ALL_THREE


def test_identifiers_in_a_jpeg_2000_comment_are_found() -> None:
    ds, original = _deidentified(_original())
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    frame = _frame(ds)
    siz_end = 4 + int.from_bytes(frame[4:6], "big")
    com = b"\xff\x64" + (len(PLANTED) + 4).to_bytes(2, "big") + b"\x00\x01" + PLANTED
    assert audit_payload(_with_frame(ds, frame), SIDECAR, original) == ()
    crafted = frame[:siz_end] + com + frame[siz_end:]
    assert audit_payload(_with_frame(ds, crafted), SIDECAR, original) == ALL_THREE


def test_identifiers_after_the_last_native_frame_are_found() -> None:
    ds, original = _deidentified(_original())
    ds.PixelData = ds.PixelData + PLANTED + b"\x00" * (len(PLANTED) % 2)
    assert audit_payload(encode(ds), SIDECAR, original) == ALL_THREE


def test_encapsulated_data_the_gate_cannot_parse_is_searched_whole() -> None:
    ds, original = _deidentified(_original())
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + PLANTED + b"\x00" * (len(PLANTED) % 2)])
    ds["PixelData"].is_undefined_length = True
    assert audit_payload(encode(ds), SIDECAR, original) == ALL_THREE


def test_the_image_in_a_jpeg_frame_is_not_searched(jpeg: Path) -> None:
    """The entropy-coded data is the image: a chance match there is no leak."""
    ds, original = _deidentified(read_dataset(jpeg))
    frame = _frame(ds)
    scan = frame.index(b"\xff\xda")
    data_start = scan + 2 + int.from_bytes(frame[scan + 2 : scan + 4], "big")
    # Bytes of entropy-coded data as they would decode (no 0xFF in the planted text).
    crafted = frame[: data_start + 10] + PLANTED + frame[data_start + 10 + len(PLANTED) :]
    assert audit_payload(_with_frame(ds, crafted), SIDECAR, original) == ()


def _rle(ds: Dataset) -> Dataset:
    ds.compress(RLELossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    return ds


def test_the_image_in_an_rle_frame_is_not_searched() -> None:
    """Pixel values that happen to spell the name are image, not a leak."""
    ds, original = _deidentified(_original())
    name = f" {NAME} ".encode()  # no letter twice in a row: one literal run
    pixels = ds.pixel_array.copy()
    pixels[0, : len(name)] = np.frombuffer(name, dtype=np.uint8)
    ds.PixelData = pixels.tobytes()
    payload = encode(_rle(ds))
    assert name in payload  # the literal run of the low byte plane spells it
    assert audit_payload(payload, SIDECAR, original) == ()


def test_identifiers_after_the_runs_of_an_rle_segment_are_found() -> None:
    ds, original = _deidentified(_original())
    frame = _frame(_rle(ds))
    assert audit_payload(_with_frame(ds, frame), SIDECAR, original) == ()
    assert audit_payload(_with_frame(ds, frame + PLANTED), SIDECAR, original) == ALL_THREE


def test_an_rle_segment_the_decoder_cannot_take_is_searched_not_a_crash() -> None:
    """A segment of one zero byte, retried without it, made the Rust decoder panic (a
    BaseException) and took the whole batch down; now it is residue, searched like the rest."""
    ds, original = _deidentified(_original())
    rle = _rle(ds)
    # Two segments, the first one byte long (a frame's last segment is padded to even length).
    header = struct.pack("<16I", 2, 64, 65, *([0] * 13))
    assert audit_payload(_with_frame(rle, header + b"\x00\x00"), SIDECAR, original) == ()
    planted = _with_frame(rle, header + b"\x00\x00" + PLANTED)
    assert audit_payload(planted, SIDECAR, original) == ALL_THREE
