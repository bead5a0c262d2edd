"""The outbox on real SQLite files and spool folders, with real processes and real SIGKILLs."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.escalation.outbox_crash_child import (
    case_id_for,
    enqueue_case,
    envelope_for,
    reason_for,
)
from tests.other_process import hold_write_lock
from triage_app.errors import (
    OutboxError,
    OutboxIncompatibleError,
    QueueFullError,
    UnknownQueuedCaseError,
)
from triage_app.escalation import outbox as outbox_module
from triage_app.escalation.backoff import MAX_RETRY_AFTER_S
from triage_app.escalation.outbox import (
    ESCALATION_PRIORITY,
    MAX_LEASE_S,
    MAX_WAIT_S,
    Outbox,
    OutboxItem,
    OutboxState,
    SpoolFileDamagedError,
)
from triage_app.store import CaseStore

CHILD = Path(__file__).with_name("outbox_crash_child.py")
ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)
QUOTA = 10_000_000
RECEIPT = json.dumps({"receipt": {"deliveries": 1}, "signature": "c2ln"})


def cid(n: int) -> str:
    return hashlib.sha256(f"case-{n}".encode()).hexdigest()[:32]


def env(n: int, size: int = 100) -> bytes:
    return (f"envelope-{n}-".encode() * size)[:size]


def enqueue(
    outbox: Outbox, n: int, *, size: int = 100, reason: str = "uncertain", at: datetime = T0
) -> OutboxItem:
    data = env(n, size)
    return outbox.enqueue(
        cid(n), data, reason=reason, payload_sha256=hashlib.sha256(data).hexdigest(), now=at
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "data" / "cases.sqlite"


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "data" / "outbox"


@pytest.fixture
def outbox(db: Path, spool: Path) -> Iterator[Outbox]:
    with Outbox.open(db, spool, quota_bytes=QUOTA) as box:
        yield box


def spool_names(spool: Path) -> set[str]:
    return {p.name for p in spool.iterdir()}


def state_of(outbox: Outbox, n: int) -> OutboxState:
    item = outbox.get(cid(n))
    assert item is not None
    return item.state


def claim_all(outbox: Outbox, at: datetime = T0) -> list[str]:
    out: list[str] = []
    while (item := outbox.claim_next("w", 60, now=at)) is not None:
        out.append(item.case_id)
    return out


# --- the basic flow ------------------------------------------------------------------------------


def test_enqueue_writes_a_private_spool_file_and_a_pending_row(outbox: Outbox, spool: Path, db):
    item = enqueue(outbox, 1, size=5000, reason="out_of_scope")

    path = spool / f"{cid(1)}.env"
    assert path.read_bytes() == env(1, 5000)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(spool.stat().st_mode) == 0o700
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert spool_names(spool) == {path.name}  # no temporary file left
    assert item.state is OutboxState.PENDING
    assert (item.case_id, item.reason, item.size_bytes, item.attempts) == (
        cid(1),
        "out_of_scope",
        5000,
        0,
    )
    assert item.priority == ESCALATION_PRIORITY["out_of_scope"]
    assert item.payload_sha256 == hashlib.sha256(env(1, 5000)).hexdigest()
    assert item.enqueued_at == item.next_attempt_at == "2026-11-22T10:00:00.000+00:00"
    assert item.lease_owner is item.lease_until is item.delivered_at is item.receipt is None
    assert outbox.get(cid(1)) == item
    assert outbox.envelope(item) == outbox.envelope(cid(1)) == env(1, 5000)


def test_the_outbox_shares_the_case_store_file_without_touching_its_schema(db: Path, spool):
    with Outbox.open(db, spool, quota_bytes=QUOTA) as first:
        enqueue(first, 1)
    with CaseStore.open(db) as store:
        version = store.schema_version
        assert version > 0
    with Outbox.open(db, spool, quota_bytes=QUOTA) as again, CaseStore.open(db) as store:
        assert [i.case_id for i in again.items()] == [cid(1)]
        assert store.schema_version == version
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT value FROM outbox_meta").fetchall() == [(2,)]
    finally:
        conn.close()


def test_claim_then_deliver_keeps_the_row_and_deletes_the_file(outbox: Outbox, spool: Path):
    enqueue(outbox, 1)

    claimed = outbox.claim_next("uploader-1", 30, now=T0)
    assert claimed is not None
    assert claimed.state is OutboxState.IN_FLIGHT
    assert claimed.lease_owner == "uploader-1"
    assert claimed.lease_until == "2026-11-22T10:00:30.000+00:00"
    assert outbox.claim_next("uploader-2", 30, now=T0) is None
    assert outbox.envelope(claimed) == env(1)

    outbox.mark_delivered(cid(1), RECEIPT, now=T0 + timedelta(seconds=2))

    done = outbox.get(cid(1))
    assert done is not None
    assert done.state is OutboxState.DELIVERED
    assert done.receipt == RECEIPT
    assert done.delivered_at == "2026-11-22T10:00:02.000+00:00"
    assert done.lease_owner is None
    outbox.wait_for_removals()  # the file is removed on a helper thread
    assert spool_names(spool) == set()
    assert [i.case_id for i in outbox.items()] == [cid(1)]  # history stays

    with pytest.raises(OutboxError, match="delivered"):
        outbox.envelope(cid(1))
    assert outbox.claim_next("uploader-1", 30, now=T0 + timedelta(days=1)) is None


def test_delivery_clears_the_last_error_and_keeps_the_attempts(outbox: Outbox) -> None:
    """``queue list`` showed ``last error: transport_error: ... ECONNREFUSED`` next to
    ``delivered``: an error that is over is no error of the case's."""
    enqueue(outbox, 1)
    assert outbox.claim_next("w", 30, now=T0) is not None
    error = "transport_error: cannot reach https://127.0.0.1:1: ECONNREFUSED"
    assert outbox.mark_failed(cid(1), error, T0, owner="w", now=T0)
    failed = outbox.get(cid(1))
    assert failed is not None and failed.last_error == error
    assert outbox.claim_next("w", 30, now=T0 + timedelta(seconds=1)) is not None
    assert outbox.mark_delivered(cid(1), RECEIPT, owner="w", now=T0 + timedelta(seconds=2))

    done = outbox.get(cid(1))
    assert done is not None and done.state is OutboxState.DELIVERED
    assert done.last_error is None
    assert done.attempts == 1


