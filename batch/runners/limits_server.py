"""One endpoint's limits shared by every shard task of a cluster: the server.

:class:`LimitsServer` lives in the run's actor (:mod:`batch.runners.run_state`;
:mod:`batch.runners.ray` wraps it). It runs the same pure
:class:`~batch.congestion.Controller` as a single machine, so the
concurrency cap, ``--rpm``, the shared 429 pause and the learnt pacing are
decided in one place for the whole cluster. It imports no Ray: the tests
drive it with plain asyncio. Its client is
:class:`~batch.runners.shared_limits.SharedLimits`.

A lease is answered within ``poll_s`` (an empty grant when nothing may start
yet), so no call to it is long. During slow start one call waits out the
few milliseconds between a round's starts (at most ``spacing_s`` each) to
grant up to what was asked: one permit a call, a round would take as many
round trips. Leases: a worker renews its lease with every call and every few
seconds; the permits of a worker silent for ``lease_ttl_s`` (its process or
node died) are ended as abandoned, so a dead worker never holds a slot for
good. Not sooner, even when a shard's retry says its earlier attempt is
dead: a request whose client died may still be running at the gateway (a
server does not stop work on a closed connection), and it counts against the
gateway's cap until it ends there. A restarted actor starts cautious, as
after a 429: a pause, then slow start from one request. During the pause
(``adopt_window_s``, longer than two renewals) every live client
re-registers the permits it still has in flight (``adopt``), so requests of
the actor's previous life count against the cap of its new one.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import Any, Protocol

from batch.congestion import ControlConfig, Controller, Outcome

log = logging.getLogger(__name__)

# (ticket, outcome or None if abandoned, retry-after seconds)
# seq, outcome (None: abandoned), Retry-After, whether the 429 said the quota is spent
EndEvent = tuple[int, str | None, float | None, bool]


@dataclass(frozen=True)
class Grant:
    """Permits granted by one lease call, numbered by the server's incarnation ``epoch``."""

    epoch: str
    seqs: tuple[int, ...]


