"""Held escalations released into the outbox: the real pipeline, outbox and central server.

Each test makes held cases as a shell does (``triage_and_record`` without a queue, as when the
server's keys are unknown, or with a queue whose outbox is full), then changes the world the
way it changes on a device (the keys become known, a delivery makes room, a file disappears,
an admin moves the thresholds) and releases them with ``release_held``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest

from tests.escalation.conftest import (
    PATIENT_ID,
    PATIENT_NAME,
    Central,
    Device,
    Escalated,
    link_for,
    make_uploader,
    triage,
    write_identified_phantoms,
)
from tests.helpers import make_result
from tests.other_process import acknowledge_in_another_process, light_queue
from triage_app.batch import store_event, triage_and_record
from triage_app.escalation.outbox import Outbox
from triage_app.escalation.queueing import EscalationQueue
from triage_app.escalation.service import EscalationLink, open_escalation
from triage_app.held_release import (
    BATCH_SIZE,
    ReleaseOutcome,
    ReleaseReport,
    lazy_triage,
    release_all_held,
    release_held,
)
from triage_app.results import HELD, CaseResult, EscalationRef, InputOutcome
from triage_app.states import CaseEvent, CaseState
from triage_app.store import NOT_RELEASED, CaseStore
from triage_app.synthetic import PhantomConfig, phantom_to_dataset, render_phantom


def hold(
    device: Device, central: Central, folder: Path, indices: tuple[int, ...]
) -> list[Escalated]:
    """Triage phantoms while the server's keys are unknown: every case is held."""
    settings = device.settings(central)
    link = open_escalation(settings, fetch_keys=False)  # as when the server is unreachable
    assert link is not None
    with link:
        assert link.queue is None, "keys not known yet"
        return triage(settings, folder, indices, queue=link.queue)


def state_of(link: EscalationLink, case_id: str) -> CaseState:
    with CaseStore.open(link.settings.case_store_path) as store:
        case = store.get(case_id)
    assert case is not None
    return case.state


def release(link: EscalationLink, *, limit: int | None = BATCH_SIZE) -> ReleaseReport:
    assert link.queue is not None
    with CaseStore.open(link.settings.case_store_path) as store:
        return release_held(store, link.queue, lazy_triage(link.settings), limit=limit)


def not_released_notes(link: EscalationLink, case_id: str) -> list[str | None]:
    with CaseStore.open(link.settings.case_store_path) as store:
        return [t.detail for t in store.history(case_id) if t.event == NOT_RELEASED]


def test_cases_held_while_the_keys_were_unknown_go_once_the_keys_are_known(
    central: Central, device: Device, tmp_path: Path
) -> None:
    held = hold(device, central, tmp_path / "scans", (0, 1))
    settings = device.settings(central)
    with link_for(settings) as link:  # the keys are fetched now
        first = release(link, limit=1)
        assert [(c.case_id, c.outcome) for c in first.cases] == [
            (held[0].case_id, ReleaseOutcome.RELEASED)  # the oldest first, one per batch
        ]
        assert (first.still_held, first.more) == (1, True)
        rest = release(link)
        assert [c.case_id for c in rest.cases] == [held[1].case_id]
        assert (rest.released, rest.still_held, rest.more) == (1, 0, False)
        assert release(link) == ReleaseReport()  # nothing held: nothing done, nothing twice

        items = {item.case_id: item for item in link.outbox.items()}
        assert sorted(items) == sorted(c.case_id for c in held)
        for case in held:  # re-triage sealed the very payload the first triage made
            assert case.result.escalation is not None
            assert items[case.case_id].payload_sha256 == case.result.escalation.payload_sha256
            assert state_of(link, case.case_id) is CaseState.QUEUED
        with make_uploader(link) as uploader:
            attempts = uploader.drain()
        assert [a.outcome for a in attempts] == ["delivered", "delivered"]
        assert all(state_of(link, c.case_id) is CaseState.DELIVERED for c in held)
        with CaseStore.open(settings.case_store_path) as store:
            steps = [(t.from_state, t.event) for t in store.history(held[0].case_id)]
        assert (CaseState.ESCALATION_HELD, CaseEvent.ENQUEUE) in steps
    assert central.deliveries() == {c.case_id: 1 for c in held}


