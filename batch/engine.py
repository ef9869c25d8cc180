"""The engine: a function from jobs to outcomes, over a checkpoint.

Pipeline: plan (what the checkpoint already has) -> a bounded pool of
workers pulling jobs from an iterator (never one task per job) -> for each
job, tenacity driving :func:`batch.retry.decide` around one request through
the :class:`~batch.limits.Limits` -> images committed to the checkpoint,
then published.

Stopping is one mechanism, cancellation: a fatal API answer, a storage
failure, a signal, ``--max-runtime``, ``--max-cost`` or endless rate limiting
call :meth:`Engine.stop`, which cancels at once every worker that is not in
the middle of a request, wherever it waits (a slot, the shared 429 pause,
the rate meter, the first-wave probe, the budget, a retry sleep). After a
signal or the deadline, requests in flight get ``grace_s`` to finish; then
every worker still running is cancelled (after other stops they end on
their own, within ``--timeout``). :meth:`Engine.abort` (a second signal)
cancels them all at once.
An answer is queued for its commit before the worker can be cancelled
again, so a paid image is never dropped between the answer and the commit.
Unfinished jobs stay ``pending``.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from tenacity import AsyncRetrying, RetryCallState, stop_never

from batch.checkpoint import FileMeta, JobState, fingerprint
from batch.commit import GroupCommitter, Offload, in_thread
from batch.cost import Budget, PriceTable, to_usd
from batch.errors import (
    FatalApiError,
    JobError,
    NotRecorded,
    RateLimited,
    StorageError,
)
from batch.jobs import ImageRecord, Job, Status
from batch.limits import Limits
from batch.limits import build as build_limits
from batch.progress import Observer
from batch.providers.base import Generation, Provider
from batch.retry import Decision, RetryPolicy, decide
from batch.storage.base import ImageSink, StateStore

log = logging.getLogger(__name__)


class StopReason(enum.StrEnum):
    NONE = "completed"
    FATAL = "fatal_api_error"
    STORAGE = "storage_error"
    SIGNAL = "signal"
    RUNTIME = "max_runtime"
    RATE_LIMIT = "rate_limit_wait_exceeded"
    BUDGET = "max_cost"


@dataclass(frozen=True)
class EngineConfig:
    concurrency: int = 8
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    rpm: float | None = None
    adaptive: bool = True
    force: bool = False
    max_runtime_s: float | None = None
    max_cost_usd: float | None = None
    prices: PriceTable = field(default_factory=lambda: PriceTable.with_overrides({}))
    seed: int | None = None
    grace_s: float = 30.0  # requests in flight may finish this long after a stop


@dataclass
class RunStats:
    """Counters of one run (mutable: the engine adds to them as it goes)."""

    planned: int = 0
    skipped: int = 0  # already done with the same fingerprint
    requests: int = 0
    succeeded: int = 0
    failed: int = 0
    retries: Counter[str] = field(default_factory=Counter)
    rate_limited: int = 0
    bytes_written: int = 0
    images_written: int = 0
    peak_in_flight: int = 0
    cost_usd: float = 0.0
    broken_cost_usd: float = 0.0  # 200s whose image came broken: most likely billed, not kept
    unpriced_images: int = 0
    tokens: Counter[str] = field(default_factory=Counter)
    stop: StopReason = StopReason.NONE
    stop_message: str = ""


# Stops that bound the time requests in flight may take.
_TIMED_STOPS = frozenset({StopReason.SIGNAL, StopReason.RUNTIME})


class _Stopped(Exception):
    """Raised inside a job when the run stops before its next request."""


class _OverBudget(Exception):
    """This job's price no longer fits the budget, though cheaper jobs may."""


@dataclass(frozen=True)
class Route:
    """Where one endpoint's jobs go: its provider and its own limits (a 429 stays there)."""

    provider: Provider
    limits: Limits
    concurrency: int


