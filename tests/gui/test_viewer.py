"""The viewer widget: window/level drag, presets, frames, zoom and the text layers."""

from __future__ import annotations

import logging
import threading
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QEvent, QPoint, QPointF, Qt
from PySide6.QtGui import QImage, QMouseEvent
from PySide6.QtWidgets import QApplication
from pytestqt.qtbot import QtBot

from tests.ct_series import write_ct_series
from tests.helpers import make_result, phantom_dataset, write_phantoms
from triage_app.gui import qt_viewer
from triage_app.gui.qt_history import QtCaseHistory
from triage_app.gui.qt_viewer import QtViewer
from triage_app.gui.viewer_model import (
    DISCLAIMER,
    AiResult,
    ViewerImage,
    load_viewer_image,
    presets_for,
)
from triage_app.states import CaseEvent
from triage_app.store import CaseStore

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


# --- who the image is of; the central verdict in the result layer --------------------------------

#: A name from the field, longer than DICOM's 64 characters for a name: pydicom warns on reading.
LONG_NAME = "Wolfeschlegelsteinhausenbergerdorff" * 8 + "^Hubert Blaine Adolph Charles"


@pytest.mark.parametrize("long_name", [False, True])
def test_the_patient_and_study_stay_in_a_corner_read_from_the_file_shown(
    viewer: QtViewer,
    qtbot: QtBot,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    long_name: bool,
) -> None:
    """The corners said only "DX / Frame 1 / 1 / Zoom": nothing told one patient's image from
    another's. The values are shown here only: never logged."""
    ds = phantom_dataset(5, 3)
    with warnings.catch_warnings():  # longer than PN allows, as in the field
        warnings.simplefilter("ignore")
        ds.PatientName = LONG_NAME if long_name else "TESTCASE^SAM"
    ds.PatientID, ds.PatientBirthDate = "MRN154515", "19700101"
    ds.StudyDate, ds.StudyTime = "20261122", "223511"
    path = tmp_path / "one.dcm"
    ds.save_as(path, enforce_file_format=True)
    caplog.set_level(logging.DEBUG)
    with qtbot.waitSignal(viewer.image_loaded):
        viewer.show_case("case-a", str(path), AiResult.from_result(RESULT))
    viewer.repaint()

    name, *rest = viewer.panel_lines["patient"]
    assert rest == ["ID MRN154515", "Born 1970-01-01", "Study 2026-11-22 22:35"]
    patient, info, ai = (viewer.overlay_rects[k] for k in ("patient", "info", "ai"))
    assert patient.topLeft() == QPoint(8, 8)
    assert info.top() > patient.bottom() and info.left() == patient.left()
    assert viewer.panel_lines["info"][0] == "DX"
    if long_name:
        assert name.endswith("…") and patient.right() < ai.left()  # cut, clear of the AI layer
    else:
        assert name == "TESTCASE, SAM"
    viewer.toggle_overlay()  # hides the AI layer only
    viewer.repaint()
    assert "patient" in viewer.panel_lines and "ai" not in viewer.panel_lines
    for value in ("TESTCASE", "Wolfeschlegel", "MRN154515", "1970", "2026"):
        assert value not in caplog.text


def test_a_verdict_that_comes_back_while_its_case_is_shown_joins_the_result_layer(
    qtbot: QtBot, viewer: QtViewer, dx_file: Path
) -> None:
    """Selected again (the worklist re-announces a changed case), the image stays and only
    the result layer changes."""
    with qtbot.waitSignal(viewer.image_loaded):
        viewer.show_case("case-a", str(dx_file), AiResult.from_result(RESULT))
    image = viewer.image
    verdict = {"verdict": "normal", "score": 0.004, "model": {"name": "central", "version": "2"}}
    viewer.show_case(
        "case-a", str(dx_file), AiResult.from_result({**RESULT, "central_verdict": verdict})
    )
    viewer.repaint()
    assert viewer.image is image and not viewer.loading
    assert viewer.panel_lines["ai"][-2:] == [
        "Central verdict: normal, score 0.004",
        "Central model: central 2",
    ]


def test_the_history_row_of_a_verdict_says_what_the_verdict_was(
    qtbot: QtBot, tmp_path: Path
) -> None:
    """ "receive verdict | delivered → verdict received" had an empty detail."""
    db = tmp_path / "cases.sqlite3"
    verdict = {
        "case_id": "c1",
        "verdict": "abnormal",
        "score": 0.981428,
        "model": {"name": "central-dx-demo", "version": "1.1.0", "sha256": "58" * 32},
        "decided_at": "2026-11-22T22:34:50Z",
    }
    failure = {"verdict": None, "error": {"code": "unprocessable_image", "message": "no pixels"}}
    with CaseStore.open(db) as store:
        for case_id, answer in (("c1", verdict), ("c2", failure)):
            escalated = make_result(case_id, decision="escalate", reason="uncertain", path="")
            store.record_result(escalated, CaseEvent.ENQUEUE)
            store.apply(case_id, CaseEvent.START_SEND)
            store.apply(case_id, CaseEvent.DELIVER)
            store.record_verdict(case_id, answer)
        store.record_result(make_result("c3", path=""), CaseEvent.DECIDE_LOCAL_NORMAL)
    history = QtCaseHistory(db)
    qtbot.addWidget(history)
    when = datetime(2026, 11, 22, 22, 34, 50, tzinfo=UTC).astimezone()

    with qtbot.waitSignal(history.loaded):
        history.show_case("c1")
    last = history.rows()[-1]
    assert last[1:] == (
        "receive verdict",
        "delivered → verdict received",
        f"abnormal, score 0.981 · central-dx-demo 1.1.0 · decided {when:%Y-%m-%d %H:%M:%S}",
    )
    with qtbot.waitSignal(history.loaded):
        history.show_case("c2")
    assert history.rows()[-1][3] == "no verdict: unprocessable_image: no pixels"
    with qtbot.waitSignal(history.loaded):
        history.show_case("c3")  # no verdict: the rows are the store's
    assert [row[1] for row in history.rows()] == ["analyse", "decide local normal"]
