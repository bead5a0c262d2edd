"""Byte surgery on real envelopes: what a broken link, a buggy device or an attacker sends."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from triage_app.escalation.envelope import (
    HPKE_INFO_LABEL,
    LENGTH_BYTES,
    MAGIC,
    PREFIX_BYTES,
    SIGNATURE_BYTES,
    canonical_json,
)
from triage_app.escalation.keys import DeviceIdentity


@dataclass(frozen=True)
class Parts:
    signed: bytes  # magic || hlen || header
    signature: bytes
    chunks: list[bytes]  # each with its 4-byte length prefix

    @property
    def header(self) -> dict[str, Any]:
        value = json.loads(self.signed[PREFIX_BYTES:])
        assert isinstance(value, dict)
        return value

    def chunk_offset(self, index: int) -> int:
        """Where chunk ``index`` (its length prefix) starts in the envelope."""
        return len(self.signed) + SIGNATURE_BYTES + sum(len(c) for c in self.chunks[:index])

    def join(self) -> bytes:
        return self.signed + self.signature + b"".join(self.chunks)


def split(envelope: bytes) -> Parts:
    header_len = int.from_bytes(envelope[len(MAGIC) : PREFIX_BYTES], "big")
    header_end = PREFIX_BYTES + header_len
    signature = envelope[header_end : header_end + SIGNATURE_BYTES]
    offset = header_end + SIGNATURE_BYTES
    chunks = []
    while offset < len(envelope):
        length = int.from_bytes(envelope[offset : offset + LENGTH_BYTES], "big")
        end = offset + LENGTH_BYTES + length
        chunks.append(envelope[offset:end])
        offset = end
    return Parts(envelope[:header_end], signature, chunks)


def flip(data: bytes, offset: int) -> bytes:
    """``data`` with one bit changed at ``offset``."""
    changed = bytearray(data)
    changed[offset] ^= 0x01
    return bytes(changed)


def replace_in_header(envelope: bytes, field: str) -> bytes:
    """Change one character of a header field's value, keeping the JSON valid and unsigned."""
    parts = split(envelope)
    value = str(parts.header[field])
    start = parts.signed.index(f'"{field}":"{value}"'.encode()) + len(field) + 4
    original = parts.signed[start : start + 1]
    if all(c in "0123456789abcdef" for c in value):
        replacement = b"0" if original != b"0" else b"1"
    else:
        replacement = b"B" if original != b"B" else b"C"
    signed = parts.signed[:start] + replacement + parts.signed[start + 1 :]
    return signed + parts.signature + b"".join(parts.chunks)


def resigned(
    envelope: bytes, device: DeviceIdentity, change: Callable[[dict[str, Any]], None]
) -> bytes:
    """Change the header and sign it again with the device's key: a buggy or rogue device."""
    parts = split(envelope)
    header = parts.header
    change(header)
    raw = canonical_json(header)
    signed = MAGIC + len(raw).to_bytes(LENGTH_BYTES, "big") + raw
    return signed + device.signing_key.sign(signed) + b"".join(parts.chunks)


def reencrypted(
    envelope: bytes,
    device: DeviceIdentity,
    server_key: X25519PrivateKey,
    change: Callable[[dict[str, Any]], None],
) -> bytes:
    """Change the header, sign it and encrypt every chunk again under it: a device that lies
    consistently (or a buggy one), which only the payload checks can catch."""
    parts = split(envelope)
    header = parts.header
    info = HPKE_INFO_LABEL + "\x00".join(
        str(header[name]) for name in ("case_id", "device_id", "server_key_id")
    ).encode("ascii")
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    aead = AESGCM(suite.decrypt(base64.b64decode(header["sealed_key"]), server_key, info))
    old_aad = hashlib.sha256(parts.signed).digest()
    change(header)
    raw = canonical_json(header)
    signed = MAGIC + len(raw).to_bytes(LENGTH_BYTES, "big") + raw
    aad = hashlib.sha256(signed).digest()
    chunks = []
    for index, chunk in enumerate(parts.chunks):
        nonce = bytes(7) + index.to_bytes(4, "big") + bytes([index == len(parts.chunks) - 1])
        plain = aead.decrypt(nonce, chunk[LENGTH_BYTES:], old_aad)
        sealed = aead.encrypt(nonce, plain, aad)
        chunks.append(len(sealed).to_bytes(LENGTH_BYTES, "big") + sealed)
    return signed + device.signing_key.sign(signed) + b"".join(chunks)
