"""The real central server on loopback and a device registered with it, as fixtures.

For the system tests at the top of ``tests/`` (queue, held release, escalation end to end);
registered in ``tests/conftest.py``. A module or folder that needs another ``central`` or
``device`` (a model loaded, a bare store) defines its own, which takes precedence.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.escalation.conftest import Central, Device, device_identity, start_central_server
from triage_app.central.certificates import make_self_signed


@pytest.fixture
def central(tmp_path: Path) -> Iterator[Central]:
    """The central server (no model) under uvicorn on 127.0.0.1, with its own certificate."""
    server = start_central_server(tmp_path / "central", make_self_signed(tmp_path / "tls"))
    yield server
    server.thread.stop()


@pytest.fixture
def device(tmp_path: Path, central: Central) -> Device:
    """A device data folder whose identity the central server knows."""
    data_dir = tmp_path / "device"
    folder = Device(data_dir, device_identity(data_dir))
    central.register(folder.identity)
    return folder