def test_a_sent_envelope_stays_readable_while_its_file_is_removed(
    outbox: Outbox, spool: Path
) -> None:
    enqueue(outbox, 1, size=3 * 1024 * 1024)
    claimed = outbox.claim_next("uploader-1", 30, now=T0)
    assert claimed is not None
    view = outbox.envelope(claimed)  # mapped from the spool file, not copied
    assert view.readonly and view.nbytes == claimed.size_bytes

    outbox.mark_delivered(cid(1), RECEIPT)
    outbox.close()  # waits for the removal

    assert spool_names(spool) == set()
    assert view == env(1, 3 * 1024 * 1024)


def test_a_spool_folder_that_cannot_map_files_is_read_instead(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    enqueue(outbox, 1, size=5000)

    def no_mapping(*_: object, **__: object) -> mmap.mmap:
        raise OSError(errno.ENODEV, "No such device")

    monkeypatch.setattr(mmap, "mmap", no_mapping)
    view = outbox.envelope(cid(1))
    assert view.readonly and view == env(1, 5000)


def test_to_json_is_what_queue_list_prints(outbox: Outbox):
    item = enqueue(outbox, 1)
    record = item.to_json()
    assert json.loads(json.dumps(record)) == record
    assert record["case_id"] == cid(1)
    assert record["state"] == "pending"
    assert record["attempts"] == 0
    assert record["payload_sha256"] == item.payload_sha256
    assert record["enqueued_at"] == record["next_attempt_at"] == item.enqueued_at
    assert {"delivered_at", "last_error", "reason"} <= record.keys()
    assert "receipt" not in record


# --- state rules ---------------------------------------------------------------------------------


def test_a_failure_needs_an_in_flight_case(outbox: Outbox):
    enqueue(outbox, 1)
    with pytest.raises(OutboxError, match="pending, not in_flight"):
        outbox.mark_failed(cid(1), "timeout", T0)
    with pytest.raises(OutboxError, match="not quarantined"):
        outbox.retry(cid(1))
    outbox.claim_next("w", 60, now=T0)
    outbox.mark_delivered(cid(1), RECEIPT, owner="w")
    with pytest.raises(OutboxError, match="delivered, not in_flight"):
        outbox.mark_failed(cid(1), "late", T0)
    with pytest.raises(OutboxError, match="delivered"):
        outbox.quarantine(cid(1), "late")
    assert state_of(outbox, 1) is OutboxState.DELIVERED


def test_a_second_receipt_for_a_delivered_case_is_success_and_the_first_is_kept(
    outbox: Outbox,
):
    enqueue(outbox, 1)
    outbox.claim_next("w", 60, now=T0)
    assert outbox.mark_delivered(cid(1), RECEIPT, owner="w", now=T0) is True
    second = json.dumps({"receipt": {"deliveries": 2}, "signature": "c2ln"})

    assert outbox.mark_delivered(cid(1), second, owner="w", now=T0 + timedelta(seconds=1)) is False

    item = outbox.get(cid(1))
    assert item is not None and item.state is OutboxState.DELIVERED
    assert (item.receipt, item.delivered_at) == (RECEIPT, "2026-11-22T10:00:00.000+00:00")


def two_senders_on_one_case(outbox: Outbox) -> OutboxItem:
    """Sender "a" claims case 1 for 30 s and outlasts its lease; sender "b" takes it over."""
    enqueue(outbox, 1)
    assert outbox.claim_next("a", 30, now=T0) is not None
    taken = outbox.claim_next("b", 30, now=T0 + timedelta(seconds=31))
    assert taken is not None and taken.lease_owner == "b"
    return taken


def test_a_late_failure_or_quarantine_leaves_the_new_senders_lease_alone(outbox: Outbox):
    taken = two_senders_on_one_case(outbox)
    late = T0 + timedelta(seconds=40)

    assert outbox.mark_failed(cid(1), "timeout", late, owner="a", now=late) is False
    assert outbox.quarantine(cid(1), "damaged", owner="a", now=late) is False

    assert outbox.get(cid(1)) == taken, "still b's, in flight, lease and attempts unchanged"
    assert outbox.claim_next("c", 30, now=late) is None
    assert outbox.mark_delivered(cid(1), RECEIPT, owner="b", now=late) is True
    assert state_of(outbox, 1) is OutboxState.DELIVERED


def test_a_late_failure_cannot_undo_a_delivery(outbox: Outbox):
    two_senders_on_one_case(outbox)
    outbox.mark_delivered(cid(1), RECEIPT, owner="b", now=T0 + timedelta(seconds=32))

    assert outbox.mark_failed(cid(1), "reset", T0, owner="a") is False

    assert state_of(outbox, 1) is OutboxState.DELIVERED


def test_a_receipt_counts_even_from_a_sender_that_lost_its_lease(outbox: Outbox):
    two_senders_on_one_case(outbox)
    late = T0 + timedelta(seconds=35)

    # The server's signed receipt says it holds the case, whoever holds the lease now.
    assert outbox.mark_delivered(cid(1), RECEIPT, owner="a", now=late) is True
    # The sender that took over then gets the same receipt: success, not an error.
    assert outbox.mark_delivered(cid(1), RECEIPT, owner="b", now=late) is False
    assert outbox.mark_failed(cid(1), "reset", late, owner="b", now=late) is False
    delivered = outbox.get(cid(1))
    assert delivered is not None and delivered.state is OutboxState.DELIVERED
    assert delivered.lease_owner is None


def test_only_the_holder_renews_a_lease_and_a_renewed_lease_is_not_taken_over(outbox: Outbox):
    enqueue(outbox, 1)
    assert outbox.claim_next("a", 30, now=T0) is not None
    renewer = outbox.lease_renewer()
    try:
        assert renewer.renew(cid(1), "a", 30, now=T0 + timedelta(seconds=20)) is True
        renewed = outbox.get(cid(1))
        assert renewed is not None and renewed.lease_until == "2026-11-22T10:00:50.000+00:00"
        # Past the first lease, within the renewed one: nobody else gets the case.
        assert outbox.claim_next("b", 30, now=T0 + timedelta(seconds=45)) is None
        assert renewer.renew(cid(1), "b", 30, now=T0 + timedelta(seconds=45)) is False

        taken = outbox.claim_next("b", 30, now=T0 + timedelta(seconds=50))
        assert taken is not None and taken.lease_owner == "b"
        assert renewer.renew(cid(1), "a", 30, now=T0 + timedelta(seconds=51)) is False
        assert outbox.get(cid(1)) == taken
        outbox.mark_delivered(cid(1), RECEIPT, owner="b")
        assert renewer.renew(cid(1), "b", 30) is False
    finally:
        renewer.close()


def test_unknown_cases_are_refused(outbox: Outbox):
    unknown = cid(99)
    assert outbox.get(unknown) is None
    for call in (
        lambda: outbox.mark_delivered(unknown, RECEIPT),
        lambda: outbox.mark_failed(unknown, "x", T0),
        lambda: outbox.quarantine(unknown, "x"),
        lambda: outbox.retry(unknown),
        lambda: outbox.envelope(unknown),
    ):
        with pytest.raises(UnknownQueuedCaseError):
            call()


def test_bad_arguments_are_refused_before_anything_is_written(outbox: Outbox, spool: Path):
    sha = "0" * 64
    with pytest.raises(OutboxError, match="unknown escalation reason"):
        outbox.enqueue(cid(1), b"x", reason="confident_normal", payload_sha256=sha)
    with pytest.raises(ValueError, match="case_id"):
        outbox.enqueue("../../etc/passwd", b"x", reason="uncertain", payload_sha256=sha)
    with pytest.raises(ValueError, match="payload_sha256"):
        outbox.enqueue(cid(1), b"x", reason="uncertain", payload_sha256="abc")
    with pytest.raises(ValueError, match="timezone"):
        outbox.enqueue(
            cid(1), b"x", reason="uncertain", payload_sha256=sha, now=datetime(2026, 1, 1)
        )
    with pytest.raises(ValueError, match="lease_s"):
        outbox.claim_next("w", 0)
    assert outbox.items() == []
    assert spool_names(spool) == set()
    enqueue(outbox, 1)
    outbox.claim_next("w", 60, now=T0)
    with pytest.raises(OutboxError, match="not JSON"):
        outbox.mark_delivered(cid(1), "{not json")
    assert state_of(outbox, 1) is OutboxState.IN_FLIGHT


def test_enqueue_is_idempotent(outbox: Outbox, spool: Path):
    first = enqueue(outbox, 1)
    path = spool / f"{cid(1)}.env"
    inode = path.stat().st_ino

    again = outbox.enqueue(
        cid(1), b"a re-sealed envelope", reason="out_of_scope", payload_sha256="1" * 64
    )

    assert again == first
    assert path.stat().st_ino == inode
    assert path.read_bytes() == env(1)
    assert len(outbox.items()) == 1
    assert spool_names(spool) == {path.name}
    outbox.claim_next("w", 60, now=T0)
    outbox.mark_delivered(cid(1), RECEIPT)
    # Delivered is still "already queued": nothing is sent twice.
    assert enqueue(outbox, 1).state is OutboxState.DELIVERED
    outbox.wait_for_removals()
    assert spool_names(spool) == set()


# --- order, backoff, leases ----------------------------------------------------------------------


def test_priority_first_then_fifo(outbox: Outbox):
    assert ESCALATION_PRIORITY["uncertain"] < ESCALATION_PRIORITY["out_of_scope"]
    reasons = ["out_of_scope", "uncertain", "out_of_scope", "uncertain", "uncertain"]
    for n, reason in enumerate(reasons):
        # Later enqueue times on the out-of-scope cases cannot matter: order is by sequence.
        enqueue(outbox, n, reason=reason, at=T0 - timedelta(seconds=n))

    expected = [cid(1), cid(3), cid(4), cid(0), cid(2)]
    assert [i.case_id for i in outbox.items()] == expected
    assert claim_all(outbox) == expected


def claimed_id(outbox: Outbox, at: datetime) -> str | None:
    item = outbox.claim_next("w", 3600, now=at)
    return None if item is None else item.case_id


def test_backoff_is_respected(outbox: Outbox):
    enqueue(outbox, 1)
    enqueue(outbox, 2)
    assert claimed_id(outbox, T0) == cid(1)
    retry_at = T0 + timedelta(minutes=5)

    outbox.mark_failed(cid(1), "HTTP 503\nservice   unavailable", retry_at, now=T0)

    failed = outbox.get(cid(1))
    assert failed is not None
    assert failed.state is OutboxState.PENDING
    assert failed.attempts == 1
    assert failed.last_error == "HTTP 503 service unavailable"
    assert failed.next_attempt_at == "2026-11-22T10:05:00.000+00:00"
    assert failed.lease_owner is None
    # The other case goes meanwhile; the failed one waits for its time.
    assert claimed_id(outbox, T0) == cid(2)
    assert claimed_id(outbox, retry_at - timedelta(milliseconds=1)) is None
    again = outbox.claim_next("w", 60, now=retry_at)
    assert again is not None
    assert (again.case_id, again.attempts) == (cid(1), 1)
    outbox.mark_failed(cid(1), "timeout", retry_at, now=retry_at)
    assert [i.attempts for i in outbox.items()] == [2, 0]


def test_expired_lease_is_reclaimed(outbox: Outbox):
    enqueue(outbox, 1)
    first = outbox.claim_next("dead-sender", 30, now=T0)
    assert first is not None

    assert outbox.claim_next("other", 30, now=T0 + timedelta(seconds=29)) is None
    reclaimed = outbox.claim_next("other", 30, now=T0 + timedelta(seconds=30))

    assert reclaimed is not None
    assert reclaimed.case_id == cid(1)
    assert reclaimed.lease_owner == "other"
    assert reclaimed.lease_until == "2026-11-22T10:01:00.000+00:00"
    assert reclaimed.attempts == 1
    assert reclaimed.last_error is not None and "lease expired" in reclaimed.last_error
    # The dead sender's late receipt still lands (the server treats repeats as the same case).
    assert outbox.mark_delivered(cid(1), RECEIPT, owner="dead-sender") is True
    assert state_of(outbox, 1) is OutboxState.DELIVERED


@pytest.mark.expect_log_warnings
def test_waits_and_leases_dated_by_a_clock_that_went_back_end_now(
    outbox: Outbox, caplog: pytest.LogCaptureFixture
):
    """A PC booted with its clock a day ahead queues cases, NTP puts the clock right: the
    cases must not wait a day for nothing (nor a dead sender's lease hold one a day)."""
    ahead = T0 + timedelta(days=1)
    enqueue(outbox, 1, at=ahead)  # due at once, by the wrong clock
    enqueue(outbox, 2, at=ahead)
    enqueue(outbox, 3, at=ahead)
    assert outbox.claim_next("dead-sender", 300, now=ahead) is not None  # case 1
    assert outbox.claim_next("w", 300, now=ahead) is not None  # case 2
    outbox.mark_failed(cid(2), "timeout", ahead + timedelta(seconds=30), owner="w", now=ahead)

    # The clock put right, during a `queue drain` that started a moment before (its due_by).
    claimed = []
    while item := outbox.claim_next("w", 60, now=T0, due_by=T0 - timedelta(seconds=5)):
        claimed.append(item.case_id)

    assert sorted(claimed) == sorted([cid(1), cid(2), cid(3)])
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [
        "outbox: 2 case(s) due and 1 lease(s) ending further ahead than any wait or lease can"
        " be: the clock went back; they are due now"
    ]


def test_a_long_wait_or_lease_that_a_clock_can_explain_is_kept(outbox: Outbox):
    """The limit is above the longest a case is ever told to wait: a Retry-After of an hour
    (the cap) is kept, and so is a lease renewed to its end."""
    enqueue(outbox, 1)
    enqueue(outbox, 2)
    outbox.claim_next("w", 60, now=T0)
    hour = T0 + timedelta(seconds=MAX_RETRY_AFTER_S)
    outbox.mark_failed(cid(1), "busy", hour, owner="w", now=T0)
    assert outbox.claim_next("sender", MAX_LEASE_S, now=T0) is not None  # case 2

    # Another sender whose clock read a little earlier (or runs a little behind).
    assert outbox.claim_next("other", 60, now=T0 - timedelta(seconds=1)) is None
    assert outbox.claim_next("other", 60, now=T0 + timedelta(seconds=1)) is None
    assert outbox.next_attempt_at() == hour


def test_a_wait_or_lease_beyond_the_limits_is_refused(outbox: Outbox):
    enqueue(outbox, 1)
    with pytest.raises(ValueError, match="lease_s"):
        outbox.claim_next("w", MAX_LEASE_S + 1, now=T0)
    assert outbox.claim_next("w", 60, now=T0) is not None
    with pytest.raises(ValueError, match="retry_at"):
        outbox.mark_failed(cid(1), "x", T0 + timedelta(seconds=MAX_WAIT_S + 1), now=T0)
    assert state_of(outbox, 1) is OutboxState.IN_FLIGHT


def test_next_attempt_at_is_the_earliest_pending_due_time(outbox: Outbox):
    assert outbox.next_attempt_at() is None
    enqueue(outbox, 1)
    enqueue(outbox, 2)
    outbox.claim_next("w", 60, now=T0)
    outbox.mark_failed(cid(1), "offline", T0 + timedelta(minutes=5), now=T0)
    assert outbox.next_attempt_at() == T0  # case 2 is due at once
    outbox.claim_next("w", 60, now=T0)
    outbox.mark_delivered(cid(2), RECEIPT)
    assert outbox.next_attempt_at() == T0 + timedelta(minutes=5)


def test_a_dead_senders_lease_is_released_at_once(outbox: Outbox):
    enqueue(outbox, 1)
    enqueue(outbox, 2)
    outbox.claim_next("host:111:dead", 300, now=T0)
    outbox.claim_next("host:222:alive", 300, now=T0)

    released = outbox.release_leases(lambda owner: owner.endswith(":dead"), now=T0)

    assert released == [cid(1)]
    assert claimed_id(outbox, T0) == cid(1)  # due again, without waiting out 300 s
    taken_back = outbox.get(cid(1))
    assert taken_back is not None and taken_back.attempts == 1
    assert claimed_id(outbox, T0) is None  # the live sender keeps its case


@pytest.mark.expect_log_warnings
def test_due_now_cuts_short_only_the_waits_for_the_link(outbox: Outbox):
    for n in (1, 2, 3, 4):
        enqueue(outbox, n)
    outbox.claim_next("w", 60, now=T0)
    outbox.mark_failed(cid(1), "offline", T0 + timedelta(minutes=1), wait_for_link=True, now=T0)
    outbox.claim_next("w", 60, now=T0)
    outbox.mark_failed(cid(2), "offline", T0 + timedelta(minutes=1), wait_for_link=True, now=T0)
    outbox.claim_next("w", 60, now=T0)
    outbox.quarantine(cid(3), "refused", now=T0)
    outbox.claim_next("w", 60, now=T0)
    # The server answered 503 with Retry-After: 120; the link was fine.
    outbox.mark_failed(cid(4), "HTTP 503", T0 + timedelta(minutes=2), now=T0)

    assert outbox.due_now(now=T0 + timedelta(seconds=1)) == 2

    assert claim_all(outbox, T0 + timedelta(seconds=1)) == [cid(1), cid(2)]
    assert state_of(outbox, 3) is OutboxState.QUARANTINED
    waiting = outbox.get(cid(4))
    assert waiting is not None and waiting.state is OutboxState.PENDING
    assert waiting.next_attempt_at == "2026-11-22T10:02:00.000+00:00"


def test_an_outbox_of_the_first_schema_is_migrated_with_its_queue(db: Path, spool: Path):
    """Rows queued by the previous version keep their place; none waits for the link."""
    with Outbox.open(db, spool, quota_bytes=QUOTA) as outbox:
        enqueue(outbox, 1)
    conn = sqlite3.connect(db)
    try:  # back to schema 1, as the previous version left it
        conn.execute("ALTER TABLE outbox DROP COLUMN wait_for_link")
        conn.execute("UPDATE outbox_meta SET value = 1 WHERE key = 'schema_version'")
        conn.commit()
    finally:
        conn.close()

    with Outbox.open(db, spool, quota_bytes=QUOTA) as outbox:
        assert [i.case_id for i in outbox.items()] == [cid(1)]
        outbox.claim_next("w", 60, now=T0)
        outbox.mark_failed(cid(1), "offline", T0 + timedelta(minutes=1), now=T0)
        assert outbox.due_now(now=T0) == 0
        assert outbox.envelope(cid(1)) == env(1)


@pytest.mark.expect_log_warnings
def test_quarantine_and_admin_retry(outbox: Outbox, spool: Path, caplog):
    enqueue(outbox, 1)
    enqueue(outbox, 2)
    outbox.claim_next("w", 60, now=T0)
    outbox.mark_failed(cid(1), "timeout", T0, now=T0)
    assert claimed_id(outbox, T0) == cid(1)

    outbox.quarantine(cid(1), "rejected: case_conflict\n(409)", now=T0)

    item = outbox.get(cid(1))
    assert item is not None
    assert item.state is OutboxState.QUARANTINED
    assert item.quarantine_reason == "rejected: case_conflict (409)"
    assert item.last_error == "timeout"
    assert item.lease_owner is None
    assert (spool / f"{cid(1)}.env").exists()  # kept for the admin
    assert claimed_id(outbox, T0) == cid(2)  # the queue goes on without it
    assert claimed_id(outbox, T0 + timedelta(minutes=1)) is None
    with pytest.raises(OutboxError, match="quarantined"):
        outbox.quarantine(cid(1), "again")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        f"outbox: case {cid(1)} quarantined: rejected: case_conflict (409)"
    ]

    back = outbox.retry(cid(1), now=T0 + timedelta(hours=1))

    assert back.state is OutboxState.PENDING
    assert back.attempts == 0
    assert back.quarantine_reason is None
    assert back.last_error == "timeout"
    assert outbox.claim_next("w", 60, now=T0 + timedelta(hours=1)) == outbox.get(cid(1))
    # A pending case can be quarantined too (an admin holding it back).
    enqueue(outbox, 3)
    outbox.quarantine(cid(3), "held by admin")
    assert outbox.status().quarantined == 1


