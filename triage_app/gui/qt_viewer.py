"""The image viewer: window/level, zoom and pan, frames, and the AI result as a separate layer.

Painting is in two coordinate systems on purpose: the image (and the heatmap over it) in image
coordinates under the zoom/pan transform, every text panel afterwards in viewport coordinates,
so annotations keep their size whatever the zoom. The AI result is never written into the
image pixels; it is a layer the reader can hide (``O``). Who the image is of (name, ID, birth
date, study) stays in the top left corner, read from the file shown, on this device only.
Decoding and the occlusion map run in worker threads; results for a case that is no longer
shown are dropped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from PySide6.QtCore import QPointF, QRect, QRectF, QSize, Qt, Signal
from PySide6.QtGui import (
    QColor,
    QFont,
    QFontMetrics,
    QImage,
    QLinearGradient,
    QMouseEvent,
    QPainter,
    QPaintEvent,
    QPen,
    QResizeEvent,
    QTransform,
    QWheelEvent,
)
from PySide6.QtWidgets import QSizePolicy, QWidget

from triage_app.errors import InputError
from triage_app.gui.qt_threading import run_in_thread
from triage_app.gui.viewer_model import (
    AiResult,
    ViewerImage,
    Window,
    display_level,
    initial_window,
    load_viewer_image,
    presets_for,
    reduce_for_display,
    render,
    resolve_preset,
)
from triage_app.model.saliency import SaliencyMap

__all__ = ["QtViewer", "heatmap_rgba"]

log = logging.getLogger(__name__)

ZOOM_STEP = 1.25
MIN_ZOOM, MAX_ZOOM = 0.05, 40.0
_PANEL_MARGIN = 8
_PANEL_PADDING = 6
# Heatmap colours: dark blue → magenta → orange → yellow (perceptually ordered, and its
# lightness rises with the value, so it also reads in greyscale).
_HEAT_STOPS = np.array(
    [
        [0.00, 20, 11, 52],
        [0.35, 120, 28, 109],
        [0.65, 219, 80, 40],
        [1.00, 252, 230, 100],
    ],
    dtype=np.float32,
)

SaliencyFunction = Callable[[str, threading.Event], SaliencyMap]


def heatmap_rgba(values: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """RGBA pixels for a [0, 1] map; alpha follows the value so cold areas stay clear."""
    v = np.clip(values, 0.0, 1.0)
    rgba = np.empty((*v.shape, 4), dtype=np.uint8)
    for channel in range(3):
        rgba[..., channel] = np.interp(v, _HEAT_STOPS[:, 0], _HEAT_STOPS[:, channel + 1])
    rgba[..., 3] = np.rint(np.sqrt(v) * 255.0)
    return rgba


@dataclass
class _Drag:
    button: Qt.MouseButton
    start: QPointF
    window: Window
    pan: QPointF


class QtViewer(QWidget):
    """One case's image with its layers; every command is a method named as in ``shortcuts``."""

    window_changed = Signal(float, float)
    image_loaded = Signal(str)  # case id
    heatmap_ready = Signal(str)  # case id
    message = Signal(str)  # a short status line for the main window

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("viewer")
        self.setAccessibleName("Image viewer")
        self.setAccessibleDescription(
            "Left drag: window and level. Middle drag: pan. Wheel: zoom. Press ? for keys."
        )
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setMinimumSize(320, 240)
        self.setAutoFillBackground(False)

        self.case_id: str | None = None
        self.image: ViewerImage | None = None
        #: The case's image is being decoded: nothing of it is on screen yet.
        self.loading = False
        self.frame = 0
        self.voi = Window(0.0, 1.0)
        self.inverted = False
        self.zoom = 1.0
        self.pan = QPointF(0.0, 0.0)
        self.ai: AiResult | None = None
        self.overlay_visible = True
        self.heatmap: SaliencyMap | None = None
        self.heatmap_visible = False
        self.heatmap_opacity = 0.45
        self.notice = "Select a case in the worklist"
        # What the last paint put in each text panel, and where (viewport coordinates).
        self.overlay_rects: dict[str, QRect] = {}
        self.panel_lines: dict[str, list[str]] = {}

        self._pixels: QImage | None = None
        # Reduced copies of the frame on screen for zooms below 100 %, by (frame, level).
        self._reduced: dict[tuple[int, int], npt.NDArray[Any]] = {}
        self._rendered_level = 0
        self._heat_image: QImage | None = None
        self._drag: _Drag | None = None
        self._fit_pending = True
        self._request = 0
        self._path: str | None = None
        self._saliency: SaliencyFunction | None = None
        self._saliency_cancel: threading.Event | None = None

    # --- data -------------------------------------------------------------------------------

    def set_saliency_function(self, function: SaliencyFunction) -> None:
        """How to compute the occlusion map for a file (runs in a worker thread)."""
        self._saliency = function

    def show_case(self, case_id: str, path: str, result: AiResult | None) -> None:
        """Load a case's image off the UI thread; until it arrives the viewer shows "Loading…".

        The previous case's image is cleared at once: left on screen under the new case's AI
        result, it would be read (and accepted) as the new case's image. The case already on
        screen (or loading) keeps its image and takes the new result: its verdict came back.
        """
        if case_id == self.case_id and (self.image is not None or self.loading):
            self.ai = result
            self.update()
            return
        self._request += 1
        request = self._request
        self._cancel_saliency()
        self.case_id = case_id
        self._path = path
        self.ai = result
        self.image = None
        self._pixels = None
        self._reduced = {}
        self.heatmap = None
        self._heat_image = None
        self.loading = True
        self.notice = "Loading image…"
        self.update()

        def loaded(image: object) -> None:
            if request == self._request and isinstance(image, ViewerImage):
                self.set_image(image)
                self.image_loaded.emit(case_id)

        def failed(exc: BaseException) -> None:
            if request != self._request:
                return
            self.loading = False
            if isinstance(exc, InputError):
                self.notice = f"Image not available ({exc.code}): it may have been moved"
            else:
                log.error("viewer: image could not be shown: %s", type(exc).__name__)
                self.notice = "Image could not be shown"
            self.update()

        run_in_thread(lambda: load_viewer_image(path), loaded, failed)

    def set_image(self, image: ViewerImage) -> None:
        """Show an already decoded image (the first frame the triage used), fitted."""
        self.image = image
        self._reduced = {}
        self.loading = False
        self.frame = image.selected_frame
        self.voi = initial_window(image)
        self.inverted = False
        self._fit_pending = True
        self.notice = ""
        self._render()
        if self.heatmap_visible:
            self._request_heatmap()

    # --- commands (named as in shortcuts.COMMANDS) -------------------------------------------

    def set_window(self, window: Window) -> None:
        self.voi = Window(window.center, max(1.0, window.width), window.source)
        self._render()
        self.window_changed.emit(self.voi.center, self.voi.width)

    def apply_preset(self, number: int) -> None:
        if self.image is None:
            return
        presets = presets_for(self.image.modality)
        if not 1 <= number <= len(presets):
            return
        self.set_window(resolve_preset(presets[number - 1], self.image.frames[self.frame]))
        self.message.emit(f"Window preset {number}: {presets[number - 1].name}")

    def zoom_in(self) -> None:
        self.zoom_by(ZOOM_STEP)

    def zoom_out(self) -> None:
        self.zoom_by(1 / ZOOM_STEP)

    def zoom_by(self, factor: float, anchor: QPointF | None = None) -> None:
        """Zoom keeping the image point under ``anchor`` (default: the centre) in place."""
        if self.image is None:
            return
        anchor = anchor if anchor is not None else QPointF(self.width() / 2, self.height() / 2)
        before = self._to_image(anchor)
        self.zoom = min(MAX_ZOOM, max(MIN_ZOOM, self.zoom * factor))
        after = self._to_widget(before)
        self.pan += anchor - after
        self._zoom_changed()

    def fit(self) -> None:
        if self.image is None:
            return
        rows, columns = self.image.frames[self.frame].shape
        self.zoom = max(MIN_ZOOM, min(self.width() / columns, self.height() / rows))
        self.pan = QPointF(0.0, 0.0)
        self._fit_pending = False
        self._zoom_changed()

    def _zoom_changed(self) -> None:
        if display_level(self.zoom) != self._rendered_level:
            self._render()
        else:
            self.update()

    def reset(self) -> None:
        if self.image is None:
            return
        self.inverted = False
        self.set_window(initial_window(self.image, self.frame))
        self.fit()

    def invert(self) -> None:
        self.inverted = not self.inverted
        self._render()

    def previous_frame(self) -> None:
        self.go_to_frame(self.frame - 1)

    def next_frame(self) -> None:
        self.go_to_frame(self.frame + 1)

    def first_frame(self) -> None:
        self.go_to_frame(0)

    def last_frame(self) -> None:
        if self.image is not None:
            self.go_to_frame(len(self.image.frames) - 1)

    def go_to_frame(self, index: int) -> None:
        if self.image is None:
            return
        index = min(max(index, 0), len(self.image.frames) - 1)
        if index != self.frame:
            self.frame = index
            self._render()

    def toggle_overlay(self) -> None:
        self.overlay_visible = not self.overlay_visible
        self.update()

    def toggle_heatmap(self) -> None:
        self.heatmap_visible = not self.heatmap_visible
        if self.heatmap_visible and self.heatmap is None:
            self._request_heatmap()
        self.update()

    def heatmap_less(self) -> None:
        self.set_heatmap_opacity(self.heatmap_opacity - 0.1)

    def heatmap_more(self) -> None:
        self.set_heatmap_opacity(self.heatmap_opacity + 0.1)

    def set_heatmap_opacity(self, opacity: float) -> None:
        self.heatmap_opacity = round(min(1.0, max(0.1, opacity)), 2)
        self.update()

    def set_heatmap(self, saliency: SaliencyMap) -> None:
        self.heatmap = saliency
        rgba = heatmap_rgba(saliency.values)
        rows, columns = saliency.values.shape
        self._heat_image = QImage(
            rgba.tobytes(), columns, rows, columns * 4, QImage.Format.Format_RGBA8888
        ).copy()
        self.update()

    # --- saliency ---------------------------------------------------------------------------

    def _request_heatmap(self) -> None:
        if self._saliency is None or self.case_id is None or self._saliency_cancel is not None:
            return
        path = self._path
        if path is None:
            return
        self.notice = ""
        self.message.emit("Computing saliency map…")
        cancel = threading.Event()
        self._saliency_cancel = cancel
        request, case_id, function = self._request, self.case_id, self._saliency

        def done(result: object) -> None:
            if self._saliency_cancel is cancel:
                self._saliency_cancel = None
            if request == self._request and isinstance(result, SaliencyMap):
                self.set_heatmap(result)
                self.message.emit("Saliency map ready")
                self.heatmap_ready.emit(case_id)

        def failed(exc: BaseException) -> None:
            if self._saliency_cancel is cancel:
                self._saliency_cancel = None
            if request == self._request and not cancel.is_set():
                log.error("saliency map failed: %s", type(exc).__name__)
                self.message.emit("Saliency map could not be computed")

        run_in_thread(lambda: function(path, cancel), done, failed)

    def shutdown(self) -> None:
        """Stop background work for this viewer (the window is closing)."""
        self._request += 1
        self._cancel_saliency()

    def _cancel_saliency(self) -> None:
        if self._saliency_cancel is not None:
            self._saliency_cancel.set()
            self._saliency_cancel = None

    # --- geometry ---------------------------------------------------------------------------

    def _transform(self) -> QTransform:
        if self.image is None:
            return QTransform()
        rows, columns = self.image.frames[self.frame].shape
        transform = QTransform()
        transform.translate(self.width() / 2 + self.pan.x(), self.height() / 2 + self.pan.y())
        transform.scale(self.zoom, self.zoom)
        transform.translate(-columns / 2, -rows / 2)
        return transform

    def _to_image(self, point: QPointF) -> QPointF:
        inverse, _ok = self._transform().inverted()
        return inverse.map(point)

    def _to_widget(self, point: QPointF) -> QPointF:
        return self._transform().map(point)

    # --- rendering --------------------------------------------------------------------------

    def _displayed_values(self) -> npt.NDArray[Any]:
        """The frame at the resolution the current zoom needs (see ``display_level``)."""
        assert self.image is not None
        level = display_level(self.zoom)
        key = (self.frame, level)
        if key not in self._reduced:
            # Only the frame on screen keeps its copies: a long stack would pile them up.
            self._reduced = {k: v for k, v in self._reduced.items() if k[0] == self.frame}
            self._reduced[key] = reduce_for_display(self.image.frames[self.frame], level)
        self._rendered_level = level
        return self._reduced[key]

    def _render(self) -> None:
        if self.image is None:
            return
        pixels = render(
            self._displayed_values(),
            self.voi,
            monochrome1=self.image.monochrome1,
            invert=self.inverted,
        )
        rows, columns = pixels.shape
        self._pixels = QImage(
            pixels.tobytes(), columns, rows, columns, QImage.Format.Format_Grayscale8
        ).copy()
        self.update()

    def sizeHint(self) -> QSize:  # noqa: N802
        return QSize(720, 640)

    def resizeEvent(self, event: QResizeEvent) -> None:  # noqa: N802
        if self._fit_pending:
            self.fit()
        super().resizeEvent(event)

    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802
        if self._fit_pending and self.image is not None:
            self.fit()
        painter = QPainter(self)
        painter.fillRect(self.rect(), QColor("#000000"))
        self.overlay_rects = {}
        self.panel_lines = {}
        if self.image is not None and self._pixels is not None:
            painter.save()
            painter.setTransform(self._transform())
            painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, self.zoom < 2.0)
            rows, columns = self.image.frames[self.frame].shape
            painter.drawImage(QRectF(0, 0, columns, rows), self._pixels)
            if self.heatmap_visible and self._heat_image is not None:
                painter.setOpacity(self.heatmap_opacity)
                painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, True)
                painter.drawImage(QRectF(0, 0, columns, rows), self._heat_image)
            painter.restore()
            self._paint_panels(painter)
        elif self.notice:
            painter.setPen(QColor("#d0d0d0"))
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, self.notice)
        if self.hasFocus():
            painter.setPen(QPen(QColor("#7ab8ff"), 2))
            painter.drawRect(self.rect().adjusted(1, 1, -1, -1))
        painter.end()

    def _paint_panels(self, painter: QPainter) -> None:
        """Text in viewport coordinates: it never scales with the image."""
        assert self.image is not None
        frames = len(self.image.frames)
        info = [
            self.image.modality or "?",
            f"Frame {self.frame + 1} / {frames}",
            f"Zoom {self.zoom * 100:.0f} %",
        ]
        below = 0
        if self.image.identity is not None:
            # Always shown (the O key hides only the AI layer): it is what tells one patient's
            # image from another's. A long name is cut to leave room for the AI layer.
            patient = self._elided(self.image.identity.lines(), self.width() * 0.45)
            rect = self._panel(
                painter, "patient", patient, Qt.Corner.TopLeftCorner, bold_first=True
            )
            below = rect.height() + 2
        self._panel(painter, "info", info, Qt.Corner.TopLeftCorner, offset=below)
        source = "" if self.voi.source == "manual" else f" ({self.voi.source})"
        wl = [f"W {self.voi.width:.0f}  L {self.voi.center:.0f}{source}"]
        if self.inverted:
            wl.append("Inverted")
        self._panel(painter, "window", wl, Qt.Corner.BottomLeftCorner)
        if self.overlay_visible and self.ai is not None:
            self._panel(painter, "ai", self.ai.lines(), Qt.Corner.TopRightCorner, bold_first=True)
        if self.heatmap_visible:
            self._paint_legend(painter)
        if self.notice:
            self._panel(painter, "notice", [self.notice], Qt.Corner.BottomRightCorner)

    def _panel(
        self,
        painter: QPainter,
        name: str,
        lines: list[str],
        corner: Qt.Corner,
        *,
        bold_first: bool = False,
        extra_height: int = 0,
        offset: int = 0,
    ) -> QRect:
        """Draw a text panel in ``corner``, ``offset`` pixels further in (below another)."""
        font = QFont(self.font())
        bold = QFont(font)
        bold.setBold(True)
        metrics, bold_metrics = QFontMetrics(font), QFontMetrics(bold)
        widths = [
            (bold_metrics if bold_first and i == 0 else metrics).horizontalAdvance(line)
            for i, line in enumerate(lines)
        ]
        line_height = max(metrics.height(), bold_metrics.height())
        width = max(widths, default=0) + 2 * _PANEL_PADDING
        height = line_height * len(lines) + 2 * _PANEL_PADDING + extra_height
        left = (
            _PANEL_MARGIN
            if corner in (Qt.Corner.TopLeftCorner, Qt.Corner.BottomLeftCorner)
            else self.width() - _PANEL_MARGIN - width
        )
        top = (
            _PANEL_MARGIN + offset
            if corner in (Qt.Corner.TopLeftCorner, Qt.Corner.TopRightCorner)
            else self.height() - _PANEL_MARGIN - height - offset
        )
        rect = QRect(left, top, width, height)
        painter.fillRect(rect, QColor(0, 0, 0))
        painter.setPen(QColor("#5a5f66"))
        painter.drawRect(rect.adjusted(0, 0, -1, -1))
        painter.setPen(QColor("#f0f0f0"))
        y = top + _PANEL_PADDING
        for i, line in enumerate(lines):
            painter.setFont(bold if bold_first and i == 0 else font)
            text_rect = QRect(left + _PANEL_PADDING, y, width - 2 * _PANEL_PADDING, line_height)
            painter.drawText(
                text_rect, Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter, line
            )
            y += line_height
        painter.setFont(font)
        self.overlay_rects[name] = rect
        self.panel_lines[name] = list(lines)
        return rect

    def _elided(self, lines: list[str], width: float) -> list[str]:
        """``lines`` cut to ``width`` pixels with "…" (the first in bold, as panels draw it)."""
        bold = QFont(self.font())
        bold.setBold(True)
        out = []
        for i, line in enumerate(lines):
            metrics = QFontMetrics(bold if i == 0 else self.font())
            out.append(metrics.elidedText(line, Qt.TextElideMode.ElideRight, max(80, int(width))))
        return out

    def _paint_legend(self, painter: QPainter) -> None:
        if self.heatmap is None:
            lines = ["Saliency map: computing…"]
            self._panel(painter, "legend", lines, Qt.Corner.BottomRightCorner)
            return
        lines = [
            "Saliency (occlusion): log-odds drop",
            f"0 … {self.heatmap.max_drop:.3f}   opacity {self.heatmap_opacity * 100:.0f} %",
        ]
        bar_height = 12
        rect = self._panel(
            painter, "legend", lines, Qt.Corner.BottomRightCorner, extra_height=bar_height + 4
        )
        bar = QRect(
            rect.left() + _PANEL_PADDING,
            rect.bottom() - _PANEL_PADDING - bar_height,
            rect.width() - 2 * _PANEL_PADDING,
            bar_height,
        )
        gradient = QLinearGradient(bar.topLeft().toPointF(), bar.topRight().toPointF())
        for stop in _HEAT_STOPS:
            gradient.setColorAt(float(stop[0]), QColor(int(stop[1]), int(stop[2]), int(stop[3])))
        painter.fillRect(bar, gradient)

    # --- mouse ------------------------------------------------------------------------------

    def mousePressEvent(self, event: QMouseEvent) -> None:  # noqa: N802
        self.setFocus(Qt.FocusReason.MouseFocusReason)
        if event.button() in (Qt.MouseButton.LeftButton, Qt.MouseButton.MiddleButton):
            self._drag = _Drag(event.button(), event.position(), self.voi, QPointF(self.pan))
            event.accept()
            return
        super().mousePressEvent(event)

    def mouseMoveEvent(self, event: QMouseEvent) -> None:  # noqa: N802
        drag = self._drag
        if drag is None or self.image is None:
            super().mouseMoveEvent(event)
            return
        delta = event.position() - drag.start
        if drag.button == Qt.MouseButton.LeftButton:
            # Right widens the window, down raises the level; the step follows the current width
            # so the same drag works on 8-bit secondary captures and 16-bit radiographs alike.
            step = max(drag.window.width, 1.0) / 256.0
            self.set_window(drag.window.adjusted(delta.y() * step, delta.x() * step))
        else:
            self.pan = drag.pan + delta
            self.update()
        event.accept()

    def mouseReleaseEvent(self, event: QMouseEvent) -> None:  # noqa: N802
        if self._drag is not None and event.button() == self._drag.button:
            self._drag = None
            event.accept()
            return
        super().mouseReleaseEvent(event)

    def wheelEvent(self, event: QWheelEvent) -> None:  # noqa: N802
        steps = event.angleDelta().y() / 120.0
        if steps:
            self.zoom_by(ZOOM_STEP**steps, event.position())
        event.accept()
