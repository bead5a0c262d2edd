"""De-identified files: valid Part 10 output, the image untouched, neutral names, atomic writes."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from tests.dicom.conftest import bundled, decoded, same_image, strip_file_meta
from tests.helpers import phantom_dataset
from triage_app.dicom.deidentify import Deidentifier
from triage_app.dicom.deidentify.engine import IMPLEMENTATION_CLASS_UID
from triage_app.dicom.deidentify.files import DeidentifiedFile, deidentify_file, write_atomically
from triage_app.dicom.reader import quiet_pydicom, read_dataset
from triage_app.errors import InputError, InvalidDicomError

SECRET = bytes(range(32))
_AE_TITLES = (0x00020016, 0x00020017, 0x00020018)  # source, sending, receiving


def _part10(ds: Dataset, syntax: UID = ExplicitVRLittleEndian) -> bytes:
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture
def phantom() -> Dataset:
    ds = phantom_dataset(11)
    ds.file_meta.SourceApplicationEntityTitle = "CT_SCANNER_7"
    ds.file_meta.SendingApplicationEntityTitle = "PACS_SEND"
    ds.file_meta.ReceivingApplicationEntityTitle = "TRIAGE_BOX"
    return ds


def _read(data: bytes) -> Dataset:
    with quiet_pydicom():
        return dcmread(io.BytesIO(data))


def _check(result: DeidentifiedFile, source: Dataset) -> Dataset:
    """The output re-reads, carries the input's image and a consistent, neutral file meta."""
    out = _read(result.data)
    assert result.data[128:132] == b"DICM"
    meta = out.file_meta
    assert meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert meta.MediaStorageSOPClassUID == out.SOPClassUID
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert not [tag for tag in _AE_TITLES if tag in meta]
    assert out.PatientIdentityRemoved == "YES"
    assert out.SOPInstanceUID == result.report.sop_instance_uid
    if "SOPInstanceUID" in source:
        assert out.SOPInstanceUID != source.SOPInstanceUID
    if "PixelData" in source:
        assert "PixelData" in out
        # A source no decoder reads (pydicom keeps a few broken ones) has no image to compare.
        assert same_image(source, out) or decoded(source) is None
    return out


# --- generated images ----------------------------------------------------------------------------


def test_a_phantom_file_on_disk(tmp_path: Path, phantom: Dataset) -> None:
    path = tmp_path / "Doe^Jane MRN123.dcm"
    path.write_bytes(_part10(phantom))
    source = _read(path.read_bytes())
    result = deidentify_file(path, Deidentifier(SECRET))
    out = _check(result, source)
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert "PatientBirthDate" not in out or not out.PatientBirthDate
    assert str(out.PatientName) != str(source.PatientName)


def test_bytes_and_path_give_the_same_output(tmp_path: Path, phantom: Dataset) -> None:
    data = _part10(phantom)
    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    assert deidentify_file(data, Deidentifier(SECRET)).data == (
        deidentify_file(str(path), Deidentifier(SECRET)).data
    )


def test_implicit_vr_part10_stays_implicit(phantom: Dataset) -> None:
    data = _part10(phantom, ImplicitVRLittleEndian)
    out = _check(deidentify_file(data, Deidentifier(SECRET)), _read(data))
    assert out.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian


def test_a_raw_data_set_without_file_meta(phantom: Dataset) -> None:
    raw = strip_file_meta(_part10(phantom, ImplicitVRLittleEndian))
    assert raw[:2] == b"\x08\x00"  # starts straight with group 0008, implicit VR
    source = read_dataset(raw)
    result = deidentify_file(raw, Deidentifier(SECRET))
    out = _check(result, source)
    assert out.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert out.file_meta.MediaStorageSOPClassUID == phantom.SOPClassUID


@pytest.mark.parametrize(
    ("name", "syntax"),
    [
        ("MR_small_bigendian.dcm", ExplicitVRBigEndian),
        ("ExplVR_BigEndNoMeta.dcm", ExplicitVRBigEndian),
        ("ExplVR_LitEndNoMeta.dcm", ExplicitVRLittleEndian),
        ("MR_small_implicit.dcm", ImplicitVRLittleEndian),
    ],
)
def test_encodings_are_kept(name: str, syntax: UID) -> None:
    path = bundled(name)
    source = read_dataset(str(path))
    out = _check(deidentify_file(path, Deidentifier(SECRET)), source)
    assert out.file_meta.TransferSyntaxUID == syntax
    if "PixelData" in out:
        with quiet_pydicom():
            assert out.pixel_array.shape == dcmread(path, force=True).pixel_array.shape


def test_the_same_input_gives_the_same_file_and_path(phantom: Dataset) -> None:
    data = _part10(phantom)
    first = deidentify_file(data, Deidentifier(SECRET))
    second = deidentify_file(data, Deidentifier(SECRET))
    assert first.data == second.data
    assert first.relative_path == second.relative_path
    other_site = deidentify_file(data, Deidentifier(bytes(range(1, 33))))
    assert other_site.relative_path != first.relative_path


def test_output_path_comes_from_the_deidentified_uids(phantom: Dataset) -> None:
    result = deidentify_file(_part10(phantom), Deidentifier(SECRET))
    path = result.relative_path
    assert len(path.parts) == 3
    assert all(re.fullmatch(r"[0-9a-f]{16}", part) for part in (*path.parts[:2], path.stem))
    assert path.suffix == ".dcm"
    text = str(path)
    for original in (phantom.StudyInstanceUID, phantom.SeriesInstanceUID, phantom.SOPInstanceUID):
        assert original not in text
    assert str(phantom.PatientID) not in text


