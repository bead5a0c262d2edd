"""What a crash mid-delivery leaves in the cases folder, and the next start removing it."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.central.conftest import (
    StartCentral,
    TestCase,
    free_port,
    make_case,
    new_device,
    seal_case,
    serve_in_process,
)
from tests.tls import ServerMaterial
from triage_app.central.config import CentralConfig
from triage_app.central.server import load_key_ring
from triage_app.central.storage import DICOM_FILE, RESULT_FILE, SIGNED_HEADER_FILE, CentralStore
from triage_app.escalation.envelope import Payload

CASE_FILES = (DICOM_FILE, RESULT_FILE, SIGNED_HEADER_FILE)
STORE_LOGGER = "triage_app.central.storage"


def _leftover_counts(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == STORE_LOGGER and "staged temporary files" in r.getMessage()
    ]


def _wait_for(condition_met: Callable[[], bool], what: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while not condition_met():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_server_killed_mid_upload_leaves_nothing_once_it_starts_again(
    tmp_path: Path,
    tls: ServerMaterial,
    http: requests.Session,
    start_central: StartCentral,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data_dir, port = tmp_path / "server", free_port()
    config = CentralConfig(data_dir, port=port, tls_cert=tls.server_cert, tls_key=tls.server_key)
    device = new_device()
    with CentralStore.for_config(config) as store:
        store.registry.add_device(device.public_key_b64())
    ring = load_key_ring(config)
    stored = make_case(70)
    cut = TestCase(make_case(71).case_id, Payload(b'{"a": 1}', os.urandom(4 << 20)))
    cut_body = seal_case(cut, device, ring.active)
    process = serve_in_process(data_dir, port, tls)
    url = f"https://127.0.0.1:{port}"
    cut_folder = data_dir / "central" / "cases" / cut.case_id
    try:

        def listening() -> bool:
            try:
                http.get(url + "/v1/health", timeout=5).close()
            except requests.ConnectionError:
                return False
            return True

        _wait_for(listening, "the server did not start listening", process)
        stored_body = seal_case(stored, device, ring.active)
        assert http.post(f"{url}/v1/cases/{stored.case_id}", data=stored_body).status_code == 201
        http.close()
        context = ssl.create_default_context(cafile=str(tls.ca_cert))
        with context.wrap_socket(
            socket.create_connection(("127.0.0.1", port)), server_hostname="localhost"
        ) as upload:
            upload.sendall(
                f"POST /v1/cases/{cut.case_id} HTTP/1.1\r\nHost: localhost\r\n"
                f"Content-Length: {len(cut_body)}\r\n\r\n".encode()
            )
            upload.sendall(cut_body[: len(cut_body) // 2])

            def image_staged() -> bool:
                temps = list(cut_folder.glob(f".{DICOM_FILE}.*.tmp"))
                return bool(temps) and temps[0].stat().st_size > 1 << 20

            _wait_for(image_staged, "half of the image never reached its temporary file", process)
            process.kill()
            process.communicate()
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert cut_folder.is_dir()  # what the crash left

    central = start_central(data_dir)

    assert not cut_folder.exists()
    assert _leftover_counts(caplog) == [
        "central store: removed 1 staged temporary files and 1 case folders without a row"
    ]
    stored_folder = central.store.case_dir(stored.case_id)
    assert sorted(p.name for p in stored_folder.iterdir()) == sorted(CASE_FILES)
    assert (stored_folder / DICOM_FILE).read_bytes() == stored.payload.dicom
    assert central.post(cut.case_id, cut_body).status_code == 201  # the device sends it again


def test_files_without_a_row_go_and_a_stored_case_only_loses_its_temporaries(
    tmp_path: Path, start_central: StartCentral, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "server"
    first = start_central(data_dir)
    device = first.register(new_device())
    stored, unstored = make_case(72), make_case(73)
    assert first.post(stored.case_id, first.seal(stored, device)).status_code == 201
    first.thread.stop()
    cases_dir = data_dir / "central" / "cases"
    stored_folder, published = cases_dir / stored.case_id, cases_dir / unstored.case_id
    # Another delivery of the stored case was staging its files when the server died.
    (stored_folder / f".{DICOM_FILE}.{'1' * 16}.tmp").write_bytes(b"half an image")
    # A first delivery's files were renamed into place; its row never committed.
    published.mkdir(mode=0o700)
    for name in CASE_FILES:
        (published / name).write_bytes(b"published, never committed")
    (published / f".{RESULT_FILE}.{'2' * 16}.tmp").write_bytes(b"{}")
    not_a_case = cases_dir / "lost+found"
    not_a_case.mkdir()
    (not_a_case / f".{DICOM_FILE}.{'3' * 16}.tmp").write_bytes(b"not ours")
    caplog.clear()

    second = start_central(data_dir)

    assert not published.exists()
    assert sorted(p.name for p in stored_folder.iterdir()) == sorted(CASE_FILES)
    assert (stored_folder / DICOM_FILE).read_bytes() == stored.payload.dicom
    assert [p.name for p in not_a_case.iterdir()] == [f".{DICOM_FILE}.{'3' * 16}.tmp"]
    assert _leftover_counts(caplog) == [
        "central store: removed 2 staged temporary files and 1 case folders without a row"
    ]
    assert [c.case_id for c in second.store.cases()] == [stored.case_id]
    assert second.post(unstored.case_id, second.seal(unstored, device)).status_code == 201


@pytest.mark.expect_log_warnings
def test_symbolic_links_and_files_the_store_did_not_write_are_left_alone(
    tmp_path: Path, start_central: StartCentral, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "server"
    start_central(data_dir).thread.stop()
    cases_dir = data_dir / "central" / "cases"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / DICOM_FILE).write_bytes(b"someone else's")
    (outside / "target.tmp").write_bytes(b"someone else's")
    linked_case = cases_dir / ("a" * 64)  # a case id's name, but a link to another folder
    linked_case.symlink_to(outside, target_is_directory=True)
    foreign = cases_dir / ("b" * 64)  # no row, and a file the store never writes
    foreign.mkdir()
    (foreign / "notes.txt").write_bytes(b"an admin's")
    (foreign / f".{DICOM_FILE}.{'4' * 16}.tmp").symlink_to(outside / "target.tmp")
    (foreign / DICOM_FILE).write_bytes(b"published, never committed")
    caplog.clear()

    start_central(data_dir)

    assert sorted(p.name for p in outside.iterdir()) == [DICOM_FILE, "target.tmp"]
    assert linked_case.is_symlink()
    assert sorted(p.name for p in foreign.iterdir()) == [
        f".{DICOM_FILE}.{'4' * 16}.tmp",
        "notes.txt",
    ]
    assert _leftover_counts(caplog) == [
        "central store: removed 0 staged temporary files and 0 case folders without a row"
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        f"case folder {'b' * 64} has no row but holds files the store did not write; left in place"
    ]
