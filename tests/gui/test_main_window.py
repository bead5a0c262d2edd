"""The main window end to end: open a folder, keys and menus, live worklist, import."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import shiboken6
from PySide6.QtCore import QEvent, QMimeData, QPointF, Qt, QThreadPool, QTimer, QUrl
from PySide6.QtGui import QColor, QDropEvent
from PySide6.QtTest import QTest
from PySide6.QtWidgets import QApplication, QFileDialog, QLabel, QMenu
from pytestqt.qtbot import QtBot

from tests.ct_series import write_ct_series
from tests.escalation.conftest import Device, device_identity, start_central_server, triage
from tests.gui.conftest import FOLDER_COUNT, phantoms_in_new_folder
from tests.helpers import write_bad_inputs, write_phantoms
from triage_app.batch import triage_and_record
from triage_app.central.certificates import make_self_signed
from triage_app.config import Settings
from triage_app.gui.qt_main_window import QtMainWindow
from triage_app.gui.qt_shortcut_overlay import key_text
from triage_app.gui.qt_worklist import Column
from triage_app.gui.shortcuts import COMMANDS
from triage_app.gui.theme import decision_style
from triage_app.importer import ImportSummary
from triage_app.pipeline import PipelineConfig, TriagePipeline
from triage_app.results import CaseResult
from triage_app.states import CaseEvent, CaseState
from triage_app.store import CaseStore
from triage_app.worklist import Urgency

IMPORT_TIMEOUT_MS = 120_000


def _import_and_wait(
    qtbot: QtBot, window: QtMainWindow, start: Callable[[], object]
) -> ImportSummary:
    with qtbot.waitSignal(window.importer.finished, timeout=IMPORT_TIMEOUT_MS) as blocker:
        start()
    summary = blocker.args[0]
    assert isinstance(summary, ImportSummary)
    return summary


def _wait_rows(qtbot: QtBot, window: QtMainWindow, count: int) -> None:
    window.worklist.refresh()
    qtbot.waitUntil(lambda: window.worklist.model.rowCount() == count, timeout=10_000)


def _activate(qtbot: QtBot, window: QtMainWindow) -> None:
    window.activateWindow()
    qtbot.waitUntil(window.isActiveWindow)


def test_open_folder_fills_the_worklist_with_the_core_decisions(
    qtbot: QtBot,
    window: QtMainWindow,
    settings: Settings,
    phantom_folder: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        QFileDialog, "getExistingDirectory", staticmethod(lambda *a, **k: str(phantom_folder))
    )
    summary = _import_and_wait(qtbot, window, window.actions_by_command["open_folder"].trigger)
    assert summary.imported == FOLDER_COUNT
    assert summary.skipped_by_code() == {"not_dicom": 1}
    assert summary.headline() == f"{FOLDER_COUNT} imported, 1 skipped: not DICOM"
    _wait_rows(qtbot, window, FOLDER_COUNT)

    pipeline = TriagePipeline(PipelineConfig.from_settings(settings))
    expected = {}
    for path in sorted(phantom_folder.glob("*.dcm")):
        outcome = pipeline.run(path)
        assert isinstance(outcome, CaseResult)
        expected[str(path)] = outcome.decision
    shown = {row.path: row.decision for row in window.worklist.visible_rows()}
    assert shown == expected
    with CaseStore.open(settings.case_store_path) as store:
        assert {c.case_id: c.decision for c in store.list_cases()} == {
            row.case_id: row.decision for row in window.worklist.visible_rows()
        }

    # Decision as text, icon and colour; urgent (abnormal) rows first.
    model = window.worklist.proxy
    for position, row in enumerate(window.worklist.visible_rows()):
        index = model.index(position, Column.DECISION)
        assert model.data(index) == decision_style(row.decision).text
        assert not model.data(index, Qt.ItemDataRole.DecorationRole).isNull()
        assert model.data(index, Qt.ItemDataRole.ForegroundRole) == QColor(
            decision_style(row.decision).colour
        )
    urgencies = [row.urgency for row in window.worklist.visible_rows()]
    assert urgencies == sorted(urgencies)


def test_search_and_filter(
    qtbot: QtBot, window: QtMainWindow, settings: Settings, phantom_folder: Path
) -> None:
    _import_and_wait(qtbot, window, lambda: window.import_paths([phantom_folder]))
    _wait_rows(qtbot, window, FOLDER_COUNT)
    rows = window.worklist.visible_rows()
    target = rows[-1]
    assert target.patient.patient_id  # read from the original file, on this device
    window.worklist.search.setText(target.patient.patient_id)
    assert [r.case_id for r in window.worklist.visible_rows()] == [target.case_id]
    window.worklist.search.clear()
    window.worklist.filter.setCurrentIndex(window.worklist.filter.findText("Normal"))
    assert {r.decision for r in window.worklist.visible_rows()} <= {"normal"}
    assert len(window.worklist.visible_rows()) == sum(r.decision == "normal" for r in rows)


def test_worklist_follows_the_store_live(
    qtbot: QtBot, window: QtMainWindow, settings: Settings, tmp_path: Path
) -> None:
    """Cases written by another shell appear, and a centre that disagrees moves to the top."""
    folder = tmp_path / "inbox"
    write_phantoms(folder, 70, 8)  # seed chosen to include escalated cases
    outcomes = list(triage_and_record(sorted(folder.iterdir()), settings))
    _wait_rows(qtbot, window, len(outcomes))
    escalated = [o for o in outcomes if isinstance(o, CaseResult) and o.decision == "escalate"]
    assert escalated
    case = escalated[0]
    disagreeing = "normal" if case.score >= 0.5 else "abnormal"
    with CaseStore.open(settings.case_store_path) as store:
        for event in (CaseEvent.ENQUEUE, CaseEvent.START_SEND, CaseEvent.DELIVER):
            store.apply(case.case_id, event)
        store.record_verdict(case.case_id, {"verdict": disagreeing, "score": 0.5})

    def on_top() -> bool:
        top = window.worklist.visible_rows()[0]
        return top.case_id == case.case_id and top.state is CaseState.VERDICT_RECEIVED

    qtbot.waitUntil(on_top, timeout=5_000)
    top = window.worklist.visible_rows()[0]
    assert top.urgency is Urgency.CENTRE_DISAGREES
    proxy = window.worklist.proxy
    assert proxy.data(proxy.index(0, Column.CENTRAL)) == f"⚠ {disagreeing} 0.500"
    tip = proxy.data(proxy.index(0, Column.CENTRAL), Qt.ItemDataRole.ToolTipRole)
    assert tip.endswith("disagrees with the device")


def test_every_command_is_in_its_menu_with_its_keys(window: QtMainWindow) -> None:
    menus = {
        action.text().replace("&", ""): action.menu()
        for action in window.menuBar().actions()
        if isinstance(action.menu(), QMenu)
    }
    for command in COMMANDS:
        menu = menus[command.menu]
        assert isinstance(menu, QMenu)
        names = [a.data() for a in menu.actions()]
        assert command.name in names, command.name
        action = window.actions_by_command[command.name]
        if command.keys and command.scope == "window":
            assert [s.toString() for s in action.shortcuts()] == list(command.keys)
        elif command.keys:
            assert action.text().endswith("\t" + key_text(command.keys))


def test_question_mark_shows_every_shortcut(qtbot: QtBot, window: QtMainWindow) -> None:
    _activate(qtbot, window)
    window.worklist.table.setFocus()
    QTest.keyClick(window.worklist.table, Qt.Key.Key_Question)
    qtbot.waitUntil(window.overlay.isVisible)
    text = window.overlay.label.text()
    for command in COMMANDS:
        assert command.label in text
        for key in command.keys:
            assert key_text((key,)).replace("&", "&amp;") in text
    QTest.keyClick(window.overlay, Qt.Key.Key_Escape)
    assert not window.overlay.isVisible()


def test_image_keys_act_on_the_focused_viewer(
    qtbot: QtBot, window: QtMainWindow, tmp_path: Path
) -> None:
    """Keys 1-5 set the CT presets and i inverts, while the image has the focus."""
    series = write_ct_series(tmp_path / "ct", 1)
    summary = _import_and_wait(qtbot, window, lambda: window.import_paths([series.files[0]]))
    assert summary.imported == 1
    _wait_rows(qtbot, window, 1)
    with qtbot.waitSignal(window.viewer.image_loaded, timeout=10_000):
        window.worklist.table.selectRow(0)
    _activate(qtbot, window)
    window.viewer.setFocus()
    qtbot.waitUntil(window.viewer.hasFocus)
    QTest.keyClick(window.viewer, Qt.Key.Key_2)
    assert (window.viewer.voi.center, window.viewer.voi.width) == (-600, 1500)
    QTest.keyClick(window.viewer, Qt.Key.Key_5)
    assert (window.viewer.voi.center, window.viewer.voi.width) == (40, 80)
    QTest.keyClick(window.viewer, Qt.Key.Key_I)
    assert window.viewer.inverted
    QTest.keyClick(window.viewer, Qt.Key.Key_Plus)
    zoomed = window.viewer.zoom
    QTest.keyClick(window.viewer, Qt.Key.Key_Equal)
    assert window.viewer.zoom < zoomed
    # With the worklist focused, the same key does not reach the image.
    window.worklist.table.setFocus()
    QTest.keyClick(window.worklist.table, Qt.Key.Key_1)
    assert (window.viewer.voi.center, window.viewer.voi.width) == (40, 80)


def test_cancel_stops_early_and_the_summary_counts_skipped_files(
    qtbot: QtBot, window: QtMainWindow, mixed_folder: tuple[Path, dict[str, str]]
) -> None:
    folder, bad = mixed_folder
    total = 30 + len(bad)

    def cancel_after_the_bad_files(progress: object) -> None:
        skipped = window.importer.last_progress
        if skipped is not None and skipped.done >= len(bad) + 1:
            window.importer.cancel()

    window.importer.progressed.connect(cancel_after_the_bad_files)
    summary = _import_and_wait(qtbot, window, lambda: window.import_paths([folder]))
    assert summary.cancelled
    assert summary.total == total
    assert summary.imported + len(summary.skipped) < total
    assert summary.not_processed > 0
    # Sorted input order puts three of the bad files before the first phantom.
    codes = summary.skipped_by_code()
    assert {"empty_file", "no_pixel_data", "not_dicom"} <= codes.keys()
    box = window.importer.summary_box
    assert box is not None
    assert "skipped" in box.text() and "cancelled" in box.text()
    assert "not_dicom" in box.detailedText()


def test_files_refused_at_import_are_still_shown_once_the_summary_is_closed(
    qtbot: QtBot, window: QtMainWindow, tmp_path: Path
) -> None:
    """Review finding: after OK, nothing said that 4 files (a truncated study) were missing."""
    folder = tmp_path / "mixed"
    write_phantoms(folder, 31, 2)
    bad = write_bad_inputs(folder)
    summary = _import_and_wait(qtbot, window, lambda: window.import_paths([folder]))
    assert len(summary.skipped) == len(bad)
    box = window.importer.summary_box
    assert box is not None
    box.accept()
    qtbot.waitUntil(lambda: not box.isVisible())
    window.statusBar().clearMessage()  # its 8 s are up
    shown = " ".join(label.text() for label in window.findChildren(QLabel) if label.isVisible())
    assert f"{len(bad)} files not imported" in shown


@pytest.fixture(scope="module")
def folder_of_200(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return phantoms_in_new_folder(tmp_path_factory, "two-hundred", 2024, 200)


def test_ui_stays_responsive_during_a_200_image_import(
    qtbot: QtBot,
    tmp_path: Path,
    folder_of_200: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """Measured and reported, not asserted: the largest gap between 10 ms timer ticks.

    The app's default settings (two worker processes) are used, as a clinician runs it.
    """
    window = QtMainWindow(Settings({"paths.data_dir": tmp_path / "data"}))
    qtbot.addWidget(window)
    window.show()
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    started = time.perf_counter()
    summary = _import_and_wait(qtbot, window, lambda: window.import_paths([folder_of_200]))
    elapsed = time.perf_counter() - started
    timer.stop()
    _wait_rows(qtbot, window, 200)
    window.close()

    assert summary.imported == 200
    assert len(ticks) > 2
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    largest_ms = max(gaps) * 1e3
    record_property("largest_event_loop_gap_ms", round(largest_ms, 1))
    record_property("import_seconds", round(elapsed, 2))
    print(
        f"\n200-image import: {elapsed:.2f} s; largest event-loop gap {largest_ms:.1f} ms "
        f"over {len(ticks)} ticks of a 10 ms timer"
    )


def test_files_dropped_on_the_window_are_imported(
    qtbot: QtBot, window: QtMainWindow, phantom_folder: Path
) -> None:
    dropped = sorted(phantom_folder.glob("*.dcm"))[:3]
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(path)) for path in dropped])
    drop = QDropEvent(
        QPointF(window.rect().center()),
        Qt.DropAction.CopyAction,
        mime,
        Qt.MouseButton.LeftButton,
        Qt.KeyboardModifier.NoModifier,
    )

    summary = _import_and_wait(qtbot, window, lambda: window.dropEvent(drop))

    assert summary.imported == len(dropped)
    _wait_rows(qtbot, window, len(dropped))
    assert sorted(row.path for row in window.worklist.visible_rows()) == [
        str(path) for path in dropped
    ]


def test_the_window_queues_the_cases_held_until_the_server_keys_are_known(
    qtbot: QtBot, tmp_path: Path
) -> None:
    central = start_central_server(tmp_path / "central", make_self_signed(tmp_path / "tls"))
    try:
        device = Device(tmp_path / "device", device_identity(tmp_path / "device"))
        central.register(device.identity)
        settings = device.settings(central)
        held = triage(settings, tmp_path / "scans", (0, 1), queue=None)  # imported offline
        window = QtMainWindow(settings)
        qtbot.addWidget(window)

        def delivered() -> bool:
            with CaseStore.open(settings.case_store_path) as store:
                return {c.state for c in store.list_cases()} == {CaseState.DELIVERED}

        qtbot.waitUntil(delivered, timeout=60_000)
        window.close()
        assert central.deliveries() == {case.case_id: 1 for case in held}
    finally:
        central.thread.stop()


# --- closing, the import dialog and the settings' scoring --------------------------------------


@pytest.fixture(scope="module")
def folder_of_40(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return phantoms_in_new_folder(tmp_path_factory, "forty", 2025, 40)


def test_closing_the_window_during_an_import_is_prompt_and_shows_no_summary(
    qtbot: QtBot, window: QtMainWindow, folder_of_40: Path
) -> None:
    """It used to wait a minute for the import thread, then abort, or leave a summary box."""
    window.import_paths([folder_of_40])
    qtbot.waitUntil(
        lambda: (
            window.importer.last_progress is not None and window.importer.last_progress.done >= 1
        ),
        timeout=IMPORT_TIMEOUT_MS,
    )
    began = time.perf_counter()
    window.close()
    assert time.perf_counter() - began < 10
    assert not window.importer.running and window.importer.dialog is None
    qtbot.wait(300)  # the run's last signals, queued meanwhile, arrive now
    assert window.importer.summary_box is None
    shown = [w.windowTitle() for w in QApplication.topLevelWidgets() if w.isVisible()]
    assert not [title for title in shown if "Import" in title]


def test_the_import_dialog_leaves_the_window_usable(
    qtbot: QtBot, window: QtMainWindow, folder_of_40: Path
) -> None:
    with qtbot.waitSignal(window.importer.finished, timeout=IMPORT_TIMEOUT_MS):
        window.import_paths([folder_of_40])
        dialog = window.importer.dialog
        assert dialog is not None and dialog.isVisible()
        assert dialog.windowModality() is Qt.WindowModality.NonModal and not dialog.isModal()
        assert QApplication.activeModalWidget() is None
        window.importer.cancel()


def test_settings_score_outside_the_shared_pool_and_stop_once_closed(
    qtbot: QtBot, window: QtMainWindow
) -> None:
    """Scoring in the pool's two threads starved image loads; closed dialogs went on scoring."""
    window.show_settings()
    dialog = window.settings_dialog
    assert dialog is not None
    assert QThreadPool.globalInstance().activeThreadCount() == 0
    scoring = [t for t in threading.enumerate() if t.name == "threshold-preview"]
    assert len(scoring) == 1

    dialog.close()
    QApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    assert not shiboken6.isValid(dialog) and window.settings_dialog is None
    scoring[0].join(timeout=20)  # cancelled: far sooner than rendering and scoring 200 images
    assert not scoring[0].is_alive()
