"""The real central server under uvicorn on loopback over TLS, and real sealed cases to send it.

Each test gets its own data folder, key ring and server (a few tens of milliseconds), so tests
that revoke devices or rotate keys cannot disturb each other. The client is ``requests`` with
``trust_env = False`` and the throwaway CA as ``verify``, as the device's uploader will be.
Payloads are synthetic phantoms de-identified by the product's own engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.helpers import phantom_dataset
from tests.tls import ServerMaterial, make_server
from triage_app.central.config import CentralConfig
from triage_app.central.server import ServerThread
from triage_app.central.storage import CentralStore
from triage_app.dicom.deidentify import Deidentifier
from triage_app.dicom.deidentify.files import encode
from triage_app.escalation.envelope import Payload, seal
from triage_app.escalation.keys import DeviceIdentity, ServerKeyRing, ServerPublicKey
from triage_app.escalation.receipt import sign_request

ROOT = Path(__file__).resolve().parents[2]
EDGE_MODEL = ROOT / "models" / "chest-dx-demo"
CENTRAL_MODEL = ROOT / "models" / "central-dx-demo"
SITE_SECRET = b"central-tests-site-secret-32byte"
PHANTOM_SEED = 9001
# Small chunks so that every test envelope has several (reordering needs two).
CHUNK_SIZE = 32 * 1024


@dataclass(frozen=True)
class TestCase:
    """A de-identified phantom as a device would escalate it."""

    __test__ = False  # not a pytest test class

    case_id: str
    payload: Payload


@lru_cache(maxsize=64)
def first_started(data_dir: Path) -> Path:
    """What ``central serve`` makes in its data folder when it first starts (its store and key
    ring), without a server: the admin commands refuse a folder without them."""
    from triage_app.central.server import load_key_ring

    config = CentralConfig(data_dir=data_dir, allow_plain_http=True)
    load_key_ring(config)
    CentralStore.for_config(config).close()
    return data_dir


def make_case(index: int) -> TestCase:
    """Phantom ``index``, de-identified and encoded, with a protocol case id (64 hex).

    The id is SHA-256 of the de-identified instance UID, as ``dicom.pseudonym.case_id_for``
    computes it but not cut to 32 hex: the protocol's header requires 64.
    """
    ds = phantom_dataset(PHANTOM_SEED, index)
    report = Deidentifier(SITE_SECRET).deidentify(ds)
    case_id = hashlib.sha256(report.sop_instance_uid.encode()).hexdigest()
    result = {"case_id": case_id, "decision": "escalate", "reason": "uncertain", "score": 0.5}
    return TestCase(case_id, Payload(json.dumps(result).encode("utf-8"), encode(ds)))


def new_device() -> DeviceIdentity:
    return DeviceIdentity.from_signing_key(Ed25519PrivateKey.generate())


def seal_case(
    case: TestCase,
    device: DeviceIdentity,
    server_key: ServerPublicKey,
    *,
    now: datetime | None = None,
) -> bytes:
    return bytes(
        seal(
            case.payload,
            case_id=case.case_id,
            device=device,
            server_key=server_key,
            chunk_size=CHUNK_SIZE,
            now=now,
        )
    )


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> ServerMaterial:
    return make_server(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def http(tls: ServerMaterial) -> Iterator[requests.Session]:
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE must not override verify (DESIGN §6)
    session.verify = str(tls.ca_cert)
    yield session
    session.close()


class Central:
    """A running server plus the client side a test needs."""

    def __init__(self, thread: ServerThread, http: requests.Session) -> None:
        self.thread = thread
        self.http = http

    @property
    def url(self) -> str:
        return self.thread.url

    @property
    def store(self) -> CentralStore:
        return self.thread.store

    @property
    def key_ring(self) -> ServerKeyRing:
        return self.thread.key_ring

    def register(self, device: DeviceIdentity) -> DeviceIdentity:
        self.thread.store.registry.add_device(device.public_key_b64(), "test device")
        return device

    def seal(self, case: TestCase, device: DeviceIdentity, **kwargs: Any) -> bytes:
        return seal_case(case, device, self.thread.key_ring.active, **kwargs)

    def post(self, case_id: str, body: Any, **kwargs: Any) -> requests.Response:
        return self.http.post(
            f"{self.url}/v1/cases/{case_id}",
            data=body,
            headers={"Content-Type": "application/octet-stream"},
            timeout=30,
            **kwargs,
        )

    def poll(
        self, case_id: str, device: DeviceIdentity, *, timestamp: int | None = None
    ) -> requests.Response:
        path = f"/v1/cases/{case_id}/verdict"
        stamp = int(time.time()) if timestamp is None else timestamp
        headers = sign_request(device, "GET", path, stamp)
        return self.http.get(self.url + path, headers=headers, timeout=30)

    def get(self, path: str) -> requests.Response:
        return self.http.get(self.url + path, timeout=30)


StartCentral = Callable[..., Central]


@pytest.fixture
def start_central(
    tmp_path: Path, tls: ServerMaterial, http: requests.Session
) -> Iterator[StartCentral]:
    """Start a server on ``tmp_path/'server'`` (or ``data_dir``) with config overrides."""
    running: list[ServerThread] = []

    def start(data_dir: Path | None = None, **overrides: Any) -> Central:
        fields: dict[str, Any] = {
            "data_dir": data_dir or tmp_path / "server",
            "host": "127.0.0.1",
            "port": 0,
            "tls_cert": tls.server_cert,
            "tls_key": tls.server_key,
        }
        fields.update(overrides)
        thread = ServerThread(CentralConfig(**fields))
        running.append(thread)
        thread.start()
        return Central(thread, http)

    yield start
    http.close()  # idle keep-alive connections would otherwise hold the TLS shutdown
    for thread in running:
        thread.stop()


@pytest.fixture
def central(start_central: StartCentral) -> Central:
    """A server without a model (verdicts stay pending)."""
    return start_central()


def free_port() -> int:
    """A loopback port nothing listens on now (for a server started in another process)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def serve_in_process(data_dir: Path, port: int, tls: ServerMaterial) -> subprocess.Popen[str]:
    """``central.server.serve`` in a child process, as ``triage-app central serve`` runs it:
    for tests that kill or signal the server itself. The caller stops it."""
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from triage_app.central.config import CentralConfig
        from triage_app.central.server import serve
        serve(CentralConfig(Path({str(data_dir)!r}), port={port},
                            tls_cert=Path({str(tls.server_cert)!r}),
                            tls_key=Path({str(tls.server_key)!r})))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_APP_")}
    return subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