@pytest.mark.expect_log_warnings  # the ALARM of the case the full outbox refuses
def test_a_case_held_by_a_full_outbox_goes_once_a_delivery_makes_room(
    central: Central, device: Device, tmp_path: Path
) -> None:
    settings = device.settings(central)
    with link_for(settings) as link:
        assert link.keys is not None and link.queue is not None
        (first,) = triage(settings, tmp_path / "a", (0,), queue=link.queue)
        size = link.outbox.status().queued_bytes
        # Two views of the same outbox: one full to the byte, one a byte short of a second case.
        full = Outbox.open(settings.case_store_path, settings.outbox_dir, quota_bytes=size)
        tight = Outbox.open(settings.case_store_path, settings.outbox_dir, quota_bytes=size + 1)
        with full, tight:
            full_queue = EscalationQueue(full, link.device, link.keys.server_key)
            tight_queue = EscalationQueue(tight, link.device, link.keys.server_key)
            ((path, _),) = write_identified_phantoms(tmp_path / "b", (1,))
            (second,) = triage_and_record([path], settings, queue=tight_queue)
            assert isinstance(second, CaseResult) and second.escalation is not None
            assert second.escalation.state == "held"  # refused by the full outbox, loudly
            with CaseStore.open(settings.case_store_path) as store:
                run = lazy_triage(settings)
                triaged: list[str] = []

                def counted(path: str) -> InputOutcome:
                    triaged.append(path)
                    return run(path)

                # Full to the byte: sized (does it fit the whole quota?), never queued ...
                seen_full = release_held(store, full_queue, counted)
                # ... and, once known to fit, not re-triaged again while the outbox stays full.
                again = release_held(store, full_queue, counted)
                refused = release_held(store, tight_queue, counted)
            assert [(c.case_id, c.outcome) for c in seen_full.cases] == [
                (second.case_id, ReleaseOutcome.QUEUE_FULL)
            ]
            assert (seen_full.waiting_for_room, seen_full.still_held) == (1, 1)
            assert again == ReleaseReport(waiting_for_room=1, still_held=1)
            assert [(c.case_id, c.outcome) for c in refused.cases] == [
                (second.case_id, ReleaseOutcome.QUEUE_FULL)
            ]
            assert (refused.waiting_for_room, refused.still_held) == (1, 1)
            assert len(triaged) == 2, "sized once, then tried once the outbox was not full"
            assert state_of(link, second.case_id) is CaseState.ESCALATION_HELD
            sized, note = not_released_notes(link, second.case_id)
            assert sized is not None and sized.startswith("queue_full: outbox full: this case (")
            assert note is not None and note.startswith("queue_full: outbox full: ")

            with make_uploader(link) as uploader:  # the first case is delivered: room
                assert [a.case_id for a in uploader.drain()] == [first.case_id]
            with CaseStore.open(settings.case_store_path) as store:
                released = release_held(store, tight_queue, lazy_triage(settings))
            assert (released.released, released.still_held) == (1, 0)
        with make_uploader(link) as uploader:
            assert [a.outcome for a in uploader.drain()] == ["delivered"]
        assert state_of(link, second.case_id) is CaseState.DELIVERED
    assert central.deliveries() == {first.case_id: 1, second.case_id: 1}


