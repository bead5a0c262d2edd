"""A generated CT series (one study, one series, N axial slices): what a scanner sends at once.

The receiver's tests and its benchmark need many real, full-size instances of one study:
512×512 16-bit slices of a simple synthetic body (an ellipse of soft tissue around two lungs
and a spine, with noise), valid UIDs derived from a seed, written with pydicom as Part 10 files.
The headers carry made-up patient details, as a scanner's would.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage, ExplicitVRLittleEndian

SIZE = 512
SLICE_MM = 1.25


@dataclass(frozen=True)
class CtSeries:
    """What was written: the files and the UIDs a receiver must get back."""

    folder: Path
    study_uid: str
    series_uid: str
    sop_uids: tuple[str, ...]
    files: tuple[Path, ...]

    @property
    def total_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files)


def _uid(*parts: object) -> UID:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return UID("2.25." + str(int.from_bytes(digest[:16], "big")))


def _body(rng: np.random.Generator) -> np.ndarray:
    """One slice in Hounsfield units: air, soft tissue, lungs, a spine, and scanner noise."""
    y, x = np.mgrid[-1.0 : 1.0 : SIZE * 1j, -1.0 : 1.0 : SIZE * 1j]
    hu = np.full((SIZE, SIZE), -1000.0)
    hu[(x / 0.85) ** 2 + (y / 0.6) ** 2 < 1] = 40.0
    for cx in (-0.4, 0.4):
        hu[((x - cx) / 0.3) ** 2 + ((y + 0.05) / 0.42) ** 2 < 1] = -850.0
    hu[x**2 + ((y - 0.45) / 1.2) ** 2 < 0.01] = 700.0
    return hu + rng.normal(0.0, 12.0, hu.shape)


def ct_dataset(seed: int, index: int, count: int, pixels: np.ndarray) -> Dataset:
    """Slice ``index`` of ``count`` as a complete CT Image Storage dataset with file meta."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = _uid(seed, "instance", index)
    ds.StudyInstanceUID = _uid(seed, "study")
    ds.SeriesInstanceUID = _uid(seed, "series")
    ds.FrameOfReferenceUID = _uid(seed, "frame")
    ds.PatientName = "SYNTHETIC^CTSERIES"
    ds.PatientID = f"CT{seed:06d}"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240102"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber = f"ACCCT{seed:06d}"
    ds.StudyID = "1"
    ds.ReferringPhysicianName = "REFERRER^SYNTHETIC"
    ds.Manufacturer = "triage-app synthetic"
    ds.StudyDescription = "CT CHEST"
    ds.SeriesDescription = "AXIAL 1.25"
    ds.Modality = "CT"
    ds.BodyPartExamined = "CHEST"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientPosition = "HFS"
    ds.ImagePositionPatient = [-250.0, -250.0, -SLICE_MM * (count - 1) / 2 + SLICE_MM * index]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceThickness = SLICE_MM
    ds.PixelSpacing = [500.0 / SIZE, 500.0 / SIZE]
    ds.KVP = 120
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = SIZE
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    ds.PixelData = pixels.astype("<u2").tobytes()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    return ds


def write_ct_series(folder: Path, count: int, *, seed: int = 1) -> CtSeries:
    """``count`` slices of one study and series as ``folder/ct0000.dcm`` ... (fixed ``seed``)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    body = _body(rng)
    sop_uids: list[str] = []
    files: list[Path] = []
    for index in range(count):
        # The same body with fresh noise per slice: distinct pixels, cheap to make.
        noise = rng.integers(-8, 9, size=body.shape)
        pixels = np.clip(body + 1024 + noise, 0, 4095)
        ds = ct_dataset(seed, index, count, pixels)
        path = folder / f"ct{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sop_uids.append(str(ds.SOPInstanceUID))
        files.append(path)
    return CtSeries(
        folder,
        str(_uid(seed, "study")),
        str(_uid(seed, "series")),
        tuple(sop_uids),
        tuple(files),
    )
