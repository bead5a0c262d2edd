"""Many inputs through the pipeline, on every core, results back in input order.

Worker processes (not threads) each load their own model session: on a 2-core box two
single-threaded processes reached 0.73–0.98 of the 2-core bound where one process with two
threads reached 0.38–0.61 (DESIGN §7). Workers only compute; the calling process is the single
writer to the case store. Processes are *spawned*, never forked, so no ONNX Runtime or SQLite
state is ever copied into a child.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import BrokenExecutor, Future, ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import cv2

from triage_app.config import Settings
from triage_app.errors import IllegalTransitionError, OutboxError
from triage_app.escalation.outbox import OutboxItem
from triage_app.escalation.queueing import EscalationQueue
from triage_app.inputs import file_sha256
from triage_app.logs import configure_logging, logs_json_lines
from triage_app.model.manifest import verify_bundle
from triage_app.ordered_pool import WORKER_CRASHED, ordered_map
from triage_app.pipeline import PipelineConfig, TriagePipeline
from triage_app.policy import ABNORMAL, NORMAL
from triage_app.results import (
    BLOCKED,
    QUEUED,
    CaseResult,
    EscalationRef,
    FailedInput,
    InputOutcome,
)
from triage_app.states import CaseEvent, CaseState
from triage_app.store import CaseStore, still_held

_T = TypeVar("_T")
log = logging.getLogger(__name__)

_worker_pipeline: TriagePipeline | None = None


def _init_worker(
    config: PipelineConfig, log_level: int, json_lines: bool, service: bool = False
) -> None:
    """Set up one worker: the parent's logging, one OpenCV thread, its own model session.

    OpenCV starts a thread per core by default; with one worker per core that oversubscribes the
    CPU, so each worker computes single-threaded and the workers are the parallelism.
    """
    global _worker_pipeline
    if service:
        # Ctrl-C and a service manager's SIGTERM reach the whole process group: the service
        # decides when to stop and lets its workers finish the files they hold. (Not for
        # ``triage_files``: multiprocessing.Pool stops its workers with SIGTERM.)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _exit_with_parent(os.getppid())
    cv2.setNumThreads(1)
    configure_logging(log_level, json_lines=json_lines)
    _worker_pipeline = TriagePipeline(config)


def _parent_logging() -> tuple[int, bool]:
    """This process's log level and whether it logs JSON Lines, for its spawned workers (they
    start with no logging set up, and a service's journal must get one format)."""
    return logging.getLogger().getEffectiveLevel(), logs_json_lines()


def _exit_with_parent(parent: int, interval_s: float = 1.0) -> None:
    """A worker whose parent was killed (SIGKILL, OOM) exits instead of waiting for work
    forever with a model in memory."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _run_in_worker(path: Path) -> InputOutcome:
    assert _worker_pipeline is not None, "worker used before initialisation"
    return _worker_pipeline.run(path)


def _warm_up() -> None:
    """Nothing: the worker's initializer has loaded the model by the time this runs."""


def triage_files(
    files: Sequence[Path], config: PipelineConfig, *, workers: int
) -> Generator[InputOutcome, None, None]:
    """Yield one outcome per file, in order. One file (or one worker) runs in this process.

    With workers, a worker that dies costs only the file it died on (``ordered_map``).
    """
    workers = max(1, min(workers, len(files)))
    if workers == 1:
        pipeline = TriagePipeline(config)
        yield from (pipeline.run(path) for path in files)
        return
    verify_bundle(config.bundle_dir)  # fail here, clearly, rather than inside every worker
    level, json_lines = _parent_logging()

    def new_executor() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(config, level, json_lines),
        )

    yield from ordered_map(
        new_executor, _run_in_worker, files, window=4 * workers, crashed=worker_crashed_input
    )


