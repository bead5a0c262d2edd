"""What the two unattended services share around their loop: the outbox, the uploader
thread, metrics and health, systemd's notifications, and the stop signal.

Both the watch service and the receiver triage in one thread (the case store and outbox
connections belong to it) while the uploader delivers in its own. New escalations are queued as
soon as the central server's keys are known: the uploader fetches them in the background and
this runtime picks them up from the data folder. Cases held before that, or while the outbox
was full, are released from the same thread (``held_release``): at start, right after the keys
become known or deliveries make room, and every minute while any are held.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType, TracebackType

from triage_app.config import Settings
from triage_app.errors import TriageError
from triage_app.escalation.background import BackgroundUploader
from triage_app.escalation.connectivity import ConnectivitySnapshot
from triage_app.escalation.outbox import OutboxStatus
from triage_app.escalation.queueing import EscalationQueue
from triage_app.escalation.server_keys import load_central_keys
from triage_app.escalation.service import EscalationLink, open_escalation
from triage_app.held_release import ReleaseOutcome, Triage, lazy_triage, release_held
from triage_app.intake import FiledOutcome
from triage_app.metrics import (
    HealthCheck,
    Heartbeat,
    MetricsServer,
    QueueFigures,
    ServiceMetrics,
    alive_check,
    disk_check,
    heartbeat_check,
    link_check,
    queue_check,
    sd_notify,
)
from triage_app.store import CaseStore

log = logging.getLogger(__name__)

# How often the loop looks for server keys the uploader has fetched, and refreshes the queue
# figures that metrics and health read (their HTTP thread must not touch SQLite).
_KEYS_RECHECK_S = 5.0
_STATUS_REFRESH_S = 2.0
# How often held cases are looked for when nothing has signalled that they can go now.
_RELEASE_EVERY_S = 60.0
# Held cases a release leaves held for a reason only a human can fix; tried again next start.
_PARKED = frozenset({ReleaseOutcome.SOURCE_UNAVAILABLE, ReleaseOutcome.DECISION_CHANGED})
# Health: a loop silent this long is stuck (systemd's watchdog restarts it after 60 s); a case
# waiting this long, or a link down this long, makes the service "degraded".
_LOOP_STUCK_S = 30.0
_QUEUE_OLD_S = 3600.0
_OFFLINE_LONG_S = 300.0


class ServiceRuntime:
    """Enter it in the service's triage thread; it starts the uploader when a central server
    is configured and stops it on exit."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics_port: int = 0,
        disk_paths: Mapping[str, Path] | None = None,
        uploader: bool = True,
    ) -> None:
        self.settings = settings
        self._with_uploader = uploader
        self.link: EscalationLink | None = None
        self.uploader: BackgroundUploader | None = None
        self.heartbeat = Heartbeat()
        self.metrics = ServiceMetrics(
            queue_status=self._queue_figures,
            link_status=self.connectivity,
            disk_paths={"data": settings.data_dir, **(disk_paths or {})},
        )
        self.checks: dict[str, HealthCheck] = {
            "loop": heartbeat_check(self.heartbeat, _LOOP_STUCK_S),
            "disk": disk_check(settings.data_dir, settings.receiver_min_free_bytes),
            "queue": queue_check(self._queue_figures, _QUEUE_OLD_S),
            "link": link_check(self.connectivity, _OFFLINE_LONG_S),
        }
        self._server = (
            MetricsServer(self.metrics, self.checks, metrics_port) if metrics_port else None
        )
        self._keys_checked_at = 0.0
        self._status_at = 0.0
        self._status: OutboxStatus | None = None
        self._status_lock = threading.Lock()
        self._store: CaseStore | None = None
        self._release_at = 0.0  # time.monotonic() of the next release; 0: the first tick
        self._release_triage: Triage | None = None  # kept while a backlog is released
        self._parked: set[str] = set()
        self._full_bytes: int | None = None  # queued bytes when a release found no room

    def __enter__(self) -> ServiceRuntime:
        # Fetched now if the server answers, so the first cases are queued, not held.
        self.link = open_escalation(self.settings)
        if self.link is not None:
            self._store = CaseStore.open(self.settings.case_store_path)
        if self.link is not None and self._with_uploader:
            uploader = self.uploader = BackgroundUploader(self.settings)
            uploader.start()
            # Escalations wait for this thread: /health is failing once it is gone.
            self.checks["uploader"] = alive_check(lambda: uploader.running, "uploader thread")
        self.refresh(force=True)
        if self._server is not None:
            self._server.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        sd_notify("STOPPING=1")
        if self.uploader is not None:
            self.uploader.stop()
        if self._server is not None:
            self._server.stop()
        if self._store is not None:
            self._store.close()
        if self.link is not None:
            self.link.close()

    def ready(self) -> None:
        """Tell systemd the service is up (its units are ``Type=notify``)."""
        sd_notify("READY=1")

    def tick(self) -> None:
        """Once per loop turn: proof of life for health and systemd's watchdog, fresh figures."""
        self.heartbeat.tick()
        self.refresh()
        self.release_held()

    def filed(self, filed: FiledOutcome) -> None:
        """Count a filed file; its age is the time since it was written (dropped or received)."""
        processing_s = None
        if filed.filed_as is not None:
            with contextlib.suppress(FileNotFoundError):
                processing_s = max(0.0, time.time() - filed.filed_as.stat().st_mtime)
        self.metrics.observe(filed.outcome, processing_s=processing_s)

    def queue(self) -> EscalationQueue | None:
        """The outbox to seal escalated cases into; None holds them (no server, or no keys)."""
        link = self.link
        if link is None:
            return None
        now = time.monotonic()
        if link.keys is None and now - self._keys_checked_at >= _KEYS_RECHECK_S:
            self._keys_checked_at = now
            link.keys = load_central_keys(
                self.settings.data_dir,
                server_public_key=self.settings.server_public_key,
                receipt_public_key=self.settings.receipt_public_key,
            )
            if link.keys is not None:
                log.info("central server keys known: escalated cases are queued from now on")
                self._release_at = 0.0  # and the ones held so far go now
        return link.queue

    def release_held(self) -> None:
        """Queue the cases held so far, a batch per call, when they may go (see the module).

        A case left held for a reason only a human can fix (its file is gone, re-triage no
        longer escalates it) is not tried again until the next start or ``queue release``;
        while the outbox is full, only a delivery that frees room starts the next try. With
        nothing held it costs one indexed query a minute.
        """
        queue = self.queue()  # first: it notices keys that have become known
        store = self._store
        now = time.monotonic()
        if queue is None or store is None or self._full_bytes is not None:
            return
        if now < self._release_at:
            return
        self._release_at = now + _RELEASE_EVERY_S
        triage = self._release_triage or lazy_triage(self.settings)
        try:
            report = release_held(store, queue, triage, skip=self._parked)
        except TriageError as err:
            log.error("held cases could not be released (%s): %s", err.code, err)
            return
        self._parked.update(c.case_id for c in report.cases if c.outcome in _PARKED)
        # The model stays loaded only while a backlog is being worked through.
        self._release_triage = triage if report.more else None
        if report.more:
            self._release_at = 0.0
        if report.waiting_for_room:
            self._full_bytes = queue.outbox.status().queued_bytes
        if report.cases:
            log.info("held cases: %s", report.headline())

    def refresh(self, *, force: bool = False) -> None:
        """Read the queue figures again (call it from the triage thread, every tick)."""
        now = time.monotonic()
        if self.link is None or (not force and now - self._status_at < _STATUS_REFRESH_S):
            return
        self._status_at = now
        status = self.link.outbox.status()
        with self._status_lock:
            self._status = status
        if self._full_bytes is not None and status.queued_bytes < self._full_bytes:
            self._full_bytes = None  # a delivery made room: held cases may go now
            self._release_at = 0.0

    def queue_status(self) -> OutboxStatus | None:
        """The last queue figures read by :meth:`refresh`; safe from any thread."""
        with self._status_lock:
            return self._status

    def connectivity(self) -> ConnectivitySnapshot | None:
        return self.uploader.snapshot() if self.uploader is not None else None

    def _queue_figures(self) -> QueueFigures | None:
        status = self.queue_status()
        return None if status is None else QueueFigures.from_status(status)


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT: the service finishes its current files and exits."""
    stop = threading.Event()

    def _handler(signum: int, _frame: FrameType | None) -> None:
        log.info("%s received: finishing the current files", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    return stop
