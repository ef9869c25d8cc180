"""One endpoint's limits shared by every shard task of a cluster: a server and its client.

:class:`LimitsServer` is the body of a named async Ray actor (one per
endpoint; :mod:`batch.runners.ray` wraps it). It runs the same pure
:class:`~batch.congestion.Controller` as a single machine, so the
concurrency cap, ``--rpm``, the shared 429 pause and the learnt pacing are
decided in one place for the whole cluster. It imports no Ray: the tests
drive it with plain asyncio.

:class:`SharedLimits` is what a shard task's engine sees in place of
:class:`batch.limits.Limits` (``async with limits.slot() as ticket``,
``limits.on_answer(ticket, error)``, ``peak``), so the engine does not
change. The round trip to the actor (1-4 ms) is paid per batch, not per
request: one pump asks for as many permits as there are waiting requests
(at most ``batch``), and answers are sent back in batches while the
previous batch is under way.

Every call is bounded: the server answers a lease within ``poll_s`` (an
empty grant when nothing may start yet), and the client gives up on any call
after ``call_timeout_s``, so an actor that hangs or whose node is gone fails
its waiters (``ClusterError``) instead of hanging the shard.

Leases: a worker renews its lease with every call and every few seconds;
the permits of a worker silent for ``lease_ttl_s`` (its process or node
died) are ended as abandoned, so a dead worker never holds a slot for good.
A restarted actor starts cautious, as after a 429: a pause, then slow start
from one request. During the pause (``adopt_window_s``, longer than two
renewals) every live client learns the new epoch from its renewal and
re-registers the permits it still has in flight (``adopt``), so requests of
the actor's previous life count against the cap of its new one.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, replace
from typing import Any, Protocol

from batch.congestion import ControlConfig, Controller, Outcome, Verdict
from batch.errors import ClusterError, JobError, RateLimited
from batch.limits import Limits, Ticket

log = logging.getLogger(__name__)

# (ticket, outcome or None if abandoned, retry-after seconds)
EndEvent = tuple[int, str | None, float | None]


@dataclass(frozen=True)
class Grant:
    """Permits granted by one lease call, numbered by the server's incarnation ``epoch``."""

    epoch: str
    seqs: tuple[int, ...]


