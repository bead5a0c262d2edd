"""The worklist: a sortable, filterable, searchable table of cases that updates itself.

The rows come from :mod:`triage_app.worklist` (no Qt). A poller object in its own thread reads
the cases changed in the store once a second (the watch service, receiver and uploader write
to it from other processes), and the table model applies just those rows, so the selection and
scroll position survive, a quiet second costs the UI thread nothing whatever the number of
cases, and the UI thread never touches SQLite or a DICOM header.
"""

from __future__ import annotations

import logging
import traceback
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

from PySide6.QtCore import (
    QAbstractTableModel,
    QItemSelectionModel,
    QModelIndex,
    QObject,
    QPersistentModelIndex,
    QSortFilterProxyModel,
    Qt,
    Signal,
)
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from triage_app.errors import TriageError
from triage_app.gui.qt_threading import QtPoller
from triage_app.gui.theme import decision_icon, decision_style
from triage_app.gui.viewer_model import out_of_scope_why
from triage_app.worklist import Urgency, WorklistRow, WorklistSource

__all__ = ["Column", "QtWorklist", "WorklistFilter", "WorklistTableModel"]

log = logging.getLogger(__name__)

POLL_INTERVAL_MS = 1000
#: Patient headers read per poll at most (seconds): a large store's rows show at once, and
#: their names follow a few hundred per poll.
NAME_BUDGET_S = 0.25
_Index = QModelIndex | QPersistentModelIndex


class Column(IntEnum):
    """The worklist's columns, in the order shown.

    What a reader needs for a case comes first and fits 1280 px (half of it for the table):
    priority, who, the device's result, the centre's, the score. Escalation state and central
    verdict share one column: as two columns at the far right they were scrolled out of sight.
    """

    PRIORITY = 0
    PATIENT = 1
    DECISION = 2
    CENTRAL = 3
    SCORE = 4
    PATIENT_ID = 5
    TIME = 6
    MODALITY = 7
    #: The column's former name (it held only the verdict), for scripts that sort by it.
    VERDICT = 3


# Column widths from typical content: sizing columns to their rows costs ~100 ms of UI time
# with a few hundred rows, every time rows arrive. Budget: the first five columns fit the
# ~565 px the table gets in a 1280x800 window (test_the_first_columns_fit_a_1280_wide_window);
# a longer name is elided, with the whole of it in the cell's tooltip.
_TYPICAL = {
    Column.PRIORITY: "⚠ Centre disagrees",
    Column.PATIENT: "SAMPLE, FIRSTNAME",
    Column.DECISION: "[] Uncertain",
    Column.CENTRAL: "◷ awaiting centre",
    Column.SCORE: "0.000",
    Column.PATIENT_ID: "MRN00000000",
    Column.TIME: "2000-01-01 00:00:00",
    Column.MODALITY: "Modality",
}
_PADDING = 20  # cell margins; the header's sort arrow fits beside the (shorter) header text

_HEADERS = {
    Column.PRIORITY: "Priority",
    Column.PATIENT: "Patient",
    Column.PATIENT_ID: "Patient ID",
    Column.TIME: "Received",
    Column.MODALITY: "Modality",
    Column.DECISION: "Device result",
    Column.CENTRAL: "Centre",
    Column.SCORE: "Score",
}

_SORT_KEYS: dict[Column, Callable[[WorklistRow], Any]] = {
    Column.PRIORITY: lambda r: r.sort_key,
    Column.PATIENT: lambda r: (r.patient.name.casefold(), r.sort_key),
    Column.PATIENT_ID: lambda r: (r.patient.patient_id, r.sort_key),
    Column.TIME: lambda r: (r.received_at, r.case_id),
    Column.MODALITY: lambda r: (r.modality, r.sort_key),
    Column.DECISION: lambda r: (decision_style(r.decision).text, r.sort_key),
    Column.SCORE: lambda r: (r.score, r.case_id),
    Column.CENTRAL: lambda r: r.central_sort_key,
}

