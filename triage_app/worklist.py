"""The clinician's worklist as plain rows, built from the case store (no Qt).

The desktop app shows one row per case; everything it shows is worked out here, so the Qt model
only displays it and the rules (what is urgent, what a state is called) are tested without a
screen. Patient name and ID come from the original file's header, read locally: they are shown
on this device only and never logged.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import Any

from triage_app.dicom import read_dataset
from triage_app.errors import InputError
from triage_app.policy import ABNORMAL, NORMAL
from triage_app.states import CaseState
from triage_app.store import CaseStore, StoredCase

__all__ = [
    "ESCALATION_LABELS",
    "PatientLabel",
    "Urgency",
    "WorklistRow",
    "WorklistSource",
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

    @property
    def label(self) -> str:
        return _URGENCY_LABELS[self]


_URGENCY_LABELS = {
    Urgency.CENTRE_DISAGREES: "Centre disagrees",
    Urgency.ABNORMAL: "Abnormal",
    Urgency.ESCALATED: "Uncertain",
    Urgency.NORMAL: "Routine",
}


@dataclass(frozen=True)
class PatientLabel:
    """Who the image is of, as the original file says; empty strings when it cannot be read."""

    name: str
    patient_id: str


UNKNOWN_PATIENT = PatientLabel("", "")


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
        return self.urgency is Urgency.CENTRE_DISAGREES

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
        urgency=urgency_of(case.decision, case.score, str(label) if label is not None else None),
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
    name = ds.get("PatientName")
    text = "" if name is None else str(name)
    display = ", ".join(part for part in text.split("^")[:2] if part)
    return PatientLabel(display, str(ds.get("PatientID") or ""))


class WorklistSource:
    """Keeps the worklist rows and brings them up to date from the case store's changes.

    Why incremental: the desktop asks every second while the store grows by thousands of cases
    a week, so each call reads only the cases inserted or changed since the previous one
    (:meth:`CaseStore.cases_changed_since`, whatever process wrote them); a quiet second reads
    none. The first call reads every case. Cases are never deleted (their history rows refer to
    them), so a row once read stays. Patient headers are read once per file.
    :meth:`rows` and :meth:`changed_rows` share one position in the store's changes.

    Open and use it in one thread (it keeps a SQLite connection, which is thread-bound).
    """

    def __init__(self, store_path: Path) -> None:
        self._store_path = store_path
        self._store: CaseStore | None = None
        self._patients: dict[str, PatientLabel] = {}
        self._rows: dict[str, WorklistRow] = {}
        self._seq = 0  # the store's change sequence the rows are up to date with
        self._order: list[WorklistRow] = []  # every row, most urgent first
        self._keys: list[tuple[int, float, str]] = []  # their sort keys, for bisect

    def rows(self) -> list[WorklistRow]:
        """Every case, most urgent first."""
        self.changed_rows()
        return list(self._order)

    def changed_rows(self) -> list[WorklistRow]:
        """The rows of the cases inserted or changed since the last call (every case at first)."""
        if self._store is None:
            self._store = CaseStore.open(self._store_path)
        cases, seq = self._store.cases_changed_since(self._seq)
        changed = [row_for(case, self._patient(case)) for case in cases]
        # Only once every row is built: a failure leaves the position where it was, for a retry.
        self._seq = seq
        if len(changed) > len(self._rows):  # the first poll, or a store that grew a lot
            self._rows.update((row.case_id, row) for row in changed)
            self._order = sort_rows(self._rows.values())
            self._keys = [row.sort_key for row in self._order]
        else:
            for row in changed:
                self._move(row)
        return changed

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

    def _patient(self, case: StoredCase) -> PatientLabel:
        path = str(case.result.get("path", ""))
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
