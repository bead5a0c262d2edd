"""The life of a case as one explicit transition table (DESIGN 3, "Case states").

Modelled on pynetdicom's ``fsm.py``: every allowed ``(state, event)`` pair is listed once in
:data:`TRANSITIONS`, and anything not listed is an error rather than a silent no-op, so a bug in a
shell (GUI, watch service, uploader) cannot move a case somewhere the design does not allow.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType

from triage_app.errors import IllegalTransitionError

__all__ = ["TRANSITIONS", "CaseEvent", "CaseState", "Feedback", "next_state"]


class CaseState(StrEnum):
    """Where a case stands. The values are stored in the case store; never rename them."""

    RECEIVED = "received"
    ANALYSED = "analysed"
    LOCAL_NORMAL = "local_normal"
    LOCAL_ABNORMAL = "local_abnormal"
    #: Escalated, but no central server is configured or reachable for escalation: the case stays
    #: on the device for human review and can be queued once a server is available.
    ESCALATION_HELD = "escalation_held"
    #: Escalated, but it must not leave the device (e.g. PHI audit failed, burned-in text risk).
    ESCALATION_BLOCKED = "escalation_blocked"
    QUEUED = "queued"
    SENDING = "sending"
    SEND_FAILED_RETRYING = "send_failed_retrying"
    DELIVERED = "delivered"
    VERDICT_RECEIVED = "verdict_received"
    #: The server refused the case permanently; only an admin can put it back in the queue.
    QUARANTINED = "quarantined"
    #: A clinician accepted or rejected the result. Terminal.
    ACKNOWLEDGED = "acknowledged"
    #: The input could not be triaged; the error code is recorded. Terminal.
    FAILED = "failed"


class CaseEvent(StrEnum):
    """Something that happens to a case. Stored in the case history; never rename them."""

    ANALYSE = "analyse"
    FAIL = "fail"
    DECIDE_LOCAL_NORMAL = "decide_local_normal"
    DECIDE_LOCAL_ABNORMAL = "decide_local_abnormal"
    HOLD = "hold"
    BLOCK = "block"
    ENQUEUE = "enqueue"
    START_SEND = "start_send"
    SEND_FAILED = "send_failed"
    RETRY = "retry"
    DELIVER = "deliver"
    RECEIVE_VERDICT = "receive_verdict"
    QUARANTINE = "quarantine"
    ADMIN_RETRY = "admin_retry"
    ACKNOWLEDGE = "acknowledge"


class Feedback(StrEnum):
    """A clinician's answer to a result, as IHE's AI results profiles record it.

    Each one ends in the ``acknowledge`` event; which one it was is kept with the case's feedback
    and history. Stored in the case store; never rename the values.
    """

    ACCEPT = "accept"  # the reader agrees with the result
    REJECT = "reject"  # the reader disagrees with it
    ACKNOWLEDGE = "acknowledge"  # seen, without a judgement of the result


_S = CaseState
_E = CaseEvent

#: ``(current state, event) -> next state``. Read-only; the only source of truth for the flow.
TRANSITIONS: Mapping[tuple[CaseState, CaseEvent], CaseState] = MappingProxyType(
    {
        # Intake: an image is analysed, or it cannot be triaged at all.
        (_S.RECEIVED, _E.ANALYSE): _S.ANALYSED,
        (_S.RECEIVED, _E.FAIL): _S.FAILED,
        # The policy decides: stay local, or escalate (queue, hold, or block).
        (_S.ANALYSED, _E.DECIDE_LOCAL_NORMAL): _S.LOCAL_NORMAL,
        (_S.ANALYSED, _E.DECIDE_LOCAL_ABNORMAL): _S.LOCAL_ABNORMAL,
        (_S.ANALYSED, _E.ENQUEUE): _S.QUEUED,
        (_S.ANALYSED, _E.HOLD): _S.ESCALATION_HELD,
        (_S.ANALYSED, _E.BLOCK): _S.ESCALATION_BLOCKED,
        (_S.ESCALATION_HELD, _E.ENQUEUE): _S.QUEUED,  # a central server became available
        # Transfer to the central server, with retries and a permanent-refusal exit.
        (_S.QUEUED, _E.START_SEND): _S.SENDING,
        (_S.SENDING, _E.DELIVER): _S.DELIVERED,
        (_S.SENDING, _E.SEND_FAILED): _S.SEND_FAILED_RETRYING,
        (_S.SEND_FAILED_RETRYING, _E.RETRY): _S.QUEUED,
        (_S.SENDING, _E.QUARANTINE): _S.QUARANTINED,
        (_S.QUARANTINED, _E.ADMIN_RETRY): _S.QUEUED,
        (_S.DELIVERED, _E.RECEIVE_VERDICT): _S.VERDICT_RECEIVED,
        # A clinician accepts or rejects whatever result the device can show.
        (_S.LOCAL_NORMAL, _E.ACKNOWLEDGE): _S.ACKNOWLEDGED,
        (_S.LOCAL_ABNORMAL, _E.ACKNOWLEDGE): _S.ACKNOWLEDGED,
        (_S.VERDICT_RECEIVED, _E.ACKNOWLEDGE): _S.ACKNOWLEDGED,
        (_S.ESCALATION_HELD, _E.ACKNOWLEDGE): _S.ACKNOWLEDGED,
        (_S.ESCALATION_BLOCKED, _E.ACKNOWLEDGE): _S.ACKNOWLEDGED,
    }
)


def next_state(state: CaseState, event: CaseEvent) -> CaseState:
    """Return the state that ``event`` leads to from ``state``.

    Raises
    ------
    IllegalTransitionError
        If the table does not allow ``event`` in ``state``.
    """
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransitionError(
            f"event '{event}' is not allowed for a case in state '{state}'"
        ) from None
