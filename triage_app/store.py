"""The local case store: one SQLite file (WAL) shared by the watch service, GUI and CLI.

Why SQLite in WAL mode with ``synchronous=FULL``: several processes on the device read and write
the same file, readers must never block the writer, and a committed case must survive a power
cut. Every write runs in a ``BEGIN IMMEDIATE`` transaction so that two processes cannot both read
a case's state and then race each other to change it; a waiting writer retries for up to the
busy timeout instead of failing at once.

Privacy: the file holds the input path and the full result record, so it is created with mode
0600, and this module logs case ids and states only, never paths or results.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from triage_app.errors import (
    AlreadyQueuedError,
    ConfigError,
    IllegalTransitionError,
    StoreError,
    StoreIncompatibleError,
)
from triage_app.paths import access_problem
from triage_app.results import CaseResult, FailedInput, portable_text
from triage_app.sqlite_wal import enable_wal
from triage_app.states import CaseEvent, CaseState, Feedback, next_state

__all__ = [
    "NOT_RELEASED",
    "REPROCESSED",
    "AuditEntry",
    "CaseStore",
    "CaseTransition",
    "FailureRecord",
    "FeedbackRecord",
    "StoredCase",
    "still_held",
]

log = logging.getLogger(__name__)

#: ``case_events.event`` of the row written when a known case is recorded again (no state change).
REPROCESSED = "reprocessed"
#: ``case_events.event`` of the row saying why a held case was not released (no state change).
NOT_RELEASED = "not_released"

_DEFAULT_BUSY_TIMEOUT_S = 10.0

# The outbox's table (escalation/outbox.py), in this same file: a held case whose envelope has a
# row there is on its way to the central server and can no longer be closed on the device.
_OUTBOX_TABLE = "outbox"

# Forward migrations: entry ``i`` takes a file from ``PRAGMA user_version`` ``i`` to ``i + 1``.
# Append new steps, never edit released ones. Each step runs in one transaction with the version
# bump, so a crash leaves the file at either the old or the new version.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE cases (
            case_id       TEXT PRIMARY KEY,
            state         TEXT NOT NULL,
            decision      TEXT NOT NULL,
            reason        TEXT NOT NULL,
            score         REAL NOT NULL,
            model_name    TEXT NOT NULL,
            model_version TEXT NOT NULL,
            model_sha256  TEXT NOT NULL,
            source        TEXT NOT NULL,
            created_at    TEXT NOT NULL,
            updated_at    TEXT NOT NULL,
            result_json   TEXT NOT NULL,
            error_code    TEXT
        )
        """,
        "CREATE INDEX cases_by_state ON cases (state, created_at)",
        "CREATE INDEX cases_by_created ON cases (created_at)",
        """
        CREATE TABLE case_events (
            id         INTEGER PRIMARY KEY,
            case_id    TEXT NOT NULL REFERENCES cases (case_id),
            from_state TEXT NOT NULL,
            to_state   TEXT NOT NULL,
            event      TEXT NOT NULL,
            at         TEXT NOT NULL,
            detail     TEXT
        )
        """,
        "CREATE INDEX case_events_by_case ON case_events (case_id, id)",
        """
        CREATE TABLE failures (
            id      INTEGER PRIMARY KEY,
            path    TEXT NOT NULL,
            code    TEXT NOT NULL,
            message TEXT NOT NULL,
            at      TEXT NOT NULL
        )
        """,
        """
        CREATE TABLE audit (
            id          INTEGER PRIMARY KEY,
            at          TEXT NOT NULL,
            actor       TEXT NOT NULL,
            action      TEXT NOT NULL,
            detail_json TEXT NOT NULL
        )
        """,
        # The audit log is evidence: refuse edits and deletions at the database level.
        """
        CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END
        """,
        """
        CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END
        """,
    ),
    (
        # The local link from each pseudonym (patient, study, series, instance) back to the
        # original value. It identifies, so it lives only here, on the device, never in a payload.
        """
        CREATE TABLE pseudonym_links (
            kind       TEXT NOT NULL,
            pseudonym  TEXT NOT NULL,
            original   TEXT NOT NULL,
            first_seen TEXT NOT NULL,
            PRIMARY KEY (kind, pseudonym)
        )
        """,
    ),
    (
        # The central server's verdict on an escalated case (JSON), once it has come back.
        "ALTER TABLE cases ADD COLUMN verdict_json TEXT",
    ),
    (
        # A clinician's accept / reject / acknowledge of a case's result, with who and when.
        """
        CREATE TABLE feedback (
            id      INTEGER PRIMARY KEY,
            case_id TEXT NOT NULL REFERENCES cases (case_id),
            kind    TEXT NOT NULL,
            actor   TEXT NOT NULL,
            at      TEXT NOT NULL,
            comment TEXT NOT NULL
        )
        """,
        "CREATE INDEX feedback_by_case ON feedback (case_id, id)",
    ),
    (
        # The SHA-256 of a refused input's bytes: with path and code, which input a failure
        # row is about (see ``record_failure``). NULL when the bytes could not be read, and in
        # the rows recorded before this version (kept as they are).
        "ALTER TABLE failures ADD COLUMN input_sha256 TEXT",
        "CREATE INDEX failures_by_input ON failures (path, code)",
    ),
    (
        # A case's change sequence: every insert or update of a case sets it to one more than
        # the highest so far (``_NEXT_CHANGE_SEQ``), so a reader that keeps its own copy (the
        # worklist) asks only for the cases changed since the last number it saw
        # (``cases_changed_since``). Not a timestamp: clocks jump (NTP, a wrong time zone, a
        # manual fix) and two writes can share a millisecond. The cases already stored get
        # their rowid: distinct, and a new reader asks for every case anyway.
        "ALTER TABLE cases ADD COLUMN change_seq INTEGER NOT NULL DEFAULT 0",
        "UPDATE cases SET change_seq = rowid",
        "CREATE UNIQUE INDEX cases_by_change ON cases (change_seq)",
    ),
)

