"""Look of the desktop app: a dark reading-room theme, font scaling and decision badges.

Reading rooms are dim, so the default is a dark theme with high text contrast (light grey on
near-black, > 12:1). A decision is never shown by colour alone: each has its own icon *shape*
(circle, triangle, diamond) and its word, so it reads the same in greyscale and to a
colour-blind reader.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache

from PySide6.QtCore import QPointF, QRectF, Qt
from PySide6.QtGui import (
    QColor,
    QFont,
    QGuiApplication,
    QIcon,
    QPainter,
    QPainterPath,
    QPalette,
    QPen,
    QPixmap,
    QPolygonF,
)
from PySide6.QtWidgets import QApplication

__all__ = ["DECISIONS", "DecisionStyle", "apply_theme", "decision_icon", "decision_style"]

log = logging.getLogger(__name__)

MIN_FONT_SCALE, MAX_FONT_SCALE = 0.75, 3.0


@dataclass(frozen=True)
class DecisionStyle:
    text: str
    colour: str  # badge colour (also readable on the dark background)
    shape: str  # circle | triangle | diamond | square


DECISIONS: dict[str, DecisionStyle] = {
    "abnormal": DecisionStyle("Abnormal", "#ff6b5e", "triangle"),
    "escalate": DecisionStyle("Uncertain", "#f2c14e", "diamond"),
    "normal": DecisionStyle("Normal", "#5ccf8a", "circle"),
}
_OTHER = DecisionStyle("Unknown", "#a0a4ab", "square")
_GLYPHS = {"triangle": "!", "diamond": "?", "circle": "✓", "square": "·"}

_DARK = {
    QPalette.ColorRole.Window: "#1d1f23",
    QPalette.ColorRole.WindowText: "#e8e8e8",
    QPalette.ColorRole.Base: "#15171a",
    QPalette.ColorRole.AlternateBase: "#1f2226",
    QPalette.ColorRole.ToolTipBase: "#2a2d33",
    QPalette.ColorRole.ToolTipText: "#f0f0f0",
    QPalette.ColorRole.Text: "#e8e8e8",
    QPalette.ColorRole.PlaceholderText: "#9aa0a6",
    QPalette.ColorRole.Button: "#2a2d33",
    QPalette.ColorRole.ButtonText: "#e8e8e8",
    QPalette.ColorRole.BrightText: "#ffffff",
    QPalette.ColorRole.Highlight: "#2f6fb3",
    QPalette.ColorRole.HighlightedText: "#ffffff",
    QPalette.ColorRole.Link: "#7ab8ff",
}

# Keyboard focus must always be visible (WCAG 2.4.7): a thick light outline on focus.
_STYLESHEET = """
QTableView:focus, QLineEdit:focus, QComboBox:focus, QPushButton:focus, QtViewer:focus {
    outline: none; border: 2px solid #7ab8ff;
}
QTableView { gridline-color: #30343a; }
QHeaderView::section { background: #262a30; color: #e8e8e8; padding: 4px; border: 0; }
QStatusBar QLabel { padding: 0 8px; }
"""


def decision_style(decision: str) -> DecisionStyle:
    return DECISIONS.get(decision, _OTHER)


@cache
def decision_icon(decision: str) -> QIcon:
    """A badge whose shape and glyph alone say the decision; the colour only adds to it."""
    style = decision_style(decision)
    icon = QIcon()
    for size in (16, 24, 32, 48):
        icon.addPixmap(_badge(style, size))
    return icon


def _badge(style: DecisionStyle, size: int) -> QPixmap:
    pixmap = QPixmap(size, size)
    pixmap.fill(Qt.GlobalColor.transparent)
    painter = QPainter(pixmap)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    painter.setPen(QPen(QColor("#000000"), max(1.0, size / 16)))
    painter.setBrush(QColor(style.colour))
    inset = size * 0.06
    box = QRectF(inset, inset, size - 2 * inset, size - 2 * inset)
    path = QPainterPath()
    if style.shape == "circle":
        path.addEllipse(box)
    elif style.shape == "triangle":
        path.addPolygon(
            QPolygonF([QPointF(box.center().x(), box.top()), box.bottomRight(), box.bottomLeft()])
        )
        path.closeSubpath()
    elif style.shape == "diamond":
        c = box.center()
        path.addPolygon(
            QPolygonF(
                [
                    QPointF(c.x(), box.top()),
                    QPointF(box.right(), c.y()),
                    QPointF(c.x(), box.bottom()),
                    QPointF(box.left(), c.y()),
                ]
            )
        )
        path.closeSubpath()
    else:
        path.addRect(box)
    painter.drawPath(path)
    font = QFont()
    font.setBold(True)
    font.setPixelSize(max(6, int(size * 0.55)))
    painter.setFont(font)
    painter.setPen(QColor("#000000"))
    glyph_box = box.adjusted(0, size * 0.12 if style.shape == "triangle" else 0, 0, 0)
    painter.drawText(glyph_box, Qt.AlignmentFlag.AlignCenter, _GLYPHS[style.shape])
    painter.end()
    return pixmap


def prepare_high_dpi() -> None:
    """Call before the QApplication exists: exact (fractional) scaling on 125 %/150 % screens."""
    QGuiApplication.setHighDpiScaleFactorRoundingPolicy(
        Qt.HighDpiScaleFactorRoundingPolicy.PassThrough
    )


def apply_theme(app: QApplication, theme: str, font_scale: float = 1.0) -> float:
    """Apply the theme and scale the application font; returns the scale actually used."""
    app.setStyle("Fusion")
    if theme == "dark":
        palette = QPalette()
        for role, colour in _DARK.items():
            palette.setColor(role, QColor(colour))
        disabled = QColor("#80858c")
        for role in (QPalette.ColorRole.Text, QPalette.ColorRole.ButtonText):
            palette.setColor(QPalette.ColorGroup.Disabled, role, disabled)
        app.setPalette(palette)
    else:
        app.setPalette(app.style().standardPalette())
    app.setStyleSheet(_STYLESHEET)
    return set_font_scale(app, font_scale)


_BASE_SIZE_PROPERTY = "triage_base_point_size"


def set_font_scale(app: QApplication, scale: float) -> float:
    """Scale the application font relative to the platform default, within sane bounds."""
    scale = min(MAX_FONT_SCALE, max(MIN_FONT_SCALE, scale))
    base = app.property(_BASE_SIZE_PROPERTY)
    if not isinstance(base, float):
        size = app.font().pointSizeF()
        base = size if size > 0 else 10.0
        app.setProperty(_BASE_SIZE_PROPERTY, base)
    font = app.font()
    font.setPointSizeF(base * scale)
    app.setFont(font)
    app.setProperty("triage_font_scale", scale)
    log.debug("font scale %.2f", scale)
    return scale


def font_scale(app: QApplication) -> float:
    scale = app.property("triage_font_scale")
    return scale if isinstance(scale, float) else 1.0
