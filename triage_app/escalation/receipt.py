"""Delivery receipts (server to device) and signed verdict polls (device to server).

The device deletes its only copy of an escalated case once the server says it has it. A bare
"200 OK" could come from a proxy, a misconfigured server or someone on the network, so the answer
must be a receipt signed with the server's receipt key and naming exactly the case, device and
payload hash the device sent; anything else keeps the local copy for another try
(``ReceiptError``).

The other way round, verdicts are per-case medical results: a poll must prove it comes from a
registered device, by an Ed25519 signature over method, path and a recent timestamp.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from triage_app.errors import EnvelopeSignatureError, ReceiptError
from triage_app.escalation.envelope import canonical_json, format_timestamp, parse_timestamp
from triage_app.escalation.keys import DeviceIdentity, device_id_for, server_id_for

SIGNATURE_BYTES = 64
DEVICE_ID_HEADER = "X-Device-Id"
TIMESTAMP_HEADER = "X-Timestamp"
SIGNATURE_HEADER = "X-Signature"
MAX_REQUEST_SKEW_S = 300

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_DEVICE_ID = re.compile(r"dev-[0-9a-f]{16}")
_SERVER_ID = re.compile(r"srv-[0-9a-f]{16}")
_UNIX_SECONDS = re.compile(r"[0-9]{1,12}")

RECEIPT_FIELDS = frozenset(
    {
        "case_id",
        "device_id",
        "envelope_id",
        "payload_sha256",
        "received_at",
        "server_id",
        "deliveries",
    }
)


@dataclass(frozen=True)
class Receipt:
    """What the server vouches for: it holds this case's payload from this device."""

    case_id: str
    device_id: str
    envelope_id: str
    payload_sha256: str
    received_at: datetime
    server_id: str
    deliveries: int

    def to_dict(self) -> dict[str, str | int]:
        return {
            "case_id": self.case_id,
            "device_id": self.device_id,
            "envelope_id": self.envelope_id,
            "payload_sha256": self.payload_sha256,
            "received_at": format_timestamp(self.received_at),
            "server_id": self.server_id,
            "deliveries": self.deliveries,
        }

    def to_json(self) -> bytes:
        """The canonical JSON the signature covers."""
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, value: Mapping[str, object]) -> Receipt:
        """Validate a receipt object's shape; ``ReceiptError`` names the first bad field."""
        if set(value) != RECEIPT_FIELDS:
            raise ReceiptError("receipt object does not have exactly the protocol's fields")
        received_text = _str_field(value, "received_at", None)
        try:
            received_at = parse_timestamp(received_text)
        except ValueError:
            raise ReceiptError(
                "receipt field received_at is not a YYYY-MM-DDTHH:MM:SSZ time"
            ) from None
        deliveries = value["deliveries"]
        if type(deliveries) is not int or deliveries < 1:
            raise ReceiptError("receipt field deliveries must be a positive integer")
        return cls(
            case_id=_str_field(value, "case_id", _HEX64),
            device_id=_str_field(value, "device_id", _DEVICE_ID),
            envelope_id=_str_field(value, "envelope_id", _HEX32),
            payload_sha256=_str_field(value, "payload_sha256", _HEX64),
            received_at=received_at,
            server_id=_str_field(value, "server_id", _SERVER_ID),
            deliveries=deliveries,
        )


def _str_field(value: Mapping[str, object], name: str, pattern: re.Pattern[str] | None) -> str:
    item = value[name]
    if not isinstance(item, str) or (pattern is not None and not pattern.fullmatch(item)):
        raise ReceiptError(f"receipt field {name} has the wrong shape")
    return item


def sign_receipt(receipt: Receipt, key: Ed25519PrivateKey) -> dict[str, object]:
    """The answer body: ``{"receipt": {...}, "signature": base64 Ed25519 over its JSON}``."""
    return {
        "receipt": receipt.to_dict(),
        "signature": base64.b64encode(key.sign(receipt.to_json())).decode("ascii"),
    }


