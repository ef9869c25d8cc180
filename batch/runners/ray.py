"""``imgbatch run --cluster``: shards of a catalog as Ray tasks, limits and budget shared.

The driver (this process) validates and plans as a single machine does, holds
the output folder's lock, cuts the unfinished jobs into shards
(:mod:`batch.sharding`) and keeps at most ``max_shards`` shard tasks
outstanding. Each task runs the same engine on its shard
(:mod:`batch.runners.shard`), writing images to the shared ``images/`` folder
and its state to its own journal segment. Shared per run, one named async
actor on the driver's node (:class:`~batch.runners.run_state.RunState`) holds

- each endpoint's limits, :class:`~batch.runners.shared_limits.LimitsServer`
  (concurrency, ``--rpm``, 429 pause and pacing; restarted cautious if it dies);
- the coordinator, :class:`~batch.runners.coordinator.Coordinator` (the
  ``--max-cost`` budget, the stop, progress events).

Ray retries a task whose worker or node died (``max_retries``); the retry
skips what its earlier attempt committed. The driver folds the segments into
the main journal at its start and end, writes one results.jsonl and one
summary.json, and exits with the single-machine codes. Ray is imported only
here and only for ``--cluster``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from batch import routing
from batch.checkpoint import fingerprint
from batch.congestion import ControlConfig
from batch.endpoints import Endpoint
from batch.engine import EngineConfig, RunStats, StopReason
from batch.errors import ClusterError, ImgbatchError, StorageError, UsageError
from batch.imagecheck import Verify
from batch.jobs import Job
from batch.manifest import Manifest
from batch.metrics import MetricsFile
from batch.progress import ConsoleProgress, Observer, Observers
from batch.runners.cluster_report import Outcome, Output, add, finish, replay
from batch.runners.coordinator import CALL_TIMEOUT_S
from batch.runners.fence import Fence, folder_token
from batch.runners.run_state import EndpointCalls, RunState
from batch.runners.s3segments import lease_holder
from batch.runners.segments import DriverCheckpoint
from batch.runners.shard import ShardSpec, run_shard
from batch.sharding import DEFAULT_SHARD_SIZE, Backlog, make_shards
from batch.storage import outputs
from batch.storage.base import StateStore
from batch.storage.s3state import S3State

log = logging.getLogger(__name__)

NAMESPACE = "imgbatch"
TASK_RETRIES = 5  # a shard whose worker or node died is run again this often
CLIENT_TRIES = 3  # ray://: connections tried
EXIT_SEAM = "IMGBATCH_RAY_TEST_EXIT"  # tests: "N:MARKER", a worker dies after N successes


@dataclass(frozen=True)
class ClusterOptions:
    """``--cluster`` and its companions."""

    address: str  # "ray" (auto), "ray://HOST:PORT" or "local-ray"
    shard_size: int = DEFAULT_SHARD_SIZE
    max_shards: int | None = None  # shard tasks kept busy (default: one per node)


def connect(address: str) -> None:
    """Join the cluster; ``local-ray`` starts one on this machine."""
    kwargs: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": False,
                              "configure_logging": False}
    if address == "ray":
        ray.init(address="auto", **kwargs)
    elif address.startswith("ray://"):
        for attempt in range(1, CLIENT_TRIES + 1):
            try:
                ray.init(address=address, **kwargs)
                break
            except ConnectionAbortedError as exc:
                ray.shutdown()
                # The head starts a server process per client; on a busy head that start
                # can fail (a port taken meanwhile, a slow start): a new one is asked for.
                if attempt == CLIENT_TRIES:
                    raise ClusterError(f"--cluster {address}: the Ray client server did not "
                                       f"start ({exc})") from None
                log.warning("the Ray client server did not start (%s); trying again", exc)
    elif address == "local-ray":
        ray.init(**kwargs)
    else:
        raise UsageError(f"--cluster {address}: use ray, ray://HOST:PORT or local-ray")


class RunActor(RunState):
    """The run's shared state (see :class:`RunState`); after a restart the limits start
    cautious and a capped coordinator stopped."""

    def __init__(self, cap_usd: float | None, limits: Mapping[str, ControlConfig]) -> None:
        restarted = ray.get_runtime_context().was_current_actor_reconstructed
        super().__init__(cap_usd, limits, restarted=restarted)


def _actor(cls: type[Any], name: str) -> Any:
    """An async actor class on the driver's node, restarted there whenever its process dies.

    Pinned (not soft): with ``soft=True`` Ray 2.60 placed them on any node (seen in the
    node-removal test), and losing that node cost the run its limits' and budget's
    memory mid-run. The driver's node is the one the run cannot outlive anyway (over
    ``ray://`` the driver runs on the head).
    """
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(cls).options(name=name, num_cpus=0, max_restarts=-1, max_task_retries=-1,
                                   max_concurrency=1000, scheduling_strategy=here)


class _Remote:
    """An actor handle seen as the plain object: ``remote.lease(a)`` awaits ``lease.remote(a)``."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._handle, name)
        return lambda *args: method.remote(*args)  # an ObjectRef: awaitable


