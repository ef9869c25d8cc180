"""Limits on the event loop: slots, the shared pause, the pace, cancellation; time driven by hand.

The waits run on :class:`VirtualClock`, whose timers fire only when the test
advances it, so "still waiting" and "started" are observed, never slept for.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
from collections.abc import Callable

import pytest

from batch.congestion import ControlConfig, Controller, Verdict
from batch.errors import RateLimited, ServerError, TransportError
from batch.limits import Limits, Ticket
from batch.providers import chat_wire


class _Timer:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class VirtualClock:
    """Now and timers by hand: ``advance`` runs the callbacks that fall due."""

    def __init__(self) -> None:
        self.t = 1000.0
        self._due: list[tuple[float, int, _Timer, Callable[[], None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self.t

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> _Timer:
        timer = _Timer()
        heapq.heappush(self._due, (self.t + delay_s, next(self._seq), timer, callback))
        return timer

    async def advance(self, seconds: float) -> None:
        end = self.t + seconds
        while self._due and self._due[0][0] <= end:
            at, _, timer, callback = heapq.heappop(self._due)
            self.t = max(self.t, at)
            if not timer.cancelled:
                callback()
            await _settle()
        self.t = end
        await _settle()


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)  # every ready task gets to run


def _limits(clock: VirtualClock, **options: object) -> Limits:
    config = ControlConfig(**{"max_limit": 4, **options})  # type: ignore[arg-type]
    return Limits(config, clock)


async def _hold(limits: Limits, started: list[Ticket], release: asyncio.Event) -> None:
    async with limits.slot() as ticket:
        started.append(ticket)
        await release.wait()
        limits.on_answer(ticket)


def test_slots_cap_requests_in_flight() -> None:
    async def scenario() -> tuple[int, int]:
        limits = _limits(VirtualClock(), adaptive=False)
        started: list[Ticket] = []
        release = asyncio.Event()
        tasks = [asyncio.create_task(_hold(limits, started, release)) for _ in range(10)]
        await _settle()
        held = len(started)
        release.set()
        await asyncio.gather(*tasks)
        return held, limits.peak

    assert asyncio.run(scenario()) == (4, 4)


def test_a_shared_limit_holds_every_waiter_until_its_retry_after() -> None:
    """The waiter sleeps on the injected clock: advancing it is what lets it start."""

    async def scenario() -> list[str]:
        clock = VirtualClock()
        limits = _limits(clock, adaptive=False, max_limit=8)
        # Four starts in a row refused, each "retry after 30 s": a shared limit.
        holds = [limits.slot() for _ in range(4)]
        tickets = [await hold.__aenter__() for hold in holds]
        error = RateLimited("slow down", retry_after_s=30.0)
        verdicts = [limits.on_answer(ticket, error) for ticket in tickets]
        for hold in holds:
            await hold.__aexit__(None, None, None)
        seen = [",".join(str(v) for v in verdicts)]
        started: list[Ticket] = []
        waiter = asyncio.create_task(_hold(limits, started, asyncio.Event()))
        await clock.advance(29.0)
        seen.append(f"29 s: {'started' if started else 'waiting'}")
        await clock.advance(1.5)
        seen.append(f"30.5 s: {'started' if started else 'waiting'}")
        waiter.cancel()
        return seen

    assert asyncio.run(scenario()) == [
        "isolated,isolated,shared,same_episode", "29 s: waiting", "30.5 s: started",
    ]


def test_an_isolated_429_lets_the_pool_go_on() -> None:
    async def scenario() -> tuple[Verdict | None, bool]:
        clock = VirtualClock()
        limits = _limits(clock, adaptive=False)
        async with limits.slot() as ticket:
            verdict = limits.on_answer(ticket, RateLimited("busy", retry_after_s=60.0))
        started: list[Ticket] = []
        task = asyncio.create_task(_hold(limits, started, asyncio.Event()))
        await _settle()
        task.cancel()
        return verdict, bool(started)

    assert asyncio.run(scenario()) == (Verdict.ISOLATED, True)


def test_cancelling_a_waiter_ends_its_wait_at_once_and_takes_no_slot() -> None:
    """What the engine's stop relies on: a task waiting in slot() is cancellable."""

    async def scenario() -> tuple[bool, int]:
        clock = VirtualClock()
        limits = _limits(clock, adaptive=False, max_limit=1)
        release = asyncio.Event()
        holder = asyncio.create_task(_hold(limits, [], release))
        await _settle()
        waiter = asyncio.create_task(_hold(limits, [], asyncio.Event()))
        await _settle()
        waiter.cancel()
        await _settle()
        cancelled = waiter.cancelled()
        release.set()
        await holder
        return cancelled, limits.in_flight

    assert asyncio.run(scenario()) == (True, 0)


