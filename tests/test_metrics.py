"""The services' /metrics and /health over real HTTP on 127.0.0.1, and the systemd notify protocol
over a real Unix datagram socket."""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import math
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from triage_app.errors import ConfigError, InputError, OutboxError
from triage_app.escalation.connectivity import ConnectivitySnapshot, ConnectivityState
from triage_app.escalation.outbox import Outbox, OutboxStatus
from triage_app.metrics import (
    HOST,
    CheckResult,
    Health,
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
    probe_health,
    queue_check,
    run_checks,
    sd_notify,
    store_check,
    watchdog_interval_s,
)
from triage_app.ordered_pool import WORKER_CRASHED
from triage_app.results import CaseResult, EscalationRef, FailedInput, ModelRef

MODEL = ModelRef("chest-dx-demo", "1.0.0", "ab" * 32)

# --- helpers ---------------------------------------------------------------------------------


def case(
    decision: str,
    reason: str,
    infer_ms: float | None,
    *,
    escalation: EscalationRef | None = None,
    model: ModelRef = MODEL,
) -> CaseResult:
    timings = {"read": 1.0, "preprocess": 2.0}
    if infer_ms is not None:
        timings["infer"] = infer_ms
    return CaseResult(
        path="/scans/DOE^JANE/1.dcm",
        case_id="c" * 64,
        decision=decision,
        reason=reason,
        score=0.5,
        probabilities={"normal": 0.5, "abnormal": 0.5},
        model=model,
        thresholds={},
        scope={},
        image={},
        escalation=escalation,
        timings_ms=timings,
    )


def get(port: int, path: str, host: str = HOST) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        conn.close()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample of ``/metrics``, parsed by prometheus_client's own parser."""
    status, content_type, body = get(port, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, metric: str, /, **labels: str) -> float | None:
    return samples.get((metric, frozenset(labels.items())))


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


@pytest.fixture
def serve() -> Iterator[Any]:
    """Start a MetricsServer for the test; always stopped afterwards."""
    started: list[MetricsServer] = []

    def start(metrics: ServiceMetrics, checks: dict[str, HealthCheck] | None = None) -> int:
        server = MetricsServer(metrics, checks or {})
        server.start()
        started.append(server)
        return server.port

    yield start
    for server in started:
        server.stop()


def health(port: int) -> tuple[int, dict[str, Any]]:
    status, content_type, body = get(port, "/health")
    assert content_type == "application/json"
    report: dict[str, Any] = json.loads(body)
    return status, report


def fixed(result: CheckResult) -> HealthCheck:
    return lambda: result


# --- counters and histograms -----------------------------------------------------------------


def test_observed_outcomes_show_in_the_scrape_by_decision_reason_and_code(serve: Any) -> None:
    metrics = ServiceMetrics()
    metrics.observe(case("normal", "confident_normal", 0.9), processing_s=2.2)
    metrics.observe(case("normal", "confident_normal", 1.5), processing_s=2.4)
    queued = EscalationRef("queued", "d" * 64)
    metrics.observe(case("escalate", "uncertain", 3.0, escalation=queued), processing_s=7.0)
    metrics.observe(FailedInput("/scans/DOE^JANE/2.dcm", "truncated", "cut short"))
    metrics.observe(FailedInput("/scans/x.dcm", "not_dicom", "no preamble"), processing_s=0.3)

    samples = scrape(serve(metrics))

    cases = "triage_cases_total"
    assert value(samples, cases, decision="normal", reason="confident_normal") == 2
    assert value(samples, cases, decision="escalate", reason="uncertain") == 1
    assert value(samples, "triage_escalations_total", state="queued") == 1
    assert value(samples, "triage_failures_total", code="truncated") == 1
    assert value(samples, "triage_failures_total", code="not_dicom") == 1
    # Inference: 0.9, 1.5 and 3.0 ms, in seconds, in the right buckets.
    assert value(samples, "triage_inference_seconds_count") == 3
    assert value(samples, "triage_inference_seconds_sum") == pytest.approx(0.0054)
    assert value(samples, "triage_inference_seconds_bucket", le="0.001") == 1
    assert value(samples, "triage_inference_seconds_bucket", le="0.002") == 2
    assert value(samples, "triage_inference_seconds_bucket", le="0.005") == 3
    assert value(samples, "triage_inference_seconds_bucket", le="2.0") == 3
    # Processing is what the service measured, failures included.
    assert value(samples, "triage_processing_seconds_count") == 4
    assert value(samples, "triage_processing_seconds_sum") == pytest.approx(11.9)
    assert value(samples, "triage_processing_seconds_bucket", le="2.5") == 3
    info = {"name": MODEL.name, "version": MODEL.version, "sha256": MODEL.sha256}
    assert value(samples, "triage_model_info", **info) == 1


