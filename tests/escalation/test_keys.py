"""Device identity and the server key ring: private files, stable ids, rotation and pruning."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tests.test_secrets import ROOT, give_to_service_user, reachable_folder, run_as_service_user
from triage_app.errors import ConfigError, KeyFileError, UnknownServerKeyError
from triage_app.escalation.envelope import Payload, open_envelope, seal
from triage_app.escalation.keys import (
    DeviceIdentity,
    ServerKeyRing,
    ServerPublicKey,
    device_id_for,
    device_key_path,
    ed25519_public_key_from_b64,
    key_id_for,
    load_or_create_device_identity,
    server_id_for,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
CASE_ID = hashlib.sha256(b"case").hexdigest()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def pem(key: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# --- Ids ----------------------------------------------------------------------------------------


def test_ids_are_prefixed_sha256_of_the_raw_public_key() -> None:
    signing = Ed25519PrivateKey.generate()
    raw = signing.public_key().public_bytes_raw()
    digest = hashlib.sha256(raw).hexdigest()
    assert device_id_for(signing.public_key()) == "dev-" + digest[:16]
    assert server_id_for(signing.public_key()) == "srv-" + digest[:16]
    sealing = X25519PrivateKey.generate().public_key()
    assert key_id_for(sealing) == hashlib.sha256(sealing.public_bytes_raw()).hexdigest()[:16]


# --- Device identity ----------------------------------------------------------------------------


def test_device_key_is_created_0600_pkcs8_in_a_0700_folder(tmp_path: Path) -> None:
    identity = load_or_create_device_identity(tmp_path / "data")
    path = tmp_path / "data" / "keys" / "device_ed25519.pem"
    assert device_key_path(tmp_path / "data") == path
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(loaded, Ed25519PrivateKey)
    # Unencrypted PKCS8 PEM, byte for byte.
    pkcs8 = loaded.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert path.read_bytes() == pkcs8
    assert loaded.public_key().public_bytes_raw() == identity.public_key_bytes()


def test_device_identity_is_stable_across_calls(tmp_path: Path) -> None:
    first = load_or_create_device_identity(tmp_path)
    second = load_or_create_device_identity(tmp_path)
    assert first.device_id == second.device_id
    assert first.public_key_bytes() == second.public_key_bytes()
    assert first.device_id == device_id_for(first.public_key())
    assert len(first.public_key_bytes()) == 32
    assert base64.b64decode(first.public_key_b64()) == first.public_key_bytes()
    assert first.device_id.startswith("dev-") and len(first.device_id) == 20


def test_devices_differ(tmp_path: Path) -> None:
    a = load_or_create_device_identity(tmp_path / "a")
    b = load_or_create_device_identity(tmp_path / "b")
    assert a.device_id != b.device_id


def test_concurrent_first_runs_agree_on_one_identity(tmp_path: Path) -> None:
    results: list[str] = []
    barrier = threading.Barrier(8)

    def create() -> None:
        barrier.wait()
        results.append(load_or_create_device_identity(tmp_path).device_id)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8 and len(set(results)) == 1
    assert [p.name for p in (tmp_path / "keys").iterdir()] == ["device_ed25519.pem"]


def test_an_existing_device_key_is_used_as_is(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    path = device_key_path(tmp_path)
    path.parent.mkdir(mode=0o700)
    path.write_bytes(pem(key))
    path.chmod(0o600)
    assert load_or_create_device_identity(tmp_path).device_id == device_id_for(key.public_key())


@pytest.mark.parametrize("loose", [0o644, 0o640, 0o604, 0o660])
def test_a_device_key_readable_by_others_is_refused_not_replaced(
    tmp_path: Path, loose: int
) -> None:
    load_or_create_device_identity(tmp_path)
    path = device_key_path(tmp_path)
    before = path.read_bytes()
    path.chmod(loose)
    with pytest.raises(KeyFileError, match=rf"permissions {loose:04o} are too open.*chmod 600"):
        load_or_create_device_identity(tmp_path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("loose", [0o755, 0o750, 0o701])
def test_an_open_key_folder_is_refused(tmp_path: Path, loose: int) -> None:
    load_or_create_device_identity(tmp_path)
    (tmp_path / "keys").chmod(loose)
    with pytest.raises(KeyFileError, match=rf"folder permissions {loose:04o}.*chmod 700"):
        load_or_create_device_identity(tmp_path)


def test_an_open_key_folder_is_refused_before_a_key_is_created(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir(mode=0o755)
    (tmp_path / "keys").chmod(0o755)
    with pytest.raises(KeyFileError):
        load_or_create_device_identity(tmp_path)
    assert not device_key_path(tmp_path).exists()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "not an unencrypted PKCS8 PEM key"),
        (b"garbage", "not an unencrypted PKCS8 PEM key"),
        (pem(X25519PrivateKey.generate()), "not an Ed25519 key"),
        (b"-" * 20_000, "larger than any key file"),
    ],
    ids=["empty", "garbage", "x25519", "huge"],
)
def test_a_damaged_device_key_is_refused_not_replaced(
    tmp_path: Path, content: bytes, match: str
) -> None:
    load_or_create_device_identity(tmp_path)
    path = device_key_path(tmp_path)
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match=match) as caught:
        load_or_create_device_identity(tmp_path)
    assert isinstance(caught.value, ConfigError)
    assert path.read_bytes() == content


def test_an_encrypted_device_key_is_refused(tmp_path: Path) -> None:
    load_or_create_device_identity(tmp_path)
    encrypted = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"password"),
    )
    device_key_path(tmp_path).write_bytes(encrypted)
    with pytest.raises(KeyFileError, match="unencrypted"):
        load_or_create_device_identity(tmp_path)


def test_a_linked_device_key_is_refused(tmp_path: Path) -> None:
    load_or_create_device_identity(tmp_path / "elsewhere")
    path = device_key_path(tmp_path)
    path.parent.mkdir(mode=0o700)
    path.symlink_to(device_key_path(tmp_path / "elsewhere"))
    with pytest.raises(KeyFileError, match="not a link"):
        load_or_create_device_identity(tmp_path)


def test_a_dangling_link_is_refused_not_replaced(tmp_path: Path) -> None:
    path = device_key_path(tmp_path)
    path.parent.mkdir(mode=0o700)
    path.symlink_to(tmp_path / "nowhere.pem")
    with pytest.raises(KeyFileError, match="not a link"):
        load_or_create_device_identity(tmp_path)
    assert not (tmp_path / "nowhere.pem").exists()


def test_a_directory_in_place_of_the_key_is_refused(tmp_path: Path) -> None:
    device_key_path(tmp_path).mkdir(parents=True)
    device_key_path(tmp_path).parent.chmod(0o700)
    with pytest.raises(KeyFileError):
        load_or_create_device_identity(tmp_path)


# The device key as the service user meets it when an admin's first run as root left root's
# files: run in a child process as that user (helpers: tests/test_secrets.py).
_LOAD_DEVICE_KEY = """
import json, sys
from pathlib import Path
from triage_app.errors import KeyFileError
from triage_app.escalation.keys import load_or_create_device_identity
try:
    load_or_create_device_identity(Path(sys.argv[1]))
    print(json.dumps({"error": None}))
