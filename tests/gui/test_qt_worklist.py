"""The worklist's table model and store poller: only the rows that changed reach the UI."""

from __future__ import annotations

from pathlib import Path

import pytest
from PySide6.QtCore import Qt
from pytestqt.qtbot import QtBot

from tests.helpers import make_result
from triage_app.errors import ConfigError
from triage_app.gui.qt_worklist import Column, QtWorklist, StorePoller, WorklistTableModel
from triage_app.states import CaseEvent, CaseState
from triage_app.store import CaseStore, StoredCase
from triage_app.worklist import UNKNOWN_PATIENT, WorklistRow, WorklistSource, row_for


def _row(
    case_id: str,
    state: CaseState = CaseState.LOCAL_NORMAL,
    *,
    reason: str = "confident_normal",
    findings: tuple[str, ...] = (),
) -> WorklistRow:
    case = StoredCase(
        case_id=case_id,
        state=state,
        decision="escalate" if reason == "out_of_scope" else "normal",
        reason=reason,
        score=0.05,
        model_name="m",
        model_version="1",
        model_sha256="0" * 64,
        created_at="2026-01-01T10:00:00.000+00:00",
        updated_at="2026-01-01T10:00:00.000+00:00",
        result={
            "path": "",
            "image": {"modality": "DX"},
            "reason": reason,
            "scope": {"in_scope": not findings, "findings": list(findings)},
        },
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
    poller.rows_changed.connect(lambda polled: sent.append(polled.rows))
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


def test_adjacent_changed_rows_are_announced_as_one_block(qtbot: QtBot) -> None:
    """One signal per block: PySide6 6.12 loses a reference to True at every emit."""
    model = WorklistTableModel()
    model.update_rows([_row(name) for name in "abcde"])
    changed: list[tuple[int, int]] = []
    model.dataChanged.connect(lambda top, bottom: changed.append((top.row(), bottom.row())))
    acknowledged = CaseState.ACKNOWLEDGED
    model.update_rows([_row(name, acknowledged) for name in "dbce"] + [_row("f")])
    assert changed == [(1, 4)]
    assert [model.row_at(i).state for i in range(5)] == [CaseState.LOCAL_NORMAL] + [
        acknowledged
    ] * 4
    changed.clear()
    model.update_rows([_row("a"), _row("c"), _row("f", acknowledged)])
    assert changed == [(0, 0), (2, 2), (5, 5)]


def test_the_worklist_says_it_is_loading_until_the_first_read(qtbot: QtBot, tmp_path: Path) -> None:
    """ "0 of 0 cases" for the quarter of a minute a large store took read like an empty one."""
    worklist = QtWorklist(tmp_path / "cases.sqlite3")
    qtbot.addWidget(worklist)
    try:
        assert worklist.loading and worklist.count.text() == "Loading cases…"
        worklist.search.setText("x")  # a search does not pretend to have counted
        assert worklist.count.text() == "Loading cases…"
        qtbot.waitUntil(lambda: not worklist.loading)
        assert worklist.count.text() == "0 of 0 cases"
    finally:
        worklist.stop()


@pytest.mark.expect_log_warnings  # the failed read is logged, once
def test_an_unexpected_error_in_a_poll_is_shown_and_polling_goes_on(
    qtbot: QtBot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception other than StoreError left the poller busy for good: no update ever again."""
    db = tmp_path / "cases.sqlite3"
    with CaseStore.open(db) as store:
        store.record_result(make_result("c1", path=""), CaseEvent.DECIDE_LOCAL_NORMAL)
    failures = iter([ValueError("header value"), ValueError("header value")])
    real = WorklistSource.changed_rows

    def flaky(source: WorklistSource) -> list[WorklistRow]:
        error = next(failures, None)
        if error is not None:
            raise error
        return real(source)

    monkeypatch.setattr(WorklistSource, "changed_rows", flaky)
    worklist = QtWorklist(db)
    qtbot.addWidget(worklist)
    try:
        qtbot.waitUntil(lambda: worklist.problem.isVisibleTo(worklist))
        assert worklist.problem.text() == "Worklist not updated: unexpected ValueError. Retrying…"
        qtbot.waitUntil(lambda: worklist.model.rowCount() == 1, timeout=5_000)
        assert not worklist.problem.isVisibleTo(worklist)
        assert worklist.count.text() == "1 of 1 cases"
    finally:
        worklist.stop()
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    (logged,) = [r.getMessage() for r in errors]  # once, though it failed twice
    assert logged.startswith("worklist: unexpected ValueError (test_qt_worklist.py:")
    assert logged.endswith(" in flaky)")
    assert "header value" not in caplog.text


@pytest.mark.expect_log_warnings  # the failed read is logged
def test_a_case_store_this_user_may_not_use_is_shown_with_its_fix(
    qtbot: QtBot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store left to root is a ConfigError naming the fix (``CaseStore.open``); the worklist
    said "unexpected ConfigError" instead, as for a bug."""
    db = tmp_path / "cases.sqlite3"
    fix = f"paths.case_store: cannot use {db}: owned by root: chown -R alice: {tmp_path}"

    def refused(source: WorklistSource) -> list[WorklistRow]:
        raise ConfigError(fix)

    monkeypatch.setattr(WorklistSource, "changed_rows", refused)
    worklist = QtWorklist(db)
    qtbot.addWidget(worklist)
    try:
        qtbot.waitUntil(lambda: worklist.problem.isVisibleTo(worklist))
        assert worklist.problem.text() == f"Worklist not updated: {fix}. Retrying…"
    finally:
        worklist.stop()


def test_the_decision_tooltip_says_what_put_an_image_out_of_scope(qtbot: QtBot) -> None:
    model = WorklistTableModel()
    rows = [
        _row("m", CaseState.ESCALATION_HELD, reason="out_of_scope", findings=("looks_mirrored",)),
        _row("n"),
    ]
    model.update_rows(rows)
    column = int(Column.DECISION)
    mirrored = model.data(model.index(0, column), Qt.ItemDataRole.ToolTipRole)
    assert "out of scope" in mirrored
    assert "image looks left-right mirrored" in mirrored
    normal = model.data(model.index(1, column), Qt.ItemDataRole.ToolTipRole)
    assert normal.endswith("confident normal")
