"""The central server's administrative commands and the device's identity, as real processes."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import resource
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.central.conftest import first_started
from tests.helpers import run_cli, serve_until_listening
from triage_app import cli


def test_make_cert_writes_a_private_key_and_prints_the_pin_of_the_certificate(tmp_path: Path):
    run = run_cli("central", "make-cert", "--host", "triage.example", data_dir=tmp_path)
    assert run.returncode == 0, run.stderr
    made = json.loads(run.stdout)
    cert = x509.load_pem_x509_certificate(Path(made["cert"]).read_bytes())
    der = cert.public_bytes(serialization.Encoding.DER)
    assert made["tls_pin"] == hashlib.sha256(der).hexdigest()
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["triage.example"]
    assert stat.S_IMODE(Path(made["key"]).stat().st_mode) == 0o600


def _tls_files(data_dir: Path) -> dict[str, bytes]:
    folder = data_dir / "central" / "tls"
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def _key_matches_certificate(files: dict[str, bytes]) -> bool:
    key = serialization.load_pem_private_key(files["server-key.pem"], password=None)
    cert = x509.load_pem_x509_certificate(files["server-cert.pem"])
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)


def test_make_cert_keeps_a_pinned_certificate_unless_forced(tmp_path: Path) -> None:
    first = run_cli("central", "make-cert", data_dir=tmp_path)
    assert first.returncode == 0, first.stderr
    made = _tls_files(tmp_path)

    again = run_cli("central", "make-cert", data_dir=tmp_path)
    forced = run_cli("central", "make-cert", "--force", data_dir=tmp_path)
    helped = run_cli("central", "make-cert", "--help", data_dir=tmp_path)

    assert again.returncode == 2
    assert again.stdout == ""
    assert again.stderr.startswith("triage-app: error: certificate_exists: ")
    assert len(again.stderr.splitlines()) == 1 and "--force" in again.stderr
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["tls_pin"] != json.loads(first.stdout)["tls_pin"]
    replaced = _tls_files(tmp_path)
    assert set(replaced) == set(made) == {"server-cert.pem", "server-key.pem"}  # no temporaries
    assert replaced["server-key.pem"] != made["server-key.pem"]
    assert _key_matches_certificate(replaced)
    assert "--force" in " ".join(helped.stdout.split())


def _make_cert_with_small_files(data_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``make-cert`` where files may grow to 400 bytes: a key (241) fits, a certificate not."""

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (400, 400))

    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_APP_")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    command = [sys.executable, "-m", "triage_app", "central", "make-cert", *extra]
    return subprocess.run(
        [*command, "--host", "triage.example", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=small_files,
        timeout=120,
        check=False,
    )


def test_make_cert_that_cannot_write_the_certificate_leaves_no_key_without_it(
    tmp_path: Path,
) -> None:
    fresh = _make_cert_with_small_files(tmp_path / "fresh")
    assert fresh.returncode == 2, fresh.stderr
    assert "could not write the TLS key and certificate" in fresh.stderr
    assert _tls_files(tmp_path / "fresh") == {}

    first = run_cli("central", "make-cert", "--host", "triage.example", data_dir=tmp_path)
    assert first.returncode == 0, first.stderr
    made = _tls_files(tmp_path)
    assert len(made["server-key.pem"]) < 400 < len(made["server-cert.pem"])
    forced = _make_cert_with_small_files(tmp_path, "--force")
    assert forced.returncode == 2, forced.stderr
    assert _tls_files(tmp_path) == made


def test_a_device_is_registered_listed_and_revoked(tmp_path: Path):
    device = run_cli("device", data_dir=tmp_path / "device")
    assert device.returncode == 0, device.stderr
    identity = json.loads(device.stdout)
    assert identity == json.loads(run_cli("device", data_dir=tmp_path / "device").stdout)

    server = tmp_path / "server"
    refused = run_cli("central", "add-device", identity["public_key"], data_dir=server)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith("triage-app: error: config_invalid: central: no central store")
    for listing in ("devices", "cases"):
        assert run_cli("central", listing, data_dir=server).returncode == 2
    assert not server.exists()  # nothing made in a folder that is not the server's

    first_started(server)
    added = run_cli(
        "central", "add-device", identity["public_key"], "--label", "CT room", data_dir=server
    )
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["device_id"] == identity["device_id"]
    listed = [
        json.loads(line)
        for line in run_cli("central", "devices", data_dir=server).stdout.splitlines()
    ]
    assert [(d["device_id"], d["label"], d["revoked_at"]) for d in listed] == [
        (identity["device_id"], "CT room", None)
    ]
    revoked = run_cli("central", "revoke-device", identity["device_id"], data_dir=server)
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(revoked.stdout)["revoked_at"] is not None

    unknown = run_cli("central", "revoke-device", "dev-0000000000000000", data_dir=server)
    assert unknown.returncode == 2
    assert "unknown device id" in unknown.stderr


def test_keys_rotate_and_keep_the_retired_key(tmp_path: Path):
    assert run_cli("central", "keys", data_dir=tmp_path).returncode == 2  # not the server's
    first_started(tmp_path)
    first = json.loads(run_cli("central", "keys", data_dir=tmp_path).stdout)
    rotated = run_cli("central", "keys", "--rotate", data_dir=tmp_path)
    assert rotated.returncode == 0, rotated.stderr
    second = json.loads(rotated.stdout)
    assert second["server_key_id"] != first["server_key_id"]
    assert second["retired_key_ids"] == [first["server_key_id"]]
    assert second["receipt_public_key"] == first["receipt_public_key"]


def test_an_empty_queue_and_an_empty_server_list_nothing(tmp_path: Path):
    status = run_cli("queue", "status", "--json", data_dir=tmp_path)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["pending"] == 0
    assert run_cli("queue", "list", "--json", data_dir=tmp_path).stdout == ""
    assert run_cli("central", "cases", "--json", data_dir=tmp_path).stdout == ""


def test_drain_without_a_central_server_is_a_configuration_error(tmp_path: Path):
    run = run_cli("queue", "drain", data_dir=tmp_path)
    assert run.returncode == 2
    assert "no central server is configured" in run.stderr


def test_retry_needs_the_admin_password(tmp_path: Path):
    run = run_cli("queue", "retry", "--all", "--admin-password-stdin", data_dir=tmp_path)
    assert run.returncode == 2
    assert "admin_auth_failed" in run.stderr


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (
            ("keys", "--rotate", "--prune-days", "-1"),
            "--prune-days: must be 0 to 3650 days (got -1)",
        ),
        (("keys", "--prune-days", "99999999999"), "--prune-days: must be 0 to 3650 days"),
        (("keys", "--rotate", "--prune-days", "soon"), "--prune-days: must be a whole number"),
        (
            ("serve", "--tls-cert", "c.pem", "--tls-key", "k.pem", "--max-queue-age-days", "0"),
            "--max-queue-age-days: must be 1 to 3650 days (got 0)",
        ),
        (
            ("serve", "--tls-cert", "c.pem", "--tls-key", "k.pem", "--max-queue-age-days", "1e11"),
            "--max-queue-age-days: must be a whole number",
        ),
        (
            (
                "serve",
                "--tls-cert",
                "c.pem",
                "--tls-key",
                "k.pem",
                "--max-queue-age-days",
                "99999999999",
            ),
            "--max-queue-age-days: must be 1 to 3650 days",
        ),
    ],
)
def test_day_counts_out_of_range_are_usage_errors_before_anything_changes(
    flags: tuple[str, ...], reason: str, tmp_path: Path
) -> None:
    """``--rotate --prune-days -1`` used to rotate the key, then crash (70) in the prune."""
    before = run_cli("central", "keys", data_dir=first_started(tmp_path))
    assert before.returncode == 0, before.stderr
    run = run_cli("central", *flags, data_dir=tmp_path)
    assert run.returncode == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and reason in errors[0], run.stderr
    assert "Traceback" not in run.stderr and "internal_error" not in run.stderr
    assert run_cli("central", "keys", data_dir=tmp_path).stdout == before.stdout  # not rotated


