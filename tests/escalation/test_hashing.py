"""BackgroundSha256: the digest of the pieces, failures, ending the thread."""

from __future__ import annotations

import hashlib
import threading

import pytest

from triage_app.escalation.hashing import BackgroundSha256


@pytest.mark.parametrize("threaded", [True, False])
def test_the_digest_is_the_sha256_of_the_pieces_in_order(threaded: bool) -> None:
    pieces = [bytes([n]) * (n * 1000 + 1) for n in range(40)]
    with BackgroundSha256(threaded=threaded) as digest:
        for piece in pieces:
            digest.submit(piece)
        assert digest.hexdigest() == hashlib.sha256(b"".join(pieces)).hexdigest()


def test_a_failure_in_the_helper_is_raised_in_the_caller() -> None:
    digest = BackgroundSha256()
    digest.submit(b"fine")
    digest.submit("text is not bytes")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="helper thread failed") as raised:
        digest.hexdigest()
    assert isinstance(raised.value.__cause__, TypeError)


def test_close_ends_the_thread() -> None:
    digest = BackgroundSha256()
    digest.submit(b"x" * 4096)
    digest.close()
    digest.close()
    assert not [t for t in threading.enumerate() if t.name == "sha256-helper"]
