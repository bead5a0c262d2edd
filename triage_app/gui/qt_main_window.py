"""The main window: menus and shortcuts from the command table, worklist beside the viewer.

It wires widgets to each other and to the core (importer, case store, saliency) and holds no
triage logic. Window-wide commands work from anywhere; image commands only while the image
has the keyboard focus, so the arrow keys keep moving through the worklist when it has it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QAction, QCloseEvent, QDragEnterEvent, QDropEvent, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QFileDialog,
    QMainWindow,
    QMessageBox,
    QSplitter,
    QWidget,
)

from triage_app.config import Settings
from triage_app.gui.qt_import import ImportController
from triage_app.gui.qt_shortcut_overlay import QtShortcutOverlay, key_text
from triage_app.gui.qt_statusbar import QtStatusBar
from triage_app.gui.qt_threading import wait_for_workers
from triage_app.gui.qt_viewer import QtViewer
from triage_app.gui.qt_worklist import QtWorklist
from triage_app.gui.shortcuts import COMMANDS, MENUS, Command
from triage_app.gui.theme import font_scale, set_font_scale
from triage_app.gui.viewer_model import AiResult, SaliencyService
from triage_app.importer import ImportProgress, ImportSummary
from triage_app.worklist import Urgency, WorklistRow

__all__ = ["QtMainWindow"]

log = logging.getLogger(__name__)

FONT_STEP = 0.1


class QtMainWindow(QMainWindow):
    def __init__(self, settings: Settings, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.settings = settings
        self.setWindowTitle("Triage – clinician workstation")
        self.setAccessibleName("Triage main window")
        self.setAcceptDrops(True)

        self.worklist = QtWorklist(settings.case_store_path, self)
        self.viewer = QtViewer(self)
        self.viewer.set_saliency_function(SaliencyService(settings))
        splitter = QSplitter(Qt.Orientation.Horizontal, self)
        splitter.addWidget(self.worklist)
        splitter.addWidget(self.viewer)
        splitter.setStretchFactor(0, 1)
        splitter.setStretchFactor(1, 1)
        splitter.setChildrenCollapsible(False)
        splitter.setSizes([640, 760])
        self.setCentralWidget(splitter)
        self.setTabOrder(self.worklist.search, self.worklist.filter)
        self.setTabOrder(self.worklist.filter, self.worklist.table)
        self.setTabOrder(self.worklist.table, self.viewer)

        self.status = QtStatusBar(self)
        self.setStatusBar(self.status)
        self.overlay = QtShortcutOverlay(splitter)
        self.importer = ImportController(settings, self)

        self.actions_by_command: dict[str, QAction] = {}
        self._build_menus()

        self.worklist.case_selected.connect(self._show_case)
        self.worklist.refreshed.connect(self._update_counts)
        self.viewer.message.connect(lambda text: self.status.showMessage(text, 4000))
        self.importer.progressed.connect(self._import_progress)
        self.importer.finished.connect(self._import_finished)
        self.importer.failed.connect(lambda _message: self.status.set_import_progress(None))
        self.resize(1400, 860)

    # --- menus and shortcuts ----------------------------------------------------------------

    def _handlers(self) -> dict[str, Callable[[], None]]:
        v = self.viewer
        handlers: dict[str, Callable[[], None]] = {
            "open_files": self.open_files,
            "open_folder": self.open_folder,
            "quit": self._quit,
            "focus_search": self._focus_search,
            "focus_worklist": lambda: self.worklist.table.setFocus(
                Qt.FocusReason.ShortcutFocusReason
            ),
            "focus_viewer": lambda: v.setFocus(Qt.FocusReason.ShortcutFocusReason),
            "zoom_font_in": lambda: self.scale_fonts(FONT_STEP),
            "zoom_font_out": lambda: self.scale_fonts(-FONT_STEP),
            "zoom_in": v.zoom_in,
            "zoom_out": v.zoom_out,
            "fit": v.fit,
            "reset": v.reset,
            "invert": v.invert,
            "previous_frame": v.previous_frame,
            "next_frame": v.next_frame,
            "first_frame": v.first_frame,
            "last_frame": v.last_frame,
            "toggle_overlay": v.toggle_overlay,
            "toggle_heatmap": v.toggle_heatmap,
            "heatmap_less": v.heatmap_less,
            "heatmap_more": v.heatmap_more,
            "show_shortcuts": self.overlay.toggle,
            "about": self._about,
        }
        for number in range(1, 6):
            handlers[f"preset_{number}"] = partial(v.apply_preset, number)
        return handlers

    def _build_menus(self) -> None:
        """One menu entry per command; image commands get a second, focus-scoped action."""
        handlers = self._handlers()
        missing = {c.name for c in COMMANDS} - handlers.keys()
        if missing:
            raise RuntimeError(f"commands without a handler: {sorted(missing)}")
        menus = {name: self.menuBar().addMenu(f"&{name}") for name in MENUS}
        for command in COMMANDS:
            handler = handlers[command.name]
            action = QAction(command.label, self)
            action.setObjectName(f"action_{command.name}")
            action.setData(command.name)
            action.setStatusTip(command.description or command.label)
            action.triggered.connect(handler)
            if command.scope == "window":
                action.setShortcuts([QKeySequence(k) for k in command.keys])
                action.setShortcutContext(Qt.ShortcutContext.WindowShortcut)
                self.addAction(action)
            else:
                # The menu shows the keys; the viewer's own action binds them, so they act
                # only while the image has the focus.
                if command.keys:
                    action.setText(f"{command.label}\t{key_text(command.keys)}")
                self.viewer.addAction(self._viewer_action(command, handler))
            menus[command.menu].addAction(action)
            self.actions_by_command[command.name] = action

    def _viewer_action(self, command: Command, handler: Callable[[], None]) -> QAction:
        action = QAction(command.label, self.viewer)
        action.setObjectName(f"viewer_{command.name}")
        action.setShortcuts([QKeySequence(k) for k in command.keys])
        action.setShortcutContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
        action.triggered.connect(handler)
        return action

    # --- commands ---------------------------------------------------------------------------

    def open_files(self) -> None:
        files, _filter = QFileDialog.getOpenFileNames(
            self, "Open DICOM files", "", "DICOM files (*.dcm *.DCM *.dicom);;All files (*)"
        )
        self.import_paths(files)

    def open_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open a folder of DICOM files")
        if folder:
            self.import_paths([folder])

    def import_paths(self, paths: Sequence[str | os.PathLike[str]]) -> bool:
        """The one way in for File → Open and drag and drop."""
        if not paths:
            return False
        if not self.importer.start(list(paths)):
            self.status.showMessage("An import is already running", 4000)
            return False
        return True

    def scale_fonts(self, delta: float) -> None:
        app = QApplication.instance()
        if isinstance(app, QApplication):
            scale = set_font_scale(app, font_scale(app) + delta)
            self.status.showMessage(f"Text size {scale * 100:.0f} %", 3000)

    def _quit(self) -> None:
        self.close()

    def _focus_worklist(self) -> None:
        self.worklist.table.setFocus(Qt.FocusReason.ShortcutFocusReason)

    def _focus_search(self) -> None:
        self.worklist.search.setFocus(Qt.FocusReason.ShortcutFocusReason)
        self.worklist.search.selectAll()

    def _about(self) -> None:
        box = QMessageBox(self)
        box.setWindowTitle("About")
        box.setText(
            "Triage – on-device DICOM triage.\n\nAI results are not for diagnostic use; "
            "a clinician reads every image."
        )
        box.open()

    # --- reactions --------------------------------------------------------------------------

    def _show_case(self, row: WorklistRow) -> None:
        self.viewer.show_case(row.case_id, row.path, AiResult.from_result(row.result))

    def _update_counts(self, _changed: int) -> None:
        rows = self.worklist.model.rowCount()
        urgent = sum(
            1 for i in range(rows) if self.worklist.model.row_at(i).urgency <= Urgency.ABNORMAL
        )
        self.status.set_counts(rows, urgent)

    def _import_progress(self, progress: ImportProgress) -> None:
        self.status.set_import_progress(progress)

    def _import_finished(self, summary: ImportSummary) -> None:
        self.status.set_import_progress(None)
        self.status.showMessage(summary.headline(), 8000)
        self.worklist.refresh()

    # --- drag and drop ----------------------------------------------------------------------

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:  # noqa: N802
        if event.mimeData().hasUrls() and any(u.isLocalFile() for u in event.mimeData().urls()):
            event.acceptProposedAction()

    def dropEvent(self, event: QDropEvent) -> None:  # noqa: N802
        paths = [Path(u.toLocalFile()) for u in event.mimeData().urls() if u.isLocalFile()]
        if self.import_paths(paths):
            event.acceptProposedAction()

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802
        self.importer.cancel()
        self.importer.wait()
        self.worklist.stop()
        self.viewer.shutdown()
        wait_for_workers()
        super().closeEvent(event)
