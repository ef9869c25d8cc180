"""Congestion control for one endpoint: a pure state machine, clock readings and events in.

:class:`Controller` decides when the next request may start. It reads no clock
and sleeps on nothing, so the same object runs the real pool (through
:class:`batch.limits.Limits`) and gateways simulated on a virtual clock
(tests/test_congestion.py). After TCP's slow start and Netflix's concurrency-limits:

- **Slow start** (:mod:`batch.slowstart`): rounds that double while admitted,
  spread so that a 429 comes back before much more is sent.
- **An isolated 429 is noise**: its request waits its own ``Retry-After`` (the
  retry policy) and the pool goes on.
- **A shared limit is evidence**: a run of refused starts in a row longer than
  chance explains at the background 429 share (one shorter when the 429s say
  the key's quota is spent), or a 429 share far above it. Only then does the
  pool pause for the ``Retry-After`` and get paced: at the rate the server
  accepted (none: slow start again from one request), or at most half the pace
  when a paced run meets the limit again. If slowing down does not make 429s
  rarer, pacing is dropped.
- **Probing.** While paced, each clean interval raises the pace by a step that
  doubles (5%, 10%, 20%, 25%...), so a limit that rose again is found in a
  number of intervals that grows with the log of the gap; more 429s than the
  background explains fall back to a pace known to pass.

``--rpm`` pins the pace (no slow start, no learning); 429s still pause the pool.
"""

from __future__ import annotations

import bisect
import enum
import math
import operator
from dataclasses import dataclass

from batch.slowstart import SlowStart, Start

MAX_STEP = 0.25  # the largest pace step while probing
_AT = operator.attrgetter("at")


class Outcome(enum.StrEnum):
    ADMITTED = "admitted"  # answered with anything but 429
    REFUSED = "refused"  # answered 429


class Verdict(enum.StrEnum):  # what the controller made of one 429
    ISOLATED = "isolated"  # noise: only its own request waits
    SHARED = "shared"  # a shared limit: the pool paused (and is paced)
    SAME_EPISODE = "same_episode"  # part of a burst already answered with a pause


@dataclass(frozen=True)
class ControlConfig:
    max_limit: int  # --concurrency: never more in flight
    adaptive: bool = True  # slow start and learnt pacing
    rpm: float | None = None  # pinned pace, request starts per minute
    initial_limit: int = 16  # the first round of slow start (sent at once)
    admit_floor_s: float = 0.05  # in flight this long without a 429: admitted
    default_pause_s: float = 1.0  # a 429 with no Retry-After
    max_pause_s: float = 900.0  # a Retry-After beyond this is clipped to it
    safety: float = 0.95  # pace a little under what the server accepted
    decrease: float = 0.5  # pace cut when a paced run meets a shared limit
    share_window: int = 40  # answers the share test looks at
    false_alarm: float = 1e-5  # chance of a run of noise 429s we accept as a limit
    probe_interval_s: float = 2.0  # shortest interval between pace steps
    first_step: float = 0.05  # first pace step after a change
    horizon_s: float = 60.0  # how far back starts are remembered
    prior_share: float = 0.02  # background 429 share before any answer
    prior_weight: int = 50  # ... worth this many answers

    def __post_init__(self) -> None:
        if self.max_limit < 1 or (self.rpm is not None and self.rpm <= 0):
            raise ValueError("max_limit must be at least 1 and rpm positive")


