"""The congestion controller, pure: tables for its decisions, then gateways on a virtual clock.

The simulation (tests/gateways.py) runs the pool against sporadic 429s with no
real limit, sliding windows and token buckets with bursts smaller and larger
than the pool, and a limit that halves at t = 60 s and recovers at t = 120 s,
at latencies of 0, 1 and 30 s. Each scenario asserts goodput (wall time
against the ideal), the 429 share and the time to adapt. The default grid runs
a few hundred scenarios in seconds; ``IMGBATCH_SCENARIO_SEEDS=N`` runs each
with N seeds (a soak).
"""

from __future__ import annotations

import heapq
import math
import os
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batch.congestion import ControlConfig, Controller, Outcome, Verdict
from tests.gateways import (
    Gateway,
    SlidingWindow,
    Sporadic,
    TokenBucket,
    halves_then_recovers,
    run,
)

SEEDS = range(int(os.environ.get("IMGBATCH_SCENARIO_SEEDS", "3")))
LATENCIES = (0.0, 1.0, 30.0)


# -- decisions, by hand ---------------------------------------------------------------


def _drive(ctl: Controller, latency: float, until: float) -> list[int]:
    """Start whenever allowed, answer each start ``latency`` later; the windows seen."""
    answers: list[tuple[float, int]] = []
    now, windows = 0.0, [ctl.window]
    while now < until:
        wait = ctl.wait_s(now)
        if wait == 0:
            heapq.heappush(answers, (now + latency, ctl.on_start(now)))
            continue
        if answers and answers[0][0] <= now + wait:
            now, ticket = heapq.heappop(answers)
            ctl.on_end(ticket, now, Outcome.ADMITTED)
        else:
            now += wait
        if ctl.window != windows[-1]:
            windows.append(ctl.window)
    return windows


def test_slow_start_doubles_each_admitted_round_until_the_pool_is_full() -> None:
    ctl = Controller(ControlConfig(max_limit=100))
    assert _drive(ctl, 0.01, 1.0) == [16, 32, 64, 100]
    assert not ctl.slow_start


def test_a_fixed_or_paced_pool_has_no_slow_start() -> None:
    assert Controller(ControlConfig(max_limit=100, adaptive=False)).window == 100
    assert Controller(ControlConfig(max_limit=100, rpm=60)).window == 100


def _fill(ctl: Controller) -> float:
    """Start whenever allowed, nothing ever answered: when the pool is full."""
    now = 0.0
    while ctl.in_flight < ctl.config.max_limit:
        wait = ctl.wait_s(now)
        assert wait < math.inf
        if wait > 0:
            now += wait
        else:
            ctl.on_start(now)
    return now


def test_slow_answers_do_not_slow_the_ramp() -> None:
    """Nothing answered for 30 s: requests out past the 429 turnaround count as admitted."""
    assert _fill(Controller(ControlConfig(max_limit=64))) < 0.5  # a fraction of a round trip


def test_a_latency_bound_pool_fills_in_two_turns_of_the_admit_time() -> None:
    """Nothing answered (1 s latency): round one (16) at once and admitted after
    admit_s, round two spread over admit_s, and round three as soon as the first of
    round two is admitted. Waiting for all of round two took three turns."""
    ctl = Controller(ControlConfig(max_limit=50))
    assert _fill(ctl) < 2.1 * ctl.config.admit_floor_s  # one spacing after two turns


def test_starts_that_never_reach_the_server_do_not_grow_the_ramp() -> None:
    """Every start abandoned at once (the budget said no, the run is stopping): 200 of
    them leave slow start at its first round. They used to end it ("a full pool was
    admitted") after 113, and the next 64 real requests went out at once."""
    ctl = Controller(ControlConfig(max_limit=64))
    now = 0.0
    for _ in range(200):
        wait = ctl.wait_s(now)
        assert wait < math.inf
        now += wait
        if wait == 0:
            ctl.on_end(ctl.on_start(now), now, None)
    assert ctl.slow_start and ctl.window == 16


def test_an_isolated_429_does_not_pause_the_pool() -> None:
    ctl = Controller(ControlConfig(max_limit=8, adaptive=False))
    tickets = [ctl.on_start(0.0) for _ in range(8)]
    assert ctl.on_end(tickets[3], 0.01, Outcome.REFUSED, 30.0) is Verdict.ISOLATED
    assert ctl.wait_s(0.01) == 0.0  # the pool goes on; only that request waits 30 s


