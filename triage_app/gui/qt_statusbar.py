"""The status bar: one small widget per segment (qutebrowser's pattern).

Each segment is a label with an accessible name, added by name, so later segments (queue,
connectivity, uploader) slot in without touching the others.
"""

from __future__ import annotations

from PySide6.QtWidgets import QLabel, QStatusBar, QWidget

from triage_app.importer import ImportProgress

__all__ = ["QtStatusBar"]


class QtStatusBar(QStatusBar):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setAccessibleName("Status bar")
        self.segments: dict[str, QLabel] = {}
        self.add_segment("cases", "No cases yet")
        self.add_segment("import", "")

    def add_segment(self, name: str, text: str = "") -> QLabel:
        label = QLabel(text, self)
        label.setObjectName(f"status_{name}")
        label.setAccessibleName(f"Status: {name}")
        self.segments[name] = label
        self.addPermanentWidget(label)
        return label

    def set_counts(self, shown: int, urgent: int) -> None:
        self.segments["cases"].setText(f"{shown:,} cases · {urgent:,} urgent")

    def set_import_progress(self, progress: ImportProgress | None) -> None:
        text = "" if progress is None else f"Importing {progress.done:,} / {progress.total:,}"
        self.segments["import"].setText(text)
