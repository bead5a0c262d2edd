"""The uploader thread the GUI, watch service and receiver run: it delivers, follows, stops."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.escalation.conftest import (
    Central,
    Device,
    FakeClock,
    StartCentral,
    link_for,
    make_uploader,
    queue_cases,
)
from tests.fault_proxy import FaultProxy
from tests.helpers import wait_until
from triage_app.config import Settings
from triage_app.escalation.background import BackgroundUploader
from triage_app.escalation.outbox import OutboxState
from triage_app.escalation.server_keys import central_keys_path
from triage_app.escalation.service import EscalationLink
from triage_app.states import CaseState
from triage_app.store import CaseStore


@pytest.fixture
def central(central: Central, device: Device) -> Central:
    """The shared fixture's server (no model), here knowing the device."""
    central.register(device.identity)
    return central


@contextlib.contextmanager
def running_uploader(settings: Settings) -> Iterator[BackgroundUploader]:
    """A started background uploader, stopped (waited for) when the block ends."""
    uploader = BackgroundUploader(settings)
    uploader.start()
    try:
        yield uploader
    finally:
        uploader.stop()


def wait_delivered(
    link: EscalationLink, case_id: str, *, timeout_s: float = 30, what: str = "the delivery"
) -> None:
    """Wait until the outbox has ``case_id`` delivered."""

    def delivered() -> bool:
        item = link.outbox.get(case_id)
        return item is not None and item.state is OutboxState.DELIVERED

    wait_until(delivered, timeout_s=timeout_s, what=what)


def test_the_background_uploader_delivers_what_is_queued_and_fetches_verdicts(
    start_central: StartCentral, device: Device, tmp_path: Path
) -> None:
    central = start_central(model=True)
    central.register(device.identity)
    settings = device.settings(central).with_values(escalation__verdict_poll_s=1.0)
    with link_for(settings) as link:
        cases = queue_cases(link, tmp_path / "scans", (0, 1))
    with running_uploader(settings) as uploader:

        def all_have_verdicts() -> bool:
            with CaseStore.open(settings.case_store_path) as store:
                return all(
                    (c := store.get(case.case_id)) is not None
                    and c.state is CaseState.VERDICT_RECEIVED
                    for case in cases
                )

        wait_until(all_have_verdicts, timeout_s=60, what="every verdict")
        assert uploader.snapshot().online is True
    assert not uploader.running
    assert central.deliveries() == {case.case_id: 1 for case in cases}


@pytest.mark.expect_log_warnings
def test_the_background_uploader_waits_for_an_unreachable_server_and_then_delivers(
    central: Central, device: Device, tmp_path: Path
) -> None:
    with FaultProxy("127.0.0.1", central.port) as proxy:
        proxy.refuse()
        settings = device.settings(central, url=f"https://127.0.0.1:{proxy.port}").with_values(
            escalation__retry_cap_s=1.0
        )
        with running_uploader(settings) as uploader:
            wait_until(lambda: uploader.snapshot().online is False, what="the offline state")
            assert uploader.snapshot().offline_since is not None
            assert not central_keys_path(settings.data_dir).exists()  # keys not known yet
            proxy.pass_through()
            wait_until(
                lambda: central_keys_path(settings.data_dir).exists(),
                timeout_s=30,
                what="the server's keys",
            )
            with link_for(settings) as link:
                cases = queue_cases(link, tmp_path / "scans", (0,))
                wait_delivered(link, cases[0].case_id)
    assert central.deliveries() == {cases[0].case_id: 1}


def test_when_the_link_comes_back_waiting_cases_go_without_waiting_out_their_backoff(
    central: Central, device: Device, tmp_path: Path
) -> None:
    clock = FakeClock()  # stands still: no backoff runs out by itself in this test
    with FaultProxy("127.0.0.1", central.port) as proxy:
        settings = device.settings(
            central, url=f"https://127.0.0.1:{proxy.port}", **central.public_keys()
        )
        with link_for(settings) as link:
            cases = queue_cases(link, tmp_path / "scans", (0, 1))
            clock.advance(1)  # just after they were queued
            proxy.refuse()
            with make_uploader(link, clock=clock, retry_cap_s=3600.0) as uploader:
                # A pass stops at the first case that finds the link down: two passes.
                tried = uploader.drain() + uploader.drain()
                assert [a.outcome for a in tried] == ["retry", "retry"]
                assert uploader.send_next() is None  # both wait out their backoff
                assert uploader.probe() is False  # still down
                assert uploader.connectivity.snapshot().online is False

                proxy.pass_through()
                assert uploader.probe() is True
                delivered = uploader.drain()

    assert sorted(a.case_id for a in delivered if a.outcome == "delivered") == sorted(
        c.case_id for c in cases
    )
    assert central.deliveries() == {c.case_id: 1 for c in cases}


@pytest.mark.expect_log_warnings  # the ALARMs
def test_the_background_uploader_outlives_a_damaged_key_file_and_delivers_once_it_is_gone(
    central: Central,
    device: Device,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = device.settings(central).with_values(escalation__retry_cap_s=1.0)
    kept = central_keys_path(settings.data_dir)
    kept.write_text('{"server_public_key": ', encoding="utf-8")  # cut short by a crash

    def alarms() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.ERROR and r.getMessage().startswith("ALARM: the uploader")
        ]

    with running_uploader(settings) as uploader:
        wait_until(lambda: len(alarms()) >= 2, timeout_s=30, what="it to fail, wait, fail again")
        alive_after_failures = uploader.running
        assert all("KeyFileError key_invalid" in alarm for alarm in alarms())
        assert alive_after_failures
        kept.unlink()  # as the alarm's message says: delete it to fetch the keys again
        wait_until(kept.exists, timeout_s=30, what="the server's keys fetched and kept")
        with link_for(settings) as link:
            (case,) = queue_cases(link, tmp_path / "scans", (0,))
            wait_delivered(link, case.case_id)
        alive_after_delivery = uploader.running
    assert alive_after_delivery
    assert central.deliveries() == {case.case_id: 1}


def test_stopping_for_an_exit_leaves_a_stuck_upload_and_the_next_start_delivers_it_once(
    central: Central,
    device: Device,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The desktop app closing must not wait out a slow upload (minutes on a bad link)."""
    with FaultProxy("127.0.0.1", central.port) as proxy:
        settings = device.settings(
            central, url=f"https://127.0.0.1:{proxy.port}", **central.public_keys()
        ).with_values(
            escalation__connect_timeout_s=3.0,
            escalation__read_timeout_s=3.0,
            escalation__retry_cap_s=1.0,
        )
        with link_for(settings) as link:
            cases = queue_cases(link, tmp_path / "scans", (0,))
        proxy.blackhole()  # connections open, nothing ever answers
        stuck = BackgroundUploader(settings)
        stuck.start()
        wait_until(lambda: proxy.connections >= 1, what="an upload under way")
        caplog.set_level(logging.INFO, logger="triage_app.escalation.background")
        stuck.stop(0.2, may_abandon=True)
        assert stuck.running  # left to die with the process
        assert "sent again at the next start" in caplog.text
        assert "did not stop" not in caplog.text

        proxy.pass_through()
        try:
            with running_uploader(settings), link_for(settings) as link:
                wait_delivered(
                    link, cases[0].case_id, timeout_s=60, what="the delivery after the restart"
                )
        finally:
            wait_until(lambda: not stuck.running, timeout_s=30, what="the left upload's end")
    assert central.deliveries() == {cases[0].case_id: 1}