class _CountingController(Controller):
    """Counts its answers to "may one start now?"."""

    asked = 0

    def wait_s(self, now: float) -> float:
        self.asked += 1
        return super().wait_s(now)


def test_an_answer_wakes_one_waiter_not_all_of_them() -> None:
    """A full pool of 4 and 60 waiting: each answer asks the controller about twice
    (the one that starts, and the next in line), not 60 times; they start in order."""

    async def scenario() -> tuple[int, list[int]]:
        limits = Limits(ControlConfig(max_limit=4, adaptive=False), VirtualClock())
        counting = limits.controller = _CountingController(limits.config)
        order: list[int] = []
        releases = [asyncio.Event() for _ in range(64)]

        async def hold(i: int) -> None:
            async with limits.slot() as ticket:
                order.append(i)
                await releases[i].wait()
                limits.on_answer(ticket)

        tasks = [asyncio.create_task(hold(i)) for i in range(64)]
        await _settle()
        counting.asked = 0
        for i in range(8):
            releases[i].set()
            await _settle()
        asked = counting.asked
        for release in releases:
            release.set()
        await asyncio.gather(*tasks)
        return asked, order

    asked, order = asyncio.run(scenario())
    assert asked <= 3 * 8, asked
    assert order[:12] == list(range(12)), order  # in the order they came
    assert sorted(order) == list(range(64))


class _Line(collections.deque[asyncio.Future[None]]):
    """The waiters' line, noting whose turn each future is."""

    def __init__(self) -> None:
        super().__init__()
        self.owner: dict[asyncio.Future[None], asyncio.Task[object] | None] = {}

    def append(self, turn: asyncio.Future[None]) -> None:
        self.owner[turn] = asyncio.current_task()
        super().append(turn)


@pytest.mark.parametrize("cancel", [[0], [1], [0, 1], [1, 2], [0, 1, 2, 3], [5]])
def test_cancelling_waiters_anywhere_in_line_hands_the_turn_on(cancel: list[int]) -> None:
    """Waiters in ``cancel`` are cancelled the moment they are handed the turn, before
    they could take it; the first (asking the controller) also while it waits: none of
    them strands those after it."""

    async def scenario() -> tuple[int, int, int]:
        limits = _limits(VirtualClock(), adaptive=False, max_limit=1)
        line = limits._line = _Line()
        release = asyncio.Event()
        started: list[Ticket] = []
        holder = asyncio.create_task(_hold(limits, started, release))
        await _settle()
        waiters = [asyncio.create_task(_hold(limits, started, release)) for _ in range(6)]
        await _settle()
        doomed = {waiters[i] for i in cancel}
        if 0 in cancel:
            waiters[0].cancel()  # the first in line, asking the controller
        release.set()
        handed = 0
        for _ in range(200):  # every waiter gets to run in turn
            for turn in list(line):
                task = line.owner.get(turn)
                if turn.done() and task in doomed and not task.done():
                    task.cancel()  # handed the turn, not yet run
                    handed += 1
            await asyncio.sleep(0)
        async with asyncio.timeout(10):  # a stranded line would wait forever
            results = await asyncio.gather(holder, *waiters, return_exceptions=True)
        cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
        return len(started) + cancelled, limits.in_flight, handed

    total, in_flight, handed = asyncio.run(scenario())
    assert (total, in_flight) == (7, 0)
    assert handed == len(cancel) - (0 in cancel)  # each doomed one was handed the turn


def test_a_slot_left_without_an_answer_frees_and_judges_nothing() -> None:
    async def scenario() -> tuple[int, float | None]:
        limits = _limits(VirtualClock(), max_limit=2)
        with pytest.raises(asyncio.CancelledError):
            async with limits.slot():
                raise asyncio.CancelledError
        return limits.in_flight, limits.controller.rate

    assert asyncio.run(scenario()) == (0, None)


def test_an_error_without_a_status_is_no_answer_to_the_controller() -> None:
    """A connection reset at once (no HTTP status) is not the server answering in 0 s:
    taken for one, it made 429s look instant and sent slow start's rounds unspaced."""

    async def scenario() -> list[float]:
        clock = VirtualClock()
        limits = _limits(clock, max_limit=64)
        holds = [limits.slot() for _ in range(16)]
        tickets = [await hold.__aenter__() for hold in holds]
        limits.on_answer(tickets[0], TransportError("connection reset by peer"))
        await clock.advance(0.005)
        for ticket in tickets[1:]:
            limits.on_answer(ticket)
        for hold in holds:
            await hold.__aexit__(None, None, None)
        starts: list[float] = []

        async def unanswered() -> None:
            async with limits.slot():
                starts.append(clock.now())
                await asyncio.Event().wait()

        tasks = [asyncio.create_task(unanswered()) for _ in range(8)]
        for _ in range(120):
            await clock.advance(0.001)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return starts

    starts = asyncio.run(scenario())
    assert len(starts) == 8
    assert min(b - a for a, b in itertools.pairwise(starts)) > 0.001  # spaced, as after 5 ms