@ray.remote(num_cpus=1, max_retries=TASK_RETRIES, scheduling_strategy="SPREAD")
def shard_task(spec: ShardSpec, actor: Any) -> RunStats:
    """A Ray task running one shard with the engine (retried if its worker dies)."""
    remote = _Remote(actor)

    def call(method: str, *args: Any) -> Any:
        return getattr(actor, method).remote(*args)

    limits = {name: EndpointCalls(call, name) for name in spec.endpoints}
    return asyncio.run(run_shard(spec, limits, remote))


def _exit_seam() -> tuple[int, str] | None:
    raw = os.environ.get(EXIT_SEAM)
    if not raw:
        return None
    count, marker = raw.split(":", 1)
    return int(count), marker


async def run_cluster(
    manifest: Manifest, output: str, endpoints: Mapping[str, Endpoint],
    settings: routing.Settings, config: EngineConfig, options: ClusterOptions, *,
    deadline: float | None, verify: Verify, progress: ConsoleProgress,
    gallery: Callable[[asyncio.Event, float | None], Awaitable[bool]] | None,
    s3_endpoint: str | None = None, metrics: MetricsFile | None = None,
) -> tuple[int, str]:
    """Run ``manifest`` over the cluster into ``output`` (a shared folder or s3://):
    (exit code, summary line)."""
    connect(options.address)
    where = Output(output, s3_endpoint)
    store: StateStore
    if where.s3:
        # In a thread: the S3 state runs its own event loop to read the segments.
        store = await asyncio.to_thread(outputs.open_s3, output, s3_endpoint)  # the lease
    else:
        where = Output(str(Path(output).resolve()), None)
        store = DriverCheckpoint.open(Path(output))
    try:
        return await _drive(manifest, store, where, endpoints, settings, config, options,
                            deadline, verify, progress, gallery, metrics)
    finally:
        store.close()
        ray.shutdown()


async def _drive(
    manifest: Manifest, store: StateStore, where: Output, endpoints: Mapping[str, Endpoint],
    settings: routing.Settings, config: EngineConfig, options: ClusterOptions,
    deadline: float | None, verify: Verify, progress: ConsoleProgress,
    gallery: Callable[[asyncio.Event, float | None], Awaitable[bool]] | None,
    metrics: MetricsFile | None,
) -> tuple[int, str]:
    run = uuid.uuid4().hex[:10]
    # The shards' events, replayed here: one progress line, one metrics file, cluster-wide.
    observer: Observer = progress if metrics is None else Observers(progress, metrics)
    started_at = time.time()
    store.record_run("start", jobs=len(manifest.jobs), cluster=options.address)
    todo: list[tuple[Job, str]] = []
    for job in manifest.jobs:
        fp = fingerprint(job)
        if config.force or not store.is_done(job, fp):
            todo.append((job, fp))
    stats = RunStats(planned=len(todo), skipped=len(manifest.jobs) - len(todo))
    fence = await _fence_of(store)
    run_actor = _actor(RunActor, f"run-{run}").remote(config.max_cost_usd, {
        name: ControlConfig(max_limit=ep.concurrency or settings.concurrency,
                            rpm=ep.rpm or settings.rpm,
                            max_pause_s=config.policy.max_pause_s)
        for name, ep in endpoints.items()
    })
    shards = make_shards([job.id for job, _ in todo], options.shard_size)
    by_id = {job.id: job for job in manifest.jobs}
    outcome = Outcome(stats)
    signalled = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: signal.Signals) -> None:
        first = outcome.signal is None
        outcome.signal = outcome.signal or signum
        signalled.set()
        message = (f"{signum.name} received; finishing requests in flight for up to "
                   f"{config.grace_s:g}s (send it again to stop now)")
        run_actor.stop.remote(*outcome.stops.stop(StopReason.SIGNAL.value, message, not first))

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    observer.on_plan(len(todo), stats.skipped)
    log.info("%d shard(s) of at most %d job(s) on the cluster", len(shards), options.shard_size)
    try:
        await _run_shards(shards, todo, store, where, endpoints, settings, config, options,
                          deadline, verify, run, run_actor, outcome, by_id, observer,
                          fence)
        try:
            peaks = await asyncio.wait_for(
                asyncio.gather(*(run_actor.stats.remote(name) for name in endpoints)),
                CALL_TIMEOUT_S)
            stats.peak_in_flight = sum(p["peak"] for p in peaks)
            if expired := sum(p["expired"] for p in peaks):
                log.info("the shared limits ended %d permit(s) of dead or silent workers",
                         expired)
        except Exception as exc:  # only a figure of the summary
            log.warning("the peak in flight is unknown: the limits did not answer (%r)", exc)
    except Exception as exc:
        outcome.crashed = exc
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await progress.close()
    return await finish(manifest, store, where, outcome, started_at, deadline, config, signalled,
                         gallery, metrics)


