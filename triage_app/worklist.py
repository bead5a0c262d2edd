"""The clinician's worklist as plain rows, built from the case store (no Qt).

The desktop app shows one row per case; everything it shows is worked out here, so the Qt model
only displays it and the rules (what is urgent, what a state is called) are tested without a
screen. Patient name and ID come from the original file's header, read locally: they are shown
on this device only and never logged. The central server's verdict is summed up here too, in the
words the worklist, the viewer's result layer and the case history all use.
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

from pydicom.dataset import Dataset

from triage_app.dicom import read_dataset
from triage_app.dicom.reader import quiet_pydicom
from triage_app.errors import InputError
from triage_app.policy import ABNORMAL, ESCALATE, NORMAL, OUT_OF_SCOPE
from triage_app.states import TRANSITIONS, CaseEvent, CaseState
from triage_app.store import CaseStore, StoredCase

__all__ = [
    "CENTRAL_VERDICT_KEY",
    "ESCALATION_LABELS",
    "PENDING_PATIENT",
    "PatientLabel",
    "Urgency",
    "WorklistRow",
    "WorklistSource",
    "feedback_allowed",
    "feedback_refusal",
    "patient_from_dataset",
    "read_patient",
    "row_for",
    "sort_rows",
    "verdict_parts",
    "verdict_summary",
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


#: The key under which a row's ``result`` carries the central verdict once it has come back (as
#: ``triage-app demo --json`` writes it): whatever shows the device's result shows the centre's.
CENTRAL_VERDICT_KEY = "central_verdict"

#: The central column's text while a case has no verdict, by state (a local decision has none).
_CENTRAL_WAITING: Mapping[CaseState, str] = {
    CaseState.RECEIVED: "analysing",
    CaseState.ANALYSED: "analysing",
    CaseState.ESCALATION_HELD: "held on device",
    CaseState.ESCALATION_BLOCKED: "not sent: blocked",
    CaseState.QUEUED: "◷ queued",
    CaseState.SENDING: "◷ sending",
    CaseState.SEND_FAILED_RETRYING: "◷ retrying send",
    CaseState.DELIVERED: "◷ awaiting centre",
    CaseState.QUARANTINED: "refused by centre",
    CaseState.ACKNOWLEDGED: "not sent",  # closed on this device (held or blocked) before sending
}

#: The same, as a sentence (tooltips, screen readers).
_CENTRAL_WAITING_WHY: Mapping[CaseState, str] = {
    CaseState.ESCALATION_HELD: "Held on this device: it is sent for a second opinion once the "
    "central server is reachable",
    CaseState.ESCALATION_BLOCKED: "Not sent to the central server: it must not leave this device",
    CaseState.QUEUED: "Waiting to be sent to the central server",
    CaseState.SENDING: "Being sent to the central server",
    CaseState.SEND_FAILED_RETRYING: "Sending failed for now; it is sent again automatically",
    CaseState.DELIVERED: "The central server has this case; its verdict has not come back yet",
    CaseState.QUARANTINED: "The central server refused this case; an admin can put it back in "
    "the upload queue",
    CaseState.ACKNOWLEDGED: "Closed on this device before it was sent to the central server",
}

# The central column's sort order: what the centre said before what it has not said yet.
_CENTRAL_RANK: Mapping[CaseState, int] = {
    CaseState.QUARANTINED: 3,
    CaseState.DELIVERED: 4,
    CaseState.SEND_FAILED_RETRYING: 5,
    CaseState.SENDING: 5,
    CaseState.QUEUED: 5,
    CaseState.ESCALATION_HELD: 6,
    CaseState.ESCALATION_BLOCKED: 7,
    CaseState.ACKNOWLEDGED: 7,
}
_CENTRAL_RANK_LOCAL = 9


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
    #: The device's result record (DESIGN 4.2), with the central verdict under
    #: :data:`CENTRAL_VERDICT_KEY` once it has come back.
    result: Mapping[str, Any]

    @property
    def escalation(self) -> str:
        return ESCALATION_LABELS.get(self.state, self.state.value)

    @property
    def centre_disagrees(self) -> bool:
        """The central verdict is the other side of the device's leaning (reviewed or not)."""
        urgency = urgency_of(self.decision, self.score, self.verdict, self.reason)
        return urgency is Urgency.CENTRE_DISAGREES

    @property
    def score_applies(self) -> bool:
        """False for an out-of-scope image: its score is the model's output on an image it was
        not made for, and no threshold was applied to it, so it is shown as "n/a"."""
        return self.reason != OUT_OF_SCOPE

    @property
    def central(self) -> str:
        """Where the case stands with the central server, in a few words: its verdict once
        there is one (marked ⚠ when it disagrees with the device), else how far it has got.

        One column for what used to be two (escalation state and verdict): at 1280 px the
        verdict was scrolled out of sight. "—" for a local decision: it is never sent.
        """
        if self.verdict_error is not None:
            return f"no verdict ({self.verdict_error})"
        if self.verdict is not None:
            marker = "⚠ " if self.centre_disagrees else ""
            return marker + _verdict_words(self.verdict, self.verdict_score, " ")
        if self.decision != ESCALATE:
            return "—"
        return _CENTRAL_WAITING.get(self.state, self.escalation)

    @property
    def central_detail(self) -> str:
        """:attr:`central` as a sentence, with what the short text leaves out (tooltips)."""
        if self.verdict is not None or self.verdict_error is not None:
            verdict = self.result.get(CENTRAL_VERDICT_KEY)
            summary = verdict_summary(verdict if isinstance(verdict, Mapping) else None)
            marker = " – disagrees with the device" if self.centre_disagrees else ""
            return f"Central verdict: {summary}{marker}"
        if self.decision != ESCALATE:
            return "Decided on this device: not sent to the central server"
        return _CENTRAL_WAITING_WHY.get(self.state, f"Central server: {self.central}")

    @property
    def central_sort_key(self) -> tuple[int, str, float, tuple[int, float, str]]:
        """Disagreements, then the centre's abnormal, other verdicts, failures, cases on their
        way (nearest to an answer first), held or not sent, and local decisions last."""
        if self.verdict is not None:
            rank = 0 if self.centre_disagrees else 1 if self.verdict == ABNORMAL else 2
        elif self.verdict_error is not None:
            rank = 3
        elif self.decision != ESCALATE:
            rank = _CENTRAL_RANK_LOCAL
        else:
            rank = _CENTRAL_RANK.get(self.state, 8)
        score = self.verdict_score if self.verdict_score is not None else 0.0
        return (rank, self.verdict or "", -score, self.sort_key)

    @property
    def sort_key(self) -> tuple[int, float, str]:
        """Most urgent first, then newest first; the case id keeps the order total."""
        return (int(self.urgency), -self.received_at.timestamp(), self.case_id)


