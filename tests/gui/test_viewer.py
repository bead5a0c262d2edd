"""The viewer widget: window/level drag, presets, frames, zoom and the text layers."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QEvent, QPointF, Qt
from PySide6.QtGui import QImage, QMouseEvent
from PySide6.QtWidgets import QApplication
from pytestqt.qtbot import QtBot

from tests.ct_series import write_ct_series
from tests.helpers import write_phantoms
from triage_app.gui import qt_viewer
from triage_app.gui.qt_viewer import QtViewer
from triage_app.gui.viewer_model import (
    DISCLAIMER,
    AiResult,
    ViewerImage,
    load_viewer_image,
    presets_for,
)

RESULT = {
    "decision": "abnormal",
    "reason": "confident_abnormal",
    "score": 0.9991,
    "thresholds": {"normal_below": 0.04, "abnormal_at_or_above": 0.99},
    "model": {"name": "chest-dx-demo", "version": "1.0.0"},
}


@pytest.fixture(scope="module")
def dx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dx")
    write_phantoms(folder, 31, 1)
    return folder / "p000.dcm"


@pytest.fixture
def viewer(qtbot: QtBot) -> QtViewer:
    widget = QtViewer()
    qtbot.addWidget(widget)
    widget.resize(640, 520)
    widget.show()
    qtbot.waitExposed(widget)
    return widget


def _pixels(viewer: QtViewer) -> np.ndarray:
    image = viewer.grab().toImage().convertToFormat(QImage.Format.Format_RGB32)
    data = np.frombuffer(image.constBits(), dtype=np.uint8)
    return data.reshape(image.height(), image.bytesPerLine())[:, : image.width() * 4].copy()


def _mouse(viewer: QtViewer, kind: QEvent.Type, x: float, y: float, pressed: bool) -> None:
    point = QPointF(x, y)
    button = Qt.MouseButton.LeftButton
    buttons = button if pressed else Qt.MouseButton.NoButton
    event = QMouseEvent(
        kind, point, viewer.mapToGlobal(point), button, buttons, Qt.KeyboardModifier.NoModifier
    )
    QApplication.sendEvent(viewer, event)


def test_left_drag_changes_window_level_pixels_and_corner_text(
    qtbot: QtBot, viewer: QtViewer, dx_file: Path
) -> None:
    viewer.set_image(load_viewer_image(dx_file))
    viewer.repaint()
    before = _pixels(viewer)
    start = viewer.voi
    assert start.source == "header"

    _mouse(viewer, QEvent.Type.MouseButtonPress, 300, 250, True)
    _mouse(viewer, QEvent.Type.MouseMove, 360, 290, True)
    _mouse(viewer, QEvent.Type.MouseButtonRelease, 360, 290, False)
    viewer.repaint()

    assert viewer.voi.width > start.width  # dragged right: wider
    assert viewer.voi.center > start.center  # dragged down: higher level
    assert not np.array_equal(before, _pixels(viewer))
    expected = f"W {viewer.voi.width:.0f}  L {viewer.voi.center:.0f}"
    assert viewer.panel_lines["window"][0] == expected


def test_ct_presets(viewer: QtViewer, tmp_path: Path) -> None:
    series = write_ct_series(tmp_path, 1)
    viewer.set_image(load_viewer_image(series.files[0]))
    for number, (center, width) in enumerate(
        [(40, 400), (-600, 1500), (90, 150), (480, 2500), (40, 80)], start=1
    ):
        viewer.apply_preset(number)
        assert (viewer.voi.center, viewer.voi.width) == (center, width)
        assert viewer.voi.source == presets_for("CT")[number - 1].name


def test_frames_and_counter(viewer: QtViewer) -> None:
    frames = tuple(np.full((64, 64), float(i), dtype=np.float32) for i in range(5))
    viewer.set_image(ViewerImage(frames, "MR", "MONOCHROME2", None, selected_frame=2))
    viewer.repaint()
    assert viewer.panel_lines["info"][1] == "Frame 3 / 5"
    viewer.last_frame()
    viewer.repaint()
    assert viewer.panel_lines["info"][1] == "Frame 5 / 5"
    viewer.next_frame()  # stays on the last frame
    viewer.first_frame()
    viewer.previous_frame()
    viewer.repaint()
    assert viewer.panel_lines["info"][1] == "Frame 1 / 5"


def test_zoom_keeps_text_overlays_the_same_size(viewer: QtViewer, dx_file: Path) -> None:
    viewer.set_image(load_viewer_image(dx_file))
    viewer.ai = AiResult.from_result(RESULT)
    viewer.repaint()
    rects = dict(viewer.overlay_rects)
    ai_before = viewer.grab(rects["ai"]).toImage()
    viewer.zoom_in()
    viewer.zoom_in()
    viewer.repaint()
    assert viewer.zoom > 1.5
    assert viewer.overlay_rects == rects
    assert viewer.grab(rects["ai"]).toImage() == ai_before  # same text, same pixels


def test_ai_layer_is_separate_and_toggles(viewer: QtViewer, dx_file: Path) -> None:
    viewer.set_image(load_viewer_image(dx_file))
    viewer.ai = AiResult.from_result(RESULT)
    viewer.repaint()
    lines = viewer.panel_lines["ai"]
    assert lines[0] == DISCLAIMER
    assert "abnormal at or above 0.990" in " ".join(lines)
    assert "chest-dx-demo 1.0.0" in " ".join(lines)
    with_layer = _pixels(viewer)
    viewer.toggle_overlay()
    viewer.repaint()
    assert "ai" not in viewer.panel_lines
    assert not np.array_equal(with_layer, _pixels(viewer))
    assert viewer._pixels is not None  # the image itself was never touched
    viewer.toggle_overlay()
    viewer.repaint()
    assert np.array_equal(with_layer, _pixels(viewer))


def test_invert_and_reset(viewer: QtViewer, dx_file: Path) -> None:
    viewer.set_image(load_viewer_image(dx_file))
    viewer.repaint()
    normal = _pixels(viewer)
    viewer.invert()
    viewer.zoom_in()
    viewer.repaint()
    assert not np.array_equal(normal, _pixels(viewer))
    viewer.reset()
    viewer.repaint()
    assert np.array_equal(normal, _pixels(viewer))


def test_a_new_case_clears_the_previous_image_until_its_own_arrives(
    qtbot: QtBot, viewer: QtViewer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The previous case's image under the new case's AI result would be read as the new one."""
    write_phantoms(tmp_path, 32, 2)
    first, second = tmp_path / "p000.dcm", tmp_path / "p001.dcm"
    release = threading.Event()

    def load(path: str) -> ViewerImage:
        if path == str(second):
            release.wait(10)
        return load_viewer_image(path)

    monkeypatch.setattr(qt_viewer, "load_viewer_image", load)
    with qtbot.waitSignal(viewer.image_loaded):
        viewer.show_case("case-a", str(first), AiResult.from_result(RESULT))
    viewer.grab()
    assert "ai" in viewer.panel_lines

    try:
        viewer.show_case("case-b", str(second), AiResult.from_result(RESULT))
        viewer.grab()
        assert (viewer.case_id, viewer.loading, viewer.image) == ("case-b", True, None)
        assert viewer.panel_lines == {}  # neither the old image's panels nor the new AI result
        assert viewer.notice == "Loading image…"
        rgb = _pixels(viewer).reshape(viewer.height(), viewer.width(), 4)[..., :3]
        assert (rgb.max(axis=2) > 0x20).mean() < 0.02  # black but for the notice's text
    finally:
        with qtbot.waitSignal(viewer.image_loaded) as loaded:
            release.set()
    assert (loaded.args, viewer.loading) == (["case-b"], False)
    viewer.grab()
    assert "ai" in viewer.panel_lines


