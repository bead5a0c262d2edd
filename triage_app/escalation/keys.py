"""The keys behind escalation: who made an envelope, who may open it, who vouches for receipt.

Three kinds of key (docs/escalation-protocol.md, "Keys"), each a 0600 PKCS8 PEM file in a 0700
folder, created atomically on first run:

* The device's Ed25519 signing key is its identity at the central server (``central add-device``
  registers the public half). A regenerated key is a new, unknown device whose queued envelopes
  the server refuses, so a damaged or exposed key file is refused loudly rather than replaced,
  exactly like the site secret.
* The server's X25519 keys open envelopes. An envelope may wait in a device outbox for as long as
  the longest queue age, so a rotated key stays on the ring (retired) until ``prune`` removes it
  once nothing sealed to it can still arrive. ``ring.json`` records which key is active and when
  each was retired, because file times do not survive backups and copies.
* The server's Ed25519 receipt key signs delivery receipts: the device deletes its only copy of a
  case on the strength of that signature.

Only key ids and paths are ever logged, never key material.
"""

from __future__ import annotations

import base64
import binascii
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from triage_app.errors import KeyFileError
from triage_app.paths import (
    FOLDER_ACCESS,
    access_problem,
    denied_because,
    ensure_private_dir,
    write_private_file,
)

log = logging.getLogger(__name__)

DEVICE_KEY_NAME = "device_ed25519.pem"
RECEIPT_KEY_NAME = "receipt_ed25519.pem"
RING_FILE_NAME = "ring.json"
RING_LOCK_NAME = ".ring.lock"
RAW_KEY_BYTES = 32
# A PKCS8 PEM of a 32-byte key is about 120 bytes; anything far bigger is not one of ours.
MAX_KEY_FILE_BYTES = 16 * 1024
RING_FORMAT_VERSION = 1

_X25519_FILE = re.compile(r"x25519-([0-9a-f]{16})\.pem")
_KEY_ID = re.compile(r"[0-9a-f]{16}")


# --- Ids ----------------------------------------------------------------------------------------


def _fingerprint(raw_public_key: bytes) -> str:
    return hashlib.sha256(raw_public_key).hexdigest()[:16]


def device_id_for(public_key: Ed25519PublicKey) -> str:
    """``dev-`` + the first 16 hex digits of SHA-256 of the raw 32-byte public key."""
    return "dev-" + _fingerprint(public_key.public_bytes_raw())


def key_id_for(public_key: X25519PublicKey) -> str:
    """The first 16 hex digits of SHA-256 of the raw 32-byte X25519 public key."""
    return _fingerprint(public_key.public_bytes_raw())


def server_id_for(public_key: Ed25519PublicKey) -> str:
    """``srv-`` + the first 16 hex digits of SHA-256 of the raw receipt public key."""
    return "srv-" + _fingerprint(public_key.public_bytes_raw())


def _raw_key_from_b64(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"the {what} is not valid base64") from None
    if len(raw) != RAW_KEY_BYTES:
        raise KeyFileError(
            f"the {what} must be {RAW_KEY_BYTES} raw bytes in base64 (found {len(raw)} bytes)"
        )
    return raw


def ed25519_public_key_from_b64(text: str, *, what: str = "Ed25519 public key") -> Ed25519PublicKey:
    """Parse a raw 32-byte Ed25519 public key given in base64 (settings, ``GET /v1/keys``).

    Raises ``KeyFileError`` (a ``ConfigError``) naming ``what`` if it is not one.
    """
    return Ed25519PublicKey.from_public_bytes(_raw_key_from_b64(text, what))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


# --- Device identity ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceIdentity:
    """The device's signing key and the id derived from it (they always agree)."""

    device_id: str
    signing_key: Ed25519PrivateKey = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.device_id != device_id_for(self.signing_key.public_key()):
            raise ValueError("device_id does not belong to this signing key")

    @classmethod
    def from_signing_key(cls, signing_key: Ed25519PrivateKey) -> DeviceIdentity:
        return cls(device_id_for(signing_key.public_key()), signing_key)

    def public_key(self) -> Ed25519PublicKey:
        return self.signing_key.public_key()

    def public_key_bytes(self) -> bytes:
        """The raw 32-byte public key (what ``central add-device`` registers)."""
        return self.public_key().public_bytes_raw()

    def public_key_b64(self) -> str:
        return _b64(self.public_key_bytes())


