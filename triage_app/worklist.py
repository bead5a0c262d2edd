"""The clinician's worklist as plain rows, built from the case store (no Qt).

The desktop app shows one row per case; everything it shows is worked out here, so the Qt model
only displays it and the rules (what is urgent, what a state is called) are tested without a
screen. Patient name and ID come from the original file's header, read locally: they are shown
on this device only and never logged.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import Any

from triage_app.dicom import read_dataset
from triage_app.errors import InputError
from triage_app.policy import ABNORMAL, NORMAL
from triage_app.states import TRANSITIONS, CaseEvent, CaseState
from triage_app.store import CaseStore, StoredCase

__all__ = [
    "ESCALATION_LABELS",
    "PENDING_PATIENT",
    "PatientLabel",
    "Urgency",
    "WorklistRow",
    "WorklistSource",
    "feedback_allowed",
    "feedback_refusal",
    "read_patient",
    "row_for",
    "sort_rows",
]

log = logging.getLogger(__name__)

#: Where a case stands on its way to the central server, in the words the worklist uses.
ESCALATION_LABELS: Mapping[CaseState, str] = {
    CaseState.RECEIVED: "analysing",
    CaseState.ANALYSED: "analysing",
    CaseState.LOCAL_NORMAL: "local",
    CaseState.LOCAL_ABNORMAL: "local",
    CaseState.ESCALATION_HELD: "held on device",
    CaseState.ESCALATION_BLOCKED: "blocked",
    CaseState.QUEUED: "queued",
    CaseState.SENDING: "sending",
    CaseState.SEND_FAILED_RETRYING: "retrying",
    CaseState.DELIVERED: "delivered",
    CaseState.VERDICT_RECEIVED: "verdict received",
    CaseState.QUARANTINED: "quarantined",
    CaseState.ACKNOWLEDGED: "acknowledged",
    CaseState.FAILED: "failed",
}


class Urgency(IntEnum):
    """Worklist order: the lower, the sooner a clinician should look."""

    CENTRE_DISAGREES = 0
    ABNORMAL = 1
    ESCALATED = 2
    NORMAL = 3
    #: A clinician has accepted, rejected or acknowledged the result: nothing is waiting.
    REVIEWED = 4

    @property
    def label(self) -> str:
        return _URGENCY_LABELS[self]


_URGENCY_LABELS = {
    Urgency.CENTRE_DISAGREES: "Centre disagrees",
    Urgency.ABNORMAL: "Abnormal",
    Urgency.ESCALATED: "Uncertain",
    Urgency.NORMAL: "Routine",
    Urgency.REVIEWED: "Reviewed",
}

#: Why the worklist refuses feedback on a case in a given state, as a sentence a clinician
#: reads (the state machine's own message names events and states).
_FEEDBACK_REFUSALS: Mapping[CaseState, str] = {
    CaseState.RECEIVED: "this case is still being analysed",
    CaseState.ANALYSED: "this case is still being analysed",
    CaseState.QUEUED: "this case is on its way to the central server; "
    "give feedback once its verdict is in",
    CaseState.SENDING: "this case is being sent to the central server; "
    "give feedback once its verdict is in",
    CaseState.SEND_FAILED_RETRYING: "this case is waiting to be sent again to the central "
    "server; give feedback once its verdict is in",
    CaseState.DELIVERED: "the central server has this case but has not answered yet; "
    "give feedback once its verdict is in",
    CaseState.QUARANTINED: "the central server refused this case; an admin can put it back "
    "in the upload queue (Upload queue view)",
    CaseState.ACKNOWLEDGED: "feedback on this case has already been recorded",
    CaseState.FAILED: "this file could not be analysed, so there is no result to review",
}


def feedback_allowed(state: CaseState) -> bool:
    """Whether a clinician may accept, reject or acknowledge a case in ``state`` now."""
    return (state, CaseEvent.ACKNOWLEDGE) in TRANSITIONS


def feedback_refusal(state: CaseState) -> str:
    """Why feedback is not possible in ``state``, as one sentence (empty when it is)."""
    if feedback_allowed(state):
        return ""
    return _FEEDBACK_REFUSALS.get(state, f"this case is {ESCALATION_LABELS.get(state, state)}")


@dataclass(frozen=True)
class PatientLabel:
    """Who the image is of, as the original file says; empty strings when it cannot be read.

    ``pending``: not read yet (a large store's first rows are shown before every header is).
    """

    name: str
    patient_id: str
    pending: bool = False


UNKNOWN_PATIENT = PatientLabel("", "")
PENDING_PATIENT = PatientLabel("", "", pending=True)


@dataclass(frozen=True)
class WorklistRow:
    """One case as the worklist shows it."""

    case_id: str
    patient: PatientLabel
    received_at: datetime  # UTC
    modality: str
    decision: str  # normal | abnormal | escalate
    reason: str
    score: float
    state: CaseState
    verdict: str | None  # the central model's label, once it has answered
    verdict_score: float | None
    verdict_error: str | None  # the central server's error code when it could not decide
    urgency: Urgency
    path: str
    updated_at: str
    result: Mapping[str, Any]

    @property
    def escalation(self) -> str:
        return ESCALATION_LABELS.get(self.state, self.state.value)

    @property
    def centre_disagrees(self) -> bool:
        """The central verdict is the other side of the device's leaning (reviewed or not)."""
        return urgency_of(self.decision, self.score, self.verdict) is Urgency.CENTRE_DISAGREES

    @property
    def sort_key(self) -> tuple[int, float, str]:
        """Most urgent first, then newest first; the case id keeps the order total."""
        return (int(self.urgency), -self.received_at.timestamp(), self.case_id)


def urgency_of(decision: str, score: float, verdict: str | None) -> Urgency:
    """Abnormal and centre-disagrees first.

    An escalated case has no local label; the device leans to whichever side its score is on, so
    the centre disagrees when its label is the other one. A local decision is never sent, so
    it cannot be disagreed with.
    """
    if decision == ABNORMAL:
        return Urgency.ABNORMAL
    if decision == NORMAL:
        return Urgency.NORMAL
    if verdict in (NORMAL, ABNORMAL):
        leaning = ABNORMAL if score >= 0.5 else NORMAL
        if verdict != leaning:
            return Urgency.CENTRE_DISAGREES
        return Urgency.ABNORMAL if verdict == ABNORMAL else Urgency.NORMAL
    return Urgency.ESCALATED


def row_for(case: StoredCase, patient: PatientLabel) -> WorklistRow:
    verdict = case.verdict or {}
    label = verdict.get("verdict")
    score = verdict.get("score")
    error = verdict.get("error")
    scope = case.result.get("scope") or {}
    image = case.result.get("image") or {}
    return WorklistRow(
        case_id=case.case_id,
        patient=patient,
        received_at=_parse_time(case.created_at),
        modality=str(image.get("modality") or scope.get("modality") or ""),
        decision=case.decision,
        reason=case.reason,
        score=case.score,
        state=case.state,
        verdict=str(label) if label is not None else None,
        verdict_score=float(score) if isinstance(score, int | float) else None,
        verdict_error=str(error.get("code")) if isinstance(error, dict) else None,
        urgency=Urgency.REVIEWED
        if case.state is CaseState.ACKNOWLEDGED
        else urgency_of(case.decision, case.score, str(label) if label is not None else None),
        path=str(case.result.get("path", "")),
        updated_at=case.updated_at,
        result=case.result,
    )


def sort_rows(rows: Iterable[WorklistRow]) -> list[WorklistRow]:
    return sorted(rows, key=lambda row: row.sort_key)


def read_patient(path: str) -> PatientLabel:
    """Patient name and ID from the original file's header (header only: well under 1 ms)."""
    if not path:
        return UNKNOWN_PATIENT
    try:
        ds = read_dataset(path, header_only=True)
    except InputError as err:
        # The file may have been moved (e.g. filed by the watch service): show the case anyway.
        log.debug("patient details unavailable for a case (%s)", err.code)
        return UNKNOWN_PATIENT
    try:
        name = ds.get("PatientName")
        text = "" if name is None else str(name)
        patient_id = str(ds.get("PatientID") or "")
    except Exception as exc:  # noqa: BLE001 - a malformed element must not hide the case
        # pydicom decodes an element when it is first read and raises its own types (e.g.
        # BytesLengthException for a length that does not fit the VR), not InputError. The
        # type only: the message quotes the raw value.
        log.debug("patient details unreadable for a case (%s)", type(exc).__name__)
        return UNKNOWN_PATIENT
    display = ", ".join(part for part in text.split("^")[:2] if part)
    return PatientLabel(display, patient_id)


class WorklistSource:
    """Keeps the worklist rows and brings them up to date from the case store's changes.

    Why incremental: the desktop asks every second while the store grows by thousands of cases
    a week, so each call reads only the cases inserted or changed since the previous one
    (:meth:`CaseStore.cases_changed_since`, whatever process wrote them); a quiet second reads
    none. The first call reads every case. Cases are never deleted (their history rows refer to
    them), so a row once read stays. Patient headers are read once per file.
    :meth:`rows` and :meth:`changed_rows` share one position in the store's changes.

    With ``name_budget_s``, :meth:`changed_rows` spends at most about that long reading patient
    headers: rows whose header is not read yet carry :data:`PENDING_PATIENT` and come back,
    named, in later calls while :attr:`names_pending`. Why: a header read costs most of a
    millisecond, so a store of 20,000 cases would otherwise show nothing for the quarter of a
    minute its first call takes. Names are read in the order the rows were first returned,
    so each call's named rows sit side by side in a table that keeps that order (one update
    for the block, not one per row). Without a budget every header is read at once.

    Open and use it in one thread (it keeps a SQLite connection, which is thread-bound).
    """

    def __init__(self, store_path: Path, *, name_budget_s: float | None = None) -> None:
        self._store_path = store_path
        self._store: CaseStore | None = None
        self._name_budget_s = name_budget_s
        self._patients: dict[str, PatientLabel] = {}
        self._unnamed: dict[str, None] = {}  # case ids whose header is still to read, in order
        self._rows: dict[str, WorklistRow] = {}
        self._seq = 0  # the store's change sequence the rows are up to date with
        self._order: list[WorklistRow] = []  # every row, most urgent first
        self._keys: list[tuple[int, float, str]] = []  # their sort keys, for bisect

    @property
    def names_pending(self) -> bool:
        """Some rows still wait for their patient's name (see ``name_budget_s``)."""
        return bool(self._unnamed)

    def rows(self) -> list[WorklistRow]:
        """Every case, most urgent first."""
        self.changed_rows()
        return list(self._order)

    def changed_rows(self) -> list[WorklistRow]:
        """The rows of the cases inserted or changed since the last call (every case at first),
        and of those whose patient's name has been read since."""
        if self._store is None:
            self._store = CaseStore.open(self._store_path)
        deadline = None if self._name_budget_s is None else time.monotonic() + self._name_budget_s
        cases, seq = self._store.cases_changed_since(self._seq)
        changed = [row_for(case, self._patient(case, deadline)) for case in cases]
        # Only once every row is built: a failure leaves the position where it was, for a retry.
        self._seq = seq
        if len(changed) > len(self._rows):  # the first poll, or a store that grew a lot
            self._rows.update((row.case_id, row) for row in changed)
            self._order = sort_rows(self._rows.values())
            self._keys = [row.sort_key for row in self._order]
        else:
            for row in changed:
                self._move(row)
        for row in changed:
            if row.patient.pending:
                self._unnamed[row.case_id] = None
            else:
                self._unnamed.pop(row.case_id, None)
        named = self._name_pending_rows(deadline)
        if not named:
            return changed
        by_case = {row.case_id: row for row in changed}
        by_case.update((row.case_id, row) for row in named)
        return list(by_case.values())

    def _name_pending_rows(self, deadline: float | None) -> list[WorklistRow]:
        """Read waiting patients' headers until ``deadline`` (one at least, so that any budget
        makes progress); their rows, now named."""
        named: list[WorklistRow] = []
        while self._unnamed and (deadline is None or not named or time.monotonic() < deadline):
            case_id = next(iter(self._unnamed))
            del self._unnamed[case_id]
            row = self._rows[case_id]
            row = replace(row, patient=self._read_patient(row.path))
            self._move(row)
            named.append(row)
        return named

    def _move(self, row: WorklistRow) -> None:
        """Put ``row`` in its place in the order, instead of its old version if it has one.

        Why not sort again: a poll changes a few rows of thousands; two bisections and list
        moves cost microseconds where sorting every row costs tens of milliseconds.
        """
        old = self._rows.get(row.case_id)
        if old is not None:
            position = bisect_left(self._keys, old.sort_key)
            del self._keys[position], self._order[position]
        key = row.sort_key
        position = bisect_left(self._keys, key)
        self._keys.insert(position, key)
        self._order.insert(position, row)
        self._rows[row.case_id] = row

    def _patient(self, case: StoredCase, deadline: float | None) -> PatientLabel:
        """The case's patient: known, read now, or pending once past ``deadline``."""
        path = str(case.result.get("path", ""))
        patient = self._patients.get(path)
        if patient is not None:
            return patient
        if deadline is not None and time.monotonic() >= deadline:
            return PENDING_PATIENT
        return self._read_patient(path)

    def _read_patient(self, path: str) -> PatientLabel:
        patient = self._patients.get(path)
        if patient is None:
            patient = self._patients[path] = read_patient(path)
        return patient

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


def _parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
