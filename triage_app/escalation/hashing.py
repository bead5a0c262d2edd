"""SHA-256 on a helper thread, so that hashing a case overlaps the caller's next step.

Envelopes carry whole images (tens of MB): hashing 20 MB takes about 11 ms, as long as writing
and fsyncing it, or decrypting it. hashlib releases the GIL while it hashes a large buffer, so
a helper thread hashes on the other core while the caller writes and fsyncs (the outbox) or
decrypts (``EnvelopeOpener``). Small inputs are hashed at once (``threaded=False``): a thread
costs more than it saves.

Not where the CPU is the limit: the central server hashing a streamed upload on a helper
thread, next to its event loop and the decryption, was measured 5% slower than hashing inline
(2 cores), so ``EnvelopeStream`` hashes inline.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from types import TracebackType
from typing import Self

#: Below this many bytes a helper thread costs more than it saves.
THREAD_WORTH_BYTES = 1 << 20

_Piece = bytes | bytearray | memoryview


class BackgroundSha256:
    """The SHA-256 of the pieces given to :meth:`submit`, in order.

    A piece is read by the helper thread after ``submit`` returns, so it must not change until
    :meth:`hexdigest` returns. Use it as a context manager, or call :meth:`close`, so that the
    thread ends also when the caller gives up half-way.
    """

    def __init__(self, *, threaded: bool = True) -> None:
        self._hash = hashlib.sha256()
        self._pieces: queue.SimpleQueue[_Piece | None] = queue.SimpleQueue()
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="sha256-helper", daemon=True)
            self._thread.start()

    def submit(self, piece: _Piece) -> None:
        """Hash ``piece`` after the ones before it (at once when not threaded)."""
        if self._thread is None:
            self._hash.update(piece)
        else:
            self._pieces.put(piece)

    def hexdigest(self) -> str:
        """The digest of every piece given; ends the helper thread."""
        self.close()
        if self._failure is not None:
            raise RuntimeError("the SHA-256 helper thread failed") from self._failure
        return self._hash.hexdigest()

    def close(self) -> None:
        """End the helper thread once it has hashed what it was given (idempotent)."""
        if self._thread is not None:
            self._pieces.put(None)
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _run(self) -> None:
        try:
            while (piece := self._pieces.get()) is not None:
                self._hash.update(piece)
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            self._failure = exc
