"""Helpers for the DICOM tests: pydicom's bundled test files and small synthetic images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-7734521"


def bundled(name: str) -> Path:
    """Path of a file bundled in pydicom's wheel (never downloaded)."""
    path = get_testdata_file(name, download=False)
    assert isinstance(path, str), f"pydicom test file {name} is not bundled"
    return Path(path)


def strip_file_meta(data: bytes) -> bytes:
    """The raw data set of a Part 10 file: no preamble, no 'DICM', no file meta."""
    assert data[128:132] == b"DICM"
    assert data[132:138] == b"\x02\x00\x00\x00UL"
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length :]


def synthetic(
    pixels: npt.NDArray[Any],
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    **attributes: Any,
) -> Dataset:
    """A minimal, valid image data set with patient identifiers (to check they never leak)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.Modality = "OT"
    bits = bits_stored if bits_stored is not None else pixels.dtype.itemsize * 8
    ds.set_pixel_data(pixels, photometric, bits, generate_instance_uid=False)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(rows: int = 16, columns: int = 12, dtype: str = "uint16") -> npt.NDArray[Any]:
    """A small image whose every pixel differs, so any mix-up of pixels shows."""
    return np.arange(rows * columns, dtype=dtype).reshape(rows, columns)


def decoded(ds: Dataset) -> npt.NDArray[Any] | None:
    """The pixels as a reader sees them (no colour conversion); None if they do not decode."""
    from pydicom.pixels.decoders.base import get_decoder

    from triage_app.dicom.reader import quiet_pydicom, transfer_syntax
    from triage_app.errors import InputError

    try:
        with quiet_pydicom():
            decoder = get_decoder(transfer_syntax(ds))
            array, _ = decoder.as_array(ds, as_rgb=False)  # type: ignore[arg-type]
    except (InputError, ValueError, RuntimeError, NotImplementedError, AttributeError, KeyError):
        return None
    return array


def same_image(before: Dataset, after: Dataset) -> bool:
    """Whether de-identification left the image as it was: the same bytes, or bytes that
    decode to the same pixels (what is not the image may go: JPEG comments, trailing bytes)."""
    if after.get("PixelData") == before.get("PixelData"):
        return True
    old, new = decoded(before), decoded(after)
    return old is not None and new is not None and np.array_equal(old, new)
