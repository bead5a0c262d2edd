"""The central SQLite file: one connection, its schema migrations, and its transactions.

The registry and the case store share this file so that ``central add-device`` and a running
server see the same devices. Settings follow the device's store (``triage_app.store``): WAL so
readers never block the writer, ``synchronous=FULL`` so a commit that answered 201 survives a
power cut, every write in ``BEGIN IMMEDIATE``. The server's request threads and its verdict
worker share one connection behind a lock; other processes (the CLI) open their own.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import Self

from triage_app.errors import StoreError
from triage_app.sqlite_wal import enable_wal

log = logging.getLogger(__name__)

_BUSY_TIMEOUT_S = 10.0

# Forward migrations: entry ``i`` takes a file from ``PRAGMA user_version`` ``i`` to ``i + 1``.
# Append new steps, never edit released ones.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE devices (
            device_id      TEXT PRIMARY KEY,
            public_key_b64 TEXT NOT NULL UNIQUE,
            label          TEXT NOT NULL,
            added_at       TEXT NOT NULL,
            revoked_at     TEXT
        )
        """,
        """
        CREATE TABLE cases (
            case_id          TEXT PRIMARY KEY,
            device_id        TEXT NOT NULL REFERENCES devices (device_id),
            envelope_id      TEXT NOT NULL,
            payload_sha256   TEXT NOT NULL,
            payload_bytes    INTEGER NOT NULL,
            server_key_id    TEXT NOT NULL,
            created_at       TEXT NOT NULL,
            received_at      TEXT NOT NULL,
            last_received_at TEXT NOT NULL,
            deliveries       INTEGER NOT NULL
        )
        """,
        "CREATE INDEX cases_by_received ON cases (received_at)",
        # Every envelope id ever accepted, so that one replayed for another case is refused.
        """
        CREATE TABLE envelopes (
            envelope_id TEXT PRIMARY KEY,
            case_id     TEXT NOT NULL REFERENCES cases (case_id),
            received_at TEXT NOT NULL
        )
        """,
        """
        CREATE TABLE verdicts (
            case_id            TEXT PRIMARY KEY REFERENCES cases (case_id),
            verdict            TEXT NOT NULL,
            score              REAL NOT NULL,
            probabilities_json TEXT NOT NULL,
            model_name         TEXT NOT NULL,
            model_version      TEXT NOT NULL,
            model_sha256       TEXT NOT NULL,
            decided_at         TEXT NOT NULL
        )
        """,
        # A case the central model cannot read: answered with this code instead of "pending".
        """
        CREATE TABLE verdict_failures (
            case_id TEXT PRIMARY KEY REFERENCES cases (case_id),
            code    TEXT NOT NULL,
            message TEXT NOT NULL,
            at      TEXT NOT NULL
        )
        """,
    ),
)


@contextmanager
def sqlite_errors(what: str) -> Iterator[None]:
    """Turn ``sqlite3.Error`` into a one-line :class:`StoreError` saying what failed."""
    try:
        yield
    except sqlite3.Error as exc:
        raise StoreError(f"central store: could not {what}: {exc}") from exc


class CentralDB:
    """The central database file; thread-safe (one lock around one connection)."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        """Wrap an already configured connection; use :meth:`open` instead."""
        self._conn = conn
        self._lock = threading.RLock()
        self.path = path

    @classmethod
    def open(cls, path: Path) -> CentralDB:
        """Open (or create, 0600 in a 0700 folder) the database and migrate its schema."""
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with suppress(FileExistsError):
                path.touch(mode=0o600, exist_ok=False)
        except OSError as exc:
            raise StoreError(f"central store: could not create {path}: {exc}") from exc
        with sqlite_errors(f"open {path}"):
            conn = sqlite3.connect(
                path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            try:
                conn.row_factory = sqlite3.Row
                mode = enable_wal(conn, _BUSY_TIMEOUT_S)
                if mode != "wal":
                    raise StoreError(f"central store: {path} cannot use WAL mode (got {mode!r})")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
                db = cls(conn, path)
                db._migrate()
            except BaseException:
                conn.close()
                raise
        return db

    def close(self) -> None:
        with self._lock, sqlite_errors("close the database"):
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

    @contextmanager
    def read(self, what: str) -> Iterator[sqlite3.Connection]:
        """The connection for reads, held by this thread until the block ends."""
        with self._lock, sqlite_errors(what):
            yield self._conn

    @contextmanager
    def write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction; commits at the end, rolls back on any error."""
        with self._lock, sqlite_errors(what):
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                # SQLite may already have rolled back by itself (e.g. disk full).
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    @property
    def schema_version(self) -> int:
        with self.read("read the schema version") as conn:
            version: int = conn.execute("PRAGMA user_version").fetchone()[0]
        return version

    def _migrate(self) -> None:
        target = len(_MIGRATIONS)
        while True:
            with self.write("migrate the schema") as conn:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > target:
                    raise StoreError(
                        f"central store: schema version {version} is newer than this server "
                        f"supports ({target}); upgrade the server"
                    )
                if version == target:
                    return
                for statement in _MIGRATIONS[version]:
                    conn.execute(statement)
                # PRAGMA takes no parameters; version is an int from SQLite itself.
                conn.execute(f"PRAGMA user_version = {version + 1}")
            log.info("central store schema migrated to version %d", version + 1)