def test_no_path_or_message_reaches_the_exposition(serve: Any) -> None:
    metrics = ServiceMetrics()
    metrics.observe(case("normal", "confident_normal", 1.0))
    metrics.observe(FailedInput("/scans/DOE^JANE/2.dcm", "truncated", "DOE^JANE cut short"))
    _, _, body = get(serve(metrics), "/metrics")
    assert b"DOE" not in body
    assert b"/scans" not in body
    assert b"c" * 64 not in body  # nor the case id


def test_a_case_without_an_inference_timing_is_counted_but_not_timed(serve: Any) -> None:
    metrics = ServiceMetrics()
    metrics.observe(case("escalate", "out_of_scope", None))
    samples = scrape(serve(metrics))
    assert value(samples, "triage_cases_total", decision="escalate", reason="out_of_scope") == 1
    assert value(samples, "triage_inference_seconds_count") == 0


def test_the_model_info_follows_a_model_change(serve: Any) -> None:
    metrics = ServiceMetrics(model=MODEL)
    port = serve(metrics)
    first = {"name": MODEL.name, "version": MODEL.version, "sha256": MODEL.sha256}
    assert value(scrape(port), "triage_model_info", **first) == 1

    newer = ModelRef("chest-dx-demo", "1.1.0", "cd" * 32)
    metrics.observe(case("normal", "confident_normal", 1.0, model=newer))
    samples = scrape(port)
    assert value(samples, "triage_model_info", **first) is None
    second = {"name": newer.name, "version": newer.version, "sha256": newer.sha256}
    assert value(samples, "triage_model_info", **second) == 1


def test_each_service_has_its_own_registry_never_the_global_one() -> None:
    first, second = ServiceMetrics(), ServiceMetrics()  # the same names twice: no collision
    first.observe(FailedInput("x", "not_dicom", "m"))
    assert first.registry.get_sample_value("triage_failures_total", {"code": "not_dicom"}) == 1
    assert second.registry.get_sample_value("triage_failures_total", {"code": "not_dicom"}) == 0
    assert REGISTRY.get_sample_value("triage_failures_total", {"code": "not_dicom"}) is None


def test_a_service_adds_its_own_counters_and_scrape_time_gauges(serve: Any) -> None:
    metrics = ServiceMetrics()
    stored = metrics.counter("triage_receiver_instances_stored", "Instances stored.")
    refused = metrics.counter("triage_receiver_instances_refused", "Refused.", ["status"])
    low_disk = {"alarm": False}
    metrics.gauge(
        "triage_receiver_low_disk",
        "1 while stores are refused for lack of disk.",
        function=lambda: 1.0 if low_disk["alarm"] else 0.0,
    )
    port = serve(metrics)
    stored.inc(3)
    refused.labels(status="0xA700").inc()
    samples = scrape(port)
    assert value(samples, "triage_receiver_instances_stored_total") == 3
    assert value(samples, "triage_receiver_instances_refused_total", status="0xA700") == 1
    assert value(samples, "triage_receiver_low_disk") == 0
    low_disk["alarm"] = True
    assert value(scrape(port), "triage_receiver_low_disk") == 1


def test_counters_the_service_keeps_itself_are_read_at_each_scrape(serve: Any) -> None:
    stored = [0]
    refused: dict[str, float] = {"0xA700": 1}
    metrics = ServiceMetrics()
    metrics.counter_function("triage_receiver_stored", "Stored.", lambda: stored[0])
    metrics.counter_function("triage_receiver_refused", "Refused.", lambda: refused, label="status")
    port = serve(metrics)
    samples = scrape(port)
    assert value(samples, "triage_receiver_stored_total") == 0
    assert value(samples, "triage_receiver_refused_total", status="0xA700") == 1
    stored[0] = 5
    refused.update({"0xA700": 2, "0xC000": 1})
    samples = scrape(port)
    assert value(samples, "triage_receiver_stored_total") == 5
    assert value(samples, "triage_receiver_refused_total", status="0xA700") == 2
    assert value(samples, "triage_receiver_refused_total", status="0xC000") == 1


