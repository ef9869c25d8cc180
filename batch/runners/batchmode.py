"""Batch mode: jobs of ``mode: batch`` endpoints go as provider batches, collected later.
Each pass (one per run; repeated with ``--wait``):

1. *settle* every open batch of the folder's ledger: an intent without an id is
   looked up by its tag (``find``) and adopted, or, if the provider has none,
   created from the same request file; a batch with an id is polled and, once
   finished, its results are streamed and committed line by line through the
   same group commit as sync mode, then the batch is closed;
2. *submit* the jobs that are not done, not in an open batch and not refused
   by a batch before: request lines written once to a spool file, split by
   the provider's limits, each batch's file recorded (intent, fsynced) before
   its create call and its id right after.

So a job is in at most one live batch, a job a sync run finished is never
submitted, and a batch whose create may have happened is never created again
without asking the provider first (what outcomes mean: :mod:`.batchplan`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from batch.checkpoint import STATE_DIR, FileMeta, JobState, fingerprint
from batch.commit import GroupCommitter
from batch.cost import PriceTable
from batch.errors import FatalApiError, JobError, NotRecorded, RejectedError, StorageError
from batch.imagecheck import DecodeChildren
from batch.imageinfo import DEFAULT_MAX_PIXELS
from batch.images import StagedImage, StreamTransform
from batch.jobs import ImageRecord, Job, Status
from batch.providers.batchapi import (
    BatchApi,
    BatchInfo,
    BatchLimits,
    BatchSpec,
    BatchSubmitUnknown,
    LineError,
    LineErrorKind,
    ResultLine,
)
from batch.runners import batchplan as plan
from batch.runners.batchfiles import SinkStage, copy_range, drain, write_spool
from batch.runners.batchledger import REQUESTS_DIR, BatchRecord, Ledger, run_id
from batch.runners.batchplan import BatchStats
from batch.storage.base import ImageSink, StateStore

log = logging.getLogger(__name__)

MAX_SUBMITS_PER_RUN = 3
MAX_UNCOMMITTED = 32  # result lines whose commit is queued (each holds an open image file)


@dataclass(frozen=True)
class BatchEndpoint:
    """A ``mode: batch`` endpoint: its batch API and what the ledger records of it."""

    name: str
    provider: str
    base_url: str
    api_key_env: str
    api: BatchApi
    stamp: Callable[[Job], StreamTransform] | None = None  # provenance, as in sync mode


@dataclass(frozen=True)
class BatchConfig:
    wait: bool = False
    poll_interval_s: float = 60.0
    max_poll_interval_s: float = 900.0
    batch_size: int | None = None  # at most this many requests per batch
    force: bool = False
    max_cost_usd: float | None = None
    prices: PriceTable = field(default_factory=lambda: PriceTable.with_overrides({}))
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_check: bool = True  # --verify decode: each image decoded in a child first
    # --batch-fallback sync: a job first submitted over deadline_s ago and still not done
    # is run synchronously once no live batch holds it (an overdue batch is cancelled).
    fallback_sync: bool = False
    deadline_s: float = 86400.0


class BatchRunner:
    """Settles and submits the batches of one output folder; see the module docstring."""

    def __init__(self, endpoints: Mapping[str, BatchEndpoint], store: StateStore,
                 ledger: Ledger, config: BatchConfig) -> None:
        self.endpoints = dict(endpoints)
        self.store = store
        self.ledger = ledger
        self.config = config
        self.stats = BatchStats()
        self._stop = asyncio.Event()
        self._tags = ledger.new_tag(run_id())
        self._committer = GroupCommitter(store)
        self._decoder = DecodeChildren()
        self.fallback: list[Job] = []  # for the sync engine (--batch-fallback sync)
        # Submissions per job in this run: --wait gives up on a job whose line keeps failing.
        self._sent: Counter[str] = Counter()

    def stop(self) -> None:
        self._stop.set()

    async def run(self, jobs: Sequence[Job], *, submit: bool = True) -> BatchStats:
        """Settle the open batches, submit what is left (``--wait``: until all finished)."""
        by_id = {job.id: job for job in jobs}
        interval = self.config.poll_interval_s
        try:
            while True:
                await self._settle(by_id)
                if self.config.fallback_sync:
                    late = plan.overdue(self.ledger.records.values(), self.ledger.live_keys(),
                                        time.time() - self.config.deadline_s)
                    self.fallback = [job for job in jobs if job.id in late
                                     and not self.store.is_done(job, fingerprint(job))]
                if submit and not self._stop.is_set():
                    late_ids = {job.id for job in self.fallback}
                    await self._submit([job for job in jobs if job.id not in late_ids])
                if self.fallback:
                    break  # the sync engine takes them now
                if not (self.config.wait and self.ledger.open_batches()) or self._stop.is_set():
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), interval)
                interval = min(interval * 1.5, self.config.max_poll_interval_s)
        except FatalApiError as exc:
            self.stats.fatal, self.stats.stop_message = True, str(exc)
        except StorageError as exc:
            self.stats.stop_message = f"{exc}; re-run to collect again"
        finally:
            self._decoder.close()
            await self._committer.close()
            opened = self.ledger.open_batches()
            self.stats.open_batches = len(opened)
            self.stats.open_jobs = sum(len(r.keys) for r in opened)
            self.stats.open_micros = sum(r.price_micros for r in opened)
        return self.stats

    # -- settle ------------------------------------------------------------------------

    async def _settle(self, by_id: Mapping[str, Job]) -> None:
        for record in self.ledger.open_batches():
            if self._stop.is_set():
                return
            endpoint = self.endpoints.get(record.endpoint)
            if endpoint is None:
                log.warning("batch %s: endpoint %r is not in this run; left open",
                            record.tag, record.endpoint)
                continue
            try:
                await self._settle_one(endpoint, record, by_id)
            except FatalApiError:
                raise
            except JobError as exc:  # this batch only: the others still get their turn
                log.error("batch %s %s: %s; left open, the next run tries again",
                          record.tag, record.batch_id, exc)

    async def _settle_one(self, endpoint: BatchEndpoint, record: BatchRecord,
                          by_id: Mapping[str, Job]) -> None:
        if not record.batch_id:
            found = await endpoint.api.find(record.tag)
            if found is None:
                log.info("batch %s: never created; creating it now", record.tag)
                await self._create(endpoint, record)
                return
            log.info("batch %s: adopted %s (created by a run that stopped before "
                     "recording it)", record.tag, found.batch_id)
            record = self.ledger.submitted(record.tag, found.batch_id)
            self.stats.adopted_batches += 1
        info = await endpoint.api.poll(record.batch_id)
        if (self.config.fallback_sync and not info.state.finished
                and record.created_s < time.time() - self.config.deadline_s):
            log.warning("batch %s: past --batch-deadline; cancelled, its unfinished jobs "
                        "go synchronous", record.tag)
            await endpoint.api.cancel(record.batch_id)
            info = await endpoint.api.poll(record.batch_id)
        record = self.ledger.update(record.tag, state=info.state.value, total=info.total,
                                    succeeded=info.succeeded, failed=info.failed)
        if plan.batch_end(info.state) is None:
            return
        await self._collect(endpoint, record, info, by_id)
        self.ledger.close_batch(record.tag, info.state.value, info.message)
        self.stats.collected_batches += 1

    async def _collect(self, endpoint: BatchEndpoint, record: BatchRecord, info: BatchInfo,
                       by_id: Mapping[str, Job]) -> None:
        prints = dict(zip(record.keys, record.fingerprints, strict=True))
        answered: set[str] = set()
        queued: list[asyncio.Future[None]] = []
        stage = SinkStage(self.store.sink, record.tag, self.config.max_pixels, endpoint.stamp)
        async for line in endpoint.api.results(info, stage):
            job = by_id.get(line.key)
            fp = prints.get(line.key)
            if job is None or fp is None or fingerprint(job) != fp or line.key in answered:
                log.warning("batch %s: a result for %r that this manifest no longer asks "
                            "for; dropped", record.tag, line.key)
                for image in line.images:
                    stage.discard(image)
                continue
            answered.add(line.key)
            line = await self._decoded(line, stage)
            future = await self._commit_line(job, fp, line, stage)
            if future is not None:
                queued.append(future)
            if len(queued) >= MAX_UNCOMMITTED:
                await drain(queued)
        await drain(queued)
        missing = len(set(record.keys) - answered)
        self.stats.back_to_pending += missing
        if missing:
            log.info("batch %s (%s): %d job(s) without a result line, back to pending",
                     record.tag, info.state.value, missing)

    async def _commit_images(self, state: JobState, images: tuple[StagedImage, ...],
                             sink: ImageSink) -> None:
        try:
            await self._committer.commit(state, images)
        except StorageError as exc:
            for image in images:
                if isinstance(exc, NotRecorded):
                    sink.discard(image)
                else:  # (maybe) recorded: the next open publishes it; deleting loses it
                    sink.release(image)
            raise

    async def _decoded(self, line: ResultLine, stage: SinkStage) -> ResultLine:
        """``line``, or a retryable error if one of its images does not decode."""
        if not self.config.decode_check or not line.images:
            return line
        for image in line.images:
            problem = await self._decoder.check(stage.sink.local_path(image), image.info,
                                                image.bytes)
            if problem is not None:
                for staged in line.images:
                    stage.discard(staged)
                return ResultLine(line.key, error=LineError(
                    LineErrorKind.RETRYABLE, "image_format", problem))
        return line

    async def _commit_line(self, job: Job, fp: str, line: ResultLine,
                           stage: SinkStage) -> asyncio.Future[None] | None:
        fate = plan.line_outcome(bool(line.images), line.error)
        if self.store.is_done(job, fp):
            for image in line.images:
                stage.discard(image)  # collected before a crash, or finished by a sync run
            return None
        attempts = self.store.attempts(job.id)
        if fate is plan.JobFate.SUCCEEDED:
            named: list[StagedImage] = []
            try:
                for n, image in enumerate(line.images):
                    named.append(await stage.owned(image, job, n))  # ``image`` is gone then
                # Where any later open finds them (an object store uploads them here).
                images = await stage.sink.prepare(named)
            except (StorageError, JobError):
                for image in [*named, *line.images[len(named) + 1:]]:
                    stage.discard(image)
                raise
            state = JobState(
                id=job.id, fingerprint=fp, status=Status.SUCCEEDED, attempts=attempts,
                images=tuple(ImageRecord(s.final_rel, s.sha256, s.bytes, s.info.mime,
                                         s.info.width, s.info.height) for s in images),
                image_meta=tuple(FileMeta(s.tmp_rel, s.mtime_ns) for s in images),
                usage_json=json.dumps(dict(line.usage)) if line.usage else None,
                text=line.text or None,
            )
            self.stats.succeeded += 1
            self.stats.images_written += len(images)
            self.stats.bytes_written += sum(s.bytes for s in images)
            price = plan.batch_micros(self.config.prices, job)
            self.stats.cost_micros += (price or 0) * len(images)
            self.stats.sync_micros += (self.config.prices.job_micros(job) or 0) * len(images)
            return asyncio.ensure_future(self._commit_images(state, images, stage.sink))
        for image in line.images:
            stage.discard(image)
        error = line.error
        record = {"type": "batch_refused" if fate is plan.JobFate.FAILED else "batch_retryable",
                  "message": error.message if error else "no image in the result line",
                  "code": error.code if error else None, "http_status": None}
        if fate is plan.JobFate.FAILED:
            self.stats.failed += 1
            status = Status.FAILED
        else:
            self.stats.back_to_pending += 1
            status = Status.PENDING
        return self._committer.submit(JobState(
            id=job.id, fingerprint=fp, status=status, attempts=attempts, error=record))

    # -- submit ------------------------------------------------------------------------

    async def _submit(self, jobs: Sequence[Job]) -> None:
        live = self.ledger.live_keys()
        budget = None
        if self.config.max_cost_usd is not None:
            spent = sum(r.price_micros for r in self.ledger.open_batches())
            budget = int(self.config.max_cost_usd * 1_000_000) - spent - self.stats.cost_micros
        todo: dict[str, list[tuple[Job, str]]] = {}
        for job in jobs:
            if (job.endpoint not in self.endpoints or job.id in live
                    or self._sent[job.id] >= MAX_SUBMITS_PER_RUN):
                continue
            fp = fingerprint(job)
            if not self.config.force and self.store.is_done(job, fp):
                continue
            state = self.store.states.get(job.id)
            if (state is not None and state.status is Status.FAILED and state.fingerprint == fp
                    and (state.error or {}).get("type") == "batch_refused"
                    and not self.config.force):
                continue  # the provider refused it in a batch: sending it again is no use
            if budget is not None:
                price = plan.batch_micros(self.config.prices, job) or 0
                if price > budget:
                    continue
                budget -= price
            todo.setdefault(job.endpoint, []).append((job, fp))
        for name, items in todo.items():
            if self._stop.is_set():
                return
            await self._submit_endpoint(self.endpoints[name], items)

    async def _submit_endpoint(self, endpoint: BatchEndpoint,
                               items: list[tuple[Job, str]]) -> None:
        api = endpoint.api
        fps = dict((job.id, fp) for job, fp in items)
        jobs = {job.id: job for job, _ in items}
        limits = api.limits
        if self.config.batch_size:
            limits = BatchLimits(min(limits.max_requests, self.config.batch_size),
                                 limits.max_file_bytes)
        spool_path = self.store.root / STATE_DIR / REQUESTS_DIR / f"spool-{os.getpid()}.tmp"
        spool = await write_spool(api, [job for job, _ in items], spool_path,
                                  limits.max_file_bytes)
        lines, offsets = spool.lines, spool.offsets
        for job, error in spool.refused:
            await self._committer.commit(JobState(
                id=job.id, fingerprint=fps[job.id], status=Status.FAILED,
                attempts=self.store.attempts(job.id),
                error={**error.as_record(), "type": "batch_refused"}))
            self.stats.failed += 1
        try:
            for cut in plan.split(lines, limits):
                if self._stop.is_set():
                    return
                tag = next(self._tags)
                keys = tuple(line.key for line in lines[cut.start:cut.stop])
                rel = f"{STATE_DIR}/{REQUESTS_DIR}/{tag}.jsonl"
                sha = copy_range(spool_path, offsets[cut.start], offsets[cut.stop],
                                  self.store.root / rel)
                price = sum(plan.batch_micros(self.config.prices, jobs[k]) or 0 for k in keys)
                record = self.ledger.intend(BatchRecord(
                    tag=tag, endpoint=endpoint.name, provider=endpoint.provider,
                    base_url=endpoint.base_url, api_key_env=endpoint.api_key_env,
                    model=cut.group[0], route=cut.group[1], keys=keys,
                    fingerprints=tuple(fps[k] for k in keys), file_sha256=sha,
                    request_file=rel, created_s=time.time(), price_micros=price))
                for key in keys:
                    self.store.mark_attempt(jobs[key], fps[key])
                    self._sent[key] += 1
                self.stats.submitted_jobs += len(keys)
                await self._create(endpoint, record)
        finally:
            spool_path.unlink(missing_ok=True)

    async def _create(self, endpoint: BatchEndpoint, record: BatchRecord) -> None:
        path = self.store.root / record.request_file
        if not path.is_file():
            log.error("batch %s: its request file %s is gone; its jobs go back to pending",
                      record.tag, record.request_file)
            self.ledger.close_batch(record.tag, "lost", "request file missing")
            return
        spec = BatchSpec(record.tag, record.model, record.route, len(record.keys),
                         record.file_sha256)
        try:
            batch_id = await endpoint.api.submit(spec, path)
        except BatchSubmitUnknown as exc:
            log.warning("batch %s: %s; the next run asks the provider before "
                        "submitting it again", record.tag, exc)
            return
        except FatalApiError:
            raise
        except JobError as exc:
            if not isinstance(exc, RejectedError):
                log.warning("batch %s: not submitted (%s); the next run asks the provider, "
                            "then submits it", record.tag, exc)
                return
            log.error("batch %s refused by the provider: %s; its jobs stay pending",
                      record.tag, exc)
            self.ledger.close_batch(record.tag, "refused", exc.message)
            return
        self.ledger.submitted(record.tag, batch_id)
        self.stats.submitted_batches += 1
        log.info("batch %s: %d job(s) submitted as %s", record.tag, len(record.keys), batch_id)
