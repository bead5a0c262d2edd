"""Metrics, health and systemd readiness for the headless services (``watch``, ``receive``).

A service manager and a Prometheus scraper on the same machine must be able to tell whether a
service is doing its job without reading its logs, and without the service exposing anything
to the network: so ``/metrics`` and ``/health`` listen on 127.0.0.1 only. Values that describe
the present (queue depth, link state, disk space) are read when scraped, through callables the
service passes in, so a scrape never shows a figure from the last time a file happened to
arrive, and this module needs nothing from the service but those callables.

Nothing here carries identifying data: labels are decisions, reasons, error codes, the model
and the names the service gives its folders, never paths, case ids or message texts.

The core never imports this module; only the service shells do.
"""

from __future__ import annotations

import functools
import http.client
import json
import logging
import math
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar, cast

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from triage_app.errors import (
    CertificatePinError,
    ConfigError,
    InputError,
    StoreError,
    TriageError,
)
from triage_app.escalation.connectivity import ConnectivitySnapshot
from triage_app.escalation.outbox import OutboxStatus
from triage_app.ordered_pool import WORKER_CRASHED
from triage_app.results import CaseResult, InputOutcome, ModelRef

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: The only address the server binds: metrics and health are for this machine.
HOST = "127.0.0.1"
#: A CPU model answers in about 1 ms (DESIGN 7); 2 s means something is badly wrong.
INFERENCE_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
#: Drop or arrival to result includes settle and study-quiet waits of seconds.
PROCESSING_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


@dataclass(frozen=True)
class QueueFigures:
    """What the metrics and the health check need to know about the outbox."""

    depth: int  # pending and in flight
    oldest_age_s: float | None  # None when nothing waits
    quarantined: int
    queued_bytes: int
    quota_bytes: int

    @property
    def full(self) -> bool:
        return self.queued_bytes >= self.quota_bytes

    @classmethod
    def from_status(cls, status: OutboxStatus) -> QueueFigures:
        return cls(
            depth=status.pending + status.in_flight,
            oldest_age_s=status.oldest_pending_age_s,
            quarantined=status.quarantined,
            queued_bytes=status.queued_bytes,
            quota_bytes=status.quota_bytes,
        )


QueueStatus = Callable[[], QueueFigures | None]
"""Returns the outbox figures, or None when the service has no outbox. Called from the
HTTP server's request threads: it must not share a per-thread object such as an open
:class:`~triage_app.escalation.outbox.Outbox`."""

LinkStatus = Callable[[], ConnectivitySnapshot | None]
"""Returns the uploader's connectivity, or None when no central server is configured."""


@dataclass(frozen=True)
class HeldFigures:
    """The cases held on the device (``escalation_held``): they are in no outbox, so the queue
    figures do not show them, and a server that answers but never gives its keys holds every
    escalation for ever."""

    count: int
    oldest_since: datetime | None  # when the oldest held case was recorded; None: none held

    def oldest_age_s(self) -> float:
        return 0.0 if self.oldest_since is None else _seconds_since(self.oldest_since)


HeldStatus = Callable[[], HeldFigures | None]
"""Returns the held cases' figures, or None when they are not known (yet). Called from the
HTTP server's request threads, like :data:`QueueStatus`."""

# A source that fails is skipped in the scrape (the rest still answers) and logged once
# per failure streak, not at every scrape.
_SOURCE_ERRORS = (TriageError, OSError)


