"""The watch-folder service.

Unit tests drive :class:`SettleTracker` with made-up clocks over real files. The system tests
run the real ``triage-app watch`` in its own process (settings through ``TRIAGE_APP_*``
variables, as a service manager passes them) and drop real DICOM files into its inbox the way a
scanner or a share copy does: written under another name and renamed in, or written slowly
under the final name. What they check is on disk: the done and quarantine folders, the
sidecars, and the case store.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.dcmtk import free_port
from tests.escalation.conftest import EDGE_MODEL_KEY
from tests.helpers import make_result, phantom_dataset, wait_until, write_phantoms
from tests.test_intake import (
    AS_ROOT,
    NOBODY,
    THREAD_TRIAGE,
    give_to_service_user,
    keep_from_service_user,
    service_user_command,
    service_user_home,
)
from triage_app.config import Settings
from triage_app.escalation.service import open_outbox
from triage_app.intake import REASON_SUFFIX, SIDECAR_SUFFIX
from triage_app.metrics import probe_health
from triage_app.paths import lock_folder
from triage_app.states import CaseEvent, CaseState
from triage_app.store import REPROCESSED, CaseStore
from triage_app.watch import (
    SettleTracker,
    UnreadableFolders,
    WatchService,
    inbox_files,
    is_candidate,
)

SETTLE_S = 0.3
WATCH = (sys.executable, "-m", "triage_app", "watch")
WALL = 1_700_000_000.0  # the made-up wall clock's "now"


# --- SettleTracker, with made-up clocks -----------------------------------------------------------


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def mono() -> FakeClock:
    """The made-up monotonic clock: it moves only when a test moves it."""
    return FakeClock(100.0)


@pytest.fixture
def tracker(mono: FakeClock) -> SettleTracker:
    """A 2 s settle time on the made-up clocks (the wall clock stays at ``WALL``)."""
    return SettleTracker(2.0, clock=mono, wall_clock=FakeClock(WALL))


def make_file(path: Path, data: bytes, *, modified: float) -> Path:
    """A file whose modification time is ``modified`` (on the made-up wall clock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (modified, modified))
    return path


def never(_path: Path) -> bool:
    return False


def assert_settles_after(
    tracker: SettleTracker, mono: FakeClock, path: Path, almost_s: float, rest_s: float
) -> None:
    """``path`` is not handed over now, nor ``almost_s`` later; it is ``rest_s`` after that."""
    assert tracker.settled(10, never) == []
    mono.now += almost_s
    assert tracker.settled(10, never) == []
    mono.now += rest_s
    assert tracker.settled(10, never) == [path]


def test_a_new_file_is_ready_once_unchanged_for_the_settle_time(
    tmp_path: Path, tracker: SettleTracker, mono: FakeClock
) -> None:
    path = make_file(tmp_path / "a.dcm", b"x" * 10, modified=WALL)
    tracker.note(path)

    assert_settles_after(tracker, mono, path, 1.9, 0.1)
    assert len(tracker) == 0  # handed over: no longer tracked
    assert tracker.settled(10, never) == []


def test_a_change_of_size_or_modification_time_starts_the_wait_again(
    tmp_path: Path, tracker: SettleTracker, mono: FakeClock
) -> None:
    path = make_file(tmp_path / "a.dcm", b"x" * 10, modified=WALL)
    tracker.note(path)
    assert tracker.settled(10, never) == []

    mono.now += 1.5
    make_file(path, b"x" * 20, modified=WALL)  # it grew
    assert tracker.settled(10, never) == []
    mono.now += 1.5  # 3 s since first seen, 1.5 s since the change
    assert tracker.settled(10, never) == []

    make_file(path, b"y" * 20, modified=WALL + 1)  # same size, rewritten
    assert_settles_after(tracker, mono, path, 1.99, 0.01)


def test_a_file_already_older_than_the_settle_time_is_ready_at_first_sight(
    tmp_path: Path, tracker: SettleTracker
) -> None:
    old = make_file(tmp_path / "old.dcm", b"x", modified=WALL - 2.0)
    young = make_file(tmp_path / "young.dcm", b"x", modified=WALL - 1.9)
    tracker.note_all(iter([old, young]))

    assert tracker.settled(10, never) == [old]
    assert len(tracker) == 1


def test_a_file_first_seen_part_way_through_its_settle_time_waits_only_the_rest(
    tmp_path: Path, tracker: SettleTracker, mono: FakeClock
) -> None:
    """Its modification time says how long it has been unchanged: a late event (watchdog
    holds events behind a move out of the inbox for up to 0.5 s) does not add to the wait."""
    path = make_file(tmp_path / "late.dcm", b"x", modified=WALL - 1.5)
    future = make_file(tmp_path / "skewed.dcm", b"x", modified=WALL + 30)  # a share's clock
    tracker.note_all(iter([path, future]))

    assert_settles_after(tracker, mono, path, 0.49, 0.01)
    mono.now += 1.49  # a modification time in the future earns nothing: the full wait
    assert tracker.settled(10, never) == []
    mono.now += 0.01
    assert tracker.settled(10, never) == [future]


def test_no_more_than_the_limit_is_handed_over_and_skipped_files_stay_tracked(
    tmp_path: Path, tracker: SettleTracker
) -> None:
    paths = [make_file(tmp_path / f"f{i}.dcm", b"x", modified=WALL - 60) for i in range(5)]
    busy = paths[0]
    tracker.note_all(iter(paths))

    first = tracker.settled(2, lambda p: p == busy)
    assert len(first) == 2
    assert busy not in first
    assert len(tracker) == 3
    rest = tracker.settled(10, lambda p: p == busy)
    assert sorted(first + rest) == sorted(paths[1:])
    assert len(tracker) == 1  # the busy one, until it is no longer busy
    assert tracker.settled(10, never) == [busy]


@pytest.mark.parametrize(
    "name",
    [".hidden.dcm", "scan.dcm.part", "scan.tmp", "scan.TMP", "scan.crdownload", "scan.dcm~"],
)
def test_hidden_and_unfinished_names_are_ignored(
    tmp_path: Path, tracker: SettleTracker, name: str
) -> None:
    path = make_file(tmp_path / name, b"x", modified=WALL - 60)
    assert not is_candidate(name)
    tracker.note(path)
    assert len(tracker) == 0
    assert list(inbox_files(tmp_path)) == []


def test_the_inbox_scan_is_recursive_sorted_and_skips_hidden_folders(tmp_path: Path) -> None:
    for rel in ["b.dcm", "a.dcm", "sub/c.dcm", "sub/.d.dcm", ".cache/e.dcm", "sub/f.partial"]:
        make_file(tmp_path / rel, b"x", modified=WALL)
    found = [p.relative_to(tmp_path).as_posix() for p in inbox_files(tmp_path)]
    assert found == ["a.dcm", "b.dcm", "sub/c.dcm"]
    assert is_candidate("a.dcm")


