"""The decision policy: thresholds, scope checks and which thresholds apply to which model."""

from __future__ import annotations

import io
import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import BUNDLE, image_info, phantom_dataset
from triage_app import policy
from triage_app.dicom import load_image
from triage_app.errors import ConfigError
from triage_app.model.classifier import Classifier
from triage_app.model.manifest import IntendedUse, ModelManifest, Thresholds, load_manifest
from triage_app.model.preprocess import PreprocessSpec, to_unit_image
from triage_app.policy import (
    ABNORMAL,
    ESCALATE,
    NORMAL,
    SCOPE_FINDING_TEXT,
    ActiveThresholds,
    Decision,
    ScopeAssessment,
    assess_scope,
    decide,
    describe_findings,
    header_scope_findings,
    resolve_thresholds,
)

THRESHOLDS = Thresholds(0.2, 0.7)
IN_SCOPE = ScopeAssessment(findings=())
OUT_OF_SCOPE = ScopeAssessment(findings=("modality_not_intended",))

CHEST_USE = IntendedUse(
    modalities=("DX", "CR"),
    body_parts=("CHEST",),
    photometric=("MONOCHROME1", "MONOCHROME2"),
    allow_missing_body_part=False,
    description="",
)

CHEST_DX = image_info(
    sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
    sop_instance_uid="1.2.3.4",
    modality="DX",
    body_part="CHEST",
    view_position="PA",
    rows=2048,
    columns=2048,
    bits_stored=12,
)


# --- decide -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("score", "decision", "reason"),
    [
        (0.0, NORMAL, "confident_normal"),
        (0.1999999, NORMAL, "confident_normal"),
        (0.2, ESCALATE, "uncertain"),  # exactly at normal_below is NOT normal
        (0.45, ESCALATE, "uncertain"),
        (0.6999999, ESCALATE, "uncertain"),
        (0.7, ABNORMAL, "confident_abnormal"),  # exactly at abnormal_at_or_above IS abnormal
        (0.9, ABNORMAL, "confident_abnormal"),
        (1.0, ABNORMAL, "confident_abnormal"),
    ],
)
def test_decide_in_scope(score: float, decision: str, reason: str) -> None:
    result = decide(score, THRESHOLDS, IN_SCOPE)
    assert result == Decision(decision, reason)
    assert result.is_escalation == (decision == ESCALATE)


@pytest.mark.parametrize("score", [0.0, 0.001, 0.5, 0.999, 1.0])
def test_out_of_scope_wins_over_any_score(score: float) -> None:
    result = decide(score, THRESHOLDS, OUT_OF_SCOPE)
    assert result == Decision(ESCALATE, "out_of_scope")
    assert result.is_escalation


def test_atypical_input_alone_is_out_of_scope() -> None:
    scope = ScopeAssessment(findings=("input_atypical",), input_score=0.4, input_limit=0.1)
    assert not scope.in_scope
    assert decide(0.0, THRESHOLDS, scope).reason == "out_of_scope"


def test_equal_thresholds_leave_no_uncertain_band() -> None:
    thresholds = Thresholds(0.5, 0.5)
    assert decide(0.4999, thresholds, IN_SCOPE).decision == NORMAL
    assert decide(0.5, thresholds, IN_SCOPE).decision == ABNORMAL


def test_widest_thresholds_escalate_everything_below_one() -> None:
    thresholds = Thresholds(0.0, 1.0)
    for score in (0.0, 1e-9, 0.5, 0.999999):
        assert decide(score, thresholds, IN_SCOPE) == Decision(ESCALATE, "uncertain")


def test_scope_assessment_json() -> None:
    assert IN_SCOPE.to_json() == {"in_scope": True, "findings": []}
    scope = ScopeAssessment(("body_part_missing",), input_score=0.1234567, input_limit=0.2)
    assert scope.to_json() == {
        "in_scope": False,
        "findings": ["body_part_missing"],
        "input_score": 0.12346,
        "input_limit": 0.2,
    }


# --- header scope -----------------------------------------------------------------------------


