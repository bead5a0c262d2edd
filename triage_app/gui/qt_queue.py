"""The upload queue: every escalated case in the outbox, and an admin retry for refused ones.

Reading and retrying run in worker threads, each with its own outbox connection. A retry does
what ``triage-app queue retry`` does: it needs the admin password, puts the case back in the
queue, moves the case out of ``quarantined`` and writes the audit log.
"""

from __future__ import annotations

import logging
from functools import partial

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from triage_app.admin import current_user, require_admin, retry_refused_cases
from triage_app.config import Settings
from triage_app.errors import AdminAuthError, TriageError
from triage_app.escalation.outbox import OutboxItem, OutboxState
from triage_app.escalation.service import open_outbox
from triage_app.gui.qt_threading import run_in_thread

__all__ = ["QtQueueDialog", "read_queue", "retry_quarantined"]

log = logging.getLogger(__name__)

_HEADERS = ("Case", "State", "Reason", "Attempts", "Size", "Queued at", "Last error / refusal")


def read_queue(settings: Settings) -> list[OutboxItem]:
    with open_outbox(settings) as outbox:
        return outbox.items()


def retry_quarantined(settings: Settings, case_id: str, password: str, actor: str) -> OutboxItem:
    """Admin action (off the UI thread): check the password, then the core's retry."""
    require_admin(settings, password)
    (outcome,) = retry_refused_cases(settings, [case_id], actor)
    if outcome.error is not None:
        raise outcome.error
    assert outcome.item is not None
    return outcome.item


def _note(item: OutboxItem) -> str:
    if item.state is OutboxState.QUARANTINED:
        return f"refused: {item.quarantine_reason}"
    return item.last_error or ""


class QtQueueDialog(QDialog):
    retried = Signal(str)  # case id
    loaded = Signal(int)  # number of items shown

    def __init__(self, settings: Settings, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Upload queue")
        self.setAccessibleName("Upload queue")
        self._settings = settings
        self.items: list[OutboxItem] = []
        self.table = QTableWidget(0, len(_HEADERS), self)
        self.table.setAccessibleName("Queued cases")
        self.table.setHorizontalHeaderLabels(list(_HEADERS))
        self.table.verticalHeader().hide()
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setStretchLastSection(True)
        self.table.itemSelectionChanged.connect(self._selection_changed)

        self.password = QLineEdit(self)
        self.password.setEchoMode(QLineEdit.EchoMode.Password)
        self.password.setPlaceholderText("Admin password")
        self.password.setAccessibleName("Admin password")
        self.retry_button = QPushButton("Retry refused case", self)
        self.retry_button.setEnabled(False)
        self.retry_button.clicked.connect(self.retry_selected)
        refresh = QPushButton("Refresh", self)
        refresh.clicked.connect(self.refresh)
        close = QPushButton("Close", self)
        close.clicked.connect(self.close)
        self.message = QLabel("", self)
        self.message.setAccessibleName("Queue message")
        self.message.setWordWrap(True)

        buttons = QHBoxLayout()
        buttons.addWidget(self.password)
        buttons.addWidget(self.retry_button)
        buttons.addStretch(1)
        buttons.addWidget(refresh)
        buttons.addWidget(close)
        layout = QVBoxLayout(self)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.message)
        layout.addLayout(buttons)
        self.resize(900, 420)
        self.refresh()

    def refresh(self) -> None:
        run_in_thread(partial(read_queue, self._settings), self._show, self._failed, owner=self)

    def select_case(self, case_id: str) -> bool:
        for row, item in enumerate(self.items):
            if item.case_id == case_id:
                self.table.selectRow(row)
                return True
        return False

    def selected(self) -> OutboxItem | None:
        rows = {index.row() for index in self.table.selectionModel().selectedRows()}
        return self.items[min(rows)] if rows else None

    def retry_selected(self) -> None:
        item = self.selected()
        if item is None or item.state is not OutboxState.QUARANTINED:
            return
        password = self.password.text()
        self.password.clear()
        self.retry_button.setEnabled(False)
        self.message.setText("Checking the admin password…")
        run_in_thread(
            partial(retry_quarantined, self._settings, item.case_id, password, current_user()),
            self._retried,
            self._failed,
            owner=self,
        )

    def _retried(self, item: OutboxItem) -> None:
        self.message.setText(f"Case {item.case_id[:16]} is back in the queue.")
        self.retried.emit(item.case_id)
        self.refresh()

    def _show(self, items: list[OutboxItem]) -> None:
        self.items = items
        self.table.setRowCount(len(items))
        for row, item in enumerate(items):
            cells = (
                item.case_id[:16],
                item.state.value.replace("_", " "),
                item.reason,
                str(item.attempts),
                f"{item.size_bytes / 1024:,.0f} KB",
                item.enqueued_at[:19].replace("T", " "),
                _note(item),
            )
            for column, text in enumerate(cells):
                cell = QTableWidgetItem(text)
                if column == 0:
                    cell.setToolTip(item.case_id)
                self.table.setItem(row, column, cell)
        self._selection_changed()
        self.loaded.emit(len(items))

    def _failed(self, exc: BaseException) -> None:
        if isinstance(exc, AdminAuthError):
            self.message.setText(f"Not retried: {exc.message}")
        else:
            message = exc.message if isinstance(exc, TriageError) else type(exc).__name__
            log.error("upload queue: %s", message)
            self.message.setText(f"Queue unavailable: {message}")
        self._selection_changed()

    def _selection_changed(self) -> None:
        item = self.selected()
        self.retry_button.setEnabled(item is not None and item.state is OutboxState.QUARANTINED)
