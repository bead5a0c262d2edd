"""The escalation envelope, format version 1 (docs/escalation-protocol.md, "Envelope").

An escalated case waits in the device outbox and then crosses networks and proxies nobody here
controls, so the bytes themselves carry the protection, not the connection:

* only the server can read them: a fresh data key per envelope, sealed with HPKE to the server's
  X25519 key, encrypts the payload in AES-256-GCM chunks;
* only the device can have made them: its Ed25519 key signs the header;
* no change goes unnoticed: every chunk is bound to the signed header (AAD) and to its position
  and finality (nonce), and the header fixes how many chunks of which sizes follow, so reordered,
  dropped, duplicated, spliced or appended bytes all fail.

Opening runs the checks in the protocol's order, each with its own error class, so the server
answers with a precise code. Error messages are one line and never quote payload content.
Absurd sizes in a header are refused before anything is allocated for them.

Envelopes carry whole images (tens of MB), so sealing and opening work in place: chunks are
encrypted into, and decrypted into, one preallocated buffer, and the functions take any bytes-like
object, so neither side copies a case more often than the cryptography needs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from triage_app.errors import (
    EnvelopeSignatureError,
    EnvelopeTamperedError,
    EnvelopeTruncatedError,
    MalformedEnvelopeError,
    UnknownServerKeyError,
)
from triage_app.escalation.hashing import THREAD_WORTH_BYTES, BackgroundSha256
from triage_app.escalation.keys import DeviceIdentity, ServerPublicKey, device_id_for

FORMAT_VERSION = 1
MAGIC = b"TRGENV\x00\x01"
_MAGIC_FAMILY = MAGIC[:6]
LENGTH_BYTES = 4
PREFIX_BYTES = len(MAGIC) + LENGTH_BYTES
SIGNATURE_BYTES = 64
TAG_BYTES = 16
DATA_KEY_BYTES = 32
# HPKE single shot with X25519 and AES-256-GCM: 32-byte encapsulated key || sealed key || tag.
SEALED_KEY_BYTES = 32 + DATA_KEY_BYTES + TAG_BYTES
MAX_HEADER_BYTES = 64 * 1024
MAX_CHUNK_SIZE = 16 * 1024 * 1024
DEFAULT_CHUNK_SIZE = 1 << 20
# The nonce holds a 4-byte chunk counter.
MAX_CHUNK_COUNT = 1 << 32
HPKE_INFO_LABEL = b"triage-envelope-v1\x00"

#: What sealing and opening read: a received body, a spool file's bytes, a view into either.
BytesLike = bytes | bytearray | memoryview

_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_DEVICE_ID = re.compile(r"dev-[0-9a-f]{16}")
_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
_TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

HEADER_FIELDS = frozenset(
    {
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
)


# --- Shared encodings (also used by receipts) ---------------------------------------------------


def canonical_json(value: object) -> bytes:
    """The protocol's canonical JSON: UTF-8, sorted keys, separators ``,`` and ``:``."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def format_timestamp(moment: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SSZ`` in UTC (sub-second digits dropped)."""
    if moment.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return moment.astimezone(UTC).strftime(_TIMESTAMP_FORMAT)


def parse_timestamp(text: str) -> datetime:
    """Parse exactly ``YYYY-MM-DDTHH:MM:SSZ`` into an aware UTC datetime; ``ValueError`` if not."""
    if not _TIMESTAMP.fullmatch(text):
        raise ValueError("not a YYYY-MM-DDTHH:MM:SSZ timestamp")
    return datetime.strptime(text, _TIMESTAMP_FORMAT).replace(tzinfo=UTC)


def is_case_id(text: str) -> bool:
    """Whether ``text`` has the shape of a case id (64 lowercase hex)."""
    return _HEX64.fullmatch(text) is not None


# --- Payload ------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Payload:
    """What an envelope carries: the result JSON and the de-identified DICOM file."""

    result_json: bytes
    dicom: bytes

    def __repr__(self) -> str:
        # Sizes only: the content has no business in logs or tracebacks.
        return (
            f"Payload(result_json=<{len(self.result_json)} bytes>, dicom=<{len(self.dicom)} bytes>)"
        )

    def to_bytes(self) -> bytes:
        """``4-byte big-endian length of result JSON || result JSON || DICOM bytes``."""
        if len(self.result_json) >= 1 << (8 * LENGTH_BYTES):
            raise ValueError("the result JSON is too large for the payload format")
        return len(self.result_json).to_bytes(LENGTH_BYTES, "big") + self.result_json + self.dicom

    @classmethod
    def from_bytes(cls, data: BytesLike) -> Payload:
        """Split a payload; ``MalformedEnvelopeError`` if its structure is impossible."""
        result_json, dicom = _split_payload(memoryview(data))
        return cls(result_json=result_json, dicom=bytes(dicom))