class _LiveCollector(Collector):
    """The gauges read at scrape time from the service's callables."""

    def __init__(
        self,
        queue_status: QueueStatus | None,
        link_status: LinkStatus | None,
        disk_paths: Mapping[str, Path],
        held_status: HeldStatus | None = None,
    ) -> None:
        self._queue_status = queue_status
        self._link_status = link_status
        self._held_status = held_status
        self._disk_paths = dict(disk_paths)
        self._failing: set[str] = set()
        self._lock = threading.Lock()

    def describe(self) -> Iterable[GaugeMetricFamily]:
        # Registration asks for the names; answering without samples keeps it from calling
        # the service's callables before the service has finished starting.
        return self._families()

    def collect(self) -> Iterable[GaugeMetricFamily]:
        families = self._families()
        outbox_depth, oldest, quarantined, queued, quota, online, offline, disk = families[:8]
        held, held_oldest = families[8:]
        figures = self._read("queue", self._queue_status)
        if figures is not None:
            outbox_depth.add_metric([], figures.depth)
            oldest.add_metric([], figures.oldest_age_s or 0.0)
            quarantined.add_metric([], figures.quarantined)
            queued.add_metric([], figures.queued_bytes)
            quota.add_metric([], figures.quota_bytes)
        link = self._read("link", self._link_status)
        if link is not None and link.online is not None:
            online.add_metric([], 1.0 if link.online else 0.0)
            since = link.offline_since
            offline.add_metric([], 0.0 if since is None else _seconds_since(since))
        for folder, path in self._disk_paths.items():
            usage = self._read(f"disk {folder}", functools.partial(shutil.disk_usage, path))
            if usage is not None:
                disk.add_metric([folder], usage.free)
        held_figures = self._read("held cases", self._held_status)
        if held_figures is not None:
            held.add_metric([], held_figures.count)
            held_oldest.add_metric([], held_figures.oldest_age_s())
        return families

    def _read(self, source: str, read: Callable[[], _T | None] | None) -> _T | None:
        if read is None:
            return None
        try:
            value = read()
        except _SOURCE_ERRORS as err:
            with self._lock:
                first = source not in self._failing
                self._failing.add(source)
            if first:
                log.warning("metrics: %s unavailable (%s)", source, _error_code(err))
            return None
        with self._lock:
            recovered = source in self._failing
            self._failing.discard(source)
        if recovered:
            log.info("metrics: %s available again", source)
        return value

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(
                "triage_outbox_depth", "Escalated cases waiting to be sent (pending, in flight)."
            ),
            GaugeMetricFamily(
                "triage_outbox_oldest_age_seconds",
                "How long the oldest unsent case has waited; 0 when nothing waits.",
            ),
            GaugeMetricFamily(
                "triage_outbox_quarantined", "Cases the server refused for good, until retried."
            ),
            GaugeMetricFamily("triage_outbox_bytes", "Bytes of envelopes kept in the outbox."),
            GaugeMetricFamily(
                "triage_outbox_quota_bytes", "Outbox byte quota; new cases are refused at it."
            ),
            GaugeMetricFamily(
                "triage_central_online",
                "1 when the last attempt reached the central server, 0 when it did not; "
                "absent before the first attempt or without a central server.",
            ),
            GaugeMetricFamily(
                "triage_central_offline_seconds",
                "Seconds since the central server was last found unreachable; 0 while online.",
            ),
            GaugeMetricFamily(
                "triage_disk_free_bytes",
                "Free bytes on the file system of each data folder.",
                labels=["folder"],
            ),
            GaugeMetricFamily(
                "triage_held_cases",
                "Escalated cases held on the device (no server keys yet, or a full outbox).",
            ),
            GaugeMetricFamily(
                "triage_held_oldest_age_seconds",
                "How long ago the oldest held case was recorded; 0 when none is held.",
            ),
        )