# --- quota and status ----------------------------------------------------------------------------


@pytest.mark.expect_log_warnings
def test_a_full_queue_refuses_new_cases_and_keeps_everything(db: Path, spool: Path):
    with Outbox.open(db, spool, quota_bytes=1000) as outbox:
        enqueue(outbox, 1, size=400)
        enqueue(outbox, 2, size=300)
        before_items, before_files = outbox.items(), spool_names(spool)

        with pytest.raises(QueueFullError, match=r"700 of 1000 bytes \(70%\)") as caught:
            enqueue(outbox, 3, size=301)

        assert "2 undelivered cases" in str(caught.value)
        # The case's size, and what is missing: not the size as if it were what is missing.
        assert str(caught.value).endswith(
            "this case needs 301 bytes and 300 are free: deliveries must free 1 more"
        )
        assert outbox.items() == before_items
        assert spool_names(spool) == before_files
        assert outbox.get(cid(3)) is None
        enqueue(outbox, 3, size=300)  # exactly up to the quota fits
        assert outbox.status().full
        with pytest.raises(QueueFullError):
            enqueue(outbox, 4, size=1)

        # Quarantined envelopes still take room (their files stay); delivered ones free it.
        outbox.claim_next("w", 60, now=T0)
        outbox.quarantine(cid(1), "rejected")
        with pytest.raises(QueueFullError):
            enqueue(outbox, 4, size=1)
        outbox.claim_next("w", 60, now=T0)
        outbox.mark_delivered(cid(2), RECEIPT)
        assert not outbox.status().full
        enqueue(outbox, 4, size=300)
        with pytest.raises(QueueFullError, match=r"larger than the whole quota \(1000 bytes\)"):
            enqueue(outbox, 5, size=1001)  # no delivery can make room: the line says what can
        assert {i.case_id for i in outbox.items()} == {cid(1), cid(2), cid(3), cid(4)}
        assert len(spool_names(spool)) == 3


