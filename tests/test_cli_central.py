"""The central server's administrative commands and the device's identity, as real processes."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.helpers import run_cli, serve_until_listening


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
    before = run_cli("central", "keys", data_dir=tmp_path)
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
    command = [
        *(sys.executable, "-m", "triage_app", "central", "serve", "--port", "0"),
        *("--tls-cert", str(cert), "--tls-key", str(key), "--data-dir", str(tmp_path)),
    ]
    lines = serve_until_listening(command)
    assert any("listening on 127.0.0.1:" in line for line in lines), lines