def device_key_path(data_dir: Path) -> Path:
    """Where the device signing key lives under a data folder (for messages and backups)."""
    return data_dir / "keys" / DEVICE_KEY_NAME


def load_or_create_device_identity(data_dir: Path) -> DeviceIdentity:
    """Return the device identity, creating its key (0600 in a 0700 folder) on first run.

    Raises
    ------
    KeyFileError
        If the key folder or file is readable by other users, the file is a link or not a
        regular file, or it does not hold an unencrypted PKCS8 Ed25519 key; or this user may
        not read them (or create the file), the message then saying what to change. Nothing is
        regenerated: a new key would be a new device, unknown to the server.
    """
    path = device_key_path(data_dir)
    _private_key_dir(path.parent)
    key, created = _load_or_create_ed25519(path, "device signing key")
    identity = DeviceIdentity.from_signing_key(key)
    if created:
        log.info("created device identity %s at %s", identity.device_id, path)
    return identity


# --- Server public key (device side) ------------------------------------------------------------


@dataclass(frozen=True)
class ServerPublicKey:
    """The server's X25519 public key a device seals to, with its id (they always agree)."""

    key_id: str
    public_key: X25519PublicKey = field(compare=False)

    def __post_init__(self) -> None:
        if self.key_id != key_id_for(self.public_key):
            raise ValueError("key_id does not belong to this public key")

    @classmethod
    def from_public_key(cls, public_key: X25519PublicKey) -> ServerPublicKey:
        return cls(key_id_for(public_key), public_key)

    @classmethod
    def from_b64(cls, text: str) -> ServerPublicKey:
        """Parse the raw 32-byte key in base64, as in settings or ``GET /v1/keys``.

        Raises ``KeyFileError`` if ``text`` is not base64 of exactly 32 bytes.
        """
        raw = _raw_key_from_b64(text, "server public key")
        return cls.from_public_key(X25519PublicKey.from_public_bytes(raw))

    def to_b64(self) -> str:
        return _b64(self.public_key.public_bytes_raw())


# --- Server key ring (central side) -------------------------------------------------------------


@dataclass
class _RingEntry:
    key: X25519PrivateKey
    created_at: datetime
    retired_at: datetime | None


