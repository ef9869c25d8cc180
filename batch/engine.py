"""The engine: a function from jobs to outcomes, over a checkpoint.

Pipeline: plan (what the checkpoint already has) -> a bounded pool of
workers pulling jobs from an iterator (never one task per job) -> for each
job, tenacity driving :func:`batch.retry.decide` around one request through
the :class:`~batch.limits.Limits` -> images committed to the checkpoint,
then published.

Stopping: a fatal API answer, a storage failure, a signal, the runtime
budget or endless rate limiting set one flag; no job starts after it, retry
sleeps end at once, and requests already in flight finish (a signal's grace
period cuts them off after ``grace_s``). Unfinished jobs stay ``pending``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from tenacity import AsyncRetrying, RetryCallState, stop_never

from batch.checkpoint import Checkpoint, FileMeta, JobState, fingerprint
from batch.commit import GroupCommitter
from batch.cost import Budget, PriceTable
from batch.errors import (
    FatalApiError,
    JobError,
    RateLimited,
    StorageError,
)
from batch.images import discard, remove_quietly
from batch.jobs import ImageRecord, Job, Status
from batch.limits import ConcurrencyMeter, FirstWave, Limits, PauseGate, RateMeter
from batch.progress import Observer
from batch.providers.base import Generation, Provider
from batch.retry import Decision, RetryPolicy, decide

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
    unpriced_images: int = 0
    tokens: Counter[str] = field(default_factory=Counter)
    stop: StopReason = StopReason.NONE
    stop_message: str = ""


class _Stopped(Exception):
    """Raised inside a job when the run stops before its next request."""


@dataclass(frozen=True)
class Route:
    """Where one endpoint's jobs go: its provider and its own limits (a 429 stays there)."""

    provider: Provider
    limits: Limits
    concurrency: int


def make_limits(concurrency: int, rpm: float | None, adaptive: bool) -> Limits:
    return Limits(
        concurrency=ConcurrencyMeter(concurrency, adaptive=adaptive),
        gate=PauseGate(),
        rate=RateMeter(rpm) if rpm else None,
        adaptive=adaptive,
        # A known rate needs no probe: the pacing already rules out a burst.
        first_wave=FirstWave(concurrency) if adaptive and not rpm else None,
    )


