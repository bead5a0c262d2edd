"""Connectivity state: unknown → offline/online transitions, and consistent snapshots."""

from __future__ import annotations

import dataclasses
import threading
from datetime import UTC, datetime, timedelta

import pytest

from triage_app.escalation.connectivity import ConnectivitySnapshot, ConnectivityState

T0 = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_unknown_before_the_first_attempt() -> None:
    assert ConnectivityState().snapshot() == ConnectivitySnapshot(
        online=None,
        offline_since=None,
        last_error=None,
        last_error_code=None,
        last_success_at=None,
        last_failure_at=None,
        consecutive_failures=0,
    )


def test_offline_since_is_the_first_failure_of_an_outage() -> None:
    state = ConnectivityState()
    state.mark_success(at(0))
    state.mark_failure("transport_error", "upload: timed out\n connecting", at(10))
    state.mark_failure("certificate_pin_mismatch", "wrong server", at(20))
    snap = state.snapshot()
    assert snap.online is False
    assert snap.offline_since == at(10)
    assert snap.last_failure_at == at(20)
    assert snap.last_success_at == at(0)
    assert snap.consecutive_failures == 2
    assert snap.last_error == "certificate_pin_mismatch: wrong server"
    assert snap.last_error_code == "certificate_pin_mismatch"


def test_a_success_ends_the_outage() -> None:
    state = ConnectivityState()
    state.mark_failure("transport_error", "refused", at(1))
    state.mark_success(at(5))
    snap = state.snapshot()
    assert (snap.online, snap.offline_since, snap.last_error, snap.consecutive_failures) == (
        True,
        None,
        None,
        0,
    )
    assert snap.last_success_at == at(5)
    assert snap.last_failure_at == at(1)
    state.mark_failure("transport_error", "reset", at(9))
    snap = state.snapshot()
    assert (snap.offline_since, snap.consecutive_failures) == (at(9), 1)


def test_failing_from_the_start_counts_as_an_outage() -> None:
    state = ConnectivityState()
    state.mark_failure("transport_error", "", at(3))
    snap = state.snapshot()
    assert (snap.online, snap.offline_since, snap.last_error) == (False, at(3), "transport_error")
    assert snap.last_success_at is None


def test_snapshots_are_frozen() -> None:
    snap = ConnectivityState().snapshot()
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.online = True  # type: ignore[misc]


def test_concurrent_updates_never_tear_a_snapshot() -> None:
    state = ConnectivityState()
    stop = threading.Event()
    torn: list[ConnectivitySnapshot] = []

    def writer(offset: int) -> None:
        for i in range(2000):
            if (i + offset) % 3:
                state.mark_failure("transport_error", "down", at(i))
            else:
                state.mark_success(at(i))

    def reader() -> None:
        while not stop.is_set():
            snap = state.snapshot()
            offline_but_clean = snap.online is False and (
                snap.offline_since is None or snap.consecutive_failures == 0
            )
            online_but_dirty = snap.online is True and (
                snap.offline_since is not None or snap.consecutive_failures != 0
            )
            if offline_but_clean or online_but_dirty:
                torn.append(snap)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    for thread in readers + writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    for thread in readers:
        thread.join()
    assert torn == []
    assert state.snapshot().online is not None