class ServerKeyRing:
    """The central server's X25519 keys (one active, the rest retired) and its receipt key.

    Build it with :meth:`load_or_create`. Loading, ``rotate`` and ``prune`` hold an exclusive
    lock on ``keys/.ring.lock``, so concurrent first runs agree on one key and an admin command
    and the server never overwrite each other's ring; ``rotate`` and ``prune`` re-read the files
    first. A ring already loaded elsewhere keeps its snapshot until it is loaded again.
    """

    def __init__(
        self,
        keys_dir: Path,
        entries: Mapping[str, _RingEntry],
        receipt_key: Ed25519PrivateKey,
    ) -> None:
        active = [kid for kid, entry in entries.items() if entry.retired_at is None]
        if len(active) != 1:
            raise KeyFileError(f"{keys_dir}: the key ring must have exactly one active key")
        self._keys_dir = keys_dir
        self._entries = dict(entries)
        self._active_id = active[0]
        self._receipt_key = receipt_key

    # -- Loading --

    @classmethod
    def load_or_create(
        cls, central_data_dir: Path, *, now: datetime | None = None
    ) -> ServerKeyRing:
        """Load the ring from ``<central_data_dir>/keys/``, creating its keys on first run.

        Raises
        ------
        KeyFileError
            If the folder or a key file is readable by others, a file is damaged, holds another
            key than its name says, the active key is missing, or ``ring.json`` is missing while
            several X25519 keys exist (which one is active can no longer be told).
        """
        stamp = _utc_now(now)
        keys_dir = _private_key_dir(central_data_dir / "keys")
        with _ring_lock(keys_dir):
            receipt_path = keys_dir / RECEIPT_KEY_NAME
            receipt_key, created = _load_or_create_ed25519(receipt_path, "server receipt key")
            if created:
                server_id = server_id_for(receipt_key.public_key())
                log.info("created server receipt key %s at %s", server_id, receipt_path)
            ring_path = keys_dir / RING_FILE_NAME
            if _exists(ring_path, "server key ring"):
                return cls._load(keys_dir, receipt_key, stamp)
            files = _x25519_files(keys_dir)
            if len(files) > 1:
                raise KeyFileError(
                    f"{ring_path}: missing while {len(files)} server keys exist, so the active "
                    "one cannot be told; restore it from backup"
                )
            if files:
                ((key_id, path),) = files.items()
                key = _load_x25519(path, key_id)
                log.info("%s was missing: the only server key %s is active", ring_path, key_id)
            else:
                key = X25519PrivateKey.generate()
                key_id = key_id_for(key.public_key())
                _write_key(keys_dir / _x25519_name(key_id), key)
                log.info("created server key %s in %s", key_id, keys_dir)
            ring = cls(keys_dir, {key_id: _RingEntry(key, stamp, None)}, receipt_key)
            ring._save()
            return ring

    @classmethod
    def _load(cls, keys_dir: Path, receipt_key: Ed25519PrivateKey, now: datetime) -> ServerKeyRing:
        ring_path = keys_dir / RING_FILE_NAME
        listed = _parse_ring(_read_private_file(ring_path, "server key ring"), ring_path)
        files = _x25519_files(keys_dir)
        entries: dict[str, _RingEntry] = {}
        changed = False
        for key_id, (created_at, retired_at) in listed.items():
            path = files.get(key_id)
            if path is None:
                if retired_at is None:
                    raise KeyFileError(
                        f"{keys_dir / _x25519_name(key_id)}: the active server key is missing; "
                        "restore it from backup"
                    )
                log.warning(
                    "retired server key %s is missing from %s and is dropped from the ring; "
                    "envelopes sealed to it can no longer be opened",
                    key_id,
                    keys_dir,
                )
                changed = True
                continue
            entries[key_id] = _RingEntry(_load_x25519(path, key_id), created_at, retired_at)
        for key_id, path in files.items():
            if key_id not in listed:
                # Left by a rotation that stopped before ring.json was written, or a prune
                # that stopped before the file went: keep it as retired, to be pruned in time.
                entries[key_id] = _RingEntry(_load_x25519(path, key_id), now, now)
                log.info("server key %s was not on the ring: kept as retired", key_id)
                changed = True
        ring = cls(keys_dir, entries, receipt_key)
        if changed:
            ring._save()
        return ring

    def _reload(self, now: datetime) -> None:
        """Pick up what another process changed; call with the ring lock held."""
        fresh = self._load(self._keys_dir, self._receipt_key, now)
        self._entries, self._active_id = fresh._entries, fresh._active_id

    # -- Reading --

    @property
    def keys_dir(self) -> Path:
        return self._keys_dir

    @property
    def active(self) -> ServerPublicKey:
        """The newest X25519 key: the one devices seal new envelopes to."""
        return ServerPublicKey.from_public_key(self._entries[self._active_id].key.public_key())

    @property
    def retired_key_ids(self) -> list[str]:
        """Retired key ids, oldest first; their envelopes still open until they are pruned."""
        retired = [(e.created_at, kid) for kid, e in self._entries.items() if e.retired_at]
        return [kid for _, kid in sorted(retired)]

    @property
    def private_keys(self) -> Mapping[str, X25519PrivateKey]:
        """Every key that may open an envelope (active and retired), by key id (a snapshot)."""
        return MappingProxyType({kid: entry.key for kid, entry in self._entries.items()})

    def retired_at(self, key_id: str) -> datetime | None:
        """When ``key_id`` was retired (``None`` for the active key); ``KeyError`` if unknown."""
        return self._entries[key_id].retired_at

    @property
    def receipt_key(self) -> Ed25519PrivateKey:
        return self._receipt_key

    @property
    def receipt_public_key(self) -> Ed25519PublicKey:
        return self._receipt_key.public_key()

    @property
    def server_id(self) -> str:
        return server_id_for(self.receipt_public_key)

    def public_info(self) -> dict[str, str | list[str]]:
        """The body of ``GET /v1/keys``: public keys in base64, ids, retired key ids."""
        active = self.active
        return {
            "server_key_id": active.key_id,
            "server_public_key": active.to_b64(),
            "retired_key_ids": self.retired_key_ids,
            "server_id": self.server_id,
            "receipt_public_key": _b64(self.receipt_public_key.public_bytes_raw()),
        }

    # -- Changing --

    def rotate(self, *, now: datetime | None = None) -> str:
        """Make a new active X25519 key and retire the current one; return the new key id."""
        stamp = _utc_now(now)
        with _ring_lock(self._keys_dir):
            self._reload(stamp)
            key = X25519PrivateKey.generate()
            key_id = key_id_for(key.public_key())
            _write_key(self._keys_dir / _x25519_name(key_id), key)
            self._entries[self._active_id].retired_at = stamp
            self._entries[key_id] = _RingEntry(key, stamp, None)
            previous, self._active_id = self._active_id, key_id
            self._save()
        log.info("rotated server key: %s is active, %s retired", key_id, previous)
        return key_id

    def prune(self, older_than: timedelta, *, now: datetime | None = None) -> list[str]:
        """Delete retired keys retired more than ``older_than`` ago; return their ids.

        The active key is never deleted. ``ring.json`` is rewritten before any file goes, so a
        crash in between leaves a spare file (kept as retired next time), never a listed key
        without its file.
        """
        if older_than < timedelta(0):
            raise ValueError("older_than must not be negative")
        stamp = _utc_now(now)
        with _ring_lock(self._keys_dir):
            self._reload(stamp)
            doomed = sorted(
                kid
                for kid, entry in self._entries.items()
                if entry.retired_at is not None and stamp - entry.retired_at > older_than
            )
            if not doomed:
                return []
            for kid in doomed:
                del self._entries[kid]
            self._save()
            for kid in doomed:
                (self._keys_dir / _x25519_name(kid)).unlink(missing_ok=True)
                log.info("pruned retired server key %s", kid)
        return doomed

    def _save(self) -> None:
        body = {
            "version": RING_FORMAT_VERSION,
            "keys": {
                kid: {
                    "created_at": entry.created_at.isoformat(),
                    "retired_at": entry.retired_at.isoformat() if entry.retired_at else None,
                }
                for kid, entry in sorted(self._entries.items())
            },
        }
        data = json.dumps(body, indent=2, sort_keys=True).encode("utf-8") + b"\n"
        path = self._keys_dir / RING_FILE_NAME
        try:
            write_private_file(path, data)
        except OSError as err:
            why = denied_because(err, self._keys_dir, FOLDER_ACCESS, tree=self._keys_dir.parent)
            raise KeyFileError(f"{path}: cannot write the server key ring{why}") from None


