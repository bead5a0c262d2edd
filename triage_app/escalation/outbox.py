"""The durable outbox: escalated cases waiting to be sent to the central server (DESIGN 4.4).

Why this shape:

* **Envelope bytes in a spool file, bookkeeping in SQLite.** Envelopes are large; the rows that
  say what to send, in which order and how it went live in table ``outbox`` of the case store
  file (WAL, ``synchronous=FULL``). The outbox manages its own table and version row
  (``outbox_meta``) and never touches the case store's ``PRAGMA user_version``.
* **Hashed once, while it is written.** The spool file's SHA-256 goes into its row; a helper
  thread computes it while the file is written and fsynced (hashlib releases the GIL). It is
  checked before an admin puts a quarantined case back in the queue. Before each send only the
  size is checked here: hashing 20 MB again for every attempt costs more CPU than the upload
  itself and adds no protection the envelope lacks. The uploader checks the header, the
  device's signature and the chunk lengths; the server authenticates every byte (AES-GCM per
  chunk) and refuses a damaged envelope for good, which quarantines it.
* **File first, row second.** An enqueue writes ``<spool_dir>/<case_id>.env`` (0600, in a 0700
  folder) through a temporary file that is fsynced, renamed into place and the folder fsynced,
  all *before* the row commits. So every committed row has a complete file, and a crash leaves at
  worst a file without a row: :meth:`Outbox.open` **removes** such orphans (it does not adopt
  them: the caller never got an answer, retries with the same deterministic case id, and only it
  knows the escalation reason).
* **Renames into place only under the write lock.** The rename and the insert run inside one
  ``BEGIN IMMEDIATE`` transaction, so a final file without a row can only be the debris of a dead
  enqueue, and the clean-up (also under the write lock) can never delete a file another process
  is about to commit. Temporary files are written outside the lock (the slow part) while their
  writer holds an ``flock`` on them; the clean-up removes only temporary files it can lock, i.e.
  those whose writer has died.
* **Nothing is ever dropped.** A full queue refuses the new case (:class:`QueueFullError`);
  nothing is deleted by age; delivered cases keep their row as history, only their spool file goes.
* **Leases.** :meth:`Outbox.claim_next` hands a case to one sender for ``lease_s`` seconds. If the
  sender dies, the lease runs out and the case can be claimed again; that reclaim counts as a
  failed attempt, so a case that keeps killing its sender shows a growing ``attempts``. A live
  sender keeps its lease with :meth:`LeaseRenewer.renew` while its upload lasts. The outcome
  calls take the owner that claimed the case, because a sender whose lease ran out (a suspended
  process) may report after another one took the case over: a verified receipt always counts
  (:meth:`Outbox.mark_delivered`; the server's receipt is idempotent, so a second one for a
  delivered case is no error), but a failure or quarantine from a sender that no longer holds the
  lease changes nothing, so it cannot end the lease of the sender now sending the case.
* **Waiting for the link.** A case whose attempt failed because the network was down is marked
  ``wait_for_link``; when the link is back, :meth:`Outbox.due_now` makes only those due at once.
  A case that the server itself asked to wait (``Retry-After``, 5xx) keeps its time: a server
  that is up but overloaded must not be hit again because a health probe succeeded.

Privacy: rows hold case ids, hashes, sizes and one-line error texts, never payload; the log says
case ids and states only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import re
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Final, Self

from triage_app.errors import (
    CaseExceedsQuotaError,
    OutboxError,
    OutboxIncompatibleError,
    QueueFullError,
    UnknownQueuedCaseError,
)
from triage_app.escalation.backoff import MAX_RETRY_AFTER_S
from triage_app.escalation.hashing import THREAD_WORTH_BYTES, BackgroundSha256
from triage_app.paths import fsync_dir, remove_abandoned_temps, write_locked_temp
from triage_app.sqlite_wal import enable_wal

__all__ = [
    "ESCALATION_PRIORITY",
    "MAX_LEASE_S",
    "MAX_WAIT_S",
    "LeaseRenewer",
    "Outbox",
    "OutboxItem",
    "OutboxState",
    "OutboxStatus",
    "Precondition",
    "SpoolFileDamagedError",
    "larger_than_quota",
]

log = logging.getLogger(__name__)

#: Escalation reason → priority (lower is sent sooner; FIFO within a priority). ``uncertain``
#: goes first: the model saw something between normal and abnormal in an image it is made for,
#: so a finding is likely; an ``out_of_scope`` image carries no such signal.
ESCALATION_PRIORITY: Final[Mapping[str, int]] = MappingProxyType(
    {"uncertain": 0, "out_of_scope": 1}
)

#: The longest a queued case may be told to wait (backoff and the server's ``Retry-After``
#: are capped well below it) and the longest a sending lease may last. A case due, or a lease
#: running, further ahead than that was dated by a clock that has since gone back (a PC that
#: booted with its clock hours ahead, put right by NTP): without a limit it would wait as long
#: as the clock was wrong, though nothing told it to. :meth:`Outbox.claim_next` makes it due.
MAX_WAIT_S: Final = 2 * MAX_RETRY_AFTER_S
MAX_LEASE_S: Final = 3600.0
# Beyond the limits before a time counts as dated by a clock that went back: two senders read
# the clock a little apart, and a lease of exactly MAX_LEASE_S must not be cut by the other.
_CLOCK_STEP_MARGIN_S: Final = 300.0

SPOOL_SUFFIX: Final = ".env"
# Quarantine reasons (the server's code, or the uploader's own for a damaged file) that are
# about the envelope, not the case: a device clock far off or an outage longer than the
# server's maximum age, a retired server key pruned meanwhile, a device key replaced since.
_RESEAL_REASONS: Final = frozenset(
    {
        "stale_envelope",
        "unknown_server_key",
        "bad_signature",
        "unknown_device",
        "device_revoked",  # once the revocation is over, a new device key is registered
        "envelope_tampered",
        "envelope_truncated",
        "damaged envelope",
    }
)
_DEFAULT_BUSY_TIMEOUT_S = 10.0
_REFUSED_BYTES = "refused_bytes"  # outbox_meta: size of the last case the quota refused, or 0
_MAX_TEXT = 500  # error and quarantine texts: one line, short (never payload)
# Case ids are SHA-256 based hex (DESIGN 4.2); they become file names, so nothing else is allowed.
_CASE_ID = re.compile(r"[0-9a-f]{32}(?:[0-9a-f]{32})?")
_SHA256 = re.compile(r"[0-9a-f]{64}")

Precondition = Callable[[sqlite3.Connection], None]
"""A check :meth:`Outbox.enqueue` runs on its connection inside its write transaction, just
before the insert; it raises to refuse the case. Why: another table of the same file (the case
store's) must agree with the insert, and only one transaction makes that race-free."""

# Forward migrations of the outbox tables: entry ``i`` takes ``outbox_meta.schema_version`` from
# ``i`` to ``i + 1``. Append new steps, never edit released ones.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE outbox (
            seq               INTEGER PRIMARY KEY AUTOINCREMENT,
            case_id           TEXT NOT NULL UNIQUE,
            state             TEXT NOT NULL
                CHECK (state IN ('pending', 'in_flight', 'delivered', 'quarantined')),
            priority          INTEGER NOT NULL,
            reason            TEXT NOT NULL,
            payload_sha256    TEXT NOT NULL,
            envelope_sha256   TEXT NOT NULL,
            size_bytes        INTEGER NOT NULL CHECK (size_bytes >= 0),
            attempts          INTEGER NOT NULL DEFAULT 0,
            enqueued_at       TEXT NOT NULL,
            updated_at        TEXT NOT NULL,
            next_attempt_at   TEXT NOT NULL,
            last_error        TEXT,
            lease_owner       TEXT,
            lease_until       TEXT,
            delivered_at      TEXT,
            receipt_json      TEXT,
            quarantined_at    TEXT,
            quarantine_reason TEXT
        )
        """,
        "CREATE INDEX outbox_queue ON outbox (state, priority, seq)",
    ),
    # 1 when the case waits because the network was down (see ``Outbox.due_now``).
    ("ALTER TABLE outbox ADD COLUMN wait_for_link INTEGER NOT NULL DEFAULT 0",),
)


class SpoolFileDamagedError(OutboxError):
    """The spool file is missing, has the wrong size or bytes, or holds another envelope.

    Unlike the other outbox errors of a read (a descriptor limit, an I/O error, a busy
    database), this one does not go away by trying again later: the uploader quarantines the
    case. Same ``code`` as :class:`OutboxError`; the class is what tells them apart.
    """


class OutboxState(StrEnum):
    """Where a queued case stands. Stored in the database; never rename the values."""

    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    DELIVERED = "delivered"
    QUARANTINED = "quarantined"


@dataclass(frozen=True)
class OutboxItem:
    """One queued case as the outbox holds it; timestamps are UTC ISO strings."""

    case_id: str
    state: OutboxState
    priority: int
    reason: str
    payload_sha256: str
    envelope_sha256: str
    size_bytes: int
    attempts: int
    enqueued_at: str
    updated_at: str
    next_attempt_at: str
    last_error: str | None
    lease_owner: str | None
    lease_until: str | None
    delivered_at: str | None
    receipt: str | None
    quarantined_at: str | None
    quarantine_reason: str | None

    @property
    def needs_reseal(self) -> bool:
        """Whether the server refused this envelope for how it was sealed, so that only a new
        envelope can go (see :meth:`Outbox.reseal`); other refusals are about the case."""
        if self.state is not OutboxState.QUARANTINED or not self.quarantine_reason:
            return False
        return self.quarantine_reason.split(":", 1)[0] in _RESEAL_REASONS

    def to_json(self) -> dict[str, Any]:
        """What ``triage-app queue list --json`` prints for the case (no receipt, no payload)."""
        return {
            "case_id": self.case_id,
            "payload_sha256": self.payload_sha256,
            "state": self.state.value,
            "reason": self.reason,
            "priority": self.priority,
            "size_bytes": self.size_bytes,
            "attempts": self.attempts,
            "enqueued_at": self.enqueued_at,
            "updated_at": self.updated_at,
            "next_attempt_at": self.next_attempt_at,
            "lease_owner": self.lease_owner,
            "lease_until": self.lease_until,
            "delivered_at": self.delivered_at,
            "quarantined_at": self.quarantined_at,
            "quarantine_reason": self.quarantine_reason,
            "last_error": self.last_error,
        }


@dataclass(frozen=True)
class OutboxStatus:
    """Counts per state and how much of the byte quota the queued envelopes use."""

    pending: int
    in_flight: int
    delivered: int
    quarantined: int
    queued_bytes: int  # envelopes still on disk: pending, in flight and quarantined
    quota_bytes: int
    oldest_pending_age_s: float | None  # oldest case not yet delivered nor quarantined
    # The quota is reached, or the last case offered was refused and nothing since has made
    # room for it: new escalations are being refused.
    full: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "pending": self.pending,
            "in_flight": self.in_flight,
            "delivered": self.delivered,
            "quarantined": self.quarantined,
            "queued_bytes": self.queued_bytes,
            "quota_bytes": self.quota_bytes,
            "oldest_pending_age_s": self.oldest_pending_age_s,
            "full": self.full,
        }


def _utc(moment: datetime) -> datetime:
    """Refuse naive times: a local clock time stored as UTC would reorder the queue."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("outbox times must be timezone-aware")
    return moment.astimezone(UTC)


