"""The worklist's table model and store poller: only the rows that changed reach the UI."""

from __future__ import annotations

from pathlib import Path

from pytestqt.qtbot import QtBot

from tests.helpers import make_result
from triage_app.gui.qt_worklist import StorePoller, WorklistTableModel
from triage_app.states import CaseEvent, CaseState
from triage_app.store import CaseStore, StoredCase
from triage_app.worklist import UNKNOWN_PATIENT, WorklistRow, row_for


def _row(case_id: str, state: CaseState = CaseState.LOCAL_NORMAL) -> WorklistRow:
    case = StoredCase(
        case_id=case_id,
        state=state,
        decision="normal",
        reason="confident_normal",
        score=0.05,
        model_name="m",
        model_version="1",
        model_sha256="0" * 64,
        created_at="2026-01-01T10:00:00.000+00:00",
        updated_at="2026-01-01T10:00:00.000+00:00",
        result={"path": "", "image": {"modality": "DX"}},
    )
    return row_for(case, UNKNOWN_PATIENT)


def test_update_adds_new_rows_and_replaces_changed_ones_in_place(qtbot: QtBot) -> None:
    model = WorklistTableModel()
    assert model.update_rows([_row("a"), _row("b")]) == 2
    changed: list[tuple[int, int]] = []
    inserted: list[tuple[int, int]] = []
    model.dataChanged.connect(lambda top, bottom: changed.append((top.row(), bottom.row())))
    model.rowsInserted.connect(lambda _parent, first, last: inserted.append((first, last)))

    acknowledged = _row("b", CaseState.ACKNOWLEDGED)
    assert model.update_rows([acknowledged, _row("c")]) == 2

    assert [model.row_at(i).case_id for i in range(model.rowCount())] == ["a", "b", "c"]
    assert model.row_at(1) == acknowledged
    assert model.row_for("b") == 1 and model.row_for("c") == 2
    assert (changed, inserted) == ([(1, 1)], [(2, 2)])
    assert model.update_rows([]) == 0
    assert (changed, inserted) == ([(1, 1)], [(2, 2)])


def test_the_poller_sends_every_row_first_then_only_the_changed_ones(
    qtbot: QtBot, tmp_path: Path
) -> None:
    db = tmp_path / "cases.sqlite3"
    with CaseStore.open(db) as store:
        for case_id in ("c1", "c2"):
            escalated = make_result(case_id, decision="escalate", reason="uncertain", path="")
            store.record_result(escalated, CaseEvent.HOLD)
    sent: list[list[WorklistRow]] = []
    poller = StorePoller(db)
    poller.rows_changed.connect(sent.append)
    try:
        poller.poll()
        poller.poll()
        with CaseStore.open(db) as store:
            store.apply("c2", CaseEvent.ENQUEUE)
        poller.poll()
    finally:
        poller.close()

    assert [[(r.case_id, r.state) for r in rows] for rows in sent] == [
        [("c1", CaseState.ESCALATION_HELD), ("c2", CaseState.ESCALATION_HELD)],
        [],
        [("c2", CaseState.QUEUED)],
    ]
