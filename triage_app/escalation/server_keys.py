"""The central server's public keys, as this device knows them.

Two keys matter: the X25519 key that envelopes are sealed to, and the Ed25519 key that signs
delivery receipts. An admin can paste both into the settings; otherwise they are fetched once
from ``GET /v1/keys`` over the verified (pinned or CA-checked) connection and kept in the data
folder, so the certificate pin is the one thing an admin must get right. Settings win over the
kept copy, and a kept copy is refreshed when the server announces a new active key.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from triage_app.errors import KeyFileError, TransportError
from triage_app.escalation.keys import ServerPublicKey, ed25519_public_key_from_b64
from triage_app.escalation.transport import CentralClient
from triage_app.paths import denied_because, ensure_private_dir, write_private_file

log = logging.getLogger(__name__)

_DENIED = frozenset({errno.EACCES, errno.EPERM})


@dataclass(frozen=True)
class CentralKeys:
    """What the device needs to seal for the server and to trust its receipts."""

    server_key: ServerPublicKey
    receipt_key: Ed25519PublicKey
    receipt_key_b64: str

    def to_json(self) -> dict[str, str]:
        return {
            "server_key_id": self.server_key.key_id,
            "server_public_key": self.server_key.to_b64(),
            "receipt_public_key": self.receipt_key_b64,
        }


def central_keys_path(data_dir: Path) -> Path:
    return data_dir / "keys" / "central_keys.json"


def keys_from_b64(server_public_key: str, receipt_public_key: str) -> CentralKeys:
    """Both keys from their base64 text; ``KeyFileError`` when either is not a valid key."""
    server_key = ServerPublicKey.from_b64(server_public_key)
    receipt_key = ed25519_public_key_from_b64(receipt_public_key, what="receipt public key")
    return CentralKeys(server_key, receipt_key, receipt_public_key)


def load_central_keys(
    data_dir: Path, *, server_public_key: str | None, receipt_public_key: str | None
) -> CentralKeys | None:
    """The keys from the settings, else the kept copy, else None (not known yet).

    A kept copy this user may not read (left root's by an admin's command as root) is refused
    with its owner, mode and the ``chown`` that fixes it, as the other key files are: deleting
    it, which a damaged copy calls for, would not fix the next one root leaves.
    """
    if server_public_key and receipt_public_key:
        return keys_from_b64(server_public_key, receipt_public_key)
    path = central_keys_path(data_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno in _DENIED:
            why = denied_because(err, path, os.R_OK, tree=data_dir)
            raise KeyFileError(f"{path}: cannot read the kept central server keys{why}") from None
        raise _damaged(path, err) from None
    except ValueError as err:  # not UTF-8
        raise _damaged(path, err) from None
    try:
        kept = json.loads(text)
        return keys_from_b64(
            server_public_key or str(kept["server_public_key"]),
            receipt_public_key or str(kept["receipt_public_key"]),
        )
    except (ValueError, KeyError, TypeError) as err:
        raise _damaged(path, err) from None


def _damaged(path: Path, err: Exception) -> KeyFileError:
    """A kept copy that cannot be used: the server has the keys, so fetching anew fixes it."""
    return KeyFileError(
        f"{path}: the kept central server keys are damaged ({type(err).__name__}); "
        "delete the file to fetch them again"
    )


def fetch_central_keys(client: CentralClient, data_dir: Path) -> CentralKeys:
    """Ask the server for its keys over the verified connection and keep them (0600).

    Keys the kept copy already holds are not written again: the uploader asks at every start
    and every hour, and a command run as root must not touch the service user's file for
    nothing. A copy root does replace keeps its owner, group and mode, so the services that run
    as their own user can still read it.
    """
    body: dict[str, Any] = client.get_keys()
    try:
        keys = keys_from_b64(str(body["server_public_key"]), str(body["receipt_public_key"]))
    except KeyError as err:
        raise TransportError(f"key fetch: the server's answer has no {err.args[0]}") from None
    if body.get("server_key_id") not in (None, keys.server_key.key_id):
        raise TransportError("key fetch: the server's key id does not match its key")
    path = central_keys_path(data_dir)
    if _kept_keys(path) == keys.to_json():
        log.debug("central server keys unchanged (encryption key %s)", keys.server_key.key_id)
        return keys
    ensure_private_dir(path.parent)
    write_private_file(path, json.dumps(keys.to_json(), indent=2).encode("utf-8"), keep_owner=True)
    log.info("central server keys kept (encryption key %s)", keys.server_key.key_id)
    return keys


def _kept_keys(path: Path) -> object:
    """What the kept copy holds, or None when it is missing or cannot be read (then it is
    written anew, and a write this user may not do fails as it did before)."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
