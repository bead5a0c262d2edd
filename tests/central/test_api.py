"""POST /v1/cases/{case_id} against the real server over TLS: receipts, exactly-once, refusals."""

from __future__ import annotations

import base64
import stat
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tests.central import envelope_bytes as eb
from tests.central.conftest import Central, StartCentral, make_case, new_device, seal_case
from triage_app.central.storage import DICOM_FILE, RESULT_FILE, SIGNED_HEADER_FILE
from triage_app.escalation import envelope as envelope_module
from triage_app.escalation.envelope import LENGTH_BYTES, PREFIX_BYTES, verify_header
from triage_app.escalation.keys import ServerPublicKey, ed25519_public_key_from_b64
from triage_app.escalation.receipt import Receipt, verify_receipt


def assert_refused(response: requests.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    assert "\n" not in body["error"]["message"]


def receipt_key_of(central: Central) -> Any:
    """The receipt key as a device learns it: from GET /v1/keys."""
    keys = central.get("/v1/keys").json()
    return ed25519_public_key_from_b64(keys["receipt_public_key"])


def test_first_delivery_is_stored_once_and_receipted(central: Central) -> None:
    device = central.register(new_device())
    case = make_case(0)
    body = central.seal(case, device)

    response = central.post(case.case_id, body)

    assert response.status_code == 201, response.text
    payload_sha256 = eb.split(body).header["payload_sha256"]
    receipt = verify_receipt(
        response.json(),
        receipt_key_of(central),
        case_id=case.case_id,
        device_id=device.device_id,
        payload_sha256=payload_sha256,
    )
    assert receipt.deliveries == 1
    assert receipt.envelope_id == eb.split(body).header["envelope_id"]
    assert receipt.server_id == central.key_ring.server_id
    assert abs(receipt.received_at - datetime.now(UTC)) < timedelta(minutes=1)
    folder = central.store.case_dir(case.case_id)
    assert (folder / DICOM_FILE).read_bytes() == case.payload.dicom
    assert (folder / RESULT_FILE).read_bytes() == case.payload.result_json
    evidence = (folder / SIGNED_HEADER_FILE).read_bytes()
    assert body.startswith(evidence)  # the signed part, not a second copy of the ciphertext
    assert verify_header(evidence, device.public_key()).case_id == case.case_id
    for name in (DICOM_FILE, RESULT_FILE, SIGNED_HEADER_FILE):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    [stored] = central.store.cases()
    assert (stored.case_id, stored.device_id, stored.deliveries) == (
        case.case_id,
        device.device_id,
        1,
    )
    assert stored.payload_sha256 == payload_sha256


def test_repeated_delivery_gets_the_same_receipt_with_a_higher_count(central: Central) -> None:
    device = central.register(new_device())
    case = make_case(1)
    body = central.seal(case, device)
    first = central.post(case.case_id, body)
    assert first.status_code == 201

    again = central.post(case.case_id, body)
    # The device sealed the same case again (new envelope id, same payload): still a repeat.
    resealed = central.post(case.case_id, central.seal(case, device))

    assert again.status_code == 200, again.text
    assert resealed.status_code == 200, resealed.text
    key = receipt_key_of(central)
    receipts = [
        verify_receipt(
            r.json(),
            key,
            case_id=case.case_id,
            device_id=device.device_id,
            payload_sha256=eb.split(body).header["payload_sha256"],
        )
        for r in (first, again, resealed)
    ]
    assert [r.deliveries for r in receipts] == [1, 2, 3]
    assert len({(r.received_at, r.envelope_id, r.server_id) for r in receipts}) == 1
    assert first.json()["receipt"] | {"deliveries": 2} == again.json()["receipt"]
    [stored] = central.store.cases()
    assert stored.deliveries == 3
    assert stored.received_at == receipts[0].received_at.strftime("%Y-%m-%dT%H:%M:%SZ")


Tamper = Callable[[bytes], bytes]


def _last_chunk_truncated(body: bytes) -> bytes:
    return body[:-5]


def _last_chunk_dropped(body: bytes) -> bytes:
    parts = eb.split(body)
    return parts.signed + parts.signature + b"".join(parts.chunks[:-1])


def _chunks_swapped(body: bytes) -> bytes:
    parts = eb.split(body)
    assert len(parts.chunks) >= 3 and len(parts.chunks[0]) == len(parts.chunks[1])
    chunks = [parts.chunks[1], parts.chunks[0], *parts.chunks[2:]]
    return parts.signed + parts.signature + b"".join(chunks)


def _chunk_byte(which: int) -> Tamper:
    def tamper(body: bytes) -> bytes:
        parts = eb.split(body)
        index = which % len(parts.chunks)
        return eb.flip(body, parts.chunk_offset(index) + LENGTH_BYTES + 7)

    return tamper


def _chunk_length(body: bytes) -> bytes:
    return eb.flip(body, eb.split(body).chunk_offset(1) + LENGTH_BYTES - 1)


def _signature_byte(body: bytes) -> bytes:
    return eb.flip(body, len(eb.split(body).signed) + 10)


TAMPERING: dict[str, tuple[Tamper, int, str]] = {
    "header field": (lambda b: eb.replace_in_header(b, "envelope_id"), 401, "bad_signature"),
    "sealed key": (lambda b: eb.replace_in_header(b, "sealed_key"), 401, "bad_signature"),
    "payload hash": (lambda b: eb.replace_in_header(b, "payload_sha256"), 401, "bad_signature"),
    "signature": (_signature_byte, 401, "bad_signature"),
    "first chunk": (_chunk_byte(0), 422, "envelope_tampered"),
    "middle chunk": (_chunk_byte(2), 422, "envelope_tampered"),
    "last chunk": (_chunk_byte(-1), 422, "envelope_tampered"),
    "chunk length": (_chunk_length, 422, "envelope_tampered"),
    "chunks reordered": (_chunks_swapped, 422, "envelope_tampered"),
    "byte appended": (lambda b: b + b"\x00", 422, "envelope_tampered"),
    "truncated in last chunk": (_last_chunk_truncated, 422, "envelope_truncated"),
    "last chunk dropped": (_last_chunk_dropped, 422, "envelope_truncated"),
    "truncated in header": (lambda b: b[: PREFIX_BYTES + 40], 422, "envelope_truncated"),
    "truncated in signature": (
        lambda b: b[: len(eb.split(b).signed) + 20],
        422,
        "envelope_truncated",
    ),
    "not an envelope": (lambda b: b"GIF89a" + b[6:], 400, "envelope_malformed"),
    "unknown format version": (lambda b: b[:7] + b"\x02" + b[8:], 400, "envelope_malformed"),
    "header not JSON": (
        lambda b: b[:PREFIX_BYTES] + b"!" + b[PREFIX_BYTES + 1 :],
        400,
        "envelope_malformed",
    ),
}


@pytest.mark.parametrize("damage", list(TAMPERING))
def test_damaged_envelopes_are_refused_with_their_code(central: Central, damage: str) -> None:
    tamper, status, code = TAMPERING[damage]
    device = central.register(new_device())
    case = make_case(2)
    body = central.seal(case, device)
    damaged = tamper(body)
    assert damaged != body

    assert_refused(central.post(case.case_id, damaged), status, code)

    assert central.store.count() == 0
    assert not central.store.case_dir(case.case_id).exists()
    # The intact envelope still goes through afterwards: nothing was half-stored.
    assert central.post(case.case_id, body).status_code == 201


def test_a_signed_header_with_a_bad_sealed_key_is_tampered(central: Central) -> None:
    """A device that signs garbage (a bug, or a stolen key) still cannot make HPKE open."""
    device = central.register(new_device())
    case = make_case(3)

    def corrupt_sealed_key(header: dict[str, Any]) -> None:
        raw = bytearray(base64.b64decode(header["sealed_key"]))
        raw[40] ^= 0xFF
        header["sealed_key"] = base64.b64encode(bytes(raw)).decode("ascii")

    body = eb.resigned(central.seal(case, device), device, corrupt_sealed_key)
    assert_refused(central.post(case.case_id, body), 422, "envelope_tampered")


def test_a_re_signed_header_does_not_match_its_chunks(central: Central) -> None:
    """Chunks are bound to the exact signed header (AAD): a new signature cannot reuse them."""
    device = central.register(new_device())
    case = make_case(3)

    def change_envelope_id(header: dict[str, Any]) -> None:
        header["envelope_id"] = "0" * 32

    body = eb.resigned(central.seal(case, device), device, change_envelope_id)
    assert_refused(central.post(case.case_id, body), 422, "envelope_tampered")


def test_unknown_device_is_refused(central: Central) -> None:
    case = make_case(4)
    body = central.seal(case, new_device())
    assert_refused(central.post(case.case_id, body), 401, "unknown_device")
    assert central.store.count() == 0


def test_a_device_signing_with_another_key_is_refused(central: Central) -> None:
    registered = central.register(new_device())
    impostor = new_device()
    case = make_case(4)

    def claim_registered(header: dict[str, Any]) -> None:
        header["device_id"] = registered.device_id

    body = eb.resigned(central.seal(case, impostor), impostor, claim_registered)
    assert_refused(central.post(case.case_id, body), 401, "bad_signature")


def test_revoked_device_is_refused_even_for_a_stored_case(central: Central) -> None:
    device = central.register(new_device())
    stored, fresh = make_case(5), make_case(6)
    stored_body = central.seal(stored, device)
    assert central.post(stored.case_id, stored_body).status_code == 201

    central.store.registry.revoke_device(device.device_id)

    assert_refused(central.post(fresh.case_id, central.seal(fresh, device)), 403, "device_revoked")
    assert_refused(central.post(stored.case_id, stored_body), 403, "device_revoked")
    assert [c.case_id for c in central.store.cases()] == [stored.case_id]
    assert central.store.cases()[0].deliveries == 1


def test_whether_a_device_was_revoked_is_told_only_to_that_device(central: Central) -> None:
    """Revocation is checked after the signature: an impostor naming a revoked device learns
    nothing more than one naming a registered device."""
    revoked, impostor = central.register(new_device()), new_device()
    central.store.registry.revoke_device(revoked.device_id)
    case = make_case(16)

    def claim_revoked(header: dict[str, Any]) -> None:
        header["device_id"] = revoked.device_id

    forged = eb.resigned(central.seal(case, impostor), impostor, claim_revoked)

    assert_refused(central.post(case.case_id, forged), 401, "bad_signature")
    assert_refused(central.post(case.case_id, central.seal(case, revoked)), 403, "device_revoked")
    assert central.store.count() == 0


def test_a_payload_that_is_not_the_one_its_header_hashes_is_tampered_and_leaves_nothing(
    central: Central,
) -> None:
    """The payload hash is checked while the files are written: they never take their place."""
    device = central.register(new_device())
    case = make_case(12)
    body = central.seal(case, device)
    [server_key] = central.key_ring.private_keys.values()

    def lie(header: dict[str, Any]) -> None:
        header["payload_sha256"] = "0" * 64

    lying = eb.reencrypted(body, device, server_key, lie)
    assert_refused(central.post(case.case_id, lying), 422, "envelope_tampered")

    assert central.store.count() == 0
    assert not central.store.case_dir(case.case_id).exists()
    assert central.post(case.case_id, body).status_code == 201
    honest = eb.reencrypted(body, device, server_key, lambda header: None)
    assert central.post(case.case_id, honest).status_code == 200  # the helper itself is sound


@pytest.fixture
def fixed_envelope_id(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Make the device's sealer reuse one envelope id (as a replaying attacker would)."""
    envelope_id = "ab" * 16
    monkeypatch.setattr(
        envelope_module, "secrets", SimpleNamespace(token_hex=lambda n: envelope_id)
    )
    yield envelope_id


def test_an_envelope_id_replayed_for_another_case_is_refused(
    central: Central, fixed_envelope_id: str
) -> None:
    device = central.register(new_device())
    first, second = make_case(7), make_case(8)
    assert central.post(first.case_id, central.seal(first, device)).status_code == 201

    replay = central.seal(second, device)
    assert eb.split(replay).header["envelope_id"] == fixed_envelope_id

    assert_refused(central.post(second.case_id, replay), 409, "replayed_envelope")
    assert [c.case_id for c in central.store.cases()] == [first.case_id]
    assert not central.store.case_dir(second.case_id).exists()


def test_case_id_in_the_url_must_match_the_signed_header(central: Central) -> None:
    device = central.register(new_device())
    case, other = make_case(9), make_case(10)
    body = central.seal(case, device)

    assert_refused(central.post(other.case_id, body), 400, "case_id_mismatch")
    assert_refused(central.post("not-a-case-id", body), 400, "case_id_mismatch")
    assert central.store.count() == 0


def test_the_same_case_with_another_payload_or_from_another_device_conflicts(
    central: Central,
) -> None:
    device, other_device = central.register(new_device()), central.register(new_device())
    case = make_case(11)
    assert central.post(case.case_id, central.seal(case, device)).status_code == 201

    changed = type(case)(
        case.case_id,
        envelope_module.Payload(case.payload.result_json + b" ", case.payload.dicom),
    )
    assert_refused(central.post(case.case_id, central.seal(changed, device)), 409, "case_conflict")
    assert_refused(
        central.post(case.case_id, central.seal(case, other_device)), 409, "case_conflict"
    )
    [stored] = central.store.cases()
    assert (stored.device_id, stored.deliveries) == (device.device_id, 1)
    assert (central.store.case_dir(case.case_id) / RESULT_FILE).read_bytes() == (
        case.payload.result_json
    )


def test_an_envelope_sealed_to_a_key_the_server_does_not_hold_is_refused(
    central: Central,
) -> None:
    device = central.register(new_device())
    case = make_case(12)
    stranger = ServerPublicKey.from_public_key(X25519PrivateKey.generate().public_key())

    body = seal_case(case, device, stranger)

    assert_refused(central.post(case.case_id, body), 422, "unknown_server_key")


def test_a_rotated_key_still_opens_until_it_is_pruned(central: Central) -> None:
    device = central.register(new_device())
    old_key = central.key_ring.active
    early, late = make_case(13), make_case(14)
    early_body = seal_case(early, device, old_key)
    late_body = seal_case(late, device, old_key)

    new_key_id = central.key_ring.rotate()

    keys = central.get("/v1/keys").json()
    assert keys["server_key_id"] == new_key_id != old_key.key_id
    assert keys["retired_key_ids"] == [old_key.key_id]
    assert central.post(early.case_id, early_body).status_code == 201
    new_body = seal_case(late, device, central.key_ring.active)

    pruned = central.key_ring.prune(timedelta(0), now=datetime.now(UTC) + timedelta(seconds=5))

    assert pruned == [old_key.key_id]
    assert_refused(central.post(late.case_id, late_body), 422, "unknown_server_key")
    assert central.post(late.case_id, new_body).status_code == 201


@pytest.fixture
def small_central(start_central: StartCentral) -> Central:
    return start_central(max_body_bytes=1024)


def test_a_body_over_the_limit_is_refused_from_its_content_length(small_central: Central) -> None:
    response = small_central.post("0" * 64, b"\x00" * 4096)
    assert_refused(response, 413, "too_large")


def test_a_streamed_body_over_the_limit_is_refused_while_it_arrives(
    small_central: Central,
) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(8):
            yield b"\x00" * 512

    response = small_central.post("0" * 64, chunks())  # chunked: no Content-Length
    assert_refused(response, 413, "too_large")


def test_a_real_envelope_over_the_limit_is_refused(small_central: Central) -> None:
    device = small_central.register(new_device())
    case = make_case(15)
    response = small_central.post(case.case_id, small_central.seal(case, device))
    assert_refused(response, 413, "too_large")
    assert small_central.store.count() == 0


@pytest.mark.parametrize(
    ("age", "accepted"),
    [
        (timedelta(days=29, hours=23), True),
        (timedelta(days=30, minutes=1), False),
        (timedelta(seconds=-200), True),
        (timedelta(seconds=-400), False),
    ],
    ids=["29-days-old", "30-days-old", "200s-ahead", "400s-ahead"],
)
def test_envelope_age_is_checked(central: Central, age: timedelta, accepted: bool) -> None:
    device = central.register(new_device())
    case = make_case(16)
    body = central.seal(case, device, now=datetime.now(UTC) - age)

    response = central.post(case.case_id, body)

    if accepted:
        assert response.status_code == 201, response.text
    else:
        assert_refused(response, 409, "stale_envelope")


def test_the_maximum_age_is_the_configured_one(start_central: StartCentral) -> None:
    central = start_central(max_envelope_age=timedelta(hours=1))
    device = central.register(new_device())
    case = make_case(16)
    body = central.seal(case, device, now=datetime.now(UTC) - timedelta(hours=2))
    assert_refused(central.post(case.case_id, body), 409, "stale_envelope")


@pytest.mark.expect_log_warnings
def test_a_storage_failure_answers_503_and_the_retry_succeeds(central: Central) -> None:
    device = central.register(new_device())
    case = make_case(17)
    body = central.seal(case, device)
    blocker = central.store.case_dir(case.case_id)
    blocker.write_bytes(b"")  # a file where the case folder must go: its creation fails

    response = central.post(case.case_id, body)

    assert_refused(response, 503, "store_error")
    assert int(response.headers["Retry-After"]) > 0
    assert central.store.count() == 0
    blocker.unlink()
    retry = central.post(case.case_id, body)
    assert retry.status_code == 201, retry.text
    assert Receipt.from_dict(retry.json()["receipt"]).deliveries == 1


def test_errors_outside_the_protocol_have_the_error_shape(central: Central) -> None:
    assert_refused(central.get("/v1/nothing-here"), 404, "not_found")
    response = central.http.put(f"{central.url}/v1/cases/{'0' * 64}", data=b"x", timeout=30)
    assert_refused(response, 405, "method_not_allowed")