class _FunctionCounter(Collector):
    def __init__(
        self,
        name: str,
        documentation: str,
        function: Callable[[], float | Mapping[str, float]],
        label: str | None,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._function = function
        self._label = label

    def describe(self) -> Iterable[CounterMetricFamily]:
        return [self._family()]

    def collect(self) -> Iterable[CounterMetricFamily]:
        family = self._family()
        counts = self._function()
        if isinstance(counts, Mapping):
            for label_value, count in counts.items():
                family.add_metric([label_value], count)
        else:
            family.add_metric([], counts)
        return [family]

    def _family(self) -> CounterMetricFamily:
        labels = None if self._label is None else [self._label]
        return CounterMetricFamily(self._name, self._documentation, labels=labels)


def input_failure_codes() -> list[str]:
    """Every code a triaged input can fail with (``FailedInput.code``): the input errors'
    (the pipeline turns anything unexpected into ``processing_failed``, one of them) and a
    worker process that died on the file."""
    codes: set[str] = {WORKER_CRASHED}
    pending = list(InputError.__subclasses__())
    while pending:
        cls = pending.pop()
        codes.add(cls.code)
        pending.extend(cls.__subclasses__())
    return sorted(codes)


class ServiceMetrics:
    """A service's Prometheus metrics, in a registry of its own (never the global one), so
    several services or tests in one process do not collide.

    ``observe`` counts each outcome; the scrape-time figures come from the callables given
    here; ``counter`` and ``gauge`` add a service's own metrics to the same registry.
    """

    def __init__(
        self,
        *,
        queue_status: QueueStatus | None = None,
        link_status: LinkStatus | None = None,
        disk_paths: Mapping[str, Path] | None = None,
        held_status: HeldStatus | None = None,
        model: ModelRef | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.cases = Counter(
            "triage_cases",
            "Triaged images, by decision and the policy's reason.",
            ["decision", "reason"],
            registry=self.registry,
        )
        self.escalations = Counter(
            "triage_escalations",
            "Escalated images, by where they went: queued, held or blocked.",
            ["state"],
            registry=self.registry,
        )
        self.failures = Counter(
            "triage_failures",
            "Inputs refused, by stable error code.",
            ["code"],
            registry=self.registry,
        )
        # Each code an input can be refused with, at 0 from the start (as record_failures): an
        # alert or a rate() on a code has a series before its first failure.
        for code in input_failure_codes():
            self.failures.labels(code=code)
        self.record_failures = Counter(
            "triage_record_failures",
            "Triaged files whose outcome could not be recorded or filed, by what failed: an "
            "error code (store_error: the case store locked, or its disk full) or, when moving "
            "the file failed, an errno name (ENOSPC, EACCES); each stays in the inbox and is "
            "tried again.",
            ["code"],
            registry=self.registry,
        )
        # Shown at 0 from the start, so that an alert on it has a series before the first one.
        self.record_failures.labels(code=StoreError.code)
        self.inference_seconds = Histogram(
            "triage_inference_seconds",
            "Model inference time per image.",
            buckets=INFERENCE_BUCKETS,
            registry=self.registry,
        )
        self.processing_seconds = Histogram(
            "triage_processing_seconds",
            "Time from an image's arrival to its result, waits included.",
            buckets=PROCESSING_BUCKETS,
            registry=self.registry,
        )
        self.model_info = Gauge(
            "triage_model_info",
            "The model in use (value 1).",
            ["name", "version", "sha256"],
            registry=self.registry,
        )
        self._model: ModelRef | None = None
        self._model_lock = threading.Lock()
        if model is not None:
            self.set_model(model)
        self.registry.register(
            _LiveCollector(queue_status, link_status, disk_paths or {}, held_status)
        )

    def observe(self, outcome: InputOutcome, *, processing_s: float | None = None) -> None:
        """Count one outcome; ``processing_s`` is arrival to result as the service saw it."""
        if isinstance(outcome, CaseResult):
            self.cases.labels(decision=outcome.decision, reason=outcome.reason).inc()
            if outcome.escalation is not None:
                self.escalations.labels(state=outcome.escalation.state).inc()
            infer_ms = outcome.timings_ms.get("infer")
            if infer_ms is not None:
                self.inference_seconds.observe(infer_ms / 1e3)
            self.set_model(outcome.model)
        else:
            self.failures.labels(code=outcome.code).inc()
        if processing_s is not None:
            self.processing_seconds.observe(processing_s)

    def set_model(self, model: ModelRef) -> None:
        """Show ``model`` as the one in use (a reload may change it while the service runs)."""
        with self._model_lock:
            if model == self._model:
                return
            self.model_info.clear()
            self.model_info.labels(name=model.name, version=model.version, sha256=model.sha256).set(
                1
            )
            self._model = model

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
        """A service's own counter in this registry (``_total`` is added to the sample)."""
        return Counter(name, documentation, labelnames, registry=self.registry)

    def gauge(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        function: Callable[[], float] | None = None,
    ) -> Gauge:
        """A service's own gauge; with ``function`` (and no labels) it is read at each scrape."""
        if function is not None and labelnames:
            raise ValueError("a gauge read by a function cannot have labels")
        gauge = Gauge(name, documentation, labelnames, registry=self.registry)
        if function is not None:
            gauge.set_function(function)
        return gauge

    def counter_function(
        self,
        name: str,
        documentation: str,
        function: Callable[[], float | Mapping[str, float]],
        *,
        label: str | None = None,
    ) -> None:
        """A counter the service keeps itself (the receiver's own tallies), read at each scrape.

        Without ``label`` ``function`` returns the count; with it, the count by label value.
        """
        self.registry.register(_FunctionCounter(name, documentation, function, label))

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


# --- health --------------------------------------------------------------------------------


class Health(StrEnum):
    """Ordered from best to worst; the service's health is its worst check."""

    OK = "ok"
    DEGRADED = "degraded"  # working, but someone should look (queue ageing, link down)
    FAILING = "failing"  # not doing its job (loop stuck, workers dead, disk low, not recording)


_RANK = {Health.OK: 0, Health.DEGRADED: 1, Health.FAILING: 2}


@dataclass(frozen=True)
class CheckResult:
    status: Health
    detail: str = ""

    def to_json(self) -> dict[str, str]:
        return {"status": self.status.value, "detail": self.detail}


HealthCheck = Callable[[], CheckResult]


def run_checks(checks: Mapping[str, HealthCheck]) -> tuple[Health, dict[str, CheckResult]]:
    """Every check's result and the worst of them; a check that raises counts as failing."""
    results: dict[str, CheckResult] = {}
    for name, check in checks.items():
        try:
            results[name] = check()
        except _SOURCE_ERRORS as err:
            results[name] = CheckResult(Health.FAILING, f"check failed: {_error_code(err)}")
    worst = max((r.status for r in results.values()), key=_RANK.__getitem__, default=Health.OK)
    return worst, results


class Heartbeat:
    """The service's main loop calls :meth:`tick` each turn; a stuck loop stops ticking.

    Under systemd with ``WatchdogSec=`` a tick also pings the watchdog (at most every quarter
    interval, so a burst of files is not a burst of datagrams), and the manager restarts a
    service whose loop hangs, not only one that exits. The loop must therefore turn at least
    every half watchdog interval, even when idle: a ping is then never more than three
    quarters of an interval old.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last = clock()  # a float written by one thread, read by others: atomic
        self._watchdog_s = watchdog_interval_s()
        self._last_ping: float | None = None

    def tick(self) -> None:
        now = self._clock()
        self._last = now
        if self._watchdog_s is None:
            return
        if self._last_ping is None or now - self._last_ping >= self._watchdog_s / 4:
            sd_notify("WATCHDOG=1")
            self._last_ping = now

    def age_s(self) -> float:
        return self._clock() - self._last


def heartbeat_check(heartbeat: Heartbeat, max_age_s: float) -> HealthCheck:
    """Failing when the main loop has not ticked for ``max_age_s``."""

    def check() -> CheckResult:
        age = heartbeat.age_s()
        status = Health.OK if age <= max_age_s else Health.FAILING
        return CheckResult(status, f"last tick {age:.1f} s ago (limit {max_age_s:g} s)")

    return check


def alive_check(is_alive: Callable[[], bool], what: str) -> HealthCheck:
    """Failing when ``is_alive()`` is false (e.g. the worker pool or the uploader thread)."""

    def check() -> CheckResult:
        if is_alive():
            return CheckResult(Health.OK, f"{what} running")
        return CheckResult(Health.FAILING, f"{what} not running")

    return check


def disk_check(paths: Mapping[str, Path], reserve_bytes: int) -> HealthCheck:
    """Failing when the file system of any of ``paths`` (named by the service: ``data``,
    ``store``) has less than ``reserve_bytes`` free. Each file system is looked at once.

    The detail gives names and sizes only: the paths are the caller's to know (a site's share).
    """

    def check() -> CheckResult:
        seen: set[int] = set()
        parts: list[str] = []
        low = False
        for name, path in paths.items():
            device = path.stat().st_dev
            if device in seen:
                continue
            seen.add(device)
            free = shutil.disk_usage(path).free
            low = low or free < reserve_bytes
            parts.append(f"{name}: {_mib(free)} MiB free")
        status = Health.FAILING if low else Health.OK
        return CheckResult(status, f"{'; '.join(parts)} (reserve {_mib(reserve_bytes)} MiB)")

    return check


class RecordStreak:
    """Whether the service manages to record what it triages: a file whose outcome cannot be
    recorded or filed stays in the inbox for a retry, so nothing else would tell that no case
    is being recorded at all (the case store locked by another process, its disk full).

    The service loop calls :meth:`recorded` or :meth:`failed` per file; the health check reads
    it from the HTTP thread.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0  # consecutive, since the last file recorded
        self._since: float | None = None  # clock() at the first failure of the streak

    def recorded(self) -> None:
        with self._lock:
            self._failures, self._since = 0, None

    def failed(self) -> None:
        with self._lock:
            self._failures += 1
            if self._since is None:
                self._since = self._clock()

    def state(self) -> tuple[int, float]:
        """Consecutive failures, and the seconds since the first of them (0 without any)."""
        with self._lock:
            since = self._since
            return self._failures, 0.0 if since is None else self._clock() - since


def store_check(streak: RecordStreak, max_failures: int, max_s: float) -> HealthCheck:
    """Failing after ``max_failures`` files in a row could not be recorded, or when none has
    been recorded for ``max_s`` since the first of them failed (the files wait meanwhile)."""

    def check() -> CheckResult:
        failures, for_s = streak.state()
        if not failures:
            return CheckResult(Health.OK, "recording")
        failing = failures >= max_failures or for_s >= max_s
        detail = f"{failures} file(s) in a row not recorded, for {for_s:.0f} s"
        return CheckResult(Health.FAILING if failing else Health.DEGRADED, detail)

    return check


def queue_check(queue_status: QueueStatus, max_oldest_age_s: float) -> HealthCheck:
    """Degraded (not failing: cases are kept, nothing is lost) when the oldest unsent case is
    older than ``max_oldest_age_s``, when cases are quarantined or when the quota is full."""

    def check() -> CheckResult:
        figures = queue_status()
        if figures is None:
            return CheckResult(Health.OK, "no outbox")
        problems = []
        age = figures.oldest_age_s or 0.0
        if age > max_oldest_age_s:
            problems.append(f"oldest unsent case waited {age:.0f} s")
        if figures.quarantined:
            problems.append(f"{figures.quarantined} quarantined")
        if figures.full:
            problems.append("quota full: new escalations are refused")
        if problems:
            return CheckResult(Health.DEGRADED, "; ".join(problems))
        return CheckResult(Health.OK, f"{figures.depth} waiting")

    return check


def link_check(link_status: LinkStatus, max_offline_s: float = 0.0) -> HealthCheck:
    """Degraded when the central server has been unreachable for more than ``max_offline_s``:
    escalated cases wait in the outbox meanwhile, and local decisions go on.

    A certificate that is not the pinned one is degraded at once: the grace is for outages
    that end by themselves, and a wrong ``escalation.tls_pin`` never does.
    """

    def check() -> CheckResult:
        snapshot = link_status()
        if snapshot is None:
            return CheckResult(Health.OK, "no central server configured")
        if snapshot.online is None:
            return CheckResult(Health.OK, "not tried yet")
        if snapshot.online or snapshot.offline_since is None:
            return CheckResult(Health.OK, "online")
        offline = _seconds_since(snapshot.offline_since)
        code = snapshot.last_error_code or "unknown"
        if code == CertificatePinError.code:
            return CheckResult(
                Health.DEGRADED,
                f"offline for {offline:.0f} s ({code}): nothing is sent until "
                "escalation.tls_pin is fixed to the server's certificate",
            )
        status = Health.DEGRADED if offline > max_offline_s else Health.OK
        return CheckResult(status, f"offline for {offline:.0f} s ({code})")

    return check


def held_check(held_status: HeldStatus, max_oldest_age_s: float) -> HealthCheck:
    """Degraded (cases are kept, nothing is lost) when a case has been held on the device for
    more than ``max_oldest_age_s``: its escalation is not going anywhere by itself."""

    def check() -> CheckResult:
        figures = held_status()
        if figures is None:
            return CheckResult(Health.OK, "not counted yet")
        age = figures.oldest_age_s()
        if age > max_oldest_age_s:
            return CheckResult(Health.DEGRADED, f"{figures.count} held; the oldest for {age:.0f} s")
        return CheckResult(Health.OK, f"{figures.count} held")

    return check


# --- the HTTP server -----------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, port: int, metrics: ServiceMetrics, checks: Mapping[str, HealthCheck]
    ) -> None:
        self.metrics = metrics
        self.checks = checks
        super().__init__((HOST, port), _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        # Not the base class's traceback on stderr: an exception's text may name a file. The
        # client gets no answer, which a probe reads as failing.
        err = sys.exc_info()[1]
        if isinstance(err, ConnectionError):  # the client went away; nothing to fix here
            log.debug("metrics server: client gone (%s)", type(err).__name__)
        else:
            log.error("metrics server: a request failed (%s)", type(err).__name__)


class _Handler(BaseHTTPRequestHandler):
    # A client that connects and says nothing must not hold a thread for ever.
    timeout = 10
    server_version = "triage-app"
    sys_version = ""

    def do_GET(self) -> None:
        server = cast(_Server, self.server)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, server.metrics.exposition())
        elif path == "/health":
            status, results = run_checks(server.checks)
            body = {"status": status.value, "checks": {k: r.to_json() for k, r in results.items()}}
            code = 503 if status is Health.FAILING else 200
            self._send(code, "application/json", json.dumps(body).encode())
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics or /health\n")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Not to stderr as the base class does: a scrape every few seconds would flood the
        # journal. The request line holds no identifying data.
        log.debug("metrics server: " + format, *args)


