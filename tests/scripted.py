"""An in-process scripted Provider and a virtual-clock event loop, for engine tests.

The provider answers each request from a seeded schedule (latency, 429 with
Retry-After, 5xx, 400, 401, images per answer) and keeps its own books, so
tests judge the engine against an oracle that is not the engine: requests
per job, answers paid, requests sent after a job already succeeded.

:class:`VirtualLoop` is an asyncio loop whose clock jumps to the next timer
whenever nothing is ready, so a schedule spanning hours runs in
milliseconds. With no sockets and no threads (the engine's committer runs
inline here), a loop with nothing ready and no timer can never wake again:
the selector raises :class:`Deadlock` instead of blocking, which turns a
hang into a failing example; a loop that keeps running without time moving
raises :class:`Spinning`.
"""

from __future__ import annotations

import asyncio
import selectors
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from batch.cost import PriceTable
from batch.errors import FatalApiError, RateLimited, RejectedError, ServerError
from batch.imageinfo import DEFAULT_MAX_PIXELS
from batch.jobs import Job
from batch.providers.base import Generation
from batch.sim.images import PngMaker
from batch.storage.base import ImageSink

PNG = PngMaker(0).png(2, 2, b"\x10\x20\x30", b"scripted")


class Deadlock(AssertionError):
    """Nothing is ready and no timer is set: the run would hang for ever."""


class TooLong(AssertionError):
    """Virtual time passed the limit the test computed from its schedule."""


class Spinning(AssertionError):
    """The loop keeps running callbacks without virtual time moving: a busy loop."""


SPIN_LIMIT = 200_000  # loop iterations at one virtual instant; a run of 10 jobs needs hundreds


class _VirtualSelector(selectors.DefaultSelector):  # type: ignore[misc, valid-type]
    def __init__(self, loop: VirtualLoop) -> None:
        super().__init__()
        self._loop = loop
        self._same_instant = 0

    def select(self, timeout: float | None = None) -> list[Any]:
        events: list[Any] = super().select(0)
        if events:
            return events
        if timeout == 0:
            self._same_instant += 1
            if self._same_instant > SPIN_LIMIT:
                raise Spinning(f"{SPIN_LIMIT} loop iterations at t={self._loop.now:.3f}s")
            return []
        self._same_instant = 0
        if timeout is None:
            raise Deadlock(f"nothing can wake the loop at t={self._loop.now:.3f}s")
        self._loop.now += max(timeout, 0.0)
        if self._loop.now > self._loop.limit_s:
            raise TooLong(f"still running at t={self._loop.now:.3f}s > {self._loop.limit_s:.3f}s")
        return []


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time that fails on a deadlock or past ``limit_s``."""

    def __init__(self, limit_s: float = float("inf")) -> None:
        self.now = 0.0
        self.limit_s = limit_s
        super().__init__(_VirtualSelector(self))

    def time(self) -> float:
        return self.now


async def inline(work: Callable[[], None]) -> None:
    """The committer's offload without a thread: a virtual clock must not race a thread."""
    work()


@dataclass(frozen=True)
class Answer:
    """One scripted answer: after ``latency_s``, ``kind`` (ok, 429, 500, 400 or 401)."""

    latency_s: float
    kind: str = "ok"
    images: int = 1
    retry_after_s: float | None = None


@dataclass
class ScriptedProvider:
    """Answers from ``script[job id]`` in order, then ``then`` for every later request."""

    script: Mapping[str, tuple[Answer, ...]]
    prices: PriceTable
    then: Answer = Answer(1.0)
    endless: Answer | None = None  # if set, every request gets this answer
    on_request: Callable[[Job], None] = lambda job: None
    requests: Counter[str] = field(default_factory=Counter)
    answered_ok: set[str] = field(default_factory=set)
    paid_micros: int = 0
    extra_micros: int = 0  # paid for the second and later images of answers
    violations: list[str] = field(default_factory=list)

    def answer(self, job_id: str, n: int) -> Answer:
        if self.endless is not None:
            return self.endless
        scripted = self.script.get(job_id, ())
        return scripted[n] if n < len(scripted) else self.then

    async def generate(self, job: Job, sink: ImageSink) -> Generation:
        n = self.requests[job.id]
        self.requests[job.id] += 1
        if job.id in self.answered_ok:
            self.violations.append(f"request {n + 1} for {job.id}, which already succeeded")
        self.on_request(job)
        answer = self.answer(job.id, n)
        await asyncio.sleep(answer.latency_s)
        if answer.kind == "429":
            raise RateLimited("scripted 429", job_id=job.id, http_status=429,
                              retry_after_s=answer.retry_after_s)
        if answer.kind == "500":
            raise ServerError("scripted 500", job_id=job.id, http_status=500,
                              retry_after_s=answer.retry_after_s)
        if answer.kind == "400":
            raise RejectedError("scripted 400", job_id=job.id, http_status=400)
        if answer.kind == "401":
            raise FatalApiError("scripted 401", job_id=job.id, http_status=401)
        staged = []
        for index in range(answer.images):
            writer = sink.open(job.id, index, max_pixels=DEFAULT_MAX_PIXELS)
            writer.write(PNG)
            staged.append(writer.finish())
        price = self.prices.job_micros(job) or 0
        self.paid_micros += price * answer.images
        self.extra_micros += price * (answer.images - 1)
        self.answered_ok.add(job.id)
        return Generation(tuple(staged), {"total_tokens": 1}, "", answer.latency_s)

    async def close(self) -> None:
        return None
