"""SQLite set-up shared by the case store, the outbox and the central server's database."""

from __future__ import annotations

import sqlite3
import time


def enable_wal(conn: sqlite3.Connection, timeout_s: float) -> str:
    """Switch to WAL and return the journal mode now in force.

    Why the loop: when several processes open a new file at once, SQLite reports "database is
    locked" for this pragma at once instead of calling the busy handler, so we wait ourselves.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            mode: str = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.OperationalError as exc:
            busy = exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if not busy or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)
        else:
            return mode