class LimitsServer:
    """See the module docstring. ``cautious``: this is a restart."""

    def __init__(self, config: ControlConfig, *, cautious: bool = False,
                 lease_ttl_s: float = 10.0, adopt_window_s: float = 7.0, poll_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if cautious:
            config = replace(config, initial_limit=1)
        self.controller = Controller(config)
        self.epoch = uuid.uuid4().hex[:12]
        self.lease_ttl_s = lease_ttl_s
        self.poll_s = poll_s
        self._clock = clock
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
        seqs: list[int] = []
        while len(seqs) < max(want, 1) and self.controller.wait_s(now) <= 0:
            seq = self.controller.on_start(now)
            self._holder[seq] = worker
            seqs.append(seq)
        self.granted += len(seqs)
        return Grant(self.epoch, tuple(seqs))

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
        for seq, outcome, retry_after_s in events:
            if self._holder.pop(seq, None) is None:
                continue  # expired meanwhile
            if seq in self._adopted:
                # Its start time is unknown: it tells nothing of the server's latency.
                self._adopted.discard(seq)
                outcome = None
            self.controller.on_end(seq, now, Outcome(outcome) if outcome else None,
                                   retry_after_s)
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

    async def retire(self, prefix: str, keep: str) -> int:
        """Workers named ``prefix...`` other than ``keep`` are dead: their permits end now.

        A shard's retry says so of its earlier attempts (Ray retries a task once its
        worker or node is gone), so their slots come back at once, not after
        ``lease_ttl_s``. Returns the permits ended.
        """
        dead = {w for w in self._seen if w.startswith(prefix) and w != keep}
        return self._forget(dead, self._clock(), "of an earlier attempt")

    def _expire(self, now: float) -> None:
        self._forget({w for w, at in self._seen.items() if now - at > self.lease_ttl_s}, now,
                     "of silent workers")

    def _forget(self, dead: set[str], now: float, why: str) -> int:
        if not dead:
            return 0
        for worker in dead:
            del self._seen[worker]
        lost = [seq for seq, worker in self._holder.items() if worker in dead]
        for seq in lost:
            del self._holder[seq]
            self._adopted.discard(seq)
            self.controller.on_end(seq, now, None)
        if lost:
            self.expired += len(lost)
            log.warning("ended %d permit(s) %s", len(lost), why)
            self._notify()
        return len(lost)

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


@dataclass
class SharedTicket(Ticket):
    epoch: str = ""


class SlotHook(Protocol):
    """Work done once a permit is granted and before the request starts (the budget)."""

    async def acquire(self) -> int: ...

    def release(self, token: int) -> None: ...


class SharedLimits(Limits):
    """The engine's limits of one endpoint, backed by a :class:`LimitsServer`.

    A :class:`~batch.limits.Limits` to the engine; the local controller it
    inherits is never consulted.
    """

    def __init__(self, remote: LimitsRemote, worker: str, *, batch: int = 8,
                 renew_s: float = 2.5, hook: SlotHook | None = None,
                 lease_retries: int = 30, retry_s: float = 1.0,
                 call_timeout_s: float = 20.0, unreachable_s: float = 60.0) -> None:
        super().__init__(ControlConfig(max_limit=1))
        self._remote = remote
        self.worker = worker
        self._batch = batch
        self._renew_s = renew_s
        self._hook = hook
        self._lease_retries = lease_retries
        self._retry_s = retry_s
        self._call_timeout_s = call_timeout_s
        self._unreachable_s = unreachable_s
        self._queue: collections.deque[asyncio.Future[tuple[str, int]]] = collections.deque()
        self._ends: list[tuple[str, EndEvent]] = []
        self._pump: asyncio.Task[None] | None = None
        self._flush: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._peak = 0
        self._in_flight = 0
        self._live: dict[int, SharedTicket] = {}  # id() -> ticket of a request in flight
        self._epoch: str | None = None  # the server's incarnation, as last seen
        self._adopting = asyncio.Lock()
        self.round_trips = 0

    @property
    def peak(self) -> int:
        """The most requests this shard had in flight at once (the server knows the cluster's)."""
        return self._peak

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[Ticket]:
        """Wait for a permit from the server, then hold it until the block ends."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[tuple[str, int]] = loop.create_future()
        self._queue.append(waiter)
        self._start()
        try:
            epoch, seq = await waiter
        except asyncio.CancelledError:
            if waiter in self._queue:
                self._queue.remove(waiter)
            elif waiter.done() and not waiter.cancelled():
                # Granted as the stop came: give the permit back, unused.
                epoch, seq = waiter.result()
                self._queue_end(SharedTicket(seq, epoch=epoch), None, None)
            raise
        ticket = SharedTicket(seq, epoch=epoch)
        self._live[id(ticket)] = ticket
        self._in_flight += 1
        self._peak = max(self._peak, self._in_flight)
        token: int | None = None
        try:
            if self._hook is not None:
                token = await self._hook.acquire()
            yield ticket
        finally:
            self._in_flight -= 1
            del self._live[id(ticket)]
            if token is not None and self._hook is not None:
                self._hook.release(token)
            if not ticket.answered:
                self._queue_end(ticket, None, None)

    def on_answer(self, ticket: Ticket, error: JobError | None = None) -> Verdict | None:
        """The server answered ``ticket``'s request: ``error`` is None on success.

        The verdict on a 429 is the server's to make; it is not waited for.
        """
        if ticket.answered or not isinstance(ticket, SharedTicket):
            return None
        ticket.answered = True
        refused = isinstance(error, RateLimited)
        retry_after = error.retry_after_s if refused and error is not None else None
        self._queue_end(ticket, (Outcome.REFUSED if refused else Outcome.ADMITTED).value,
                        retry_after)
        return None

    async def close(self) -> None:
        """Send the last answers; stop the pump and the renewals."""
        for task in (self._pump, self._renewer):
            if task is not None:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
        if self._flush is not None:
            with suppress(Exception):
                await self._flush
        if self._ends:
            await self._send_ends()

    # -- the pump: one lease call at a time, for every waiting request ----------------

    def _start(self) -> None:
        if self._pump is None or self._pump.done():
            self._pump = asyncio.get_running_loop().create_task(self._run_pump())
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(self._renew())

    async def _run_pump(self) -> None:
        failures = 0
        failing_since = 0.0
        while self._queue:
            try:
                # Bounded: the server answers within its poll_s, so a call this late went to
                # an actor that hangs or is gone. (Permits it may still grant are held until
                # this worker ends and its lease expires: a few slots, never a hang.)
                grant = await asyncio.wait_for(
                    self._remote.lease(self.worker, min(len(self._queue), self._batch)),
                    self._call_timeout_s)
            except Exception as exc:
                # A restarting actor answers again within seconds; one that does not (or a
                # bug in it) must not leave the waiters waiting for good: they fail, and the
                # engine stops with their jobs pending.
                failures += 1
                now = time.monotonic()
                failing_since = failing_since if failures > 1 else now
                # Tries, or time: calls that each time out must not add up to many minutes.
                if failures > self._lease_retries or now - failing_since > self._unreachable_s:
                    log.error("limits unreachable after %d tries: %s", failures, exc)
                    self._fail_waiters(ClusterError(
                        f"the shared limits stayed unreachable ({exc!r})"))
                    return
                log.warning("lease failed (%r); trying again in %.1fs", exc, self._retry_s)
                await asyncio.sleep(self._retry_s)
                continue
            failures = 0
            self.round_trips += 1
            try:
                await self._on_epoch(grant.epoch)
            except Exception as exc:  # the next renewal adopts them
                log.warning("could not re-register the requests in flight: %r", exc)
            for seq in grant.seqs:
                while self._queue and self._queue[0].done():
                    self._queue.popleft()  # cancelled while the lease was under way
                if self._queue:
                    self._queue.popleft().set_result((grant.epoch, seq))
                else:
                    self._ends.append((grant.epoch, (seq, None, None)))  # nobody wants it now
                    self._kick_flush()

    def _fail_waiters(self, error: Exception) -> None:
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self._renew_s)
            with suppress(Exception):  # a restarting actor: the next renewal tries again
                epoch = await asyncio.wait_for(self._remote.renew(self.worker),
                                               self._call_timeout_s)
                await self._on_epoch(epoch)

    async def _on_epoch(self, epoch: str) -> None:
        """The server restarted if ``epoch`` is new: it adopts what this worker has in flight."""
        async with self._adopting:
            if self._epoch is None:
                self._epoch = epoch
            if epoch == self._epoch:
                return
            old = [t for t in self._live.values() if t.epoch != epoch and not t.answered]
            grant = await asyncio.wait_for(  # raises: tried again
                self._remote.adopt(self.worker, len(old)), self._call_timeout_s)
            self._epoch = grant.epoch
            for ticket, seq in zip(old, grant.seqs, strict=True):
                if id(ticket) in self._live and not ticket.answered:
                    ticket.epoch, ticket.seq = grant.epoch, seq
                else:  # ended while adopt was under way (its end went to the old epoch)
                    self._ends.append((grant.epoch, (seq, None, None)))
                    self._kick_flush()

    def _queue_end(self, ticket: SharedTicket, outcome: str | None,
                   retry_after_s: float | None) -> None:
        self._ends.append((ticket.epoch, (ticket.seq, outcome, retry_after_s)))
        self._kick_flush()

    def _kick_flush(self) -> None:
        if self._flush is None or self._flush.done():
            self._flush = asyncio.get_running_loop().create_task(self._send_ends())

    async def _send_ends(self) -> None:
        # Answers that arrive while one batch is under way go in the next one.
        while self._ends:
            pending, self._ends = self._ends, []
            by_epoch: dict[str, list[EndEvent]] = {}
            for epoch, event in pending:
                by_epoch.setdefault(epoch, []).append(event)
            for epoch, events in by_epoch.items():
                try:
                    await asyncio.wait_for(self._remote.end(self.worker, epoch, events),
                                           self._call_timeout_s)
                except Exception as exc:  # the actor died: its successor ignores these
                    log.warning("could not return %d permit(s): %s", len(events), exc)
            self.round_trips += 1