def test_a_gauge_read_by_a_function_cannot_have_labels() -> None:
    with pytest.raises(ValueError, match="labels"):
        ServiceMetrics().gauge("triage_x", "x", ["a"], function=lambda: 1.0)


# --- scrape-time figures ---------------------------------------------------------------------


@dataclass
class Sources:
    """What a service would hand over; changed by the test between scrapes."""

    queue: QueueFigures | None = None
    link: ConnectivitySnapshot | None = None


def snapshot(online: bool | None, offline_for_s: float | None = None) -> ConnectivitySnapshot:
    now = datetime.now(UTC)
    since = None if offline_for_s is None else now - timedelta(seconds=offline_for_s)
    return ConnectivitySnapshot(
        online=online,
        offline_since=since,
        last_error="transport_error: refused" if since else None,
        last_error_code="transport_error" if since else None,
        last_success_at=None,
        last_failure_at=since,
        consecutive_failures=3 if since else 0,
    )


def test_queue_link_and_disk_figures_are_read_fresh_at_every_scrape(
    serve: Any, tmp_path: Path
) -> None:
    sources = Sources(queue=QueueFigures(4, 120.0, 1, 5000, 10_000))
    metrics = ServiceMetrics(
        queue_status=lambda: sources.queue,
        link_status=lambda: sources.link,
        disk_paths={"inbox": tmp_path},
    )
    port = serve(metrics)

    samples = scrape(port)
    assert value(samples, "triage_outbox_depth") == 4
    assert value(samples, "triage_outbox_oldest_age_seconds") == 120
    assert value(samples, "triage_outbox_quarantined") == 1
    assert value(samples, "triage_outbox_bytes") == 5000
    assert value(samples, "triage_outbox_quota_bytes") == 10_000
    # No attempt yet: "unknown" is not "offline", so no sample at all.
    assert "triage_central_online" not in names(samples)
    free = value(samples, "triage_disk_free_bytes", folder="inbox")
    assert free is not None
    assert free == pytest.approx(shutil.disk_usage(tmp_path).free, rel=0.01)

    sources.queue = QueueFigures(0, None, 0, 0, 10_000)
    sources.link = snapshot(online=False, offline_for_s=300)
    samples = scrape(port)
    assert value(samples, "triage_outbox_depth") == 0
    assert value(samples, "triage_outbox_oldest_age_seconds") == 0
    assert value(samples, "triage_central_online") == 0
    offline = value(samples, "triage_central_offline_seconds")
    assert offline is not None
    assert 300 <= offline < 330

    sources.link = snapshot(online=True)
    samples = scrape(port)
    assert value(samples, "triage_central_online") == 1
    assert value(samples, "triage_central_offline_seconds") == 0


def test_a_service_without_outbox_or_central_server_shows_no_such_samples(serve: Any) -> None:
    samples = scrape(serve(ServiceMetrics(queue_status=lambda: None, link_status=lambda: None)))
    assert not {n for n in names(samples) if n.startswith(("triage_outbox", "triage_central"))}


def test_queue_figures_from_a_real_outbox_opened_per_scrape(serve: Any, tmp_path: Path) -> None:
    db, spool = tmp_path / "cases.sqlite3", tmp_path / "outbox"
    envelope = b"sealed bytes" * 100
    with Outbox.open(db, spool, quota_bytes=1_000_000) as outbox:
        outbox.enqueue(
            "e" * 64,
            envelope,
            reason="uncertain",
            payload_sha256=hashlib.sha256(b"payload").hexdigest(),
            now=datetime.now(UTC) - timedelta(seconds=90),
        )

    def queue_status() -> QueueFigures:
        # The way a service wires it: the scrape runs in a request thread, so it opens its own.
        with Outbox.open(db, spool, quota_bytes=1_000_000) as outbox:
            return QueueFigures.from_status(outbox.status())

    samples = scrape(serve(ServiceMetrics(queue_status=queue_status)))
    assert value(samples, "triage_outbox_depth") == 1
    oldest = value(samples, "triage_outbox_oldest_age_seconds")
    assert oldest is not None
    assert 90 <= oldest < 120
    assert value(samples, "triage_outbox_bytes") == len(envelope)


