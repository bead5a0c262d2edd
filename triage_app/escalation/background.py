"""The uploader in a thread of its own, for the GUI, the watch service and the receiver.

SQLite connections and HTTP sessions belong to the thread that made them, so the thread opens
its own outbox, case store and client. When the server's keys are not known yet (the server
was never reachable), it keeps asking for them with backoff instead of giving up: cases stay
held or queued, and the connectivity state says why.

Nothing that goes wrong ends the thread before it is stopped: an error it does not expect
(a damaged key file, a database it cannot open, a full disk) is logged as an ALARM, and the
thread starts over after a backoff. Whether it is alive is :attr:`BackgroundUploader.running`,
which the services' health check reports.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from triage_app.config import Settings
from triage_app.errors import ConfigError, TransportError
from triage_app.escalation.backoff import backoff_ceiling, full_jitter_delay
from triage_app.escalation.connectivity import ConnectivitySnapshot, ConnectivityState
from triage_app.escalation.server_keys import fetch_central_keys
from triage_app.escalation.service import EscalationLink, open_escalation
from triage_app.escalation.transport import http_status_of
from triage_app.escalation.uploader import describe_failure

log = logging.getLogger(__name__)


class BackgroundUploader:
    """Start it once; ``stop()`` lets the attempt in progress finish and joins the thread."""

    def __init__(
        self, settings: Settings, *, on_keys: Callable[[EscalationLink], None] | None = None
    ) -> None:
        """``on_keys`` runs in the thread once the server's keys are known, before the first
        delivery (the desktop app queues the cases it held until then); again if the thread
        has to start over."""
        self._settings = settings
        self._on_keys = on_keys
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="uploader", daemon=True)
        self.connectivity = ConnectivityState()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 30.0, *, may_abandon: bool = False) -> None:
        """``may_abandon``: the process is about to exit (the desktop app closing), so an upload
        still running after ``timeout_s`` is left to die with it. That is safe: its lease runs
        out, the case is sent again at the next start, and the server answers a repeat with
        the receipt it already gave."""
        self._stop.set()
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            return
        if may_abandon:
            log.info("an upload still running was left; it is sent again at the next start")
        else:
            log.error("the uploader did not stop within %.0f s", timeout_s)

    @property
    def running(self) -> bool:
        """Whether the uploader thread is alive (false before ``start``, after ``stop``, or
        when it ended because no central server is configured)."""
        return self._thread.is_alive()

    def snapshot(self) -> ConnectivitySnapshot:
        return self.connectivity.snapshot()

    def _run(self) -> None:
        """Serve until stopped, starting over after anything unexpected (see the module)."""
        failures = 0
        while not self._stop.is_set():
            try:
                self._serve()
                return  # stopped, or no central server to serve
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any one failure
                delay = backoff_ceiling(failures, cap_s=self._settings.retry_cap_s)
                failures += 1
                log.error(
                    "ALARM: the uploader failed (%s); starting over in %.0f s",
                    describe_failure(exc),
                    delay,
                )
                self._stop.wait(delay)

    def _serve(self) -> None:
        """Open the link, learn the server's keys, deliver until stopped."""
        link = open_escalation(self._settings, fetch_keys=False)
        if link is None:
            log.info("no central server configured: the uploader does not run")
            return
        with link:
            attempt = 0
            while link.keys is None and not self._stop.is_set():
                try:
                    link.keys = fetch_central_keys(link.client, self._settings.data_dir)
                except TransportError as err:
                    now = datetime.now(UTC)
                    if http_status_of(err) is None:
                        self.connectivity.mark_failure(err.code, err.message, now)
                    else:  # it answered: the link works, the server is not ready
                        self.connectivity.mark_success(now)
                except (ConfigError, OSError) as err:
                    log.error(
                        "ALARM: the central server's keys cannot be used or kept (%s)",
                        describe_failure(err),
                    )
                else:
                    break
                delay = full_jitter_delay(attempt, cap_s=self._settings.retry_cap_s)
                attempt += 1
                self._stop.wait(delay)
            if self._stop.is_set():
                return
            if self._on_keys is not None:
                self._on_keys(link)
            uploader = link.uploader()
            uploader.connectivity = self.connectivity
            with uploader:
                uploader.run(self._stop)
