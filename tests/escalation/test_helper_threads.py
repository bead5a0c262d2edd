"""PieceThread and BackgroundSha256: order, reuse of buffers, failures, ending the thread."""

from __future__ import annotations

import hashlib
import threading

import pytest

from triage_app.escalation.helper_threads import BackgroundSha256, PieceThread


@pytest.mark.parametrize("threaded", [True, False])
def test_pieces_are_consumed_in_order(threaded: bool) -> None:
    seen: list[int] = []
    with PieceThread(seen.append, threaded=threaded) as worker:
        for number in range(200):
            worker.submit(number)
        worker.join()
    assert seen == list(range(200))


@pytest.mark.parametrize("threaded", [True, False])
def test_sha256_of_pieces_is_the_sha256_of_their_concatenation(threaded: bool) -> None:
    pieces = [bytes([n]) * (n * 1000 + 1) for n in range(40)]
    with BackgroundSha256(threaded=threaded) as digest:
        for piece in pieces:
            digest.submit(piece)
        assert digest.hexdigest() == hashlib.sha256(b"".join(pieces)).hexdigest()


def test_a_reused_buffer_is_free_once_wait_done_returns() -> None:
    # One buffer refilled for every piece, as EnvelopeStream reuses its plaintext buffers: the
    # hash is right only if every refill waits for the piece before it to be hashed.
    buffer = bytearray(1 << 20)
    expected = hashlib.sha256()
    with BackgroundSha256() as digest:
        for number in range(12):
            digest.wait_done(number)
            buffer[:] = bytes([number]) * len(buffer)
            expected.update(buffer)
            digest.submit(memoryview(buffer))
        assert digest.hexdigest() == expected.hexdigest()


def test_a_failure_in_the_helper_is_raised_in_the_caller() -> None:
    def consume(item: int) -> None:
        if item == 3:
            raise OSError(28, "No space left on device")

    worker = PieceThread(consume)
    for number in range(6):
        worker.submit(number)
    with pytest.raises(OSError, match="No space left"):
        worker.wait_done(6)
    with pytest.raises(OSError, match="No space left"):
        worker.join()


def test_close_ends_the_thread_without_raising() -> None:
    started = threading.Event()
    release = threading.Event()

    def consume(item: int) -> None:
        started.set()
        release.wait(10)
        raise ValueError("consumer gave up")

    worker = PieceThread(consume, name="test-helper")
    worker.submit(1)
    assert started.wait(10)
    release.set()
    worker.close()  # the caller is unwinding already: nothing more to raise here
    worker.close()
    assert not [t for t in threading.enumerate() if t.name == "test-helper"]
