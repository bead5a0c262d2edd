"""Worklist rows: urgency order, escalation labels, patient details from the file header."""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import make_result, phantom_dataset, write_phantoms
from triage_app import worklist as worklist_module
from triage_app.batch import triage_and_record
from triage_app.config import Settings
from triage_app.results import CaseResult
from triage_app.states import CaseEvent, CaseState, Feedback
from triage_app.store import CaseStore, StoredCase
from triage_app.worklist import (
    UNKNOWN_PATIENT,
    PatientLabel,
    Urgency,
    WorklistRow,
    WorklistSource,
    feedback_allowed,
    feedback_refusal,
    read_patient,
    row_for,
    sort_rows,
    urgency_of,
    verdict_parts,
    verdict_summary,
)

E = CaseEvent


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


# --- polling only the changes ---------------------------------------------------------------


def _full_read(db: Path) -> list[WorklistRow]:
    """Every case read and sorted from scratch, as the worklist did before it read changes."""
    with CaseStore.open(db) as store:
        return sort_rows(
            row_for(case, read_patient(str(case.result.get("path", ""))))
            for case in store.list_cases()
        )


def _escalated(case_id: str, score: float = 0.4, path: str = "/gone.dcm") -> CaseResult:
    return make_result(case_id, decision="escalate", reason="uncertain", score=score, path=path)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "data" / "cases.sqlite3"


@pytest.fixture
def source(db: Path):
    polled = WorklistSource(db)
    yield polled
    polled.close()


@pytest.fixture
def patient_reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How often the worklist reads each file's patient details."""
    reads: Counter[str] = Counter()

    def counted(path: str) -> PatientLabel:
        reads[path] += 1
        return read_patient(path)

    monkeypatch.setattr(worklist_module, "read_patient", counted)
    return reads


def test_polled_rows_are_those_of_a_full_read_after_every_kind_of_write(
    tmp_path: Path, db: Path, source: WorklistSource, patient_reads: Counter[str]
) -> None:
    write_phantoms(tmp_path / "in", 70, 3)
    files = [str(f) for f in sorted((tmp_path / "in").iterdir())]
    with CaseStore.open(db) as store:
        store.record_result(make_result("normal", path=files[0]), E.DECIDE_LOCAL_NORMAL)
        store.record_result(
            make_result("abnormal", decision="abnormal", score=0.97, path=files[1]),
            E.DECIDE_LOCAL_ABNORMAL,
        )
        store.record_result(_escalated("sent", path=files[2]), E.ENQUEUE)
        store.record_result(_escalated("held"), E.HOLD)
        first = source.rows()
        assert first == _full_read(db)  # the first poll reads every case
        assert all(row.patient.patient_id for row in first if row.path in files)

        store.apply("sent", E.START_SEND)
        store.apply("sent", E.DELIVER)
        store.apply("held", E.ENQUEUE)
        assert source.rows() == _full_read(db)

        store.record_verdict("sent", {"verdict": "abnormal", "score": 0.8})  # disagrees
        rows = source.rows()
        assert rows == _full_read(db)
        assert (rows[0].case_id, rows[0].urgency) == ("sent", Urgency.CENTRE_DISAGREES)

        store.record_feedback("normal", "dr.grey", Feedback.ACCEPT)
        store.record_feedback("sent", "dr.grey", Feedback.REJECT)  # its place moved just now
        assert source.rows() == _full_read(db)

        store.record_result(_escalated("new", score=0.6), E.ENQUEUE)
        store.record_result(make_result("abnormal", path=files[0]), E.DECIDE_LOCAL_NORMAL)
        rows = source.rows()
        assert rows == _full_read(db)
        assert len(rows) == 5

    assert patient_reads == Counter({files[0]: 1, files[1]: 1, files[2]: 1, "/gone.dcm": 1})


