"""Render the desktop app's main states to PNG: ``python -m triage_app.gui.screenshots OUTDIR``.

Generated phantoms (made-up patients) are imported into a throw-away data folder with the real
importer and model, and the real window is grabbed at each step, so the pictures in the README
show what the app does rather than a mock-up. Runs headless (``QT_QPA_PLATFORM=offscreen``).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from PySide6.QtGui import QPainter
from PySide6.QtWidgets import QApplication, QWidget

from triage_app.config import Settings, save_settings, set_admin_password
from triage_app.escalation.service import open_outbox
from triage_app.gui.qt_main_window import QtMainWindow
from triage_app.gui.theme import apply_theme, prepare_high_dpi
from triage_app.states import Feedback
from triage_app.synthetic import PhantomConfig, phantom_to_dataset, render_phantom

log = logging.getLogger(__name__)

SEED = 11
COUNT = 60
SIZE = (1400, 860)
SHOT_PASSWORD = "screenshot-admin"


def _wait(app: QApplication, done: Callable[[], bool], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError("the app did not reach the expected state in time")
        app.processEvents()
        time.sleep(0.01)


def _save(widget: QWidget, path: Path, dialog: QWidget | None = None) -> None:
    """Grab ``widget``; a dialog (its own top-level window) is drawn centred over it."""
    pixmap = widget.grab()
    if dialog is not None:
        painter = QPainter(pixmap)
        top = dialog.grab()
        painter.drawPixmap(
            (pixmap.width() - top.width()) // 2, (pixmap.height() - top.height()) // 2, top
        )
        painter.end()
    if not pixmap.save(str(path)):
        raise OSError(f"could not write {path}")
    print(path)


def write_inputs(folder: Path, count: int = COUNT) -> None:
    """Phantom radiographs with made-up patient details, and one file that is not DICOM."""
    folder.mkdir(parents=True, exist_ok=True)
    config = PhantomConfig(size_range=(512, 640))
    for index in range(count):
        dataset = phantom_to_dataset(render_phantom(SEED, index, config))
        dataset.save_as(folder / f"img{index:03d}.dcm", enforce_file_format=True)
    (folder / "README.txt").write_text("not an image\n", encoding="utf-8")


def _fill_queue(settings: Settings) -> None:
    """Three outbox entries (retrying, refused, waiting) for the queue view.

    The GUI shows the outbox as it is; without a central server the demo would have none, so
    placeholder envelopes stand in for sealed ones (the view never opens them).
    """
    with open_outbox(settings) as outbox:
        for n, reason in enumerate(("uncertain", "out_of_scope", "uncertain")):
            envelope = f"placeholder envelope {n}".encode() * 400
            case_id = hashlib.sha256(f"screenshot-{n}".encode()).hexdigest()[:32]
            outbox.enqueue(
                case_id,
                envelope,
                reason=reason,
                payload_sha256=hashlib.sha256(envelope).hexdigest(),
            )
            if n == 1:
                outbox.quarantine(case_id, "HTTP 422: device certificate revoked")
        claimed = outbox.claim_next("screenshot", 60.0)
        assert claimed is not None
        retry_at = datetime.now(UTC) + timedelta(seconds=40)
        outbox.mark_failed(claimed.case_id, "connect_failed: connection refused", retry_at)


def render_all(out: Path, work: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    inputs = work / "inputs"
    write_inputs(inputs)
    settings = Settings({"paths.data_dir": work / "data"})
    config_path = work / "settings.toml"
    save_settings(set_admin_password(Settings(), SHOT_PASSWORD), config_path)

    prepare_high_dpi()
    app = QApplication.instance() or QApplication(sys.argv[:1])
    assert isinstance(app, QApplication)
    apply_theme(app, settings.theme)
    window = QtMainWindow(settings, config_path=config_path)
    window.resize(*SIZE)
    window.show()
    shots: list[Path] = []

    window.import_paths([inputs])

    def a_third_done() -> bool:
        progress = window.importer.last_progress
        return progress is not None and progress.done >= COUNT // 3

    _wait(app, a_third_done)
    shots.append(out / "import-progress.png")
    _save(window, shots[-1], window.importer.dialog)

    _wait(app, lambda: window.importer.summary_box is not None)
    shots.append(out / "import-summary.png")
    _save(window, shots[-1], window.importer.summary_box)
    assert window.importer.summary_box is not None
    window.importer.summary_box.accept()

    window.worklist.refresh()
    _wait(app, lambda: window.worklist.model.rowCount() >= COUNT)
    loaded: list[str] = []
    window.viewer.image_loaded.connect(loaded.append)
    window.worklist.table.selectRow(0)
    _wait(app, lambda: bool(loaded))
    window.worklist.table.setFocus()
    shots.append(out / "worklist-viewer.png")
    _save(window, shots[-1])

    ready: list[str] = []
    window.viewer.heatmap_ready.connect(ready.append)
    window.viewer.toggle_heatmap()
    _wait(app, lambda: bool(ready))
    shots.append(out / "viewer-heatmap.png")
    _save(window.viewer, shots[-1])

    window.viewer.toggle_heatmap()
    window.viewer.apply_preset(3)
    window.viewer.zoom_by(2.0)
    shots.append(out / "viewer-zoomed.png")
    _save(window.viewer, shots[-1])

    window.overlay.toggle()
    shots.append(out / "shortcuts.png")
    _save(window, shots[-1])
    window.overlay.toggle()

    window.history.comment.setText("agree: small nodule, right upper zone")
    recorded: list[object] = []
    window.feedback_recorded.connect(recorded.append)
    window.give_feedback(Feedback.ACCEPT)
    _wait(app, lambda: any(row[1] == "acknowledge" for row in window.history.rows()))
    shots.append(out / "history-feedback.png")
    _save(window, shots[-1])

    shots.append(out / "queue.png")
    _fill_queue(settings)
    window.show_queue()
    dialog = window.queue_dialog
    assert dialog is not None
    _wait(app, lambda: len(dialog.items) == 3)
    dialog.select_case(hashlib.sha256(b"screenshot-1").hexdigest()[:32])
    _save(window, shots[-1], dialog)
    dialog.close()

    window.show_settings()
    settings_dialog = window.settings_dialog
    assert settings_dialog is not None
    unlocked: list[bool] = []
    settings_dialog.unlocked.connect(unlocked.append)
    settings_dialog.password.setText(SHOT_PASSWORD)
    settings_dialog.unlock()
    page = settings_dialog.thresholds
    _wait(app, lambda: bool(unlocked) and page.scored_folder is not None, timeout_s=300)
    page.low.setValue(0.02)
    shots.append(out / "admin-thresholds.png")
    _save(window, shots[-1], settings_dialog)
    settings_dialog.tabs.setCurrentIndex(3)  # the Escalation section
    shots.append(out / "admin-settings.png")
    _save(window, shots[-1], settings_dialog)
    settings_dialog.close()

    window.close()
    return shots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="triage-shots-") as work:
        render_all(args.outdir, Path(work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
