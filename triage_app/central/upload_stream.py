"""Hands a POST body to the receiving thread as it arrives (``POST /v1/cases/{case_id}``).

The event loop reads the body; :meth:`CaseReceiver.receive_stream
<triage_app.central.app.CaseReceiver.receive_stream>` checks, decrypts and writes it in a worker
thread (crypto and fsync must not block the loop), piece by piece, so a 20 MB case is processed
while it is still arriving.

What keeps one client from hurting the others (:class:`UploadGate`):

* a thread is taken only once the envelope's signed header is in, and from a pool of the
  uploads' own: connections that open and stall hold no thread, and uploads never take the
  threads that verdict polls, ``/v1/health``, ``/v1/keys`` and ``/metrics`` run in;
* the loop stops reading a body while more than ``buffer_bytes`` of it wait for its thread (TCP
  then slows the sender down), so a slow disk or a busy pool cannot make memory grow;
* a body that sends nothing for ``idle_timeout_s`` is cut off with 408 (the device retries).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
from starlette.requests import ClientDisconnect, Request

from triage_app.central.errors import BodyTimeoutError, BodyTooLargeError
from triage_app.escalation.envelope import BytesLike, signed_prefix_bytes

__all__ = ["DEFAULT_BUFFER_BYTES", "ReceiveStream", "UploadGate", "UploadLimits"]

log = logging.getLogger(__name__)

ReceiveStream = Callable[[str, Callable[[], BytesLike | None]], tuple[dict[str, Any], bool]]
"""``CaseReceiver.receive_stream``: the case id and a function handing out the body's pieces."""

#: Body bytes one upload may have read and not yet processed (a few of the loop's 256 KiB reads).
DEFAULT_BUFFER_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class UploadLimits:
    """How much of the server one upload may hold (``CentralConfig`` gives the first three)."""

    max_body_bytes: int
    idle_timeout_s: float
    parallel: int  # uploads in their receiving threads at once; the others wait, unread
    buffer_bytes: int = DEFAULT_BUFFER_BYTES


class UploadGate:
    """Receives upload bodies within :class:`UploadLimits` (see the module docstring)."""

    def __init__(self, limits: UploadLimits) -> None:
        self.limits = limits
        self._limiter: anyio.CapacityLimiter | None = None

    async def receive(
        self, request: Request, receive_stream: ReceiveStream, case_id: str
    ) -> tuple[dict[str, Any], bool]:
        """Run ``receive_stream`` over the body; its result, or what it or the body raised.

        Refuses a body over the size limit before reading it (``Content-Length``) or as soon as
        the streamed bytes pass it. Once the thread has refused the envelope (a bad signature,
        say, right after the header), the rest of the body is read and dropped before the
        answer: a client still sending would otherwise see the connection reset instead of the
        refusal, and retry it.
        """
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BodyTooLargeError(f"the body is {declared} bytes; this server accepts {limit}")
        channel = _PieceChannel(self.limits.buffer_bytes)
        outcome: list[tuple[dict[str, Any], bool] | BaseException] = []
        head: list[bytes] = []  # the first pieces, until the signed header is in
        head_bytes = 0
        peek = bytearray()  # enough of them to tell the header's length

        async def work() -> None:
            try:
                outcome.append(
                    await anyio.to_thread.run_sync(
                        receive_stream, case_id, channel.get, limiter=self._pool()
                    )
                )
            except Exception as exc:  # noqa: BLE001 - re-raised below, outside the task group
                outcome.append(exc)
            finally:
                channel.close()

        failure: Exception | None = None
        async with anyio.create_task_group() as tasks:
            started = ended = False
            try:
                total = 0
                async for piece in _pieces(request, self.limits.idle_timeout_s):
                    total += len(piece)
                    if total > limit:
                        raise BodyTooLargeError(
                            f"the body is larger than this server accepts ({limit} bytes)"
                        )
                    if started:
                        await channel.put(piece)
                        continue
                    head.append(piece)
                    head_bytes += len(piece)
                    peek += piece[: _PEEK_BYTES - len(peek)]
                    needed = signed_prefix_bytes(peek)
                    if needed is not None and head_bytes >= needed:
                        started = True
                        tasks.start_soon(work)
                        for early in head:
                            await channel.put(early)
                if not started:  # a body that ends inside its header: the thread says how
                    tasks.start_soon(work)
                    for early in head:
                        await channel.put(early)
                channel.end()
                ended = True
            except (BodyTooLargeError, BodyTimeoutError, ClientDisconnect) as exc:
                failure = exc
            finally:
                if not ended:
                    channel.abort()
        if failure is not None:
            raise failure
        result = outcome[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def _pool(self) -> anyio.CapacityLimiter:
        # Made on first use: a limiter belongs to the event loop that runs the server.
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.limits.parallel)
        return self._limiter


# Enough of the first bytes to read the magic number and the header length.
_PEEK_BYTES = 64


async def _pieces(request: Request, idle_timeout_s: float) -> AsyncIterator[bytes]:
    """The body's pieces; :class:`BodyTimeoutError` when none arrives for ``idle_timeout_s``."""
    stream = request.stream()
    while True:
        with anyio.move_on_after(idle_timeout_s) as waited:
            try:
                piece = await anext(stream)
            except StopAsyncIteration:
                return
        if waited.cancelled_caught:
            raise BodyTimeoutError(f"the body sent nothing for {idle_timeout_s:g} s")
        yield piece


class _BodyAbortedError(Exception):
    """The body stopped arriving (too large, cut off, idle): the receiving thread gives up."""


_END = object()
_ABORT = object()


class _PieceChannel:
    """Body pieces from the event loop to the receiving thread, with at most ``limit`` bytes
    waiting (one piece may go over it): :meth:`put` waits for room, without blocking the loop.
    """

    def __init__(self, limit: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._limit = limit
        self._items: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting_bytes = 0
        self._room: asyncio.Event | None = None  # the loop waits on it for room
        self._closed = False

    async def put(self, piece: bytes) -> None:
        """Queue a piece (event loop); dropped once the receiving thread is done."""
        if not piece:
            return
        while True:
            with self._lock:
                if self._closed:
                    return
                if self._waiting_bytes < self._limit:
                    self._waiting_bytes += len(piece)
                    self._items.put(piece)
                    return
                room = self._room = asyncio.Event()
            await room.wait()

    def end(self) -> None:
        """The body is complete (event loop)."""
        self._items.put(_END)

    def abort(self) -> None:
        """The body will not complete (event loop): the thread's next :meth:`get` raises."""
        self._items.put(_ABORT)

    def close(self) -> None:
        """The receiving thread is done (event loop): what comes now is dropped, unread room
        is no longer awaited."""
        with self._lock:
            self._closed = True
            room, self._room = self._room, None
        if room is not None:
            room.set()

    def get(self) -> BytesLike | None:
        """The next piece, None at the end of the body (receiving thread)."""
        item = self._items.get()
        if item is _ABORT:
            raise _BodyAbortedError
        if item is _END:
            return None
        assert isinstance(item, bytes)
        with self._lock:
            self._waiting_bytes -= len(item)
            room = None
            if self._room is not None and self._waiting_bytes < self._limit:
                room, self._room = self._room, None
        if room is not None:
            with suppress(RuntimeError):  # the loop is closed: the server is stopping
                self._loop.call_soon_threadsafe(room.set)
        return item
