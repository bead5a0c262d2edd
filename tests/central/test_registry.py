"""The device registry: ids derived from keys, idempotent adds, permanent revocation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.central.conftest import new_device
from triage_app.central.errors import DeviceRegistryError
from triage_app.central.storage import CentralStore
from triage_app.errors import KeyFileError


def open_store(folder: Path) -> CentralStore:
    return CentralStore.open(folder / "central.sqlite3", folder / "cases")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CentralStore]:
    with open_store(tmp_path) as opened:
        yield opened


def test_a_device_is_registered_under_the_id_its_key_gives(store: CentralStore) -> None:
    device = new_device()

    record = store.registry.add_device(device.public_key_b64(), "  ward  3 ")

    assert record.device_id == device.device_id
    assert record.label == "ward 3"
    assert not record.revoked
    assert record.public_key().public_bytes_raw() == device.public_key_bytes()
    assert store.registry.get(device.device_id) == record
    assert store.registry.list_devices() == [record]


def test_adding_the_same_key_twice_is_idempotent(store: CentralStore) -> None:
    device = new_device()
    first = store.registry.add_device(device.public_key_b64(), "a")

    again = store.registry.add_device(
        device.public_key_b64(), "another label", device_id=device.device_id
    )

    assert again == first
    assert len(store.registry.list_devices()) == 1


def test_an_id_that_does_not_match_its_key_is_refused(store: CentralStore) -> None:
    device, other = new_device(), new_device()
    store.registry.add_device(device.public_key_b64())

    with pytest.raises(DeviceRegistryError, match="does not match"):
        store.registry.add_device(other.public_key_b64(), device_id=device.device_id)
    assert store.registry.get(device.device_id) is not None
    assert store.registry.get(other.device_id) is None


@pytest.mark.parametrize("text", ["not base64!", "AAAA", ""])
def test_a_bad_key_is_refused_in_one_line(store: CentralStore, text: str) -> None:
    with pytest.raises(KeyFileError) as caught:
        store.registry.add_device(text)
    assert "device public key" in str(caught.value)
    assert store.registry.list_devices() == []


def test_revocation_is_kept_and_adding_the_key_again_is_refused(tmp_path: Path) -> None:
    device = new_device()
    with open_store(tmp_path) as store:
        store.registry.add_device(device.public_key_b64())

        revoked = store.registry.revoke_device(device.device_id)
        twice = store.registry.revoke_device(device.device_id)
        with pytest.raises(DeviceRegistryError, match="stays revoked") as caught:
            store.registry.add_device(device.public_key_b64())

        assert revoked.revoked and twice.revoked_at == revoked.revoked_at
        assert "\n" not in str(caught.value)
    with open_store(tmp_path) as reopened:
        record = reopened.registry.get(device.device_id)
        assert record is not None and record.revoked


def test_revoking_an_unknown_device_is_refused(store: CentralStore) -> None:
    with pytest.raises(DeviceRegistryError, match="unknown device"):
        store.registry.revoke_device("dev-0000000000000000")