class LimitsServer:
    """See the module docstring. ``cautious``: this is a restart."""

    def __init__(self, config: ControlConfig, *, cautious: bool = False,
                 lease_ttl_s: float = 10.0, adopt_window_s: float = 7.0, poll_s: float = 5.0,
                 spacing_s: float = 0.01, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        if cautious:
            config = replace(config, initial_limit=1)
        self.controller = Controller(config)
        self.epoch = uuid.uuid4().hex[:12]
        self.lease_ttl_s = lease_ttl_s
        self.poll_s = poll_s
        self.spacing_s = spacing_s
        self._clock = clock
        self._sleep = sleep
        self._slow = self.controller.slow_start  # as last seen
        self._single = 0  # permits still granted one a call (see _most)
        self._holder: dict[int, str] = {}  # ticket -> worker
        self._adopted: set[int] = set()  # tickets of requests started in an earlier life
        self._seen: dict[str, float] = {}  # worker -> last call
        self._changed: asyncio.Event | None = None
        self.expired = 0
        self.granted = 0
        if cautious:
            # As after a shared 429: wait at least one pacing interval, then ramp up; and
            # long enough for every live client to adopt what it has in flight.
            pause = max(config.default_pause_s, 60.0 / config.rpm if config.rpm else 0.0,
                        adopt_window_s)
            self.controller.pause_until = clock() + pause
            log.warning("limits restarted: pausing %.1fs, then slow start", pause)

    async def lease(self, worker: str, want: int) -> Grant:
        """Wait until a request may start, then grant up to ``want`` permits that may start now;
        none if nothing may start within ``poll_s`` (the client asks again: no call is long)."""
        give_up = self._clock() + self.poll_s
        while True:
            now = self._clock()
            self._touch(worker, now)
            self._expire(now)
            wait = self.controller.wait_s(now)
            self._log_events()
            if wait <= 0:
                break
            if now >= give_up:
                return Grant(self.epoch, ())
            event = self._event()
            with suppress(TimeoutError):
                # Wakes on any answer; at least every second to expire dead workers' leases.
                await asyncio.wait_for(event.wait(), timeout=min(wait, 1.0, give_up - now))
        seqs = [self._start(worker, now)]
        while len(seqs) < self._most(want):
            # Slow start spaces a round's starts by a few milliseconds. One a call, a round
            # took as many round trips (20-100 ms each from a busy node), so most of it was
            # answered before it ended, and its end released the rest of the pool at once
            # into a full window. The call waits out those short gaps instead, as one
            # machine's waiting requests do.
            wait = self.controller.wait_s(self._clock())
            if 0 < wait <= self.spacing_s and self.controller.slow_start:
                await self._sleep(wait)
                wait = self.controller.wait_s(self._clock())
            if wait > 0 or len(seqs) >= self._most(want):
                break
            seqs.append(self._start(worker, self._clock()))
        self._single = max(0, self._single - len(seqs))
        self._log_events()
        self.granted += len(seqs)
        return Grant(self.epoch, tuple(seqs))

    def _most(self, want: int) -> int:
        """The permits one call may grant: one, for the first pool after slow start.

        Slow start ends by releasing the rest of the pool at once. A permit reaches the
        server's gateway a round trip after its grant (more from a busy node), and its 429
        comes back another one later: granted in batches, that jump would put a round
        trip's worth of starts into a window it may just have filled, where one machine
        hears of the limit within a few milliseconds. One a call, each worker's next
        permit waits for its last to leave.
        """
        if self._slow and not self.controller.slow_start:
            self._slow = False
            self._single = self.controller.config.max_limit
        return 1 if self._single > 0 else max(want, 1)

    def _start(self, worker: str, now: float) -> int:
        seq = self.controller.on_start(now)
        self._holder[seq] = worker
        return seq

    async def adopt(self, worker: str, count: int) -> Grant:
        """``worker`` has ``count`` requests in flight granted by an earlier life of this
        actor: they hold slots now (whatever the cap and pacing say), until they end."""
        now = self._clock()
        self._touch(worker, now)
        seqs = tuple(self.controller.on_start(now) for _ in range(count))
        for seq in seqs:
            self._holder[seq] = worker
            self._adopted.add(seq)
        if seqs:
            log.warning("adopted %d request(s) in flight of %s", len(seqs), worker)
        return Grant(self.epoch, seqs)

    async def end(self, worker: str, epoch: str, events: list[EndEvent]) -> None:
        """Permits came back: answered (the outcome) or abandoned (None)."""
        now = self._clock()
        self._touch(worker, now)
        if epoch != self.epoch:
            return  # granted by an earlier life of this actor
        for seq, outcome, retry_after_s, said in events:
            if self._holder.pop(seq, None) is None:
                continue  # expired meanwhile
            if seq in self._adopted:
                # Its start time is unknown: it tells nothing of the server's latency.
                self._adopted.discard(seq)
                outcome = None
            self.controller.on_end(seq, now, Outcome(outcome) if outcome else None,
                                   retry_after_s, shared_said=said)
        self._notify()

    async def renew(self, worker: str) -> str:
        """Keep ``worker``'s permits alive; returns the epoch (a new one: the actor restarted)."""
        self._touch(worker, self._clock())
        return self.epoch

    async def stats(self) -> dict[str, Any]:
        c = self.controller
        return {"peak": c.peak, "in_flight": c.in_flight, "granted": self.granted,
                "expired": self.expired, "epoch": self.epoch,
                "rate_per_s": c.rate, "paused_s": max(0.0, c.pause_until - self._clock())}

    def _touch(self, worker: str, now: float) -> None:
        self._seen[worker] = now

    def _expire(self, now: float) -> None:
        """End the permits of workers silent for ``lease_ttl_s`` (the module doc says why
        no sooner)."""
        dead = {w for w, at in self._seen.items() if now - at > self.lease_ttl_s}
        if not dead:
            return
        for worker in dead:
            del self._seen[worker]
        lost = [seq for seq, worker in self._holder.items() if worker in dead]
        for seq in lost:
            del self._holder[seq]
            self._adopted.discard(seq)
            self.controller.on_end(seq, now, None)
        if lost:
            self.expired += len(lost)
            log.warning("ended %d permit(s) of silent workers", len(lost))
            self._notify()

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _notify(self) -> None:
        self._log_events()
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _log_events(self) -> None:
        for event in self.controller.events:
            log.info("%s", event)
        self.controller.events.clear()


class LimitsRemote(Protocol):
    """How a client reaches its server (a Ray actor handle, or the object itself in tests)."""

    def lease(self, worker: str, want: int) -> Awaitable[Grant]: ...

    def end(self, worker: str, epoch: str, events: list[EndEvent]) -> Awaitable[None]: ...

    def renew(self, worker: str) -> Awaitable[str]: ...

    def adopt(self, worker: str, count: int) -> Awaitable[Grant]: ...
