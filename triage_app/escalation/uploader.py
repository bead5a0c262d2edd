"""Drains the outbox to the central server and brings the verdicts back.

Runs in the background of the GUI, the watch service and the receiver, or alone as
``triage-app queue drain [--follow]``. Each attempt claims one envelope with a lease (so a
crashed sender's case is picked up again, and two senders never send the same one), posts it,
and acts on the answer:

* a receipt that verifies → the outbox marks the case delivered and deletes the envelope;
* 408/429/5xx, a network error, or a receipt that does not verify → back to pending with a
  full-jitter delay (never shorter than ``Retry-After``);
* any other 4xx → quarantined with an alarm, until an admin retries it;
* a certificate that is not the pinned one → nothing is sent, the case stays queued, alarm.

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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from triage_app.errors import (
    CertificatePinError,
    EnvelopeError,
    IllegalTransitionError,
    OutboxError,
    PermanentRejectionError,
    ReceiptError,
    StoreError,
    TransportError,
)
from triage_app.escalation.backoff import next_delay
from triage_app.escalation.connectivity import ConnectivityState
from triage_app.escalation.envelope import check_sealed
from triage_app.escalation.keys import DeviceIdentity
from triage_app.escalation.outbox import Outbox, OutboxItem, OutboxState
from triage_app.escalation.receipt import sign_request, verify_receipt
from triage_app.escalation.server_keys import CentralKeys
from triage_app.escalation.transport import CentralClient, retry_after_of
from triage_app.states import CaseEvent, CaseState
from triage_app.store import CaseStore

log = logging.getLogger(__name__)

DEFAULT_LEASE_S = 300.0
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
    outcome: str  # delivered | retry | quarantined | pin_mismatch
    detail: str
    deliveries: int | None = None  # the server's count, once delivered


@dataclass(frozen=True)
class UploaderConfig:
    retry_cap_s: float = 60.0
    lease_s: float = DEFAULT_LEASE_S
    verdict_poll_s: float = 15.0
    key_refresh_s: float = 3600.0  # how often a following uploader asks for the server's keys
    # While offline, how often to ask the server's health: when the link is back, waiting
    # cases go at once instead of each waiting out its backoff (up to the retry cap).
    probe_s: float = 5.0


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

    # --- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> Uploader:
        if self.store_path is not None:
            self._store = CaseStore.open(self.store_path)
            self.reconcile()
        return self

    def __exit__(self, *_: object) -> None:
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
        self._store_sending(item)
        try:
            envelope = self._envelope(item)
        except (OutboxError, EnvelopeError) as err:
            # A damaged spool file cannot be sent or repaired here; set it aside for the admin
            # instead of stopping the queue behind it.
            self.outbox.quarantine(item.case_id, f"damaged envelope: {err.message}")
            self._store_event(item.case_id, CaseEvent.QUARANTINE, "damaged envelope")
            log.error("ALARM: the envelope of case %s is damaged; quarantined", item.case_id)
            return Attempt(item.case_id, "quarantined", f"{err.code}: {err.message}")
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
            return self._retry(item, err, "pin_mismatch")
        except PermanentRejectionError as err:
            self.connectivity.mark_success(self._clock())  # the server answered
            return self._quarantine(item, err)
        except ReceiptError as err:
            log.error("ALARM: the receipt for case %s does not verify: %s", item.case_id,
                      err.message)  # fmt: skip
            return self._retry(item, err, "retry")
        except TransportError as err:
            return self._retry(item, err, "retry")
        self.outbox.mark_delivered(
            item.case_id, json.dumps(outcome.body, sort_keys=True), now=self._clock()
        )
        self._store_event(item.case_id, CaseEvent.DELIVER, f"receipt from {receipt.server_id}")
        was_offline = self.connectivity.snapshot().online is False
        self.connectivity.mark_success(self._clock())
        if was_offline:
            # The link is back: the cases still waiting out their backoff go now too.
            self.outbox.due_now(now=self._clock())
        log.info("case %s delivered (server count %d)", item.case_id, receipt.deliveries)
        return Attempt(item.case_id, "delivered", receipt.server_id, receipt.deliveries)

    def _retry(self, item: OutboxItem, err: TransportError | ReceiptError, kind: str) -> Attempt:
        now = self._clock()
        if not isinstance(err, ReceiptError):
            self.connectivity.mark_failure(err.code, err.message, now)
        delay = next_delay(
            item.attempts, retry_after_of(err), cap_s=self.config.retry_cap_s, rng=self._rng
        )
        self.outbox.mark_failed(
            item.case_id, f"{err.code}: {err.message}", now + timedelta(seconds=delay), now=now
        )
        self._store_event(item.case_id, CaseEvent.SEND_FAILED, err.code)
        self._store_event(item.case_id, CaseEvent.RETRY, f"next attempt in {delay:.1f} s")
        log.info(
            "case %s not delivered (%s); next attempt in %.1f s", item.case_id, err.code, delay
        )
        return Attempt(item.case_id, kind, f"{err.code}: {err.message}")

    def _envelope(self, item: OutboxItem) -> memoryview:
        """The case's envelope, if it is this device's envelope for this case and payload and
        whole: what can be checked without hashing it (the server checks every byte)."""
        envelope = self.outbox.envelope(item)
        header = check_sealed(envelope, self.device.public_key())
        if header.case_id != item.case_id or header.payload_sha256 != item.payload_sha256:
            raise OutboxError(f"outbox: the envelope of case {item.case_id} is not the one queued")
        return envelope

    def _quarantine(self, item: OutboxItem, err: PermanentRejectionError) -> Attempt:
        code = str(getattr(err, "server_code", err.code))
        reason = f"{code}: {getattr(err, 'server_message', err.message)}"
        self.outbox.quarantine(item.case_id, reason, now=self._clock())
        self._store_event(item.case_id, CaseEvent.QUARANTINE, reason)
        log.warning("ALARM: case %s refused by the central server and quarantined (%s)",
                    item.case_id, code)  # fmt: skip
        return Attempt(item.case_id, "quarantined", reason)

    # --- loops ----------------------------------------------------------------------------------

    def drain(self, *, stop: threading.Event | None = None) -> list[Attempt]:
        """Try every envelope that is due now, once each; what remains waits for its time."""
        attempts: list[Attempt] = []
        started = self._clock()
        while stop is None or not stop.is_set():
            attempt = self.send_next(due_by=started)
            if attempt is None:
                break
            attempts.append(attempt)
        return attempts

    def run(
        self,
        stop: threading.Event,
        *,
        on_attempt: Callable[[Attempt], None] | None = None,
        idle_s: float = 1.0,
    ) -> None:
        """Send and poll until ``stop`` is set (``queue drain --follow``, background threads)."""
        next_poll = next_refresh = next_probe = 0.0
        while not stop.is_set():
            if self._refresh_keys is not None and time.monotonic() >= next_refresh:
                self._refresh()
                next_refresh = time.monotonic() + self.config.key_refresh_s
            attempt = self.send_next()
            if attempt is not None:
                if on_attempt is not None:
                    on_attempt(attempt)
                continue
            # Offline, or just started (unknown): a sender restarted after an outage must not
            # leave cases waiting out backoffs drawn while the link was down.
            if self.connectivity.snapshot().online is not True and time.monotonic() >= next_probe:
                next_probe = time.monotonic() + self.config.probe_s
                if self.probe():
                    continue
            if time.monotonic() >= next_poll:
                self.poll_verdicts()
                next_poll = time.monotonic() + self.config.verdict_poll_s
            stop.wait(min(idle_s, self._seconds_to_next_due()))

    def probe(self) -> bool:
        """Ask the server's health; when it answers, make every waiting case due now."""
        try:
            self.client.health()
        except TransportError as err:
            self.connectivity.mark_failure(err.code, err.message, self._clock())
            return False
        self.connectivity.mark_success(self._clock())
        due = self.outbox.due_now(now=self._clock())
        log.info("central server reachable again; %d waiting case(s) due now", due)
        return True

    def _refresh(self) -> None:
        """Follow a server key rotation, so new envelopes are sealed to the active key."""
        assert self._refresh_keys is not None
        try:
            keys = self._refresh_keys()
        except TransportError as err:
            log.info("server keys not refreshed (%s); will try again", err.code)
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
                # The server cannot give this case a verdict (e.g. its model cannot read it):
                # record that as the answer, so the clinician sees it, and go on with the others.
                code = str(getattr(err, "server_code", err.code))
                message = str(getattr(err, "server_message", err.message))
                self._store.record_verdict(
                    case.case_id, {"verdict": None, "error": {"code": code, "message": message}}
                )
                log.warning("central server gives case %s no verdict (%s)", case.case_id, code)
                continue
            except TransportError as err:
                self.connectivity.mark_failure(err.code, err.message, self._clock())
                log.info("verdict poll failed (%s); will try again", err.code)
                return received
            self.connectivity.mark_success(self._clock())
            if answer.status == 200:
                self._store.record_verdict(case.case_id, answer.body)
                received += 1
        return received

    # --- the case store mirror ------------------------------------------------------------------

    def _store_sending(self, item: OutboxItem) -> None:
        case = self._store.get(item.case_id) if self._store is not None else None
        if case is None:
            return
        for event in _TO_SENDING.get(case.state, ()):
            self._store_event(item.case_id, event, "resumed" if event is not CaseEvent.START_SEND
                              else f"attempt {item.attempts + 1}")  # fmt: skip

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
