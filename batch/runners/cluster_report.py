"""The end of a cluster run on the driver: one progress line, one results.jsonl, one summary.

Apart from :mod:`batch.runners.ray` (which imports Ray): the shards' progress
events replayed on the driver's console, their stats added up, the journal
segments folded (a folder) or the state re-opened (s3://) once every shard
has ended, then results.jsonl, summary.json and the exit code, the same as
on one machine.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from batch import report
from batch.checkpoint import JobState
from batch.engine import EngineConfig, RunStats, StopReason
from batch.errors import JobError, OutputError, RateLimited, StorageError
from batch.jobs import ImageRecord, Job, Status
from batch.manifest import Manifest
from batch.metrics import MetricsFile
from batch.progress import Observer
from batch.results import RESULTS, write_results
from batch.runners.coordinator import StopRelay
from batch.runners.segments import DriverCheckpoint
from batch.storage import outputs
from batch.storage.base import StateStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Output:
    """Where the run writes: a folder every node mounts at the same path, or s3://."""

    url: str
    s3_endpoint: str | None

    @property
    def s3(self) -> bool:
        return outputs.is_s3_url(self.url)


@dataclass
class Outcome:
    """What the cluster did, for the exit code."""

    stats: RunStats
    signal: signal.Signals | None = None
    crashed: BaseException | None = None
    usage: str | None = None
    stops: StopRelay = field(default_factory=StopRelay)  # sent again to a restarted coordinator


def add(total: RunStats, shard: RunStats) -> None:
    for name in ("requests", "succeeded", "failed", "rate_limited", "bytes_written",
                 "images_written", "unpriced_images"):
        setattr(total, name, getattr(total, name) + getattr(shard, name))
    total.cost_usd = round(total.cost_usd + shard.cost_usd, 6)
    total.retries.update(shard.retries)
    total.tokens.update(shard.tokens)


class _Reported(JobError):
    """A shard's error, as its type and message, replayed on the driver's observers."""

    def __init__(self, text: str) -> None:
        kind, _, message = text.partition(":")
        super().__init__(message)
        self.type = kind or JobError.type

    def __str__(self) -> str:
        return self.message


class _ReportedRateLimit(_Reported, RateLimited):
    """A shard's 429 (the metrics count answers that are RateLimited)."""


def _reported(text: str) -> _Reported:
    return _ReportedRateLimit(text) if text.startswith(f"{RateLimited.type}:") \
        else _Reported(text)


def _sized(sizes: str) -> tuple[ImageRecord, ...]:
    """Stand-ins for a shard's images: their sizes are all the driver's observers read."""
    return tuple(ImageRecord("", "", int(size), "", 0, 0) for size in sizes.split(",") if size)


def replay(events: list[Any], by_id: Mapping[str, Job], observer: Observer) -> None:
    """The shards' events (:data:`~batch.runners.coordinator.Event`) on the driver's
    observer: the progress line, and the metrics file if there is one."""
    for kind, job_id, number, text in events:
        job = by_id.get(job_id)
        if job is None:
            continue
        if kind == "attempt":
            observer.on_attempt(job)
        elif kind == "answer":
            observer.on_answer(job, _reported(f"{text}:") if text else None)
        elif kind == "retry":
            observer.on_retry(job, _reported(text), number)
        elif kind == "success":
            state = JobState(job.id, "", Status.SUCCEEDED, 0, images=_sized(text))
            observer.on_success(job, state, number)
        elif kind == "failure":
            observer.on_failure(job, _reported(text))


async def finish(
    manifest: Manifest, store: StateStore, where: Output, outcome: Outcome,
    started_at: float, deadline: float | None, config: EngineConfig, signalled: asyncio.Event,
    gallery: Callable[[asyncio.Event, float | None], Awaitable[bool]] | None,
    metrics: MetricsFile | None = None,
) -> tuple[int, str]:
    failures: list[str] = []
    counts: Counter[str] = Counter()
    final = store
    try:
        if isinstance(store, DriverCheckpoint):
            store.fold_segments()
            if outcome.crashed is None:
                # Every shard task has ended: finish renames a dead worker cut short and
                # drop the temporaries it left (what one machine does at its next open).
                store.recover()
        elif outcome.crashed is None:
            from batch.runners.s3segments import refresh

            # The shards' segments, recovered (in a thread: it runs its own event loop).
            await asyncio.to_thread(refresh, store)
        counts = write_results(manifest.jobs, final)
    except (StorageError, OutputError) as exc:
        failures.append(str(exc))
    try:
        return await _report(manifest, final, where, outcome, counts, failures, started_at,
                             deadline, config, signalled, gallery, metrics)
    finally:
        if final is not store:
            final.close()


async def _report(
    manifest: Manifest, store: StateStore, where: Output, outcome: Outcome,
    counts: Counter[str], failures: list[str], started_at: float, deadline: float | None,
    config: EngineConfig, signalled: asyncio.Event,
    gallery: Callable[[asyncio.Event, float | None], Awaitable[bool]] | None,
    metrics: MetricsFile | None,
) -> tuple[int, str]:
    code = 1
    if outcome.crashed is not None:
        code = 70
    elif outcome.usage is not None:
        code = 2
    elif outcome.signal is not None:
        code = {signal.SIGINT: 130, signal.SIGTERM: 143}[outcome.signal]
    elif outcome.stats.stop is StopReason.FATAL:
        code = 3
    elif counts.get(Status.SUCCEEDED.value, 0) == len(manifest.jobs) and not failures:
        code = 0
    record = report.run_record(started_at=started_at, ended_at=time.time(), counts=counts,
                               stats=outcome.stats, exit_code=code,
                               manifest=str(manifest.path))
    try:
        report.append_run(store.root, record)
        store.sync_out([RESULTS, report.SUMMARY])  # to the bucket; nothing for a folder
    except StorageError as exc:
        failures.append(str(exc))
    if metrics is not None:
        await metrics.close(exit_code=code, jobs=counts)
    line = report.one_line(record, f"{where.url.rstrip('/')}/{RESULTS}")
    try:
        store.record_run("end", summary=line, exit_code=code)
    except StorageError as exc:
        failures.append(str(exc))
    limit = None if deadline is None else deadline + config.grace_s - time.monotonic()
    if gallery is not None and not await gallery(signalled, limit):
        failures.append(f"the gallery was not rebuilt; try: imgbatch report {where.url}")
    for extra in report.details(record):
        log.info("%s", extra)
    for failure in failures:
        log.error("%s; the checkpoint holds every finished job, re-run to resume", failure)
    if outcome.usage is not None:
        log.error("%s", outcome.usage)
    if outcome.crashed is not None:
        log.error("internal error (a bug): %r", outcome.crashed)
    return code, line

