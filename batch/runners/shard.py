"""One shard of a cluster run: the same engine as on one machine, over shared pieces.

:func:`run_shard` is the body of the Ray task (wrapped in
:mod:`batch.runners.ray`; this module imports no Ray). It builds what the
local CLI builds (the providers from the endpoints, the decode check), but
with each endpoint's limits leased from its shared actor
(:class:`~batch.runners.shared_limits.SharedLimits`), the budget leased from
the run's coordinator (:class:`~batch.runners.coordinator.SharedBudget`),
and the state written to this attempt's own journal segment
(:class:`~batch.runners.segments.SegmentStore`). Images go to the shared
``images/`` folder under their per-job names.

API keys are read here, from the worker's own environment (a KubeRay pod's
Secret, or the environment ``ray start`` was run with): they never travel in
a task's arguments, a runtime environment or the object store.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from batch import routing
from batch.checkpoint import JobState
from batch.endpoints import Endpoint
from batch.engine import Engine, EngineConfig, Route, RunStats
from batch.errors import ClusterError
from batch.imagecheck import DecodeChecked, Verify
from batch.jobs import Job
from batch.runners.coordinator import CoordinatorRemote, Reporter, SharedBudget, call
from batch.runners.fence import Fence, FencedSegments
from batch.runners.limits_server import LimitsRemote
from batch.runners.shared_limits import SharedLimits
from batch.sharding import writer_id
from batch.storage import outputs
from batch.storage.base import StateStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSpec:
    """Everything a shard task needs, sent with it (no secrets)."""

    run: str
    shard: str
    output: str  # a folder every node mounts at this path, or s3://bucket/prefix
    s3_endpoint: str | None
    todo: tuple[tuple[Job, str], ...]  # (job, fingerprint), in manifest order
    prior: tuple[JobState, ...]  # what the driver knew of these jobs (--force compares)
    endpoints: Mapping[str, Endpoint]
    settings: routing.Settings
    config: EngineConfig
    verify: Verify
    deadline_unix: float | None  # the driver's --max-runtime, on the wall clock
    s3_gen: int | None = None  # an s3:// output: the journal generation the driver opened
    fence: Fence | None = None  # the driver's lock or lease: no commit once a newer run holds it
    exit_after: tuple[int, str] | None = None  # test seam: os._exit after N successes, once


class _ExitSeam(Reporter):
    """Test seam: the worker process dies (os._exit) after ``count`` successes, once per
    cluster run (the first attempt to create ``marker`` is the one that dies). The
    marker lists the ids of the successes it saw, committed before it died."""

    def __init__(self, remote: CoordinatorRemote, worker: str, count: int, marker: str) -> None:
        super().__init__(remote, worker)
        self._count = count
        self._marker = marker
        self._seen: list[str] = []

    def on_success(self, job: Job, state: JobState, cost_usd: float) -> None:
        super().on_success(job, state, cost_usd)
        self._seen.append(job.id)
        if len(self._seen) == self._count:
            try:
                fd = os.open(self._marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                return
            os.write(fd, "".join(f"{id_}\n" for id_ in self._seen).encode())
            os.close(fd)
            os._exit(17)


def forced(todo: list[tuple[Job, str]], store: StateStore, prior: Iterable[JobState], *,
           force: bool) -> list[tuple[Job, str]]:
    """What a shard attempt still does of ``todo`` (the engine's plan, ``--force``: all).

    ``--force`` redoes every job once per run, not once per attempt of the shard: a
    job whose state is no longer the one the driver planned with (``prior``) was
    redone by an earlier attempt, and is skipped if done. Compared by value: a
    store that reads its own state (s3://) holds equal states, not the same objects.
    """
    if not force:
        return todo
    before = {state.id: state for state in prior}
    return [(job, fp) for job, fp in todo
            if store.states.get(job.id) == before.get(job.id) or not store.is_done(job, fp)]


async def run_shard(spec: ShardSpec, limits: Mapping[str, LimitsRemote],
                    coordinator: CoordinatorRemote) -> RunStats:
    """Run one shard to its end or the cluster's stop; the stats of this attempt."""
    # Numbered by the coordinator, so a retry sorts after its shard's earlier attempts
    # whatever the nodes' clocks say; the random tail keeps two zombies apart.
    try:
        number = await call(coordinator.attempt(spec.shard))
    except Exception as exc:  # TimeoutError included: Ray retries the task, the driver ends
        raise ClusterError(f"the run's coordinator is unreachable ({exc!r})") from None
    attempt = f"a{number:06d}{uuid.uuid4().hex[:6]}"
    worker = writer_id(spec.run, spec.shard, attempt)
    if number > 1:
        # A retry: Ray runs it once the earlier attempt's worker or node is gone, so the
        # budget that attempt held counts as spent now, not when its lease expires. Its
        # slots wait for their leases (the gateway may still serve what it sent).
        try:
            await call(coordinator.retire(writer_id(spec.run, spec.shard, "a")[:-1], worker))
        except Exception as exc:  # they expire all the same
            log.warning("could not retire the earlier attempts of %s: %r", spec.shard, exc)
    keys = routing.api_keys(spec.endpoints, os.environ)  # UsageError names what is unset
    routes = routing.build_routes(spec.endpoints, keys, spec.settings)
    prices = [spec.config.prices.job_micros(job) or 0 for job, _ in spec.todo]
    budget = SharedBudget(coordinator, worker, spec.config.max_cost_usd,
                          lease=max(prices, default=0))
    shared: dict[str, Route] = {}
    for name, route in routes.items():
        provider = route.provider
        if spec.verify is Verify.DECODE:
            provider = DecodeChecked(provider)
        hook = budget if spec.config.max_cost_usd is not None else None
        shared[name] = replace(route, provider=provider,
                               limits=SharedLimits(limits[name], worker, hook=hook))
    if spec.exit_after is not None:
        reporter: Reporter = _ExitSeam(coordinator, worker, *spec.exit_after)
    else:
        reporter = Reporter(coordinator, worker)
    store: StateStore
    if outputs.is_s3_url(spec.output):
        from batch.runners.s3segments import open_shard

        # In a thread: the S3 state runs its own event loop to read the segments.
        store = await asyncio.to_thread(open_shard, spec.output, spec.s3_endpoint,
                                        worker, spec.s3_gen, spec.prior, spec.fence)
    else:
        store = FencedSegments.open_fenced(Path(spec.output), worker, spec.shard, spec.prior,
                                           spec.fence)
    engine = Engine(shared, store, spec.config, reporter)
    engine.budget = budget
    try:
        todo = forced(engine.plan([job for job, _ in spec.todo]), store, spec.prior,
                      force=spec.config.force)
        if len(todo) < len(spec.todo):
            log.info("shard %s: %d job(s) already committed by an earlier attempt",
                     spec.shard, len(spec.todo) - len(todo))
        reporter.start(engine)
        left = None if spec.deadline_unix is None else spec.deadline_unix - time.time()
        return await engine.run(todo, runtime_left_s=left)
    finally:
        for route in shared.values():
            await route.provider.close()
            if isinstance(route.limits, SharedLimits):
                await route.limits.close()
        await budget.close()
        await reporter.close()
        store.close()