def _iso(moment: datetime) -> str:
    """UTC, ISO-8601, milliseconds (as the case store): sorts as text, so SQL can compare it."""
    return _utc(moment).isoformat(timespec="milliseconds")


def _beyond(limit_s: float) -> float:
    return limit_s + _CLOCK_STEP_MARGIN_S


def _check_lease(lease_s: float) -> None:
    if not 0 < lease_s <= MAX_LEASE_S:
        raise ValueError(f"lease_s must be > 0 and <= {MAX_LEASE_S:g}, not {lease_s}")


def _one_line(text: str) -> str:
    """Error texts end up in ``queue list`` and the GUI: one line, bounded length."""
    line = " ".join(text.split())
    return line if len(line) <= _MAX_TEXT else line[: _MAX_TEXT - 1] + "…"


@contextmanager
def _sqlite_errors(what: str) -> Iterator[None]:
    """Turn ``sqlite3.Error`` and ``OSError`` into a one-line :class:`OutboxError`."""
    try:
        yield
    except sqlite3.Error as exc:
        raise OutboxError(f"outbox: could not {what}: {exc}") from exc
    except OSError as exc:
        raise OutboxError(f"outbox: could not {what}: {exc.strerror or exc}") from exc


class _SpoolRemover:
    """Removes the spool files of delivered cases on a helper thread.

    Unlinking a 20 MB file costs ext4 about 5 ms of freeing blocks, and the sender need not wait
    for that before it sends the next case. The thread ends when nothing is left to remove. A
    file whose removal a crash prevented is removed by the next :meth:`Outbox.open` (its row
    says delivered).
    """

    def __init__(self) -> None:
        self._pending: list[Path] = []
        self._running = False
        self._changed = threading.Condition()

    def remove(self, path: Path) -> None:
        with self._changed:
            self._pending.append(path)
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="outbox-remover", daemon=True).start()

    def wait(self) -> None:
        """Return once every file handed over is removed (or could not be)."""
        with self._changed:
            self._changed.wait_for(lambda: not self._running)

    def _run(self) -> None:
        while True:
            with self._changed:
                if not self._pending:
                    self._running = False
                    self._changed.notify_all()
                    return
                path = self._pending.pop(0)
            # Delivered is committed: a file that cannot be removed now goes at the next open.
            with suppress(OSError):
                path.unlink(missing_ok=True)