class Engine:
    """One run of jobs over a checkpoint; see the module docstring."""

    def __init__(
        self,
        provider: Provider | Mapping[str, Route],
        store: Checkpoint,
        config: EngineConfig,
        observer: Observer,
    ) -> None:
        """``provider`` serves every job, or ``Job.endpoint`` picks a Route by name."""
        if isinstance(provider, Mapping):
            self.routes = dict(provider)
        else:
            limits = make_limits(config.concurrency, config.rpm, config.adaptive)
            self.routes = {"": Route(provider, limits, config.concurrency)}
        self.store = store
        self.config = config
        self.observer = observer
        self.stats = RunStats()
        self.budget = Budget(config.max_cost_usd)
        self.committer = GroupCommitter(store)
        self._stopping = asyncio.Event()
        self._settled = asyncio.Event()  # a request's cost became known
        self._rng = random.Random(config.seed)
        self._rate_limited_since: dict[int, float] = {}  # by id of the route's limits
        self._in_flight: set[asyncio.Task[None]] = set()

    # -- control ---------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self, reason: StopReason, message: str) -> None:
        """Start no more requests; the first reason given is the one reported."""
        if not self._stopping.is_set():
            self.stats.stop = reason
            self.stats.stop_message = message
            log.warning("stopping: %s", message)
            self._stopping.set()
            self.observer.on_stop(message)

    def cancel_in_flight(self) -> None:
        """Abandon requests in flight (after a signal's grace period)."""
        for task in list(self._in_flight):
            task.cancel()

    # -- the run ------------------------------------------------------------------

    def plan(self, jobs: Sequence[Job]) -> list[tuple[Job, str]]:
        """The jobs that need a request, with their fingerprints, in manifest order."""
        todo = []
        for job in jobs:
            fp = fingerprint(job)
            if self.config.force or not self.store.is_done(job, fp):
                todo.append((job, fp))
        self.stats.planned = len(todo)
        self.stats.skipped = len(jobs) - len(todo)
        return todo

    async def run(self, todo: Sequence[tuple[Job, str]]) -> RunStats:
        """Run ``todo`` to the end or until stopped."""
        self.observer.on_plan(len(todo), self.stats.skipped)
        timer = None
        if self.config.max_runtime_s is not None:
            timer = asyncio.get_running_loop().call_later(
                self.config.max_runtime_s,
                self.stop,
                StopReason.RUNTIME,
                f"--max-runtime of {self.config.max_runtime_s:g}s reached",
            )
        # Workers per endpoint: a slow or rate-limited one never holds another's. A job
        # waiting out a retry holds a worker, not a slot: twice as many keeps slots busy.
        lanes: dict[str, list[tuple[Job, str]]] = {}
        for item in todo:
            lanes.setdefault(item[0].endpoint, []).append(item)
        try:
            async with asyncio.TaskGroup() as group:
                for name, items in lanes.items():
                    lane = iter(items)
                    for _ in range(min(len(items), 2 * self._route(name).concurrency)):
                        group.create_task(self._worker(lane))
        finally:
            if timer is not None:
                timer.cancel()
            await self.committer.close()
            self.stats.peak_in_flight = sum(r.limits.concurrency.peak for r in self.routes.values())
        return self.stats

    def _route(self, endpoint: str) -> Route:
        return self.routes.get(endpoint) or next(iter(self.routes.values()))

    async def _worker(self, pending: Iterator[tuple[Job, str]]) -> None:
        while not self.stopping:
            item = next(pending, None)
            if item is None:
                return
            await self._run_job(*item)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

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
            retry=should_retry, wait=wait, stop=stop_never, sleep=self._sleep, reraise=True
        )
        try:
            generation: Generation = await retrying(self._attempt, job, fp)
        except _Stopped:
            if history:
                await self._record_end(job, fp, Status.PENDING, history[-1])
            return
        except StorageError as exc:
            self.stop(StopReason.STORAGE, f"{exc}; jobs left pending, re-run to resume")
            return
        except FatalApiError as exc:
            self.stop(StopReason.FATAL, str(exc))
            await self._record_end(job, fp, Status.PENDING, exc)
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
        await self._commit(job, fp, generation, old_paths)

    async def _attempt(self, job: Job, fp: str) -> Generation:
        if self.stopping:
            raise _Stopped
        route = self._route(job.endpoint)
        limits = route.limits
        async with limits.slot():
            if self.stopping:
                raise _Stopped
            price = self.config.prices.job_price(job) or 0.0
            while not self.budget.try_reserve(price):
                if self.budget.reserved_usd <= 0:
                    self.stop(
                        StopReason.BUDGET,
                        f"--max-cost ${self.config.max_cost_usd:g} reached "
                        f"(${self.budget.spent_usd:.2f} spent); the rest stays pending",
                    )
                    raise _Stopped
                # Requests in flight may yet fail and free their reservation.
                self._settled.clear()
                await self._settled.wait()
                if self.stopping:
                    raise _Stopped
            spent = 0.0
            self.store.mark_attempt(job, fp)
            self.stats.requests += 1
            self.observer.on_attempt(job)
            task = asyncio.current_task()
            assert task is not None
            self._in_flight.add(task)
            started_at = time.monotonic()
            limits.estimator.started(started_at)
            try:
                generation = await route.provider.generate(job, self.store.root)
                spent = price * len(generation.images)
            except RateLimited as exc:
                limits.estimator.refused(started_at)
                self._on_rate_limited(exc, limits)
                raise
            finally:
                self._in_flight.discard(task)
                self.budget.settle(price, spent)
                self._settled.set()
        self._rate_limited_since.pop(id(limits), None)
        await limits.concurrency.on_success()
        return generation

    def _on_rate_limited(self, error: RateLimited, limits: Limits) -> None:
        self.stats.rate_limited += 1
        now = time.monotonic()
        waited = now - self._rate_limited_since.setdefault(id(limits), now)
        if waited > self.config.policy.max_rate_limit_wait_s:
            self.stop(
                StopReason.RATE_LIMIT,
                f"rate limited continuously for {waited:.0f}s "
                f"(--max-rate-limit-wait {self.config.policy.max_rate_limit_wait_s:g}s); "
                "jobs left pending",
            )
            return
        pause = error.retry_after_s
        if pause is None:
            pause = min(self.config.policy.cap_s, 1.0 + self._rng.random())
        limits.on_rate_limited(min(pause, self.config.policy.max_server_wait_s), now)

    async def _commit(
        self, job: Job, fp: str, generation: Generation, old_paths: set[str]
    ) -> None:
        root = self.store.root
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
            for s in generation.images
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
            await self.committer.commit(state, generation.images)
        except StorageError as exc:
            for staged in generation.images:
                discard(root, staged)
            self.stop(StopReason.STORAGE, f"{exc}; jobs left pending, re-run to resume")
            return
        for path in old_paths - {image.path for image in state.images}:
            remove_quietly(root / path)
        self.stats.succeeded += 1
        self.stats.images_written += len(generation.images)
        self.stats.bytes_written += sum(s.bytes for s in generation.images)
        price = self.config.prices.job_price(job)
        cost = 0.0
        if price is None:
            self.stats.unpriced_images += len(generation.images)
        else:
            cost = price * len(generation.images)
            self.stats.cost_usd += cost
        for key, value in (generation.usage or {}).items():
            if isinstance(value, int) and key.endswith("tokens"):
                self.stats.tokens[key] += value
        self.observer.on_success(job, state, cost)

    async def _record_end(self, job: Job, fp: str, status: Status, error: JobError) -> None:
        state = JobState(
            id=job.id,
            fingerprint=fp,
            status=status,
            attempts=self.store.attempts(job.id),
            error=error.as_record(),
        )
        try:
            await self.committer.commit(state)
        except StorageError as exc:
            self.stop(StopReason.STORAGE, str(exc))

