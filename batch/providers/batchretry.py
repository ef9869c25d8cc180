"""Retries for the batch APIs' control calls (upload, poll, list, download, cancel).

The same policy as a sync request (:func:`batch.retry.decide`: connection
errors, timeouts, 5xx and 429 retried with backoff, the server's own wait
honoured) driven by tenacity; a batch is patient, so the attempts are many.
Not for the create call: it is not idempotent (see batchapi's contract).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, stop_never

from batch.errors import JobError
from batch.retry import RetryPolicy, decide

T = TypeVar("T")
log = logging.getLogger(__name__)

CONTROL_POLICY = RetryPolicy(max_attempts=8, base_s=0.5, cap_s=60.0, max_server_wait_s=300.0)


async def retrying(call: Callable[[], Awaitable[T]],
                   policy: RetryPolicy = CONTROL_POLICY) -> T:
    """``call()``, again while it fails with a retryable JobError; the last error otherwise."""
    history: list[JobError] = []
    rng = random.Random()

    def should_retry(state: RetryCallState) -> bool:
        error = state.outcome.exception() if state.outcome else None
        if not isinstance(error, JobError):
            return False
        history.append(error)
        decision = decide(history, policy, rng.random())
        if decision.retry:
            log.info("batch API call failed (%s); retrying in %.1fs", error, decision.wait_s)
        return decision.retry

    def wait(state: RetryCallState) -> float:
        return decide(history, policy, rng.random()).wait_s

    async def attempt() -> T:  # a coroutine function, so tenacity awaits each try
        return await call()

    result: T = await AsyncRetrying(retry=should_retry, wait=wait, stop=stop_never,
                                    sleep=asyncio.sleep, reraise=True)(attempt)
    return result
