"""``batch``: recording a queued case when another process has moved it on already, and
recording a refused file once."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tests.escalation.conftest import (
    Device,
    device_identity,
    link_for,
    start_central_server,
    triage,
)
from triage_app.batch import record_queued, triage_and_record
from triage_app.central.certificates import make_self_signed
from triage_app.config import Settings
from triage_app.states import CaseEvent, CaseState
from triage_app.store import CaseStore


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
