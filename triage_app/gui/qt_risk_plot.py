"""The risk–coverage plot of the thresholds page, drawn with QPainter (no plotting library).

x is coverage (share decided on the device), y is risk (error rate among those decisions); the
curve comes from :func:`triage_app.threshold_preview.risk_coverage` and the marked point is the
admin's current thresholds.
"""

from __future__ import annotations

from collections.abc import Sequence

from PySide6.QtCore import QPointF, QRectF, QSize, Qt
from PySide6.QtGui import QColor, QPainter, QPainterPath, QPaintEvent, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget

from triage_app.threshold_preview import CurvePoint

__all__ = ["QtRiskCoveragePlot"]

_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 58.0, 16.0, 14.0, 40.0
_CURVE = QColor("#5fa8ff")
_POINT = QColor("#ff9e57")


class QtRiskCoveragePlot(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setAccessibleName("Risk–coverage plot")
        self.setMinimumSize(320, 220)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.curve: list[CurvePoint] = []
        self.point: tuple[float, float] | None = None

    def sizeHint(self) -> QSize:  # noqa: N802
        return QSize(460, 280)

    def set_curve(self, curve: Sequence[CurvePoint]) -> None:
        self.curve = list(curve)
        self.update()

    def set_point(self, coverage: float, risk: float | None) -> None:
        """Mark the current operating point; ``risk`` None (nothing local) removes the mark."""
        self.point = None if risk is None else (coverage, risk)
        self.setAccessibleDescription(
            "No local decisions"
            if risk is None
            else f"Current thresholds: coverage {coverage:.1%}, risk {risk:.2%}"
        )
        self.update()

    def _risk_top(self) -> float:
        risks = [p.risk for p in self.curve] + ([self.point[1]] if self.point else [])
        return max(0.01, max(risks, default=0.0) * 1.1)

    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        text = self.palette().text().color()
        plot = QRectF(
            _MARGIN_LEFT,
            _MARGIN_TOP,
            max(1.0, self.width() - _MARGIN_LEFT - _MARGIN_RIGHT),
            max(1.0, self.height() - _MARGIN_TOP - _MARGIN_BOTTOM),
        )
        top = self._risk_top()

        def at(coverage: float, risk: float) -> QPointF:
            return QPointF(
                plot.left() + coverage * plot.width(), plot.bottom() - risk / top * plot.height()
            )

        grid = QColor(text)
        grid.setAlpha(50)
        metrics = painter.fontMetrics()
        for step in range(5):
            fraction = step / 4
            painter.setPen(QPen(grid, 1))
            x = plot.left() + fraction * plot.width()
            y = plot.bottom() - fraction * plot.height()
            painter.drawLine(QPointF(x, plot.top()), QPointF(x, plot.bottom()))
            painter.drawLine(QPointF(plot.left(), y), QPointF(plot.right(), y))
            painter.setPen(text)
            label = f"{fraction:.0%}"
            painter.drawText(
                QPointF(x - metrics.horizontalAdvance(label) / 2, plot.bottom() + metrics.height()),
                label,
            )
            risk_label = f"{fraction * top:.1%}"
            painter.drawText(
                QPointF(
                    plot.left() - metrics.horizontalAdvance(risk_label) - 6,
                    y + metrics.ascent() / 2,
                ),
                risk_label,
            )
        painter.setPen(QPen(text, 1))
        painter.drawRect(plot)
        caption = "coverage (share decided on the device) →"
        painter.drawText(
            QPointF(plot.center().x() - metrics.horizontalAdvance(caption) / 2, self.height() - 4),
            caption,
        )
        painter.save()
        painter.translate(12, plot.center().y())
        painter.rotate(-90)
        y_caption = "risk (errors among local) →"
        painter.drawText(QPointF(-metrics.horizontalAdvance(y_caption) / 2, 0), y_caption)
        painter.restore()

        if self.curve:
            path = QPainterPath(at(self.curve[0].coverage, self.curve[0].risk))
            for point in self.curve[1:]:
                path.lineTo(at(point.coverage, point.risk))
            painter.setPen(QPen(_CURVE, 2))
            painter.setBrush(Qt.BrushStyle.NoBrush)
            painter.drawPath(path)
        if self.point is not None:
            centre = at(*self.point)
            painter.setPen(QPen(text, 1.5))
            painter.setBrush(_POINT)
            painter.drawEllipse(centre, 6, 6)
        painter.end()
