"""CentralStore: exactly-once by case id, durable files before the row, verdicts, reopening."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.central.conftest import TestCase, make_case, new_device, seal_case
from triage_app.central.errors import CaseConflictError, ReplayedEnvelopeError
from triage_app.central.storage import (
    DICOM_FILE,
    RESULT_FILE,
    SIGNED_HEADER_FILE,
    CentralStore,
    Verdict,
    VerdictFailure,
)
from triage_app.errors import StoreError
from triage_app.escalation.envelope import (
    EnvelopeHeader,
    OpenedEnvelope,
    Payload,
    open_envelope,
)
from triage_app.escalation.keys import DeviceIdentity, ServerKeyRing
from triage_app.results import ModelRef

MODEL = ModelRef("central-test", "1.0", "ab" * 32)


def open_store(folder: Path) -> CentralStore:
    return CentralStore.open(folder / "central.sqlite3", folder / "cases")


@pytest.fixture
def ring(tmp_path: Path) -> ServerKeyRing:
    return ServerKeyRing.load_or_create(tmp_path / "central")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CentralStore]:
    with open_store(tmp_path) as opened:
        yield opened


@pytest.fixture
def device(store: CentralStore) -> DeviceIdentity:
    device = new_device()
    store.registry.add_device(device.public_key_b64())
    return device


def sealed(ring: ServerKeyRing, case: TestCase, device: DeviceIdentity) -> OpenedEnvelope:
    body = seal_case(case, device, ring.active)
    return open_envelope(body, device_public_key=device.public_key(), server_keys=ring.private_keys)


def verdict_for(case_id: str, label: str = "normal") -> Verdict:
    return Verdict(
        case_id, label, 0.25, {"normal": 0.75, "abnormal": 0.25}, MODEL, "2026-01-01T00:00:00Z"
    )


def test_a_case_is_stored_once_and_repeats_are_counted(
    store: CentralStore, ring: ServerKeyRing, device: DeviceIdentity
) -> None:
    case = make_case(40)
    opened = sealed(ring, case, device)
    header = opened.header
    resealed_envelope = sealed(ring, case, device)  # sealed again: new envelope id

    first, is_first = store.accept(opened)
    again, again_first = store.accept(opened)
    resealed, resealed_first = store.accept(resealed_envelope)

    assert (is_first, again_first, resealed_first) == (True, False, False)
    assert [first.deliveries, again.deliveries, resealed.deliveries] == [1, 2, 3]
    assert first.envelope_id == again.envelope_id == resealed.envelope_id == header.envelope_id
    assert first.received_at == resealed.received_at
    [stored] = store.cases()
    assert stored.deliveries == 3 and stored.payload_bytes == header.payload_bytes
    assert (store.case_dir(case.case_id) / DICOM_FILE).read_bytes() == case.payload.dicom


def test_conflicts_and_replays_are_refused_without_a_trace(
    store: CentralStore,
    ring: ServerKeyRing,
    device: DeviceIdentity,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    other = new_device()
    store.registry.add_device(other.public_key_b64())
    case, second = make_case(41), make_case(42)
    opened = sealed(ring, case, device)
    store.accept(opened)

    with pytest.raises(CaseConflictError, match="another device"):
        store.accept(sealed(ring, case, other))
    changed = TestCase(case.case_id, Payload(b"{}", case.payload.dicom))
    with pytest.raises(CaseConflictError, match="another payload"):
        store.accept(sealed(ring, changed, device))
    replay = sealed(ring, second, device)
    replay_header = EnvelopeHeader(
        **{**vars(replay.header), "envelope_id": opened.header.envelope_id}
    )
    with pytest.raises(ReplayedEnvelopeError):
        store.accept(dataclasses.replace(replay, header=replay_header))

    assert [c.case_id for c in store.cases()] == [case.case_id]
    assert store.cases()[0].deliveries == 1
    assert (store.case_dir(case.case_id) / RESULT_FILE).read_bytes() == case.payload.result_json
    assert not store.case_dir(second.case_id).exists()


def test_staged_files_take_their_place_only_with_the_row(
    store: CentralStore, ring: ServerKeyRing, device: DeviceIdentity
) -> None:
    opened, other = sealed(ring, make_case(47), device), sealed(ring, make_case(48), device)
    payload = (opened.result_json, opened.dicom)
    folder = store.case_dir(opened.header.case_id)

    with store.stage(opened.header.case_id, opened.signed_header, payload) as staged:
        assert staged is not None
        assert folder.is_dir()
        names = sorted(path.name for path in folder.iterdir())
        assert len(names) == 3 and all(name.endswith(".tmp") for name in names)
    assert not folder.exists()  # not put in place (say the payload hash was wrong): gone

    with store.stage(opened.header.case_id, opened.signed_header, payload) as staged:
        assert store.accept(opened, staged)[1] is True
    assert sorted(path.name for path in folder.iterdir()) == sorted(
        [DICOM_FILE, RESULT_FILE, SIGNED_HEADER_FILE]
    )
    assert (folder / DICOM_FILE).read_bytes() == opened.dicom
    assert (folder / SIGNED_HEADER_FILE).read_bytes() == opened.signed_header

    # A repeat delivery writes nothing; neither does a payload of impossible structure.
    with store.stage(opened.header.case_id, opened.signed_header, payload) as staged:
        assert staged is None
        assert store.accept(opened, staged)[1] is False
    with store.stage(other.header.case_id, other.signed_header, None) as staged:
        assert staged is None
    assert not store.case_dir(other.header.case_id).exists()


@pytest.mark.expect_log_warnings
def test_a_file_that_cannot_be_written_leaves_no_row(
    store: CentralStore, ring: ServerKeyRing, device: DeviceIdentity
) -> None:
    case = make_case(43)
    opened = sealed(ring, case, device)
    store.case_dir(case.case_id).write_bytes(b"")

    with pytest.raises(StoreError):
        store.accept(opened)

    assert store.count() == 0
    store.case_dir(case.case_id).unlink()
    assert store.accept(opened)[1] is True


def test_everything_survives_reopening(
    tmp_path: Path, ring: ServerKeyRing, device: DeviceIdentity, store: CentralStore
) -> None:
    decided, failed, waiting = make_case(44), make_case(45), make_case(46)
    for case in (decided, failed, waiting):
        store.accept(sealed(ring, case, device))
    store.set_verdict(verdict_for(decided.case_id))
    failure = VerdictFailure(failed.case_id, "not_dicom", "not DICOM", "2026-01-01T00:00:00Z")
    store.set_verdict_failure(failure)
    store.close()

    with open_store(tmp_path) as reopened:
        assert reopened.count() == 3
        assert reopened.without_verdict() == [waiting.case_id]
        assert reopened.get_verdict(decided.case_id) == verdict_for(decided.case_id)
        assert reopened.get_verdict_failure(failed.case_id) == failure
        listed = {c.case_id: c.to_json() for c in reopened.cases()}
        assert set(listed[decided.case_id]) >= {
            "case_id",
            "device_id",
            "payload_sha256",
            "received_at",
            "deliveries",
            "verdict",
            "score",
            "model",
            "decided_at",
        }
        assert listed[decided.case_id]["verdict"] == "normal"
        assert listed[decided.case_id]["model"] == MODEL.to_json()
        assert listed[waiting.case_id]["verdict"] is None
        assert reopened.read_dicom(waiting.case_id) == waiting.payload.dicom
    # Re-opening a store that is already open elsewhere works too (WAL, shared file).
    with open_store(tmp_path) as again, open_store(tmp_path) as twice:
        assert again.count() == twice.count() == 3


@pytest.mark.parametrize("bad", ["../../etc", "A" * 64, "0" * 63, ""])
def test_case_folders_are_only_for_case_ids(store: CentralStore, bad: str) -> None:
    with pytest.raises(StoreError):
        store.case_dir(bad)


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    open_store(tmp_path).close()
    with sqlite3.connect(tmp_path / "central.sqlite3") as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        open_store(tmp_path)


def test_the_database_is_private_and_in_wal_mode(tmp_path: Path, store: CentralStore) -> None:
    assert (tmp_path / "central.sqlite3").stat().st_mode & 0o077 == 0
    with sqlite3.connect(tmp_path / "central.sqlite3") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
