"""Delivery end to end: the real uploader against the real central server over pinned TLS.

Every test runs the product's own parts: phantoms with planted identifiers through the triage
pipeline, ``EscalationQueue`` sealing into the SQLite outbox, ``Uploader`` posting through
``CentralClient`` to the server under uvicorn on 127.0.0.1, and, where the network must
misbehave, a real TCP ``FaultProxy`` in between. Only the uploader's clock is injected, to jump
past a backoff without waiting for it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import resource
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

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
    alarms,
    item_of,
    link_for,
    make_uploader,
    other_ed25519_public_key_b64,
    queue_cases,
    start_central_server,
    store_state,
    triage,
)
from tests.fault_proxy import FaultProxy
from tests.helpers import run_cli, wait_until
from triage_app.central.certificates import make_self_signed
from triage_app.central.storage import DICOM_FILE, RESULT_FILE
from triage_app.config import Settings, save_settings
from triage_app.errors import TransportError
from triage_app.escalation.connectivity import ConnectivityState
from triage_app.escalation.envelope import Payload, open_envelope
from triage_app.escalation.outbox import SPOOL_SUFFIX, Outbox, OutboxItem, OutboxState
from triage_app.escalation.receipt import verify_receipt
from triage_app.escalation.server_keys import central_keys_path
from triage_app.escalation.service import EscalationLink
from triage_app.escalation.transport import CentralClient
from triage_app.escalation.uploader import Attempt, Uploader, UploaderConfig, _Schedule
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


def store_path_of(link: EscalationLink, case_id: str) -> list[str]:
    """The states the case store recorded for the case, oldest first."""
    with CaseStore.open(link.settings.case_store_path) as store:
        return [step.to_state.value for step in store.history(case_id)]


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
                assert "connection refused (ECONNREFUSED)" in attempt.detail
                assert attempt.code == "transport_error"
                seen = uploader.connectivity.snapshot()
                assert seen.online is False
                assert seen.offline_since == outage_began
                assert seen.last_error is not None and "connection refused" in seen.last_error
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


def test_drain_once_says_why_cases_wait_and_sends_them_when_the_link_is_back(
    central: Central, device: Device, tmp_path: Path
) -> None:
    """``queue drain``'s pass: a run while the server is down tries one case, asks the
    server's health once, and leaves the others untried (each would spend the connect timeout
    against a silent network); it reports the failure that left the link down. The next run,
    before any backoff has passed, asks the health again and sends every case."""
    central.register(device.identity)
    with FaultProxy("127.0.0.1", central.port) as proxy:
        settings = device.settings(central, url=proxied_url(proxy), **central.public_keys())
        with link_for(settings) as link:
            cases = queue_cases(link, tmp_path / "in", (0, 1))
            clock = FakeClock()
            proxy.refuse()
            with make_uploader(link, clock=clock) as uploader:
                down = uploader.drain_once()

                assert [a.outcome for a in down.attempts] == ["retry"]
                assert (down.sent, down.quarantined, down.waiting) == (0, 0, 2)
                assert sorted(item_of(link, c.case_id).attempts for c in cases) == [0, 1]
                assert down.link_error is not None
                code, message = down.link_error
                assert code == "transport_error"
                assert message == (  # the health request, after the first case failed
                    f"health check: cannot reach https://127.0.0.1:{proxy.port}: connection "
                    "refused (ECONNREFUSED)"
                )
                # The untried case stays due: the next run starts with it.
                assert down.next_attempt_at is not None and down.next_attempt_at <= clock()

            proxy.pass_through()
            # A new run (a fresh uploader, as a new `queue drain`), at the same time: nothing
            # is due, yet the link is asked and the cases go.
            with make_uploader(link, clock=clock) as uploader:
                back = uploader.drain_once()

            assert sorted((a.case_id, a.outcome) for a in back.attempts) == sorted(
                (c.case_id, "delivered") for c in cases
            )
            assert (back.sent, back.quarantined, back.waiting, back.link_error) == (2, 0, 0, None)
    assert central.deliveries() == {c.case_id: 1 for c in cases}


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
            # Refused as from an unknown device: the envelope is sealed anew from its image.
            assert f"{by_cli.case_id}: sealed anew and back in the queue" in retried.stdout
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
    assert audited == [{"case_id": by_cli.case_id, "resealed": True}]
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

                # Given back to the queue, with the documented code.
                assert attempt is not None and attempt.outcome == "retry"
                assert attempt.code == "certificate_pin_mismatch"
                assert attempt.detail.startswith("certificate_pin_mismatch: upload: ")
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
    """Each upload is cut mid-body (a fault of the upload, not of the link: the server's
    health answers), and each attempt takes longer than the backoff it draws: every case is
    tried once, none a second time in the same pass."""
    central.register(device.identity)
    with FaultProxy("127.0.0.1", central.port) as proxy:
        settings = device.settings(central, url=proxied_url(proxy), **central.public_keys())
        with link_for(settings) as link:
            cases = queue_cases(link, tmp_path / "in", (0, 1, 2))
            proxy.cut_after(16 * 1024)  # past a health request, inside every envelope
            with make_uploader(link, clock=SteppingClock(5.0), retry_cap_s=2.0) as uploader:
                attempts = uploader.drain()

            assert sorted((a.case_id, a.outcome) for a in attempts) == sorted(
                (c.case_id, "retry") for c in cases
            )
            assert [item_of(link, c.case_id).attempts for c in cases] == [1, 1, 1]
    assert central.store.count() == 0


def test_a_drain_sends_no_case_twice_when_the_clock_is_set_back_during_it(
    central: Central, device: Device, tmp_path: Path
) -> None:
    """Uploads cut mid-body while the server's health answers, and the clock set back an hour
    once the first upload has begun (NTP correcting a clock that ran ahead): the case that
    failed is not handed back to the same pass (it was, in a tight loop, when asking the
    health made the cases waiting for the link due "now")."""
    central.register(device.identity)
    with FaultProxy("127.0.0.1", central.port) as proxy:
        settings = device.settings(central, url=proxied_url(proxy), **central.public_keys())
        with link_for(settings) as link:
            cases = queue_cases(link, tmp_path / "in", (0, 1))
            proxy.cut_after(16 * 1024)  # past a health request, inside every envelope
            base = FakeClock()

            def clock() -> datetime:
                return base() - (timedelta(hours=1) if proxy.connections else timedelta(0))

            stop = threading.Event()
            timer = threading.Timer(20.0, stop.set)  # bounds the loop this test guards against
            timer.start()
            try:
                with make_uploader(link, clock=clock) as uploader:
                    attempts = uploader.drain(stop=stop)
            finally:
                timer.cancel()

            tried = [a.case_id for a in attempts]
            assert tried and len(tried) == len(set(tried)), f"{len(tried)} attempts: {tried}"
            assert sorted(item_of(link, c.case_id).attempts for c in cases)[-1] == 1
    assert central.store.count() == 0


def test_a_drain_stops_at_the_first_case_when_the_server_is_silent(
    central: Central, device: Device, tmp_path: Path
) -> None:
    """A blackholed link: the first upload and one health request spend their timeouts, and
    the other cases wait untried for the next pass (not one timeout each, in turn)."""
    central.register(device.identity)
    with FaultProxy("127.0.0.1", central.port) as proxy:
        settings = device.settings(
            central,
            url=proxied_url(proxy),
            **central.public_keys(),
            **{"escalation.connect_timeout_s": 0.5, "escalation.read_timeout_s": 1.0},
        )
        with link_for(settings) as link:
            cases = queue_cases(link, tmp_path / "in", (0, 1, 2))
            proxy.blackhole()
            with make_uploader(link) as uploader:
                attempts = uploader.drain()
                seen = uploader.connectivity.snapshot()

            assert [a.outcome for a in attempts] == ["retry"]
            assert sorted(item_of(link, c.case_id).attempts for c in cases) == [0, 0, 1]
            assert seen.online is False
            assert proxy.connections == 2, "one upload, one health request"
    assert central.store.count() == 0


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


# --- 10. Two senders on one outbox (the GUI and a service share it) ------------------------------


class SenderThread:
    """Another sender on the device, as another process would be: a link of its own (outbox
    connection, client, case store) in a thread of its own, sending the next case once."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], datetime] | None = None,
        lease_s: float = 60.0,
    ) -> None:
        self.owner: str | None = None
        self.attempt: Attempt | None = None
        self.error: BaseException | None = None
        self._settings = settings
        self._clock = clock
        self._lease_s = lease_s
        self._thread = threading.Thread(target=self._send, name="other-sender")
        self._thread.start()

    def _send(self) -> None:
        try:
            with (
                link_for(self._settings) as link,
                make_uploader(link, clock=self._clock, lease_s=self._lease_s) as uploader,
            ):
                self.owner = uploader.owner
                self.attempt = uploader.send_next()
        except BaseException as exc:  # noqa: BLE001 - handed to the test, which fails on it
            self.error = exc

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def result(self, timeout_s: float = 60.0) -> Attempt:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the send did not end"
        assert self.error is None, f"the send raised {self.error!r}"
        assert self.attempt is not None, "the sender found nothing to send"
        return self.attempt