def test_a_file_arrives_when_first_noted_whatever_its_modification_time_says(
    tmp_path: Path, tracker: SettleTracker, mono: FakeClock
) -> None:
    """Metrics time a file from its arrival: a copy may keep its writer's time, years old."""
    copied = make_file(tmp_path / "copied.dcm", b"x", modified=WALL - 2 * 365 * 86400)
    tracker.note_all(iter([copied]))  # at start, or at a rescan
    noted_at = mono.now
    mono.now += 3.0
    tracker.note(copied)  # a later event is not a new arrival
    assert tracker.settled(10, never) == [copied]
    tracker.defer(copied)  # cut short, read again later: still the same arrival
    mono.now += 2.0
    assert tracker.settled(10, never) == [copied]

    assert tracker.arrived(copied) == noted_at
    assert tracker.arrived(copied) is None  # filed: forgotten


def test_a_vanished_file_is_forgotten_with_its_arrival(
    tmp_path: Path, tracker: SettleTracker, mono: FakeClock
) -> None:
    path = make_file(tmp_path / "a.dcm", b"x", modified=WALL - 60)
    tracker.note(path)
    path.unlink()
    assert tracker.settled(10, never) == []
    mono.now += 10.0
    make_file(path, b"y", modified=WALL)  # a new file under the old name arrives now
    tracker.note(path)
    assert tracker.arrived(path) == mono.now


def test_a_file_that_vanished_is_forgotten(tmp_path: Path, tracker: SettleTracker) -> None:
    path = make_file(tmp_path / "a.dcm", b"x", modified=WALL - 60)
    tracker.note(path)
    path.unlink()
    assert tracker.settled(10, never) == []
    assert len(tracker) == 0


def test_a_deferred_file_waits_a_full_settle_time_again_even_when_old(
    tmp_path: Path, tracker: SettleTracker, mono: FakeClock
) -> None:
    path = make_file(tmp_path / "cut.dcm", b"x", modified=WALL - 60)
    tracker.note(path)
    assert tracker.settled(10, never) == [path]  # old: ready at first sight

    tracker.defer(path)  # it was cut short: read it again later, not at the next tick
    assert_settles_after(tracker, mono, path, 1.9, 0.1)
    path.unlink()
    tracker.defer(path)  # gone meanwhile: nothing to track
    assert len(tracker) == 0


def test_an_entry_that_cannot_be_followed_settles_as_itself(
    tmp_path: Path, tracker: SettleTracker
) -> None:
    """A symbolic link loop: handed over like any file, for the intake to quarantine."""
    loop = tmp_path / "loop.dcm"
    loop.symlink_to("loop.dcm")
    os.utime(loop, (WALL - 60, WALL - 60), follow_symlinks=False)
    tracker.note_all(inbox_files(tmp_path))

    assert tracker.settled(10, never) == [loop]  # the link's own modification time is old