def _slow_start_round_two(ctl: Controller) -> tuple[float, list[int], list[float]]:
    """Round one (16) sent and answered in 5 ms, then round two started at its spacing
    (1.56 ms), each start asked 1 ms after the one before; its tickets and start times."""
    first = [ctl.on_start(0.0) for _ in range(16)]
    for ticket in first:
        ctl.on_end(ticket, 0.005, Outcome.ADMITTED)
    now, second, times = 0.005, [], []
    for _ in range(4):
        now += ctl.wait_s(now)
        second.append(ctl.on_start(now))
        times.append(now)
        now += 0.001
    return now, second, times


def test_a_429_in_slow_start_holds_starts_until_a_later_request_gets_through() -> None:
    ctl = Controller(ControlConfig(max_limit=64))
    now, second, times = _slow_start_round_two(ctl)
    # The first of round two refused: its three successors are out.
    assert ctl.on_end(second[0], now, Outcome.REFUSED, 2.0) is Verdict.ISOLATED
    # Until the eldest of them has been out two 429 turnarounds with no 429.
    turnaround = now - times[0]
    assert ctl.wait_s(now) == pytest.approx(times[1] + 2 * turnaround - now, abs=1e-5)
    assert ctl.on_end(second[1], now + 0.001, Outcome.REFUSED, 2.0) is Verdict.ISOLATED
    assert ctl.wait_s(now + 0.001) > 0  # still nothing got through
    assert ctl.on_end(second[2], now + 0.002, None) is None  # abandoned: it tells nothing
    assert ctl.wait_s(now + 0.002) > 0
    assert ctl.on_end(second[3], now + 0.003, Outcome.ADMITTED) is None
    assert ctl.wait_s(now + 0.003) == 0.0  # one did: the 429s were noise, the ramp goes on
    assert ctl.slow_start


def test_slow_start_says_the_same_when_asked_twice_at_a_round_boundary() -> None:
    """Round two sent 4 ms apart and answered at once: the call that opens round three
    says what the next call says (it used to say go, then wait for the spacing)."""
    ctl = Controller(ControlConfig(max_limit=64))
    first = [ctl.on_start(0.0) for _ in range(16)]
    for ticket in first:
        ctl.on_end(ticket, 0.005, Outcome.ADMITTED)
    now, second = 0.005, []
    while len(second) < 32:
        now += ctl.wait_s(now)
        second.append(ctl.on_start(now))
        now += 0.004
    now -= 0.004
    for ticket in second:
        ctl.on_end(ticket, now, Outcome.ADMITTED)
    wait = ctl.wait_s(now)
    assert wait > 0 and ctl.wait_s(now) == wait and ctl.window == 64


def test_a_run_of_429s_in_slow_start_costs_what_was_under_way_then_pauses() -> None:
    ctl = Controller(ControlConfig(max_limit=64))
    now, second, _ = _slow_start_round_two(ctl)
    verdicts = [ctl.on_end(ticket, now + 0.001 * i, Outcome.REFUSED, 2.0)
                for i, ticket in enumerate(second[:2])]
    assert verdicts == [Verdict.ISOLATED, Verdict.ISOLATED]
    # The two others are still under way, so nothing more starts: had they been back
    # admitted, the next start would be one at a time until one got through.
    assert ctl.wait_s(now + 0.002) > 0
    assert ctl.on_end(second[2], now + 0.002, Outcome.REFUSED, 2.0) is Verdict.SHARED
    assert ctl.wait_s(now + 0.002) == pytest.approx(2.0)


@pytest.mark.parametrize(("refuse_s", "most_first_wave"), [(0.002, 4), (0.009, 6), (0.015, 10)])
def test_a_burst_limit_met_in_slow_start_costs_the_requests_under_way(
    refuse_s: float, most_first_wave: int
) -> None:
    """20 per 2 s at 64 in flight, no latency: round two meets the limit at its 5th start.

    The 429s before the pause are the first refused request and those sent within one
    429 turnaround after it. Before slow start held on a 429 there were two more each
    time: sending went on until three refused in a row had come back.
    """
    r = run(SlidingWindow(20, 2.0), 200, ControlConfig(64), refuse_s=refuse_s)
    first_wave = sum(t < 1.0 for t in r.refused_at)
    assert 3 <= first_wave <= most_first_wave, (first_wave, r.events)
    assert r.done == 200 and r.shared >= 1


