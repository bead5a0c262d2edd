"""Render the desktop app's main states to PNG: ``python -m triage_app.gui.screenshots OUTDIR``.

Generated phantoms (made-up patients) are imported into a throw-away data folder with the real
importer and model, and the real window is grabbed at each step, so the pictures in the README
show what the app does rather than a mock-up. Runs headless (``QT_QPA_PLATFORM=offscreen``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from PySide6.QtGui import QPainter
from PySide6.QtWidgets import QApplication, QWidget

from triage_app.config import Settings
from triage_app.gui.qt_main_window import QtMainWindow
from triage_app.gui.theme import apply_theme, prepare_high_dpi
from triage_app.synthetic import PhantomConfig, phantom_to_dataset, render_phantom

log = logging.getLogger(__name__)

SEED = 11
COUNT = 60
SIZE = (1400, 860)


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


def render_all(out: Path, work: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    inputs = work / "inputs"
    write_inputs(inputs)
    settings = Settings({"paths.data_dir": work / "data"})

    prepare_high_dpi()
    app = QApplication.instance() or QApplication(sys.argv[:1])
    assert isinstance(app, QApplication)
    apply_theme(app, settings.theme)
    window = QtMainWindow(settings)
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