class MetricsServer:
    """``GET /metrics`` and ``GET /health`` on 127.0.0.1, in daemon threads.

    ``/health`` answers ``{"status": "ok"|"degraded"|"failing", "checks": {name: {"status",
    "detail"}}}``, with 503 when failing so that a plain HTTP probe sees it too.
    """

    def __init__(
        self,
        metrics: ServiceMetrics,
        checks: Mapping[str, HealthCheck],
        port: int = 0,
        *,
        setting: str = "metrics port",
    ) -> None:
        self._metrics = metrics
        self._checks = checks
        self._requested_port = port
        self._setting = setting
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the one picked when 0 was asked for); only once started."""
        if self._server is None:
            raise RuntimeError("the metrics server is not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve; raises ``ConfigError`` naming ``setting`` when the port cannot be
        had (taken by another process, say): a setting to change, not a crash to restart."""
        if self._server is not None:
            raise RuntimeError("the metrics server is already started")
        try:
            self._server = _Server(self._requested_port, self._metrics, self._checks)
        except OSError as err:
            reason = err.strerror or type(err).__name__
            raise ConfigError(
                f"{self._setting}: cannot listen on {HOST}:{self._requested_port} ({reason})"
            ) from err
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="metrics-server",
            daemon=True,
        )
        self._thread.start()
        log.info("metrics and health on http://%s:%d/", HOST, self.port)

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> MetricsServer:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def probe_health(port: int, timeout_s: float = 5.0) -> tuple[int, str]:
    """Ask a running service's ``/health``: exit code (0 ok or degraded, 1 failing or
    unreachable) and one line for a service manager or an admin's terminal.

    http.client rather than urllib: urllib would send a loopback request through an
    ``http_proxy`` from the environment.
    """
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ConfigError(f"--timeout: must be a positive number of seconds, not {timeout_s}")
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        raw = response.read()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        return 1, f"unreachable: {HOST}:{port}: {reason}"
    except http.client.HTTPException as err:
        return 1, f"unreachable: {HOST}:{port}: {type(err).__name__}"
    finally:
        conn.close()
    try:
        body = json.loads(raw)
        status = Health(body["status"])
        checks = body["checks"]
        problems = [
            f"{name}: {check['detail']}"
            for name, check in checks.items()
            if check["status"] != Health.OK
        ]
    except (ValueError, KeyError, TypeError, AttributeError):
        return 1, f"failing: {HOST}:{port} answered {response.status} without a health report"
    line = status.value + (": " + "; ".join(problems) if problems else "")
    return (1 if status is Health.FAILING else 0), line