class Outbox:
    """The queue of envelopes to send, shared by any number of processes on the device.

    Open with :meth:`open` and close with :meth:`close` (or use it as a context manager). One
    instance per process and thread.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        spool_dir: Path,
        quota_bytes: int,
        *,
        db_path: Path,
        busy_timeout_s: float = _DEFAULT_BUSY_TIMEOUT_S,
    ) -> None:
        """Wrap an already configured connection to ``db_path``; use :meth:`open` instead."""
        self._conn = conn
        self._spool = spool_dir
        self._quota = quota_bytes
        self._db_path = db_path
        self._busy_timeout_s = busy_timeout_s
        self._remover = _SpoolRemover()

    @classmethod
    def open(
        cls,
        db_path: Path,
        spool_dir: Path,
        *,
        quota_bytes: int,
        busy_timeout_s: float = _DEFAULT_BUSY_TIMEOUT_S,
    ) -> Outbox:
        """Open the outbox in the SQLite file ``db_path`` (the case store) with its spool folder.

        Creates what is missing (file 0600, folders 0700), brings the outbox tables up to date and
        tidies the spool: temporary files of dead writers and files without a live row go.
        """
        if quota_bytes <= 0:
            raise ValueError(f"quota_bytes must be > 0, not {quota_bytes}")
        db_path, spool_dir = Path(db_path), Path(spool_dir)
        with _sqlite_errors(f"create {spool_dir}"):
            db_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with suppress(FileExistsError):
                db_path.touch(mode=0o600, exist_ok=False)
            spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            # A new spool folder's own name must survive a power cut as much as its files do.
            fsync_dir(spool_dir.parent)
            mode = stat.S_IMODE(spool_dir.stat().st_mode)
        if mode & 0o077:
            raise OutboxError(
                f"outbox: spool folder {spool_dir} is open to other users (mode {mode:o});"
                " make it 0700"
            )
        with _sqlite_errors(f"open {db_path}"):
            # isolation_level=None: no implicit transactions; we issue BEGIN IMMEDIATE ourselves.
            conn = sqlite3.connect(db_path, timeout=busy_timeout_s, isolation_level=None)
            try:
                conn.row_factory = sqlite3.Row
                journal = enable_wal(conn, busy_timeout_s)
                if journal != "wal":
                    raise OutboxIncompatibleError(
                        f"outbox: {db_path} cannot use WAL mode (got {journal!r})"
                    )
                conn.execute("PRAGMA synchronous=FULL")
                outbox = cls(
                    conn, spool_dir, quota_bytes, db_path=db_path, busy_timeout_s=busy_timeout_s
                )
                outbox._migrate()
                outbox._tidy_spool()
            except BaseException:
                conn.close()
                raise
        return outbox

    def close(self) -> None:
        self.wait_for_removals()
        with _sqlite_errors("close the database"):
            self._conn.close()

    def lease_renewer(self) -> LeaseRenewer:
        """A handle for extending leases from another thread (it opens its own connection
        there, on first use: connections belong to the thread that made them)."""
        return LeaseRenewer(self._db_path, self._busy_timeout_s)

    def wait_for_removals(self) -> None:
        """Return once the spool files of the cases delivered so far are gone (they are removed
        on a helper thread, see :meth:`mark_delivered`)."""
        self._remover.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def spool_dir(self) -> Path:
        return self._spool

    @property
    def quota_bytes(self) -> int:
        return self._quota

    # --- writes ------------------------------------------------------------------------------

    def enqueue(
        self,
        case_id: str,
        envelope: bytes | bytearray | memoryview,
        *,
        reason: str,
        payload_sha256: str,
        now: datetime | None = None,
        precondition: Precondition | None = None,
    ) -> OutboxItem:
        """Queue ``envelope`` for ``case_id``; a case already queued is returned unchanged.

        Idempotent so that a caller that crashed or timed out can simply call again: the case id
        is deterministic and the first committed envelope wins. ``precondition`` runs inside the
        transaction that inserts the row; whatever it raises propagates, with nothing queued.

        Raises
        ------
        QueueFullError
            If the envelope does not fit in the quota; nothing changes, nothing is dropped.
        OutboxError
            If the reason is unknown, or the database or spool folder fails (nothing is queued).
        """
        _check_case_id(case_id)
        if not _SHA256.fullmatch(payload_sha256):
            raise ValueError("payload_sha256 must be 64 lowercase hex characters")
        if reason not in ESCALATION_PRIORITY:
            known = ", ".join(sorted(ESCALATION_PRIORITY))
            raise OutboxError(f"outbox: unknown escalation reason {reason!r} (known: {known})")
        existing = self.get(case_id)
        if existing is not None:
            return existing
        size = len(envelope)
        with _sqlite_errors("check the quota"):
            try:
                self._check_quota(size)  # refuse early, before writing anything
            except QueueFullError:
                if size <= self._quota:  # a case no delivery can make room for fills nothing
                    with suppress(OutboxError):  # only a hint for status(); the refusal stands
                        self._set_meta(_REFUSED_BYTES, size)
                raise
        at = _iso(now or datetime.now(UTC))
        final = self._path(case_id)
        tmp, fd, envelope_sha256 = self._write_temp(case_id, envelope)
        try:
            published = False
            with _sqlite_errors(f"enqueue case {case_id}"):
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    row = self._row(case_id)
                    if row is not None:  # another process queued it since our first look
                        self._conn.execute("ROLLBACK")
                        return _item(row)
                    if precondition is not None:
                        precondition(self._conn)
                    self._check_quota(size)
                    published = True  # from here on, ``final`` may be our file
                    _publish(tmp, final)
                    self._conn.execute(
                        "INSERT INTO outbox (case_id, state, priority, reason, payload_sha256,"
                        " envelope_sha256, size_bytes, enqueued_at, updated_at, next_attempt_at)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            case_id,
                            OutboxState.PENDING,
                            ESCALATION_PRIORITY[reason],
                            reason,
                            payload_sha256,
                            envelope_sha256,
                            size,
                            at,
                            at,
                            at,
                        ),
                    )
                    self._conn.execute("COMMIT")
                except BaseException:
                    # Remove our file only while we still hold the write lock: once the lock is
                    # gone another process may have put its own file under this name. If SQLite
                    # already rolled back, the file stays as an orphan for the next open.
                    if self._conn.in_transaction:
                        if published:
                            with suppress(OSError):
                                final.unlink(missing_ok=True)
                        self._conn.execute("ROLLBACK")
                    raise
        finally:
            os.close(fd)
            tmp.unlink(missing_ok=True)
        with suppress(OutboxError, sqlite3.Error):  # the case is queued whatever this does
            if self._meta(_REFUSED_BYTES):
                self._set_meta(_REFUSED_BYTES, 0)
        log.info("outbox: case %s queued (%s, %d bytes)", case_id, reason, size)
        return self._get(case_id)

    def claim_next(
        self,
        owner: str,
        lease_s: float,
        now: datetime | None = None,
        *,
        due_by: datetime | None = None,
    ) -> OutboxItem | None:
        """Hand the next case to send to ``owner`` for ``lease_s`` seconds, or ``None``.

        The next case is, by priority then enqueue order, a pending one whose ``next_attempt_at``
        has come (by ``due_by``, default ``now``: a drain passes its start time, so a case that
        failed during the drain is not sent twice in it), or an in-flight one whose lease has run
        out (its sender died; this counts as a failed attempt). The read and the update are one
        ``BEGIN IMMEDIATE`` transaction, so two processes never get the same case.
        """
        if not owner or owner != _one_line(owner):
            raise ValueError("owner must be a non-empty single line")
        _check_lease(lease_s)
        moment = now or datetime.now(UTC)
        at = _iso(moment)
        due = _iso(min(due_by, moment)) if due_by is not None else at
        until = _iso(moment + timedelta(seconds=lease_s))
        with self._write("claim the next case"):
            self._undo_clock_steps(moment, due)
            row = self._conn.execute(
                "SELECT * FROM outbox"
                " WHERE (state = ? AND next_attempt_at <= ?) OR (state = ? AND lease_until <= ?)"
                " ORDER BY priority, seq LIMIT 1",
                (OutboxState.PENDING, due, OutboxState.IN_FLIGHT, due),
            ).fetchone()
            if row is None:
                return None
            expired = row["state"] == OutboxState.IN_FLIGHT
            self._conn.execute(
                "UPDATE outbox SET state = ?, lease_owner = ?, lease_until = ?, updated_at = ?,"
                " attempts = attempts + ?, last_error = ? WHERE case_id = ?",
                (
                    OutboxState.IN_FLIGHT,
                    owner,
                    until,
                    at,
                    1 if expired else 0,
                    "lease expired before the sender reported" if expired else row["last_error"],
                    row["case_id"],
                ),
            )
            item = _item(self._row(row["case_id"]))
        log.info("outbox: case %s claimed%s", item.case_id, " (expired lease)" if expired else "")
        return item

    def _undo_clock_steps(self, moment: datetime, due: str) -> None:
        """Make due by ``due`` (the claim's, so that a drain that started before sends them
        too) the waits and leases that end further ahead than any may (see
        :data:`MAX_WAIT_S`); inside the caller's write transaction."""
        waits = self._conn.execute(
            "UPDATE outbox SET next_attempt_at = ? WHERE state = ? AND next_attempt_at > ?",
            (due, OutboxState.PENDING, _iso(moment + timedelta(seconds=_beyond(MAX_WAIT_S)))),
        ).rowcount
        leases = self._conn.execute(
            "UPDATE outbox SET lease_until = ? WHERE state = ? AND lease_until > ?",
            (due, OutboxState.IN_FLIGHT, _iso(moment + timedelta(seconds=_beyond(MAX_LEASE_S)))),
        ).rowcount
        if waits or leases:
            log.warning(
                "outbox: %d case(s) due and %d lease(s) ending further ahead than any wait or "
                "lease can be: the clock went back; they are due now",
                waits,
                leases,
            )

    def mark_delivered(
        self,
        case_id: str,
        receipt_json: str,
        *,
        owner: str | None = None,
        now: datetime | None = None,
    ) -> bool:
        """Record the verified receipt of a case, then delete its spool file; False (and nothing
        changes) when it was recorded delivered already.

        The receipt is the server's signed word that it holds this very payload, so it counts
        whoever holds the lease now and whatever the case's state (pending after another
        sender's failure, or even quarantined): ``owner`` (the sender that claimed the case) may
        have lost its lease to another sender during a long upload, and the other sender's own
        report then finds the case delivered, which is success too (the server's receipt is
        idempotent; the first one recorded is kept). ``owner`` only changes what is logged.

        ``last_error`` is cleared: shown next to ``delivered`` (``queue list``) it read as a
        problem that is over; ``attempts`` and the case store's history keep the failures.

        The row stays as history; the file goes only after the commit (on a helper thread:
        :meth:`wait_for_removals`), so a crash in between leaves a file that the next
        :meth:`open` removes.
        """
        try:
            json.loads(receipt_json)
        except ValueError as exc:
            raise OutboxError(f"outbox: the receipt for case {case_id} is not JSON") from exc
        at = _iso(now or datetime.now(UTC))
        with self._write(f"mark case {case_id} delivered"):
            row = self._existing_row(case_id)
            if row["state"] == OutboxState.DELIVERED:
                log.info("outbox: case %s was recorded delivered already", case_id)
                return False
            self._conn.execute(
                "UPDATE outbox SET state = ?, delivered_at = ?, receipt_json = ?, updated_at = ?,"
                " lease_owner = NULL, lease_until = NULL, last_error = NULL WHERE case_id = ?",
                (OutboxState.DELIVERED, at, receipt_json, at, case_id),
            )
        self._remover.remove(self._path(case_id))
        if owner is not None and row["lease_owner"] != owner:
            log.info("outbox: case %s delivered after another sender took it over", case_id)
        else:
            log.info("outbox: case %s delivered", case_id)
        return True

    def mark_failed(
        self,
        case_id: str,
        error: str,
        retry_at: datetime,
        *,
        owner: str | None = None,
        wait_for_link: bool = False,
        now: datetime | None = None,
    ) -> bool:
        """Put an in-flight case back in the queue until ``retry_at`` (backoff); attempts + 1.

        ``error`` is kept as ``last_error`` (one line; it must not contain payload).
        ``wait_for_link`` says the attempt failed because the network was down, so that
        :meth:`due_now` may cut the wait short once the link is back.

        ``owner`` is the sender that claimed the case: if it no longer holds the lease (its
        lease ran out and another sender took the case over, or that one already reported),
        nothing changes and the result is False, so a late failure cannot end the other
        sender's lease or undo its delivery. ``None`` is for a caller that is the only sender
        (tools, demos): the case must then be in flight, else :class:`OutboxError`.
        """
        moment = now or datetime.now(UTC)
        if retry_at > moment + timedelta(seconds=MAX_WAIT_S):
            raise ValueError(f"retry_at is more than {MAX_WAIT_S:g} s ahead: {retry_at}")
        retry = _iso(retry_at)
        at = _iso(moment)
        with self._write(f"mark case {case_id} failed"):
            if not self._holds(case_id, owner, "mark failed"):
                return False
            self._conn.execute(
                "UPDATE outbox SET state = ?, attempts = attempts + 1, last_error = ?,"
                " next_attempt_at = ?, updated_at = ?, lease_owner = NULL, lease_until = NULL,"
                " wait_for_link = ? WHERE case_id = ?",
                (OutboxState.PENDING, _one_line(error), retry, at, int(wait_for_link), case_id),
            )
        log.info("outbox: case %s failed, retry at %s", case_id, retry)
        return True

    def quarantine(
        self,
        case_id: str,
        reason: str,
        *,
        owner: str | None = None,
        now: datetime | None = None,
    ) -> bool:
        """Take a case out of the queue for good (until an admin retries); the file is kept
        for the admin. For envelopes the server refused permanently, or that are damaged.

        With ``owner`` (the sender that claimed it), only while that sender still holds the
        lease; otherwise nothing changes and the result is False, as for :meth:`mark_failed`.
        Without, a pending or in-flight case is taken (an admin, a tool), else
        :class:`OutboxError`.
        """
        text = _one_line(reason)
        at = _iso(now or datetime.now(UTC))
        with self._write(f"quarantine case {case_id}"):
            if owner is None:
                self._require(case_id, (OutboxState.PENDING, OutboxState.IN_FLIGHT), "quarantine")
            elif not self._holds(case_id, owner, "quarantine"):
                return False
            self._conn.execute(
                "UPDATE outbox SET state = ?, quarantined_at = ?, quarantine_reason = ?,"
                " updated_at = ?, lease_owner = NULL, lease_until = NULL WHERE case_id = ?",
                (OutboxState.QUARANTINED, at, text, at, case_id),
            )
        log.warning("outbox: case %s quarantined: %s", case_id, text)
        return True

    def retry(self, case_id: str, *, now: datetime | None = None) -> OutboxItem:
        """Admin action: put a quarantined case back in the queue, due now, attempts reset.

        ``last_error`` is kept for the record; the quarantine reason is cleared.
        """
        at = _iso(now or datetime.now(UTC))
        with self._write(f"retry case {case_id}"):
            row = self._require(case_id, OutboxState.QUARANTINED, "retry")
            self._check_file(_item(row))
            self._conn.execute(
                "UPDATE outbox SET state = ?, attempts = 0, next_attempt_at = ?, updated_at = ?,"
                " quarantined_at = NULL, quarantine_reason = NULL WHERE case_id = ?",
                (OutboxState.PENDING, at, at, case_id),
            )
            item = _item(self._row(case_id))
        log.info("outbox: case %s put back in the queue", case_id)
        return item

    def reseal(
        self,
        case_id: str,
        envelope: bytes | bytearray | memoryview,
        *,
        payload_sha256: str,
        now: datetime | None = None,
    ) -> OutboxItem:
        """Admin action: replace a quarantined case's envelope with a newly sealed one and put
        it back in the queue, due now (a case refused for how it was sealed: too old, sealed to
        a server key the server no longer has, signed with a device key it no longer accepts,
        or damaged on disk; sending the same bytes again would be refused again).

        The row stays, with its place in the queue. The new file replaces the old one while the
        write lock is held, then the row commits: a crash in between leaves the case quarantined
        with a file that no longer matches its row, which the next re-seal replaces.
        """
        _check_case_id(case_id)
        if not _SHA256.fullmatch(payload_sha256):
            raise ValueError("payload_sha256 must be 64 lowercase hex characters")
        size = len(envelope)
        at = _iso(now or datetime.now(UTC))
        final = self._path(case_id)
        tmp, fd, envelope_sha256 = self._write_temp(case_id, envelope)
        try:
            with self._write(f"re-seal case {case_id}"):
                row = self._require(case_id, OutboxState.QUARANTINED, "re-seal")
                self._check_quota(size - int(row["size_bytes"]))
                _publish(tmp, final)
                self._conn.execute(
                    "UPDATE outbox SET state = ?, payload_sha256 = ?, envelope_sha256 = ?,"
                    " size_bytes = ?, attempts = 0, next_attempt_at = ?, updated_at = ?,"
                    " wait_for_link = 0, quarantined_at = NULL, quarantine_reason = NULL"
                    " WHERE case_id = ?",
                    (
                        OutboxState.PENDING,
                        payload_sha256,
                        envelope_sha256,
                        size,
                        at,
                        at,
                        case_id,
                    ),
                )
        finally:
            os.close(fd)
            tmp.unlink(missing_ok=True)
        log.info("outbox: case %s re-sealed and put back in the queue", case_id)
        return self._get(case_id)

    def release_leases(
        self, is_dead: Callable[[str], bool], *, now: datetime | None = None
    ) -> list[str]:
        """End the leases whose owner ``is_dead`` says is gone; return their case ids.

        A sender killed mid-upload would otherwise hold its case for the whole lease; a
        restarted sender on the same machine knows the old one's process is gone and takes the
        case back at once (the lost attempt counts, as for an expired lease).
        """
        at = _iso(now or datetime.now(UTC))
        released: list[str] = []
        with self._write("release the leases of dead senders"):
            rows = self._conn.execute(
                "SELECT case_id, lease_owner FROM outbox WHERE state = ? AND lease_until > ?",
                (OutboxState.IN_FLIGHT, at),
            ).fetchall()
            for row in rows:
                if row["lease_owner"] and is_dead(row["lease_owner"]):
                    self._conn.execute(
                        "UPDATE outbox SET lease_until = ?, updated_at = ? WHERE case_id = ?",
                        (at, at, row["case_id"]),
                    )
                    released.append(row["case_id"])
        for case_id in released:
            log.info("outbox: case %s released from a dead sender's lease", case_id)
        return released

    def due_now(self, *, now: datetime | None = None) -> int:
        """Make the cases that wait because the link was down due at once (it is back: no
        point waiting out their backoff); return how many.

        Only those: a case the server answered with 429/5xx waits for the server, not for the
        link, and keeps its time (never sooner than the server's ``Retry-After``).
        """
        at = _iso(now or datetime.now(UTC))
        with self._write("make waiting cases due"):
            changed = self._conn.execute(
                "UPDATE outbox SET next_attempt_at = ?, updated_at = ?"
                " WHERE state = ? AND next_attempt_at > ? AND wait_for_link = 1",
                (at, at, OutboxState.PENDING, at),
            ).rowcount
        return int(changed)

    # --- reads -------------------------------------------------------------------------------

    def get(self, case_id: str) -> OutboxItem | None:
        """The case's entry, or ``None`` if it was never queued (as ``CaseStore.get``)."""
        with _sqlite_errors(f"read case {case_id}"):
            row = self._row(case_id)
        return None if row is None else _item(row)

    def envelope(self, item_or_case_id: OutboxItem | str) -> memoryview:
        """The envelope bytes to send (their size checked; see the module notes for the rest).

        A read-only view of the spool file mapped into memory: the upload reads it straight from
        the page cache, without first copying 20 MB into a ``bytes``. The mapping lives as long
        as the view (the file may be removed meanwhile; its bytes stay until then).

        Raises :class:`OutboxError` for a delivered case (its file is gone) or a file that cannot
        be read or has the wrong size.
        """
        case_id = (
            item_or_case_id.case_id if isinstance(item_or_case_id, OutboxItem) else item_or_case_id
        )
        item = self._get(case_id)
        if item.state is OutboxState.DELIVERED:
            raise OutboxError(f"outbox: case {case_id} was delivered; its envelope is deleted")
        return self._map_file(item)

    def items(self) -> list[OutboxItem]:
        """Every case ever queued, delivered ones included, in queue order (priority, FIFO)."""
        with _sqlite_errors("list the queue"):
            rows = self._conn.execute("SELECT * FROM outbox ORDER BY priority, seq").fetchall()
        return [_item(r) for r in rows]

    def next_attempt_at(self) -> datetime | None:
        """When the next pending case is due (None when nothing waits): reads the pending rows
        only, so a waiting sender does not load the whole delivered history every second."""
        with _sqlite_errors("read the next due time"):
            row = self._conn.execute(
                "SELECT MIN(next_attempt_at) FROM outbox WHERE state = ?", (OutboxState.PENDING,)
            ).fetchone()
        return None if row is None or row[0] is None else datetime.fromisoformat(row[0])

    def status(self, now: datetime | None = None) -> OutboxStatus:
        """Counts per state, bytes against the quota, and how long the oldest case has waited."""
        moment = _utc(now or datetime.now(UTC))
        with _sqlite_errors("read the queue status"):
            counts = {s: 0 for s in OutboxState}
            for row in self._conn.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state"):
                counts[OutboxState(row[0])] = row[1]
            queued = self._queued_bytes()
            refused = self._meta(_REFUSED_BYTES)
            oldest = self._conn.execute(
                "SELECT MIN(enqueued_at) FROM outbox WHERE state IN (?, ?)",
                (OutboxState.PENDING, OutboxState.IN_FLIGHT),
            ).fetchone()[0]
        age = None if oldest is None else (moment - datetime.fromisoformat(oldest)).total_seconds()
        return OutboxStatus(
            pending=counts[OutboxState.PENDING],
            in_flight=counts[OutboxState.IN_FLIGHT],
            delivered=counts[OutboxState.DELIVERED],
            quarantined=counts[OutboxState.QUARANTINED],
            queued_bytes=queued,
            quota_bytes=self._quota,
            oldest_pending_age_s=age,
            full=queued >= self._quota or (refused > 0 and queued + refused > self._quota),
        )

    # --- internals ---------------------------------------------------------------------------

    def _write_temp(
        self, case_id: str, envelope: bytes | bytearray | memoryview
    ) -> tuple[Path, int, str]:
        """The envelope in a fsynced, locked temporary file next to its final name: the file,
        its open descriptor (the caller publishes or removes it, then closes it) and the
        envelope's SHA-256, hashed on a helper thread while this one writes."""
        with (
            BackgroundSha256(threaded=len(envelope) >= THREAD_WORTH_BYTES) as envelope_hash,
            _sqlite_errors(f"write the envelope of case {case_id}"),
        ):
            envelope_hash.submit(envelope)
            tmp, fd = write_locked_temp(self._spool, self._path(case_id).name, envelope)
        try:
            return tmp, fd, envelope_hash.hexdigest()
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise

    def _meta(self, key: str) -> int:
        row = self._conn.execute("SELECT value FROM outbox_meta WHERE key = ?", (key,)).fetchone()
        return 0 if row is None else int(row[0])

    def _set_meta(self, key: str, value: int) -> None:
        with self._write(f"set {key}"):
            self._conn.execute(
                "INSERT OR REPLACE INTO outbox_meta (key, value) VALUES (?, ?)", (key, value)
            )

    @contextmanager
    def _write(self, what: str) -> Iterator[None]:
        """One ``BEGIN IMMEDIATE`` transaction. Rolls back on any error."""
        with _sqlite_errors(what):
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._conn.execute("COMMIT")
            except BaseException:
                # SQLite may already have rolled back by itself (e.g. disk full).
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def _path(self, case_id: str) -> Path:
        return self._spool / f"{case_id}{SPOOL_SUFFIX}"

    def _row(self, case_id: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._conn.execute(
            "SELECT * FROM outbox WHERE case_id = ?", (case_id,)
        ).fetchone()
        return row

    def _get(self, case_id: str) -> OutboxItem:
        item = self.get(case_id)
        if item is None:
            raise UnknownQueuedCaseError(f"outbox: case {case_id} is not in the queue")
        return item

    def _existing_row(self, case_id: str) -> sqlite3.Row:
        """The case's row, or :class:`UnknownQueuedCaseError`."""
        row = self._row(case_id)
        if row is None:
            raise UnknownQueuedCaseError(f"outbox: case {case_id} is not in the queue")
        return row

    def _require(
        self, case_id: str, states: OutboxState | tuple[OutboxState, ...], action: str
    ) -> sqlite3.Row:
        """The case's row, inside the current transaction, if its state allows ``action``."""
        allowed = states if isinstance(states, tuple) else (states,)
        row = self._existing_row(case_id)
        if row["state"] not in allowed:
            wanted = " or ".join(s.value for s in allowed)
            raise OutboxError(
                f"outbox: cannot {action} case {case_id}: it is {row['state']}, not {wanted}"
            )
        return row

    def _holds(self, case_id: str, owner: str | None, action: str) -> bool:
        """Whether ``owner`` still holds the case's lease (inside the current transaction).

        ``None`` (a caller that is the only sender) requires only that the case is in flight.
        A case taken over by another sender, or reported already, is False and logged: the
        caller's lease ran out while it worked.
        """
        if owner is None:
            self._require(case_id, OutboxState.IN_FLIGHT, action)
            return True
        row = self._existing_row(case_id)
        if row["state"] == OutboxState.IN_FLIGHT and row["lease_owner"] == owner:
            return True
        log.info(
            "outbox: not going to %s case %s: the sender's lease is gone (the case is %s)",
            action,
            case_id,
            row["state"],
        )
        return False

    def _queued_bytes(self) -> int:
        """Bytes of the envelopes still on disk (everything but delivered cases)."""
        total: int = self._conn.execute(
            "SELECT COALESCE(SUM(size_bytes), 0) FROM outbox WHERE state != ?",
            (OutboxState.DELIVERED,),
        ).fetchone()[0]
        return total

    def _check_quota(self, size: int) -> None:
        if size > self._quota:
            # No delivery can ever make room for it: "full" would send the admin waiting.
            raise CaseExceedsQuotaError(larger_than_quota(size, self._quota))
        used = self._queued_bytes()
        if used + size > self._quota:
            count = self._conn.execute(
                "SELECT COUNT(*) FROM outbox WHERE state != ?", (OutboxState.DELIVERED,)
            ).fetchone()[0]
            # The case's size and what deliveries must free: not one figure for both.
            free = max(0, self._quota - used)
            raise QueueFullError(
                f"outbox full: {used} of {self._quota} bytes ({100 * used / self._quota:.0f}%)"
                f" used by {count} undelivered cases; this case needs {size} bytes and {free}"
                f" are free: deliveries must free {used + size - self._quota} more"
            )

    def _map_file(self, item: OutboxItem) -> memoryview:
        """The spool file's bytes (mapped, read-only) if it has the size enqueued.

        :class:`SpoolFileDamagedError` when the file is missing or has another size;
        :class:`OutboxError` when it cannot be read now (descriptors, I/O), which may pass.
        """
        try:
            fd = os.open(self._path(item.case_id), os.O_RDONLY | os.O_CLOEXEC)
            try:
                size = os.fstat(fd).st_size
                if size != item.size_bytes:
                    raise _damaged(item)
                try:
                    return memoryview(mmap.mmap(fd, size, access=mmap.ACCESS_READ))
                except OSError:  # a filesystem that cannot map files: read them instead
                    data = self._path(item.case_id).read_bytes()
            finally:
                os.close(fd)
            if len(data) != item.size_bytes:
                raise _damaged(item)
            return memoryview(data).toreadonly()
        except FileNotFoundError as exc:
            raise SpoolFileDamagedError(
                f"outbox: the envelope of case {item.case_id} is missing"
            ) from exc
        except OSError as exc:
            raise OutboxError(
                f"outbox: the envelope of case {item.case_id} cannot be read: {exc.strerror or exc}"
            ) from exc

    def _check_file(self, item: OutboxItem) -> None:
        """:class:`SpoolFileDamagedError` unless the spool file's bytes are the ones enqueued."""
        if hashlib.sha256(self._map_file(item)).hexdigest() != item.envelope_sha256:
            raise _damaged(item)

    def _migrate(self) -> None:
        """Apply the pending outbox migrations, one transaction each, with the version row.

        The version is read first without the write lock, so that opening an up-to-date outbox
        (``queue list``, a GUI panel) never waits for, or fails behind, a writer; it is read
        again under the lock, as another process may have migrated meanwhile.
        """
        with _sqlite_errors("read the outbox schema version"):
            if self._check_version() is None:
                return
        while True:
            with self._write("migrate the outbox schema"):
                self._conn.execute(
                    "CREATE TABLE IF NOT EXISTS outbox_meta"
                    " (key TEXT PRIMARY KEY, value INTEGER NOT NULL)"
                )
                version = self._check_version()
                if version is None:
                    return
                for statement in _MIGRATIONS[version]:
                    self._conn.execute(statement)
                self._conn.execute(
                    "INSERT OR REPLACE INTO outbox_meta (key, value) VALUES ('schema_version', ?)",
                    (version + 1,),
                )
            log.info("outbox schema migrated to version %d", version + 1)

    def _check_version(self) -> int | None:
        """The outbox schema version to migrate from, or None when it is up to date."""
        target = len(_MIGRATIONS)
        version = 0
        if self._conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'outbox_meta'"
        ).fetchone():
            row = self._conn.execute(
                "SELECT value FROM outbox_meta WHERE key = 'schema_version'"
            ).fetchone()
            version = 0 if row is None else int(row[0])
        if version > target:
            raise OutboxIncompatibleError(
                f"outbox: schema version {version} is newer than this app supports"
                f" ({target}); upgrade the app"
            )
        return None if version == target else version

    def _tidy_spool(self) -> None:
        """Remove what crashes leave behind, and quarantine rows whose file has been lost.

        Looked at first without the write lock: a tidy spool (nearly every open) needs no
        write, so opening the outbox to read it does not wait behind a writer. What that look
        finds is looked at again and dealt with under the write lock, during which no other
        process can rename a file into place. Only undelivered rows are read: the history of
        delivered cases grows without bound.
        """
        remove_abandoned_temps(self._spool, for_suffixes=(SPOOL_SUFFIX,))
        with _sqlite_errors("look over the spool folder"):
            if self._spool_debris() == ([], []):
                return
        with self._write("tidy the spool folder"):
            strays, lost = self._spool_debris()
            for path in strays:
                path.unlink(missing_ok=True)
            at = _iso(datetime.now(UTC))
            for case_id in lost:
                self._conn.execute(
                    "UPDATE outbox SET state = ?, quarantined_at = ?, quarantine_reason = ?,"
                    " updated_at = ?, lease_owner = NULL, lease_until = NULL WHERE case_id = ?",
                    (OutboxState.QUARANTINED, at, "spool file missing or damaged", at, case_id),
                )
        if strays:
            log.info("outbox: removed %d spool files without a queued case", len(strays))
        for case_id in lost:
            log.warning("outbox: case %s quarantined: spool file missing or damaged", case_id)

    def _spool_debris(self) -> tuple[list[Path], list[str]]:
        """Spool files without a queued case (never committed, or delivered before the file
        could go), and the queued cases whose file is missing or has the wrong size."""
        queued = {
            r["case_id"]: (r["state"], r["size_bytes"])
            for r in self._conn.execute(
                "SELECT case_id, state, size_bytes FROM outbox WHERE state != ?",
                (OutboxState.DELIVERED,),
            )
        }
        strays: list[Path] = []
        sizes = {}
        for path in self._spool.glob(f"*{SPOOL_SUFFIX}"):
            case_id = path.name.removesuffix(SPOOL_SUFFIX)
            if not _CASE_ID.fullmatch(case_id):
                continue  # not ours: leave it alone
            if case_id not in queued:
                strays.append(path)
            else:
                # Gone since the listing (delivered meanwhile): counted as lost in this look.
                with suppress(FileNotFoundError):
                    sizes[case_id] = path.stat().st_size
        lost = [
            case_id
            for case_id, (state, size) in queued.items()
            if state != OutboxState.QUARANTINED and sizes.get(case_id) != size
        ]
        return strays, lost