def test_a_poll_without_changes_reads_no_case(
    db: Path, source: WorklistSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    returned: list[tuple[int, int, int]] = []  # (seq asked, cases read, seq returned)
    changed_since = CaseStore.cases_changed_since

    def spy(store: CaseStore, seq: int) -> tuple[list[StoredCase], int]:
        cases, new_seq = changed_since(store, seq)
        returned.append((seq, len(cases), new_seq))
        return cases, new_seq

    monkeypatch.setattr(CaseStore, "cases_changed_since", spy)
    with CaseStore.open(db) as store:
        for i in range(3):
            store.record_result(make_result(f"c{i}"), E.DECIDE_LOCAL_NORMAL)
        everything = source.rows()
        assert len(everything) == 3

        assert source.rows() == everything
        assert source.changed_rows() == []
        (_, _, seq), second, third = returned
        assert second == third == (seq, 0, seq)

        store.apply("c1", E.ACKNOWLEDGE)
        (changed,) = source.changed_rows()
        assert (changed.case_id, changed.state) == ("c1", CaseState.ACKNOWLEDGED)
        assert returned[-1][1] == 1
        assert source.rows() == _full_read(db)


def _deliver_with_verdict(db: str, case_id: str, verdict: str) -> None:
    """What the uploader does once a case is sent, on its own connection."""
    with CaseStore.open(Path(db)) as store:
        store.apply(case_id, E.START_SEND)
        store.apply(case_id, E.DELIVER)
        store.record_verdict(case_id, {"verdict": verdict, "score": 0.5})


def _watch_service_records(db: str) -> None:
    """Another process: the watch service records a case, the uploader delivers another."""
    with CaseStore.open(Path(db)) as store:
        store.record_result(_escalated("from-process"), E.ENQUEUE)
    _deliver_with_verdict(db, "queued-2", "normal")


def test_writes_by_other_connections_threads_and_processes_are_seen_on_the_next_poll(
    db: Path, source: WorklistSource
) -> None:
    with CaseStore.open(db) as store:
        for i in range(3):
            store.record_result(_escalated(f"queued-{i}"), E.ENQUEUE)
    assert len(source.changed_rows()) == 3

    with CaseStore.open(db) as other:
        other.record_result(make_result("from-connection"), E.DECIDE_LOCAL_NORMAL)
    assert [r.case_id for r in source.changed_rows()] == ["from-connection"]

    uploader = threading.Thread(target=_deliver_with_verdict, args=(str(db), "queued-1", "normal"))
    uploader.start()
    uploader.join(timeout=60)
    assert [(r.case_id, r.verdict) for r in source.changed_rows()] == [("queued-1", "normal")]

    child = multiprocessing.get_context("spawn").Process(
        target=_watch_service_records, args=(str(db),)
    )
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0
    changed = {r.case_id: r.state for r in source.changed_rows()}
    assert changed == {
        "from-process": CaseState.QUEUED,
        "queued-2": CaseState.VERDICT_RECEIVED,
    }
    assert source.rows() == _full_read(db)


# --- a large store's first read, malformed headers, reviewed cases -----------------------------


def test_with_a_budget_rows_come_first_and_their_names_follow(
    tmp_path: Path, db: Path, patient_reads: Counter[str]
) -> None:
    """20,000 header reads took 15 s before the first row showed."""
    write_phantoms(tmp_path / "in", 71, 3)
    files = [str(f) for f in sorted((tmp_path / "in").iterdir())]
    with CaseStore.open(db) as store:
        for i, path in enumerate(files):
            store.record_result(make_result(f"c{i}", path=path), E.DECIDE_LOCAL_NORMAL)
    source = WorklistSource(db, name_budget_s=0.0)  # spent before the first header
    try:
        first = source.changed_rows()
        assert [row.case_id for row in first] == ["c0", "c1", "c2"]
        # One header at least per call, however small the budget: the first row's.
        assert [row.patient.pending for row in first] == [False, True, True]
        assert (source.names_pending, patient_reads) == (True, Counter({files[0]: 1}))

        named: list[WorklistRow] = []
        while source.names_pending:
            batch = source.changed_rows()
            assert len(batch) == 1
            named += batch
        assert [row.case_id for row in named] == ["c1", "c2"]  # in the order first returned
        assert not any(row.patient.pending for row in named)
        assert source.changed_rows() == []
        assert source.rows() == _full_read(db)
        assert patient_reads == Counter(dict.fromkeys(files, 1))
    finally:
        source.close()


def test_a_header_pydicom_cannot_decode_shows_the_case_without_a_name(tmp_path: Path) -> None:
    """A PatientID whose length does not fit its VR made pydicom raise and the worklist stop."""
    path = tmp_path / "bad-id.dcm"
    phantom_dataset(5, 4).save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    at = raw.find(b"\x10\x00\x20\x00LO")  # (0010,0020) PatientID, explicit VR little endian
    assert at > 0
    length = int.from_bytes(raw[at + 6 : at + 8], "little")
    path.write_bytes(raw[:at] + b"\x10\x00\x20\x00US\x03\x00abc" + raw[at + 8 + length :])
    assert read_patient(str(path)) == UNKNOWN_PATIENT


def test_a_reviewed_case_is_no_longer_urgent_but_still_disagrees() -> None:
    verdict = {"verdict": "abnormal", "score": 0.9}
    waiting = _case("d", "escalate", 0.4, state=CaseState.VERDICT_RECEIVED, verdict=verdict)
    reviewed = _case("d", "escalate", 0.4, state=CaseState.ACKNOWLEDGED, verdict=verdict)
    assert row_for(waiting, UNKNOWN_PATIENT).urgency is Urgency.CENTRE_DISAGREES
    row = row_for(reviewed, UNKNOWN_PATIENT)
    assert row.urgency is Urgency.REVIEWED and row.urgency.label == "Reviewed"
    assert row.centre_disagrees
    abnormal = _case("a", "abnormal", 0.99, state=CaseState.ACKNOWLEDGED)
    assert row_for(abnormal, UNKNOWN_PATIENT).urgency is Urgency.REVIEWED
    normal = row_for(_case("n", "normal", 0.01), UNKNOWN_PATIENT)
    assert sort_rows([row_for(abnormal, UNKNOWN_PATIENT), normal])[0] is normal


@pytest.mark.parametrize(
    ("state", "allowed", "words"),
    [
        (CaseState.LOCAL_ABNORMAL, True, ""),
        (CaseState.ESCALATION_HELD, True, ""),
        (CaseState.VERDICT_RECEIVED, True, ""),
        (CaseState.QUEUED, False, "on its way to the central server"),
        (CaseState.DELIVERED, False, "has not answered yet"),
        (CaseState.ACKNOWLEDGED, False, "already been recorded"),
    ],
)
def test_feedback_allowed_and_its_refusal_in_words(
    state: CaseState, allowed: bool, words: str
) -> None:
    assert feedback_allowed(state) is allowed
    refusal = feedback_refusal(state)
    assert (refusal == "") is allowed and words in refusal
    assert "event" not in refusal and "_" not in refusal
    every = [feedback_refusal(s) for s in CaseState if not feedback_allowed(s)]
    assert all(every) and not any("_" in text for text in every)


# --- the central column, the verdict in words, out-of-scope scores ------------------------------

#: A verdict as the uploader stores it: the body of ``GET /v1/cases/{id}/verdict``
#: (``triage_app.central.storage.Verdict.to_json``).
CENTRAL_VERDICT = {
    "case_id": "d",
    "verdict": "abnormal",
    "score": 0.981428,
    "model": {"name": "central-dx-demo", "version": "1.1.0", "sha256": "58" * 32},
    "decided_at": "2026-11-22T22:34:50Z",
}
VERDICT_FAILURE = {
    "verdict": None,
    "error": {"code": "unprocessable_image", "message": "image cannot be prepared"},
}


def _escalated_row(
    state: CaseState,
    verdict: dict[str, Any] | None = None,
    *,
    reason: str = "uncertain",
    score: float = 0.138,
) -> WorklistRow:
    case = _case("d", "escalate", score, state=state, reason=reason, verdict=verdict)
    return row_for(case, UNKNOWN_PATIENT)


@pytest.mark.parametrize(
    ("state", "verdict", "text"),
    [
        (CaseState.ESCALATION_HELD, None, "held on device"),
        (CaseState.ESCALATION_BLOCKED, None, "not sent: blocked"),
        (CaseState.QUEUED, None, "◷ queued"),
        (CaseState.SENDING, None, "◷ sending"),
        (CaseState.SEND_FAILED_RETRYING, None, "◷ retrying send"),
        (CaseState.DELIVERED, None, "◷ awaiting centre"),
        (CaseState.QUARANTINED, None, "refused by centre"),
        (CaseState.VERDICT_RECEIVED, CENTRAL_VERDICT, "⚠ abnormal 0.981"),
        (CaseState.ACKNOWLEDGED, CENTRAL_VERDICT, "⚠ abnormal 0.981"),
        (CaseState.VERDICT_RECEIVED, {**CENTRAL_VERDICT, "verdict": "normal"}, "normal 0.981"),
        (
            CaseState.VERDICT_RECEIVED,
            {**CENTRAL_VERDICT, "verdict": "out_of_scope"},
            "out of scope",
        ),
        (CaseState.VERDICT_RECEIVED, VERDICT_FAILURE, "no verdict (unprocessable_image)"),
        (CaseState.ACKNOWLEDGED, None, "not sent"),
    ],
)
def test_one_central_column_says_where_an_escalated_case_stands(
    state: CaseState, verdict: dict[str, Any] | None, text: str
) -> None:
    """Escalation state and verdict were two columns scrolled out of sight at 1280 px, and a
    case awaiting its verdict looked like one answered "out of scope"."""
    row = _escalated_row(state, verdict)
    assert row.central == text
    assert row.central_detail and "_" not in row.central_detail.replace("unprocessable_image", "")


def test_a_local_decision_has_no_central_answer_and_sorts_after_every_escalated_case() -> None:
    local = row_for(_case("n", "normal", 0.01), UNKNOWN_PATIENT)
    assert local.central == "—"
    assert "not sent" in local.central_detail
    waiting = _escalated_row(CaseState.DELIVERED)
    disagrees = _escalated_row(CaseState.VERDICT_RECEIVED, CENTRAL_VERDICT)
    agrees = _escalated_row(CaseState.VERDICT_RECEIVED, {**CENTRAL_VERDICT, "verdict": "normal"})
    held = _escalated_row(CaseState.ESCALATION_HELD)
    rows = [local, held, waiting, agrees, disagrees]
    ordered = sorted(rows, key=lambda r: r.central_sort_key)
    assert ordered == [disagrees, agrees, waiting, held, local]


def test_the_verdict_in_one_line_names_the_central_model_and_when_it_decided() -> None:
    decided = datetime(2026, 11, 22, 22, 34, 50, tzinfo=UTC).astimezone()
    when = decided.strftime("%Y-%m-%d %H:%M:%S")
    assert verdict_summary(CENTRAL_VERDICT) == (
        f"abnormal, score 0.981 · central-dx-demo 1.1.0 · decided {when}"
    )
    assert verdict_parts(CENTRAL_VERDICT) == (
        "abnormal, score 0.981",
        "central-dx-demo 1.1.0",
        when,
    )
    # A verdict stored before the centre named its model, and an out-of-scope label.
    assert verdict_summary({"verdict": "normal", "score": 0.1}) == "normal, score 0.100"
    assert verdict_summary({"verdict": "out_of_scope", "score": 0.8}) == "out of scope"
    assert verdict_summary(VERDICT_FAILURE) == (
        "no verdict: unprocessable_image: image cannot be prepared"
    )
    assert verdict_summary(None) == ""


def test_a_row_carries_the_central_verdict_with_the_device_result() -> None:
    """The viewer's result layer is built from the row's result: it must hold the verdict."""
    row = _escalated_row(CaseState.VERDICT_RECEIVED, CENTRAL_VERDICT)
    assert row.result["central_verdict"] == CENTRAL_VERDICT
    assert row.result["path"] == "/nowhere.dcm"  # the device's record is all there too
    assert "central_verdict" not in _escalated_row(CaseState.DELIVERED).result


def test_an_out_of_scope_score_does_not_apply_and_the_centre_cannot_disagree_with_it() -> None:
    """Its score is the model's output on an image it was not made for ("1.000" on a CT
    slice): it leans nowhere, so a "normal" verdict is routine, not a disagreement."""
    normal = {"verdict": "normal", "score": 0.01}
    ct = _escalated_row(CaseState.VERDICT_RECEIVED, normal, reason="out_of_scope", score=1.0)
    assert not ct.score_applies
    assert ct.urgency is Urgency.NORMAL and not ct.centre_disagrees
    assert ct.central == "normal 0.010"
    abnormal = {"verdict": "abnormal", "score": 0.9}
    low = _escalated_row(CaseState.VERDICT_RECEIVED, abnormal, reason="out_of_scope", score=0.01)
    assert low.urgency is Urgency.ABNORMAL and not low.centre_disagrees
    assert _escalated_row(CaseState.DELIVERED).score_applies
    assert urgency_of("escalate", 1.0, "normal") is Urgency.CENTRE_DISAGREES  # in scope
