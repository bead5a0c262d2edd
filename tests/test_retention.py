"""Retention of filed images: real files in a real ``done/`` folder, a real case store.

Images are filed as the intake files them: the image (its own time the scanner's), then its
sidecar holding the case record, whose time is the filing time. The crash test kills a real
process at each file removal in turn.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import make_result, phantom_dataset
from triage_app.config import Settings
from triage_app.escalation.service import open_outbox
from triage_app.intake import SIDECAR_SUFFIX, IntakeLayout
from triage_app.retention import PASS_EVERY_S, DoneRetention, ResealCases, RetentionPass
from triage_app.states import CaseEvent, CaseState
from triage_app.store import CaseStore
from triage_app.worklist import UNKNOWN_PATIENT, WorklistSource

DAY_S = 86400.0
DAYS = 30


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def image_bytes() -> bytes:
    buffer = io.BytesIO()
    phantom_dataset(5, 0).save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture
def layout(tmp_path: Path) -> IntakeLayout:
    layout = IntakeLayout(tmp_path / "inbox", tmp_path / "done", tmp_path / "quarantine")
    layout.create()
    return layout


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CaseStore]:
    with CaseStore.open(tmp_path / "cases.sqlite3") as opened:
        yield opened


def set_mtime(path: Path, days_ago: float) -> None:
    moment = time.time() - days_ago * DAY_S
    os.utime(path, (moment, moment), follow_symlinks=False)


def file_image(
    done: Path,
    relative: str,
    case_id: str,
    *,
    filed_days_ago: float,
    data: bytes,
    written_days_ago: float = 3650,
) -> Path:
    """An image as the intake files it: the image keeps its writer's time (years ago, as a
    scanner's share copy may), its sidecar (the case record) is written at filing."""
    image = done / relative
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_bytes(data)
    set_mtime(image, written_days_ago)
    sidecar = image.with_name(image.name + SIDECAR_SUFFIX)
    record = make_result(case_id, path=str(image)).to_json()
    sidecar.write_text(json.dumps(record), encoding="utf-8")
    set_mtime(sidecar, filed_days_ago)
    return image


def sidecar_of(image: Path) -> Path:
    return image.with_name(image.name + SIDECAR_SUFFIX)


def record(store: CaseStore, case_id: str, event: CaseEvent) -> None:
    decision = "escalate" if event is CaseEvent.HOLD else "normal"
    store.record_result(make_result(case_id, decision=decision), event)


def retention_for(
    store: CaseStore,
    layout: IntakeLayout,
    days: int = DAYS,
    *,
    batch: int = 1000,
    clock: FakeClock | None = None,
) -> DoneRetention:
    """As the services make it: the case store says which cases are held."""
    return DoneRetention(
        layout,
        days,
        lambda: store.case_ids(CaseState.ESCALATION_HELD),
        batch=batch,
        clock=clock or FakeClock(),
    )


def whole_pass(retention: DoneRetention) -> RetentionPass:
    for _ in range(1000):
        finished = retention.tick()
        if finished is not None:
            return finished
    pytest.fail("the pass did not end")


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


def pass_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.get_records("call")
        if r.name == "triage_app.retention" and r.levelno == logging.INFO
    ]


# --- what goes and what stays ---------------------------------------------------------------------


