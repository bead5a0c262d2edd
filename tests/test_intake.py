"""Intake: files triaged in real worker processes, recorded in a real case store, then filed.

Every test works on real files in a temporary inbox. Most share one module-wide worker pool
(the model loads once); the crash tests use a pool of their own whose workers die, for real, on
a file of a given name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import multiprocessing
import os
import pwd
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, wait
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import phantom_dataset, wait_until, write_bad_inputs, write_phantoms
from triage_app import intake as intake_module
from triage_app.batch import TriagePool, _run_in_worker
from triage_app.config import Settings
from triage_app.errors import InboxInUseError
from triage_app.intake import (
    REASON_SUFFIX,
    RETRY_FIRST_S,
    SIDECAR_SUFFIX,
    FiledOutcome,
    FileIdentity,
    Intake,
    IntakeLayout,
    Unfiled,
    move_durably,
)
from triage_app.ordered_pool import MAX_WORKER_CRASHES, WORKER_CRASHED
from triage_app.paths import ensure_private_dir, fsync_dir, write_locked_temp
from triage_app.pipeline import PipelineConfig
from triage_app.results import CaseResult, FailedInput, InputOutcome
from triage_app.store import REPROCESSED, CaseStore

pytestmark = pytest.mark.timeout(120)

KILLER_PREFIX = "kill-worker"
KILL_ONCE_PREFIX = "kill-once"
SLOW_PREFIX = "slow"  # a large image: its decode takes a while (JPEG 2000: ~0.7 s, DESIGN §7)
VANISH_PREFIX = "vanish"  # removed from the inbox (by its worker) once it has been triaged
SLOW_DECODE_S = 1.0


# --- worker pools ---------------------------------------------------------------------------------


class SharedPool(TriagePool):
    """Workers kept for the whole module: an intake's ``close`` leaves them running."""

    def close(self) -> None:
        pass

    def really_close(self) -> None:
        super().close()


def died_marker(path: Path) -> Path:
    return path.parent.parent / f"{path.name}.died"


def started_marker(path: Path) -> Path:
    return path.parent.parent / f"{path.name}.started"