# The change sequence of a case being inserted or updated (an index lookup). Writers hold the
# write lock (``BEGIN IMMEDIATE``) from reading it to committing, so numbers are committed in
# the order they are handed out: a reader that sees change n also sees every change before it.
_NEXT_CHANGE_SEQ = "(SELECT COALESCE(MAX(change_seq), 0) + 1 FROM cases)"


@dataclass(frozen=True)
class StoredCase:
    """A case as the store holds it; ``result`` is the latest result record (DESIGN 4.2)."""

    case_id: str
    state: CaseState
    decision: str
    reason: str
    score: float
    model_name: str
    model_version: str
    model_sha256: str
    created_at: str
    updated_at: str
    result: dict[str, Any]
    verdict: dict[str, Any] | None = None  # the central server's, for escalated cases


@dataclass(frozen=True)
class CaseTransition:
    """One row of a case's history. ``event`` is a :class:`CaseEvent` value, ``REPROCESSED``
    or ``NOT_RELEASED``."""

    from_state: CaseState
    to_state: CaseState
    event: str
    at: str
    detail: str | None


@dataclass(frozen=True)
class FailureRecord:
    """An input that could not be triaged (it has no case id, so it is kept apart from cases)."""

    path: str
    code: str
    message: str
    at: str
    input_sha256: str | None = None  # None: unreadable, or recorded before schema version 5


@dataclass(frozen=True)
class FeedbackRecord:
    """A clinician's feedback on a case's result (also in its history and the audit log)."""

    case_id: str
    kind: Feedback
    actor: str
    at: str
    comment: str


@dataclass(frozen=True)
class AuditEntry:
    """One audit log entry: who did what, with its details (e.g. old and new setting values)."""

    at: str
    actor: str
    action: str
    detail: dict[str, Any]