def _x25519_name(key_id: str) -> str:
    return f"x25519-{key_id}.pem"


def _x25519_files(keys_dir: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in keys_dir.iterdir():
        match = _X25519_FILE.fullmatch(path.name)
        if match:
            found[match.group(1)] = path
    return found


def _load_x25519(path: Path, key_id: str) -> X25519PrivateKey:
    key = _load_pem(path, "server key")
    if not isinstance(key, X25519PrivateKey):
        raise KeyFileError(f"{path}: the server key is not an X25519 key")
    if key_id_for(key.public_key()) != key_id:
        raise KeyFileError(f"{path}: holds another key than its name says; restore it from backup")
    return key


def _parse_ring(data: bytes, path: Path) -> dict[str, tuple[datetime, datetime | None]]:
    def bad(why: str) -> KeyFileError:
        return KeyFileError(f"{path}: damaged key ring ({why}); restore it from backup")

    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad("not JSON") from None
    if not isinstance(body, dict) or body.get("version") != RING_FORMAT_VERSION:
        raise bad(f"not a version {RING_FORMAT_VERSION} ring")
    keys = body.get("keys")
    if not isinstance(keys, dict) or not keys:
        raise bad("no keys")
    listed: dict[str, tuple[datetime, datetime | None]] = {}
    for key_id, entry in keys.items():
        if not _KEY_ID.fullmatch(key_id) or not isinstance(entry, dict):
            raise bad("bad key entry")
        created_at = _parse_time(entry.get("created_at"))
        retired_raw = entry.get("retired_at")
        retired_at = None if retired_raw is None else _parse_time(retired_raw)
        if created_at is None or (retired_raw is not None and retired_at is None):
            raise bad(f"bad times for key {key_id}")
        listed[key_id] = (created_at, retired_at)
    if sum(1 for _, retired_at in listed.values() if retired_at is None) != 1:
        raise bad("not exactly one active key")
    return listed


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed.astimezone(UTC) if parsed.tzinfo is not None else None


def _utc_now(now: datetime | None) -> datetime:
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(UTC).replace(microsecond=0)


# --- Private key files --------------------------------------------------------------------------


def _private_key_dir(keys_dir: Path) -> Path:
    """Create the key folder 0700 if needed and refuse it if others may enter it, or if this
    user may not (then whether a key is in it cannot even be told)."""
    try:
        ensure_private_dir(keys_dir)
        dir_mode = stat.S_IMODE(keys_dir.stat().st_mode)
    except OSError as err:
        why = denied_because(err, keys_dir, os.R_OK | os.X_OK, tree=keys_dir.parent)
        raise KeyFileError(f"{keys_dir}: cannot use the key folder{why}") from None
    problem = access_problem(keys_dir, os.R_OK | os.X_OK, tree=keys_dir.parent)
    if problem is not None:
        raise KeyFileError(f"{keys_dir}: cannot read the key folder: {problem}")
    if dir_mode & 0o077:
        raise KeyFileError(
            f"{keys_dir}: key folder permissions {dir_mode:04o} are too open; "
            "it must be accessible by this user only (chmod 700)"
        )
    return keys_dir


@contextmanager
def _ring_lock(keys_dir: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on the ring while its files are read or changed."""
    try:
        fd = os.open(keys_dir / RING_LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as err:
        lock = keys_dir / RING_LOCK_NAME
        why = denied_because(err, lock, os.R_OK | os.W_OK, tree=keys_dir.parent)
        raise KeyFileError(f"{keys_dir}: cannot lock the key ring{why}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _pem(key: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_key(path: Path, key: Ed25519PrivateKey | X25519PrivateKey) -> None:
    """Create ``path`` 0600 holding ``key``; ``FileExistsError`` if it is already there."""
    try:
        write_private_file(path, _pem(key), overwrite=False)
    except FileExistsError:
        raise
    except OSError as err:
        why = denied_because(err, path.parent, FOLDER_ACCESS, tree=path.parent.parent)
        raise KeyFileError(f"{path}: cannot write the key file{why}") from None


def _load_or_create_ed25519(path: Path, what: str) -> tuple[Ed25519PrivateKey, bool]:
    """Load the Ed25519 key at ``path``, creating it first if absent; say if it was created."""
    created = False
    if not _exists(path, what):
        try:
            _write_key(path, Ed25519PrivateKey.generate())
            created = True
        except FileExistsError:
            pass  # Another process created it first: use that one, so every process agrees.
    key = _load_pem(path, what)
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: the {what} is not an Ed25519 key")
    return key, created


def _exists(path: Path, what: str) -> bool:
    """Whether a name is taken at ``path`` (a link counts, even a dangling one). Unlike
    ``os.path.lexists``, a folder this user may not search is not "no file": an existing key
    would be taken for a missing one, and its creation refused with "cannot write"."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as err:
        why = denied_because(err, path, os.R_OK, tree=path.parent.parent)
        raise KeyFileError(f"{path}: cannot read the {what}{why}") from None
    return True


def _load_pem(path: Path, what: str) -> PrivateKeyTypes:
    data = _read_private_file(path, what)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFileError(
            f"{path}: the {what} is not an unencrypted PKCS8 PEM key; restore it from backup"
        ) from None


def _read_private_file(path: Path, what: str) -> bytes:
    """Read and check a private file through one descriptor, so the checks match the bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as err:
        if err.errno == errno.ELOOP:  # O_NOFOLLOW: a symlink could point anywhere
            raise KeyFileError(f"{path}: the {what} must be a regular file, not a link") from None
        why = denied_because(err, path, os.R_OK, tree=path.parent.parent)
        raise KeyFileError(f"{path}: cannot read the {what}{why}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"{path}: the {what} must be a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise KeyFileError(
                f"{path}: {what} permissions {mode:04o} are too open; "
                "it must be readable by this user only (chmod 600)"
            )
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_KEY_FILE_BYTES:
            chunk = os.read(fd, MAX_KEY_FILE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{path}: the {what} is larger than any key file ({info.st_size} bytes)")
    return b"".join(chunks)
