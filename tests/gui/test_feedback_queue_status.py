"""Feedback and history, the upload queue's admin retry, and the link/queue/disk status bar."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from PySide6.QtWidgets import QMessageBox
from pytestqt.qtbot import QtBot

from tests.helpers import make_result
from triage_app.admin import current_user
from triage_app.config import Settings, set_admin_password
from triage_app.escalation.connectivity import ConnectivityState
from triage_app.escalation.outbox import OutboxState
from triage_app.escalation.service import open_outbox
from triage_app.gui.qt_main_window import QtMainWindow
from triage_app.gui.qt_queue import QtQueueDialog
from triage_app.gui.qt_worklist import Column
from triage_app.pipeline import PipelineConfig, TriagePipeline
from triage_app.results import CaseResult
from triage_app.states import CaseEvent, CaseState, Feedback
from triage_app.store import CaseStore

PASSWORD = "correct horse battery"
_FINAL = {
    "normal": CaseEvent.DECIDE_LOCAL_NORMAL,
    "abnormal": CaseEvent.DECIDE_LOCAL_ABNORMAL,
    "escalate": CaseEvent.HOLD,
}


def _record_case(settings: Settings, path: Path) -> str:
    outcome = TriagePipeline(PipelineConfig.from_settings(settings)).run(path)
    assert isinstance(outcome, CaseResult)
    with CaseStore.open(settings.case_store_path) as store:
        store.record_result(outcome, _FINAL[outcome.decision])
    return outcome.case_id


def test_accept_is_recorded_with_user_and_time_and_shown_in_the_history(
    qtbot: QtBot, window: QtMainWindow, settings: Settings, phantom_folder: Path
) -> None:
    case_id = _record_case(settings, phantom_folder / "p000.dcm")
    window.worklist.refresh()
    qtbot.waitUntil(lambda: window.worklist.model.rowCount() == 1)
    with qtbot.waitSignal(window.history.loaded):
        assert window.worklist.select_case(case_id)
    assert window.history_dock.isVisible()
    window.history.comment.setText("agree")
    with qtbot.waitSignal(window.feedback_recorded) as recorded:
        window.actions_by_command["accept_result"].trigger()
    record = recorded.args[0]
    assert (record.case_id, record.kind, record.actor) == (case_id, Feedback.ACCEPT, current_user())
    qtbot.waitUntil(lambda: any(r[1] == "acknowledge" for r in window.history.rows()))
    last = window.history.rows()[-1]
    assert last[2].endswith("→ acknowledged")
    assert last[3] == f"accept by {current_user()}: agree"
    local = datetime.fromisoformat(record.at).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    assert last[0] == local
    with CaseStore.open(settings.case_store_path) as store:
        assert store.get(case_id).state is CaseState.ACKNOWLEDGED  # type: ignore[union-attr]
        entry = store.audit_log()[-1]
    assert (entry.actor, entry.action, entry.at) == (current_user(), "case.feedback", record.at)
    assert entry.detail == {"case_id": case_id, "kind": "accept", "comment": "agree"}

    # Acknowledged is final: a second answer is refused and said so.
    window.actions_by_command["reject_result"].trigger()
    qtbot.waitUntil(lambda: "Feedback not recorded" in window.status.currentMessage())


def test_feedback_without_a_selected_case_says_so(window: QtMainWindow) -> None:
    window.actions_by_command["acknowledge_result"].trigger()
    assert window.status.currentMessage() == "Select a case first"


@pytest.fixture
def admin_settings(settings: Settings) -> Settings:
    return set_admin_password(settings, PASSWORD)


@pytest.fixture
def quarantined(admin_settings: Settings) -> Iterator[str]:
    case_id = hashlib.sha256(b"case-q").hexdigest()[:32]
    envelope = b"sealed envelope bytes" * 10
    with open_outbox(admin_settings) as outbox:
        outbox.enqueue(
            case_id,
            envelope,
            reason="uncertain",
            payload_sha256=hashlib.sha256(envelope).hexdigest(),
        )
        outbox.quarantine(case_id, "HTTP 422: payload refused")
    yield case_id


@pytest.mark.expect_log_warnings  # the outbox warns when it quarantines
def test_queue_view_retries_a_quarantined_case_only_with_the_admin_password(
    qtbot: QtBot, admin_settings: Settings, quarantined: str
) -> None:
    dialog = QtQueueDialog(admin_settings)
    qtbot.addWidget(dialog)
    dialog.show()
    qtbot.waitUntil(lambda: len(dialog.items) == 1)
    assert dialog.table.item(0, 1).text() == "quarantined"  # type: ignore[union-attr]
    assert dialog.table.item(0, 6).text() == "refused: HTTP 422: payload refused"  # type: ignore[union-attr]
    assert dialog.select_case(quarantined)
    assert dialog.retry_button.isEnabled()

    dialog.password.setText("wrong password!")
    dialog.retry_selected()
    qtbot.waitUntil(lambda: dialog.message.text().startswith("Not retried"))
    assert "admin password is wrong" in dialog.message.text()

    dialog.password.setText(PASSWORD)
    with qtbot.waitSignal(dialog.retried):
        dialog.retry_selected()
    qtbot.waitUntil(lambda: dialog.items[0].state is OutboxState.PENDING)
    assert dialog.table.item(0, 1).text() == "pending"  # type: ignore[union-attr]
    assert not dialog.retry_button.isEnabled()
    with CaseStore.open(admin_settings.case_store_path) as store:
        entries = [(e.actor, e.action, e.detail) for e in store.audit_log()]
    assert entries == [(current_user(), "queue.retry", {"case_id": quarantined, "resealed": False})]


def test_status_bar_shows_offline_since_last_error_queue_and_disk(
    qtbot: QtBot, tmp_path: Path
) -> None:
    # Keeping 10 TB free is more than any test machine has: the disk alarm must show.
    settings = Settings({"paths.data_dir": tmp_path / "data", "receiver.min_free_mb": 10_000_000})
    link = ConnectivityState()
    since = datetime.now(UTC) - timedelta(minutes=5)
    link.mark_failure("connect_failed", "connection refused\n by host", since)
    link.mark_failure("timeout", "no answer in 5 s", since + timedelta(minutes=1))
    window = QtMainWindow(settings, connectivity=link.snapshot)
    qtbot.addWidget(window)
    window.show()
    segments = window.status.segments
    qtbot.waitUntil(lambda: segments["link"].text().startswith("○ Offline"))
    assert segments["link"].text() == "○ Offline (5 min)"
    when = since.astimezone()
    assert segments["link"].toolTip() == f"Central server offline since {when:%Y-%m-%d %H:%M:%S}"
    assert segments["error"].text() == (
        f"Central server unreachable since {when:%H:%M} — cases wait and will be sent automatically"
    )
    assert "Last error: timeout: no answer in 5 s" in segments["error"].toolTip()
    assert segments["queue"].text() == "Escalations: nothing pending"
    assert segments["disk"].text().startswith("⚠ Disk low: ")
    assert segments["disk"].text().endswith("MB free (reserve 10,000,000 MB)")

    link.mark_success(datetime.now(UTC))
    window.monitor.refresh()
    qtbot.waitUntil(lambda: segments["link"].text() == "● Online")
    assert segments["error"].text() == "" and segments["error"].isHidden()
    window.close()


# --- which feedback a case's state allows ---------------------------------------------------


def _show(qtbot: QtBot, window: QtMainWindow, settings: Settings, result: CaseResult) -> None:
    """Record ``result`` (its final event from its decision) and select it in the worklist."""
    event = {"abnormal": CaseEvent.DECIDE_LOCAL_ABNORMAL, "normal": CaseEvent.DECIDE_LOCAL_NORMAL}
    with CaseStore.open(settings.case_store_path) as store:
        store.record_result(result, event.get(result.decision, CaseEvent.HOLD))
    window.worklist.refresh()
    qtbot.waitUntil(lambda: window.worklist.model.row_for(result.case_id) is not None)
    with qtbot.waitSignal(window.history.loaded):
        assert window.worklist.select_case(result.case_id)


def _state(settings: Settings, case_id: str) -> CaseState:
    with CaseStore.open(settings.case_store_path) as store:
        case = store.get(case_id)
    assert case is not None
    return case.state


def test_feedback_on_a_held_case_asks_first_and_says_it_will_not_be_sent(
    qtbot: QtBot, window: QtMainWindow, settings: Settings, phantom_folder: Path
) -> None:
    """Acknowledging a held case silently cancelled its escalation."""
    path = str(phantom_folder / "p000.dcm")
    held = make_result("case-held", decision="escalate", reason="uncertain", score=0.5, path=path)
    _show(qtbot, window, settings, held)
    assert window.history.buttons[Feedback.ACKNOWLEDGE].isEnabled()

    window.actions_by_command["acknowledge_result"].trigger()
    box = window.held_confirmation
    assert box is not None and box.isVisible()
    assert "will NOT be sent" in box.text()
    box.button(QMessageBox.StandardButton.Cancel).click()
    assert window.status.currentMessage() == "Feedback not recorded; the case stays held"
    assert _state(settings, "case-held") is CaseState.ESCALATION_HELD

    window.actions_by_command["acknowledge_result"].trigger()
    box = window.held_confirmation
    assert box is not None
    (record,) = [b for b in box.buttons() if b.text() == "Record feedback, do not send"]
    with qtbot.waitSignal(window.feedback_recorded):
        record.click()
    assert _state(settings, "case-held") is CaseState.ACKNOWLEDGED


def test_feedback_on_a_case_on_its_way_is_refused_in_words(
    qtbot: QtBot, window: QtMainWindow, settings: Settings, phantom_folder: Path
) -> None:
    path = str(phantom_folder / "p000.dcm")
    queued = make_result("case-queued", decision="escalate", reason="uncertain", path=path)
    with CaseStore.open(settings.case_store_path) as store:
        store.record_result(queued, CaseEvent.ENQUEUE)
    window.worklist.refresh()
    qtbot.waitUntil(lambda: window.worklist.model.row_for("case-queued") is not None)
    with qtbot.waitSignal(window.history.loaded):
        assert window.worklist.select_case("case-queued")

    sentence = "this case is on its way to the central server; give feedback once its verdict is in"
    assert not any(button.isEnabled() for button in window.history.buttons.values())
    assert window.history.buttons[Feedback.ACCEPT].toolTip() == sentence.capitalize() + "."
    window.actions_by_command["accept_result"].trigger()
    assert window.status.currentMessage() == f"Feedback not recorded: {sentence}."
    assert _state(settings, "case-queued") is CaseState.QUEUED


def test_feedback_refused_by_the_store_is_said_in_words_too(
    qtbot: QtBot, window: QtMainWindow, settings: Settings, phantom_folder: Path
) -> None:
    """Another reader acknowledged the case after the worklist last read it."""
    _show(qtbot, window, settings, make_result("case-1", path=str(phantom_folder / "p000.dcm")))
    window.worklist.stop()  # the row stays as it was read
    with CaseStore.open(settings.case_store_path) as store:
        store.record_feedback("case-1", "dr.other", Feedback.ACKNOWLEDGE)
    window.actions_by_command["accept_result"].trigger()
    expected = "Feedback not recorded: feedback on this case has already been recorded."
    qtbot.waitUntil(lambda: window.status.currentMessage() == expected)


def test_an_accepted_abnormal_case_no_longer_counts_as_urgent(
    qtbot: QtBot, window: QtMainWindow, settings: Settings, phantom_folder: Path
) -> None:
    path = str(phantom_folder / "p000.dcm")
    abnormal = make_result("case-a", decision="abnormal", score=0.97, path=path)
    _show(qtbot, window, settings, abnormal)
    proxy = window.worklist.proxy
    assert proxy.data(proxy.index(0, Column.PRIORITY)) == "⚠ Abnormal"
    assert window.status.segments["cases"].text() == "1 cases · 1 urgent"

    with qtbot.waitSignal(window.feedback_recorded):
        window.actions_by_command["accept_result"].trigger()
    qtbot.waitUntil(lambda: window.status.segments["cases"].text() == "1 cases · 0 urgent")
    assert proxy.data(proxy.index(0, Column.PRIORITY)) == "Reviewed"