def test_a_case_larger_than_the_quota_is_refused_without_making_the_outbox_look_full(
    db: Path, spool: Path
):
    """No delivery can make room for it: the refusal says to raise the quota, and the cases
    that do fit are not refused (nor reported FULL) because of it."""
    with Outbox.open(db, spool, quota_bytes=1000) as outbox:
        enqueue(outbox, 1, size=100)
        with pytest.raises(QueueFullError, match=r"raise escalation\.queue_quota_mb"):
            enqueue(outbox, 2, size=1001)
        assert not outbox.status().full
        enqueue(outbox, 3, size=900)
        assert outbox.status().full


@pytest.mark.expect_log_warnings
def test_status_says_full_while_a_refused_case_would_still_not_fit(db: Path, spool: Path):
    """Below the quota but refusing: ``queue status`` (another process) must say FULL."""
    with Outbox.open(db, spool, quota_bytes=1000) as outbox:
        enqueue(outbox, 1, size=400)
        enqueue(outbox, 2, size=300)
        assert not outbox.status().full
        with pytest.raises(QueueFullError):
            enqueue(outbox, 3, size=400)
        with Outbox.open(db, spool, quota_bytes=1000) as other_process:
            assert other_process.status().full
            assert other_process.status().queued_bytes == 700

        outbox.claim_next("w", 60, now=T0)
        outbox.mark_delivered(cid(1), RECEIPT)  # 400 bytes freed: the refused case would fit
        assert not outbox.status().full
        enqueue(outbox, 3, size=400)
        enqueue(outbox, 4, size=250)  # 950 of 1000: nothing refused since
        assert not outbox.status().full