def verify_receipt(
    body: Mapping[str, object] | bytes,
    public_key: Ed25519PublicKey,
    *,
    case_id: str,
    device_id: str,
    payload_sha256: str,
) -> Receipt:
    """Check a receipt body (parsed, or the raw answer bytes) against what was sent.

    Raises ``ReceiptError`` if the body has the wrong shape, the signature does not verify under
    ``public_key``, the receipt names another server, or its case, device or payload hash differ
    from what was sent. Only then may the device delete its copy.
    """
    if isinstance(body, bytes | bytearray):
        try:
            parsed: object = json.loads(bytes(body).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ReceiptError("receipt answer is not UTF-8 JSON") from None
    else:
        parsed = body
    if not isinstance(parsed, Mapping) or set(parsed) != {"receipt", "signature"}:
        raise ReceiptError('receipt answer must be an object with "receipt" and "signature"')
    receipt_value = parsed["receipt"]
    signature_text = parsed["signature"]
    if not isinstance(receipt_value, Mapping):
        raise ReceiptError("receipt is not a JSON object")
    if not all(isinstance(name, str) for name in receipt_value):
        raise ReceiptError("receipt object has non-text field names")
    receipt = Receipt.from_dict(receipt_value)
    signature = _signature_bytes(signature_text)
    if signature is None:
        raise ReceiptError(f"receipt signature must be base64 of {SIGNATURE_BYTES} bytes")
    try:
        public_key.verify(signature, receipt.to_json())
    except InvalidSignature:
        raise ReceiptError("receipt signature does not verify under the receipt key") from None
    if receipt.server_id != server_id_for(public_key):
        raise ReceiptError("receipt names another server than the receipt key's")
    if receipt.case_id != case_id:
        raise ReceiptError("receipt is for another case")
    if receipt.device_id != device_id:
        raise ReceiptError("receipt is for another device")
    if receipt.payload_sha256 != payload_sha256:
        raise ReceiptError("receipt is for another payload of this case")
    return receipt


def _signature_bytes(value: object) -> bytes | None:
    if not isinstance(value, str):
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == SIGNATURE_BYTES else None


# --- Signed verdict polls -----------------------------------------------------------------------


def request_message(method: str, path: str, timestamp: int) -> bytes:
    """What a poll signature covers: ``METHOD\\nPATH\\nUNIX_SECONDS``."""
    return f"{method}\n{path}\n{timestamp}".encode()


def sign_request(device: DeviceIdentity, method: str, path: str, timestamp: int) -> dict[str, str]:
    """The headers that authenticate a request from ``device`` at ``timestamp`` (Unix seconds)."""
    if "\n" in method or "\n" in path:
        raise ValueError("method and path must be single lines")
    if timestamp < 0:
        raise ValueError("timestamp must not be negative")
    signature = device.signing_key.sign(request_message(method, path, timestamp))
    return {
        DEVICE_ID_HEADER: device.device_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: base64.b64encode(signature).decode("ascii"),
    }


def verify_request_signature(
    public_key: Ed25519PublicKey,
    method: str,
    path: str,
    headers: Mapping[str, str],
    now: int,
    max_skew_s: int = MAX_REQUEST_SKEW_S,
) -> None:
    """Check a request's device signature; ``EnvelopeSignatureError`` if anything is off.

    Header names are matched case-insensitively. The timestamp must be within ``max_skew_s``
    of ``now`` either way.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    values = []
    for name in (DEVICE_ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER):
        value = lowered.get(name.lower())
        if value is None:
            raise EnvelopeSignatureError(f"request lacks the {name} header")
        values.append(value)
    device_id, timestamp_text, signature_text = values
    if device_id != device_id_for(public_key):
        raise EnvelopeSignatureError(f"request {DEVICE_ID_HEADER} is not the signing device's")
    if not _UNIX_SECONDS.fullmatch(timestamp_text):
        raise EnvelopeSignatureError(f"request {TIMESTAMP_HEADER} is not Unix seconds")
    timestamp = int(timestamp_text)
    if abs(now - timestamp) > max_skew_s:
        raise EnvelopeSignatureError(
            f"request timestamp is {abs(now - timestamp)} s off the server clock "
            f"(at most {max_skew_s} s allowed)"
        )
    signature = _signature_bytes(signature_text)
    if signature is None:
        raise EnvelopeSignatureError(
            f"request {SIGNATURE_HEADER} must be base64 of {SIGNATURE_BYTES} bytes"
        )
    try:
        public_key.verify(signature, request_message(method, path, timestamp))
    except InvalidSignature:
        raise EnvelopeSignatureError("request signature does not verify") from None
