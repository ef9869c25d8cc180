"""Gateways on a virtual clock, and a discrete-event run of the pool against them.

The pool is the engine's, minus I/O: ``2 x max_limit`` workers pull jobs, ask the
:class:`~batch.congestion.Controller` when a request may start, and a job answered
429 waits its own ``Retry-After`` (as the retry policy does) before it asks again.
The gateway decides at arrival; a 429 comes back after ``refuse_s``, an admitted
request after the latency. Nothing sleeps: one run of a few thousand requests
takes milliseconds.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from batch.congestion import ControlConfig, Controller, Outcome, Verdict

Factor = Callable[[float], float]  # the limit's multiplier at a time (1.0: as configured)


def steady(_: float) -> float:
    return 1.0


def halves_then_recovers(at: float = 60.0, until: float = 120.0) -> Factor:
    return lambda t: 0.5 if at <= t < until else 1.0


class Gateway:
    """Admits a request arriving at ``now`` (None) or refuses it (the Retry-After)."""

    def arrive(self, now: float) -> float | None:
        raise NotImplementedError

    def capacity(self, t0: float, t1: float) -> float:
        """Requests it can admit over [t0, t1] (inf: no limit)."""
        return math.inf


@dataclass
class Sporadic(Gateway):
    """No real limit: each request is refused with chance ``p`` for reasons of its own."""

    p: float
    rng: random.Random
    retry_after_s: float = 1.0

    def arrive(self, now: float) -> float | None:
        return self.retry_after_s if self.rng.random() < self.p else None


@dataclass
class SlidingWindow(Gateway):
    """At most ``limit * factor(now)`` over any ``window_s``; Retry-After: until one frees."""

    limit: int
    window_s: float
    factor: Factor = steady
    admitted: deque[float] = field(default_factory=deque)

    def arrive(self, now: float) -> float | None:
        while self.admitted and self.admitted[0] <= now - self.window_s:
            self.admitted.popleft()
        cap = max(1, round(self.limit * self.factor(now)))
        if len(self.admitted) >= cap:
            # A tightened limit frees room only when enough old entries leave.
            return self.admitted[len(self.admitted) - cap] + self.window_s - now
        self.admitted.append(now)
        return None

    def capacity(self, t0: float, t1: float) -> float:
        return _integrate(self.factor, t0, t1) * self.limit / self.window_s + self.limit


@dataclass
class TokenBucket(Gateway):
    """Refills ``rate * factor(now)`` tokens per second up to ``burst``; Retry-After: next token."""

    rate: float
    burst: int
    factor: Factor = steady
    tokens: float = -1.0
    at: float = 0.0

    def arrive(self, now: float) -> float | None:
        rate = self.rate * self.factor(now)
        if self.tokens < 0:
            self.tokens = float(self.burst)
        self.tokens = min(float(self.burst), self.tokens + (now - self.at) * rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return None
        return (1.0 - self.tokens) / rate

    def capacity(self, t0: float, t1: float) -> float:
        return _integrate(self.factor, t0, t1) * self.rate + self.burst


def _integrate(factor: Factor, t0: float, t1: float, step: float = 0.5) -> float:
    n = max(1, math.ceil((t1 - t0) / step))
    width = (t1 - t0) / n
    return sum(factor(t0 + (i + 0.5) * width) for i in range(n)) * width


@dataclass
class Result:
    wall_s: float
    done: int
    requests: int
    refused: int
    shared: int  # 429s judged a shared limit
    peak: int
    accepted_at: list[float]  # when each admitted request started
    refused_at: list[float]
    events: list[tuple[float, str]]
    own_wait_s: float  # the longest a job spent waiting out its own Retry-Afters

    @property
    def share_429(self) -> float:
        return self.refused / self.requests if self.requests else 0.0

    def goodput(self, t0: float, t1: float) -> float:
        """Admitted starts per second over [t0, t1)."""
        return sum(t0 <= t < t1 for t in self.accepted_at) / (t1 - t0)

    def refused_between(self, t0: float, t1: float) -> int:
        return sum(t0 <= t < t1 for t in self.refused_at)


def run(gateway: Gateway, jobs: int, config: ControlConfig, *, latency_s: float = 0.0,
        jitter_s: float = 0.0, refuse_s: float = 0.002, seed: int = 0,
        until_s: float = 3600.0) -> Result:
    """Run ``jobs`` through the controller against ``gateway``; every job must end."""
    rng = random.Random(seed)
    ctl = Controller(config)
    ready: deque[int] = deque(range(jobs))
    waits = [0.0] * jobs
    sending: deque[int] = deque()  # jobs held by a worker, ready to send
    workers_free = 2 * config.max_limit  # jobs waiting out a retry hold a worker
    heap: list[tuple[float, int, str, int, float, int]] = []  # time, seq, kind, ticket, value, job
    seq = itertools.count()
    now, done, requests = 0.0, 0, 0
    accepted_at: list[float] = []
    refused_at: list[float] = []
    events: list[tuple[float, str]] = []
    shared = 0
    wake_at = math.inf

    def push(at: float, kind: str, ticket: int = 0, value: float = 0.0, job: int = 0) -> None:
        heapq.heappush(heap, (at, next(seq), kind, ticket, value, job))

    while done < jobs:
        while ready and workers_free:
            sending.append(ready.popleft())
            workers_free -= 1
        while sending:
            wait = ctl.wait_s(now)
            # Asking again changes nothing: a lease server asks twice (before and in a call).
            assert ctl.wait_s(now) == wait, (now, wait, ctl.__dict__)
            if wait > 0:
                if wait < math.inf and now + wait < wake_at:
                    wake_at = now + wait
                    push(wake_at, "wake")
                break
            job = sending.popleft()
            ticket = ctl.on_start(now)
            requests += 1
            retry_after = gateway.arrive(now)
            if retry_after is None:
                accepted_at.append(now)
                push(now + max(latency_s, refuse_s) + jitter_s * rng.random(), "ok", ticket)
            else:
                refused_at.append(now)
                waits[job] += retry_after
                push(now + refuse_s, "429", ticket, retry_after, job)
        events += [(now, text) for text in ctl.events]
        ctl.events.clear()
        if not heap or now > until_s:
            raise AssertionError(f"stuck at t={now:.1f}: {done}/{jobs} done, {ctl.__dict__}")
        now, _, kind, ticket, value, job = heapq.heappop(heap)
        if kind == "wake":
            if now >= wake_at:
                wake_at = math.inf
        elif kind == "ok":
            ctl.on_end(ticket, now, Outcome.ADMITTED)
            done += 1
            workers_free += 1
        elif kind == "429":
            if ctl.on_end(ticket, now, Outcome.REFUSED, value) is Verdict.SHARED:
                shared += 1
            push(now + value, "retry", job=job)
        elif kind == "retry":
            sending.append(job)
    return Result(now, done, requests, len(refused_at), shared, ctl.peak, accepted_at,
                  refused_at, events, max(waits, default=0.0))
