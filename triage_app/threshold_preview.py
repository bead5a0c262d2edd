"""What a pair of thresholds would do, measured on a labelled validation folder (issue #6.6).

An admin choosing thresholds wants two figures before saving: how many cases the device would
escalate, and how often its local decisions would be wrong. The folder is scored once with the
current model through the real pipeline (:func:`score_folder`, slow: run it off the UI thread);
then :func:`figures` and :func:`risk_coverage` recount for any thresholds with
:func:`triage_app.policy.decide` itself, so the preview can never drift from what the device does.

Folder format: DICOM files plus their truth, either ``labels.jsonl`` as the project's phantom
generator writes it (one ``{"file": ..., "label": ...}`` object per line) or ``truth.json``
(file name → label) as in the bundled demo data. Labels are ``normal``, ``abnormal`` or
``out_of_scope``; files without a label, or that cannot be triaged, are counted and left out.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from triage_app.errors import ConfigError
from triage_app.inputs import expand_inputs
from triage_app.model.manifest import Thresholds
from triage_app.pipeline import PipelineConfig, TriagePipeline
from triage_app.policy import ABNORMAL, ESCALATE, ScopeAssessment, decide
from triage_app.results import CaseResult
from triage_app.synthetic import write_phantom_set

__all__ = [
    "HOLDOUT_COUNT",
    "HOLDOUT_SEED",
    "LABELS_FILE",
    "TRUTH_FILE",
    "CurvePoint",
    "LabelledScore",
    "PreviewFigures",
    "ScoredFolder",
    "ScoringCancelledError",
    "ensure_holdout",
    "figures",
    "labels_of",
    "read_truth",
    "risk_coverage",
    "score_folder",
]

log = logging.getLogger(__name__)

LABELS_FILE = "labels.jsonl"
TRUTH_FILE = "truth.json"
LABELS = ("normal", "abnormal", "out_of_scope")

#: The seed of the model's evaluation hold-out (models/training/evaluate.py): never used in
#: training or calibration, so the preview is not measured on images the model learnt from.
HOLDOUT_SEED = 4242
HOLDOUT_COUNT = 200

# Symmetric thresholds (t, 1 - t) for the risk–coverage curve: the model's scores crowd near
# 0 and 1, so the sweep is dense there.
_SWEEP = np.concatenate(([0.0], np.geomspace(1e-4, 0.5, 160)))


class ScoringCancelledError(Exception):
    """:func:`score_folder` was cancelled (the settings dialog was closed): no result."""


@dataclass(frozen=True)
class LabelledScore:
    """One validation image: its truth, the model's calibrated score and the scope check."""

    name: str
    label: str  # normal | abnormal | out_of_scope
    score: float
    scope: ScopeAssessment


@dataclass(frozen=True)
class ScoredFolder:
    """A validation folder scored once by one model; the preview's cache."""

    folder: Path
    model_key: str  # name@version
    default_thresholds: Thresholds
    cases: tuple[LabelledScore, ...]
    unlabelled: int  # files without a truth label
    failed: int  # files the pipeline refused


@dataclass(frozen=True)
class PreviewFigures:
    """What ``thresholds`` do on the scored cases."""

    thresholds: Thresholds
    total: int
    escalated: int
    local: int
    local_errors: int

    @property
    def escalated_share(self) -> float:
        return self.escalated / self.total if self.total else 0.0

    @property
    def coverage(self) -> float:
        """Share decided on the device."""
        return self.local / self.total if self.total else 0.0

    @property
    def local_error_rate(self) -> float | None:
        """Wrong local decisions among all local decisions; None when nothing is decided locally."""
        return self.local_errors / self.local if self.local else None


@dataclass(frozen=True)
class CurvePoint:
    coverage: float
    risk: float
    thresholds: Thresholds


