"""The status bar never widens the window, and counts every escalated case still pending.

A clinician review found the window pushed past a 1280 px screen by one long "Last error" (the
queue count and the feedback buttons cut off), and "Queue: 0 waiting" while cases were held on
the device or still waiting for their central verdict.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from PySide6.QtWidgets import QApplication
from pytestqt.qtbot import QtBot

from tests.helpers import make_result
from triage_app.config import Settings
from triage_app.escalation.connectivity import ConnectivityState
from triage_app.escalation.outbox import OutboxStatus
from triage_app.escalation.service import open_outbox
from triage_app.gui.qt_main_window import QtMainWindow
from triage_app.gui.qt_status_monitor import QtStatusMonitor, StatusReading, link_text, queue_text
from triage_app.gui.qt_statusbar import ElidedLabel, QtStatusBar
from triage_app.states import CaseEvent
from triage_app.store import CaseStore

ORIGIN = "https://triage-central.radiology.example-hospital.org:18443"
REASON = "connection refused (ECONNREFUSED)"
LONG_ERROR = f"upload: cannot reach {ORIGIN}: {REASON}; " + "then retried, " * 30 + "in vain"


def _id(name: str) -> str:
    """A case id as the pipeline makes them (32 hex digits)."""
    return hashlib.sha256(name.encode()).hexdigest()[:32]


def _queue(settings: Settings, *case_ids: str) -> None:
    """Put ``case_ids`` in the outbox, as the pipeline does for escalated cases."""
    with open_outbox(settings) as outbox:
        for case_id in case_ids:
            envelope = f"sealed envelope of {case_id}".encode() * 10
            outbox.enqueue(
                case_id,
                envelope,
                reason="uncertain",
                payload_sha256=hashlib.sha256(envelope).hexdigest(),
            )


def _record(settings: Settings, *, held: int = 0, delivered: int = 0, queued: int = 0) -> None:
    """Cases in the case store: held on the device, delivered without a verdict, queued."""
    with CaseStore.open(settings.case_store_path) as store:
        for i in range(held):
            store.record_result(make_result(_id(f"held-{i}"), decision="escalate"), CaseEvent.HOLD)
        for i in range(delivered):
            case_id = _id(f"delivered-{i}")
            store.record_result(make_result(case_id, decision="escalate"), CaseEvent.ENQUEUE)
            store.apply(case_id, CaseEvent.START_SEND)
            store.apply(case_id, CaseEvent.DELIVER)
        queue = [_id(f"queued-{i}") for i in range(queued)]
        for case_id in queue:
            store.record_result(make_result(case_id, decision="escalate"), CaseEvent.ENQUEUE)
    _queue(settings, *queue)


def _fully_shown(label: ElidedLabel) -> bool:
    """The label is visible, inside the status bar and wide enough for its whole text."""
    bar = label.parentWidget()
    assert bar is not None
    inside = label.geometry().right() <= bar.width() and label.geometry().left() >= 0
    return label.isVisible() and inside and not label.is_elided()


def test_a_long_error_never_widens_the_window_and_the_queue_stays_readable(
    qtbot: QtBot, tmp_path: Path
) -> None:
    settings = Settings({"paths.data_dir": tmp_path / "data"})
    _record(settings, queued=2)
    link = ConnectivityState()
    since = datetime.now(UTC) - timedelta(minutes=3)
    link.mark_failure("transport_error", LONG_ERROR, since)
    window = QtMainWindow(settings, connectivity=link.snapshot)
    qtbot.addWidget(window)
    window.resize(1280, 800)
    window.show()
    qtbot.waitExposed(window)
    segments = window.status.segments
    error, queue = segments["error"], segments["queue"]
    qtbot.waitUntil(lambda: error.isVisible() and "2 to send" in queue.text())
    QApplication.processEvents()

    assert window.width() == 1280
    assert window.status.minimumSizeHint().width() <= 1280
    available = window.screen().availableGeometry().width()
    assert window.status.minimumSizeHint().width() <= available
    # The error gives way (elided, whole in its tooltip); the queue count does not.
    when = since.astimezone().strftime("%H:%M")
    assert error.text() == (
        f"Central server unreachable since {when} — cases wait and will be sent automatically"
    )
    assert f"transport_error: upload: cannot reach {ORIGIN}: {REASON}" in error.toolTip()
    assert _fully_shown(segments["queue"])
    assert re.fullmatch(r"Escalations: 2 to send \(oldest \d+ s\)", segments["queue"].text())
    assert _fully_shown(segments["link"]) and segments["link"].text() == "○ Offline (3 min)"

    # The window can be made as narrow as the screen whatever the error says.
    window.resize(available, 800)
    QApplication.processEvents()
    assert window.width() == available
    assert _fully_shown(segments["queue"])

    link.mark_success(datetime.now(UTC))
    window.monitor.refresh()
    qtbot.waitUntil(lambda: segments["link"].text() == "● Online")
    assert error.isHidden() and window.width() == available
    window.close()


def test_an_elided_label_is_whole_in_its_text_and_tooltip(qtbot: QtBot) -> None:
    bar = QtStatusBar()
    qtbot.addWidget(bar)
    bar.resize(300, 24)
    bar.show()
    bar.set_text("disk", "⚠ Disk low: " + "9" * 200 + " MB free")
    QApplication.processEvents()
    disk = bar.segments["disk"]
    assert disk.is_elided()
    assert disk.text() == disk.toolTip() == "⚠ Disk low: " + "9" * 200 + " MB free"
    assert bar.minimumSizeHint().width() < disk.sizeHint().width()


def test_a_message_takes_the_place_of_the_error_and_gives_it_back(qtbot: QtBot) -> None:
    """The error takes the spare room, but never squeezes out "Feedback recorded" and such."""
    bar = QtStatusBar()
    qtbot.addWidget(bar)
    bar.resize(900, 24)
    bar.show()
    error = bar.segments["error"]
    bar.set_text("error", "Central server unreachable since 10:00 — cases wait")
    assert error.isVisible()
    bar.showMessage("Result accepted by dr.a")
    assert error.isHidden()
    bar.set_text("error", "Central server unreachable since 10:01 — cases wait")  # a new reading
    assert error.isHidden()
    bar.clearMessage()
    assert error.isVisible() and error.text().endswith("10:01 — cases wait")

    bar.showMessage("Result accepted by dr.a")
    bar.set_text("error", "")  # back online meanwhile
    bar.clearMessage()
    assert error.isHidden()


def _reading(settings: Settings, qtbot: QtBot) -> StatusReading:
    monitor = QtStatusMonitor(settings, None)
    try:
        with qtbot.waitSignal(monitor.updated, timeout=10_000) as blocker:
            monitor.refresh()
    finally:
        monitor.stop()
    reading = blocker.args[0]
    assert isinstance(reading, StatusReading)
    return reading


def test_held_and_awaiting_verdict_cases_are_counted(qtbot: QtBot, tmp_path: Path) -> None:
    """The outbox alone said "0 waiting" with 4 cases held and 2 waiting for their verdict."""
    settings = Settings({"paths.data_dir": tmp_path / "data"})
    _record(settings, held=4, delivered=2, queued=1)
    reading = _reading(settings, qtbot)
    assert (reading.held, reading.awaiting_verdict) == (4, 2)
    text = queue_text(reading)
    assert re.fullmatch(
        r"Escalations: 4 held on device · 2 awaiting verdict · 1 to send \(oldest \d+ s\)", text
    )
    # No central server configured: the link says where escalations go.
    assert link_text(reading) == ("No central server: escalations are held on this device", "")


def test_held_cases_show_in_the_window_status_bar(
    qtbot: QtBot, window: QtMainWindow, settings: Settings
) -> None:
    _record(settings, held=3)
    window.monitor.refresh()
    queue = window.status.segments["queue"]
    qtbot.waitUntil(lambda: queue.text() == "Escalations: 3 held on device")
    assert "Held on this device: 3 — no central server is configured" in queue.toolTip()
    link = window.status.segments["link"]
    assert link.text() == "No central server: escalations are held on this device"


def test_nothing_pending_is_said_only_when_every_group_is_empty(
    qtbot: QtBot, tmp_path: Path
) -> None:
    settings = Settings({"paths.data_dir": tmp_path / "data"})
    assert queue_text(_reading(settings, qtbot)) == "Escalations: nothing pending"


def _status(**fields: object) -> OutboxStatus:
    values: dict[str, object] = {
        "pending": 0,
        "in_flight": 0,
        "delivered": 0,
        "quarantined": 0,
        "queued_bytes": 0,
        "quota_bytes": 100,
        "oldest_pending_age_s": None,
        "full": False,
    }
    values.update(fields)
    return OutboxStatus(**values)  # type: ignore[arg-type]


def test_queue_wording_for_refused_and_full() -> None:
    reading = StatusReading(
        at=datetime.now(UTC),
        central_configured=True,
        connectivity=None,
        queue=_status(quarantined=2, full=True, pending=1, oldest_pending_age_s=125.0),
        queue_error=None,
        free_bytes=None,
        min_free_bytes=0,
        held=1,
        awaiting_verdict=0,
    )
    assert queue_text(reading) == (
        "Escalations: 1 held on device · 1 to send (oldest 2 min) · ⚠ 2 refused"
        " · ⚠ FULL: new escalations refused"
    )


def test_a_changed_certificate_is_not_called_unreachable() -> None:
    link = ConnectivityState()
    since = datetime.now(UTC) - timedelta(seconds=30)
    link.mark_failure("certificate_pin_mismatch", "server presented sha256 ab12", since)
    reading = StatusReading(
        at=datetime.now(UTC),
        central_configured=True,
        connectivity=link.snapshot(),
        queue=None,
        queue_error=None,
        free_bytes=None,
        min_free_bytes=0,
    )
    short, error = link_text(reading)
    assert short == "○ Offline (30 s)"
    assert error.startswith("Central server not trusted since ")
    assert "nothing is sent" in error and "unreachable" not in error
