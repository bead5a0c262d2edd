"""Delivery end to end: the real uploader against the real central server over pinned TLS.

Every test runs the product's own parts: phantoms with planted identifiers through the triage
pipeline, ``EscalationQueue`` sealing into the SQLite outbox, ``Uploader`` posting through
``CentralClient`` to the server under uvicorn on 127.0.0.1, and, where the network must
misbehave, a real TCP ``FaultProxy`` in between. Only the uploader's clock is injected, to jump
past a backoff without waiting for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from datetime import datetime, timedelta
from pathlib import Path

import pydicom
import pytest

from tests.escalation.conftest import (
    ACCESSION,
    PATIENT_ID,
    PATIENT_NAME,
    Central,
    Device,
    Escalated,
    FakeClock,
    StartCentral,
    link_for,
    make_uploader,
    other_ed25519_public_key_b64,
    queue_cases,
    triage,
)
from tests.fault_proxy import FaultProxy
from tests.helpers import run_cli, wait_until
from triage_app.central.certificates import make_self_signed
from triage_app.central.storage import DICOM_FILE, RESULT_FILE
from triage_app.config import save_settings
from triage_app.errors import TransportError
from triage_app.escalation.envelope import Payload, open_envelope
from triage_app.escalation.outbox import SPOOL_SUFFIX, OutboxItem, OutboxState
from triage_app.escalation.receipt import verify_receipt
from triage_app.escalation.service import EscalationLink
from triage_app.escalation.transport import CentralClient
from triage_app.states import CaseEvent, CaseState
from triage_app.store import CaseStore

ADMIN_PASSWORD = "correct horse battery staple"


def proxied_url(proxy: FaultProxy) -> str:
    return f"https://127.0.0.1:{proxy.port}"


def spool_file(link: EscalationLink, case_id: str) -> Path:
    return link.outbox.spool_dir / f"{case_id}{SPOOL_SUFFIX}"


def spool_gone(link: EscalationLink, case_id: str) -> bool:
    """Whether the case's spool file is removed (that runs on the outbox's helper thread)."""
    link.outbox.wait_for_removals()
    return not spool_file(link, case_id).exists()


def item_of(link: EscalationLink, case_id: str) -> OutboxItem:
    item = link.outbox.get(case_id)
    assert item is not None, f"case {case_id} is not in the outbox"
    return item


def store_state(link: EscalationLink, case_id: str) -> CaseState:
    with CaseStore.open(link.settings.case_store_path) as store:
        case = store.get(case_id)
    assert case is not None
    return case.state


def store_path_of(link: EscalationLink, case_id: str) -> list[str]:
    """The states the case store recorded for the case, oldest first."""
    with CaseStore.open(link.settings.case_store_path) as store:
        return [step.to_state.value for step in store.history(case_id)]


def alarms(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.get_records("call")
        if r.levelno == level
        and r.name == "triage_app.escalation.uploader"
        and "ALARM" in r.getMessage()
    ]


# --- 1. The happy path --------------------------------------------------------------------------


def test_queued_cases_are_delivered_once_and_their_verdicts_come_back(
    start_central: StartCentral, device: Device, tmp_path: Path
) -> None:
    central = start_central(model=True)
    central.register(device.identity)
    settings = device.settings(central)  # no keys configured: fetched over the pinned link
    with link_for(settings) as link:
        cases = queue_cases(link, tmp_path / "in", (0, 1, 2))
        assert [item_of(link, c.case_id).state for c in cases] == [OutboxState.PENDING] * 3
        assert all(spool_file(link, c.case_id).is_file() for c in cases)

        with link.uploader() as uploader:  # wired as the shells wire it
            attempts = uploader.drain()

            assert [(a.case_id, a.outcome, a.deliveries) for a in attempts] == [
                (c.case_id, "delivered", 1) for c in cases
            ]
            stored = {case.case_id: case for case in central.store.cases()}
            assert sorted(stored) == sorted(c.case_id for c in cases)
            for case in cases:
                assert stored[case.case_id].deliveries == 1
                assert stored[case.case_id].device_id == device.identity.device_id
                assert (
                    stored[case.case_id].payload_sha256 == hashlib.sha256(case.payload).hexdigest()
                )
                item = item_of(link, case.case_id)
                assert item.state is OutboxState.DELIVERED
                assert spool_gone(link, case.case_id)
                assert item.receipt is not None
                receipt = verify_receipt(
                    json.loads(item.receipt),
                    central.key_ring.receipt_public_key,
                    case_id=case.case_id,
                    device_id=device.identity.device_id,
                    payload_sha256=item.payload_sha256,
                )
                assert (receipt.deliveries, receipt.server_id) == (1, central.key_ring.server_id)
                assert store_path_of(link, case.case_id)[-3:] == ["queued", "sending", "delivered"]
            link.outbox.wait_for_removals()
            assert list(link.outbox.spool_dir.iterdir()) == []
            assert uploader.connectivity.snapshot().online is True

            def all_verdicts_back() -> bool:
                uploader.poll_verdicts()
                return all(
                    store_state(link, c.case_id) is CaseState.VERDICT_RECEIVED for c in cases
                )

            wait_until(all_verdicts_back, timeout_s=60, interval_s=0.2, what="the central verdicts")

    with CaseStore.open(settings.case_store_path) as store:
        for case in cases:
            kept = store.get(case.case_id)
            assert kept is not None and kept.verdict is not None
            central_verdict = central.store.get_verdict(case.case_id)
            assert central_verdict is not None
            assert kept.verdict == central_verdict.to_json()
            assert kept.verdict["verdict"] in ("normal", "abnormal")
            assert [step.to_state.value for step in store.history(case.case_id)][-4:] == [
                "queued",
                "sending",
                "delivered",
                "verdict_received",
            ]
    assert central.deliveries() == {c.case_id: 1 for c in cases}


# --- 2. An outage -------------------------------------------------------------------------------


def test_an_outage_is_retried_with_capped_backoff_then_delivered_exactly_once(
    central: Central, device: Device, tmp_path: Path
) -> None:
    central.register(device.identity)
    cap_s = 4.0
    with FaultProxy("127.0.0.1", central.port) as proxy:
        settings = device.settings(central, url=proxied_url(proxy), **central.public_keys())
        with link_for(settings) as link:
            (case,) = queue_cases(link, tmp_path / "in", (1,))
            clock = FakeClock()
            proxy.refuse()
            with make_uploader(link, clock=clock, retry_cap_s=cap_s) as uploader:
                outage_began = clock()
                attempt = uploader.send_next()

                assert attempt is not None and attempt.outcome == "retry"
                assert "ConnectionRefusedError" in attempt.detail
                seen = uploader.connectivity.snapshot()
                assert seen.online is False
                assert seen.offline_since == outage_began
                assert seen.last_error is not None and "ConnectionRefusedError" in seen.last_error
                item = item_of(link, case.case_id)
                assert (item.state, item.attempts) == (OutboxState.PENDING, 1)
                assert item.last_error is not None and "cannot reach" in item.last_error
                due = datetime.fromisoformat(item.next_attempt_at)
                # First failure: a full-jitter delay in (0, base 1 s].
                assert clock() < due <= clock() + timedelta(seconds=1)
                assert store_state(link, case.case_id) is CaseState.QUEUED
                assert "send_failed_retrying" in store_path_of(link, case.case_id)
                assert uploader.send_next() is None, "nothing is sent before it is due"

                # The outage goes on: the delay grows, but never beyond the cap.
                for failures in range(2, 8):
                    clock.advance_past(item.next_attempt_at)
                    tried_at = clock()
                    attempt = uploader.send_next()
                    assert attempt is not None and attempt.outcome == "retry"
                    item = item_of(link, case.case_id)
                    assert item.attempts == failures
                    delay = datetime.fromisoformat(item.next_attempt_at) - tried_at
                    ceiling = min(cap_s, 2.0 ** (failures - 1))
                    assert timedelta(0) <= delay <= timedelta(seconds=ceiling), (failures, delay)
                seen = uploader.connectivity.snapshot()
                assert seen.offline_since == outage_began, "the outage began at the first failure"
                assert seen.consecutive_failures == 7
                assert central.store.count() == 0

                proxy.pass_through()
                clock.advance_past(item.next_attempt_at)
                attempt = uploader.send_next()

                assert attempt is not None
                assert (attempt.outcome, attempt.deliveries) == ("delivered", 1)
                back = uploader.connectivity.snapshot()
                assert (back.online, back.offline_since, back.last_error) == (True, None, None)
                assert uploader.send_next() is None
            assert item_of(link, case.case_id).state is OutboxState.DELIVERED
            assert spool_gone(link, case.case_id)
            assert store_state(link, case.case_id) is CaseState.DELIVERED
    assert central.deliveries() == {case.case_id: 1}


# --- 3. Drops ----------------------------------------------------------------------------------


def test_a_drop_in_the_middle_of_the_upload_is_retried_and_stored_once(
    central: Central, device: Device, tmp_path: Path
) -> None:
    central.register(device.identity)
    with FaultProxy("127.0.0.1", central.port) as proxy:
        settings = device.settings(central, url=proxied_url(proxy), **central.public_keys())
        with link_for(settings) as link:
            (case,) = queue_cases(link, tmp_path / "in", (2,))
            envelope_bytes = item_of(link, case.case_id).size_bytes
            cut_at = 8 * 1024
            assert envelope_bytes > 10 * cut_at, "the cut lands inside the body"
            clock = FakeClock()
            proxy.cut_after(cut_at)
            with make_uploader(link, clock=clock) as uploader:
                attempt = uploader.send_next()

                assert attempt is not None and attempt.outcome == "retry", attempt
                assert proxy.bytes_up == cut_at
                assert central.store.count() == 0
                item = item_of(link, case.case_id)
                assert (item.state, item.attempts) == (OutboxState.PENDING, 1)
                assert spool_file(link, case.case_id).is_file()

                proxy.pass_through()
                clock.advance_past(item.next_attempt_at)
                attempt = uploader.send_next()

                assert attempt is not None
                assert (attempt.outcome, attempt.deliveries) == ("delivered", 1)
    assert central.deliveries() == {case.case_id: 1}


def test_a_lost_answer_is_retried_and_counted_as_a_second_delivery_of_one_case(
    central: Central, device: Device, tmp_path: Path
) -> None:
    """The whole request reaches the server, which stores the case, but the answer is lost:
    the retry must get the same receipt (200, deliveries 2), not a second case."""
    central.register(device.identity)
    with FaultProxy("127.0.0.1", central.port) as proxy:
        settings = device.settings(central, url=proxied_url(proxy), **central.public_keys())
        with link_for(settings) as link:
            (case,) = queue_cases(link, tmp_path / "in", (1,))
            envelope = link.outbox.envelope(case.case_id)
            # How many bytes the client sends on a fresh connection for this very request: the
            # same envelope, posted under another case id of the same length, is refused (400)
            # after the server has read all of it.
            before = proxy.bytes_up
            with (
                CentralClient(link.client.config) as probe,
                pytest.raises(TransportError, match="case_id_mismatch"),
            ):
                probe.post_case("f" * 64, envelope)
            request_bytes = proxy.bytes_up - before
            assert request_bytes > len(envelope)
            assert central.store.count() == 0

            clock = FakeClock()
            proxy.cut_after(request_bytes)  # everything reaches the server; nothing comes back
            with make_uploader(link, clock=clock) as uploader:
                attempt = uploader.send_next()

                assert attempt is not None and attempt.outcome == "retry", attempt
                wait_until(lambda: central.store.count() == 1, what="the server to store it")
                assert central.deliveries() == {case.case_id: 1}
                item = item_of(link, case.case_id)
                assert (item.state, item.attempts) == (OutboxState.PENDING, 1)
                assert spool_file(link, case.case_id).is_file(), "kept until a receipt comes"

                proxy.pass_through()
                clock.advance_past(item.next_attempt_at)
                attempt = uploader.send_next()

                assert attempt is not None
                assert (attempt.outcome, attempt.deliveries) == ("delivered", 2)
            item = item_of(link, case.case_id)
            assert item.state is OutboxState.DELIVERED and item.receipt is not None
            assert json.loads(item.receipt)["receipt"]["deliveries"] == 2
            assert spool_gone(link, case.case_id)
    assert central.deliveries() == {case.case_id: 2}
    assert central.store.count() == 1


# --- 4. A silent server -------------------------------------------------------------------------


def test_a_silent_server_is_a_bounded_wait_and_a_retry(
    central: Central, device: Device, tmp_path: Path
) -> None:
    central.register(device.identity)
    connect_s, read_s = 0.5, 0.5
    with FaultProxy("127.0.0.1", central.port) as proxy:
        settings = device.settings(
            central,
            url=proxied_url(proxy),
            **central.public_keys(),
            **{"escalation.connect_timeout_s": connect_s, "escalation.read_timeout_s": read_s},
        )
        with link_for(settings) as link:
            (case,) = queue_cases(link, tmp_path / "in", (1,))
            clock = FakeClock()
            proxy.blackhole()
            with make_uploader(link, clock=clock) as uploader:
                started = time.monotonic()
                attempt = uploader.send_next()
                waited = time.monotonic() - started

                assert attempt is not None and attempt.outcome == "retry"
                assert "timed out" in attempt.detail
                # Over TLS the silence begins at the handshake: the connect timeout bounds it.
                assert waited < connect_s + read_s + 1.5, waited
                assert proxy.stats().bytes_discarded > 0
                assert central.store.count() == 0
                item = item_of(link, case.case_id)
                assert (item.state, item.attempts) == (OutboxState.PENDING, 1)

                proxy.pass_through()
                clock.advance_past(item.next_attempt_at)
                attempt = uploader.send_next()
                assert attempt is not None
                assert (attempt.outcome, attempt.deliveries) == ("delivered", 1)
    assert central.deliveries() == {case.case_id: 1}


def test_an_answer_slower_than_the_read_timeout_is_a_bounded_wait_and_a_retry(
    central: Central, device: Device, tmp_path: Path
) -> None:
    """The request is written, the answer is late: the read timeout fires (not a hang), and
    whatever the late request did on the server, the case is stored once."""
    central.register(device.identity)
    hop_s, read_s = 0.6, 0.5  # every forwarded chunk waits hop_s: the answer is late
    with FaultProxy("127.0.0.1", central.port) as proxy:
        settings = device.settings(
            central,
            url=proxied_url(proxy),
            **central.public_keys(),
            **{"escalation.connect_timeout_s": 5.0, "escalation.read_timeout_s": read_s},
        )
        with link_for(settings) as link:
            # A small payload (a few TLS records), so the request itself is written at once.
            case_id = hashlib.sha256(b"late answer").hexdigest()
            payload = Payload(b'{"reason": "uncertain"}', b"\x00" * 512).to_bytes()
            queue = link.queue
            assert queue is not None
            queue.enqueue(case_id, payload, reason="uncertain")
            clock = FakeClock()
            proxy.delay(hop_s)
            with make_uploader(link, clock=clock) as uploader:
                started = time.monotonic()
                attempt = uploader.send_next()
                waited = time.monotonic() - started

                assert attempt is not None and attempt.outcome == "retry"
                assert "timed out waiting for" in attempt.detail, attempt.detail
                # The handshake crosses the slow proxy twice; then at most the read timeout.
                assert waited < 4 * hop_s + read_s + 2.0, waited

                proxy.pass_through()
                clock.advance_past(item_of(link, case_id).next_attempt_at)
                attempt = uploader.send_next()
                assert attempt is not None and attempt.outcome == "delivered"
                assert attempt.deliveries in (1, 2)
            assert central.store.count() == 1
            assert central.deliveries()[case_id] in (1, 2)


# --- 5. 503 with Retry-After --------------------------------------------------------------------


@pytest.mark.expect_log_warnings  # the server logs its storage failure
def test_a_server_that_cannot_store_is_retried_no_sooner_than_its_retry_after(
    central: Central, device: Device, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    central.register(device.identity)
    settings = device.settings(central, **central.public_keys())
    with link_for(settings) as link:
        (case,) = queue_cases(link, tmp_path / "in", (2,))
        blocker = central.store.case_dir(case.case_id)
        blocker.write_bytes(b"")  # a file where the case folder must go: storing fails
        clock = FakeClock()
        # A cap far below the server's 30 s: Retry-After still wins.
        with make_uploader(link, clock=clock, retry_cap_s=2.0) as uploader:
            tried_at = clock()
            attempt = uploader.send_next()

            assert attempt is not None and attempt.outcome == "retry"
            assert "HTTP 503" in attempt.detail and "retry after 30 s" in attempt.detail
            assert any("answering 503" in r.getMessage() for r in caplog.get_records("call"))
            item = item_of(link, case.case_id)
            assert (item.state, item.attempts) == (OutboxState.PENDING, 1)
            due = datetime.fromisoformat(item.next_attempt_at)
            assert abs(due - tried_at - timedelta(seconds=30)) < timedelta(milliseconds=1)
            assert central.store.count() == 0

            clock.advance(29.9)
            assert uploader.send_next() is None, "retried before the server's Retry-After"
            blocker.unlink()
            clock.advance_past(item.next_attempt_at)
            attempt = uploader.send_next()

            assert attempt is not None
            assert (attempt.outcome, attempt.deliveries) == ("delivered", 1)
    assert central.deliveries() == {case.case_id: 1}


# --- 6. Permanent refusal -----------------------------------------------------------------------


@pytest.mark.expect_log_warnings  # the quarantine alarm
def test_a_refused_case_is_quarantined_with_an_alarm_until_an_admin_retries_it(
    central: Central, device: Device, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = device.settings(central)  # the device is not registered (yet)
    config = save_settings(settings, tmp_path / "settings.toml")
    with link_for(settings) as link:
        by_api, by_cli = queue_cases(link, tmp_path / "in", (1, 2))
        with make_uploader(link) as uploader:
            attempts = uploader.drain()

            assert [(a.case_id, a.outcome) for a in attempts] == [
                (by_api.case_id, "quarantined"),
                (by_cli.case_id, "quarantined"),
            ]
            for case in (by_api, by_cli):
                item = item_of(link, case.case_id)
                assert item.state is OutboxState.QUARANTINED
                assert item.quarantine_reason is not None
                assert item.quarantine_reason.startswith("unknown_device: ")
                assert device.identity.device_id in item.quarantine_reason
                assert spool_file(link, case.case_id).is_file(), "kept for the admin"
                assert store_state(link, case.case_id) is CaseState.QUARANTINED
            warned = alarms(caplog, logging.WARNING)
            assert len(warned) == 2 and all("unknown_device" in text for text in warned)
            assert uploader.connectivity.snapshot().online is True, "the server did answer"
            assert central.store.count() == 0
            assert uploader.drain() == [], "quarantined cases are not sent again"

            central.register(device.identity)
            # An admin action in the API: the outbox and the case store, as the CLI does it.
            link.outbox.retry(by_api.case_id)
            with CaseStore.open(settings.case_store_path) as store:
                store.apply(by_api.case_id, CaseEvent.ADMIN_RETRY, "by the test admin")
            # The same through the CLI, with the admin password.
            common = ("--config", config)
            made = run_cli(
                "config",
                "set-admin-password",
                "--stdin",
                *common,
                data_dir=device.data_dir,
                stdin=f"{ADMIN_PASSWORD}\n",
            )
            assert made.returncode == 0, made.stderr
            wrong = run_cli(
                "queue",
                "retry",
                by_cli.case_id,
                "--admin-password-stdin",
                *common,
                data_dir=device.data_dir,
                stdin="not the password\n",
            )
            assert wrong.returncode == 2 and "admin" in wrong.stderr, wrong.stderr
            assert item_of(link, by_cli.case_id).state is OutboxState.QUARANTINED
            retried = run_cli(
                "queue",
                "retry",
                by_cli.case_id,
                "--admin-password-stdin",
                *common,
                data_dir=device.data_dir,
                stdin=f"{ADMIN_PASSWORD}\n",
            )
            assert retried.returncode == 0, retried.stderr
            assert f"{by_cli.case_id}: back in the queue" in retried.stdout
            for case in (by_api, by_cli):
                item = item_of(link, case.case_id)
                assert (item.state, item.attempts) == (OutboxState.PENDING, 0)
                assert store_state(link, case.case_id) is CaseState.QUEUED

            attempts = uploader.drain()

            assert sorted((a.case_id, a.outcome, a.deliveries) for a in attempts) == sorted(
                (c.case_id, "delivered", 1) for c in (by_api, by_cli)
            )
        for case in (by_api, by_cli):
            assert item_of(link, case.case_id).state is OutboxState.DELIVERED
            assert store_path_of(link, case.case_id)[-5:] == [
                "sending",
                "quarantined",
                "queued",
                "sending",
                "delivered",
            ]
    with CaseStore.open(settings.case_store_path) as store:
        audited = [entry.detail for entry in store.audit_log() if entry.action == "queue.retry"]
    assert audited == [{"case_id": by_cli.case_id}]
    assert central.deliveries() == {by_api.case_id: 1, by_cli.case_id: 1}


@pytest.mark.expect_log_warnings  # the quarantine alarm
def test_a_retry_that_reached_only_the_outbox_still_ends_delivered_in_the_case_store(
    central: Central, device: Device, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = device.settings(central)
    with link_for(settings) as link:
        (case,) = queue_cases(link, tmp_path / "in", (1,))
        with make_uploader(link) as uploader:
            assert [a.outcome for a in uploader.drain()] == ["quarantined"]
            central.register(device.identity)
            link.outbox.retry(case.case_id)  # `queue retry` died before its store.apply
            caplog.clear()

            assert [a.outcome for a in uploader.drain()] == ["delivered"]
        with make_uploader(link) as restarted:  # reconcile() runs on entering
            assert restarted.drain() == []
    assert central.deliveries() == {case.case_id: 1}
    out_of_step = [r.getMessage() for r in caplog.records if "out of step" in r.getMessage()]
    assert out_of_step == []
    assert store_state(link, case.case_id) is CaseState.DELIVERED


# --- 7. Pin mismatch ----------------------------------------------------------------------------


@pytest.mark.expect_log_warnings  # the pin alarm
def test_a_certificate_that_is_not_the_pinned_one_gets_nothing_whatever_the_environment_says(
    central: Central,
    device: Device,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    central.register(device.identity)
    # A CA bundle that trusts the real server, as a well-meaning environment could set it.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(central.certificate.cert))
    monkeypatch.setenv("CURL_CA_BUNDLE", str(central.certificate.cert))
    stale_pin = make_self_signed(tmp_path / "old-tls").sha256  # e.g. the previous certificate
    with FaultProxy("127.0.0.1", central.port) as proxy:
        url = proxied_url(proxy)
        # Without configured keys they cannot be fetched from the wrong server: cases are held.
        fetching = device.settings(central, url=url, **{"escalation.tls_pin": stale_pin})
        with link_for(fetching) as link:
            assert link.keys is None and link.queue is None
        assert not (device.data_dir / "keys" / "central_keys.json").exists()
        assert proxy.bytes_up < 8 * 1024
        wrong = device.settings(central, url=url, **central.public_keys()).with_values(
            **{"escalation.tls_pin": stale_pin}
        )
        with link_for(wrong) as link:
            (case,) = queue_cases(link, tmp_path / "in", (1,))
            size = item_of(link, case.case_id).size_bytes
            before = proxy.bytes_up
            with make_uploader(link) as uploader:
                attempt = uploader.send_next()

                assert attempt is not None and attempt.outcome == "pin_mismatch"
                assert "nothing was sent" in attempt.detail
                assert uploader.connectivity.snapshot().last_error_code == (
                    "certificate_pin_mismatch"
                )
            assert central.store.count() == 0
            sent = proxy.bytes_up - before
            assert 0 < sent < 8 * 1024 < size, "only the TLS handshake went through"
            item = item_of(link, case.case_id)
            assert (item.state, item.attempts) == (OutboxState.PENDING, 1)
            assert spool_file(link, case.case_id).is_file()
            assert alarms(caplog, logging.ERROR), "an ALARM error is logged"

        # The same environment with the right pin: delivered.
        right = wrong.with_values(**{"escalation.tls_pin": central.pin})
        clock = FakeClock()
        with link_for(right) as link, make_uploader(link, clock=clock) as uploader:
            clock.advance_past(item_of(link, case.case_id).next_attempt_at)
            attempt = uploader.send_next()
            assert attempt is not None
            assert (attempt.outcome, attempt.deliveries) == ("delivered", 1)
    assert central.deliveries() == {case.case_id: 1}


# --- 8. A receipt that does not verify ----------------------------------------------------------


@pytest.mark.expect_log_warnings
def test_a_receipt_that_does_not_verify_keeps_the_envelope_for_another_try(
    central: Central, device: Device, tmp_path: Path
) -> None:
    central.register(device.identity)
    keys = central.public_keys()
    impostor = {**keys, "escalation.receipt_public_key": other_ed25519_public_key_b64()}
    settings = device.settings(central, **impostor)
    with link_for(settings) as link:
        (case,) = queue_cases(link, tmp_path / "in", (1,))
        envelope = link.outbox.envelope(case.case_id)
        clock = FakeClock()
        with make_uploader(link, clock=clock) as uploader:
            attempt = uploader.send_next()

            assert attempt is not None and attempt.outcome == "retry"
            assert attempt.detail.startswith("receipt_invalid: ")
            assert central.deliveries() == {case.case_id: 1}, "the server did store it"
            item = item_of(link, case.case_id)
            assert (item.state, item.attempts) == (OutboxState.PENDING, 1)
            assert item.receipt is None and item.delivered_at is None
            assert link.outbox.envelope(case.case_id) == envelope
            assert datetime.fromisoformat(item.next_attempt_at) > clock()
            assert store_state(link, case.case_id) is CaseState.QUEUED

            clock.advance_past(item.next_attempt_at)
            again = uploader.send_next()
            assert again is not None and again.outcome == "retry"
            assert item_of(link, case.case_id).attempts == 2
            assert central.deliveries() == {case.case_id: 2}

    # The right receipt key: the same envelope is accepted as delivered.
    with link_for(settings.with_values(**keys)) as link, make_uploader(link, clock=clock) as up:
        clock.advance_past(item_of(link, case.case_id).next_attempt_at)
        attempt = up.send_next()
        assert attempt is not None
        assert (attempt.outcome, attempt.deliveries) == ("delivered", 3)
        assert spool_gone(link, case.case_id)
    assert central.store.count() == 1


# --- 9. No plaintext at rest --------------------------------------------------------------------


def _forbidden_values(case: Escalated) -> dict[str, str]:
    deidentified = pydicom.dcmread(
        pydicom.filebase.DicomBytesIO(Payload.from_bytes(case.payload).dicom)
    )
    original = case.original
    return {
        "patient name": PATIENT_NAME,
        "patient id": PATIENT_ID,
        "accession": ACCESSION,
        "study uid": str(original.StudyInstanceUID),
        "series uid": str(original.SeriesInstanceUID),
        "sop uid": str(original.SOPInstanceUID),
        "de-identified sop uid": str(deidentified.SOPInstanceUID),
        "de-identified study uid": str(deidentified.StudyInstanceUID),
    }


def test_nothing_identifying_is_written_at_rest_and_the_server_opens_exactly_the_payload(
    central: Central, device: Device, tmp_path: Path
) -> None:
    central.register(device.identity)
    settings = device.settings(central)
    with link_for(settings) as link:
        cases = queue_cases(link, tmp_path / "in", (0, 1, 2))
        forbidden = {
            f"{name} of {case.case_id[:8]}": value
            for case in cases
            for name, value in _forbidden_values(case).items()
        }
        # The identifiers are really in the inputs, and the de-identified UID in the payload.
        for case in cases:
            assert PATIENT_ID.encode() in Path(str(case.result.path)).read_bytes()
            uid = _forbidden_values(case)["de-identified sop uid"].encode()
            assert uid in case.payload

        # Everything beside the case store: the spool, the keys, whatever else is there. (The
        # case store itself keeps pseudonym links to the originals, for this device's eyes.)
        case_store = settings.case_store_path.name
        scanned = [
            path
            for path in sorted(settings.data_dir.rglob("*"))
            if path.is_file() and not path.name.startswith(case_store)
        ]
        spooled = sorted(link.outbox.spool_dir.glob(f"*{SPOOL_SUFFIX}"))
        assert len(spooled) == len(cases) and set(spooled) <= set(scanned)
        for path in scanned:
            data = path.read_bytes()
            for what, value in forbidden.items():
                assert value.encode() not in data, f"{what} in {path}"
                assert value.encode("utf-16-le") not in data, f"{what} (UTF-16) in {path}"
        rows = json.dumps([item.to_json() for item in link.outbox.items()])
        for what, value in forbidden.items():
            assert value not in rows, f"{what} in the outbox rows"
        for path in spooled:
            assert path.stat().st_mode & 0o777 == 0o600
        assert link.outbox.spool_dir.stat().st_mode & 0o777 == 0o700

        # Only the server can open it, and it opens to exactly the payload.
        for case in cases:
            opened = open_envelope(
                spool_file(link, case.case_id).read_bytes(),
                device_public_key=device.identity.public_key(),
                server_keys=central.key_ring.private_keys,
            )
            assert opened.header.case_id == case.case_id
            sent = Payload.from_bytes(case.payload)
            assert (opened.result_json, bytes(opened.dicom)) == (sent.result_json, sent.dicom)
            assert opened.header.payload_sha256 == hashlib.sha256(case.payload).hexdigest()

        with make_uploader(link) as uploader:
            assert [a.outcome for a in uploader.drain()] == ["delivered"] * len(cases)
    for case in cases:
        folder = central.store.case_dir(case.case_id)
        payload = Payload.from_bytes(case.payload)
        assert (folder / DICOM_FILE).read_bytes() == payload.dicom
        assert (folder / RESULT_FILE).read_bytes() == payload.result_json
        assert json.loads(payload.result_json)["case_id"] == case.case_id
    assert list(settings.outbox_dir.iterdir()) == []


# --- Gaps found while writing these tests -------------------------------------------------------


class SteppingClock(FakeClock):
    """Time that moves ``step_s`` on every reading: attempts slower than the backoff (e.g.
    connect timeouts against a silent network), without waiting for them."""

    def __init__(self, step_s: float) -> None:
        super().__init__()
        self.step_s = step_s

    def __call__(self) -> datetime:
        return self.advance(self.step_s)


def test_a_drain_tries_every_due_case_once_even_when_attempts_are_slow(
    central: Central, device: Device, tmp_path: Path
) -> None:
    central.register(device.identity)
    with FaultProxy("127.0.0.1", central.port) as proxy:
        settings = device.settings(central, url=proxied_url(proxy), **central.public_keys())
        with link_for(settings) as link:
            cases = queue_cases(link, tmp_path / "in", (0, 1, 2))
            proxy.refuse()
            with make_uploader(link, clock=SteppingClock(5.0), retry_cap_s=2.0) as uploader:
                attempts = uploader.drain()

            assert sorted(a.case_id for a in attempts) == sorted(c.case_id for c in cases)
            assert [item_of(link, c.case_id).attempts for c in cases] == [1, 1, 1]


@pytest.mark.expect_log_warnings
def test_a_damaged_envelope_is_set_aside_and_the_rest_of_the_queue_is_delivered(
    central: Central, device: Device, tmp_path: Path
) -> None:
    central.register(device.identity)
    settings = device.settings(central, **central.public_keys())
    with link_for(settings) as link:
        damaged, healthy = queue_cases(link, tmp_path / "in", (1, 2))
        spooled = spool_file(link, damaged.case_id)
        data = bytearray(spooled.read_bytes())
        data[len(data) // 2] ^= 0xFF  # bit rot in the ciphertext: only the server can find it
        spooled.write_bytes(bytes(data))
        with make_uploader(link) as uploader:
            attempts = uploader.drain()

        outcomes = {a.case_id: a.outcome for a in attempts}
        assert outcomes[healthy.case_id] == "delivered"
        quarantined = item_of(link, damaged.case_id)
        assert quarantined.state is OutboxState.QUARANTINED
        assert (quarantined.quarantine_reason or "").startswith("envelope_tampered")
    assert central.store.get_case(damaged.case_id) is None


@pytest.mark.parametrize("region", ["header", "signature", "chunk length"])
@pytest.mark.expect_log_warnings
def test_a_damaged_header_or_layout_is_set_aside_without_sending_it(
    central: Central, device: Device, tmp_path: Path, region: str
) -> None:
    central.register(device.identity)
    settings = device.settings(central, **central.public_keys())
    with link_for(settings) as link:
        [case] = queue_cases(link, tmp_path / "in", (1,))
        spooled = spool_file(link, case.case_id)
        data = bytearray(spooled.read_bytes())
        header_end = 12 + int.from_bytes(data[8:12], "big")
        position = {"header": 40, "signature": header_end + 10, "chunk length": header_end + 66}
        data[position[region]] ^= 0x01
        spooled.write_bytes(bytes(data))
        with make_uploader(link) as uploader:
            [attempt] = uploader.drain()

        assert attempt.outcome == "quarantined"
        quarantined = item_of(link, case.case_id)
        assert quarantined.state is OutboxState.QUARANTINED
        assert (quarantined.quarantine_reason or "").startswith("damaged envelope")
    assert central.store.count() == 0


@pytest.mark.expect_log_warnings
def test_another_cases_envelope_in_the_spool_file_is_set_aside_without_sending_it(
    central: Central, device: Device
) -> None:
    central.register(device.identity)
    settings = device.settings(central, **central.public_keys())
    with link_for(settings) as link:
        queue = link.queue
        assert queue is not None
        first, second = hashlib.sha256(b"first").hexdigest(), hashlib.sha256(b"second").hexdigest()
        for case_id in (first, second):  # same sizes, so only the header tells them apart
            payload = Payload(b'{"reason": "uncertain"}', case_id.encode() * 8).to_bytes()
            queue.enqueue(case_id, payload, reason="uncertain")
        spool_file(link, first).write_bytes(spool_file(link, second).read_bytes())
        with make_uploader(link) as uploader:
            attempts = {a.case_id: a for a in uploader.drain()}

        assert attempts[first].outcome == "quarantined"
        assert "not the one queued" in attempts[first].detail
        assert attempts[second].outcome == "delivered"
    assert [case.case_id for case in central.store.cases()] == [second]


@pytest.mark.expect_log_warnings  # the central model cannot read the broken image
def test_one_case_the_central_model_cannot_read_does_not_stop_the_other_verdicts(
    start_central: StartCentral, device: Device, tmp_path: Path
) -> None:
    central = start_central(model=True)
    central.register(device.identity)
    settings = device.settings(central, **central.public_keys())
    readable, unreadable = triage(settings, tmp_path / "in", (1, 2), queue=None)  # held
    with link_for(settings) as link:
        queue = link.queue
        assert queue is not None
        queue.enqueue(readable.case_id, readable.payload, reason="uncertain")
        broken = Payload(Payload.from_bytes(unreadable.payload).result_json, b"not a DICOM file")
        queue.enqueue(unreadable.case_id, broken.to_bytes(), reason="uncertain")
        with make_uploader(link) as uploader:
            assert [a.outcome for a in uploader.drain()] == ["delivered", "delivered"]
            assert central.worker.wait_idle(60)
            assert central.store.get_verdict_failure(unreadable.case_id) is not None
            for _ in range(3):
                uploader.poll_verdicts()

            assert store_state(link, readable.case_id) is CaseState.VERDICT_RECEIVED
            assert uploader.connectivity.snapshot().online is True
