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
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from tenacity import AsyncRetrying, RetryCallState, stop_never

from batch.checkpoint import fingerprint
from batch.commit import GroupCommitter, Offload, in_thread
from batch.cost import Budget, to_usd
from batch.errors import FatalApiError, JobError, RateLimited, StorageError
from batch.jobs import Job, Status
from batch.limits import Limits
from batch.progress import Observer
from batch.providers.base import Provider
from batch.recorder import Recorder
from batch.retry import Decision, decide

# Re-exported: the engine's callers name its types through it.
from batch.runtypes import EngineConfig as EngineConfig
from batch.runtypes import Route as Route
from batch.runtypes import RunStats as RunStats
from batch.runtypes import StopReason as StopReason
from batch.runtypes import make_limits as make_limits
from batch.storage.base import ImageSink, StateStore

log = logging.getLogger(__name__)

# Stops that bound the time requests in flight may take.
_TIMED_STOPS = frozenset({StopReason.SIGNAL, StopReason.RUNTIME})


class _Stopped(Exception):
    """Raised inside a job when the run stops before its next request."""


class _OverBudget(Exception):
    """This job's price no longer fits the budget, though cheaper jobs may."""


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
        """``provider`` serves every job, or ``Job.endpoint`` picks a Route by name;
        images go to ``sink`` (default: the store's own)."""
        if isinstance(provider, Mapping):
            self.routes = dict(provider)
        else:
            limits = make_limits(config.concurrency, config.rpm, config.adaptive,
                                 config.policy.max_pause_s)
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
        self._broken = 0  # micro-dollars of answers that came broken, most likely billed
        self._grace: asyncio.TimerHandle | None = None
        self.recorder = Recorder(
            store, self.sink, self.committer, config.prices, self.stats, observer,
            lambda message: self.stop(StopReason.STORAGE, message),
        )

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
                self.recorder.submit_end(job, fp, Status.PENDING, history[-1])
            raise
        except (_Stopped, _OverBudget):
            if history:
                await self.recorder.record_end(job, fp, Status.PENDING, history[-1])
            return
        except StorageError as exc:
            self.stop(StopReason.STORAGE, f"{exc}; jobs left pending, re-run to resume")
            return
        except FatalApiError as exc:
            self.recorder.submit_end(job, fp, Status.PENDING, exc)
            self.stop(StopReason.FATAL, str(exc))
            return
        except JobError as exc:
            if decisions and decisions[-1].retry:
                # Worth another request, but the run is stopping: finish it next run.
                await self.recorder.record_end(job, fp, Status.PENDING, exc)
                return
            self.stats.failed += 1
            await self.recorder.record_end(job, fp, Status.FAILED, exc)
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
                    self.recorder.commit_answer(job, fp, generation, old_paths)
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
