"""Files that arrive on their own (watch folder, DICOM receiver): triaged, recorded, filed.

Each file takes one path: triage in a worker process → outcome in the case store (and an
escalated case in the outbox) → JSON sidecar → the file itself moved to ``done/`` or to
``quarantine/<error_code>/``. The move comes last, so a crash anywhere leaves the file in the
inbox and it is simply triaged again on restart; the case store is idempotent on the case id,
so that second pass adds a ``reprocessed`` history row, never a second case. An input is never
removed before its outcome is durably recorded.

The watch service and the receiver differ only in how they decide that a file is ready; both
hand it to an :class:`Intake`.

One intake per inbox: it holds an ``flock`` on the inbox folder for its lifetime, so a second
service (or an admin's ``watch --once``) on the same inbox refuses to start instead of triaging
every file twice and racing to move it. A file that changes or disappears while it is triaged
is not filed with a result for bytes that are no longer there: it is left for the next pass
(or forgotten); a failure to record or file an outcome leaves the file in the inbox for a retry
after a back-off. A file the service may not take out of the inbox (no write permission on its
folder) is a problem of that file alone: it stays, logged once, and is tried again on its own
while the other files go on. Log lines never name a file: inbox file names often carry patient
names.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from triage_app.batch import TriagePool, record_outcome, worker_crashed_input
from triage_app.config import Settings
from triage_app.errors import InboxInUseError, TriageError
from triage_app.escalation.queueing import EscalationQueue
from triage_app.inputs import file_sha256
from triage_app.ordered_pool import MAX_WORKER_CRASHES
from triage_app.paths import (
    ensure_private_dir,
    fsync_dir,
    lock_folder,
    remove_abandoned_temps,
    temp_path,
    write_locked_temp,
    write_private_file,
)
from triage_app.pipeline import PipelineConfig
from triage_app.results import FailedInput, InputOutcome, portable_text
from triage_app.states import CaseState
from triage_app.store import CaseStore

log = logging.getLogger(__name__)

_V = TypeVar("_V")

# Outcomes that mean "not all there yet" while a writer may still be busy (watch folder only). A
# file cut just before its pixel data reads as a whole header without pixels: no_pixel_data.
INCOMPLETE_CODES = frozenset({"truncated", "empty_file", "no_pixel_data"})
BACKLOG_PER_WORKER = 2
SIDECAR_SUFFIX = ".json"
REASON_SUFFIX = ".reason.json"
# A file being moved into done/ or quarantine/ lives under a temporary name for this final name
# (``.<name>.partial.<hex>.tmp``) until it is renamed into place: see move_durably.
PARTIAL_SUFFIX = ".partial"
# After a failure to record or file an outcome (the case store busy beyond its timeout, a full
# disk), no file is handed over for this long, doubling up to the cap while failures go on.
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 60.0
# A file that cannot be taken out of the inbox waits this long before its next try, doubling up
# to the cap while it stays stuck; the other files are not held up meanwhile.
STUCK_RETRY_FIRST_S = 5.0
STUCK_RETRY_MAX_S = 300.0
# What a move out of the inbox fails with when this user may not change the file's folder.
_STUCK_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
_TAKEN_OUT_REFUSED = "the file cannot be taken out of its folder"
# Permissions are checked as the kernel does for a move: for the effective user.
_EFFECTIVE_IDS = os.access in os.supports_effective_ids


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
        """Remove the temporary files a kill left behind: sidecars between their write and
        rename, and files :func:`move_durably` had linked or copied but not renamed into place.

        Nothing else would: they are hidden, and no later write reuses their random names.
        Only in the folders the intake files into (``done/`` and ``quarantine/<code>/``, with
        the inbox's sub-folders below them), only the intake's own temporary names, and never
        one another process is writing now (its writer holds the lock). Returns how many went.
        """
        roots = [self.done, *(p for p in self.quarantine.iterdir() if _is_real_dir(p))]
        removed = sum(
            remove_abandoned_temps(
                root,
                for_suffixes=(SIDECAR_SUFFIX, REASON_SUFFIX, PARTIAL_SUFFIX),
                recursive=True,
            )
            for root in roots
        )
        if removed:
            log.info("removed %d temporary file(s) left by an interrupted run", removed)
        return removed


@dataclass(frozen=True)
class FileIdentity:
    """Which version of a file this is: the same inode, size and modification time.

    Taken from the directory entry itself (``lstat``): what the intake moves is the entry, so a
    symbolic link is one version for as long as the link is unchanged.
    """

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, status: os.stat_result) -> FileIdentity:
        return cls(status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)

    @classmethod
    def read(cls, path: Path) -> FileIdentity:
        return cls.of(os.lstat(path))


class Unfiled(StrEnum):
    """Why a file handed over was not filed; each time, the file is not moved."""

    #: Looked cut short while its writer may still be busy; nothing recorded. Offer it again
    #: once it has settled again.
    INCOMPLETE = "incomplete"
    #: Replaced or rewritten while it was triaged: the outcome is for bytes no longer there and
    #: is not filed. Offer the file again, as a new one.
    CHANGED = "changed"
    #: Removed from the inbox while it was triaged: nothing left to file.
    GONE = "gone"
    #: Recording the outcome or moving the file failed (the case store busy beyond its timeout,
    #: a full disk); the file stays in the inbox. Offer it again: the intake takes no file
    #: until its back-off is over (``room`` is 0 meanwhile).
    RETRY = "retry"
    #: The file cannot be taken out of the inbox (no write permission on its folder, a
    #: read-only share): a problem of this file alone, so nothing else waits. It stays, with
    #: nothing left in done/ or quarantine/ for it; offer it again once its own wait is over
    #: (:meth:`Intake.is_waiting`).
    STUCK = "stuck"


@dataclass(frozen=True)
class FiledOutcome:
    """One file done with: its outcome and where the file now lives.

    ``filed_as`` is None when the file was not filed, and ``unfiled`` then says why and what
    the caller should do with it.
    """

    source: Path
    outcome: InputOutcome
    filed_as: Path | None
    submitted_at: float  # time.monotonic() when the file was handed over
    finished_at: float
    unfiled: Unfiled | None = None
    #: For ``Unfiled.RETRY`` and ``Unfiled.STUCK``: what failed, as a stable error code
    #: (``store_error``) or an errno name (``ENOSPC``), for the failure counter's label; never a
    #: message, which can quote a file name.
    retry_code: str | None = None

    @property
    def deferred(self) -> bool:
        """Cut short while its writer may be busy: stays in the inbox, offered again later."""
        return self.unfiled is Unfiled.INCOMPLETE

    @property
    def quarantined(self) -> bool:
        return self.unfiled is None and isinstance(self.outcome, FailedInput)


@dataclass(frozen=True)
class _HandOver:
    at: float  # time.monotonic()
    identity: FileIdentity


@dataclass(frozen=True)
class _Stuck:
    """A file's own wait before it is tried again, after it could not leave the inbox."""

    delay_s: float
    until: float  # time.monotonic()


class StuckInInboxError(OSError):
    """The file cannot be taken out of its folder (no write permission there): a problem of this
    one file, not of the filing. Nothing was moved. Carries the errno of the refusal."""


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
        self.layout = layout
        self._queue = queue or (lambda: None)
        self._incomplete_timeout_s = incomplete_timeout_s
        with contextlib.ExitStack() as undo:
            # First: a second intake must not even clean up behind the first one.
            self._inbox_lock = _lock_inbox(layout.inbox)
            undo.callback(self._release_inbox)
            layout.remove_crash_leftovers()
            self._store = CaseStore.open(settings.case_store_path)
            undo.callback(self._store.close)
            self._pool = pool or TriagePool(
                PipelineConfig.from_settings(settings), workers=settings.workers
            )
            undo.pop_all()
        self._lock = threading.Lock()
        self._futures: dict[Future[InputOutcome], Path] = {}
        self._file_timeout_s = float(settings.file_timeout_s)
        # When each future was first seen running (collect() looks): one past the time limit
        # is a worker stuck on its file, stopped like a crash (see _stop_stuck_workers).
        self._running_since: dict[Future[InputOutcome], float] = {}
        self._pending: dict[Path, _HandOver] = {}
        self._crashes: dict[Path, int] = {}  # kept across hand-overs until the file is filed
        # Taken but not yet given to the pool: files wait here while the files that were in
        # flight at a worker crash (the suspects) are tried again one at a time.
        self._held: list[Path] = []
        self._suspects: set[Path] = set()
        self._closed = False
        self._retry_delay_s = 0.0  # the current back-off; 0 while filing works
        self._paused_until = 0.0  # time.monotonic() before which no file is taken
        # Per file, until it is filed or gone (one line each, not one per try): the files that
        # could not leave the inbox, and the cut-short ones waited for (their error code).
        self._stuck: dict[Path, _Stuck] = {}
        self._cut_short: dict[Path, str] = {}

    # --- hand-over ------------------------------------------------------------------------------

    def submit(self, paths: Iterable[Path]) -> int:
        """Hand files over for triage; files already being triaged, or gone, are skipped.
        Returns how many were taken.

        Each file's identity is noted now, so that at filing a file replaced or rewritten
        meanwhile is told from the one that was read.
        """
        handed: list[tuple[Path, FileIdentity]] = []
        for path in paths:
            self.layout.relative(path)  # a file outside the inbox is a programming error
            try:
                handed.append((path, FileIdentity.read(path)))
            except FileNotFoundError:
                continue  # gone before it was taken: nothing to do
            except OSError as err:
                log.warning("skipped a file that cannot be examined (%s)", _why(err))
        taken = 0
        with self._lock:
            if self._closed:
                return 0
            for path, identity in handed:
                if path in self._pending:
                    continue
                self._pending[path] = _HandOver(time.monotonic(), identity)
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
        busy, and a stop waits for only those few (the rest stay where they are). None while
        backing off after a failure to record or file an outcome."""
        with self._lock:
            if time.monotonic() < self._paused_until:
                return 0
        return max(0, BACKLOG_PER_WORKER * self._pool.workers - self.in_flight)

    def is_in_flight(self, path: Path) -> bool:
        with self._lock:
            return path in self._pending

    def is_waiting(self, path: Path) -> bool:
        """Whether ``path`` could not be taken out of the inbox and its own wait before the
        next try is not over yet: offer it only once it is (the other files need not wait)."""
        with self._lock:
            stuck = self._stuck.get(path)
        return stuck is not None and time.monotonic() < stuck.until

    def held_case_ids(self) -> list[str]:
        """The cases still held for escalation: ``held_release`` triages their filed images
        again, so the retention of ``done/`` keeps them. From the intake's own thread."""
        return self._store.case_ids(CaseState.ESCALATION_HELD)

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
        self._stop_stuck_workers(futures, done)
        results: list[tuple[Path, InputOutcome]] = []
        crashed: list[Path] = []
        for future in done:
            with self._lock:
                path = self._futures.pop(future, None)
            if path is None:
                continue  # a future of a pool that broke and was replaced
            try:
                results.append((path, future.result()))
            except BrokenProcessPool:
                crashed.append(path)
        # The crashed files are taken back before anything is filed, so that nothing filing
        # runs into can leave one of them handed over with nothing working on it.
        filed = self._after_crash(crashed) if crashed else []
        filed.extend(self._file(path, outcome) for path, outcome in results)
        with self._lock:
            self._dispatch_locked()  # the next suspect, or the files held back for them
        return filed

    def _stop_stuck_workers(
        self, futures: list[Future[InputOutcome]], done: set[Future[InputOutcome]]
    ) -> None:
        """Kill the workers if a file has run longer than ``processing.file_timeout_s``.

        A decoder in an endless loop on a hostile file would otherwise hold its worker for
        ever while the service looks alive. Killing the workers breaks the pool, and its files
        take the crash path: tried again one at a time, the stuck one alone, until it is
        quarantined. A file queued behind it in the executor may look as long-running: it is
        only tried again.
        """
        now = time.monotonic()
        running = {f for f in futures if f not in done and f.running()}
        self._running_since = {f: self._running_since.get(f, now) for f in running}
        if any(now - since > self._file_timeout_s for since in self._running_since.values()):
            log.error(
                "a file ran over the %g s time limit in its triage worker; stopping the workers",
                self._file_timeout_s,
            )
            self._running_since.clear()
            self._pool.stop_workers()

    def drain(self) -> list[FiledOutcome]:
        """Wait for every file handed over so far and file it.

        Loops only while a file is in a worker or waiting for one: that is what can still
        finish, so a broken hand-over can never keep it waiting for ever.
        """
        filed: list[FiledOutcome] = []
        while True:
            with self._lock:
                if not (self._futures or self._held):
                    return filed
            filed.extend(self.collect(timeout_s=1.0))

    def close(self) -> list[FiledOutcome]:
        """Take no more files, finish the ones in flight, stop the workers, free the inbox."""
        with self._lock:
            self._closed = True
        try:
            return self.drain()
        finally:
            try:
                self._pool.close()
                self._store.close()
            finally:
                self._release_inbox()

    def _release_inbox(self) -> None:
        fd, self._inbox_lock = self._inbox_lock, None
        if fd is not None:
            os.close(fd)

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
        """Record the outcome and move the file; never raises for what the file system or the
        case store does, so one file never stops the service (see :class:`Unfiled`)."""
        handed = self._forget(path)

        def unfiled(
            why: Unfiled,
            reported: InputOutcome = outcome,
            *,
            failure: TriageError | OSError | None = None,
        ) -> FiledOutcome:
            if why in (Unfiled.CHANGED, Unfiled.GONE):
                self._crashes.pop(path, None)  # those crashes were another file's
            if why is Unfiled.GONE:
                self._done_with(path, filed=False)
            code = None if failure is None else _why(failure)
            return FiledOutcome(
                path, reported, None, handed.at, time.monotonic(), unfiled=why, retry_code=code
            )

        try:
            now = FileIdentity.read(path)
        except FileNotFoundError:
            log.info("a file was removed from the inbox while it was triaged: nothing recorded")
            return unfiled(Unfiled.GONE)
        except OSError as err:
            self._failed_to_file(err)
            return unfiled(Unfiled.RETRY, failure=err)
        if now != handed.identity:
            log.info("a file changed while it was triaged: it will be triaged again")
            return unfiled(Unfiled.CHANGED)
        if isinstance(outcome, FailedInput) and self._still_being_written(outcome, path):
            self._wait_for_writer(path, outcome.code)
            return unfiled(Unfiled.INCOMPLETE)
        # Checked before anything is recorded or written: such a file would only be recorded
        # again at each try, and leave a note in done/ or quarantine/ without its file.
        refused = _cannot_take_out(path)
        if refused is not None:
            self._stuck_in_inbox(path, refused)
            return unfiled(Unfiled.STUCK, failure=refused)
        recorded = outcome
        try:
            # The record names where the file will live, so the store and the GUI can find it
            # (and a held case's release can triage it again): a name that is not UTF-8 is
            # filed under its portable form, the one the record can hold.
            relative = Path(portable_text(str(self.layout.relative(path))))
            if isinstance(outcome, FailedInput):
                target = _free_name(path, self.layout.quarantine / outcome.code / relative)
            else:
                target = _free_name(path, self.layout.done / relative)
            recorded = record_outcome(
                self._store, replace(outcome, path=str(target)), queue=self._queue()
            )
            if isinstance(recorded, FailedInput):
                moved = self._quarantine(path, target, recorded, handed.identity)
            else:
                moved = _file_with_note(
                    path, target, SIDECAR_SUFFIX, recorded.to_json(), handed.identity
                )
        except StuckInInboxError as err:
            # Refused at the move all the same (an immutable file, a sticky folder): recorded,
            # which the next try does again (idempotent), but still this file's problem only.
            self._stuck_in_inbox(path, err)
            return unfiled(Unfiled.STUCK, recorded, failure=err)
        except (TriageError, OSError) as err:
            self._failed_to_file(err)
            return unfiled(Unfiled.RETRY, failure=err)
        with self._lock:
            self._retry_delay_s = 0.0
        if not moved:
            # Replaced or removed in the instant between the check above and the move.
            if os.path.lexists(path):
                log.info("a file changed while it was filed: it will be triaged again")
                return unfiled(Unfiled.CHANGED, recorded)
            log.info("a file was removed from the inbox while it was filed: not filed")
            return unfiled(Unfiled.GONE, recorded)
        self._crashes.pop(path, None)
        self._done_with(path, filed=True)
        return FiledOutcome(path, recorded, target, handed.at, time.monotonic())

    def _stuck_in_inbox(self, path: Path, err: OSError) -> None:
        """Give a file that cannot leave the inbox a wait of its own; log it once per file.

        Not the intake's back-off: the store and the other folders work, and the other files
        must not wait behind this one.
        """
        with self._lock:
            before = self._stuck.get(path)
            delay = STUCK_RETRY_FIRST_S if before is None else 2 * before.delay_s
            delay = min(STUCK_RETRY_MAX_S, delay)
            if before is None:
                _drop_missing(self._stuck)
            self._stuck[path] = _Stuck(delay, time.monotonic() + delay)
        if before is None:
            fix = (
                "make it readable by the service user (unread, it cannot be moved to another "
                "file system)"
                if err.errno == errno.EXDEV
                else "check that the service user may change its folder"
            )
            log.warning(
                "a file cannot be taken out of the inbox (%s): %s; it stays there and is "
                "tried again on its own, at most every %g s, while the other files go on",
                _why(err),
                fix,
                STUCK_RETRY_MAX_S,
            )
        else:
            log.debug("a file still cannot be taken out of the inbox (%s)", _why(err))

    def _wait_for_writer(self, path: Path, code: str) -> None:
        """Say once per file that a cut-short file is waited for (it is read again each time it
        settles, every few seconds, until the wait is over)."""
        with self._lock:
            if path in self._cut_short:
                first = False
            else:
                first = True
                _drop_missing(self._cut_short)
                self._cut_short[path] = code
        if first:
            log.info(
                "a file is cut short (%s) and may still be being written: it is read again "
                "as it settles, and quarantined if it stays so %g s after its last change",
                code,
                self._incomplete_timeout_s,
            )

    def _done_with(self, path: Path, *, filed: bool) -> None:
        """The file is filed or gone: forget its waits."""
        with self._lock:
            stuck = self._stuck.pop(path, None)
            self._cut_short.pop(path, None)
        if stuck is not None and filed:
            log.info("a file that could not be taken out of the inbox before is filed now")

    def _failed_to_file(self, err: TriageError | OSError) -> None:
        """Log a failure to record or file an outcome, and back off before taking more."""
        with self._lock:
            delay = min(RETRY_MAX_S, max(RETRY_FIRST_S, 2 * self._retry_delay_s))
            self._retry_delay_s = delay
            self._paused_until = time.monotonic() + delay
        log.error(
            "could not record or file a triaged file (%s): it stays in the inbox; "
            "no more files are taken for %g s",
            _why(err),
            delay,
        )

    def _still_being_written(self, outcome: InputOutcome, path: Path) -> bool:
        """A cut-short file changed within the incomplete timeout may still be growing.

        Judged by the file's modification time, not by when this process first saw it, so a
        restart does not start the wait again.
        """
        if not isinstance(outcome, FailedInput) or outcome.code not in INCOMPLETE_CODES:
            return False
        try:
            age_s = time.time() - path.stat().st_mtime
        except OSError:
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
            filed.append(self._file(path, worker_crashed_input(path, crashes)))
        with self._lock:
            self._suspects.update(again)
            self._held[:0] = again
            self._dispatch_locked()
        return filed

    def _forget(self, path: Path) -> _HandOver:
        with self._lock:
            self._suspects.discard(path)
            return self._pending.pop(path)

    def _quarantine(
        self, path: Path, target: Path, failure: FailedInput, identity: FileIdentity
    ) -> bool:
        reason = {
            "code": failure.code,
            "message": failure.message,
            "source": portable_text(str(self.layout.relative(path))),
            "quarantined_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        moved = _file_with_note(path, target, REASON_SUFFIX, reason, identity)
        if not moved:
            return False
        with self._lock:
            waited = path in self._cut_short
        if waited:
            log.info(
                "a file still cut short when the %g s wait was over went to quarantine: %s",
                self._incomplete_timeout_s,
                failure.code,
            )
        else:
            log.info("a file went to quarantine: %s", failure.code)
        return True


def _lock_inbox(inbox: Path) -> int | None:
    """Hold the inbox for this intake: see the module's docstring."""
    try:
        fd = lock_folder(inbox)
    except BlockingIOError:
        raise InboxInUseError(
            "another service (or a watch --once) is already taking files from this inbox; "
            "stop it first, or give this one another inbox"
        ) from None
    if fd is None:
        log.warning(
            "the inbox's file system has no locks: make sure no other service takes files "
            "from the same inbox"
        )
    return fd


def _why(err: TriageError | OSError) -> str:
    """A failure in a log line: its stable code or errno name, never its text, which can
    quote a file name (PHI)."""
    if isinstance(err, TriageError):
        return err.code
    return errno.errorcode.get(err.errno or 0, type(err).__name__)


def _file_with_note(
    path: Path,
    target: Path,
    suffix: str,
    note: Mapping[str, object],
    identity: FileIdentity,
) -> bool:
    """Write the JSON note next to ``target``, then move the file there (the move is last).

    Returns False when the file was not moved because it is no longer the ``identity`` that
    was triaged (or gone); its note goes too, as it does when the move fails, unless a twin
    already sits at ``target`` (the note is then the twin's, and right for it).
    """
    ensure_private_dir(target.parent)
    text = json.dumps(note, indent=2, sort_keys=True) + "\n"
    note_path = target.with_name(target.name + suffix)
    write_private_file(note_path, text.encode(), sync_folder=False)
    try:
        if move_durably(path, target, expected=identity):
            return True
    except BaseException:
        if not os.path.lexists(target):
            with contextlib.suppress(OSError):
                note_path.unlink(missing_ok=True)
        raise
    if not os.path.lexists(target):
        note_path.unlink(missing_ok=True)
    return False


def _drop_missing(entries: dict[Path, _V]) -> None:
    """Forget the files no longer there (removed while waiting, never handed over again)."""
    for path in [p for p in entries if not os.path.lexists(p)]:
        del entries[path]


def _cannot_take_out(path: Path) -> StuckInInboxError | None:
    """Why this user may not take ``path`` out of its folder, or None when it may, as far as
    can be told without trying (an immutable file refuses only at the move:
    :func:`move_durably` raises :class:`StuckInInboxError` then).

    Taking a file out changes its folder, not the file: what counts is write permission on
    the folder, whatever the file's own mode, and in a sticky folder (``/tmp``'s mode, a shared
    drop folder) owning the file or the folder.
    """
    folder = path.parent
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
        folder_status = folder.stat()
        owner = os.lstat(path).st_uid
    except OSError:
        return None  # the move will tell
    if read_only:
        return StuckInInboxError(errno.EROFS, "the inbox is on a read-only file system")
    if not os.access(folder, os.W_OK | os.X_OK, effective_ids=_EFFECTIVE_IDS):
        return StuckInInboxError(errno.EACCES, "no write permission on the file's folder")
    me = os.geteuid()
    if folder_status.st_mode & stat.S_ISVTX and me not in (0, owner, folder_status.st_uid):
        return StuckInInboxError(errno.EPERM, "a sticky folder, and another user's file")
    return None


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


def move_durably(source: Path, target: Path, *, expected: FileIdentity | None = None) -> bool:
    """Move a file so that, after a power cut, it is in one place or the other, never lost.

    The file is hard-linked into the target folder, renamed into place, and only then removed
    from the inbox; a crash in between leaves it in both places, and the inbox copy is simply
    triaged again (same case, same bytes). Not a rename out of the inbox: watchdog holds every
    "moved out" event for half a second waiting for its pair, and all the inbox's later events
    wait behind it, so a busy inbox would be seen late. Where links are impossible (another
    filesystem, a share without them) the bytes are copied and fsynced. A file this user may
    not read can be neither linked (the kernel's protected hard links) nor copied: it is
    renamed, which needs write permission on the two folders only (see
    :func:`_rename_unreadable`).

    Until it is renamed into place, the link or copy has a temporary name the start-up clean-up
    knows (:meth:`IntakeLayout.remove_crash_leftovers`), and it is locked from its first
    instant while this process works on it (a link shares the lock of the inode it names), so
    the clean-up removes a killed mover's leftover, never a live one's.

    Returns False, having moved nothing, when ``source`` is gone or is no longer the
    ``expected`` version (replaced or rewritten since it was triaged): it stays for the next
    pass. A file put in the source's place after the move (a scanner re-sending the instance,
    renamed over it) is left where it is too: only the file that was moved is removed. Raises
    :class:`StuckInInboxError`, having moved nothing, when the source may not be taken out of its
    folder.
    """
    try:
        entry = os.lstat(source)
    except FileNotFoundError:
        return False
    if expected is not None and FileIdentity.of(entry) != expected:
        return False
    with contextlib.ExitStack() as held:
        fd = None
        if stat.S_ISREG(entry.st_mode):
            # A symbolic link or special file is moved as it is, unlocked: the clean-up never
            # removes those anyway.
            try:
                fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                return False
            except PermissionError:
                return _rename_unreadable(source, target, entry)
            held.callback(os.close, fd)
            if not _same_inode(os.fstat(fd), entry):
                return False  # replaced in the instant since it was examined
            # Failing means someone else holds this inode's lock, or there are no locks here:
            # either way the clean-up cannot take it, which is all the lock is for.
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        tmp = _stage(source, target, entry, fd, held)
        if tmp is None:
            return False
        took_free_name = not os.path.lexists(target)
        try:
            placed = os.lstat(tmp)
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)  # (its lock goes only after this, with ``held``)
    fsync_dir(target.parent)
    if not _is_same_file(source, entry):
        log.info("a new file took the place of one just filed: left for the next pass")
        return True
    try:
        source.unlink(missing_ok=True)
    except OSError as err:
        if err.errno not in _STUCK_ERRNOS:
            raise
        # Undone, so that the file is in one place, not filed while it stays in the inbox
        # (a twin's place is left as it was: its own file has the same bytes).
        if took_free_name and _is_same_file(target, placed):
            target.unlink()
            fsync_dir(target.parent)
        raise StuckInInboxError(err.errno, _TAKEN_OUT_REFUSED) from None
    fsync_dir(source.parent)
    return True


def _rename_unreadable(source: Path, target: Path, entry: os.stat_result) -> bool:
    """Move a file this user may not read: a rename, durable once both folders are synced.

    Neither linked nor copied, so no temporary name and no lock: nothing for the start-up
    clean-up to mistake. Seen by watchdog as a move out of the inbox (its later events wait
    half a second for a pair), which such rare files can afford. A file renamed over the
    source in the instant since it was examined would be moved in its place: it is put back
    (unless yet another took the source's name meanwhile: then it stays, with a warning).
    """
    try:
        source.replace(target)
    except FileNotFoundError:
        if not os.path.lexists(source):
            return False
        raise  # the target folder is missing
    except OSError as err:
        # The refusal is the source folder's unless the target folder is not writable
        # either (a filing problem, for every file alike). Across file systems a file that
        # cannot be read cannot be moved at all.
        writable = os.access(target.parent, os.W_OK | os.X_OK, effective_ids=_EFFECTIVE_IDS)
        if err.errno == errno.EXDEV or (err.errno in _STUCK_ERRNOS and writable):
            raise StuckInInboxError(err.errno, _TAKEN_OUT_REFUSED) from None
        raise
    if not _is_same_file(target, entry):
        if os.path.lexists(source):
            log.warning("a file put in the place of one being filed was moved with it: it stays")
        else:
            target.replace(source)
        fsync_dir(target.parent)
        fsync_dir(source.parent)
        return False
    fsync_dir(target.parent)
    fsync_dir(source.parent)
    return True


def _stage(
    source: Path,
    target: Path,
    entry: os.stat_result,
    fd: int | None,
    held: contextlib.ExitStack,
) -> Path | None:
    """Link (or copy) ``source`` beside ``target`` under a temporary name; None when the
    source went or was replaced meanwhile. Locks a copy until ``held`` closes."""
    name = target.name + PARTIAL_SUFFIX
    while True:
        tmp = temp_path(target.parent, name)
        try:
            os.link(source, tmp)
        except FileExistsError:
            continue  # a random name taken: draw another
        except OSError as err:
            if err.errno != errno.ENOENT:
                break  # no links here: copy
            if not os.path.lexists(source):
                return None
            raise  # the target folder is missing
        if _same_inode(os.lstat(tmp), entry):
            return tmp
        tmp.unlink()  # the name pointed to a new file by the time it was linked
        return None
    tmp, copy_fd = write_locked_temp(target.parent, name, b"")
    held.callback(os.close, copy_fd)
    try:
        if fd is None:
            shutil.copyfile(source, tmp)
        else:
            with open(fd, "rb", closefd=False) as src, open(copy_fd, "wb", closefd=False) as dst:
                shutil.copyfileobj(src, dst)
        os.fsync(copy_fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _same_inode(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _is_same_file(path: Path, seen: os.stat_result) -> bool:
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    return _same_inode(now, seen)
