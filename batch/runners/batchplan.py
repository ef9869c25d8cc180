"""Batch mode's pure decisions: what to submit, how to split it, what each outcome means.

No I/O: the run mode (:mod:`batch.runners.batchmode`) feeds these plain values
and acts on the answers, and the tests drive them with tables.

- :func:`split` cuts an ordered run of request lines into batches within a
  provider's limits (request count, file bytes), one (model, route) group each.
- :func:`line_outcome` says what a result line means for its job; :func:`batch_end`
  what a finished batch means for the jobs it did not answer.
- :func:`batch_micros` prices an image at the batch rate: the manifest's row for
  ``"<model>@batch"`` when it has one, else half the sync price.
- :class:`BatchStats` counts what a run's batch passes did; its summary line.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from batch.cost import PriceTable, to_micros, to_usd
from batch.jobs import Job
from batch.pricing import price_key
from batch.providers.batchapi import BatchLimits, BatchState, LineError, LineErrorKind

BATCH_DISCOUNT = 0.5  # both providers list their batch APIs at half the sync price
BATCH_PRICE_SUFFIX = "@batch"


class JobFate(enum.StrEnum):
    SUCCEEDED = "succeeded"  # its image is committed
    FAILED = "failed"  # refused: recorded with the provider's reason, not resubmitted
    PENDING = "pending"  # back in the queue: the next submit includes it


@dataclass(frozen=True)
class Line:
    """One request line waiting for a batch: its key (job id), group and size."""

    key: str
    group: tuple[str, str]  # (model, route): one per batch
    size_bytes: int


@dataclass(frozen=True)
class Cut:
    """One batch to create: its group and the positions of its lines (contiguous)."""

    group: tuple[str, str]
    start: int
    stop: int


class LineTooBig(ValueError):
    """One request line exceeds the provider's file limit on its own."""


def split(lines: Sequence[Line], limits: BatchLimits) -> list[Cut]:
    """Cut ``lines`` (grouped beforehand: equal groups adjacent) into batches.

    A batch holds lines of one group, at most ``limits.max_requests`` of them
    and at most ``limits.max_file_bytes`` in all. A line over the byte limit on
    its own raises :class:`LineTooBig` naming it.
    """
    cuts: list[Cut] = []
    start, size = 0, 0
    for n, line in enumerate(lines):
        if line.size_bytes > limits.max_file_bytes:
            raise LineTooBig(f"job {line.key}: its request line is {line.size_bytes} bytes, "
                             f"over the batch file limit of {limits.max_file_bytes}")
        full = (n - start >= limits.max_requests
                or size + line.size_bytes > limits.max_file_bytes
                or line.group != lines[start].group)
        if n > start and full:
            cuts.append(Cut(lines[start].group, start, n))
            start, size = n, 0
        size += line.size_bytes
    if start < len(lines):
        cuts.append(Cut(lines[start].group, start, len(lines)))
    return cuts


def grouped(items: Iterable[tuple[Job, str]]) -> list[tuple[Job, str]]:
    """``(job, route)`` pairs ordered so equal (model, route) groups are adjacent,
    manifest order kept inside each group (a stable sort)."""
    order: dict[tuple[str, str], int] = {}
    pairs = list(items)
    for job, route in pairs:
        order.setdefault((job.model, route), len(order))
    return sorted(pairs, key=lambda pair: order[(pair[0].model, pair[1])])


def line_outcome(has_images: bool, error: LineError | None) -> JobFate:
    """What one result line means for its job."""
    if has_images and error is None:
        return JobFate.SUCCEEDED
    if error is not None and error.kind is LineErrorKind.REFUSED:
        return JobFate.FAILED
    return JobFate.PENDING  # a retryable error, or a line with neither image nor error


def batch_end(state: BatchState) -> JobFate | None:
    """The fate of jobs a finished batch did not answer (None while it runs).

    Whatever the reason (expired, failed, cancelled, or a key missing from a
    succeeded batch), they go back to pending and are resubmitted; nothing
    they were not answered for is ever charged.
    """
    return JobFate.PENDING if state.finished else None


def overdue(records: Iterable[Any], live: set[str], before_s: float) -> set[str]:
    """Job ids first put in a batch before ``before_s`` (unix seconds) and in no live
    batch now: what ``--batch-fallback sync`` runs synchronously."""
    first: dict[str, float] = {}
    for record in records:
        for key in record.keys:
            first[key] = min(first.get(key, record.created_s), record.created_s)
    return {key for key, at in first.items() if at < before_s and key not in live}


def batch_micros(table: PriceTable, job: Job) -> int | None:
    """One image of ``job`` at the batch rate, in micro-dollars (None: unknown)."""
    own = table.price(job.model + BATCH_PRICE_SUFFIX, price_key(job))
    if own is not None:
        return to_micros(own)
    sync = table.job_price(job)
    return None if sync is None else to_micros(sync * BATCH_DISCOUNT)


def estimate_batch(jobs: Iterable[Job], table: PriceTable) -> tuple[float, int]:
    """Cost of one image per job at the batch rate, and how many have no price."""
    total, unknown = 0, 0
    for job in jobs:
        micros = batch_micros(table, job)
        if micros is None:
            unknown += 1
        else:
            total += micros
    return total / 1_000_000, unknown


def describe_age(age_s: float) -> str:
    """A batch's age as an operator reads it: 45s, 12m, 3h05m, 2d04h."""
    s = max(0, int(age_s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


@dataclass
class BatchStats:
    submitted_jobs: int = 0
    submitted_batches: int = 0
    adopted_batches: int = 0
    collected_batches: int = 0
    succeeded: int = 0
    failed: int = 0
    back_to_pending: int = 0
    images_written: int = 0
    bytes_written: int = 0
    cost_micros: int = 0  # collected images at the batch rate
    sync_micros: int = 0  # what they would have cost in sync mode
    open_batches: int = 0
    open_jobs: int = 0
    open_micros: int = 0  # submitted, unfinished: counted as spent by --max-cost
    fatal: bool = False  # a 401/403 or a used-up quota ended it (exit 3)
    stop_message: str = ""

    def as_record(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        for name in ("cost_micros", "sync_micros", "open_micros"):
            record[name.replace("micros", "usd")] = round(to_usd(record.pop(name)), 4)
        return record

    def line(self) -> str:
        text = (f"batch: {self.open_jobs} jobs in {self.open_batches} batches submitted"
                f" ({self.submitted_jobs} this run, ~${to_usd(self.open_micros):.2f} at the "
                f"batch rate)") if self.open_batches else "batch: no batch open"
        if self.collected_batches:
            text += (f"; {self.collected_batches} batch(es) collected: {self.succeeded} "
                     f"succeeded, {self.failed} failed, {self.back_to_pending} back to pending,"
                     f" ~${to_usd(self.cost_micros):.2f} at the batch price "
                     f"(sync ~${to_usd(self.sync_micros):.2f})")
        return text
