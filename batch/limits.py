"""When a request may start: one endpoint's congestion controller, on the event loop.

:class:`Limits` puts :class:`batch.congestion.Controller` (pure: clock readings
and events in, decisions out) behind the two calls the engine makes:

- ``async with limits.slot() as ticket:`` waits until the controller lets a
  request start (a slot in the pool, the shared pause after a rate limit, the
  pace, slow start), then holds the slot for the request;
- ``limits.on_answer(ticket, error)`` once the answer is in: ``None`` for a
  success, else the :class:`~batch.errors.JobError`; a 429 among them is
  judged isolated or a shared limit.

A slot left without an answer (cancelled, stopped) tells the controller
nothing about the server. Waiters queue in order and only those given the
turn ask the controller: a change wakes those already asking and as many
more as there are free slots. With the pool full, the usual state of a long
run, an answer wakes one task rather than all of them (a herd of up to 2 x
concurrency per answer). The first one that starts, or is cancelled, hands
the turn on. Every wait is a plain await on a future that a clock timer, a
change or the waiter before wakes, so cancelling the waiting task (the
engine's stop) ends it at once. The clock is injected (:class:`Clock`):
tests drive time by hand with the same code. One ``Limits`` per endpoint, no
shared state beyond it.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

from batch.congestion import ControlConfig, Controller, Outcome, Verdict
from batch.errors import JobError, RateLimited

log = logging.getLogger(__name__)


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """Monotonic seconds, and a callback after a delay on the same clock."""

    def now(self) -> float: ...

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Timer: ...


class LoopClock:
    """The running event loop's clock (``time.monotonic`` by default)."""

    def now(self) -> float:
        # The loop's own clock, so that timers and readings agree under a virtual loop.
        try:
            return asyncio.get_running_loop().time()
        except RuntimeError:
            return time.monotonic()

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(delay_s, callback)


@dataclass
class Ticket:
    """One request's hold on a slot."""

    seq: int
    answered: bool = False


class Limits:
    """See the module docstring."""

    def __init__(self, config: ControlConfig, clock: Clock | None = None, *,
                 name: str = "") -> None:
        self.config = config
        self.name = name  # the endpoint's, named in the log when a run has several
        self.controller = Controller(config)
        self._clock: Clock = clock or LoopClock()
        self._line: collections.deque[asyncio.Future[None]] = collections.deque()
        # What the waiters given the turn await, in the order they asked.
        self._asking: dict[asyncio.Future[None], None] = {}

    @property
    def peak(self) -> int:
        """The most requests ever in flight at once."""
        return self.controller.peak

    @property
    def in_flight(self) -> int:
        return self.controller.in_flight

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[Ticket]:
        """Wait for the controller's go, then hold a slot until the block ends."""
        await self._turn()
        ticket = Ticket(self.controller.on_start(self._clock.now()))
        try:
            yield ticket
        finally:
            if not ticket.answered:
                self.controller.on_end(ticket.seq, self._clock.now(), None)
            self._changed()

    def on_answer(self, ticket: Ticket, error: JobError | None = None) -> Verdict | None:
        """``ticket``'s request ended: ``error`` is None on success; an error with no
        HTTP status counts as no answer.

        Returns what a 429 was taken for (None for any other answer).
        """
        if ticket.answered:
            return None
        ticket.answered = True
        refused = isinstance(error, RateLimited)
        outcome: Outcome | None = Outcome.REFUSED if refused else Outcome.ADMITTED
        if error is not None and not refused and error.http_status is None:
            # No status to judge by (a connection refused or reset, an input image that
            # would not download, no answer in time, a body cut short): it says nothing of
            # the server's limits, and its turnaround would make 429s look instant.
            outcome = None
        verdict = self.controller.on_end(
            ticket.seq, self._clock.now(), outcome,
            error.retry_after_s if error is not None and refused else None,
            shared_said=isinstance(error, RateLimited) and error.quota_used_up,
        )
        if verdict is Verdict.ISOLATED:
            log.debug("an isolated 429: only its own request waits (%s)", error)
        self._changed()
        return verdict

    async def _turn(self) -> None:
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[None] = loop.create_future()
        self._line.append(turn)
        try:
            if self._line[0] is not turn:
                await turn  # the waiter before hands the turn on
            while True:
                wait = self.controller.wait_s(self._clock.now())
                self._log_events()
                if wait <= 0:
                    return
                woken: asyncio.Future[None] = loop.create_future()
                self._asking[woken] = None
                timer = None
                if wait < math.inf:
                    timer = self._clock.call_later(wait, functools.partial(_wake, woken))
                try:
                    await woken
                finally:
                    self._asking.pop(woken, None)
                    if timer is not None:
                        timer.cancel()
        finally:
            # Started or cancelled: the next in line asks the controller. It runs after
            # this one's start (no await comes between), so it sees that slot taken.
            first = self._line[0] is turn
            self._line.remove(turn)
            if first and self._line:
                _wake(self._line[0])

    def _changed(self) -> None:
        """Something the controller decides on changed: the waiters given the turn look
        again, and as many more as there are free slots (all at once, not one a hop)."""
        self._log_events()
        for woken in list(self._asking):
            _wake(woken)
        free = self.controller.config.max_limit - self.controller.in_flight
        for turn in itertools.islice(self._line, max(0, free)):
            _wake(turn)

    def _log_events(self) -> None:
        events = self.controller.events
        for event in events:
            log.info("%s%s", f"endpoint {self.name}: " if self.name else "", event)
        events.clear()


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def build(concurrency: int, *, rpm: float | None, adaptive: bool, max_pause_s: float,
          clock: Clock | None = None, name: str = "") -> Limits:
    """The limits of one endpoint, from the run's options."""
    return Limits(
        ControlConfig(max_limit=concurrency, adaptive=adaptive, rpm=rpm,
                      max_pause_s=max_pause_s),
        clock, name=name,
    )
