"""Receiving a case as its body arrives: refusals early, nothing left behind on a failure."""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tests.central.conftest import (
    Central,
    StartCentral,
    TestCase,
    make_case,
    new_device,
    seal_case,
)
from tests.central.test_api import assert_refused
from triage_app.central.app import CaseReceiver
from triage_app.errors import (
    EnvelopeSignatureError,
    EnvelopeTamperedError,
    EnvelopeTruncatedError,
    StoreError,
)
from triage_app.escalation.envelope import (
    PREFIX_BYTES,
    SIGNATURE_BYTES,
    Payload,
    read_header,
    seal,
)
from triage_app.escalation.keys import DeviceIdentity, ServerPublicKey

PIECE = 4096


class Pieces:
    """A body handed out in pieces, counting how many the receiver asked for."""

    def __init__(self, body: bytes, *, fail_after: int | None = None) -> None:
        self.pieces = [body[i : i + PIECE] for i in range(0, len(body), PIECE)]
        self.taken = 0
        self.fail_after = fail_after

    def __call__(self) -> bytes | None:
        if self.fail_after is not None and self.taken == self.fail_after:
            raise ConnectionError("the link dropped")
        if self.taken == len(self.pieces):
            return None
        self.taken += 1
        return self.pieces[self.taken - 1]


def receiver_of(central: Central) -> CaseReceiver:
    return CaseReceiver(central.thread.config, central.key_ring, central.store)


def leftovers(central: Central) -> list[Path]:
    return sorted(p for p in central.store.cases_dir.rglob("*") if p.is_file())


