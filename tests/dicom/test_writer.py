"""The Part 10 writer writes exactly what pydicom's writer writes, only faster."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pytest
from pydicom import dcmread, filewriter
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tests.helpers import phantom_dataset
from triage_app.dicom.deidentify import Deidentifier
from triage_app.dicom.writer import encode_part10

SECRET = bytes(range(32))


def _readable_files() -> list[str]:
    """pydicom's test files that read cleanly and can be written as Part 10 files."""
    usable = []
    for name in get_testdata_files():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = dcmread(name)
        except Exception:  # noqa: BLE001 - deliberately broken test files drop out here
            continue
        meta = getattr(ds, "file_meta", None)
        if meta is not None and "TransferSyntaxUID" in meta and "SOPInstanceUID" in ds:
            usable.append(name)
    return usable


READABLE = _readable_files()


def _read(name: str) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(name)


def _pydicom_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_there_are_enough_reference_files() -> None:
    assert len(READABLE) > 100


@pytest.mark.parametrize("name", READABLE, ids=lambda n: Path(n).name)
@pytest.mark.parametrize("deidentified", [False, True], ids=["as-read", "deidentified"])
def test_bytes_equal_pydicoms_writer(name: str, deidentified: bool) -> None:
    ours, reference = _read(name), _read(name)
    if deidentified:
        deid = Deidentifier(SECRET)
        deid.deidentify(ours)
        deid.deidentify(reference)
    try:
        expected = _pydicom_bytes(reference)
    except (TypeError, ValueError) as exc:  # e.g. implicit VR data under an explicit syntax
        with warnings.catch_warnings(), pytest.raises(type(exc)):
            warnings.simplefilter("ignore")
            encode_part10(ours)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert encode_part10(ours) == expected


def test_the_fast_path_leaves_little_to_pydicom(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undecoded, plain string, number and new-sequence elements are written here."""
    ds = phantom_dataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = dcmread(io.BytesIO(_pydicom_bytes(ds)))
    Deidentifier(SECRET).deidentify(ds)  # decodes what it replaces, adds a code sequence
    delegated: list[int] = []
    original = filewriter.write_data_element

    def counting(out: object, element: object, encodings: object) -> None:
        delegated.append(element.tag)  # type: ignore[attr-defined]
        original(out, element, encodings)  # type: ignore[arg-type]

    monkeypatch.setattr("triage_app.dicom.writer.write_data_element", counting)
    data = encode_part10(ds)
    assert dcmread(io.BytesIO(data)).PatientIdentityRemoved == "YES"
    assert len(delegated) <= 2, [hex(t) for t in delegated]


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_new_values_round_trip(syntax: UID) -> None:
    ds = phantom_dataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds = dcmread(io.BytesIO(_pydicom_bytes(ds)))
    reference = dcmread(io.BytesIO(_pydicom_bytes(ds)))
    for target in (ds, reference):
        target.StudyDescription = "ODD"  # odd length: padded with a space
        target.SeriesInstanceUID = "1.2.3"  # odd length: padded with a NUL
        target.ImageType = ["DERIVED", "SECONDARY"]
        target.Rows = 64
        target.PatientName = "Müller^Jürgen"  # not ASCII: left to pydicom
        target.SpecificCharacterSet = "ISO_IR 100"
        item = Dataset()
        item.CodeValue = "113100"
        item.CodeMeaning = "Basic Application Confidentiality Profile"
        target.DeidentificationMethodCodeSequence = DicomSequence([item])
    data = encode_part10(ds)
    assert data == _pydicom_bytes(reference)
    back = dcmread(io.BytesIO(data))
    assert back.StudyDescription == "ODD"
    assert back.SeriesInstanceUID == "1.2.3"
    assert back.PatientName == "Müller^Jürgen"
    assert back.DeidentificationMethodCodeSequence[0].CodeValue == "113100"


def test_the_file_meta_follows_the_data_set() -> None:
    ds = _read(READABLE[0])
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    back = dcmread(io.BytesIO(encode_part10(ds)))
    assert back.file_meta.MediaStorageSOPInstanceUID == "1.2.826.0.1.3680043.8.498.1"
    assert back.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
