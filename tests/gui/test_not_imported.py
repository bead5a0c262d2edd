"""Files refused at import stay listed until the clinician clears them, across restarts.

The review found that, once the import summary was closed, nothing in the app said that files
had not been imported: a truncated study of a real patient was silently missing.
"""

from __future__ import annotations

import json
import logging
import stat
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from PySide6.QtCore import Qt
from PySide6.QtGui import QGuiApplication
from PySide6.QtTest import QTest
from PySide6.QtWidgets import QFileDialog
from pytestqt.qtbot import QtBot

from tests.helpers import phantom_dataset, write_bad_inputs, write_phantoms
from triage_app.config import Settings
from triage_app.gui.qt_main_window import QtMainWindow
from triage_app.gui.qt_not_imported import LIST_FILE, NotImportedList, QtNotImportedDialog
from triage_app.importer import ImportSummary, SkippedInput, describe_code

IMPORT_TIMEOUT_MS = 120_000


@pytest.fixture
def mixed(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """Two good phantoms and one file per failure mode (file name → expected code)."""
    folder = tmp_path / "DOE^JANE study"  # a path that looks like a patient's name
    write_phantoms(folder, 31, 2)
    return folder, write_bad_inputs(folder)


def _import(qtbot: QtBot, window: QtMainWindow, start: Callable[[], object]) -> ImportSummary:
    """Import as the clinician does, then close the summary with OK."""
    with qtbot.waitSignal(window.importer.finished, timeout=IMPORT_TIMEOUT_MS) as blocker:
        start()
    box = window.importer.summary_box
    assert box is not None
    box.accept()
    qtbot.waitUntil(lambda: not box.isVisible())
    summary = blocker.args[0]
    assert isinstance(summary, ImportSummary)
    return summary


def _rows(dialog: QtNotImportedDialog) -> dict[str, tuple[str, ...]]:
    """File → (time, reason, code, details), as the table shows them."""
    table = dialog.table
    rows: dict[str, tuple[str, ...]] = {}
    for row in range(table.rowCount()):
        items = [table.item(row, column) for column in range(table.columnCount())]
        cells = [item.text() if item is not None else "" for item in items]
        rows[cells[1]] = (cells[0], cells[2], cells[3], cells[4])
    return rows


def _new_window(qtbot: QtBot, settings: Settings) -> QtMainWindow:
    window = QtMainWindow(settings)
    qtbot.addWidget(window)
    window.show()
    qtbot.waitExposed(window)
    return window


def test_files_refused_at_import_stay_listed_until_cleared(
    qtbot: QtBot,
    window: QtMainWindow,
    mixed: tuple[Path, dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="triage_app")
    folder, bad = mixed
    monkeypatch.setattr(
        QFileDialog, "getExistingDirectory", staticmethod(lambda *a, **k: str(folder))
    )
    summary = _import(qtbot, window, window.actions_by_command["open_folder"].trigger)
    assert summary.imported == 2 and len(summary.skipped) == len(bad)

    # The summary is gone; the notice is not.
    notice = window.not_imported.notice
    assert notice.isVisible()
    assert notice.label.text().startswith(f"⚠ {len(bad)} files not imported")
    QTest.mouseClick(notice.show_button, Qt.MouseButton.LeftButton)
    dialog = window.not_imported.dialog
    assert dialog is not None and dialog.isVisible()
    rows = _rows(dialog)
    assert {path: (reason, code) for path, (_t, reason, code, _d) in rows.items()} == {
        str(folder / name): (describe_code(code), code) for name, code in bad.items()
    }
    assert all(when and details for when, _r, _c, details in rows.values())
    assert str(len(bad)) in dialog.headline.text()

    # The same list from the menu, and as text for a ticket.
    dialog.close()
    window.not_imported_action.trigger()
    assert dialog.isVisible() and dialog.table.rowCount() == len(bad)
    QTest.mouseClick(dialog.copy_button, Qt.MouseButton.LeftButton)
    copied = QGuiApplication.clipboard().text().splitlines()
    assert copied[0].split("\t") == ["Time", "File", "Reason", "Code", "Details"]
    assert {line.split("\t")[1]: line.split("\t")[3] for line in copied[1:]} == {
        str(folder / name): code for name, code in bad.items()
    }

    # Paths are shown on this device, never logged.
    assert caplog.records
    assert not [r for r in caplog.records if "DOE^JANE" in r.getMessage()]

    QTest.mouseClick(dialog.clear_button, Qt.MouseButton.LeftButton)
    assert not notice.isVisible()
    assert dialog.table.rowCount() == 0
    assert not dialog.clear_button.isEnabled()
    window.close()
    again = _new_window(qtbot, window.settings)
    assert again.not_imported.count == 0 and not again.not_imported.notice.isVisible()


def test_the_list_survives_a_restart_in_a_private_file_and_follows_later_imports(
    qtbot: QtBot, window: QtMainWindow, settings: Settings, mixed: tuple[Path, dict[str, str]]
) -> None:
    folder, bad = mixed
    _import(qtbot, window, lambda: window.import_paths([folder]))
    kept = settings.data_dir / LIST_FILE
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    window.close()

    restarted = _new_window(qtbot, settings)
    assert restarted.not_imported.notice.isVisible()
    assert restarted.not_imported.notice.label.text().startswith(f"⚠ {len(bad)} files")

    # Sent again: the truncated file, whole this time, is imported and leaves the list; the
    # empty one is refused again and stays listed once, with the new time.
    before = {e.path: e.when for e in restarted.not_imported.list.entries}
    phantom_dataset(5, 1).save_as(folder / "truncated.dcm", enforce_file_format=True)
    summary = _import(
        qtbot,
        restarted,
        lambda: restarted.import_paths([folder / "truncated.dcm", folder / "empty.dcm"]),
    )
    assert summary.imported == 1 and [s.code for s in summary.skipped] == ["empty_file"]
    after = {e.path: e.when for e in restarted.not_imported.list.entries}
    assert set(after) == {str(folder / n) for n in bad if n != "truncated.dcm"}
    empty = str(folder / "empty.dcm")
    assert after[empty] > before[empty]
    assert restarted.not_imported.notice.label.text().startswith(f"⚠ {len(bad) - 1} files")
    assert len(json.loads(kept.read_text(encoding="ascii"))["files"]) == len(bad) - 1


def _skipped(name: str) -> SkippedInput:
    return SkippedInput(f"/data/DOE^JANE/{name}", "truncated", "DICOM file cut short")


@pytest.mark.expect_log_warnings
def test_a_damaged_list_is_reported_without_paths_and_written_anew(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / LIST_FILE
    path.write_text('{"version": 1, "files": [{"path": "/data/DOE^JANE/a.dcm"', encoding="ascii")
    kept = NotImportedList.load(path)
    assert kept.entries == []
    assert "damaged" in caplog.text and "DOE^JANE" not in caplog.text
    kept.record([_skipped("b.dcm")], [], _now())
    assert [e.path for e in NotImportedList.load(path).entries] == ["/data/DOE^JANE/b.dcm"]


@pytest.mark.expect_log_warnings
def test_a_list_that_cannot_be_saved_is_kept_for_the_session_and_says_so(
    qtbot: QtBot, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("", encoding="ascii")
    kept = NotImportedList(blocker / LIST_FILE)
    kept.record([_skipped("a.dcm")], [], _now())
    assert [e.code for e in kept.entries] == ["truncated"]
    assert kept.save_error is not None
    assert "not saved" in caplog.text and "DOE^JANE" not in caplog.text
    dialog = QtNotImportedDialog()
    qtbot.addWidget(dialog)
    dialog.show_list(kept)
    assert "lost when the app closes" in dialog.headline.text()


def _now() -> datetime:
    return datetime.now(UTC)