def test_chest_dx_is_in_scope() -> None:
    assert header_scope_findings(CHEST_DX, CHEST_USE) == ()
    assert header_scope_findings(replace(CHEST_DX, modality="CR"), CHEST_USE) == ()
    assert header_scope_findings(replace(CHEST_DX, photometric="MONOCHROME1"), CHEST_USE) == ()


@pytest.mark.parametrize(
    ("changes", "finding"),
    [
        ({"modality": "MR"}, "modality_not_intended"),
        ({"modality": "CT"}, "modality_not_intended"),
        ({"modality": ""}, "modality_not_intended"),
        ({"body_part": "HEAD"}, "body_part_not_intended"),
        ({"body_part": "CHESTX"}, "body_part_not_intended"),
        ({"body_part": ""}, "body_part_missing"),
        ({"photometric": "RGB"}, "photometric_not_intended"),
        ({"photometric": "PALETTE COLOR"}, "photometric_not_intended"),
        ({"photometric": "YBR_FULL_422"}, "photometric_not_intended"),
        ({"number_of_frames": 2}, "multi_frame_not_intended"),
        ({"number_of_frames": 40, "frame_index": 20}, "multi_frame_not_intended"),
    ],
)
def test_each_header_finding(changes: dict[str, Any], finding: str) -> None:
    assert header_scope_findings(replace(CHEST_DX, **changes), CHEST_USE) == (finding,)


def test_missing_body_part_is_allowed_when_the_model_says_so() -> None:
    lenient = replace(CHEST_USE, allow_missing_body_part=True)
    assert header_scope_findings(replace(CHEST_DX, body_part=""), lenient) == ()
    # Allowing a missing body part never allows a wrong one.
    assert header_scope_findings(replace(CHEST_DX, body_part="KNEE"), lenient) == (
        "body_part_not_intended",
    )


def test_photometric_is_compared_case_insensitively() -> None:
    assert header_scope_findings(replace(CHEST_DX, photometric="monochrome2"), CHEST_USE) == ()


# --- view position ------------------------------------------------------------------------------

FRONTAL_USE = replace(CHEST_USE, view_positions=("PA", "AP"), allow_missing_view_position=False)
CONFIDENTLY_NORMAL = 0.0  # far below any normal_below: only the scope check can stop a local call


@pytest.mark.parametrize(
    "view", ["LL", "RL", "LATERAL", "LAO", "RAO", "LPO", "RPO", "ll", " lateral "]
)
def test_a_view_the_model_is_not_for_is_out_of_scope_whatever_the_score(view: str) -> None:
    """A lateral or oblique chest is not what a frontal model saw: never called normal."""
    findings = header_scope_findings(replace(CHEST_DX, view_position=view), FRONTAL_USE)
    assert findings == ("view_not_intended",)
    decision = decide(CONFIDENTLY_NORMAL, THRESHOLDS, ScopeAssessment(findings))
    assert decision == Decision(ESCALATE, "out_of_scope")


@pytest.mark.parametrize("view", ["PA", "AP", "pa", " pa ", "Ap", "AP "])
def test_frontal_views_are_in_scope_in_any_case_and_padding(view: str) -> None:
    info = replace(CHEST_DX, view_position=view)
    assert header_scope_findings(info, FRONTAL_USE) == ()
    assert decide(CONFIDENTLY_NORMAL, THRESHOLDS, IN_SCOPE) == Decision(NORMAL, "confident_normal")


@pytest.mark.parametrize("view", ["", "   "])
def test_a_missing_view_is_refused_unless_the_model_allows_it(view: str) -> None:
    info = replace(CHEST_DX, view_position=view, modality="CR")
    assert header_scope_findings(info, FRONTAL_USE) == ("view_position_missing",)
    lenient = replace(FRONTAL_USE, allow_missing_view_position=True)
    assert header_scope_findings(info, lenient) == ()
    # Allowing a missing view never allows a wrong one.
    lateral = replace(info, view_position="LL")
    assert header_scope_findings(lateral, lenient) == ("view_not_intended",)