def test_a_data_set_without_sop_uids_cannot_be_written(phantom: Dataset) -> None:
    del phantom.SOPInstanceUID
    with pytest.raises(InvalidDicomError, match="SOPInstanceUID"):
        deidentify_file(_part10(phantom), Deidentifier(SECRET))


# --- the file meta -------------------------------------------------------------------------------

# The file meta is rebuilt from these, whatever else the source's group 2 held.
META_ALLOWED = {0x00020000, 0x00020001, 0x00020002, 0x00020003, 0x00020010, 0x00020012}
META_ALLOWED |= {0x00020013}


def test_the_file_meta_keeps_only_what_a_reader_needs(phantom: Dataset) -> None:
    data = _part10(phantom)
    source = dcmread(io.BytesIO(data))
    meta = source.file_meta
    meta.add_new(0x00020033, "UI", "1.2.826.0.1.3680043.8.498.7777")  # RTV Communication UID
    meta.add_new(0x00020035, "OB", b"ws-radiology-07.stmarys.local")  # RTV Source Identifier
    meta.add_new(0x00020099, "LO", "host=ws-radiology-07 user=jdoe")  # not in any dictionary
    meta.SourcePresentationAddress = "https://ws-radiology-07.stmarys.local"
    meta.PrivateInformationCreatorUID = UID("1.2.3.999")
    meta.PrivateInformation = b"DOE^JOHN"
    buffer = io.BytesIO()
    source.save_as(buffer, enforce_file_format=False)
    result = deidentify_file(buffer.getvalue(), Deidentifier(SECRET))

    out = _check(result, phantom)
    assert set(out.file_meta.keys()) <= META_ALLOWED
    assert out.file_meta.MediaStorageSOPInstanceUID == result.report.sop_instance_uid
    for leaked in (b"7777", b"ws-radiology-07", b"jdoe", b"1.2.3.999", b"DOE^JOHN"):
        assert leaked not in result.data


def test_file_meta_elements_in_the_data_set_are_removed(phantom: Dataset) -> None:
    item = Dataset()
    item.add_new(0x00020035, "OB", b"ws-radiology-07")  # group 2 belongs in the file meta only
    phantom.ReferencedImageSequence = [item]
    result = deidentify_file(_part10(phantom), Deidentifier(SECRET))
    assert b"ws-radiology-07" not in result.data


# --- pydicom's test files ----------------------------------------------------------------------

_PYDICOM_FILES = sorted(
    {Path(p) for p in get_testdata_files() if Path(p).is_file()}, key=lambda p: p.name
)


def _expected_error(path: Path) -> type[InputError] | None:
    """What deidentify_file must raise, judged without it: the reader's verdict, then SOP UIDs."""
    try:
        ds = read_dataset(str(path))
    except InputError as err:
        return type(err)
    if not ds.get("SOPClassUID") or not ds.get("SOPInstanceUID"):
        return InvalidDicomError
    return None


def test_pydicoms_test_files_are_found() -> None:
    assert len(_PYDICOM_FILES) > 100


@pytest.mark.parametrize("path", _PYDICOM_FILES, ids=lambda p: p.name)
def test_pydicoms_test_files(path: Path) -> None:
    expected = _expected_error(path)
    deid = Deidentifier(SECRET)
    if expected is not None:
        with pytest.raises(expected):
            deidentify_file(path, deid)
        return
    source = read_dataset(str(path))
    _check(deidentify_file(path, deid), source)


def test_most_pydicom_test_images_are_written() -> None:
    # The parametrised test above must not pass by expecting errors everywhere.
    written = [p for p in _PYDICOM_FILES if _expected_error(p) is None]
    assert len(written) >= 100


# --- atomic writes ---------------------------------------------------------------------------


def test_write_atomically_writes_the_bytes(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c.dcm"
    write_atomically(b"first", target)
    write_atomically(b"second", target)
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["c.dcm"]


_FDOPEN = os.fdopen


class _HalfWritten:
    """A file handle that writes half of what it is given, then fails."""

    def __init__(self, fd: int, error: BaseException) -> None:
        self._handle = _FDOPEN(fd, "wb")
        self._error = error

    def __enter__(self) -> _HalfWritten:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()

    def write(self, data: bytes) -> int:
        self._handle.write(data[: len(data) // 2])
        self._handle.flush()
        raise self._error


@pytest.mark.parametrize("stage", ["write", "rename"])
@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_write_atomically_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException, stage: str
) -> None:
    target = tmp_path / "out" / "c.dcm"
    write_atomically(b"old complete file", target)
    if stage == "write":
        monkeypatch.setattr(os, "fdopen", lambda fd, mode: _HalfWritten(fd, error))
    else:

        def failing_replace(self: Path, target: Path) -> Path:
            raise error

        monkeypatch.setattr(Path, "replace", failing_replace)
    with pytest.raises(type(error)):
        write_atomically(b"new file that never completes", target)
    assert target.read_bytes() == b"old complete file"
    assert sorted(p.name for p in target.parent.iterdir()) == ["c.dcm"]

    fresh = tmp_path / "out" / "new.dcm"
    with pytest.raises(type(error)):
        write_atomically(b"never", fresh)
    assert not fresh.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["c.dcm"]
