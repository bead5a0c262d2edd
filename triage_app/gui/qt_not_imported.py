"""Files refused at import, kept in view until the clinician clears them (like a PACS import log).

The import summary closes and its status-bar line fades, and a refused file has no case, so the
worklist cannot show it: a truncated study of a real patient would be missing with nothing left
to say so. This module keeps those files in a notice above the worklist ("4 files not imported
— Show") and a list (path, reason in words and its error code, the reader's message, when),
with "Copy list" and "Clear".

The list survives a restart: closing the app (or a crash, or the end of a shift) is not the
clinician dismissing it, and the next user must still see that files are missing. It is kept in
the data folder, beside the case store that already holds the paths of imported files, written
as every private file there is (0600 from the first byte, replaced atomically). Paths are shown
on this device only: never logged. A file refused again replaces its older line, and one
imported since is taken off, so the list says what is missing now.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import (
    QAbstractItemView,
    QDialog,
    QFrame,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from triage_app.importer import ImportProgress, ImportSummary, SkippedInput, describe_code
from triage_app.paths import ensure_private_dir, write_private_file
from triage_app.results import CaseResult

__all__ = [
    "LIST_FILE",
    "NotImportedFile",
    "NotImportedList",
    "QtNotImported",
    "QtNotImportedDialog",
    "QtNotImportedNotice",
]

log = logging.getLogger(__name__)

LIST_FILE: Final = "not_imported.json"
_VERSION: Final = 1
#: Newest kept: a home folder dropped by mistake must not make the file (and the table) huge.
MAX_KEPT: Final = 10_000
_HEADERS = ("Time", "File", "Reason", "Code", "Details")


@dataclass(frozen=True)
class NotImportedFile:
    """One file refused at import: where it is, why (code and reader's message), and when."""

    path: str
    code: str
    message: str
    when: datetime  # aware

    @property
    def reason(self) -> str:
        return describe_code(self.code)

    def local_time(self) -> str:
        return self.when.astimezone().strftime("%Y-%m-%d %H:%M:%S")

    def cells(self) -> tuple[str, str, str, str, str]:
        return (self.local_time(), self.path, self.reason, self.code, self.message)

    def to_json(self) -> dict[str, str]:
        return {
            "path": self.path,
            "code": self.code,
            "message": self.message,
            "when": self.when.isoformat(),
        }

    @classmethod
    def from_json(cls, data: Any) -> NotImportedFile:
        when = datetime.fromisoformat(str(data["when"]))
        if when.tzinfo is None:
            raise ValueError("time without a zone")
        return cls(str(data["path"]), str(data["code"]), str(data["message"]), when)


class NotImportedList:
    """The list and its file (no Qt). Each change re-reads the file first, so a second window
    on the same data folder neither loses the other's lines nor brings back cleared ones."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: list[NotImportedFile] = []
        #: Older lines let go of to stay within :data:`MAX_KEPT`.
        self.dropped = 0
        #: Why the last save failed (the operating system's words), or None.
        self.save_error: str | None = None

    @classmethod
    def load(cls, path: Path) -> NotImportedList:
        kept = cls(path)
        kept.entries, kept.dropped = kept._read()
        return kept

    def record(
        self, skipped: Iterable[SkippedInput], imported: Iterable[str], when: datetime
    ) -> None:
        """Add the files one import refused; take off those it imported."""
        entries, dropped = self._read(fallback=True)
        refused = {s.path: NotImportedFile(s.path, s.code, s.message, when) for s in skipped}
        gone = set(imported) | refused.keys()
        entries = [e for e in entries if e.path not in gone] + list(refused.values())
        if len(entries) > MAX_KEPT:
            dropped += len(entries) - MAX_KEPT
            entries = entries[-MAX_KEPT:]
        self.entries, self.dropped = entries, dropped
        self._save()

    def clear(self) -> None:
        """Dismiss the lines shown; lines another window added meanwhile stay."""
        shown = set(self.entries)
        entries, _dropped = self._read(fallback=True)
        self.entries = [e for e in entries if e not in shown]
        self.dropped = 0
        self._save()

    def _read(self, *, fallback: bool = False) -> tuple[list[NotImportedFile], int]:
        """The file's lines; what this window holds when it cannot be read (``fallback``)."""
        mine = (list(self.entries), self.dropped) if fallback else ([], 0)
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return ([], 0) if not fallback else mine
        except OSError as err:
            log.warning("list of files not imported unreadable (%s)", err.strerror)
            return mine
        try:
            data = json.loads(raw)
            if data.get("version") != _VERSION:
                raise ValueError(f"version {data.get('version')!r}")
            entries = [NotImportedFile.from_json(item) for item in data["files"]]
            return entries, int(data.get("dropped", 0))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            # Written atomically, so only a damaged disk or a hand edit gets here.
            log.warning("list of files not imported damaged (%s); it is written anew", err)
            return mine

    def _save(self) -> None:
        data = {
            "version": _VERSION,
            "dropped": self.dropped,
            "files": [e.to_json() for e in self.entries],
        }
        try:
            ensure_private_dir(self.path.parent)
            write_private_file(self.path, json.dumps(data, indent=1).encode("ascii"))
        except OSError as err:
            self.save_error = err.strerror or type(err).__name__
            log.warning("list of files not imported not saved (%s)", self.save_error)
        else:
            self.save_error = None


def _count(n: int) -> str:
    return f"{n:,} file{'' if n == 1 else 's'}"


class QtNotImportedNotice(QFrame):
    """The strip above the worklist: stays until the list is cleared, hidden while empty."""

    show_requested = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("not_imported_notice")
        self.setAccessibleName("Files not imported")
        self.setStyleSheet(
            "#not_imported_notice { background: #3a2f10; border: 1px solid #f2c14e; }"
            "#not_imported_notice QLabel { color: #f6dc94; }"
        )
        self.label = QLabel("", self)
        self.label.setAccessibleName("Files not imported notice")
        self.show_button = QPushButton("Show", self)
        self.show_button.setAccessibleName("Show the files not imported")
        self.show_button.clicked.connect(self.show_requested)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(8, 4, 8, 4)
        layout.addWidget(self.label, 1)
        layout.addWidget(self.show_button)
        self.hide()

    def set_count(self, count: int) -> None:
        self.label.setText(f"⚠ {_count(count)} not imported — not in the worklist")
        self.setVisible(count > 0)


class QtNotImportedDialog(QDialog):
    """The list itself; closing it dismisses nothing, only "Clear" does."""

    clear_requested = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Files not imported")
        self.setAccessibleName("Files not imported")
        self.setModal(False)
        self.headline = QLabel("", self)
        self.headline.setWordWrap(True)
        self.headline.setAccessibleName("Files not imported summary")
        self.table = QTableWidget(0, len(_HEADERS), self)
        self.table.setAccessibleName("Files not imported list")
        self.table.setHorizontalHeaderLabels(list(_HEADERS))
        self.table.verticalHeader().hide()
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setTextElideMode(Qt.TextElideMode.ElideMiddle)  # the file name stays
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        header.setStretchLastSection(True)
        self.copy_button = QPushButton("Copy list", self)
        self.copy_button.clicked.connect(self.copy_list)
        self.clear_button = QPushButton("Clear", self)
        self.clear_button.setAccessibleName("Clear the list of files not imported")
        self.clear_button.clicked.connect(self.clear_requested)
        close = QPushButton("Close", self)
        close.clicked.connect(self.close)
        buttons = QHBoxLayout()
        buttons.addWidget(self.copy_button)
        buttons.addWidget(self.clear_button)
        buttons.addStretch(1)
        buttons.addWidget(close)
        layout = QVBoxLayout(self)
        layout.addWidget(self.headline)
        layout.addWidget(self.table, 1)
        layout.addLayout(buttons)
        self.resize(1000, 420)
        self.entries: list[NotImportedFile] = []

    def show_list(self, kept: NotImportedList) -> None:
        # Newest import first; an import's files in the order they were read (stable sort).
        self.entries = sorted(kept.entries, key=lambda e: e.when, reverse=True)
        if self.entries:
            text = (
                f"{_count(len(self.entries))} not imported: not in the worklist until imported "
                "again. Clear the list once they are dealt with."
            )
        else:
            text = "Every file opened since the list was last cleared was imported."
        if kept.dropped:
            text += f" {_count(kept.dropped)} older not kept."
        if kept.save_error is not None:
            text += f" Not saved on this device ({kept.save_error}): lost when the app closes."
        self.headline.setText(text)
        self.table.setRowCount(len(self.entries))
        for row, entry in enumerate(self.entries):
            for column, value in enumerate(entry.cells()):
                item = QTableWidgetItem(value)
                item.setToolTip(value)
                self.table.setItem(row, column, item)
        self.table.resizeColumnsToContents()
        self.table.setColumnWidth(1, min(self.table.columnWidth(1), 420))
        self.copy_button.setEnabled(bool(self.entries))
        self.clear_button.setEnabled(bool(self.entries))

    def copy_list(self) -> None:
        """Tab-separated, a header line first: pastes into a spreadsheet or a ticket."""
        lines = ["\t".join(_HEADERS)] + ["\t".join(e.cells()) for e in self.entries]
        QGuiApplication.clipboard().setText("\n".join(lines) + "\n")


class QtNotImported(QObject):
    """Follows the imports: their refused files go to the list, the notice and the dialog."""

    changed = Signal(int)  # files listed

    def __init__(self, data_dir: Path, parent: QWidget) -> None:
        super().__init__(parent)
        self._parent = parent
        self.list = NotImportedList.load(data_dir / LIST_FILE)
        self.notice = QtNotImportedNotice(parent)
        self.notice.show_requested.connect(self.show_list)
        self.dialog: QtNotImportedDialog | None = None
        self._imported: list[str] = []
        self.notice.set_count(len(self.list.entries))

    @property
    def count(self) -> int:
        return len(self.list.entries)

    def note_progress(self, progress: ImportProgress) -> None:
        """Remember the files imported, to take them off the list at the end."""
        if progress.done == 0:
            self._imported = []
        if isinstance(progress.outcome, CaseResult):
            self._imported.append(progress.outcome.path)

    def record(self, summary: ImportSummary) -> None:
        if summary.skipped or self._imported:
            self.list.record(summary.skipped, self._imported, datetime.now(UTC))
        self._imported = []
        self._changed()

    def show_list(self) -> None:
        if self.dialog is None:
            self.dialog = QtNotImportedDialog(self._parent)
            self.dialog.clear_requested.connect(self.clear)
        self.dialog.show_list(self.list)
        self.dialog.show()
        self.dialog.raise_()

    def clear(self) -> None:
        self.list.clear()
        log.info("list of files not imported cleared")
        self._changed()

    def _changed(self) -> None:
        self.notice.set_count(self.count)
        if self.dialog is not None:
            self.dialog.show_list(self.list)
        self.changed.emit(self.count)
