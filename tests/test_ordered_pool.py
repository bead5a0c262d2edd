"""Worker processes that die: outcomes still come, in order, and only the killer is refused."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Generator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

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