def test_status_counts_and_ages(outbox: Outbox):
    empty = outbox.status(now=T0)
    assert (empty.pending, empty.queued_bytes, empty.oldest_pending_age_s) == (0, 0, None)
    assert empty.quota_bytes == QUOTA and not empty.full
    for n in range(4):
        enqueue(outbox, n, size=100 * (n + 1), at=T0 + timedelta(seconds=n))
    outbox.claim_next("w", 60, now=T0 + timedelta(minutes=1))
    outbox.claim_next("w", 60, now=T0 + timedelta(minutes=1))
    outbox.mark_delivered(cid(1), RECEIPT)

    status = outbox.status(now=T0 + timedelta(minutes=2))

    assert (status.pending, status.in_flight, status.delivered, status.quarantined) == (2, 1, 1, 0)
    assert status.queued_bytes == 100 + 300 + 400
    assert status.oldest_pending_age_s == 120.0  # case 0 is in flight but not yet delivered
    assert json.loads(json.dumps(status.to_json()))["queued_bytes"] == 800


# --- open: clean-up after crashes, refusals ------------------------------------------------------


def test_open_removes_orphans_and_dead_writers_temp_files(db: Path, spool: Path):
    with Outbox.open(db, spool, quota_bytes=QUOTA) as outbox:
        enqueue(outbox, 1)
        enqueue(outbox, 2)
        outbox.claim_next("w", 60, now=T0)
        outbox.mark_delivered(cid(1), RECEIPT)
    # What crashes leave: a file renamed into place whose row never committed, a delivered
    # case's file not yet removed, a temporary file of a dead writer. Plus one live writer's.
    (spool / f"{cid(3)}.env").write_bytes(b"orphan")
    (spool / f"{cid(1)}.env").write_bytes(env(1))
    (spool / f".{cid(4)}.env.0123456789abcdef.tmp").write_bytes(b"half")
    live = spool / f".{cid(5)}.env.fedcba9876543210.tmp"
    fd = os.open(live, os.O_WRONLY | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    (spool / "README").write_text("not ours")
    try:
        with Outbox.open(db, spool, quota_bytes=QUOTA) as outbox:
            assert spool_names(spool) == {f"{cid(2)}.env", live.name, "README"}
            assert [i.state for i in outbox.items()] == [OutboxState.DELIVERED, OutboxState.PENDING]
    finally:
        os.close(fd)
    with Outbox.open(db, spool, quota_bytes=QUOTA):
        assert spool_names(spool) == {f"{cid(2)}.env", "README"}


@pytest.mark.expect_log_warnings  # each quarantine is said
@pytest.mark.parametrize(
    ("reason", "reseal"),
    [
        ("device_revoked: device dev-1 was revoked (403)", True),
        ("unknown_device: device dev-1 is not registered (401)", True),
        ("stale_envelope: created more than 30 days ago (400)", True),
        ("rejected: case_conflict (409)", False),
        ("payload_too_large: the body is larger than this server accepts (413)", False),
    ],
)
def test_only_refusals_of_how_a_case_was_sealed_need_it_sealed_anew(
    outbox: Outbox, reason: str, reseal: bool
) -> None:
    """A device revoked and then given a new key (the documented way back) must have its
    cases sealed with that key: sent as they were, they came back as "damaged" (signed by the
    old key) and took a second retry."""
    enqueue(outbox, 1)
    outbox.claim_next("w", 60, now=T0)
    outbox.quarantine(cid(1), reason, now=T0)
    item = outbox.get(cid(1))
    assert item is not None and item.needs_reseal is reseal


@pytest.mark.expect_log_warnings
def test_open_quarantines_a_case_whose_file_was_lost(db: Path, spool: Path, caplog):
    with Outbox.open(db, spool, quota_bytes=QUOTA) as outbox:
        enqueue(outbox, 1)
        enqueue(outbox, 2)
    (spool / f"{cid(1)}.env").unlink()

    with Outbox.open(db, spool, quota_bytes=QUOTA) as outbox:
        lost = outbox.get(cid(1))
        assert lost is not None
        assert lost.state is OutboxState.QUARANTINED
        assert lost.quarantine_reason == "spool file missing or damaged"
        assert state_of(outbox, 2) is OutboxState.PENDING
        with pytest.raises(SpoolFileDamagedError, match="is missing"):
            outbox.retry(cid(1))
        assert state_of(outbox, 1) is OutboxState.QUARANTINED
    assert any("quarantined" in r.getMessage() for r in caplog.records)


def test_a_spool_file_of_the_wrong_size_is_never_sent(outbox: Outbox, spool: Path):
    enqueue(outbox, 1)
    path = spool / f"{cid(1)}.env"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(SpoolFileDamagedError, match="damaged"):
        outbox.envelope(cid(1))


@pytest.mark.parametrize("size", [5000, (1 << 20) + 3], ids=["hashed-at-once", "hashed-meanwhile"])
@pytest.mark.expect_log_warnings  # the quarantine
def test_the_hash_kept_at_enqueue_is_the_files_and_guards_an_admin_retry(
    outbox: Outbox, spool: Path, size: int
):
    envelope = bytearray(random.Random(size).randbytes(size))  # any buffer will do
    item = outbox.enqueue(cid(1), envelope, reason="uncertain", payload_sha256="0" * 64)
    path = spool / f"{cid(1)}.env"
    assert path.read_bytes() == envelope
    assert item.envelope_sha256 == hashlib.sha256(envelope).hexdigest()
    outbox.quarantine(cid(1), "refused by the server")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # bit rot: same size
    path.write_bytes(bytes(data))
    with pytest.raises(OutboxError, match="damaged"):
        outbox.retry(cid(1))
    assert state_of(outbox, 1) is OutboxState.QUARANTINED
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert outbox.retry(cid(1)).state is OutboxState.PENDING


def test_open_refuses_a_spool_folder_others_can_read(db: Path, spool: Path):
    spool.mkdir(parents=True, mode=0o755)
    spool.chmod(0o755)
    with pytest.raises(OutboxError, match="0700"):
        Outbox.open(db, spool, quota_bytes=QUOTA)


def test_open_refuses_a_newer_outbox_schema(db: Path, spool: Path):
    Outbox.open(db, spool, quota_bytes=QUOTA).close()
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE outbox_meta SET value = 99 WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(OutboxIncompatibleError, match="newer") as refused:
        Outbox.open(db, spool, quota_bytes=QUOTA)
    # Lasting: a service must not be restarted on it for ever (exit 2, not 75).
    assert (refused.value.code, refused.value.temporary) == ("outbox_incompatible", False)


def test_open_refuses_a_file_that_cannot_use_wal(
    db: Path, spool: Path, monkeypatch: pytest.MonkeyPatch
):
    # E.g. a network file system without shared memory: SQLite keeps the old journal mode.
    monkeypatch.setattr(outbox_module, "enable_wal", lambda conn, timeout_s: "delete")
    with pytest.raises(OutboxIncompatibleError, match="cannot use WAL mode") as refused:
        Outbox.open(db, spool, quota_bytes=QUOTA)
    assert refused.value.temporary is False


def test_logs_name_cases_but_never_contents(outbox: Outbox, caplog):
    secret = b"DOE^JANE"
    outbox.enqueue(cid(1), secret * 10, reason="uncertain", payload_sha256="2" * 64)
    outbox.claim_next("w", 60)
    outbox.mark_failed(cid(1), "timeout", T0)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("triage_app")]
    assert any(cid(1) in m and "queued" in m for m in messages)
    assert not any("DOE" in m or "2222" in m for m in messages)
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name.startswith("triage"))