def _certificate(data_dir: Path) -> tuple[Path, Path]:
    made = run_cli("central", "make-cert", data_dir=data_dir)
    assert made.returncode == 0, made.stderr
    paths = json.loads(made.stdout)
    return Path(paths["cert"]), Path(paths["key"])


def test_serve_refuses_a_tls_private_key_others_can_read(tmp_path: Path) -> None:
    cert, key = _certificate(tmp_path)
    key.chmod(0o644)
    run = run_cli(
        "central", "serve", "--port", "0", "--tls-cert", cert, "--tls-key", key, data_dir=tmp_path
    )
    assert run.returncode == 2, run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith(f"triage-app: error: key_invalid: central.tls_key: {key}: ")
    assert "permissions 0644 are too open" in line


def test_serve_logs_where_it_listens_without_being_asked(tmp_path: Path) -> None:
    """A server's log is its only voice: ``listening on`` and the start-up counts at INFO."""
    cert, key = _certificate(tmp_path)
    lines = serve_until_listening(_serve_command(tmp_path, cert, key, "--port", "0"))
    assert any("listening on 127.0.0.1:" in line for line in lines), lines


def _serve_command(data_dir: Path, cert: Path, key: Path, *flags: str) -> list[str]:
    return [
        *(sys.executable, "-m", "triage_app", "central", "serve", *flags),
        *("--tls-cert", str(cert), "--tls-key", str(key), "--data-dir", str(data_dir)),
    ]


