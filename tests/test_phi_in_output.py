"""No patient data in what the services write: stderr (the journal) and stdout.

Real scanners write UIDs with leading-zero components ("...2.055..."), which pydicom's value
validation finds invalid and quotes in a warning, and pynetdicom in a log line. These tests
run the real ``watch`` and ``receive`` commands on such an image (with dcmtk's ``storescu``
as the scanner) and look for its UIDs, patient name and ID anywhere in their output; and
check the two places that read those values in-process.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import config
from pydicom.uid import UID

from tests import dcmtk
from tests.helpers import phantom_dataset, run_cli
from triage_app.config import Settings
from triage_app.dicom.reader import read_dataset
from triage_app.escalation.phi_gate import IdentifyingValues
from triage_app.receiver import SUCCESS, DicomReceiver

# A GE-style root with leading zeros ("055", "01", "007"): invalid for pydicom, common in the wild.
STUDY_UID = "1.2.840.113619.2.055.3.2831164355.20120704.01"
SERIES_UID = STUDY_UID + ".2.030"
SOP_UID = STUDY_UID + ".3.007"
PATIENT_NAME = "WAKEFIELD^ROSAMUND"
PATIENT_ID = "MRN20120704"
SECRETS = (STUDY_UID, SERIES_UID, SOP_UID, "2831164355", "WAKEFIELD", "ROSAMUND", PATIENT_ID)
# The file is named as some sites name exports: after the patient.
FILE_NAME = f"{PATIENT_NAME}_{PATIENT_ID}.dcm"


def scanner_image() -> bytes:
    """A chest phantom as a Part 10 file, with the scanner's UIDs and a patient's name and ID."""
    ds = phantom_dataset(5, 0)
    with config.disable_value_validation():  # the test itself must not warn about them
        # New elements: an existing one keeps the validation mode it was created with.
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            delattr(ds, keyword)
        del ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = STUDY_UID
        ds.SeriesInstanceUID = SERIES_UID
        ds.SOPInstanceUID = SOP_UID
        ds.file_meta.MediaStorageSOPInstanceUID = UID(SOP_UID)
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def assert_no_patient_data(output: str) -> None:
    found = [secret for secret in SECRETS if secret.lower() in output.lower()]
    assert not found, f"{found} in the output:\n{output}"


def assert_json_lines(stderr: str) -> None:
    for line in stderr.splitlines():
        try:
            json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line on stderr: {line!r}")


@pytest.fixture
def pinned_reading_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydicom's default (warn, quoting the value), whatever an earlier in-process
    ``configure_logging`` left: the in-process tests below are about reads made without it."""
    monkeypatch.setattr(config.settings, "reading_validation_mode", config.WARN)


# --- in-process: the two reads the reviewer traced ----------------------------------------------


@pytest.mark.usefixtures("pinned_reading_validation")
def test_the_phi_gate_captures_a_scanners_uids_without_a_warning_quoting_them() -> None:
    """A warning is an error here (filterwarnings = error): a read outside quiet_pydicom fails."""
    ds = read_dataset(scanner_image())
    captured = dict(IdentifyingValues.capture(ds).values)
    assert captured["StudyInstanceUID"] == STUDY_UID
    assert captured["SOPInstanceUID"] == SOP_UID
    assert captured["PatientID"] == PATIENT_ID


@pytest.mark.usefixtures("pinned_reading_validation")
def test_the_receiver_spools_an_instance_with_a_scanners_uids_without_a_warning(
    tmp_path: Path,
) -> None:
    settings = Settings(
        {
            "receiver.storage_dir": tmp_path / "receiver",
            "receiver.bind_address": dcmtk.HOST,
            "receiver.port": dcmtk.free_port(),
            "receiver.min_free_mb": 0,
            "paths.data_dir": tmp_path / "data",
        }
    )
    with DicomReceiver(settings) as receiver:
        assert receiver.store(scanner_image()) == SUCCESS
        assert len(list(receiver.incoming.rglob("*.dcm"))) == 1


# --- the real commands ------------------------------------------------------------------------


@pytest.mark.timeout(240)
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_watch_writes_no_uid_name_or_patient_id(tmp_path: Path, log_format: str) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / FILE_NAME).write_bytes(scanner_image())
    run = run_cli(
        "watch",
        "--once",
        "--workers",
        "1",
        "--log-format",
        log_format,
        inbox,
        data_dir=tmp_path / "data",
    )
    assert run.returncode == 0, run.stderr
    assert "1 triaged" in run.stderr  # the image was read, its values with it
    assert_no_patient_data(run.stdout + run.stderr)
    if log_format == "json":
        assert_json_lines(run.stderr)


@dataclass
class Service:
    """A running command's output, read as it comes (its pipes never fill up)."""

    process: subprocess.Popen[str]
    stderr: list[str] = field(default_factory=list)
    stdout: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stderr, self.stderr)),
            threading.Thread(target=self._read, args=(self.process.stdout, self.stdout)),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(pipe: io.TextIOWrapper | None, lines: list[str]) -> None:
        assert pipe is not None
        for line in pipe:
            lines.append(line)

    def wait_for(self, text: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in self.stderr):
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no {text!r} on stderr:\n{''.join(self.stderr)}")
            time.sleep(0.05)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout=60)
        finally:
            self.process.kill()  # a no-op once it has exited
            for reader in self._readers:
                reader.join(timeout=10)
            for pipe in (self.process.stdout, self.process.stderr):
                if pipe is not None:
                    pipe.close()
        return status


@pytest.mark.timeout(240)
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_receive_writes_no_uid_name_or_patient_id(tmp_path: Path, log_format: str) -> None:
    image = tmp_path / "scanner" / FILE_NAME
    image.parent.mkdir()
    image.write_bytes(scanner_image())
    port = dcmtk.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_APP_")}
    env |= {
        "TRIAGE_APP_RECEIVER__BIND_ADDRESS": dcmtk.HOST,
        "TRIAGE_APP_RECEIVER__STUDY_QUIET_S": "0.3",
        "TRIAGE_APP_METRICS__RECEIVE_PORT": "0",
    }
    command = [sys.executable, "-m", "triage_app", "receive", "--port", str(port), "--workers"]
    command += ["1", "--log-format", log_format, "--data-dir", str(tmp_path / "data")]
    service = Service(
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
    )
    try:
        service.wait_for("listening on")
        sent = dcmtk.storescu(port, image, called="TRIAGE")
        assert sent.returncode == 0, f"storescu failed:\n{sent.stdout}\n{sent.stderr}"
        service.wait_for("recorded: ")  # triaged: the image was read, its values with it
    finally:
        status = service.stop()
    stderr = "".join(service.stderr)
    assert status == 0, stderr
    assert_no_patient_data("".join(service.stdout) + stderr)
    if log_format == "json":
        assert_json_lines(stderr)
