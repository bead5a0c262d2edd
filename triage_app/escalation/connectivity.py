"""Whether the central server is reachable, as seen by the uploader.

The uploader thread writes this state after every attempt; the GUI, the CLI status command and
the health output read it from other threads. A lock makes each update and each snapshot
atomic, so a reader never sees, say, ``online=True`` together with an ``offline_since`` from the
outage that just ended.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class ConnectivitySnapshot:
    """One consistent reading of the connectivity state.

    ``online`` is ``None`` until the first attempt: "unknown" is not "offline". ``offline_since``
    is the time of the first failure after the last success (``None`` while online).
    ``last_error`` (``"<code>: <message>"``) describes the current outage and is cleared by a
    success, so a stale error is never shown next to a healthy link.
    """

    online: bool | None
    offline_since: datetime | None
    last_error: str | None
    last_error_code: str | None
    last_success_at: datetime | None
    last_failure_at: datetime | None
    consecutive_failures: int


class ConnectivityState:
    """Thread-safe record of successes and failures talking to the central server."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._online: bool | None = None
        self._offline_since: datetime | None = None
        self._last_error: str | None = None
        self._last_error_code: str | None = None
        self._last_success_at: datetime | None = None
        self._last_failure_at: datetime | None = None
        self._consecutive_failures = 0

    def mark_success(self, now: datetime) -> None:
        """The server answered (any answer that proves the link works, including a rejection)."""
        with self._lock:
            self._online = True
            self._offline_since = None
            self._last_error = None
            self._last_error_code = None
            self._last_success_at = now
            self._consecutive_failures = 0

    def mark_failure(self, error_code: str, message: str, now: datetime) -> None:
        """The server could not be reached or did not answer usefully.

        Only the first failure of an outage sets ``offline_since``; later ones keep it, so the
        GUI can say for how long the device has been offline.
        """
        one_line = " ".join(message.split())
        with self._lock:
            if self._online is not False:
                self._offline_since = now
            self._online = False
            self._last_error = f"{error_code}: {one_line}" if one_line else error_code
            self._last_error_code = error_code
            self._last_failure_at = now
            self._consecutive_failures += 1

    def snapshot(self) -> ConnectivitySnapshot:
        with self._lock:
            return ConnectivitySnapshot(
                online=self._online,
                offline_since=self._offline_since,
                last_error=self._last_error,
                last_error_code=self._last_error_code,
                last_success_at=self._last_success_at,
                last_failure_at=self._last_failure_at,
                consecutive_failures=self._consecutive_failures,
            )
