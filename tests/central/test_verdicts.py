"""GET /v1/cases/{case_id}/verdict: pending, decided by the central model, and who may ask."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
import requests

from tests.central.conftest import (
    CENTRAL_MODEL,
    EDGE_MODEL,
    PHANTOM_SEED,
    SITE_SECRET,
    Central,
    StartCentral,
    TestCase,
    make_case,
    new_device,
)
from tests.central.test_api import assert_refused
from tests.helpers import phantom_dataset
from triage_app.central.verdicts import CentralModel
from triage_app.escalation.envelope import Payload
from triage_app.escalation.keys import DeviceIdentity
from triage_app.model.manifest import load_manifest
from triage_app.pipeline import PipelineConfig, TriagePipeline
from triage_app.results import CaseResult


def wait_for_verdict(central: Central, case: TestCase, device: DeviceIdentity) -> requests.Response:
    deadline = time.monotonic() + 20
    while True:
        response = central.poll(case.case_id, device)
        if response.status_code != 202 or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


def test_verdict_is_pending_without_a_model(central: Central) -> None:
    device = central.register(new_device())
    case = make_case(20)
    assert central.post(case.case_id, central.seal(case, device)).status_code == 201

    response = central.poll(case.case_id, device)

    assert response.status_code == 202, response.text
    assert response.json() == {"case_id": case.case_id, "status": "pending"}
    assert central.get("/v1/health").json()["model"] is None


def test_the_central_model_decides_as_the_edge_pipeline_would(
    start_central: StartCentral, tmp_path: Path
) -> None:
    central = start_central(model_dir=EDGE_MODEL)
    device = central.register(new_device())
    case = make_case(21)
    assert central.post(case.case_id, central.seal(case, device)).status_code == 201

    response = wait_for_verdict(central, case, device)

    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"case_id", "verdict", "score", "model", "decided_at"}
    manifest = load_manifest(EDGE_MODEL)
    assert body["case_id"] == case.case_id
    assert body["model"] == {
        "name": manifest.name,
        "version": manifest.version,
        "sha256": manifest.sha256,
    }
    # The same model on the same pixels through the same preprocessing: the same score as the
    # device's own pipeline on the original (identified) file.
    original = tmp_path / "original.dcm"
    phantom_dataset(PHANTOM_SEED, 21).save_as(original, enforce_file_format=True)
    edge = TriagePipeline(PipelineConfig(EDGE_MODEL, site_secret=SITE_SECRET)).run(original)
    assert isinstance(edge, CaseResult)
    assert body["score"] == pytest.approx(edge.score, abs=1e-6)
    assert body["verdict"] == max(edge.probabilities, key=edge.probabilities.__getitem__)
    [stored] = central.store.cases()
    assert stored.verdict is not None and stored.verdict.verdict == body["verdict"]
    metrics = central.get("/metrics").text
    assert f'triage_central_verdicts_total{{verdict="{body["verdict"]}"}} 1.0' in metrics


def test_the_larger_central_model_gives_a_verdict(start_central: StartCentral) -> None:
    central = start_central(model_dir=CENTRAL_MODEL)
    device = central.register(new_device())
    case = make_case(22)
    assert central.post(case.case_id, central.seal(case, device)).status_code == 201

    response = wait_for_verdict(central, case, device)

    assert response.status_code == 200, response.text
    manifest = load_manifest(CENTRAL_MODEL)
    assert response.json()["model"]["name"] == manifest.name
    assert response.json()["verdict"] in manifest.labels


def test_pending_cases_are_decided_after_a_restart_with_a_model(
    start_central: StartCentral, tmp_path: Path
) -> None:
    data_dir = tmp_path / "server"
    first = start_central(data_dir)
    device = first.register(new_device())
    case = make_case(23)
    assert first.post(case.case_id, first.seal(case, device)).status_code == 201
    assert first.poll(case.case_id, device).status_code == 202
    first.thread.stop()

    second = start_central(data_dir, model_dir=EDGE_MODEL)

    assert wait_for_verdict(second, case, device).status_code == 200


@pytest.mark.expect_log_warnings
def test_an_image_the_model_cannot_read_is_answered_not_left_pending(
    start_central: StartCentral,
) -> None:
    central = start_central(model_dir=EDGE_MODEL)
    device = central.register(new_device())
    good = make_case(24)
    case = TestCase(good.case_id, Payload(good.payload.result_json, b"not a DICOM file"))
    assert central.post(case.case_id, central.seal(case, device)).status_code == 201

    response = wait_for_verdict(central, case, device)

    assert_refused(response, 422, "not_dicom")


def test_only_the_sending_device_may_read_a_verdict(central: Central) -> None:
    device, other = central.register(new_device()), central.register(new_device())
    case = make_case(25)
    assert central.post(case.case_id, central.seal(case, device)).status_code == 201
    path = f"/v1/cases/{case.case_id}/verdict"

    assert_refused(central.poll(case.case_id, other), 404, "unknown_case")
    assert_refused(central.poll("f" * 64, device), 404, "unknown_case")
    assert_refused(central.get(path), 401, "unknown_device")
    assert_refused(central.poll(case.case_id, new_device()), 401, "unknown_device")
    stale = int(time.time()) - 400
    assert_refused(central.poll(case.case_id, device, timestamp=stale), 401, "bad_signature")
    forged = central.poll(case.case_id, other).request.headers
    headers = dict(forged) | {"X-Device-Id": device.device_id}
    response = central.http.get(central.url + path, headers=headers, timeout=30)
    assert_refused(response, 401, "bad_signature")
    central.store.registry.revoke_device(device.device_id)
    assert_refused(central.poll(case.case_id, device), 403, "device_revoked")


def test_central_model_on_stored_bytes() -> None:
    model = CentralModel(EDGE_MODEL)
    case = make_case(26)

    verdict = model.decide(case.case_id, case.payload.dicom)

    assert verdict.case_id == case.case_id
    assert verdict.verdict in ("normal", "abnormal")
    assert 0.0 <= verdict.score <= 1.0
    assert sum(verdict.probabilities.values()) == pytest.approx(1.0)
    assert verdict.model == model.ref


@pytest.mark.parametrize(
    ("change", "finding"),
    [
        ({"Modality": "CT"}, "modality"),  # outside the intended use, by the header
        ({"BodyPartExamined": "HEAD"}, "body part"),
    ],
)
def test_an_image_outside_the_central_models_intended_use_gets_no_label(
    change: dict[str, str], finding: str
) -> None:
    """As on the device: a CT slice gets "out_of_scope", not a chest label from its pixels."""
    model = CentralModel(CENTRAL_MODEL)
    ds = phantom_dataset(26, 0)
    for keyword, value in change.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)

    verdict = model.decide("c" * 64, buffer.getvalue())

    assert verdict.verdict == "out_of_scope", finding
    assert 0.0 <= verdict.score <= 1.0  # the model's score is still reported
