"""Calibration maths: AUROC, ECE, temperature fitting and the choice of thresholds."""

from __future__ import annotations

import itertools
import math

import numpy as np
import numpy.typing as npt
import pytest

from models.training.calibrate import (
    auroc,
    choose_thresholds,
    expected_calibration_error,
    fit_temperature,
    operating_point,
)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def _brute_force_auroc(scores: FloatArray, labels: IntArray) -> float:
    """P(score of a positive > score of a negative) + 0.5 P(tie), over every pair."""
    positives, negatives = scores[labels == 1], scores[labels == 0]
    wins = sum(
        1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(positives, negatives)
    )
    return wins / (len(positives) * len(negatives))


def _sigmoid(x: FloatArray) -> FloatArray:
    return np.asarray(1.0 / (1.0 + np.exp(-x)), dtype=np.float64)


# --- auroc ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_auroc_matches_a_pairwise_count_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 120))
    labels = rng.integers(0, 2, n)
    # Coarse scores make many ties, within and across the classes.
    scores = np.round(rng.random(n) * 0.6 + 0.3 * labels, 1).astype(np.float64)
    assert auroc(scores, labels) == pytest.approx(_brute_force_auroc(scores, labels), abs=1e-12)


def test_auroc_of_continuous_scores_matches_a_pairwise_count() -> None:
    rng = np.random.default_rng(42)
    labels = rng.integers(0, 2, 200)
    scores = rng.normal(0.0, 1.0, 200) + labels
    assert auroc(scores, labels) == pytest.approx(_brute_force_auroc(scores, labels), abs=1e-12)


def test_auroc_extremes() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    assert auroc(np.array([0.1, 0.2, 0.3, 0.4, 0.5]), labels) == 1.0
    assert auroc(np.array([0.5, 0.4, 0.3, 0.2, 0.1]), labels) == 0.0
    assert auroc(np.full(5, 0.7), labels) == 0.5  # all tied
    assert math.isnan(auroc(np.array([0.1, 0.2]), np.array([1, 1])))
    assert math.isnan(auroc(np.array([0.1, 0.2]), np.array([0, 0])))


def test_auroc_ignores_input_order() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 80)
    scores = np.round(rng.random(80), 2)
    order = rng.permutation(80)
    assert auroc(scores[order], labels[order]) == pytest.approx(auroc(scores, labels))


# --- expected calibration error ---------------------------------------------------------------


def test_ece_is_near_zero_for_calibrated_scores() -> None:
    rng = np.random.default_rng(0)
    scores = rng.random(200_000)
    labels = (rng.random(200_000) < scores).astype(np.int64)  # P(label = 1 | score) = score
    assert expected_calibration_error(scores, labels) < 0.01


def test_ece_is_large_for_overconfident_scores() -> None:
    rng = np.random.default_rng(0)
    truth = rng.random(100_000)
    labels = (rng.random(100_000) < truth).astype(np.int64)
    overconfident = np.where(truth > 0.5, 0.99, 0.01)
    assert expected_calibration_error(overconfident, labels) > 0.2


def test_ece_of_a_constant_score_is_its_distance_from_the_base_rate() -> None:
    labels = np.array([1] * 30 + [0] * 70)
    assert expected_calibration_error(np.full(100, 0.9), labels) == pytest.approx(0.6)


def test_ece_weights_bins_by_their_share() -> None:
    # Two bins: 0.1 for 80 samples with 30 % positives, 0.8 for 20 samples with 80 % positives.
    scores = np.array([0.1] * 80 + [0.8] * 20)
    labels = np.array([1] * 24 + [0] * 56 + [1] * 16 + [0] * 4)
    expected = 0.8 * abs(0.1 - 0.3) + 0.2 * abs(0.8 - 0.8)
    assert expected_calibration_error(scores, labels) == pytest.approx(expected)


def test_ece_handles_scores_at_zero_and_one() -> None:
    scores = np.array([0.0, 0.0, 1.0, 1.0])
    labels = np.array([0, 0, 1, 1])
    assert expected_calibration_error(scores, labels) == pytest.approx(0.0)
    assert expected_calibration_error(scores, 1 - labels) == pytest.approx(1.0)


# --- temperature ------------------------------------------------------------------------------


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.5, 6.0])
def test_fit_temperature_recovers_the_generating_temperature(true_temperature: float) -> None:
    rng = np.random.default_rng(int(true_temperature * 10))
    n = 20_000
    margin = rng.normal(0.0, 3.0 * true_temperature, n)  # confident-looking raw logits
    logits = np.stack([-margin / 2, margin / 2], axis=1)
    # The truth: P(abnormal) = softmax(logits / T)[1] = sigmoid(margin / T).
    labels = (rng.random(n) < _sigmoid(margin / true_temperature)).astype(np.int64)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.1)


def test_fitted_temperature_minimises_the_negative_log_likelihood() -> None:
    rng = np.random.default_rng(9)
    margin = rng.normal(0.0, 4.0, 3000)
    logits = np.stack([np.zeros_like(margin), margin], axis=1)
    labels = (rng.random(3000) < _sigmoid(margin / 1.8)).astype(np.int64)

    def nll(t: float) -> float:
        p = _sigmoid(margin / t)
        return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))

    fitted = fit_temperature(logits, labels)
    for other in (fitted * 0.9, fitted * 1.1, 1.0, 3.0):
        assert nll(fitted) <= nll(other) + 1e-9