def test_rpm_spaces_starts_on_the_injected_clock() -> None:
    async def scenario() -> list[float]:
        clock = VirtualClock()
        limits = _limits(clock, rpm=600, max_limit=8)
        starts: list[float] = []

        async def one() -> None:
            async with limits.slot() as ticket:
                starts.append(round(clock.now() - 1000.0, 4))
                limits.on_answer(ticket, ServerError("502"))

        tasks = [asyncio.create_task(one()) for _ in range(5)]
        for _ in range(10):
            await clock.advance(0.05)
        await asyncio.gather(*tasks)
        return starts

    step = round(0.1 * 1.01, 4)
    assert asyncio.run(scenario()) == pytest.approx([0.0, step, 2 * step, 3 * step, 4 * step],
                                                    abs=0.051)


def test_answering_twice_counts_once() -> None:
    async def scenario() -> int:
        limits = _limits(VirtualClock())
        async with limits.slot() as ticket:
            limits.on_answer(ticket)
            assert limits.on_answer(ticket, RateLimited("late")) is None
        return limits.in_flight

    assert asyncio.run(scenario()) == 0


def test_the_log_of_a_shared_limit_names_its_endpoint(caplog: pytest.LogCaptureFixture) -> None:
    """With several endpoints, the operator must see which one is rate limited."""

    async def scenario() -> None:
        limits = Limits(ControlConfig(max_limit=8, adaptive=False), VirtualClock(), name="eu")
        holds = [limits.slot() for _ in range(4)]
        tickets = [await hold.__aenter__() for hold in holds]
        for ticket in tickets:
            limits.on_answer(ticket, RateLimited("slow down", retry_after_s=30.0))
        for hold in holds:
            await hold.__aexit__(None, None, None)

    with caplog.at_level("INFO", logger="batch.limits"):
        asyncio.run(scenario())
    lines = [r.getMessage() for r in caplog.records]
    assert lines and all(line.startswith("endpoint eu: ") for line in lines), lines


@pytest.mark.parametrize(("headers", "verdicts", "paused_s"), [
    # OpenAI's headers name the spent quota: two such 429s in a row pause the pool, where
    # three are needed without them, and the reset is waited when there is no Retry-After.
    ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1.5s"},
     [Verdict.ISOLATED, Verdict.SHARED], 1.5),
    ({"Retry-After": "3", "x-ratelimit-remaining-tokens": "0"},
     [Verdict.ISOLATED, Verdict.SHARED], 3.0),
    # Quota left, or no headers: two 429s in a row are still taken for noise.
    ({"x-ratelimit-remaining-requests": "12", "Retry-After": "3"},
     [Verdict.ISOLATED, Verdict.ISOLATED], 0.0),
    ({"Retry-After": "3"}, [Verdict.ISOLATED, Verdict.ISOLATED], 0.0),
])
def test_429s_that_say_their_quota_is_spent_pause_the_pool_one_refusal_sooner(
    headers: dict[str, str], verdicts: list[Verdict], paused_s: float,
) -> None:
    error = chat_wire.error_for_status(429, headers, b'{"error":{"message":"slow down"}}',
                                       job_id="j", now_s=0.0)

    async def scenario() -> tuple[list[Verdict | None], float]:
        clock = VirtualClock()
        limits = _limits(clock, adaptive=False)
        said = []
        for _ in verdicts:  # one request at a time: each 429 follows the one before
            async with limits.slot() as ticket:
                said.append(limits.on_answer(ticket, error))
        return said, limits.controller.wait_s(clock.now())

    assert asyncio.run(scenario()) == (verdicts, pytest.approx(paused_s))


def test_one_429_that_says_its_quota_is_spent_decides_nothing_alone() -> None:
    """A gateway may say so on every 429 of its own: one such 429 among clean answers
    leaves the pool going."""
    error = chat_wire.error_for_status(429, {"x-ratelimit-remaining-requests": "0"}, b"{}",
                                       job_id="j", now_s=0.0)

    async def scenario() -> list[Verdict | None]:
        clock = VirtualClock()
        limits = _limits(clock, adaptive=False)
        said = []
        for n in range(30):
            async with limits.slot() as ticket:
                said.append(limits.on_answer(ticket, error if n % 10 == 9 else None))
        return said

    assert [v for v in asyncio.run(scenario()) if v is not None] == [Verdict.ISOLATED] * 3