def test_a_run_of_refused_starts_pauses_the_pool_once() -> None:
    ctl = Controller(ControlConfig(max_limit=8, adaptive=False))
    tickets = [ctl.on_start(0.0) for _ in range(8)]
    for ticket in tickets[:4]:
        ctl.on_end(ticket, 0.01, Outcome.ADMITTED)
    verdicts = [ctl.on_end(ticket, 0.01, Outcome.REFUSED, 6.0) for ticket in tickets[4:]]
    # Three refused starts in a row: chance does that once in 10,000 at a 2% background.
    assert verdicts == [Verdict.ISOLATED, Verdict.ISOLATED, Verdict.SHARED,
                        Verdict.SAME_EPISODE]
    assert ctl.wait_s(0.02) == pytest.approx(6.0 - 0.01)
    assert ctl.wait_s(6.02) == 0.0


@pytest.mark.parametrize(
    ("accepted", "span_s", "pause_s", "expected"),
    [
        (60, 0.05, 5.95, 10.0),  # 60 in a burst, then "wait 6 s": 60 per 6 s
        (600, 29.95, 0.05, 20.0),  # steady 20/s into a 600-per-30-s window
        (20, 0.0, 2.0, 10.0),  # a burst of 20 that frees in 2 s
    ],
)
def test_the_pace_learnt_from_a_shared_limit(
    accepted: int, span_s: float, pause_s: float, expected: float
) -> None:
    ctl = Controller(ControlConfig(max_limit=10_000, adaptive=True, initial_limit=10_000))
    starts = [ctl.on_start(span_s * i / max(accepted - 1, 1)) for i in range(accepted)]
    for ticket in starts:
        ctl.on_end(ticket, span_s + 0.01, Outcome.ADMITTED)
    assert ctl.estimate_rate(span_s, pause_s) == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize(("abandoned", "retry_after_s"), [
    (0, 1.0),  # all 16 refused
    (13, 2.0),  # 13 never reached the server (the budget said no), 3 refused
    (0, 0.0),  # 3 refused at once with Retry-After 0, 13 sent a moment ago and still out
])
def test_a_shared_limit_that_accepted_nothing_starts_again_from_one_request(
    abandoned: int, retry_after_s: float
) -> None:
    """No request was accepted before the 429s: there is no pace to learn. The pool
    used to go out whole when the pause ended, or at a pace counted from requests that
    never reached the server or had just left (74,100/min)."""
    ctl = Controller(ControlConfig(max_limit=200))
    tickets = [ctl.on_start(0.0) for _ in range(16)]
    for ticket in tickets[:abandoned]:
        ctl.on_end(ticket, 0.005, None)
    refused = tickets[abandoned:] if retry_after_s else tickets[:3]
    for ticket in refused:
        ctl.on_end(ticket, 0.01, Outcome.REFUSED, retry_after_s)
    now, burst = 0.01 + retry_after_s, 0
    while ctl.wait_s(now) == 0 and burst < 200:
        ctl.on_start(now)
        burst += 1
    assert (burst, ctl.rate, ctl.slow_start) == (1, None, True)


def test_rpm_pins_the_pace_and_429s_do_not_move_it() -> None:
    ctl = Controller(ControlConfig(max_limit=64, rpm=600))
    starts = []
    now = 0.0
    for _ in range(30):
        now += ctl.wait_s(now)
        starts.append(ctl.on_start(now))
    assert now == pytest.approx(29 * 0.1 * 1.01)  # evenly spaced, 1% under --rpm
    for ticket in starts[-5:]:
        ctl.on_end(ticket, now, Outcome.REFUSED, 1.0)
    assert ctl.rate == pytest.approx(10 / 1.01)


def test_endless_429s_keep_pausing_and_never_stop_on_their_own() -> None:
    """The engine's --max-rate-limit-wait ends it; the controller only keeps pausing."""
    ctl = Controller(ControlConfig(max_limit=4))
    now = 0.0
    for _ in range(200):
        now += ctl.wait_s(now) if ctl.wait_s(now) < math.inf else 0.0
        ticket = ctl.on_start(now)
        ctl.on_end(ticket, now + 0.001, Outcome.REFUSED, 0.1)
        now += 0.001
    assert ctl.in_flight == 0 and ctl.rate is None  # nothing accepted: nothing to pace by
    assert ctl.wait_s(now) <= 0.1 + 1e-9


