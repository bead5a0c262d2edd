"""The service commands' wiring: what the receive service shows on ``/metrics``, and the exit
status a service that cannot start leaves for systemd (2: a mistake; 75: try again)."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import dcmtk
from tests.helpers import CliRun, run_cli
from tests.other_process import hold_write_lock
from tests.test_receiver import part10, receiver_settings
from tests.test_secrets import (
    ROOT,
    as_service_user,
    give_to_service_user,
    reachable_folder,
    service_user_env,
)
from triage_app.cli_services import _receiver_metrics
from triage_app.metrics import ServiceMetrics
from triage_app.receiver import DicomReceiver
from triage_app.store import CaseStore

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


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("command", "env"),
    [
        (["watch", "--once", "--log-format", "json"], {"TRIAGE_APP_PROCESSING__WORKERS": "0"}),
        (["receive", "--log-format", "json"], {"TRIAGE_APP_PROCESSING__WORKERS": "0"}),
        (
            # central serve reads no settings: a certificate that is not there instead
            [
                *("central", "serve", "--log-format", "json", "--port", "0"),
                *("--tls-cert", "missing-cert.pem", "--tls-key", "missing-key.pem"),
            ],
            {},
        ),
    ],
    ids=["watch", "receive", "central-serve"],
)
def test_a_service_logging_json_stops_with_its_error_as_a_json_record_with_the_code(
    tmp_path: Path, command: list[str], env: dict[str, str]
) -> None:
    """The journal's log shipper parses JSON: the line saying why the service stopped was the
    one text line among them, ``triage-app: error: <code>: ...``."""
    run = run_cli(*command, data_dir=tmp_path / "data", env=env)
    assert run.returncode == 2, run.stderr
    records = [json.loads(line) for line in run.stderr.splitlines()]  # each line is JSON
    errors = [r for r in records if r["level"] == "ERROR"]
    assert len(errors) == 1, run.stderr
    (error,) = errors
    assert error["logger"] == "triage_app.cli"
    assert error["code"] == "config_invalid"
    assert error["message"].split(":")[0] in {"processing.workers", "central.tls_cert"}
    assert set(error) == {"ts", "level", "logger", "message", "code"}


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


# --- Folders and ports the service may not use: a setup mistake, exit 2 --------------------------

# Each is what a site admin met: exit 70 (an "internal error") or 75 (restarted every 5 s for
# ever), where a restart cannot help. The service runs as ``nobody`` here, in folders the test,
# as root, leaves root's (helpers: tests/test_secrets.py).
BY_ROOT = f"owned by {ROOT}, not by nobody, the user this runs as"
NO_METRICS = {"TRIAGE_APP_METRICS__RECEIVE_PORT": "0"}


def run_cli_as_service_user(
    *args: str | Path, data_dir: Path, home: Path, env: dict[str, str] | None = None
) -> CliRun:
    result = subprocess.run(
        as_service_user("-m", "triage_app", *args, "--data-dir", data_dir),
        capture_output=True,
        text=True,
        input="",
        timeout=120,
        env={**service_user_env(home), **(env or {})},
        check=False,
    )
    return CliRun(result.returncode, result.stdout, result.stderr)


def _receive_args() -> list[str]:
    return ["receive", "--port", str(dcmtk.free_port())]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["watch", "receive"])
def test_a_data_folder_of_another_user_stops_a_service_with_2_and_the_chown(
    command: str,
) -> None:
    """It was ``internal_error: unexpected PermissionError in ... (_require_folders)``, 70."""
    args = ["watch", "--once"] if command == "watch" else _receive_args()
    with reachable_folder() as base:
        data = base / "data"
        data.mkdir(mode=0o700)  # root's, as `sudo mkdir` or a first run as root leaves it

        run = run_cli_as_service_user(*args, data_dir=data, home=base, env=NO_METRICS)

    assert run.returncode == 2, run.stderr
    assert _error_line(run) == (
        f"triage-app: error: config_invalid: paths.data_dir: cannot use {data}: {BY_ROOT} "
        f"(mode 0700): chown -R nobody: {data}"
    )


@pytest.mark.timeout(120)
def test_keys_left_by_a_first_run_as_root_stop_watch_and_device_with_2_saying_cannot_read() -> None:
    """``sudo triage-app device`` first. It was exit 70 for ``watch`` (an unexpected
    PermissionError in the site secret), and "cannot write the key file" for ``device``,
    although the key is there: the folder cannot be read."""
    with reachable_folder() as base:
        data = base / "data"
        data.mkdir()
        give_to_service_user(data)
        as_root = run_cli("device", data_dir=data)
        assert as_root.returncode == 0, as_root.stderr

        watch = run_cli_as_service_user("watch", "--once", data_dir=data, home=base)
        device = run_cli_as_service_user("device", data_dir=data, home=base)

    why = f"{data / 'keys'}: cannot read the key folder: {BY_ROOT} (mode 0700): chown -R nobody: "
    assert watch.returncode == 2, watch.stderr
    assert _error_line(watch) == f"triage-app: error: config_invalid: {why}{data}"
    assert device.returncode == 2, device.stderr
    assert _error_line(device) == f"triage-app: error: key_invalid: {why}{data}"


@pytest.mark.timeout(120)
def test_a_case_store_left_by_root_stops_watch_with_2_not_a_temporary_75() -> None:
    """It was ``store_error`` (temporary, 75): restarted for ever, the file staying root's."""
    with reachable_folder() as base:
        data = base / "data"
        data.mkdir()
        give_to_service_user(data)
        store = data / "cases.sqlite3"
        CaseStore.open(store).close()  # as root: 0600

        run = run_cli_as_service_user("watch", "--once", data_dir=data, home=base)

    assert run.returncode == 2, run.stderr
    assert _error_line(run) == (
        f"triage-app: error: config_invalid: paths.case_store: cannot use {store}: {BY_ROOT} "
        f"(mode 0600): chown -R nobody: {data}"
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("key", "folder"),
    [
        ("watch.inbox_dir", "watch/inbox"),
        ("watch.done_dir", "watch/done"),
        ("watch.quarantine_dir", "watch/quarantine"),
        ("watch.quarantine_dir", "watch/quarantine/not_dicom"),
    ],
)
def test_a_watch_folder_the_service_user_may_not_change_is_refused_at_start(
    key: str, folder: str
) -> None:
    """Made by root (readable, 0755): ``watch --once`` on an empty inbox said nothing (exit 0),
    and the service could then take no file out of the inbox, or file none."""
    with reachable_folder() as base:
        data = base / "data"
        for name in ("watch/inbox", "watch/done", "watch/quarantine/not_dicom"):
            (data / name).mkdir(parents=True)
        give_to_service_user(data, *data.rglob("*"))
        roots = data / folder
        os.chown(roots, 0, 0)
        roots.chmod(0o755)

        run = run_cli_as_service_user("watch", "--once", data_dir=data, home=base)

    assert run.returncode == 2, run.stderr
    assert _error_line(run) == (
        f"triage-app: error: config_invalid: {key}: cannot use {roots}: {BY_ROOT} (mode 0755): "
        f"chown -R nobody: {data}"
    )