def _split_payload(data: memoryview) -> tuple[bytes, memoryview]:
    """The result JSON (a copy: it is small) and a view of the DICOM bytes (not copied)."""
    if len(data) < LENGTH_BYTES:
        raise MalformedEnvelopeError("payload is shorter than its length field")
    json_len = int.from_bytes(data[:LENGTH_BYTES], "big")
    if json_len > len(data) - LENGTH_BYTES:
        raise MalformedEnvelopeError("payload result JSON length exceeds the payload")
    result_json = bytes(data[LENGTH_BYTES : LENGTH_BYTES + json_len])
    try:
        result_json.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedEnvelopeError("payload result JSON is not UTF-8") from None
    return result_json, data[LENGTH_BYTES + json_len :]


# --- Header -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnvelopeHeader:
    """The signed header fields. ``created_at`` is aware UTC; ``sealed_key`` is the raw bytes."""

    version: int
    case_id: str
    device_id: str
    server_key_id: str
    envelope_id: str
    created_at: datetime
    sealed_key: bytes
    payload_sha256: str
    payload_bytes: int
    chunk_size: int
    chunk_count: int

    def to_dict(self) -> dict[str, int | str]:
        return {
            "version": self.version,
            "case_id": self.case_id,
            "device_id": self.device_id,
            "server_key_id": self.server_key_id,
            "envelope_id": self.envelope_id,
            "created_at": format_timestamp(self.created_at),
            "sealed_key": base64.b64encode(self.sealed_key).decode("ascii"),
            "payload_sha256": self.payload_sha256,
            "payload_bytes": self.payload_bytes,
            "chunk_size": self.chunk_size,
            "chunk_count": self.chunk_count,
        }

    def to_bytes(self) -> bytes:
        """The header as it is signed: canonical JSON."""
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, value: object) -> EnvelopeHeader:
        """Validate a parsed header; ``MalformedEnvelopeError`` names the first bad field."""
        if not isinstance(value, dict):
            raise MalformedEnvelopeError("envelope header is not a JSON object")
        missing = HEADER_FIELDS - value.keys()
        if missing:
            raise MalformedEnvelopeError(
                f"envelope header lacks field(s): {', '.join(sorted(missing))}"
            )
        if len(value) != len(HEADER_FIELDS):
            extra = len(value) - len(HEADER_FIELDS)
            raise MalformedEnvelopeError(f"envelope header has {extra} unknown field(s)")
        version = _int_field(value, "version")
        if version != FORMAT_VERSION:
            raise MalformedEnvelopeError(f"envelope header version must be {FORMAT_VERSION}")
        created_text = _str_field(value, "created_at", _TIMESTAMP, "a YYYY-MM-DDTHH:MM:SSZ time")
        try:
            created_at = parse_timestamp(created_text)
        except ValueError:
            raise MalformedEnvelopeError("envelope header field created_at is not a date") from None
        sealed_text = value["sealed_key"]
        try:
            if not isinstance(sealed_text, str):
                raise ValueError
            sealed_key = base64.b64decode(sealed_text, validate=True)
        except (binascii.Error, ValueError):
            raise MalformedEnvelopeError(
                "envelope header field sealed_key must be base64"
            ) from None
        if len(sealed_key) != SEALED_KEY_BYTES:
            raise MalformedEnvelopeError(
                f"envelope header field sealed_key must hold {SEALED_KEY_BYTES} bytes"
            )
        payload_bytes = _int_field(value, "payload_bytes")
        chunk_size = _int_field(value, "chunk_size")
        chunk_count = _int_field(value, "chunk_count")
        if payload_bytes < 0:
            raise MalformedEnvelopeError("envelope header field payload_bytes is negative")
        if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
            raise MalformedEnvelopeError(
                f"envelope header field chunk_size must be 1 to {MAX_CHUNK_SIZE}"
            )
        if chunk_count != chunk_count_for(payload_bytes, chunk_size):
            raise MalformedEnvelopeError(
                "envelope header field chunk_count does not fit payload_bytes and chunk_size"
            )
        if chunk_count > MAX_CHUNK_COUNT:
            raise MalformedEnvelopeError(f"envelope has more than {MAX_CHUNK_COUNT} chunks")
        return cls(
            version=version,
            case_id=_str_field(value, "case_id", _HEX64, "64 lowercase hex characters"),
            device_id=_str_field(value, "device_id", _DEVICE_ID, "dev- and 16 lowercase hex"),
            server_key_id=_str_field(value, "server_key_id", _KEY_ID, "16 lowercase hex"),
            envelope_id=_str_field(value, "envelope_id", _HEX32, "32 lowercase hex characters"),
            created_at=created_at,
            sealed_key=sealed_key,
            payload_sha256=_str_field(
                value, "payload_sha256", _HEX64, "64 lowercase hex characters"
            ),
            payload_bytes=payload_bytes,
            chunk_size=chunk_size,
            chunk_count=chunk_count,
        )

    def chunk_plaintext_bytes(self, index: int) -> int:
        """How many plaintext bytes chunk ``index`` (0-based) holds."""
        if index < self.chunk_count - 1:
            return self.chunk_size
        return self.payload_bytes - (self.chunk_count - 1) * self.chunk_size

    def body_bytes(self) -> int:
        """How many bytes of chunks (length prefixes included) follow the signature."""
        return self.chunk_count * (LENGTH_BYTES + TAG_BYTES) + self.payload_bytes


