"""Drains the outbox to the central server and brings the verdicts back.

Runs in the background of the GUI, the watch service and the receiver, or alone as
``triage-app queue drain [--follow]``. Each attempt claims one envelope with a lease (so a
crashed sender's case is picked up again, and two senders never send the same one), keeps the
lease alive while the upload lasts, posts it, and acts on the answer:

* a receipt that verifies → the outbox marks the case delivered and deletes the envelope;
* 408/429/5xx, a network error, or a receipt that does not verify → back to pending with a
  full-jitter delay (never shorter than ``Retry-After``);
* any other 4xx → quarantined with an alarm, until an admin retries it;
* a certificate that is not the pinned one → nothing is sent, the case stays queued, alarm;
* a spool file that cannot be read now (descriptors, I/O, a busy database) → retried later with
  an alarm; only a file that is really damaged is quarantined.

Any answer from the server, whatever its status, means the link works: only errors without
one (refused, reset, timed out) make the link "offline", and only the cases they left waiting
go at once when it is back. A case the server asked to wait keeps its time.

The outbox is the truth about delivery; the case store mirrors it as state history for the
GUI, and is brought back in line at start if a crash fell between the two.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from triage_app.errors import (
    CertificatePinError,
    ConfigError,
    EnvelopeError,
    IllegalTransitionError,
    OutboxError,
    PermanentRejectionError,
    ReceiptError,
    StoreError,
    TransportError,
    TriageError,
    where_raised,
)
from triage_app.escalation.backoff import backoff_ceiling, next_delay
from triage_app.escalation.connectivity import ConnectivityState
from triage_app.escalation.envelope import check_sealed
from triage_app.escalation.keys import DeviceIdentity
from triage_app.escalation.outbox import (
    LeaseRenewer,
    Outbox,
    OutboxItem,
    OutboxState,
    SpoolFileDamagedError,
)
from triage_app.escalation.receipt import Receipt, sign_request, verify_receipt
from triage_app.escalation.server_keys import CentralKeys
from triage_app.escalation.transport import (
    CentralClient,
    PostOutcome,
    http_status_of,
    retry_after_of,
)
from triage_app.states import CaseEvent, CaseState
from triage_app.store import CaseStore

log = logging.getLogger(__name__)

DEFAULT_LEASE_S = 300.0
# A sending lease is renewed when this fraction of it has passed: two renewals can fail (a busy
# database) before another sender could take the case over.
_RENEW_FRACTION = 1 / 3
# How long the lease keeper's thread waits for the next send before it ends.
_KEEPER_IDLE_S = 1.0
# A verdict poll refused with these refuses the device (401 bad signature or clock, unknown
# device; 403 revoked), not the case: no answer about the case to record.
_DEVICE_REFUSED = frozenset({401, 403})
# Events that bring a case in the store to SENDING from where a crash may have left it.
_TO_SENDING: dict[CaseState, tuple[CaseEvent, ...]] = {
    CaseState.ESCALATION_HELD: (CaseEvent.ENQUEUE, CaseEvent.START_SEND),
    CaseState.QUEUED: (CaseEvent.START_SEND,),
    # An admin retry that reached the outbox but not the case store (crash in between).
    CaseState.QUARANTINED: (CaseEvent.ADMIN_RETRY, CaseEvent.START_SEND),
    CaseState.SEND_FAILED_RETRYING: (CaseEvent.RETRY, CaseEvent.START_SEND),
    CaseState.SENDING: (CaseEvent.SEND_FAILED, CaseEvent.RETRY, CaseEvent.START_SEND),
}


@dataclass(frozen=True)
class Attempt:
    """What one delivery attempt did (for the CLI's progress lines and for tests)."""

    case_id: str
    # delivered | retry (given back to the queue) | quarantined | lease_lost (another sender
    # took the case over while this one worked: it is that sender's to report)
    outcome: str
    detail: str
    deliveries: int | None = None  # the server's count, once delivered
    #: The stable error code of a case not delivered (docs/error-codes.md: ``transport_error``,
    #: ``certificate_pin_mismatch``, ``receipt_invalid``, the server's refusal code, ...).
    code: str | None = None


@dataclass(frozen=True)
class DrainReport:
    """What one :meth:`Uploader.drain_once` did, and what it left."""

    attempts: list[Attempt]
    waiting: int  # cases pending or in flight after the run
    #: ``(code, message)`` of the failure that left the link down at the end (no answer from
    #: the server, or a certificate that is not the pinned one); None when it answered.
    link_error: tuple[str, str] | None
    next_attempt_at: datetime | None  # when the next waiting case is due

    @property
    def sent(self) -> int:
        """Delivered by this run (not those another sender delivered meanwhile)."""
        return sum(a.outcome == "delivered" and a.deliveries is not None for a in self.attempts)

    @property
    def quarantined(self) -> int:
        return sum(a.outcome == "quarantined" for a in self.attempts)

    @property
    def last_failure(self) -> Attempt | None:
        """The last attempt of this run that gave its case back to the queue."""
        return next((a for a in reversed(self.attempts) if a.outcome == "retry"), None)


@dataclass(frozen=True)
class UploaderConfig:
    retry_cap_s: float = 60.0
    lease_s: float = DEFAULT_LEASE_S
    verdict_poll_s: float = 15.0
    key_refresh_s: float = 3600.0  # how often a following uploader asks for the server's keys
    # While offline, how often to ask the server's health (on average: each wait is drawn from
    # half to one and a half times it): when the link is back, the cases that waited for it go
    # at once instead of each waiting out its backoff (up to the cap).
    probe_s: float = 5.0


@dataclass
class _Schedule:
    """When :meth:`Uploader.run` next refreshes the keys, probes the link and polls verdicts
    (``time.monotonic()``; 0: at the first pass)."""

    refresh_at: float = 0.0
    probe_at: float = 0.0
    poll_at: float = 0.0


class Uploader:
    """One sender: claims, posts, verifies receipts, records states, polls verdicts."""

    def __init__(
        self,
        *,
        outbox: Outbox,
        client: CentralClient,
        device: DeviceIdentity,
        keys: CentralKeys,
        store_path: Path | None,
        config: UploaderConfig | None = None,
        connectivity: ConnectivityState | None = None,
        owner: str | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], datetime] | None = None,
        refresh_keys: Callable[[], CentralKeys] | None = None,
    ) -> None:
        self.outbox = outbox
        self.client = client
        self.device = device
        self.keys = keys
        self.store_path = store_path
        self.config = config or UploaderConfig()
        self.connectivity = connectivity or ConnectivityState()
        self.owner = owner or _owner_name()
        self._rng = rng or random.Random()
        self._clock = clock or (lambda: datetime.now(UTC))
        self._store: CaseStore | None = None
        self._refresh_keys = refresh_keys
        self._unknown_to_server: set[str] = set()
        self._keeper = _LeaseKeeper(outbox, self.owner, self.config.lease_s, self._clock)
        # An uploader dropped without ``with`` (a script, a benchmark) stops its helper too.
        weakref.finalize(self, self._keeper.close)

    # --- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> Uploader:
        if self.store_path is not None:
            self._store = CaseStore.open(self.store_path)
            self.reconcile()
        return self

    def __exit__(self, *_: object) -> None:
        self._keeper.close()
        if self._store is not None:
            self._store.close()
            self._store = None

    def reconcile(self) -> None:
        """After a crash: take back the cases a dead sender held, and bring the case store in
        line with the outbox where the crash fell between the two."""
        self.outbox.release_leases(_owner_is_dead, now=self._clock())
        for item in self.outbox.items():
            if item.state is OutboxState.DELIVERED:
                self._store_to(item.case_id, CaseState.DELIVERED)
            elif item.state is OutboxState.QUARANTINED:
                self._store_to(item.case_id, CaseState.QUARANTINED)

    # --- one attempt ----------------------------------------------------------------------------

    def send_next(self, *, due_by: datetime | None = None) -> Attempt | None:
        """Deliver the next envelope due (by ``due_by``, default now), if any; else None."""
        item = self.outbox.claim_next(
            self.owner, self.config.lease_s, now=self._clock(), due_by=due_by
        )
        if item is None:
            return None
        with self._keeper.kept(item.case_id):
            self._store_sending(item)
            return self._send(item)

    def _send(self, item: OutboxItem) -> Attempt:
        """Read, post and report one claimed case (its lease kept meanwhile)."""
        try:
            envelope = self._envelope(item)
        except (SpoolFileDamagedError, EnvelopeError) as err:
            return self._set_aside(item, err)
        except OutboxError as err:
            return self._unreadable(item, err)
        try:
            outcome = self.client.post_case(item.case_id, envelope)
            receipt = verify_receipt(
                outcome.body,
                self.keys.receipt_key,
                case_id=item.case_id,
                device_id=self.device.device_id,
                payload_sha256=item.payload_sha256,
            )
        except CertificatePinError as err:
            log.error("ALARM: central server certificate is not the pinned one: %s", err.message)
            # The pinned server was not reached: for the queue that is a link down.
            self.connectivity.mark_failure(err.code, err.message, self._clock())
            return self._retry(item, err, "retry", wait_for_link=True)
        except PermanentRejectionError as err:
            self.connectivity.mark_success(self._clock())  # the server answered
            if getattr(err, "server_code", None) == "unknown_server_key":
                self.follow_key_rotation()  # so that `queue retry` re-seals to the new key
            return self._quarantine(item, err)
        except ReceiptError as err:
            log.error("ALARM: the receipt for case %s does not verify: %s", item.case_id,
                      err.message)  # fmt: skip
            self.connectivity.mark_success(self._clock())  # the server answered
            return self._retry(item, err, "retry")
        except TransportError as err:
            return self._retry(item, err, "retry", wait_for_link=self._link_trouble(err))
        return self._delivered(item, outcome, receipt)

    def _delivered(self, item: OutboxItem, outcome: PostOutcome, receipt: Receipt) -> Attempt:
        self.outbox.mark_delivered(
            item.case_id,
            json.dumps(outcome.body, sort_keys=True),
            owner=self.owner,
            now=self._clock(),
        )
        self._store_delivered(item.case_id, f"receipt from {receipt.server_id}")
        was_offline = self.connectivity.snapshot().online is False
        self.connectivity.mark_success(self._clock())
        if was_offline:
            # The link is back: the cases still waiting for it go now too.
            self.outbox.due_now(now=self._clock())
        log.info("case %s delivered (server count %d)", item.case_id, receipt.deliveries)
        return Attempt(item.case_id, "delivered", receipt.server_id, receipt.deliveries)

    def _retry(
        self, item: OutboxItem, err: TriageError, kind: str, *, wait_for_link: bool = False
    ) -> Attempt:
        """Give the case back to the queue with a backoff (never shorter than the server's
        ``Retry-After``); ``wait_for_link``: it failed because the network is down."""
        now = self._clock()
        delay = next_delay(
            item.attempts, retry_after_of(err), cap_s=self.config.retry_cap_s, rng=self._rng
        )
        detail = f"{err.code}: {err.message}"
        given_back = self.outbox.mark_failed(
            item.case_id,
            detail,
            now + timedelta(seconds=delay),
            owner=self.owner,
            wait_for_link=wait_for_link,
            now=now,
        )
        if not given_back:
            return self._lease_lost(item)
        self._store_event(item.case_id, CaseEvent.SEND_FAILED, err.code)
        self._store_event(item.case_id, CaseEvent.RETRY, f"next attempt in {delay:.1f} s")
        log.info(
            "case %s not delivered (%s); next attempt in %.1f s", item.case_id, err.code, delay
        )
        return Attempt(item.case_id, kind, detail, code=err.code)

    def _envelope(self, item: OutboxItem) -> memoryview:
        """The case's envelope, if it is this device's envelope for this case and payload and
        whole: what can be checked without hashing it (the server checks every byte)."""
        envelope = self.outbox.envelope(item)
        header = check_sealed(envelope, self.device.public_key())
        if header.case_id != item.case_id or header.payload_sha256 != item.payload_sha256:
            raise SpoolFileDamagedError(
                f"outbox: the envelope of case {item.case_id} is not the one queued"
            )
        return envelope

    def _set_aside(self, item: OutboxItem, err: SpoolFileDamagedError | EnvelopeError) -> Attempt:
        """A damaged spool file cannot be sent or repaired here; set it aside for the admin
        instead of stopping the queue behind it."""
        reason = f"damaged envelope: {err.message}"
        if not self.outbox.quarantine(item.case_id, reason, owner=self.owner, now=self._clock()):
            return self._lease_lost(item)
        self._store_event(item.case_id, CaseEvent.QUARANTINE, "damaged envelope")
        log.error("ALARM: the envelope of case %s is damaged; quarantined", item.case_id)
        return Attempt(item.case_id, "quarantined", f"{err.code}: {err.message}", code=err.code)

    def _unreadable(self, item: OutboxItem, err: OutboxError) -> Attempt:
        """The spool file could not be read now (a descriptor limit, an I/O error, a busy
        database): nothing says it is damaged, so it is tried again after a backoff. Or another
        sender delivered the case between the claim and the read: then that is the outcome."""
        attempt = self._retry(item, err, "retry")
        if attempt.outcome == "retry":
            log.error(
                "ALARM: the envelope of case %s cannot be read now (%s); it stays queued",
                item.case_id,
                err.message,
            )
        return attempt

    def _quarantine(self, item: OutboxItem, err: PermanentRejectionError) -> Attempt:
        code = str(getattr(err, "server_code", err.code))
        reason = f"{code}: {getattr(err, 'server_message', err.message)}"
        if not self.outbox.quarantine(item.case_id, reason, owner=self.owner, now=self._clock()):
            return self._lease_lost(item)
        self._store_event(item.case_id, CaseEvent.QUARANTINE, reason)
        log.warning("ALARM: case %s refused by the central server and quarantined (%s)",
                    item.case_id, code)  # fmt: skip
        return Attempt(item.case_id, "quarantined", reason, code=code)

    def _lease_lost(self, item: OutboxItem) -> Attempt:
        """The lease ran out during this attempt and another sender took the case over (this
        process was suspended, or the renewals failed): its outcome is that sender's to report.
        If that sender has delivered it already, so be it."""
        current = self.outbox.get(item.case_id)
        if current is not None and current.state is OutboxState.DELIVERED:
            self._store_delivered(item.case_id, "delivered by another sender")
            log.info("case %s was delivered by another sender meanwhile", item.case_id)
            return Attempt(item.case_id, "delivered", "delivered by another sender")
        log.info("case %s was taken over by another sender; left to it", item.case_id)
        return Attempt(item.case_id, "lease_lost", "another sender took the case over")

    def _link_trouble(self, err: TransportError) -> bool:
        """Record what a transport error says about the link; True when it is down.

        An HTTP answer of any status (a 503, a 429) proves the link works: the server is
        unwell, not unreachable, and its ``Retry-After`` is what decides the wait.
        """
        if http_status_of(err) is None:
            self.connectivity.mark_failure(err.code, err.message, self._clock())
            return True
        self.connectivity.mark_success(self._clock())
        return False

    # --- loops ----------------------------------------------------------------------------------

    def drain(self, *, stop: threading.Event | None = None) -> list[Attempt]:
        """Try every envelope that is due now, once each; what remains waits for its time.

        An attempt that finds the link down ends the pass unless the server's health answers
        at once: against a silent network each case would otherwise spend the whole connect
        timeout in turn (a thousand cases, hours). A fault of one upload only (a reset
        mid-body) does not stop the others, as the health answers then.
        """
        attempts: list[Attempt] = []
        started = self._clock()
        # A clock set back during the pass would make the cases that failed in it due again.
        while (stop is None or not stop.is_set()) and self._clock() >= started:
            attempt = self.send_next(due_by=started)
            if attempt is None:
                break
            attempts.append(attempt)
            if self.connectivity.snapshot().online is False and not self._link_back(started):
                break
        return attempts

    def _link_back(self, due_by: datetime) -> bool:
        """After an attempt found the link down: whether another case is due by ``due_by`` and
        the server's health answers "ok". The cases that wait for the link keep their time:
        making them due now (:meth:`probe`) would hand the one that just failed back to this
        pass."""
        due_at = self.outbox.next_attempt_at()
        return due_at is not None and due_at <= due_by and self._server_healthy()

    def drain_once(self) -> DrainReport:
        """``queue drain`` without ``--follow``: every case due now, once, and what is left.

        Cases that wait out a backoff drawn while the link was down are not due; when they
        remain, and this run has not seen the link down, the server's health is asked: if it
        is back they go now (as :meth:`run` does), and if not the report says why they wait.
        """
        attempts = self.drain()
        link_not_down = self.connectivity.snapshot().online is not False
        if link_not_down and self.outbox.status().pending and self.probe():
            attempts += self.drain()
        status = self.outbox.status()
        link = self.connectivity.snapshot()
        link_error = None
        if link.online is False and link.last_error_code is not None:
            message = (link.last_error or "").removeprefix(f"{link.last_error_code}: ")
            link_error = (link.last_error_code, message)
        return DrainReport(
            attempts=attempts,
            waiting=status.pending + status.in_flight,
            link_error=link_error,
            next_attempt_at=self.outbox.next_attempt_at(),
        )

    def run(
        self,
        stop: threading.Event,
        *,
        on_attempt: Callable[[Attempt], None] | None = None,
        idle_s: float = 1.0,
    ) -> None:
        """Send and poll until ``stop`` is set (``queue drain --follow``, background threads).

        Each pass (refresh the keys, send one case or probe the link, poll the verdicts)
        survives whatever goes wrong in it: an unexpected error is logged as an ALARM and the
        next pass waits, twice as long after each failure in a row up to the retry cap. A
        lasting fault (a locked or damaged database, a full disk, a bug) is then neither a hot
        loop nor a thread that died without anyone noticing, and the queue moves again as soon
        as the fault is gone.
        """
        schedule = _Schedule()
        failures = 0
        while not stop.is_set():
            try:
                wait_s = self._pass(schedule, on_attempt, idle_s)
            except Exception as exc:  # noqa: BLE001 - the thread's loop outlives a failed pass
                wait_s = backoff_ceiling(failures, cap_s=self.config.retry_cap_s)
                failures += 1
                log.error(
                    "ALARM: an uploader pass failed (%s); next pass in %.0f s",
                    describe_failure(exc),
                    wait_s,
                )
            else:
                failures = 0
            if wait_s > 0:
                stop.wait(wait_s)

    def _pass(
        self, schedule: _Schedule, on_attempt: Callable[[Attempt], None] | None, idle_s: float
    ) -> float:
        """One turn of :meth:`run`; how long to wait before the next one (0: at once)."""
        if self._refresh_keys is not None and time.monotonic() >= schedule.refresh_at:
            schedule.refresh_at = time.monotonic() + self.config.key_refresh_s
            self.follow_key_rotation()
        attempt = self.send_next()
        if attempt is not None:
            if on_attempt is not None:
                on_attempt(attempt)
            return 0.0
        # Offline, or just started (unknown): a sender restarted after an outage must not
        # leave cases waiting out backoffs drawn while the link was down.
        if (
            self.connectivity.snapshot().online is not True
            and time.monotonic() >= schedule.probe_at
        ):
            # Jittered: devices that lost the server together would otherwise probe, and then
            # send their waiting cases, in step, and meet it all at once when it is back.
            schedule.probe_at = time.monotonic() + self.config.probe_s * self._rng.uniform(0.5, 1.5)
            if self.probe():
                return 0.0
        if time.monotonic() >= schedule.poll_at:
            schedule.poll_at = time.monotonic() + self.config.verdict_poll_s
            self.poll_verdicts()
        return min(idle_s, self._seconds_to_next_due())

    def probe(self) -> bool:
        """Ask the server's health; when it is healthy, make the cases that waited for the link
        due now (True). An answer that is not healthy still proves the link works, but the
        waiting cases keep their time: the server would refuse them now anyway.

        Why the status matters: health is answered 200 at the server's connection cap too, with
        ``"status": "busy"``, and an upload refused there may have seen a reset (a link down).
        Sending every waiting case on such an answer would push each device's cases to the
        busy server every few seconds, whatever its ``Retry-After``. An answer without a status
        (an older server) counts as healthy.
        """
        if not self._server_healthy():
            return False
        due = self.outbox.due_now(now=self._clock())
        log.info("central server reachable again; %d waiting case(s) due now", due)
        return True

    def _server_healthy(self) -> bool:
        """Ask the server's health: True when it answers "ok"; the link's state either way."""
        try:
            answer = self.client.health()
        except TransportError as err:
            self._link_trouble(err)
            return False
        self.connectivity.mark_success(self._clock())
        status = answer.get("status", "ok")
        if status != "ok":
            log.info(
                "central server reachable but not healthy (status %.40r); waiting cases keep"
                " their time",
                status,
            )
            return False
        return True

    def follow_key_rotation(self) -> None:
        """Fetch the server's keys again, so new envelopes are sealed to the active key (a no-op
        when the keys are pinned in the settings).

        The keys in use stay when the fetch fails: unreachable (tried again later), or keys
        that are not valid or cannot be kept (an ALARM: that needs a human).
        """
        if self._refresh_keys is None:
            return
        try:
            keys = self._refresh_keys()
        except TransportError as err:
            log.info("server keys not refreshed (%s); will try again", err.code)
            return
        except (ConfigError, OSError) as err:
            log.error(
                "ALARM: server keys not refreshed (%s); the known ones stay in use",
                describe_failure(err),
            )
            return
        if keys.server_key.key_id != self.keys.server_key.key_id:
            log.info("central server key is now %s", keys.server_key.key_id)
        self.keys = keys

    def _seconds_to_next_due(self) -> float:
        due = self.outbox.next_attempt_at()
        if due is None:
            return 3600.0
        return max(0.05, (due - self._clock()).total_seconds())

    # --- verdicts -------------------------------------------------------------------------------

    def poll_verdicts(self) -> int:
        """Ask for the verdict of every delivered case that has none yet; return how many came."""
        if self._store is None:
            return 0
        received = 0
        for case in self._store.list_cases(state=CaseState.DELIVERED):
            path = f"/v1/cases/{case.case_id}/verdict"
            headers = sign_request(self.device, "GET", path, int(self._clock().timestamp()))
            try:
                answer = self.client.get_verdict(case.case_id, headers)
            except PermanentRejectionError as err:
                code = str(getattr(err, "server_code", err.code))
                message = str(getattr(err, "server_message", err.message))
                if http_status_of(err) in _DEVICE_REFUSED:
                    # The server refuses this device, not the case (its clock is off, its key
                    # unknown or revoked): the case keeps waiting for its verdict.
                    self.connectivity.mark_success(self._clock())
                    log.error(
                        "ALARM: the central server refuses this device's verdict polls "
                        "(%s: %s); delivered cases keep waiting for their verdicts",
                        code,
                        message,
                    )
                    return received
                # The server cannot give this case a verdict (e.g. its model cannot read it):
                # record that as the answer, so the clinician sees it, and go on with the others.
                failure = {"verdict": None, "error": {"code": code, "message": message}}
                if self._record_verdict(case.case_id, failure):
                    log.warning("central server gives case %s no verdict (%s)", case.case_id, code)
                continue
            except TransportError as err:
                self._link_trouble(err)
                log.info("verdict poll failed (%s); will try again", err.code)
                return received
            self.connectivity.mark_success(self._clock())
            if answer.status == 200 and self._record_verdict(case.case_id, answer.body):
                received += 1
            elif answer.status == 404 and case.case_id not in self._unknown_to_server:
                self._unknown_to_server.add(case.case_id)  # once per case and process
                log.error(
                    "ALARM: the central server does not know delivered case %s (a database "
                    "restored from a backup, or another server at this address); still asking",
                    case.case_id,
                )
        return received

    def _record_verdict(self, case_id: str, verdict: dict[str, Any]) -> bool:
        """Keep a verdict; False when the case has moved on since the listing (another
        uploader on this case store recorded it first, or it was acknowledged): it is decided
        already, and the other cases still get theirs."""
        assert self._store is not None
        try:
            self._store.record_verdict(case_id, verdict)
        except IllegalTransitionError:
            log.info("case %s has its verdict already (recorded by another uploader)", case_id)
            return False
        return True

    # --- the case store mirror ------------------------------------------------------------------

    def _store_sending(self, item: OutboxItem) -> None:
        case = self._store.get(item.case_id) if self._store is not None else None
        if case is None:
            return
        for event in _TO_SENDING.get(case.state, ()):
            self._store_event(item.case_id, event, "resumed" if event is not CaseEvent.START_SEND
                              else f"attempt {item.attempts + 1}")  # fmt: skip

    def _store_delivered(self, case_id: str, detail: str) -> None:
        """Record the delivery: from ``sending`` (this attempt) directly; from anywhere else
        (another sender moved the case meanwhile) by the path :meth:`_store_to` takes."""
        case = self._store.get(case_id) if self._store is not None else None
        if case is not None and case.state is CaseState.SENDING:
            self._store_event(case_id, CaseEvent.DELIVER, detail)
        else:
            self._store_to(case_id, CaseState.DELIVERED)

    def _store_to(self, case_id: str, target: CaseState) -> None:
        """Apply the events that lead from where the store stands to ``target``."""
        case = self._store.get(case_id) if self._store is not None else None
        if case is None or case.state is target or case.state is CaseState.VERDICT_RECEIVED:
            return
        path = [*_TO_SENDING.get(case.state, ())]
        path.append(CaseEvent.DELIVER if target is CaseState.DELIVERED else CaseEvent.QUARANTINE)
        for event in path:
            self._store_event(case_id, event, "reconciled with the outbox")

    def _store_event(self, case_id: str, event: CaseEvent, detail: str | None) -> None:
        if self._store is None:
            return
        try:
            self._store.apply(case_id, event, detail)
        except IllegalTransitionError as err:
            log.warning("case store out of step with the outbox for case %s: %s", case_id, err)
        except StoreError as err:
            if self._store.get(case_id) is not None:
                raise
            log.debug("case %s is not in this case store (%s)", case_id, err.message)