@pytest.mark.parametrize("view", ["LL", "LAO", "", "PA"])
def test_a_model_that_declares_no_views_checks_none(view: str) -> None:
    """Bundles written before the field existed keep working exactly as before."""
    assert CHEST_USE.view_positions == ()
    assert header_scope_findings(replace(CHEST_DX, view_position=view), CHEST_USE) == ()
    legacy = _manifest().intended_use
    assert header_scope_findings(replace(CHEST_DX, view_position=view), legacy) == ()


def test_the_view_finding_comes_with_the_other_header_findings() -> None:
    mr = replace(CHEST_DX, modality="MR", body_part="HEAD", view_position="LATERAL")
    assert header_scope_findings(mr, FRONTAL_USE) == (
        "modality_not_intended",
        "body_part_not_intended",
        "view_not_intended",
    )


def test_the_shipped_models_are_for_frontal_views_only() -> None:
    """The demo models' manifests say PA/AP and let a CR without View Position through."""
    for bundle in (BUNDLE, BUNDLE.parent / "central-dx-demo"):
        use = load_manifest(bundle).intended_use
        assert use.view_positions == ("PA", "AP"), bundle.name
        assert use.allow_missing_view_position is True
        assert header_scope_findings(replace(CHEST_DX, view_position="LL"), use) == (
            "view_not_intended",
        )
        assert header_scope_findings(replace(CHEST_DX, view_position=""), use) == ()


def test_every_problem_is_reported_at_once() -> None:
    mr = replace(CHEST_DX, modality="MR", body_part="", photometric="RGB", number_of_frames=3)
    assert header_scope_findings(mr, CHEST_USE) == (
        "modality_not_intended",
        "body_part_missing",
        "photometric_not_intended",
        "multi_frame_not_intended",
    )


# --- resolve_thresholds -------------------------------------------------------------------------


def _manifest(name: str = "chest-test", version: str = "2.1.0") -> ModelManifest:
    return ModelManifest.from_json(
        {
            "format_version": 1,
            "name": name,
            "version": version,
            "file": "model.onnx",
            "sha256": "ab" * 32,
            "input": {"name": "image", "shape": [1, 1, 128, 128], "dtype": "float32"},
            "preprocessing": PreprocessSpec().to_json(),
            "labels": ["normal", "abnormal"],
            "positive_label": "abnormal",
            "calibration": {"method": "temperature", "temperature": 1.3},
            "thresholds": {"normal_below": 0.1, "abnormal_at_or_above": 0.9},
            "intended_use": {
                "modalities": ["DX"],
                "body_parts": ["CHEST"],
                "photometric": ["MONOCHROME2"],
            },
            "input_profile": {"file": "input_profile.npz", "sha256": "cd" * 32},
        }
    )


MANIFEST = _manifest()
DEFAULTS = ActiveThresholds(Thresholds(0.1, 0.9), "manifest")


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.get_records("call")
        if r.levelno >= logging.WARNING and r.name.startswith("triage_app")
    ]


def test_no_admin_thresholds_use_the_manifest_quietly(caplog: pytest.LogCaptureFixture) -> None:
    assert resolve_thresholds(MANIFEST, None, None, None) == DEFAULTS
    assert resolve_thresholds(MANIFEST, "chest-test@2.1.0", None, None) == DEFAULTS
    assert resolve_thresholds(MANIFEST, "other@1.0", None, None) == DEFAULTS
    assert _warnings(caplog) == []


def test_thresholds_approved_for_this_exact_model_apply(caplog: pytest.LogCaptureFixture) -> None:
    active = resolve_thresholds(MANIFEST, "chest-test@2.1.0", 0.25, 0.6)
    assert active == ActiveThresholds(Thresholds(0.25, 0.6), "settings")
    assert active.to_json() == {
        "normal_below": 0.25,
        "abnormal_at_or_above": 0.6,
        "source": "settings",
    }
    assert _warnings(caplog) == []


