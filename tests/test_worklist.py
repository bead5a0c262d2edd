"""Worklist rows: urgency order, escalation labels, patient details from the file header."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import phantom_dataset, write_phantoms
from triage_app.batch import triage_and_record
from triage_app.config import Settings
from triage_app.states import CaseEvent, CaseState
from triage_app.store import CaseStore, StoredCase
from triage_app.worklist import (
    UNKNOWN_PATIENT,
    PatientLabel,
    Urgency,
    WorklistSource,
    read_patient,
    row_for,
    sort_rows,
    urgency_of,
)


def _case(case_id: str, decision: str, score: float, **extra: Any) -> StoredCase:
    fields: dict[str, Any] = {
        "case_id": case_id,
        "state": CaseState.LOCAL_NORMAL,
        "decision": decision,
        "reason": "r",
        "score": score,
        "model_name": "m",
        "model_version": "1",
        "model_sha256": "0" * 64,
        "created_at": "2026-01-01T10:00:00.000+00:00",
        "updated_at": "2026-01-01T10:00:00.000+00:00",
        "result": {"path": "/nowhere.dcm", "image": {"modality": "DX"}},
    }
    fields.update(extra)
    return StoredCase(**fields)


@pytest.mark.parametrize(
    ("decision", "score", "verdict", "expected"),
    [
        ("abnormal", 0.999, None, Urgency.ABNORMAL),
        ("normal", 0.01, None, Urgency.NORMAL),
        ("escalate", 0.4, None, Urgency.ESCALATED),
        ("escalate", 0.4, "abnormal", Urgency.CENTRE_DISAGREES),
        ("escalate", 0.7, "normal", Urgency.CENTRE_DISAGREES),
        ("escalate", 0.7, "abnormal", Urgency.ABNORMAL),
        ("escalate", 0.3, "normal", Urgency.NORMAL),
    ],
)
def test_urgency(decision: str, score: float, verdict: str | None, expected: Urgency) -> None:
    assert urgency_of(decision, score, verdict) is expected


def test_rows_sort_urgent_first_then_newest() -> None:
    older = "2026-01-01T09:00:00.000+00:00"
    rows = [
        row_for(_case("n", "normal", 0.01), UNKNOWN_PATIENT),
        row_for(_case("a-old", "abnormal", 0.99, created_at=older), UNKNOWN_PATIENT),
        row_for(_case("a-new", "abnormal", 0.99), UNKNOWN_PATIENT),
        row_for(
            _case(
                "d",
                "escalate",
                0.4,
                state=CaseState.VERDICT_RECEIVED,
                verdict={"verdict": "abnormal", "score": 0.9},
            ),
            UNKNOWN_PATIENT,
        ),
        row_for(_case("e", "escalate", 0.4, state=CaseState.QUEUED), UNKNOWN_PATIENT),
    ]
    assert [r.case_id for r in sort_rows(rows)] == ["d", "a-new", "a-old", "e", "n"]
    by_id = {r.case_id: r for r in rows}
    assert by_id["d"].escalation == "verdict received" and by_id["d"].centre_disagrees
    assert by_id["d"].verdict_score == 0.9
    assert by_id["e"].escalation == "queued"
    assert by_id["n"].escalation == "local"
    assert by_id["n"].received_at == datetime(2026, 1, 1, 10, tzinfo=UTC)
    assert by_id["n"].modality == "DX"


def test_a_verdict_error_is_kept() -> None:
    error = {"verdict": None, "error": {"code": "not_dicom", "message": "m"}}
    row = row_for(_case("x", "escalate", 0.5, verdict=error), UNKNOWN_PATIENT)
    assert row.verdict is None and row.verdict_error == "not_dicom"
    assert row.urgency is Urgency.ESCALATED


def test_patient_details_come_from_the_file(tmp_path: Path) -> None:
    ds = phantom_dataset(5, 3)
    path = tmp_path / "one.dcm"
    ds.save_as(path, enforce_file_format=True)
    label = read_patient(str(path))
    family, given = str(ds.PatientName).split("^")[:2]
    assert label == PatientLabel(f"{family}, {given}", str(ds.PatientID))
    assert read_patient(str(tmp_path / "moved.dcm")) == UNKNOWN_PATIENT
    assert read_patient("") == UNKNOWN_PATIENT


def test_source_reads_the_store(tmp_path: Path) -> None:
    settings = Settings({"paths.data_dir": tmp_path / "data", "processing.workers": 1})
    write_phantoms(tmp_path / "in", 70, 4)
    outcomes = list(triage_and_record(sorted((tmp_path / "in").iterdir()), settings))
    source = WorklistSource(settings.case_store_path)
    try:
        rows = source.rows()
        assert {r.case_id for r in rows} == {o.case_id for o in outcomes if o.ok}  # type: ignore[union-attr]
        assert all(r.patient.patient_id.startswith("MRN") for r in rows)
        with CaseStore.open(settings.case_store_path) as store:
            escalated = [r for r in rows if r.decision == "escalate"]
            assert escalated
            store.apply(escalated[0].case_id, CaseEvent.ENQUEUE)
        again = {r.case_id: r for r in source.rows()}
        assert again[escalated[0].case_id].escalation == "queued"
    finally:
        source.close()
