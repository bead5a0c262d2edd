"""The central server's administrative commands and the device's identity, as real processes."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.helpers import run_cli


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
