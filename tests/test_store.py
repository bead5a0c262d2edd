"""The SQLite case store, on real files, including several processes sharing one file."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
import sqlite3
import stat
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import PHI_LIKE_PATH, make_result
from tests.other_process import hold_write_lock
from tests.test_secrets import ROOT, give_to_service_user, reachable_folder, run_as_service_user
from triage_app import store as store_module
from triage_app.errors import (
    AlreadyQueuedError,
    IllegalTransitionError,
    StoreError,
    StoreIncompatibleError,
)
from triage_app.escalation.outbox import Outbox
from triage_app.results import FailedInput
from triage_app.states import CaseEvent, CaseState, Feedback
from triage_app.store import REPROCESSED, CaseStore, still_held

LATEST_SCHEMA = len(store_module._MIGRATIONS)

S = CaseState
E = CaseEvent

ISO_MS_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")
SOURCE = PHI_LIKE_PATH  # looks like PHI on purpose: must never be logged


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "cases.sqlite3"


@pytest.fixture
def store(db_path: Path):
    with CaseStore.open(db_path) as s:
        yield s


def _parse(ts: str) -> datetime:
    assert ISO_MS_UTC.match(ts), ts
    parsed = datetime.fromisoformat(ts)
    assert parsed.tzinfo == UTC
    return parsed


# --- recording ------------------------------------------------------------------------------


def test_record_and_get_round_trip(store: CaseStore) -> None:
    result = make_result()
    assert store.record_result(result, E.DECIDE_LOCAL_NORMAL) is S.LOCAL_NORMAL

    case = store.get("case-0001")
    assert case is not None
    assert case.state is S.LOCAL_NORMAL
    assert (case.decision, case.reason, case.score) == ("normal", "confident_normal", 0.07)
    assert (case.model_name, case.model_version, case.model_sha256) == (
        "tiny-cnn",
        "1.2.0",
        "ab" * 32,
    )
    assert case.result == result.to_json()
    assert case.created_at == case.updated_at
    _parse(case.created_at)


def test_get_and_history_of_an_unknown_case(store: CaseStore) -> None:
    assert store.get("nope") is None
    assert store.history("nope") == []


@pytest.mark.parametrize(
    ("final_event", "expected"),
    [
        (E.DECIDE_LOCAL_NORMAL, S.LOCAL_NORMAL),
        (E.DECIDE_LOCAL_ABNORMAL, S.LOCAL_ABNORMAL),
        (E.ENQUEUE, S.QUEUED),
        (E.HOLD, S.ESCALATION_HELD),
        (E.BLOCK, S.ESCALATION_BLOCKED),
    ],
)
def test_record_stores_both_transitions(
    store: CaseStore, final_event: CaseEvent, expected: CaseState
) -> None:
    assert store.record_result(make_result(), final_event) is expected
    steps = [(t.from_state, t.to_state, t.event) for t in store.history("case-0001")]
    assert steps == [(S.RECEIVED, S.ANALYSED, E.ANALYSE), (S.ANALYSED, expected, final_event)]


def test_record_with_an_impossible_final_event_stores_nothing(store: CaseStore) -> None:
    with pytest.raises(IllegalTransitionError):
        store.record_result(make_result(), E.START_SEND)
    assert store.get("case-0001") is None
    assert store.history("case-0001") == []


def test_recording_the_same_case_again_adds_no_duplicate(store: CaseStore) -> None:
    store.record_result(make_result(score=0.07), E.DECIDE_LOCAL_NORMAL)
    first = store.get("case-0001")
    assert first is not None
    time.sleep(0.005)

    again = make_result(decision="escalate", reason="uncertain", score=0.5)
    assert store.record_result(again, E.ENQUEUE) is S.LOCAL_NORMAL

    assert [c.case_id for c in store.list_cases()] == ["case-0001"]
    case = store.get("case-0001")
    assert case is not None
    assert case.state is S.LOCAL_NORMAL
    assert case.decision == "normal"  # the decision that put the case in its state
    assert case.result == again.to_json()  # the latest result record
    assert case.created_at == first.created_at
    assert _parse(case.updated_at) > _parse(first.updated_at)

    history = store.history("case-0001")
    assert len(history) == 3
    last = history[-1]
    assert (last.from_state, last.to_state, last.event) == (
        S.LOCAL_NORMAL,
        S.LOCAL_NORMAL,
        REPROCESSED,
    )
    assert last.detail == "decision=escalate reason=uncertain"


# --- transitions ----------------------------------------------------------------------------


def test_history_is_complete_with_timestamps_in_order(store: CaseStore) -> None:
    store.record_result(make_result(decision="escalate", reason="uncertain"), E.ENQUEUE)
    for event in (E.START_SEND, E.SEND_FAILED, E.RETRY, E.START_SEND, E.DELIVER):
        time.sleep(0.003)  # so each transaction gets a later millisecond
        store.apply("case-0001", event, detail="attempt" if event is E.START_SEND else None)

    history = store.history("case-0001")
    assert [(t.event, t.to_state) for t in history] == [
        (E.ANALYSE, S.ANALYSED),
        (E.ENQUEUE, S.QUEUED),
        (E.START_SEND, S.SENDING),
        (E.SEND_FAILED, S.SEND_FAILED_RETRYING),
        (E.RETRY, S.QUEUED),
        (E.START_SEND, S.SENDING),
        (E.DELIVER, S.DELIVERED),
    ]
    assert all(a.to_state == b.from_state for a, b in pairwise(history))
    times = [_parse(t.at) for t in history]
    assert times[0] == times[1]  # recorded in one transaction
    assert times[1:] == sorted(times[1:])
    assert len(set(times[1:])) == len(times) - 1
    assert history[2].detail == "attempt"
    assert history[3].detail is None
    case = store.get("case-0001")
    assert case is not None
    assert case.state is S.DELIVERED
    assert case.updated_at == history[-1].at


def test_illegal_apply_raises_and_changes_nothing(store: CaseStore, db_path: Path) -> None:
    store.record_result(make_result(), E.DECIDE_LOCAL_NORMAL)
    before = store.get("case-0001")

    with pytest.raises(IllegalTransitionError) as info:
        store.apply("case-0001", E.START_SEND)

    assert info.value.code == "illegal_transition"
    assert "local_normal" in str(info.value)
    assert "start_send" in str(info.value)
    assert store.get("case-0001") == before
    assert len(store.history("case-0001")) == 2
    # The failed transaction was rolled back, so this store and others can still write.
    assert store.apply("case-0001", E.ACKNOWLEDGE) is S.ACKNOWLEDGED
    with CaseStore.open(db_path) as other:
        other.audit("admin", "check", {})


def test_apply_to_an_unknown_case_is_a_store_error(store: CaseStore) -> None:
    with pytest.raises(StoreError) as info:
        store.apply("missing", E.ACKNOWLEDGE)
    assert type(info.value) is StoreError
    assert "missing" in str(info.value)


# --- listing --------------------------------------------------------------------------------


def test_list_cases_newest_first_with_filter_and_limit(store: CaseStore) -> None:
    for i, event in enumerate([E.DECIDE_LOCAL_NORMAL, E.ENQUEUE, E.DECIDE_LOCAL_NORMAL, E.HOLD]):
        store.record_result(make_result(f"c{i}"), event)

    assert [c.case_id for c in store.list_cases()] == ["c3", "c2", "c1", "c0"]
    assert [c.case_id for c in store.list_cases(state=S.LOCAL_NORMAL)] == ["c2", "c0"]
    assert [c.case_id for c in store.list_cases(limit=2)] == ["c3", "c2"]
    assert store.list_cases(state=S.DELIVERED) == []
    with pytest.raises(ValueError, match="limit"):
        store.list_cases(limit=-1)


def test_counts_by_state_lists_every_state(store: CaseStore) -> None:
    for i, event in enumerate([E.DECIDE_LOCAL_NORMAL, E.ENQUEUE, E.DECIDE_LOCAL_NORMAL]):
        store.record_result(make_result(f"c{i}"), event)

    counts = store.counts_by_state()
    assert set(counts) == {s.value for s in CaseState}
    assert counts["local_normal"] == 2
    assert counts["queued"] == 1
    assert sum(counts.values()) == 3


# --- changes since a sequence ---------------------------------------------------------------

VERDICT = {"verdict": "abnormal", "score": 0.91}


@pytest.fixture
def three_cases(store: CaseStore) -> int:
    """A local, a queued and a delivered case; returns the change sequence after them."""
    store.record_result(make_result("local"), E.DECIDE_LOCAL_NORMAL)
    store.record_result(make_result("queued", decision="escalate", reason="uncertain"), E.ENQUEUE)
    store.record_result(make_result("sent", decision="escalate", reason="uncertain"), E.ENQUEUE)
    store.apply("sent", E.START_SEND)
    store.apply("sent", E.DELIVER)
    cases, seq = store.cases_changed_since(0)
    assert [c.case_id for c in cases] == ["local", "queued", "sent"]
    return seq


@pytest.mark.parametrize(
    ("write", "changed"),
    [
        pytest.param(
            lambda s: s.record_result(make_result("new"), E.DECIDE_LOCAL_NORMAL), "new", id="new"
        ),
        pytest.param(
            lambda s: s.record_result(make_result("local", score=0.01), E.DECIDE_LOCAL_NORMAL),
            "local",
            id="reprocessed",
        ),
        pytest.param(lambda s: s.apply("queued", E.START_SEND), "queued", id="transition"),
        pytest.param(lambda s: s.record_verdict("sent", VERDICT), "sent", id="verdict"),
        pytest.param(
            lambda s: s.record_feedback("local", "dr.grey", Feedback.ACCEPT), "local", id="feedback"
        ),
    ],
)
def test_every_write_to_a_case_lists_it_as_changed(
    store: CaseStore, three_cases: int, write: Any, changed: str
) -> None:
    write(store)

    cases, seq = store.cases_changed_since(three_cases)

    assert [c.case_id for c in cases] == [changed]
    assert cases == [store.get(changed)]  # as it is now
    assert seq > three_cases
    assert store.cases_changed_since(seq) == ([], seq)


def test_writes_that_leave_the_cases_as_they_are_list_nothing(
    store: CaseStore, three_cases: int
) -> None:
    store.note_not_released("queued", "no central server configured")
    store.audit("admin", "config.set", {})
    store.record_failure(FailedInput(path="/in/a.dcm", code="not_dicom", message="not DICOM"))
    store.record_links([("patient", "P1", "id:MRN-1")])
    with pytest.raises(IllegalTransitionError):
        store.apply("local", E.START_SEND)  # refused and rolled back

    assert store.cases_changed_since(three_cases) == ([], three_cases)


def test_changes_come_once_per_case_in_the_order_of_its_last_change(
    store: CaseStore, three_cases: int
) -> None:
    store.apply("queued", E.START_SEND)
    store.record_result(make_result("local", score=0.02), E.DECIDE_LOCAL_NORMAL)
    store.apply("queued", E.DELIVER)

    cases, _ = store.cases_changed_since(three_cases)
    assert [c.case_id for c in cases] == ["local", "queued"]
    assert [c.case_id for c in store.cases_changed_since(0)[0]] == ["sent", "local", "queued"]
    with pytest.raises(ValueError, match="seq"):
        store.cases_changed_since(-1)


def test_changes_committed_by_another_connection_are_seen(db_path: Path) -> None:
    with CaseStore.open(db_path) as watch, CaseStore.open(db_path) as gui:
        _, seq = gui.cases_changed_since(0)
        watch.record_result(make_result("c1", decision="escalate", reason="uncertain"), E.ENQUEUE)
        cases, seq = gui.cases_changed_since(seq)
        assert [(c.case_id, c.state) for c in cases] == [("c1", S.QUEUED)]
        watch.apply("c1", E.START_SEND)
        cases, _ = gui.cases_changed_since(seq)
        assert [(c.case_id, c.state) for c in cases] == [("c1", S.SENDING)]


# --- failures and audit ---------------------------------------------------------------------


def test_failures_are_kept(store: CaseStore) -> None:
    store.record_failure(FailedInput(path="/in/a.dcm", code="not_dicom", message="not DICOM"))
    store.record_failure(FailedInput(path="/in/b.dcm", code="truncated", message="cut short"))

    failures = store.failures()
    assert [(f.path, f.code, f.message) for f in failures] == [
        ("/in/a.dcm", "not_dicom", "not DICOM"),
        ("/in/b.dcm", "truncated", "cut short"),
    ]
    _parse(failures[0].at)
    assert store.list_cases() == []


def test_the_same_failed_input_recorded_again_keeps_its_one_row(store: CaseStore) -> None:
    # A service killed between recording a failure and moving the file refuses it again.
    first = FailedInput("/q/not_dicom/a.dcm", "not_dicom", "not DICOM", "aa" * 32)
    store.record_failure(first)
    store.record_failure(replace(first, message="not DICOM, again"))
    unreadable = FailedInput("/in/gone.dcm", "unreadable", "no such file")  # no bytes to hash
    store.record_failure(unreadable)
    store.record_failure(unreadable)

    failures = store.failures()
    assert [(f.path, f.code, f.message, f.input_sha256) for f in failures] == [
        ("/q/not_dicom/a.dcm", "not_dicom", "not DICOM", "aa" * 32),
        ("/in/gone.dcm", "unreadable", "no such file", None),
    ]


def test_different_failed_inputs_each_keep_a_row(store: CaseStore) -> None:
    first = FailedInput("/in/a.dcm", "not_dicom", "not DICOM", "aa" * 32)
    others = [
        replace(first, input_sha256="bb" * 32),  # the file at that path was replaced
        replace(first, input_sha256=None),  # ... and then could not be read
        replace(first, path="/in/copy-of-a.dcm"),  # the same bytes somewhere else
        replace(first, code="truncated"),
    ]
    for failure in (first, *others):
        store.record_failure(failure)

    assert [(f.path, f.code, f.input_sha256) for f in store.failures()] == [
        (f.path, f.code, f.input_sha256) for f in (first, *others)
    ]


def test_audit_log_is_kept_and_append_only(store: CaseStore, db_path: Path) -> None:
    store.audit("admin", "config.set", {"field": "thresholds.normal_below", "old": 0.2, "new": 0.1})
    store.audit("dr.who", "case.acknowledge", {"case_id": "c1", "path": Path("/x")})

    log = store.audit_log()
    assert [(e.actor, e.action) for e in log] == [
        ("admin", "config.set"),
        ("dr.who", "case.acknowledge"),
    ]
    assert log[0].detail == {"field": "thresholds.normal_below", "old": 0.2, "new": 0.1}
    assert log[1].detail == {"case_id": "c1", "path": "/x"}
    _parse(log[0].at)

    raw = sqlite3.connect(db_path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            raw.execute("UPDATE audit SET actor = 'mallory'")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            raw.execute("DELETE FROM audit")
    finally:
        raw.close()
    assert len(store.audit_log()) == 2


# --- the file -------------------------------------------------------------------------------


def test_file_is_private_and_in_wal_mode(db_path: Path) -> None:
    with CaseStore.open(db_path) as s:
        s.record_result(make_result(), E.DECIDE_LOCAL_NORMAL)
        assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
        wal = db_path.with_name(db_path.name + "-wal")
        assert stat.S_IMODE(wal.stat().st_mode) == 0o600
        conn = s._conn
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] > 0
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700
    raw = sqlite3.connect(db_path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        raw.close()


def test_a_file_that_cannot_use_wal_is_refused(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # E.g. a network file system without shared memory: SQLite keeps the old journal mode.
    monkeypatch.setattr(store_module, "enable_wal", lambda conn, timeout_s: "delete")
    with pytest.raises(StoreIncompatibleError, match="cannot use WAL mode") as refused:
        CaseStore.open(db_path)
    assert (refused.value.code, refused.value.temporary) == ("store_incompatible", False)


def test_history_rows_need_an_existing_case(store: CaseStore) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        store._conn.execute(
            "INSERT INTO case_events (case_id, from_state, to_state, event, at)"
            " VALUES ('ghost', 'received', 'analysed', 'analyse', 'now')"
        )


def test_reopening_keeps_the_data(db_path: Path) -> None:
    with CaseStore.open(db_path) as s:
        s.record_result(make_result(), E.ENQUEUE)
        s.audit("admin", "x", {})
        version = s.schema_version
    with CaseStore.open(db_path) as s:
        case = s.get("case-0001")
        assert case is not None
        assert case.state is S.QUEUED
        assert len(s.history("case-0001")) == 2
        assert len(s.audit_log()) == 1
        assert s.schema_version == version == LATEST_SCHEMA


def test_a_newer_schema_is_refused(db_path: Path) -> None:
    CaseStore.open(db_path).close()
    raw = sqlite3.connect(db_path)
    raw.execute("PRAGMA user_version = 99")
    raw.close()
    with pytest.raises(StoreIncompatibleError, match="schema version 99 is newer"):
        CaseStore.open(db_path)


def test_pending_migrations_run_on_open(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with CaseStore.open(db_path) as s:
        s.record_result(make_result(), E.HOLD)
    steps = (
        ("ALTER TABLE cases ADD COLUMN site TEXT",),
        ("UPDATE cases SET site = 'ward-3'",),
    )
    monkeypatch.setattr(store_module, "_MIGRATIONS", (*store_module._MIGRATIONS, *steps))

    with CaseStore.open(db_path) as s:
        assert s.schema_version == LATEST_SCHEMA + 2
        assert s._conn.execute("SELECT site FROM cases").fetchone()[0] == "ward-3"
        assert s.get("case-0001") is not None


def test_a_version_4_store_keeps_its_failures_and_then_records_them_once(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 5 adds the input's hash to ``failures``. Rows from before, duplicates of a
    crash included, stay as they are; new ones are recorded once."""
    old_rows = [
        ("/q/not_dicom/a.dcm", "not_dicom", "not DICOM", "2026-01-02T03:04:05.000+00:00"),
        ("/q/not_dicom/a.dcm", "not_dicom", "not DICOM", "2026-01-02T03:04:09.000+00:00"),
    ]
    with monkeypatch.context() as m:
        m.setattr(store_module, "_MIGRATIONS", store_module._MIGRATIONS[:4])
        with CaseStore.open(db_path) as old:
            assert old.schema_version == 4
            old._conn.executemany(
                "INSERT INTO failures (path, code, message, at) VALUES (?, ?, ?, ?)", old_rows
            )

    with CaseStore.open(db_path) as s:
        assert s.schema_version == LATEST_SCHEMA
        assert [(f.path, f.code, f.message, f.at, f.input_sha256) for f in s.failures()] == [
            (*row, None) for row in old_rows
        ]
        new = FailedInput("/q/not_dicom/b.dcm", "not_dicom", "not DICOM", "cc" * 32)
        s.record_failure(new)
        s.record_failure(new)
        assert [f.input_sha256 for f in s.failures()] == [None, None, "cc" * 32]
        indexes = {r["name"] for r in s._conn.execute("PRAGMA index_list(failures)")}
        assert "failures_by_input" in indexes


