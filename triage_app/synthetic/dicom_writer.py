"""Write phantoms as real DICOM DX/CR files with plausible (entirely synthetic) headers.

The headers carry made-up patient names, IDs, dates and institution details on purpose: the
de-identification code and its tests need identifying values to find and remove. Labels are
never written into the files; they go to a ``labels.jsonl`` next to them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    RLELossless,
)

from triage_app.synthetic.phantom import Phantom, PhantomConfig, render_phantom

DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")

# A fixed, obviously synthetic UID root (UUID-derived "2.25" form keeps it globally unique).
_UID_ROOT = "2.25."

_GIVEN = ("ALEX", "SAM", "JORDAN", "RILEY", "CASEY", "MORGAN", "TAYLOR", "JAMIE", "ROBIN", "KIM")
_FAMILY = ("PHANTOM", "SYNTHETIC", "TESTCASE", "DUMMY", "MODEL", "SAMPLE", "EXAMPLE", "DEMO")


def _uid(*parts: object) -> UID:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return UID(_UID_ROOT + str(int.from_bytes(digest[:16], "big")))


def phantom_to_dataset(phantom: Phantom) -> Dataset:
    """A complete DX (or CR) dataset, with synthetic identifiers derived from seed and index."""
    acq = phantom.acquisition
    rng = np.random.default_rng([phantom.seed, phantom.index, 7])
    sop_class = DX_FOR_PRESENTATION if acq.modality == "DX" else CR_IMAGE_STORAGE
    study_day = date(2020, 1, 1) + timedelta(days=int(rng.integers(0, 2000)))
    birth = study_day - timedelta(days=int(rng.integers(18 * 365, 90 * 365)))
    patient_number = int(rng.integers(100000, 999999))

    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = _uid(phantom.seed, phantom.index, "instance")
    ds.StudyInstanceUID = _uid(phantom.seed, phantom.index, "study")
    ds.SeriesInstanceUID = _uid(phantom.seed, phantom.index, "series")
    ds.FrameOfReferenceUID = _uid(phantom.seed, phantom.index, "frame")
    ds.PatientName = (
        f"{_FAMILY[int(rng.integers(len(_FAMILY)))]}^{_GIVEN[int(rng.integers(len(_GIVEN)))]}"
    )
    ds.PatientID = f"MRN{patient_number}"
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = str(rng.choice(["F", "M"]))
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = study_day.strftime(
        "%Y%m%d"
    )
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = (
        f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}00"
    )
    ds.AccessionNumber = f"ACC{phantom.seed % 1000:03d}{phantom.index:07d}"
    ds.StudyID = str(phantom.index % 100000)
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ReferringPhysicianName = "REFERRER^SYNTHETIC"
    ds.InstitutionName = "Synthetic Phantom Clinic"
    ds.StationName = "SYNTH-DX-01"
    ds.Manufacturer = "triage-app synthetic"
    ds.ManufacturerModelName = "phantom renderer"
    ds.StudyDescription = "CHEST 1 VIEW"
    ds.SeriesDescription = f"CHEST {acq.view_position}"
    ds.Modality = acq.modality
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = acq.view_position
    ds.PatientOrientation = ["L", "F"] if acq.view_position == "AP" else ["R", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BurnedInAnnotation = "NO"
    if acq.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1 if acq.photometric == "MONOCHROME2" else -1
        ds.DetectorType = "SCINTILLATOR"
        ds.ImagerPixelSpacing = [acq.pixel_spacing_mm, acq.pixel_spacing_mm]
        ds.ImageLaterality = "U"
    ds.PixelSpacing = [acq.pixel_spacing_mm, acq.pixel_spacing_mm]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = acq.photometric
    ds.Rows, ds.Columns = (int(n) for n in phantom.stored.shape)
    ds.BitsAllocated = 16
    ds.BitsStored = acq.bits_stored
    ds.HighBit = acq.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope = acq.rescale_slope
    ds.RescaleIntercept = acq.rescale_intercept
    ds.RescaleType = "US"
    ds.WindowCenter = acq.window_center
    ds.WindowWidth = acq.window_width
    ds.LossyImageCompression = "00"
    ds.PixelData = phantom.stored.astype("<u2").tobytes()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.SourceApplicationEntityTitle = "SYNTH_DX"
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    return ds


def write_phantom(phantom: Phantom, path: Path, *, compress_rle: bool = False) -> None:
    ds = phantom_to_dataset(phantom)
    if compress_rle:
        ds.compress(RLELossless)
    ds.save_as(path, enforce_file_format=True)


@dataclass(frozen=True)
class _Job:
    seed: int
    index: int
    directory: Path
    compress_rle: bool
    config: PhantomConfig


def _render_and_write(job: _Job) -> dict[str, object]:
    phantom = render_phantom(job.seed, job.index, job.config)
    name = f"img_{job.index:06d}.dcm"
    write_phantom(phantom, job.directory / name, compress_rle=job.compress_rle)
    return {"file": name, **phantom.label_record()}


def write_phantom_set(
    directory: Path,
    seed: int,
    count: int,
    *,
    start: int = 0,
    config: PhantomConfig | None = None,
    compress_rle: bool = False,
    workers: int = 1,
) -> Path:
    """Render ``count`` phantoms into ``directory`` plus ``labels.jsonl``; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = config or PhantomConfig()
    jobs = [_Job(seed, i, directory, compress_rle, cfg) for i in range(start, start + count)]
    labels_path = directory / "labels.jsonl"
    with labels_path.open("w", encoding="utf-8") as out:
        for record in _run(jobs, workers):
            out.write(json.dumps(record) + "\n")
        out.flush()
        os.fsync(out.fileno())
    return labels_path


def _run(jobs: list[_Job], workers: int) -> Iterator[dict[str, object]]:
    if workers <= 1:
        yield from map(_render_and_write, jobs)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(_render_and_write, jobs, chunksize=8)


def read_labels(directory: Path) -> dict[str, str]:
    """File name → label, from a directory written by :func:`write_phantom_set`."""
    labels: dict[str, str] = {}
    with (directory / "labels.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            labels[str(record["file"])] = str(record["label"])
    return labels