class LeaseRenewer:
    """Extends a sender's leases from a helper thread, on a connection of its own.

    Made by :meth:`Outbox.lease_renewer` in the sender's thread, used and closed in the helper
    thread: the connection is opened on the first :meth:`renew` (most uploads end long before a
    renewal is due, and pay nothing for it).
    """

    def __init__(self, db_path: Path, busy_timeout_s: float) -> None:
        self._db_path = db_path
        self._busy_timeout_s = busy_timeout_s
        self._conn: sqlite3.Connection | None = None

    def renew(
        self, case_id: str, owner: str, lease_s: float, *, now: datetime | None = None
    ) -> bool:
        """Extend ``owner``'s lease on the case to ``lease_s`` from ``now``; False when it no
        longer holds it (taken over, or reported meanwhile): nothing changes then."""
        _check_lease(lease_s)
        until = _iso((now or datetime.now(UTC)) + timedelta(seconds=lease_s))
        with _sqlite_errors(f"renew the lease on case {case_id}"):
            if self._conn is None:
                self._conn = sqlite3.connect(
                    self._db_path, timeout=self._busy_timeout_s, isolation_level=None
                )
            changed = self._conn.execute(
                "UPDATE outbox SET lease_until = ? WHERE case_id = ? AND state = ?"
                " AND lease_owner = ?",
                (until, case_id, OutboxState.IN_FLIGHT, owner),
            ).rowcount
        return changed == 1

    def close(self) -> None:
        if self._conn is not None:
            with _sqlite_errors("close the lease connection"):
                self._conn.close()
            self._conn = None


