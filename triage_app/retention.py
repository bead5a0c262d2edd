"""Filed images are kept only as long as the site decides: ``intake.done_retention_days``.

Why: the watch service and the DICOM receiver file every triaged image, the original and
identifying DICOM, in ``done/`` next to its JSON sidecar, and nothing else ever removes them:
the disk fills up (the receiver then refuses every image) and identifying images stay on the
device for years. With a retention period each service removes, from its own ``done/``, the
images filed longer ago than that, each with its sidecar. 0, the default, keeps them for ever:
deleting images is the admin's decision. The case store keeps every record; only files go.

What is removed, and only that:

* **A filed image**: a regular file (never a symbolic link, never followed, never a special
  file; never a hidden name, which is what the intake's temporary files have) next to its
  sidecar ``<name>.json``, a regular file holding a triage result (a JSON object with
  ``"ok": true`` and a ``case_id``). Anything else in ``done/`` is not a service's file and
  stays; the quarantine folder is never entered, even when an admin put it inside ``done/``.
* **Filed long enough ago**, by the sidecar's modification time: the intake writes the sidecar
  at filing, just before it moves the image in, and again when the same image is filed again.
  The image's own time is its writer's (the move keeps it, a share copy may keep the scanner's),
  so it can be years old on the day the image arrives.
* **Not held**: an image whose case is still ``escalation_held`` stays whatever its age, since
  ``held_release`` queues such a case by triaging its file again. The case store is asked at
  every batch; a case becomes held only when its image is filed, so an old image's case never
  becomes held later.
* **Not awaiting a re-seal**: nor does an image whose case the central server quarantined for
  how it was sealed (``OutboxItem.needs_reseal``: a stale envelope after a long outage, a key
  the server no longer knows), since ``queue retry`` seals it anew from that image. The outbox
  is asked at every batch too: a case can be quarantined at any time.

Crash order: a batch removes its images, syncs their folders, and only then removes their
sidecars. A crash in between leaves sidecars without images, which the intake treats as free
names and the next pass removes (they are old too); never an image without its sidecar, which
would look like a file no service filed and would stay for ever. Folders a pass empties go too
(their names come from the inbox and can name a patient).

Bounded: a call examines at most ``batch`` entries, so a service loop's heartbeat never waits
long; a pass goes on where it stopped at the next call. The first pass starts at the first call
(the service's start), each next one an hour after the last ended. Log lines carry counts and
error names only: file names in ``done/`` may name patients.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from triage_app.config import Settings
from triage_app.errors import TriageError
from triage_app.escalation.outbox import Outbox
from triage_app.escalation.service import open_outbox, transport_config
from triage_app.intake import SIDECAR_SUFFIX, IntakeLayout
from triage_app.paths import fsync_dir

__all__ = ["BATCH_ENTRIES", "PASS_EVERY_S", "DoneRetention", "ResealCases", "RetentionPass"]

log = logging.getLogger(__name__)

#: Entries one call examines at most: a few tenths of a second even when each is removed.
BATCH_ENTRIES = 1000
#: Seconds from the end of one pass to the start of the next.
PASS_EVERY_S = 3600.0
_DAY_S = 86400.0
# A sidecar is a few kilobytes; a larger ".json" is someone else's file, and is not read.
_MAX_SIDECAR_BYTES = 1024 * 1024


@dataclass
class RetentionPass:
    """What one pass over ``done/`` did."""

    removed: int = 0  # filed images removed, each with its sidecar
    kept_held: int = 0  # images old enough, kept because their case is still held
    kept_reseal: int = 0  # ... because the server quarantined their case until it is resealed
    orphans_removed: int = 0  # old sidecars whose image an interrupted pass had removed
    failed: int = 0  # files that could not be removed: tried again at the next pass
    errors: set[str] = field(default_factory=set)  # their errno names

    def headline(self) -> str:
        """One line: the counts, e.g. ``2 filed image(s) removed with their results, 1 kept
        because their case is still held for escalation``."""
        text = (
            f"{self.removed} filed image(s) removed with their results, {self.kept_held} kept "
            f"because their case is still held for escalation, {self.kept_reseal} because "
            "their case waits to be sealed anew (queue retry)"
        )
        if self.orphans_removed:
            text += f", {self.orphans_removed} result file(s) left by an interrupted pass removed"
        return text


class DoneRetention:
    """Removes the filed images of one ``done/`` folder past the retention period.

    Call :meth:`tick` on every turn of the service loop, in the thread ``held_cases`` and
    ``reseal_cases`` may be called from (they read the case store and the outbox); it does
    nothing while the period is 0.
    """

    def __init__(
        self,
        layout: IntakeLayout,
        days: int,
        held_cases: Callable[[], Collection[str]],
        *,
        reseal_cases: Callable[[], Collection[str]] = tuple,
        batch: int = BATCH_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._done = layout.done
        self._quarantine = layout.quarantine
        self._days = days
        self._held_cases = held_cases
        self._reseal_cases = reseal_cases
        self._batch = batch
        self._clock = clock
        self._next_at = float("-inf")  # the first pass starts at the first call
        self._entries: Iterator[Path] | None = None  # the pass under way
        self._pass = RetentionPass()

    def tick(self) -> RetentionPass | None:
        """Work through one batch when a pass is under way or due; returns what the pass did
        when this call ended it, else None."""
        if self._days == 0:
            return None
        if self._entries is None:
            if self._clock() < self._next_at:
                return None
            self._entries = _entries(self._done, self._quarantine)
            self._pass = RetentionPass()
        try:
            held = frozenset(self._held_cases())
            reseal = frozenset(self._reseal_cases())
        except TriageError as err:
            # Nothing is removed without knowing: the pass ends here, the next one tries again.
            log.error(
                "the case store or the outbox cannot say which images cases still need (%s): "
                "nothing removed until the next pass",
                err.code,
            )
            return self._end_pass()
        batch = list(itertools.islice(self._entries, self._batch))
        self._expire(batch, held, reseal)
        if len(batch) == self._batch:
            return None  # more next call
        return self._end_pass()

    def _expire(self, entries: list[Path], held: Collection[str], reseal: Collection[str]) -> None:
        """Remove the filed images among ``entries`` that are old and not held, then their
        sidecars and the old sidecars an interrupted pass left (see the module on the order)."""
        cutoff = time.time() - self._days * _DAY_S
        sidecars: dict[Path, bool] = {}  # to go once their images are gone for good: orphan?
        for path in entries:
            sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
            if os.path.lexists(sidecar):
                case_id = _filed_case(path, sidecar, cutoff)
                if case_id is None:
                    continue  # filed recently, or not a filed image at all
                if case_id in held:
                    self._pass.kept_held += 1
                elif case_id in reseal:
                    self._pass.kept_reseal += 1
                elif self._remove(path):
                    self._pass.removed += 1
                    sidecars[sidecar] = False
            elif path.name.endswith(SIDECAR_SUFFIX) and path not in sidecars:
                image = path.with_name(path.name.removesuffix(SIDECAR_SUFFIX))
                if not os.path.lexists(image) and _old_case_id(path, cutoff) is not None:
                    sidecars[path] = True
        synced = self._sync({sidecar.parent for sidecar in sidecars})
        emptied: set[Path] = set()
        for sidecar, orphan in sidecars.items():
            if sidecar.parent in synced and self._remove(sidecar):
                emptied.add(sidecar.parent)
                self._pass.orphans_removed += orphan
        for folder in emptied:
            self._remove_if_empty(folder)

    def _remove(self, path: Path) -> bool:
        """Unlink ``path`` (a symbolic link put there meanwhile is unlinked, never followed)."""
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as err:
            self._failed(err)
            return False
        return True

    def _sync(self, folders: set[Path]) -> set[Path]:
        """Make the images' removal durable before their sidecars go; returns the folders
        where that worked (the others keep their sidecars until the next pass)."""
        synced: set[Path] = set()
        for folder in folders:
            try:
                fsync_dir(folder)
            except OSError as err:
                self._failed(err)
                continue
            synced.add(folder)
        return synced

    def _remove_if_empty(self, folder: Path) -> None:
        """Remove ``folder`` and its parents below ``done/`` while the pass left them empty."""
        while folder != self._done and self._done in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return  # not empty (or not ours to judge): stays
            folder = folder.parent

    def _failed(self, err: OSError) -> None:
        self._pass.failed += 1
        self._pass.errors.add(errno.errorcode.get(err.errno or 0, type(err).__name__))

    def _end_pass(self) -> RetentionPass:
        finished, self._entries = self._pass, None
        self._next_at = self._clock() + PASS_EVERY_S
        log.info(
            "done folder, images filed over %d day(s) ago: %s", self._days, finished.headline()
        )
        if finished.failed:
            log.warning(
                "%d filed file(s) could not be removed (%s): tried again at the next pass",
                finished.failed,
                ", ".join(sorted(finished.errors)),
            )
        return finished


class ResealCases:
    """The cases whose image ``queue retry`` needs to seal them anew: the ones the server
    quarantined for how they were sealed. Read from the outbox at each call, opened at the
    first one (from the thread of the calls) and only with a central server configured:
    without one nothing is ever sealed, or resealed."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._outbox: Outbox | None = None

    def __call__(self) -> list[str]:
        if transport_config(self._settings) is None:
            return []
        if self._outbox is None:
            self._outbox = open_outbox(self._settings)
        return [item.case_id for item in self._outbox.items() if item.needs_reseal]

    def close(self) -> None:
        outbox, self._outbox = self._outbox, None
        if outbox is not None:
            outbox.close()


