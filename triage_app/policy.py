"""Probabilities + thresholds + scope checks → a decision and the reason for it.

The rule is deliberately simple enough to read aloud to a clinician:

* an image outside the model's intended use (modality, body part, view position, photometric
  interpretation), unlike anything it was trained on, or that looks left-right mirrored is
  **escalated** as ``out_of_scope`` — never called normal;
* otherwise a calibrated score below ``normal_below`` is **normal**, at or above
  ``abnormal_at_or_above`` is **abnormal**, and anything in between is **escalated** as
  ``uncertain``.

Admin thresholds are bound to one model name and version: for any other model the manifest's own
defaults apply until an admin approves new ones (DESIGN 4.3).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from triage_app.dicom.image import ImageInfo
from triage_app.errors import ConfigError
from triage_app.model.input_profile import InputProfile
from triage_app.model.manifest import IntendedUse, ModelManifest, Thresholds

logger = logging.getLogger(__name__)

NORMAL, ABNORMAL, ESCALATE = "normal", "abnormal", "escalate"
OUT_OF_SCOPE = "out_of_scope"


#: Why an image is out of scope, as a clinician reads it (the GUI's result panel and tooltip):
#: every finding code :func:`header_scope_findings` and :func:`assess_scope` report.
SCOPE_FINDING_TEXT: dict[str, str] = {
    "modality_not_intended": "modality not one this model reads",
    "body_part_not_intended": "body part not one this model reads",
    "body_part_missing": "no body part in the header",
    "view_not_intended": "view not one this model reads (e.g. a lateral or oblique)",
    "view_position_missing": "no view position in the header",
    "photometric_not_intended": "colour model not one this model reads",
    "multi_frame_not_intended": "multi-frame image",
    "atypical_input": "image unlike the model's training images",
    "looks_mirrored": "image looks left-right mirrored (side marker? dextrocardia?)",
}


def describe_findings(findings: Sequence[str]) -> str:
    """The findings as one clinician-readable phrase; an unknown code is shown as it is."""
    return "; ".join(SCOPE_FINDING_TEXT.get(code, code.replace("_", " ")) for code in findings)


@dataclass(frozen=True)
class ScopeAssessment:
    """Why an image is (or is not) within what the model was made for."""

    findings: tuple[str, ...]  # empty when in scope, e.g. ("modality_not_intended",)
    input_score: float | None = None
    input_limit: float | None = None

    @property
    def in_scope(self) -> bool:
        return not self.findings

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"in_scope": self.in_scope, "findings": list(self.findings)}
        if self.input_score is not None:
            out["input_score"] = round(self.input_score, 5)
            out["input_limit"] = round(self.input_limit or 0.0, 5)
        return out


@dataclass(frozen=True)
class Decision:
    decision: str  # normal | abnormal | escalate
    reason: str  # confident_normal | confident_abnormal | uncertain | out_of_scope

    @property
    def is_escalation(self) -> bool:
        return self.decision == ESCALATE


def header_scope_findings(info: ImageInfo, use: IntendedUse) -> tuple[str, ...]:
    """The checks that need only the header. They run with the pixel checks, not before them:
    an out-of-scope image is still escalated, and its de-identified pixels are what is sent."""
    findings = []
    if info.modality not in use.modalities:
        findings.append("modality_not_intended")
    if info.body_part:
        if info.body_part not in use.body_parts:
            findings.append("body_part_not_intended")
    elif not use.allow_missing_body_part:
        findings.append("body_part_missing")
    if use.view_positions:  # a frontal model must not call a lateral or oblique view normal
        view = info.view_position.strip().upper()
        if view:
            if view not in use.view_positions:
                findings.append("view_not_intended")
        elif not use.allow_missing_view_position:
            findings.append("view_position_missing")
    if info.photometric.upper() not in use.photometric:
        findings.append("photometric_not_intended")
    if info.number_of_frames > 1:
        findings.append("multi_frame_not_intended")
    return tuple(findings)


def assess_scope(
    info: ImageInfo, unit: np.ndarray, use: IntendedUse, profile: InputProfile
) -> ScopeAssessment:
    """The header checks plus the input-distribution check on the prepared image."""
    input_score = profile.score(unit)
    findings = header_scope_findings(info, use)
    if not profile.is_typical(input_score, unit):
        findings += ("atypical_input",)
    elif profile.looks_mirrored(unit):  # an atypical image's orientation means nothing
        findings += ("looks_mirrored",)
    return ScopeAssessment(findings, input_score, profile.limit)


def decide(score: float, thresholds: Thresholds, scope: ScopeAssessment) -> Decision:
    if not scope.in_scope:
        return Decision(ESCALATE, OUT_OF_SCOPE)
    if score < thresholds.normal_below:
        return Decision(NORMAL, "confident_normal")
    if score >= thresholds.abnormal_at_or_above:
        return Decision(ABNORMAL, "confident_abnormal")
    return Decision(ESCALATE, "uncertain")


@dataclass(frozen=True)
class ActiveThresholds:
    thresholds: Thresholds
    source: str  # "manifest" or "settings"

    def to_json(self) -> dict[str, Any]:
        return {**self.thresholds.to_json(), "source": self.source}


def resolve_thresholds(
    manifest: ModelManifest,
    approved_for: str | None,
    normal_below: float | None,
    abnormal_at_or_above: float | None,
) -> ActiveThresholds:
    """The admin's thresholds if they were approved for this exact model, else its defaults."""
    if normal_below is None and abnormal_at_or_above is None:
        return ActiveThresholds(manifest.thresholds, "manifest")
    if approved_for != manifest.key:
        logger.warning(
            "admin thresholds were approved for %s, not for the loaded model %s: using the "
            "model's own defaults until an admin approves thresholds for it",
            approved_for or "no model",
            manifest.key,
        )
        return ActiveThresholds(manifest.thresholds, "manifest")
    low = manifest.thresholds.normal_below if normal_below is None else normal_below
    high = (
        manifest.thresholds.abnormal_at_or_above
        if abnormal_at_or_above is None
        else abnormal_at_or_above
    )
    if low > high:
        # Settings validation keeps two set thresholds in order, but one set threshold can still
        # cross the model's default for the other: a settings problem, not a manifest one.
        raise ConfigError(
            f"escalation.normal_below ({low}) is above escalation.abnormal_at_or_above ({high}) "
            f"for {manifest.key}: set both thresholds"
        )
    return ActiveThresholds(Thresholds(low, high), "settings")
