"""Records that cross module lines: one per input file (DESIGN 4.2).

They are frozen so a result cannot be edited after the fact; ``to_json`` gives exactly the JSON
Lines contract the CLI prints and the case store keeps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any


def portable_text(text: str) -> str:
    """``text`` (a path, or a message quoting one) as valid Unicode, for SQLite and JSON.

    Why: a file name that is not UTF-8 (a Latin-1 "Müller" from a Windows share) reaches
    Python with its odd bytes as lone surrogates, which SQLite and strict JSON readers refuse.
    Those bytes become ``\\xNN`` text; a UTF-8 name is returned unchanged.
    """
    return os.fsencode(text).decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class ModelRef:
    """The model that decided: its name, version, the ONNX file's SHA-256 and the manifest's.

    ``manifest_sha256`` is the SHA-256 of ``manifest.json`` as loaded: its thresholds,
    calibration, preprocessing and intended use decide the outcome as much as the ONNX file.
    ``None`` where it is not known (records and central verdicts stored before it existed);
    the key is then left out of the JSON, exactly as those records have it.
    """

    name: str
    version: str
    sha256: str
    manifest_sha256: str | None = None

    def to_json(self) -> dict[str, str]:
        out = {"name": self.name, "version": self.version, "sha256": self.sha256}
        if self.manifest_sha256 is not None:
            out["manifest_sha256"] = self.manifest_sha256
        return out


# Where an escalated case goes: sealed in the outbox (the uploader takes it from there), kept on
# the device because no central server can take it yet, or kept because it must never leave.
QUEUED = "queued"
HELD = "held"
BLOCKED = "blocked"


@dataclass(frozen=True)
class EscalationRef:
    """Where an escalated case stands on its way to the central server."""

    state: str  # queued | held | blocked (the case store follows it further: sending, ...)
    payload_sha256: str | None = None
    detail: str | None = None
    reason: str | None = None  # why a case is blocked: phi_audit | burned_in_risk | invalid_payload

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state, "payload_sha256": self.payload_sha256}
        if self.reason:
            out["reason"] = self.reason
        if self.detail:
            out["detail"] = self.detail
        return out


@dataclass(frozen=True)
class CaseResult:
    """A successfully triaged input."""

    path: str
    case_id: str
    decision: str  # normal | abnormal | escalate
    reason: str  # confident_normal | confident_abnormal | uncertain | out_of_scope
    score: float  # calibrated probability of the positive label
    probabilities: dict[str, float]
    model: ModelRef
    thresholds: dict[str, float]
    scope: dict[str, Any]  # modality, body_part, photometric, findings of the scope check
    image: dict[str, Any]  # non-identifying image facts: size, frames, transfer syntax
    escalation: EscalationRef | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    deidentification: dict[str, Any] = field(default_factory=dict)
    # kind, pseudonym, original: the local link, kept in the case store and never sent or printed
    links: tuple[tuple[str, str, str], ...] = field(default=(), repr=False)
    # The escalation payload (result JSON + de-identified DICOM, envelope framing) of a held
    # case, for the outbox to seal; never printed or stored in the clear.
    payload: bytes | None = field(default=None, repr=False, compare=False)

    ok: bool = field(default=True, init=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": portable_text(self.path),
            "ok": True,
            "case_id": self.case_id,
            "decision": self.decision,
            "reason": self.reason,
            "score": round(self.score, 6),
            "probabilities": {k: round(v, 6) for k, v in self.probabilities.items()},
            "thresholds": self.thresholds,
            "model": self.model.to_json(),
            "scope": self.scope,
            "image": self.image,
            "escalation": self.escalation.to_json() if self.escalation else None,
            "deidentification": self.deidentification,
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
        }

    def payload_json(self) -> dict[str, Any]:
        """The record as it travels with an escalated case.

        Without the local file path (it may name the patient) and without timings, so the
        same image and model always give the same payload: a case triaged twice is one case.
        """
        record = self.to_json()
        del record["path"]
        del record["timings_ms"]
        return record


@dataclass(frozen=True)
class FailedInput:
    """An input that was refused, with the stable error code and a one-line message.

    ``input_sha256`` is the SHA-256 of the file's bytes (``None`` when they cannot be read): the
    case store tells a refused input triaged again from a different one by it. Not printed.
    """

    path: str
    code: str
    message: str
    input_sha256: str | None = None

    ok: bool = field(default=False, init=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": portable_text(self.path),
            "ok": False,
            "error": {"code": self.code, "message": portable_text(self.message)},
        }


InputOutcome = CaseResult | FailedInput
