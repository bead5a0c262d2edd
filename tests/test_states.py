"""The case state machine: the table is complete, reachable and strict."""

from __future__ import annotations

import pytest

from triage_app.errors import IllegalTransitionError, StoreError
from triage_app.states import TRANSITIONS, CaseEvent, CaseState, Feedback, next_state

S = CaseState
E = CaseEvent


def _walk(start: CaseState, events: list[CaseEvent]) -> list[CaseState]:
    states = [start]
    for event in events:
        states.append(next_state(states[-1], event))
    return states


def _reachable_from_received() -> set[CaseState]:
    seen = {S.RECEIVED}
    frontier = [S.RECEIVED]
    while frontier:
        state = frontier.pop()
        for (src, _event), dst in TRANSITIONS.items():
            if src == state and dst not in seen:
                seen.add(dst)
                frontier.append(dst)
    return seen


def test_every_state_and_every_table_entry_is_reachable_from_received() -> None:
    reachable = _reachable_from_received()
    assert reachable == set(CaseState)
    for src, event in TRANSITIONS:
        assert src in reachable, (src, event)


def test_every_event_is_used_by_the_table() -> None:
    assert {event for _state, event in TRANSITIONS} == set(CaseEvent)


@pytest.mark.parametrize(("key", "expected"), list(TRANSITIONS.items()))
def test_next_state_follows_the_table(
    key: tuple[CaseState, CaseEvent], expected: CaseState
) -> None:
    assert next_state(*key) is expected


@pytest.mark.parametrize(
    ("state", "event"),
    [(s, e) for s in CaseState for e in CaseEvent if (s, e) not in TRANSITIONS],
)
def test_every_pair_outside_the_table_is_illegal(state: CaseState, event: CaseEvent) -> None:
    with pytest.raises(IllegalTransitionError) as info:
        next_state(state, event)
    assert info.value.code == "illegal_transition"
    assert isinstance(info.value, StoreError)
    message = str(info.value)
    assert f"'{state}'" in message
    assert f"'{event}'" in message
    assert "\n" not in message


@pytest.mark.parametrize("terminal", [S.ACKNOWLEDGED, S.FAILED])
def test_terminal_states_have_no_way_out(terminal: CaseState) -> None:
    assert not [key for key in TRANSITIONS if key[0] is terminal]


def test_happy_path_to_an_acknowledged_verdict() -> None:
    events = [E.ANALYSE, E.ENQUEUE, E.START_SEND, E.DELIVER, E.RECEIVE_VERDICT, E.ACKNOWLEDGE]
    assert _walk(S.RECEIVED, events) == [
        S.RECEIVED,
        S.ANALYSED,
        S.QUEUED,
        S.SENDING,
        S.DELIVERED,
        S.VERDICT_RECEIVED,
        S.ACKNOWLEDGED,
    ]


def test_retry_loop_and_quarantine_come_back_to_the_queue() -> None:
    events = [
        E.START_SEND,
        E.SEND_FAILED,
        E.RETRY,
        E.START_SEND,
        E.SEND_FAILED,
        E.RETRY,
        E.START_SEND,
        E.QUARANTINE,
        E.ADMIN_RETRY,
        E.START_SEND,
        E.DELIVER,
    ]
    states = _walk(S.QUEUED, events)
    assert states[1:4] == [S.SENDING, S.SEND_FAILED_RETRYING, S.QUEUED]
    assert states[-4:] == [S.QUARANTINED, S.QUEUED, S.SENDING, S.DELIVERED]


@pytest.mark.parametrize(
    ("decision_event", "resting"),
    [
        (E.DECIDE_LOCAL_NORMAL, S.LOCAL_NORMAL),
        (E.DECIDE_LOCAL_ABNORMAL, S.LOCAL_ABNORMAL),
        (E.HOLD, S.ESCALATION_HELD),
        (E.BLOCK, S.ESCALATION_BLOCKED),
    ],
)
def test_cases_kept_on_the_device_can_be_acknowledged(
    decision_event: CaseEvent, resting: CaseState
) -> None:
    assert _walk(S.RECEIVED, [E.ANALYSE, decision_event, E.ACKNOWLEDGE]) == [
        S.RECEIVED,
        S.ANALYSED,
        resting,
        S.ACKNOWLEDGED,
    ]


def test_held_case_is_queued_when_a_server_becomes_available() -> None:
    assert _walk(S.ANALYSED, [E.HOLD, E.ENQUEUE, E.START_SEND]) == [
        S.ANALYSED,
        S.ESCALATION_HELD,
        S.QUEUED,
        S.SENDING,
    ]


def test_a_blocked_case_can_never_be_sent() -> None:
    with pytest.raises(IllegalTransitionError):
        next_state(S.ESCALATION_BLOCKED, E.ENQUEUE)


def test_unreadable_input_fails_from_received_only() -> None:
    assert next_state(S.RECEIVED, E.FAIL) is S.FAILED
    with pytest.raises(IllegalTransitionError):
        next_state(S.ANALYSED, E.FAIL)


def test_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        TRANSITIONS[(S.ACKNOWLEDGED, E.ANALYSE)] = S.RECEIVED  # type: ignore[index]


def test_feedback_values_are_the_stored_words() -> None:
    assert [f.value for f in Feedback] == ["accept", "reject", "acknowledge"]
