"""A device that was away for long, or whose clock or keys went wrong: nothing is lost or stuck.

The real central server on loopback, the real pipeline, outbox and case store. A server key
rotated and pruned while a case waited, a device clock off by more than the server allows, and
a server that lost a case it had acknowledged.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.escalation.conftest import (
    Central,
    Device,
    FakeClock,
    StartCentral,
    alarms,
    item_of,
    link_for,
    make_uploader,
    queue_cases,
    store_state,
)
from triage_app.admin import retry_refused_cases
from triage_app.escalation.outbox import OutboxState
from triage_app.states import CaseState
from triage_app.store import CaseStore


def _soon() -> datetime:
    """A moment after the key rotation just made: its retired key counts as retired since."""
    return datetime.now(UTC) + timedelta(seconds=1)


@pytest.mark.expect_log_warnings  # the quarantine alarm
def test_a_case_sealed_to_a_pruned_server_key_is_sealed_anew_by_an_admin_retry_and_delivered(
    central: Central, device: Device, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    central.register(device.identity)
    settings = device.settings(central)  # keys fetched from the server, so they can change
    with link_for(settings) as link:
        (case,) = queue_cases(link, tmp_path / "scans", (0,))
        assert link.keys is not None
        old_key = link.keys.server_key.key_id
        queued_sha256 = item_of(link, case.case_id).payload_sha256
        # While the case waited (the device offline for weeks), the server rotated its key and
        # pruned the retired one.
        new_key = central.key_ring.rotate()
        assert central.key_ring.prune(timedelta(0), now=_soon()) == [old_key]

        with link.uploader() as uploader:
            (attempt,) = uploader.drain()
            assert attempt.outcome == "quarantined"
            assert attempt.detail.startswith("unknown_server_key: ")
            assert link.keys.server_key.key_id == new_key, "the refusal made it fetch the keys"

            item = item_of(link, case.case_id)
            assert item.needs_reseal
            assert uploader.drain() == [], "sending the same bytes again would be refused"

            (outcome,) = retry_refused_cases(settings, [case.case_id], "test admin")
            assert outcome.error is None and outcome.resealed
            assert outcome.line() == f"{case.case_id}: sealed anew and back in the queue"
            item = item_of(link, case.case_id)
            assert (item.state, item.attempts) == (OutboxState.PENDING, 0)
            assert item.payload_sha256 == queued_sha256, "the same payload, sealed anew"
            assert store_state(link, case.case_id) is CaseState.QUEUED

            (attempt,) = uploader.drain()
            assert attempt.outcome == "delivered"
    assert central.deliveries() == {case.case_id: 1}
    (received,) = central.store.cases()
    assert received.payload_sha256 == queued_sha256
    with CaseStore.open(settings.case_store_path) as store:
        audited = [e.detail for e in store.audit_log() if e.action == "queue.retry"]
    assert audited == [{"case_id": case.case_id, "resealed": True}]
    assert any("unknown_server_key" in text for text in alarms(caplog, logging.WARNING))


@pytest.mark.expect_log_warnings  # the quarantine alarm
def test_a_case_whose_image_is_gone_stays_quarantined_when_it_cannot_be_sealed_anew(
    central: Central, device: Device, tmp_path: Path
) -> None:
    central.register(device.identity)
    settings = device.settings(central)
    with link_for(settings) as link:
        (case,) = queue_cases(link, tmp_path / "scans", (0,))
        central.key_ring.rotate()
        central.key_ring.prune(timedelta(0), now=_soon())
        with link.uploader() as uploader:
            assert [a.outcome for a in uploader.drain()] == ["quarantined"]
        (tmp_path / "scans" / "scan0.dcm").unlink()

        (outcome,) = retry_refused_cases(settings, [case.case_id], "test admin")
        assert outcome.error is not None and outcome.error.code == "reseal_failed"
        assert "source file missing or unreadable" in str(outcome.error)
        assert outcome.line().startswith(f"{case.case_id}: still quarantined: reseal_failed: ")
        item = item_of(link, case.case_id)
        assert item.state is OutboxState.QUARANTINED
        assert item.quarantine_reason is not None
        assert item.quarantine_reason.startswith("unknown_server_key: ")
    with CaseStore.open(settings.case_store_path) as store:
        actions = [e.action for e in store.audit_log()]
    assert actions[-2:] == ["queue.retry", "queue.retry_failed"]
    assert central.deliveries() == {}


@pytest.mark.expect_log_warnings  # the ALARMs
def test_verdict_polls_refused_for_the_device_clock_leave_the_case_waiting_for_its_verdict(
    start_central: StartCentral, device: Device, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    central = start_central(model=True)
    central.register(device.identity)
    settings = device.settings(central)
    with link_for(settings) as link:
        (case,) = queue_cases(link, tmp_path / "scans", (0,))
        clock = FakeClock()  # the real time, standing still
        with make_uploader(link, clock=clock) as uploader:
            assert [a.outcome for a in uploader.drain()] == ["delivered"]
            central.worker.submit(case.case_id)
            assert central.worker.wait_idle(60)
            assert central.store.get_verdict(case.case_id) is not None

            clock.advance(-360)  # the device clock 6 minutes slow: polls are refused (401)
            assert uploader.poll_verdicts() == 0
            assert store_state(link, case.case_id) is CaseState.DELIVERED, "still waiting"
            refused = alarms(caplog, logging.ERROR)
            assert any("refuses this device's verdict polls" in text for text in refused)

            clock.advance(360)  # the clock put right: the verdict comes
            assert uploader.poll_verdicts() == 1
    with CaseStore.open(settings.case_store_path) as store:
        stored = store.get(case.case_id)
    assert stored is not None and stored.state is CaseState.VERDICT_RECEIVED
    assert stored.verdict is not None and stored.verdict.get("verdict") in ("normal", "abnormal")


@pytest.mark.expect_log_warnings  # the ALARM
def test_a_delivered_case_the_server_no_longer_has_raises_one_alarm_and_is_still_asked_for(
    central: Central, device: Device, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    central.register(device.identity)
    settings = device.settings(central)
    with link_for(settings) as link:
        (case,) = queue_cases(link, tmp_path / "scans", (0,))
        with make_uploader(link, clock=FakeClock()) as uploader:
            assert [a.outcome for a in uploader.drain()] == ["delivered"]
            # The server's database restored from a backup older than the delivery.
            with central.store._db.write("forget the case") as conn:
                for table in ("envelopes", "verdicts", "verdict_failures", "cases"):
                    conn.execute(f"DELETE FROM {table} WHERE case_id = ?", (case.case_id,))
            for _ in range(3):
                assert uploader.poll_verdicts() == 0
    lost = [a for a in alarms(caplog, logging.ERROR) if "does not know delivered case" in a]
    assert len(lost) == 1 and case.case_id in lost[0]
    assert store_state(link, case.case_id) is CaseState.DELIVERED