def test_calibrated_scores_have_a_small_ece() -> None:
    rng = np.random.default_rng(4)
    margin = rng.normal(0.0, 8.0, 50_000)
    labels = (rng.random(50_000) < _sigmoid(margin / 4.0)).astype(np.int64)
    logits = np.stack([np.zeros_like(margin), margin], axis=1)
    raw_ece = expected_calibration_error(_sigmoid(margin), labels)
    t = fit_temperature(logits, labels)
    calibrated_ece = expected_calibration_error(_sigmoid(margin / t), labels)
    assert calibrated_ece < 0.02 < raw_ece


# --- operating point and thresholds -------------------------------------------------------------


def _local_stats(
    scores: FloatArray, labels: IntArray, low: float, high: float
) -> tuple[float, float]:
    """(local share, local error rate), counted one case at a time."""
    local = errors = 0
    for score, label in zip(scores, labels, strict=True):
        if score < low:
            local += 1
            errors += int(label == 1)
        elif score >= high:
            local += 1
            errors += int(label == 0)
    return local / len(scores), (errors / local if local else 0.0)


def _small_problem(seed: int, n: int = 60) -> tuple[FloatArray, IntArray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = np.round(_sigmoid(rng.normal(0.0, 1.5, n) + 2.5 * (labels - 0.5)), 3).astype(
        np.float64
    )
    return scores, labels


def test_operating_point_counts_cases() -> None:
    scores = np.array([0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.2])
    labels = np.array([0, 1, 0, 1, 0, 1, 1, 0])
    point = operating_point(scores, labels, 0.25, 0.8)
    # Local normal: 0.05 (0), 0.1 (1: missed), 0.2 (0). Local abnormal: 0.9 (1), 0.95 (1).
    assert point.local_share == pytest.approx(5 / 8)
    assert point.local_error_rate == pytest.approx(1 / 5)
    assert point.missed_abnormal_rate == pytest.approx(1 / 4)
    assert set(point.to_json()) == {
        "normal_below",
        "abnormal_at_or_above",
        "local_share",
        "local_error_rate",
        "missed_abnormal_rate",
    }


@pytest.mark.parametrize(("seed", "budget"), [(0, 0.0), (1, 0.05), (2, 0.15), (3, 0.05)])
def test_choose_thresholds_is_optimal_within_the_budget(seed: int, budget: float) -> None:
    scores, labels = _small_problem(seed)
    chosen = choose_thresholds(scores, labels, budget)
    share, error = _local_stats(scores, labels, chosen.normal_below, chosen.abnormal_at_or_above)
    assert chosen.normal_below <= chosen.abnormal_at_or_above
    assert error <= budget + 1e-12
    assert chosen.local_share == pytest.approx(share)
    assert chosen.local_error_rate == pytest.approx(error)

    # Brute force over every achievable split: thresholds at each score, and at 0 and above 1.
    cuts = sorted({0.0, 1.01, *scores.tolist()})
    best = 0.0
    for low, high in itertools.combinations_with_replacement(cuts, 2):
        share_b, error_b = _local_stats(scores, labels, low, high)
        if error_b <= budget:
            best = max(best, share_b)
    assert chosen.local_share == pytest.approx(best)


def test_choose_thresholds_beats_hand_picked_pairs() -> None:
    scores, labels = _small_problem(11, n=120)
    budget = 0.1
    chosen = choose_thresholds(scores, labels, budget)
    within_budget = 0
    for pair in [(0.1, 0.9), (0.2, 0.8), (0.3, 0.6), (0.05, 0.95), (0.5, 0.5), (0.15, 0.7)]:
        share, error = _local_stats(scores, labels, *pair)
        if error <= budget:
            within_budget += 1
            assert chosen.local_share >= share, pair
    assert within_budget >= 3  # the comparison is not vacuous


def test_separable_scores_are_all_decided_locally() -> None:
    scores = np.array([0.01, 0.1, 0.2, 0.35, 0.6, 0.7, 0.8, 0.99])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    chosen = choose_thresholds(scores, labels, 0.0)
    assert chosen.local_share == 1.0
    assert chosen.local_error_rate == 0.0
    assert 0.35 < chosen.normal_below <= chosen.abnormal_at_or_above <= 0.6


def test_hopeless_scores_keep_nothing_local() -> None:
    # Perfectly wrong scores: any local decision is an error, so nothing may be local.
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    labels = np.array([1, 1, 1, 0, 0, 0])
    chosen = choose_thresholds(scores, labels, 0.0)
    assert chosen.local_share == 0.0
    assert _local_stats(scores, labels, chosen.normal_below, chosen.abnormal_at_or_above)[0] == 0.0


def test_a_saturated_wrong_score_falls_back_to_the_most_conservative_pair() -> None:
    """A normal case scoring exactly 1.0 is local under every pair (high <= 1.0, score >= high):
    no pair meets the budget, so the choice is the pair that keeps the least local."""
    scores = np.array([0.2, 0.5, 1.0])  # 1.0: softmax saturates once the logit margin is > ~37
    labels = np.array([1, 0, 0])
    chosen = choose_thresholds(scores, labels, 0.0)
    assert (chosen.normal_below, chosen.abnormal_at_or_above) == (0.0, 1.0)
    assert chosen.local_share == pytest.approx(1 / 3)