def _wait_for(folder: Path, pattern: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(folder.glob(pattern)) and time.monotonic() < deadline:
        time.sleep(0.01)


def _die_on_killer(path: Path) -> InputOutcome:
    """Runs in a worker process: a file named ``kill-worker*`` kills it every time, as a
    decoder crash would; ``kill-once*`` only the first time; ``slow*`` takes a second longer.
    A killer and a slow file that are both in flight wait for each other to start, so the
    crash always catches the slow file in flight. Markers beside the inbox (``.started``)
    say what ran. A ``vanish*`` file is removed once triaged, as an operator might remove it
    while it is in flight. Every other file is triaged as usual."""
    beside_inbox = path.parent.parent
    started_marker(path).touch()
    if path.name.startswith(SLOW_PREFIX):
        _wait_for(beside_inbox, f"{KILLER_PREFIX}*.started")
        time.sleep(SLOW_DECODE_S)
    if path.name.startswith(KILLER_PREFIX):
        _wait_for(beside_inbox, f"{SLOW_PREFIX}*.started")
        os._exit(70)
    if path.name.startswith(KILL_ONCE_PREFIX):
        try:
            os.close(os.open(died_marker(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            pass
        else:
            os._exit(70)
    outcome = _run_in_worker(path)
    if path.name.startswith(VANISH_PREFIX):
        path.unlink()
    return outcome


HANG_PREFIX = "hang"  # its decode never ends, as a decoder in an endless loop


def _hang_on_hanger(path: Path) -> InputOutcome:
    """Runs in a worker process: a ``hang*`` file never finishes; others are triaged."""
    if path.name.startswith(HANG_PREFIX):
        time.sleep(3600)
    return _run_in_worker(path)


class HangPool(TriagePool):
    """A real pool whose worker never returns from a ``hang*`` file."""

    started: set[multiprocessing.process.BaseProcess]

    def submit(self, path: Path) -> Future[InputOutcome]:
        future = self._submit(_hang_on_hanger, path)
        if not hasattr(self, "started"):
            self.started = set()
        self.started.update((self._executor._processes or {}).values())
        return future


def _big_result_later(marker_dir: Path) -> bytes:
    """Runs in a worker: says it started, then returns more than a pipe holds, later."""
    (marker_dir / str(os.getpid())).touch()
    time.sleep(2.0)
    return b"x" * (4 << 20)


class BigResultPool(TriagePool):
    def submit_big(self, marker_dir: Path) -> Future[bytes]:
        return self._submit(_big_result_later, marker_dir)


def test_restarting_a_broken_pool_leaves_no_worker_behind(
    pipeline_config: PipelineConfig, tmp_path: Path
) -> None:
    """One worker dies while the other works: the broken pool SIGTERMs the other (ignored by
    service workers) and waits for it, while it blocks sending a result nobody reads. It
    stayed for ever, and so did the process at exit."""
    pool = BigResultPool(pipeline_config, workers=2)
    try:
        for _ in range(2):
            pool.submit_big(tmp_path)
        wait_until(lambda: len(list(tmp_path.iterdir())) == 2, what="both workers at work")
        workers = {p.pid: p for p in (pool._executor._processes or {}).values()}
        dying, survivor = (workers[int(m.name)] for m in sorted(tmp_path.iterdir()))
        dying.kill()
        time.sleep(3.0)  # the survivor has finished and is stuck sending its result
        pool.restart()
        wait_until(lambda: not survivor.is_alive(), timeout_s=15, what="the survivor's end")
    finally:
        pool.stop_workers()
        pool.close()


class KillerPool(TriagePool):
    """A real pool whose worker process exits hard on a ``kill-worker*`` file."""

    def submit(self, path: Path) -> Future[InputOutcome]:
        return self._submit(_die_on_killer, path)


@pytest.fixture(scope="module")
def pipeline_config(tmp_path_factory: pytest.TempPathFactory) -> PipelineConfig:
    data = tmp_path_factory.mktemp("pool-data")
    return PipelineConfig.from_settings(Settings({"paths.data_dir": data}))


@pytest.fixture(scope="module")
def shared_pool(pipeline_config: PipelineConfig) -> Iterator[SharedPool]:
    pool = SharedPool(pipeline_config, workers=1)
    yield pool
    pool.really_close()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings({"paths.data_dir": tmp_path / "data", "processing.workers": 1})


@pytest.fixture
def layout(tmp_path: Path) -> IntakeLayout:
    return IntakeLayout(tmp_path / "inbox", tmp_path / "done", tmp_path / "quarantine")


@pytest.fixture
def make_intake(settings: Settings, layout: IntakeLayout, shared_pool: SharedPool) -> Iterator[Any]:
    """``make_intake(incomplete_timeout_s=...)``: an intake on the shared pool, closed after.

    Making one closes the one made before: an intake holds its inbox for as long as it is open.
    """
    made: list[Intake] = []

    def make(**kwargs: Any) -> Intake:
        kwargs.setdefault("pool", shared_pool)
        if made:
            made[-1].close()
        made.append(Intake(settings, layout, **kwargs))
        return made[-1]

    yield make
    if made:
        made[-1].close()


# --- helpers --------------------------------------------------------------------------------------


def file_all(intake: Intake, paths: list[Path]) -> dict[str, FiledOutcome]:
    """Hand ``paths`` over and wait until each is filed (or deferred); by file name."""
    assert intake.submit(paths) == len(paths)
    filed = intake.drain()
    by_name = {f.source.name: f for f in filed}
    assert len(by_name) == len(filed) == len(paths), [f.source for f in filed]
    return by_name


def read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def files_under(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


def write_phantom(path: Path, seed: int, index: int = 0) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    phantom_dataset(seed, index).save_as(path, enforce_file_format=True)
    return path.read_bytes()


def set_age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


# --- good and bad files ---------------------------------------------------------------------------


def test_a_triaged_file_moves_to_done_beside_a_sidecar_equal_to_its_case_record(
    make_intake: Any, layout: IntakeLayout, settings: Settings
) -> None:
    write_phantoms(layout.inbox, seed=21, count=2)
    originals = {p.name: p.read_bytes() for p in layout.inbox.iterdir()}
    intake = make_intake()

    filed = file_all(intake, sorted(layout.inbox.iterdir()))

    assert list(layout.inbox.iterdir()) == []
    with CaseStore.open(settings.case_store_path) as store:
        assert len(store.list_cases()) == 2
        for name, outcome in filed.items():
            assert isinstance(outcome.outcome, CaseResult)
            assert not outcome.deferred and not outcome.quarantined
            assert outcome.filed_as == layout.done / name
            assert outcome.filed_as.read_bytes() == originals[name]
            sidecar = read_json(layout.done / (name + SIDECAR_SUFFIX))
            stored = store.get(outcome.outcome.case_id)
            assert stored is not None
            assert sidecar == stored.result
            assert sidecar["ok"] is True
            assert sidecar["path"] == str(layout.done / name)  # where the file now lives
            assert sidecar["case_id"] == outcome.outcome.case_id
            assert outcome.submitted_at <= outcome.finished_at
        assert store.failures() == []
    assert files_under(layout.quarantine) == []


def test_a_bad_file_goes_to_quarantine_under_its_code_with_a_reason_file(
    make_intake: Any, layout: IntakeLayout, settings: Settings
) -> None:
    expected = write_bad_inputs(layout.inbox / "bad")
    intake = make_intake()  # incomplete timeout 0: a cut-short file is refused at once

    filed = file_all(intake, sorted((layout.inbox / "bad").iterdir()))

    assert files_under(layout.inbox) == []
    assert files_under(layout.done) == []
    for name, code in expected.items():
        outcome = filed[name]
        assert outcome.quarantined
        assert isinstance(outcome.outcome, FailedInput)
        assert outcome.outcome.code == code
        target = layout.quarantine / code / "bad" / name
        assert outcome.filed_as == target
        assert target.is_file()
        reason = read_json(target.with_name(name + REASON_SUFFIX))
        assert reason["code"] == code
        assert reason["message"] == outcome.outcome.message
        assert reason["message"]
        assert reason["source"] == f"bad/{name}"
        assert "quarantined_at" in reason
    with CaseStore.open(settings.case_store_path) as store:
        assert store.list_cases() == []
        assert sorted(f.code for f in store.failures()) == sorted(expected.values())


def test_files_whose_names_are_not_utf8_are_triaged_recorded_and_filed(
    make_intake: Any, layout: IntakeLayout, settings: Settings
) -> None:
    # Latin-1 "Müller" from a Windows share: bytes that are not UTF-8 in a name and a folder.
    folder = layout.inbox / os.fsdecode(b"Station M\xfcller")
    scan = folder / os.fsdecode(b"b_M\xfcller.dcm")
    notes = folder / os.fsdecode(b"b_M\xfcller.txt")
    image = write_phantom(scan, seed=35)
    notes.write_text("not an image\n", encoding="utf-8")
    intake = make_intake()

    filed = file_all(intake, [scan, notes])

    assert files_under(layout.inbox) == []
    done = layout.done / "Station M\\xfcller" / "b_M\\xfcller.dcm"  # the name, as text
    assert filed[scan.name].filed_as == done and done.read_bytes() == image
    case = filed[scan.name].outcome
    assert isinstance(case, CaseResult)
    sidecar = read_json(done.with_name(done.name + SIDECAR_SUFFIX))
    assert sidecar["path"] == str(done)
    refused = layout.quarantine / "not_dicom" / "Station M\\xfcller" / "b_M\\xfcller.txt"
    assert filed[notes.name].quarantined and filed[notes.name].filed_as == refused
    assert refused.is_file()
    reason = read_json(refused.with_name(refused.name + REASON_SUFFIX))
    assert reason["source"] == "Station M\\xfcller/b_M\\xfcller.txt"
    with CaseStore.open(settings.case_store_path) as store:
        stored = store.get(case.case_id)
        assert stored is not None and stored.result == sidecar
        # The record names the file where it lives: a held case's release can read it again.
        assert Path(stored.result["path"]).read_bytes() == image
        assert [(f.path, f.code) for f in store.failures()] == [(str(refused), "not_dicom")]


def test_a_second_file_of_the_same_name_is_filed_beside_the_first(
    make_intake: Any, layout: IntakeLayout, settings: Settings
) -> None:
    intake = make_intake()
    first = write_phantom(layout.inbox / "scan.dcm", seed=31)
    file_all(intake, [layout.inbox / "scan.dcm"])
    first_sidecar = (layout.done / "scan.dcm.json").read_bytes()
    second = write_phantom(layout.inbox / "scan.dcm", seed=32)
    assert second != first

    again = file_all(intake, [layout.inbox / "scan.dcm"])["scan.dcm"]

    assert again.filed_as == layout.done / "scan~1.dcm"
    assert (layout.done / "scan.dcm").read_bytes() == first
    assert (layout.done / "scan~1.dcm").read_bytes() == second
    assert (layout.done / "scan.dcm.json").read_bytes() == first_sidecar
    assert isinstance(again.outcome, CaseResult)
    assert read_json(layout.done / "scan~1.dcm.json")["case_id"] == again.outcome.case_id
    assert files_under(layout.done) == [
        Path("scan.dcm"),
        Path("scan.dcm.json"),
        Path("scan~1.dcm"),
        Path("scan~1.dcm.json"),
    ]
    with CaseStore.open(settings.case_store_path) as store:
        assert len(store.list_cases()) == 2

    # The same for quarantine: the second reason file sits beside the second file.
    for text in ("first note\n", "second note\n"):
        (layout.inbox / "note.txt").write_text(text, encoding="utf-8")
        file_all(intake, [layout.inbox / "note.txt"])
    folder = layout.quarantine / "not_dicom"
    assert (folder / "note.txt").read_text(encoding="utf-8") == "first note\n"
    assert (folder / "note~1.txt").read_text(encoding="utf-8") == "second note\n"
    assert read_json(folder / ("note~1.txt" + REASON_SUFFIX))["code"] == "not_dicom"
    assert (folder / ("note.txt" + REASON_SUFFIX)).is_file()


def test_the_same_image_sent_again_takes_its_twins_place_as_the_same_case(
    make_intake: Any, layout: IntakeLayout, settings: Settings
) -> None:
    data = write_phantom(layout.inbox / "scan.dcm", seed=33)
    intake = make_intake()
    first = file_all(intake, [layout.inbox / "scan.dcm"])["scan.dcm"]
    (layout.inbox / "scan.dcm").write_bytes(data)  # the scanner sends the study again

    again = file_all(intake, [layout.inbox / "scan.dcm"])["scan.dcm"]

    assert again.filed_as == layout.done / "scan.dcm"
    assert files_under(layout.done) == [Path("scan.dcm"), Path("scan.dcm.json")]
    assert isinstance(first.outcome, CaseResult) and isinstance(again.outcome, CaseResult)
    assert again.outcome.case_id == first.outcome.case_id
    with CaseStore.open(settings.case_store_path) as store:
        cases = store.list_cases()
        assert [c.case_id for c in cases] == [first.outcome.case_id]
        assert [t.event for t in store.history(first.outcome.case_id)].count(REPROCESSED) == 1
        assert read_json(layout.done / "scan.dcm.json") == cases[0].result


def test_a_file_recorded_before_a_crash_is_triaged_again_into_the_same_case(
    make_intake: Any, layout: IntakeLayout, settings: Settings
) -> None:
    """A crash after the case was recorded and the sidecar written, before the move: on
    restart the file is still in the inbox and a stale sidecar sits in done/."""
    write_phantom(layout.inbox / "scan.dcm", seed=41)
    first = file_all(make_intake(), [layout.inbox / "scan.dcm"])["scan.dcm"]
    assert isinstance(first.outcome, CaseResult)
    (layout.done / "scan.dcm").rename(layout.inbox / "scan.dcm")  # as if never moved
    assert (layout.done / "scan.dcm.json").is_file()

    again = file_all(make_intake(), [layout.inbox / "scan.dcm"])["scan.dcm"]

    assert isinstance(again.outcome, CaseResult)
    assert again.outcome.case_id == first.outcome.case_id
    # The sidecar without its image was crash debris: the name is taken over, not "~1".
    assert again.filed_as == layout.done / "scan.dcm"
    assert files_under(layout.done) == [Path("scan.dcm"), Path("scan.dcm.json")]
    assert files_under(layout.inbox) == []
    with CaseStore.open(settings.case_store_path) as store:
        cases = store.list_cases()
        assert [c.case_id for c in cases] == [first.outcome.case_id]
        events = [t.event for t in store.history(first.outcome.case_id)]
        assert events.count(REPROCESSED) == 1
        assert events[-1] == REPROCESSED
        assert read_json(layout.done / "scan.dcm.json") == cases[0].result


@pytest.mark.parametrize("left", ["in_the_inbox", "in_both_places"])
def test_a_failure_recorded_before_a_crash_is_listed_once(
    make_intake: Any, layout: IntakeLayout, settings: Settings, left: str
) -> None:
    """A kill after the failure was recorded (and its reason file written) but before the file
    left the inbox, or in the middle of the move (linked into quarantine, not yet removed from
    the inbox): on restart the same file is refused again and must not be listed twice."""
    data = b"Patient notes: not an image\n"
    intake = make_intake()
    (layout.inbox / "notes.txt").write_bytes(data)
    first = file_all(intake, [layout.inbox / "notes.txt"])["notes.txt"]
    target = layout.quarantine / "not_dicom" / "notes.txt"
    assert first.filed_as == target
    if left == "in_the_inbox":
        target.rename(layout.inbox / "notes.txt")  # as if never moved
    else:
        os.link(target, layout.inbox / "notes.txt")

    again = file_all(make_intake(), [layout.inbox / "notes.txt"])["notes.txt"]

    assert again.quarantined
    assert again.filed_as == target
    assert files_under(layout.inbox) == []
    assert files_under(layout.quarantine) == [
        Path("not_dicom/notes.txt"),
        Path("not_dicom/notes.txt" + REASON_SUFFIX),
    ]
    with CaseStore.open(settings.case_store_path) as store:
        (failure,) = store.failures()
    assert (failure.path, failure.code) == (str(target), "not_dicom")
    assert failure.input_sha256 == hashlib.sha256(data).hexdigest()

    # A different bad file under the same name is another failed input, with a row of its own.
    (layout.inbox / "notes.txt").write_bytes(b"other notes, not an image either\n")
    other = file_all(make_intake(), [layout.inbox / "notes.txt"])["notes.txt"]
    assert other.filed_as == layout.quarantine / "not_dicom" / "notes~1.txt"
    with CaseStore.open(settings.case_store_path) as store:
        assert [(f.path, f.code) for f in store.failures()] == [
            (str(target), "not_dicom"),
            (str(other.filed_as), "not_dicom"),
        ]


# --- files still being written --------------------------------------------------------------------


def test_a_cut_short_file_is_deferred_while_recent_and_quarantined_once_old(
    make_intake: Any, layout: IntakeLayout, settings: Settings
) -> None:
    expected = write_bad_inputs(layout.inbox)
    incomplete = sorted(n for n, code in expected.items() if code in {"truncated", "empty_file"})
    assert incomplete == ["empty.dcm", "truncated.dcm"]
    paths = [layout.inbox / n for n in incomplete]
    intake = make_intake(incomplete_timeout_s=60.0)

    deferred = file_all(intake, paths)

    for name, outcome in deferred.items():
        assert outcome.deferred
        assert not outcome.quarantined
        assert outcome.filed_as is None
        assert isinstance(outcome.outcome, FailedInput)
        assert outcome.outcome.code == expected[name]
        assert (layout.inbox / name).is_file()
    assert not intake.is_in_flight(paths[0])
    assert files_under(layout.quarantine) == []
    with CaseStore.open(settings.case_store_path) as store:
        assert store.failures() == []
        assert store.list_cases() == []

    # The writer never came back: once older than the timeout, the file is refused.
    for path in paths:
        set_age(path, 120)
    refused = file_all(intake, paths)

    for name, outcome in refused.items():
        assert outcome.quarantined
        assert outcome.filed_as == layout.quarantine / expected[name] / name
        reason = read_json(layout.quarantine / expected[name] / (name + REASON_SUFFIX))
        assert reason["code"] == expected[name]
    with CaseStore.open(settings.case_store_path) as store:
        assert sorted(f.code for f in store.failures()) == ["empty_file", "truncated"]


def test_a_cut_short_file_waited_for_is_logged_once_and_once_more_when_quarantined(
    make_intake: Any, layout: IntakeLayout, caplog: pytest.LogCaptureFixture
) -> None:
    """A zero-byte file (a writer may have created it and not written yet) is read again each
    time it settles, every 2 s, for the whole wait: it filled the log with one line a read."""
    layout.inbox.mkdir(parents=True)
    path = layout.inbox / "DOE^JANE.dcm"
    path.write_bytes(b"")
    intake = make_intake(incomplete_timeout_s=60.0)

    for _ in range(3):
        assert file_all(intake, [path])[path.name].deferred
    set_age(path, 120)  # the writer never came back
    assert file_all(intake, [path])[path.name].quarantined

    assert intake_messages(caplog) == [
        "a file is cut short (empty_file) and may still be being written: it is read again as "
        "it settles, and quarantined if it stays so 60 s after its last change",
        "a file still cut short when the 60 s wait was over went to quarantine: empty_file",
    ]


def test_a_file_cut_just_before_its_pixel_data_is_deferred_while_recent_and_refused_once_old(
    make_intake: Any, layout: IntakeLayout, settings: Settings
) -> None:
    """Cut there, a file still being written reads as a whole header without pixels."""
    data = write_phantom(layout.inbox / "whole.tmp", seed=49)
    (layout.inbox / "whole.tmp").unlink()
    path = layout.inbox / "cut.dcm"
    path.write_bytes(data[: data.index(b"\xe0\x7f\x10\x00")])  # up to the Pixel Data tag
    intake = make_intake(incomplete_timeout_s=60.0)

    deferred = file_all(intake, [path])["cut.dcm"]

    assert isinstance(deferred.outcome, FailedInput)
    assert deferred.outcome.code == "no_pixel_data"
    assert deferred.deferred and deferred.filed_as is None
    assert path.is_file()
    assert files_under(layout.quarantine) == []
    with CaseStore.open(settings.case_store_path) as store:
        assert store.failures() == []

    set_age(path, 120)  # the writer never came back
    refused = file_all(intake, [path])["cut.dcm"]

    assert refused.quarantined
    assert refused.filed_as == layout.quarantine / "no_pixel_data" / "cut.dcm"


def test_a_file_that_is_complete_when_read_again_is_triaged(
    make_intake: Any, layout: IntakeLayout, settings: Settings
) -> None:
    whole = phantom_dataset(43, 0)
    path = layout.inbox / "growing.dcm"
    layout.inbox.mkdir(parents=True, exist_ok=True)
    whole.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    intake = make_intake(incomplete_timeout_s=60.0)
    assert file_all(intake, [path])["growing.dcm"].deferred

    path.write_bytes(data)  # the writer finished
    outcome = file_all(intake, [path])["growing.dcm"]

    assert isinstance(outcome.outcome, CaseResult)
    assert (layout.done / "growing.dcm").read_bytes() == data
    with CaseStore.open(settings.case_store_path) as store:
        assert [c.case_id for c in store.list_cases()] == [outcome.outcome.case_id]
        assert REPROCESSED not in [t.event for t in store.history(outcome.outcome.case_id)]
        assert store.failures() == []


def test_a_file_in_flight_is_not_taken_twice_and_a_closed_intake_takes_nothing(
    make_intake: Any, layout: IntakeLayout, settings: Settings
) -> None:
    write_phantom(layout.inbox / "scan.dcm", seed=44)
    path = layout.inbox / "scan.dcm"
    intake = make_intake()
    assert intake.submit([path, path]) == 1
    assert intake.is_in_flight(path)
    assert intake.submit([path]) == 0

    filed = intake.close()

    assert [f.source for f in filed] == [path]
    assert intake.in_flight == 0
    assert not intake.is_in_flight(path)
    write_phantom(layout.inbox / "late.dcm", seed=45)
    assert intake.submit([layout.inbox / "late.dcm"]) == 0
    assert (layout.inbox / "late.dcm").is_file()
    with CaseStore.open(settings.case_store_path) as store:
        assert len(store.list_cases()) == 1


def test_a_path_outside_the_inbox_is_refused(make_intake: Any, tmp_path: Path) -> None:
    intake = make_intake()
    with pytest.raises(ValueError, match=r"subpath|inbox"):
        intake.submit([tmp_path / "elsewhere.dcm"])
    assert intake.in_flight == 0


# --- files that change or go while they are triaged ----------------------------------------------


def intake_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.get_records("call") if r.name == "triage_app.intake"]


def test_a_file_removed_while_it_is_triaged_is_forgotten_and_the_others_are_filed(
    make_intake: Any, layout: IntakeLayout, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    write_phantoms(layout.inbox, seed=22, count=2)
    removed, kept = sorted(layout.inbox.iterdir())
    intake = make_intake()
    assert intake.submit([removed, kept]) == 2
    wait(list(intake._futures), timeout=60)
    removed.unlink()  # an operator cleans up the inbox meanwhile

    filed = {f.source.name: f for f in [*intake.collect(timeout_s=1), *intake.drain()]}

    assert filed[removed.name].unfiled is Unfiled.GONE
    assert filed[removed.name].filed_as is None
    assert filed[kept.name].filed_as == layout.done / kept.name
    assert intake.in_flight == 0
    # Nothing was recorded for the removed file and no sidecar is left without its image.
    assert files_under(layout.done) == [Path(kept.name), Path(kept.name + SIDECAR_SUFFIX)]
    with CaseStore.open(settings.case_store_path) as store:
        assert len(store.list_cases()) == 1
    messages = intake_messages(caplog)
    assert sum("removed from the inbox" in m for m in messages) == 1
    assert not [m for m in messages if str(layout.inbox) in m or removed.name in m]


@pytest.mark.parametrize("how", ["renamed_over", "rewritten_in_place"])
def test_a_file_replaced_while_it_is_triaged_is_left_and_its_new_image_triaged(
    make_intake: Any, layout: IntakeLayout, settings: Settings, how: str
) -> None:
    path = layout.inbox / "scan.dcm"
    write_phantom(path, seed=7, index=0)
    intake = make_intake()
    assert intake.submit([path]) == 1
    wait(list(intake._futures), timeout=60)
    # The scanner sends a corrected image under the same name meanwhile.
    if how == "renamed_over":
        new = write_phantom(layout.inbox / ".scan.tmp", seed=7, index=1)
        (layout.inbox / ".scan.tmp").replace(path)
    else:
        new = write_phantom(path, seed=7, index=1)

    (changed,) = intake.drain()

    assert changed.unfiled is Unfiled.CHANGED
    assert changed.filed_as is None
    assert path.read_bytes() == new  # left in the inbox for the next pass
    assert files_under(layout.done) == []
    with CaseStore.open(settings.case_store_path) as store:
        assert store.list_cases() == []

    again = file_all(intake, [path])["scan.dcm"]

    assert isinstance(again.outcome, CaseResult) and isinstance(changed.outcome, CaseResult)
    assert again.outcome.case_id != changed.outcome.case_id  # the new image's own case
    assert (layout.done / "scan.dcm").read_bytes() == new
    assert read_json(layout.done / "scan.dcm.json")["case_id"] == again.outcome.case_id
    with CaseStore.open(settings.case_store_path) as store:
        assert [c.case_id for c in store.list_cases()] == [again.outcome.case_id]


@pytest.mark.expect_log_warnings
def test_a_file_removed_in_the_batch_of_a_worker_crash_leaves_nothing_waiting(
    settings: Settings, layout: IntakeLayout, pipeline_config: PipelineConfig
) -> None:
    """One worker triages the vanishing file, then dies on the next: both come back from the
    same wait. Neither may stop the intake nor leave a file handed over with nothing working
    on it (``close`` would wait for it for ever)."""
    vanish = layout.inbox / f"{VANISH_PREFIX}.dcm"
    once = layout.inbox / f"{KILL_ONCE_PREFIX}.dcm"
    write_phantom(vanish, seed=56)
    write_phantom(once, seed=57)
    pool = KillerPool(pipeline_config, workers=1)

    with Intake(settings, layout, pool=pool) as intake:
        assert intake.submit([vanish, once]) == 2
        wait(list(intake._futures), timeout=60)
        filed = {f.source.name: f for f in [*intake.collect(timeout_s=1), *intake.drain()]}
        assert intake.in_flight == 0

    assert died_marker(once).is_file()
    assert filed[vanish.name].unfiled is Unfiled.GONE
    assert isinstance(filed[once.name].outcome, CaseResult)
    assert files_under(layout.done) == [Path(once.name), Path(once.name + SIDECAR_SUFFIX)]
    assert files_under(layout.inbox) == []


# --- when recording or filing fails --------------------------------------------------------------


def back_off_over(intake: Intake) -> None:
    wait_until(lambda: intake.room > 0, timeout_s=RETRY_FIRST_S + 10, what="the back-off's end")


@pytest.mark.timeout(120)
@pytest.mark.expect_log_warnings
def test_an_outcome_the_busy_case_store_refuses_stays_in_the_inbox_for_a_retry(
    make_intake: Any, layout: IntakeLayout, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Another writer holds the case store past its busy timeout (10 s)."""
    path = layout.inbox / "DOE^JANE.dcm"
    write_phantom(path, seed=47)
    intake = make_intake()
    other = sqlite3.connect(settings.case_store_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        refused = file_all(intake, [path])[path.name]
        assert intake.room == 0  # backing off: nothing more is taken for now
    finally:
        other.close()

    assert (refused.unfiled, refused.retry_code) == (Unfiled.RETRY, "store_error")
    assert path.is_file()
    assert files_under(layout.done) == []
    errors = [r.getMessage() for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "store_error" in errors[0]
    assert "DOE" not in errors[0] and str(layout.inbox) not in errors[0]

    back_off_over(intake)
    again = file_all(intake, [path])[path.name]

    assert (again.filed_as, again.retry_code) == (layout.done / path.name, None)
    with CaseStore.open(settings.case_store_path) as store:
        assert len(store.list_cases()) == 1


@pytest.mark.expect_log_warnings
def test_a_file_that_cannot_be_moved_stays_in_the_inbox_and_is_filed_once_it_can(
    make_intake: Any, layout: IntakeLayout, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    path = layout.inbox / "sub" / "scan.dcm"
    write_phantom(path, seed=48)
    layout.create()
    (layout.done / "sub").write_bytes(b"in the way")  # done/sub/ cannot be made
    intake = make_intake()

    refused = file_all(intake, [path])["scan.dcm"]

    assert (refused.unfiled, refused.retry_code) == (Unfiled.RETRY, "EEXIST")
    assert path.is_file()
    assert intake.room == 0
    errors = [r.getMessage() for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "EEXIST" in errors[0] and str(layout.done) not in errors[0]

    (layout.done / "sub").unlink()
    back_off_over(intake)
    again = file_all(intake, [path])["scan.dcm"]

    assert again.filed_as == layout.done / "sub" / "scan.dcm"
    assert files_under(layout.inbox) == []
    with CaseStore.open(settings.case_store_path) as store:
        assert len(store.list_cases()) == 1  # recorded at the first try, the same case again


# --- files the service user may not read, or not take out of the inbox ---------------------------

# Root reads and moves files whatever their mode, and these tests run as root: the intake runs in
# a child process as ``nobody`` (see service_user_command) while the test, as root, leaves files
# in its inbox that nobody may read, in a folder nobody may change, as a site admin might.
NOBODY = pwd.getpwnam("nobody")
AS_ROOT = os.geteuid() == 0


def service_user_command(*args: str | Path) -> list[str]:
    """A command line run as an unprivileged service user: ``nobody`` when the tests run as
    root; the tests' own user otherwise (file modes then refuse it, as they refuse nobody)."""
    prefix = (
        ["setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}", "--clear-groups"]
        if AS_ROOT
        else []
    )
    return [*prefix, sys.executable, *map(str, args)]


def give_to_service_user(top: Path, *, recursive: bool = True) -> None:
    """``top`` (and with ``recursive`` everything under it) the service user's, as its own
    files would be: a folder it may change, a file it may read."""
    for path in [top, *top.rglob("*")] if recursive else [top]:
        if AS_ROOT:
            os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
        elif path.is_dir():
            path.chmod(0o755)


def keep_from_service_user(path: Path, *, readable: bool = False) -> None:
    """A file the service user may not read (or, ``readable``, only read), or a folder it may
    list but not change: root's, as an admin copying as root leaves them."""
    if path.is_dir():
        mode = 0o755 if AS_ROOT else 0o555
    elif readable:
        mode = 0o644
    else:
        mode = 0o600 if AS_ROOT else 0o000
    if AS_ROOT:
        os.chown(path, 0, 0)
    path.chmod(mode)


# Put first in a script run as the service user: it triages in a thread of its own process, not
# in worker processes, which start the interpreter again from where it lives (here: root's home,
# which the service user cannot enter). What is tested, the filing, is the same.
THREAD_TRIAGE = """
from concurrent.futures import ThreadPoolExecutor
from triage_app import batch, intake
from triage_app.pipeline import TriagePipeline

class ThreadTriagePool(batch.TriagePool):
    def _new_executor(self):
        self._pipeline = TriagePipeline(self._config)
        return ThreadPoolExecutor(self._workers)

    def submit(self, path):
        return self._executor.submit(self._pipeline.run, path)

intake.TriagePool = ThreadTriagePool
"""


@contextlib.contextmanager
def service_user_home() -> Iterator[Path]:
    """A folder of the service user's, in one it can reach (pytest's temporary folders are
    the tests' user's alone), removed afterwards; the folder above it is the test's."""
    base = Path(tempfile.mkdtemp(prefix="triage-service-user-"))
    base.chmod(0o755)
    home = base / "home"
    home.mkdir()
    give_to_service_user(home)
    try:
        yield home
    finally:
        for folder in [home, *(p for p in home.rglob("*") if p.is_dir())]:
            folder.chmod(0o755)  # a folder kept from the service user (not root) can go
        shutil.rmtree(base)


@pytest.fixture
def service_home() -> Iterator[Path]:
    with service_user_home() as home:
        yield home


def test_move_durably_renames_a_file_it_may_not_read_and_syncs_both_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Root may read it: the refusal is simulated at open() (the real one is below, as nobody).
    Neither linked nor copied, it is renamed, and both folders are synced: durable."""
    source = tmp_path / "inbox" / "scan.dcm"
    source.parent.mkdir()
    source.write_bytes(b"bytes nobody may read")
    target = tmp_path / "quarantine" / "scan.dcm"
    target.parent.mkdir()
    inode = source.stat().st_ino
    real_open = os.open

    def refuse(path: Any, *args: Any, **kwargs: Any) -> int:
        if Path(path) == source:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, *args, **kwargs)

    synced: list[Path] = []

    def sync(folder: Path) -> None:
        synced.append(folder)
        fsync_dir(folder)

    monkeypatch.setattr(os, "open", refuse)
    monkeypatch.setattr(intake_module, "fsync_dir", sync)
    assert move_durably(source, target, expected=FileIdentity.read(source))

    assert not source.exists()
    assert target.stat().st_ino == inode  # renamed, not copied
    assert synced == [target.parent, source.parent]
    assert sorted(p.name for p in target.parent.iterdir()) == ["scan.dcm"]


# Moves, as the service user, what argv[1] holds (see the test below) and prints each result.
_MOVES_AS_THE_SERVICE_USER = """
import json, sys
from pathlib import Path
from triage_app import intake

home = Path(sys.argv[1])
inbox, done, quarantine = home / "inbox", home / "done", home / "quarantine"

def attempt(move):
    try:
        return "moved" if move() else "not moved"
    except intake.StuckInInboxError as err:
        return f"stuck {intake._why(err)}"

def refusal(path):
    refused = intake._cannot_take_out(path)
    return None if refused is None else intake._why(refused)

jane = inbox / "DOE^JANE.dcm"
john = inbox / "locked" / "DOE^JOHN.dcm"
smith = inbox / "locked" / "SMITH^ANN.dcm"
print(json.dumps({
    "checked, its own folder": refusal(jane),
    "checked, locked folder": refusal(john),
    "checked, sticky folder": refusal(inbox / "sticky" / "SMITH^BOB.dcm"),
    "unreadable": attempt(lambda: intake.move_durably(
        jane, quarantine / "DOE^JANE.dcm", expected=intake.FileIdentity.read(jane))),
    "unreadable, locked folder": attempt(lambda: intake._file_with_note(
        john, quarantine / "DOE^JOHN.dcm", intake.REASON_SUFFIX, {"code": "unreadable"},
        intake.FileIdentity.read(john))),
    "readable, locked folder": attempt(lambda: intake.move_durably(
        smith, done / "SMITH^ANN.dcm", expected=intake.FileIdentity.read(smith))),
}))
"""


def test_as_the_service_user_an_unreadable_file_is_moved_and_one_it_may_not_take_out_is_left(
    service_home: Path,
) -> None:
    """A file it may not read is renamed (the same inode, still root's); from a folder it may
    not change, nothing is moved and nothing is left in the target folders: not the reason
    file, nor a copy (a root-owned file nobody may write cannot be hard-linked either)."""
    inbox = service_home / "inbox"
    jane = inbox / "DOE^JANE.dcm"
    john = inbox / "locked" / "DOE^JOHN.dcm"
    smith = inbox / "locked" / "SMITH^ANN.dcm"
    bob = inbox / "sticky" / "SMITH^BOB.dcm"
    for path, seed in ((jane, 95), (john, 96), (smith, 97), (bob, 98)):
        write_phantom(path, seed=seed)
    for folder in ("done", "quarantine"):
        (service_home / folder).mkdir()
    give_to_service_user(service_home)
    keep_from_service_user(jane)
    keep_from_service_user(john)
    keep_from_service_user(smith, readable=True)
    keep_from_service_user(inbox / "locked")
    keep_from_service_user(bob, readable=True)
    keep_from_service_user(inbox / "sticky")
    (inbox / "sticky").chmod(0o1777)  # a shared drop folder: anyone may add, only owners take
    before = {path: path.stat() for path in (jane, john, smith)}

    run = subprocess.run(
        service_user_command("-c", _MOVES_AS_THE_SERVICE_USER, service_home),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {
        "checked, its own folder": None,
        "checked, locked folder": "EACCES",
        # Without root, no file of another user can be made: the tests' user owns them all.
        "checked, sticky folder": "EPERM" if AS_ROOT else None,
        "unreadable": "moved",
        "unreadable, locked folder": "stuck EACCES",
        "readable, locked folder": "stuck EACCES",
    }
    moved = (service_home / "quarantine" / "DOE^JANE.dcm").stat()
    assert (moved.st_ino, moved.st_uid, moved.st_mode) == (
        before[jane].st_ino,
        before[jane].st_uid,
        before[jane].st_mode,
    )
    assert not jane.exists()
    for path in (john, smith):
        assert path.stat().st_ino == before[path].st_ino  # left whole, where it was
    assert sorted(p.name for p in (service_home / "quarantine").iterdir()) == ["DOE^JANE.dcm"]
    assert list((service_home / "done").iterdir()) == []  # the copy filed in vain is undone


# Runs an intake as the service user on argv[1], in three passes; after each, one JSON line of
# what it filed, whether it takes more files (room) and what it logged. Between the second and
# the third it waits for a line on stdin (the admin fixing the folder's permissions).
_INTAKE_AS_THE_SERVICE_USER = """
import json, logging, sys, time
from pathlib import Path
from triage_app import intake as intake_module
from triage_app.config import Settings
from triage_app.intake import Intake, IntakeLayout

class Kept(logging.Handler):
    lines = []
    def emit(self, record):
        self.lines.append([record.levelname, record.getMessage()])

logging.getLogger("triage_app").addHandler(Kept())
logging.getLogger("triage_app").setLevel(logging.INFO)
intake_module.STUCK_RETRY_FIRST_S = 2.0  # the file's own wait, shorter for the test

home = Path(sys.argv[1])
layout = IntakeLayout(home / "inbox", home / "done", home / "quarantine")
settings = Settings({"paths.data_dir": home / "data", "processing.workers": 1})
locked = sorted((layout.inbox / "locked").iterdir())

def name(path):
    return None if path is None else str(path.relative_to(home))

def file_all(intake, paths):
    assert intake.submit(paths) == len(paths)
    filed = {name(f.source): [f.unfiled, name(f.filed_as), f.retry_code] for f in intake.drain()}
    print(json.dumps({
        "filed": filed,
        "room": intake.room,
        "waiting": [name(p) for p in locked if intake.is_waiting(p)],
        "log": Kept.lines,
    }), flush=True)
    Kept.lines.clear()

with Intake(settings, layout) as intake:
    file_all(intake, sorted(p for p in layout.inbox.rglob("*") if p.is_file()))
    file_all(intake, locked)  # offered again at once all the same
    sys.stdin.readline()
    deadline = time.monotonic() + 30
    while any(intake.is_waiting(p) for p in locked) and time.monotonic() < deadline:
        time.sleep(0.05)
    file_all(intake, locked)
"""


@pytest.mark.timeout(180)
def test_an_unreadable_file_is_quarantined_and_one_stuck_in_the_inbox_holds_up_no_other(
    service_home: Path,
) -> None:
    """The site admin's report: a root-owned 0600 file in the inbox of a service running as
    an unprivileged user stalled the whole intake (its move opened it for reading), backing
    off for ever, and left an orphaned reason file. Now it is quarantined by a rename; a file
    in a folder the service may not change stays, logged once, tried again on its own, and
    filed once the folder is fixed, while the other files go on."""
    inbox = service_home / "inbox"
    write_phantom(inbox / "good.dcm", seed=91)
    write_phantom(inbox / "DOE^JANE.dcm", seed=92)
    write_phantom(inbox / "locked" / "DOE^JOHN.dcm", seed=93)
    write_phantom(inbox / "locked" / "SMITH^ANN.dcm", seed=94)
    give_to_service_user(service_home)
    keep_from_service_user(inbox / "DOE^JANE.dcm")
    keep_from_service_user(inbox / "locked" / "DOE^JOHN.dcm")
    keep_from_service_user(inbox / "locked" / "SMITH^ANN.dcm", readable=True)
    keep_from_service_user(inbox / "locked")
    jane_inode = (inbox / "DOE^JANE.dcm").stat().st_ino

    log = service_home.parent / "intake.log"
    with (
        log.open("w") as stderr,
        subprocess.Popen(
            service_user_command("-c", THREAD_TRIAGE + _INTAKE_AS_THE_SERVICE_USER, service_home),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        ) as child,
    ):
        assert child.stdout is not None and child.stdin is not None
        passes = [json.loads(child.stdout.readline() or "null") for _ in range(2)]
        assert None not in passes, log.read_text()
        first, again = passes
        assert first["filed"] == {
            "inbox/good.dcm": [None, "done/good.dcm", None],
            "inbox/DOE^JANE.dcm": [None, "quarantine/unreadable/DOE^JANE.dcm", None],
            "inbox/locked/DOE^JOHN.dcm": ["stuck", None, "EACCES"],
            "inbox/locked/SMITH^ANN.dcm": ["stuck", None, "EACCES"],
        }
        assert first["room"] > 0  # no back-off: the next files are taken at once
        assert first["waiting"] == ["inbox/locked/DOE^JOHN.dcm", "inbox/locked/SMITH^ANN.dcm"]
        assert again["filed"] == {
            "inbox/locked/DOE^JOHN.dcm": ["stuck", None, "EACCES"],
            "inbox/locked/SMITH^ANN.dcm": ["stuck", None, "EACCES"],
        }
        assert again["room"] > 0
        # Nothing filed for the stuck files: no reason file, no sidecar.
        assert files_under(service_home / "done") == [Path("good.dcm"), Path("good.dcm.json")]
        assert files_under(service_home / "quarantine") == [
            Path("unreadable/DOE^JANE.dcm"),
            Path("unreadable/DOE^JANE.dcm" + REASON_SUFFIX),
        ]
        assert (service_home / "quarantine/unreadable/DOE^JANE.dcm").stat().st_ino == jane_inode

        # The admin fixes the folder's permissions (not its files').
        give_to_service_user(inbox / "locked", recursive=False)
        child.stdin.write("fixed\n")
        child.stdin.flush()
        fixed = json.loads(child.stdout.readline() or "null")
        assert fixed is not None, log.read_text()
        child.stdin.close()
        assert child.wait(timeout=60) == 0, log.read_text()

    assert fixed["filed"] == {
        "inbox/locked/DOE^JOHN.dcm": [None, "quarantine/unreadable/locked/DOE^JOHN.dcm", None],
        "inbox/locked/SMITH^ANN.dcm": [None, "done/locked/SMITH^ANN.dcm", None],
    }
    assert fixed["waiting"] == []
    assert files_under(inbox) == []
    with CaseStore.open(service_home / "data" / "cases.sqlite3") as store:
        # Nothing was recorded while the files were stuck: each input once.
        assert len(store.list_cases()) == 2
        assert REPROCESSED not in [
            t.event for c in store.list_cases() for t in store.history(c.case_id)
        ]
        assert sorted(f.path for f in store.failures()) == [
            str(service_home / "quarantine/unreadable/DOE^JANE.dcm"),
            str(service_home / "quarantine/unreadable/locked/DOE^JOHN.dcm"),
        ]
    logged = [line for one in (first, again, fixed) for line in one["log"]]
    problems = [message for level, message in logged if level in {"WARNING", "ERROR"}]
    assert len(problems) == 2, problems  # one line per stuck file, none per try
    assert all(m.startswith("a file cannot be taken out of the inbox (EACCES)") for m in problems)
    assert sum("could not be taken out of the inbox before" in m for _, m in logged) == 2
    for _, message in logged:
        assert "DOE" not in message and "SMITH" not in message and "locked" not in message
        assert str(inbox) not in message


# --- one intake per inbox -------------------------------------------------------------------------


def test_a_second_intake_on_the_same_inbox_refuses_to_start(
    settings: Settings, layout: IntakeLayout, shared_pool: SharedPool
) -> None:
    first = Intake(settings, layout, pool=shared_pool)
    try:
        with pytest.raises(InboxInUseError) as refused:
            Intake(settings, layout, pool=shared_pool)
    finally:
        first.close()

    assert refused.value.code == "inbox_in_use"
    assert "\n" not in str(refused.value) and str(layout.inbox) not in str(refused.value)
    Intake(settings, layout, pool=shared_pool).close()  # free again once the first has closed


# --- what a kill leaves behind --------------------------------------------------------------------

# Files a note for ``argv[1]`` beside ``argv[2]`` (suffix ``argv[3]``) as the intake does, and is
# killed at the rename of the note's temporary file into place.
_KILLED_AT_THE_NOTES_RENAME = """
import os, signal, sys
from pathlib import Path
from triage_app import intake

os.replace = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
source, target, suffix = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
intake._file_with_note(
    source, target, suffix, {"note": "half filed"}, intake.FileIdentity.read(source)
)
"""


def kill_while_filing(source: Path, target: Path, suffix: str) -> None:
    run = subprocess.run(
        [sys.executable, "-c", _KILLED_AT_THE_NOTES_RENAME, source, target, suffix],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == -signal.SIGKILL, run.stderr


def hidden_files(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob(".*") if p.is_file())


def test_temporary_notes_a_kill_left_in_done_and_quarantine_are_removed_at_start(
    make_intake: Any, layout: IntakeLayout, caplog: pytest.LogCaptureFixture
) -> None:
    write_phantom(layout.inbox / "sub" / "scan.dcm", seed=46)
    (layout.inbox / "notes.txt").write_text("not an image\n", encoding="utf-8")
    layout.create()
    kill_while_filing(
        layout.inbox / "sub" / "scan.dcm", layout.done / "sub" / "scan.dcm", SIDECAR_SUFFIX
    )
    kill_while_filing(
        layout.inbox / "notes.txt", layout.quarantine / "not_dicom" / "notes.txt", REASON_SUFFIX
    )
    (left_in_done,) = hidden_files(layout.done)
    (left_in_quarantine,) = hidden_files(layout.quarantine)
    assert left_in_done.parent == Path("sub")
    assert left_in_done.name.startswith(".scan.dcm.json.")
    assert left_in_quarantine.name.startswith(".notes.txt.reason.json.")

    make_intake()

    assert hidden_files(layout.done) == hidden_files(layout.quarantine) == []
    assert files_under(layout.inbox) == [Path("notes.txt"), Path("sub/scan.dcm")]
    assert [
        r.getMessage()
        for r in caplog.get_records("call")
        if r.name == "triage_app.intake" and "temporary file" in r.getMessage()
    ] == ["removed 2 temporary file(s) left by an interrupted run"]


def test_the_start_leaves_a_live_writers_temporary_note_and_other_hidden_files_alone(
    make_intake: Any, layout: IntakeLayout
) -> None:
    """Another process filing into the same folders is writing a note right now; the other
    hidden files are not the intake's temporary notes."""
    layout.create()
    folder = ensure_private_dir(layout.quarantine / "not_dicom")
    live, fd = write_locked_temp(folder, "notes.txt" + REASON_SUFFIX, b"{}")
    not_ours = [
        layout.done / ".DS_Store",
        layout.done / ".scan.dcm.0123456789abcdef.tmp",  # a temporary file, not of a note
        layout.done / ".scan.dcm.json.partial",
        layout.done / ".scan.dcm.json.tmp",
        layout.quarantine / ".notes.txt.reason.json.0123456789abcdef.tmp",  # not a code folder
        layout.inbox / ".scan.dcm.json.0123456789abcdef.tmp",  # the inbox is not filed into
    ]
    for path in not_ours:
        path.write_bytes(b"not ours")
    try:
        make_intake()
        assert live.read_bytes() == b"{}"
    finally:
        os.close(fd)
    assert all(path.read_bytes() == b"not ours" for path in not_ours)

    make_intake()  # its writer is gone now: debris like any other

    assert not live.exists()
    assert all(path.exists() for path in not_ours)


# Moves ``argv[1]`` to ``argv[2]`` with move_durably, hard-linked or (``argv[3]`` "copy") copied,
# and at the rename of the partly moved file into place is killed (``argv[4]`` "kill") or says
# "staged" and waits for a line on stdin (a live mover).
_AT_THE_PARTIALS_RENAME = """
import errno, os, signal, sys
from pathlib import Path
from triage_app import intake

source, target, how, then = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
if how == "copy":
    def no_links(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")
    os.link = no_links
rename = Path.replace
def replace(self, to):
    if ".partial" in self.name:
        if then == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        print("staged", flush=True)
        sys.stdin.readline()
    return rename(self, to)
Path.replace = replace
intake.move_durably(source, target)
"""


def mover(source: Path, target: Path, how: str, then: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _AT_THE_PARTIALS_RENAME, source, target, how, then],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("how", ["link", "copy"])
def test_a_partly_moved_file_a_kill_left_is_removed_at_start_and_a_live_movers_is_not(
    make_intake: Any, layout: IntakeLayout, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    data = write_phantom(layout.inbox / "DOE_JOHN.dcm", seed=58)
    layout.create()
    with mover(layout.inbox / "DOE_JOHN.dcm", layout.done / "DOE_JOHN.dcm", how, "kill") as killed:
        assert killed.wait(timeout=60) == -signal.SIGKILL
    (leftover,) = hidden_files(layout.done)
    assert leftover.name.startswith(".DOE_JOHN.dcm.") and ".partial" in leftover.name

    make_intake()

    assert hidden_files(layout.done) == []
    assert (layout.inbox / "DOE_JOHN.dcm").read_bytes() == data  # the inbox copy is intact
    assert "removed 1 temporary file(s) left by an interrupted run" in intake_messages(caplog)

    with mover(layout.inbox / "DOE_JOHN.dcm", layout.done / "DOE_JOHN.dcm", how, "wait") as live:
        assert live.stdout is not None and live.stdin is not None
        try:
            assert live.stdout.readline() == "staged\n"
            (staged,) = hidden_files(layout.done)
            make_intake()  # its clean-up runs while the mover is at work
            assert (layout.done / staged).read_bytes() == data
        finally:
            live.stdin.write("\n")
            live.stdin.flush()
        assert live.wait(timeout=60) == 0
    assert files_under(layout.done) == [Path("DOE_JOHN.dcm")]
    assert (layout.done / "DOE_JOHN.dcm").read_bytes() == data
    assert files_under(layout.inbox) == []


# --- moving files ---------------------------------------------------------------------------------


def test_move_durably_links_within_one_filesystem(tmp_path: Path) -> None:
    source = tmp_path / "a" / "scan.dcm"
    source.parent.mkdir()
    source.write_bytes(b"DICM-ish bytes")
    target = tmp_path / "b" / "scan.dcm"
    target.parent.mkdir()
    inode = source.stat().st_ino

    move_durably(source, target)

    assert not source.exists()
    assert target.read_bytes() == b"DICM-ish bytes"
    assert target.stat().st_ino == inode  # linked, not copied


def test_move_durably_leaves_a_file_renamed_over_its_source_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A scanner re-sends a corrected instance under the same name while the first copy is
    # being filed: the corrected bytes must stay for the next pass, not be removed with it.
    source = tmp_path / "incoming" / "scan.dcm"
    source.parent.mkdir()
    source.write_bytes(b"first bytes")
    target = tmp_path / "done" / "scan.dcm"
    target.parent.mkdir()

    def resend_then_sync(folder: Path) -> None:
        if folder == target.parent:  # after the link and rename, before the source goes
            resent = source.with_name(".resent.tmp")
            resent.write_bytes(b"corrected bytes")
            resent.replace(source)
        fsync_dir(folder)

    monkeypatch.setattr(intake_module, "fsync_dir", resend_then_sync)
    move_durably(source, target)

    assert target.read_bytes() == b"first bytes"
    assert source.read_bytes() == b"corrected bytes"


def test_move_durably_copies_then_removes_across_a_simulated_filesystem_boundary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "share" / "scan.dcm"
    source.parent.mkdir()
    payload = os.urandom(300_000)
    source.write_bytes(payload)
    target = tmp_path / "done" / "scan.dcm"
    target.parent.mkdir()
    real_link = os.link
    refused: list[str] = []

    def link(src: Any, dst: Any) -> None:
        if Path(src) == source:
            refused.append(str(src))
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link)
    move_durably(source, target)

    assert refused == [str(source)]
    assert not source.exists()
    assert target.read_bytes() == payload
    assert sorted(p.name for p in target.parent.iterdir()) == ["scan.dcm"]  # no .partial


@pytest.mark.skipif(
    not Path("/dev/shm").is_dir(), reason="needs a second file system (tmpfs at /dev/shm)"
)
def test_move_durably_moves_across_a_real_filesystem_boundary(tmp_path: Path) -> None:
    other = Path("/dev/shm")
    if other.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("/dev/shm is on the same file system as the temporary folder")
    folder = other / f"triage-intake-test-{os.getpid()}-{time.monotonic_ns()}"
    folder.mkdir()
    try:
        source = folder / "scan.dcm"
        payload = os.urandom(200_000)
        source.write_bytes(payload)
        with pytest.raises(OSError) as raised:
            os.link(source, tmp_path / "probe")  # the premise: these are two file systems
        assert raised.value.errno == errno.EXDEV
        target = tmp_path / "scan.dcm"

        move_durably(source, target)

        assert not source.exists()
        assert target.read_bytes() == payload
        assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.dcm"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_move_durably_keeps_the_source_when_the_move_fails(tmp_path: Path) -> None:
    source = tmp_path / "scan.dcm"
    source.write_bytes(b"keep me")
    with pytest.raises(FileNotFoundError):
        move_durably(source, tmp_path / "missing-folder" / "scan.dcm")
    assert source.read_bytes() == b"keep me"


def test_move_durably_moves_nothing_when_the_source_is_no_longer_the_expected_version(
    tmp_path: Path,
) -> None:
    source = tmp_path / "scan.dcm"
    source.write_bytes(b"first bytes")
    seen = FileIdentity.read(source)
    source.write_bytes(b"corrected, longer bytes")  # rewritten in place since it was read
    (tmp_path / "done").mkdir()

    assert not move_durably(source, tmp_path / "done" / "scan.dcm", expected=seen)

    assert source.read_bytes() == b"corrected, longer bytes"
    assert list((tmp_path / "done").iterdir()) == []
    assert move_durably(source, tmp_path / "done" / "scan.dcm", expected=FileIdentity.read(source))
    assert not move_durably(source, tmp_path / "done" / "again.dcm")  # gone: nothing to move


# --- worker crashes -------------------------------------------------------------------------------


@pytest.mark.expect_log_warnings
def test_a_file_that_kills_its_worker_is_quarantined_and_an_innocent_one_still_triaged(
    settings: Settings,
    layout: IntakeLayout,
    pipeline_config: PipelineConfig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The innocent file is large (slow to decode) and in flight in the other worker when the
    hostile one kills its own: a dead worker breaks the pool under both."""
    innocent = layout.inbox / f"{SLOW_PREFIX}-large.dcm"
    killer = layout.inbox / f"{KILLER_PREFIX}.dcm"
    write_phantom(innocent, seed=52)
    write_phantom(killer, seed=51)
    pool = KillerPool(pipeline_config, workers=2)

    with Intake(settings, layout, pool=pool) as intake:
        filed = file_all(intake, [innocent, killer])

    outcome = filed[killer.name]
    assert outcome.quarantined
    assert isinstance(outcome.outcome, FailedInput)
    assert outcome.outcome.code == WORKER_CRASHED
    assert f"{MAX_WORKER_CRASHES} times" in outcome.outcome.message
    target = layout.quarantine / WORKER_CRASHED / killer.name
    assert outcome.filed_as == target
    assert read_json(target.with_name(target.name + REASON_SUFFIX))["code"] == WORKER_CRASHED
    assert started_marker(innocent).is_file()  # it was in flight when the pool broke
    assert isinstance(filed[innocent.name].outcome, CaseResult), filed[innocent.name].outcome
    assert files_under(layout.done) == [Path(innocent.name), Path(innocent.name + SIDECAR_SUFFIX)]
    crashes = [
        r
        for r in caplog.get_records("call")
        if r.levelno == logging.ERROR and "worker process died" in r.getMessage()
    ]
    assert len(crashes) >= MAX_WORKER_CRASHES
    with CaseStore.open(settings.case_store_path) as store:
        assert [f.code for f in store.failures()] == [WORKER_CRASHED]
        assert len(store.list_cases()) == 1
    assert files_under(layout.inbox) == []


@pytest.mark.expect_log_warnings
def test_files_in_flight_when_a_worker_dies_once_are_triaged_again(
    settings: Settings,
    layout: IntakeLayout,
    pipeline_config: PipelineConfig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    write_phantoms(layout.inbox, seed=53, count=3)
    once = layout.inbox / f"{KILL_ONCE_PREFIX}.dcm"
    write_phantom(once, seed=54)
    pool = KillerPool(pipeline_config, workers=2)

    with Intake(settings, layout, pool=pool) as intake:
        filed = file_all(intake, sorted(layout.inbox.iterdir()))

    assert died_marker(once).is_file()  # the worker did die on it
    assert any("worker process died" in r.getMessage() for r in caplog.get_records("call"))
    assert set(filed) == {once.name, "p000.dcm", "p001.dcm", "p002.dcm"}
    assert all(isinstance(f.outcome, CaseResult) for f in filed.values())
    assert files_under(layout.done) == sorted(
        Path(n + suffix) for n in filed for suffix in ("", SIDECAR_SUFFIX)
    )
    with CaseStore.open(settings.case_store_path) as store:
        assert len(store.list_cases()) == 4
        assert store.failures() == []


@pytest.mark.expect_log_warnings
def test_a_worker_that_died_while_idle_is_replaced_at_the_next_hand_over(
    settings: Settings, layout: IntakeLayout, pipeline_config: PipelineConfig
) -> None:
    """The pool breaks with nothing in flight (a worker killed from outside): the next file
    handed over must not fail the caller, nor hang the intake."""
    write_phantoms(layout.inbox, seed=55, count=2)
    first, second = sorted(layout.inbox.iterdir())
    pool = KillerPool(pipeline_config, workers=1)

    with Intake(settings, layout, pool=pool) as intake:
        file_all(intake, [first])
        executor = pool._executor
        for pid in list(executor._processes):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while not executor._broken and time.monotonic() < deadline:
            time.sleep(0.01)
        assert executor._broken, "the pool did not notice its dead worker"

        filed = file_all(intake, [second])

    assert isinstance(filed[second.name].outcome, CaseResult)
    assert files_under(layout.inbox) == []
    with CaseStore.open(settings.case_store_path) as store:
        assert len(store.list_cases()) == 2
        assert store.failures() == []


@pytest.mark.expect_log_warnings
def test_a_file_that_never_finishes_is_stopped_and_quarantined_and_the_others_go_on(
    tmp_path: Path, layout: IntakeLayout, pipeline_config: PipelineConfig
) -> None:
    settings = Settings(
        {
            "paths.data_dir": tmp_path / "data",
            "processing.workers": 2,
            "processing.file_timeout_s": 4,  # ample for the innocent file on a loaded machine
        }
    )
    innocent = layout.inbox / "innocent.dcm"
    hanger = layout.inbox / f"{HANG_PREFIX}.dcm"
    write_phantom(innocent, seed=53)
    write_phantom(hanger, seed=54)
    pool = HangPool(pipeline_config, workers=2)

    started = time.monotonic()
    with Intake(settings, layout, pool=pool) as intake:
        filed = file_all(intake, [innocent, hanger])

    assert time.monotonic() - started < 100
    # No worker of the stopped pools is left: one that ignored the broken pool's SIGTERM
    # while sending its last result hung the process at exit (the pool waits for it).
    wait_until(
        lambda: not any(p.is_alive() for p in pool.started),
        timeout_s=30,
        what="every worker of the stopped pools to end",
    )
    outcome = filed[hanger.name]
    assert outcome.quarantined
    assert isinstance(outcome.outcome, FailedInput)
    assert outcome.outcome.code == WORKER_CRASHED
    assert "time limit" in outcome.outcome.message
    assert isinstance(filed[innocent.name].outcome, CaseResult), filed[innocent.name].outcome
    assert files_under(layout.inbox) == []