class Controller:
    """See the module docstring. Times are seconds on any monotonic clock."""

    def __init__(self, config: ControlConfig) -> None:
        self.config = config
        self.in_flight = 0
        self.peak = 0
        self.pause_until = -math.inf
        pinned = config.rpm / 60.0 / 1.01 if config.rpm else None  # 1%: network jitter
        self.rate: float | None = pinned  # starts per second, None: not paced
        self._tat = -math.inf  # GCRA: the earliest next start when paced
        ramp = config.adaptive and pinned is None and config.max_limit > 1
        self._ramp = SlowStart(config.initial_limit, config.max_limit) if ramp else None
        self._turnaround_min = math.inf  # fastest answer seen
        self._starts: list[Start] = []
        self._base = 0  # seq of _starts[0]
        self._noise = config.prior_share  # background 429 share (isolated ones)
        self._turnaround_429 = 0.0  # a decaying maximum
        self._pending_estimate: tuple[float, float] | None = None  # (at, pause)
        self._step = config.first_step
        self._interval_s = config.probe_interval_s
        self._probe_at = math.inf  # when the current interval is judged
        self._interval_start = 0.0
        self._rate_before: float | None = None
        self._rate_before2: float | None = None  # ... and the pace before that one
        self._last_refused = 0  # 429s in the last interval that passed
        self._paced_since = -math.inf  # when the pace was last lowered
        self._share_before = 0.0  # 429 share when a limit was suspected
        self._verify: float | None = None  # ... to compare with once paced
        self._hold_until = -math.inf  # 429s of requests sent before: no decrease
        self._window_s = 0.0  # the longest Retry-After of a shared limit: its window
        self.events: list[str] = []  # what changed and why, for the log (drained by Limits)

    # -- decisions ------------------------------------------------------------------

    def wait_s(self, now: float) -> float:
        """0 if a request may start at ``now``; else how long to wait (inf: until an answer)."""
        if now < self.pause_until:
            return self.pause_until - now
        self._after_pause(now)
        self._judge_interval(now)
        if self.in_flight >= self.config.max_limit:
            return math.inf
        if self._ramp is not None:
            wait = self._ramp.wait_s(now, self._starts, self._base, admit_s=self._admit_s(),
                                     turnaround_429_s=self._turnaround_429)
            if wait is None:
                self._end_slow_start(now, "a full pool was admitted")
            elif wait > 0:
                return wait
        if self.rate is not None and self._tat > now:
            return self._tat - now
        return 0.0

    def on_start(self, now: float) -> int:
        """A request starts (``wait_s`` said 0); returns its ticket."""
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        if self.rate is not None:
            self._tat = max(self._tat, now) + 1.0 / self.rate
        if self._ramp is not None:
            self._ramp.on_start(now, turnaround_min_s=self._turnaround_min,
                                admit_s=self._admit_s())
        self._starts.append(Start(now))
        self._trim(now)
        return self._base + len(self._starts) - 1

    def on_end(self, ticket: int, now: float, outcome: Outcome | None,
               retry_after_s: float | None = None, *, shared_said: bool = False,
               ) -> Verdict | None:
        """The request of ``ticket`` ended: answered (``outcome``) or abandoned (None);
        ``shared_said``: its 429 said the key's quota is spent."""
        self.in_flight -= 1
        i = ticket - self._base
        start = self._starts[i] if 0 <= i < len(self._starts) else None
        if start is None or outcome is None:
            if start is not None:  # abandoned: it tells nothing about the server
                start.refused, start.abandoned = False, True
                if self._ramp is not None:
                    self._ramp.on_abandoned(ticket)
            return None
        start.refused = outcome is Outcome.REFUSED
        self._turnaround_min = min(self._turnaround_min, now - start.at)
        if not start.refused:
            self._learn_noise(False)
            return None
        self._turnaround_429 = max(self._turnaround_429 * 0.9, now - start.at)
        if now < self.pause_until:
            return Verdict.SAME_EPISODE
        if self._shared(ticket, now, shared_said):
            self._on_shared(now, start.at, retry_after_s)
            return Verdict.SHARED
        self._learn_noise(True)
        self._judge_interval(now, early=True)
        if self._ramp is not None:
            self._ramp.on_isolated(ticket)
        return Verdict.ISOLATED

    # -- slow start ------------------------------------------------------------------

    @property
    def slow_start(self) -> bool:
        return self._ramp is not None

    @property
    def window(self) -> int:
        """The current round's size in slow start; after it, the pool."""
        return self.config.max_limit if self._ramp is None else self._ramp.window

    def _end_slow_start(self, now: float, why: str) -> None:
        if self._ramp is not None:
            self._ramp = None
            self.events.append(f"slow start over at {self.in_flight} in flight: {why}")

    def _admit_s(self) -> float:
        return max(self.config.admit_floor_s, 4.0 * self._turnaround_429)

    # -- telling a shared limit from noise ---------------------------------------------

    def _learn_noise(self, refused: bool) -> None:
        if self.rate is not None and not self.config.rpm:
            return  # while the pace is probed, its 429s are what is being tested
        self._noise += (float(refused) - self._noise) / self.config.prior_weight

    def _run_needed(self, noise: float) -> int:
        noise = min(max(noise, 1e-6), 0.9)
        return max(3, min(12, math.ceil(math.log(self.config.false_alarm) / math.log(noise))))

    def _shared(self, ticket: int, now: float, said: bool = False) -> bool:
        i = ticket - self._base
        run = 1
        for step in (-1, 1):
            j = i + step
            while 0 <= j < len(self._starts) and self._starts[j].refused:
                run += 1
                j += step
        # The earlier 429s of this run were taken for noise when they came back.
        noise, weight = self._noise, self.config.prior_weight
        for _ in range(run - 1):
            noise = max(0.0, (noise * weight - 1.0) / (weight - 1.0))
        seen, self._share_before = self._recent_share(now)
        # A 429 saying its quota is spent counts twice: alone it decides nothing.
        if run + said >= self._run_needed(noise):
            self._noise = noise
            return True
        share = self._share_before
        return seen >= self.config.share_window // 2 and share >= max(0.5, self._noise + 0.25)

    def _recent_share(self, now: float) -> tuple[int, float]:
        """The share of 429s among the last answers, and how many answers that is."""
        window = self.config.share_window
        seen = refused = 0
        admit_s = self._admit_s()
        for start in reversed(self._starts):
            if start.refused is None and now - start.at < admit_s:
                continue
            seen += 1
            refused += bool(start.refused)
            if seen >= window:
                break
        return seen, refused / max(seen, 1)

    # -- reactions ------------------------------------------------------------------

    def _on_shared(self, now: float, sent_at: float, retry_after_s: float | None) -> None:
        pause = self.config.default_pause_s if retry_after_s is None else retry_after_s
        pause = min(max(pause, 0.0), self.config.max_pause_s)
        self.pause_until = max(self.pause_until, now + pause)
        self._window_s = max(self._window_s, pause)
        self.events.append(f"shared rate limit: pausing all requests for {pause:.1f}s")
        self._end_slow_start(now, "rate limited")
        if not self.config.adaptive or self.config.rpm:
            return
        if self.rate is None:
            # Learn the pace once the pause is over, when the rest of the burst is back.
            self._pending_estimate = (now, pause)
        elif sent_at < self._hold_until:
            return  # the last decrease has not been seen through the server's window yet
        elif self._rate_before is not None:
            self._set_rate(self._rate_before, now, "the probe met the limit")
        else:
            # At most half the pace, and no more than the server accepted since the
            # pace was set (what a token bucket's short Retry-After hides).
            target = self.rate * self.config.decrease
            recent = self.estimate_rate(now, pause, since=self._paced_since)
            if recent is not None:
                target = min(target, self.config.safety * recent)
            self._set_rate(target, now, "the limit tightened")
        self._interval_s = max(self._shortest_interval(), 2.0 * pause)
        self._restart_interval(now)
        if self._pending_estimate is not None:
            self._verify = self._share_before  # see _judge_interval

    def _shortest_interval(self) -> float:  # a window shows a pace too fast a window late
        return max(self.config.probe_interval_s, min(self._window_s, 30.0))

    def _restart_interval(self, now: float) -> None:
        """After a decrease, judge the new pace once the server's window has drained.

        Until then a sliding window still holds what the faster pace sent: its
        429s say nothing of the new pace (one decrease per window, as in TCP).
        """
        self._step = self.config.first_step
        self._rate_before = self._rate_before2 = None
        self._verify = None
        self._last_refused = 0
        self._hold_until = max(now, self.pause_until) + min(self._window_s, 30.0)
        self._interval_start = self._hold_until
        self._probe_at = self._interval_start + self._interval_s

    def _after_pause(self, now: float) -> None:
        if self._pending_estimate is None:
            return
        at, pause = self._pending_estimate
        self._pending_estimate = None
        estimate = self.estimate_rate(at, pause, now=now)
        if estimate is not None and (self.rate is None or estimate * self.config.safety
                                     < self.rate):
            self._set_rate(estimate * self.config.safety, now, "learnt from the 429s")
        elif estimate is None and self.rate is None and self.config.max_limit > 1:
            # Nothing was accepted, so there is no pace to learn: start again from one
            # request, as TCP does after a timeout, not with the whole pool at once.
            self._ramp = SlowStart(1, self.config.max_limit, self._base + len(self._starts))
            self.events.append("slow start again from one request: none was accepted")
        # The first step up waits two intervals: the pace was just measured.
        self._interval_start = now
        self._probe_at = now + 2 * self._interval_s

    def estimate_rate(self, at: float, pause: float, since: float = -math.inf,
                      now: float | None = None) -> float | None:
        """Starts per second the server accepted before it refused at ``at``, asked at
        ``now`` (default ``at``). A window or bucket that refuses at ``at`` for ``pause``
        seconds after accepting A requests over ``span`` seconds allows about
        A / (span + pause): the oldest accepted one leaves it ``pause`` from now."""
        # A request still out was admitted once a 429 would be back by now; one abandoned
        # never reached the server.
        young = (at if now is None else now) - self._admit_s()
        accepted = [s.at for s in self._starts if since <= s.at <= at and (
            s.at <= young if s.refused is None else not (s.refused or s.abandoned))]
        if not accepted:
            return None
        window = at - accepted[0] + pause
        return len(accepted) / window if window > 0 else None

    def _set_rate(self, rate: float, now: float, why: str) -> None:
        if self.rate is None or rate < self.rate:
            self._paced_since = max(now, self.pause_until)
        self.rate = max(rate, 1.0 / 60.0)
        self._tat = min(self._tat, now + 1.0 / self.rate)
        self.events.append(f"pacing requests at {60 * self.rate:.0f}/min: {why}")

    def _judge_interval(self, now: float, *, early: bool = False) -> None:
        """While paced, at the end of each interval: keep the probe or fall back.

        ``early``: a 429 came back; fall back at once if the interval already
        has more 429s than the background explains (never pass it early).
        """
        if self.rate is None or self.config.rpm or now < self.pause_until:
            return
        if not early and now < self._probe_at:
            return
        begin, end = self._interval_start, now if early else now - self._admit_s()
        if end <= begin:  # nothing judged yet: slow 429s reach past the interval's end
            return
        first = bisect.bisect_left(self._starts, begin, key=_AT)
        last = bisect.bisect_left(self._starts, end, key=_AT)
        refused = sum(1 for start in self._starts[first:last] if start.refused)
        seen = last - first
        span = max(end - begin, 1e-9)
        verify = self._verify
        if verify is not None and seen < 20:
            return  # too few answers yet to tell a limit from background 429s
        if verify is not None and refused / seen >= max(0.1, verify / 4):
            # Slowing down did not make the 429s rarer: they are background, not a limit.
            self._noise, self.rate, self._verify = refused / seen, None, None
            self.events.append(f"pacing dropped: the 429s ({refused} of {seen}) did not "
                               "follow the pace, so they are not a shared limit")
            return
        # More 429s than the background explains, or than the interval before had.
        noise = self._noise
        unexplained = (refused > seen * noise + 2.0 * math.sqrt(seen * noise * (1 - noise)) + 0.5
                       or refused >= 2 * self._last_refused + 2)
        if refused >= (3 if early else 2) and unexplained:
            # Back to a pace known to pass (a window shows overshoot up to a window
            # late: the one before the last that passed), and no faster than the server
            # accepted; never lower on a handful of answers (noise would ratchet it down).
            safe = self._rate_before2 or self._rate_before
            fallbacks = [safe] if safe else []
            if seen >= 20 and span >= 1.0:
                fallbacks.append(self.config.safety * (seen - refused) / span)
            if fallbacks:
                self._set_rate(min(fallbacks), now, f"{refused} of {seen} refused while probing")
                self._interval_s = min(8 * self._shortest_interval(), 2 * self._interval_s)
                self._restart_interval(now)
                return
            if not early:
                self._probe_at = now + self._interval_s  # judge a longer interval
            return
        if early:
            return
        self._verify = None
        if seen < 0.5 * self.rate * span and now - self.pause_until > span:
            self.rate = None  # the pace no longer binds: something else limits the pool
            self.events.append("pacing dropped: no longer the limit")
            return
        self._last_refused = refused
        self._rate_before2 = self._rate_before
        self._rate_before = self.rate
        self.rate = self.rate * (1.0 + self._step)
        self._step = min(MAX_STEP, 2 * self._step)
        self._interval_s = max(self._shortest_interval(), self._interval_s / 2)
        self._interval_start = now
        self._probe_at = now + self._interval_s

    def _trim(self, now: float) -> None:
        cutoff = now - self.config.horizon_s
        drop = 0
        keep_from = len(self._starts) if self._ramp is None else \
            self._ramp.round_first - self._base
        while drop < min(len(self._starts), keep_from) and self._starts[drop].at < cutoff:
            drop += 1
        if drop >= 256:  # in batches: the list is shifted once per 256 starts
            del self._starts[:drop]
            self._base += drop
