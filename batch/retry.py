"""Retry policy as pure functions: what to do after a failed attempt, and how long to wait.

The engine drives tenacity with :func:`decide` as its retry and wait
callbacks; the decisions take plain values, so they are tested with tables.

Rules (after openai-python's client, made patient for a nightly batch):
- connection errors, timeouts, 408, 409, 5xx and malformed 200s are retried
  until the job has sent ``max_attempts`` requests;
- 429 is retried without using up an attempt; the run gives up on rate
  limiting only after ``max_rate_limit_wait_s`` of continuous 429s (the
  engine owns that clock, since it is shared by the whole pool);
- a 200 without an image is retried ``no_image_attempts - 1`` times;
- a server's own wait (``retry-after-ms``, ``Retry-After`` in seconds or as an
  HTTP date) is honoured up to ``max_server_wait_s``; otherwise the wait is
  exponential with jitter: ``min(base_s * 2**(n-1), cap_s) * (1 - 0.25 * r)``.
"""

from __future__ import annotations

import email.utils
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from batch.errors import JobError, NoImage, RateLimited, RetryableError


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5  # requests per job in one run, 429s not counted
    no_image_attempts: int = 2  # a 200 without an image is worth one more try
    base_s: float = 0.5
    cap_s: float = 30.0
    max_server_wait_s: float = 900.0  # a Retry-After beyond this is clipped to it
    max_rate_limit_wait_s: float = 900.0

    @property
    def max_pause_s(self) -> float:
        """The longest shared 429 pause: a longer one would idle past the stop it asks for."""
        return min(self.max_server_wait_s, self.max_rate_limit_wait_s)


@dataclass(frozen=True)
class Decision:
    retry: bool
    wait_s: float = 0.0
    reason: str = ""  # for the log: why we stop or why we wait


def parse_retry_after(headers: Mapping[str, str], now_s: float) -> float | None:
    """The wait a server asks for, in seconds, or None if it gave none we can read.

    ``headers`` must be case-insensitive (aiohttp's CIMultiDict is) or lower-case.
    ``retry-after-ms`` wins over ``Retry-After``; a date in the past means 0.
    """
    ms = header(headers, "retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
        except ValueError:
            value = -1.0
        if value >= 0 and value == value and value != float("inf"):
            return value
    raw = header(headers, "retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        return max(0.0, when.timestamp() - now_s)
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        return None
    return seconds


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header of a case-insensitive or lower-case mapping, also when written in title case."""
    value = headers.get(name)
    if value is None:
        value = headers.get(name.title())
    return value


def backoff_s(retry_number: int, policy: RetryPolicy, jitter: float) -> float:
    """Exponential backoff for the ``retry_number``-th retry (1-based); ``jitter`` in [0, 1)."""
    exponent = min(max(retry_number - 1, 0), 62)
    return min(policy.base_s * 2.0**exponent, policy.cap_s) * (1.0 - 0.25 * jitter)


def counted_attempts(history: Sequence[JobError]) -> int:
    """Requests that count against ``max_attempts``: every failure but 429."""
    return sum(1 for error in history if not isinstance(error, RateLimited))


def decide(history: Sequence[JobError], policy: RetryPolicy, jitter: float) -> Decision:
    """Whether to send another request after the failures in ``history`` (oldest first)."""
    last = history[-1]
    if not isinstance(last, RetryableError):
        return Decision(False, reason=f"not retryable ({last.type})")
    if isinstance(last, NoImage):
        no_images = sum(1 for error in history if isinstance(error, NoImage))
        if no_images >= policy.no_image_attempts:
            return Decision(False, reason=f"no image in {no_images} answers")
    if not isinstance(last, RateLimited) and counted_attempts(history) >= policy.max_attempts:
        return Decision(False, reason=f"gave up after {policy.max_attempts} attempts")
    if last.retry_after_s is not None:
        cap_s = policy.max_pause_s if isinstance(last, RateLimited) else policy.max_server_wait_s
        wait = min(last.retry_after_s, cap_s)
        return Decision(True, wait, reason=f"server asked to wait {wait:.1f}s")
    # Rate limits back off on their own count, so a burst of 429s does not
    # inflate the wait after a later 5xx, and vice versa.
    if isinstance(last, RateLimited):
        n = sum(1 for error in history if isinstance(error, RateLimited))
    else:
        n = counted_attempts(history)
    return Decision(True, backoff_s(n, policy, jitter), reason="backoff")
