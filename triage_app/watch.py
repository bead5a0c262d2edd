"""The watch-folder service: images a scanner or a share drops in the inbox are triaged.

A file is handed over only once it has settled: its size and modification time unchanged for
``watch.settle_s`` (a scanner or a share copy may still be writing). Change events (watchdog)
make that fast; a periodic full rescan catches files whose events a network share dropped. A
settled file that still parses as cut short is read again later, and quarantined as truncated
only after ``watch.incomplete_timeout_s``.

Nothing one inbox entry does stops the service: an entry that cannot be followed (a symbolic
link loop, a target it may not read) settles as the entry itself and is quarantined as
``unreadable``, and so is a file the service user may not read; one it cannot even examine is
skipped, with one path-free warning, and one it may not take out of the inbox (no write
permission on its folder) waits on its own schedule (see ``Unfiled.STUCK``) while the other
files go on. A folder it may not list or enter hides its files from the service: it is said
once (without its name), counted in the summary, and looked at again on every rescan.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from triage_app.config import Settings
from triage_app.escalation.queueing import EscalationQueue
from triage_app.intake import FiledOutcome, Intake, IntakeLayout, Unfiled
from triage_app.metrics import CheckResult, Health
from triage_app.paths import user_name
from triage_app.results import HELD, CaseResult
from triage_app.retention import DoneRetention, ResealCases

log = logging.getLogger(__name__)

# Names a writer uses while a file is not finished yet (rsync, browsers, scanners, editors).
_UNFINISHED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".filepart", "~")


def is_candidate(name: str) -> bool:
    """Whether a file name can be an image to triage (not hidden, not a writer's temp file)."""
    return not name.startswith(".") and not name.lower().endswith(_UNFINISHED_SUFFIXES)


@dataclass(frozen=True)
class _Signature:
    size: int
    mtime_ns: int


class SettleTracker:
    """Which files in the inbox have stopped changing. Thread-safe: events arrive on the
    observer's thread, the service loop asks for settled files on its own."""

    def __init__(
        self,
        settle_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._settle_s = settle_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        # path → (last signature seen, since when it has been seen unchanged); None: not stat-ed
        self._seen: dict[Path, tuple[_Signature, float] | None] = {}
        # path → clock() when first noted, until the file is filed or gone: its arrival, which
        # its modification time is not (a copy may keep the scanner's, years old).
        self._first_seen: dict[Path, float] = {}
        self._unusable: set[Path] = set()  # warned about once; retried on every rescan

    def note(self, path: Path) -> None:
        """A file appeared or changed: track it (again) from now."""
        if is_candidate(path.name):
            with self._lock:
                self._seen[path] = None
                self._first_seen.setdefault(path, self._clock())

    def arrived(self, path: Path) -> float | None:
        """When ``path`` was first noted (a ``clock()`` time), forgotten from now on: call it
        when the file is filed or gone."""
        with self._lock:
            return self._first_seen.pop(path, None)

    def defer(self, path: Path) -> None:
        """A settled file turned out cut short: track it again, ready only once it has stayed
        unchanged for another full settle time (``note`` would find its modification time old
        and hand it over again at once, every tick)."""
        try:
            stat = _entry_stat(path)
        except OSError:
            return  # gone, or unusable: the next rescan finds it again if it is still there
        with self._lock:
            self._seen[path] = (_Signature(stat.st_size, stat.st_mtime_ns), self._clock())

    def forget(self, path: Path) -> None:
        """Stop tracking ``path`` (a one-off run leaves it for the next)."""
        with self._lock:
            self._seen.pop(path, None)
            self._first_seen.pop(path, None)

    def note_all(self, paths: Iterator[Path]) -> None:
        now = self._clock()
        with self._lock:
            for path in paths:
                self._seen.setdefault(path, None)
                self._first_seen.setdefault(path, now)

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)

    def settled(self, limit: int, skip: Callable[[Path], bool]) -> list[Path]:
        """Up to ``limit`` settled files, no longer tracked; the rest stay tracked.

        A file seen for the first time has been unchanged since its modification time: one
        older than the settle time counts as settled at once (a restart or ``--once`` need not
        wait), a younger one waits only the rest; a file that is gone is forgotten.
        """
        now = self._clock()
        with self._lock:
            paths = list(self._seen)
        ready: list[Path] = []
        for path in paths:
            if len(ready) >= limit:
                break
            if skip(path):
                continue
            try:
                stat = _entry_stat(path)
            except OSError as err:
                with self._lock:
                    self._seen.pop(path, None)
                    self._first_seen.pop(path, None)
                if not isinstance(err, FileNotFoundError):
                    self._skip_unusable(path, err)
                continue
            self._unusable.discard(path)
            signature = _Signature(stat.st_size, stat.st_mtime_ns)
            with self._lock:
                previous = self._seen.get(path)
                if previous is None:
                    # Unchanged since its modification time: that time counts (up to the
                    # settle time), so a late event (watchdog holds every event behind a
                    # move out of the inbox for up to 0.5 s) does not add to the wait.
                    age = self._wall_clock() - stat.st_mtime_ns / 1e9
                    since = now - min(max(age, 0.0), self._settle_s)
                elif previous[0] != signature:
                    since = now
                else:
                    since = previous[1]
                if now - since >= self._settle_s:
                    del self._seen[path]
                    ready.append(path)
                else:
                    self._seen[path] = (signature, since)
        return ready

    def _skip_unusable(self, path: Path, err: OSError) -> None:
        if path in self._unusable:
            return
        self._unusable.add(path)
        log.warning(
            "an entry in the inbox cannot be examined (%s): skipped while that lasts",
            errno.errorcode.get(err.errno or 0, type(err).__name__),
        )


def _entry_stat(path: Path) -> os.stat_result:
    """The file's status; for an entry that cannot be followed (a symbolic link loop, a target
    it may not read), the entry's own, so it settles like any file and the intake quarantines
    it as ``unreadable`` instead of it stopping the service. Raises ``OSError`` when even the
    entry cannot be examined, ``FileNotFoundError`` when it is gone (a dangling link counts as
    gone: there is nothing to read)."""
    try:
        return path.stat()
    except FileNotFoundError:
        raise
    except OSError:
        return path.lstat()


def inbox_files(
    inbox: Path, *, unreadable: Callable[[Path, OSError], object] | None = None
) -> Iterator[Path]:
    """Every candidate file under ``inbox`` (recursively); symlinks are not followed.

    A folder that cannot be listed, or listed but not entered (its files could not even be
    examined), goes to ``unreadable`` with the error, its contents left out: ``os.walk`` alone
    skips such a folder without a word, and its images were never triaged.
    """

    def not_listed(err: OSError) -> None:
        if unreadable is None or err.filename is None:
            return
        folder = Path(os.fsdecode(err.filename))
        gone = isinstance(err, FileNotFoundError | NotADirectoryError)
        if not gone or folder == inbox:  # a folder removed since its parent was listed: fine
            unreadable(folder, err)

    for root, dirs, files in os.walk(inbox, onerror=not_listed):
        if files or dirs:
            try:  # an entry's own status needs search (x) permission on the folder
                (Path(root) / (files or dirs)[0]).lstat()
            except FileNotFoundError:
                pass  # gone since the folder was listed
            except OSError as err:
                if unreadable is not None:
                    unreadable(Path(root), err)
                dirs[:] = []
                continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if is_candidate(name):
                yield Path(root) / name


class UnreadableFolders:
    """Folders in the inbox the service may not list or enter, as of the last full scan.

    Their files cannot even be seen, so each folder is said once (a WARNING without its name:
    folder names can be patient names) until it can be read again (then once, at INFO); the
    scans keep looking at it. Thread-safe: health may ask for the count.
    """

    def __init__(self, inbox: Path, *, rescan_s: float | None) -> None:
        self._inbox = inbox
        self._rescan_s = rescan_s  # None: a one-off run, which looks again only if it lasts
        self._lock = threading.Lock()
        self._folders: set[Path] = set()

    def __len__(self) -> int:
        with self._lock:
            return len(self._folders)

    def health(self) -> CheckResult:
        """Degraded while folders cannot be read: the service works and nothing is lost, but
        their files wait for a person to fix the permissions, and on an unattended machine
        health is where anyone looks."""
        count = len(self)
        if count:
            plural = "s" if count > 1 else ""
            return CheckResult(Health.DEGRADED, f"{count} folder{plural} it may not read")
        return CheckResult(Health.OK, "every folder readable")

    def update(self, found: Mapping[Path, OSError]) -> None:
        """The folders one full scan could not read, with why."""
        with self._lock:
            before, self._folders = self._folders, set(found)
        for folder, err in found.items():
            if folder not in before:
                self._warn(folder, err)
        for folder in before - found.keys():
            if any(folder.is_relative_to(other) for other in found):
                continue  # now inside one that cannot be read: that one is said
            if os.path.lexists(folder):
                log.info(
                    "a folder in the inbox that could not be read can be read now: its files "
                    "are triaged"
                )
            else:
                log.info("a folder in the inbox that could not be read is no longer there")

    def _warn(self, folder: Path, err: OSError) -> None:
        what = "the inbox" if folder == self._inbox else "a folder in the inbox"
        why = errno.errorcode.get(err.errno or 0, type(err).__name__)
        again = (
            f"looked at again every {self._rescan_s:g} s"
            if self._rescan_s is not None
            else "this run counts it in its summary"
        )
        if err.errno not in (errno.EACCES, errno.EPERM):
            log.warning(
                "%s (%s) cannot be read (%s): the files in it are not triaged while that lasts; %s",
                what,
                self._inbox,
                why,
                again,
            )
            return
        user = user_name(os.geteuid())
        log.warning(
            "%s (%s) cannot be read (%s): the files in it are not triaged until %s, the user "
            "the service runs as, may list and enter it (read and execute permission: give it "
            "to %s, or chmod it); %s. To find it, as %s: find %s -type d ! -readable -o -type d "
            "! -executable",
            what,
            self._inbox,
            why,
            user,
            user,
            again,
            user,
            self._inbox,
        )


class _InboxEvents(FileSystemEventHandler):
    def __init__(self, tracker: SettleTracker) -> None:
        self._tracker = tracker

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type in {"deleted", "opened", "closed_no_write"}:
            return
        target = getattr(event, "dest_path", "") or event.src_path
        self._tracker.note(Path(os.fsdecode(target)))


@dataclass
class WatchSummary:
    """What one run of the service did (``--once`` prints it)."""

    triaged: int = 0
    quarantined: int = 0
    left_incomplete: int = 0
    left_stuck: int = 0  # could not be taken out of the inbox: left for the next run
    # Folders in the inbox it may not list or enter, at the end of the run: their files were
    # not even seen, let alone triaged.
    left_unreadable: int = 0
    # Of the triaged: escalations kept on the device, not in the outbox (no central server or
    # its keys, or the outbox full); counted apart so that nobody takes them for sent.
    held: int = 0

    def line(self, *, central_server: bool) -> str:
        """The run in one line; only what is not zero beyond the first counts."""
        stuck = (
            f", {self.left_stuck} left in the inbox (cannot be moved out of it: see the log)"
            if self.left_stuck
            else ""
        )
        folders = "1 folder" if self.left_unreadable == 1 else f"{self.left_unreadable} folders"
        unreadable = (
            f", {folders} in the inbox it may not read (files not triaged: see the log)"
            if self.left_unreadable
            else ""
        )
        # Without a central server there is nothing to release them to: say what is missing.
        where = (
            "see queue release" if central_server else "no central server: escalation.central_url"
        )
        held = f", {self.held} held on the device ({where})" if self.held else ""
        return (
            f"{self.triaged} triaged, {self.quarantined} quarantined, "
            f"{self.left_incomplete} left in the inbox (still being written){stuck}{unreadable}"
            f"{held}"
        )

    @property
    def failed(self) -> bool:
        """Whether a one-off run failed some input (exit 1, as ``classify``). Held cases are
        no failure: triaged and recorded, they wait for the server as queued ones do. A folder
        it may not read is: its files were not even seen."""
        return bool(self.quarantined or self.left_stuck or self.left_unreadable)


class WatchService:
    """The service loop; ``run`` returns when ``stop`` is set (or, with ``once``, when the
    inbox has been worked through), after the files in flight are finished and filed.

    ``on_filed`` sees every file filed, its ``submitted_at`` being when the service first saw
    it (so metrics time arrival to result), and every file left for a retry because its
    outcome could not be recorded or filed (so health sees a case store that records nothing).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        queue: Callable[[], EscalationQueue | None] | None = None,
        on_filed: Callable[[FiledOutcome], None] | None = None,
        on_tick: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.layout = IntakeLayout.for_watch(settings)
        self._queue = queue
        self._on_filed = on_filed or (lambda _filed: None)
        self._on_tick = on_tick or (lambda: None)
        self.tracker = SettleTracker(settings.watch_settle_s)
        self.unreadable = UnreadableFolders(self.layout.inbox, rescan_s=settings.watch_rescan_s)
        # Files one run (``once``) leaves for the next: a rescan must not offer them again.
        self._left: set[Path] = set()

    def run(self, stop: threading.Event, *, once: bool = False) -> WatchSummary:
        settings = self.settings
        summary = WatchSummary()
        # Short ticks keep the drop-to-result time near the settle time.
        tick_s = min(0.25, max(0.02, settings.watch_settle_s / 4))
        intake = Intake(
            settings,
            self.layout,
            queue=self._queue,
            incomplete_timeout_s=settings.watch_incomplete_timeout_s,
        )
        reseal = ResealCases(settings)
        retention = DoneRetention(
            self.layout, settings.done_retention_days, intake.held_case_ids, reseal_cases=reseal
        )
        observer = None if once else self._start_observer()
        self._left.clear()
        # Each run says what it cannot read (a one-off run is a run of its own for the admin).
        self.unreadable = UnreadableFolders(
            self.layout.inbox, rescan_s=None if once else settings.watch_rescan_s
        )

        def not_now(path: Path) -> bool:
            return intake.is_in_flight(path) or intake.is_waiting(path)

        try:
            log.info("watching the inbox (%d workers)", settings.workers)
            self.tracker.note_all(iter(self._scan()))
            next_rescan = time.monotonic() + settings.watch_rescan_s
            while not stop.is_set():
                retention.tick()  # a batch at start, then hourly (intake.done_retention_days)
                room = intake.room
                if room > 0:
                    settled = self.tracker.settled(room, not_now)
                    intake.submit(settled)
                    for path in settled:
                        if not intake.is_in_flight(path):
                            self.tracker.arrived(path)  # gone before it was taken
                for filed in intake.collect(timeout_s=tick_s):
                    self._account(filed, summary, once=once)
                self._on_tick()
                if once and not len(self.tracker) and not intake.in_flight:
                    break
                if time.monotonic() >= next_rescan:
                    found = self._scan()
                    self.tracker.note_all(p for p in found if p not in self._left)
                    next_rescan = time.monotonic() + settings.watch_rescan_s
        finally:
            if observer is not None:
                observer.stop()
                observer.join(timeout=10)
            log.info("stopping: finishing %d file(s) in flight", intake.in_flight)
            try:
                for filed in intake.close():
                    self._account(filed, summary, once=True)
            finally:
                reseal.close()
        summary.left_unreadable = len(self.unreadable)
        return summary

    def _scan(self) -> list[Path]:
        """The inbox's candidate files; the folders it may not read go to ``unreadable``."""
        failed: dict[Path, OSError] = {}
        found = list(inbox_files(self.layout.inbox, unreadable=failed.setdefault))
        self.unreadable.update(failed)
        return found

    def _start_observer(self) -> BaseObserver:
        # watchdog (inotify) skips a folder it may not watch without a word, but from the
        # second such folder on it warns, on stderr, with the first one's full path: a
        # patient's name, maybe. The rescan finds and reports those folders instead.
        warnings.filterwarnings(
            "ignore",
            message="Callback with id ",
            category=RuntimeWarning,
            module=r"watchdog\.",
        )
        observer = Observer()
        observer.schedule(_InboxEvents(self.tracker), str(self.layout.inbox), recursive=True)
        observer.daemon = True
        observer.start()
        return observer

    def _leave(self, path: Path) -> None:
        """Leave ``path`` for the next run: a rescan while it was in flight noted it again."""
        self._left.add(path)
        self.tracker.forget(path)

    def _account(self, filed: FiledOutcome, summary: WatchSummary, *, once: bool) -> None:
        if filed.unfiled is Unfiled.INCOMPLETE:
            if once:
                summary.left_incomplete += 1  # stays in the inbox for the next run
                self._leave(filed.source)
            else:
                self.tracker.defer(filed.source)
            return
        if filed.unfiled is Unfiled.STUCK:
            # This file's problem alone (logged by the intake): not a failure to record, so
            # health does not hear of it; offered again once its own wait is over.
            if once:
                summary.left_stuck += 1
                self._leave(filed.source)
            else:
                self.tracker.defer(filed.source)
            return
        if filed.unfiled is Unfiled.CHANGED:
            self.tracker.note(filed.source)  # the new version settles like any new file
            return
        if filed.unfiled is Unfiled.RETRY:
            # Offered again once settled again; the intake's back-off keeps it waiting longer
            # while recording or filing keeps failing.
            self.tracker.defer(filed.source)
            self._on_filed(filed)
            return
        arrived = self.tracker.arrived(filed.source)
        if filed.unfiled is Unfiled.GONE:
            return
        if filed.quarantined:
            summary.quarantined += 1
        else:
            summary.triaged += 1
            escalation = filed.outcome.escalation if isinstance(filed.outcome, CaseResult) else None
            summary.held += escalation is not None and escalation.state == HELD
        self._on_filed(filed if arrived is None else replace(filed, submitted_at=arrived))
