"""The device registry: which Ed25519 public keys may send cases, and which were revoked.

A device is known by its key, not by a name it claims: ``device_id`` is derived from the raw
public key by the device's own function (``escalation.keys.device_id_for``), so an id and a key
can never disagree. Revocation keeps the row (its cases stay attributable) and is permanent:
adding the same key again does not silently restore a revoked device.
"""

from __future__ import annotations

import base64
import logging
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from triage_app.central.db import CentralDB
from triage_app.central.errors import DeviceRegistryError
from triage_app.escalation.keys import device_id_for, ed25519_public_key_from_b64

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceRecord:
    """One registered device. ``revoked_at`` is ``None`` while the device may send."""

    device_id: str
    public_key_b64: str
    label: str
    added_at: str
    revoked_at: str | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def public_key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(self.public_key_b64))

    def to_json(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "public_key": self.public_key_b64,
            "label": self.label,
            "added_at": self.added_at,
            "revoked_at": self.revoked_at,
        }


class DeviceRegistry:
    """Devices in the central database (shared with :class:`~.storage.CentralStore`)."""

    def __init__(self, db: CentralDB) -> None:
        self._db = db

    def add_device(
        self, public_key_b64: str, label: str = "", *, device_id: str | None = None
    ) -> DeviceRecord:
        """Register a device key; return its record (the existing one if the key is known).

        A revoked key is refused (``DeviceRegistryError``): revocation is permanent.

        ``device_id``, if given, must be the id the key yields: a different key under an
        existing id is refused, as is an id that does not match its key. A key that is not
        base64 of a raw 32-byte Ed25519 key raises ``KeyFileError`` (a ``ConfigError``).
        """
        public_key = ed25519_public_key_from_b64(public_key_b64, what="device public key")
        raw = public_key.public_bytes_raw()
        derived = device_id_for(public_key)
        if device_id is not None and device_id != derived:
            raise DeviceRegistryError(
                f"device id {device_id} does not match its public key (which gives {derived})"
            )
        canonical = base64.b64encode(raw).decode("ascii")
        label = " ".join(label.split())
        with self._db.write(f"add device {derived}") as conn:
            row = conn.execute("SELECT * FROM devices WHERE device_id = ?", (derived,)).fetchone()
            if row is not None:
                if row["public_key_b64"] != canonical:
                    raise DeviceRegistryError(
                        f"device id {derived} is registered with another public key"
                    )
                if row["revoked_at"] is not None:
                    # Adding it again must not look like a success: revocation is for good.
                    raise DeviceRegistryError(
                        f"device {derived} was revoked at {row['revoked_at']} and stays "
                        "revoked: to let that machine send again, give it a new device key "
                        "and add the new key"
                    )
                log.info("device %s already registered", derived)
                return _record(row)
            added_at = _now()
            conn.execute(
                "INSERT INTO devices (device_id, public_key_b64, label, added_at) "
                "VALUES (?, ?, ?, ?)",
                (derived, canonical, label, added_at),
            )
        log.info("device %s registered", derived)
        return DeviceRecord(derived, canonical, label, added_at, None)

    def revoke_device(self, device_id: str) -> DeviceRecord:
        """Refuse everything the device sends from now on; revoking twice keeps the first time."""
        with self._db.write(f"revoke device {device_id}") as conn:
            row = conn.execute("SELECT * FROM devices WHERE device_id = ?", (device_id,)).fetchone()
            if row is None:
                raise DeviceRegistryError(f"unknown device id {device_id}")
            if row["revoked_at"] is None:
                conn.execute(
                    "UPDATE devices SET revoked_at = ? WHERE device_id = ?", (_now(), device_id)
                )
            row = conn.execute("SELECT * FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        log.info("device %s revoked", device_id)
        return _record(row)

    def get(self, device_id: str) -> DeviceRecord | None:
        with self._db.read(f"read device {device_id}") as conn:
            row = conn.execute("SELECT * FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        return None if row is None else _record(row)

    def list_devices(self) -> list[DeviceRecord]:
        """Every device ever registered, oldest first."""
        with self._db.read("list devices") as conn:
            rows = conn.execute("SELECT * FROM devices ORDER BY added_at, device_id").fetchall()
        return [_record(r) for r in rows]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _record(row: sqlite3.Row) -> DeviceRecord:
    return DeviceRecord(
        device_id=row["device_id"],
        public_key_b64=row["public_key_b64"],
        label=row["label"],
        added_at=row["added_at"],
        revoked_at=row["revoked_at"],
    )
