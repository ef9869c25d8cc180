"""Meters that decide when a request may start.

Each meter has the same small interface (after aiometer): ``await
acquire()`` before a request starts and ``release()`` when it ends. The
engine stacks them in :class:`Limits`:

- :class:`ConcurrencyMeter`: requests in flight, with an adaptive limit that
  halves on a rate limit and grows back by one per ``limit`` successes (AIMD);
- :class:`PauseGate`: one shared pause after a 429, so the whole pool waits
  for the server's ``Retry-After`` instead of each worker finding the limit
  on its own;
- :class:`FirstWave`: with no ``--rpm``, the run's first wave of requests is
  answered before freed slots are reused, so a burst allowance smaller than
  the pool costs one wave of 429s, not two;
- :class:`RateMeter`: a GCRA spacing request starts to ``rpm`` per minute,
  set by ``--rpm`` or learnt from the server's 429s by :class:`RateEstimator`.

The clock is a parameter so tests drive time by hand.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class ConcurrencyMeter:
    """At most ``limit`` holders at once; the limit adapts between 1 and ``max_limit``."""

    def __init__(self, max_limit: int, *, adaptive: bool = True) -> None:
        if max_limit < 1:
            raise ValueError("max_limit must be at least 1")
        self.max_limit = max_limit
        self.limit = max_limit
        self.in_flight = 0
        self.peak = 0
        self._adaptive = adaptive
        self._successes = 0
        self._changed = asyncio.Condition()

    async def acquire(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_flight < self.limit)
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)

    async def release(self) -> None:
        async with self._changed:
            self.in_flight -= 1
            self._changed.notify(1)

    async def on_success(self) -> None:
        """Additive increase: one more slot after ``limit`` successes in a row."""
        if not self._adaptive or self.limit >= self.max_limit:
            return
        self._successes += 1
        if self._successes >= self.limit:
            self._successes = 0
            async with self._changed:
                self.limit += 1
                self._changed.notify(1)
            log.info("concurrency raised to %d", self.limit)

    def on_rate_limited(self) -> None:
        """Multiplicative decrease."""
        self._successes = 0
        if not self._adaptive or self.limit <= 1:
            return
        self.limit = max(1, self.limit // 2)
        log.info("rate limited: concurrency lowered to %d", self.limit)


class PauseGate:
    """A pause shared by every worker: nobody starts a request before ``until``."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self.until = 0.0

    def pause(self, wait_s: float) -> bool:
        """Extend the pause to at least ``wait_s`` from now; True if it was extended."""
        until = self._clock() + wait_s
        if until <= self.until:
            return False
        self.until = until
        return True

    def remaining_s(self) -> float:
        return max(0.0, self.until - self._clock())

    async def acquire(self) -> None:
        while (wait := self.remaining_s()) > 0:
            await asyncio.sleep(wait)

    async def release(self) -> None:
        return None


class FirstWave:
    """The run's first ``size`` requests probe the server before freed slots are reused.

    How large a burst the server accepts is unknown until it answers. When
    answers come back fast, a pool that refills each slot at once has a second
    wave in flight before the first wave's 429s are read, and that wave is
    refused as well. Holding the refill until the first wave is answered (at
    most ``hold_s`` after its first answer) lets those 429s pause the pool
    first. With slow answers (image generation takes tens of seconds) the hold
    costs a few slots at most ``hold_s``, once per run.
    """

    def __init__(self, size: int, hold_s: float = 1.0, clock: Clock = time.monotonic) -> None:
        self.size = size
        self.hold_s = hold_s
        self.started = 0
        self.answered = 0
        self._clock = clock
        self._deadline = 0.0  # hold_s after the first answer
        self._answered_once = asyncio.Event()
        self._over = asyncio.Event()

    @property
    def over(self) -> bool:
        return self._over.is_set()

    async def acquire(self) -> None:
        if self.started < self.size:
            self.started += 1
            return
        await self._answered_once.wait()
        remaining = self._deadline - self._clock()
        if remaining > 0 and not self._over.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._over.wait()
        self._end(f"{self.hold_s:g}s after its first answer")

    async def release(self) -> None:
        """A request of the first wave was answered (or never sent)."""
        if self._over.is_set():
            return
        self.answered += 1
        if not self._answered_once.is_set():
            self._deadline = self._clock() + self.hold_s
            self._answered_once.set()
        if self.answered >= self.size:
            self._end(f"all {self.size} answered")

    def _end(self, why: str) -> None:
        if not self._over.is_set():
            self._over.set()
            log.debug("first wave over: %s", why)


