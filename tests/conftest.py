"""Suite-wide fixtures and checks.

As qutebrowser's ``logfail``: a test fails if the application logs an unexpected warning or
error. A test that provokes one on purpose says so with ``@pytest.mark.expect_log_warnings``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

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