def an_hour_later() -> FakeClock:
    """The clock of a sender for which every lease taken now has run out (as when the
    sender holding it was suspended and renewed nothing)."""
    clock = FakeClock()
    clock.advance(3600)
    return clock


def test_a_long_upload_keeps_its_lease_so_no_other_sender_sends_the_case_again(
    central: Central, device: Device, tmp_path: Path
) -> None:
    central.register(device.identity)
    lease_s = 1.0  # renewed every third of it: a renewal may come late without losing it
    with FaultProxy("127.0.0.1", central.port) as proxy:
        keys = central.public_keys()
        slow = device.settings(central, url=proxied_url(proxy), **keys)
        with link_for(device.settings(central, **keys)) as link:
            (case,) = queue_cases(link, tmp_path / "in", (0,))
            proxy.delay(0.4)  # every chunk waits: the upload lasts several leases
            started = time.monotonic()
            first = SenderThread(slow, lease_s=lease_s)
            wait_until(lambda: proxy.bytes_up > 0, what="the upload to begin")
            tries: list[Attempt | None] = []
            with make_uploader(link, lease_s=lease_s) as other:
                while first.running:
                    tries.append(other.send_next())
                    time.sleep(lease_s / 4)
            attempt = first.result()
            took = time.monotonic() - started

    assert took > 2.5 * lease_s, f"the upload took {took:.1f} s: not much longer than its lease"
    assert len(tries) >= 10 and tries == [None] * len(tries), "another sender got the case"
    assert (attempt.outcome, attempt.deliveries) == ("delivered", 1)
    assert central.deliveries() == {case.case_id: 1}


