"""One image through the chain, with the shipped model: scope, robustness and sanity of accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom.data
import pytest

from models.training.calibrate import auroc
from tests.helpers import BUNDLE, phantom_dataset, run_cli, write_phantoms
from triage_app.pipeline import PipelineConfig, TriagePipeline
from triage_app.results import CaseResult, FailedInput

KNOWN_CODES = {
    "empty_file",
    "unreadable",
    "not_dicom",
    "truncated",
    "invalid_dicom",
    "no_pixel_data",
    "unsupported_transfer_syntax",
    "corrupt_pixel_data",
    "unsupported_photometric",
    "unprocessable_image",
}


@pytest.fixture(scope="module")
def pipeline() -> TriagePipeline:
    return TriagePipeline(PipelineConfig(BUNDLE, site_secret=b"s" * 32))


def test_every_pydicom_test_file_is_triaged_or_refused_with_a_code(pipeline):
    outcomes = [pipeline.run(path) for path in pydicom.data.get_testdata_files()]
    assert len(outcomes) > 100
    cases = [o for o in outcomes if isinstance(o, CaseResult)]
    failures = [o for o in outcomes if isinstance(o, FailedInput)]
    assert len(cases) > 50
    assert {f.code for f in failures} <= KNOWN_CODES
    # None of pydicom's files is a chest radiograph: nothing may be decided locally.
    assert {c.decision for c in cases} == {"escalate"}
    assert {c.reason for c in cases} == {"out_of_scope"}


def test_a_phantom_is_in_scope(pipeline, tmp_path):
    path = tmp_path / "chest.dcm"
    phantom_dataset(41, 0).save_as(path, enforce_file_format=True)
    result = pipeline.run(path)
    assert isinstance(result, CaseResult)
    assert result.scope["in_scope"] is True
    assert result.scope["input_score"] < result.scope["input_limit"]


def _with_pixels(pixels: np.ndarray, **header: object) -> pydicom.Dataset:
    ds = phantom_dataset(42, 0)
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.BitsStored, ds.HighBit = 16, 15
    for key, value in header.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize(
    ("header", "finding"),
    [
        ({"Modality": "MR"}, "modality_not_intended"),
        ({"Modality": "CT"}, "modality_not_intended"),
        ({"BodyPartExamined": "HEAD"}, "body_part_not_intended"),
    ],
)
def test_header_out_of_scope_is_escalated(pipeline, tmp_path, header, finding):
    ds = phantom_dataset(43, 1)
    for key, value in header.items():
        setattr(ds, key, value)
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    result = pipeline.run(path)
    assert isinstance(result, CaseResult)
    assert (result.decision, result.reason) == ("escalate", "out_of_scope")
    assert finding in result.scope["findings"]


@pytest.mark.parametrize("kind", ["uniform", "noise", "gradient", "head"])
def test_image_unlike_training_data_is_never_called_normal(pipeline, tmp_path, kind):
    """A header that claims DX/CHEST does not make an image a chest radiograph."""
    rng = np.random.default_rng(7)
    shape = (400, 360)
    if kind == "uniform":
        pixels = np.full(shape, 1200)
    elif kind == "noise":
        pixels = rng.integers(0, 4096, shape)
    elif kind == "gradient":
        pixels = np.tile(np.linspace(0, 4000, shape[1]), (shape[0], 1))
    else:
        ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]]
        r = ((ys - 200) / 180) ** 2 + ((xs - 180) / 150) ** 2
        pixels = np.where(r < 1, np.where(r > 0.8, 3000, 1500), 100) + rng.normal(0, 30, shape)
    path = tmp_path / f"{kind}.dcm"
    _with_pixels(np.clip(pixels, 0, 65535), Modality="DX", BodyPartExamined="CHEST").save_as(
        path, enforce_file_format=True
    )
    result = pipeline.run(path)
    assert isinstance(result, CaseResult)
    assert result.decision == "escalate"
    assert "atypical_input" in result.scope["findings"]


def test_accuracy_on_unseen_phantoms_is_sane(tmp_path):
    """The real CLI on phantoms from a seed the model never saw: far better than chance."""
    truth = write_phantoms(tmp_path / "in", seed=9090, count=80)
    run = run_cli("classify", tmp_path / "in", data_dir=tmp_path / "d")
    assert run.returncode == 0, run.stderr
    records = {Path(r["path"]).name: r for r in run.records}
    labels = np.array([truth[name] == "abnormal" for name in records], np.int64)
    scores = np.array([r["score"] for r in records.values()])
    assert auroc(scores, labels) > 0.85
    local = [(truth[n], r["decision"]) for n, r in records.items() if r["decision"] != "escalate"]
    assert len(local) >= 0.5 * len(records)
    errors = sum(1 for label, decision in local if label != decision)
    assert errors <= max(2, 0.05 * len(local))


def test_a_preprocessing_failure_is_refused_with_a_code_not_raised(pipeline, tmp_path, monkeypatch):
    path = tmp_path / "chest.dcm"
    phantom_dataset(44, 0).save_as(path, enforce_file_format=True)

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("degenerate\nimage")

    monkeypatch.setattr("triage_app.pipeline.to_unit_image", broken)
    outcome = pipeline.run(path)
    assert isinstance(outcome, FailedInput)
    assert outcome.code == "unprocessable_image"
    assert "\n" not in outcome.message


@pytest.mark.expect_log_warnings
def test_an_unforeseen_failure_is_a_failed_input_that_names_no_value(
    pipeline, tmp_path, monkeypatch, caplog
):
    """One file's unforeseen failure (here a stage raising with PHI in its message) is that
    file's refusal, not the batch's end; neither the refusal nor the log repeats the message."""
    path = tmp_path / "DOE_JANE.dcm"
    phantom_dataset(44, 1).save_as(path, enforce_file_format=True)

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("DOE^JANE 19800215")

    monkeypatch.setattr("triage_app.pipeline.assess_scope", broken)
    outcome = pipeline.run(path)
    assert isinstance(outcome, FailedInput)
    assert outcome.code == "processing_failed"
    assert "KeyError" in outcome.message and "triage_app/pipeline.py" in outcome.message
    logged = " ".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert "KeyError" in logged
    for text in (outcome.message, logged):
        assert "DOE" not in text and "19800215" not in text
    monkeypatch.undo()
    assert isinstance(pipeline.run(path), CaseResult)  # the next file goes through as usual


class PanicException(BaseException):
    """Stands in for pyo3's PanicException: a BaseException a Rust decoder raises on bad data."""


@pytest.mark.expect_log_warnings
def test_a_base_exception_from_one_file_is_that_files_refusal(pipeline, tmp_path, monkeypatch):
    path = tmp_path / "chest.dcm"
    phantom_dataset(44, 2).save_as(path, enforce_file_format=True)

    def panic(*args: object, **kwargs: object) -> None:
        raise PanicException("index out of bounds")

    monkeypatch.setattr("triage_app.pipeline.assess_scope", panic)
    outcome = pipeline.run(path)
    assert isinstance(outcome, FailedInput)
    assert outcome.code == "processing_failed"
    assert "PanicException" in outcome.message


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit, GeneratorExit])
def test_a_request_to_stop_is_not_taken_for_a_files_failure(pipeline, tmp_path, monkeypatch, stop):
    path = tmp_path / "chest.dcm"
    phantom_dataset(44, 2).save_as(path, enforce_file_format=True)

    def interrupted(*args: object, **kwargs: object) -> None:
        raise stop

    monkeypatch.setattr("triage_app.pipeline.assess_scope", interrupted)
    with pytest.raises(stop):
        pipeline.run(path)
