"""The ``?`` overlay: every command and its keys, built from the same table as the menus."""

from __future__ import annotations

from html import escape

from PySide6.QtCore import Qt
from PySide6.QtGui import QKeyEvent, QKeySequence
from PySide6.QtWidgets import QFrame, QLabel, QScrollArea, QVBoxLayout, QWidget

from triage_app.gui.shortcuts import COMMANDS, MENUS, MOUSE

__all__ = ["QtShortcutOverlay", "key_text"]


def key_text(keys: tuple[str, ...]) -> str:
    """Keys as the platform writes them (``Ctrl+O``, ``⌘O`` on a Mac)."""
    return ", ".join(
        QKeySequence(k).toString(QKeySequence.SequenceFormat.NativeText) or k for k in keys
    )


class QtShortcutOverlay(QFrame):
    """A dark sheet over the window; Escape, ``?`` or F1 closes it."""

    def __init__(self, parent: QWidget) -> None:
        super().__init__(parent)
        self.setObjectName("shortcut_overlay")
        self.setAccessibleName("Keyboard shortcuts")
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.setAutoFillBackground(True)
        self.setStyleSheet(
            "#shortcut_overlay { background: rgba(10, 12, 15, 235); border: 1px solid #5a5f66; }"
        )
        self.label = QLabel(self._html(), self)
        self.label.setTextFormat(Qt.TextFormat.RichText)
        self.label.setAccessibleName("Shortcut list")
        scroll = QScrollArea(self)
        scroll.setWidget(self.label)
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        layout = QVBoxLayout(self)
        layout.addWidget(scroll)
        self.hide()

    @staticmethod
    def _html() -> str:
        """Two columns: the image commands on the right, everything else on the left."""
        left = [_section(menu) for menu in MENUS if menu != "Image"]
        left.append("<tr><td colspan=2><b>Mouse (on the image)</b></td></tr>")
        left += [_row(gesture, what) for gesture, what in MOUSE]
        right = [_section("Image")]
        return (
            "<h2>Keyboard shortcuts</h2><p>Press Esc or ? to close.</p>"
            "<table><tr>"
            f"<td valign=top><table cellpadding=3>{''.join(left)}</table></td>"
            "<td width=40></td>"
            f"<td valign=top><table cellpadding=3>{''.join(right)}</table></td>"
            "</tr></table>"
        )

    def toggle(self) -> None:
        if self.isVisible():
            self.close_overlay()
            return
        parent = self.parentWidget()
        if parent is not None:
            self.setGeometry(parent.rect().adjusted(40, 30, -40, -30))
        self.show()
        self.raise_()
        self.setFocus(Qt.FocusReason.OtherFocusReason)

    def close_overlay(self) -> None:
        self.hide()
        parent = self.parentWidget()
        if parent is not None:
            parent.setFocus(Qt.FocusReason.OtherFocusReason)

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802
        if event.key() in (Qt.Key.Key_Escape, Qt.Key.Key_Question, Qt.Key.Key_F1):
            self.close_overlay()
            event.accept()
            return
        super().keyPressEvent(event)


def _row(keys: str, label: str) -> str:
    return f"<tr><td><tt>{escape(keys)}</tt></td><td>{escape(label)}</td></tr>"


def _section(menu: str) -> str:
    rows = [f"<tr><td colspan=2><b>{escape(menu)}</b></td></tr>"]
    rows += [
        _row(key_text(c.keys) if c.keys else "(menu only)", c.label)
        for c in COMMANDS
        if c.menu == menu
    ]
    return "".join(rows)
