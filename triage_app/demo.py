"""The demo: bundled sample images through the whole product, with a central server on loopback.

The images (``triage_app.demo_data``) are synthetic chest phantoms and two out-of-scope images,
with truth; the central server runs on 127.0.0.1 with throwaway keys and a self-signed,
pinned certificate, so the demo shows every part working without a network.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from triage_app.batch import triage_and_record
from triage_app.config import Settings
from triage_app.demo_data import demo_images
from triage_app.escalation.keys import load_or_create_device_identity
from triage_app.escalation.service import open_escalation
from triage_app.escalation.uploader import Attempt, Uploader
from triage_app.results import InputOutcome
from triage_app.states import CaseState
from triage_app.store import CaseStore


@dataclass(frozen=True)
class DemoRun:
    """What the demo did: every outcome, what was delivered, and the verdicts that came back."""

    outcomes: list[InputOutcome]
    attempts: list[Attempt]
    verdicts: dict[str, dict[str, object]]  # case_id -> central verdict
    states: dict[str, str]  # case_id -> state in the case store at the end
    server_url: str
    central_model: str | None


def run_demo(data_dir: Path, *, verdict_wait_s: float = 60.0) -> DemoRun:
    """The whole product on the bundled images, with a throwaway central server on loopback.

    Everything real: a self-signed certificate pinned by the device, the device registered with
    the server, envelopes through the outbox, uploads over TLS, verdicts from the central model.
    """
    from triage_app.central.certificates import make_self_signed
    from triage_app.central.config import CentralConfig
    from triage_app.central.server import ServerThread
    from triage_app.cli_central import default_central_model

    images, _ = demo_images()
    central_dir = data_dir / "central-server"
    certificate = make_self_signed(central_dir / "tls")
    model_dir = default_central_model()
    config = CentralConfig(
        data_dir=central_dir,
        port=0,
        tls_cert=certificate.cert,
        tls_key=certificate.key,
        model_dir=model_dir,
    )
    with ServerThread(config) as server:
        url = server.url
        device = load_or_create_device_identity(data_dir)
        server.store.registry.add_device(device.public_key_b64(), "demo device")
        settings = Settings(
            {
                "paths.data_dir": data_dir,
                "escalation.central_url": url,
                "escalation.tls_pin": certificate.sha256,
            }
        )
        link = open_escalation(settings)
        assert link is not None  # a central URL is configured just above
        with link:
            outcomes = list(triage_and_record(images, settings, queue=link.queue))
            with link.uploader() as uploader:
                attempts = uploader.drain()
                wait_s = verdict_wait_s if model_dir is not None else 0.0
                verdicts = _wait_for_verdicts(uploader, settings, wait_s)
    with CaseStore.open(settings.case_store_path) as store:
        states = {case.case_id: case.state.value for case in store.list_cases()}
    model = model_dir.name if model_dir else None
    return DemoRun(outcomes, attempts, verdicts, states, url, model)


def _wait_for_verdicts(
    uploader: Uploader, settings: Settings, wait_s: float
) -> dict[str, dict[str, object]]:
    deadline = time.monotonic() + wait_s
    while True:
        uploader.poll_verdicts()
        with CaseStore.open(settings.case_store_path) as store:
            waiting = store.list_cases(state=CaseState.DELIVERED)
            if not waiting or time.monotonic() >= deadline:
                received = store.list_cases(state=CaseState.VERDICT_RECEIVED)
                return {c.case_id: c.verdict for c in received if c.verdict is not None}
        time.sleep(0.2)
