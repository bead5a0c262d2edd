"""``batch``: recording a queued case when another process has moved it on already, keeping
a case held when the outbox cannot take it, and recording a refused file once."""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from tests.escalation.conftest import (
    Central,
    Device,
    device_identity,
    link_for,
    start_central_server,
    triage,
    write_identified_phantoms,
)
from tests.helpers import make_result
from tests.other_process import acknowledge_in_another_process, light_queue
from triage_app.batch import record_outcome, record_queued, triage_and_record
from triage_app.central.certificates import make_self_signed
from triage_app.config import Settings
from triage_app.escalation.outbox import OutboxItem, Precondition
from triage_app.escalation.queueing import EscalationQueue
from triage_app.held_release import lazy_triage, release_held
from triage_app.results import HELD, CaseResult, EscalationRef
from triage_app.states import CaseEvent, CaseState
from triage_app.store import CaseStore

ROOT = Path(__file__).resolve().parents[1]


def test_a_case_the_uploader_recorded_first_is_left_where_it_is(tmp_path: Path) -> None:
    central = start_central_server(tmp_path / "central", make_self_signed(tmp_path / "tls"))
    try:
        device = Device(tmp_path / "device", device_identity(tmp_path / "device"))
        settings = device.settings(central)
        with link_for(settings) as link:
            (case,) = triage(settings, tmp_path / "scans", (0,), queue=link.queue)
            item = link.outbox.get(case.case_id)
            assert item is not None
            with CaseStore.open(settings.case_store_path) as store:
                # As the uploader does when it claims the envelope before the store has it.
                store.apply(case.case_id, CaseEvent.START_SEND, "attempt 1")
                record_queued(store, item)  # no IllegalTransitionError for the caller
                stored = store.get(case.case_id)
                events = [t.event for t in store.history(case.case_id)]
    finally:
        central.thread.stop()
    assert stored is not None and stored.state is CaseState.SENDING
    assert events.count(CaseEvent.ENQUEUE) == 1


def test_a_refused_file_is_recorded_once_until_its_bytes_change(tmp_path: Path) -> None:
    settings = Settings({"paths.data_dir": tmp_path / "data", "processing.workers": 1})
    notes = tmp_path / "scans" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("not an image\n", encoding="utf-8")

    first = notes.read_bytes()
    outcomes = [*triage_and_record([notes], settings)]  # e.g. `triage-app classify scans/`
    outcomes += triage_and_record([notes], settings)  # ... run again
    notes.write_text("other notes, still not an image\n", encoding="utf-8")
    outcomes += triage_and_record([notes], settings)

    assert [(o.ok, getattr(o, "code", None)) for o in outcomes] == [(False, "not_dicom")] * 3
    with CaseStore.open(settings.case_store_path) as store:
        failures = store.failures()
    assert [(f.path, f.code) for f in failures] == [(str(notes), "not_dicom")] * 2
    assert [f.input_sha256 for f in failures] == [
        hashlib.sha256(first).hexdigest(),
        hashlib.sha256(notes.read_bytes()).hexdigest(),
    ]


