"""The main window: menus and shortcuts from the command table, worklist beside the viewer.

It wires widgets to each other and to the core (importer, case store, saliency, outbox,
uploader, settings) and holds no triage logic. Like the services, it runs the uploader in a
background thread when a central server is configured, and queues the cases held until the
server's keys were known. Window-wide commands work from anywhere; image commands only while
the image has the keyboard focus, so the arrow keys keep moving through the worklist when it
has it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QAction, QCloseEvent, QDragEnterEvent, QDropEvent, QKeySequence
from PySide6.QtWidgets import (
    QAbstractButton,
    QApplication,
    QDockWidget,
    QFileDialog,
    QMainWindow,
    QMenu,
    QMessageBox,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from triage_app.admin import current_user
from triage_app.config import Settings
from triage_app.errors import ConfigError, IllegalTransitionError, TriageError
from triage_app.escalation.background import BackgroundUploader
from triage_app.escalation.service import EscalationLink
from triage_app.gui.qt_history import QtCaseHistory
from triage_app.gui.qt_import import ImportController
from triage_app.gui.qt_not_imported import QtNotImported
from triage_app.gui.qt_queue import QtQueueDialog
from triage_app.gui.qt_settings import QtSettingsDialog
from triage_app.gui.qt_shortcut_overlay import QtShortcutOverlay, key_text
from triage_app.gui.qt_status_monitor import ConnectivitySource, QtStatusMonitor
from triage_app.gui.qt_statusbar import QtStatusBar
from triage_app.gui.qt_threading import run_in_thread, wait_for_workers
from triage_app.gui.qt_viewer import QtViewer
from triage_app.gui.qt_worklist import QtWorklist
from triage_app.gui.settings_model import AppliedChanges
from triage_app.gui.shortcuts import COMMANDS, MENUS, Command
from triage_app.gui.theme import font_scale, set_font_scale
from triage_app.gui.viewer_model import AiResult, SaliencyService
from triage_app.held_release import release_all_held
from triage_app.importer import ImportProgress, ImportSummary
from triage_app.states import CaseState, Feedback
from triage_app.store import CaseStore, FeedbackRecord
from triage_app.worklist import Urgency, WorklistRow, feedback_allowed, feedback_refusal

__all__ = ["QtMainWindow"]

log = logging.getLogger(__name__)

FONT_STEP = 0.1
_UPLOAD_STOP_WAIT_S = 3.0  # on close: time for the upload in hand to finish, then it is left

_FEEDBACK_DONE = {
    Feedback.ACCEPT: "Result accepted",
    Feedback.REJECT: "Result rejected",
    Feedback.ACKNOWLEDGE: "Result acknowledged",
}


def _release_held_cases(link: EscalationLink) -> None:
    """In the uploader's thread, once the server's keys are known: the cases held until then
    (imported while it was unreachable) are queued before the first delivery."""
    try:
        report = release_all_held(link.settings, link.queue)
    except TriageError as err:
        log.error("held cases could not be released (%s): %s", err.code, err)
        return
    if report.cases:
        log.info("held cases: %s", report.headline())


class QtMainWindow(QMainWindow):
    """The clinician's window.

    ``config_path`` is the settings file the settings dialog saves to (None: the default one);
    ``connectivity`` replaces the window's own uploader as the source of the link status (the
    uploader is started only without it, and only when a central server is configured).
    """

    feedback_recorded = Signal(object)  # FeedbackRecord
    settings_saved = Signal(object)  # AppliedChanges

    def __init__(
        self,
        settings: Settings,
        parent: QWidget | None = None,
        *,
        config_path: Path | None = None,
        connectivity: ConnectivitySource | None = None,
    ) -> None:
        super().__init__(parent)
        self.settings = settings
        self.config_path = config_path
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
        # Files refused at import stay in a notice above the worklist until cleared.
        self.not_imported = QtNotImported(settings.data_dir, self)
        central = QWidget(self)
        central_layout = QVBoxLayout(central)
        central_layout.setContentsMargins(0, 0, 0, 0)
        central_layout.setSpacing(0)
        central_layout.addWidget(self.not_imported.notice)
        central_layout.addWidget(splitter, 1)
        self.setCentralWidget(central)
        self.setTabOrder(self.worklist.search, self.worklist.filter)
        self.setTabOrder(self.worklist.filter, self.worklist.table)
        self.setTabOrder(self.worklist.table, self.viewer)

        self.history = QtCaseHistory(settings.case_store_path, self)
        self.history_dock = QDockWidget("Case history", self)
        self.history_dock.setObjectName("history_dock")
        self.history_dock.setWidget(self.history)
        self.addDockWidget(Qt.DockWidgetArea.BottomDockWidgetArea, self.history_dock)
        self.history.feedback_requested.connect(self.give_feedback)

        self.status = QtStatusBar(self)
        self.setStatusBar(self.status)
        self.overlay = QtShortcutOverlay(splitter)
        self.importer = ImportController(settings, self)
        self.uploader: BackgroundUploader | None = None
        if connectivity is None and settings.central_url is not None:
            self.uploader = BackgroundUploader(settings, on_keys=_release_held_cases)
            self.uploader.start()
            connectivity = self.uploader.snapshot
        self.monitor = QtStatusMonitor(settings, connectivity, self)
        self.monitor.updated.connect(self.status.set_reading)
        self.queue_dialog: QtQueueDialog | None = None
        self.settings_dialog: QtSettingsDialog | None = None

        self.actions_by_command: dict[str, QAction] = {}
        self._build_menus()
        self.not_imported_action = self._add_not_imported_action()

        self.worklist.case_selected.connect(self._show_case)
        self._counts_shown = False
        self.worklist.refreshed.connect(self._update_counts)
        self.worklist.refreshed.connect(lambda _changed: self._sync_feedback_buttons())
        self.held_confirmation: QMessageBox | None = None
        self.viewer.message.connect(lambda text: self.status.showMessage(text, 4000))
        self.importer.progressed.connect(self._import_progress)
        self.importer.progressed.connect(self.not_imported.note_progress)
        self.importer.finished.connect(self._import_finished)
        self.importer.finished.connect(self.not_imported.record)
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
            "accept_result": partial(self.give_feedback, Feedback.ACCEPT),
            "reject_result": partial(self.give_feedback, Feedback.REJECT),
            "acknowledge_result": partial(self.give_feedback, Feedback.ACKNOWLEDGE),
            "show_history": self._toggle_history,
            "show_queue": self.show_queue,
            "admin_settings": self.show_settings,
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

    def _add_not_imported_action(self) -> QAction:
        """File → Files not imported…: the list stays reachable once its notice is cleared.

        No key, so it is not a command of the table (which the ``?`` overlay lists).
        """
        action = QAction("Files not imported…", self)
        action.setObjectName("action_show_not_imported")
        action.setStatusTip("Files refused at import since the list was last cleared")
        action.triggered.connect(self.not_imported.show_list)
        owners = self.actions_by_command["open_folder"].associatedObjects()
        menus = [m for m in owners if isinstance(m, QMenu)]
        if menus:
            menus[0].insertAction(self.actions_by_command["quit"], action)
        return action

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

    def give_feedback(self, kind: Feedback) -> None:
        """Record the clinician's feedback on the selected case (off the UI thread).

        Refused, in words, where the state does not allow it. A case held on this device is
        asked about first: feedback closes it, so it is never sent for a second opinion.
        """
        row = self.worklist.current_row()
        if row is None:
            self.status.showMessage("Select a case first", 4000)
            return
        if not feedback_allowed(row.state):
            self._refuse_feedback(row.state)
            return
        if row.state is CaseState.ESCALATION_HELD:
            self._confirm_held_feedback(row.case_id, kind)
            return
        self._record_feedback(row.case_id, kind)

    def _confirm_held_feedback(self, case_id: str, kind: Feedback) -> None:
        box = QMessageBox(self)
        box.setIcon(QMessageBox.Icon.Warning)
        box.setWindowTitle("Case held on this device")
        box.setText(
            "This uncertain case is waiting on this device to be sent to the central server "
            "for a second opinion.\n\nIf you record your feedback now, the case is closed "
            "and will NOT be sent."
        )
        record = box.addButton("Record feedback, do not send", QMessageBox.ButtonRole.AcceptRole)
        box.addButton(QMessageBox.StandardButton.Cancel)
        box.setDefaultButton(QMessageBox.StandardButton.Cancel)
        box.setAccessibleName("Confirm feedback on a held case")
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)

        def answered(button: QAbstractButton) -> None:
            self.held_confirmation = None
            if button is record:
                self._record_feedback(case_id, kind)
            else:
                self.status.showMessage("Feedback not recorded; the case stays held", 6000)

        box.buttonClicked.connect(answered)
        self.held_confirmation = box
        box.open()

    def _record_feedback(self, case_id: str, kind: Feedback) -> None:
        store_path = self.settings.case_store_path
        user, comment = current_user(), self.history.comment.text()

        def work() -> FeedbackRecord | CaseState:
            with CaseStore.open(store_path) as store:
                try:
                    return store.record_feedback(case_id, user, kind, comment)
                except IllegalTransitionError:
                    # The worklist's row was older than the store: say why in words.
                    case = store.get(case_id)
                    if case is None:
                        raise
                    return case.state

        run_in_thread(work, self._feedback_done, self._feedback_failed, owner=self)

    def _refuse_feedback(self, state: CaseState) -> None:
        sentence = feedback_refusal(state)
        log.info("feedback refused in state %s", state)
        self.status.showMessage(f"Feedback not recorded: {sentence}.", 8000)

    def _feedback_done(self, record: FeedbackRecord | CaseState) -> None:
        if isinstance(record, CaseState):
            self._refuse_feedback(record)
            self.worklist.refresh()
            return
        self.history.comment.clear()
        self.status.showMessage(f"{_FEEDBACK_DONE[record.kind]} by {record.actor}", 6000)
        if self.history.case_id == record.case_id:
            self.history.show_case(record.case_id)
        self.worklist.refresh()
        self.feedback_recorded.emit(record)

    def _feedback_failed(self, exc: BaseException) -> None:
        message = exc.message if isinstance(exc, TriageError) else type(exc).__name__
        log.info("feedback not recorded: %s", message)
        self.status.showMessage(f"Feedback not recorded: {message}", 8000)

    def _toggle_history(self) -> None:
        self.history_dock.setVisible(not self.history_dock.isVisible())

    def show_queue(self) -> None:
        if self.queue_dialog is None:
            self.queue_dialog = QtQueueDialog(self.settings, self)
            self.queue_dialog.retried.connect(lambda _case_id: self.monitor.refresh())
        else:
            self.queue_dialog.refresh()
        self.queue_dialog.show()
        self.queue_dialog.raise_()

    def show_settings(self) -> None:
        if self.settings_dialog is None:
            try:
                self.settings_dialog = QtSettingsDialog(self.settings, self.config_path, self)
            except ConfigError as err:
                self.status.showMessage(f"Settings file unusable: {err.message}", 8000)
                return
            # Deleted once closed, with its widgets and plot: each opening builds a new one.
            self.settings_dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
            self.settings_dialog.saved.connect(self._settings_saved)
            self.settings_dialog.finished.connect(self._settings_closed)
        self.settings_dialog.show()
        self.settings_dialog.raise_()

    def _settings_closed(self, _result: int) -> None:
        self.settings_dialog = None

    def _settings_saved(self, applied: AppliedChanges) -> None:
        """The running app takes the new values too (command-line overrides stay), except the
        store's location: every part of the app keeps the store it opened until a restart."""
        try:
            self.settings = self.settings.with_values(**{c.key: c.new for c in applied.live})
        except ConfigError as err:
            self.status.showMessage(f"Saved; restart to apply: {err.message}", 8000)
            return
        self.importer.settings = self.settings
        if applied.needing_restart:
            keys = ", ".join(applied.needing_restart)
            self.status.showMessage(f"Saved; restart the app to apply {keys}", 10_000)
        self.settings_saved.emit(applied)

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
        self.history.show_case(row.case_id)
        self.history.allow_feedback(feedback_refusal(row.state))

    def _sync_feedback_buttons(self) -> None:
        """The selected case may have moved on (fed back, queued, answered) since selected."""
        row = self.worklist.current_row()
        if row is not None and row.case_id == self.history.case_id:
            self.history.allow_feedback(feedback_refusal(row.state))

    def _update_counts(self, changed: int) -> None:
        if changed == 0 and self._counts_shown:
            return  # nothing changed, and counting walks every case: once a second adds up
        self._counts_shown = True
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
        if self.settings_dialog is not None:
            self.settings_dialog.close()  # cancels its scoring, which nothing waits for
        self.importer.shutdown()
        self.worklist.stop()
        self.monitor.stop()
        if self.uploader is not None:
            # A case on a slow link can take minutes: closing does not wait for it.
            self.uploader.stop(_UPLOAD_STOP_WAIT_S, may_abandon=True)
        self.viewer.shutdown()
        wait_for_workers()
        super().closeEvent(event)
