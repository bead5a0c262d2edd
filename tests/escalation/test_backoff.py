"""Retry timing: full jitter within its bounds, the cap, and the server's Retry-After."""

from __future__ import annotations

import random
import statistics
from datetime import UTC, datetime, timedelta, timezone

import pytest

from triage_app.escalation.backoff import (
    MAX_RETRY_AFTER_S,
    backoff_ceiling,
    full_jitter_delay,
    next_delay,
    parse_retry_after,
)

NOW = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)


def test_ceiling_doubles_then_caps() -> None:
    assert [backoff_ceiling(a, base_s=1, cap_s=60) for a in range(8)] == [
        1,
        2,
        4,
        8,
        16,
        32,
        60,
        60,
    ]
    assert backoff_ceiling(10_000, base_s=0.5, cap_s=30) == 30
    assert backoff_ceiling(3, base_s=0, cap_s=30) == 0
    with pytest.raises(ValueError, match="attempt"):
        backoff_ceiling(-1)


@pytest.mark.parametrize("attempt", [0, 1, 3, 5])
def test_full_jitter_is_uniform_below_the_ceiling(attempt: int) -> None:
    rng = random.Random(1234 + attempt)
    ceiling = 2.0**attempt
    draws = [full_jitter_delay(attempt, base_s=1, cap_s=60, rng=rng) for _ in range(4000)]
    assert all(0 <= d <= ceiling for d in draws)
    # Uniform(0, c): mean c/2, standard deviation c/sqrt(12); 4000 draws keep the sample mean
    # within a few percent, and the draws reach both ends of the range.
    assert statistics.fmean(draws) == pytest.approx(ceiling / 2, rel=0.05)
    assert statistics.pstdev(draws) == pytest.approx(ceiling / 12**0.5, rel=0.05)
    assert min(draws) < 0.02 * ceiling
    assert max(draws) > 0.98 * ceiling


def test_the_cap_holds_for_any_attempt() -> None:
    rng = random.Random(7)
    draws = [full_jitter_delay(a, base_s=1, cap_s=60, rng=rng) for a in range(6, 2000)]
    assert max(draws) <= 60
    assert statistics.fmean(draws) == pytest.approx(30, rel=0.1)


def test_a_seeded_rng_is_reproducible() -> None:
    first = [full_jitter_delay(a, rng=random.Random(99)) for a in range(10)]
    again = [full_jitter_delay(a, rng=random.Random(99)) for a in range(10)]
    assert first == again


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        (" 0 ", 0.0),
        ("-5", 0.0),
        ("Sun, 22 Nov 2026 10:01:30 GMT", 90.0),
        ("Sunday, 22-Nov-26 10:01:30 GMT", 90.0),  # obsolete RFC 850 form
        ("Sun Nov 22 10:01:30 2026", 90.0),  # asctime form
        ("Sun, 22 Nov 2026 09:00:00 GMT", 0.0),  # in the past
        (None, None),
        ("", None),
        ("soon", None),
        ("1.5", None),
        ("Sun, 32 Nov 2026 10:01:30 GMT", None),
        ("１２", None),  # non-ASCII digits are not delta-seconds
    ],
)
def test_parse_retry_after(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header, NOW) == seconds


def test_parse_retry_after_respects_the_clock_zone() -> None:
    cet = NOW.astimezone(timezone(timedelta(hours=1)))
    assert parse_retry_after("Sun, 22 Nov 2026 10:00:10 GMT", cet) == 10.0
    naive_utc = NOW.replace(tzinfo=None)
    assert parse_retry_after("Sun, 22 Nov 2026 10:00:10 GMT", naive_utc) == 10.0


def test_next_delay_never_undercuts_retry_after() -> None:
    rng = random.Random(5)
    for attempt in range(12):
        assert next_delay(attempt, 45.0, rng=rng) >= 45.0
    # A Retry-After shorter than the jitter does not shorten it.
    assert next_delay(3, 0.0, rng=random.Random(3)) == full_jitter_delay(3, rng=random.Random(3))
    assert next_delay(3, None, rng=random.Random(3)) == full_jitter_delay(3, rng=random.Random(3))


def test_next_delay_caps_absurd_retry_after() -> None:
    assert next_delay(0, 10 * 86400, rng=random.Random(1)) == MAX_RETRY_AFTER_S
    assert next_delay(0, 900, max_retry_after_s=300, rng=random.Random(1)) == 300
    assert next_delay(0, float("nan"), base_s=1, cap_s=1, rng=random.Random(1)) <= 1
    assert next_delay(0, -10, base_s=1, cap_s=1, rng=random.Random(1)) <= 1


def test_next_delay_with_a_header_end_to_end() -> None:
    retry_after = parse_retry_after("Sun, 22 Nov 2026 10:05:00 GMT", NOW)
    assert retry_after == 300.0
    delay = next_delay(2, retry_after, base_s=1, cap_s=60, rng=random.Random(0))
    assert delay == 300.0