@pytest.mark.expect_log_warnings
def test_an_entry_that_cannot_be_examined_is_skipped_with_one_warning_without_its_name(
    tmp_path: Path, tracker: SettleTracker, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "DOE^JANE").symlink_to("DOE^JANE")  # a folder name that loops
    entry = tmp_path / "DOE^JANE" / "chest.dcm"
    for _ in range(3):  # as every rescan would offer it again
        tracker.note(entry)
        assert tracker.settled(10, never) == []
        assert len(tracker) == 0

    warnings = [r.getMessage() for r in caplog.get_records("call") if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "ELOOP" in warnings[0] and "DOE" not in warnings[0]


def test_the_inbox_scan_hands_over_folders_it_may_not_list_but_not_ones_just_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """os.walk skipped both without a word. (Root may list anything: the refusal is made up
    here; the real one is below, as the service user.)"""
    for name in ("HIDDEN^HANNA", "REMOVED^ROB", "SEEN^SUE"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "chest.dcm").write_bytes(b"x")
    scandir = os.scandir

    def refusing(path: Any) -> Any:
        name = Path(os.fsdecode(path)).name
        if name == "HIDDEN^HANNA":
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        if name == "REMOVED^ROB":  # removed between its parent's listing and its own
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", os.fsdecode(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    unreadable: dict[Path, OSError] = {}
    found = list(inbox_files(tmp_path, unreadable=unreadable.setdefault))

    assert found == [tmp_path / "SEEN^SUE" / "chest.dcm"]
    assert {k: v.errno for k, v in unreadable.items()} == {tmp_path / "HIDDEN^HANNA": errno.EACCES}


@pytest.mark.expect_log_warnings
def test_a_folder_that_cannot_be_read_is_said_once_then_once_when_readable_or_gone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Said on the scan that first finds it, not on every rescan; a folder inside one that
    cannot be read is that one's problem; names (patient names, maybe) are never said."""
    inbox = tmp_path / "inbox"
    hanna, sam = inbox / "HIDDEN^HANNA", inbox / "SECRET^SAM"
    for folder in (hanna, sam):
        folder.mkdir(parents=True)
    denied = PermissionError(errno.EACCES, "Permission denied")
    folders = UnreadableFolders(inbox, rescan_s=30)

    for _ in range(3):  # as every rescan finds them again
        folders.update({hanna: denied, sam: denied})
    assert len(folders) == 2
    folders.update({sam: denied})  # HIDDEN^HANNA fixed
    shutil.rmtree(sam)
    folders.update({})  # SECRET^SAM removed
    folders.update({hanna: denied})  # HIDDEN^HANNA shut again: said again
    for _ in range(2):  # then the inbox itself: HIDDEN^HANNA, inside it, is its problem
        folders.update({inbox: denied})
    assert len(folders) == 1
    folders.update({})

    said = [(r.levelname, r.getMessage()) for r in caplog.get_records("call")]
    assert [level for level, _ in said] == [
        *("WARNING", "WARNING", "INFO", "INFO"),
        *("WARNING", "WARNING", "INFO"),
    ]
    assert said[0][1].startswith(
        f"a folder in the inbox ({inbox}) cannot be read (EACCES): the files in it are not "
        "triaged until "
    )
    assert "looked at again every 30 s" in said[0][1]
    assert said[2][1].endswith("can be read now: its files are triaged")
    assert said[3][1].endswith("is no longer there")
    assert said[5][1].startswith(f"the inbox ({inbox}) cannot be read (EACCES)")
    assert not [m for _, m in said if "HANNA" in m or "SAM" in m]
    assert len(folders) == 0


# --- the service in this process ------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_cut_short_file_that_stopped_growing_is_read_again_once_per_settle_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read again every settle time for the whole wait, but said once: a zero-byte file put
    one line in the log every 2 s for 5 minutes."""
    timeout_s, settle_s = 3.0, 0.2
    settings = Settings(
        {
            "paths.data_dir": tmp_path / "data",
            "processing.workers": 1,
            "watch.settle_s": settle_s,
            "watch.incomplete_timeout_s": timeout_s,
            "watch.rescan_s": 0.5,
        }
    )
    settings.watch_inbox.mkdir(parents=True)
    data = part10_bytes(71)
    cut = settings.watch_inbox / "cut.dcm"
    cut.write_bytes(data[: len(data) // 2])  # the writer died half-way
    quarantined = settings.watch_quarantine / "truncated" / "cut.dcm"
    stop = threading.Event()
    service = WatchService(settings)
    reads: list[Path] = []  # each read that found it still cut short defers it
    defer = service.tracker.defer

    def read_and_deferred(path: Path) -> None:
        reads.append(path)
        defer(path)

    monkeypatch.setattr(service.tracker, "defer", read_and_deferred)

    with ThreadPoolExecutor(1) as thread:
        running = thread.submit(service.run, stop)
        try:
            wait_until(
                quarantined.exists, timeout_s=30, what="the cut-short file to be quarantined"
            )
        finally:
            stop.set()
        summary = running.result(timeout=30)

    # Read when it settled, then again every settle time until the timeout: not every tick.
    assert 2 <= len(reads) <= timeout_s / settle_s + 2
    said = [
        r.getMessage()
        for r in caplog.get_records("call")
        if r.name == "triage_app.intake" and "cut short" in r.getMessage()
    ]
    assert said == [
        "a file is cut short (truncated) and may still be being written: it is read again as "
        "it settles, and quarantined if it stays so 3 s after its last change",
        "a file still cut short when the 3 s wait was over went to quarantine: truncated",
    ]
    assert summary.quarantined == 1
    assert (quarantined.parent / ("cut.dcm" + REASON_SUFFIX)).is_file()
    with CaseStore.open(settings.case_store_path) as store:
        assert [f.code for f in store.failures()] == ["truncated"]  # deferrals record nothing


@pytest.mark.timeout(60)
def test_a_symlink_loop_in_the_inbox_is_quarantined_and_the_service_goes_on(
    tmp_path: Path,
) -> None:
    settings = Settings(
        {"paths.data_dir": tmp_path / "data", "processing.workers": 1, "watch.settle_s": 0.1}
    )
    inbox = settings.watch_inbox
    write_phantoms(inbox, seed=72, count=1)
    (inbox / "loop.dcm").symlink_to("loop.dcm")

    summary = WatchService(settings).run(threading.Event(), once=True)

    assert (summary.triaged, summary.quarantined) == (1, 1)
    quarantined = settings.watch_quarantine / "unreadable" / "loop.dcm"
    assert quarantined.is_symlink()  # moved as it is
    assert (quarantined.parent / ("loop.dcm" + REASON_SUFFIX)).is_file()
    assert image_names(settings.watch_done) == ["p000.dcm"]
    assert list(inbox.iterdir()) == []


@pytest.mark.timeout(120)
@pytest.mark.expect_log_warnings  # the one warning about the file left in the inbox
def test_once_leaves_a_file_it_may_not_take_out_of_the_inbox_for_the_next_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused only at the move (its folder looked writable): the copy filed in done/ is
    undone, and a one-off run ends instead of trying the file again and again."""
    settings = Settings(
        {
            "paths.data_dir": tmp_path / "data",
            "processing.workers": 1,
            "watch.settle_s": 0.1,
            "watch.rescan_s": 0.5,
        }
    )
    write_phantoms(settings.watch_inbox, seed=73, count=2)
    stuck = settings.watch_inbox / "p001.dcm"
    unlink = Path.unlink

    def refuse_for_stuck(self: Path, missing_ok: bool = False) -> None:
        if self == stuck:
            raise PermissionError(errno.EACCES, "Permission denied")  # a sticky folder, say
        unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refuse_for_stuck)
    stop = threading.Event()
    with ThreadPoolExecutor(1) as thread:
        running = thread.submit(WatchService(settings).run, stop, once=True)
        try:
            summary = running.result(timeout=90)
        finally:
            stop.set()

    assert (summary.triaged, summary.quarantined, summary.left_stuck) == (1, 0, 1)
    assert stuck.is_file()
    assert sorted(p.name for p in settings.watch_done.iterdir()) == ["p000.dcm", "p000.dcm.json"]


def write_phantom_file(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(part10_bytes(seed))


# The service as the service user: ``triage-app watch`` (argv[1:]), its file's own wait before a
# retry shorter for the test, triaging in a thread (see tests.test_intake.THREAD_TRIAGE).
_WATCH_AS_THE_SERVICE_USER = """
import sys
from triage_app import intake
from triage_app.cli import main

intake.STUCK_RETRY_FIRST_S = 0.5
sys.exit(main(sys.argv[1:]))
"""
LOG_LINE = re.compile(r"\S+ \S+ (?P<level>[A-Z]+) (?P<name>[\w.]+): (?P<message>.*)")


@contextlib.contextmanager
def watch_as_the_service_user(
    command: list[str], env: dict[str, str], log: Path, port: int
) -> Iterator[subprocess.Popen[bytes]]:
    """``watch`` as the service user, its output in ``log``, once its health answers; stopped
    with SIGTERM (as systemd stops it) on leaving."""
    with (
        log.open("w") as out,
        subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        ) as service,
    ):
        try:
            wait_until(
                lambda: probe_health(port, 1.0)[0] == 0 or service.poll() is not None,
                timeout_s=60,
                interval_s=0.2,
                what="the service's health endpoint",
            )
            assert service.poll() is None, log.read_text()
            yield service
        finally:
            service.send_signal(signal.SIGTERM)
            service.wait(timeout=60)


def app_log_lines(log: Path) -> list[tuple[str, str]]:
    """(level, message) of each line the app's own loggers wrote."""
    return app_log_lines_of(log.read_text(encoding="utf-8", errors="replace"))


def app_log_lines_of(output: str) -> list[tuple[str, str]]:
    lines = []
    for line in output.splitlines():
        match = LOG_LINE.fullmatch(line)
        if match and match["name"].startswith("triage_app"):
            lines.append((match["level"], match["message"]))
    return lines