def test_a_receipt_that_comes_after_another_sender_delivered_the_case_is_success(
    central: Central, device: Device, tmp_path: Path
) -> None:
    central.register(device.identity)
    with FaultProxy("127.0.0.1", central.port) as proxy:
        keys = central.public_keys()
        slow = device.settings(central, url=proxied_url(proxy), **keys)
        with link_for(device.settings(central, **keys)) as link:
            (case,) = queue_cases(link, tmp_path / "in", (0,))
            proxy.delay(0.3)
            first = SenderThread(slow)
            wait_until(lambda: proxy.bytes_up > 0, what="the first upload to begin")
            with make_uploader(link, clock=an_hour_later()) as second:
                taken_over = second.send_next()
            late = first.result()
            item = item_of(link, case.case_id)
            state = store_state(link, case.case_id)

    assert taken_over is not None
    assert (taken_over.outcome, taken_over.deliveries) == ("delivered", 1)
    assert (late.outcome, late.deliveries) == ("delivered", 2)
    assert item.state is OutboxState.DELIVERED and item.receipt is not None
    assert json.loads(item.receipt)["receipt"]["deliveries"] == 1, "the first receipt is kept"
    assert state is CaseState.DELIVERED
    assert central.deliveries() == {case.case_id: 2}


def test_a_late_failure_does_not_end_the_lease_of_the_sender_that_took_the_case_over(
    central: Central, device: Device, tmp_path: Path
) -> None:
    central.register(device.identity)
    keys = central.public_keys()
    with (
        FaultProxy("127.0.0.1", central.port) as silent,
        FaultProxy("127.0.0.1", central.port) as slow,
    ):
        silent.blackhole()
        slow.delay(0.3)
        timeouts = {"escalation.connect_timeout_s": 2.0, "escalation.read_timeout_s": 2.0}
        cut_off = device.settings(central, url=proxied_url(silent), **keys, **timeouts)
        slow_but_fine = device.settings(central, url=proxied_url(slow), **keys)
        with link_for(device.settings(central, **keys)) as link:
            (case,) = queue_cases(link, tmp_path / "in", (0,))
            first = SenderThread(cut_off)
            wait_until(lambda: silent.connections > 0, what="the first sender to connect")
            second = SenderThread(slow_but_fine, clock=an_hour_later())
            wait_until(lambda: slow.bytes_up > 0, what="the second upload to begin")
            failed = first.result()
            while_second_sends = item_of(link, case.case_id)
            assert second.running, "the second upload outlasts the first one's timeout"
            delivered = second.result()

    assert (failed.outcome, failed.detail) == ("lease_lost", "another sender took the case over")
    assert while_second_sends.state is OutboxState.IN_FLIGHT
    assert while_second_sends.lease_owner == second.owner
    assert (delivered.outcome, delivered.deliveries) == ("delivered", 1)
    assert central.deliveries() == {case.case_id: 1}


