"""Link, queue and disk figures for the status bar, read off the UI thread every two seconds.

A poller object lives in its own thread (as the worklist's does): it owns an outbox and a case
store connection (SQLite connections belong to their thread), takes a snapshot of the uploader's
connectivity state and checks the free disk space, and hands one :class:`StatusReading` to the
UI thread. The text of each segment (and its tooltip) comes from plain functions, so the wording
is tested without a window.

The queue segment counts what the outbox holds (cases still to send) *and* what only the case
store knows: cases held on the device and delivered cases still waiting for their central
verdict. The outbox alone said "0 waiting" while cases were held, which reads as "nothing
pending". The case counts are one ``GROUP BY state`` over the state index (no case record
is read).
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
from triage_app.states import CaseState
from triage_app.store import CaseStore

__all__ = [
    "ConnectivitySource",
    "QtStatusMonitor",
    "StatusReading",
    "disk_text",
    "error_tooltip",
    "link_text",
    "link_tooltip",
    "queue_text",
    "queue_tooltip",
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
    #: Cases kept on the device (``escalation_held``); None when the case store was unreadable.
    held: int | None = None
    #: Delivered cases whose central verdict has not come back yet (``delivered``).
    awaiting_verdict: int | None = None


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _clock(moment: datetime) -> str:
    return moment.astimezone().strftime("%H:%M")


def link_text(reading: StatusReading) -> tuple[str, str]:
    """(online/offline segment, error segment), worded for a clinician.

    The error segment says what an outage means for the cases; the technical line (code,
    origin, reason) is in :func:`error_tooltip`, for whoever fixes the link.
    """
    snap = reading.connectivity
    if not reading.central_configured and snap is None:
        return "No central server: escalations are held on this device", ""
    if snap is None or snap.online is None:
        return "Central: connecting…", ""
    if snap.online:
        return "● Online", ""
    since = snap.offline_since
    duration = "" if since is None else f" ({_age((reading.at - since).total_seconds())})"
    when = "" if since is None else f" since {_clock(since)}"
    if snap.last_error_code == "certificate_pin_mismatch":
        error = (
            f"Central server not trusted{when} (its certificate changed) — nothing is sent;"
            " cases wait here. Tell your administrator"
        )
    else:
        error = f"Central server unreachable{when} — cases wait and will be sent automatically"
    return f"○ Offline{duration}", error


def link_tooltip(reading: StatusReading) -> str:
    """The exact times the short link segment leaves out."""
    snap = reading.connectivity
    if not reading.central_configured and snap is None:
        return "No central server is configured: escalated cases stay on this device."
    if snap is not None and snap.online is False:
        if snap.offline_since is None:
            return "Central server offline"
        return f"Central server offline since {snap.offline_since.astimezone():%Y-%m-%d %H:%M:%S}"
    if snap is None or snap.last_success_at is None:
        return ""
    return f"Central server last answered at {snap.last_success_at.astimezone():%H:%M:%S}"


def error_tooltip(reading: StatusReading) -> str:
    """The technical line behind the error segment: "<code>: <origin and reason>", attempts."""
    snap = reading.connectivity
    if snap is None or snap.online is not False:
        return ""
    lines = [f"Last error: {snap.last_error or 'unknown'}"]
    if snap.consecutive_failures > 1:
        lines.append(f"{snap.consecutive_failures:,} failed attempts in a row")
    return "\n".join(lines)


def queue_text(reading: StatusReading) -> str:
    """Each non-zero group of escalated cases not finished yet, or "nothing pending".

    Held and awaiting-verdict cases are counted too: "0 waiting" next to held cases reads as
    "nothing pending" to a clinician.
    """
    if reading.queue_error is not None:
        return f"Escalations unavailable: {reading.queue_error}"
    status = reading.queue
    if status is None:
        return ""
    groups = []
    if reading.held:
        groups.append(f"{reading.held:,} held on device")
    if reading.awaiting_verdict:
        groups.append(f"{reading.awaiting_verdict:,} awaiting verdict")
    to_send = status.pending + status.in_flight
    if to_send:
        oldest = status.oldest_pending_age_s
        age = "" if oldest is None else f" (oldest {_age(oldest)})"
        groups.append(f"{to_send:,} to send{age}")
    if status.quarantined:
        groups.append(f"⚠ {status.quarantined:,} refused")
    if status.full:
        groups.append("⚠ FULL: new escalations refused")
    return "Escalations: " + (" · ".join(groups) or "nothing pending")


def queue_tooltip(reading: StatusReading) -> str:
    """One line per group, with why cases are held and how full the outbox is."""
    status = reading.queue
    if reading.queue_error is not None or status is None:
        return queue_text(reading)
    held = "unknown (case store unreadable)" if reading.held is None else f"{reading.held:,}"
    if not reading.central_configured:
        held += " — no central server is configured"
    elif reading.held:
        held += " — sent once the central server's keys are known and the outbox has room"
    awaiting = "unknown" if reading.awaiting_verdict is None else f"{reading.awaiting_verdict:,}"
    oldest = status.oldest_pending_age_s
    lines = [
        f"Held on this device: {held}",
        f"Delivered, awaiting the central verdict: {awaiting}",
        f"To send: {status.pending + status.in_flight:,}"
        + ("" if oldest is None else f" (oldest waiting {_age(oldest)})"),
        f"Refused by the central server: {status.quarantined:,}",
        f"Outbox: {status.queued_bytes / _MB:,.1f} of {status.quota_bytes / _MB:,.0f} MB"
        + (" — FULL: new escalations are held" if status.full else ""),
    ]
    return "\n".join(lines)


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
        self._store: CaseStore | None = None

    def poll(self) -> None:
        queue: OutboxStatus | None = None
        error: str | None = None
        counts: dict[str, int] = {}
        try:
            if self._outbox is None:
                self._outbox = open_outbox(self._settings)
            queue = self._outbox.status()
            if self._store is None:
                self._store = CaseStore.open(self._settings.case_store_path)
            counts = self._store.counts_by_state()
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
                held=counts.get(CaseState.ESCALATION_HELD),
                awaiting_verdict=counts.get(CaseState.DELIVERED),
            )
        )

    def close(self) -> None:
        if self._outbox is not None:
            outbox, self._outbox = self._outbox, None
            try:
                outbox.close()
            except TriageError as err:
                log.warning("status: could not close the outbox: %s", err.message)
        if self._store is not None:
            store, self._store = self._store, None
            try:
                store.close()
            except TriageError as err:
                log.warning("status: could not close the case store: %s", err.message)


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
