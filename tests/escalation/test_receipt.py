"""Delivery receipts and signed verdict polls: only the exact, signed answer is accepted."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from triage_app.errors import EnvelopeSignatureError, ReceiptError
from triage_app.escalation.envelope import canonical_json
from triage_app.escalation.keys import DeviceIdentity, server_id_for
from triage_app.escalation.receipt import (
    Receipt,
    sign_receipt,
    sign_request,
    verify_receipt,
    verify_request_signature,
)

SERVER_KEY = Ed25519PrivateKey.generate()
OTHER_SERVER_KEY = Ed25519PrivateKey.generate()
DEVICE = DeviceIdentity.from_signing_key(Ed25519PrivateKey.generate())
OTHER_DEVICE = DeviceIdentity.from_signing_key(Ed25519PrivateKey.generate())
CASE_ID = hashlib.sha256(b"case").hexdigest()
PAYLOAD_SHA = hashlib.sha256(b"payload").hexdigest()
RECEIPT = Receipt(
    case_id=CASE_ID,
    device_id=DEVICE.device_id,
    envelope_id="ab" * 16,
    payload_sha256=PAYLOAD_SHA,
    received_at=datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC),
    server_id=server_id_for(SERVER_KEY.public_key()),
    deliveries=1,
)
PATH = f"/v1/cases/{CASE_ID}/verdict"
NOW = 1_795_000_000


def verify(body: object, **overrides: str) -> Receipt:
    expected = {
        "case_id": CASE_ID,
        "device_id": DEVICE.device_id,
        "payload_sha256": PAYLOAD_SHA,
        **overrides,
    }
    return verify_receipt(
        body,  # type: ignore[arg-type]
        SERVER_KEY.public_key(),
        case_id=expected["case_id"],
        device_id=expected["device_id"],
        payload_sha256=expected["payload_sha256"],
    )


# --- Receipts -----------------------------------------------------------------------------------


def test_the_signed_body_has_the_protocols_shape() -> None:
    body = sign_receipt(RECEIPT, SERVER_KEY)
    assert set(body) == {"receipt", "signature"}
    assert body["receipt"] == {
        "case_id": CASE_ID,
        "device_id": DEVICE.device_id,
        "envelope_id": "ab" * 16,
        "payload_sha256": PAYLOAD_SHA,
        "received_at": "2026-11-22T10:00:00Z",
        "server_id": RECEIPT.server_id,
        "deliveries": 1,
    }
    assert RECEIPT.to_json() == canonical_json(body["receipt"])
    assert b" " not in RECEIPT.to_json()
    signature = base64.b64decode(str(body["signature"]))
    SERVER_KEY.public_key().verify(signature, RECEIPT.to_json())


def test_a_good_receipt_verifies_as_dict_and_as_bytes() -> None:
    body = sign_receipt(RECEIPT, SERVER_KEY)
    assert verify(body) == RECEIPT
    assert verify(json.dumps(body).encode()) == RECEIPT
    assert verify(json.dumps(body, indent=2).encode()) == RECEIPT  # the envelope JSON may vary


def test_a_repeat_delivery_receipt_verifies() -> None:
    repeat = replace(RECEIPT, deliveries=3, envelope_id="cd" * 16)
    assert verify(sign_receipt(repeat, SERVER_KEY)).deliveries == 3


@pytest.mark.parametrize(
    ("receipt", "match"),
    [
        (replace(RECEIPT, case_id=hashlib.sha256(b"other").hexdigest()), "another case"),
        (replace(RECEIPT, device_id=OTHER_DEVICE.device_id), "another device"),
        (replace(RECEIPT, payload_sha256=hashlib.sha256(b"x").hexdigest()), "another payload"),
    ],
    ids=["case", "device", "payload"],
)
def test_a_receipt_for_something_else_is_refused(receipt: Receipt, match: str) -> None:
    with pytest.raises(ReceiptError, match=match):
        verify(sign_receipt(receipt, SERVER_KEY))


def test_a_receipt_signed_by_another_key_is_refused() -> None:
    forged = replace(RECEIPT, server_id=server_id_for(OTHER_SERVER_KEY.public_key()))
    for body in (sign_receipt(RECEIPT, OTHER_SERVER_KEY), sign_receipt(forged, OTHER_SERVER_KEY)):
        with pytest.raises(ReceiptError, match="does not verify"):
            verify(body)


def test_a_receipt_naming_another_server_is_refused() -> None:
    other_id = replace(RECEIPT, server_id="srv-" + "0" * 16)
    with pytest.raises(ReceiptError, match="another server"):
        verify(sign_receipt(other_id, SERVER_KEY))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("deliveries", 2),
        ("envelope_id", "cd" * 16),
        ("received_at", "2026-11-22T10:00:01Z"),
        ("case_id", hashlib.sha256(b"other").hexdigest()),
    ],
)
def test_an_altered_receipt_is_refused(field: str, value: object) -> None:
    body = sign_receipt(RECEIPT, SERVER_KEY)
    receipt = dict(body["receipt"])  # type: ignore[call-overload]
    receipt[field] = value
    with pytest.raises(ReceiptError, match="does not verify"):
        verify({"receipt": receipt, "signature": body["signature"]})


def altered(change: Callable[[dict[str, object], dict[str, object]], object]) -> dict[str, object]:
    body = sign_receipt(RECEIPT, SERVER_KEY)
    receipt = dict(body["receipt"])  # type: ignore[call-overload]
    body["receipt"] = receipt
    change(body, receipt)
    return body


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"[]",
        b"null",
        b'{"receipt": {}}',
        [],
        altered(lambda b, r: b.pop("signature")),
        altered(lambda b, r: b.update(extra=1)),
        altered(lambda b, r: b.update(receipt="text")),
        altered(lambda b, r: b.update(signature=None)),
        altered(lambda b, r: b.update(signature="not base64!")),
        altered(lambda b, r: b.update(signature=base64.b64encode(bytes(63)).decode())),
        altered(lambda b, r: r.pop("deliveries")),
        altered(lambda b, r: r.update(extra="x")),
        altered(lambda b, r: r.update(deliveries=0)),
        altered(lambda b, r: r.update(deliveries=True)),
        altered(lambda b, r: r.update(deliveries=1.0)),
        altered(lambda b, r: r.update(deliveries="1")),
        altered(lambda b, r: r.update(received_at="2026-11-22T10:00:00+00:00")),
        altered(lambda b, r: r.update(received_at="2026-02-30T10:00:00Z")),
        altered(lambda b, r: r.update(received_at=0)),
        altered(lambda b, r: r.update(case_id=CASE_ID.upper())),
        altered(lambda b, r: r.update(server_id="dev-" + "0" * 16)),
        altered(lambda b, r: r.update(envelope_id=None)),
    ],
)
def test_a_badly_shaped_answer_is_refused(body: object) -> None:
    with pytest.raises(ReceiptError) as caught:
        verify(body)
    assert "\n" not in str(caught.value)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=10), children, max_size=8)
        ),
        max_leaves=20,
    )
)
def test_arbitrary_json_only_ever_raises_receipt_errors(value: object) -> None:
    with pytest.raises(ReceiptError):
        verify(value)
    with pytest.raises(ReceiptError):
        verify({"receipt": value, "signature": sign_receipt(RECEIPT, SERVER_KEY)["signature"]})


# --- Signed verdict polls -----------------------------------------------------------------------


def test_a_signed_request_verifies() -> None:
    headers = sign_request(DEVICE, "GET", PATH, NOW)
    assert set(headers) == {"X-Device-Id", "X-Timestamp", "X-Signature"}
    assert headers["X-Device-Id"] == DEVICE.device_id
    assert headers["X-Timestamp"] == str(NOW)
    message = f"GET\n{PATH}\n{NOW}".encode()
    DEVICE.public_key().verify(base64.b64decode(headers["X-Signature"]), message)
    verify_request_signature(DEVICE.public_key(), "GET", PATH, headers, NOW)
    lowered = {name.lower(): value for name, value in headers.items()}
    verify_request_signature(DEVICE.public_key(), "GET", PATH, lowered, NOW + 300)
    verify_request_signature(DEVICE.public_key(), "GET", PATH, lowered, NOW - 300)


@pytest.mark.parametrize(
    ("method", "path", "now", "match"),
    [
        ("POST", PATH, NOW, "does not verify"),
        ("GET", f"/v1/cases/{'0' * 64}/verdict", NOW, "does not verify"),
        ("GET", PATH, NOW + 301, "301 s off"),
        ("GET", PATH, NOW - 301, "301 s off"),
    ],
)
def test_a_request_for_something_else_or_too_old_is_refused(
    method: str, path: str, now: int, match: str
) -> None:
    headers = sign_request(DEVICE, "GET", PATH, NOW)
    with pytest.raises(EnvelopeSignatureError, match=match):
        verify_request_signature(DEVICE.public_key(), method, path, headers, now)


def test_the_skew_limit_is_configurable() -> None:
    headers = sign_request(DEVICE, "GET", PATH, NOW)
    with pytest.raises(EnvelopeSignatureError, match="off the server clock"):
        verify_request_signature(DEVICE.public_key(), "GET", PATH, headers, NOW + 11, 10)


def test_another_devices_signature_is_refused() -> None:
    headers = sign_request(OTHER_DEVICE, "GET", PATH, NOW)
    with pytest.raises(EnvelopeSignatureError, match="not the signing device"):
        verify_request_signature(DEVICE.public_key(), "GET", PATH, headers, NOW)
    headers["X-Device-Id"] = DEVICE.device_id  # claims to be the device, signed by another
    with pytest.raises(EnvelopeSignatureError, match="does not verify"):
        verify_request_signature(DEVICE.public_key(), "GET", PATH, headers, NOW)


@pytest.mark.parametrize(
    ("header", "value", "match"),
    [
        ("X-Device-Id", None, "lacks the X-Device-Id"),
        ("X-Timestamp", None, "lacks the X-Timestamp"),
        ("X-Signature", None, "lacks the X-Signature"),
        ("X-Timestamp", "-5", "not Unix seconds"),
        ("X-Timestamp", "1e9", "not Unix seconds"),
        ("X-Timestamp", "١٢٣", "not Unix seconds"),
        ("X-Timestamp", "9" * 40, "not Unix seconds"),
        ("X-Signature", "not base64!", "base64 of 64 bytes"),
        ("X-Signature", base64.b64encode(bytes(64)).decode(), "does not verify"),
    ],
)
def test_bad_request_headers_are_refused(header: str, value: str | None, match: str) -> None:
    headers = sign_request(DEVICE, "GET", PATH, NOW)
    if value is None:
        del headers[header]
    else:
        headers[header] = value
    with pytest.raises(EnvelopeSignatureError, match=match):
        verify_request_signature(DEVICE.public_key(), "GET", PATH, headers, NOW)


def test_sign_request_refuses_ambiguous_input() -> None:
    with pytest.raises(ValueError):
        sign_request(DEVICE, "GET", PATH + "\n1", NOW)
    with pytest.raises(ValueError):
        sign_request(DEVICE, "GET", PATH, -1)