def test_images_filed_longer_ago_than_the_period_go_with_their_results_and_recent_ones_stay(
    layout: IntakeLayout,
    store: CaseStore,
    image_bytes: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    done = layout.done
    old = file_image(done, "DOE^JANE/chest.dcm", "case-old-1", filed_days_ago=40, data=image_bytes)
    older = file_image(done, "scan1.dcm", "case-old-2", filed_days_ago=DAYS + 1, data=image_bytes)
    # Written by the scanner years ago, filed yesterday: the filing time counts.
    recent = file_image(done, "recent.dcm", "case-new", filed_days_ago=DAYS - 1, data=image_bytes)
    for case_id in ("case-old-1", "case-old-2", "case-new"):
        record(store, case_id, CaseEvent.DECIDE_LOCAL_NORMAL)

    finished = whole_pass(retention_for(store, layout))

    assert (finished.removed, finished.kept_held, finished.failed) == (2, 0, 0)
    assert files_under(done) == ["recent.dcm", "recent.dcm.json"]
    assert recent.read_bytes() == image_bytes
    assert not old.parent.exists()  # emptied by the pass: its name came from the inbox
    assert not older.exists()
    # The case store keeps every record and its history; only the files went.
    assert {c.case_id for c in store.list_cases()} == {"case-old-1", "case-old-2", "case-new"}
    assert [t.to_state for t in store.history("case-old-1")][-1] is CaseState.LOCAL_NORMAL
    lines = pass_lines(caplog)
    assert len(lines) == 1
    assert "2 filed image(s) removed" in lines[0] and "0 kept" in lines[0]
    assert "DOE" not in caplog.text and str(done) not in caplog.text


def test_an_image_whose_case_is_still_held_stays_whatever_its_age_until_it_is_released(
    layout: IntakeLayout, store: CaseStore, image_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    held = file_image(layout.done, "held.dcm", "case-held", filed_days_ago=3000, data=image_bytes)
    record(store, "case-held", CaseEvent.HOLD)
    clock = FakeClock()
    retention = retention_for(store, layout, clock=clock)

    first = whole_pass(retention)

    assert (first.removed, first.kept_held) == (0, 1)
    assert held.is_file() and sidecar_of(held).is_file()
    assert "1 kept because their case is still held" in pass_lines(caplog)[0]

    store.apply("case-held", CaseEvent.ENQUEUE)  # released: queued for the central server
    clock.now += PASS_EVERY_S
    second = whole_pass(retention)

    assert (second.removed, second.kept_held) == (1, 0)
    assert files_under(layout.done) == []


@pytest.mark.expect_log_warnings  # the outbox warns of each case it quarantines
def test_an_image_whose_case_waits_to_be_sealed_anew_stays_and_the_pass_says_why(
    layout: IntakeLayout, tmp_path: Path, image_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    # The server refused one envelope for how it was sealed (stale after a long outage):
    # `queue retry` seals it anew from its image. Another it refused for the case itself, and
    # a third still waits: their images are not needed again.
    settings = Settings(
        {"paths.data_dir": tmp_path / "data", "escalation.central_url": "http://127.0.0.1:9"}
    )
    stale, refused, pending = (hashlib.sha256(n.encode()).hexdigest() for n in "abc")
    with open_outbox(settings) as outbox:
        for case_id in (stale, refused, pending):
            outbox.enqueue(case_id, b"envelope", reason="uncertain", payload_sha256="0" * 64)
        outbox.quarantine(stale, "stale_envelope: older than the server accepts")
        outbox.quarantine(refused, "case_refused: not a chest image")
    for name, case_id in (("stale", stale), ("refused", refused), ("pending", pending)):
        file_image(layout.done, f"{name}.dcm", case_id, filed_days_ago=40, data=image_bytes)
    reseal = ResealCases(settings)
    try:
        retention = DoneRetention(layout, DAYS, lambda: (), reseal_cases=reseal, clock=FakeClock())
        finished = whole_pass(retention)
    finally:
        reseal.close()

    assert (finished.removed, finished.kept_held, finished.kept_reseal) == (2, 0, 1)
    assert files_under(layout.done) == ["stale.dcm", "stale.dcm.json"]
    assert (
        "0 kept because their case is still held for escalation, 1 because their case "
        "waits to be sealed anew" in pass_lines(caplog)[0]
    )


def test_without_a_central_server_no_case_waits_for_a_reseal_and_no_outbox_is_made(
    tmp_path: Path,
) -> None:
    settings = Settings({"paths.data_dir": tmp_path / "data"})
    reseal = ResealCases(settings)
    assert reseal() == []
    reseal.close()
    assert not settings.outbox_dir.exists()


def test_quarantine_foreign_hidden_and_linked_files_are_never_touched(
    tmp_path: Path, store: CaseStore, image_bytes: bytes
) -> None:
    # An admin put the quarantine folder inside done/: it waits for them, whatever is in it.
    layout = IntakeLayout(tmp_path / "inbox", tmp_path / "done", tmp_path / "done" / "q")
    layout.create()
    done = layout.done
    file_image(layout.quarantine, "not_dicom/x.dcm", "case-q", filed_days_ago=99, data=image_bytes)
    (layout.quarantine / "not_dicom" / "x.dcm.reason.json").write_text("{}", encoding="utf-8")
    # Foreign files: no sidecar, a sidecar that is not a case record, a JSON without image.
    (done / "notes.txt").write_text("not filed by a service", encoding="utf-8")
    (done / "export.csv").write_text("a,b\n", encoding="utf-8")
    (done / "export.csv.json").write_text('{"ok": true}', encoding="utf-8")
    (done / "settings.json").write_text('{"ok": true, "case_id": 3}', encoding="utf-8")
    # The intake's temporary files (a note between write and rename, a half-moved image).
    (done / ".scan.dcm.json.0a1b2c3d.tmp").write_text("{}", encoding="utf-8")
    (done / ".scan.dcm.partial.0a1b2c3d.tmp").write_bytes(image_bytes)
    # Links: to an image elsewhere (with a sidecar beside the link), and to a folder elsewhere.
    elsewhere = tmp_path / "elsewhere"
    target = file_image(elsewhere, "t.dcm", "case-t", filed_days_ago=99, data=image_bytes)
    (done / "link.dcm").symlink_to(target)
    (done / "link.dcm.json").write_bytes(sidecar_of(target).read_bytes())
    (done / "linked").symlink_to(elsewhere, target_is_directory=True)
    os.mkfifo(done / "pipe.dcm")
    (done / "pipe.dcm.json").write_bytes(sidecar_of(target).read_bytes())
    for path in [*done.rglob("*"), *elsewhere.rglob("*")]:
        set_mtime(path, 99)
    before = {p: (p.lstat().st_mtime_ns, p.is_symlink()) for p in done.rglob("*")}
    before_elsewhere = files_under(elsewhere)
    # And one real filed image, so the pass has something to do.
    file_image(done, "old.dcm", "case-old", filed_days_ago=99, data=image_bytes)

    finished = whole_pass(retention_for(store, layout))

    assert (finished.removed, finished.orphans_removed, finished.failed) == (1, 0, 0)
    after = {p: (p.lstat().st_mtime_ns, p.is_symlink()) for p in done.rglob("*")}
    assert after == before
    assert files_under(elsewhere) == before_elsewhere


def test_a_period_of_0_the_default_keeps_everything(
    layout: IntakeLayout, store: CaseStore, image_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    days = Settings().done_retention_days
    file_image(layout.done, "ancient.dcm", "case-1", filed_days_ago=3650, data=image_bytes)
    retention = retention_for(store, layout, days)

    assert days == 0
    assert [retention.tick() for _ in range(3)] == [None, None, None]
    assert files_under(layout.done) == ["ancient.dcm", "ancient.dcm.json"]
    assert pass_lines(caplog) == []


def test_a_pass_goes_in_bounded_batches_and_the_next_one_starts_an_hour_later(
    layout: IntakeLayout, store: CaseStore, image_bytes: bytes
) -> None:
    for index in range(5):
        file_image(layout.done, f"s{index}.dcm", f"c{index}", filed_days_ago=40, data=image_bytes)
    clock = FakeClock()
    retention = retention_for(store, layout, batch=4, clock=clock)  # 4 names: 2 images

    assert retention.tick() is None
    assert len(files_under(layout.done)) == 6  # two images and their results went
    assert retention.tick() is None
    finished = retention.tick()

    assert finished is not None and finished.removed == 5
    assert files_under(layout.done) == []
    file_image(layout.done, "later.dcm", "c9", filed_days_ago=40, data=image_bytes)
    clock.now += PASS_EVERY_S - 1
    assert retention.tick() is None  # not due yet
    assert len(files_under(layout.done)) == 2
    clock.now += 1
    assert whole_pass(retention).removed == 1


@pytest.mark.expect_log_warnings
def test_nothing_is_removed_while_the_case_store_cannot_say_which_cases_are_held(
    layout: IntakeLayout, tmp_path: Path, image_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    file_image(layout.done, "old.dcm", "case-1", filed_days_ago=40, data=image_bytes)
    closed = CaseStore.open(tmp_path / "other.sqlite3")
    closed.close()

    finished = whole_pass(retention_for(closed, layout))

    assert finished.removed == 0
    assert files_under(layout.done) == ["old.dcm", "old.dcm.json"]
    errors = [r.getMessage() for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "store_error" in errors[0]


# --- a crash in the middle ------------------------------------------------------------------------

# Runs a pass over ``argv[1]`` and is killed at its ``argv[2]``-th file removal.
_KILLED_AT_A_REMOVAL = """
import os, signal, sys
from pathlib import Path
from triage_app.intake import IntakeLayout
from triage_app.retention import DoneRetention

root, kill_at = Path(sys.argv[1]), int(sys.argv[2])
removals = 0
unlink = os.unlink

def killing_unlink(path, *args, **kwargs):
    global removals
    removals += 1
    if removals == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    unlink(path, *args, **kwargs)

os.unlink = killing_unlink
layout = IntakeLayout(root / "inbox", root / "done", root / "quarantine")
DoneRetention(layout, int(sys.argv[3]), lambda: ()).tick()
"""


def images_without_results(done: Path) -> list[str]:
    return [
        name
        for name in files_under(done)
        if not name.endswith(SIDECAR_SUFFIX) and not (done / (name + SIDECAR_SUFFIX)).exists()
    ]


def test_a_crash_at_any_removal_leaves_no_image_without_its_result_and_the_next_pass_ends_it(
    tmp_path: Path, store: CaseStore, image_bytes: bytes
) -> None:
    template = tmp_path / "template"
    for relative in ("a/DOE^JANE.dcm", "a/b.dcm", "c.dcm"):
        file_image(template / "done", relative, relative, filed_days_ago=40, data=image_bytes)
    removals = 6  # three images, then their three results
    for kill_at in range(1, removals + 1):
        root = tmp_path / f"killed-at-{kill_at}"
        shutil.copytree(template, root)
        layout = IntakeLayout(root / "inbox", root / "done", root / "quarantine")
        layout.create()
        run = subprocess.run(
            [sys.executable, "-c", _KILLED_AT_A_REMOVAL, root, str(kill_at), str(DAYS)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert run.returncode == -signal.SIGKILL, run.stderr
        left = files_under(layout.done)
        assert len(left) == 6 - (kill_at - 1), (kill_at, left)
        assert images_without_results(layout.done) == [], (kill_at, left)
        orphans = sum(not (layout.done / n.removesuffix(SIDECAR_SUFFIX)).exists() for n in left)

        restarted = whole_pass(retention_for(store, layout))

        assert files_under(layout.done) == [], kill_at
        assert restarted.orphans_removed == orphans, kill_at
        assert restarted.removed == 3 - min(kill_at - 1, 3), kill_at


# --- a case whose file went ---------------------------------------------------------------------


def test_the_desktop_worklist_still_lists_a_case_whose_image_went(
    layout: IntakeLayout, store: CaseStore, image_bytes: bytes, tmp_path: Path
) -> None:
    image = file_image(layout.done, "DOE^JANE.dcm", "case-1", filed_days_ago=40, data=image_bytes)
    store.record_result(make_result("case-1", path=str(image)), CaseEvent.DECIDE_LOCAL_NORMAL)
    whole_pass(retention_for(store, layout))

    source = WorklistSource(tmp_path / "cases.sqlite3")
    try:
        rows = source.rows()
    finally:
        source.close()

    assert not image.exists()
    assert [(row.case_id, row.patient) for row in rows] == [("case-1", UNKNOWN_PATIENT)]