@pytest.mark.expect_log_warnings  # the ALARM of the full outbox, each case that stays held
def test_with_the_outbox_full_cases_larger_than_the_whole_quota_are_named_not_left_waiting(
    central: Central, device: Device, tmp_path: Path
) -> None:
    """A full outbox stopped the run before any case was tried (or at the first case with no
    room), so cases no delivery can ever make room for were reported as "waiting for room",
    ``exceeds_quota: 0``, until room was made. They are sized (never queued: the older case
    that fits goes first) and named, whether the outbox is full to the byte or fills up."""
    settings = device.settings(central)
    with link_for(settings) as link:
        assert link.keys is not None and link.queue is not None
        triage(settings, tmp_path / "a", (0,), queue=link.queue)
        size = link.outbox.status().queued_bytes
        (small,) = triage(settings, tmp_path / "b", (1,), queue=None)  # oldest held; fits
        bigs = []
        for index in range(2):  # 1000x1000 16-bit: 2 MB each, larger than either quota
            path = tmp_path / f"big{index}.dcm"
            image = render_phantom(7, index, PhantomConfig(size_range=(1000, 1000)))
            phantom_to_dataset(image).save_as(path, enforce_file_format=True)
            (big,) = triage_and_record([path], settings, queue=None)
            assert isinstance(big, CaseResult) and big.escalation is not None
            bigs.append(big.case_id)
        full = Outbox.open(settings.case_store_path, settings.outbox_dir, quota_bytes=size)
        tight = Outbox.open(settings.case_store_path, settings.outbox_dir, quota_bytes=size + 1)
        reports = []
        with full, tight, CaseStore.open(settings.case_store_path) as store:
            for outbox in (full, tight):  # full to the byte; a byte short of the small case
                queue = EscalationQueue(outbox, link.device, link.keys.server_key)
                reports.append(release_held(store, queue, lazy_triage(settings)))
        for report in reports:
            assert [(c.case_id, c.outcome) for c in report.cases] == [
                (small.case_id, ReleaseOutcome.QUEUE_FULL),
                (bigs[0], ReleaseOutcome.EXCEEDS_QUOTA),
                (bigs[1], ReleaseOutcome.EXCEEDS_QUOTA),
            ]
            assert report.to_json()["exceeds_quota"] == 2
            assert report.headline() == (
                "0 released, 3 still held (2 larger than the whole outbox quota: raise "
                "escalation.queue_quota_mb, 1 waiting for room in the outbox)"
            )
        assert [i.case_id for i in link.outbox.items()] != [] and all(
            i.case_id not in (small.case_id, *bigs) for i in link.outbox.items()
        ), "nothing queued ahead of the case that waits for room"
        note = not_released_notes(link, bigs[0])[-1]
        assert note is not None and note.startswith("exceeds_quota: outbox: this case (")


@pytest.mark.expect_log_warnings  # each case that stays held is named
def test_cases_larger_than_the_whole_quota_do_not_wait_for_room_and_go_once_it_is_raised(
    central: Central, device: Device, tmp_path: Path
) -> None:
    """No delivery can make room for a case larger than the whole quota: it does not stop the
    run as a full outbox does (the cases after it are tried), and the report says to raise
    the quota instead of "waiting for room"."""
    held = hold(device, central, tmp_path / "scans", (0, 1))
    settings = device.settings(central)
    with link_for(settings) as link:
        assert link.keys is not None
        small = Outbox.open(settings.case_store_path, settings.outbox_dir, quota_bytes=1024)
        with small:
            small_queue = EscalationQueue(small, link.device, link.keys.server_key)
            with CaseStore.open(settings.case_store_path) as store:
                report = release_held(store, small_queue, lazy_triage(settings))
        assert [(c.case_id, c.outcome) for c in report.cases] == [
            (case.case_id, ReleaseOutcome.EXCEEDS_QUOTA) for case in held
        ]
        assert (report.waiting_for_room, report.still_held) == (0, 2)
        assert report.headline() == (
            "0 released, 2 still held (2 larger than the whole outbox quota: raise "
            "escalation.queue_quota_mb)"
        )
        assert report.to_json()["exceeds_quota"] == 2
        (note,) = not_released_notes(link, held[0].case_id)
        assert note is not None and note.startswith("exceeds_quota: outbox: this case (")
        assert note.endswith("is larger than the whole quota (1024 bytes): raise "
                             "escalation.queue_quota_mb")  # fmt: skip
        assert link.outbox.status().full is False, "nothing was refused for want of room"

        raised = release(link)  # the configured quota (2 GiB by default)
        assert (raised.released, raised.still_held) == (2, 0)