def read_truth(folder: Path) -> dict[str, str]:
    """File name → label, from ``labels.jsonl`` or ``truth.json``.

    Raises
    ------
    ConfigError
        When the folder has neither file, or a label is not one of :data:`LABELS`.
    """
    truth: dict[str, str] = {}
    try:
        if (folder / LABELS_FILE).is_file():
            with (folder / LABELS_FILE).open(encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        record = json.loads(line)
                        truth[str(record["file"])] = str(record["label"])
        elif (folder / TRUTH_FILE).is_file():
            document = json.loads((folder / TRUTH_FILE).read_text(encoding="utf-8"))
            truth = {str(name): str(label) for name, label in document.items()}
        else:
            raise ConfigError(f"{folder}: no {LABELS_FILE} or {TRUTH_FILE} with the true labels")
    except (OSError, ValueError, KeyError, AttributeError) as err:
        raise ConfigError(f"{folder}: unreadable truth labels ({err})") from None
    wrong = sorted({label for label in truth.values() if label not in LABELS})
    if wrong:
        raise ConfigError(f"{folder}: unknown labels {wrong}; use one of {', '.join(LABELS)}")
    return truth


def score_folder(
    folder: Path,
    config: PipelineConfig,
    *,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> ScoredFolder:
    """Run every labelled image in ``folder`` through the pipeline once; ``progress(done, total)``.

    The pipeline's own thresholds do not matter here: only the score and the scope are kept.
    ``cancel`` is checked before each image: scoring hundreds of images takes a while, and an
    admin who closes the preview should not leave it running. Raises
    :class:`ScoringCancelledError` once it is set.
    """
    truth = read_truth(folder)
    files = [f for f in expand_inputs([folder]) if f.name not in (LABELS_FILE, TRUTH_FILE)]
    labelled = [f for f in files if f.name in truth]
    pipeline = TriagePipeline(config)
    cases: list[LabelledScore] = []
    failed = 0
    for done, path in enumerate(labelled, start=1):
        if cancel is not None and cancel.is_set():
            raise ScoringCancelledError(f"scoring cancelled after {done - 1} of {len(labelled)}")
        outcome = pipeline.run(path)
        if isinstance(outcome, CaseResult):
            scope = ScopeAssessment(tuple(outcome.scope.get("findings", ())))
            cases.append(LabelledScore(path.name, truth[path.name], outcome.score, scope))
        else:
            failed += 1
        if progress is not None:
            progress(done, len(labelled))
    manifest = pipeline.classifier.manifest
    log.info("validation folder scored: %d cases, %d refused", len(cases), failed)
    return ScoredFolder(
        folder=folder,
        model_key=manifest.key,
        default_thresholds=manifest.thresholds,
        cases=tuple(cases),
        unlabelled=len(files) - len(labelled),
        failed=failed,
    )


def figures(cases: Sequence[LabelledScore], thresholds: Thresholds) -> PreviewFigures:
    """Count escalations and wrong local decisions as :func:`policy.decide` would make them.

    A local decision is wrong when it differs from the label; an out-of-scope image decided
    locally is always wrong.
    """
    escalated = errors = 0
    for case in cases:
        decision = decide(case.score, thresholds, case.scope).decision
        if decision == ESCALATE:
            escalated += 1
        elif case.label == "out_of_scope" or (decision == ABNORMAL) != (case.label == "abnormal"):
            errors += 1
    total = len(cases)
    return PreviewFigures(thresholds, total, escalated, total - escalated, errors)


def risk_coverage(cases: Sequence[LabelledScore]) -> list[CurvePoint]:
    """The risk–coverage curve over symmetric thresholds ``(t, 1 - t)``, by rising coverage.

    Points where nothing is decided locally have no risk and are left out; equal coverages keep
    the first point.
    """
    points: dict[float, CurvePoint] = {}
    for t in _SWEEP:
        low = float(t)
        result = figures(cases, Thresholds(low, 1.0 - low))
        if result.local_error_rate is not None and result.coverage not in points:
            points[result.coverage] = CurvePoint(
                result.coverage, result.local_error_rate, result.thresholds
            )
    return sorted(points.values(), key=lambda p: p.coverage)


def ensure_holdout(
    data_dir: Path, count: int = HOLDOUT_COUNT, *, cancel: threading.Event | None = None
) -> Path:
    """The default validation folder: synthetic hold-out phantoms, rendered on first use.

    Rendered into a temporary folder and renamed, so a crash never leaves a half-written set
    that looks complete. Rendering takes a while, so it goes in small batches and ``cancel``
    is checked between them (:class:`ScoringCancelledError`, and the partial set is removed).
    """
    parent = data_dir / "validation"
    folder = parent / f"synthetic-holdout-{HOLDOUT_SEED}-{count}"
    if (folder / LABELS_FILE).is_file():
        return folder
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".holdout-", dir=parent))
    try:
        _render_holdout(staging, count, cancel)
        staging.replace(folder)
    except ScoringCancelledError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (folder / LABELS_FILE).is_file():  # another process may have won the race
            raise
    log.info("synthetic hold-out rendered: %d images", count)
    return folder


_HOLDOUT_BATCH = 8


def _render_holdout(staging: Path, count: int, cancel: threading.Event | None) -> None:
    """The hold-out set in ``staging``, a batch at a time; its labels file is written last.

    Each batch writes its own labels file, so their lines are gathered and the complete file
    replaces the last batch's (the same lines a single ``write_phantom_set`` call writes).
    """
    lines: list[str] = []
    for start in range(0, count, _HOLDOUT_BATCH):
        if cancel is not None and cancel.is_set():
            raise ScoringCancelledError(f"hold-out rendering cancelled after {start} images")
        batch = min(_HOLDOUT_BATCH, count - start)
        labels = write_phantom_set(staging, HOLDOUT_SEED, batch, start=start)
        lines.extend(labels.read_text(encoding="utf-8").splitlines())
    with (staging / LABELS_FILE).open("w", encoding="utf-8") as out:
        out.write("".join(line + "\n" for line in lines))
        out.flush()
        os.fsync(out.fileno())


def labels_of(cases: Iterable[LabelledScore]) -> Mapping[str, int]:
    """Number of cases per label, for the preview's caption."""
    counts = dict.fromkeys(LABELS, 0)
    for case in cases:
        counts[case.label] += 1
    return counts
