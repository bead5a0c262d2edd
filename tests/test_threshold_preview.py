"""The threshold preview: hand-counted figures, and the same counts as the real pipeline."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from tests.helpers import SMALL, write_phantoms
from triage_app.config import Settings
from triage_app.demo_data import demo_data_dir
from triage_app.errors import ConfigError
from triage_app.model.manifest import Thresholds
from triage_app.pipeline import PipelineConfig, TriagePipeline
from triage_app.policy import ActiveThresholds, ScopeAssessment
from triage_app.results import CaseResult
from triage_app.synthetic import write_phantom_set
from triage_app.threshold_preview import (
    HOLDOUT_SEED,
    LABELS_FILE,
    LabelledScore,
    ScoredFolder,
    ScoringCancelledError,
    ensure_holdout,
    figures,
    labels_of,
    read_truth,
    risk_coverage,
    score_folder,
)

IN = ScopeAssessment(())
OUT = ScopeAssessment(("modality_not_intended",))

# name, label, score, scope; the comments give the decision at (0.1, 0.9).
CASES = (
    LabelledScore("a", "normal", 0.01, IN),  # local normal, right
    LabelledScore("b", "normal", 0.30, IN),  # escalated
    LabelledScore("c", "abnormal", 0.60, IN),  # escalated
    LabelledScore("d", "abnormal", 0.95, IN),  # local abnormal, right
    LabelledScore("e", "normal", 0.97, IN),  # local abnormal, wrong
    LabelledScore("f", "abnormal", 0.02, IN),  # local normal, wrong
    LabelledScore("g", "out_of_scope", 0.05, OUT),  # escalated (out of scope)
    LabelledScore("h", "out_of_scope", 0.01, IN),  # local normal: wrong whatever it says
)


def test_figures_by_hand() -> None:
    result = figures(CASES, Thresholds(0.1, 0.9))
    assert (result.total, result.escalated, result.local, result.local_errors) == (8, 3, 5, 3)
    assert result.escalated_share == pytest.approx(3 / 8)
    assert result.coverage == pytest.approx(5 / 8)
    assert result.local_error_rate == pytest.approx(3 / 5)


def test_one_cut_point_decides_everything_in_scope() -> None:
    result = figures(CASES, Thresholds(0.5, 0.5))
    assert (result.escalated, result.local, result.local_errors) == (1, 7, 3)


def test_nothing_local_has_no_error_rate() -> None:
    result = figures(CASES, Thresholds(0.0, 1.0))
    assert (result.escalated, result.local) == (8, 0)
    assert result.local_error_rate is None
    assert figures((), Thresholds(0.1, 0.9)).escalated_share == 0.0


def test_risk_coverage_points_are_the_figures_at_their_thresholds() -> None:
    curve = risk_coverage(CASES)
    assert [p.coverage for p in curve] == sorted({p.coverage for p in curve})
    for point in curve:
        again = figures(CASES, point.thresholds)
        assert point.coverage == again.coverage
        assert point.risk == again.local_error_rate
        assert point.thresholds.normal_below + point.thresholds.abnormal_at_or_above == 1.0
    assert (curve[-1].coverage, curve[-1].risk) == (7 / 8, 3 / 7)  # (0.5, 0.5): all in scope
    assert (curve[0].coverage, curve[0].risk) == (2 / 8, 1 / 2)  # a and h (0.01) first


def test_labels_of_counts_every_label() -> None:
    assert labels_of(CASES) == {"normal": 3, "abnormal": 3, "out_of_scope": 2}


def test_read_truth_formats(tmp_path: Path) -> None:
    (tmp_path / LABELS_FILE).write_text(
        json.dumps({"file": "x.dcm", "label": "abnormal", "seed": 1}) + "\n\n", encoding="utf-8"
    )
    assert read_truth(tmp_path) == {"x.dcm": "abnormal"}
    demo = read_truth(demo_data_dir())
    assert set(demo.values()) <= {"normal", "abnormal", "out_of_scope"}


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "no labels.jsonl or truth.json"),
        ({"truth.json": '{"x.dcm": "maybe"}'}, "unknown labels ['maybe']"),
        ({"truth.json": "[1, 2]"}, "unreadable truth labels"),
        ({LABELS_FILE: '{"label": "normal"}'}, "unreadable truth labels"),
    ],
)
def test_read_truth_refuses_bad_folders(tmp_path: Path, files: dict[str, str], message: str):
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_truth(tmp_path)


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> tuple[ScoredFolder, PipelineConfig]:
    folder = tmp_path_factory.mktemp("validation")
    truth = write_phantoms(folder, 77, 30)
    (folder / "labels.jsonl").write_text(
        "".join(json.dumps({"file": n, "label": label}) + "\n" for n, label in truth.items()),
        encoding="utf-8",
    )
    (folder / "unlabelled.dcm").write_bytes((folder / "p000.dcm").read_bytes())
    (folder / "p001.dcm").write_bytes(b"not dicom")  # labelled, but the pipeline refuses it
    settings = Settings({"paths.data_dir": tmp_path_factory.mktemp("data")})
    config = PipelineConfig.from_settings(settings)
    return score_folder(folder, config), config


def test_score_folder_keeps_scores_labels_and_counts(
    scored: tuple[ScoredFolder, PipelineConfig],
) -> None:
    result, _config = scored
    assert len(result.cases) == 29
    assert (result.unlabelled, result.failed) == (1, 1)
    assert result.model_key.startswith("chest-dx-demo@")
    assert {c.label for c in result.cases} == {"normal", "abnormal"}


@pytest.mark.parametrize("thresholds", [Thresholds(0.02, 0.98), Thresholds(0.3, 0.6)])
def test_figures_equal_what_the_pipeline_decides_per_case(
    scored: tuple[ScoredFolder, PipelineConfig], thresholds: Thresholds
) -> None:
    result, config = scored
    pipeline = TriagePipeline(
        PipelineConfig(
            bundle_dir=config.bundle_dir,
            site_secret=config.site_secret,
            thresholds=ActiveThresholds(thresholds, "settings"),
        )
    )
    truth = read_truth(result.folder)
    decisions = {}
    for case in result.cases:
        outcome = pipeline.run(result.folder / case.name)
        assert isinstance(outcome, CaseResult)
        decisions[case.name] = outcome.decision
    local = {n: d for n, d in decisions.items() if d != "escalate"}
    errors = sum(1 for n, d in local.items() if d != truth[n])
    preview = figures(result.cases, thresholds)
    assert (preview.escalated, preview.local, preview.local_errors) == (
        len(decisions) - len(local),
        len(local),
        errors,
    )


def test_ensure_holdout_renders_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def small_set(directory: Path, seed: int, count: int, *, start: int = 0) -> Path:
        calls.append(seed)
        return write_phantom_set(directory, seed, count, start=start, config=SMALL)

    monkeypatch.setattr("triage_app.threshold_preview.write_phantom_set", small_set)
    folder = ensure_holdout(tmp_path, count=3)
    assert folder == ensure_holdout(tmp_path, count=3)
    assert calls == [HOLDOUT_SEED]
    assert len(read_truth(folder)) == 3
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]


def _small_batches(
    monkeypatch: pytest.MonkeyPatch, after_each: threading.Event | None = None
) -> list[int]:
    """Render small phantoms; returns the batches' first indexes as they are asked for."""
    starts: list[int] = []

    def small_set(directory: Path, seed: int, count: int, *, start: int = 0) -> Path:
        starts.append(start)
        labels = write_phantom_set(directory, seed, count, start=start, config=SMALL)
        if after_each is not None:
            after_each.set()
        return labels

    monkeypatch.setattr("triage_app.threshold_preview.write_phantom_set", small_set)
    return starts


