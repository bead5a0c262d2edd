"""De-identified files: read, de-identify, encode as a Part 10 file, name it neutrally.

Output names come from the *de-identified* UIDs (a digest of each), never from the source's name
or folders, which often carry a patient's name or MRN: ``<study>/<series>/<instance>.dcm``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from triage_app.dicom.deidentify.engine import DeidentificationReport, Deidentifier
from triage_app.dicom.reader import ensure_file_meta, quiet_pydicom, read_dataset
from triage_app.dicom.writer import encode_part10
from triage_app.errors import InvalidDicomError

_NAME_DIGITS = 16


@dataclass(frozen=True)
class DeidentifiedFile:
    """One de-identified instance as Part 10 bytes, with what was done to it."""

    data: bytes
    report: DeidentificationReport

    @property
    def relative_path(self) -> Path:
        """``<study>/<series>/<instance>.dcm`` from digests of the de-identified UIDs."""
        report = self.report
        instance = report.sop_instance_uid or hashlib.sha256(self.data).hexdigest()
        return Path(
            _digest(report.study_instance_uid or "no-study"),
            _digest(report.series_instance_uid or "no-series"),
            _digest(instance) + ".dcm",
        )


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:_NAME_DIGITS]


def encode(ds: Dataset) -> bytes:
    """``ds`` as a Part 10 file (preamble, file meta, data set), in its own transfer syntax."""
    for keyword in ("SOPClassUID", "SOPInstanceUID"):
        if not ds.get(keyword):
            raise InvalidDicomError(f"cannot be written as a DICOM file: it has no {keyword}")
    ensure_file_meta(ds)  # a data set read without file meta is written as it came in
    try:
        return _save(ds)
    except TypeError:
        # An implicit-VR data set under an explicit transfer syntax (a common writer bug) has
        # raw elements without a VR: decoding them all gives each its dictionary VR.
        for _ in ds.iterall():
            pass
        return _save(ds)


def _save(ds: Dataset) -> bytes:
    try:
        with quiet_pydicom():
            return encode_part10(ds)
    except (ValueError, AttributeError, KeyError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidDicomError(f"cannot be written as a DICOM file: {reason}") from exc


def deidentify_file(source: str | os.PathLike[str] | bytes, deid: Deidentifier) -> DeidentifiedFile:
    """Read ``source`` and return its de-identified Part 10 bytes; input errors as for classify."""
    ds = read_dataset(source if isinstance(source, bytes) else os.fspath(source))
    report = deid.deidentify(ds)
    return DeidentifiedFile(encode(ds), report)


def write_atomically(data: bytes, path: Path) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: never a partial file.

    Not fsynced: an output lost to a crash is simply de-identified again (the result is
    deterministic), and a sync per file would cost more than the de-identification.
    """
    try:
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".partial-", suffix=".dcm")
    except FileNotFoundError:  # the first file of its series: one mkdir, not one per file
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".partial-", suffix=".dcm")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        Path(temp).replace(path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
