"""Files that arrive on their own (watch folder, DICOM receiver): triaged, recorded, filed.

Each file takes one path: triage in a worker process → outcome in the case store (and an
escalated case in the outbox) → JSON sidecar → the file itself moved to ``done/`` or to
``quarantine/<error_code>/``. The move comes last, so a crash anywhere leaves the file in the
inbox and it is simply triaged again on restart; the case store is idempotent on the case id,
so that second pass adds a ``reprocessed`` history row, never a second case. An input is never
removed before its outcome is durably recorded.

The watch service and the receiver differ only in how they decide that a file is ready; both
hand it to an :class:`Intake`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from triage_app.batch import TriagePool, record_outcome
from triage_app.config import Settings
from triage_app.escalation.queueing import EscalationQueue
from triage_app.inputs import file_sha256
from triage_app.paths import (
    ensure_private_dir,
    fsync_dir,
    remove_abandoned_temps,
    write_private_file,
)
from triage_app.pipeline import PipelineConfig
from triage_app.results import FailedInput, InputOutcome
from triage_app.store import CaseStore

log = logging.getLogger(__name__)

# Outcomes that mean "not all there yet" while a writer may still be busy (watch folder only).
INCOMPLETE_CODES = frozenset({"truncated", "empty_file"})
BACKLOG_PER_WORKER = 2
# A file whose worker died this many times is quarantined rather than tried again.
MAX_WORKER_CRASHES = 3
WORKER_CRASHED = "worker_crashed"
SIDECAR_SUFFIX = ".json"
REASON_SUFFIX = ".reason.json"


@dataclass(frozen=True)
class IntakeLayout:
    """The three folders of a service: where files arrive, where they end, where bad ones go."""

    inbox: Path
    done: Path
    quarantine: Path

    @classmethod
    def for_watch(cls, settings: Settings) -> IntakeLayout:
        return cls(settings.watch_inbox, settings.watch_done, settings.watch_quarantine)

    @classmethod
    def for_receiver(cls, settings: Settings) -> IntakeLayout:
        root = settings.receiver_storage
        return cls(root / "incoming", root / "done", root / "quarantine")

    def create(self) -> None:
        for folder in (self.inbox, self.done, self.quarantine):
            ensure_private_dir(folder)

    def relative(self, path: Path) -> Path:
        """``path`` inside the inbox; raises ``ValueError`` for a path outside it."""
        return path.relative_to(self.inbox)

    def remove_crash_leftovers(self) -> int:
        """Remove the temporary sidecars a kill between their write and rename left behind.

        Nothing else would: they are hidden, and no later write reuses their random names.
        Only in the folders the intake files into (``done/`` and ``quarantine/<code>/``, with
        the inbox's sub-folders below them), only its own sidecars' temporary names, and never
        one another process is writing now (its writer holds the lock). Returns how many went.
        """
        roots = [self.done, *(p for p in self.quarantine.iterdir() if _is_real_dir(p))]
        removed = sum(
            remove_abandoned_temps(
                root, for_suffixes=(SIDECAR_SUFFIX, REASON_SUFFIX), recursive=True
            )
            for root in roots
        )
        if removed:
            log.info("removed %d temporary sidecar file(s) left by an interrupted run", removed)
        return removed


@dataclass(frozen=True)
class FiledOutcome:
    """One file done with: its outcome and where the file now lives.

    ``deferred`` means the file looked cut short while its writer may still be busy: it stays
    in the inbox and nothing was recorded; the caller offers it again once it settles.
    """

    source: Path
    outcome: InputOutcome
    filed_as: Path | None
    submitted_at: float  # time.monotonic() when the file was handed over
    finished_at: float
    deferred: bool = False

    @property
    def quarantined(self) -> bool:
        return not self.deferred and isinstance(self.outcome, FailedInput)


class Intake:
    """Triage files in worker processes and file them; create and collect in one thread.

    :meth:`submit` may be called from any thread (the receiver's association threads, a
    watchdog observer); :meth:`collect` records the outcomes and must run in the thread that
    created the intake (the case store's SQLite connection belongs to it).
    """

    def __init__(
        self,
        settings: Settings,
        layout: IntakeLayout,
        *,
        queue: Callable[[], EscalationQueue | None] | None = None,
        incomplete_timeout_s: float = 0.0,
        pool: TriagePool | None = None,
    ) -> None:
        layout.create()
        layout.remove_crash_leftovers()
        self.layout = layout
        self._queue = queue or (lambda: None)
        self._incomplete_timeout_s = incomplete_timeout_s
        self._store = CaseStore.open(settings.case_store_path)
        self._pool = pool or TriagePool(
            PipelineConfig.from_settings(settings), workers=settings.workers
        )
        self._lock = threading.Lock()
        self._futures: dict[Future[InputOutcome], Path] = {}
        self._pending: dict[Path, float] = {}  # path → time.monotonic() of its hand-over
        self._crashes: dict[Path, int] = {}  # kept across hand-overs until the file is filed
        # Taken but not yet given to the pool: files wait here while the files that were in
        # flight at a worker crash (the suspects) are tried again one at a time.
        self._held: list[Path] = []
        self._suspects: set[Path] = set()
        self._closed = False

    # --- hand-over ------------------------------------------------------------------------------

    def submit(self, paths: Iterable[Path]) -> int:
        """Hand files over for triage; files already being triaged are skipped. Returns how
        many were taken."""
        taken = 0
        with self._lock:
            if self._closed:
                return 0
            for path in paths:
                self.layout.relative(path)  # a file outside the inbox is a programming error
                if path in self._pending:
                    continue
                self._pending[path] = time.monotonic()
                self._held.append(path)
                taken += 1
            self._dispatch_locked()
        return taken

    def _dispatch_locked(self) -> None:
        """Give held files to the pool: all at once, or one at a time while suspects remain
        (a file alone in the pool when a worker dies is the file that killed it)."""
        while self._held and not (self._suspects and self._futures):
            try:
                future = self._pool.submit(self._held[0])
            except BrokenProcessPool:
                return  # the files stay held; collect() replaces the pool
            self._futures[future] = self._held.pop(0)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._pending)

    @property
    def room(self) -> int:
        """How many more files to hand over now: a backlog of two per worker keeps both cores
        busy, and a stop waits for only those few (the rest stay where they are)."""
        return max(0, BACKLOG_PER_WORKER * self._pool.workers - self.in_flight)

    def is_in_flight(self, path: Path) -> bool:
        with self._lock:
            return path in self._pending

    # --- results --------------------------------------------------------------------------------

    def collect(self, timeout_s: float = 0.0) -> list[FiledOutcome]:
        """Record and file every outcome that is ready (waiting up to ``timeout_s`` for one)."""
        with self._lock:
            futures = list(self._futures)
            stalled = not futures and bool(self._held)
        if stalled:
            # A worker died while no file was in flight (killed from outside): nothing was
            # lost, but the pool refuses work until it is replaced.
            log.error("a triage worker process died while idle; starting new ones")
            self._pool.restart()
            with self._lock:
                self._dispatch_locked()
                futures = list(self._futures)
        if not futures:
            if timeout_s > 0:
                time.sleep(timeout_s)  # nothing to wait for; keep the caller's loop paced
            return []
        done, _ = wait(futures, timeout=timeout_s, return_when=FIRST_COMPLETED)
        filed: list[FiledOutcome] = []
        crashed: list[Path] = []
        for future in done:
            with self._lock:
                path = self._futures.pop(future, None)
            if path is None:
                continue  # a future of a pool that broke and was replaced
            try:
                outcome = future.result()
            except BrokenProcessPool:
                crashed.append(path)
                continue
            filed.append(self._file(path, outcome))
        if crashed:
            filed.extend(self._after_crash(crashed))
        with self._lock:
            self._dispatch_locked()  # the next suspect, or the files held back for them
        return filed

    def drain(self) -> list[FiledOutcome]:
        """Wait for every file handed over so far and file it."""
        filed: list[FiledOutcome] = []
        while self.in_flight:
            filed.extend(self.collect(timeout_s=1.0))
        return filed

    def close(self) -> list[FiledOutcome]:
        """Take no more files, finish the ones in flight, stop the workers."""
        with self._lock:
            self._closed = True
        try:
            return self.drain()
        finally:
            self._pool.close()
            self._store.close()

    def __enter__(self) -> Intake:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- filing ---------------------------------------------------------------------------------

    def _file(self, path: Path, outcome: InputOutcome) -> FiledOutcome:
        submitted_at = self._forget(path)
        if self._still_being_written(outcome, path):
            log.info("a file is not complete yet; it will be read again once it settles")
            return FiledOutcome(path, outcome, None, submitted_at, time.monotonic(), deferred=True)
        self._crashes.pop(path, None)
        # The record names where the file will live, so the store and the GUI can find it.
        relative = self.layout.relative(path)
        if isinstance(outcome, FailedInput):
            target = _free_name(path, self.layout.quarantine / outcome.code / relative)
        else:
            target = _free_name(path, self.layout.done / relative)
        recorded = record_outcome(
            self._store, replace(outcome, path=str(target)), queue=self._queue()
        )
        if isinstance(recorded, FailedInput):
            self._quarantine(path, target, recorded)
        else:
            _file_with_note(path, target, SIDECAR_SUFFIX, recorded.to_json())
        return FiledOutcome(path, recorded, target, submitted_at, time.monotonic())

    def _still_being_written(self, outcome: InputOutcome, path: Path) -> bool:
        """A cut-short file changed within the incomplete timeout may still be growing.

        Judged by the file's modification time, not by when this process first saw it, so a
        restart does not start the wait again.
        """
        if not isinstance(outcome, FailedInput) or outcome.code not in INCOMPLETE_CODES:
            return False
        try:
            age_s = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return False
        return age_s < self._incomplete_timeout_s

    def _after_crash(self, crashed: list[Path]) -> list[FiledOutcome]:
        """A worker died: replace the pool and try every file it held again.

        A dead worker breaks the whole pool, so which file killed it is unknown while several
        were in flight: those become suspects, tried again one at a time, ahead of the files
        held back meanwhile (an innocent large file next to a hostile one must not share its
        fate). A file alone in the pool counts the crash; at ``MAX_WORKER_CRASHES`` it is
        quarantined.
        """
        log.error("a triage worker process died; its files will be triaged again")
        self._pool.restart()
        with self._lock:
            crashed.extend(self._futures.values())  # their futures fail with the old pool
            self._futures.clear()
        filed: list[FiledOutcome] = []
        again: list[Path] = []
        for path in crashed:
            crashes = self._crashes.get(path, 0) + (len(crashed) == 1)
            self._crashes[path] = crashes
            if crashes < MAX_WORKER_CRASHES:
                again.append(path)
                continue
            message = f"the triage worker died {crashes} times while reading this file"
            failure = FailedInput(str(path), WORKER_CRASHED, message, file_sha256(path))
            filed.append(self._file(path, failure))
        with self._lock:
            self._suspects.update(again)
            self._held[:0] = again
            self._dispatch_locked()
        return filed

    def _forget(self, path: Path) -> float:
        with self._lock:
            self._suspects.discard(path)
            return self._pending.pop(path)

    def _quarantine(self, path: Path, target: Path, failure: FailedInput) -> None:
        reason = {
            "code": failure.code,
            "message": failure.message,
            "source": str(self.layout.relative(path)),
            "quarantined_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        _file_with_note(path, target, REASON_SUFFIX, reason)
        log.info("a file went to quarantine: %s", failure.code)


def _file_with_note(path: Path, target: Path, suffix: str, note: Mapping[str, object]) -> None:
    """Write the JSON note next to ``target``, then move the file there (the move is last)."""
    ensure_private_dir(target.parent)
    text = json.dumps(note, indent=2, sort_keys=True) + "\n"
    write_private_file(target.with_name(target.name + suffix), text.encode(), sync_folder=False)
    move_durably(path, target)


def _is_real_dir(path: Path) -> bool:
    """A folder, not a symbolic link to one (the clean-up stays inside the service's folders)."""
    return path.is_dir() and not path.is_symlink()


def _free_name(source: Path, target: Path) -> Path:
    """``target``, or ``name~N.ext`` when a different file already took that name.

    A file with the same bytes (a scanner sending a study again) takes the place of its twin
    instead of piling up copies. A sidecar without its image is the debris of a crash between
    the two writes, so its name counts as free.
    """
    candidate = target
    n = 0
    while candidate.exists() and not _same_bytes(source, candidate):
        n += 1
        candidate = target.with_name(f"{target.stem}~{n}{target.suffix}")
    return candidate


def _same_bytes(a: Path, b: Path) -> bool:
    try:
        if a.stat().st_size != b.stat().st_size:
            return False
    except OSError:
        return False
    digest = file_sha256(a)
    return digest is not None and digest == file_sha256(b)


def move_durably(source: Path, target: Path) -> None:
    """Move a file so that, after a power cut, it is in one place or the other, never lost.

    The file is hard-linked into the target folder, renamed into place, and only then removed
    from the inbox; a crash in between leaves it in both places, and the inbox copy is simply
    triaged again (same case, same bytes). Not a rename out of the inbox: watchdog holds every
    "moved out" event for half a second waiting for its pair, and all the inbox's later events
    wait behind it, so a busy inbox would be seen late. Where links are impossible (another
    filesystem, a share without them) the bytes are copied and fsynced under a temporary name.

    A file put in the source's place meanwhile (a scanner re-sending the instance, renamed over
    it) is left where it is for the next pass: only the file that was moved is removed.
    """
    moved = source.stat()
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial")
    try:
        os.link(source, tmp)
    except OSError as err:
        if err.errno == errno.ENOENT:
            raise
        shutil.copyfile(source, tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    try:
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(target.parent)
    if not _is_same_file(source, moved):
        log.info("a new file took the place of one just filed: left for the next pass")
        return
    source.unlink()
    fsync_dir(source.parent)


def _is_same_file(path: Path, seen: os.stat_result) -> bool:
    try:
        now = path.stat()
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (seen.st_dev, seen.st_ino)