def _entries(done: Path, quarantine: Path) -> Iterator[Path]:
    """Every name under ``done`` that may be a service's file (not hidden), folder by folder;
    symbolic links to folders are not followed, and the quarantine folder is not entered under
    whatever name it is reached."""
    try:
        keep_out: tuple[int, int] | None = _identity(quarantine.stat())
    except OSError:
        keep_out = None  # no quarantine folder: nothing to keep out
    for root, dirs, files in os.walk(done):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not _is(root, d, keep_out))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(root, name)


def _is(root: str, name: str, folder: tuple[int, int] | None) -> bool:
    try:
        return folder is not None and _identity(os.lstat(Path(root, name))) == folder
    except OSError:
        return False


def _identity(status: os.stat_result) -> tuple[int, int]:
    return status.st_dev, status.st_ino


def _filed_case(image: Path, sidecar: Path, cutoff: float) -> str | None:
    """The case id of ``image`` when it is a filed image (see the module) filed before
    ``cutoff`` (a time.time()); None for anything else."""
    try:
        if not stat.S_ISREG(os.lstat(image).st_mode):
            return None
    except OSError:
        return None
    return _old_case_id(sidecar, cutoff)


def _old_case_id(sidecar: Path, cutoff: float) -> str | None:
    """The case id in ``sidecar`` when it is a regular file holding a triage result, written
    before ``cutoff``; None for anything else (read only when old: recent ones cost a stat)."""
    try:
        if not _old_regular(os.lstat(sidecar), cutoff):
            return None
        # Not following a link, not waiting on a pipe put in its place since the look above.
        fd = os.open(sidecar, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not _old_regular(os.fstat(fd), cutoff):
                return None
            data = os.read(fd, _MAX_SIDECAR_BYTES + 1)
        finally:
            os.close(fd)
        record = json.loads(data)
    except (OSError, ValueError, RecursionError):
        return None  # gone, unreadable, or not JSON: not a sidecar this can judge
    if not isinstance(record, dict) or record.get("ok") is not True:
        return None
    case_id = record.get("case_id")
    return case_id if isinstance(case_id, str) and case_id else None


def _old_regular(status: os.stat_result, cutoff: float) -> bool:
    """A regular file of a sidecar's size, last written before ``cutoff``."""
    return (
        stat.S_ISREG(status.st_mode)
        and status.st_mtime < cutoff
        and status.st_size <= _MAX_SIDECAR_BYTES
    )