@pytest.mark.timeout(120)
def test_a_receiver_storage_folder_of_root_stops_receive_with_2() -> None:
    """It was exit 70 (an unexpected PermissionError making ``incoming/``)."""
    with reachable_folder() as base:
        data = base / "data"
        data.mkdir()
        give_to_service_user(data)
        storage = data / "receiver"
        storage.mkdir(mode=0o700)

        run = run_cli_as_service_user(*_receive_args(), data_dir=data, home=base, env=NO_METRICS)

    assert run.returncode == 2, run.stderr
    assert _error_line(run) == (
        f"triage-app: error: config_invalid: receiver.storage_dir: cannot use {storage}: "
        f"{BY_ROOT} (mode 0700): chown -R nobody: {data}"
    )


def run_cli_without_capabilities(
    *args: str | Path, data_dir: Path, env: dict[str, str] | None = None
) -> CliRun:
    """The CLI as root without its capabilities: file modes and privileged ports refuse it as
    they refuse any user. For what the service user cannot reach here: the receiver listens
    and reads its spool only after its worker processes started, and the service user cannot
    start them (the interpreter lives in root's home)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_APP_")}
    full_env.update(env or {})
    no_capabilities = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable]
    result = subprocess.run(
        [*no_capabilities, "-m", "triage_app", *map(str, args), "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        input="",
        timeout=150,
        env=full_env,
        check=False,
    )
    return CliRun(result.returncode, result.stdout, result.stderr)


@pytest.mark.timeout(180)
def test_a_spooled_study_folder_of_another_user_stops_receive_with_2_not_75(
    tmp_path: Path,
) -> None:
    """A study spooled by a run as another user: the receiver cannot hand it over at start.
    It was the temporary ``receiver_error`` (75). Spool names are hashes: no PHI in the line."""
    data = tmp_path / "data"
    study = data / "receiver" / "incoming" / ("ab" * 16)
    study.mkdir(parents=True)
    (study / ("cd" * 16 + ".dcm")).write_bytes(b"spooled by another user")
    give_to_service_user(study)  # nobody's, 0700: the "other user" of this test

    run = run_cli_without_capabilities(
        *_receive_args(), "--workers", "1", data_dir=data, env=NO_METRICS
    )

    assert run.returncode == 2, run.stderr
    assert _error_line(run) == (
        f"triage-app: error: config_invalid: receiver.storage_dir: cannot use {study}: owned by "
        f"nobody, not by {ROOT}, the user this runs as (mode 0700): chown -R {ROOT}: {data}"
    )


@pytest.mark.timeout(180)
def test_the_dicom_port_104_without_the_capability_stops_receive_with_2_and_the_fix(
    tmp_path: Path,
) -> None:
    """Port 104, the standard DICOM port, without CAP_NET_BIND_SERVICE: it was the temporary
    ``receiver_error`` (75), restarted every 5 s."""
    run = run_cli_without_capabilities(
        "receive",
        "--port",
        "104",
        "--workers",
        "1",
        data_dir=tmp_path / "data",
        env={**NO_METRICS, "TRIAGE_APP_RECEIVER__BIND_ADDRESS": "127.0.0.1"},
    )

    assert run.returncode == 2, run.stderr
    assert _error_line(run) == (
        "triage-app: error: config_invalid: receiver.port: cannot listen for DICOM on "
        "127.0.0.1:104 (Permission denied): a port below 1024 needs the CAP_NET_BIND_SERVICE "
        "capability (systemd: AmbientCapabilities=CAP_NET_BIND_SERVICE and "
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE in a drop-in, systemctl edit "
        "triage-receive), or use port 11112"
    )


@pytest.mark.timeout(120)
def test_a_bind_address_not_of_this_machine_stops_receive_with_2(tmp_path: Path) -> None:
    """It was the temporary ``receiver_error`` (75): no restart gives the machine the address."""
    port = dcmtk.free_port()
    run = run_cli(
        "receive",
        "--port",
        str(port),
        "--workers",
        "1",
        data_dir=tmp_path / "data",
        env={**NO_METRICS, "TRIAGE_APP_RECEIVER__BIND_ADDRESS": "192.0.2.1"},  # TEST-NET-1
        timeout=120,
    )

    assert run.returncode == 2, run.stderr
    assert _error_line(run) == (
        f"triage-app: error: config_invalid: receiver.bind_address: cannot listen for DICOM on "
        f"192.0.2.1:{port} (Cannot assign requested address): it must be an address of this "
        "machine (ip -brief address lists them), or 0.0.0.0 for all of them"
    )
