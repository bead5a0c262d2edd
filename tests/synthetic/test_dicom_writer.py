"""Phantoms written as DICOM: readable by the app, honest headers, labels kept outside."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from triage_app.dicom import load_image
from triage_app.synthetic import (
    PhantomConfig,
    phantom_to_dataset,
    read_labels,
    render_phantom,
    write_phantom,
    write_phantom_set,
)
from triage_app.synthetic.dicom_writer import CR_IMAGE_STORAGE, DX_FOR_PRESENTATION

SMALL = PhantomConfig(size_range=(160, 256))
SEED = 77


@pytest.mark.parametrize("index", range(6))
def test_written_phantom_reads_back_with_the_app_reader(tmp_path: Path, index: int) -> None:
    phantom = render_phantom(SEED, index, SMALL)
    path = tmp_path / "phantom.dcm"
    write_phantom(phantom, path)
    image = load_image(path)
    info = image.info
    acq = phantom.acquisition
    assert info.modality == acq.modality
    assert info.modality in {"DX", "CR"}
    assert info.body_part == "CHEST"
    assert info.photometric == acq.photometric
    assert (info.rows, info.columns) == phantom.stored.shape
    assert info.number_of_frames == 1
    assert info.bits_stored == acq.bits_stored
    assert info.bits_allocated == 16
    assert info.pixel_representation == 0
    assert info.transfer_syntax_uid == ExplicitVRLittleEndian
    assert (info.rescale_slope, info.rescale_intercept) == (
        acq.rescale_slope,
        acq.rescale_intercept,
    )
    assert info.window == (acq.window_center, acq.window_width)
    expected_class = DX_FOR_PRESENTATION if acq.modality == "DX" else CR_IMAGE_STORAGE
    assert info.sop_class_uid == expected_class
    np.testing.assert_array_equal(image.stored, phantom.stored)


def test_rle_compressed_phantom_decodes_to_the_same_pixels(tmp_path: Path) -> None:
    phantom = render_phantom(SEED, 1, SMALL)
    path = tmp_path / "rle.dcm"
    write_phantom(phantom, path, compress_rle=True)
    image = load_image(path)
    assert image.info.transfer_syntax_uid == RLELossless
    np.testing.assert_array_equal(image.stored, phantom.stored)


def test_file_is_part10_with_consistent_meta(tmp_path: Path) -> None:
    phantom = render_phantom(SEED, 2, SMALL)
    path = tmp_path / "phantom.dcm"
    write_phantom(phantom, path)
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    ds = pydicom.dcmread(path)
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert ds.HighBit == ds.BitsStored - 1
    assert ds.SamplesPerPixel == 1


def test_headers_carry_synthetic_identifiers_for_deidentification_tests() -> None:
    ds = phantom_to_dataset(render_phantom(SEED, 3, SMALL))
    assert str(ds.PatientName)
    assert str(ds.PatientID).startswith("MRN")
    assert len(ds.PatientBirthDate) == 8
    assert len(ds.StudyDate) == 8
    assert ds.PatientBirthDate < ds.StudyDate
    assert ds.InstitutionName


def test_identifiers_are_deterministic_and_unique_per_phantom() -> None:
    a = phantom_to_dataset(render_phantom(SEED, 4, SMALL))
    again = phantom_to_dataset(render_phantom(SEED, 4, SMALL))
    b = phantom_to_dataset(render_phantom(SEED, 5, SMALL))
    keywords = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID")
    for keyword in keywords:
        assert a.get(keyword) == again.get(keyword), keyword
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        assert a.get(keyword) != b.get(keyword), keyword
        assert a.get(keyword).is_valid
    uids = {a.SOPInstanceUID, a.StudyInstanceUID, a.SeriesInstanceUID, a.FrameOfReferenceUID}
    assert len(uids) == 4


def test_phantom_set_writes_files_and_labels(tmp_path: Path) -> None:
    count, start = 6, 10
    labels_path = write_phantom_set(tmp_path / "set", SEED, count, start=start, config=SMALL)
    assert labels_path == tmp_path / "set" / "labels.jsonl"
    files = sorted((tmp_path / "set").glob("*.dcm"))
    assert [f.name for f in files] == [f"img_{i:06d}.dcm" for i in range(start, start + count)]
    records = [json.loads(line) for line in labels_path.read_text(encoding="utf-8").splitlines()]
    assert len(records) == count
    labels = read_labels(tmp_path / "set")
    for i, record in zip(range(start, start + count), records, strict=True):
        phantom = render_phantom(SEED, i, SMALL)
        name = f"img_{i:06d}.dcm"
        assert record["file"] == name
        assert record["label"] == phantom.label == labels[name]
        assert record["index"] == i
        np.testing.assert_array_equal(load_image(tmp_path / "set" / name).stored, phantom.stored)


def test_labels_never_appear_inside_the_files(tmp_path: Path) -> None:
    # Enough phantoms that both labels (and lesion kinds) occur.
    config = PhantomConfig(size_range=(48, 64), abnormal_fraction=0.5)
    write_phantom_set(tmp_path, SEED, 12, config=config)
    labels = read_labels(tmp_path)
    assert set(labels.values()) == {"normal", "abnormal"}
    for name in labels:
        data = (tmp_path / name).read_bytes().lower()
        for word in (b"abnormal", b"nodule", b"opacity", b"label", b"finding"):
            assert word not in data, (name, word)


def test_parallel_workers_write_the_same_set(tmp_path: Path) -> None:
    config = PhantomConfig(size_range=(48, 64))
    serial = write_phantom_set(tmp_path / "serial", SEED, 5, config=config, workers=1)
    parallel = write_phantom_set(tmp_path / "parallel", SEED, 5, config=config, workers=2)
    assert serial.read_text(encoding="utf-8") == parallel.read_text(encoding="utf-8")
    for path in sorted((tmp_path / "serial").glob("*.dcm")):
        assert path.read_bytes() == (tmp_path / "parallel" / path.name).read_bytes()