def test_a_large_image_is_windowed_at_screen_resolution_and_averaged_not_aliased(
    viewer: QtViewer, qtbot: QtBot
) -> None:
    """A fine pattern far larger than the viewer shows as its average grey, not moiré, and the
    window/level drag works on the reduced copy; zoomed to 100 % every pixel is back."""
    checkerboard = (np.indices((3000, 3000)).sum(axis=0) % 2 * 1000).astype(np.float32)
    viewer.set_image(ViewerImage((checkerboard,), "DX", "MONOCHROME2", (500.0, 1000.0), 0))
    viewer.grab()  # the first paint fits the image
    assert viewer.zoom < 0.25
    assert viewer._pixels is not None and viewer._pixels.width() <= 3000 // 4

    grabbed = _pixels(viewer).reshape(viewer.height(), viewer.width(), 4)[..., :3]
    centre = grabbed[200:320, 260:380]
    assert centre.std() < 2.0, "the checkerboard must average to one grey"
    assert abs(float(centre.mean()) - 128) < 3

    viewer.zoom_by(1.0 / viewer.zoom)  # 100 %
    assert viewer._pixels is not None and viewer._pixels.width() == 3000
    assert _pixels(viewer)[200:320, 260 * 4 : 380 * 4].std() > 100  # black and white again