def test_a_version_5_store_gets_a_change_sequence_for_each_case(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 6 adds ``change_seq``. The cases stored before keep everything else, get distinct
    sequences in the order they were stored, and later writes get higher ones."""
    columns = (
        "case_id, state, decision, reason, score, model_name, model_version, model_sha256,"
        " source, created_at, updated_at, result_json, verdict_json"
    )
    old_cases = [
        ("c-local", S.LOCAL_NORMAL, "normal", None),
        ("c-verdict", S.VERDICT_RECEIVED, "escalate", {"verdict": "normal", "score": 0.1}),
        ("c-queued", S.QUEUED, "escalate", None),
    ]
    with monkeypatch.context() as m:
        m.setattr(store_module, "_MIGRATIONS", store_module._MIGRATIONS[:5])
        with CaseStore.open(db_path) as old:
            assert old.schema_version == 5
            for i, (case_id, state, decision, verdict) in enumerate(old_cases):
                result = make_result(case_id, decision=decision)
                at = f"2026-01-02T03:04:0{i}.000+00:00"
                old._conn.execute(
                    f"INSERT INTO cases ({columns}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        case_id,
                        state,
                        decision,
                        result.reason,
                        result.score,
                        "tiny-cnn",
                        "1.2.0",
                        "ab" * 32,
                        result.path,
                        at,
                        at,
                        json.dumps(result.to_json()),
                        json.dumps(verdict) if verdict else None,
                    ),
                )
            before = old.list_cases()

    with CaseStore.open(db_path) as s:
        assert s.schema_version == LATEST_SCHEMA
        assert s.list_cases() == before
        cases, seq = s.cases_changed_since(0)
        assert [c.case_id for c in cases] == [case_id for case_id, *_ in old_cases]
        seqs = [r[0] for r in s._conn.execute("SELECT change_seq FROM cases ORDER BY rowid")]
        assert 0 < seqs[0] < seqs[1] < seqs[2] == seq
        s.apply("c-queued", E.START_SEND)
        s.record_result(make_result("c-new"), E.DECIDE_LOCAL_NORMAL)
        later, after = s.cases_changed_since(seq)
        assert [c.case_id for c in later] == ["c-queued", "c-new"]
        assert after > seq
        indexes = {r["name"]: r["unique"] for r in s._conn.execute("PRAGMA index_list(cases)")}
        assert indexes["cases_by_change"] == 1


def test_not_a_database_is_a_clear_store_error(tmp_path: Path) -> None:
    bogus = tmp_path / "cases.sqlite3"
    bogus.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError) as info:
        CaseStore.open(bogus)
    assert "\n" not in str(info.value)
    assert info.value.code == "store_error"


def test_a_closed_store_raises_store_error(db_path: Path) -> None:
    with CaseStore.open(db_path) as s:
        pass
    with pytest.raises(StoreError):
        s.get("case-0001")


# --- several processes ----------------------------------------------------------------------


def test_two_instances_on_one_file_see_each_others_commits(db_path: Path) -> None:
    with CaseStore.open(db_path) as watch, CaseStore.open(db_path) as gui:
        watch.record_result(make_result(decision="escalate", reason="uncertain"), E.ENQUEUE)
        seen = gui.get("case-0001")
        assert seen is not None
        assert seen.state is S.QUEUED

        assert gui.apply("case-0001", E.START_SEND) is S.SENDING
        case = watch.get("case-0001")
        assert case is not None
        assert case.state is S.SENDING
        # The second uploader to try reads the committed state and is refused.
        with pytest.raises(IllegalTransitionError):
            watch.apply("case-0001", E.START_SEND)


def test_a_writer_waiting_too_long_gets_a_store_error(db_path: Path) -> None:
    with CaseStore.open(db_path, busy_timeout_s=0.05) as s:
        s.record_result(make_result(), E.DECIDE_LOCAL_NORMAL)
        other = sqlite3.connect(db_path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreError, match="locked"):
                s.apply("case-0001", E.ACKNOWLEDGE)
            other.execute("ROLLBACK")
        finally:
            other.close()
        case = s.get("case-0001")
        assert case is not None
        assert case.state is S.LOCAL_NORMAL
        assert s.apply("case-0001", E.ACKNOWLEDGE) is S.ACKNOWLEDGED


def test_open_waits_for_another_process_creating_the_file(db_path: Path) -> None:
    # Another process is creating the store and holds the write lock on the new, empty file.
    # SQLite then fails "PRAGMA journal_mode=WAL" at once instead of calling the busy handler.
    db_path.parent.mkdir()
    creator = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    creator.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.3, creator.execute, args=("COMMIT",))
    release.start()
    try:
        with CaseStore.open(db_path, busy_timeout_s=10) as s:
            assert s.schema_version == LATEST_SCHEMA
    finally:
        release.join()
        creator.close()


def test_open_gives_up_after_the_busy_timeout(db_path: Path) -> None:
    db_path.parent.mkdir()
    creator = sqlite3.connect(db_path, isolation_level=None)
    try:
        creator.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(StoreError, match="locked"):
            CaseStore.open(db_path, busy_timeout_s=0.2)
        assert time.monotonic() - started >= 0.2
    finally:
        creator.close()


# Root may use any file, and these tests run as root: the store is opened as the service user
# (``nobody``) on files root left behind (helpers: tests/test_secrets.py).
_OPEN = """
import json, sys
from pathlib import Path
from triage_app.errors import TriageError
from triage_app.store import CaseStore
try:
    CaseStore.open(Path(sys.argv[1])).close()
    print(json.dumps({"code": None, "error": None}))
except TriageError as err:
    print(json.dumps({"code": err.code, "error": str(err)}))
"""


@pytest.mark.parametrize("left_by_root", ["folder", "file"])
def test_a_store_the_user_may_not_use_is_a_setting_to_fix_not_a_temporary_error(
    left_by_root: str,
) -> None:
    """It was ``store_error``, temporary (exit 75): a service restarted in vain, and
    ``config set`` told to try again. Whose the folder or file is, and the fix, instead."""
    with reachable_folder() as base:
        data = base / "data"
        data.mkdir(mode=0o700)
        path = data / "cases.sqlite3"
        if left_by_root == "file":
            CaseStore.open(path).close()  # 0600, root's
            give_to_service_user(data)

        result = run_as_service_user(_OPEN, path, home=base)

    obstacle = data if left_by_root == "folder" else path
    mode = "0700" if left_by_root == "folder" else "0600"
    assert result == {
        "code": "config_invalid",
        "error": f"paths.case_store: cannot use {obstacle}: owned by {ROOT}, not by nobody, the "
        f"user this runs as (mode {mode}): chown -R nobody: {data}",
    }


def _record_many(path: str, prefix: str, count: int, barrier: Any) -> None:
    """Child process: open the (maybe not yet existing) store and record ``count`` cases."""
    barrier.wait(timeout=60)
    with CaseStore.open(Path(path)) as s:
        for i in range(count):
            event = E.ENQUEUE if i % 2 else E.DECIDE_LOCAL_NORMAL
            s.record_result(make_result(f"{prefix}-{i:03d}"), event)


def test_two_processes_record_into_one_file(db_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [
        ctx.Process(target=_record_many, args=(str(db_path), name, 50, barrier))
        for name in ("watch", "gui")
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]

    with CaseStore.open(db_path) as s:
        cases = s.list_cases()
        assert len(cases) == 100
        assert {c.case_id.split("-")[0] for c in cases} == {"watch", "gui"}
        counts = s.counts_by_state()
        assert (counts["local_normal"], counts["queued"]) == (50, 50)
        (events,) = s._conn.execute("SELECT COUNT(*) FROM case_events").fetchone()
        assert events == 200


# --- privacy --------------------------------------------------------------------------------


def test_logs_carry_no_source_path_or_result(
    store: CaseStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="triage_app")
    store.record_result(make_result(), E.DECIDE_LOCAL_NORMAL)
    store.record_result(make_result(), E.DECIDE_LOCAL_NORMAL)
    store.apply("case-0001", E.ACKNOWLEDGE)
    store.record_failure(FailedInput(path=SOURCE, code="not_dicom", message="not DICOM"))

    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "case-0001" in text  # case ids are fine, and prove something was logged
    assert "DOE" not in text
    assert "incoming" not in text
    assert json.dumps(make_result().to_json()["probabilities"]) not in text


def test_pseudonym_links_stay_local_and_first_link_wins(db_path: Path) -> None:
    with CaseStore.open(db_path) as s:
        s.record_links([("patient", "P123", "id:MRN-1"), ("study", "2.25.1", "1.2.3")])
        s.record_links([("patient", "P123", "id:SOMETHING-ELSE")])  # a known link never moves
        s.record_links([])
    with CaseStore.open(db_path) as s:
        assert s.original_for("patient", "P123") == "id:MRN-1"
        assert s.original_for("study", "2.25.1") == "1.2.3"
        assert s.original_for("series", "2.25.1") is None


def test_a_recorded_case_keeps_its_pseudonym_links_in_the_same_commit(
    store: CaseStore,
) -> None:
    result = replace(make_result(), links=(("patient", "P9", "id:MRN-9"),))
    with pytest.raises(IllegalTransitionError):
        store.record_result(result, E.ADMIN_RETRY)  # refused: nothing at all is kept
    assert store.original_for("patient", "P9") is None

    store.record_result(result, E.DECIDE_LOCAL_NORMAL)

    assert store.original_for("patient", "P9") == "id:MRN-9"


def test_a_verdict_is_kept_once_the_case_is_delivered(store: CaseStore) -> None:
    store.record_result(make_result(), E.ENQUEUE)
    verdict = {"verdict": "abnormal", "score": 0.91, "model": {"name": "central"}}
    with pytest.raises(IllegalTransitionError):
        store.record_verdict("case-0001", verdict)  # still queued
    store.apply("case-0001", E.START_SEND)
    store.apply("case-0001", E.DELIVER)
    assert store.record_verdict("case-0001", verdict) is S.VERDICT_RECEIVED
    case = store.get("case-0001")
    assert case is not None
    assert case.verdict == verdict
    assert store.history("case-0001")[-1].event == E.RECEIVE_VERDICT
    with pytest.raises(StoreError, match="unknown case id"):
        store.record_verdict("ghost", verdict)


def test_cases_without_a_verdict_read_as_none(store: CaseStore) -> None:
    store.record_result(make_result(), E.ENQUEUE)
    case = store.get("case-0001")
    assert case is not None
    assert case.verdict is None


@pytest.mark.parametrize("kind", list(Feedback))
def test_feedback_acknowledges_the_case_with_user_time_and_audit(
    store: CaseStore, kind: Feedback
) -> None:
    store.record_result(make_result(), E.DECIDE_LOCAL_NORMAL)
    record = store.record_feedback("case-0001", "dr.grey", kind, "  looks   fine ")
    assert (record.kind, record.actor, record.comment) == (kind, "dr.grey", "looks fine")
    assert ISO_MS_UTC.match(record.at)
    case = store.get("case-0001")
    assert case is not None and case.state is S.ACKNOWLEDGED
    last = store.history("case-0001")[-1]
    assert (last.from_state, last.to_state, last.event, last.at) == (
        S.LOCAL_NORMAL,
        S.ACKNOWLEDGED,
        E.ACKNOWLEDGE,
        record.at,
    )
    assert last.detail == f"{kind} by dr.grey: looks fine"
    assert store.feedback("case-0001") == [record]
    entry = store.audit_log()[-1]
    assert (entry.at, entry.actor, entry.action) == (record.at, "dr.grey", "case.feedback")
    assert entry.detail == {"case_id": "case-0001", "kind": kind.value, "comment": "looks fine"}


def test_feedback_the_table_does_not_allow_changes_nothing(store: CaseStore) -> None:
    store.record_result(make_result(decision="escalate", reason="uncertain"), E.ENQUEUE)
    with pytest.raises(IllegalTransitionError):
        store.record_feedback("case-0001", "dr.grey", Feedback.ACCEPT)
    store.record_result(make_result("case-0002"), E.DECIDE_LOCAL_NORMAL)
    store.record_feedback("case-0002", "dr.grey", Feedback.REJECT)
    with pytest.raises(IllegalTransitionError):  # acknowledged is terminal
        store.record_feedback("case-0002", "dr.grey", Feedback.ACCEPT)
    assert store.feedback("case-0001") == []
    assert [f.kind for f in store.feedback("case-0002")] == [Feedback.REJECT]
    assert [e.action for e in store.audit_log()] == ["case.feedback"]


def test_feedback_needs_a_known_case_and_a_user(store: CaseStore) -> None:
    with pytest.raises(StoreError, match="unknown case id"):
        store.record_feedback("missing", "dr.grey", Feedback.ACKNOWLEDGE)
    store.record_result(make_result(), E.DECIDE_LOCAL_NORMAL)
    with pytest.raises(StoreError, match="name of the user"):
        store.record_feedback("case-0001", " ", Feedback.ACKNOWLEDGE)
    assert store.get("case-0001").state is S.LOCAL_NORMAL  # type: ignore[union-attr]


# --- held cases and the outbox in the same file ----------------------------------------------


HELD_ID = "ab" * 32  # the outbox takes SHA-256 hex case ids only


def _queue_envelope(db_path: Path, case_id: str) -> None:
    """Put the case's envelope in the outbox of the same file, as ``Outbox.enqueue`` does
    before the case store records it as queued."""
    envelope = b"sealed" * 10
    with Outbox.open(db_path, db_path.parent / "outbox", quota_bytes=10_000) as outbox:
        outbox.enqueue(
            case_id,
            envelope,
            reason="uncertain",
            payload_sha256=hashlib.sha256(envelope).hexdigest(),
        )


def test_a_held_case_whose_envelope_is_queued_cannot_be_acknowledged(
    store: CaseStore, db_path: Path
) -> None:
    store.record_result(make_result(HELD_ID, decision="escalate", reason="uncertain"), E.HOLD)
    _queue_envelope(db_path, HELD_ID)

    with pytest.raises(AlreadyQueuedError, match="already in the outbox") as raised:
        store.record_feedback(HELD_ID, "dr.grey", Feedback.ACCEPT, "do not send")

    assert raised.value.code == "already_queued"
    assert isinstance(raised.value, IllegalTransitionError)
    assert store.get(HELD_ID).state is S.ESCALATION_HELD  # type: ignore[union-attr]
    assert store.feedback(HELD_ID) == []
    assert store.audit_log() == []
    # A held case that is not in the outbox is closed as before.
    store.record_result(make_result("cd" * 32, decision="escalate", reason="uncertain"), E.HOLD)
    store.record_feedback("cd" * 32, "dr.grey", Feedback.ACCEPT, "do not send")
    assert store.get("cd" * 32).state is S.ACKNOWLEDGED  # type: ignore[union-attr]


def test_the_still_held_check_refuses_a_case_that_moved_on(store: CaseStore, db_path: Path) -> None:
    store.record_result(make_result(HELD_ID, decision="escalate", reason="uncertain"), E.HOLD)
    conn = sqlite3.connect(db_path)
    try:
        still_held(HELD_ID)(conn)  # held: no error
        store.record_feedback(HELD_ID, "dr.grey", Feedback.ACCEPT, "do not send")
        with pytest.raises(IllegalTransitionError, match="acknowledged, no longer escalation_held"):
            still_held(HELD_ID)(conn)
        with pytest.raises(StoreError, match="unknown case id"):
            still_held("ef" * 32)(conn)
    finally:
        conn.close()


# --- reads never wait for a writer -------------------------------------------------------------


def test_an_up_to_date_store_opens_and_reads_while_another_process_writes(db_path: Path) -> None:
    with CaseStore.open(db_path) as s:
        s.record_result(make_result(), E.HOLD)
    # Another process (a service in a slow fsync, a suspended `queue drain`) holds the write lock.
    with hold_write_lock(db_path):
        started = time.monotonic()
        with CaseStore.open(db_path, busy_timeout_s=2.0) as s:
            assert [t.event for t in s.history("case-0001")] == [E.ANALYSE, E.HOLD]
            assert s.schema_version == LATEST_SCHEMA
        assert time.monotonic() - started < 1.0


def test_a_store_that_needs_a_migration_still_waits_for_the_write_lock(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    CaseStore.open(db_path).close()
    steps = (("ALTER TABLE cases ADD COLUMN site TEXT",),)
    monkeypatch.setattr(store_module, "_MIGRATIONS", (*store_module._MIGRATIONS, *steps))
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError, match="locked"):
            CaseStore.open(db_path, busy_timeout_s=0.1)
        other.execute("ROLLBACK")
    finally:
        other.close()
    with CaseStore.open(db_path) as s:
        assert s.schema_version == LATEST_SCHEMA + 1


# --- file names that are not UTF-8 -------------------------------------------------------------


def test_a_path_that_is_not_utf8_is_recorded_as_portable_text(store: CaseStore) -> None:
    # A Latin-1 "Müller" from a Windows share, as Python decodes it from the file system.
    path = os.fsdecode(b"/inbox/b_M\xfcller.dcm")
    portable = "/inbox/b_M\\xfcller.dcm"

    store.record_result(make_result(path=path), E.DECIDE_LOCAL_NORMAL)
    store.record_failure(FailedInput(path, "not_dicom", f"{path}: not a DICOM file", "0" * 64))
    store.record_failure(FailedInput(path, "not_dicom", f"{path}: not a DICOM file", "0" * 64))

    case = store.get("case-0001")
    assert case is not None and case.result["path"] == portable
    assert store._conn.execute("SELECT source FROM cases").fetchone()[0] == portable
    (failure,) = store.failures()
    assert (failure.path, failure.message) == (portable, f"{portable}: not a DICOM file")
    json.dumps(case.result, ensure_ascii=False).encode("utf-8")  # strict UTF-8 JSON
