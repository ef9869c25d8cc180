"""What one cluster run shares besides the endpoints' limits: the budget, the stop, progress.

:class:`Coordinator` is the body of the run's async Ray actor (created by the
driver, so it dies with it). It holds

- the ``--max-cost`` budget in micro-dollars: a shard task leases the price
  of one request per slot (:class:`SharedBudget`, the engine's ``Budget``
  interface) and gives it back with what was spent when the slot ends. A
  worker silent for ``lease_ttl_s`` died: what it held counts as spent,
  since its requests in flight may have been paid (never spend past the cap);
- the stop: the driver's signal, or a shard's fatal answer, reaches every
  shard's engine on its next heartbeat (:class:`Reporter`, every
  ``interval_s``), as a stop with the same reason;
- progress events, which the driver drains into its one progress line.

A shard whose heartbeat fails for ``orphan_s`` lost its driver: it aborts,
so a killed driver leaves no task writing for long. No call waits for good:
``take`` answers within ``poll_s`` (:data:`AGAIN` when nothing fits yet) and
the shard gives up on any call after ``call_timeout_s``.

Ray restarts the actor if its process dies, with none of its memory. A
restarted coordinator with a cap starts stopped (``max_cost``): what was
spent and held is lost, and only stopping keeps ``--max-cost`` from being
spent twice. The stop the driver issued is lost too: the driver sees the new
``epoch`` in :meth:`Coordinator.drain` and sends it again (:class:`StopRelay`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Protocol, TypeVar

from batch.checkpoint import JobState
from batch.cost import Budget, to_micros, to_usd
from batch.engine import StopReason
from batch.errors import ClusterError, JobError
from batch.jobs import Job
from batch.progress import Observer

log = logging.getLogger(__name__)

# (kind, job id, number, text): "attempt"; "answer" (text: the error's type, "" if none);
# "retry" (number: the wait, text: "type:message"); "success" (number: the cost, text: its
# images' sizes, comma-separated); "failure" (text: "type:message").
Event = tuple[str, str, float, str]
_T = TypeVar("_T")
AGAIN = -1  # granted by take(): nothing fits yet, ask again
CALL_TIMEOUT_S = 20.0  # a shard's call to the coordinator: past this, the actor is gone or hangs


async def call(awaitable: Awaitable[_T], timeout_s: float = CALL_TIMEOUT_S) -> _T:
    """An actor call bounded by ``timeout_s`` (TimeoutError): no shard waits for good."""
    return await asyncio.wait_for(awaitable, timeout_s)


@dataclass(frozen=True)
class Control:
    """What the driver wants of every shard now."""

    stop: str | None = None  # a StopReason value
    message: str = ""
    abort: bool = False


class Coordinator:
    """See the module docstring."""

    def __init__(self, cap_usd: float | None, *, restarted: bool = False,
                 lease_ttl_s: float = 15.0, poll_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cap = None if cap_usd is None else to_micros(cap_usd)
        self.spent = 0
        self.held: dict[str, int] = {}
        self.lease_ttl_s = lease_ttl_s
        self.poll_s = poll_s
        self._clock = clock
        self._seen: dict[str, float] = {}
        self._changed: asyncio.Event | None = None
        self.control = Control()
        self.events: list[Event] = []
        self.epoch = uuid.uuid4().hex[:12]
        self.attempts: dict[str, int] = {}  # shard -> attempts started
        self.closed = False  # no budget is leased any more
        if restarted:
            log.warning("the run's coordinator restarted")
        if restarted and self.cap is not None:
            self.closed = True
            self.control = Control(StopReason.BUDGET.value,
                                   "the run's coordinator restarted and lost what was spent; "
                                   "stopping so that --max-cost is never passed")

    # -- budget -------------------------------------------------------------------

    async def take(self, worker: str, amount: int) -> tuple[int, int]:
        """Lease ``amount`` micro-dollars: (granted, spent so far); 0 granted: it never fits.

        Waits while reservations of requests in flight elsewhere leave no room, at most
        ``poll_s``: then :data:`AGAIN` (the shard asks again).
        """
        give_up = self._clock() + self.poll_s
        while True:
            now = self._clock()
            self._touch(worker, now)
            self._expire(now)
            if self.cap is None:
                return amount, self.spent
            if self.closed or self.spent + amount > self.cap:
                return 0, self.spent
            if self.spent + sum(self.held.values()) + amount <= self.cap:
                self.held[worker] = self.held.get(worker, 0) + amount
                return amount, self.spent
            if now >= give_up:
                return AGAIN, self.spent
            if self._changed is None:
                self._changed = asyncio.Event()
            with suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(1.0, give_up - now))

    async def give(self, worker: str, released: int, spent: int) -> None:
        """``released`` of what ``worker`` held comes back; ``spent`` was paid."""
        self._touch(worker, self._clock())
        self.held[worker] = max(0, self.held.get(worker, 0) - released)
        self.spent += spent
        self._notify()

    async def attempt(self, shard: str) -> int:
        """The number of a new attempt of ``shard`` (1, 2, ...): its segments' order.

        Counted here, not read off a node's clock: a retry on a node whose clock is
        behind still sorts after the attempt it replaces. (A restarted coordinator
        counts from 1 again; the journal's fold keeps the state with the most attempts.)
        """
        self.attempts[shard] = self.attempts.get(shard, 0) + 1
        return self.attempts[shard]

    # -- stop and progress -------------------------------------------------------------

    async def report(self, worker: str, events: list[Event]) -> Control:
        """A shard's heartbeat: its progress events in, what it must do out."""
        self._touch(worker, self._clock())
        self.events.extend(events)
        return self.control

    async def stop(self, reason: str, message: str, abort: bool = False) -> None:
        """Every shard stops at its next heartbeat (the first reason is kept)."""
        if self.control.stop is None:
            self.control = Control(reason, message, abort)
        elif abort:
            self.control = Control(self.control.stop, self.control.message, True)

    async def drain(self) -> tuple[list[Event], float, str]:
        """The events since the last drain, the spend so far in USD, and the epoch (a new
        one: the actor restarted)."""
        events, self.events = self.events, []
        return events, to_usd(self.spent), self.epoch

    async def retire(self, prefix: str, keep: str) -> None:
        """Workers named ``prefix...`` other than ``keep`` are dead (earlier attempts of a
        retried shard): what they held counts as spent now, not after ``lease_ttl_s``."""
        for worker in [w for w in self._seen if w.startswith(prefix) and w != keep]:
            self._forget(worker, "is an earlier attempt of a retried shard")
        self._notify()

    def _touch(self, worker: str, now: float) -> None:
        self._seen[worker] = now

    def _expire(self, now: float) -> None:
        for worker, at in list(self._seen.items()):
            if now - at > self.lease_ttl_s:
                self._forget(worker, "went silent")

    def _forget(self, worker: str, why: str) -> None:
        del self._seen[worker]
        lost = self.held.pop(worker, 0)
        if lost:
            # Its requests in flight may have been paid: never spend past the cap.
            self.spent += lost
            log.warning("worker %s %s holding $%.4f; counted as spent", worker, why,
                        to_usd(lost))

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None


class StopRelay:
    """The driver's record of the stop it sent, to send again to a restarted coordinator."""

    def __init__(self) -> None:
        self.sent: tuple[str, str, bool] | None = None
        self._epoch: str | None = None

    def stop(self, reason: str, message: str, abort: bool = False) -> tuple[str, str, bool]:
        """The arguments of the coordinator's ``stop`` to send now (the first reason kept)."""
        if self.sent is None:
            self.sent = (reason, message, abort)
        elif abort:
            self.sent = (self.sent[0], self.sent[1], True)
        return reason, message, abort

    def again(self, epoch: str) -> tuple[str, str, bool] | None:
        """After a drain: the stop to send again if ``epoch`` says the coordinator restarted."""
        changed = self._epoch is not None and epoch != self._epoch
        self._epoch = epoch
        return self.sent if changed else None


class CoordinatorRemote(Protocol):
    def take(self, worker: str, amount: int) -> Awaitable[tuple[int, int]]: ...

    def give(self, worker: str, released: int, spent: int) -> Awaitable[None]: ...

    def report(self, worker: str, events: list[Event]) -> Awaitable[Control]: ...

    def attempt(self, shard: str) -> Awaitable[int]: ...

    def retire(self, prefix: str, keep: str) -> Awaitable[None]: ...


class SharedBudget(Budget):
    """The engine's :class:`~batch.cost.Budget`, leased from the coordinator per slot.

    A slot brings ``lease`` micro-dollars (the dearest request of the shard);
    the engine reserves a request's price from what is held here. Once the
    dearest request can never fit, every ``could_ever_fit`` is False, so a
    shard stops there (one machine would still try its cheaper jobs).
    """

    def __init__(self, remote: CoordinatorRemote, worker: str, cap_usd: float | None,
                 lease: int) -> None:
        super().__init__(cap_usd)  # spent: paid by this shard
        self._remote = remote
        self._worker = worker
        self._lease = lease
        self._held = 0
        self._cluster_spent = 0
        self._exhausted = False
        self._unreported = 0
        self._gives: set[asyncio.Task[None]] = set()

    @property
    def spent_usd(self) -> float:
        return to_usd(max(self._cluster_spent, self.spent))

    def could_ever_fit(self, price: int) -> bool:
        return self.cap is None or not self._exhausted

    def try_reserve(self, price: int) -> bool:
        if self.cap is not None and self._held - self.reserved < price:
            return False
        self.reserved += price
        return True

    def settle(self, reserved: int, spent: int) -> None:
        self.reserved -= reserved
        self.spent += spent
        self._unreported += spent

    async def acquire(self) -> int:
        """Before a request: lease one request's price (the slot hook)."""
        if self.cap is None or self._exhausted:
            return 0
        failures = 0
        while True:
            try:
                granted, spent = await call(self._remote.take(self._worker, self._lease))
            except Exception as exc:
                # A restarting coordinator answers again within seconds; one that does not
                # stops this shard (its jobs stay pending) rather than hang it.
                failures += 1
                if failures >= 3:
                    raise ClusterError(f"the run's coordinator stayed unreachable ({exc!r})"
                                       ) from None
                log.warning("budget lease failed (%r); trying again", exc)
                await asyncio.sleep(1.0)
                continue
            if granted != AGAIN:
                break
        self._cluster_spent = spent
        if not granted:
            self._exhausted = True
        self._held += granted
        return granted

    def release(self, token: int) -> None:
        """After a request: give the lease back with what was paid."""
        if self.cap is None:
            return
        self._held -= token
        spent, self._unreported = self._unreported, 0
        if token or spent:
            task = asyncio.get_running_loop().create_task(self._give(token, spent))
            self._gives.add(task)
            task.add_done_callback(self._gives.discard)

    async def _give(self, released: int, spent: int) -> None:
        try:
            await call(self._remote.give(self._worker, released, spent))
        except Exception as exc:  # the coordinator is gone: its lease expiry counts it spent
            log.warning("could not return a budget lease: %s", exc)

    async def close(self) -> None:
        if self._gives:
            await asyncio.wait(set(self._gives))


class Stoppable(Protocol):
    @property
    def stopping(self) -> bool: ...

    def stop(self, reason: StopReason, message: str) -> None: ...

    def abort(self) -> None: ...


class Reporter(Observer):
    """A shard's observer: batches its events to the coordinator and applies the stop."""

    def __init__(self, remote: CoordinatorRemote, worker: str, *, interval_s: float = 0.5,
                 orphan_s: float = 20.0, call_timeout_s: float = 10.0) -> None:
        self._remote = remote
        self._worker = worker
        self._interval_s = interval_s
        self._orphan_s = orphan_s
        self._call_timeout_s = call_timeout_s
        self._events: list[Event] = []
        self.engine: Stoppable | None = None
        self._task: asyncio.Task[None] | None = None
        self.control = Control()

    def start(self, engine: Stoppable) -> None:
        self.engine = engine
        self._task = asyncio.get_running_loop().create_task(self._beat())

    def on_attempt(self, job: Job) -> None:
        self._events.append(("attempt", job.id, 0.0, ""))

    def on_answer(self, job: Job, error: JobError | None = None) -> None:
        self._events.append(("answer", job.id, 0.0, "" if error is None else error.type))

    def on_retry(self, job: Job, error: JobError, wait_s: float) -> None:
        self._events.append(("retry", job.id, wait_s, f"{error.type}:{error}"))

    def on_success(self, job: Job, state: JobState, cost_usd: float) -> None:
        # The sizes of its images (the driver's metrics count them), not the images.
        sizes = ",".join(str(image.bytes) for image in state.images)
        self._events.append(("success", job.id, cost_usd, sizes))

    def on_failure(self, job: Job, error: JobError) -> None:
        self._events.append(("failure", job.id, 0.0, f"{error.type}:{error}"))

    async def _beat(self) -> None:
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.flush()
                last_ok = time.monotonic()
            except Exception as exc:
                if time.monotonic() - last_ok > self._orphan_s and self.engine is not None:
                    log.error("the driver is gone (%s): abandoning the shard", exc)
                    self.engine.stop(StopReason.SIGNAL, "the driver is gone")
                    self.engine.abort()
                    return

    async def flush(self) -> None:
        events, self._events = self._events, []
        try:
            control = await call(self._remote.report(self._worker, events), self._call_timeout_s)
        except Exception:
            self._events[:0] = events  # not delivered: they go with the next beat
            raise
        # (Cancelled while the call was under way: it reaches the actor all the same, so
        # its events are not sent twice.)
        self._apply(control)

    def _apply(self, control: Control) -> None:
        self.control = control
        engine = self.engine
        if engine is None or control.stop is None:
            return
        if not engine.stopping:
            engine.stop(StopReason(control.stop), control.message)
        if control.abort:
            engine.abort()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
        with suppress(Exception):
            await self.flush()
