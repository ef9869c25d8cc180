"""Meters: spacing, shared pauses, adaptive concurrency; the clock is driven by hand."""

from __future__ import annotations

import asyncio
import bisect

import pytest

from batch.limits import (
    ConcurrencyMeter,
    FirstWave,
    Limits,
    PauseGate,
    RateEstimator,
    RateMeter,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_meter_spaces_starts_evenly() -> None:
    clock = FakeClock()
    meter = RateMeter(600, clock=clock)
    waits = [meter.reserve() for _ in range(5)]
    step = 0.1 * RateMeter.MARGIN
    assert waits == pytest.approx([0.0, step, 2 * step, 3 * step, 4 * step])
    clock.now += 10  # idle time does not build up a burst
    assert meter.reserve() == 0.0
    assert meter.reserve() == pytest.approx(step)


@pytest.mark.parametrize("rpm", [1, 7, 60, 600, 6000])
def test_rate_meter_never_exceeds_rpm_in_any_window(rpm: int) -> None:
    clock = FakeClock()
    meter = RateMeter(rpm, clock=clock)
    starts = []
    for _ in range(3 * rpm):
        starts.append(clock.now + meter.reserve())
    for i, start in enumerate(starts):
        in_window = bisect.bisect_left(starts, start + 60.0 - 1e-9) - i
        assert in_window <= rpm


def test_pause_gate_extends_but_never_shortens() -> None:
    clock = FakeClock()
    gate = PauseGate(clock)
    assert gate.pause(5.0)
    assert not gate.pause(2.0)
    assert gate.remaining_s() == pytest.approx(5.0)
    clock.now += 3
    assert gate.pause(4.0)
    assert gate.remaining_s() == pytest.approx(4.0)
    clock.now += 10
    assert gate.remaining_s() == 0.0


def test_concurrency_halves_on_rate_limit_and_grows_back_additively() -> None:
    async def scenario() -> list[int]:
        meter = ConcurrencyMeter(16)
        seen = [meter.limit]
        meter.on_rate_limited()
        seen.append(meter.limit)
        meter.on_rate_limited()
        seen.append(meter.limit)
        for _ in range(4):  # one more slot after `limit` successes
            await meter.on_success()
        seen.append(meter.limit)
        for _ in range(5):
            await meter.on_success()
        seen.append(meter.limit)
        return seen

    assert asyncio.run(scenario()) == [16, 8, 4, 5, 6]


def test_fixed_concurrency_does_not_adapt() -> None:
    meter = ConcurrencyMeter(4, adaptive=False)
    meter.on_rate_limited()
    assert meter.limit == 4


def test_slot_caps_requests_in_flight() -> None:
    async def scenario() -> int:
        limits = Limits(ConcurrencyMeter(3), PauseGate())
        inside = 0
        peak = 0
        release = asyncio.Event()

        async def request() -> None:
            nonlocal inside, peak
            async with limits.slot():
                inside += 1
                peak = max(peak, inside)
                await release.wait()
                inside -= 1

        tasks = [asyncio.create_task(request()) for _ in range(10)]
        while inside < 3:
            await asyncio.sleep(0)
        for _ in range(20):
            await asyncio.sleep(0)  # give the other seven every chance to get in
        release.set()
        await asyncio.gather(*tasks)
        return peak

    assert asyncio.run(scenario()) == 3


@pytest.mark.parametrize(
    ("starts", "refused", "now", "retry_after", "expected_rpm"),
    [
        # 60 accepted in a burst at t=0, then 429 with "wait 6 s": 60 per 6 s.
        ([0.0] * 64, [0.0] * 4, 0.05, 5.95, 600.0),
        # Steady 20/s for 30 s into a 600/min sliding window: the oldest frees in 30 s.
        ([i / 20 for i in range(600)], [], 30.0, 30.0, 600.0),
        # A token bucket of 2/s with a burst of 10, refusing after 20 s.
        ([0.0] * 10 + [0.5 * i for i in range(1, 41)], [], 20.0, 0.5, 146.3),
        # Nothing accepted yet: no evidence.
        ([0.0] * 5, [0.0] * 5, 0.1, 1.0, None),
    ],
)
def test_rate_estimator(
    starts: list[float], refused: list[float], now: float, retry_after: float,
    expected_rpm: float | None,
) -> None:
    clock = FakeClock()
    clock.now = 0.0
    estimator = RateEstimator(clock=clock)
    for at in starts:
        estimator.started(at)
    for at in refused:
        estimator.refused(at)
    clock.now = now + retry_after  # asked once the pause is over
    got = estimator.estimate_rpm(retry_after, at=now)
    if expected_rpm is None:
        assert got is None
    else:
        assert got == pytest.approx(expected_rpm, rel=0.01)


def test_rate_estimator_forgets_beyond_its_horizon() -> None:
    clock = FakeClock()
    clock.now = 0.0
    estimator = RateEstimator(horizon_s=10.0, clock=clock)
    for i in range(100):
        estimator.started(i * 0.1)  # 10/s for 10 s
    clock.now = 100.0
    estimator.started(99.0)
    assert estimator.estimate_rpm(1.0, at=100.0) == pytest.approx(60.0 * 1 / 2.0)


def test_rate_estimator_ignores_what_started_after_the_429() -> None:
    clock = FakeClock()
    clock.now = 0.0
    estimator = RateEstimator(clock=clock)
    for i in range(10):
        estimator.started(float(i))
    estimator.refused(9.0)
    estimator.refused(8.0)  # answers arrive out of order
    clock.now = 12.0
    estimator.started(11.0)  # after the 429 at t=9.5: not evidence about it
    # 8 accepted in [0, 9.5], oldest frees 2 s after the 429: 8 per 11.5 s.
    assert estimator.estimate_rpm(2.0, at=9.5) == pytest.approx(60.0 * 8 / 11.5)


def test_a_burst_of_429s_pauses_once_and_shrinks_the_pool_once() -> None:
    clock = FakeClock()
    limits = Limits(ConcurrencyMeter(64), PauseGate(clock))
    for _ in range(10):  # the rest of the burst comes back a moment later
        limits.on_rate_limited(6.0, clock.now)
        clock.now += 0.01
    assert limits.concurrency.limit == 32
    assert limits.gate.remaining_s() == pytest.approx(6.0 - 0.01, abs=0.02)
    clock.now += 10  # a later episode halves again
    limits.on_rate_limited(1.0, clock.now)
    assert limits.concurrency.limit == 16


def test_pacing_is_learnt_once_the_pause_is_over() -> None:
    async def scenario() -> float | None:
        clock = FakeClock()
        clock.now = 0.0
        limits = Limits(ConcurrencyMeter(64), PauseGate(clock),
                        estimator=RateEstimator(clock=clock))
        for _ in range(64):
            limits.estimator.started(0.0)
        for _ in range(4):
            limits.estimator.refused(0.0)
        limits.on_rate_limited(5.95, 0.05)
        assert limits.rate is None  # not while the pause lasts
        clock.now = 6.0
        async with limits.slot():
            pass
        return limits.rate.rpm if limits.rate else None

    assert asyncio.run(scenario()) == pytest.approx(600.0 * 0.95, rel=0.01)


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)  # every ready task gets to run


