"""De-identification in the pipeline: what an escalated case becomes, and what never leaves.

Uses the shipped model. Escalation is forced with thresholds that leave every score uncertain
(as an admin could set them), so the tests do not depend on what the model thinks of a phantom.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from tests.helpers import BUNDLE, phantom_dataset
from triage_app import pipeline as pipeline_module
from triage_app.batch import record_outcome
from triage_app.dicom import read_dataset
from triage_app.dicom.deidentify import (
    DeidConfig,
    DeidentificationReport,
    Deidentifier,
    ProfileOption,
    load_pixel_clean_rules,
)
from triage_app.dicom.deidentify.files import encode
from triage_app.dicom.pseudonym import case_id_for, patient_pseudonym, pseudonymous_uid
from triage_app.escalation.envelope import Payload
from triage_app.model.manifest import Thresholds
from triage_app.pipeline import PipelineConfig, TriagePipeline
from triage_app.policy import ActiveThresholds
from triage_app.results import CaseResult, InputOutcome
from triage_app.states import CaseState
from triage_app.store import CaseStore

SECRET = b"p" * 32
NAME = "DOE^JOHN"
PATIENT_ID = "MRN4711"
ACCESSION = "ACC99887766"
BIRTH_DATE = "19800215"
SEED = 61
ESCALATED = 1  # a DX phantom of SEED the model finds uncertain
LOCAL = {"normal": 3, "abnormal": 6}  # DX phantoms of SEED it decides with the manifest defaults
EVERYTHING_UNCERTAIN = ActiveThresholds(Thresholds(0.0, 1.0), "settings")
RULE_NAME = "phantom banner"


def escalating_config(deid: DeidConfig | None = None) -> PipelineConfig:
    return PipelineConfig(
        BUNDLE, site_secret=SECRET, thresholds=EVERYTHING_UNCERTAIN, deid=deid or DeidConfig()
    )


@pytest.fixture(scope="module")
def escalating() -> TriagePipeline:
    return TriagePipeline(escalating_config())


@pytest.fixture(scope="module")
def default() -> TriagePipeline:
    return TriagePipeline(PipelineConfig(BUNDLE, site_secret=SECRET))


def write_case(
    folder: Path, index: int = ESCALATED, header: dict[str, object] | None = None
) -> tuple[Path, Dataset]:
    """A phantom with known identifiers (and ``header`` changes) in a neutrally named file."""
    ds = phantom_dataset(SEED, index)
    ds.PatientName = NAME
    ds.PatientID = PATIENT_ID
    ds.AccessionNumber = ACCESSION
    ds.PatientBirthDate = BIRTH_DATE
    for keyword, value in (header or {}).items():
        setattr(ds, keyword, value)
    path = folder / f"case{index}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, ds


def case_result(outcome: InputOutcome) -> CaseResult:
    assert isinstance(outcome, CaseResult), outcome
    return outcome


def state_of(store: CaseStore, result: CaseResult) -> CaseState:
    stored = store.get(result.case_id)
    assert stored is not None
    return stored.state


def expected_payload(path: Path, config: DeidConfig) -> tuple[bytes, DeidentificationReport]:
    """The payload the pipeline should have built: the file de-identified, as a Part 10 file."""
    ds = read_dataset(path)
    report = Deidentifier(SECRET, config).deidentify(ds)
    return encode(ds), report


def assert_payload_is(result: CaseResult, dicom: bytes) -> None:
    """The held payload frames this result's JSON and ``dicom``; its digest is the reference."""
    assert result.payload is not None
    assert result.escalation is not None
    assert result.escalation.payload_sha256 == hashlib.sha256(result.payload).hexdigest()
    framed = Payload.from_bytes(result.payload)
    assert framed.dicom == dicom
    sidecar = json.loads(framed.result_json)
    assert sidecar["case_id"] == result.case_id
    assert "path" not in sidecar
    assert sidecar["escalation"] is None  # written before the escalation is known


def assert_nothing_identifying(result: CaseResult, original: Dataset) -> None:
    text = json.dumps(result.to_json())
    for value in (
        *str(original.PatientName).split("^"),
        PATIENT_ID,
        ACCESSION,
        BIRTH_DATE,
        str(original.SOPInstanceUID),
        str(original.StudyInstanceUID),
        str(original.SeriesInstanceUID),
    ):
        assert value.lower() not in text.lower(), value
    payload = result.payload_json()
    assert "path" not in payload
    assert payload == {k: v for k, v in result.to_json().items() if k not in ("path", "timings_ms")}


# --- Held ---------------------------------------------------------------------------------------


