"""One endpoint's limits shared by every shard task of a cluster: the client.

:class:`SharedLimits` is what a shard task's engine sees in place of
:class:`batch.limits.Limits` (``async with limits.slot() as ticket``,
``limits.on_answer(ticket, error)``, ``peak``), so the engine does not
change. Its server is :class:`~batch.runners.limits_server.LimitsServer`.
The round trip to the actor (1-4 ms) is paid per batch, not per request:
one pump asks for as many permits as there are waiting requests (at most
``batch``), and answers are sent back in batches while the previous batch
is under way; a 429 goes at once, in a call of its own (the cluster's pool
must hear of a shared limit as soon as one machine's would).

Every call is bounded: the client gives up on any call after
``call_timeout_s``, so an actor that hangs or whose node is gone fails its
waiters (``ClusterError``) instead of hanging the shard. A worker renews its
lease every ``renew_s``; when a renewal shows the server restarted (a new
epoch), it re-registers what it has in flight (``adopt``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Protocol

from batch.congestion import ControlConfig, Outcome, Verdict
from batch.errors import ClusterError, JobError, RateLimited
from batch.limits import Limits, Ticket
from batch.runners.limits_server import EndEvent, LimitsRemote

log = logging.getLogger(__name__)


@dataclass
class SharedTicket(Ticket):
    epoch: str = ""


class SlotHook(Protocol):
    """Work done once a permit is granted and before the request starts (the budget)."""

    async def acquire(self) -> int: ...

    def release(self, token: int) -> None: ...


class SharedLimits(Limits):
    """The engine's limits of one endpoint, backed by a
    :class:`~batch.runners.limits_server.LimitsServer`.

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
        self._urgent: set[asyncio.Task[None]] = set()  # 429s sent ahead of the batch
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
                self._queue_end(SharedTicket(seq, epoch=epoch), None, None, False)
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
                self._queue_end(ticket, None, None, False)

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
                        retry_after, isinstance(error, RateLimited) and error.quota_used_up)
        return None

    async def close(self) -> None:
        """Send the last answers; stop the pump and the renewals."""
        for task in (self._pump, self._renewer):
            if task is not None:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
        for flush in (self._flush, *self._urgent):
            if flush is not None:
                with suppress(Exception):
                    await flush
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
                    # Nobody wants it now.
                    self._ends.append((grant.epoch, (seq, None, None, False)))
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
                    self._ends.append((grant.epoch, (seq, None, None, False)))
                    self._kick_flush()

    def _queue_end(self, ticket: SharedTicket, outcome: str | None,
                   retry_after_s: float | None, said: bool) -> None:
        self._ends.append((ticket.epoch, (ticket.seq, outcome, retry_after_s, said)))
        self._kick_flush(urgent=outcome == Outcome.REFUSED.value)

    def _kick_flush(self, *, urgent: bool = False) -> None:
        loop = asyncio.get_running_loop()
        if self._flush is None or self._flush.done():
            self._flush = loop.create_task(self._send_ends())
        elif urgent:
            # A 429 may be the first of a shared limit, met while the pool refills at a few
            # hundred starts a second: the server hears of it now, in a call of its own, not
            # after the batch under way (a round trip: 20-60 ms from a busy node).
            pending, self._ends = self._ends, []
            task = loop.create_task(self._send(pending))
            self._urgent.add(task)
            task.add_done_callback(self._urgent.discard)

    async def _send_ends(self) -> None:
        # Answers that arrive while one batch is under way go in the next one.
        while self._ends:
            pending, self._ends = self._ends, []
            await self._send(pending)

    async def _send(self, pending: list[tuple[str, EndEvent]]) -> None:
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