def test_first_wave_holds_freed_slots_until_the_wave_is_answered() -> None:
    async def scenario() -> list[str]:
        seen = []
        wave = FirstWave(3, hold_s=1.0, clock=FakeClock())
        for _ in range(3):
            await wave.acquire()  # the wave itself goes at once
        held = asyncio.create_task(wave.acquire())
        for answered in range(1, 4):
            await wave.release()
            await _settle()
            seen.append(f"{answered} answered: {'started' if held.done() else 'held'}")
        await wave.acquire()  # once over, nobody waits
        return seen

    assert asyncio.run(scenario()) == [
        "1 answered: held", "2 answered: held", "3 answered: started",
    ]


def test_first_wave_hold_ends_hold_s_after_the_first_answer() -> None:
    async def scenario() -> tuple[bool, bool]:
        clock = FakeClock()
        wave = FirstWave(3, hold_s=1.0, clock=clock)
        for _ in range(3):
            await wave.acquire()
        await wave.release()  # the first answer; two are still out
        held = asyncio.create_task(wave.acquire())
        await _settle()
        before = held.done()
        clock.now += 1.5  # a slow straggler does not hold the pool past hold_s
        await wave.acquire()
        held.cancel()
        return before, wave.over

    assert asyncio.run(scenario()) == (False, True)


def test_a_slot_held_before_any_answer_gets_the_same_hold_limit() -> None:
    async def scenario() -> tuple[bool, bool]:
        clock = FakeClock()
        wave = FirstWave(2, hold_s=1.0, clock=clock)
        await wave.acquire()
        await wave.acquire()
        held = asyncio.create_task(wave.acquire())  # waits before anything is answered
        await _settle()
        before = held.done()
        await wave.release()  # the first answer starts the hold...
        clock.now += 1.5  # ...which is over by the time the held slot looks
        await _settle()
        return before, held.done()

    assert asyncio.run(scenario()) == (False, True)


def test_first_wave_429s_pause_the_held_slots() -> None:
    """The burst allowance is found by the first wave: the refill waits for the pause."""

    async def scenario() -> list[str]:
        clock = FakeClock()
        # Slots to spare: only the first wave stands between the refill and the server.
        limits = Limits(ConcurrencyMeter(8), PauseGate(clock),
                        first_wave=FirstWave(4, clock=clock))
        order: list[str] = []
        answer = asyncio.Event()

        async def request(name: str, refused: bool) -> None:
            async with limits.slot():
                order.append(f"{name} sent")
                await answer.wait()
                if refused:
                    limits.on_rate_limited(30.0, clock.now)

        first = [asyncio.create_task(request(f"w{i}", refused=i == 3)) for i in range(4)]
        await _settle()
        refill = asyncio.create_task(request("refill", refused=False))
        await _settle()
        answer.set()
        await asyncio.gather(*first)
        await _settle()
        order.append(f"paused {limits.gate.remaining_s():.0f}s, refill done: {refill.done()}")
        refill.cancel()
        return order

    assert asyncio.run(scenario()) == [
        "w0 sent", "w1 sent", "w2 sent", "w3 sent", "paused 30s, refill done: False",
    ]