def test_the_holdout_rendered_in_batches_is_the_set_one_call_renders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    starts = _small_batches(monkeypatch)
    folder = ensure_holdout(tmp_path / "data", count=10)
    assert starts == [0, 8]
    whole = write_phantom_set(tmp_path / "whole", HOLDOUT_SEED, 10, config=SMALL)
    assert (folder / LABELS_FILE).read_bytes() == whole.read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        p.name for p in whole.parent.iterdir()
    )


def test_a_cancelled_holdout_stops_between_batches_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing the settings dialog must stop the rendering (Python waits for it at exit)."""
    cancel = threading.Event()
    starts = _small_batches(monkeypatch, after_each=cancel)
    with pytest.raises(ScoringCancelledError):
        ensure_holdout(tmp_path, count=20, cancel=cancel)
    assert starts == [0]
    assert list((tmp_path / "validation").iterdir()) == []


def test_score_folder_stops_when_cancelled(
    scored: tuple[ScoredFolder, PipelineConfig],
) -> None:
    result, config = scored
    cancel = threading.Event()
    done: list[int] = []

    def progress(count: int, _total: int) -> None:
        done.append(count)
        if count == 2:
            cancel.set()

    with pytest.raises(ScoringCancelledError):
        score_folder(result.folder, config, progress=progress, cancel=cancel)
    assert done == [1, 2]