@pytest.mark.timeout(180)
def test_as_an_unprivileged_user_a_file_it_may_not_read_or_take_out_stops_nothing(
    tmp_path: Path,
) -> None:
    """The site admin's report, as they ran it: ``triage-app watch`` as an unprivileged user,
    a root-owned 0600 file dropped in its inbox. It stalled the whole inbox (backing off up to
    60 s, one ERROR a try), health went failing blaming the store, and the file was never
    quarantined (its reason file was). Now it is quarantined at once; a file in a folder the
    service may not change is said once and waits alone, health stays ok, and it is filed
    once the folder is fixed."""
    port = free_port()
    with service_user_home() as home:
        data = home / "data"
        settings = Settings({"paths.data_dir": data})
        locked = settings.watch_inbox / "locked"
        write_phantom_file(locked / "DOE^JOHN.dcm", seed=81)
        staging = home / "staging"
        write_phantom_file(staging / "DOE^JANE.dcm", seed=82)
        write_phantom_file(staging / "scan.dcm", seed=83)
        give_to_service_user(home)
        keep_from_service_user(locked / "DOE^JOHN.dcm")
        keep_from_service_user(locked)
        keep_from_service_user(staging / "DOE^JANE.dcm")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_APP_")}
        env.update(
            {
                "HOME": str(home),
                "XDG_CONFIG_HOME": str(home / "config"),
                "TRIAGE_APP_WATCH__SETTLE_S": str(SETTLE_S),
                "TRIAGE_APP_WATCH__RESCAN_S": "1.0",
                "TRIAGE_APP_PROCESSING__WORKERS": "1",
                "TRIAGE_APP_METRICS__WATCH_PORT": str(port),
            }
        )
        log = tmp_path / "watch.log"
        script = THREAD_TRIAGE + _WATCH_AS_THE_SERVICE_USER
        command = service_user_command("-c", script, "watch", "--debug", "--data-dir", data)
        with watch_as_the_service_user(command, env, log, port) as service:
            for name in ("DOE^JANE.dcm", "scan.dcm"):
                (staging / name).rename(settings.watch_inbox / name)
            jane = settings.watch_quarantine / "unreadable" / "DOE^JANE.dcm"
            wait_until(jane.exists, timeout_s=30, what="the unreadable file in quarantine")
            wait_until(
                (settings.watch_done / "scan.dcm").exists,
                timeout_s=30,
                what="the good file in done/",
            )

            def tries_of_the_stuck_file() -> int:
                return sum("cannot be taken out" in m for _, m in app_log_lines(log))

            # Three failures in a row made health fail, blaming the store: four tries.
            wait_until(
                lambda: tries_of_the_stuck_file() >= 4,
                timeout_s=60,
                what="four tries of the file in the locked folder",
            )
            health = probe_health(port, 5.0)
            left = sorted(p.name for p in locked.iterdir())
            reasons = sorted(p.name for p in settings.watch_quarantine.rglob("*.reason.json"))

            give_to_service_user(locked, recursive=False)  # the admin fixes the folder
            john = settings.watch_quarantine / "unreadable" / "locked" / "DOE^JOHN.dcm"
            wait_until(john.exists, timeout_s=60, what="the fixed file in quarantine")

        assert service.returncode == 0, log.read_text()
        assert health == (0, "ok")
        assert left == ["DOE^JOHN.dcm"]  # waiting where it was
        assert reasons == ["DOE^JANE.dcm.reason.json"]  # none for a file that was not moved
        assert sorted(p.name for p in settings.watch_done.iterdir()) == [
            "scan.dcm",
            "scan.dcm.json",
        ]
        assert list(settings.watch_inbox.rglob("*.dcm")) == []

    logged = app_log_lines(log)
    errors = [m for level, m in logged if level == "ERROR"]
    warnings = [m for level, m in logged if level == "WARNING"]
    assert errors == []
    assert len(warnings) == 1 and "cannot be taken out of the inbox (EACCES)" in warnings[0]
    assert not [m for _, m in logged if "DOE" in m or "locked" in m or "scan.dcm" in m]


# Folder names a site's scanner or share might use: patient names, never to be logged.
NAMES_IN_THE_INBOX = ("HIDDEN", "HANNA", "SECRET", "SHUT", "SHEILA", "deeper", "chest.dcm")


def shut_from_service_user(folder: Path, mode: int) -> None:
    """A folder the service user may not list (``mode`` 0o700 or 0o000), or list but not
    enter (0o744): root's, as a scanner or an admin copying as root leaves it."""
    if AS_ROOT:
        os.chown(folder, 0, 0)
        folder.chmod(mode)
    else:
        folder.chmod(0o444 if mode & 0o004 else 0o000)


def open_to_service_user(top: Path) -> None:
    """The admin's fix: ``top`` and what is in it the service user's, its folders 0755."""
    for folder in [top, *(p for p in top.rglob("*") if p.is_dir())]:
        folder.chmod(0o755)
    give_to_service_user(top)


def service_user_env(home: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_APP_")}
    env.update(
        {
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / "config"),
            "TRIAGE_APP_WATCH__SETTLE_S": str(SETTLE_S),
            "TRIAGE_APP_PROCESSING__WORKERS": "1",
            **{f"TRIAGE_APP_{key.upper()}": value for key, value in settings.items()},
        }
    )
    return env


def service_user_name() -> str:
    return NOBODY.pw_name if AS_ROOT else pwd.getpwuid(os.geteuid()).pw_name


@pytest.mark.timeout(240)
def test_once_as_an_unprivileged_user_counts_the_folders_it_may_not_read_and_exits_1() -> None:
    """The reviewer's report: a folder in the inbox the service may not list (root's 0700, or
    left mode 000) was skipped without a word: "0 triaged", exit 0, nothing in the log, its
    images never triaged. Now each such folder, and one it may list but not enter, is said
    once without its name, counted in the summary (JSON too), and the run exits 1."""
    with service_user_home() as home:
        data = home / "data"
        inbox = Settings({"paths.data_dir": data}).watch_inbox
        write_phantom_file(inbox / "scan.dcm", seed=84)
        write_phantom_file(inbox / "HIDDEN^HANNA" / "chest.dcm", seed=85)
        write_phantom_file(inbox / "SECRET^SAM" / "chest.dcm", seed=86)
        write_phantom_file(inbox / "SHUT^SHEILA" / "deeper" / "chest.dcm", seed=87)
        give_to_service_user(home)
        shut_from_service_user(inbox / "HIDDEN^HANNA", 0o700)
        shut_from_service_user(inbox / "SECRET^SAM", 0o000)
        shut_from_service_user(inbox / "SHUT^SHEILA", 0o744)
        script = THREAD_TRIAGE + _WATCH_AS_THE_SERVICE_USER

        def run_once(*args: str) -> subprocess.CompletedProcess[str]:
            command = service_user_command(
                "-c", script, "watch", "--once", *args, "--data-dir", data
            )
            return subprocess.run(
                command,
                env=service_user_env(home),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )

        text = run_once()
        as_json = run_once("--log-format", "json")
        left = sorted(p.relative_to(inbox).as_posix() for p in inbox.rglob("*.dcm"))
        open_to_service_user(inbox)  # the admin fixes the folders
        fixed = run_once()

    assert text.returncode == 1, text.stderr
    assert text.stderr.splitlines()[-1] == (
        "triage-app watch: 1 triaged, 0 quarantined, 0 left in the inbox (still being "
        "written), 3 folders in the inbox it may not read (files not triaged: see the log)"
    )
    assert left == [
        "HIDDEN^HANNA/chest.dcm",
        "SECRET^SAM/chest.dcm",
        "SHUT^SHEILA/deeper/chest.dcm",
    ]
    warnings = [m for level, m in app_log_lines_of(text.stderr) if level == "WARNING"]
    assert len(warnings) == 3, text.stderr  # one a folder; none for the one inside SHUT^SHEILA
    user = service_user_name()
    for warning in warnings:
        assert warning.startswith(f"a folder in the inbox ({inbox}) cannot be read (EACCES): ")
        assert f"until {user}, the user the service runs as, may list and enter it" in warning
    for output in (text.stderr, as_json.stderr):
        assert not [name for name in NAMES_IN_THE_INBOX if name in output], output

    assert as_json.returncode == 1, as_json.stderr
    summary = json.loads(as_json.stderr.splitlines()[-1])
    assert (summary["triaged"], summary["left_unreadable"]) == (0, 3)
    assert summary["message"].endswith(
        ", 3 folders in the inbox it may not read (files not triaged: see the log)"
    )

    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stderr.splitlines()[-1] == (
        "triage-app watch: 3 triaged, 0 quarantined, 0 left in the inbox (still being written)"
    )