@contextmanager
def files_cannot_grow_beyond(limit_bytes: int) -> Iterator[None]:
    """Writes past ``limit_bytes`` of any file fail (EFBIG, "File too large"), as writes on a
    full disk fail with ENOSPC: the same write of the spool file, refused by the system."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.mark.expect_log_warnings  # the ALARMs
def test_a_case_the_disk_cannot_take_stays_held_the_batch_goes_on_and_it_is_released_later(
    central: Central, device: Device, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = device.settings(central)  # far below its byte quota
    paths = [path for path, _ in write_identified_phantoms(tmp_path / "scans", (0, 2))]
    with link_for(settings) as link:
        queue = link.queue
        assert queue is not None
        # The case store's log starts empty, so only the envelopes (over 250 kB) hit the limit.
        conn = sqlite3.connect(settings.case_store_path)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
        with files_cannot_grow_beyond(192 * 1024):
            outcomes = list(triage_and_record(paths, settings, queue=queue))
        assert link.outbox.items() == []

    assert len(outcomes) == 2, "the batch went on after the first case"
    for outcome in outcomes:
        assert isinstance(outcome, CaseResult) and outcome.escalation is not None
        assert outcome.escalation.state == "held"
        assert "File too large: held on this device" in (outcome.escalation.detail or "")
    alarms = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.ERROR and r.getMessage().startswith("ALARM: ")
    ]
    assert len(alarms) == 2 and all("stays held on this device" in a for a in alarms)
    with CaseStore.open(settings.case_store_path) as store:
        held = store.case_ids(CaseState.ESCALATION_HELD)
        assert sorted(held) == sorted(o.case_id for o in outcomes if isinstance(o, CaseResult))

        # Room again (here: the limit lifted): a release queues them, as the services do.
        with link_for(settings) as link:
            queue = link.queue
            assert queue is not None
            report = release_held(store, queue, lazy_triage(settings))
            assert sorted(i.case_id for i in link.outbox.items()) == sorted(held)
        assert (report.released, report.still_held) == (2, 0)
        assert store.case_ids(CaseState.QUEUED) == held


# --- a clinician closes a held case between its record and its enqueue --------------------------


@dataclass(frozen=True)
class AcknowledgeFirstQueue(EscalationQueue):
    """A queue before which, every time, the clinician records "do not send" in another
    process: the window between ``record_result`` and the outbox's transaction."""

    db_path: Path = Path()

    def enqueue(
        self,
        case_id: str,
        payload: bytes,
        *,
        reason: str,
        precondition: Precondition | None = None,
    ) -> OutboxItem:
        assert acknowledge_in_another_process(self.db_path, case_id) == "acknowledged"
        return super().enqueue(case_id, payload, reason=reason, precondition=precondition)


def test_a_case_closed_between_its_record_and_its_enqueue_is_never_sent(tmp_path: Path) -> None:
    db = tmp_path / "data" / "cases.sqlite3"
    case_id = "ab" * 32
    result = replace(
        make_result(case_id, decision="escalate", reason="uncertain"),
        escalation=EscalationRef(state=HELD),
        payload=b"de-identified payload",
    )
    with CaseStore.open(db) as store, light_queue(db) as plain:
        queue = AcknowledgeFirstQueue(plain.outbox, plain.device, plain.server_key, db_path=db)

        recorded = record_outcome(store, result, queue=queue)

        assert isinstance(recorded, CaseResult) and recorded.escalation is not None
        assert recorded.escalation.state == HELD
        assert (recorded.escalation.detail or "").startswith("not sent: ")
        case = store.get(case_id)
        assert case is not None and case.state is CaseState.ACKNOWLEDGED
        assert plain.outbox.get(case_id) is None
        assert plain.outbox.claim_next("uploader", 60) is None


# --- worker processes log as their parent does ----------------------------------------------------

_TRIAGE_WITH_JSON_LOGS = """
import logging, sys
from pathlib import Path
from triage_app.batch import TriagePool, triage_files
from triage_app.config import Settings
from triage_app.logs import configure_logging
from triage_app.pipeline import PipelineConfig
configure_logging(logging.INFO, json_lines=True)
config = PipelineConfig.from_settings(Settings({"paths.data_dir": Path(sys.argv[1])}))
files = [Path(p) for p in sys.argv[2:]]
assert all(o.ok for o in triage_files(files, config, workers=2))
pool = TriagePool(config, workers=1)
assert pool.submit(files[0]).result(timeout=120).ok
pool.close()
"""


def test_worker_processes_log_json_lines_when_their_parent_does(tmp_path: Path) -> None:
    images = sorted((ROOT / "triage_app" / "demo_data" / "images").glob("*.dcm"))[:2]
    run = subprocess.run(
        [sys.executable, "-c", _TRIAGE_WITH_JSON_LOGS, str(tmp_path / "data"), *map(str, images)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stderr.splitlines()
    records = [json.loads(line) for line in lines]  # every line, the workers' too, is JSON
    loads = [r for r in records if r["logger"] == "triage_app.model.classifier"]
    assert len(loads) >= 3, lines  # two triage_files workers and one TriagePool worker
