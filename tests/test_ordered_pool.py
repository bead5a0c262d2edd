"""Worker processes that die: outcomes still come, in order, and only the killer is refused."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Generator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import cast

import pytest

from tests.helpers import wait_until
from triage_app.ordered_pool import MAX_WORKER_CRASHES, ordered_map


def _shout_or_die(path: Path) -> str:
    """The work: a file named ``killer*`` kills its worker process, as a decoder crash would."""
    if path.name.startswith("killer"):
        os._exit(70)
    return path.name.upper()


def _new_executor() -> ProcessPoolExecutor:
    return ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))


def _crashed(path: Path, crashes: int) -> str:
    return f"crashed {path.name} {crashes}"


@pytest.mark.expect_log_warnings
def test_a_dying_worker_costs_only_its_file_and_the_order_is_kept() -> None:
    names = ["a", "b", "killer", "c", "d", "e", "killer2", "f"]
    outcomes = list(
        ordered_map(
            _new_executor,
            _shout_or_die,
            [Path(n) for n in names],
            window=4,
            crashed=_crashed,
        )
    )
    assert outcomes == [
        "A",
        "B",
        f"crashed killer {MAX_WORKER_CRASHES}",
        "C",
        "D",
        "E",
        f"crashed killer2 {MAX_WORKER_CRASHES}",
        "F",
    ]


class _BreaksAfterOneHandOver:
    """An executor whose worker dies on the first file before the second is handed over: the
    race a real pool loses now and then (its submit raises ``BrokenProcessPool``)."""

    def __init__(self, healthy: bool) -> None:
        self.healthy = healthy
        self.handed_over: list[str] = []

    def submit(self, work: Callable[[Path], str], path: Path) -> Future[str]:
        if not self.healthy and self.handed_over:
            raise BrokenProcessPool("a child process terminated abruptly")
        self.handed_over.append(path.name)
        future: Future[str] = Future()
        if self.healthy:
            future.set_result(work(path))
        else:
            future.set_exception(BrokenProcessPool("a child process terminated abruptly"))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass


@pytest.mark.expect_log_warnings
def test_a_pool_that_breaks_before_a_hand_over_loses_no_file() -> None:
    made: list[_BreaksAfterOneHandOver] = []

    def new_executor() -> ProcessPoolExecutor:
        made.append(_BreaksAfterOneHandOver(healthy=bool(made)))
        return cast(ProcessPoolExecutor, made[-1])

    files = [Path(n) for n in ("a", "b", "c")]
    outcomes = list(ordered_map(new_executor, _shout_or_die, files, window=3, crashed=_crashed))
    assert outcomes == ["A", "B", "C"]
    assert made[0].handed_over == ["a"]  # then broken: b and c went to the new pool


def test_without_crashes_every_file_is_done_once_in_order() -> None:
    files = [Path(f"file{i:02d}") for i in range(23)]
    outcomes = list(ordered_map(_new_executor, _shout_or_die, files, window=3, crashed=_crashed))
    assert outcomes == [f.name.upper() for f in files]


def test_a_caller_that_stops_early_leaves_no_worker_behind() -> None:
    made: list[ProcessPoolExecutor] = []

    def tracked() -> ProcessPoolExecutor:
        made.append(_new_executor())
        return made[-1]

    outcomes: Generator[str, None, None] = ordered_map(
        tracked, _shout_or_die, [Path(f"f{i}") for i in range(50)], window=4, crashed=_crashed
    )
    assert next(outcomes) == "F0"
    pids = list(made[0]._processes)  # what the shutdown must end
    outcomes.close()
    # By pid: the executor's own thread reaps them, so Process.join here could return early.
    assert pids
    wait_until(lambda: not any(_running(pid) for pid in pids), timeout_s=30, what="workers gone")


def _running(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie waiting to be reaped does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