class RateMeter:
    """GCRA without burst: request starts at least ``60 / rpm`` seconds apart.

    No burst, so no sliding 60 s window ever sees more than ``rpm`` starts.
    """

    # Starts leave the client exactly 60/rpm apart but reach the server with
    # network jitter; a 1% margin keeps two of them from landing in one slot.
    MARGIN = 1.01

    def __init__(self, rpm: float, clock: Clock = time.monotonic) -> None:
        if rpm <= 0:
            raise ValueError("rpm must be positive")
        self.rpm = rpm
        self.interval_s = 60.0 / rpm * self.MARGIN
        self._clock = clock
        self._tat = 0.0  # theoretical arrival time of the next allowed start

    def set_rpm(self, rpm: float) -> None:
        self.rpm = rpm
        self.interval_s = 60.0 / rpm * self.MARGIN

    def reserve(self) -> float:
        """Take the next start slot; return how long to wait for it."""
        now = self._clock()
        start = max(self._tat, now)
        self._tat = start + self.interval_s
        return start - now

    async def acquire(self) -> None:
        wait = self.reserve()
        if wait > 0:
            await asyncio.sleep(wait)

    async def release(self) -> None:
        return None


class RateEstimator:
    """Learns a server's rate limit from when it started saying 429.

    A sliding-window or token-bucket limiter that answers 429 with a
    ``Retry-After`` of R seconds after accepting A requests over the last
    ``span`` seconds allows about ``A / (span + R)`` requests per second: the
    oldest accepted request leaves the window R seconds from now. Counting
    starts since the beginning of the run (up to ``horizon_s``) keeps the
    estimate right for a burst at start-up too.
    """

    def __init__(self, horizon_s: float = 60.0, clock: Clock = time.monotonic) -> None:
        self.horizon_s = horizon_s
        self._clock = clock
        self._starts: deque[float] = deque()
        self._refused: deque[float] = deque()
        self._first: float | None = None

    def started(self, at: float) -> None:
        """A request started at ``at`` (counted as accepted unless refused later)."""
        if self._first is None:
            self._first = at
        self._starts.append(at)
        self._trim()

    def refused(self, started_at: float) -> None:
        """The request that started at ``started_at`` was answered 429."""
        bisect.insort(self._refused, started_at)  # answers come back out of order
        self._trim()

    def _trim(self) -> None:
        cutoff = self._clock() - self.horizon_s
        for times in (self._starts, self._refused):
            while times and times[0] < cutoff:
                times.popleft()

    def estimate_rpm(self, retry_after_s: float, at: float) -> float | None:
        """Requests per minute the server seemed to allow when it said 429 at ``at``.

        Call it once the pause is over: by then the other 429s of the same
        burst are back, so requests still counted as accepted really were.
        """
        self._trim()
        if self._first is None:
            return None
        accepted = bisect.bisect_right(self._starts, at) - bisect.bisect_right(self._refused, at)
        if accepted <= 0 or not self._starts:
            return None
        span = at - max(self._starts[0], self._first)
        window = span + max(retry_after_s, 0.0)
        if window <= 0:
            return None
        return 60.0 * accepted / window


# Pace at a little under the rate the server was seen to accept.
RATE_SAFETY = 0.95


@dataclass
class Limits:
    """The meters a request passes, in order: a slot, the shared pause, the rate.

    It also answers a 429: one shared pause, one decrease of the pool per
    burst, and (when ``adaptive``) once the pause is over, pacing at the rate
    the server was seen to accept.
    """

    concurrency: ConcurrencyMeter
    gate: PauseGate
    rate: RateMeter | None = None
    adaptive: bool = True
    estimator: RateEstimator = field(default_factory=RateEstimator)
    first_wave: FirstWave | None = None
    _pending: tuple[float, float] | None = None  # (when the 429 came, its pause)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.concurrency.acquire()
        try:
            wave = self.first_wave
            if wave is not None and wave.over:
                wave = None
            if wave is not None:
                await wave.acquire()
            try:
                await self.gate.acquire()
                self._learn()
                if self.rate is not None:
                    await self.rate.acquire()
                    # A 429 seen while we waited for our turn pauses us too.
                    await self.gate.acquire()
                yield
            finally:
                if wave is not None:
                    await wave.release()
        finally:
            await self.concurrency.release()

    def on_rate_limited(self, pause_s: float, now: float) -> None:
        """A 429 arrived at ``now``; nobody starts a request for ``pause_s``."""
        # The other 429s of the same burst extend the pause but do not shrink
        # the pool again: one decrease per episode, as in AIMD.
        first_of_burst = self.gate.remaining_s() <= 0
        self.gate.pause(pause_s)
        if first_of_burst:
            self.concurrency.on_rate_limited()
            log.info("rate limited (HTTP 429): pausing all requests for %.1fs", pause_s)
        if self.adaptive and self._pending is None:
            self._pending = (now, pause_s)

    def _learn(self) -> None:
        """Once a 429 pause is over, pace the pool at what the server accepted before it."""
        if self._pending is None or self.gate.remaining_s() > 0:
            return
        at, pause = self._pending
        self._pending = None
        estimate = self.estimator.estimate_rpm(pause, at)
        if estimate is None:
            return
        target = max(1.0, estimate * RATE_SAFETY)
        if self.rate is None:
            self.rate = RateMeter(target)
        elif target < self.rate.rpm:
            self.rate.set_rpm(target)
        else:
            return
        log.info("rate limited: pacing requests at %.0f/min, learnt from the 429s", target)
