"""A real central server over pinned TLS and a real device that escalates to it.

The delivery tests (``test_uploader.py``, ``tests/test_escalation_system.py``) use the product's
own parts end to end: ``make_self_signed`` for the server certificate the device pins, the server
under uvicorn on 127.0.0.1 (port 0), SQLite files on both sides, phantoms with planted
identifiers through the real triage pipeline, and ``open_escalation`` as every shell wires it.
Nothing is mocked; time is injected into the uploader only where a test must jump past a backoff.

The helpers are plain functions and classes so that ``tests/test_escalation_system.py`` (outside
this folder) can import them; the fixtures below wrap them for the tests in this folder.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydicom.dataset import Dataset

from tests.helpers import phantom_dataset
from triage_app.batch import triage_and_record
from triage_app.central.certificates import ServerCertificate, make_self_signed
from triage_app.central.config import DEFAULT_MAX_CONNECTIONS, CentralConfig
from triage_app.central.server import ServerThread
from triage_app.central.storage import CentralStore
from triage_app.central.verdicts import VerdictWorker
from triage_app.config import Settings
from triage_app.escalation.keys import (
    DeviceIdentity,
    ServerKeyRing,
    load_or_create_device_identity,
)
from triage_app.escalation.outbox import OutboxItem
from triage_app.escalation.queueing import EscalationQueue
from triage_app.escalation.service import EscalationLink, open_escalation
from triage_app.escalation.uploader import Uploader, UploaderConfig
from triage_app.model.manifest import load_manifest
from triage_app.results import CaseResult
from triage_app.states import CaseState
from triage_app.store import CaseStore

ROOT = Path(__file__).resolve().parents[2]
#: The edge model doubles as the central model: it reads the de-identified DICOM and answers.
EDGE_MODEL = ROOT / "models" / "chest-dx-demo"
EDGE_MODEL_KEY = load_manifest(EDGE_MODEL).key  # the shipped model, whatever its version

# Identifiers planted in every phantom: none may be found in anything the outbox writes.
SEED = 61
PATIENT_NAME = "DOE^JOHN"
PATIENT_ID = "MRN4711"
ACCESSION = "ACC99887766"


# --- The central server -------------------------------------------------------------------------


@dataclass
class Central:
    """A running central server (real uvicorn, real TLS, real SQLite) and its certificate."""

    thread: ServerThread
    certificate: ServerCertificate

    @property
    def url(self) -> str:
        return self.thread.url

    @property
    def port(self) -> int:
        assert self.thread.port is not None
        return self.thread.port

    @property
    def pin(self) -> str:
        return self.certificate.sha256

    @property
    def store(self) -> CentralStore:
        return self.thread.store

    @property
    def key_ring(self) -> ServerKeyRing:
        return self.thread.key_ring

    @property
    def worker(self) -> VerdictWorker:
        worker: VerdictWorker = self.thread.app.state.worker
        return worker

    def register(self, device: DeviceIdentity) -> None:
        self.store.registry.add_device(device.public_key_b64(), "delivery test device")

    def public_keys(self) -> dict[str, str]:
        """The keys a device may be configured with instead of fetching them."""
        info = self.key_ring.public_info()
        return {
            "escalation.server_public_key": str(info["server_public_key"]),
            "escalation.receipt_public_key": str(info["receipt_public_key"]),
        }

    def deliveries(self) -> dict[str, int]:
        """case id -> how often the server has seen it (one row per stored case)."""
        return {case.case_id: case.deliveries for case in self.store.cases()}


def start_central_server(
    data_dir: Path,
    certificate: ServerCertificate,
    *,
    model: bool = False,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> Central:
    config = CentralConfig(
        data_dir=data_dir,
        host="127.0.0.1",
        port=0,
        tls_cert=certificate.cert,
        tls_key=certificate.key,
        model_dir=EDGE_MODEL if model else None,
        max_connections=max_connections,
    )
    thread = ServerThread(config)
    try:
        thread.start()
    except BaseException:
        thread.stop()
        raise
    return Central(thread, certificate)


StartCentral = Callable[..., Central]


@pytest.fixture
def start_central(tmp_path: Path) -> Iterator[StartCentral]:
    """Start servers (``model=True`` for verdicts); all are stopped after the test."""
    running: list[Central] = []

    def start(*, model: bool = False, name: str = "central") -> Central:
        certificate = make_self_signed(tmp_path / f"{name}-tls")
        central = start_central_server(tmp_path / name, certificate, model=model)
        running.append(central)
        return central

    yield start
    for central in running:
        central.thread.stop()


@pytest.fixture
def central(start_central: StartCentral) -> Central:
    """A server without a model: verdicts stay pending."""
    return start_central()


# --- The device ---------------------------------------------------------------------------------


def device_settings(data_dir: Path, url: str, pin: str, **extra: object) -> Settings:
    """A device that escalates every triaged phantom (thresholds 0 and 1, approved for the
    shipped model, as an admin could set them) to ``url``, pinning ``pin``."""
    values: dict[str, object] = {
        "paths.data_dir": data_dir,
        "processing.workers": 1,
        "escalation.thresholds_model": EDGE_MODEL_KEY,
        "escalation.normal_below": 0.0,
        "escalation.abnormal_at_or_above": 1.0,
        "escalation.central_url": url,
        "escalation.tls_pin": pin,
        "escalation.connect_timeout_s": 3.0,
        "escalation.read_timeout_s": 10.0,
    }
    values.update(extra)
    return Settings(values)


def device_identity(data_dir: Path) -> DeviceIdentity:
    return load_or_create_device_identity(data_dir)


def other_ed25519_public_key_b64() -> str:
    """A valid receipt key that is not the server's."""
    raw = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    return base64.b64encode(raw).decode("ascii")