except KeyFileError as err:
    print(json.dumps({"error": str(err)}))
"""


def test_a_key_folder_left_to_root_says_cannot_read_not_cannot_write() -> None:
    """``sudo triage-app device`` first: the key is there, in a folder the service user may
    not enter. It said "cannot write the key file" (the key looked missing); now it says the
    folder cannot be read, whose it is and the command that fixes it."""
    with reachable_folder() as base:
        data = base / "data"
        created = load_or_create_device_identity(data)  # as root
        give_to_service_user(base, data)
        keys = data / "keys"

        result = run_as_service_user(_LOAD_DEVICE_KEY, data, home=base)

        assert result["error"] == (
            f"{keys}: cannot read the key folder: owned by {ROOT}, not by nobody, the user this "
            f"runs as (mode 0700): chown -R nobody: {data}"
        )
        assert load_or_create_device_identity(data) == created  # as root: untouched


def test_a_device_key_left_to_root_says_cannot_read_it_and_the_fix() -> None:
    with reachable_folder() as base:
        data = base / "data"
        load_or_create_device_identity(data)  # as root
        give_to_service_user(base, data, data / "keys")

        result = run_as_service_user(_LOAD_DEVICE_KEY, data, home=base)

        assert result["error"] == (
            f"{device_key_path(data)}: cannot read the device signing key: owned by {ROOT}, not "
            f"by nobody, the user this runs as (mode 0600): chown -R nobody: {data}"
        )


def test_a_device_key_that_cannot_be_created_says_cannot_write_and_why() -> None:
    with reachable_folder() as base:
        data = base / "data"
        (data / "keys").mkdir(parents=True)
        give_to_service_user(base, data)
        give_to_service_user(data / "keys", mode=0o500)

        result = run_as_service_user(_LOAD_DEVICE_KEY, data, home=base)

        assert result["error"] == (
            f"{device_key_path(data)}: cannot write the key file: its mode is 0500: "
            f"chmod u+w {data / 'keys'}"
        )
        assert not device_key_path(data).exists()


def test_device_identity_must_match_its_key() -> None:
    key = Ed25519PrivateKey.generate()
    with pytest.raises(ValueError, match="does not belong"):
        DeviceIdentity("dev-0000000000000000", key)
    identity = DeviceIdentity.from_signing_key(key)
    assert "PRIVATE" not in repr(identity) and identity.device_id in repr(identity)


# --- Public keys from settings ------------------------------------------------------------------


def test_server_public_key_from_b64_round_trip() -> None:
    public = X25519PrivateKey.generate().public_key()
    text = base64.b64encode(public.public_bytes_raw()).decode()
    parsed = ServerPublicKey.from_b64(text)
    assert parsed.key_id == key_id_for(public)
    assert parsed.to_b64() == text
    assert ServerPublicKey.from_b64(f"  {text}\n") == parsed


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("not base64!", "not valid base64"),
        (base64.b64encode(bytes(31)).decode(), "found 31 bytes"),
        (base64.b64encode(bytes(33)).decode(), "found 33 bytes"),
        ("", "found 0 bytes"),
    ],
)
def test_bad_public_keys_from_settings_are_refused(text: str, match: str) -> None:
    with pytest.raises(KeyFileError, match=match):
        ServerPublicKey.from_b64(text)
    with pytest.raises(KeyFileError, match=match):
        ed25519_public_key_from_b64(text)


def test_server_public_key_must_match_its_id() -> None:
    with pytest.raises(ValueError, match="does not belong"):
        ServerPublicKey("0" * 16, X25519PrivateKey.generate().public_key())


# --- Server key ring ----------------------------------------------------------------------------


def test_first_run_creates_one_key_of_each_kind_privately(tmp_path: Path) -> None:
    ring = ServerKeyRing.load_or_create(tmp_path / "central", now=T0)
    keys_dir = tmp_path / "central" / "keys"
    assert ring.keys_dir == keys_dir
    names = sorted(p.name for p in keys_dir.iterdir())
    assert names == sorted(
        [f"x25519-{ring.active.key_id}.pem", "receipt_ed25519.pem", "ring.json", ".ring.lock"]
    )
    assert mode(keys_dir) == 0o700
    assert all(mode(p) == 0o600 for p in keys_dir.iterdir())
    assert list(ring.private_keys) == [ring.active.key_id]
    assert ring.retired_key_ids == []
    assert ring.retired_at(ring.active.key_id) is None
    assert ring.server_id == server_id_for(ring.receipt_key.public_key())
    assert ring.server_id.startswith("srv-") and len(ring.server_id) == 20


def test_the_ring_is_stable_across_loads(tmp_path: Path) -> None:
    first = ServerKeyRing.load_or_create(tmp_path)
    second = ServerKeyRing.load_or_create(tmp_path)
    assert first.active == second.active
    assert first.server_id == second.server_id
    assert first.public_info() == second.public_info()


def test_public_info_is_the_keys_endpoint_body(tmp_path: Path) -> None:
    ring = ServerKeyRing.load_or_create(tmp_path, now=T0)
    old = ring.active.key_id
    ring.rotate(now=T0 + timedelta(days=1))
    info = ring.public_info()
    assert set(info) == {
        "server_key_id",
        "server_public_key",
        "retired_key_ids",
        "server_id",
        "receipt_public_key",
    }
    assert info["server_key_id"] == ring.active.key_id
    assert info["retired_key_ids"] == [old]
    assert info["server_id"] == ring.server_id
    assert isinstance(info["server_public_key"], str)
    assert ServerPublicKey.from_b64(info["server_public_key"]) == ring.active
    assert isinstance(info["receipt_public_key"], str)
    receipt = ed25519_public_key_from_b64(info["receipt_public_key"])
    assert server_id_for(receipt) == ring.server_id
    assert "PRIVATE" not in json.dumps(info)


def test_rotation_keeps_the_old_key_for_old_envelopes(tmp_path: Path) -> None:
    device = DeviceIdentity.from_signing_key(Ed25519PrivateKey.generate())
    ring = ServerKeyRing.load_or_create(tmp_path, now=T0)
    old = ring.active
    envelope = seal(Payload(b"{}", b"old"), case_id=CASE_ID, device=device, server_key=old)
    new_id = ring.rotate(now=T0 + timedelta(days=1))
    assert new_id == ring.active.key_id != old.key_id
    assert set(ring.private_keys) == {old.key_id, new_id}
    assert ring.retired_key_ids == [old.key_id]
    assert ring.retired_at(old.key_id) == T0 + timedelta(days=1)
    reloaded = ServerKeyRing.load_or_create(tmp_path)
    assert reloaded.active.key_id == new_id
    assert reloaded.retired_key_ids == [old.key_id]
    assert reloaded.retired_at(old.key_id) == T0 + timedelta(days=1)
    for keys in (ring.private_keys, reloaded.private_keys):
        opened = open_envelope(envelope, device_public_key=device.public_key(), server_keys=keys)
        assert bytes(opened.dicom) == b"old"


def test_pruning_removes_only_retired_keys_older_than_the_limit(tmp_path: Path) -> None:
    device = DeviceIdentity.from_signing_key(Ed25519PrivateKey.generate())
    ring = ServerKeyRing.load_or_create(tmp_path, now=T0)
    first = ring.active
    envelope = seal(Payload(b"{}", b"x"), case_id=CASE_ID, device=device, server_key=first)
    second = ring.rotate(now=T0 + timedelta(days=10))  # first retired at day 10
    third = ring.rotate(now=T0 + timedelta(days=20))  # second retired at day 20
    assert ring.prune(timedelta(days=30), now=T0 + timedelta(days=40)) == []
    assert ring.prune(timedelta(days=30), now=T0 + timedelta(days=45)) == [first.key_id]
    assert set(ring.private_keys) == {second, third}
    assert not (tmp_path / "keys" / f"x25519-{first.key_id}.pem").exists()
    with pytest.raises(UnknownServerKeyError, match=first.key_id):
        open_envelope(
            envelope, device_public_key=device.public_key(), server_keys=ring.private_keys
        )
    reloaded = ServerKeyRing.load_or_create(tmp_path)
    assert set(reloaded.private_keys) == {second, third}
    assert reloaded.active.key_id == third
    assert reloaded.retired_key_ids == [second]


def test_the_active_key_is_never_pruned(tmp_path: Path) -> None:
    ring = ServerKeyRing.load_or_create(tmp_path, now=T0)
    active = ring.active.key_id
    assert ring.prune(timedelta(0), now=T0 + timedelta(days=3650)) == []
    assert list(ring.private_keys) == [active]
    with pytest.raises(ValueError, match="negative"):
        ring.prune(timedelta(seconds=-1))


def test_private_keys_is_a_read_only_snapshot(tmp_path: Path) -> None:
    ring = ServerKeyRing.load_or_create(tmp_path)
    keys = ring.private_keys
    with pytest.raises(TypeError):
        keys["x"] = X25519PrivateKey.generate()  # type: ignore[index]
    ring.rotate()
    assert len(keys) == 1 and len(ring.private_keys) == 2


@pytest.mark.parametrize("name", ["receipt_ed25519.pem", "ring.json", "x25519"])
def test_a_ring_file_readable_by_others_is_refused(tmp_path: Path, name: str) -> None:
    ring = ServerKeyRing.load_or_create(tmp_path)
    filename = f"x25519-{ring.active.key_id}.pem" if name == "x25519" else name
    (tmp_path / "keys" / filename).chmod(0o644)
    with pytest.raises(KeyFileError, match="too open"):
        ServerKeyRing.load_or_create(tmp_path)


def test_an_open_ring_folder_is_refused(tmp_path: Path) -> None:
    ServerKeyRing.load_or_create(tmp_path)
    (tmp_path / "keys").chmod(0o755)
    with pytest.raises(KeyFileError, match="chmod 700"):
        ServerKeyRing.load_or_create(tmp_path)


def test_a_key_file_holding_another_key_is_refused(tmp_path: Path) -> None:
    ring = ServerKeyRing.load_or_create(tmp_path)
    path = tmp_path / "keys" / f"x25519-{ring.active.key_id}.pem"
    path.write_bytes(pem(X25519PrivateKey.generate()))
    with pytest.raises(KeyFileError, match="another key than its name says"):
        ServerKeyRing.load_or_create(tmp_path)


def test_an_ed25519_key_in_an_x25519_slot_is_refused(tmp_path: Path) -> None:
    ring = ServerKeyRing.load_or_create(tmp_path)
    path = tmp_path / "keys" / f"x25519-{ring.active.key_id}.pem"
    path.write_bytes(pem(Ed25519PrivateKey.generate()))
    with pytest.raises(KeyFileError, match="not an X25519 key"):
        ServerKeyRing.load_or_create(tmp_path)


def test_a_missing_active_key_is_refused(tmp_path: Path) -> None:
    ring = ServerKeyRing.load_or_create(tmp_path)
    (tmp_path / "keys" / f"x25519-{ring.active.key_id}.pem").unlink()
    with pytest.raises(KeyFileError, match="active server key is missing"):
        ServerKeyRing.load_or_create(tmp_path)


@pytest.mark.expect_log_warnings
def test_a_missing_retired_key_is_dropped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ring = ServerKeyRing.load_or_create(tmp_path)
    old = ring.active.key_id
    ring.rotate()
    (tmp_path / "keys" / f"x25519-{old}.pem").unlink()
    reloaded = ServerKeyRing.load_or_create(tmp_path)
    assert list(reloaded.private_keys) == [ring.active.key_id]
    assert any(old in record.getMessage() for record in caplog.records)
    assert old not in (tmp_path / "keys" / "ring.json").read_text()


def test_a_key_file_the_ring_does_not_list_is_kept_as_retired(tmp_path: Path) -> None:
    ring = ServerKeyRing.load_or_create(tmp_path, now=T0)
    spare = X25519PrivateKey.generate()
    spare_id = key_id_for(spare.public_key())
    path = tmp_path / "keys" / f"x25519-{spare_id}.pem"
    path.write_bytes(pem(spare))
    path.chmod(0o600)
    later = T0 + timedelta(days=5)
    reloaded = ServerKeyRing.load_or_create(tmp_path, now=later)
    assert reloaded.active == ring.active
    assert reloaded.retired_key_ids == [spare_id]
    assert reloaded.retired_at(spare_id) == later
    assert spare_id in (tmp_path / "keys" / "ring.json").read_text()


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"[]",
        b'{"version": 2, "keys": {}}',
        b'{"version": 1, "keys": {}}',
        b'{"version": 1, "keys": {"XYZ": {"created_at": "2026-01-01T00:00:00+00:00"}}}',
        b'{"version": 1, "keys": {"0123456789abcdef": {"created_at": "yesterday"}}}',
    ],
)
def test_a_damaged_ring_file_is_refused(tmp_path: Path, content: bytes) -> None:
    ServerKeyRing.load_or_create(tmp_path)
    (tmp_path / "keys" / "ring.json").write_bytes(content)
    with pytest.raises(KeyFileError, match="damaged key ring"):
        ServerKeyRing.load_or_create(tmp_path)


def test_a_ring_with_two_active_keys_is_refused(tmp_path: Path) -> None:
    ring = ServerKeyRing.load_or_create(tmp_path)
    ring.rotate()
    path = tmp_path / "keys" / "ring.json"
    body = json.loads(path.read_text())
    for entry in body["keys"].values():
        entry["retired_at"] = None
    path.write_text(json.dumps(body))
    with pytest.raises(KeyFileError, match="exactly one active key"):
        ServerKeyRing.load_or_create(tmp_path)


def test_a_lost_ring_file_with_one_key_is_rebuilt(tmp_path: Path) -> None:
    ring = ServerKeyRing.load_or_create(tmp_path)
    (tmp_path / "keys" / "ring.json").unlink()
    assert ServerKeyRing.load_or_create(tmp_path).active == ring.active


def test_a_lost_ring_file_with_several_keys_is_refused(tmp_path: Path) -> None:
    ring = ServerKeyRing.load_or_create(tmp_path)
    ring.rotate()
    (tmp_path / "keys" / "ring.json").unlink()
    with pytest.raises(KeyFileError, match="cannot be told"):
        ServerKeyRing.load_or_create(tmp_path)


def test_concurrent_first_runs_agree_on_the_active_key(tmp_path: Path) -> None:
    results: list[str] = []
    barrier = threading.Barrier(6)

    def create() -> None:
        barrier.wait()
        results.append(ServerKeyRing.load_or_create(tmp_path).active.key_id)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 6 and len(set(results)) == 1
    assert ServerKeyRing.load_or_create(tmp_path).active.key_id == results[0]


def test_times_must_be_timezone_aware(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        ServerKeyRing.load_or_create(tmp_path, now=datetime(2026, 1, 1))


def test_a_stale_ring_does_not_undo_another_rotation(tmp_path: Path) -> None:
    first = ServerKeyRing.load_or_create(tmp_path, now=T0)
    stale = ServerKeyRing.load_or_create(tmp_path, now=T0)
    original = first.active.key_id
    by_first = first.rotate(now=T0 + timedelta(days=1))
    by_stale = stale.rotate(now=T0 + timedelta(days=2))
    reloaded = ServerKeyRing.load_or_create(tmp_path)
    assert reloaded.active.key_id == by_stale
    assert reloaded.retired_key_ids == [original, by_first]
    assert reloaded.retired_at(by_first) == T0 + timedelta(days=2)
    assert set(stale.private_keys) == {original, by_first, by_stale}
