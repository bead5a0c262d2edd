"""The services' shared runtime, end to end: ``triage-app watch`` as a service manager runs it,
with the real central server on loopback, its metrics and health over HTTP.

The watch service escalates every phantom (the device thresholds send them all), so its
background uploader has to deliver each one exactly once and bring the verdicts back, while
``/metrics`` and ``triage-app health`` report what happened.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.dcmtk import free_port
from tests.escalation.conftest import (
    EDGE_MODEL_KEY,
    Central,
    Device,
    make_uploader,
    start_central_server,
    triage,
    write_identified_phantoms,
)
from tests.fault_proxy import FaultProxy
from tests.helpers import run_cli, wait_until
from triage_app.batch import triage_and_record
from triage_app.central.certificates import make_self_signed
from triage_app.config import Settings, save_settings
from triage_app.headless import ServiceRuntime
from triage_app.metrics import probe_health
from triage_app.results import CaseResult
from triage_app.states import CaseState
from triage_app.store import NOT_RELEASED, CaseStore
from triage_app.synthetic import PhantomConfig, phantom_to_dataset, render_phantom


@pytest.fixture
def central(tmp_path: Path) -> Iterator[Central]:
    server = start_central_server(
        tmp_path / "central", make_self_signed(tmp_path / "tls"), model=True
    )
    yield server
    server.thread.stop()


def scrape(port: int) -> dict[str, float]:
    """Every sample of the service's /metrics, by name and labels."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


