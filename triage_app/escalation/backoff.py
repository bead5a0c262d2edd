"""Retry timing for uploads: full-jitter exponential backoff that honours ``Retry-After``.

Many devices lose the same network at once and come back together; full jitter (a uniform
delay between zero and the exponential ceiling, as in the AWS architecture blog's "Exponential
Backoff and Jitter") spreads their retries instead of having them hit the central server in
lock-step. When the server says how long to wait (``Retry-After`` on 429/503) we never retry
sooner, but a hostile or broken value cannot park the queue for days: it is capped.
"""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

DEFAULT_BASE_S = 1.0
DEFAULT_CAP_S = 60.0
#: The longest ``Retry-After`` we obey; beyond it a value is more likely a bug than a plan.
MAX_RETRY_AFTER_S = 3600.0

# A module-level generator so callers that do not care about reproducibility share one stream.
_default_rng = random.Random()


def backoff_ceiling(
    attempt: int, *, base_s: float = DEFAULT_BASE_S, cap_s: float = DEFAULT_CAP_S
) -> float:
    """``min(cap, base * 2**attempt)`` without overflowing for huge attempt counts."""
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    if base_s < 0 or cap_s < 0:
        raise ValueError("base_s and cap_s must be >= 0")
    # 2**attempt grows without bound; once it passes cap/base the cap decides anyway.
    if base_s == 0:
        return 0.0
    if attempt >= math.log2(max(cap_s / base_s, 1.0)) + 1:
        return cap_s
    return min(cap_s, base_s * 2.0**attempt)


def full_jitter_delay(
    attempt: int,
    *,
    base_s: float = DEFAULT_BASE_S,
    cap_s: float = DEFAULT_CAP_S,
    rng: random.Random | None = None,
) -> float:
    """A delay drawn uniformly from ``[0, min(cap, base * 2**attempt)]``.

    ``attempt`` counts failures so far, from 0. Pass a seeded ``rng`` for reproducible tests.
    """
    ceiling = backoff_ceiling(attempt, base_s=base_s, cap_s=cap_s)
    return (rng or _default_rng).uniform(0.0, ceiling)


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (RFC 9110 §10.2.3), or ``None``.

    Both forms are accepted: delta-seconds (``"120"``) and an HTTP-date
    (``"Wed, 21 Oct 2015 07:28:00 GMT"``). A date in the past means "now" (0). Anything
    unparseable is ``None``, so a broken header falls back to plain backoff instead of failing
    the upload. ``now`` should be timezone-aware; a naive value is taken as UTC.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        return float(int(text))
    if text.startswith("-") and text[1:].isascii() and text[1:].isdigit():
        # Not valid per the RFC, but the intent ("no need to wait") is clear.
        return 0.0
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    reference = now if now.tzinfo is not None else now.replace(tzinfo=UTC)
    return max(0.0, (when - reference).total_seconds())


def next_delay(
    attempt: int,
    retry_after_s: float | None,
    *,
    base_s: float = DEFAULT_BASE_S,
    cap_s: float = DEFAULT_CAP_S,
    max_retry_after_s: float = MAX_RETRY_AFTER_S,
    rng: random.Random | None = None,
) -> float:
    """How long to wait before the next attempt: the jittered backoff, but never less than the
    server's ``Retry-After`` (itself capped at ``max_retry_after_s``)."""
    jittered = full_jitter_delay(attempt, base_s=base_s, cap_s=cap_s, rng=rng)
    if retry_after_s is None or math.isnan(retry_after_s):
        return jittered
    honoured = min(max(retry_after_s, 0.0), max_retry_after_s)
    return max(jittered, honoured)
