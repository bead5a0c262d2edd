"""The v1 envelope: round trips, and every way of altering the bytes is caught by the right check.

Alterations that keep a valid signature (the header re-signed with the device key, as a thief of
that key could) prove that the HPKE info and the chunk AAD catch them too, not only the signature.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from triage_app.errors import (
    EnvelopeError,
    EnvelopeSignatureError,
    EnvelopeTamperedError,
    EnvelopeTruncatedError,
    MalformedEnvelopeError,
    UnknownServerKeyError,
)
from triage_app.escalation.envelope import (
    HPKE_INFO_LABEL,
    LENGTH_BYTES,
    MAGIC,
    MAX_CHUNK_SIZE,
    MAX_HEADER_BYTES,
    EnvelopeHeader,
    EnvelopeOpener,
    Payload,
    canonical_json,
    check_sealed,
    open_bytes,
    open_envelope,
    read_header,
    seal,
    seal_bytes,
    verify_header,
)
from triage_app.escalation.keys import DeviceIdentity, ServerPublicKey

DEVICE = DeviceIdentity.from_signing_key(Ed25519PrivateKey.generate())
OTHER_DEVICE = DeviceIdentity.from_signing_key(Ed25519PrivateKey.generate())
SERVER_PRIVATE = X25519PrivateKey.generate()
SERVER_KEY = ServerPublicKey.from_public_key(SERVER_PRIVATE.public_key())
SERVER_KEYS = {SERVER_KEY.key_id: SERVER_PRIVATE}
CASE_ID = hashlib.sha256(b"case one").hexdigest()
OTHER_CASE_ID = hashlib.sha256(b"case two").hexdigest()
NOW = datetime(2026, 11, 22, 10, 0, 0, 123456, tzinfo=UTC)
CHUNK = 64

DICOM_MARKER = b"DICOM-PLAINTEXT-MARKER-7f3a"
JSON_MARKER = b"JSON-PLAINTEXT-MARKER-c91e"


def plaintext(size: int) -> bytes:
    return bytes((i * 7 + 3) % 256 for i in range(size))


def seal_small(data: bytes, *, chunk_size: int = CHUNK, case_id: str = CASE_ID) -> bytes:
    return bytes(
        seal_bytes(
            data,
            case_id=case_id,
            device=DEVICE,
            server_key=SERVER_KEY,
            chunk_size=chunk_size,
            now=NOW,
        )
    )


def open_small(envelope: bytes) -> tuple[EnvelopeHeader, bytes]:
    header, plain = open_bytes(
        envelope, device_public_key=DEVICE.public_key(), server_keys=SERVER_KEYS
    )
    return header, bytes(plain)


@dataclass(frozen=True)
class Layout:
    """Where each region of a well-formed envelope is, parsed independently of the module."""

    header_end: int
    signature_end: int
    chunks: list[tuple[int, int, int]]  # (length prefix start, body start, body end)

    def chunk_bytes(self, envelope: bytes, index: int) -> bytes:
        start, _, end = self.chunks[index]
        return envelope[start:end]


def layout(envelope: bytes | bytearray) -> Layout:
    header_end = 12 + int.from_bytes(envelope[8:12], "big")
    signature_end = header_end + 64
    chunks = []
    offset = signature_end
    while offset < len(envelope):
        length = int.from_bytes(envelope[offset : offset + 4], "big")
        chunks.append((offset, offset + 4, offset + 4 + length))
        offset += 4 + length
    assert offset == len(envelope)
    return Layout(header_end, signature_end, chunks)


def header_dict(envelope: bytes | bytearray) -> dict[str, object]:
    value = json.loads(envelope[12 : layout(envelope).header_end])
    assert isinstance(value, dict)
    return value


def resign_raw(
    envelope: bytes, header_bytes: bytes, device: DeviceIdentity = DEVICE, body: bytes | None = None
) -> bytes:
    """Replace the header by ``header_bytes`` with a valid signature, keeping the chunks."""
    signed = MAGIC + len(header_bytes).to_bytes(4, "big") + header_bytes
    if body is None:
        body = envelope[layout(envelope).signature_end :]
    return signed + device.signing_key.sign(signed) + body


def resign(
    envelope: bytes,
    mutate: Callable[[dict[str, object]], None],
    device: DeviceIdentity = DEVICE,
) -> bytes:
    header = header_dict(envelope)
    mutate(header)
    return resign_raw(envelope, canonical_json(header), device)


def assert_one_line(err: BaseException) -> None:
    assert "\n" not in str(err) and str(err)


# --- Round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 2 * CHUNK + 1, 700])
def test_round_trip(size: int) -> None:
    data = plaintext(size)
    envelope = seal_small(data)
    header, opened = open_small(envelope)
    assert opened == data
    assert header.version == 1
    assert header.case_id == CASE_ID
    assert header.device_id == DEVICE.device_id
    assert header.server_key_id == SERVER_KEY.key_id
    assert header.created_at == NOW.replace(microsecond=0)
    assert header.payload_sha256 == hashlib.sha256(data).hexdigest()
    assert header.payload_bytes == size
    assert header.chunk_size == CHUNK
    assert header.chunk_count == max(1, -(-size // CHUNK))
    assert len(header.envelope_id) == 32
    lay = layout(envelope)
    assert len(lay.chunks) == header.chunk_count
    assert len(envelope) == lay.signature_end + header.chunk_count * 20 + size


def test_an_empty_plaintext_is_one_empty_chunk() -> None:
    envelope = seal_small(b"")
    lay = layout(envelope)
    assert len(lay.chunks) == 1
    assert lay.chunk_bytes(envelope, 0)[:4] == (16).to_bytes(4, "big")
    assert open_small(envelope)[1] == b""


def test_exactly_one_chunk_has_no_trailing_empty_chunk() -> None:
    envelope = seal_small(plaintext(CHUNK))
    assert [end - body for _, body, end in layout(envelope).chunks] == [CHUNK + 16]


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=600), chunk_size=st.integers(min_value=1, max_value=200))
def test_round_trip_any_plaintext_and_chunk_size(data: bytes, chunk_size: int) -> None:
    header, opened = open_small(seal_small(data, chunk_size=chunk_size))
    assert opened == data
    assert header.chunk_size == chunk_size


@pytest.mark.parametrize(
    "payload",
    [
        Payload(b"", b""),
        Payload(b"{}", b""),
        Payload(b"", b"D"),
        Payload(b'{"verdict":"abnormal"}', b"\x00" * 128 + b"DICM" + plaintext(300)),
    ],
    ids=["empty", "json-only", "one-dicom-byte", "both"],
)
def test_payload_round_trip(payload: Payload) -> None:
    envelope = seal(
        payload, case_id=CASE_ID, device=DEVICE, server_key=SERVER_KEY, chunk_size=CHUNK, now=NOW
    )
    opened = open_envelope(envelope, device_public_key=DEVICE.public_key(), server_keys=SERVER_KEYS)
    assert (opened.result_json, bytes(opened.dicom)) == (payload.result_json, payload.dicom)
    assert opened.header.payload_bytes == len(payload.to_bytes())
    assert Payload.from_bytes(payload.to_bytes()) == payload


def test_default_chunk_size_and_clock() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    envelope = seal(Payload(b"{}", b"x"), case_id=CASE_ID, device=DEVICE, server_key=SERVER_KEY)
    header = read_header(envelope)
    assert header.chunk_size == 1 << 20
    assert header.chunk_count == 1
    assert before <= header.created_at <= datetime.now(UTC)


def test_every_sealing_is_fresh() -> None:
    first, second = seal_small(b"same"), seal_small(b"same")
    assert first != second
    assert read_header(first).envelope_id != read_header(second).envelope_id
    assert read_header(first).sealed_key != read_header(second).sealed_key


@pytest.mark.parametrize("chunk_size", [7, CHUNK, 1 << 20])
def test_the_envelope_never_contains_the_plaintext(chunk_size: int) -> None:
    result_json = b'{"note":"' + JSON_MARKER + b'","score":0.93}'
    dicom = b"\x00" * 128 + b"DICM" + DICOM_MARKER + plaintext(200) + DICOM_MARKER
    envelope = seal(
        Payload(result_json, dicom),
        case_id=CASE_ID,
        device=DEVICE,
        server_key=SERVER_KEY,
        chunk_size=chunk_size,
    )
    for marker in (DICOM_MARKER, JSON_MARKER, b"DICM", b'"score"'):
        assert marker not in envelope
        assert base64.b64encode(marker)[:16] not in envelope
    opened = open_envelope(envelope, device_public_key=DEVICE.public_key(), server_keys=SERVER_KEYS)
    assert DICOM_MARKER in bytes(opened.dicom)  # the search above could have found it


def test_payload_repr_shows_sizes_not_content() -> None:
    text = repr(Payload(JSON_MARKER, DICOM_MARKER))
    assert JSON_MARKER.decode() not in text and DICOM_MARKER.decode() not in text
    assert f"<{len(JSON_MARKER)} bytes>" in text


# --- Signature and keys -------------------------------------------------------------------------


def test_the_wrong_device_key_is_a_bad_signature() -> None:
    envelope = seal_small(b"data")
    with pytest.raises(EnvelopeSignatureError):
        open_bytes(envelope, device_public_key=OTHER_DEVICE.public_key(), server_keys=SERVER_KEYS)
    with pytest.raises(EnvelopeSignatureError):
        verify_header(envelope, OTHER_DEVICE.public_key())
    assert verify_header(envelope, DEVICE.public_key()) == read_header(envelope)


def test_another_device_signing_in_this_devices_name_is_a_bad_signature() -> None:
    forged = resign(seal_small(b"data"), lambda header: None, device=OTHER_DEVICE)
    assert read_header(forged).device_id == DEVICE.device_id
    with pytest.raises(EnvelopeSignatureError, match="does not verify"):
        open_small(forged)


def test_read_header_does_not_check_the_signature() -> None:
    envelope = bytearray(seal_small(b"data"))
    lay = layout(bytes(envelope))
    envelope[lay.header_end : lay.signature_end] = bytes(64)
    assert read_header(bytes(envelope)).case_id == CASE_ID
    with pytest.raises(EnvelopeSignatureError):
        open_small(bytes(envelope))


def test_an_unknown_server_key_id_is_refused() -> None:
    envelope = seal_small(b"data")
    other = X25519PrivateKey.generate()
    other_id = ServerPublicKey.from_public_key(other.public_key()).key_id
    for keys in ({}, {other_id: other}):
        with pytest.raises(UnknownServerKeyError, match=SERVER_KEY.key_id):
            open_bytes(envelope, device_public_key=DEVICE.public_key(), server_keys=keys)


def test_the_wrong_private_key_under_the_right_id_is_tampering() -> None:
    envelope = seal_small(b"data")
    keys = {SERVER_KEY.key_id: X25519PrivateKey.generate()}
    with pytest.raises(EnvelopeTamperedError, match="data key"):
        open_bytes(envelope, device_public_key=DEVICE.public_key(), server_keys=keys)


# --- Single-byte alterations --------------------------------------------------------------------


def expected_errors(lay: Layout, offset: int) -> tuple[type[EnvelopeError], ...]:
    if offset < 8:
        return (MalformedEnvelopeError,)
    if offset < 12:
        return (MalformedEnvelopeError, EnvelopeTruncatedError)
    if offset < lay.header_end:
        return (MalformedEnvelopeError, EnvelopeSignatureError)
    if offset < lay.signature_end:
        return (EnvelopeSignatureError,)
    return (EnvelopeTamperedError,)


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_every_altered_byte_is_caught_by_its_regions_check(mask: int) -> None:
    envelope = seal_small(plaintext(150))  # three chunks, the last one short
    lay = layout(envelope)
    assert len(lay.chunks) == 3
    seen: set[type[EnvelopeError]] = set()
    for offset in range(len(envelope)):
        altered = bytearray(envelope)
        altered[offset] ^= mask
        with pytest.raises(EnvelopeError) as caught:
            open_small(bytes(altered))
        assert isinstance(caught.value, expected_errors(lay, offset)), offset
        assert_one_line(caught.value)
        seen.add(type(caught.value))
    assert {MalformedEnvelopeError, EnvelopeSignatureError, EnvelopeTamperedError} <= seen


def test_the_senders_check_catches_every_altered_byte_but_the_ciphertexts() -> None:
    envelope = seal_small(plaintext(150))
    lay = layout(envelope)
    header = read_header(envelope)
    assert check_sealed(envelope, DEVICE.public_key()) == header
    length_fields = {start + i for start, _, _ in lay.chunks for i in range(LENGTH_BYTES)}
    for offset in range(len(envelope)):
        altered = bytearray(envelope)
        altered[offset] ^= 0x01
        if offset >= lay.signature_end and offset not in length_fields:
            # Only the server can tell (AES-GCM), and does: see the test above.
            assert check_sealed(altered, DEVICE.public_key()) == header
        else:
            with pytest.raises(expected_errors(lay, offset)):
                check_sealed(altered, DEVICE.public_key())
    for size in range(len(envelope)):
        with pytest.raises(EnvelopeTruncatedError):
            check_sealed(envelope[:size], DEVICE.public_key())
    with pytest.raises(EnvelopeTamperedError, match="after its last chunk"):
        check_sealed(envelope + b"x", DEVICE.public_key())
    with pytest.raises(EnvelopeSignatureError):
        check_sealed(envelope, OTHER_DEVICE.public_key())


@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize("part", ["length", "body-start", "body-end"])
def test_each_chunks_length_and_body_are_authenticated(index: int, part: str) -> None:
    envelope = seal_small(plaintext(150))
    start, body, end = layout(envelope).chunks[index]
    offset = {"length": start + 3, "body-start": body, "body-end": end - 1}[part]
    altered = bytearray(envelope)
    altered[offset] ^= 0x01
    with pytest.raises(EnvelopeTamperedError, match=f"chunk {index + 1} of 3"):
        open_small(bytes(altered))


@pytest.mark.parametrize("position", [0, 31, 32, 63, 64, 79])
def test_an_altered_sealed_key_is_caught_by_hpke_even_when_re_signed(position: int) -> None:
    """Positions cover the encapsulated key, the sealed data key and the tag."""

    def alter(header: dict[str, object]) -> None:
        sealed = bytearray(base64.b64decode(str(header["sealed_key"])))
        sealed[position] ^= 0x01
        header["sealed_key"] = base64.b64encode(bytes(sealed)).decode("ascii")

    with pytest.raises(EnvelopeTamperedError, match="data key"):
        open_small(resign(seal_small(plaintext(100)), alter))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("case_id", OTHER_CASE_ID),
        ("envelope_id", "0" * 32),
        ("created_at", "2020-01-01T00:00:00Z"),
        ("payload_sha256", hashlib.sha256(b"other").hexdigest()),
    ],
)
def test_re_signed_header_changes_are_caught_by_hpke_info_or_chunk_aad(
    field: str, value: object
) -> None:
    def alter(header: dict[str, object]) -> None:
        header[field] = value

    with pytest.raises(EnvelopeTamperedError):
        open_small(resign(seal_small(plaintext(100)), alter))


def test_a_re_signed_server_key_id_is_caught_by_hpke_info() -> None:
    alias = "0123456789abcdef"
    altered = resign(seal_small(b"data"), lambda header: header.update(server_key_id=alias))
    keys = {alias: SERVER_PRIVATE, **SERVER_KEYS}
    with pytest.raises(EnvelopeTamperedError, match="data key"):
        open_bytes(altered, device_public_key=DEVICE.public_key(), server_keys=keys)


def test_re_signed_consistent_sizes_are_caught_by_chunk_lengths() -> None:
    def alter(header: dict[str, object]) -> None:
        header.update(chunk_size=32, chunk_count=5)  # 150 bytes in 32-byte chunks

    with pytest.raises(EnvelopeTamperedError, match="chunk 1 of 5"):
        open_small(resign(seal_small(plaintext(150)), alter))


# --- Truncation and chunk games -----------------------------------------------------------------


def test_truncation_at_every_offset_is_reported_as_truncation() -> None:
    envelope = seal_small(plaintext(100))
    signature_end = layout(envelope).signature_end
    for size in range(len(envelope)):
        with pytest.raises(EnvelopeTruncatedError) as caught:
            open_small(envelope[:size])
        assert_one_line(caught.value)
        if size < signature_end:
            with pytest.raises(EnvelopeTruncatedError):
                read_header(envelope[:size])
        else:
            assert read_header(envelope[:size]) == read_header(envelope)


def chunks_of(envelope: bytes) -> tuple[bytes, list[bytes]]:
    lay = layout(envelope)
    return envelope[: lay.signature_end], [
        lay.chunk_bytes(envelope, i) for i in range(len(lay.chunks))
    ]


@pytest.mark.parametrize(("first", "second"), [(0, 1), (1, 2), (0, 3), (2, 3)])
def test_reordered_chunks_are_tampering(first: int, second: int) -> None:
    head, chunks = chunks_of(seal_small(plaintext(4 * CHUNK)))
    chunks[first], chunks[second] = chunks[second], chunks[first]
    with pytest.raises(EnvelopeTamperedError):
        open_small(head + b"".join(chunks))


@pytest.mark.parametrize("index", [0, 1, 3])
def test_a_duplicated_chunk_is_tampering(index: int) -> None:
    head, chunks = chunks_of(seal_small(plaintext(4 * CHUNK)))
    chunks.insert(index, chunks[index])
    with pytest.raises(EnvelopeTamperedError):
        open_small(head + b"".join(chunks))


def test_a_dropped_last_chunk_is_truncation() -> None:
    head, chunks = chunks_of(seal_small(plaintext(4 * CHUNK)))
    with pytest.raises(EnvelopeTruncatedError, match="before chunk 4 of 4"):
        open_small(head + b"".join(chunks[:-1]))


def test_a_dropped_middle_chunk_is_tampering() -> None:
    head, chunks = chunks_of(seal_small(plaintext(4 * CHUNK)))
    del chunks[1]
    with pytest.raises(EnvelopeTamperedError, match="chunk 2 of 4"):
        open_small(head + b"".join(chunks))


@pytest.mark.parametrize("extra", [b"\x00", b"\x00" * 20, (16).to_bytes(4, "big") + bytes(16)])
def test_appended_bytes_are_tampering(extra: bytes) -> None:
    with pytest.raises(EnvelopeTamperedError, match="after its last chunk"):
        open_small(seal_small(plaintext(100)) + extra)


def test_a_chunk_from_another_envelope_is_tampering() -> None:
    head, chunks = chunks_of(seal_small(plaintext(3 * CHUNK)))
    _, foreign = chunks_of(seal_small(plaintext(3 * CHUNK)))
    for index in range(3):
        spliced = [*chunks]
        spliced[index] = foreign[index]
        with pytest.raises(EnvelopeTamperedError, match=f"chunk {index + 1} of 3"):
            open_small(head + b"".join(spliced))


def test_a_header_from_another_envelope_is_tampering() -> None:
    head, _ = chunks_of(seal_small(plaintext(100)))
    _, other_chunks = chunks_of(seal_small(plaintext(100)))
    with pytest.raises(EnvelopeTamperedError):
        open_small(head + b"".join(other_chunks))


# --- Malformed structure ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "alter",
    [
        lambda h: h.pop("chunk_count"),
        lambda h: h.update(extra="x"),
        lambda h: h.update(version=2),
        lambda h: h.update(version=True),
        lambda h: h.update(chunk_size=True),
        lambda h: h.update(payload_bytes="100"),
        lambda h: h.update(payload_bytes=100.0),
        lambda h: h.update(payload_bytes=-1),
        lambda h: h.update(chunk_size=0),
        lambda h: h.update(chunk_size=MAX_CHUNK_SIZE + 1, chunk_count=1),
        lambda h: h.update(chunk_count=3),
        lambda h: h.update(chunk_count=1),
        lambda h: h.update(payload_bytes=1 << 40, chunk_size=1, chunk_count=1 << 40),
        lambda h: h.update(case_id=CASE_ID.upper()),
        lambda h: h.update(case_id=CASE_ID[:-1]),
        lambda h: h.update(device_id="dev-XYZ"),
        lambda h: h.update(server_key_id=None),
        lambda h: h.update(envelope_id="0" * 31),
        lambda h: h.update(payload_sha256="g" * 64),
        lambda h: h.update(created_at="2026-11-22 10:00:00"),
        lambda h: h.update(created_at="2026-13-40T10:00:00Z"),
        lambda h: h.update(created_at="2026-11-22T10:00:00+00:00"),
        lambda h: h.update(sealed_key="not base64!"),
        lambda h: h.update(sealed_key=base64.b64encode(bytes(79)).decode()),
        lambda h: h.update(sealed_key=123),
    ],
)
def test_re_signed_header_shape_violations_are_malformed(
    alter: Callable[[dict[str, object]], None],
) -> None:
    envelope = resign(seal_small(plaintext(100)), alter)
    with pytest.raises(MalformedEnvelopeError) as caught:
        read_header(envelope)
    assert_one_line(caught.value)
    with pytest.raises(MalformedEnvelopeError):
        open_small(envelope)


@pytest.mark.parametrize(
    "encode",
    [
        lambda h: json.dumps(h, sort_keys=True).encode(),
        lambda h: canonical_json(h).replace(b"{", b"{ ", 1),
        lambda h: json.dumps(dict(reversed(list(h.items()))), separators=(",", ":")).encode(),
        lambda h: canonical_json(h)[:-1] + b',"version":1}',
        lambda h: canonical_json([h]),
        lambda h: b"\xff" + canonical_json(h),
        lambda h: canonical_json(h).replace(b'"version":1', b'"version":NaN'),
    ],
    ids=["spaces", "leading-space", "unsorted", "duplicate-key", "array", "not-utf8", "nan"],
)
def test_non_canonical_or_non_json_headers_are_malformed(
    encode: Callable[[dict[str, object]], bytes],
) -> None:
    envelope = seal_small(plaintext(10))
    with pytest.raises(MalformedEnvelopeError):
        open_small(resign_raw(envelope, encode(header_dict(envelope))))


@pytest.mark.parametrize("header_len", [0, MAX_HEADER_BYTES + 1, 0xFFFFFFFF])
def test_an_absurd_header_length_is_malformed_before_reading(header_len: int) -> None:
    data = MAGIC + header_len.to_bytes(4, "big") + b"{}"
    with pytest.raises(MalformedEnvelopeError, match="header length"):
        read_header(data)


def test_a_huge_but_consistent_size_fails_without_allocating() -> None:
    def alter(header: dict[str, object]) -> None:
        header.update(payload_bytes=1 << 40, chunk_size=MAX_CHUNK_SIZE, chunk_count=1 << 16)

    with pytest.raises((EnvelopeTamperedError, EnvelopeTruncatedError)):
        open_small(resign(seal_small(plaintext(100)), alter))


@pytest.mark.parametrize(
    "data",
    [b"", b"TRG", b"TRGENV\x00\x01\x00"],
)
def test_short_prefixes_of_the_magic_are_truncation(data: bytes) -> None:
    with pytest.raises(EnvelopeTruncatedError):
        read_header(data)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"X", "bad magic"),
        (b"PK\x03\x04 a zip file", "bad magic"),
        (b"TRGENV\x00\x02" + bytes(100), "unsupported envelope format version"),
    ],
)
def test_other_files_are_malformed(data: bytes, match: str) -> None:
    with pytest.raises(MalformedEnvelopeError, match=match):
        open_small(data)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=400))
def test_arbitrary_bytes_only_ever_raise_envelope_errors(data: bytes) -> None:
    for candidate in (data, MAGIC + data):
        with pytest.raises(EnvelopeError):
            open_small(candidate)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_arbitrary_splices_of_a_valid_envelope_never_open(data: st.DataObject) -> None:
    envelope = seal_small(plaintext(150))
    start = data.draw(st.integers(0, len(envelope)))
    end = data.draw(st.integers(start, len(envelope)))
    insert = data.draw(st.binary(max_size=40))
    altered = envelope[:start] + insert + envelope[end:]
    if altered == envelope:
        return
    with pytest.raises(EnvelopeError):
        open_small(altered)


# --- Payload structure and argument checks ------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "shorter than its length"),
        (b"\x00\x00\x00", "shorter than its length"),
        (b"\x00\x00\x00\x05abcd", "exceeds"),
        (b"\x00\x00\x00\x02\xff\xfe", "not UTF-8"),
    ],
)
def test_an_impossible_payload_is_malformed(data: bytes, match: str) -> None:
    with pytest.raises(MalformedEnvelopeError, match=match):
        Payload.from_bytes(data)
    with pytest.raises(MalformedEnvelopeError, match=match):
        open_envelope(
            seal_small(data), device_public_key=DEVICE.public_key(), server_keys=SERVER_KEYS
        )


def reencrypted(envelope: bytes | bytearray, mutate: Callable[[dict[str, object]], None]) -> bytes:
    """Change the header, re-sign it and re-encrypt every chunk under it, as a device that lies
    consistently would (or a buggy one): only the payload checks can tell."""
    header = header_dict(envelope)
    lay = layout(envelope)
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    info = HPKE_INFO_LABEL + "\x00".join(
        str(header[name]) for name in ("case_id", "device_id", "server_key_id")
    ).encode("ascii")
    aead = AESGCM(suite.decrypt(base64.b64decode(str(header["sealed_key"])), SERVER_PRIVATE, info))
    old_aad = hashlib.sha256(envelope[: lay.header_end]).digest()
    mutate(header)
    header_bytes = canonical_json(header)
    signed = MAGIC + len(header_bytes).to_bytes(4, "big") + header_bytes
    aad = hashlib.sha256(signed).digest()
    body = b""
    for index, (_, start, end) in enumerate(lay.chunks):
        nonce = bytes(7) + index.to_bytes(4, "big") + bytes([index == len(lay.chunks) - 1])
        sealed = aead.encrypt(nonce, aead.decrypt(nonce, envelope[start:end], old_aad), aad)
        body += len(sealed).to_bytes(4, "big") + sealed
    return signed + DEVICE.signing_key.sign(signed) + body


def wrong_payload_hash(header: dict[str, object]) -> None:
    header["payload_sha256"] = "0" * 64


def test_a_payload_that_is_not_the_one_the_header_hashes_is_tampering() -> None:
    payload = Payload(b'{"a":1}', b"DICM" + plaintext(300))
    envelope = seal(
        payload, case_id=CASE_ID, device=DEVICE, server_key=SERVER_KEY, chunk_size=CHUNK
    )
    honest = open_envelope(
        reencrypted(envelope, lambda header: None),
        device_public_key=DEVICE.public_key(),
        server_keys=SERVER_KEYS,
    )
    assert bytes(honest.dicom) == payload.dicom  # the helper itself keeps a good envelope good
    lying = reencrypted(envelope, wrong_payload_hash)
    with pytest.raises(EnvelopeTamperedError, match="payload hash"):
        open_envelope(lying, device_public_key=DEVICE.public_key(), server_keys=SERVER_KEYS)
    # Before the hash is checked, the payload is there to be written to temporary files only.
    opener = EnvelopeOpener(lying, device_public_key=DEVICE.public_key(), server_keys=SERVER_KEYS)
    with pytest.raises(RuntimeError):
        opener.plaintext()
    opener.open_chunks()
    unchecked = opener.unchecked_payload()
    assert unchecked is not None
    assert (unchecked[0], bytes(unchecked[1])) == (payload.result_json, payload.dicom)
    with pytest.raises(EnvelopeTamperedError, match="payload hash"):
        opener.opened()


def test_the_payload_hash_is_checked_before_the_payloads_structure() -> None:
    impossible = b"\x00\x00\x00\x09{}"  # the result JSON would be longer than the payload
    lying = reencrypted(seal_small(impossible), wrong_payload_hash)
    opener = EnvelopeOpener(lying, device_public_key=DEVICE.public_key(), server_keys=SERVER_KEYS)
    opener.open_chunks()
    assert opener.unchecked_payload() is None
    with pytest.raises(EnvelopeTamperedError, match="payload hash"):
        opener.opened()
    with pytest.raises(MalformedEnvelopeError):
        open_envelope(
            reencrypted(seal_small(impossible), lambda header: None),
            device_public_key=DEVICE.public_key(),
            server_keys=SERVER_KEYS,
        )


def test_an_opened_envelope_keeps_its_signed_part_and_shows_no_content() -> None:
    payload = Payload(JSON_MARKER, DICOM_MARKER)
    envelope = seal(
        payload, case_id=CASE_ID, device=DEVICE, server_key=SERVER_KEY, chunk_size=CHUNK
    )
    opened = open_envelope(envelope, device_public_key=DEVICE.public_key(), server_keys=SERVER_KEYS)
    assert opened.signed_header == envelope[: layout(envelope).signature_end]
    assert opened.dicom.readonly
    assert JSON_MARKER.decode() not in repr(opened)
    assert DICOM_MARKER.decode() not in repr(opened)


@pytest.mark.parametrize(
    ("case_id", "chunk_size", "now"),
    [
        ("abc", CHUNK, NOW),
        (CASE_ID.upper(), CHUNK, NOW),
        (CASE_ID, 0, NOW),
        (CASE_ID, MAX_CHUNK_SIZE + 1, NOW),
        (CASE_ID, CHUNK, NOW.replace(tzinfo=None)),
    ],
    ids=["short-case-id", "upper-case-id", "zero-chunk", "huge-chunk", "naive-time"],
)
def test_seal_refuses_bad_arguments(case_id: str, chunk_size: int, now: datetime) -> None:
    with pytest.raises(ValueError):
        seal_bytes(
            b"data",
            case_id=case_id,
            device=DEVICE,
            server_key=SERVER_KEY,
            chunk_size=chunk_size,
            now=now,
        )


def test_created_at_is_utc_whatever_the_zone_given() -> None:
    local = NOW.astimezone(timezone(timedelta(hours=-5)))
    envelope = seal_bytes(b"x", case_id=CASE_ID, device=DEVICE, server_key=SERVER_KEY, now=local)
    assert header_dict(envelope)["created_at"] == "2026-11-22T10:00:00Z"


def test_the_bytes_follow_the_protocol_document() -> None:
    """Decode an envelope with only the doc's definitions, as the other side of the wire would."""
    payload = Payload(b'{"score":0.5}', b"DICM" + plaintext(150))
    envelope = seal(
        payload, case_id=CASE_ID, device=DEVICE, server_key=SERVER_KEY, chunk_size=CHUNK, now=NOW
    )
    assert envelope[:8] == b"TRGENV\x00\x01"
    lay = layout(envelope)
    header_bytes = envelope[12 : lay.header_end]
    header = json.loads(header_bytes)
    assert header_bytes == json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    assert set(header) == {
        "version",
        "case_id",
        "device_id",
        "server_key_id",
        "envelope_id",
        "created_at",
        "sealed_key",
        "payload_sha256",
        "payload_bytes",
        "chunk_size",
        "chunk_count",
    }
    assert header["created_at"] == "2026-11-22T10:00:00Z"
    DEVICE.public_key().verify(
        envelope[lay.header_end : lay.signature_end], envelope[: lay.header_end]
    )
    info = (
        b"triage-envelope-v1\x00"
        + CASE_ID.encode()
        + b"\x00"
        + DEVICE.device_id.encode()
        + b"\x00"
        + SERVER_KEY.key_id.encode()
    )
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    data_key = suite.decrypt(base64.b64decode(header["sealed_key"]), SERVER_PRIVATE, info=info)
    assert len(data_key) == 32
    aad = hashlib.sha256(envelope[: lay.header_end]).digest()
    decrypted = b""
    for index, (start, body, end) in enumerate(lay.chunks):
        assert int.from_bytes(envelope[start:body], "big") == end - body
        last = index == len(lay.chunks) - 1
        nonce = bytes(7) + index.to_bytes(4, "big") + bytes([1 if last else 0])
        decrypted += AESGCM(data_key).decrypt(nonce, envelope[body:end], aad)
    assert header["chunk_count"] == len(lay.chunks) == 3
    assert header["payload_bytes"] == len(decrypted)
    assert header["payload_sha256"] == hashlib.sha256(decrypted).hexdigest()
    json_len = int.from_bytes(decrypted[:4], "big")
    assert decrypted[4 : 4 + json_len] == payload.result_json
    assert decrypted[4 + json_len :] == payload.dicom
