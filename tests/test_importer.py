"""The importer: progress records, cancel, and the summary of what was skipped and why."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.helpers import write_bad_inputs, write_phantoms
from triage_app import pipeline as pipeline_module
from triage_app.config import Settings
from triage_app.dicom import DicomImage
from triage_app.dicom import load_image as load_image_for_real
from triage_app.importer import ImportRun, ImportSummary, SkippedInput, describe_code
from triage_app.store import CaseStore


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("import")
    write_phantoms(root, 61, 6)
    return root, write_bad_inputs(root)


def _settings(tmp_path: Path) -> Settings:
    return Settings({"paths.data_dir": tmp_path / "data", "processing.workers": 1})


def test_progress_counts_every_file_and_the_summary_keeps_codes(
    tmp_path: Path, folder: tuple[Path, dict[str, str]]
) -> None:
    root, bad = folder
    run = ImportRun([root], _settings(tmp_path))
    records = list(run)
    total = 6 + len(bad)
    assert records[0].done == 0 and records[0].total == total and records[0].outcome is None
    assert [r.done for r in records] == list(range(total + 1))
    assert {r.current.name for r in records[1:] if r.current is not None} == {
        p.name for p in root.iterdir()
    }
    summary = run.summary
    assert summary is not None
    assert summary.imported == 6 and sum(summary.decisions.values()) == 6
    assert summary.skipped_by_code() == {code: 1 for code in bad.values()}
    assert not summary.cancelled and summary.not_processed == 0
    with CaseStore.open(_settings(tmp_path).case_store_path) as store:
        assert len(store.list_cases()) == 6
        assert sorted(f.code for f in store.failures()) == sorted(bad.values())


def test_cancel_stops_after_the_current_file(
    tmp_path: Path, folder: tuple[Path, dict[str, str]]
) -> None:
    root, _bad = folder
    cancel = threading.Event()
    run = ImportRun([root], _settings(tmp_path), cancel=cancel)
    seen = 0
    for record in run:
        seen = record.done
        if record.done == 2:
            cancel.set()
    assert seen == 2
    assert run.summary is not None and run.summary.cancelled
    assert run.summary.not_processed == run.summary.total - 2


def test_cancel_before_start_processes_nothing(
    tmp_path: Path, folder: tuple[Path, dict[str, str]]
) -> None:
    cancel = threading.Event()
    cancel.set()
    run = ImportRun([folder[0]], _settings(tmp_path), cancel=cancel)
    assert [r.done for r in run] == [0]
    assert run.summary is not None and run.summary.cancelled
    assert run.summary.imported == 0


def test_headline_and_details() -> None:
    skipped = tuple(SkippedInput(f"/in/x{i}.txt", "not_dicom", "no preamble") for i in range(12))
    summary = ImportSummary(total=1200, imported=1188, skipped=skipped)
    assert summary.headline() == "1,188 imported, 12 skipped: not DICOM"
    mixed = ImportSummary(
        total=5,
        imported=2,
        skipped=(
            SkippedInput("a", "not_dicom", "m"),
            SkippedInput("b", "truncated", "m"),
            SkippedInput("c", "not_dicom", "m"),
        ),
    )
    assert mixed.headline() == "2 imported, 3 skipped (2 not DICOM, 1 truncated)"
    assert mixed.details().splitlines()[0] == "a: not DICOM (not_dicom): m"
    cancelled = ImportSummary(total=10, imported=3, cancelled=True)
    assert cancelled.headline() == "3 imported; cancelled, 7 not processed"


def test_describe_code() -> None:
    assert describe_code("no_pixel_data") == "no pixel data"
    assert describe_code("some_new_code") == "some new code"


# --- one file that raises does not stop the import ------------------------------------------


@pytest.mark.expect_log_warnings
def test_a_file_whose_processing_raises_is_refused_and_the_import_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """As pydicom's BytesLengthException from a malformed PatientID did: the rest is imported."""
    root = tmp_path / "in"
    write_phantoms(root, 62, 4)
    culprit = root / "p001.dcm"
    real_load = load_image_for_real

    def load_image(source: str) -> DicomImage:
        if Path(source) == culprit:
            raise RuntimeError("unexpected: DOE^JANE")
        return real_load(source)

    monkeypatch.setattr(pipeline_module, "load_image", load_image)
    settings = _settings(tmp_path)
    run_ = ImportRun([root], settings)
    records = list(run_)

    assert [r.done for r in records] == [0, 1, 2, 3, 4]
    summary = run_.summary
    assert summary is not None and not summary.cancelled
    assert summary.imported == 3
    (skipped,) = summary.skipped
    assert (skipped.path, skipped.code) == (str(culprit), "processing_failed")
    assert "RuntimeError" in skipped.message
    assert summary.headline() == "3 imported, 1 skipped: could not be processed"
    with CaseStore.open(settings.case_store_path) as store:
        assert len(store.list_cases()) == 3
        assert [(f.path, f.code) for f in store.failures()] == [(str(culprit), "processing_failed")]
    assert "DOE^JANE" not in caplog.text
