"""Hands a POST body to the receiving thread as it arrives (``POST /v1/cases/{case_id}``).

The event loop reads the body; :meth:`CaseReceiver.receive_stream
<triage_app.central.app.CaseReceiver.receive_stream>` checks, decrypts and writes it in a worker
thread (crypto and fsync must not block the loop), piece by piece, so a 20 MB case is processed
while it is still arriving.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import Any

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from triage_app.central.errors import BodyTooLargeError
from triage_app.escalation.envelope import BytesLike

__all__ = ["ReceiveStream", "receive_streaming"]

ReceiveStream = Callable[[str, Callable[[], BytesLike | None]], tuple[dict[str, Any], bool]]
"""``CaseReceiver.receive_stream``: the case id and a function handing out the body's pieces."""


class _BodyAbortedError(Exception):
    """The body stopped arriving (too large, cut off): the receiving thread gives up."""


_ABORT = object()


async def receive_streaming(
    request: Request, receive_stream: ReceiveStream, case_id: str, limit: int
) -> tuple[dict[str, Any], bool]:
    """Hand the body to :meth:`CaseReceiver.receive_stream` in a worker thread as it arrives
    (crypto and fsync must not block the event loop), refusing it over the size limit before
    reading it (``Content-Length``) or as soon as the streamed bytes pass the limit.

    Once the worker has refused the envelope (a bad signature, say, right after the header), the
    rest of the body is read and dropped unprocessed before the answer: a client still sending
    would otherwise see the connection reset instead of the refusal, and retry it.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLargeError(f"the body is {declared} bytes; this server accepts {limit}")
    pieces: queue.SimpleQueue[object] = queue.SimpleQueue()

    def next_piece() -> BytesLike | None:
        item = pieces.get()
        if item is _ABORT:
            raise _BodyAbortedError
        assert item is None or isinstance(item, bytes | bytearray | memoryview)
        return item

    outcome: list[tuple[dict[str, Any], bool] | BaseException] = []
    done = anyio.Event()

    async def work() -> None:
        try:
            outcome.append(await run_in_threadpool(receive_stream, case_id, next_piece))
        except Exception as exc:  # noqa: BLE001 - re-raised below, outside the task group
            outcome.append(exc)
        finally:
            done.set()

    failure: Exception | None = None
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(work)
        ended = False
        try:
            total = 0
            async for piece in request.stream():
                total += len(piece)
                if total > limit:
                    raise BodyTooLargeError(
                        f"the body is larger than this server accepts ({limit} bytes)"
                    )
                if piece and not done.is_set():
                    pieces.put(piece)
            pieces.put(None)
            ended = True
        except (BodyTooLargeError, ClientDisconnect) as exc:
            failure = exc
        finally:
            if not ended:
                pieces.put(_ABORT)
    if failure is not None:
        raise failure
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return result
