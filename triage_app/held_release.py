"""Held escalations go to the outbox once they can: server keys known, room in the outbox.

A case escalated while the central server's keys were unknown, or while the outbox was full,
is recorded as ``escalation_held``, and its payload is not kept (the plaintext payload never
touches the disk). Releasing it means triaging its image again from the file the case store
recorded (a service's ``done/`` copy, the desktop app's original), checking that the result is
still an escalation of the same case, and queueing that payload exactly as a fresh triage does
(``batch.enqueue_held``). A case that cannot be released stays held, with the reason in its
history for the human who reviews it. The shells decide when to call it: the services
periodically and as soon as keys or room appear, ``triage-app queue release``, the desktop
app once the server's keys are known.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from triage_app.batch import enqueue_held, record_queued
from triage_app.config import Settings
from triage_app.errors import (
    CaseExceedsQuotaError,
    IllegalTransitionError,
    QueueFullError,
    ResealError,
    TransportError,
)
from triage_app.escalation.envelope import seal_bytes
from triage_app.escalation.outbox import OutboxItem, larger_than_quota
from triage_app.escalation.queueing import EscalationQueue
from triage_app.escalation.service import keys_unknown
from triage_app.pipeline import PipelineConfig, TriagePipeline
from triage_app.results import BLOCKED, CaseResult, FailedInput, InputOutcome
from triage_app.states import CaseState
from triage_app.store import NOT_RELEASED, CaseStore

__all__ = [
    "BATCH_SIZE",
    "HeldCase",
    "ReleaseOutcome",
    "ReleaseReport",
    "Triage",
    "lazy_triage",
    "release_all_held",
    "release_held",
    "reseal_from_source",
]

log = logging.getLogger(__name__)

#: Cases one call tries by default, so that a service's loop never stalls behind a backlog.
BATCH_SIZE = 16

Triage = Callable[[str], InputOutcome]
"""One image through the pipeline (``TriagePipeline.run``)."""


class ReleaseOutcome(StrEnum):
    """What became of one held case."""

    RELEASED = "released"  # in the outbox and recorded as queued
    SOURCE_UNAVAILABLE = "source_unavailable"  # its file is missing, unreadable or replaced
    DECISION_CHANGED = "decision_changed"  # re-triaged, it is no longer a case to send
    QUEUE_FULL = "queue_full"  # the outbox has no room for it yet
    EXCEEDS_QUOTA = "exceeds_quota"  # larger than the whole outbox quota: no room ever
    NO_LONGER_HELD = "no_longer_held"  # closed on this device while it was re-triaged: not sent


@dataclass(frozen=True)
class HeldCase:
    """One held case tried: its outcome and why (no paths, no identifying values)."""

    case_id: str
    outcome: ReleaseOutcome
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"case_id": self.case_id, "outcome": self.outcome.value, "detail": self.detail}


@dataclass(frozen=True)
class ReleaseReport:
    """What one release did.

    ``waiting_for_room`` counts the held cases that fit the quota but not the outbox now (found
    so in this run, or by the note of an earlier one); ``still_held`` every held case in the
    store afterwards; ``more`` says the batch limit stopped the run with cases left to try;
    ``blocked_by`` why none could be tried at all (``"<code>: <message>"``; None when it is
    not known, and then left out of the JSON): without the server's keys nothing can be
    sealed, and the reason (a wrong ``escalation.tls_pin``, say) is what the admin has to
    fix, not a count.
    """

    cases: tuple[HeldCase, ...] = ()
    waiting_for_room: int = 0
    still_held: int = 0
    more: bool = False
    blocked_by: str | None = None

    def count(self, outcome: ReleaseOutcome) -> int:
        return sum(case.outcome is outcome for case in self.cases)

    @property
    def released(self) -> int:
        return self.count(ReleaseOutcome.RELEASED)

    def headline(self) -> str:
        """One line, e.g. ``2 released, 1 still held (1 source file missing or unreadable)``."""
        parts = []
        if self.blocked_by is not None:
            parts.append(f"none can be sealed: {self.blocked_by}")
        if n := self.count(ReleaseOutcome.SOURCE_UNAVAILABLE):
            parts.append(f"{n} source file missing or unreadable")
        if n := self.count(ReleaseOutcome.DECISION_CHANGED):
            parts.append(f"{n} no longer escalated on re-triage")
        if n := self.count(ReleaseOutcome.NO_LONGER_HELD):
            parts.append(f"{n} closed on this device meanwhile, not sent")
        if n := self.count(ReleaseOutcome.EXCEEDS_QUOTA):
            parts.append(f"{n} larger than the whole outbox quota: raise escalation.queue_quota_mb")
        if self.waiting_for_room:
            parts.append(f"{self.waiting_for_room} waiting for room in the outbox")
        text = f"{self.released} released, {self.still_held} still held"
        return text + (f" ({', '.join(parts)})" if parts else "")

    def to_json(self) -> dict[str, Any]:
        return {
            "released": self.released,
            "source_unavailable": self.count(ReleaseOutcome.SOURCE_UNAVAILABLE),
            "decision_changed": self.count(ReleaseOutcome.DECISION_CHANGED),
            "exceeds_quota": self.count(ReleaseOutcome.EXCEEDS_QUOTA),
            "waiting_for_room": self.waiting_for_room,
            "still_held": self.still_held,
            "cases": [case.to_json() for case in self.cases],
        } | ({} if self.blocked_by is None else {"blocked_by": self.blocked_by})


def lazy_triage(settings: Settings) -> Triage:
    """The configured pipeline's ``run``, built on its first call: a release that finds
    nothing to triage loads no model."""
    pipeline: TriagePipeline | None = None

    def run(path: str) -> InputOutcome:
        nonlocal pipeline
        if pipeline is None:
            pipeline = TriagePipeline(PipelineConfig.from_settings(settings))
        return pipeline.run(path)

    return run


def release_all_held(
    settings: Settings,
    queue: EscalationQueue | None,
    *,
    keys_error: TransportError | None = None,
) -> ReleaseReport:
    """Every held case in one pass, in a store of its own (``queue release``, desktop app).

    Without a queue (the server's keys are not known yet) the held cases are only counted, and
    the report says why: ``keys_error`` is the fetch's own error (``EscalationLink.keys_error``),
    so that a wrong pin is named in the headline, not only in a log line before it.
    """
    with CaseStore.open(settings.case_store_path) as store:
        if queue is None:
            why = None if keys_error is None else keys_unknown(keys_error)
            return ReleaseReport(
                still_held=len(store.case_ids(CaseState.ESCALATION_HELD)),
                blocked_by=None if why is None else f"{why.code}: {why.message}",
            )
        return release_held(store, queue, lazy_triage(settings), limit=None)


def release_held(
    store: CaseStore,
    queue: EscalationQueue,
    triage: Triage,
    *,
    limit: int | None = BATCH_SIZE,
    skip: Collection[str] = frozenset(),
) -> ReleaseReport:
    """Queue held cases, oldest first, at most ``limit`` of them (None: all).

    ``skip`` names cases not to try this time (a service's cases that could not be released
    earlier). From the first case the outbox has no room for (or from the start, when it is
    full to the byte), nothing more is queued: the older cases go first once deliveries make
    room. The cases after it are still re-triaged and sealed to learn their size (``limit``
    counts them too), so that one larger than the whole quota is named as such, not as
    waiting for room no delivery can make; one found to fit is remembered by its history's
    ``not_released`` note and not sized again while the outbox stays full. With nothing
    held, this is one indexed query.
    """
    held = store.case_ids(CaseState.ESCALATION_HELD)
    candidates = [case_id for case_id in held if case_id not in skip]
    if not candidates:
        return ReleaseReport(still_held=len(held))
    tried: list[HeldCase] = []
    budget = len(candidates) if limit is None else limit  # cases re-triaged in this call
    # Only a quota used up to the byte is full here: a held case smaller than the last one
    # refused may fit. Once full, the cases left are only sized, never queued: one that fits
    # would otherwise take the room the older ones wait for.
    status = queue.outbox.status()
    full = status.queued_bytes >= status.quota_bytes
    waiting = 0
    more = False
    for case_id in candidates:
        if full and _known_to_fit(store, case_id):
            waiting += 1  # sized while the outbox was full already: no re-triage for nothing
            continue
        if budget <= 0:
            more = True
            break
        budget -= 1
        if full:
            outcome = _size_one(store, queue, triage, case_id, status.quota_bytes)
        else:
            outcome = _release_one(store, queue, triage, case_id)
        if outcome is None:
            continue
        tried.append(outcome)
        if outcome.outcome is ReleaseOutcome.QUEUE_FULL:
            full = True
            waiting += 1
    if waiting:
        log.warning("outbox full: %d held cases wait for deliveries to make room", waiting)
    return ReleaseReport(
        cases=tuple(tried),
        waiting_for_room=waiting,
        still_held=len(store.case_ids(CaseState.ESCALATION_HELD)),
        more=more,
    )


def _known_to_fit(store: CaseStore, case_id: str) -> bool:
    """Whether the case was last left held for want of room (so it fits the whole quota):
    sizing it again would re-triage it for the same answer. Its size is recorded nowhere else;
    the history's last row says it (any later event, a re-triage say, makes it unknown)."""
    history = store.history(case_id)
    if not history or history[-1].event != NOT_RELEASED:
        return False
    return (history[-1].detail or "").startswith(f"{ReleaseOutcome.QUEUE_FULL.value}:")


def _size_one(
    store: CaseStore, queue: EscalationQueue, triage: Triage, case_id: str, quota_bytes: int
) -> HeldCase | None:
    """While the outbox is full: whether one held case will ever fit (its size is known only
    once it is re-triaged and sealed), without queueing it. A case larger than the whole quota
    then says so at once, instead of "waiting for room" that no delivery can make. None if it
    was no longer held when looked at."""
    queued = queue.outbox.get(case_id)
    if queued is not None:
        record_queued(store, queued)  # as in _release_one: a crash fell in between
        return HeldCase(case_id, ReleaseOutcome.RELEASED, "already in the outbox")
    case = store.get(case_id)
    if case is None or case.state is not CaseState.ESCALATION_HELD:
        return None
    retriaged = _retriage(triage, case_id, str(case.result["path"]))
    if isinstance(retriaged, HeldCase):
        return _stays_held(store, case_id, retriaged.outcome, retriaged.detail)
    envelope = seal_bytes(
        retriaged.payload, case_id=case_id, device=queue.device, server_key=queue.server_key
    )
    size = len(envelope)
    if size > quota_bytes:
        detail = larger_than_quota(size, quota_bytes)
        return _stays_held(store, case_id, ReleaseOutcome.EXCEEDS_QUOTA, detail)
    detail = f"outbox full: this case ({size} bytes) waits for deliveries to make room"
    return _stays_held(store, case_id, ReleaseOutcome.QUEUE_FULL, detail)


def _release_one(
    store: CaseStore, queue: EscalationQueue, triage: Triage, case_id: str
) -> HeldCase | None:
    """Queue one held case, or say why it stays held (or was closed while it was re-triaged);
    None if it was no longer held when looked at."""
    queued = queue.outbox.get(case_id)
    if queued is not None:
        # A crash fell between the outbox and the case store: the envelope is there already.
        record_queued(store, queued)
        return HeldCase(case_id, ReleaseOutcome.RELEASED, "already in the outbox")
    case = store.get(case_id)
    if case is None or case.state is not CaseState.ESCALATION_HELD:
        return None  # another process released or acknowledged it since the listing
    retriaged = _retriage(triage, case_id, str(case.result["path"]))
    if isinstance(retriaged, HeldCase):
        return _stays_held(store, case_id, retriaged.outcome, retriaged.detail)
    try:
        item = enqueue_held(store, queue, case_id, retriaged.payload, reason=retriaged.reason)
    except IllegalTransitionError:
        # A clinician closed it ("do not send") while it was re-triaged: it stays closed.
        now = store.get(case_id)
        state = "gone" if now is None else now.state.value
        log.info("held case %s was closed on this device meanwhile (%s): not sent", case_id, state)
        detail = f"{state} on this device while it was re-triaged: not sent"
        return HeldCase(case_id, ReleaseOutcome.NO_LONGER_HELD, detail)
    except CaseExceedsQuotaError as err:
        return _stays_held(store, case_id, ReleaseOutcome.EXCEEDS_QUOTA, err.message)
    except QueueFullError as err:
        return _stays_held(store, case_id, ReleaseOutcome.QUEUE_FULL, err.message)
    return HeldCase(case_id, ReleaseOutcome.RELEASED, f"queued, outbox priority {item.priority}")


def reseal_from_source(
    store: CaseStore, queue: EscalationQueue, triage: Triage, case_id: str
) -> OutboxItem:
    """Seal a quarantined case anew from its source image, in place of the envelope the
    server refused (``queue retry`` of a case refused for how it was sealed; see
    ``outbox.needs_reseal``). The envelope's plaintext was never kept, so, as for a held case,
    the image is triaged again and must still be an escalation of the same case.

    Raises ``ResealError`` (the case stays quarantined), ``QueueFullError`` or ``OutboxError``.
    """
    case = store.get(case_id)
    if case is None:
        raise ResealError(f"case {case_id} is not in the case store: no source image to seal")
    retriaged = _retriage(triage, case_id, str(case.result["path"]))
    if isinstance(retriaged, HeldCase):
        raise ResealError(f"case {case_id} not re-sealed: {retriaged.detail}")
    return queue.reseal(case_id, retriaged.payload)


@dataclass(frozen=True)
class _Retriaged:
    payload: bytes
    reason: str


def _retriage(triage: Triage, case_id: str, path: str) -> _Retriaged | HeldCase:
    """The payload to send for ``case_id``, triaged again from ``path``; or why there is none."""
    outcome = triage(path)
    if isinstance(outcome, FailedInput):
        detail = f"source file missing or unreadable ({outcome.code})"
        return HeldCase(case_id, ReleaseOutcome.SOURCE_UNAVAILABLE, detail)
    if outcome.case_id != case_id:
        detail = "the file at the recorded path is now another image"
        return HeldCase(case_id, ReleaseOutcome.SOURCE_UNAVAILABLE, detail)
    if outcome.payload is None:
        return HeldCase(case_id, ReleaseOutcome.DECISION_CHANGED, _changed(outcome))
    return _Retriaged(outcome.payload, outcome.reason)


def _changed(result: CaseResult) -> str:
    """Why a re-triaged case has no payload to send any more."""
    escalation = result.escalation
    if escalation is not None and escalation.state == BLOCKED:
        return f"re-triage blocks it ({escalation.reason}): not sent; review it on this device"
    return (
        f"re-triage no longer escalates it: now {result.decision} ({result.reason}, score "
        f"{result.score:.3f}), e.g. after a threshold change; not sent, review it on this device"
    )


def _stays_held(store: CaseStore, case_id: str, outcome: ReleaseOutcome, detail: str) -> HeldCase:
    """Keep the reason in the case's history; warn (case id only) about what needs a human
    (a full outbox is reported once per run instead)."""
    store.note_not_released(case_id, f"{outcome.value}: {detail}")
    if outcome is not ReleaseOutcome.QUEUE_FULL:
        log.warning("held case %s not released (%s): it stays held", case_id, outcome.value)
    return HeldCase(case_id, outcome, detail)