@pytest.mark.expect_log_warnings
def test_an_escalated_image_that_cannot_be_a_payload_is_blocked_not_failed(
    escalating: TriagePipeline, tmp_path: Path
) -> None:
    path, original = write_case(tmp_path)
    ds = read_dataset(path)
    del ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=False)

    result = case_result(escalating.run(path))

    assert result.decision == "escalate"
    assert result.escalation is not None
    assert (result.escalation.state, result.escalation.reason) == ("blocked", "invalid_payload")
    assert result.escalation.payload_sha256 is None
    assert "SOPInstanceUID" in (result.escalation.detail or "")
    assert_nothing_identifying(result, original)


def test_an_escalated_case_is_held_as_its_deidentified_file(
    escalating: TriagePipeline, tmp_path: Path
) -> None:
    path, original = write_case(tmp_path)
    result = case_result(escalating.run(path))

    assert result.decision == "escalate"
    assert result.escalation is not None
    assert (result.escalation.state, result.escalation.reason) == ("held", None)
    payload, report = expected_payload(path, DeidConfig())
    assert_payload_is(result, payload)
    assert result.deidentification == report.to_json()
    assert result.deidentification["patient_pseudonym"] == patient_pseudonym(
        SECRET, f"id:{PATIENT_ID}"
    )
    assert result.deidentification["burned_in_risk"] is False
    assert "gate" in result.timings_ms
    assert_nothing_identifying(result, original)


def test_the_case_id_is_the_digest_of_the_deidentified_instance_uid_and_stable(
    escalating: TriagePipeline, tmp_path: Path
) -> None:
    path, original = write_case(tmp_path)
    first = case_result(escalating.run(path))
    again = case_result(TriagePipeline(escalating_config()).run(path))

    deidentified_uid = pseudonymous_uid(SECRET, str(original.SOPInstanceUID))
    assert first.case_id == case_id_for(deidentified_uid)
    assert first.case_id != case_id_for(str(original.SOPInstanceUID))
    assert again.case_id == first.case_id
    assert first.escalation is not None and again.escalation is not None
    assert again.escalation.payload_sha256 == first.escalation.payload_sha256
    other_site = case_result(
        TriagePipeline(PipelineConfig(BUNDLE, b"o" * 32, thresholds=EVERYTHING_UNCERTAIN)).run(path)
    )
    assert other_site.case_id != first.case_id


def test_retained_uids_are_not_a_gate_finding(tmp_path: Path) -> None:
    deid = DeidConfig(options=frozenset({ProfileOption.RETAIN_UIDS}))
    path, original = write_case(tmp_path)
    result = case_result(TriagePipeline(escalating_config(deid)).run(path))

    assert result.escalation is not None
    assert result.escalation.state == "held"
    assert result.case_id == case_id_for(str(original.SOPInstanceUID))
    payload, _ = expected_payload(path, deid)
    assert str(original.SOPInstanceUID).encode() in payload


# --- Blocked: burned-in text --------------------------------------------------------------------

AT_RISK = [
    ({"Modality": "US"}, "modality"),
    ({"BurnedInAnnotation": "YES"}, "burned_in_annotation"),
]
# A site rule covering each kind of image: by modality, or by the device that made it.
RULE_MATCHERS = {
    "modality": 'modality = "US"',
    "burned_in_annotation": 'manufacturer = "triage-app synthetic"',
}


@pytest.mark.parametrize(("header", "reason"), AT_RISK)
def test_an_image_at_risk_of_burned_in_text_is_blocked(
    escalating: TriagePipeline, tmp_path: Path, header: dict[str, object], reason: str
) -> None:
    path, original = write_case(tmp_path, header=header)
    result = case_result(escalating.run(path))

    assert result.escalation is not None
    assert (result.escalation.state, result.escalation.reason) == ("blocked", "burned_in_risk")
    assert result.escalation.payload_sha256 is None
    assert reason in (result.escalation.detail or "")
    assert result.deidentification["burned_in_risk"] is True
    assert reason in result.deidentification["burned_in_reasons"]
    assert result.deidentification["pixel_clean_rule"] is None
    assert_nothing_identifying(result, original)


@pytest.mark.parametrize(("header", "reason"), AT_RISK)
def test_a_pixel_clean_rule_lets_the_masked_image_be_held(
    tmp_path: Path, header: dict[str, object], reason: str
) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(
        f'[[rule]]\nname = "{RULE_NAME}"\n{RULE_MATCHERS[reason]}\nrectangles = [[0, 0, 64, 16]]\n',
        encoding="utf-8",
    )
    deid = DeidConfig(pixel_rules=load_pixel_clean_rules(rules))
    path, _ = write_case(tmp_path, header=header)
    result = case_result(TriagePipeline(escalating_config(deid)).run(path))

    assert result.escalation is not None
    assert result.escalation.state == "held"
    assert result.deidentification["pixel_clean_rule"] == RULE_NAME
    assert result.deidentification["burned_in_risk"] is False
    assert reason in result.deidentification["burned_in_reasons"]
    payload, _ = expected_payload(path, deid)
    assert_payload_is(result, payload)
    sent = read_dataset(payload)
    assert not np.any(sent.pixel_array[0:16, 0:64])  # the held payload is the masked one
    assert np.any(sent.pixel_array[16:, 64:])
    assert sent.BurnedInAnnotation == "NO"