def test_queue_figures_count_pending_and_in_flight_as_depth() -> None:
    status = OutboxStatus(
        pending=3,
        in_flight=1,
        delivered=50,
        quarantined=2,
        queued_bytes=700,
        quota_bytes=700,
        oldest_pending_age_s=12.5,
        full=True,
    )
    figures = QueueFigures.from_status(status)
    assert figures == QueueFigures(4, 12.5, 2, 700, 700)
    assert figures.full


@pytest.mark.expect_log_warnings
def test_a_failing_source_is_skipped_logged_once_and_recovers(
    serve: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = {"now": True}

    def queue_status() -> QueueFigures:
        if broken["now"]:
            raise OutboxError(f"outbox: could not open {tmp_path}/DOE^JANE: disk I/O error")
        return QueueFigures(2, 1.0, 0, 10, 100)

    metrics = ServiceMetrics(queue_status=queue_status, disk_paths={"gone": tmp_path / "no"})
    port = serve(metrics)
    for _ in range(3):
        samples = scrape(port)  # the rest of the scrape still answers
        assert "triage_outbox_depth" not in names(samples)
        assert "triage_cases_total" not in names(samples)  # no sample before any case...
        assert "triage_inference_seconds_count" in names(samples)  # ...but the rest is there
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert sorted(r.getMessage() for r in warnings) == [
        "metrics: disk gone unavailable (No such file or directory)",
        "metrics: queue unavailable (outbox_error)",
    ]
    assert all("DOE" not in r.getMessage() for r in caplog.records)

    broken["now"] = False
    assert value(scrape(port), "triage_outbox_depth") == 2
    assert "metrics: queue available again" in caplog.messages


@pytest.mark.expect_log_warnings
def test_an_unexpected_error_in_a_source_is_logged_without_its_text_and_the_server_goes_on(
    serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    calls = {"n": 0}

    def queue_status() -> QueueFigures:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("/scans/DOE^JANE/1.dcm")
        return QueueFigures(1, 2.0, 0, 1, 10)

    port = serve(ServiceMetrics(queue_status=queue_status))
    with pytest.raises(http.client.RemoteDisconnected):
        get(port, "/metrics")
    assert value(scrape(port), "triage_outbox_depth") == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["metrics server: a request failed (RuntimeError)"]


# --- the HTTP server -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("results", "expected_http", "expected_status"),
    [
        ({"loop": Health.OK, "link": Health.OK}, 200, "ok"),
        ({"loop": Health.OK, "link": Health.DEGRADED}, 200, "degraded"),
        ({"loop": Health.FAILING, "link": Health.DEGRADED}, 503, "failing"),
        ({}, 200, "ok"),
    ],
)
def test_health_answers_the_worst_check_with_its_http_status(
    serve: Any, results: dict[str, Health], expected_http: int, expected_status: str
) -> None:
    checks = {
        name: fixed(CheckResult(status, f"{name} says so")) for name, status in results.items()
    }
    status, report = health(serve(ServiceMetrics(), checks))
    assert status == expected_http
    assert report["status"] == expected_status
    assert report["checks"] == {
        name: {"status": s.value, "detail": f"{name} says so"} for name, s in results.items()
    }


def test_a_check_that_raises_makes_the_service_failing(serve: Any) -> None:
    def broken() -> CheckResult:
        raise OutboxError("outbox: could not read the queue status: database is locked")

    status, report = health(serve(ServiceMetrics(), {"queue": broken}))
    assert status == 503
    assert report["checks"]["queue"] == {
        "status": "failing",
        "detail": "check failed: outbox_error",
    }


def test_health_is_computed_at_each_request(serve: Any) -> None:
    state = {"alive": True}
    port = serve(ServiceMetrics(), {"workers": alive_check(lambda: state["alive"], "pool")})
    assert health(port)[0] == 200
    state["alive"] = False
    status, report = health(port)
    assert status == 503
    assert report["checks"]["workers"] == {"status": "failing", "detail": "pool not running"}


def test_other_paths_are_not_found(serve: Any) -> None:
    port = serve(ServiceMetrics())
    assert get(port, "/")[0] == 404
    assert get(port, "/metrics/../etc/passwd")[0] == 404
    assert get(port, "/metrics?format=text")[0] == 200


def test_the_server_listens_on_127_0_0_1_only(serve: Any) -> None:
    port = serve(ServiceMetrics())
    assert get(port, "/health")[0] == 200
    # Linux routes all of 127/8 to the loopback interface: a server bound to any address
    # (0.0.0.0) would answer on 127.0.0.2 too; one bound to 127.0.0.1 refuses.
    with pytest.raises(ConnectionRefusedError):
        get(port, "/health", host="127.0.0.2")


def test_port_zero_picks_a_free_port_and_stop_frees_it() -> None:
    server = MetricsServer(ServiceMetrics(), {})
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.port
    with server:
        port = server.port
        assert port > 0
        with pytest.raises(RuntimeError, match="already started"):
            server.start()
    with pytest.raises(ConnectionRefusedError):
        get(port, "/health")
    server.stop()  # stopping twice is harmless


def test_a_taken_port_is_a_settings_error_naming_the_setting_and_the_address() -> None:
    with MetricsServer(ServiceMetrics(), {}) as first:
        port = first.port
        second = MetricsServer(ServiceMetrics(), {}, port=port, setting="metrics.watch_port")
        with pytest.raises(ConfigError) as raised:
            second.start()
    assert str(raised.value) == (
        f"metrics.watch_port: cannot listen on 127.0.0.1:{port} (Address already in use)"
    )


def test_requests_are_not_logged_above_debug(
    serve: Any, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    port = serve(ServiceMetrics())
    get(port, "/metrics")
    get(port, "/nowhere")
    assert not [r for r in caplog.records if r.levelno > logging.INFO]
    assert "GET /metrics" not in capfd.readouterr().err  # http.server's default goes to stderr


# --- health checks ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_heartbeat_check_fails_when_the_loop_stops_ticking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    clock = FakeClock()
    beat = Heartbeat(clock=clock)
    check = heartbeat_check(beat, max_age_s=30)
    clock.now += 29
    assert check().status is Health.OK
    clock.now += 2
    result = check()
    assert result == CheckResult(Health.FAILING, "last tick 31.0 s ago (limit 30 s)")
    beat.tick()
    assert check().status is Health.OK


def test_queue_check_degrades_on_age_quarantine_or_a_full_quota() -> None:
    def status(figures: QueueFigures | None) -> CheckResult:
        return queue_check(lambda: figures, max_oldest_age_s=600)()

    assert status(None) == CheckResult(Health.OK, "no outbox")
    assert status(QueueFigures(3, 599.0, 0, 10, 100)) == CheckResult(Health.OK, "3 waiting")
    assert status(QueueFigures(0, None, 0, 0, 100)).status is Health.OK
    assert status(QueueFigures(3, 601.0, 0, 10, 100)) == CheckResult(
        Health.DEGRADED, "oldest unsent case waited 601 s"
    )
    assert status(QueueFigures(0, None, 2, 100, 100)) == CheckResult(
        Health.DEGRADED, "2 quarantined; quota full: new escalations are refused"
    )


def test_link_check_degrades_only_after_the_grace_period() -> None:
    def status(snap: ConnectivitySnapshot | None, grace_s: float = 60) -> CheckResult:
        return link_check(lambda: snap, max_offline_s=grace_s)()

    assert status(None) == CheckResult(Health.OK, "no central server configured")
    assert status(snapshot(None)) == CheckResult(Health.OK, "not tried yet")
    assert status(snapshot(True)) == CheckResult(Health.OK, "online")
    assert status(snapshot(False, offline_for_s=30)).status is Health.OK
    late = status(snapshot(False, offline_for_s=120))
    assert late.status is Health.DEGRADED
    assert late.detail.startswith("offline for 12")
    assert late.detail.endswith("s (transport_error)")


def test_link_check_degrades_at_once_on_a_certificate_pin_mismatch() -> None:
    """A wrong pin never clears by itself: no grace period for it, and the detail says what to
    fix; another error a second old is still within the grace."""
    state = ConnectivityState()
    check = link_check(state.snapshot, max_offline_s=300)
    state.mark_failure("certificate_pin_mismatch", "presented sha256 ab12", datetime.now(UTC))
    result = check()
    assert result.status is Health.DEGRADED
    assert result.detail.startswith("offline for 0 s (certificate_pin_mismatch): ")
    assert "escalation.tls_pin" in result.detail
    state.mark_success(datetime.now(UTC))
    state.mark_failure("transport_error", "refused", datetime.now(UTC))
    assert check() == CheckResult(Health.OK, "offline for 0 s (transport_error)")


def test_link_check_reads_a_live_connectivity_state() -> None:
    state = ConnectivityState()
    check = link_check(state.snapshot)
    state.mark_failure("connect_failed", "refused", datetime.now(UTC) - timedelta(seconds=5))
    assert check().status is Health.DEGRADED
    state.mark_success(datetime.now(UTC))
    assert check() == CheckResult(Health.OK, "online")


def test_disk_check_fails_below_the_reserve(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    assert disk_check({"data": tmp_path}, reserve_bytes=0)().status is Health.OK
    low = disk_check({"data": tmp_path}, reserve_bytes=free * 2)()
    assert low.status is Health.FAILING
    assert str(tmp_path) not in low.detail


def test_disk_check_looks_at_each_file_system_once_by_name(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    check = disk_check({"data": tmp_path, "store": tmp_path / "store"}, reserve_bytes=0)
    result = check()
    assert result.status is Health.OK
    assert result.detail.startswith("data: ") and "store" not in result.detail  # one disk
    assert result.detail.endswith(" MiB free (reserve 0 MiB)")


def test_store_check_fails_after_failures_in_a_row_or_too_long_without_a_record() -> None:
    now = [0.0]
    streak = RecordStreak(clock=lambda: now[0])
    check = store_check(streak, max_failures=3, max_s=120.0)
    assert check() == CheckResult(Health.OK, "recording")
    streak.failed()
    now[0] = 10.0
    streak.failed()
    assert check() == CheckResult(Health.DEGRADED, "2 file(s) in a row not recorded, for 10 s")
    streak.failed()
    assert check().status is Health.FAILING  # the third in a row
    streak.recorded()
    assert check() == CheckResult(Health.OK, "recording")
    streak.failed()
    now[0] = 130.0
    assert check() == CheckResult(Health.FAILING, "1 file(s) in a row not recorded, for 120 s")


def test_held_check_degrades_once_the_oldest_held_case_is_too_old() -> None:
    def status(figures: HeldFigures | None) -> CheckResult:
        return held_check(lambda: figures, max_oldest_age_s=3600)()

    def held(count: int, age_s: float) -> HeldFigures:
        return HeldFigures(count, datetime.now(UTC) - timedelta(seconds=age_s))

    assert status(None) == CheckResult(Health.OK, "not counted yet")
    assert status(HeldFigures(0, None)) == CheckResult(Health.OK, "0 held")
    assert status(held(2, 3000)) == CheckResult(Health.OK, "2 held")
    late = status(held(2, 4000))
    assert late.status is Health.DEGRADED
    assert late.detail.startswith("2 held; the oldest for 40")


def test_held_cases_and_record_failures_show_in_the_scrape(serve: Any) -> None:
    figures: list[HeldFigures | None] = [None]
    metrics = ServiceMetrics(held_status=lambda: figures[0])
    port = serve(metrics)
    samples = scrape(port)
    assert "triage_held_cases" not in names(samples)  # not counted yet
    assert value(samples, "triage_record_failures_total", code="store_error") == 0

    figures[0] = HeldFigures(3, datetime.now(UTC) - timedelta(seconds=500))
    metrics.record_failures.labels(code="ENOSPC").inc()
    samples = scrape(port)
    assert value(samples, "triage_held_cases") == 3
    oldest = value(samples, "triage_held_oldest_age_seconds")
    assert oldest is not None and oldest >= 500
    assert value(samples, "triage_record_failures_total", code="ENOSPC") == 1
    assert value(samples, "triage_record_failures_total", code="store_error") == 0

    figures[0] = HeldFigures(0, None)
    samples = scrape(port)
    assert value(samples, "triage_held_cases") == 0
    assert value(samples, "triage_held_oldest_age_seconds") == 0


def test_every_input_failure_code_is_in_the_scrape_at_0_from_the_start(serve: Any) -> None:
    """``triage_failures_total`` (documented in packaging/README.md) appeared only after the
    first failure, so an alert on it had no series; ``triage_record_failures_total`` was there
    at 0. Each code a triaged input can fail with is, from the start."""
    samples = scrape(serve(ServiceMetrics()))
    shown = {
        dict(labels)["code"]: count
        for (name, labels), count in samples.items()
        if name == "triage_failures_total"
    }
    codes = {cls.code for cls in InputError.__subclasses__()} | {WORKER_CRASHED}
    assert {"truncated", "not_dicom", "processing_failed", "worker_crashed"} <= codes
    assert shown == dict.fromkeys(codes, 0.0)


def test_run_checks_reports_the_worst() -> None:
    worst, results = run_checks(
        {
            "a": fixed(CheckResult(Health.DEGRADED)),
            "b": fixed(CheckResult(Health.OK)),
        }
    )
    assert worst is Health.DEGRADED
    assert list(results) == ["a", "b"]


# --- probe_health ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("results", "code", "line"),
    [
        ({"loop": Health.OK}, 0, "ok"),
        ({"loop": Health.OK, "link": Health.DEGRADED}, 0, "degraded: link: link detail"),
        (
            {"loop": Health.FAILING, "link": Health.DEGRADED},
            1,
            "failing: loop: loop detail; link: link detail",
        ),
    ],
)
def test_probe_health_exit_codes(
    serve: Any, results: dict[str, Health], code: int, line: str
) -> None:
    checks = {n: fixed(CheckResult(s, f"{n} detail")) for n, s in results.items()}
    assert probe_health(serve(ServiceMetrics(), checks), timeout_s=5) == (code, line)


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize("timeout_s", [-1.0, 0.0, math.nan, math.inf])
def test_probe_health_refuses_a_time_limit_that_is_not_a_positive_number(timeout_s: float) -> None:
    with pytest.raises(ConfigError, match=r"^--timeout: must be a positive number of seconds"):
        probe_health(free_port(), timeout_s=timeout_s)


def test_probe_health_of_a_service_that_is_not_running_fails() -> None:
    port = free_port()
    code, line = probe_health(port, timeout_s=2)
    assert code == 1
    assert line.startswith(f"unreachable: 127.0.0.1:{port}: ")


class _NotAService(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_probe_health_of_something_else_on_the_port_fails() -> None:
    with HTTPServer((HOST, 0), _NotAService) as other:
        thread = threading.Thread(target=other.serve_forever, daemon=True)
        thread.start()
        try:
            code, line = probe_health(other.server_address[1], timeout_s=5)
        finally:
            other.shutdown()
            thread.join()
    assert code == 1
    assert "without a health report" in line


# --- systemd notify --------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A real datagram socket where systemd's would be, named by $NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def test_sd_notify_sends_one_datagram(notify_socket: socket.socket) -> None:
    assert sd_notify("READY=1")
    assert notify_socket.recv(4096) == b"READY=1"
    assert sd_notify("STATUS=watching the inbox\nWATCHDOG=1")
    assert notify_socket.recv(4096) == b"STATUS=watching the inbox\nWATCHDOG=1"


def test_sd_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"triage-test-{os.getpid()}-{threading.get_ident()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify("STOPPING=1")
        assert sock.recv(4096) == b"STOPPING=1"


def test_sd_notify_without_a_service_manager_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sd_notify("READY=1")


@pytest.mark.expect_log_warnings
def test_sd_notify_to_a_missing_socket_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert not sd_notify("READY=1")
    assert caplog.messages == ["could not notify the service manager: No such file or directory"]


def test_the_heartbeat_pings_the_watchdog_at_most_every_quarter_interval(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval_s() == 4.0
    clock = FakeClock()
    beat = Heartbeat(clock=clock)
    sent = 0
    for step in (0.0, 0.5, 0.25, 0.25, 0.75, 0.5):  # ticks at 0, .5, .75, 1, 1.75, 2.25
        clock.now += step
        beat.tick()
    notify_socket.setblocking(False)
    while True:
        try:
            assert notify_socket.recv(64) == b"WATCHDOG=1"
        except BlockingIOError:
            break
        sent += 1
    assert sent == 3  # at 0, 1 and 2.25


def test_the_watchdog_belongs_to_the_process_systemd_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # e.g. a worker inherited it
    assert watchdog_interval_s() is None
    monkeypatch.delenv("WATCHDOG_PID")
    assert watchdog_interval_s() == 60.0
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval_s() is None
