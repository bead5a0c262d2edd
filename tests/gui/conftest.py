"""GUI test setup: Qt runs offscreen, and generated inputs are shared across the tests.

``QT_QPA_PLATFORM`` must be set before Qt is first imported, hence at the top of this file
(pytest imports conftest files before the test modules).
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from collections.abc import Iterator
from pathlib import Path

import pytest
from pytestqt.qtbot import QtBot

from tests.helpers import write_bad_inputs, write_phantoms
from triage_app.config import Settings
from triage_app.gui.qt_main_window import QtMainWindow

PHANTOM_SEED = 21
FOLDER_COUNT = 12


def phantoms_in_new_folder(
    tmp_path_factory: pytest.TempPathFactory, name: str, seed: int, count: int
) -> Path:
    """A new folder named after ``name`` holding ``count`` phantoms drawn from ``seed``."""
    folder = tmp_path_factory.mktemp(name)
    write_phantoms(folder, seed, count)
    return folder


@pytest.fixture(scope="session")
def phantom_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dozen phantoms and one file that is not DICOM."""
    folder = phantoms_in_new_folder(tmp_path_factory, "open-folder", PHANTOM_SEED, FOLDER_COUNT)
    (folder / "notes.txt").write_text("not an image\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """Thirty phantoms and one file per failure mode; returns the folder and expected codes."""
    folder = phantoms_in_new_folder(tmp_path_factory, "mixed", PHANTOM_SEED + 1, 30)
    return folder, write_bad_inputs(folder)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # One worker: in-process, no start-up cost for the small imports of most tests.
    return Settings({"paths.data_dir": tmp_path / "data", "processing.workers": 1})


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    """The settings file the window's settings dialog saves to (never the user's own)."""
    return tmp_path / "config" / "settings.toml"


@pytest.fixture
def window(qtbot: QtBot, settings: Settings, config_path: Path) -> Iterator[QtMainWindow]:
    main = QtMainWindow(settings, config_path=config_path)
    qtbot.addWidget(main)
    main.resize(1200, 800)
    main.show()
    qtbot.waitExposed(main)
    yield main
    main.close()