_STEP = st.tuples(
    st.sampled_from(["start", "start", "answer"]),
    st.floats(0.0, 3.0),  # seconds that pass first
    st.integers(0, 10_000),  # which request under way is answered
    st.sampled_from([Outcome.ADMITTED, Outcome.REFUSED, Outcome.REFUSED, None]),
    st.sampled_from([None, 0.0, 0.5, 2.0, 60.0]),  # its Retry-After
)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 64), st.sampled_from([None, 120.0]), st.lists(_STEP, max_size=400))
def test_whatever_comes_back_in_whatever_order_the_pool_never_locks(
    pool: int, rpm: float | None, steps: list[tuple[str, float, int, Outcome | None,
                                                    float | None]]
) -> None:
    """Answers in any order, 429s in runs or alone, abandoned requests, time jumps:
    asking twice gives one answer, and with nothing under way a start is always
    allowed within a few finite waits (a wait of inf then would end the run never)."""
    ctl = Controller(ControlConfig(pool, rpm=rpm))
    now, out = 0.0, []
    for kind, passed_s, pick, outcome, retry_after_s in steps:
        now += passed_s
        wait = ctl.wait_s(now)
        assert ctl.wait_s(now) == wait
        if not out:
            for _ in range(6):  # a pause, the pace, slow start's spacing or hold
                if wait == 0:
                    break
                assert 0 < wait < math.inf, (now, wait, ctl.__dict__)
                now += wait
                wait = ctl.wait_s(now)
            assert wait == 0, (now, wait, ctl.__dict__)
        if kind == "start" and wait == 0:
            out.append(ctl.on_start(now))
        elif kind == "answer" and out:
            ctl.on_end(out.pop(pick % len(out)), now, outcome, retry_after_s)
        assert ctl.in_flight == len(out) <= pool


# -- gateways on a virtual clock ---------------------------------------------------------


def _ideal(jobs: int, pool: int, latency: float, rate_bound: float) -> float:
    return max(rate_bound, math.ceil(jobs / pool) * max(latency, 0.002))