def make_limits(
    concurrency: int, rpm: float | None, adaptive: bool, max_pause_s: float = 900.0,
    name: str = "",
) -> Limits:
    """One endpoint's limits (see :mod:`batch.limits`)."""
    return build_limits(concurrency, rpm=rpm, adaptive=adaptive, max_pause_s=max_pause_s,
                        name=name)


class Engine:
    """One run of jobs over a checkpoint; see the module docstring.

    ``clock`` is the loop's clock (tests drive a virtual one) and
    ``offload`` runs the committer's blocking work (a thread by default).
    """

    def __init__(
        self,
        provider: Provider | Mapping[str, Route],
        store: StateStore,
        config: EngineConfig,
        observer: Observer,
        *,
        clock: Callable[[], float] = time.monotonic,
        offload: Offload[None] = in_thread,
        sink: ImageSink | None = None,
    ) -> None:
        """``provider`` serves every job, or ``Job.endpoint`` picks a Route by name.

        Images go to ``sink`` (default: the store's own).
        """
        if isinstance(provider, Mapping):
            self.routes = dict(provider)
        else:
            limits = make_limits(config.concurrency, config.rpm, config.adaptive,
                                 config.policy.max_server_wait_s)
            self.routes = {"": Route(provider, limits, config.concurrency)}
        self.store = store
        self.sink = sink if sink is not None else store.sink
        self.config = config
        self.observer = observer
        self.stats = RunStats()
        self._clock = clock
        self.budget = Budget(config.max_cost_usd)
        self.committer = GroupCommitter(store, offload)
        self._stopping = asyncio.Event()
        self._budget_changed = asyncio.Event()  # a reservation was settled
        self._cheapest = 0  # micro-dollars: the lowest price among the jobs to run
        self._rng = random.Random(config.seed)
        self._rate_limited_since: dict[int, float] = {}  # by id of the route's limits
        self._workers: set[asyncio.Task[None]] = set()
        self._in_flight: set[asyncio.Task[None]] = set()  # workers inside provider.generate
        self._commits: set[asyncio.Task[None]] = set()
        self._commit_bugs: list[BaseException] = []
        self._signals = 0
        self._cost = 0  # micro-dollars of committed images
        self._broken = 0  # micro-dollars of answers that came broken, most likely billed
        self._grace: asyncio.TimerHandle | None = None

    # -- control ---------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self, reason: StopReason, message: str) -> None:
        """Start nothing more: cancel at once every worker that is not in a request.

        The first reason given is the one reported. A signal or the deadline
        also gives requests in flight ``grace_s`` before they are cancelled;
        other stops let them end on their own (``--timeout`` bounds them),
        since cancelling one throws away an image that is being paid for.
        """
        if not self._stopping.is_set():
            self.stats.stop = reason
            self.stats.stop_message = message
            log.warning("stopping: %s", message)
            self._stopping.set()
            self.observer.on_stop(message)
            for task in self._workers - self._in_flight:
                task.cancel()
        if reason in _TIMED_STOPS and self._grace is None and self._workers & self._in_flight:
            self._grace = asyncio.get_running_loop().call_later(
                self.config.grace_s, self._end_grace
            )

    def _end_grace(self) -> None:
        if self._workers:
            log.warning("grace period of %gs over: abandoning %d request(s) in flight",
                        self.config.grace_s, len(self._workers & self._in_flight))
        self.abort()

    def abort(self) -> None:
        """Cancel every worker now, wherever it is (a second signal, the end of the grace).

        Answers already received are still committed.
        """
        for task in self._workers:
            task.cancel()

    def interrupt(self, name: str) -> None:
        """A signal arrived: the first stops the run with a grace period, the next aborts it."""
        self._signals += 1
        if self._signals == 1:
            if self.stopping:
                log.warning("%s received while stopping; requests in flight have %gs "
                            "(send it again to stop now)", name, self.config.grace_s)
            self.stop(StopReason.SIGNAL, f"{name} received; finishing requests in flight "
                      f"for up to {self.config.grace_s:g}s (send it again to stop now)")
            return
        log.warning("%s received again: abandoning requests in flight", name)
        self.abort()

    # -- the run ------------------------------------------------------------------

    def plan(self, jobs: Sequence[Job]) -> list[tuple[Job, str]]:
        """The jobs that need a request, with their fingerprints, in manifest order."""
        # A streamed catalog plans by digest against the store's index (batch.catalog).
        planner = getattr(jobs, "todo", None)
        found = None if self.config.force or planner is None else planner(self.store)
        todo: list[tuple[Job, str]]
        if found is not None:
            todo = list(found)
        else:
            todo = []
            for job in jobs:
                fp = fingerprint(job)
                if self.config.force or not self.store.is_done(job, fp):
                    todo.append((job, fp))
        self.stats.planned = len(todo)
        self.stats.skipped = len(jobs) - len(todo)
        return todo

    async def run(
        self, todo: Sequence[tuple[Job, str]], *, runtime_left_s: float | None = None
    ) -> RunStats:
        """Run ``todo`` to the end or until stopped.

        ``runtime_left_s`` (default ``config.max_runtime_s``) is how long from
        now until the deadline: the CLI counts ``--max-runtime`` from the
        process's start.
        """
        self.observer.on_plan(len(todo), self.stats.skipped)
        self._cheapest = min((self._price(job) for job, _ in todo), default=0)
        loop = asyncio.get_running_loop()
        timer = None
        left = self.config.max_runtime_s if runtime_left_s is None else runtime_left_s
        if left is not None:
            message = f"--max-runtime of {self.config.max_runtime_s:g}s reached"
            if left <= 0:
                self.stop(StopReason.RUNTIME, message)
            else:
                timer = loop.call_later(left, self.stop, StopReason.RUNTIME, message)
        # Jobs waiting out a retry hold a worker but not a request slot, so
        # twice as many workers as slots keeps the slots busy.
        # Workers per endpoint: a slow or rate-limited one never holds another's.
        lanes: dict[str, list[tuple[Job, str]]] = {}
        for item in todo:
            lanes.setdefault(item[0].endpoint, []).append(item)
        try:
            async with asyncio.TaskGroup() as group:
                for name, items in lanes.items():
                    lane = iter(items)
                    for _ in range(min(len(items), 2 * self._route(name).concurrency)):
                        task = group.create_task(self._worker(lane))
                        self._workers.add(task)
                        task.add_done_callback(self._workers.discard)
        finally:
            if timer is not None:
                timer.cancel()
            if self._grace is not None:
                self._grace.cancel()
            # Answers already received are committed whatever ended the workers.
            if self._commits:
                await asyncio.wait(set(self._commits))
            await self.committer.close()
            self.stats.peak_in_flight = sum(r.limits.peak for r in self.routes.values())
        # A bug in a commit nobody waited for (its worker was cancelled) still ends in exit 70.
        if self._commit_bugs:
            raise self._commit_bugs[0]
        if self.committer.broken is not None:
            raise self.committer.broken
        return self.stats

    def _route(self, endpoint: str) -> Route:
        return self.routes.get(endpoint) or next(iter(self.routes.values()))

    async def _worker(self, pending: Iterator[tuple[Job, str]]) -> None:
        while not self.stopping:
            item = next(pending, None)
            if item is None:
                return
            await self._run_job(*item)

    def _price(self, job: Job) -> int:
        """Micro-dollars reserved per request of ``job`` (0 if unpriced: no cap can apply)."""
        return self.config.prices.job_micros(job) or 0

    async def _run_job(self, job: Job, fp: str) -> None:
        history: list[JobError] = []
        decisions: list[Decision] = []
        previous = self.store.states.get(job.id)
        old_paths = {image.path for image in previous.images} if previous else set()

        def should_retry(state: RetryCallState) -> bool:
            assert state.outcome is not None
            error = state.outcome.exception()
            if not isinstance(error, JobError):
                return False
            history.append(error)
            decision = decide(history, self.config.policy, self._rng.random())
            decisions.append(decision)
            if decision.retry and not self.stopping:
                self.stats.retries[error.type] += 1
                self.observer.on_retry(job, error, decision.wait_s)
                return True
            return False

        def wait(state: RetryCallState) -> float:
            return decisions[-1].wait_s

        retrying = AsyncRetrying(
            retry=should_retry, wait=wait, stop=stop_never, sleep=asyncio.sleep, reraise=True
        )
        try:
            commit: asyncio.Task[None] = await retrying(self._attempt, job, fp, old_paths)
        except asyncio.CancelledError:
            if history:  # keep why the job is unfinished; queued without yielding
                self._submit_end(job, fp, Status.PENDING, history[-1])
            raise
        except (_Stopped, _OverBudget):
            if history:
                await self._record_end(job, fp, Status.PENDING, history[-1])
            return
        except StorageError as exc:
            self.stop(StopReason.STORAGE, f"{exc}; jobs left pending, re-run to resume")
            return
        except FatalApiError as exc:
            self._submit_end(job, fp, Status.PENDING, exc)
            self.stop(StopReason.FATAL, str(exc))
            return
        except JobError as exc:
            if decisions and decisions[-1].retry:
                # Worth another request, but the run is stopping: finish it next run.
                await self._record_end(job, fp, Status.PENDING, exc)
                return
            self.stats.failed += 1
            await self._record_end(job, fp, Status.FAILED, exc)
            self.observer.on_failure(job, exc)
            return
        # Shielded: cancelling this worker must not cancel the commit of a paid image.
        await asyncio.shield(commit)

    async def _reserve(self, job: Job) -> int:
        """Reserve ``job``'s price in the budget, waiting for requests in flight to settle."""
        price = self._price(job)
        while True:
            if not self.budget.could_ever_fit(price):
                if not self.budget.could_ever_fit(self._cheapest):
                    self._stop_for_budget()
                    raise _Stopped
                raise _OverBudget  # a cheaper job may still fit
            if self.budget.try_reserve(price):
                return price
            # Requests in flight may yet fail and free their reservation.
            self._budget_changed.clear()
            await self._budget_changed.wait()

    def _stop_for_budget(self) -> None:
        self.stop(
            StopReason.BUDGET,
            f"--max-cost ${self.config.max_cost_usd:g} reached "
            f"(${self.budget.spent_usd:.2f} spent); the rest stays pending",
        )

    async def _attempt(self, job: Job, fp: str, old_paths: set[str]) -> asyncio.Task[None]:
        if self.stopping:
            raise _Stopped
        route = self._route(job.endpoint)
        limits = route.limits
        async with limits.slot() as ticket:
            if self.stopping:
                raise _Stopped
            price = await self._reserve(job)
            spent = 0
            sent = False
            answer_error: JobError | None = None
            task = asyncio.current_task()
            assert task is not None
            self._in_flight.add(task)
            try:
                self.store.mark_attempt(job, fp)
                self.stats.requests += 1
                self.observer.on_attempt(job)
                sent = True
                try:
                    generation = await route.provider.generate(job, self.sink)
                except JobError as exc:
                    answer_error = exc
                    limits.on_answer(ticket, exc)
                    if exc.billed:
                        spent = price
                        self._broken += price
                        self.stats.broken_cost_usd = to_usd(self._broken)
                    if isinstance(exc, RateLimited):
                        self._on_rate_limited(exc, limits)
                    raise
                spent = price * len(generation.images)
                # Queued in the same step as the answer: no cancellation can fall between.
                commit = asyncio.get_running_loop().create_task(
                    self._commit(job, fp, generation, old_paths)
                )
                self._commits.add(commit)
                commit.add_done_callback(self._commit_done)
                limits.on_answer(ticket)
            finally:
                self._in_flight.discard(task)
                if sent:
                    self.observer.on_answer(job, answer_error)
                self.budget.settle(price, spent)
                # Wakes the jobs waiting in _reserve: they stop the run if nothing can fit now.
                self._budget_changed.set()
        self._rate_limited_since.pop(id(limits), None)
        return commit

    def _commit_done(self, commit: asyncio.Task[None]) -> None:
        self._commits.discard(commit)
        if not commit.cancelled() and commit.exception() is not None:
            self._commit_bugs.append(commit.exception())  # type: ignore[arg-type]

    def _on_rate_limited(self, error: RateLimited, limits: Limits) -> None:
        self.stats.rate_limited += 1
        now = self._clock()
        waited = now - self._rate_limited_since.setdefault(id(limits), now)
        if waited > self.config.policy.max_rate_limit_wait_s:
            self.stop(
                StopReason.RATE_LIMIT,
                f"rate limited continuously for {waited:.0f}s "
                f"(--max-rate-limit-wait {self.config.policy.max_rate_limit_wait_s:g}s); "
                "jobs left pending",
            )
            return

    async def _commit(
        self, job: Job, fp: str, generation: Generation, old_paths: set[str]
    ) -> None:
        try:
            # Where any later open finds them (an object store uploads them here).
            images = await self.sink.prepare(generation.images)
        except StorageError as exc:
            # Paid images: prepare kept what it could not make durable (never discard them).
            for staged in generation.images:
                self.sink.release(staged)
            self.stop(StopReason.STORAGE, f"{exc}; jobs left pending, re-run to resume")
            return
        pairs = [
            (
                ImageRecord(
                    path=s.final_rel,
                    sha256=s.sha256,
                    bytes=s.bytes,
                    mime=s.info.mime,
                    width=s.info.width,
                    height=s.info.height,
                ),
                FileMeta(s.tmp_rel, s.mtime_ns),
            )
            for s in images
        ]
        state = JobState(
            id=job.id,
            fingerprint=fp,
            status=Status.SUCCEEDED,
            attempts=self.store.attempts(job.id),
            images=tuple(image for image, _ in pairs),
            image_meta=tuple(meta for _, meta in pairs),
            usage_json=json.dumps(generation.usage) if generation.usage else None,
            latency_s=round(generation.latency_s, 3),
            text=generation.text or None,
        )
        try:
            # Recorded before the rename: a crash in between is finished by the next open.
            await self.committer.commit(state, images)
        except StorageError as exc:
            for staged in images:
                if isinstance(exc, NotRecorded):
                    self.sink.discard(staged)  # frees the space a full disk needs for results
                else:
                    # (Maybe) recorded: the journal points at these temporaries,
                    # and the next open publishes them; deleting them loses a paid image.
                    self.sink.release(staged)
            self.stop(StopReason.STORAGE, f"{exc}; jobs left pending, re-run to resume")
            return
        for path in old_paths - {image.path for image in state.images}:
            self.sink.remove(path)
        self.stats.succeeded += 1
        self.stats.images_written += len(images)
        self.stats.bytes_written += sum(s.bytes for s in images)
        price = self.config.prices.job_micros(job)
        cost = 0
        if price is None:
            self.stats.unpriced_images += len(generation.images)
        else:
            cost = price * len(generation.images)
            self._cost += cost
            self.stats.cost_usd = to_usd(self._cost)
        for key, value in (generation.usage or {}).items():
            if isinstance(value, int) and key.endswith("tokens"):
                self.stats.tokens[key] += value
        self.observer.on_success(job, state, to_usd(cost))

    def _end_state(self, job: Job, fp: str, status: Status, error: JobError) -> JobState:
        return JobState(
            id=job.id,
            fingerprint=fp,
            status=status,
            attempts=self.store.attempts(job.id),
            error=error.as_record(),
        )

    def _submit_end(self, job: Job, fp: str, status: Status, error: JobError) -> None:
        """Queue a job's end without waiting (its worker is being cancelled)."""
        self.committer.submit(self._end_state(job, fp, status, error))

    async def _record_end(self, job: Job, fp: str, status: Status, error: JobError) -> None:
        try:
            await self.committer.commit(self._end_state(job, fp, status, error))
        except StorageError as exc:
            self.stop(StopReason.STORAGE, str(exc))