_URGENCY_COLOURS = {
    Urgency.CENTRE_DISAGREES: "#ff9e57",
    Urgency.ABNORMAL: "#ff6b5e",
    Urgency.ESCALATED: "#f2c14e",
    Urgency.NORMAL: "#b8bcc2",
    Urgency.REVIEWED: "#8a9099",
}


def _priority_text(row: WorklistRow) -> str:
    prefix = "⚠ " if row.urgency <= Urgency.ABNORMAL else ""
    return prefix + row.urgency.label


class WorklistTableModel(QAbstractTableModel):
    """Rows in arrival order; the proxy sorts. Updates touch only the rows given."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._rows: list[WorklistRow] = []
        self._index: dict[str, int] = {}

    def rowCount(self, parent: _Index = QModelIndex()) -> int:  # noqa: B008, N802
        return 0 if parent.isValid() else len(self._rows)

    def columnCount(self, parent: _Index = QModelIndex()) -> int:  # noqa: B008, N802
        return 0 if parent.isValid() else len(Column)

    def row_at(self, row: int) -> WorklistRow:
        return self._rows[row]

    def row_for(self, case_id: str) -> int | None:
        return self._index.get(case_id)

    def headerData(  # noqa: N802
        self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole
    ) -> Any:
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return _HEADERS[Column(section)]
        return None

    def data(self, index: _Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        row = self._rows[index.row()]
        column = Column(index.column())
        if role == Qt.ItemDataRole.DisplayRole:
            return self._text(row, column)
        if role == Qt.ItemDataRole.AccessibleTextRole:
            # Screen readers get the sentence where the cell has only a few words.
            if column is Column.CENTRAL or (column is Column.SCORE and not row.score_applies):
                return self._tooltip(row, column)
            return self._text(row, column) or "none"
        if role == Qt.ItemDataRole.DecorationRole and column is Column.DECISION:
            return decision_icon(row.decision)
        if role == Qt.ItemDataRole.ForegroundRole:
            if column is Column.DECISION:
                return QColor(decision_style(row.decision).colour)
            if column is Column.PRIORITY:
                return QColor(_URGENCY_COLOURS[row.urgency])
            if column is Column.CENTRAL and row.centre_disagrees:
                return QColor(_URGENCY_COLOURS[Urgency.CENTRE_DISAGREES])
            if column is Column.SCORE and not row.score_applies:
                return QColor(_URGENCY_COLOURS[Urgency.REVIEWED])
        if role == Qt.ItemDataRole.ToolTipRole:
            return self._tooltip(row, column) or None
        if role == Qt.ItemDataRole.TextAlignmentRole and column is Column.SCORE:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None

    @staticmethod
    def _tooltip(row: WorklistRow, column: Column) -> str:
        """The whole of what a narrow cell may cut: the name, the centre's answer, why no score.

        The patient's name and ID are shown only on this device, as in the cell itself.
        """
        if column is Column.DECISION:
            return _decision_tooltip(row)
        if column is Column.CENTRAL:
            return row.central_detail
        if column is Column.SCORE and not row.score_applies:
            why = out_of_scope_why(row.result)
            return f"Not applicable: out of scope ({why}); no threshold was applied"
        if column is Column.PATIENT and not row.patient.pending:
            return row.patient.name
        if column is Column.PATIENT_ID and not row.patient.pending:
            return row.patient.patient_id
        return ""

    @staticmethod
    def _text(row: WorklistRow, column: Column) -> str:
        if column is Column.PRIORITY:
            return _priority_text(row)
        if row.patient.pending and column in (Column.PATIENT, Column.PATIENT_ID):
            return "…"
        if column is Column.PATIENT:
            return row.patient.name or "(not available)"
        if column is Column.PATIENT_ID:
            return row.patient.patient_id
        if column is Column.TIME:
            return row.received_at.astimezone().strftime("%Y-%m-%d %H:%M:%S")
        if column is Column.MODALITY:
            return row.modality
        if column is Column.DECISION:
            return decision_style(row.decision).text
        if column is Column.SCORE:
            return f"{row.score:.3f}" if row.score_applies else "n/a"
        return row.central

    def update_rows(self, rows: Sequence[WorklistRow]) -> int:
        """Add new cases' rows and replace the others' (the store says they changed).

        Returns how many rows were given. Cases are never deleted, so rows not given stay.
        Changed rows side by side are announced as one block: one signal per block rather than
        per row (PySide6 6.12 loses a reference to ``True`` at every ``emit`` from Python, and
        a large store's names arrive hundreds at a time).
        """
        last_column = len(Column) - 1
        new: list[WorklistRow] = []
        replaced: list[int] = []
        for row in rows:
            position = self._index.get(row.case_id)
            if position is None:
                new.append(row)
                continue
            self._rows[position] = row
            replaced.append(position)
        for first, last in _blocks(replaced):
            self.dataChanged.emit(self.index(first, 0), self.index(last, last_column))
        if new:
            start = len(self._rows)
            self.beginInsertRows(QModelIndex(), start, start + len(new) - 1)
            for row in new:
                self._index[row.case_id] = len(self._rows)
                self._rows.append(row)
            self.endInsertRows()
        return len(rows)


def _blocks(positions: list[int]) -> list[tuple[int, int]]:
    """Runs of consecutive positions, as (first, last) pairs, in order."""
    blocks: list[tuple[int, int]] = []
    for position in sorted(set(positions)):
        if blocks and position == blocks[-1][1] + 1:
            blocks[-1] = (blocks[-1][0], position)
        else:
            blocks.append((position, position))
    return blocks


class WorklistFilter(IntEnum):
    ALL = 0
    URGENT = 1
    ABNORMAL = 2
    UNCERTAIN = 3
    NORMAL = 4
    DISAGREES = 5


_FILTER_LABELS = {
    WorklistFilter.ALL: "All cases",
    WorklistFilter.URGENT: "Urgent (abnormal or centre disagrees)",
    WorklistFilter.ABNORMAL: "Abnormal",
    WorklistFilter.UNCERTAIN: "Uncertain (escalated)",
    WorklistFilter.NORMAL: "Normal",
    WorklistFilter.DISAGREES: "Centre disagrees",
}


def _matches_filter(row: WorklistRow, which: WorklistFilter) -> bool:
    if which is WorklistFilter.URGENT:
        return row.urgency <= Urgency.ABNORMAL
    if which is WorklistFilter.ABNORMAL:
        return row.decision == "abnormal"
    if which is WorklistFilter.UNCERTAIN:
        return row.decision == "escalate"
    if which is WorklistFilter.NORMAL:
        return row.decision == "normal"
    if which is WorklistFilter.DISAGREES:
        return row.centre_disagrees
    return True


class WorklistProxy(QSortFilterProxyModel):
    """Sorting by Python keys (urgency first by default), a decision filter and free search."""

    def __init__(self, source: WorklistTableModel, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._source = source
        self._search = ""
        self._filter = WorklistFilter.ALL
        self.setSourceModel(source)
        self.setDynamicSortFilter(True)

    def set_search(self, text: str) -> None:
        self.beginFilterChange()
        self._search = _folded(text.strip())
        self.endFilterChange(QSortFilterProxyModel.Direction.Rows)

    def set_filter(self, which: WorklistFilter) -> None:
        self.beginFilterChange()
        self._filter = which
        self.endFilterChange(QSortFilterProxyModel.Direction.Rows)

    def row_at(self, proxy_row: int) -> WorklistRow:
        source = self.mapToSource(self.index(proxy_row, 0))
        return self._source.row_at(source.row())

    def lessThan(self, left: _Index, right: _Index) -> bool:  # noqa: N802
        column = Column(left.column())
        first, second = self._source.row_at(left.row()), self._source.row_at(right.row())
        if column is Column.SCORE and first.score_applies != second.score_applies:
            # "n/a" (out of scope) below every score, ascending or descending: the model's
            # output on an image it was not made for ranks with nothing, and sorting by score
            # to find the most abnormal put CT slices and mirrored films on top.
            ascending = self.sortOrder() == Qt.SortOrder.AscendingOrder
            return first.score_applies == ascending
        key = _SORT_KEYS[column]
        result: bool = key(first) < key(second)
        return result

    def filterAcceptsRow(self, source_row: int, source_parent: _Index) -> bool:  # noqa: N802
        row = self._source.row_at(source_row)
        if not _matches_filter(row, self._filter):
            return False
        if not self._search:
            return True
        haystack = " ".join(
            (
                row.patient.name,
                row.patient.patient_id,
                row.case_id,
                row.modality,
                decision_style(row.decision).text,
                row.escalation,
                row.central,
                row.verdict or "",
            )
        )
        return all(word in _folded(haystack) for word in self._search.split())


def _folded(text: str) -> str:
    """``text`` for matching as people type names: case and accents aside ("muller" finds
    Müller, "zoe" Zoë), as a worklist's search does on a keyboard without them."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(char for char in decomposed if not unicodedata.combining(char))


@dataclass(frozen=True)
class PolledRows:
    """One poll's answer: the rows (every case at first, then only changes), and whether some
    rows still wait for their patient's name (then the widget asks again at once)."""

    rows: list[WorklistRow]
    names_pending: bool


class StorePoller(QObject):
    """Lives in a worker thread: reads the rows changed since the last poll when asked.

    Every poll ends with exactly one signal, ``rows_changed`` or ``failed``: the widget waits
    for one before it asks again, so a poll that ended without one would stop the worklist
    for good. A failure is logged once, not at every retry while it lasts.
    """

    rows_changed = Signal(object)  # PolledRows
    failed = Signal(str)

    def __init__(self, store_path: Path) -> None:
        super().__init__()
        self._source = WorklistSource(store_path, name_budget_s=NAME_BUDGET_S)
        self._failing: str | None = None

    def poll(self) -> None:
        try:
            rows = self._source.changed_rows()
        except TriageError as err:  # StoreError, or ConfigError for a store it may not use
            self._fail(err.message)
            return
        except Exception as exc:  # noqa: BLE001 - thread boundary: the widget must hear back
            # Where it was raised, not its text: that can quote a header value (PHI).
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            where = f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"
            self._fail(f"unexpected {type(exc).__name__}", where)
            return
        self._failing = None
        self.rows_changed.emit(PolledRows(rows, self._source.names_pending))

    def _fail(self, message: str, where: str = "") -> None:
        if message != self._failing:
            log.error("worklist: %s%s", message, f" ({where})" if where else "")
            self._failing = message
        self.failed.emit(message)

    def close(self) -> None:
        self._source.close()


class QtWorklist(QWidget):
    """Search box, decision filter, case count and the table; emits the case to show."""

    #: The case to show: the current row, and again whenever that case changes in the store
    #: (its verdict comes back while it is on screen).
    case_selected = Signal(object)  # WorklistRow
    refreshed = Signal(int)  # rows added or changed by the last refresh

    def __init__(self, store_path: Path, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.model = WorklistTableModel(self)
        self.proxy = WorklistProxy(self.model, self)
        self._selected: tuple[str, str] | None = None  # (case id, updated_at) last emitted

        self.search = QLineEdit(self)
        self.search.setPlaceholderText("Search patient, ID, case, modality…")
        self.search.setClearButtonEnabled(True)
        self.search.setAccessibleName("Search worklist")
        self.search.textChanged.connect(self._search_changed)

        self.filter = QComboBox(self)
        self.filter.setAccessibleName("Filter by result")
        for which, label in _FILTER_LABELS.items():
            self.filter.addItem(label, int(which))
        self.filter.currentIndexChanged.connect(self._filter_changed)

        #: Until the first poll has answered, "0 of 0" would say the store is empty.
        self.loading = True
        self.count = QLabel("Loading cases…", self)
        self.count.setAccessibleName("Number of cases shown")
        self.problem = QLabel("", self)
        self.problem.setAccessibleName("Worklist problem")
        self.problem.setWordWrap(True)
        self.problem.hide()

        self.table = QTableView(self)
        self.table.setAccessibleName("Worklist")
        self.table.setModel(self.proxy)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setAlternatingRowColors(True)
        self.table.setTabKeyNavigation(False)  # Tab leaves the table (keyboard users)
        self.table.verticalHeader().hide()
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        self.table.horizontalHeader().setStretchLastSection(True)
        self._size_columns()
        self.table.setSortingEnabled(True)
        # Qt 6 sorts descending as soon as sorting is enabled: ask for urgency, ascending.
        self.table.sortByColumn(Column.PRIORITY, Qt.SortOrder.AscendingOrder)
        self.table.selectionModel().currentRowChanged.connect(self._current_changed)

        bar = QHBoxLayout()
        bar.addWidget(self.search, 3)
        bar.addWidget(self.filter, 2)
        bar.addWidget(self.count)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(bar)
        layout.addWidget(self.problem)
        layout.addWidget(self.table)

        reader = StorePoller(store_path)
        reader.rows_changed.connect(self._apply)
        reader.failed.connect(self._poll_failed)
        self._poller = QtPoller(reader, "worklist-poller", POLL_INTERVAL_MS, self)
        self.refresh()

    def _size_columns(self) -> None:
        metrics = self.table.fontMetrics()
        header = self.table.horizontalHeader()
        for column, sample in _TYPICAL.items():
            width = max(
                metrics.horizontalAdvance(sample), metrics.horizontalAdvance(_HEADERS[column])
            )
            header.resizeSection(column, width + _PADDING)

    def refresh(self) -> None:
        """Ask for the latest changes unless a read is already under way."""
        self._poller.refresh()

    def stop(self) -> None:
        """Stop polling and close the store (in its thread); call before the app quits."""
        self._poller.stop()

    def current_row(self) -> WorklistRow | None:
        index = self.table.currentIndex()
        return self.proxy.row_at(index.row()) if index.isValid() else None

    def select_case(self, case_id: str) -> bool:
        position = self.model.row_for(case_id)
        if position is None:
            return False
        index = self.proxy.mapFromSource(self.model.index(position, 0))
        if not index.isValid():
            return False
        self.table.selectionModel().setCurrentIndex(
            index,
            QItemSelectionModel.SelectionFlag.ClearAndSelect
            | QItemSelectionModel.SelectionFlag.Rows,
        )
        return True

    def visible_rows(self) -> list[WorklistRow]:
        return [self.proxy.row_at(i) for i in range(self.proxy.rowCount())]

    def _apply(self, polled: PolledRows) -> None:
        self._poller.ready()
        self.problem.hide()
        changed = self.model.update_rows(polled.rows)
        if changed or self.loading:
            self.loading = False
            self._update_count()
        if changed:
            self._announce_current()
        self.refreshed.emit(changed)
        if polled.names_pending:
            self.refresh()

    def _poll_failed(self, message: str) -> None:
        """Say so, and keep polling: the next poll may well succeed (a lock released)."""
        self._poller.ready()
        self.problem.setText(f"Worklist not updated: {message}. Retrying…")
        self.problem.show()

    def _search_changed(self, text: str) -> None:
        self.proxy.set_search(text)
        self._update_count()

    def _filter_changed(self, _position: int) -> None:
        self.proxy.set_filter(WorklistFilter(int(self.filter.currentData())))
        self._update_count()

    def _update_count(self) -> None:
        if self.loading:
            return
        self.count.setText(f"{self.proxy.rowCount():,} of {self.model.rowCount():,} cases")

    def _current_changed(self, current: QModelIndex, _previous: QModelIndex) -> None:
        if current.isValid():
            self._emit_selected(self.proxy.row_at(current.row()))

    def _announce_current(self) -> None:
        """The case on screen moved on in the store (its verdict came back, it was queued):
        show it again, or the viewer and history keep what they had when it was selected."""
        row = self.current_row()
        if row is not None and (row.case_id, row.updated_at) != self._selected:
            self._emit_selected(row)

    def _emit_selected(self, row: WorklistRow) -> None:
        self._selected = (row.case_id, row.updated_at)
        self.case_selected.emit(row)


def _decision_tooltip(row: WorklistRow) -> str:
    """The decision and its reason; for an out-of-scope image, also what made it so."""
    text = f"{decision_style(row.decision).text}: {row.reason.replace('_', ' ')}"
    why = out_of_scope_why(row.result)
    return f"{text} ({why})" if why else text