def test_one_admin_threshold_keeps_the_other_default() -> None:
    assert resolve_thresholds(MANIFEST, MANIFEST.key, 0.3, None) == ActiveThresholds(
        Thresholds(0.3, 0.9), "settings"
    )
    assert resolve_thresholds(MANIFEST, MANIFEST.key, None, 0.5) == ActiveThresholds(
        Thresholds(0.1, 0.5), "settings"
    )


@pytest.mark.expect_log_warnings
@pytest.mark.parametrize(
    "approved_for",
    [
        None,
        "chest-test@2.1.1",  # same name, other version
        "chest-test@2.1",
        "other-model@2.1.0",  # other name, same version
        "chest-test",
        "CHEST-TEST@2.1.0",
        " chest-test@2.1.0",
    ],
)
def test_thresholds_for_another_model_fall_back_with_a_warning(
    caplog: pytest.LogCaptureFixture, approved_for: str | None
) -> None:
    active = resolve_thresholds(MANIFEST, approved_for, 0.25, 0.6)
    assert active == DEFAULTS
    assert active.to_json()["source"] == "manifest"
    messages = _warnings(caplog)
    assert len(messages) == 1
    assert "chest-test@2.1.0" in messages[0]
    assert (approved_for or "no model") in messages[0]


@pytest.mark.expect_log_warnings
def test_a_new_model_version_does_not_inherit_old_thresholds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    approved = resolve_thresholds(MANIFEST, MANIFEST.key, 0.3, 0.5)
    assert approved.source == "settings"
    retrained = _manifest(version="2.2.0")
    assert resolve_thresholds(retrained, MANIFEST.key, 0.3, 0.5) == DEFAULTS
    assert len(_warnings(caplog)) == 1


@pytest.mark.parametrize(
    ("normal_below", "abnormal_at_or_above"),
    [(0.95, None), (None, 0.05)],  # one setting crosses the model's default for the other
)
def test_a_setting_that_crosses_the_models_default_is_a_config_error(
    normal_below: float | None, abnormal_at_or_above: float | None
) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_thresholds(MANIFEST, MANIFEST.key, normal_below, abnormal_at_or_above)
    assert caught.value.code == "config_invalid"
    assert "escalation.normal_below" in str(caught.value)
    assert MANIFEST.key in str(caught.value)


def test_a_mirrored_image_is_out_of_scope_with_the_shipped_profile() -> None:
    """``assess_scope`` adds ``looks_mirrored`` where the manifest turns the check on."""
    classifier = Classifier(BUNDLE)
    assert classifier.profile.mirror_margin == 1.05
    use = classifier.manifest.intended_use
    buffer = io.BytesIO()
    phantom_dataset(77, 3).save_as(buffer, enforce_file_format=True)
    phantom = load_image(buffer.getvalue())
    unit = to_unit_image(phantom, classifier.manifest.preprocessing)
    mirrored = np.ascontiguousarray(unit[:, ::-1])
    assert assess_scope(phantom.info, unit, use, classifier.profile).findings == ()
    scope = assess_scope(phantom.info, mirrored, use, classifier.profile)
    assert scope.findings == ("looks_mirrored",)
    assert decide(0.0, THRESHOLDS, scope) == Decision(ESCALATE, "out_of_scope")
    without = replace(classifier.profile, mirror_margin=None)
    assert assess_scope(phantom.info, mirrored, use, without).findings == ()
    # An image unlike a chest either way round is atypical, not "mirrored".
    blank = np.zeros_like(mirrored)
    assert assess_scope(phantom.info, blank, use, classifier.profile).findings == (
        "atypical_input",
    )


def test_every_scope_finding_has_words_for_the_clinician() -> None:
    """The GUI explains an out-of-scope result from these: a code added to the checks
    without its text would show as a bare code."""
    source = Path(policy.__file__).read_text(encoding="utf-8")
    reported = set(re.findall(r'findings(?:\.append\(| \+= \()"([a-z_]+)"', source))
    assert len(reported) >= 9
    assert reported == set(SCOPE_FINDING_TEXT)
    assert describe_findings(["body_part_missing", "something_new"]) == (
        "no body part in the header; something new"
    )
