"""File → Open and drag and drop: the import runs in a worker thread with a progress dialog.

The core :class:`~triage_app.importer.ImportRun` does the work and yields a record per file;
this module only carries those records to the UI thread (signals), shows "312 / 1,200" with the
current file and a Cancel button, and ends with a summary whose details list every skipped file
(which the main window then keeps listed: :mod:`triage_app.gui.qt_not_imported`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from PySide6.QtCore import QObject, Qt, QThread, Signal
from PySide6.QtWidgets import (
    QDialog,
    QLabel,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from triage_app.config import Settings
from triage_app.errors import TriageError
from triage_app.importer import ImportProgress, ImportRun, ImportSummary

__all__ = ["ImportController", "ImportDialog"]

log = logging.getLogger(__name__)


class _ImportWorker(QObject):
    """Runs in the import thread; every record goes out as a signal."""

    progressed = Signal(object)  # ImportProgress
    finished = Signal(object)  # ImportSummary
    failed = Signal(str)

    def __init__(self, run: ImportRun) -> None:
        super().__init__()
        self._run = run

    def work(self) -> None:
        try:
            for progress in self._run:
                self.progressed.emit(progress)
        except TriageError as err:
            # Configuration, model or store problems stop the whole import: say so plainly.
            log.error("import stopped: %s", err.message)
            self.failed.emit(err.message)
            return
        except Exception as exc:  # noqa: BLE001
            # Anything else would end this thread silently and leave the dialog up for ever.
            log.error("import stopped by an unexpected %s", type(exc).__name__)
            self.failed.emit(f"The import stopped unexpectedly ({type(exc).__name__}).")
            return
        assert self._run.summary is not None
        self.finished.emit(self._run.summary)


class ImportDialog(QDialog):
    """Determinate progress, the current file and Cancel; it never blocks the window.

    Non-modal on purpose: a large import takes minutes, and the clinician keeps reading the
    worklist (which fills as the cases land) meanwhile.
    """

    cancel_requested = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Importing images")
        self.setModal(False)
        self.counter = QLabel("Finding files…", self)
        self.counter.setAccessibleName("Import progress")
        self.bar = QProgressBar(self)
        self.bar.setAccessibleName("Import progress bar")
        self.bar.setTextVisible(False)
        self.bar.setRange(0, 0)
        self.current = QLabel("", self)
        self.current.setAccessibleName("Current file")
        self.current.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.cancel_button = QPushButton("Cancel", self)
        self.cancel_button.setAccessibleName("Cancel import")
        self.cancel_button.clicked.connect(self._cancel)
        layout = QVBoxLayout(self)
        layout.addWidget(self.counter)
        layout.addWidget(self.bar)
        layout.addWidget(self.current)
        layout.addWidget(self.cancel_button, alignment=Qt.AlignmentFlag.AlignRight)
        self.setMinimumWidth(460)

    def show_progress(self, progress: ImportProgress) -> None:
        self.bar.setRange(0, max(progress.total, 1))
        self.bar.setValue(progress.done)
        self.counter.setText(f"{progress.done:,} / {progress.total:,}")
        if progress.current is not None:
            self.current.setText(progress.current.name)

    def reject(self) -> None:
        """Escape (or closing the dialog) cancels the import."""
        self._cancel()

    def _cancel(self) -> None:
        self.cancel_button.setEnabled(False)
        self.cancel_button.setText("Cancelling…")
        self.cancel_requested.emit()


class ImportController(QObject):
    """Starts imports (one at a time), shows their progress and their summary."""

    progressed = Signal(object)  # ImportProgress
    finished = Signal(object)  # ImportSummary
    failed = Signal(str)

    def __init__(self, settings: Settings, parent: QWidget) -> None:
        super().__init__(parent)
        #: Read at each start, so saved settings (e.g. new thresholds) apply to the next import.
        self.settings = settings
        self._parent = parent
        self._thread: QThread | None = None
        self._worker: _ImportWorker | None = None
        self._run: ImportRun | None = None
        self.dialog: ImportDialog | None = None
        self.summary_box: QMessageBox | None = None
        self.last_summary: ImportSummary | None = None
        self.last_progress: ImportProgress | None = None
        self._shutting_down = False

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self, paths: Sequence[str | os.PathLike[str]]) -> bool:
        """Import ``paths`` (files and folders); False if an import is already running."""
        if self.running or not paths:
            return False
        self._run = ImportRun(paths, self.settings)
        self.last_progress = None
        self.last_summary = None
        self.summary_box = None
        self._worker = _ImportWorker(self._run)
        self._thread = QThread(self)
        self._thread.setObjectName("import")
        self._worker.moveToThread(self._thread)
        self._thread.started.connect(self._worker.work)
        self._worker.progressed.connect(self._on_progress)
        self._worker.finished.connect(self._on_finished)
        self._worker.failed.connect(self._on_failed)
        # Ended from the import thread itself: the UI thread may be blocked in shutdown(),
        # waiting for this thread, and could not deliver a queued quit.
        self._worker.finished.connect(self._thread.quit, Qt.ConnectionType.DirectConnection)
        self._worker.failed.connect(self._thread.quit, Qt.ConnectionType.DirectConnection)
        self.dialog = ImportDialog(self._parent)
        self.dialog.cancel_requested.connect(self.cancel)
        self.dialog.show()
        self._thread.start()
        return True

    def cancel(self) -> None:
        if self._run is not None:
            self._run.cancel.set()

    def shutdown(self) -> None:
        """The window is closing: stop after the current file, wait for it, and show nothing.

        The worker quits its thread as soon as the run ends, so the wait lasts one file at
        most; the summary that the run still sends is dropped, not shown over a closed window.
        """
        self._shutting_down = True
        if self._thread is None:
            return
        self.cancel()
        self._thread.wait()
        self._end()

    def _on_progress(self, progress: ImportProgress) -> None:
        if self._shutting_down:
            return
        self.last_progress = progress
        if self.dialog is not None:
            self.dialog.show_progress(progress)
        self.progressed.emit(progress)

    def _on_finished(self, summary: ImportSummary) -> None:
        if self._shutting_down:
            return
        self._end()
        self.last_summary = summary
        box = QMessageBox(self._parent)
        box.setWindowTitle("Import cancelled" if summary.cancelled else "Import finished")
        # A warning when files were refused: a study may be missing from the worklist.
        icon = QMessageBox.Icon.Warning if summary.skipped else QMessageBox.Icon.Information
        box.setIcon(icon)
        box.setText(summary.headline())
        if summary.skipped:
            # Closing this box must not be the last the clinician sees of a refused file.
            box.setInformativeText(
                "The files not imported stay listed above the worklist (and under File → "
                "Files not imported…) until you clear the list."
            )
            box.setDetailedText(summary.details())
        box.setAccessibleName("Import summary")
        self.summary_box = box
        box.open()
        self.finished.emit(summary)

    def _on_failed(self, message: str) -> None:
        if self._shutting_down:
            return
        self._end()
        box = QMessageBox(self._parent)
        box.setWindowTitle("Import failed")
        box.setIcon(QMessageBox.Icon.Critical)
        box.setText(message)
        self.summary_box = box
        box.open()
        self.failed.emit(message)

    def _end(self) -> None:
        if self.dialog is not None:
            self.dialog.hide()
            self.dialog.deleteLater()
            self.dialog = None
        if self._thread is not None:
            self._thread.quit()
            self._thread.wait()
            self._thread.deleteLater()
        self._thread = None
        self._worker = None
        self._run = None