@pytest.mark.expect_log_warnings
def test_a_case_whose_file_is_gone_stays_held_with_the_reason(
    central: Central, device: Device, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gone, kept = hold(device, central, tmp_path / "scans", (0, 1))
    source = Path(gone.result.path)
    source.unlink()
    with link_for(device.settings(central)) as link:
        caplog.clear()
        report = release(link)
        again = release(link)
        assert {c.case_id: c.outcome for c in report.cases} == {
            gone.case_id: ReleaseOutcome.SOURCE_UNAVAILABLE,
            kept.case_id: ReleaseOutcome.RELEASED,
        }
        assert (report.still_held, report.count(ReleaseOutcome.SOURCE_UNAVAILABLE)) == (1, 1)
        assert "1 source file missing or unreadable" in report.headline()
        assert [c.outcome for c in again.cases] == [ReleaseOutcome.SOURCE_UNAVAILABLE]
        assert state_of(link, gone.case_id) is CaseState.ESCALATION_HELD
        # Once in the history however often it is tried.
        assert not_released_notes(link, gone.case_id) == [
            "source_unavailable: source file missing or unreadable (unreadable)"
        ]
        assert [i.case_id for i in link.outbox.items()] == [kept.case_id]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all(gone.case_id in w for w in warnings)
    for text in caplog.text, *warnings:  # case ids only: no path, name, or identifier
        assert str(source) not in text and source.name not in text
        assert PATIENT_NAME not in text and PATIENT_ID not in text
        assert str(gone.original.SOPInstanceUID) not in text


@pytest.mark.expect_log_warnings
def test_a_case_re_triage_no_longer_escalates_stays_held_for_review(
    central: Central, device: Device, tmp_path: Path
) -> None:
    (case,) = hold(device, central, tmp_path / "scans", (0,))
    # An admin narrows the uncertain band to nothing: every phantom is decided locally now.
    settings = device.settings(central).with_values(
        escalation__normal_below=0.5, escalation__abnormal_at_or_above=0.5000001
    )
    with link_for(settings) as link:
        report = release(link)
        assert [(c.case_id, c.outcome) for c in report.cases] == [
            (case.case_id, ReleaseOutcome.DECISION_CHANGED)
        ]
        assert report.still_held == 1
        assert state_of(link, case.case_id) is CaseState.ESCALATION_HELD
        (note,) = not_released_notes(link, case.case_id)
        assert note is not None
        assert note.startswith("decision_changed: re-triage no longer escalates it: now ")
        assert "review it on this device" in note
        assert link.outbox.items() == []


def test_a_crash_between_the_outbox_and_the_case_store_is_finished_without_the_file(
    central: Central, device: Device, tmp_path: Path
) -> None:
    (case,) = hold(device, central, tmp_path / "scans", (0,))
    with link_for(device.settings(central)) as link:
        assert link.queue is not None
        # What a crash right after the outbox commit leaves: queued there, held in the store.
        item = link.queue.enqueue(case.case_id, case.payload, reason=case.result.reason)
        Path(case.result.path).unlink()  # not needed any more: the envelope is sealed
        report = release(link)
        assert [(c.case_id, c.outcome, c.detail) for c in report.cases] == [
            (case.case_id, ReleaseOutcome.RELEASED, "already in the outbox")
        ]
        assert state_of(link, case.case_id) is CaseState.QUEUED
        assert link.outbox.items() == [item]
        with CaseStore.open(link.settings.case_store_path) as store:
            events = [t.event for t in store.history(case.case_id)]
        assert events.count(CaseEvent.ENQUEUE) == 1


def test_without_the_keys_release_all_held_only_counts(
    central: Central, device: Device, tmp_path: Path
) -> None:
    hold(device, central, tmp_path / "scans", (0, 1))
    assert release_all_held(device.settings(central), None) == ReleaseReport(still_held=2)


@pytest.mark.expect_log_warnings  # the pinned certificate is not the server's
def test_a_wrong_pin_is_named_in_the_release_headline_not_only_in_the_log(
    central: Central, device: Device, tmp_path: Path
) -> None:
    """``queue release`` with a pin one digit off said only "0 released, 2 still held": the
    reason the cases cannot go is the one thing the admin has to fix."""
    hold(device, central, tmp_path / "scans", (0, 1))
    wrong = central.pin[:-1] + ("0" if central.pin[-1] != "0" else "1")
    settings = device.settings(central, **{"escalation.tls_pin": wrong})
    link = open_escalation(settings)  # the keys' fetch meets the wrong certificate
    assert link is not None
    with link:
        assert link.queue is None
        report = release_all_held(settings, link.queue, keys_error=link.keys_error)
    headline = report.headline()
    assert headline.startswith(
        "0 released, 2 still held (none can be sealed: certificate_pin_mismatch: "
    ), headline
    assert "escalation.tls_pin" in headline
    assert report.to_json()["blocked_by"].startswith("certificate_pin_mismatch: ")
    assert central.deliveries() == {}


# --- a clinician closes a held case while it is released ---------------------------------------

HELD_ID = "ab" * 32


def held_case(store: CaseStore, case_id: str = HELD_ID) -> CaseResult:
    """A held escalation as recorded, and its re-triage (the same case, with its payload)."""
    result = replace(
        make_result(case_id, decision="escalate", reason="uncertain"),
        escalation=EscalationRef(state=HELD),
    )
    assert store.record_result(result, store_event(result)) is CaseState.ESCALATION_HELD
    return replace(result, payload=b"de-identified payload")


def test_a_held_case_closed_while_it_is_re_triaged_stays_closed_and_is_never_sent(
    tmp_path: Path,
) -> None:
    db = tmp_path / "data" / "cases.sqlite3"
    with CaseStore.open(db) as store, light_queue(db) as queue:
        outbox = queue.outbox
        retriaged = held_case(store)
        answers: list[str] = []

        def slow_triage(path: str) -> InputOutcome:
            # The re-triage takes a while; meanwhile the clinician records "do not send".
            answers.append(acknowledge_in_another_process(db, HELD_ID))
            return retriaged

        report = release_held(store, queue, slow_triage)

        assert answers == ["acknowledged"]
        assert state_in(store, HELD_ID) is CaseState.ACKNOWLEDGED
        assert outbox.get(HELD_ID) is None
        assert outbox.claim_next("uploader", 60) is None
        assert list(outbox.spool_dir.iterdir()) == []
        assert report.released == 0 and report.still_held == 0
        assert [(c.case_id, c.outcome) for c in report.cases] == [
            (HELD_ID, ReleaseOutcome.NO_LONGER_HELD)
        ]
        assert "1 closed on this device meanwhile, not sent" in report.headline()


def test_a_held_case_whose_envelope_is_queued_cannot_be_closed_and_is_sent(
    tmp_path: Path,
) -> None:
    db = tmp_path / "data" / "cases.sqlite3"
    with CaseStore.open(db) as store, light_queue(db) as queue:
        retriaged = held_case(store)
        assert retriaged.payload is not None
        # The release committed the envelope but has not recorded the case queued yet.
        queue.enqueue(HELD_ID, retriaged.payload, reason="uncertain")

        assert acknowledge_in_another_process(db, HELD_ID) == "already_queued"

        assert state_in(store, HELD_ID) is CaseState.ESCALATION_HELD
        assert store.feedback(HELD_ID) == []
        report = release_held(store, queue, lambda path: retriaged)
        assert [c.outcome for c in report.cases] == [ReleaseOutcome.RELEASED]
        assert state_in(store, HELD_ID) is CaseState.QUEUED


def state_in(store: CaseStore, case_id: str) -> CaseState:
    case = store.get(case_id)
    assert case is not None
    return case.state