def worker_crashed_input(path: Path, crashes: int) -> FailedInput:
    """The outcome of a file its worker died on ``crashes`` times (alone in the pool)."""
    message = f"the triage worker died (or ran over its time limit) {crashes} times on this file"
    return FailedInput(str(path), WORKER_CRASHED, message, file_sha256(path))


class TriagePool:
    """Long-lived worker processes for a service: submit files as they arrive, one future each.

    Unlike :func:`triage_files` it keeps its workers between files, so a service pays the model
    load once. A worker that dies (a decoder crash on a hostile file) breaks the pool; the
    caller replaces it with :meth:`restart` and decides what to do with the files it held.
    """

    def __init__(self, config: PipelineConfig, *, workers: int) -> None:
        verify_bundle(config.bundle_dir)  # fail here, clearly, rather than inside every worker
        self._config = config
        self._workers = max(1, workers)
        self._executor = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        level, json_lines = _parent_logging()
        executor = ProcessPoolExecutor(
            self._workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self._config, level, json_lines, True),
        )
        # Start the workers (and load the model) now, not when the first image arrives.
        for _ in range(self._workers):
            _killing_workers_if_broken(executor, executor.submit(_warm_up))
        return executor

    @property
    def workers(self) -> int:
        return self._workers

    def submit(self, path: Path) -> Future[InputOutcome]:
        return self._submit(_run_in_worker, path)

    def _submit(self, fn: Callable[..., _T], *args: object) -> Future[_T]:
        return _killing_workers_if_broken(self._executor, self._executor.submit(fn, *args))

    def stop_workers(self) -> None:
        """Kill the worker processes, e.g. one stuck on a file: the pool breaks, and every
        future it held fails as in a crash (``BrokenProcessPool``)."""
        for process in _worker_processes(self._executor):
            process.kill()

    def restart(self) -> None:
        """Replace a broken pool; futures of the old one have already failed."""
        # Also the workers started after ``stop_workers``: the broken pool stops them with
        # SIGTERM, which service workers ignore, and then waits for them; one blocked sending
        # its last result to the pipe nobody reads any more never ends, nor does the process
        # that waits for it at exit. (Listed first: ``shutdown`` forgets them.)
        workers = _worker_processes(self._executor)
        self._executor.shutdown(wait=False, cancel_futures=True)
        for process in workers:
            process.kill()
        self._executor = self._new_executor()

    def close(self) -> None:
        """Wait for submitted work, then stop the workers."""
        self._executor.shutdown(wait=True)


def _killing_workers_if_broken(executor: ProcessPoolExecutor, future: Future[_T]) -> Future[_T]:
    """``future``, which kills the executor's workers the moment the pool breaks: a broken pool
    stops its workers with SIGTERM, which service workers ignore, then waits for them for ever
    (and so does the process at exit)."""

    def killed_if_broken(done: Future[_T]) -> None:
        if not done.cancelled() and isinstance(done.exception(), BrokenExecutor):
            for process in _worker_processes(executor):
                process.kill()

    future.add_done_callback(killed_if_broken)
    return future


def _worker_processes(executor: ProcessPoolExecutor) -> list[multiprocessing.process.BaseProcess]:
    """The executor's worker processes (it has no public way to stop a running task, and its
    own SIGTERM does not reach service workers)."""
    return list((executor._processes or {}).values())


def triage_and_record(
    files: Sequence[Path], settings: Settings, *, queue: EscalationQueue | None = None
) -> Generator[InputOutcome, None, None]:
    """Triage ``files`` with the configured workers and keep every outcome in the case store.

    The one loop every shell (CLI, watch service, receiver) runs; it yields each outcome after
    it is recorded (and, with a ``queue``, an escalated case after it is durably queued), so a
    shell only has to show it.
    """
    config = PipelineConfig.from_settings(settings)
    with CaseStore.open(settings.case_store_path) as store:
        for outcome in triage_files(files, config, workers=settings.workers):
            yield record_outcome(store, outcome, queue=queue)