class _LeaseKeeper:
    """Keeps the lease of the case being sent alive while its upload lasts.

    Why renew rather than bound the upload by a deadline shorter than the lease: how long an
    upload takes depends on the link, not on the device. A 20 MB case over a slow or shared link
    can outlast any fixed lease, and a deadline would cut it off at every attempt, so that case
    would never get through; a connection that stalls is bounded already by the transport's
    connect and read timeouts. So the lease stays short (a crashed sender's case is taken back
    soon) and a live sender renews it every third of a lease from a helper thread, which stops
    renewing when the send ends or when another sender has taken the case over. If this process
    dies or is suspended, the renewals stop with it and the lease runs out as before.

    One helper thread serves an uploader's sends one after the other: starting a thread per
    send (about 0.2 ms) would cost more than the rest of a send's bookkeeping. It ends when no
    send has come for a second (or on :meth:`close`), so an uploader that is dropped without
    being closed leaves no thread behind, and the next send starts it again. The renewals use
    a connection of their own, opened only when a renewal is due (:class:`LeaseRenewer`).
    """

    def __init__(
        self, outbox: Outbox, owner: str, lease_s: float, clock: Callable[[], datetime]
    ) -> None:
        self._outbox = outbox
        self._owner = owner
        self._lease_s = lease_s
        self._clock = clock
        self._changed = threading.Condition()
        self._case: str | None = None  # the case being sent, while its lease is kept
        self._renewed_at = 0.0  # time.monotonic() of the claim or the last renewal
        self._sends = 0  # counts sends, so a late renewal result is not taken for the next's
        self._thread: threading.Thread | None = None
        self._closed = False

    @contextmanager
    def kept(self, case_id: str) -> Iterator[None]:
        """Renew ``case_id``'s lease (just claimed) until the block ends."""
        with self._changed:
            self._case = case_id
            self._renewed_at = time.monotonic()
            self._sends += 1
            if self._thread is None:
                self._closed = False
                self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
                self._thread.start()
            else:
                self._changed.notify()
        try:
            yield
        finally:
            with self._changed:
                self._case = None

    def close(self) -> None:
        """Stop the helper thread (a renewal in progress finishes first)."""
        with self._changed:
            self._closed = True
            thread = self._thread
            self._changed.notify()
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        renewer = self._outbox.lease_renewer()
        try:
            while (due := self._next_due()) is not None:
                case_id, send = due
                keep = self._renew(renewer, case_id)
                with self._changed:
                    if self._sends == send and self._case == case_id:
                        self._renewed_at = time.monotonic()
                        if not keep:
                            self._case = None
        except Exception as exc:  # noqa: BLE001 - a helper thread: the send goes on without it
            log.error("ALARM: the lease keeper stopped (%s)", describe_failure(exc))
            with self._changed:
                self._thread = None
        finally:
            renewer.close()

    def _next_due(self) -> tuple[str, int] | None:
        """Wait until the lease of the case being sent is due for renewal: the case and its
        send number; None when the thread is to end (closed, or no send for a while)."""
        interval = self._lease_s * _RENEW_FRACTION
        with self._changed:
            while not self._closed:
                if self._case is None:
                    if not self._changed.wait(_KEEPER_IDLE_S) and self._case is None:
                        break
                    continue
                left = self._renewed_at + interval - time.monotonic()
                if left <= 0:
                    return self._case, self._sends
                self._changed.wait(left)
            self._thread = None
            return None

    def _renew(self, renewer: LeaseRenewer, case_id: str) -> bool:
        """Renew once; False when the lease is gone (another sender has the case now)."""
        try:
            renewed = renewer.renew(case_id, self._owner, self._lease_s, now=self._clock())
        except OutboxError as err:
            log.warning("lease on case %s not renewed (%s); trying again", case_id, err.message)
            return True
        if not renewed:
            log.info("case %s: another sender has taken it over; lease not renewed", case_id)
        return renewed


def describe_failure(exc: BaseException) -> str:
    """An unexpected error in a form fit for an ALARM line: its type, its stable code and
    one-line message (the application's errors name case ids, never patient data) or the
    system's error text (never a file name), and where it was raised."""
    if isinstance(exc, TriageError):
        what = f"{type(exc).__name__} {exc.code}: {exc.message}"
    elif isinstance(exc, OSError):
        what = f"{type(exc).__name__}: {exc.strerror or 'no error text'}"
    else:
        what = type(exc).__name__
    where = where_raised(exc)
    return what if where is None else f"{what}, in {where}"


def _owner_name() -> str:
    """Who holds a lease: this machine, process and thread, so a restart can tell it is dead."""
    return (
        f"{socket.gethostname()}:{os.getpid()}:{threading.get_native_id()}:"
        f"{random.getrandbits(32):08x}"
    )


def _owner_is_dead(owner: str) -> bool:
    """A lease owner on this machine whose process no longer exists."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False