# --- several processes ---------------------------------------------------------------------------


def run_child(*args: object, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CHILD), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_concurrent_claimers_never_get_the_same_case(db: Path, spool: Path, tmp_path: Path):
    count = 150
    with Outbox.open(db, spool, quota_bytes=QUOTA) as outbox:
        for n in range(count):
            # Due now by the children's clock: they claim without a ``now``.
            enqueue(outbox, n, reason=("uncertain", "out_of_scope")[n % 2], at=datetime.now(UTC))
    go = tmp_path / "go"
    owners = [f"claimer-{k}" for k in range(3)]
    children = [
        subprocess.Popen(
            [sys.executable, str(CHILD), "claim", str(db), str(spool), owner, str(go)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for owner in owners
    ]
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"ready-{owner}").exists() for owner in owners):
        assert time.monotonic() < deadline, "the claimers did not start"
        time.sleep(0.005)
    go.touch()  # all at once, so that they compete
    claims: dict[str, list[str]] = {}
    for owner, child in zip(owners, children, strict=True):
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        claims[owner] = json.loads(out)

    everything = [c for got in claims.values() for c in got]
    assert len(everything) == len(set(everything)) == count
    assert set(everything) == {cid(n) for n in range(count)}
    assert sum(1 for got in claims.values() if got) >= 2, "no competition took place"
    with Outbox.open(db, spool, quota_bytes=QUOTA) as outbox:
        for owner, got in claims.items():
            for case_id in got:
                item = outbox.get(case_id)
                assert item is not None
                assert (item.state, item.lease_owner) == (OutboxState.IN_FLIGHT, owner)


