"""The retry policy as tables: classification, server waits, backoff."""

from __future__ import annotations

import email.utils
from dataclasses import replace

import pytest

from batch.errors import (
    FatalApiError,
    JobError,
    MalformedResponse,
    NoImage,
    RateLimited,
    RejectedError,
    RequestTimeout,
    ServerError,
    TransportError,
)
from batch.providers.chat_wire import error_for_status
from batch.retry import RetryPolicy, backoff_s, decide, parse_retry_after

NOW = 1_700_000_000.0
POLICY = RetryPolicy(max_attempts=5, base_s=0.5, cap_s=30.0, max_server_wait_s=900.0)


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, RejectedError),
        (404, RejectedError),
        (413, RejectedError),
        (422, RejectedError),
        (401, FatalApiError),
        (402, FatalApiError),
        (403, FatalApiError),
        (408, ServerError),
        (409, ServerError),
        (429, RateLimited),
        (500, ServerError),
        (502, ServerError),
        (503, ServerError),
        (525, ServerError),
        (599, ServerError),
    ],
)
def test_status_classification(status: int, kind: type[JobError]) -> None:
    error = error_for_status(status, {}, b"", job_id="j", now_s=NOW)
    assert type(error) is kind
    assert error.http_status == status
    assert error.job_id == "j"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"Retry-After": "7"}, 7.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"Retry-After": "0"}, 0.0),
        ({"Retry-After": "-3"}, None),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "nan"}, None),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "Retry-After": "9"}, 0.25),
        ({"retry-after-ms": "junk", "Retry-After": "9"}, 9.0),
        ({"Retry-After": email.utils.formatdate(NOW + 30, usegmt=True)}, 30.0),
        ({"Retry-After": email.utils.formatdate(NOW - 30, usegmt=True)}, 0.0),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    got = parse_retry_after(headers, NOW)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, abs=1.0 if "GMT" in str(headers) else 1e-9)


@pytest.mark.parametrize(
    ("n", "jitter", "expected"),
    [
        (1, 0.0, 0.5),
        (2, 0.0, 1.0),
        (3, 0.0, 2.0),
        (1, 0.999, 0.5 * (1 - 0.25 * 0.999)),
        (7, 0.0, 30.0),
        (100, 0.0, 30.0),
        (2, 1.0, 0.75),
    ],
)
def test_backoff(n: int, jitter: float, expected: float) -> None:
    assert backoff_s(n, POLICY, jitter) == pytest.approx(expected)


def _err(kind: type[JobError], retry_after: float | None = None) -> JobError:
    return kind("x", job_id="j", retry_after_s=retry_after)


@pytest.mark.parametrize(
    ("history", "retry", "wait"),
    [
        ([_err(TransportError)], True, 0.5),
        ([_err(RequestTimeout), _err(ServerError)], True, 1.0),
        ([_err(MalformedResponse)] * 4, True, 4.0),
        ([_err(MalformedResponse)] * 5, False, 0.0),
        ([_err(ServerError, 12.0)], True, 12.0),
        ([_err(ServerError, 5000.0)], True, 900.0),
        ([_err(RejectedError)], False, 0.0),
        ([_err(FatalApiError)], False, 0.0),
        ([_err(NoImage)], True, 0.5),
        ([_err(NoImage), _err(NoImage)], False, 0.0),
        # 429s never use up attempts, and back off on their own count.
        ([_err(RateLimited)] * 50, True, 30.0),
        ([_err(RateLimited)] * 10 + [_err(ServerError)], True, 0.5),
        ([_err(ServerError)] * 4 + [_err(RateLimited, 3.0)], True, 3.0),
        ([_err(ServerError)] * 4 + [_err(RateLimited)] * 3 + [_err(ServerError)], False, 0.0),
    ],
)
def test_decide(history: list[JobError], retry: bool, wait: float) -> None:
    decision = decide(history, POLICY, jitter=0.0)
    assert decision.retry is retry
    if retry:
        assert decision.wait_s == pytest.approx(wait)
    assert decision.reason


@pytest.mark.parametrize(("error", "wait"), [
    # A 429 asking for longer than --max-rate-limit-wait waits only that long: its next 429
    # then ends the run (jobs pending) instead of idling past the operator's limit.
    (_err(RateLimited, 3600.0), 60.0),
    (_err(RateLimited, 30.0), 30.0),
    (_err(ServerError, 3600.0), 900.0),  # a 503's Retry-After is not a rate limit
])
def test_a_429_never_waits_past_the_rate_limit_wait(error: JobError, wait: float) -> None:
    policy = replace(POLICY, max_rate_limit_wait_s=60.0)
    assert decide([error], policy, jitter=0.0).wait_s == pytest.approx(wait)