def chunk_count_for(payload_bytes: int, chunk_size: int) -> int:
    """Chunks for a plaintext: ceil(payload_bytes / chunk_size), and one empty chunk if empty."""
    return max(1, -(-payload_bytes // chunk_size))


def _int_field(value: dict[str, object], name: str) -> int:
    item = value[name]
    if type(item) is not int:  # bool is an int subclass and not a count
        raise MalformedEnvelopeError(f"envelope header field {name} must be an integer")
    return item


def _str_field(value: dict[str, object], name: str, pattern: re.Pattern[str], shape: str) -> str:
    item = value[name]
    if not isinstance(item, str) or not pattern.fullmatch(item):
        raise MalformedEnvelopeError(f"envelope header field {name} must be {shape}")
    return item


@dataclass(frozen=True, repr=False)
class OpenedEnvelope:
    """A checked, decrypted envelope: the header, its signed bytes and the payload's two parts.

    ``dicom`` is a read-only view into the decrypted plaintext, not a copy: the server writes a
    20 MB image from where it was decrypted. Use :meth:`Payload.from_bytes` for an own copy.
    """

    header: EnvelopeHeader
    signed_header: bytes  # magic, header and signature: the evidence of who sent the payload
    result_json: bytes
    dicom: memoryview

    def __repr__(self) -> str:
        # Sizes only, as for Payload: the content has no business in logs or tracebacks.
        return (
            f"OpenedEnvelope(case_id={self.header.case_id}, result_json=<{len(self.result_json)}"
            f" bytes>, dicom=<{len(self.dicom)} bytes>)"
        )


class _Prefix(NamedTuple):
    header: EnvelopeHeader
    signed: bytes  # magic || hlen || header
    signature: bytes
    body_offset: int


# --- Sealing ------------------------------------------------------------------------------------


def seal(
    payload: Payload,
    *,
    case_id: str,
    device: DeviceIdentity,
    server_key: ServerPublicKey,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    now: datetime | None = None,
) -> bytearray:
    """Seal ``payload`` for ``server_key``, signed by ``device``: the envelope bytes."""
    return seal_bytes(
        payload.to_bytes(),
        case_id=case_id,
        device=device,
        server_key=server_key,
        chunk_size=chunk_size,
        now=now,
    )


def seal_bytes(
    plaintext: BytesLike,
    *,
    case_id: str,
    device: DeviceIdentity,
    server_key: ServerPublicKey,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    now: datetime | None = None,
) -> bytearray:
    """Seal an already encoded payload (see :meth:`Payload.to_bytes`).

    The envelope is one buffer sized from the header, each chunk encrypted into its place: no
    list of chunks to join, and no copy into an immutable ``bytes``.
    """
    if not is_case_id(case_id):
        raise ValueError("case_id must be 64 lowercase hex characters")
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be 1 to {MAX_CHUNK_SIZE}")
    chunk_count = chunk_count_for(len(plaintext), chunk_size)
    if chunk_count > MAX_CHUNK_COUNT:
        raise ValueError("payload too large for the envelope format at this chunk size")
    created_at = datetime.now(UTC) if now is None else now
    data_key = AESGCM.generate_key(bit_length=8 * DATA_KEY_BYTES)
    sealed_key = _SUITE.encrypt(
        data_key,
        server_key.public_key,
        info=_hpke_info(case_id, device.device_id, server_key.key_id),
    )
    header = EnvelopeHeader(
        version=FORMAT_VERSION,
        case_id=case_id,
        device_id=device.device_id,
        server_key_id=server_key.key_id,
        envelope_id=secrets.token_hex(16),
        created_at=parse_timestamp(format_timestamp(created_at)),
        sealed_key=sealed_key,
        payload_sha256=hashlib.sha256(plaintext).hexdigest(),
        payload_bytes=len(plaintext),
        chunk_size=chunk_size,
        chunk_count=chunk_count,
    )
    header_bytes = header.to_bytes()
    signed = MAGIC + len(header_bytes).to_bytes(LENGTH_BYTES, "big") + header_bytes
    body_offset = len(signed) + SIGNATURE_BYTES
    envelope = bytearray(body_offset + header.body_bytes())
    target = memoryview(envelope)
    target[: len(signed)] = signed
    target[len(signed) : body_offset] = device.signing_key.sign(signed)
    aad = hashlib.sha256(signed).digest()
    aead = AESGCM(data_key)
    source = memoryview(plaintext)
    offset = body_offset
    for index in range(chunk_count):
        chunk = source[index * chunk_size : (index + 1) * chunk_size]
        sealed_len = len(chunk) + TAG_BYTES
        target[offset : offset + LENGTH_BYTES] = sealed_len.to_bytes(LENGTH_BYTES, "big")
        offset += LENGTH_BYTES
        aead.encrypt_into(
            _nonce(index, last=index == chunk_count - 1),
            chunk,
            aad,
            target[offset : offset + sealed_len],
        )
        offset += sealed_len
    return envelope


# --- Reading and opening ------------------------------------------------------------------------


def read_header(data: BytesLike) -> EnvelopeHeader:
    """Parse and validate the header WITHOUT checking the signature.

    For the server to learn which device's key to verify with; trust nothing in it until
    :func:`verify_header` or :func:`open_envelope` has run. Raises ``MalformedEnvelopeError`` or
    ``EnvelopeTruncatedError`` (the data ends before the signature does).
    """
    return _read_prefix(data).header


def verify_header(data: BytesLike, device_public_key: Ed25519PublicKey) -> EnvelopeHeader:
    """Parse the header and check the device signature over it (chunks are not checked)."""
    prefix = _read_prefix(data)
    _verify_signature(prefix, device_public_key)
    return prefix.header


def open_envelope(
    data: BytesLike,
    *,
    device_public_key: Ed25519PublicKey,
    server_keys: Mapping[str, X25519PrivateKey],
) -> OpenedEnvelope:
    """Check and decrypt an envelope; the checks and their errors follow the protocol's order.

    Raises ``MalformedEnvelopeError``, ``EnvelopeSignatureError``, ``UnknownServerKeyError``,
    ``EnvelopeTamperedError`` or ``EnvelopeTruncatedError``, and nothing else for any ``data``.
    """
    opener = EnvelopeOpener(data, device_public_key=device_public_key, server_keys=server_keys)
    opener.open_chunks()
    return opener.opened()


def open_bytes(
    data: BytesLike,
    *,
    device_public_key: Ed25519PublicKey,
    server_keys: Mapping[str, X25519PrivateKey],
) -> tuple[EnvelopeHeader, bytearray]:
    """As :func:`open_envelope`, but return the plaintext without splitting it into a payload."""
    opener = EnvelopeOpener(data, device_public_key=device_public_key, server_keys=server_keys)
    opener.open_chunks()
    return opener.header, opener.plaintext()


class EnvelopeOpener:
    """Opens an envelope in steps, so that the server can write the payload to disk while its
    hash is being checked (the hash of 20 MB takes about as long as its fsync).

    The constructor runs the checks before the chunks, :meth:`open_chunks` authenticates and
    decrypts every chunk into one buffer while a helper thread hashes the decrypted ones
    (:class:`BackgroundSha256`), :meth:`opened` waits for the hash and checks it. Until then the
    payload is only chunk-authenticated: :meth:`unchecked_payload` is for writing it to
    temporary files, nothing else. The checks, their order and errors are the protocol's.
    """

    def __init__(
        self,
        data: BytesLike,
        *,
        device_public_key: Ed25519PublicKey,
        server_keys: Mapping[str, X25519PrivateKey],
    ) -> None:
        """Check the header, signature, server key, data key and length of ``data``."""
        self._data = memoryview(data)
        prefix = _read_prefix(self._data)
        _verify_signature(prefix, device_public_key)
        header = prefix.header
        data_key = _data_key(header, server_keys)
        expected_end = prefix.body_offset + header.body_bytes()
        if len(self._data) > expected_end:
            raise EnvelopeTamperedError(
                f"envelope has {len(self._data) - expected_end} bytes after its last chunk"
            )
        self.header = header
        self.signed_header = prefix.signed + prefix.signature
        self._aead = AESGCM(data_key)
        self._aad = hashlib.sha256(prefix.signed).digest()
        self._body_offset = prefix.body_offset
        # Allocated only when the data is as long as the header says: a header claiming an
        # absurd size over a short body fails on its chunks without allocating for it.
        self._complete = len(self._data) == expected_end
        self._plaintext = bytearray(header.payload_bytes if self._complete else 0)
        self._hasher: BackgroundSha256 | None = None

    def open_chunks(self) -> None:
        """Authenticate and decrypt every chunk, in order, each then hashed by the helper."""
        header = self.header
        count = header.chunk_count
        target = memoryview(self._plaintext)
        self._hasher = hasher = BackgroundSha256(
            threaded=header.payload_bytes >= THREAD_WORTH_BYTES
        )
        try:
            for index, sealed in _chunks(self._data, header, self._body_offset):
                nonce = _nonce(index, last=index == count - 1)
                start = index * header.chunk_size
                piece = target[start : start + len(sealed) - TAG_BYTES]
                try:
                    if self._complete:
                        self._aead.decrypt_into(nonce, sealed, self._aad, piece)
                    else:  # a short envelope: it fails on a later chunk, nothing to keep
                        self._aead.decrypt(nonce, sealed, self._aad)
                except InvalidTag:
                    raise EnvelopeTamperedError(
                        f"envelope chunk {index + 1} of {count} fails authentication"
                    ) from None
                hasher.submit(piece)
        finally:
            hasher.close()

    def unchecked_payload(self) -> tuple[bytes, memoryview] | None:
        """The decrypted result JSON and image while the payload hash is still being checked,
        for temporary files only; None if the payload's structure is impossible (:meth:`opened`
        says so, after the hash, as the protocol orders the checks)."""
        try:
            return _split_payload(memoryview(self._plaintext).toreadonly())
        except MalformedEnvelopeError:
            return None

    def plaintext(self) -> bytearray:
        """The plaintext, once :meth:`open_chunks` has run and its hash is checked."""
        if self._hasher is None:
            raise RuntimeError("open_chunks() has not run")
        digest = self._hasher.hexdigest()
        # A short envelope has failed on its chunks; this guards the buffer all the same.
        if len(self._plaintext) != self.header.payload_bytes:
            raise EnvelopeTamperedError("envelope payload length does not match its header")
        if digest != self.header.payload_sha256:
            raise EnvelopeTamperedError("envelope payload hash does not match its header")
        return self._plaintext

    def opened(self) -> OpenedEnvelope:
        """The checked payload, split (see :meth:`plaintext`)."""
        result_json, dicom = _split_payload(memoryview(self.plaintext()).toreadonly())
        return OpenedEnvelope(
            header=self.header,
            signed_header=self.signed_header,
            result_json=result_json,
            dicom=dicom,
        )


def _data_key(header: EnvelopeHeader, server_keys: Mapping[str, X25519PrivateKey]) -> bytes:
    """The data key, opened with the server key the header names (protocol order: the key is
    held, then the sealed key opens)."""
    private_key = server_keys.get(header.server_key_id)
    if private_key is None:
        raise UnknownServerKeyError(
            f"envelope is sealed to server key {header.server_key_id}, which is not held here"
        )
    try:
        data_key = _SUITE.decrypt(
            header.sealed_key,
            private_key,
            info=_hpke_info(header.case_id, header.device_id, header.server_key_id),
        )
    except InvalidTag:
        raise EnvelopeTamperedError(
            "envelope data key does not open (sealed key altered)"
        ) from None
    if len(data_key) != DATA_KEY_BYTES:
        raise EnvelopeTamperedError("envelope data key has the wrong length")
    return data_key


def check_sealed(data: BytesLike, device_public_key: Ed25519PublicKey) -> EnvelopeHeader:
    """What the sender can check of an envelope it sealed without the data key or hashing it:
    the header and the device's signature over it, and that the chunks' length fields account
    for exactly the bytes there are. The ciphertext itself only the server can check (AES-GCM,
    each chunk bound to the signed header). Raises the protocol's error classes.
    """
    view = memoryview(data)
    prefix = _read_prefix(view)
    _verify_signature(prefix, device_public_key)
    header = prefix.header
    expected_end = prefix.body_offset + header.body_bytes()
    if len(view) > expected_end:
        raise EnvelopeTamperedError(
            f"envelope has {len(view) - expected_end} bytes after its last chunk"
        )
    for _ in _chunks(view, header, prefix.body_offset):
        pass
    return header


# --- Opening as the bytes arrive ----------------------------------------------------------------


class EnvelopeStream:
    """Opens an envelope as its bytes arrive (the server's POST body), in the protocol's order.

    :meth:`feed_header` buffers bytes until the magic, header and signature are in and returns
    the (not yet trusted) header, refusing a bad magic or header as soon as its bytes show it;
    the caller then runs :meth:`verify` (signature) and its own checks, and :meth:`unseal` (server
    key, data key) before accepting more than the header. :meth:`feed` authenticates and decrypts
    each chunk once its bytes are in, hashes it, and hands its plaintext to a sink; :meth:`finish`
    at the end of the body checks that no chunk is missing and the payload hash. Until then a
    plaintext piece is only chunk-authenticated: for temporary files, nothing else. The errors
    are those of :func:`open_envelope` for the same bytes, with the same messages.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._prefix: _Prefix | None = None
        self._aead: AESGCM | None = None
        self._aad = b""
        self._index = 0  # the next chunk
        self._chunk_len = 0  # its sealed length once its length field is in, else 0
        self._plain = bytearray()
        self._hash = hashlib.sha256()
        self._received = 0  # plaintext bytes so far

    @property
    def header(self) -> EnvelopeHeader:
        return self._checked_prefix().header

    @property
    def signed_header(self) -> bytes:
        """Magic, header and signature: the evidence of who sent the payload."""
        prefix = self._checked_prefix()
        return prefix.signed + prefix.signature

    def feed_header(self, data: BytesLike) -> EnvelopeHeader | None:
        """Buffer ``data``; the header once the signature's bytes are in, else None. Bytes after
        the signature are kept for :meth:`feed`."""
        if self._prefix is not None:
            raise RuntimeError("the header is read already")
        self._buf += data
        try:
            self._prefix = _read_prefix(self._buf)
        except EnvelopeTruncatedError:
            return None  # more to come, or end_of_header() says where it ended
        del self._buf[: self._prefix.body_offset]
        return self._prefix.header

    def end_of_header(self) -> EnvelopeHeader:
        """The body ended: the header if it is complete, else the error for where it ended."""
        if self._prefix is not None:
            return self._prefix.header
        _read_prefix(self._buf)
        raise AssertionError("unreachable: _read_prefix accepted what it refused before")

    def verify(self, device_public_key: Ed25519PublicKey) -> None:
        """Check the device's signature over the header (``EnvelopeSignatureError``)."""
        _verify_signature(self._checked_prefix(), device_public_key)

    def unseal(self, server_keys: Mapping[str, X25519PrivateKey]) -> None:
        """Open the data key with the server key the header names, as :class:`EnvelopeOpener`."""
        prefix = self._checked_prefix()
        header = prefix.header
        self._aead = AESGCM(_data_key(header, server_keys))
        self._aad = hashlib.sha256(prefix.signed).digest()
        self._plain = bytearray(min(header.chunk_size, header.payload_bytes))

    def feed(self, data: BytesLike, sink: Callable[[memoryview], object]) -> None:
        """Take the next bytes of the body: every chunk now complete is authenticated, decrypted,
        hashed and passed to ``sink`` in order (the view is valid during the call only)."""
        if self._aead is None:
            raise RuntimeError("unseal() has not run")
        self._buf += data
        header = self._checked_prefix().header
        count = header.chunk_count
        offset = 0
        with memoryview(self._buf) as buf:
            while self._index < count:
                if not self._chunk_len:
                    if len(buf) - offset < LENGTH_BYTES:
                        break
                    sealed_len = int.from_bytes(buf[offset : offset + LENGTH_BYTES], "big")
                    expected_len = header.chunk_plaintext_bytes(self._index) + TAG_BYTES
                    if sealed_len != expected_len:
                        raise EnvelopeTamperedError(
                            f"envelope chunk {self._index + 1} of {count} has length "
                            f"{sealed_len}, the header implies {expected_len}"
                        )
                    offset += LENGTH_BYTES
                    self._chunk_len = sealed_len
                if len(buf) - offset < self._chunk_len:
                    break
                piece = memoryview(self._plain)[: self._chunk_len - TAG_BYTES]
                nonce = _nonce(self._index, last=self._index == count - 1)
                with buf[offset : offset + self._chunk_len] as sealed:
                    try:
                        self._aead.decrypt_into(nonce, sealed, self._aad, piece)
                    except InvalidTag:
                        raise EnvelopeTamperedError(
                            f"envelope chunk {self._index + 1} of {count} fails authentication"
                        ) from None
                offset += self._chunk_len
                self._chunk_len = 0
                self._index += 1
                self._received += len(piece)
                self._hash.update(piece)
                sink(piece.toreadonly())
        del self._buf[:offset]
        self._check_trailing()

    def finish(self) -> None:
        """The body ended: ``EnvelopeTruncatedError`` if a chunk is missing, then the payload
        length and hash against the header (``EnvelopeTamperedError``)."""
        header = self._checked_prefix().header
        if self._index < header.chunk_count:
            where = "inside" if self._chunk_len else "before"
            raise EnvelopeTruncatedError(
                f"envelope ends {where} chunk {self._index + 1} of {header.chunk_count}"
            )
        if self._received != header.payload_bytes:
            raise EnvelopeTamperedError("envelope payload length does not match its header")
        if self._hash.hexdigest() != header.payload_sha256:
            raise EnvelopeTamperedError("envelope payload hash does not match its header")

    def _check_trailing(self) -> None:
        header = self._checked_prefix().header
        if self._index == header.chunk_count and self._buf:
            raise EnvelopeTamperedError(f"envelope has {len(self._buf)} bytes after its last chunk")

    def _checked_prefix(self) -> _Prefix:
        if self._prefix is None:
            raise RuntimeError("the header is not read yet")
        return self._prefix


class PayloadSplitter:
    """Splits a payload arriving in pieces (:meth:`EnvelopeStream.feed`'s sink): the length
    field and result JSON are kept (small), the image bytes go to ``image_sink`` as they come.

    If the length field is impossible for ``payload_bytes``, nothing goes to the sink and
    :meth:`result_json` raises ``MalformedEnvelopeError``, as :func:`open_envelope` does after
    the payload hash (call it only after :meth:`EnvelopeStream.finish`).
    """

    def __init__(self, payload_bytes: int, image_sink: Callable[[memoryview], object]) -> None:
        self._payload_bytes = payload_bytes
        self._image_sink = image_sink
        self._head = bytearray()  # length field and result JSON
        self._head_bytes: int | None = None  # their length, once the length field is in
        self._impossible = False

    def __call__(self, piece: memoryview) -> None:
        if self._impossible:
            return
        if self._head_bytes is None or len(self._head) < self._head_bytes:
            want = LENGTH_BYTES if self._head_bytes is None else self._head_bytes
            take = min(len(piece), want - len(self._head))
            self._head += piece[:take]
            piece = piece[take:]
            if self._head_bytes is None and len(self._head) == LENGTH_BYTES:
                json_len = int.from_bytes(self._head, "big")
                if json_len > self._payload_bytes - LENGTH_BYTES:
                    self._impossible = True
                    return
                self._head_bytes = LENGTH_BYTES + json_len
                self(piece)
                return
        if piece:
            self._image_sink(piece)

    def result_json(self) -> bytes:
        """The result JSON, checked as :meth:`Payload.from_bytes` checks it."""
        if self._impossible or self._head_bytes is None or len(self._head) < self._head_bytes:
            # Only the structure can be wrong here: the length matched the header (finish()).
            _split_payload(memoryview(bytes(self._head)))
            raise MalformedEnvelopeError("payload result JSON length exceeds the payload")
        result_json, _ = _split_payload(memoryview(self._head))
        return result_json


def _chunks(
    data: memoryview, header: EnvelopeHeader, offset: int
) -> Iterator[tuple[int, memoryview]]:
    """Each chunk's index and sealed bytes, in order, once its length field is checked against
    the header: ``EnvelopeTamperedError`` if it differs, ``EnvelopeTruncatedError`` where the
    data ends early."""
    count = header.chunk_count
    for index in range(count):
        if len(data) - offset < LENGTH_BYTES:
            raise EnvelopeTruncatedError(f"envelope ends before chunk {index + 1} of {count}")
        sealed_len = int.from_bytes(data[offset : offset + LENGTH_BYTES], "big")
        expected_len = header.chunk_plaintext_bytes(index) + TAG_BYTES
        if sealed_len != expected_len:
            raise EnvelopeTamperedError(
                f"envelope chunk {index + 1} of {count} has length {sealed_len}, "
                f"the header implies {expected_len}"
            )
        offset += LENGTH_BYTES
        if len(data) - offset < sealed_len:
            raise EnvelopeTruncatedError(f"envelope ends inside chunk {index + 1} of {count}")
        yield index, data[offset : offset + sealed_len]
        offset += sealed_len


def signed_prefix_bytes(first: BytesLike) -> int | None:
    """How many bytes the magic, header and signature take, judged from an envelope's first
    bytes; None while fewer than the magic and the header length are in.

    For a receiver that waits for the whole signed header before committing resources to a
    body. Bytes that cannot start an envelope give the length read so far, so that the opener
    refuses them at once with its own error.
    """
    if len(first) < PREFIX_BYTES:
        return None if MAGIC.startswith(bytes(first)) else len(first)
    header_len = int.from_bytes(first[len(MAGIC) : PREFIX_BYTES], "big")
    if bytes(first[: len(MAGIC)]) != MAGIC or not 0 < header_len <= MAX_HEADER_BYTES:
        return PREFIX_BYTES
    return PREFIX_BYTES + header_len + SIGNATURE_BYTES


def _read_prefix(data: BytesLike) -> _Prefix:
    size = len(data)
    if size < len(MAGIC):
        if MAGIC.startswith(bytes(data)):
            raise EnvelopeTruncatedError("envelope ends inside its magic number")
        raise MalformedEnvelopeError("not a triage envelope (bad magic number)")
    magic = bytes(data[: len(MAGIC)])
    if magic != MAGIC:
        if magic.startswith(_MAGIC_FAMILY):
            raise MalformedEnvelopeError("unsupported envelope format version")
        raise MalformedEnvelopeError("not a triage envelope (bad magic number)")
    if size < PREFIX_BYTES:
        raise EnvelopeTruncatedError("envelope ends inside its header length")
    header_len = int.from_bytes(data[len(MAGIC) : PREFIX_BYTES], "big")
    if not 0 < header_len <= MAX_HEADER_BYTES:
        raise MalformedEnvelopeError(
            f"envelope header length {header_len} is outside 1 to {MAX_HEADER_BYTES}"
        )
    header_end = PREFIX_BYTES + header_len
    if size < header_end:
        raise EnvelopeTruncatedError("envelope ends inside its header")
    header_bytes = bytes(data[PREFIX_BYTES:header_end])
    header = _parse_header(header_bytes)
    signature_end = header_end + SIGNATURE_BYTES
    if size < signature_end:
        raise EnvelopeTruncatedError("envelope ends inside its signature")
    return _Prefix(
        header=header,
        signed=bytes(data[:header_end]),
        signature=bytes(data[header_end:signature_end]),
        body_offset=signature_end,
    )


def _parse_header(raw: bytes) -> EnvelopeHeader:
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MalformedEnvelopeError("envelope header is not UTF-8 JSON") from None
    header = EnvelopeHeader.from_dict(value)
    if header.to_bytes() != raw:
        raise MalformedEnvelopeError(
            "envelope header is not canonical JSON (sorted keys, no spaces)"
        )
    return header


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _verify_signature(prefix: _Prefix, device_public_key: Ed25519PublicKey) -> None:
    if prefix.header.device_id != device_id_for(device_public_key):
        raise EnvelopeSignatureError(
            f"envelope names device {prefix.header.device_id}, not the device whose key was given"
        )
    try:
        device_public_key.verify(prefix.signature, prefix.signed)
    except InvalidSignature:
        raise EnvelopeSignatureError(
            f"envelope signature does not verify for device {prefix.header.device_id}"
        ) from None


def _hpke_info(case_id: str, device_id: str, server_key_id: str) -> bytes:
    return (
        HPKE_INFO_LABEL
        + case_id.encode("ascii")
        + b"\x00"
        + device_id.encode("ascii")
        + b"\x00"
        + server_key_id.encode("ascii")
    )


def _nonce(index: int, *, last: bool) -> bytes:
    """7 zero bytes || 4-byte big-endian chunk counter || last-chunk flag."""
    return bytes(7) + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")