def test_concurrent_enqueues_of_the_same_cases_make_one_entry_each(db: Path, spool: Path):
    count = 40
    children = [
        subprocess.Popen(
            [sys.executable, str(CHILD), "enqueue", str(db), str(spool), str(count)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for child in children:
        _, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
    check_spool_matches_rows(db, spool, count)


# --- crashes -------------------------------------------------------------------------------------


def check_spool_matches_rows(db: Path, spool: Path, expected_rows: int | None = None) -> int:
    """After a crash and reopen: every row's file is whole, and there is nothing else."""
    index = {case_id_for(n): n for n in range(200)}
    with Outbox.open(db, spool, quota_bytes=1 << 30) as outbox:
        items = outbox.items()
        for item in items:
            assert item.state is OutboxState.PENDING
            assert outbox.envelope(item) == envelope_for(index[item.case_id])
            assert item.reason == reason_for(index[item.case_id])
        assert spool_names(spool) == {f"{i.case_id}.env" for i in items}
        for path in spool.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
    if expected_rows is not None:
        assert len(items) == expected_rows
    return len(items)


def recover_and_requeue(db: Path, spool: Path, count: int) -> None:
    """What the pipeline does after a crash: queue every case again; each ends up once."""
    with Outbox.open(db, spool, quota_bytes=1 << 30) as outbox:
        for n in range(count):
            enqueue_case(outbox, n)
    check_spool_matches_rows(db, spool, count)


@pytest.mark.parametrize(
    ("point", "rows_kept"),
    [("after_temp_write", 3), ("after_rename", 3), ("at_commit", 3), ("after_commit", 4)],
)
def test_a_kill_at_each_step_of_an_enqueue_leaves_a_consistent_queue(
    db: Path, spool: Path, point: str, rows_kept: int
):
    count = 8
    result = run_child("enqueue", db, spool, count, "--kill-at", point, "--kill-case", 3)
    assert result.returncode == -signal.SIGKILL, result.stderr
    files_left = {p.name for p in spool.iterdir()}
    if point == "after_temp_write":
        assert any(name.endswith(".tmp") for name in files_left)
    if point in ("after_rename", "at_commit"):
        assert f"{case_id_for(3)}.env" in files_left  # the file made it, the row did not

    assert check_spool_matches_rows(db, spool) == rows_kept
    recover_and_requeue(db, spool, count)


def test_kills_at_random_moments_never_leave_a_broken_entry(tmp_path: Path):
    count = 40
    rng = random.Random(20261122)
    killed = 0
    for round_ in range(6):
        db, spool = tmp_path / f"r{round_}" / "cases.sqlite", tmp_path / f"r{round_}" / "outbox"
        case, delay = rng.randrange(count - 10), rng.uniform(0, 0.004)
        args = ("--kill-case", case, "--kill-after-s", delay)
        result = run_child("enqueue", db, spool, count, *args)
        assert result.returncode in (0, -signal.SIGKILL), result.stderr
        killed += result.returncode == -signal.SIGKILL
        assert check_spool_matches_rows(db, spool) >= case
        recover_and_requeue(db, spool, count)
    assert killed >= 3, "the child finished before its kill too often to test anything"


# --- a precondition in the same transaction, and opening behind a writer -------------------------


class _RefusedError(Exception):
    pass


def test_a_precondition_runs_in_the_enqueue_transaction_and_can_refuse(outbox: Outbox, spool: Path):
    seen: list[bool] = []

    def agree(conn: sqlite3.Connection) -> None:
        seen.append(conn.in_transaction)

    def refuse(conn: sqlite3.Connection) -> None:
        raise _RefusedError("the case was closed meanwhile")

    data = env(1)
    with pytest.raises(_RefusedError):
        outbox.enqueue(
            cid(1),
            data,
            reason="uncertain",
            payload_sha256=hashlib.sha256(data).hexdigest(),
            precondition=refuse,
        )
    assert outbox.get(cid(1)) is None
    assert spool_names(spool) == set()  # neither the envelope nor its temporary file stays

    item = outbox.enqueue(
        cid(1),
        data,
        reason="uncertain",
        payload_sha256=hashlib.sha256(data).hexdigest(),
        precondition=agree,
    )
    assert seen == [True]
    assert item.state is OutboxState.PENDING and spool_names(spool) == {f"{cid(1)}.env"}


def test_an_up_to_date_outbox_opens_and_reads_while_another_process_writes(db: Path, spool: Path):
    with Outbox.open(db, spool, quota_bytes=QUOTA) as box:
        enqueue(box, 1)
    with hold_write_lock(db):
        started = time.monotonic()
        with Outbox.open(db, spool, quota_bytes=QUOTA, busy_timeout_s=2.0) as box:
            assert [item.case_id for item in box.items()] == [cid(1)]
        assert time.monotonic() - started < 1.0


def test_an_outbox_with_debris_is_tidied_under_the_write_lock(db: Path, spool: Path):
    with Outbox.open(db, spool, quota_bytes=QUOTA) as box:
        enqueue(box, 1)
    orphan = spool / f"{cid(2)}.env"  # an enqueue killed between its rename and its commit
    orphan.write_bytes(env(2))
    with hold_write_lock(db), pytest.raises(OutboxError, match="locked"):
        Outbox.open(db, spool, quota_bytes=QUOTA, busy_timeout_s=0.2)
    assert orphan.exists()
    with Outbox.open(db, spool, quota_bytes=QUOTA) as box:
        assert [item.case_id for item in box.items()] == [cid(1)]
    assert spool_names(spool) == {f"{cid(1)}.env"}