@pytest.mark.parametrize("p", [0.05, 0.1, 0.2])
def test_sporadic_429s_with_no_real_limit_cost_only_their_own_waits(p: float) -> None:
    false_alarms = runs = 0
    for latency in LATENCIES:
        for pool in (8, 32, 64):
            jobs = 300
            clean = run(Sporadic(0.0, random.Random(0)), jobs, ControlConfig(pool),
                        latency_s=latency).wall_s
            for seed in SEEDS:
                gw = Sporadic(p, random.Random(seed))
                r = run(gw, jobs, ControlConfig(pool), latency_s=latency,
                        jitter_s=0.2 * latency, seed=seed)
                runs += 1
                what = f"p={p} latency={latency} pool={pool} seed={seed}"
                assert r.done == jobs, what
                # The pool is never slowed: the run takes the clean run's time plus the
                # longest any one job waited for its own Retry-After. (With no latency
                # the run is over in a blink and the waiting jobs hold every worker.)
                allowed = 1.1 * clean + 0.2 * latency + r.own_wait_s + 0.5
                assert r.shared <= (2 if p >= 0.2 else 1), (what, r.events)  # rare false alarms
                false_alarms += r.shared
                if r.shared:  # it paces the pool for a while, then lets go
                    allowed = 2.5 * allowed
                assert latency == 0 or r.wall_s <= allowed, (what, r.wall_s, allowed)
                assert r.share_429 < p + 0.1, what
    # Before it has seen enough answers to know the background share, three early
    # 429s in a row at 20% look like a burst limit now and then: one pause of the
    # Retry-After, then pacing ends when the 429s do not follow it (the wall bound).
    assert false_alarms <= max(1, runs // (8 if p >= 0.2 else 20)), (false_alarms, runs)


# (name, a fresh gateway, jobs, the wall time the limit itself allows, most 429s).
# A bucket whose burst lasts long at its rate (30 tokens at 2/s) hides a pace a little
# too fast until it is empty, so probing it costs more 429s than a window does.
LIMITS: list[tuple[str, Callable[[], Gateway], int, float, float]] = [
    ("20 per 2 s window", lambda: SlidingWindow(20, 2.0), 200, 18.0, 0.15),
    ("60 per 6 s window", lambda: SlidingWindow(60, 6.0), 200, 18.0, 0.15),
    ("200 per 10 s window", lambda: SlidingWindow(200, 10.0), 600, 20.0, 0.15),
    ("bucket 10/s burst 5", lambda: TokenBucket(10.0, 5), 200, 19.5, 0.15),
    ("bucket 10/s burst 100", lambda: TokenBucket(10.0, 100), 400, 30.0, 0.15),
    ("bucket 2/s burst 30", lambda: TokenBucket(2.0, 30), 150, 60.0, 0.25),
]


@pytest.mark.parametrize("latency", LATENCIES)
def test_shared_limits_are_found_with_few_429s_and_followed(latency: float) -> None:
    for seed in SEEDS:
        for name, gateway, jobs, rate_ideal, most_429 in LIMITS:
            for pool in (16, 64):
                r = run(gateway(), jobs, ControlConfig(pool), latency_s=latency,
                        jitter_s=0.2 * latency, seed=seed)
                what = f"{name} latency={latency} pool={pool} seed={seed}"
                assert r.done == jobs, what
                ideal = _ideal(jobs, pool, latency, rate_ideal)
                assert r.wall_s <= 1.5 * ideal + 2 * latency + 2, (what, r.wall_s, ideal)
                assert r.share_429 < most_429, (what, r.refused, r.requests, r.events)


def _halving(kind: str) -> Gateway:
    factor = halves_then_recovers(60.0, 120.0)
    return (SlidingWindow(100, 10.0, factor) if kind == "window"
            else TokenBucket(10.0, 20, factor))


@pytest.mark.parametrize(("kind", "latency", "refuse_s"), [
    ("window", 0.0, 0.002), ("window", 1.0, 0.002), ("window", 1.0, 1.0),
    ("bucket", 0.0, 0.002), ("bucket", 1.0, 0.002),
])
def test_a_limit_that_halves_at_60s_and_recovers_at_120s_is_followed(
    kind: str, latency: float, refuse_s: float
) -> None:
    """``refuse_s``: how long a 429 takes to come back (1 s: a far or slow gateway)."""
    for seed in SEEDS:
        full = 10.0  # requests per second the limit allows outside [60, 120)
        r = run(_halving(kind), 2400, ControlConfig(64), latency_s=latency,
                jitter_s=0.2 * latency, refuse_s=refuse_s, seed=seed)
        what = f"{kind} latency={latency} refuse_s={refuse_s} seed={seed}"
        # Down: within 20 s of the halving, few 429s while at half the limit.
        assert r.refused_between(80.0, 120.0) <= 0.15 * 40 * full / 2, (what, r.events)
        assert r.goodput(80.0, 120.0) >= 0.7 * full / 2, (what, r.events)
        # Up: the pace climbs back within a minute of the recovery.
        assert r.goodput(180.0, 220.0) >= 0.75 * full, (what, r.events)
        assert r.share_429 < 0.1, (what, r.refused, r.requests)


@pytest.mark.parametrize("kind", ["window", "bucket"])
@pytest.mark.parametrize("refuse_s", [0.6, 1.0, 2.0])
def test_429s_that_take_seconds_to_come_back_break_nothing(kind: str, refuse_s: float) -> None:
    """The pace's interval was once judged before any of its starts could be: its count
    of answers came out negative and wait_s raised ``math domain error`` (in 24 of these
    6 cases x 6 seeds). The limit is followed down, but 429s that come back late cost
    many 429s: over 30 seeds at 0.6-2 s, 3-15% for a sliding window and 10-36% for a
    bucket, whose short Retry-After hides the limit (429s cost no money; 1-5% when they
    come back at once). Left as it is, bounded here so that it gets no worse."""
    for seed in SEEDS:
        r = run(_halving(kind), 2400, ControlConfig(64), latency_s=1.0, jitter_s=0.2,
                refuse_s=refuse_s, seed=seed)
        what = f"{kind} refuse_s={refuse_s} seed={seed}"
        assert r.done == 2400, what
        assert r.goodput(80.0, 120.0) >= 0.7 * 5.0, (what, r.events)
        assert r.share_429 < (0.2 if kind == "window" else 0.45), (what, r.refused, r.requests)