@contextlib.contextmanager
def watch_service(
    settings: Settings, tmp_path: Path, *, stderr: Path | None = None
) -> Iterator[subprocess.Popen[str]]:
    """``triage-app watch`` in its own process, as systemd runs it; answering once yielded.

    Its log goes to ``stderr`` when given (read it once the block has ended), else nowhere.
    """
    config = save_settings(settings, tmp_path / "settings.toml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_APP_")}
    with contextlib.ExitStack() as files:
        log = (
            subprocess.DEVNULL
            if stderr is None
            else files.enter_context(stderr.open("w", encoding="utf-8"))
        )
        service = subprocess.Popen(
            [sys.executable, "-m", "triage_app", "watch", "--config", str(config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
            text=True,
        )
        try:
            wait_until(
                lambda: probe_health(settings.metrics_watch_port, 1.0)[0] == 0,
                timeout_s=60,
                interval_s=0.2,
                what="the service's health endpoint",
            )
            yield service
        finally:
            service.send_signal(signal.SIGTERM)
            service.wait(timeout=60)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_watch_service_delivers_its_escalations_and_reports_them(
    central: Central, device: Device, tmp_path: Path
) -> None:
    port = free_port()
    settings = device.settings(central).with_values(
        **{"watch.settle_s": 0.2, "metrics.watch_port": port, "escalation.retry_cap_s": 2.0}
    )
    log = tmp_path / "watch.stderr"
    with watch_service(settings, tmp_path, stderr=log) as service:
        staging = tmp_path / "staging"
        written = write_identified_phantoms(staging, range(4))
        for path, _ in written:  # as a scanner does: write elsewhere, rename into the inbox
            path.rename(settings.watch_inbox / path.name)

        def verdicts_back() -> bool:
            with CaseStore.open(settings.case_store_path) as store:
                cases = store.list_cases()
            return len(cases) == 4 and all(c.state is CaseState.VERDICT_RECEIVED for c in cases)

        wait_until(verdicts_back, timeout_s=120, interval_s=0.2, what="the four verdicts")
        samples = scrape(port)
        code, line = probe_health(port, 5.0)
    stderr = log.read_text(encoding="utf-8")

    assert service.returncode == 0, stderr
    assert sorted(central.deliveries().values()) == [1, 1, 1, 1]
    assert samples["triage_cases_total{decision=escalate,reason=uncertain}"] == 4
    assert samples["triage_escalations_total{state=queued}"] == 4
    assert samples["triage_processing_seconds_count{}"] == 4
    assert samples["triage_central_online{}"] == 1
    assert samples["triage_outbox_depth{}"] == 0
    assert code == 0 and line.startswith("ok"), line
    assert sorted(p.name for p in settings.watch_done.iterdir()) == sorted(
        [f"scan{i}.dcm" for i in range(4)] + [f"scan{i}.dcm.json" for i in range(4)]
    )
    for _, original in written:  # nothing identifying in the service's log
        assert str(original.PatientName) not in stderr
        assert str(original.PatientID) not in stderr
        assert str(original.SOPInstanceUID) not in stderr
    health = run_cli(
        "health",
        "watch",
        data_dir=device.data_dir,
        env={"TRIAGE_APP_METRICS__WATCH_PORT": str(port)},
    )
    assert health.returncode == 1, "a stopped service is reported failing"
    assert "unreachable" in health.stdout


@pytest.mark.expect_log_warnings  # the central server cannot be reached at start
@pytest.mark.timeout(120)
def test_the_runtime_releases_the_cases_it_held_once_the_keys_are_known(
    central: Central, device: Device, tmp_path: Path
) -> None:
    with FaultProxy("127.0.0.1", central.port) as proxy:
        proxy.refuse()
        settings = device.settings(central, url=f"https://127.0.0.1:{proxy.port}").with_values(
            escalation__retry_cap_s=1.0
        )

        def states() -> set[CaseState]:
            with CaseStore.open(settings.case_store_path) as store:
                return {c.state for c in store.list_cases()}

        with ServiceRuntime(settings) as runtime:
            assert runtime.queue() is None  # no keys: escalated cases are held
            held = triage(settings, tmp_path / "scans", (0, 1), queue=None)
            runtime.tick()
            assert states() == {CaseState.ESCALATION_HELD}
            proxy.pass_through()  # the uploader fetches the keys; the runtime picks them up

            def delivered() -> bool:
                runtime.tick()  # as the service loop does, several times a second
                return states() <= {CaseState.DELIVERED, CaseState.VERDICT_RECEIVED}

            wait_until(delivered, timeout_s=60, interval_s=0.1, what="the held cases delivered")
    assert central.deliveries() == {case.case_id: 1 for case in held}


@pytest.mark.expect_log_warnings  # the ALARM of the case the full outbox refuses
def test_the_runtime_releases_a_case_held_by_a_full_outbox_once_a_delivery_makes_room(
    central: Central, device: Device, tmp_path: Path
) -> None:
    # A 1 MB outbox and 600x600 16-bit images: room for one envelope, not two.
    settings = device.settings(central).with_values(escalation__queue_quota_mb=1)
    big = PhantomConfig(size_range=(600, 600))
    paths = []
    for index in range(2):
        paths.append(tmp_path / f"big{index}.dcm")
        phantom_to_dataset(render_phantom(7, index, big)).save_as(
            paths[-1], enforce_file_format=True
        )

    def state(case_id: str) -> CaseState | None:
        with CaseStore.open(settings.case_store_path) as store:
            case = store.get(case_id)
        return None if case is None else case.state

    with ServiceRuntime(settings, uploader=False) as runtime:
        assert runtime.link is not None
        first, second = triage_and_record(paths, settings, queue=runtime.queue())
        assert isinstance(first, CaseResult) and isinstance(second, CaseResult)
        assert state(first.case_id) is CaseState.QUEUED
        runtime.tick()
        assert state(second.case_id) is CaseState.ESCALATION_HELD  # no room yet
        with make_uploader(runtime.link) as uploader:
            assert [a.case_id for a in uploader.drain()] == [first.case_id]

        def queued() -> bool:
            runtime.tick()
            return state(second.case_id) is CaseState.QUEUED

        wait_until(queued, timeout_s=15, interval_s=0.1, what="the held case queued")
        assert [i.case_id for i in runtime.link.outbox.items()] == [first.case_id, second.case_id]


@pytest.mark.expect_log_warnings  # the case larger than the quota, named once
def test_a_held_case_larger_than_the_whole_quota_is_not_re_triaged_every_minute(
    central: Central, device: Device, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No delivery can make room for it and a larger quota needs a restart: it is set aside
    until then, as a case whose file is gone is, instead of its image being read, triaged and
    sealed again at every release pass (every minute, or every tick behind a backlog)."""
    settings = device.settings(central).with_values(escalation__queue_quota_mb=1)
    path = tmp_path / "big.dcm"  # 1000x1000 16-bit: 2 MB, twice the quota
    phantom_to_dataset(render_phantom(7, 0, PhantomConfig(size_range=(1000, 1000)))).save_as(
        path, enforce_file_format=True
    )
    with ServiceRuntime(settings, uploader=False) as runtime:
        (big,) = triage_and_record([path], settings, queue=None)  # held, as before keys came
        assert isinstance(big, CaseResult)
        caplog.clear()
        for _ in range(3):
            runtime._release_at = 0.0  # as when the next pass is due (a minute later)
            runtime.tick()
    tries = [r for r in caplog.records if "not released (exceeds_quota)" in r.getMessage()]
    assert len(tries) == 1, "tried once, then set aside until the next start"
    with CaseStore.open(settings.case_store_path) as store:
        case = store.get(big.case_id)
        assert case is not None and case.state is CaseState.ESCALATION_HELD
        notes = [t.detail for t in store.history(big.case_id) if t.event == NOT_RELEASED]
    assert notes and (notes[-1] or "").startswith("exceeds_quota: outbox: this case (")


def test_health_is_failing_once_the_uploader_thread_is_gone(
    central: Central, device: Device
) -> None:
    port = free_port()
    settings = device.settings(central, **central.public_keys())
    with ServiceRuntime(settings, metrics_port=port) as runtime:
        assert runtime.uploader is not None
        wait_until(lambda: probe_health(port, 1.0)[0] == 0, what="the health endpoint")
        alive = probe_health(port, 5.0)
        runtime.uploader.stop()  # however it ends, escalations no longer leave the device
        gone = probe_health(port, 5.0)

    assert alive == (0, "ok"), alive
    code, line = gone
    assert code == 1 and line == "failing: uploader: uploader thread not running", line


@pytest.mark.expect_log_warnings  # the server's keys cannot be fetched: its certificate
@pytest.mark.timeout(60)
def test_a_wrong_certificate_pin_makes_health_degraded_at_once_not_after_the_grace(
    central: Central, device: Device
) -> None:
    """The five minutes' grace is for outages that end by themselves: a pin one digit off
    never does, so /health must not say "ok" meanwhile."""
    port = free_port()
    wrong = central.pin[:-1] + ("0" if central.pin[-1] != "0" else "1")
    settings = device.settings(central, **{"escalation.tls_pin": wrong})

    with ServiceRuntime(settings, metrics_port=port) as runtime:

        def refused() -> bool:
            snapshot = runtime.connectivity()
            return snapshot is not None and snapshot.last_error_code == "certificate_pin_mismatch"

        wait_until(refused, timeout_s=30, interval_s=0.1, what="the uploader refused the server")
        code, line = probe_health(port, 5.0)

    assert code == 0 and line.startswith("degraded: link: offline for "), line
    assert "(certificate_pin_mismatch): " in line and "escalation.tls_pin" in line, line


# --- what health and metrics must not miss --------------------------------------------------


def local_settings(data_dir: Path, **values: object) -> Settings:
    """A device without a central server, its watch service serving metrics on a free port."""
    return Settings(
        {
            "paths.data_dir": data_dir,
            "processing.workers": 1,
            "watch.settle_s": 0.2,
            "metrics.watch_port": free_port(),
            **values,
        }
    )


def drop_phantom(settings: Settings, name: str, *, modified: float | None = None) -> Path:
    """A phantom renamed into the inbox, as a scanner or a share copy delivers it."""
    staging = settings.data_dir / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    path = staging / name
    phantom_to_dataset(render_phantom(5, len(name))).save_as(path, enforce_file_format=True)
    if modified is not None:
        os.utime(path, (modified, modified))  # kept by `cp -p`, `rsync -t`, an SMB copy
    return path.rename(settings.watch_inbox / name)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_health_is_failing_while_no_case_can_be_recorded_and_ok_again_once_it_can(
    tmp_path: Path,
) -> None:
    settings = local_settings(tmp_path / "data")
    port = settings.metrics_watch_port
    with watch_service(settings, tmp_path):
        # Another process (a hung tool mid-transaction) holds the case store's write lock.
        holder = sqlite3.connect(settings.case_store_path, isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            dropped = drop_phantom(settings, "scan.dcm")
            wait_until(
                lambda: probe_health(port, 5.0)[0] == 1,
                timeout_s=150,
                interval_s=0.5,
                what="health failing",
            )
            _, line = probe_health(port, 5.0)
            failures = scrape(port)["triage_record_failures_total{code=store_error}"]
            assert dropped.exists()  # waiting in the inbox, not lost
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        wait_until(
            lambda: probe_health(port, 5.0) == (0, "ok"),
            timeout_s=120,
            interval_s=0.5,
            what="health ok again",
        )
        filed = sorted(p.name for p in settings.watch_done.iterdir())

    assert line.startswith("failing: store: ") and "not recorded" in line, line
    assert failures >= 3
    assert filed == ["scan.dcm", "scan.dcm.json"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A folder on another file system than ``tmp_path``'s (a tmpfs), removed afterwards."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a file system of its own")
    folder = Path(tempfile.mkdtemp(dir=shm))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_health_is_failing_when_the_case_store_s_own_disk_is_below_the_reserve(
    tmp_path: Path, small_disk: Path
) -> None:
    # The case store on its own file system (paths.case_store), the one with less room: a
    # reserve between the two is met by the data folder's disk and missed by the store's.
    data_free = shutil.disk_usage(tmp_path).free
    store_free = shutil.disk_usage(small_disk).free
    data_dir, store_dir = (
        (tmp_path, small_disk) if store_free < data_free else (small_disk, tmp_path)
    )
    reserve_mb = (data_free + store_free) // 2 // (1024 * 1024)
    port = free_port()
    settings = Settings(
        {
            "paths.data_dir": data_dir / "data",
            "paths.case_store": store_dir / "store" / "cases.sqlite3",
            "receiver.min_free_mb": reserve_mb,
        }
    )
    settings.data_dir.mkdir()  # as the service's intake makes it
    with ServiceRuntime(settings, metrics_port=port):
        code, line = probe_health(port, 5.0)
        samples = scrape(port)

    assert code == 1, line
    assert line.startswith("failing: disk: data: ") and "; store: " in line, line
    assert str(store_dir) not in line
    assert samples["triage_disk_free_bytes{folder=store}"] > 0


class _KeysUnavailable(BaseHTTPRequestHandler):
    """A central server that answers, but never with its keys (a broken key ring, a proxy)."""

    def do_GET(self) -> None:
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.expect_log_warnings  # the server's keys cannot be fetched at start
def test_held_cases_show_in_metrics_and_health_degrades_once_one_is_held_too_long(
    tmp_path: Path,
) -> None:
    central = ThreadingHTTPServer(("127.0.0.1", 0), _KeysUnavailable)
    threading.Thread(target=central.serve_forever, daemon=True).start()
    port = free_port()
    settings = local_settings(
        tmp_path / "data",
        **{
            "escalation.central_url": f"http://127.0.0.1:{central.server_address[1]}",
            "escalation.thresholds_model": EDGE_MODEL_KEY,
            "escalation.normal_below": 0.0,
            "escalation.abnormal_at_or_above": 1.0,
        },
    )
    try:
        with ServiceRuntime(settings, metrics_port=port, uploader=False) as runtime:
            held = triage(settings, tmp_path / "scans", (0, 1), queue=None)
            runtime.refresh(force=True)
            fresh = scrape(port), probe_health(port, 5.0)
            # Held since two hours ago, as if the keys had been failing all that time.
            db = sqlite3.connect(settings.case_store_path)
            with db:
                db.execute("UPDATE cases SET created_at = ?", (_hours_ago(2),))
            db.close()
            runtime.refresh(force=True)
            late = scrape(port), probe_health(port, 5.0)
    finally:
        central.shutdown()
        central.server_close()

    assert len(held) == 2
    samples, health = fresh
    assert samples["triage_held_cases{}"] == 2
    assert samples["triage_outbox_depth{}"] == 0  # the outbox alone would say all is well
    assert health == (0, "ok"), health
    samples, health = late
    assert samples["triage_held_oldest_age_seconds{}"] >= 7200
    code, line = health
    assert code == 0 and line.startswith("degraded: held: 2 held; the oldest for 72"), line


def _hours_ago(hours: float) -> str:
    moment = datetime.now(UTC) - timedelta(hours=hours)
    return moment.isoformat(timespec="milliseconds")


@pytest.mark.timeout(120)
def test_processing_time_runs_from_the_file_s_arrival_not_from_its_own_timestamp(
    tmp_path: Path,
) -> None:
    settings = local_settings(tmp_path / "data")
    with watch_service(settings, tmp_path):
        started = time.monotonic()
        drop_phantom(settings, "copy.dcm", modified=time.time() - 2 * 365 * 86400)
        wait_until(
            lambda: (settings.watch_done / "copy.dcm").exists(),
            timeout_s=60,
            interval_s=0.1,
            what="the file filed",
        )
        wait_until(
            lambda: scrape(settings.metrics_watch_port)["triage_processing_seconds_count{}"] == 1,
            what="the file counted",
        )
        samples = scrape(settings.metrics_watch_port)
        watched_s = time.monotonic() - started

    # Whatever the machine's speed: no longer than the test watched it, not two years.
    assert samples["triage_processing_seconds_sum{}"] <= watched_s


def test_a_taken_metrics_port_is_a_settings_error_not_a_crash(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = run_cli(
            "watch",
            data_dir=tmp_path / "data",
            env={"TRIAGE_APP_METRICS__WATCH_PORT": str(port)},
            timeout=120,
        )

    assert run.returncode == 2, run.stderr
    assert (
        f"config_invalid: metrics.watch_port: cannot listen on 127.0.0.1:{port} "
        "(Address already in use)" in run.stderr
    )


@pytest.mark.parametrize("timeout", ["-1", "nan"])
def test_a_health_time_limit_that_is_not_a_positive_number_is_a_usage_error(
    tmp_path: Path, timeout: str
) -> None:
    run = run_cli("health", "watch", "--timeout", timeout, data_dir=tmp_path / "data")
    assert run.returncode == 2, run.stderr
    assert "--timeout: must be a positive number of seconds" in run.stderr
