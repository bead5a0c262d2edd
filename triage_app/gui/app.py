"""Entry point of the desktop app: ``run_gui(settings, config_path)`` (``triage-app gui``)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from PySide6.QtWidgets import QApplication

from triage_app.config import Settings
from triage_app.gui.qt_main_window import QtMainWindow
from triage_app.gui.theme import apply_theme, prepare_high_dpi

__all__ = ["run_gui"]

log = logging.getLogger(__name__)


def run_gui(settings: Settings, config_path: Path | None = None) -> int:
    """Show the main window and run the event loop; returns the exit code.

    ``config_path`` is the settings file the settings dialog saves to (None: the default).
    """
    existing = QApplication.instance()
    if existing is None:
        prepare_high_dpi()
    app = existing if isinstance(existing, QApplication) else QApplication(sys.argv[:1])
    app.setApplicationName("triage-app")
    app.setApplicationDisplayName("Triage")
    apply_theme(app, settings.theme, settings.font_scale)
    window = QtMainWindow(settings, config_path=config_path)
    window.show()
    return app.exec()