@pytest.mark.timeout(240)
def test_as_an_unprivileged_user_a_folder_it_may_not_read_is_said_once_and_triaged_once_fixed(
    tmp_path: Path,
) -> None:
    """The running service looks at such a folder on every rescan but says it once, and once
    that it can be read again; its files are then triaged. Nothing names the folders: not the
    service's lines, nor watchdog's (it warned with the path of the first folder it could not
    watch once there were two)."""
    port = free_port()
    rescan_s = 0.5
    with service_user_home() as home:
        data = home / "data"
        settings = Settings({"paths.data_dir": data})
        inbox = settings.watch_inbox
        write_phantom_file(inbox / "HIDDEN^HANNA" / "chest.dcm", seed=88)
        write_phantom_file(inbox / "SECRET^SAM" / "chest.dcm", seed=89)
        give_to_service_user(home)
        shut_from_service_user(inbox / "HIDDEN^HANNA", 0o700)
        shut_from_service_user(inbox / "SECRET^SAM", 0o000)
        env = service_user_env(home, watch__rescan_s=str(rescan_s), metrics__watch_port=str(port))
        log = tmp_path / "watch.log"
        script = THREAD_TRIAGE + _WATCH_AS_THE_SERVICE_USER
        command = service_user_command("-c", script, "watch", "--data-dir", data)

        def said(level: str) -> list[str]:
            return [m for lv, m in app_log_lines(log) if lv == level]

        with watch_as_the_service_user(command, env, log, port) as service:
            wait_until(
                lambda: len(said("WARNING")) >= 2,
                timeout_s=30,
                what="a warning for each folder it may not read",
            )
            time.sleep(6 * rescan_s)  # rescans that find them again, and say nothing
            warned = said("WARNING")
            health = probe_health(port, 5.0)

            open_to_service_user(inbox / "HIDDEN^HANNA")  # the admin fixes one
            done = settings.watch_done / "HIDDEN^HANNA" / "chest.dcm"
            wait_until(done.exists, timeout_s=60, what="the fixed folder's file in done/")
            wait_until(
                lambda: any("can be read now" in m for m in said("INFO")),
                timeout_s=30,
                what="the line that it can be read now",
            )
            time.sleep(4 * rescan_s)

        assert service.returncode == 0, log.read_text()  # stopped on purpose
        left = sorted(p.relative_to(inbox).as_posix() for p in inbox.rglob("*.dcm"))

    output = log.read_text(encoding="utf-8", errors="replace")
    assert len(warned) == 2, output
    assert all("cannot be read (EACCES)" in m and "every 0.5 s" in m for m in warned)
    assert said("WARNING") == warned, output  # nothing more, fixed or not
    assert [m for m in said("INFO") if "can be read now" in m] == [
        "a folder in the inbox that could not be read can be read now: its files are triaged"
    ]
    # Degraded (exit 0): the service works for every other file, but a person must look.
    assert health == (0, "degraded: inbox: 2 folders it may not read"), health
    assert left == ["SECRET^SAM/chest.dcm"]
    assert output.splitlines()[-1] == (
        "triage-app watch: 1 triaged, 0 quarantined, 0 left in the inbox (still being "
        "written), 1 folder in the inbox it may not read (files not triaged: see the log)"
    )
    assert not [name for name in NAMES_IN_THE_INBOX if name in output], output


# --- the real service, in its own process ---------------------------------------------------------


def part10_bytes(seed: int, index: int = 0) -> bytes:
    buffer = io.BytesIO()
    phantom_dataset(seed, index).save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class WatchProcess:
    """``triage-app watch`` running in its own session (so the test can reap its workers)."""

    def __init__(self, args: list[str], data_dir: Path, env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*WATCH, *args, "--data-dir", str(data_dir)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while "watching the inbox" not in self.output():
            if self.proc.poll() is not None:
                pytest.fail(f"the service exited with {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the service did not start in {timeout_s} s:\n{self.output()}")
            time.sleep(0.05)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"the service exited with {self.proc.returncode}:\n{self.output()}")

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout_s: float = 30) -> int:
        """Signal the service's main process (only) and wait, bounded, for it to exit."""
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the service did not exit within {timeout_s} s of {sig.name}")

    def reap(self) -> None:
        """Kill whatever is left of the service's session: after a SIGKILL its worker
        processes outlive it, as they would until a service manager cleans up."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)


class WatchEnv:
    """One data folder, the service's folders in it, and how to start the service on it."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.data_dir = tmp_path / "data"
        settings = Settings({"paths.data_dir": self.data_dir})
        self.inbox = settings.watch_inbox
        self.done = settings.watch_done
        self.quarantine = settings.watch_quarantine
        self.case_store = settings.case_store_path
        self.staging = tmp_path / "staging"  # where a "scanner" writes before renaming in
        self.staging.mkdir()
        self.inbox.mkdir(parents=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_APP_")}
        self.env.update(
            {
                "TRIAGE_APP_WATCH__SETTLE_S": str(SETTLE_S),
                "TRIAGE_APP_WATCH__RESCAN_S": "1.0",
                "TRIAGE_APP_PROCESSING__WORKERS": "2",
                "TRIAGE_APP_METRICS__WATCH_PORT": "0",
                "XDG_CONFIG_HOME": str(tmp_path / "config"),  # no settings file of this user
            }
        )
        self.started: list[WatchProcess] = []

    def start(self, *args: str, ready: bool = True) -> WatchProcess:
        log = self.tmp_path / f"watch-{len(self.started)}.log"
        service = WatchProcess(list(args), self.data_dir, self.env, log)
        self.started.append(service)
        if ready:
            service.wait_ready()
        return service

    def start_busy(self, sources: list[Path], done_at_least: int) -> WatchProcess:
        """Start the service, drop ``sources`` at once, and return once some are filed."""
        staged = self.stage(sources)
        service = self.start()
        self.drop(staged)

        def busy() -> bool:
            service.check_alive()
            return len(self.done_images()) >= done_at_least

        wait_until(busy, timeout_s=60, what=f"{done_at_least} files in done/")
        return service

    def run_once(self, *args: str, timeout_s: float = 120) -> tuple[int, str]:
        result = subprocess.run(
            [*WATCH, *args, "--once", "--data-dir", str(self.data_dir)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout_s,
            check=False,
        )
        return result.returncode, result.stderr

    def stage(self, sources: list[Path]) -> list[Path]:
        """Copies in the staging folder, ready to be renamed into the inbox."""
        staged = []
        for source in sources:
            staged.append(self.staging / source.name)
            shutil.copyfile(source, staged[-1])
        return staged

    def drop(self, staged: list[Path]) -> None:
        for path in staged:
            path.rename(self.inbox / path.name)

    def done_images(self) -> list[str]:
        return image_names(self.done)

    def inbox_images(self) -> list[str]:
        return image_names(self.inbox)


def image_names(folder: Path) -> list[str]:
    """The images (not sidecars, not hidden temporary files) under ``folder``."""
    if not folder.is_dir():
        return []
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".json")
    )


