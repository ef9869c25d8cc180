"""Where a job's end goes: the images of a paid answer made durable, recorded, then
published; a failed or unfinished job recorded with its last error.

Split from :mod:`batch.engine`, which decides when jobs run; this decides what their ends
leave behind. A storage failure calls the engine's ``stop`` (the run ends, jobs stay
pending) and never discards an image that may be recorded: the next open publishes it.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from batch.checkpoint import FileMeta, JobState
from batch.commit import GroupCommitter
from batch.cost import PriceTable, to_usd
from batch.errors import JobError, NotRecorded, StorageError
from batch.jobs import ImageRecord, Job, Status
from batch.progress import Observer
from batch.providers.base import Generation
from batch.runtypes import RunStats
from batch.storage.base import ImageSink, StateStore


class Recorder:
    """Commits job ends for one run; adds what they produced to ``stats``."""

    def __init__(
        self,
        store: StateStore,
        sink: ImageSink,
        committer: GroupCommitter,
        prices: PriceTable,
        stats: RunStats,
        observer: Observer,
        stop: Callable[[str], None],
    ) -> None:
        self.store = store
        self.sink = sink
        self.committer = committer
        self.stats = stats
        self._prices = prices
        self._observer = observer
        self._stop = stop
        self._cost = 0  # micro-dollars of committed images

    async def commit_answer(
        self, job: Job, fp: str, generation: Generation, old_paths: set[str]
    ) -> None:
        try:
            # Where any later open finds them (an object store uploads them here).
            images = await self.sink.prepare(generation.images)
        except StorageError as exc:
            # Paid images: prepare kept what it could not make durable (never discard them).
            for staged in generation.images:
                self.sink.release(staged)
            self._stop(f"{exc}; jobs left pending, re-run to resume")
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
            self._stop(f"{exc}; jobs left pending, re-run to resume")
            return
        for path in old_paths - {image.path for image in state.images}:
            self.sink.remove(path)
        self.stats.succeeded += 1
        self.stats.images_written += len(images)
        self.stats.bytes_written += sum(s.bytes for s in images)
        price = self._prices.job_micros(job)
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
        self._observer.on_success(job, state, to_usd(cost))

    def end_state(self, job: Job, fp: str, status: Status, error: JobError) -> JobState:
        return JobState(
            id=job.id,
            fingerprint=fp,
            status=status,
            attempts=self.store.attempts(job.id),
            error=error.as_record(),
        )

    def submit_end(self, job: Job, fp: str, status: Status, error: JobError) -> None:
        """Queue a job's end without waiting (its worker is being cancelled)."""
        self.committer.submit(self.end_state(job, fp, status, error))

    async def record_end(self, job: Job, fp: str, status: Status, error: JobError) -> None:
        try:
            await self.committer.commit(self.end_state(job, fp, status, error))
        except StorageError as exc:
            self._stop(str(exc))