def test_a_case_another_sender_delivers_between_claim_and_read_is_no_error(
    central: Central, device: Device, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    central.register(device.identity)
    settings = device.settings(central, **central.public_keys())
    with link_for(settings) as link, link_for(settings) as other_link:
        (case,) = queue_cases(link, tmp_path / "in", (1,))
        with (
            make_uploader(link) as uploader,
            make_uploader(other_link, clock=an_hour_later()) as other,
        ):
            mirror_sending = uploader._store_sending
            others: list[Attempt | None] = []

            def other_sender_delivers_meanwhile(item: OutboxItem) -> None:
                # The window between the claim and the read of the spool file is a moment
                # wide; the other sender's whole delivery is put into it.
                mirror_sending(item)
                others.append(other.send_next())

            monkeypatch.setattr(uploader, "_store_sending", other_sender_delivers_meanwhile)
            attempt = uploader.send_next()

        assert [a.outcome if a else None for a in others] == ["delivered"]
        assert attempt == Attempt(case.case_id, "delivered", "delivered by another sender")
        assert item_of(link, case.case_id).state is OutboxState.DELIVERED
        assert store_state(link, case.case_id) is CaseState.DELIVERED
    assert central.deliveries() == {case.case_id: 1}


# --- 11. Verdicts polled by two uploaders -------------------------------------------------------


def test_two_uploaders_polling_one_case_store_skip_the_verdicts_the_other_recorded(
    start_central: StartCentral, device: Device, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    central = start_central(model=True)
    central.register(device.identity)
    settings = device.settings(central, **central.public_keys())
    with link_for(settings) as link, link_for(settings) as other_link:
        cases = queue_cases(link, tmp_path / "in", (1, 2))
        with make_uploader(link) as uploader, make_uploader(other_link) as other:
            assert [a.outcome for a in uploader.drain()] == ["delivered", "delivered"]
            assert central.worker.wait_idle(60)
            asked: list[str] = []
            other_got: list[int] = []
            get_verdict = link.client.get_verdict

            def the_other_polls_first(case_id: str, headers: Any) -> Any:
                if not asked:  # both are listed as delivered already: the other records them
                    other_got.append(other.poll_verdicts())
                asked.append(case_id)
                return get_verdict(case_id, headers)

            monkeypatch.setattr(link.client, "get_verdict", the_other_polls_first)
            got = uploader.poll_verdicts()

    assert (got, other_got) == (0, [2])
    assert sorted(asked) == sorted(c.case_id for c in cases), "each case asked, none stopped it"
    for case in cases:
        assert store_path_of(link, case.case_id).count("verdict_received") == 1
        assert store_state(link, case.case_id) is CaseState.VERDICT_RECEIVED


# --- 12. A server that answers is online; Retry-After holds ------------------------------------


@pytest.mark.expect_log_warnings  # the server logs its storage failure
def test_an_overloaded_server_is_not_probed_into_being_sent_the_case_again(
    central: Central, device: Device, tmp_path: Path
) -> None:
    central.register(device.identity)
    settings = device.settings(central, **central.public_keys())
    with link_for(settings) as link:
        (case,) = queue_cases(link, tmp_path / "in", (1,))
        # A file where the case folder must go: storing fails, 503 with Retry-After: 30.
        central.store.case_dir(case.case_id).write_bytes(b"")
    connectivity = ConnectivityState()
    stop = threading.Event()

    def run() -> None:
        with link_for(settings) as own:
            assert own.keys is not None
            uploader = Uploader(
                outbox=own.outbox,
                client=own.client,
                device=own.device,
                keys=own.keys,
                store_path=settings.case_store_path,
                config=UploaderConfig(probe_s=0.1, verdict_poll_s=60.0),
                connectivity=connectivity,
            )
            with uploader:
                uploader.run(stop, idle_s=0.05)

    runner = threading.Thread(target=run, name="uploader")
    runner.start()
    try:
        with link_for(settings) as link:
            wait_until(lambda: item_of(link, case.case_id).attempts >= 1, what="the first try")
            time.sleep(2.0)  # twenty probe intervals
            item = item_of(link, case.case_id)
    finally:
        stop.set()
        runner.join(30)

    assert item.attempts == 1, "posted again before the server's Retry-After"
    assert item.last_error is not None and "HTTP 503" in item.last_error
    tried = datetime.fromisoformat(item.updated_at)
    assert datetime.fromisoformat(item.next_attempt_at) - tried >= timedelta(seconds=29.9)
    seen = connectivity.snapshot()
    assert (seen.online, seen.last_error) == (True, None), "the server answered: link is up"
    assert central.store.count() == 0


@pytest.mark.expect_log_warnings  # the server logs its storage failure
def test_when_the_link_is_back_only_the_cases_that_waited_for_it_go_at_once(
    central: Central, device: Device, tmp_path: Path
) -> None:
    central.register(device.identity)
    with FaultProxy("127.0.0.1", central.port) as proxy:
        settings = device.settings(central, url=proxied_url(proxy), **central.public_keys())
        with link_for(settings) as link:
            queue_cases(link, tmp_path / "in", (1, 2))
            overloaded, cut_off = (item.case_id for item in link.outbox.items())
            central.store.case_dir(overloaded).write_bytes(b"")  # 503, Retry-After: 30
            clock = FakeClock()  # stands still: no wait runs out by itself
            with make_uploader(link, clock=clock, retry_cap_s=3600.0) as uploader:
                answered = uploader.send_next()
                assert answered is not None and answered.case_id == overloaded
                assert "HTTP 503" in answered.detail
                assert uploader.connectivity.snapshot().online is True
                proxy.refuse()
                proxy.kill_connections()  # not the pooled one either
                unanswered = uploader.send_next()
                assert unanswered is not None and unanswered.case_id == cut_off
                assert uploader.connectivity.snapshot().online is False

                proxy.pass_through()
                assert uploader.probe() is True
                attempts = uploader.drain()

            assert [(a.case_id, a.outcome) for a in attempts] == [(cut_off, "delivered")]
            waiting = item_of(link, overloaded)
            assert waiting.attempts == 1
            assert datetime.fromisoformat(waiting.next_attempt_at) >= clock() + timedelta(
                seconds=29.9
            )
    assert central.deliveries() == {cut_off: 1}


# --- 13. Faults that are not the network ---------------------------------------------------------


@contextmanager
def no_free_file_descriptors() -> Iterator[None]:
    """Every descriptor this process may open is taken (EMFILE), as under a descriptor leak."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = [int(entry.name) for entry in Path("/proc/self/fd").iterdir()]
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(in_use) + 1, hard))
    fillers: list[int] = []
    try:
        while True:  # fill the gaps below the limit too
            try:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as err:
                if err.errno != errno.EMFILE:
                    raise
                break
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.expect_log_warnings  # the ALARM
def test_a_spool_file_that_cannot_be_read_now_is_retried_not_quarantined(
    central: Central, device: Device, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    central.register(device.identity)
    settings = device.settings(central, **central.public_keys())
    with link_for(settings) as link:
        (case,) = queue_cases(link, tmp_path / "in", (1,))
        clock = FakeClock()
        with make_uploader(link, clock=clock) as uploader:
            with no_free_file_descriptors():
                attempt = uploader.send_next()

            assert attempt is not None and attempt.outcome == "retry", attempt
            assert "Too many open files" in attempt.detail
            item = item_of(link, case.case_id)
            assert (item.state, item.attempts) == (OutboxState.PENDING, 1)
            assert datetime.fromisoformat(item.next_attempt_at) > clock()
            assert store_state(link, case.case_id) is CaseState.QUEUED
            assert any("cannot be read now" in text for text in alarms(caplog, logging.ERROR))

            clock.advance_past(item.next_attempt_at)
            attempt = uploader.send_next()

            assert attempt is not None
            assert (attempt.outcome, attempt.deliveries) == ("delivered", 1)
    assert central.deliveries() == {case.case_id: 1}


def run_in_thread(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, name="uploader")
    thread.start()
    return thread


@pytest.mark.expect_log_warnings  # the ALARM
def test_a_pass_that_fails_is_an_alarm_and_the_uploader_goes_on_once_the_fault_is_gone(
    central: Central, device: Device, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    central.register(device.identity)
    settings = device.settings(central, **central.public_keys())
    connectivity = ConnectivityState()
    stop = threading.Event()

    def serve() -> None:
        with link_for(settings) as own:
            # A short busy timeout: the locked database fails a pass at once, not after 10 s.
            own.outbox.close()
            own.outbox = Outbox.open(
                settings.case_store_path,
                settings.outbox_dir,
                quota_bytes=settings.queue_quota_bytes,
                busy_timeout_s=0.1,
            )
            with own.uploader() as uploader:
                uploader.connectivity = connectivity
                uploader.run(stop, idle_s=0.05)

    runner = run_in_thread(serve)
    try:
        wait_until(lambda: connectivity.snapshot().online is True, what="the uploader to start")
        locker = sqlite3.connect(settings.case_store_path, isolation_level=None)
        try:
            locker.execute("BEGIN EXCLUSIVE")  # e.g. a backup or a stuck process holds it
            wait_until(lambda: alarms(caplog, logging.ERROR), timeout_s=10, what="the pass's ALARM")
            assert runner.is_alive()
        finally:
            locker.close()
        with link_for(settings) as link:
            (case,) = queue_cases(link, tmp_path / "in", (1,))

            def delivered() -> bool:
                return item_of(link, case.case_id).state is OutboxState.DELIVERED

            wait_until(delivered, timeout_s=30, what="the delivery after the fault")
        assert runner.is_alive()
    finally:
        stop.set()
        runner.join(30)
    [alarm, *_] = alarms(caplog, logging.ERROR)
    assert alarm.startswith("ALARM: an uploader pass failed (OutboxError outbox_error: ")
    assert "database is locked" in alarm
    assert central.deliveries() == {case.case_id: 1}


@pytest.mark.expect_log_warnings  # the ALARM
def test_server_keys_that_cannot_be_kept_do_not_stop_the_uploader(
    central: Central, device: Device, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    central.register(device.identity)
    settings = device.settings(central)  # keys fetched and kept: the uploader refreshes them
    with link_for(settings) as link:
        (case,) = queue_cases(link, tmp_path / "in", (1,))
    stop = threading.Event()

    def serve() -> None:
        with link_for(settings) as own:
            kept = central_keys_path(settings.data_dir)
            kept.unlink()
            kept.mkdir()  # the next refresh cannot write the keys there (IsADirectoryError)
            with own.uploader() as uploader:
                uploader.run(stop, idle_s=0.05)

    runner = run_in_thread(serve)
    try:
        with link_for(settings.with_values(**central.public_keys())) as link:

            def delivered() -> bool:
                return item_of(link, case.case_id).state is OutboxState.DELIVERED

            wait_until(delivered, timeout_s=30, what="the delivery")
        assert runner.is_alive()
    finally:
        stop.set()
        runner.join(30)
    refresh_alarms = [a for a in alarms(caplog, logging.ERROR) if "keys not refreshed" in a]
    assert len(refresh_alarms) == 1 and "IsADirectoryError" in refresh_alarms[0]
    assert str(settings.data_dir) not in refresh_alarms[0], "no paths in the log"
    assert central.deliveries() == {case.case_id: 1}


def test_an_offline_uploader_probes_at_jittered_intervals(
    central: Central, device: Device, tmp_path: Path
) -> None:
    """Devices that lost the server together must not probe it, and send to it, in step."""
    central.register(device.identity)
    with FaultProxy("127.0.0.1", central.port) as proxy:
        settings = device.settings(central, url=proxied_url(proxy), **central.public_keys())
        proxy.refuse()
        with link_for(settings) as link, make_uploader(link) as uploader:
            schedule = _Schedule()
            waits = []
            for _ in range(12):
                schedule.probe_at = 0.0  # due: this pass probes, and fails
                before = time.monotonic()
                uploader._pass(schedule, None, idle_s=0.0)
                waits.append(schedule.probe_at - before)
    probe_s = UploaderConfig().probe_s
    assert all(0.5 * probe_s - 0.5 <= wait <= 1.5 * probe_s + 0.5 for wait in waits), waits
    assert max(waits) - min(waits) > 0.5, waits  # fixed intervals would differ by ~0


# --- 14. A busy server's health keeps the waiting cases' times ---------------------------------


def _central_with_cap(tmp_path: Path, max_connections: int) -> Central:
    """A central server that serves at most ``max_connections`` connections at once; the
    caller stops it."""
    certificate = make_self_signed(tmp_path / "capped-tls")
    return start_central_server(tmp_path / "capped", certificate, max_connections=max_connections)


@contextmanager
def places_held(central: Central, count: int) -> Iterator[None]:
    """``count`` of the server's places taken while the block runs: uploads in progress (the
    server answered ``100 Continue``) whose bodies stall."""

    context = ssl.create_default_context(cafile=str(central.certificate.cert))
    held: list[ssl.SSLSocket] = []
    try:
        for _ in range(count):
            raw = socket.create_connection(("127.0.0.1", central.port), timeout=10)
            try:
                conn = context.wrap_socket(raw, server_hostname="127.0.0.1")
            except BaseException:
                raw.close()
                raise
            held.append(conn)
            conn.sendall(
                (
                    f"POST /v1/cases/{'0' * 64} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    "Content-Type: application/octet-stream\r\nContent-Length: 1000000\r\n"
                    "Expect: 100-continue\r\n\r\n"
                ).encode("ascii")
            )
            assert conn.recv(4096).startswith(b"HTTP/1.1 100 ")
        yield
    finally:
        for conn in held:
            conn.close()


def test_a_probe_that_finds_the_server_busy_marks_the_link_up_but_keeps_the_cases_times(
    device: Device, tmp_path: Path
) -> None:
    """Health is answered at the server's connection cap too, saying "busy": the link works,
    but the cases that waited for it keep their backoff (the server would refuse them now).
    Once it says "ok" they are due at once."""
    central = _central_with_cap(tmp_path, 4)
    try:
        central.register(device.identity)
        with FaultProxy("127.0.0.1", central.port) as proxy:
            settings = device.settings(central, url=proxied_url(proxy), **central.public_keys())
            with link_for(settings) as link:
                cases = queue_cases(link, tmp_path / "in", (1, 2))
                clock = FakeClock()  # stands still: no wait runs out by itself
                with make_uploader(link, clock=clock) as uploader:
                    proxy.refuse()
                    # A pass stops at the first case that finds the link down: two passes.
                    cut_off = uploader.drain() + uploader.drain()
                    assert [a.outcome for a in cut_off] == ["retry", "retry"], cut_off
                    assert uploader.connectivity.snapshot().online is False
                    waiting = {c.case_id: item_of(link, c.case_id).next_attempt_at for c in cases}
                    assert all(datetime.fromisoformat(t) > clock() for t in waiting.values())
                    proxy.pass_through()

                    with places_held(central, 4):
                        assert uploader.probe() is False  # answered, but busy
                        online = uploader.connectivity.snapshot().online
                        after_busy = {c: item_of(link, c).next_attempt_at for c in waiting}
                        assert uploader.drain() == []  # nothing due

                    # A closed connection's place may be seen free up to 0.25 s late.
                    wait_until(uploader.probe, timeout_s=10, interval_s=0.05, what="'ok'")
                    after_ok = {c: item_of(link, c).next_attempt_at for c in waiting}
                    delivered = uploader.drain()
    finally:
        central.thread.stop()

    assert online is True, "the server answered: the link is up"
    assert after_busy == waiting, "a busy server's answer made the waiting cases due"
    assert all(datetime.fromisoformat(t) <= clock() for t in after_ok.values()), after_ok
    assert sorted((a.case_id, a.outcome) for a in delivered) == sorted(
        (c.case_id, "delivered") for c in cases
    )


def test_a_health_answer_without_a_status_counts_as_healthy(
    central: Central, device: Device, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older server's answer, without the status a busy server sends, is taken as today:
    the link is back, the waiting cases go at once."""
    central.register(device.identity)
    with FaultProxy("127.0.0.1", central.port) as proxy:
        settings = device.settings(central, url=proxied_url(proxy), **central.public_keys())
        with link_for(settings) as link:
            (case,) = queue_cases(link, tmp_path / "in", (1,))
            clock = FakeClock()
            with make_uploader(link, clock=clock) as uploader:
                proxy.refuse()
                assert uploader.send_next() is not None
                assert datetime.fromisoformat(item_of(link, case.case_id).next_attempt_at) > clock()
                proxy.pass_through()
                health = link.client.health

                def without_status() -> dict[str, Any]:
                    answer = health()
                    answer.pop("status")
                    return answer

                monkeypatch.setattr(link.client, "health", without_status)
                assert uploader.probe() is True
                due = item_of(link, case.case_id).next_attempt_at
                assert uploader.connectivity.snapshot().online is True

    assert datetime.fromisoformat(due) <= clock()