def link_for(settings: Settings) -> EscalationLink:
    link = open_escalation(settings)
    assert link is not None, "a central URL is configured"
    return link


class FakeClock:
    """The uploader's clock, moved by the test (starts at the real time: the server's own clock
    checks envelope and request times)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now

    def advance_past(self, iso_time: str) -> datetime:
        """Just after ``iso_time`` (an outbox ``next_attempt_at``)."""
        self.now = max(self.now, datetime.fromisoformat(iso_time)) + timedelta(milliseconds=5)
        return self.now


def make_uploader(
    link: EscalationLink,
    *,
    clock: Callable[[], datetime] | None = None,
    retry_cap_s: float = 60.0,
    lease_s: float = 60.0,
    seed: int = 7,
) -> Uploader:
    """An uploader over the link, as ``EscalationLink.uploader`` builds it, with an injectable
    clock, a seeded jitter and a configurable lease. Enter it to mirror states in the store."""
    assert link.keys is not None, "the central server's keys are known"
    return Uploader(
        outbox=link.outbox,
        client=link.client,
        device=link.device,
        keys=link.keys,
        store_path=link.settings.case_store_path,
        config=UploaderConfig(retry_cap_s=retry_cap_s, lease_s=lease_s, verdict_poll_s=1.0),
        rng=random.Random(seed),
        clock=clock,
    )


# --- Escalated cases from the real pipeline -----------------------------------------------------


@dataclass(frozen=True)
class Escalated:
    """A phantom with planted identifiers, and the case the pipeline made of it."""

    original: Dataset
    result: CaseResult

    @property
    def case_id(self) -> str:
        return self.result.case_id

    @property
    def payload(self) -> bytes:
        assert self.result.payload is not None
        return self.result.payload


def write_identified_phantoms(folder: Path, indices: Sequence[int]) -> list[tuple[Path, Dataset]]:
    """Phantoms of :data:`SEED` carrying a patient name, ID and accession number."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index in indices:
        ds = phantom_dataset(SEED, index)
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        ds.AccessionNumber = ACCESSION
        path = folder / f"scan{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append((path, ds))
    return written


def triage(
    settings: Settings,
    folder: Path,
    indices: Sequence[int],
    *,
    queue: EscalationQueue | None,
) -> list[Escalated]:
    """Run the phantoms through ``triage_and_record`` (the shells' loop); every one escalates:
    queued when ``queue`` is given, else held with its payload."""
    written = write_identified_phantoms(folder, indices)
    outcomes = list(triage_and_record([path for path, _ in written], settings, queue=queue))
    cases = []
    for (_, original), outcome in zip(written, outcomes, strict=True):
        assert isinstance(outcome, CaseResult), outcome
        assert outcome.escalation is not None and outcome.payload is not None, outcome
        expected = "queued" if queue is not None else "held"
        assert outcome.escalation.state == expected, outcome.escalation
        cases.append(Escalated(original, outcome))
    return cases


def queue_cases(
    link: EscalationLink, folder: Path, indices: Sequence[int] = (0, 1, 2)
) -> list[Escalated]:
    """Triage phantoms and queue them through the link, as the demo wires it."""
    queue = link.queue
    assert queue is not None, "the central server's keys are known"
    return triage(link.settings, folder, indices, queue=queue)


def envelope_sizes(link: EscalationLink, cases: Sequence[Escalated]) -> dict[str, int]:
    return {c.case_id: len(link.outbox.envelope(c.case_id)) for c in cases}


@dataclass
class Device:
    """A device data folder with its identity (not yet registered anywhere)."""

    data_dir: Path
    identity: DeviceIdentity

    def settings(self, central: Central, *, url: str | None = None, **extra: Any) -> Settings:
        return device_settings(self.data_dir, url or central.url, central.pin, **extra)


@pytest.fixture
def device(tmp_path: Path) -> Device:
    data_dir = tmp_path / "device"
    return Device(data_dir, device_identity(data_dir))


# --- What the tests look at ------------------------------------------------------------------


def item_of(link: EscalationLink, case_id: str) -> OutboxItem:
    item = link.outbox.get(case_id)
    assert item is not None, f"case {case_id} is not in the outbox"
    return item


def store_state(link: EscalationLink, case_id: str) -> CaseState:
    with CaseStore.open(link.settings.case_store_path) as store:
        case = store.get(case_id)
    assert case is not None
    return case.state


def alarms(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.get_records("call")
        if r.levelno == level
        and r.name == "triage_app.escalation.uploader"
        and "ALARM" in r.getMessage()
    ]
