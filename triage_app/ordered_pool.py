"""Files through worker processes, outcomes in input order, a dying worker costing only its file.

``multiprocessing.Pool.imap`` waits for ever once a worker dies (a decoder crash on a hostile
file, the OOM killer): the task it held is never answered. A :class:`ProcessPoolExecutor`
instead fails every future it held (``BrokenProcessPool``), so here the pool is replaced and the
files it held are tried again one at a time, in order: an innocent file that shared the pool with
a hostile one is triaged as usual, and a file its worker dies on alone ``MAX_WORKER_CRASHES``
times is refused as ``worker_crashed``. The intake's long-lived pool applies the same rule
(:mod:`triage_app.intake`).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TypeVar

__all__ = ["MAX_WORKER_CRASHES", "WORKER_CRASHED", "ordered_map"]

log = logging.getLogger(__name__)

#: Times a worker may die on one file, alone in the pool, before the file is refused.
MAX_WORKER_CRASHES = 3
#: The error code of such a file (its quarantine folder, its result record).
WORKER_CRASHED = "worker_crashed"

R = TypeVar("R")


def ordered_map(
    new_executor: Callable[[], ProcessPoolExecutor],
    work: Callable[[Path], R],
    files: Sequence[Path],
    *,
    window: int,
    crashed: Callable[[Path, int], R],
) -> Generator[R, None, None]:
    """``work(file)`` for each file in worker processes, yielded in the order of ``files``.

    At most ``window`` files are handed over at a time (memory stays flat for a long list, and
    a crash puts few files in doubt). ``crashed(file, crashes)`` is the outcome of a file its
    worker died on ``MAX_WORKER_CRASHES`` times. The executor is shut down at the end, also when
    the caller stops early.
    """
    executor = new_executor()
    try:
        waiting = deque(files)
        in_flight: deque[tuple[Path, Future[R]]] = deque()
        while waiting or in_flight:
            while waiting and len(in_flight) < window:
                try:
                    future = executor.submit(work, waiting[0])
                except BrokenProcessPool:
                    # A file in flight killed its worker since the last hand-over: its futures
                    # fail below and their files are tried again; with none in flight, nothing
                    # is in doubt and a new pool takes over.
                    if in_flight:
                        break
                    executor = _replaced(executor, new_executor)
                    continue
                in_flight.append((waiting.popleft(), future))
            future = in_flight[0][1]
            try:
                outcome = future.result()
            except BrokenProcessPool:
                log.error("a worker process died; the %d file(s) it shared are tried again",
                          len(in_flight))  # fmt: skip
                executor = _replaced(executor, new_executor)
                suspects = [suspect for suspect, _ in in_flight]
                in_flight.clear()
                for suspect in suspects:
                    outcome, executor = _alone(executor, new_executor, work, suspect, crashed)
                    yield outcome
                continue
            in_flight.popleft()
            yield outcome
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


def _alone(
    executor: ProcessPoolExecutor,
    new_executor: Callable[[], ProcessPoolExecutor],
    work: Callable[[Path], R],
    path: Path,
    crashed: Callable[[Path, int], R],
) -> tuple[R, ProcessPoolExecutor]:
    """``work(path)`` with nothing else in the pool, so that a crash is this file's."""
    for _ in range(MAX_WORKER_CRASHES):
        try:
            return executor.submit(work, path).result(), executor
        except BrokenProcessPool:
            executor = _replaced(executor, new_executor)
    log.error("a worker died %d times on one file: refused as %s", MAX_WORKER_CRASHES,
              WORKER_CRASHED)  # fmt: skip
    return crashed(path, MAX_WORKER_CRASHES), executor


def _replaced(
    executor: ProcessPoolExecutor, new_executor: Callable[[], ProcessPoolExecutor]
) -> ProcessPoolExecutor:
    executor.shutdown(wait=False, cancel_futures=True)
    return new_executor()
