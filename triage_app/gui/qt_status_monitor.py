"""Link, queue and disk figures for the status bar, read off the UI thread every two seconds.

A poller object lives in its own thread (as the worklist's does): it owns an outbox connection
(SQLite connections belong to their thread), takes a snapshot of the uploader's connectivity
state and checks the free disk space, and hands one :class:`StatusReading` to the UI thread.
The text of each segment comes from plain functions, so the wording is tested without a window.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from PySide6.QtCore import QObject, Signal
from PySide6.QtWidgets import QWidget

from triage_app.config import Settings
from triage_app.errors import TriageError
from triage_app.escalation.connectivity import ConnectivitySnapshot
from triage_app.escalation.outbox import Outbox, OutboxStatus
from triage_app.escalation.service import open_outbox
from triage_app.gui.qt_threading import QtPoller

__all__ = [
    "ConnectivitySource",
    "QtStatusMonitor",
    "StatusReading",
    "disk_text",
    "link_text",
    "queue_text",
]

log = logging.getLogger(__name__)

POLL_INTERVAL_MS = 2000
ConnectivitySource = Callable[[], ConnectivitySnapshot | None]
_MB = 1024 * 1024


@dataclass(frozen=True)
class StatusReading:
    """One reading of everything the status bar shows about the device's health."""

    at: datetime
    central_configured: bool
    connectivity: ConnectivitySnapshot | None
    queue: OutboxStatus | None
    queue_error: str | None
    free_bytes: int | None
    min_free_bytes: int


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def link_text(reading: StatusReading) -> tuple[str, str]:
    """(online/offline segment, last error segment)."""
    snap = reading.connectivity
    if not reading.central_configured and snap is None:
        return "Central: none configured (escalations held)", ""
    if snap is None or snap.online is None:
        return "Central: connecting…", ""
    if snap.online:
        return "● Online", ""
    since = snap.offline_since
    if since is None:
        return "○ Offline", snap.last_error or ""
    when = since.astimezone().strftime("%H:%M:%S")
    duration = _age((reading.at - since).total_seconds())
    return f"○ Offline since {when} ({duration})", f"Last error: {snap.last_error or 'unknown'}"


def queue_text(reading: StatusReading) -> str:
    if reading.queue_error is not None:
        return f"Queue unavailable: {reading.queue_error}"
    status = reading.queue
    if status is None:
        return ""
    waiting = status.pending + status.in_flight
    text = f"Queue: {waiting:,} waiting"
    if status.oldest_pending_age_s is not None and waiting:
        text += f", oldest {_age(status.oldest_pending_age_s)}"
    if status.quarantined:
        text += f" · ⚠ {status.quarantined:,} refused"
    if status.full:
        text += " · ⚠ FULL: new escalations refused"
    return text


def disk_text(reading: StatusReading) -> str:
    """Empty while there is room; an alarm below the receiver's reserve."""
    if reading.free_bytes is None or reading.free_bytes >= reading.min_free_bytes:
        return ""
    return (
        f"⚠ Disk low: {reading.free_bytes // _MB:,} MB free "
        f"(reserve {reading.min_free_bytes // _MB:,} MB)"
    )


def _free_bytes(path: Path) -> int | None:
    """Free space on the file system holding ``path`` (or its nearest existing parent)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


class _StatusPoller(QObject):
    """Lives in the monitor's thread; opens the outbox there on first use."""

    read = Signal(object)  # StatusReading

    def __init__(self, settings: Settings, connectivity: ConnectivitySource | None) -> None:
        super().__init__()
        self._settings = settings
        self._connectivity = connectivity
        self._outbox: Outbox | None = None

    def poll(self) -> None:
        queue: OutboxStatus | None = None
        error: str | None = None
        try:
            if self._outbox is None:
                self._outbox = open_outbox(self._settings)
            queue = self._outbox.status()
        except TriageError as err:
            error = err.message
            self.close()
        self.read.emit(
            StatusReading(
                at=datetime.now(UTC),
                central_configured=self._settings.central_url is not None,
                connectivity=None if self._connectivity is None else self._connectivity(),
                queue=queue,
                queue_error=error,
                free_bytes=_free_bytes(self._settings.data_dir),
                min_free_bytes=self._settings.receiver_min_free_bytes,
            )
        )

    def close(self) -> None:
        if self._outbox is not None:
            outbox, self._outbox = self._outbox, None
            try:
                outbox.close()
            except TriageError as err:
                log.warning("status: could not close the outbox: %s", err.message)


class QtStatusMonitor(QObject):
    """Emits :attr:`updated` with a fresh reading every two seconds (and on :meth:`refresh`)."""

    updated = Signal(object)  # StatusReading

    def __init__(
        self,
        settings: Settings,
        connectivity: ConnectivitySource | None,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.last: StatusReading | None = None
        reader = _StatusPoller(settings, connectivity)
        reader.read.connect(self._apply)
        self._poller = QtPoller(reader, "status-poller", POLL_INTERVAL_MS, self)
        self.refresh()

    def refresh(self) -> None:
        self._poller.refresh()

    def stop(self) -> None:
        self._poller.stop()

    def _apply(self, reading: StatusReading) -> None:
        self._poller.ready()
        self.last = reading
        self.updated.emit(reading)