# --- Blocked: the PHI gate ----------------------------------------------------------------------


def _leaky(where: str) -> object:
    """``Deidentifier.deidentify`` with a bug: it puts an original value back afterwards."""
    real = Deidentifier.deidentify

    def deidentify(self: Deidentifier, ds: Dataset) -> DeidentificationReport:
        report = real(self, ds)
        if where == "description":
            ds.StudyDescription = f"chest {NAME}"
        else:
            item = Dataset()
            item.TextValue = f"patient {PATIENT_ID}"
            ds.ContentSequence = [item]
        return report

    return deidentify


@pytest.mark.expect_log_warnings
@pytest.mark.parametrize(
    ("where", "field", "value"),
    [("description", "PatientName", "JOHN"), ("nested", "PatientID", PATIENT_ID)],
)
def test_the_gate_blocks_what_the_engine_left_and_names_only_the_field(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    where: str,
    field: str,
    value: str,
) -> None:
    monkeypatch.setattr(Deidentifier, "deidentify", _leaky(where))
    path, original = write_case(tmp_path)
    result = case_result(TriagePipeline(escalating_config()).run(path))

    assert result.escalation is not None
    assert (result.escalation.state, result.escalation.reason) == ("blocked", "phi_audit")
    assert result.escalation.payload_sha256 is None
    assert field in (result.escalation.detail or "")
    assert value not in (result.escalation.detail or "")
    assert_nothing_identifying(result, original)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].name == "triage_app.pipeline"
    assert field in errors[0].getMessage()
    for secret in (value, NAME, "DOE", PATIENT_ID):
        assert secret not in caplog.text


# --- The case store -----------------------------------------------------------------------------


@pytest.mark.expect_log_warnings
def test_the_store_keeps_held_and_blocked_cases_apart_with_their_links(
    escalating: TriagePipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held_path, original = write_case(tmp_path)
    at_risk_path, _ = write_case(tmp_path, LOCAL["normal"], {"BurnedInAnnotation": "YES"})
    held = case_result(escalating.run(held_path))
    at_risk = case_result(escalating.run(at_risk_path))
    monkeypatch.setattr(Deidentifier, "deidentify", _leaky("description"))
    leaky_path, _ = write_case(tmp_path, LOCAL["abnormal"])
    leaked = case_result(TriagePipeline(escalating_config()).run(leaky_path))

    with CaseStore.open(tmp_path / "cases.sqlite3") as store:
        for result in (held, at_risk, leaked):
            record_outcome(store, result)
        assert state_of(store, held) == CaseState.ESCALATION_HELD
        assert state_of(store, at_risk) == CaseState.ESCALATION_BLOCKED
        assert state_of(store, leaked) == CaseState.ESCALATION_BLOCKED
        pseudonym = held.deidentification["patient_pseudonym"]
        assert store.original_for("patient", pseudonym) == f"id:{PATIENT_ID}"
        instance = pseudonymous_uid(SECRET, str(original.SOPInstanceUID))
        assert store.original_for("instance", instance) == str(original.SOPInstanceUID)


# --- Decided on the device ----------------------------------------------------------------------


@pytest.mark.parametrize("decision", list(LOCAL))
def test_a_locally_decided_case_is_neither_encoded_nor_gated(
    default: TriagePipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, decision: str
) -> None:
    calls: list[str] = []

    def spy(name: str) -> object:
        def called(*args: object, **kwargs: object) -> object:
            calls.append(name)
            raise AssertionError(f"{name} called for a local decision")

        return called

    monkeypatch.setattr(pipeline_module, "encode", spy("encode"))
    monkeypatch.setattr(pipeline_module, "audit_payload", spy("audit_payload"))
    path, original = write_case(tmp_path, LOCAL[decision])
    result = case_result(default.run(path))

    assert result.decision == decision
    assert result.escalation is None
    assert calls == []
    assert "gate" not in result.timings_ms
    assert result.deidentification["patient_pseudonym"] == patient_pseudonym(
        SECRET, f"id:{PATIENT_ID}"
    )
    assert_nothing_identifying(result, original)
    with CaseStore.open(tmp_path / "cases.sqlite3") as store:
        record_outcome(store, result)
        assert state_of(store, result) == f"local_{decision}"
