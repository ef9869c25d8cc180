"""Slow start: how a run's first requests grow to the pool, pure (clock readings in).

After TCP's slow start. The first round is ``initial`` requests at once; once
all of it is admitted, each round doubles the one before, its starts spread
over ``admit_s`` so that a 429 comes back before much more is sent. A request
counts as admitted once answered with anything but 429, or once in flight
longer than a 429 takes to come back (``admit_s``: limiters refuse at the
door), so slow answers do not slow the ramp. A spread round follows the one
before as soon as one request of it is admitted (TCP's ACK clock): a pool of
50 fills in two turns of ``admit_s``, where waiting for whole rounds took
three. Slow start is over once a round the size of the pool, not the first,
has a request admitted, or when :class:`batch.congestion.Controller` finds a
shared limit.

A 429 holds further starts until a request sent after it gets through
(answered, or out for two 429 turnarounds), one at a time: a burst limit then
costs only what was already under way, and noise a few milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# A start this close to its release counts as released, so that the clock read after
# waiting the wait says it is over (a virtual clock adding a wait of 1e-17 to 100.0
# would otherwise be told to wait 1e-17 again, for ever).
EPSILON_S = 1e-6


@dataclass
class Start:
    """One request start, as the controller remembers it."""

    at: float
    refused: bool | None = None  # None: not answered yet
    abandoned: bool = False  # ended unanswered (refused is False): it tells nothing


class SlowStart:
    """The rounds of one endpoint's slow start; ``starts[i]`` is the start of seq ``base + i``."""

    def __init__(self, initial: int, max_limit: int, first_seq: int = 0) -> None:
        self.max_limit = max_limit
        self.window = min(initial, max_limit)
        self.round_first = first_seq  # seq of the first start of the current round
        self._at_once = True  # the current round is the first, sent at once
        self._abandoned = 0  # starts of the current round that never reached the server
        self._held_after: int | None = None  # seq of a refused request
        self._next_start = -math.inf  # a round's starts are spread

    def wait_s(self, now: float, starts: list[Start], base: int, *, admit_s: float,
               turnaround_429_s: float) -> float | None:
        """0 if a request may start; else how long to wait; None: slow start is over."""
        if self._held_after is not None:
            wait = self._held_wait(now, starts, base, turnaround_429_s)
            if wait > 0:
                return wait
        # A start that never reached the server (the budget said no, the run stopped, the
        # connection failed) tells nothing: the round still owes that request.
        started = base + len(starts) - self.round_first - self._abandoned
        if started < self.window:
            return max(0.0, self._next_start - now)
        wait = self._round_wait(now, starts[max(0, self.round_first - base):], admit_s)
        if wait > 0:
            return wait
        if self.window >= self.max_limit and not self._at_once:
            return None
        self.window = min(self.max_limit, 2 * self.window)
        self.round_first = base + len(starts)
        self._at_once, self._abandoned = False, 0
        return max(0.0, self._next_start - now)  # what asking again would say

    def _round_wait(self, now: float, sent: list[Start], admit_s: float) -> float:
        """How long the next round waits for the one just sent (``sent``)."""
        # The first round went at once: all of it is judged before more go. A later one
        # was spread, and a 429 to any of it still holds whatever was sent after.
        every = self._at_once
        wait = 0.0 if every else math.inf
        for start in sent:
            if start.refused is None:  # a 429 was judged when it came back
                due = start.at + admit_s - now
                wait = max(wait, due) if every else min(wait, due)
            elif not (every or start.abandoned or start.refused):
                return 0.0  # answered
        return 0.0 if wait == math.inf else max(0.0, wait)

    def on_start(self, now: float, *, turnaround_min_s: float, admit_s: float) -> None:
        """A request starts now."""
        if not self._at_once:
            # A burst limit met mid-round then costs a few 429s, not the rest of it.
            # Spaced from the actual start: a start made late by a busy loop is one whose
            # 429 would come back late too, so the next one is not brought forward.
            self._next_start = now + min(turnaround_min_s / 3, admit_s / self.window)

    def on_abandoned(self, ticket: int) -> None:
        """The request of ``ticket`` ended without an answer from the server."""
        if ticket >= self.round_first:
            self._abandoned += 1

    def on_isolated(self, ticket: int) -> None:
        """The request of ``ticket`` came back 429, taken for noise so far."""
        held = self._held_after
        self._held_after = ticket if held is None else max(held, ticket)

    def _held_wait(self, now: float, starts: list[Start], base: int,
                   turnaround_429_s: float) -> float:
        assert self._held_after is not None
        # Requests sent after one a limit refused come back refused too, within a 429's
        # turnaround; growing meanwhile would only add to that wave.
        until = now - 2.0 * turnaround_429_s + EPSILON_S
        young = math.inf
        for start in starts[max(0, self._held_after + 1 - base):]:
            if start.abandoned:
                continue
            if start.refused is False or (start.refused is None and start.at <= until):
                self._held_after = None  # one got through: that 429 was noise
                return 0.0
            if start.refused is None:
                young = min(young, start.at - until + EPSILON_S)
        return 0.0 if young == math.inf else young  # none under way: send one
