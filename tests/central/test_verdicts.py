"""GET /v1/cases/{case_id}/verdict: pending, decided by the central model, and who may ask."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.encaps import encapsulate, generate_frames

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
from tests.central.test_storage import open_store, sealed
from tests.dicom.conftest import bundled
from tests.helpers import phantom_dataset
from triage_app.central.storage import Verdict, VerdictFailure
from triage_app.central.verdicts import FAILURE_MESSAGES, CentralModel, VerdictWorker
from triage_app.dicom import load_image
from triage_app.errors import InputError
from triage_app.escalation.envelope import Payload
from triage_app.escalation.keys import DeviceIdentity, ServerKeyRing
from triage_app.escalation.receipt import sign_request
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


def _garbage_rle_image() -> bytes:
    """A DICOM file whose RLE codestream points past its end: the decoder's own text says so."""
    ds = pydicom.dcmread(bundled("MR_small_RLE.dcm"))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[:8] + (10**6).to_bytes(4, "little") + frame[12:]])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.expect_log_warnings
def test_a_case_the_model_cannot_read_is_answered_with_a_fixed_text_and_the_detail_is_logged(
    start_central: StartCentral, caplog: pytest.LogCaptureFixture
) -> None:
    """The 422 message reaches clinicians' screens: never a decoder's or OpenCV's own text."""
    central = start_central(model_dir=EDGE_MODEL)
    device = central.register(new_device())
    dicom = _garbage_rle_image()
    with pytest.raises(InputError) as caught:
        load_image(dicom)
    detail = str(caught.value)
    case = TestCase(make_case(27).case_id, Payload(b"{}", dicom))
    assert central.post(case.case_id, central.seal(case, device)).status_code == 201

    response = wait_for_verdict(central, case, device)

    assert_refused(response, 422, "corrupt_pixel_data")
    message = response.json()["error"]["message"]
    assert message == FAILURE_MESSAGES["corrupt_pixel_data"] != detail
    failure = central.store.get_verdict_failure(case.case_id)
    assert failure is not None and failure.message == message
    logged = [r.getMessage() for r in caplog.records if r.name == "triage_app.central.verdicts"]
    assert any(detail in line for line in logged), logged


def test_a_failure_stored_with_a_librarys_text_is_answered_with_the_fixed_one(
    central: Central,
) -> None:
    """Rows an older server wrote hold the decoder's text; the answer never repeats it."""
    device = central.register(new_device())
    case = make_case(28)
    assert central.post(case.case_id, central.seal(case, device)).status_code == 201
    leaked = "image cannot be prepared for the model: OpenCV(4.10.0) error: (-215) !ssize.empty()"
    central.store.set_verdict_failure(
        VerdictFailure(case.case_id, "unprocessable_image", leaked, "2026-01-01T00:00:00Z")
    )

    response = central.poll(case.case_id, device)

    assert_refused(response, 422, "unprocessable_image")
    assert response.json()["error"]["message"] == FAILURE_MESSAGES["unprocessable_image"]


def test_a_poll_is_told_of_revocation_only_when_correctly_signed(central: Central) -> None:
    """Revocation is checked after the signature: nobody else can tell a revoked device."""
    device, impostor = central.register(new_device()), new_device()
    case = make_case(29)
    assert central.post(case.case_id, central.seal(case, device)).status_code == 201
    central.store.registry.revoke_device(device.device_id)
    path = f"/v1/cases/{case.case_id}/verdict"
    forged = sign_request(impostor, "GET", path, int(time.time())) | {
        "X-Device-Id": device.device_id
    }

    by_impostor = central.http.get(central.url + path, headers=forged, timeout=30)
    stale = central.poll(case.case_id, device, timestamp=int(time.time()) - 400)
    signed = central.poll(case.case_id, device)

    assert_refused(by_impostor, 401, "bad_signature")
    assert_refused(stale, 401, "bad_signature")
    assert_refused(signed, 403, "device_revoked")


def test_a_refused_poll_repeats_no_client_text_but_a_well_formed_device_id(
    central: Central,
) -> None:
    device = central.register(new_device())
    path = f"/v1/cases/{'c' * 64}/verdict"
    injected = {"X-Device-Id": "<b>INJECTED</b> text", "X-Timestamp": "1", "X-Signature": "x"}
    unregistered = new_device()

    echoed = central.http.get(central.url + path, headers=injected, timeout=30)
    shaped = central.poll("c" * 64, unregistered)
    odd_case = central.poll("CASE-of-DOE-JANE", device)
    unknown_case = central.poll("c" * 64, device)

    assert_refused(echoed, 401, "unknown_device")
    assert "INJECTED" not in echoed.text
    assert_refused(shaped, 401, "unknown_device")
    assert unregistered.device_id in shaped.json()["error"]["message"]
    assert_refused(odd_case, 404, "unknown_case")
    assert_refused(unknown_case, 404, "unknown_case")
    assert "DOE" not in odd_case.text and "c" * 64 not in unknown_case.text
    assert odd_case.json() == unknown_case.json()


class SlowModel(CentralModel):
    """The real model, with each case taking a while longer: a backlog to stop in."""

    def __init__(self) -> None:
        super().__init__(EDGE_MODEL)
        self.busy = threading.Event()
        self.decided: list[str] = []

    def decide(self, case_id: str, dicom: bytes) -> Verdict:
        self.busy.set()
        time.sleep(0.2)
        verdict = super().decide(case_id, dicom)
        self.decided.append(case_id)
        return verdict


def test_stop_ends_after_the_case_in_hand_and_the_backlog_is_decided_at_the_next_start(
    tmp_path: Path,
) -> None:
    with open_store(tmp_path) as store:
        device = new_device()
        store.registry.add_device(device.public_key_b64())
        ring = ServerKeyRing.load_or_create(tmp_path / "central")
        cases = [make_case(80 + i) for i in range(6)]
        for case in cases:
            store.accept(sealed(ring, case, device))
        model = SlowModel()
        worker = VerdictWorker(store, model)
        worker.start()
        assert model.busy.wait(30)

        worker.stop(timeout_s=30)

        assert model.decided == [cases[0].case_id]
        assert store.without_verdict() == [c.case_id for c in cases[1:]]
        worker.start()
        assert worker.wait_idle(60)
        worker.stop()
        assert model.decided == [c.case_id for c in cases]
        assert store.without_verdict() == []


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