def _log_records(text: str) -> list[dict[str, Any]]:
    """Every line of a ``--log-format json`` log, each a JSON object (or the test fails)."""
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    """A real datagram socket where systemd's would be, for $NOTIFY_SOCKET."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.settimeout(60)
        yield sock


@pytest.mark.timeout(180)
def test_serve_tells_systemd_it_is_ready_once_it_listens_pings_the_watchdog_and_stops(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    """As the unit runs it (Type=notify, WatchdogSec=): READY=1 when a request is answered at
    once, WATCHDOG=1 every half interval, STOPPING=1 on SIGTERM, then exit 0; JSON logs."""
    cert, key = _certificate(tmp_path)
    watchdog_s = 2.0
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_APP_")}
    env |= {
        "NOTIFY_SOCKET": notify_socket.getsockname(),
        "WATCHDOG_USEC": str(int(watchdog_s * 1e6)),
    }
    command = _serve_command(tmp_path, cert, key, "--port", "0", "--log-format", "json")
    log = tmp_path / "server.log"
    with (
        log.open("w") as stderr,
        subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env) as server,
    ):
        try:
            assert notify_socket.recv(64) == b"READY=1", log.read_text()
            # Logged before READY=1 was sent: where it listens, and the app's startup (its
            # verdict worker) has run.
            messages = [record["message"] for record in _log_records(log.read_text())]
            (listening,) = [m for m in messages if "listening on 127.0.0.1:" in m]
            assert any(m.startswith("verdict worker started") for m in messages), messages
            found = re.search(r"127\.0\.0\.1:(\d+) ", listening)
            assert found is not None
            with requests.Session() as http:
                http.trust_env = False
                health = http.get(
                    f"https://127.0.0.1:{found[1]}/v1/health", verify=str(cert), timeout=10
                )
            assert health.status_code == 200, health.text

            # Timed from here, the test waiting in recv: pings queued meanwhile are dropped.
            notify_socket.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:
                    assert notify_socket.recv(64) == b"WATCHDOG=1"
            notify_socket.settimeout(60)
            pings = []
            for _ in range(3):
                assert notify_socket.recv(64) == b"WATCHDOG=1"
                pings.append(time.monotonic())
            gaps = [later - earlier for earlier, later in itertools.pairwise(pings)]
            assert max(gaps) < watchdog_s, gaps  # systemd's limit, never reached
            assert sum(gaps) / len(gaps) > watchdog_s / 4, gaps  # paced, not a burst

            server.send_signal(signal.SIGTERM)
            after_term = [notify_socket.recv(64)]
            while after_term[-1] == b"WATCHDOG=1":  # one may have been on its way
                after_term.append(notify_socket.recv(64))
            assert after_term[-1] == b"STOPPING=1", after_term
            returncode = server.wait(timeout=60)
        finally:
            if server.poll() is None:
                server.kill()
    output = log.read_text()
    assert returncode == 0, output
    records = _log_records(output)
    assert {r["level"] for r in records} <= {"INFO"}, output
    assert records[-1]["message"] == "central server stopped"
    notify_socket.setblocking(False)
    with pytest.raises(BlockingIOError):  # nothing after STOPPING=1
        notify_socket.recv(64)


@pytest.mark.timeout(180)
def test_a_port_still_taken_stops_serve_with_75_and_one_line(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    """As the DICOM receiver: the port the instance before still holds while it closes comes
    free, so systemd's restart is the cure (exit 75, not 2), and it never says READY=1."""
    cert, key = _certificate(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = run_cli(
            *("central", "serve", "--port", str(port), "--log-format", "json"),
            *("--tls-cert", cert, "--tls-key", key),
            data_dir=tmp_path,
            env={"NOTIFY_SOCKET": notify_socket.getsockname()},
            timeout=150,
        )
    assert run.returncode == 75, run.stderr
    # Every line JSON, the one it stopped on too (with its code).
    errors = [r for r in _log_records(run.stderr) if r["level"] == "ERROR"]
    assert [(r["code"], r["message"]) for r in errors] == [
        ("port_in_use", f"central: cannot listen on 127.0.0.1:{port} (Address already in use)")
    ]
    notify_socket.setblocking(False)
    with pytest.raises(BlockingIOError):
        notify_socket.recv(64)


def test_serve_takes_the_device_services_log_format_option() -> None:
    """``--log-format`` means for the central server what it means for watch and receive."""
    parser = cli._parser()
    serve = ["central", "serve", "--tls-cert", "c", "--tls-key", "k", "--data-dir", "d"]
    for command in (["watch"], ["receive"], serve):
        assert parser.parse_args(command).log_format == "text"
        assert parser.parse_args([*command, "--log-format", "json"]).log_format == "json"
        with pytest.raises(SystemExit):
            parser.parse_args([*command, "--log-format", "xml"])
