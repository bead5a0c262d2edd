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

import logging
import signal
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from types import FrameType, TracebackType

from triage_app.config import Settings
from triage_app.errors import StoreError, TriageError
from triage_app.escalation.background import BackgroundUploader
from triage_app.escalation.connectivity import ConnectivitySnapshot
from triage_app.escalation.outbox import OutboxStatus
from triage_app.escalation.queueing import EscalationQueue
from triage_app.escalation.server_keys import load_central_keys
from triage_app.escalation.service import EscalationLink, open_escalation
from triage_app.held_release import ReleaseOutcome, Triage, lazy_triage, release_held
from triage_app.intake import FiledOutcome, Unfiled
from triage_app.metrics import (
    HealthCheck,
    Heartbeat,
    HeldFigures,
    MetricsServer,
    QueueFigures,
    RecordStreak,
    ServiceMetrics,
    alive_check,
    disk_check,
    heartbeat_check,
    held_check,
    link_check,
    queue_check,
    sd_notify,
    store_check,
)
from triage_app.states import CaseState
from triage_app.store import CaseStore

log = logging.getLogger(__name__)

# How often the loop looks for server keys the uploader has fetched, and refreshes the queue
# figures that metrics and health read (their HTTP thread must not touch SQLite).
_KEYS_RECHECK_S = 5.0
_STATUS_REFRESH_S = 2.0
# How often held cases are looked for when nothing has signalled that they can go now.
_RELEASE_EVERY_S = 60.0
# Held cases a release leaves held for a reason only a human can fix; tried again next start
# (a larger quota, too, takes a restart to apply).
_PARKED = frozenset(
    {
        ReleaseOutcome.SOURCE_UNAVAILABLE,
        ReleaseOutcome.DECISION_CHANGED,
        ReleaseOutcome.EXCEEDS_QUOTA,
    }
)
# Health: a loop silent this long is stuck (systemd's watchdog restarts it after 60 s); a case
# waiting this long, or a link down this long, makes the service "degraded".
_LOOP_STUCK_S = 30.0
_QUEUE_OLD_S = 3600.0
_OFFLINE_LONG_S = 300.0
# Health: a file whose outcome cannot be recorded is tried again after the intake's back-off
# (1 s, doubling), each try waiting out the store's 10 s busy timeout: three in a row is half a
# minute without one case recorded, longer than any transient lock (a GUI's write takes
# milliseconds). Two minutes bounds it however the tries are spaced. Then "failing". A file the
# service may not read or take out of the inbox is that file's problem, not the store's: it is
# quarantined, or waits on its own (intake.Unfiled.STUCK), and is never counted here.
_RECORD_FAILURES_FAILING = 3
_RECORD_STUCK_S = 120.0
# Health: a held case goes within a minute of the keys becoming known or the outbox making
# room; one held longer than an unsent case may wait (_QUEUE_OLD_S) is not leaving by itself
# (keys never fetched, its image gone): "degraded". Only with a central server: without one,
# held is where every escalation stays.
_HELD_OLD_S = _QUEUE_OLD_S


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
        self.record_streak = RecordStreak()
        # The case store may live on a file system of its own (paths.case_store).
        stores = {"data": settings.data_dir, "store": settings.case_store_path.parent}
        self.metrics = ServiceMetrics(
            queue_status=self._queue_figures,
            link_status=self.connectivity,
            held_status=self.held_figures,
            disk_paths={**stores, **(disk_paths or {})},
        )
        self.checks: dict[str, HealthCheck] = {
            "loop": heartbeat_check(self.heartbeat, _LOOP_STUCK_S),
            "disk": disk_check(stores, settings.receiver_min_free_bytes),
            "store": store_check(self.record_streak, _RECORD_FAILURES_FAILING, _RECORD_STUCK_S),
            "queue": queue_check(self._queue_figures, _QUEUE_OLD_S),
            "link": link_check(self.connectivity, _OFFLINE_LONG_S),
        }
        self._server = (
            MetricsServer(
                self.metrics,
                self.checks,
                metrics_port,
                setting=_port_setting(settings, metrics_port),
            )
            if metrics_port
            else None
        )
        self._keys_checked_at = 0.0
        self._status_at = 0.0
        self._status: OutboxStatus | None = None
        self._held: HeldFigures | None = None
        self._held_unreadable = False  # warned once per streak of failed reads
        self._status_lock = threading.Lock()
        self._store: CaseStore | None = None
        self._release_at = 0.0  # time.monotonic() of the next release; 0: the first tick
        self._release_triage: Triage | None = None  # kept while a backlog is released
        self._parked: set[str] = set()
        self._full_bytes: int | None = None  # queued bytes when a release found no room

    def __enter__(self) -> ServiceRuntime:
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)  # what did start (the uploader thread) stops
            raise
        return self

    def _start(self) -> None:
        # Fetched now if the server answers, so the first cases are queued, not held.
        self.link = open_escalation(self.settings)
        # Held cases are counted for metrics (and released, with a server) from the store.
        self._store = CaseStore.open(self.settings.case_store_path)
        if self.link is not None:
            self.checks["held"] = held_check(self.held_figures, _HELD_OLD_S)
        if self.link is not None and self._with_uploader:
            uploader = self.uploader = BackgroundUploader(self.settings)
            uploader.start()
            # Escalations wait for this thread: /health is failing once it is gone.
            self.checks["uploader"] = alive_check(lambda: uploader.running, "uploader thread")
        self.refresh(force=True)
        if self._server is not None:
            self._server.start()

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
        """Count a filed file, timed from its arrival (the service sets ``submitted_at`` to
        when it first saw the file: the file's own time may be its writer's, years old), or a
        file left for a retry because its outcome could not be recorded or filed. A file stuck
        in the inbox by its own permissions is not a failure to record: the "store" check
        never hears of it."""
        if filed.unfiled is Unfiled.RETRY:
            self.metrics.record_failures.labels(code=filed.retry_code or "unknown").inc()
            self.record_streak.failed()
            return
        if filed.filed_as is None:
            return
        self.record_streak.recorded()
        processing_s = max(0.0, filed.finished_at - filed.submitted_at)
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
        longer escalates it, it is larger than the whole outbox quota) is not tried again until
        the next start or ``queue release``;
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
            # Cases left to try, or, with the outbox full, to size (one larger than the whole
            # quota is found only so): the next tick goes on before waiting for room.
            self._release_at = 0.0
        elif report.waiting_for_room:
            self._full_bytes = queue.outbox.status().queued_bytes
        if report.cases:
            log.info("held cases: %s", report.headline())

    def refresh(self, *, force: bool = False) -> None:
        """Read the queue and held figures again (call it from the triage thread, every tick)."""
        now = time.monotonic()
        if not force and now - self._status_at < _STATUS_REFRESH_S:
            return
        self._status_at = now
        held = self._read_held()
        if held is not None:
            with self._status_lock:
                self._held = held
        if self.link is None:
            return
        status = self.link.outbox.status()
        with self._status_lock:
            self._status = status
        if self._full_bytes is not None and status.queued_bytes < self._full_bytes:
            self._full_bytes = None  # a delivery made room: held cases may go now
            self._release_at = 0.0

    def _read_held(self) -> HeldFigures | None:
        """Count the held cases (an indexed query); None, keeping the last figures, when the
        store cannot be read now."""
        store = self._store
        if store is None:
            return None
        try:
            ids = store.case_ids(CaseState.ESCALATION_HELD)
            oldest = store.get(ids[0]) if ids else None
        except StoreError as err:
            if not self._held_unreadable:
                log.warning("held cases cannot be counted now (%s)", err.code)
            self._held_unreadable = True
            return None
        if self._held_unreadable:
            log.info("held cases can be counted again")
        self._held_unreadable = False
        since = None if oldest is None else datetime.fromisoformat(oldest.created_at)
        return HeldFigures(len(ids), since)

    def held_figures(self) -> HeldFigures | None:
        """The last held figures read by :meth:`refresh`; safe from any thread."""
        with self._status_lock:
            return self._held

    def queue_status(self) -> OutboxStatus | None:
        """The last queue figures read by :meth:`refresh`; safe from any thread."""
        with self._status_lock:
            return self._status

    def connectivity(self) -> ConnectivitySnapshot | None:
        return self.uploader.snapshot() if self.uploader is not None else None

    def _queue_figures(self) -> QueueFigures | None:
        status = self.queue_status()
        return None if status is None else QueueFigures.from_status(status)


def _port_setting(settings: Settings, port: int) -> str:
    """The setting(s) that asked for ``port``, for an error message that says what to change."""
    named = [
        name
        for name, value in (
            ("metrics.watch_port", settings.metrics_watch_port),
            ("metrics.receive_port", settings.metrics_receive_port),
        )
        if value == port
    ]
    return " and ".join(named) or "the metrics port"


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT: the service finishes its current files and exits."""
    stop = threading.Event()

    def _handler(signum: int, _frame: FrameType | None) -> None:
        log.info("%s received: finishing the current files", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    return stop
