"""The evaluation's memory figure is each worker's own peak, measured on real processes.

``worker_peak_rss_mb`` once read 0.0 in the shipped manifest: ``RUSAGE_CHILDREN`` counts only
reaped children, and the batch path's workers were still running when it was read. Reaped, it
would still have been wrong: a spawned child's ``ru_maxrss`` starts from its parent's peak.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from pathlib import Path

from models.training.evaluate import WorkerMemory, throughput_in_child
from triage_app.synthetic import PhantomConfig, write_phantom_set

MIB = 1024  # KiB
BALLAST_MB = 200
# Run as a spawned worker's target (``exec`` pickles by name): hold a written ballast until told.
HOLD = """
import time
ballast = b"x" * ({mb} << 20)
ready.set()
go.wait(60)
"""


@contextmanager
def spawned(ballast_mb: int) -> Iterator[tuple[BaseProcess, Event, Event]]:
    """A spawned worker holding ``ballast_mb`` MB once ``ready``; it exits when ``go`` is set."""
    ctx = multiprocessing.get_context("spawn")
    ready, go = ctx.Event(), ctx.Event()
    code = HOLD.format(mb=ballast_mb)
    process = ctx.Process(target=exec, args=(code, {"ready": ready, "go": go}))
    process.start()
    try:
        assert ready.wait(60), "the worker never got its ballast"
        yield process, ready, go
    finally:
        go.set()
        process.join(10)
        if process.exitcode is None:
            process.kill()
            process.join()


def test_each_workers_own_peak_is_read_not_the_parents() -> None:
    parent_ballast = b"y" * (300 << 20)  # this process's peak now exceeds every worker's
    with spawned(BALLAST_MB) as (heavy, _, _), spawned(0) as (light, _, _):
        memory = WorkerMemory()
        memory.sample()
    assert heavy.pid is not None and light.pid is not None
    peaks = memory.peaks_kib
    assert set(peaks) == {heavy.pid, light.pid}, "only the two spawned workers are counted"
    assert peaks[heavy.pid] - peaks[light.pid] >= (BALLAST_MB - 10) * MIB
    assert peaks[light.pid] < 150 * MIB < len(parent_ballast) // 1024


def test_a_worker_that_exits_before_the_end_keeps_its_peak() -> None:
    with WorkerMemory(interval_s=0.02) as memory, spawned(BALLAST_MB) as (worker, _, go):
        assert worker.pid is not None
        deadline = time.monotonic() + 30
        while worker.pid not in memory.peaks_kib and time.monotonic() < deadline:
            time.sleep(0.02)
        go.set()
        worker.join(10)
        assert worker.exitcode == 0
    assert memory.peaks_kib.get(worker.pid, 0) >= BALLAST_MB * MIB


def test_the_throughput_run_reports_the_largest_workers_peak_memory(tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    write_phantom_set(inputs, 31, 8, config=PhantomConfig(size_range=(160, 256)))
    files = sorted(inputs.glob("*.dcm"))

    figures = throughput_in_child(files, tmp_path)  # as ``evaluate`` runs it: a fresh process

    assert figures["images"] == len(files)
    # A worker holds Python, NumPy, OpenCV, pydicom, ONNX Runtime and the model: tens to
    # hundreds of MB. 0.0 (nothing measured) and gigabytes (someone else's memory) are wrong.
    assert 30 < figures["worker_peak_rss_mb"] < 1500
