"""The selected case's history (every state change, feedback included) and the feedback buttons.

The history is read from the case store in a worker thread whenever the selection changes or
feedback is recorded; a reply for a case no longer shown is dropped. The buttons only ask the
main window to record feedback: the store does the work (state, history, audit in one go).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime
from functools import partial
from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
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

from triage_app.errors import TriageError
from triage_app.gui.qt_threading import run_in_thread
from triage_app.states import CaseEvent, Feedback
from triage_app.store import CaseStore, CaseTransition
from triage_app.worklist import verdict_summary

__all__ = ["QtCaseHistory", "read_history"]

log = logging.getLogger(__name__)

_HEADERS = ("Time", "Event", "State", "Detail")
_BUTTONS = (
    (Feedback.ACCEPT, "Accept"),
    (Feedback.REJECT, "Reject"),
    (Feedback.ACKNOWLEDGE, "Acknowledge"),
)


def read_history(store_path: Path, case_id: str) -> list[CaseTransition]:
    """The case's history; its (last) ``receive verdict`` row says what the verdict was.

    The store keeps the verdict with the case, not in the history row (whose detail is empty),
    so the row would say a verdict came without saying which.
    """
    with CaseStore.open(store_path) as store:
        history = store.history(case_id)
        received = [i for i, step in enumerate(history) if step.event == CaseEvent.RECEIVE_VERDICT]
        if not received or history[received[-1]].detail:
            return history
        case = store.get(case_id)
    summary = verdict_summary(case.verdict if case is not None else None)
    if summary:
        history[received[-1]] = replace(history[received[-1]], detail=summary)
    return history


def _local_time(iso: str) -> str:
    return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")


class QtCaseHistory(QWidget):
    feedback_requested = Signal(object)  # Feedback
    loaded = Signal(str)  # case id whose history is now shown

    def __init__(self, store_path: Path, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setAccessibleName("Case history")
        self._store_path = store_path
        self.case_id: str | None = None
        self.title = QLabel("No case selected", self)
        self.title.setAccessibleName("Case shown in the history")
        self.table = QTableWidget(0, len(_HEADERS), self)
        self.table.setAccessibleName("State history")
        self.table.setHorizontalHeaderLabels(list(_HEADERS))
        self.table.verticalHeader().hide()
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setTabKeyNavigation(False)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setStretchLastSection(True)
        self.comment = QLineEdit(self)
        self.comment.setPlaceholderText("Comment with your feedback (optional)")
        self.comment.setAccessibleName("Feedback comment")
        self.buttons: dict[Feedback, QPushButton] = {}
        row = QHBoxLayout()
        row.addWidget(self.comment, 1)
        for kind, label in _BUTTONS:
            button = QPushButton(label, self)
            button.setAccessibleName(f"{label} result")
            button.clicked.connect(partial(self.feedback_requested.emit, kind))
            row.addWidget(button)
            self.buttons[kind] = button
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self.title)
        layout.addWidget(self.table, 1)
        layout.addLayout(row)
        self._set_buttons(False)

    def show_case(self, case_id: str) -> None:
        """Show ``case_id``'s history (read off the UI thread).

        The feedback buttons are the window's to enable (:meth:`allow_feedback`): it knows
        the case's state.
        """
        self.case_id = case_id
        self.title.setText(f"Case {case_id[:16]}")
        run_in_thread(
            partial(read_history, self._store_path, case_id),
            partial(self._show, case_id),
            partial(self._failed, case_id),
            owner=self,
        )

    def rows(self) -> list[tuple[str, ...]]:
        """The table as text, row by row (for tests and screen readers' summaries)."""
        rows: list[tuple[str, ...]] = []
        for r in range(self.table.rowCount()):
            items = (self.table.item(r, c) for c in range(self.table.columnCount()))
            rows.append(tuple(item.text() if item is not None else "" for item in items))
        return rows

    def allow_feedback(self, refusal: str) -> None:
        """Enable the buttons when ``refusal`` is empty; otherwise disable them and say why."""
        self._set_buttons(not refusal)
        for button in self.buttons.values():
            button.setToolTip(refusal[:1].upper() + refusal[1:] + "." if refusal else "")

    def _set_buttons(self, enabled: bool) -> None:
        for button in self.buttons.values():
            button.setEnabled(enabled)

    def _show(self, case_id: str, history: list[CaseTransition]) -> None:
        if case_id != self.case_id:
            return
        self.table.setRowCount(len(history))
        for r, step in enumerate(history):
            state = (
                step.to_state.value.replace("_", " ")
                if step.from_state == step.to_state
                else f"{step.from_state.value} → {step.to_state.value}".replace("_", " ")
            )
            cells = (_local_time(step.at), step.event.replace("_", " "), state, step.detail or "")
            for c, text in enumerate(cells):
                self.table.setItem(r, c, QTableWidgetItem(text))
        self.loaded.emit(case_id)

    def _failed(self, case_id: str, exc: BaseException) -> None:
        if case_id != self.case_id:
            return
        message = exc.message if isinstance(exc, TriageError) else type(exc).__name__
        log.error("case history could not be read: %s", message)
        self.title.setText(f"History unavailable: {message}")