def sidecar(folder: Path, name: str) -> dict[str, Any]:
    data = json.loads((folder / (name + SIDECAR_SUFFIX)).read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def summary_counts(output: str) -> tuple[int, int]:
    match = re.search(r"triage-app watch: (\d+) triaged, (\d+) quarantined", output)
    assert match, output
    return int(match[1]), int(match[2])


def assert_one_case_per_done_image(env: WatchEnv, names: list[str]) -> None:
    """Each image in done/ has its sidecar; the case store holds exactly those cases, each
    recorded once (no ``reprocessed`` row), and the sidecar is the stored record."""
    with CaseStore.open(env.case_store) as store:
        cases = {c.case_id: c for c in store.list_cases()}
        sidecars = {name: sidecar(env.done, name) for name in names}
        assert sorted(s["case_id"] for s in sidecars.values()) == sorted(cases)
        for name, record in sidecars.items():
            assert record["ok"] is True, (name, record)
            assert record["path"] == str(env.done / name)
            assert record == cases[record["case_id"]].result
            events = [t.event for t in store.history(record["case_id"])]
            assert REPROCESSED not in events, (name, events)
        assert store.failures() == []


@pytest.fixture
def watch_env(tmp_path: Path) -> Iterator[WatchEnv]:
    env = WatchEnv(tmp_path)
    yield env
    for service in env.started:
        service.reap()


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """50 distinct phantom images (distinct cases), generated once for the module."""
    folder = tmp_path_factory.mktemp("phantoms")
    write_phantoms(folder, seed=61, count=50)
    return sorted(folder.iterdir())


@pytest.mark.timeout(120)
def test_fifty_dropped_files_and_one_written_slowly_are_each_triaged_once(
    watch_env: WatchEnv, phantoms: list[Path]
) -> None:
    slow_bytes = part10_bytes(62)
    chunks = 30
    step = -(-len(slow_bytes) // chunks)
    staged = watch_env.stage(phantoms)
    service = watch_env.start()
    slow = watch_env.inbox / "slow.dcm"

    def write_slowly() -> None:
        """Directly under the final name, in chunks, over about three seconds."""
        with slow.open("wb") as out:
            for offset in range(0, len(slow_bytes), step):
                out.write(slow_bytes[offset : offset + step])
                out.flush()
                time.sleep(0.1)

    with ThreadPoolExecutor(1) as thread:
        writing = thread.submit(write_slowly)
        for burst in range(5):  # dropped while the slow file is being written
            watch_env.drop(staged[burst * 10 : burst * 10 + 10])
            time.sleep(0.5)
        writing.result(timeout=30)
    expected = sorted([p.name for p in phantoms] + ["slow.dcm"])

    def all_done() -> bool:
        service.check_alive()
        return watch_env.done_images() == expected

    wait_until(all_done, timeout_s=90, what="51 files in done/")
    assert service.stop() == 0

    assert watch_env.inbox_images() == []
    assert image_names(watch_env.quarantine) == []
    assert (watch_env.done / "slow.dcm").read_bytes() == slow_bytes
    assert sidecar(watch_env.done, "slow.dcm")["ok"] is True
    assert_one_case_per_done_image(watch_env, expected)
    with CaseStore.open(watch_env.case_store) as store:
        assert len(store.list_cases()) == 51
    assert summary_counts(service.output()) == (51, 0)


@pytest.mark.timeout(90)
def test_a_text_file_goes_to_quarantine_and_the_service_keeps_going(
    watch_env: WatchEnv, phantoms: list[Path]
) -> None:
    service = watch_env.start()
    note = watch_env.staging / "notes.txt"
    note.write_text("Patient notes: not an image\n", encoding="utf-8")
    watch_env.drop([note])
    quarantined = watch_env.quarantine / "not_dicom" / "notes.txt"
    wait_until(quarantined.exists, timeout_s=60, what="the text file in quarantine/not_dicom/")

    watch_env.drop(watch_env.stage(phantoms[:1]))  # still at work afterwards
    wait_until(
        lambda: watch_env.done_images() == [phantoms[0].name],
        timeout_s=60,
        what="the image in done/",
    )
    service.check_alive()
    assert service.stop() == 0  # a service stopped on purpose ends well

    reason = json.loads(
        (quarantined.parent / ("notes.txt" + REASON_SUFFIX)).read_text(encoding="utf-8")
    )
    assert reason["code"] == "not_dicom"
    assert reason["source"] == "notes.txt"
    assert reason["message"]
    assert quarantined.read_text(encoding="utf-8") == "Patient notes: not an image\n"
    assert watch_env.inbox_images() == []
    assert_one_case_per_done_image_but_failures(watch_env, [phantoms[0].name], ["not_dicom"])
    assert summary_counts(service.output()) == (1, 1)


def assert_one_case_per_done_image_but_failures(
    env: WatchEnv, names: list[str], failure_codes: list[str]
) -> None:
    with CaseStore.open(env.case_store) as store:
        assert sorted(f.code for f in store.failures()) == sorted(failure_codes)
        assert len(store.list_cases()) == len(names)
        for name in names:
            record = sidecar(env.done, name)
            assert store.get(record["case_id"]) is not None


@pytest.mark.timeout(120)
def test_after_a_sigkill_mid_batch_a_restart_files_every_input_exactly_once(
    watch_env: WatchEnv, phantoms: list[Path]
) -> None:
    sources = phantoms[:40]
    names = sorted(p.name for p in sources)
    service = watch_env.start_busy(sources, done_at_least=3)
    os.kill(service.proc.pid, signal.SIGKILL)
    service.proc.wait(timeout=10)
    done_at_kill = watch_env.done_images()
    service.reap()  # its orphaned workers, as a service manager would

    # Nothing is lost and nothing reached done/ unrecorded. A kill between linking a file into
    # done/ and unlinking it from the inbox leaves the same bytes in both: the restart takes
    # the inbox copy again and it replaces its twin.
    assert 3 <= len(done_at_kill) < len(names), "the kill did not land mid-batch"
    in_inbox = watch_env.inbox_images()
    assert sorted(set(done_at_kill) | set(in_inbox)) == names
    for name in set(done_at_kill) & set(in_inbox):
        assert (watch_env.done / name).read_bytes() == (watch_env.inbox / name).read_bytes()
    with CaseStore.open(watch_env.case_store) as store:
        recorded = {c.case_id for c in store.list_cases()}
    for name in done_at_kill:
        assert sidecar(watch_env.done, name)["case_id"] in recorded

    code, output = watch_env.run_once()

    assert code == 0, output
    assert watch_env.done_images() == names  # each exactly once: no "~1" copies
    assert watch_env.inbox_images() == []
    assert image_names(watch_env.quarantine) == []
    with CaseStore.open(watch_env.case_store) as store:
        cases = {c.case_id: c for c in store.list_cases()}
        assert store.failures() == []
        for name in names:
            record = sidecar(watch_env.done, name)
            assert record["ok"] is True
            assert record == cases[record["case_id"]].result
        assert len(cases) == len(names)
        assert len({sidecar(watch_env.done, n)["case_id"] for n in names}) == len(names)


@pytest.mark.timeout(120)
def test_once_exits_0_on_a_clean_inbox_and_1_when_something_was_quarantined(
    watch_env: WatchEnv, phantoms: list[Path], tmp_path: Path
) -> None:
    watch_env.drop(watch_env.stage(phantoms[:3]))
    code, output = watch_env.run_once()
    assert code == 0, output
    assert watch_env.done_images() == sorted(p.name for p in phantoms[:3])
    assert watch_env.inbox_images() == []
    assert "3 triaged, 0 quarantined" in output

    # An inbox given on the command line; one file there is not an image.
    other = tmp_path / "scanner-share"
    other.mkdir()
    shutil.copyfile(phantoms[3], other / phantoms[3].name)
    (other / "readme.txt").write_text("not an image\n", encoding="utf-8")
    code, output = watch_env.run_once(str(other))
    assert code == 1, output
    assert image_names(other) == []
    assert (watch_env.quarantine / "not_dicom" / "readme.txt").is_file()
    assert phantoms[3].name in watch_env.done_images()
    assert "1 triaged, 1 quarantined" in output

    code, output = watch_env.run_once()  # nothing left: a clean run
    assert code == 0, output
    assert "0 triaged, 0 quarantined" in output


# Every image escalated (the uncertain band is the whole range), and no central server: each
# escalated case is kept on the device, `escalation_held`.
ESCALATE_ALL = {
    "TRIAGE_APP_ESCALATION__THRESHOLDS_MODEL": EDGE_MODEL_KEY,
    "TRIAGE_APP_ESCALATION__NORMAL_BELOW": "0.0",
    "TRIAGE_APP_ESCALATION__ABNORMAL_AT_OR_ABOVE": "1.0",
}


@pytest.mark.timeout(150)
def test_once_counts_the_cases_it_held_on_the_device_and_exits_0_for_them(
    watch_env: WatchEnv, phantoms: list[Path]
) -> None:
    """The summary said only "2 triaged", and an admin running it by hand took the escalated
    cases for sent. Held is no failure (they wait, as queued ones would: exit 0); the count is
    this run's (``queue status`` has them all), and a run that held none prints the line as
    it always was."""
    watch_env.env.update(ESCALATE_ALL)
    watch_env.drop(watch_env.stage(phantoms[:2]))
    code, output = watch_env.run_once()
    assert code == 0, output
    assert output.splitlines()[-1] == (
        "triage-app watch: 2 triaged, 0 quarantined, 0 left in the inbox (still being written), "
        "2 held on the device (no central server: escalation.central_url)"
    )
    with CaseStore.open(watch_env.case_store) as store:
        assert len(store.case_ids(CaseState.ESCALATION_HELD)) == 2

    # Logging JSON Lines (as the unit runs it): the summary is a record too, counts as numbers.
    watch_env.drop(watch_env.stage(phantoms[2:3]))
    code, output = watch_env.run_once("--log-format", "json")
    assert code == 0, output
    records = [json.loads(line) for line in output.splitlines()]  # each line is JSON
    summary = records[-1]
    assert summary.pop("ts")
    assert summary == {
        "level": "INFO",
        "logger": "triage_app.cli_services",
        "message": "1 triaged, 0 quarantined, 0 left in the inbox (still being written), "
        "1 held on the device (no central server: escalation.central_url)",
        "triaged": 1,
        "quarantined": 0,
        "left_incomplete": 0,
        "left_stuck": 0,
        "left_unreadable": 0,
        "held": 1,
    }

    # A central server configured but not reached (its keys unknown): `queue release` sends
    # them once it is.
    watch_env.env["TRIAGE_APP_ESCALATION__CENTRAL_URL"] = f"http://127.0.0.1:{free_port()}"
    watch_env.drop(watch_env.stage(phantoms[3:4]))
    code, output = watch_env.run_once()
    assert code == 0, output
    assert output.splitlines()[-1].endswith(", 1 held on the device (see queue release)")
    del watch_env.env["TRIAGE_APP_ESCALATION__CENTRAL_URL"]

    code, output = watch_env.run_once()  # nothing held in this run: the line of old
    assert code == 0, output
    assert output.endswith(
        "\ntriage-app watch: 0 triaged, 0 quarantined, 0 left in the inbox (still being written)\n"
    )


@pytest.mark.timeout(120)
def test_a_second_service_on_the_same_inbox_refuses_to_start_and_touches_nothing(
    watch_env: WatchEnv, phantoms: list[Path]
) -> None:
    watch_env.drop(watch_env.stage(phantoms[:1]))
    held = lock_folder(watch_env.inbox)  # what a running service holds
    assert held is not None
    try:
        code, output = watch_env.run_once()
    finally:
        os.close(held)

    # 75 (EX_TEMPFAIL), not 2: the other one goes away; the units refuse to restart on 2 only.
    assert code == 75, output
    assert "triage-app: error: inbox_in_use: " in output
    assert "Traceback" not in output
    assert watch_env.inbox_images() == [phantoms[0].name]
    code, output = watch_env.run_once()  # once the other one is gone
    assert code == 0, output
    assert watch_env.done_images() == [phantoms[0].name]


@pytest.mark.timeout(120)
def test_a_second_watch_service_exits_75_so_systemd_restarts_it_and_the_first_goes_on(
    watch_env: WatchEnv,
) -> None:
    """The inbox held by a running service is a passing condition (an admin's ``watch --once``
    as much as a service): exit 75, which the units restart, not 2, which they leave failed."""
    first = watch_env.start()
    second = watch_env.start(ready=False)
    code = second.proc.wait(timeout=60)

    output = second.output()
    assert code == 75, output
    errors = [line for line in output.splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith("triage-app: error: inbox_in_use: "), output
    assert "Traceback" not in output
    first.check_alive()
    assert first.stop(signal.SIGTERM) == 0


@pytest.mark.timeout(120)
def test_sigterm_while_busy_finishes_the_files_in_flight_and_leaves_the_rest(
    watch_env: WatchEnv, phantoms: list[Path]
) -> None:
    sources = phantoms[:30]
    names = sorted(p.name for p in sources)
    service = watch_env.start_busy(sources, done_at_least=2)
    signalled = time.monotonic()
    assert service.stop(signal.SIGTERM, timeout_s=30) == 0
    took_s = time.monotonic() - signalled

    output = service.output()
    in_flight = re.search(r"stopping: finishing (\d+) file\(s\) in flight", output)
    assert in_flight, output
    done, left = watch_env.done_images(), watch_env.inbox_images()
    assert sorted(done + left) == names, "a file was lost or filed twice"
    assert left, f"SIGTERM came too late to leave files untouched ({took_s:.1f} s)"
    # What was in flight was finished: every case recorded has its file in done/ with its
    # sidecar, and the summary counts exactly those.
    assert_one_case_per_done_image(watch_env, done)
    assert summary_counts(output) == (len(done), 0)

    # The next run takes the rest; nothing is triaged twice.
    code, rest_output = watch_env.run_once()
    assert code == 0, rest_output
    assert watch_env.done_images() == names
    assert watch_env.inbox_images() == []
    assert_one_case_per_done_image(watch_env, names)


@pytest.mark.timeout(120)
def test_a_started_service_removes_images_filed_longer_ago_than_the_retention_period(
    watch_env: WatchEnv, phantoms: list[Path]
) -> None:
    # Two images really filed by a first run; one of them then filed 40 days ago.
    watch_env.drop(watch_env.stage(phantoms[:2]))
    code, output = watch_env.run_once()
    assert code == 0, output
    old, recent = phantoms[0].name, phantoms[1].name
    old_case = sidecar(watch_env.done, old)["case_id"]
    backdate(watch_env.done / (old + SIDECAR_SUFFIX), days=40)
    # A case still held for escalation, filed long ago, and a file waiting in quarantine.
    with CaseStore.open(watch_env.case_store) as store:
        store.record_result(make_result("case-held", decision="escalate"), CaseEvent.HOLD)
    note = file_in_done(watch_env, phantoms[2], "held.dcm", "case-held", days=400)
    waiting = watch_env.quarantine / "not_dicom" / "old.txt"
    waiting.parent.mkdir(parents=True)
    waiting.write_text("an admin will look at it\n", encoding="utf-8")
    backdate(waiting, days=400)

    service = start_for_its_retention_pass(watch_env, days=30)

    assert watch_env.done_images() == sorted(["held.dcm", recent])
    assert (watch_env.done / (recent + SIDECAR_SUFFIX)).is_file() and note.is_file()
    assert not (watch_env.done / (old + SIDECAR_SUFFIX)).exists()
    assert waiting.is_file()
    assert "1 filed image(s) removed with their results, 1 kept" in service.output()
    with CaseStore.open(watch_env.case_store) as store:
        assert store.get(old_case) is not None  # the record stays; only the files went


@pytest.mark.expect_log_warnings  # the outbox warns of the case it quarantines
def test_a_started_service_keeps_the_image_a_quarantined_case_needs_to_be_sealed_anew(
    watch_env: WatchEnv, phantoms: list[Path]
) -> None:
    # A central server is configured (unreachable now); the envelope of one case was refused
    # as stale after a long outage: `queue retry` seals it anew from its image in done/.
    url = "http://127.0.0.1:9"
    settings = Settings({"paths.data_dir": watch_env.data_dir, "escalation.central_url": url})
    stale, other = (hashlib.sha256(name.encode()).hexdigest() for name in ("stale", "other"))
    with open_outbox(settings) as outbox:
        outbox.enqueue(stale, b"envelope", reason="uncertain", payload_sha256="0" * 64)
        outbox.quarantine(stale, "stale_envelope: older than the server accepts")
    for name, case_id in (("stale.dcm", stale), ("other.dcm", other)):
        file_in_done(watch_env, phantoms[0], name, case_id, days=40)
    watch_env.env["TRIAGE_APP_ESCALATION__CENTRAL_URL"] = url

    service = start_for_its_retention_pass(watch_env, days=30)

    assert watch_env.done_images() == ["stale.dcm"]
    assert (
        "1 filed image(s) removed with their results, 0 kept because their case is still "
        "held for escalation, 1 because their case waits to be sealed anew" in service.output()
    )


def backdate(path: Path, *, days: float) -> None:
    moment = time.time() - days * 86400
    os.utime(path, (moment, moment))


def file_in_done(env: WatchEnv, source: Path, name: str, case_id: str, *, days: float) -> Path:
    """A copy of ``source`` filed in done/ as ``name`` with the sidecar of ``case_id``,
    ``days`` ago; returns the sidecar."""
    image = env.done / name
    image.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, image)
    note = image.with_name(name + SIDECAR_SUFFIX)
    note.write_text(json.dumps(make_result(case_id, path=str(image)).to_json()), "utf-8")
    backdate(note, days=days)
    return note


def start_for_its_retention_pass(env: WatchEnv, *, days: int) -> WatchProcess:
    """The service started with a done folder kept ``days`` days, stopped (cleanly) once its
    retention pass at start has run."""
    env.env["TRIAGE_APP_INTAKE__DONE_RETENTION_DAYS"] = str(days)
    service = env.start()
    wait_until(
        lambda: f"done folder, images filed over {days} day(s) ago" in service.output(),
        timeout_s=30,
        what="the retention pass at start",
    )
    assert service.stop() == 0
    return service
