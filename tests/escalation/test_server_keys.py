"""The central server's keys as the device keeps them (``keys/central_keys.json``).

What the site admin found: a ``queue drain`` (or ``receive``) run as root rewrote the service
user's kept copy as root's 0600, even with the same keys, and the service then stopped with
"delete the file to fetch them again" instead of the owner and the ``chown``, as the other key
files say. These tests run as root; the service user is ``nobody`` (``tests/test_secrets.py``).
"""

from __future__ import annotations

import base64
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tests.escalation.conftest import Central, Device
from tests.helpers import CliRun, run_cli
from tests.test_secrets import (
    ROOT,
    SERVICE_USER,
    give_to_service_user,
    reachable_folder,
    run_as_service_user,
)
from triage_app.config import save_settings
from triage_app.errors import KeyFileError
from triage_app.escalation.keys import ServerPublicKey
from triage_app.escalation.server_keys import (
    CentralKeys,
    central_keys_path,
    fetch_central_keys,
    keys_from_b64,
    load_central_keys,
)
from triage_app.escalation.transport import CentralClient


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def new_keys() -> CentralKeys:
    """Keys of a server that is not the one the tests talk to."""
    server = ServerPublicKey.from_public_key(X25519PrivateKey.generate().public_key())
    receipt = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    return keys_from_b64(server.to_b64(), b64(receipt))


@dataclass
class AnsweringServer:
    """Stands in for the client: ``fetch_central_keys`` only asks it for the keys."""

    keys: CentralKeys

    def get_keys(self) -> dict[str, Any]:
        return dict(self.keys.to_json())


def fetch(keys: CentralKeys, data_dir: Path) -> CentralKeys:
    return fetch_central_keys(cast(CentralClient, AnsweringServer(keys)), data_dir)


def kept_by_the_service_user(data_dir: Path, keys: CentralKeys, mode: int = 0o600) -> Path:
    """A kept copy as the service wrote it: the service user's, in its 0700 key folder."""
    path = central_keys_path(data_dir)
    path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    path.write_text(json.dumps(keys.to_json(), indent=2), encoding="utf-8")
    give_to_service_user(data_dir, path.parent)
    give_to_service_user(path, mode=mode)
    return path


def owner_and_mode(path: Path) -> tuple[int, int, int]:
    info = path.stat()
    return info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)


def untouched(info: os.stat_result, path: Path) -> bool:
    now = path.stat()
    return (now.st_ino, now.st_mtime_ns, now.st_uid, now.st_mode) == (
        info.st_ino,
        info.st_mtime_ns,
        info.st_uid,
        info.st_mode,
    )


SERVICE_OWNED = (SERVICE_USER.pw_uid, SERVICE_USER.pw_gid)


# --- Fetching the keys again, as root ---------------------------------------------------------


def test_keys_fetched_again_unchanged_are_not_written_again(tmp_path: Path) -> None:
    keys = new_keys()
    path = kept_by_the_service_user(tmp_path, keys)
    before = path.stat()

    assert fetch(keys, tmp_path).to_json() == keys.to_json()

    assert untouched(before, path)


def test_new_keys_fetched_as_root_keep_the_service_users_owner_and_mode(tmp_path: Path) -> None:
    path = kept_by_the_service_user(tmp_path, new_keys(), mode=0o640)
    server = new_keys()

    fetch(server, tmp_path)

    assert json.loads(path.read_text(encoding="utf-8")) == server.to_json()
    assert owner_and_mode(path) == (*SERVICE_OWNED, 0o640)
    kept = load_central_keys(tmp_path, server_public_key=None, receipt_public_key=None)
    assert kept is not None and kept.to_json() == server.to_json()


def test_keys_fetched_for_the_first_time_are_this_users_0600(tmp_path: Path) -> None:
    keys = new_keys()
    fetch(keys, tmp_path)
    assert owner_and_mode(central_keys_path(tmp_path)) == (os.geteuid(), os.getegid(), 0o600)


def run_as_root(*args: str | Path, config: Path, data_dir: Path) -> CliRun:
    return run_cli(*args, "--config", config, data_dir=data_dir)


