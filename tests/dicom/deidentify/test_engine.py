"""The walk itself: what the residual scrub reaches in attributes the profile keeps."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from triage_app.dicom.deidentify import Deidentifier

SECRET = bytes(range(32))
# Intervention Description (0018,003A) is free text the Annex E table does not list: it is kept,
# so only the residual scrub stands between the patient's name and the output.
KEPT_TEXT = 0x0018003A
# Secondary Reviewer Name (0014,0104) is a person name the table does not list either.
UNLISTED_PERSON_NAME = 0x00140104


def _dataset() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "QUIXWORTH^ZEBEDIAH"
    ds.PatientID = "MRN55512345"
    ds.add_new(KEPT_TEXT, "ST", "biopsy by QUIXWORTH ZEBEDIAH under DR guidance")
    ds.add_new(UNLISTED_PERSON_NAME, "PN", "WINTERBOTTOM^AUGUSTINA^^DR")
    return ds


def _as_read_from_a_file(ds: Dataset) -> Dataset:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


@pytest.mark.parametrize("read_from_file", [False, True], ids=["decoded", "raw"])
def test_kept_text_loses_the_patients_name_parts(read_from_file: bool) -> None:
    ds = _as_read_from_a_file(_dataset()) if read_from_file else _dataset()
    Deidentifier(SECRET).deidentify(ds)
    kept = str(ds[KEPT_TEXT].value or "").upper()
    assert "QUIXWORTH" not in kept
    assert "ZEBEDIAH" not in kept
    assert "DR GUIDANCE" in kept  # what is not the patient's stays


@pytest.mark.parametrize("read_from_file", [False, True], ids=["decoded", "raw"])
def test_a_person_name_the_table_does_not_list_is_emptied(read_from_file: bool) -> None:
    """Anyone's name identifies someone: the scrub knows only the patient's."""
    ds = _as_read_from_a_file(_dataset()) if read_from_file else _dataset()
    Deidentifier(SECRET).deidentify(ds)
    assert UNLISTED_PERSON_NAME in ds
    assert ds[UNLISTED_PERSON_NAME].is_empty
