"""Helper threads that hash or write a case's bytes while the caller does the next step.

Envelopes carry whole images (tens of MB): hashing 20 MB takes about 11 ms, as long as writing
and fsyncing it, or decrypting it and storing it as it arrives. hashlib, file writes and fsyncs
release the GIL, so a helper thread does one of them on the other core while the caller
decrypts, writes or waits for the network. Small inputs are handled at once (``threaded=False``):
a thread costs more than it saves.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Generic, Self, TypeVar

#: Below this many bytes a helper thread costs more than it saves.
THREAD_WORTH_BYTES = 1 << 20

_Item = TypeVar("_Item")


class _Stop:
    """What ends a helper thread's queue."""


_STOP = _Stop()


class PieceThread(Generic[_Item]):
    """Runs ``consume`` on each item given to :meth:`submit`, in order, on a helper thread.

    An item (a view of a buffer, say) is used after ``submit`` returns, so it must not change
    until :meth:`wait_done` says it is done. The first exception ``consume`` raises stops the
    thread and is raised again by the next :meth:`wait_done` or :meth:`join`. Use it as a context
    manager, or call :meth:`close`, so that the thread ends also when the caller gives up
    half-way.
    """

    def __init__(
        self, consume: Callable[[_Item], object], *, threaded: bool = True, name: str = "helper"
    ) -> None:
        self._consume = consume
        self._done = 0
        self._progress = threading.Condition()
        self._items: queue.SimpleQueue[_Item | _Stop] = queue.SimpleQueue()
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    def submit(self, item: _Item) -> None:
        """Consume ``item`` after the ones before it (at once when not threaded)."""
        if self._thread is None:
            self._consume(item)
            self._done += 1
        else:
            self._items.put(item)

    def wait_done(self, count: int) -> None:
        """Return once the first ``count`` items are consumed; raise what ``consume`` raised."""
        with self._progress:
            self._progress.wait_for(lambda: self._done >= count or self._failure is not None)
        self._raise_failure()

    def join(self) -> None:
        """Wait for every item, end the thread, and raise what ``consume`` raised."""
        self.close()
        self._raise_failure()

    def close(self) -> None:
        """End the thread once it has consumed what it was given (idempotent; raises nothing)."""
        if self._thread is not None:
            self._items.put(_STOP)
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
            while not isinstance(item := self._items.get(), _Stop):
                self._consume(item)
                with self._progress:
                    self._done += 1
                    self._progress.notify_all()
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            with self._progress:
                self._failure = exc
                self._progress.notify_all()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure


class BackgroundSha256(PieceThread[bytes | bytearray | memoryview]):
    """The SHA-256 of the pieces given to :meth:`submit`, in order, hashed on a helper thread."""

    def __init__(self, *, threaded: bool = True) -> None:
        self._hash = hashlib.sha256()
        super().__init__(self._hash.update, threaded=threaded, name="sha256-helper")

    def hexdigest(self) -> str:
        """The digest of every piece given; ends the helper thread."""
        self.join()
        return self._hash.hexdigest()