def _damaged(item: OutboxItem) -> SpoolFileDamagedError:
    return SpoolFileDamagedError(f"outbox: the envelope of case {item.case_id} is damaged")


def larger_than_quota(size: int, quota_bytes: int) -> str:
    """Why a case of ``size`` bytes can never be queued: no delivery can make room for it."""
    return (
        f"outbox: this case ({size} bytes) is larger than the whole quota "
        f"({quota_bytes} bytes): raise escalation.queue_quota_mb"
    )


def _check_case_id(case_id: str) -> None:
    if not _CASE_ID.fullmatch(case_id):
        raise ValueError("case_id must be 32 or 64 lowercase hex characters")


def _publish(tmp: Path, final: Path) -> None:
    """Rename the complete temporary file into place and make the new name durable."""
    tmp.rename(final)
    fsync_dir(final.parent)


def _item(row: sqlite3.Row | None) -> OutboxItem:
    if row is None:
        raise OutboxError("outbox: a queued case vanished during the transaction")
    return OutboxItem(
        case_id=row["case_id"],
        state=OutboxState(row["state"]),
        priority=row["priority"],
        reason=row["reason"],
        payload_sha256=row["payload_sha256"],
        envelope_sha256=row["envelope_sha256"],
        size_bytes=row["size_bytes"],
        attempts=row["attempts"],
        enqueued_at=row["enqueued_at"],
        updated_at=row["updated_at"],
        next_attempt_at=row["next_attempt_at"],
        last_error=row["last_error"],
        lease_owner=row["lease_owner"],
        lease_until=row["lease_until"],
        delivered_at=row["delivered_at"],
        receipt=row["receipt_json"],
        quarantined_at=row["quarantined_at"],
        quarantine_reason=row["quarantine_reason"],
    )