def test_a_bad_signature_is_refused_before_the_chunks_are_asked_for(central: Central) -> None:
    device = central.register(new_device())
    case = make_case(21)
    body = bytearray(central.seal(case, device))
    header_end = PREFIX_BYTES + len(read_header(body).to_bytes())
    body[header_end + SIGNATURE_BYTES // 2] ^= 0x01
    pieces = Pieces(bytes(body))
    assert len(pieces.pieces) > 4
    with pytest.raises(EnvelopeSignatureError):
        receiver_of(central).receive_stream(case.case_id, pieces)
    assert pieces.taken == -(-(header_end + SIGNATURE_BYTES) // PIECE)
    assert leftovers(central) == []


def test_an_unknown_device_is_refused_after_the_header(central: Central) -> None:
    stranger = new_device()  # not registered
    case = make_case(22)
    pieces = Pieces(central.seal(case, stranger))
    with pytest.raises(Exception, match="not registered"):
        receiver_of(central).receive_stream(case.case_id, pieces)
    assert pieces.taken < len(pieces.pieces)


@pytest.mark.parametrize("cut", [1, 17, PIECE + 3])
def test_a_truncated_stream_leaves_no_files(central: Central, cut: int) -> None:
    device = central.register(new_device())
    case = make_case(23)
    body = central.seal(case, device)
    with pytest.raises(EnvelopeTruncatedError):
        receiver_of(central).receive_stream(case.case_id, Pieces(body[:-cut]))
    assert leftovers(central) == []
    assert central.store.count() == 0


def test_a_stream_cut_off_midway_leaves_no_files(central: Central) -> None:
    device = central.register(new_device())
    case = make_case(24)
    pieces = Pieces(central.seal(case, device), fail_after=5)
    with pytest.raises(ConnectionError):
        receiver_of(central).receive_stream(case.case_id, pieces)
    assert leftovers(central) == []
    assert central.store.count() == 0


def test_a_tampered_last_chunk_leaves_no_files(central: Central) -> None:
    device = central.register(new_device())
    case = make_case(25)
    body = bytearray(central.seal(case, device))
    body[-1] ^= 0x01
    with pytest.raises(EnvelopeTamperedError):
        receiver_of(central).receive_stream(case.case_id, Pieces(bytes(body)))
    assert leftovers(central) == []


def test_bytes_after_the_last_chunk_leave_no_files(central: Central) -> None:
    device = central.register(new_device())
    case = make_case(26)
    body = central.seal(case, device) + b"\x00"
    with pytest.raises(EnvelopeTamperedError, match="after its last chunk"):
        receiver_of(central).receive_stream(case.case_id, Pieces(body))
    assert leftovers(central) == []


def test_pieces_of_any_size_store_the_same_case(central: Central) -> None:
    device = central.register(new_device())
    case = make_case(27)
    body = central.seal(case, device)
    sizes = iter([1, 2, 3, 5, 7, 11, 13, 1000, 70_000] * 1000)
    offsets = [0]
    while offsets[-1] < len(body):
        offsets.append(min(len(body), offsets[-1] + next(sizes)))
    parts: Iterator[bytes | None] = iter(
        [body[a:b] for a, b in itertools.pairwise(offsets)] + [None]
    )
    receipt, first = receiver_of(central).receive_stream(case.case_id, lambda: next(parts))
    assert first
    assert receipt["receipt"]["case_id"] == case.case_id
    stored = central.store.case_dir(case.case_id)
    assert (stored / "image.dcm").read_bytes() == case.payload.dicom
    assert (stored / "result.json").read_bytes() == case.payload.result_json


def test_a_streamed_envelope_over_the_limit_is_refused_while_it_arrives(
    start_central: StartCentral,
) -> None:
    device = new_device()
    case = make_case(28)
    # The envelope's length does not depend on the server key: learn it with a throwaway one.
    throwaway = ServerPublicKey.from_public_key(X25519PrivateKey.generate().public_key())
    size = len(seal_case(case, device, throwaway))
    small = start_central(max_body_bytes=size - 1)
    small.register(device)
    body = small.seal(case, device)
    assert len(body) == size

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 1024):
            yield body[start : start + 1024]

    response = small.post(case.case_id, chunks())  # chunked: no Content-Length
    assert_refused(response, 413, "too_large")
    assert small.store.count() == 0
    assert leftovers(small) == []


def test_a_refused_signature_over_http_still_answers_401(central: Central) -> None:
    device = central.register(new_device())
    impostor = central.register(new_device())
    case = make_case(29)
    body = central.seal(case, device)
    # Same device id in the header, but the signature from another key: refused at the header.
    forged = bytearray(body)
    header_end = PREFIX_BYTES + len(read_header(body).to_bytes())
    forged[header_end : header_end + SIGNATURE_BYTES] = impostor.signing_key.sign(
        bytes(body[:header_end])
    )
    assert_refused(central.post(case.case_id, bytes(forged)), 401, "bad_signature")
    # The connection stays usable: the rest of the body was read and dropped.
    assert central.post(case.case_id, body).status_code == 201


def large_case(index: int, image_bytes: int) -> TestCase:
    """A phantom's case with random bytes appended to its image up to ``image_bytes`` (the
    receiver stores the image, it does not parse it): several MB in many chunks, as scanners
    send them."""
    case = make_case(index)
    padding = image_bytes - len(case.payload.dicom)
    dicom = case.payload.dicom + bytes(random.Random(index).randbytes(padding))
    return TestCase(case.case_id, Payload(case.payload.result_json, dicom))


def seal_large(central: Central, case: TestCase, device: DeviceIdentity) -> bytes:
    return bytes(
        seal(
            case.payload,
            case_id=case.case_id,
            device=device,
            server_key=central.key_ring.active,
            chunk_size=256 * 1024,
        )
    )


def test_a_large_case_in_many_chunks_and_pieces_is_stored_whole(
    central: Central,
) -> None:
    device = central.register(new_device())
    case = large_case(28, 6 * 1024 * 1024)
    body = seal_large(central, case, device)
    parts: Iterator[bytes | None] = iter(
        [body[i : i + 64 * 1024] for i in range(0, len(body), 64 * 1024)] + [None]
    )
    receipt, first = receiver_of(central).receive_stream(case.case_id, lambda: next(parts))

    assert first
    stored = central.store.case_dir(case.case_id)
    assert (stored / "image.dcm").read_bytes() == case.payload.dicom
    assert (
        receipt["receipt"]["payload_sha256"] == hashlib.sha256(case.payload.to_bytes()).hexdigest()
    )


@pytest.mark.expect_log_warnings
def test_a_write_failure_midway_is_a_store_error_and_leaves_no_files(
    central: Central, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = central.register(new_device())
    case = large_case(29, 6 * 1024 * 1024)
    body = seal_large(central, case, device)
    real_write = os.write
    writes = itertools.count()

    def failing_write(fd: int, data: bytes | memoryview) -> int:
        if next(writes) == 5:  # mid-image
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(StoreError, match="could not write the files"):
        receiver_of(central).receive_stream(case.case_id, Pieces(body))
    monkeypatch.undo()
    assert leftovers(central) == []
    assert central.store.count() == 0
    receipt, first = receiver_of(central).receive_stream(case.case_id, Pieces(body))
    assert first and receipt["receipt"]["deliveries"] == 1