def record_outcome(
    store: CaseStore, outcome: InputOutcome, *, queue: EscalationQueue | None = None
) -> InputOutcome:
    """Keep every outcome: triaged cases with their state history, failures with their code.

    A held escalation goes into the outbox when a ``queue`` is given; the returned outcome
    says where the case now stands.
    """
    if not isinstance(outcome, CaseResult):
        store.record_failure(outcome)
        return outcome
    state = store.record_result(outcome, store_event(outcome))
    if queue is None or state is not CaseState.ESCALATION_HELD or outcome.payload is None:
        return outcome
    return _enqueue(store, outcome, queue)


def _enqueue(store: CaseStore, result: CaseResult, queue: EscalationQueue) -> CaseResult:
    """Seal and queue a held case; an outbox that cannot take it leaves it held, loudly.

    Full (the byte quota) or failing (a full disk below the quota, an I/O error, a database
    it cannot write): either way the case is recorded held already, and nothing is lost by
    keeping it so; the held cases are released later (``held_release``). The batch, and a
    service's loop, go on with the next file instead of stopping on it.
    """
    assert result.escalation is not None and result.payload is not None
    try:
        item = enqueue_held(store, queue, result.case_id, result.payload, reason=result.reason)
    except IllegalTransitionError as err:
        # A clinician closed the case ("do not send") since it was recorded: it is not sent.
        log.info("case %s was closed on this device before it was queued: not sent", result.case_id)
        closed = replace(result.escalation, detail=f"not sent: {err.message}")
        return replace(result, escalation=closed)
    except OutboxError as err:  # QueueFullError, or the disk or database failing
        log.error("ALARM: %s; case %s stays held on this device", err.message, result.case_id)
        held = replace(result.escalation, detail=f"{err.message}: held on this device")
        return replace(result, escalation=held)
    queued = EscalationRef(state=QUEUED, payload_sha256=item.payload_sha256)
    return replace(result, escalation=queued)


def enqueue_held(
    store: CaseStore, queue: EscalationQueue, case_id: str, payload: bytes, *, reason: str
) -> OutboxItem:
    """Seal and queue a held case's payload, then record the case as queued.

    The one way a held case enters the outbox, whether just triaged or released later (see
    ``held_release``). The outbox commits first, in a transaction that also checks the case is
    still held (``store.still_held``): a case a clinician closed meanwhile is never queued, and
    one in the outbox can no longer be closed. A crash after that commit leaves a held case
    that is already queued, which the next release (or the uploader, when it claims it)
    records, and the outbox never takes a case twice. Raises ``IllegalTransitionError`` when
    the case is no longer held, ``QueueFullError`` when the quota is reached, or
    ``OutboxError`` when the disk or database fails (a full disk below the quota), with
    nothing queued in each case.
    """
    item = queue.enqueue(case_id, payload, reason=reason, precondition=still_held(case_id))
    record_queued(store, item)
    return item


def record_queued(store: CaseStore, item: OutboxItem) -> None:
    """Move a held case whose envelope is in the outbox to ``queued`` in the case store.

    Another process may have moved it on in between (the uploader claimed the envelope, a
    second release queued it): the outbox is the truth about delivery, so that is no error.
    """
    try:
        store.apply(item.case_id, CaseEvent.ENQUEUE, f"outbox priority {item.priority}")
    except IllegalTransitionError as err:
        log.info("case %s is in the outbox and has moved on already (%s)", item.case_id, err)


def store_event(result: CaseResult) -> CaseEvent:
    """The case-store event that records where a triaged case went."""
    if result.decision == NORMAL:
        return CaseEvent.DECIDE_LOCAL_NORMAL
    if result.decision == ABNORMAL:
        return CaseEvent.DECIDE_LOCAL_ABNORMAL
    if result.escalation is not None and result.escalation.state == BLOCKED:
        return CaseEvent.BLOCK
    return CaseEvent.HOLD
