"""Calibration and operating points, in numpy only so the evaluation tools can share them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from triage_app.model.classifier import softmax_with_temperature


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises negative log-likelihood on held-out logits."""

    def nll(t: float) -> float:
        probs = softmax_with_temperature(logits, t)
        picked = probs[np.arange(len(labels)), labels]
        return float(-np.mean(np.log(np.clip(picked, 1e-12, None))))

    # Coarse log-grid, then golden-section refinement around the best point.
    grid = np.exp(np.linspace(math.log(0.2), math.log(10.0), 60))
    best = float(grid[int(np.argmin([nll(t) for t in grid]))])
    lo, hi = best / 1.2, best * 1.2
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
    return round((lo + hi) / 2, 4)


def expected_calibration_error(scores: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Binary ECE on the positive-class probability, equal-width bins."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(scores, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = index == b
        if mask.any():
            total += mask.mean() * abs(float(scores[mask].mean()) - float(labels[mask].mean()))
    return total


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve via the rank statistic (ties get average ranks)."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    positives = labels == 1
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass(frozen=True)
class OperatingPoint:
    normal_below: float
    abnormal_at_or_above: float
    local_share: float
    local_error_rate: float
    missed_abnormal_rate: float  # abnormal images decided locally as normal, among all abnormal

    def to_json(self) -> dict[str, float]:
        return {k: round(v, 6) for k, v in self.__dict__.items()}


def operating_point(
    scores: np.ndarray, labels: np.ndarray, low: float, high: float
) -> OperatingPoint:
    local_normal = scores < low
    local_abnormal = scores >= high
    local = local_normal | local_abnormal
    errors = (local_normal & (labels == 1)) | (local_abnormal & (labels == 0))
    n_local = int(local.sum())
    n_abnormal = max(int((labels == 1).sum()), 1)
    return OperatingPoint(
        normal_below=low,
        abnormal_at_or_above=high,
        local_share=n_local / len(scores),
        local_error_rate=float(errors.sum()) / max(n_local, 1),
        missed_abnormal_rate=float((local_normal & (labels == 1)).sum()) / n_abnormal,
    )


def choose_thresholds(
    scores: np.ndarray, labels: np.ndarray, max_local_error: float
) -> OperatingPoint:
    """The widest local region whose error rate on held-out data stays within the budget.

    Candidates are score quantiles; every (low, high) pair is tried, which is cheap for a few
    thousand scores and leaves no doubt that the optimum was found.
    """
    candidates = np.unique(np.round(np.quantile(scores, np.linspace(0, 1, 201)), 4))
    candidates = np.concatenate([[0.0], candidates, [1.0]])
    best: OperatingPoint | None = None
    for i, low in enumerate(candidates):
        for high in candidates[i:]:
            point = operating_point(scores, labels, float(low), float(high))
            if point.local_error_rate <= max_local_error and (
                best is None or point.local_share > best.local_share
            ):
                best = point
    # Nothing qualifies only when a wrong case scores exactly 1.0: then escalate everything.
    return best if best is not None else operating_point(scores, labels, 0.0, 1.0)