async def _run_shards(
    shards: list[Any], todo: list[tuple[Job, str]], store: StateStore, where: Output,
    endpoints: Mapping[str, Endpoint], settings: routing.Settings, config: EngineConfig,
    options: ClusterOptions, deadline: float | None, verify: Verify, run: str,
    run_actor: Any, outcome: Outcome, by_id: Mapping[str, Job],
    observer: Observer, fence: Fence,
) -> None:
    max_shards = options.max_shards or _nodes_with_cpus()
    deadline_unix = None if deadline is None else time.time() + (deadline - time.monotonic())
    seam = _exit_seam()
    pending = list(reversed(shards))
    outstanding: dict[Any, str] = {}
    backlog = Backlog(shards, [job.id for job, _ in todo])
    # A shard with no more jobs than requests in flight at once is in its tail.
    tail = max((ep.concurrency or settings.concurrency for ep in endpoints.values()),
               default=settings.concurrency)
    stopping = False
    while pending or outstanding:
        if deadline is not None and time.monotonic() >= deadline and not stopping:
            run_actor.stop.remote(*outcome.stops.stop(
                StopReason.RUNTIME.value, f"--max-runtime of {config.max_runtime_s:g}s reached"))
        stopping = stopping or outcome.signal is not None or outcome.stats.stop is not \
            StopReason.NONE or (deadline is not None and time.monotonic() >= deadline)
        while pending and not stopping and \
                backlog.busy(outstanding.values(), tail) < max_shards:
            shard = pending.pop()
            items = tuple(todo[p] for p in shard.positions)
            spec = ShardSpec(
                run=run, shard=shard.id, output=where.url, s3_endpoint=where.s3_endpoint,
                todo=items,
                # A shard starts from these (and reads only its earlier attempts'
                # segments); --force compares with them.
                prior=tuple(store.states[job.id] for job, _ in items if job.id in store.states),
                endpoints=endpoints, settings=settings, config=config, verify=verify,
                deadline_unix=deadline_unix, exit_after=seam,
                s3_gen=getattr(store, "gen", None) if where.s3 else None, fence=fence,
            )
            outstanding[shard_task.remote(spec, run_actor)] = shard.id
        if stopping:
            pending.clear()
        ready, _ = ray.wait(list(outstanding), num_returns=len(outstanding), timeout=0)
        for ref in ready:
            shard_id = outstanding.pop(ref)
            _collect(ref, shard_id, outcome, run_actor)
        try:
            # Bounded: a run actor that restarts or hangs must not hold the driver, which
            # ends once every shard task has (they stop themselves without it).
            events, _spent, epoch = await asyncio.wait_for(run_actor.drain.remote(),
                                                           CALL_TIMEOUT_S)
        except Exception as exc:
            log.warning("the run's actor did not answer (%r); progress may lag", exc)
        else:
            if (again := outcome.stops.again(epoch)) is not None:
                log.warning("the run's actor restarted: sending the stop again")
                run_actor.stop.remote(*again)
            replay(events, by_id, observer)
            for kind, job_id, _number, _text in events:
                if kind in ("success", "failure"):
                    backlog.ended(job_id)
        if outstanding:
            await asyncio.sleep(0.2)


async def _fence_of(store: StateStore) -> Fence:
    """The token of the lock or lease the driver holds (:mod:`batch.runners.fence`)."""
    if isinstance(store, S3State):
        holder = await asyncio.to_thread(lease_holder, store)
        return Fence(holder or "")
    return Fence(folder_token(store.root))


def _nodes_with_cpus() -> int:
    """The default of shard tasks outstanding: one per node that runs tasks.

    One asyncio engine per node keeps hundreds of requests in flight (the limits are
    shared, not per task), and every task process more costs a Python start and imports
    on the node, which is most of what a cluster run adds to a single machine's.
    """
    alive = [node for node in ray.nodes()  # type: ignore[no-untyped-call]
             if node.get("Alive") and node.get("Resources", {}).get("CPU", 0) >= 1]
    return max(1, len(alive))


def _collect(ref: Any, shard_id: str, outcome: Outcome, run_actor: Any) -> None:
    stats = outcome.stats
    try:
        shard: RunStats = ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
        if isinstance(cause, UsageError):
            outcome.usage = outcome.usage or str(cause)
            stop, message = StopReason.FATAL, str(cause)
        elif isinstance(cause, StorageError | ImgbatchError):
            stop, message = StopReason.STORAGE, f"shard {shard_id}: {cause}"
        else:
            outcome.crashed = outcome.crashed or cause
            stop, message = StopReason.STORAGE, f"shard {shard_id}: internal error: {cause!r}"
        log.error("%s", message)
        stats.stop = stats.stop if stats.stop is not StopReason.NONE else stop
        stats.stop_message = stats.stop_message or message
        run_actor.stop.remote(*outcome.stops.stop(stop.value, message))
        return
    except ray.exceptions.RayError as exc:  # its retries used up (workers or nodes died)
        log.error("shard %s lost after %d retries: %s", shard_id, TASK_RETRIES, exc)
        return
    add(stats, shard)
    if shard.stop not in (StopReason.NONE, StopReason.SIGNAL) and stats.stop is StopReason.NONE:
        stats.stop, stats.stop_message = shard.stop, shard.stop_message
        run_actor.stop.remote(*outcome.stops.stop(shard.stop.value, shard.stop_message))
