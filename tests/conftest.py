"""Suite-wide fixtures and checks.

As qutebrowser's ``logfail``: a test fails if the application logs an unexpected warning or
error. A test that provokes one on purpose says so with ``@pytest.mark.expect_log_warnings``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator

import pytest
from pydicom import config as pydicom_config

pytest_plugins = ["tests.loopback_fixtures"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "expect_log_warnings: the test provokes application warnings on purpose"
    )


@pytest.fixture(autouse=True)
def _fail_on_unexpected_log_warnings(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> Iterator[None]:
    caplog.set_level(logging.INFO, logger="triage_app")
    yield
    if request.node.get_closest_marker("expect_log_warnings"):
        return
    unexpected = [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.get_records("call")
        if r.levelno >= logging.WARNING and r.name.startswith("triage_app")
    ]
    assert not unexpected, "unexpected warnings logged:\n" + "\n".join(unexpected)


@pytest.fixture(autouse=True)
def _process_logging_state_restored() -> Iterator[None]:
    """What ``configure_logging`` sets for the whole process (an in-process ``cli.main`` runs
    it) is put back after each test: pydicom's reading validation, where warnings go, the root
    handlers and their filters, the library loggers' levels. Left behind, a later test would
    run under a command's settings (e.g. pydicom warnings silenced) without saying so."""
    root = logging.getLogger()
    handlers = [(handler, list(handler.filters)) for handler in root.handlers]
    root_level = root.level
    levels = {name: logging.getLogger(name).level for name in ("pydicom", "pynetdicom")}
    validation = pydicom_config.settings.reading_validation_mode
    showwarning = warnings.showwarning
    yield
    pydicom_config.settings.reading_validation_mode = validation
    logging.captureWarnings(False)
    warnings.showwarning = showwarning
    for handler in root.handlers[:]:  # a command's own (pytest's capture handlers stay)
        if type(handler) is logging.StreamHandler and handler not in dict(handlers):
            root.removeHandler(handler)
    for handler, filters in handlers:
        handler.filters[:] = filters
    root.setLevel(root_level)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
