"""The services' shared runtime, end to end: ``triage-app watch`` as a service manager runs it,
with the real central server on loopback, its metrics and health over HTTP.

The watch service escalates every phantom (the device thresholds send them all), so its
background uploader has to deliver each one exactly once and bring the verdicts back, while
``/metrics`` and ``triage-app health`` report what happened.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.dcmtk import free_port
from tests.escalation.conftest import (
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
from triage_app.config import save_settings
from triage_app.headless import ServiceRuntime
from triage_app.metrics import probe_health
from triage_app.results import CaseResult
from triage_app.states import CaseState
from triage_app.store import CaseStore
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


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_watch_service_delivers_its_escalations_and_reports_them(
    central: Central, device: Device, tmp_path: Path
) -> None:
    port = free_port()
    settings = device.settings(central).with_values(
        **{"watch.settle_s": 0.2, "metrics.watch_port": port, "escalation.retry_cap_s": 2.0}
    )
    config = save_settings(settings, tmp_path / "settings.toml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_APP_")}
    service = subprocess.Popen(
        [sys.executable, "-m", "triage_app", "watch", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(
            lambda: probe_health(port, 1.0)[0] == 0,
            timeout_s=60,
            interval_s=0.2,
            what="the service's health endpoint",
        )
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
    finally:
        service.send_signal(signal.SIGTERM)
        _, stderr = service.communicate(timeout=60)

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