@pytest.mark.timeout(240)
def test_queue_drain_as_root_leaves_the_service_users_kept_keys_its_own(
    central: Central, device: Device, tmp_path: Path
) -> None:
    """The real command, on a data folder the service user owns: the keys it fetches again
    at its start leave the kept copy alone when they are the same, and keep its owner and
    mode when the server has new ones."""
    central.register(device.identity)
    settings = device.settings(central)
    config = save_settings(settings, tmp_path / "settings.toml")
    path = kept_by_the_service_user(device.data_dir, new_keys())  # not the server's: stale

    stale = run_as_root("queue", "drain", config=config, data_dir=device.data_dir)

    assert stale.returncode == 0, stale.stderr
    server = load_central_keys(device.data_dir, server_public_key=None, receipt_public_key=None)
    assert server is not None
    assert (
        server.to_json()["server_public_key"]
        == (central.public_keys()["escalation.server_public_key"])
    )
    assert owner_and_mode(path) == (*SERVICE_OWNED, 0o600)

    before = path.stat()
    same = run_as_root("queue", "drain", config=config, data_dir=device.data_dir)

    assert same.returncode == 0, same.stderr
    assert untouched(before, path)


# --- Reading the kept copy as the service user -------------------------------------------------

_LOAD_KEPT_KEYS = """
import json, sys
from pathlib import Path
from triage_app.errors import KeyFileError
from triage_app.escalation.server_keys import load_central_keys
try:
    load_central_keys(Path(sys.argv[1]), server_public_key=None, receipt_public_key=None)
    print(json.dumps({"error": None}))
except KeyFileError as err:
    print(json.dumps({"error": str(err)}))
"""


def test_kept_keys_left_to_root_say_whose_they_are_and_the_chown() -> None:
    """It said "cannot be read (PermissionError); delete the file to fetch them again": no
    owner, no fix, and advice that root's next run would undo."""
    with reachable_folder() as base:
        data = base / "data"
        fetch(new_keys(), data)  # as root: root's 0600
        give_to_service_user(base, data, data / "keys")
        path = central_keys_path(data)

        result = run_as_service_user(_LOAD_KEPT_KEYS, data, home=base)

        assert result["error"] == (
            f"{path}: cannot read the kept central server keys: owned by {ROOT}, not by nobody, "
            f"the user this runs as (mode 0600): chown -R nobody: {data}"
        )
        assert path.exists()


def test_kept_keys_in_a_key_folder_left_to_root_say_so_and_the_chown() -> None:
    """Before, the check that the file exists raised an unexpected PermissionError."""
    with reachable_folder() as base:
        data = base / "data"
        fetch(new_keys(), data)  # as root: the key folder is root's 0700 too
        give_to_service_user(base, data)
        keys = data / "keys"

        result = run_as_service_user(_LOAD_KEPT_KEYS, data, home=base)

        assert result["error"] == (
            f"{central_keys_path(data)}: cannot read the kept central server keys: {keys} is "
            f"owned by {ROOT}, not by nobody, the user this runs as (mode 0700): "
            f"chown -R nobody: {data}"
        )


@pytest.mark.parametrize(
    ("content", "error"),
    [(b"{not json", "JSONDecodeError"), (b"{}", "KeyError"), (b"\xff\xfe", "UnicodeDecodeError")],
    ids=["not json", "no keys", "not utf-8"],
)
def test_a_damaged_kept_copy_still_says_to_delete_it(
    tmp_path: Path, content: bytes, error: str
) -> None:
    path = central_keys_path(tmp_path)
    path.parent.mkdir(mode=0o700)
    path.write_bytes(content)
    with pytest.raises(KeyFileError) as info:
        load_central_keys(tmp_path, server_public_key=None, receipt_public_key=None)
    assert str(info.value) == (
        f"{path}: the kept central server keys are damaged ({error}); "
        "delete the file to fetch them again"
    )


def test_no_kept_copy_means_keys_not_known_yet(tmp_path: Path) -> None:
    assert load_central_keys(tmp_path, server_public_key=None, receipt_public_key=None) is None
