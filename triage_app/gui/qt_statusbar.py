"""The status bar: one small widget per segment (qutebrowser's pattern).

Each segment is a label with an accessible name, added by name: case counts, import progress,
the central link (online, or offline since when), its last error, the upload queue and the disk
alarm. Empty segments take no room.
"""

from __future__ import annotations

from PySide6.QtWidgets import QLabel, QStatusBar, QWidget

from triage_app.gui.qt_status_monitor import StatusReading, disk_text, link_text, queue_text
from triage_app.importer import ImportProgress

__all__ = ["QtStatusBar"]


class QtStatusBar(QStatusBar):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setAccessibleName("Status bar")
        self.segments: dict[str, QLabel] = {}
        self.add_segment("cases", "Loading cases…")  # until the worklist's first read
        self.add_segment("import", "")
        self.add_segment("link", "")
        self.add_segment("error", "")
        self.add_segment("queue", "")
        self.add_segment("disk", "")

    def add_segment(self, name: str, text: str = "") -> QLabel:
        label = QLabel(text, self)
        label.setObjectName(f"status_{name}")
        label.setAccessibleName(f"Status: {name}")
        label.setVisible(bool(text))
        self.segments[name] = label
        self.addPermanentWidget(label)
        return label

    def set_counts(self, shown: int, urgent: int) -> None:
        self.set_text("cases", f"{shown:,} cases · {urgent:,} urgent")

    def set_import_progress(self, progress: ImportProgress | None) -> None:
        text = "" if progress is None else f"Importing {progress.done:,} / {progress.total:,}"
        self.set_text("import", text)

    def set_text(self, name: str, text: str) -> None:
        label = self.segments[name]
        label.setText(text)
        label.setVisible(bool(text))

    def set_reading(self, reading: StatusReading) -> None:
        """Link, last error, queue and disk segments from one monitor reading."""
        link, error = link_text(reading)
        self.set_text("link", link)
        self.set_text("error", error)
        self.set_text("queue", queue_text(reading))
        self.set_text("disk", disk_text(reading))
