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
)
from triage_app.escalation.outbox import OutboxItem
from triage_app.escalation.queueing import EscalationQueue
from triage_app.pipeline import PipelineConfig, TriagePipeline
from triage_app.results import BLOCKED, CaseResult, FailedInput, InputOutcome
from triage_app.states import CaseState
from triage_app.store import CaseStore

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

    ``waiting_for_room`` counts the held cases left untried or unqueued because the outbox is
    full; ``still_held`` every held case in the store afterwards; ``more`` says the batch limit
    stopped the run with cases left to try.
    """

    cases: tuple[HeldCase, ...] = ()
    waiting_for_room: int = 0
    still_held: int = 0
    more: bool = False

    def count(self, outcome: ReleaseOutcome) -> int:
        return sum(case.outcome is outcome for case in self.cases)

    @property
    def released(self) -> int:
        return self.count(ReleaseOutcome.RELEASED)

    def headline(self) -> str:
        """One line, e.g. ``2 released, 1 still held (1 source file missing or unreadable)``."""
        parts = []
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
        }


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


def release_all_held(settings: Settings, queue: EscalationQueue | None) -> ReleaseReport:
    """Every held case in one pass, in a store of its own (``queue release``, desktop app).

    Without a queue (the server's keys are not known yet) the held cases are only counted.
    """
    with CaseStore.open(settings.case_store_path) as store:
        if queue is None:
            return ReleaseReport(still_held=len(store.case_ids(CaseState.ESCALATION_HELD)))
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
    earlier). The run stops at the first case the outbox has no room for: the older cases go
    first once deliveries make room. A case larger than the whole quota does not stop it (no
    delivery can make room for that one). With nothing held, this is one indexed query.
    """
    held = store.case_ids(CaseState.ESCALATION_HELD)
    candidates = [case_id for case_id in held if case_id not in skip]
    if not candidates:
        return ReleaseReport(still_held=len(held))
    batch = candidates if limit is None else candidates[:limit]
    tried: list[HeldCase] = []
    # A full outbox is seen before a model is loaded or a file read for nothing.
    # Only a quota used up to the byte: a held case smaller than the last one refused may fit.
    status = queue.outbox.status()
    waiting = len(candidates) if status.queued_bytes >= status.quota_bytes else 0
    if not waiting:
        for index, case_id in enumerate(batch):
            outcome = _release_one(store, queue, triage, case_id)
            if outcome is None:
                continue
            tried.append(outcome)
            if outcome.outcome is ReleaseOutcome.QUEUE_FULL:
                waiting = len(candidates) - index
                break
    if waiting:
        log.warning("outbox full: %d held cases wait for deliveries to make room", waiting)
    return ReleaseReport(
        cases=tuple(tried),
        waiting_for_room=waiting,
        still_held=len(store.case_ids(CaseState.ESCALATION_HELD)),
        more=not waiting and len(candidates) > len(batch),
    )


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