def urgency_of(decision: str, score: float, verdict: str | None, reason: str = "") -> Urgency:
    """Abnormal and centre-disagrees first.

    An escalated case has no local label; the device leans to whichever side its score is on, so
    the centre disagrees when its label is the other one. A local decision is never sent, so
    it cannot be disagreed with. Neither can an out-of-scope image: its score is the model's
    output on an image it was not made for, so the device leans nowhere and the centre's label
    alone says how urgent the case is.
    """
    if decision == ABNORMAL:
        return Urgency.ABNORMAL
    if decision == NORMAL:
        return Urgency.NORMAL
    if verdict in (NORMAL, ABNORMAL):
        if reason != OUT_OF_SCOPE:
            leaning = ABNORMAL if score >= 0.5 else NORMAL
            if verdict != leaning:
                return Urgency.CENTRE_DISAGREES
        return Urgency.ABNORMAL if verdict == ABNORMAL else Urgency.NORMAL
    return Urgency.ESCALATED


def verdict_summary(verdict: Mapping[str, Any] | None) -> str:
    """The central verdict in one line: label, score, the central model, when it was decided.

    E.g. ``abnormal, score 0.981 · central-dx-demo 1.1.0 · decided 2026-11-22 23:34:50``; for a
    case the centre could not decide, ``no verdict: <code>: <message>``. Empty for no verdict.
    """
    label, model, decided = verdict_parts(verdict)
    return " · ".join(part for part in (label, model, decided and f"decided {decided}") if part)


def verdict_parts(verdict: Mapping[str, Any] | None) -> tuple[str, str, str]:
    """The central verdict as (label and score, central model, local time it was decided);
    "" for what the verdict does not say. A failure is ``("no verdict: <code>: …", "", "")``.

    An out-of-scope label has no score: the centre's model was not made for the image either.
    """
    if not verdict:
        return ("", "", "")
    error = verdict.get("error")
    if isinstance(error, Mapping):
        message = str(error.get("message") or "").strip()
        code = str(error.get("code") or "unknown")
        text = f"no verdict: {code}: {_shorten(message)}" if message else f"no verdict: {code}"
        return (text, "", "")
    label = _verdict_words(verdict.get("verdict"), verdict.get("score"), ", score ")
    model = verdict.get("model")
    name = ""
    if isinstance(model, Mapping) and model.get("name"):
        name = f"{model['name']} {model.get('version', '')}".strip()
    return (label, name, _local_time_text(verdict.get("decided_at")))


def _verdict_words(label: object, score: object, joiner: str) -> str:
    """``abnormal<joiner>0.981``; the label alone when out of scope or without a score."""
    text = str(label).replace("_", " ") if label is not None else "none"
    if label == OUT_OF_SCOPE or isinstance(score, bool) or not isinstance(score, int | float):
        return text
    return f"{text}{joiner}{float(score):.3f}"


def _local_time_text(value: object) -> str:
    """An ISO-8601 time (the centre writes ``…Z``) in this computer's time zone; the text as
    given when it does not parse, "" when there is none."""
    if not isinstance(value, str) or not value:
        return ""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _shorten(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def row_for(case: StoredCase, patient: PatientLabel) -> WorklistRow:
    verdict = case.verdict or {}
    label = verdict.get("verdict")
    score = verdict.get("score")
    error = verdict.get("error")
    scope = case.result.get("scope") or {}
    image = case.result.get("image") or {}
    result = case.result
    if case.verdict is not None:
        result = {**case.result, CENTRAL_VERDICT_KEY: case.verdict}
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
        else urgency_of(
            case.decision, case.score, str(label) if label is not None else None, case.reason
        ),
        path=str(case.result.get("path", "")),
        updated_at=case.updated_at,
        result=result,
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
    return patient_from_dataset(ds)


def patient_from_dataset(ds: Dataset) -> PatientLabel:
    """Patient name and ID from a data set already read, as the worklist shows them.

    Shared with the viewer, which has the whole file in hand once it has decoded the image:
    the same name in the same form in both places, without a second read of the file.
    Read as the reader reads (:func:`quiet_pydicom`): a name longer than its VR allows (seen
    in the field) made pydicom warn, and log, at every read.
    """
    try:
        with quiet_pydicom():
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
