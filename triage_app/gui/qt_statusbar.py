"""The status bar: one small widget per segment (qutebrowser's pattern).

Each segment is a label with an accessible name, added by name: case counts, import progress,
the central link (online, or offline for how long), what an outage means for the cases, the
escalations (held, awaiting a verdict, to send) and the disk alarm. Empty segments take no room.

The status bar must never make the window wider than the screen: a QLabel is as wide as its
whole text, so one long error (a server address and a system reason) once pushed the window
past a 1280 px screen, the queue count and the feedback buttons with it. Every segment
therefore has a small minimum width and shows what fits, elided, with the whole text in its
tooltip. The error segment takes the spare room; it is a "normal" (not permanent) widget, so a
temporary message (feedback recorded, …) replaces it instead of being squeezed to nothing. The
escalations segment keeps its whole text up to a generous cap, so the counts stay readable.
"""

from __future__ import annotations

from PySide6.QtCore import QRect, QSize, Qt
from PySide6.QtGui import QPainter, QPaintEvent
from PySide6.QtWidgets import QLabel, QStatusBar, QStyle, QWidget

from triage_app.gui.qt_status_monitor import (
    StatusReading,
    disk_text,
    error_tooltip,
    link_text,
    link_tooltip,
    queue_text,
    queue_tooltip,
)
from triage_app.importer import ImportProgress

__all__ = ["ElidedLabel", "QtStatusBar"]

#: Minimum widths, in average characters: what a segment keeps however narrow the window.
_MIN_CHARS = {"error": 12, "disk": 16, "queue": 72}
#: The other segments (short by construction) keep their whole text up to this many characters.
_WHOLE = 40


class ElidedLabel(QLabel):
    """A one-line label that shows what fits and elides the rest ("…").

    ``text()`` stays the whole text (and is the tooltip unless one is given), so what is read
    out, tested and hovered is complete; only the painting is cut. ``min_chars`` bounds the
    minimum width the label asks of the layout: a longer text no longer widens the window.
    """

    def __init__(self, text: str, parent: QWidget | None, *, min_chars: int) -> None:
        super().__init__(text, parent)
        self._min_chars = min_chars
        self.setTextFormat(Qt.TextFormat.PlainText)
        self.setWordWrap(False)

    def minimumSizeHint(self) -> QSize:  # noqa: N802
        whole = super().minimumSizeHint()
        frame = self.contentsMargins().left() + self.contentsMargins().right() + 2 * self.margin()
        bound = self.fontMetrics().averageCharWidth() * self._min_chars + frame
        return QSize(min(whole.width(), bound), whole.height())

    def is_elided(self) -> bool:
        """True when the label is too narrow for its whole text."""
        return self.fontMetrics().horizontalAdvance(self.text()) > self._text_rect().width()

    def _text_rect(self) -> QRect:
        margin = self.margin()
        return self.contentsRect().adjusted(margin, margin, -margin, -margin)

    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802
        rect = self._text_rect()
        text = self.text()
        shown = self.fontMetrics().elidedText(text, Qt.TextElideMode.ElideRight, rect.width())
        if shown == text:
            super().paintEvent(event)
            return
        painter = QPainter(self)
        align = QStyle.visualAlignment(self.layoutDirection(), self.alignment())
        self.style().drawItemText(
            painter,
            rect,
            int(align),
            self.palette(),
            self.isEnabled(),
            shown,
            self.foregroundRole(),
        )


class QtStatusBar(QStatusBar):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setAccessibleName("Status bar")
        self.segments: dict[str, ElidedLabel] = {}
        self._transient: set[str] = set()  # normal widgets: hidden while a message shows
        # Left, taking the spare room; hidden by QStatusBar while a temporary message shows.
        self.add_segment("error", "", permanent=False, stretch=1)
        self.add_segment("cases", "Loading cases…")  # until the worklist's first read
        self.add_segment("import", "")
        self.add_segment("link", "")
        self.add_segment("queue", "")
        self.add_segment("disk", "")

    def add_segment(
        self, name: str, text: str = "", *, permanent: bool = True, stretch: int = 0
    ) -> ElidedLabel:
        label = ElidedLabel(text, self, min_chars=_MIN_CHARS.get(name, _WHOLE))
        label.setObjectName(f"status_{name}")
        label.setAccessibleName(f"Status: {name}")
        label.setToolTip(text)
        label.setVisible(bool(text))
        self.segments[name] = label
        if permanent:
            self.addPermanentWidget(label, stretch)
        else:
            self._transient.add(name)
            self.addWidget(label, stretch)
        return label

    def set_counts(self, shown: int, urgent: int) -> None:
        self.set_text("cases", f"{shown:,} cases · {urgent:,} urgent")

    def set_import_progress(self, progress: ImportProgress | None) -> None:
        text = "" if progress is None else f"Importing {progress.done:,} / {progress.total:,}"
        self.set_text("import", text)

    def set_text(self, name: str, text: str, tooltip: str | None = None) -> None:
        """Set a segment's text and tooltip (the whole text unless ``tooltip`` is given)."""
        label = self.segments[name]
        label.setText(text)
        label.setToolTip(text if tooltip is None else tooltip)
        label.setAccessibleDescription(label.toolTip())
        if not text:
            label.hide()
        elif name in self._transient and self.currentMessage():
            # QStatusBar hid it for the message and shows it again when the message ends,
            # unless it was hidden explicitly: make it one of those it shows again.
            label.setAttribute(Qt.WidgetAttribute.WA_WState_ExplicitShowHide, False)
        else:
            label.show()

    def set_reading(self, reading: StatusReading) -> None:
        """Link, error, escalations and disk segments from one monitor reading."""
        link, error = link_text(reading)
        self.set_text("link", link, link_tooltip(reading) or link)
        technical = error_tooltip(reading)
        self.set_text("error", error, f"{error}\n{technical}" if technical else error)
        self.set_text("queue", queue_text(reading), queue_tooltip(reading))
        self.set_text("disk", disk_text(reading))
