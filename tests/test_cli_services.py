"""The service commands' wiring: what the receive service shows on ``/metrics``, and the exit
status a service that cannot start leaves for systemd (2: a mistake; 75: try again)."""

from __future__ import annotations

import socket
import sqlite3
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import CliRun, run_cli
from tests.other_process import hold_write_lock
from tests.test_receiver import part10, receiver_settings
from triage_app.cli_services import _receiver_metrics
from triage_app.metrics import ServiceMetrics
from triage_app.receiver import DicomReceiver

STORED = 0x0000  # the C-STORE success status


def samples(metrics: ServiceMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = metrics.exposition().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_the_receive_service_shows_the_receivers_tallies_and_hand_overs(tmp_path: Path) -> None:
    now = [0.0]
    settings = receiver_settings(
        tmp_path / "receiver", receiver__study_quiet_s=1.0, receiver__study_max_wait_s=2.0
    )
    receiver = DicomReceiver(settings, clock=lambda: now[0])
    metrics = ServiceMetrics()
    _receiver_metrics(metrics, receiver)
    receiver.start()
    try:
        for index, at in enumerate((0.0, 0.9, 1.8, 2.5)):  # one study, never 1 s quiet
            now[0] = at
            receiver.ready_studies()  # the service loop's poll: at 2.5 the first 3 go
            assert receiver.store(part10(index=index)[0]) == STORED
        now[0] = 2.5 + 1.0
        assert [len(study) for study in receiver.ready_studies()] == [1]
    finally:
        receiver.stop()

    figures = samples(metrics)
    assert figures[("triage_receiver_instances_stored_total", frozenset())] == 4
    hand_overs = "triage_receiver_study_hand_overs_total"
    assert figures[(hand_overs, frozenset({("why", "max_wait")}))] == 1  # the first 3, at 2.5 s
    assert figures[(hand_overs, frozenset({("why", "quiet")}))] == 1  # the last, once quiet


def test_watch_refuses_an_inbox_that_is_a_file_as_a_settings_error_naming_it(
    tmp_path: Path,
) -> None:
    """Not an internal error (70) at the first mkdir: the admin gave a file for a folder."""
    afile = tmp_path / "afile"
    afile.write_bytes(b"not a folder")
    run = run_cli("watch", "--once", afile, data_dir=tmp_path / "data")
    assert run.returncode == 2, run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert line == f"triage-app: error: config_invalid: watch.inbox_dir: not a folder: {afile}"
    assert afile.read_bytes() == b"not a folder"


def _error_line(run: CliRun) -> str:
    """The one error line of a service that stopped (its INFO log lines go to stderr too)."""
    errors = [line for line in run.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, run.stderr
    assert "Traceback" not in run.stderr
    return errors[0]


@pytest.mark.timeout(180)
def test_a_case_store_another_process_holds_stops_watch_with_75_and_a_bad_setting_with_2(
    tmp_path: Path,
) -> None:
    """A lock another process holds passes: exit 75, which the units restart. A settings
    mistake does not: exit 2, which they leave failed (``RestartPreventExitStatus=2``)."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    with hold_write_lock(data / "cases.sqlite3"):  # a tool mid-transaction on a new store
        locked = run_cli("watch", "--once", data_dir=data)
    assert locked.returncode == 75, locked.stderr
    line = _error_line(locked)
    assert line.startswith("triage-app: error: store_error: case store: could not "), line
    assert "database is locked" in line

    freed = run_cli("watch", "--once", data_dir=data)  # what the restart finds
    assert freed.returncode == 0, freed.stderr

    mistaken = run_cli(
        "watch", "--once", data_dir=data, env={"TRIAGE_APP_PROCESSING__WORKERS": "0"}
    )
    assert mistaken.returncode == 2, mistaken.stderr
    assert _error_line(mistaken).startswith("triage-app: error: config_invalid: ")

    # A store written by a newer version: a restart cannot fix it either.
    raw = sqlite3.connect(data / "cases.sqlite3")
    raw.execute("PRAGMA user_version = 99")
    raw.close()
    newer = run_cli("watch", "--once", data_dir=data)
    assert newer.returncode == 2, newer.stderr
    line = _error_line(newer)
    assert line.startswith("triage-app: error: store_incompatible: case store: schema version 99")


@pytest.mark.timeout(120)
def test_a_dicom_port_still_taken_stops_receive_with_75(tmp_path: Path) -> None:
    """The port the instance before still holds while it closes: a restart finds it free."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = run_cli(
            "receive",
            "--port",
            str(port),
            data_dir=tmp_path / "data",
            env={
                "TRIAGE_APP_RECEIVER__BIND_ADDRESS": "127.0.0.1",
                "TRIAGE_APP_METRICS__RECEIVE_PORT": "0",
            },
            timeout=120,
        )
    assert run.returncode == 75, run.stderr
    assert _error_line(run) == (
        "triage-app: error: receiver_error: cannot listen for DICOM on "
        f"127.0.0.1:{port} (Address already in use)"
    )