# --- systemd --------------------------------------------------------------------------------


def sd_notify(message: str) -> bool:
    """Send ``message`` (``READY=1``, ``STOPPING=1``, ``WATCHDOG=1``, ``STATUS=...``) to the
    service manager; whether it was sent. Without ``$NOTIFY_SOCKET`` (not run by systemd, or
    not ``Type=notify``) it does nothing.

    The protocol by hand (one datagram on a Unix socket; '@' names an abstract socket) so
    the app needs neither libsystemd nor a binding for it.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.debug("notify socket %r is not a Unix socket: not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as err:
        log.warning("could not notify the service manager: %s", err.strerror or err)
        return False
    return True


def watchdog_interval_s() -> float | None:
    """The systemd watchdog interval for this process (``WatchdogSec=``), or None if off."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        interval = int(usec) / 1e6
    except ValueError:
        return None
    return interval if interval > 0 else None


# --- helpers -------------------------------------------------------------------------------


def _seconds_since(moment: datetime) -> float:
    return max(0.0, (datetime.now(UTC) - moment).total_seconds())


def _mib(size: int) -> int:
    return size // (1024 * 1024)


def _error_code(err: TriageError | OSError) -> str:
    """A short, path-free name for an error: the stable code, or errno's text."""
    if isinstance(err, TriageError):
        return err.code
    return err.strerror or type(err).__name__