def _now() -> str:
    """UTC, ISO-8601, milliseconds: sorts as text and reads the same on every device."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@contextmanager
def _sqlite_errors(what: str) -> Iterator[None]:
    """Turn ``sqlite3.Error`` into a one-line :class:`StoreError` saying what failed."""
    try:
        yield
    except sqlite3.Error as exc:
        raise StoreError(f"case store: could not {what}: {exc}") from exc


@contextmanager
def _refuse_unusable(path: Path) -> Iterator[None]:
    """Turn a :class:`StoreError` met opening the store at ``path`` into a ``ConfigError``
    with the fix when this user may not use the store's folder, the file or its journals.

    A store left by a run as root or as another user, or on a read-only file system, stays so
    until an admin acts: a setting to fix (exit 2), not a passing ``StoreError`` (exit 75,
    a service restarted in vain). A lock or a full disk finds every permission in place and
    stays a ``StoreError``. The folder is the one ``chown -R`` may fix (``paths.case_store``
    is ``paths.data_dir``'s ``cases.sqlite3`` unless set); the line is the one the services
    give at start (``cli_services``).
    """
    try:
        yield
    except StoreError as err:
        # The folder first: a store that cannot be made there is the folder's to fix.
        checks = [(path.parent, os.W_OK | os.X_OK)]
        for suffix in ("", "-wal", "-shm", "-journal"):  # SQLite's own names
            checks.append((path.with_name(path.name + suffix), os.R_OK | os.W_OK))
        for target, need in checks:
            problem = access_problem(target, need, tree=path.parent)
            if problem is not None:
                raise ConfigError(f"paths.case_store: cannot use {target}: {problem}") from err
        raise


class CaseStore:
    """Cases, their state history, refused inputs and the audit log, in one SQLite file.

    Open with :meth:`open` and close with :meth:`close` (or use it as a context manager). One
    instance per process and thread; any number of processes may open the same file.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        """Wrap an already configured connection; use :meth:`open` instead."""
        self._conn = conn

    @classmethod
    def open(cls, path: Path, *, busy_timeout_s: float = _DEFAULT_BUSY_TIMEOUT_S) -> CaseStore:
        """Open (or create) the store at ``path`` and bring its schema up to date.

        A new file gets mode 0600 and its parent directory is created (mode 0700). A file with
        a newer schema than this version knows is refused rather than misread. A file or folder
        this user may not use is a ``ConfigError`` with the fix (see :func:`_refuse_unusable`).
        """
        path = Path(path)
        with _refuse_unusable(path):
            try:
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                # Created here rather than by SQLite so that it is private from its first byte
                # (SQLite gives its -wal and -shm files the same mode).
                with suppress(FileExistsError):
                    path.touch(mode=0o600, exist_ok=False)
            except OSError as exc:
                raise StoreError(f"case store: could not create {path}: {exc}") from exc
            with _sqlite_errors(f"open {path}"):
                # isolation_level=None: no implicit transactions; we issue BEGIN IMMEDIATE.
                conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None)
                try:
                    conn.row_factory = sqlite3.Row
                    mode = enable_wal(conn, busy_timeout_s)
                    if mode != "wal":
                        raise StoreIncompatibleError(
                            f"case store: {path} cannot use WAL mode (got {mode!r})"
                        )
                    conn.execute("PRAGMA synchronous=FULL")
                    conn.execute("PRAGMA foreign_keys=ON")
                    store = cls(conn)
                    store._migrate()
                except BaseException:
                    conn.close()
                    raise
        log.debug("case store opened (schema version %d)", store.schema_version)
        return store

    def close(self) -> None:
        with _sqlite_errors("close the database"):
            self._conn.close()

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
    def schema_version(self) -> int:
        with _sqlite_errors("read the schema version"):
            version: int = self._conn.execute("PRAGMA user_version").fetchone()[0]
        return version

    # --- writes ------------------------------------------------------------------------------

    def record_links(self, links: Iterable[tuple[str, str, str]]) -> None:
        """Keep pseudonym → original links (kind, pseudonym, original); known links stay as is."""
        rows = list(links)
        if not rows:
            return
        with self._write("record pseudonym links") as at:
            self._insert_links(rows, at)

    def _insert_links(self, rows: Iterable[tuple[str, str, str]], at: str) -> None:
        self._conn.executemany(
            "INSERT OR IGNORE INTO pseudonym_links (kind, pseudonym, original, first_seen) "
            "VALUES (?, ?, ?, ?)",
            [(kind, new, old, at) for kind, new, old in rows],
        )

    def original_for(self, kind: str, pseudonym: str) -> str | None:
        """The original value behind a pseudonym, for display on this device only."""
        with _sqlite_errors("read a pseudonym link"):
            row = self._conn.execute(
                "SELECT original FROM pseudonym_links WHERE kind = ? AND pseudonym = ?",
                (kind, pseudonym),
            ).fetchone()
        return None if row is None else str(row["original"])

    def record_result(self, result: CaseResult, final_event: CaseEvent) -> CaseState:
        """Store a triaged case and move it to its first resting state; return that state.

        A new case is inserted as ``received``, then ``analyse`` and ``final_event`` (e.g.
        ``decide_local_normal``, ``enqueue``, ``hold``) are applied, each stored in the history,
        all in one transaction with the result's pseudonym links: a crash leaves either the
        whole case or nothing (and a service files an image with one commit, not two).

        Idempotent on ``case_id`` (the same image sent again is the same case): a known case is
        not duplicated and its state does not change, whatever ``final_event`` says. Only its
        ``result`` (the latest record) and ``updated_at`` are replaced; the decision columns keep
        the values that put the case in its state. A ``reprocessed`` history row (from_state ==
        to_state) records the new decision/reason, and the current state is returned.

        Raises
        ------
        IllegalTransitionError
            If ``final_event`` cannot follow ``analyse``; nothing is stored.
        """
        # Validate the whole path before touching the file.
        steps: list[tuple[CaseState, CaseEvent, CaseState]] = []
        state = CaseState.RECEIVED
        for event in (CaseEvent.ANALYSE, final_event):
            steps.append((state, event, next_state(state, event)))
            state = steps[-1][2]
        result_json = json.dumps(result.to_json(), sort_keys=True)
        with self._write(f"record case {result.case_id}") as at:
            self._insert_links(result.links, at)
            row = self._conn.execute(
                "SELECT state FROM cases WHERE case_id = ?", (result.case_id,)
            ).fetchone()
            if row is not None:
                current = CaseState(row["state"])
                self._update_case(result.case_id, at, result_json=result_json)
                self._add_event(
                    result.case_id,
                    current,
                    current,
                    REPROCESSED,
                    at,
                    f"decision={result.decision} reason={result.reason}",
                )
                log.info("case %s reprocessed; stays %s", result.case_id, current)
                return current
            self._conn.execute(
                f"""
                INSERT INTO cases (case_id, state, decision, reason, score, model_name,
                                   model_version, model_sha256, source, created_at, updated_at,
                                   result_json, change_seq)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, {_NEXT_CHANGE_SEQ})
                """,
                (
                    result.case_id,
                    state,
                    result.decision,
                    result.reason,
                    result.score,
                    result.model.name,
                    result.model.version,
                    result.model.sha256,
                    portable_text(result.path),
                    at,
                    at,
                    result_json,
                ),
            )
            for before, event, after in steps:
                self._add_event(result.case_id, before, after, event, at, None)
        log.info("case %s recorded: %s", result.case_id, state)
        return state

    def record_failure(self, failure: FailedInput) -> None:
        """Keep a refused input (it has no case id) so that nothing is lost silently.

        Idempotent on the input, which is its path, error code and the SHA-256 of its bytes
        (``input_sha256``): a service killed after recording a failure but before moving the
        file to quarantine refuses the same file again on restart, under the same quarantine
        name, and it must be listed once. The hash keeps apart different files refused under
        one path (a file replaced, then classified again); the path keeps apart copies of one
        file in several places, each of which is there to be found. Inputs whose bytes could
        not be read (no hash) are the same when path and code are. The first row is kept as
        it is. Checked inside the write transaction, so two processes cannot both insert.
        """
        path, message = portable_text(failure.path), portable_text(failure.message)
        with self._write("record a failed input") as at:
            known = self._conn.execute(
                "SELECT 1 FROM failures WHERE path = ? AND code = ? AND input_sha256 IS ?",
                (path, failure.code, failure.input_sha256),
            ).fetchone()
            if known is None:
                self._conn.execute(
                    "INSERT INTO failures (path, code, message, at, input_sha256)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (path, failure.code, message, at, failure.input_sha256),
                )
        if known is None:
            log.info("failed input recorded: %s", failure.code)
        else:
            log.info("failed input already recorded: %s", failure.code)

    def apply(self, case_id: str, event: CaseEvent, detail: str | None = None) -> CaseState:
        """Apply ``event`` to a stored case and return its new state.

        The state is read and changed inside one ``BEGIN IMMEDIATE`` transaction, so of two
        processes applying events to the same case, the second sees the first one's result.

        Raises
        ------
        IllegalTransitionError
            If the case's current state does not allow ``event``; nothing changes.
        StoreError
            If ``case_id`` is unknown, or the database fails.
        """
        with self._write(f"apply {event} to case {case_id}") as at:
            before, after = self._transition(case_id, event, at, detail)
        log.info("case %s: %s -(%s)-> %s", case_id, before, event, after)
        return after

    def note_not_released(self, case_id: str, detail: str) -> None:
        """Say in the case's history why it stays held (unless its last row says so already).

        A ``not_released`` row (from_state == to_state) is what a human reviewing the case
        sees. The same reason twice in a row is kept once, so a case tried at every release
        does not bury its history.

        Raises
        ------
        StoreError
            If ``case_id`` is unknown, or the database fails.
        """
        with self._write(f"note on case {case_id}") as at:
            row = self._conn.execute(
                "SELECT state FROM cases WHERE case_id = ?", (case_id,)
            ).fetchone()
            if row is None:
                raise StoreError(f"case store: unknown case id {case_id}")
            last = self._conn.execute(
                "SELECT event, detail FROM case_events WHERE case_id = ? ORDER BY id DESC LIMIT 1",
                (case_id,),
            ).fetchone()
            if last is not None and (last["event"], last["detail"]) == (NOT_RELEASED, detail):
                return
            state = CaseState(row["state"])
            self._add_event(case_id, state, state, NOT_RELEASED, at, detail)
        log.info("case %s not released; stays %s", case_id, state)

    def record_verdict(self, case_id: str, verdict: Mapping[str, object]) -> CaseState:
        """Keep the central server's verdict and move the case to ``verdict_received``.

        Raises ``IllegalTransitionError`` unless the case is ``delivered``; nothing changes then.
        """
        verdict_json = json.dumps(dict(verdict), sort_keys=True)
        with self._write(f"record the verdict of case {case_id}") as at:
            _, after = self._transition(
                case_id, CaseEvent.RECEIVE_VERDICT, at, None, verdict_json=verdict_json
            )
        log.info("case %s: central verdict received", case_id)
        return after

    def record_feedback(
        self, case_id: str, actor: str, kind: Feedback, comment: str = ""
    ) -> FeedbackRecord:
        """Record a clinician's accept, reject or acknowledge and move the case to acknowledged.

        The state change, its history row (``"<kind> by <actor>[: comment]"``), the feedback row
        and the audit entry are one transaction: a result is never acknowledged without a record
        of who did it, or the other way round.

        Raises
        ------
        IllegalTransitionError
            If the case cannot be acknowledged now (e.g. still on its way to the central server,
            or already acknowledged); nothing changes. :class:`AlreadyQueuedError` for a held
            case whose envelope is in the outbox already (it is about to be sent).
        StoreError
            If ``case_id`` is unknown, ``actor`` is empty, or the database fails.
        """
        kind = Feedback(kind)
        if not actor.strip():
            raise StoreError("case store: feedback needs the name of the user giving it")
        comment = " ".join(comment.split())
        detail = f"{kind} by {actor}" + (f": {comment}" if comment else "")
        audit_json = json.dumps({"case_id": case_id, "kind": kind.value, "comment": comment})
        with self._write(f"record feedback on case {case_id}") as at:
            self._transition(case_id, CaseEvent.ACKNOWLEDGE, at, detail)
            self._conn.execute(
                "INSERT INTO feedback (case_id, kind, actor, at, comment) VALUES (?, ?, ?, ?, ?)",
                (case_id, kind, actor, at, comment),
            )
            self._conn.execute(
                "INSERT INTO audit (at, actor, action, detail_json) VALUES (?, ?, ?, ?)",
                (at, actor, "case.feedback", audit_json),
            )
        log.info("case %s: %s recorded", case_id, kind)
        return FeedbackRecord(case_id, kind, actor, at, comment)

    def audit(self, actor: str, action: str, detail: Mapping[str, object]) -> None:
        """Append to the audit log (admin changes, acknowledgements...). Entries are permanent.

        ``detail`` is stored as JSON; values JSON cannot express (e.g. paths) are stored as text.
        """
        detail_json = json.dumps(dict(detail), sort_keys=True, default=str)
        with self._write("write the audit log") as at:
            self._conn.execute(
                "INSERT INTO audit (at, actor, action, detail_json) VALUES (?, ?, ?, ?)",
                (at, actor, action, detail_json),
            )
        log.info("audit: %s by %s", action, actor)

    # --- reads -------------------------------------------------------------------------------

    def get(self, case_id: str) -> StoredCase | None:
        with _sqlite_errors(f"read case {case_id}"):
            row = self._conn.execute("SELECT * FROM cases WHERE case_id = ?", (case_id,)).fetchone()
        return None if row is None else _stored_case(row)

    def history(self, case_id: str) -> list[CaseTransition]:
        """The case's transitions, oldest first (empty for an unknown case)."""
        with _sqlite_errors(f"read the history of case {case_id}"):
            rows = self._conn.execute(
                "SELECT from_state, to_state, event, at, detail FROM case_events"
                " WHERE case_id = ? ORDER BY id",
                (case_id,),
            ).fetchall()
        return [
            CaseTransition(
                from_state=CaseState(r["from_state"]),
                to_state=CaseState(r["to_state"]),
                event=r["event"],
                at=r["at"],
                detail=r["detail"],
            )
            for r in rows
        ]

    def feedback(self, case_id: str) -> list[FeedbackRecord]:
        """The clinicians' feedback on a case, oldest first."""
        with _sqlite_errors(f"read the feedback on case {case_id}"):
            rows = self._conn.execute(
                "SELECT kind, actor, at, comment FROM feedback WHERE case_id = ? ORDER BY id",
                (case_id,),
            ).fetchall()
        return [
            FeedbackRecord(case_id, Feedback(r["kind"]), r["actor"], r["at"], r["comment"])
            for r in rows
        ]

    def list_cases(
        self, *, state: CaseState | None = None, limit: int | None = None
    ) -> list[StoredCase]:
        """Cases newest first, optionally only those in ``state`` and at most ``limit``."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")
        sql = "SELECT * FROM cases"
        params: list[object] = []
        if state is not None:
            sql += " WHERE state = ?"
            params.append(state)
        sql += " ORDER BY created_at DESC, rowid DESC LIMIT ?"
        params.append(-1 if limit is None else limit)
        with _sqlite_errors("list cases"):
            rows = self._conn.execute(sql, params).fetchall()
        return [_stored_case(r) for r in rows]

    def cases_changed_since(self, seq: int) -> tuple[list[StoredCase], int]:
        """The cases inserted or updated after change ``seq``, and the ``seq`` to ask with next.

        Why: a reader that keeps its own copy of the cases (the worklist, polling every second
        while the store grows by thousands of cases a week) reads only what changed, through an
        index, instead of every case. ``seq`` 0 gives every case; a case changed several times
        comes once, as it is now. Writes committed by other connections and processes before
        this call are included. The cases come in the order of their last change.
        """
        if seq < 0:
            raise ValueError(f"seq must be >= 0, not {seq}")
        with _sqlite_errors("list changed cases"):
            # One statement, so one snapshot: the new position is the last change it saw.
            rows = self._conn.execute(
                "SELECT * FROM cases WHERE change_seq > ? ORDER BY change_seq", (seq,)
            ).fetchall()
        if not rows:
            return [], seq
        return [_stored_case(r) for r in rows], int(rows[-1]["change_seq"])

    def case_ids(self, state: CaseState) -> list[str]:
        """Ids of the cases in ``state``, oldest first: a cheap look (an index, no records)."""
        with _sqlite_errors(f"list {state} cases"):
            rows = self._conn.execute(
                "SELECT case_id FROM cases WHERE state = ? ORDER BY created_at, rowid", (state,)
            ).fetchall()
        return [str(r["case_id"]) for r in rows]

    def counts_by_state(self) -> dict[str, int]:
        """Number of cases per state; every known state is present, with 0 if it has none."""
        counts = {s.value: 0 for s in CaseState}
        with _sqlite_errors("count cases"):
            rows = self._conn.execute(
                "SELECT state, COUNT(*) AS n FROM cases GROUP BY state"
            ).fetchall()
        counts.update((r["state"], r["n"]) for r in rows)
        return counts

    def failures(self) -> list[FailureRecord]:
        """Refused inputs, oldest first."""
        with _sqlite_errors("read failed inputs"):
            rows = self._conn.execute(
                "SELECT path, code, message, at, input_sha256 FROM failures ORDER BY id"
            ).fetchall()
        return [
            FailureRecord(r["path"], r["code"], r["message"], r["at"], r["input_sha256"])
            for r in rows
        ]

    def audit_log(self) -> list[AuditEntry]:
        """The audit log, oldest first."""
        with _sqlite_errors("read the audit log"):
            rows = self._conn.execute(
                "SELECT at, actor, action, detail_json FROM audit ORDER BY id"
            ).fetchall()
        return [
            AuditEntry(r["at"], r["actor"], r["action"], json.loads(r["detail_json"])) for r in rows
        ]

    # --- internals ---------------------------------------------------------------------------

    @contextmanager
    def _write(self, what: str) -> Iterator[str]:
        """One ``BEGIN IMMEDIATE`` transaction; yields its timestamp. Rolls back on any error."""
        with _sqlite_errors(what):
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield _now()
                self._conn.execute("COMMIT")
            except BaseException:
                # SQLite may already have rolled back by itself (e.g. disk full).
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def _transition(
        self, case_id: str, event: CaseEvent, at: str, detail: str | None, **columns: object
    ) -> tuple[CaseState, CaseState]:
        """Inside a write transaction: move the case by ``event`` and keep the history row.

        ``columns`` are other columns of the case to set in the same update.
        """
        row = self._conn.execute("SELECT state FROM cases WHERE case_id = ?", (case_id,)).fetchone()
        if row is None:
            raise StoreError(f"case store: unknown case id {case_id}")
        before = CaseState(row["state"])
        after = next_state(before, event)
        if (before, event) == (CaseState.ESCALATION_HELD, CaseEvent.ACKNOWLEDGE) and self._queued(
            case_id
        ):
            raise AlreadyQueuedError(
                f"case {case_id} is already in the outbox for the central server:"
                " it cannot be closed without being sent"
            )
        self._update_case(case_id, at, state=after, **columns)
        self._add_event(case_id, before, after, event, at, detail)
        return before, after

    def _queued(self, case_id: str) -> bool:
        """Inside a transaction: whether the case has a row in the outbox (if there is one)."""
        tables = self._conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (_OUTBOX_TABLE,)
        ).fetchone()
        return (
            tables is not None
            and self._conn.execute(
                f"SELECT 1 FROM {_OUTBOX_TABLE} WHERE case_id = ?", (case_id,)
            ).fetchone()
            is not None
        )

    def _update_case(self, case_id: str, at: str, **columns: object) -> None:
        """Inside a write transaction: set ``columns`` of a stored case, as changed at ``at``.

        Every update of a case goes through here so that it gets a new change sequence and
        :meth:`cases_changed_since` sees it (the one insert, in :meth:`record_result`, takes
        one too). Column names come from this module, never from a caller's data.
        """
        assignments = "".join(f"{name} = ?, " for name in columns)
        self._conn.execute(
            f"UPDATE cases SET {assignments}updated_at = ?, change_seq = {_NEXT_CHANGE_SEQ}"
            " WHERE case_id = ?",
            (*columns.values(), at, case_id),
        )

    def _add_event(
        self,
        case_id: str,
        before: CaseState,
        after: CaseState,
        event: str,
        at: str,
        detail: str | None,
    ) -> None:
        self._conn.execute(
            "INSERT INTO case_events (case_id, from_state, to_state, event, at, detail)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (case_id, before, after, event, at, detail),
        )

    def _migrate(self) -> None:
        """Apply the pending forward migrations, one transaction each.

        The version is read first without the write lock, so that opening an up-to-date store
        (every open but the first after an upgrade) never waits for, or fails behind, a writer;
        it is read again under the lock, as another process may have migrated meanwhile.
        """
        with _sqlite_errors("read the schema version"):
            if self._check_version() is None:
                return
        while True:
            with self._write("migrate the schema"):
                version = self._check_version()
                if version is None:
                    return
                for statement in _MIGRATIONS[version]:
                    self._conn.execute(statement)
                # PRAGMA takes no parameters; version is an int from SQLite itself.
                self._conn.execute(f"PRAGMA user_version = {version + 1}")
            log.info("case store schema migrated to version %d", version + 1)

    def _check_version(self) -> int | None:
        """The schema version to migrate from, or None when the file is up to date."""
        target = len(_MIGRATIONS)
        version: int = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > target:
            raise StoreIncompatibleError(
                f"case store: schema version {version} is newer than this app "
                f"supports ({target}); upgrade the app"
            )
        return None if version == target else version


def still_held(case_id: str) -> Callable[[sqlite3.Connection], None]:
    """A check that the case is still ``escalation_held``, for ``Outbox.enqueue`` to run inside
    the transaction that queues it (the outbox shares this file).

    Why: a clinician may close a held case ("do not send") while it is being released or
    queued; checked in one transaction with the insert, the case is either queued (and can no
    longer be closed, see ``record_feedback``) or closed and never sent, never both.
    Raises ``IllegalTransitionError`` if the case has moved on, ``StoreError`` if it is unknown.
    """

    def check(conn: sqlite3.Connection) -> None:
        row = conn.execute("SELECT state FROM cases WHERE case_id = ?", (case_id,)).fetchone()
        if row is None:
            raise StoreError(f"case store: unknown case id {case_id}")
        state = CaseState(row[0])
        if state is not CaseState.ESCALATION_HELD:
            raise IllegalTransitionError(
                f"case {case_id} is {state}, no longer {CaseState.ESCALATION_HELD}: not queued"
            )

    return check


def _stored_case(row: sqlite3.Row) -> StoredCase:
    return StoredCase(
        case_id=row["case_id"],
        state=CaseState(row["state"]),
        decision=row["decision"],
        reason=row["reason"],
        score=row["score"],
        model_name=row["model_name"],
        model_version=row["model_version"],
        model_sha256=row["model_sha256"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        result=json.loads(row["result_json"]),
        verdict=json.loads(row["verdict_json"]) if row["verdict_json"] else None,
    )
