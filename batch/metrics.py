"""Prometheus metrics of a run, in node_exporter's textfile format, for alerting from cron.

:class:`MetricsFile` is an :class:`~batch.progress.Observer` composed with the
console one: it counts what the engine reports and replaces the ``.prom`` file
atomically (a temporary file renamed over it, which the textfile collector
never reads half-written) when the run starts, every ``interval_s`` and at the
end. Counters count the current run (they restart with each run, which
Prometheus' ``rate`` and ``increase`` understand); the run's start and end
timestamps and exit code tell an alert whether the nightly run finished.
:func:`render` is pure: a :class:`Snapshot` in, the exposition text out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from batch.errors import JobError, RateLimited, StorageError
from batch.images import write_atomic
from batch.jobs import Job, Status
from batch.progress import Observer

if TYPE_CHECKING:
    from batch.checkpoint import JobState

log = logging.getLogger(__name__)

PREFIX = "imgbatch_"


@dataclass
class EndpointCounts:
    """What one endpoint did during the run."""

    requests: int = 0
    retries: Counter[str] = field(default_factory=Counter)  # by cause
    rate_limited: int = 0
    succeeded: int = 0
    failed: int = 0
    images: int = 0
    bytes: int = 0
    cost_usd: float = 0.0


@dataclass(frozen=True)
class Snapshot:
    """Everything one metrics file shows."""

    output: str  # the output folder's name: one series per folder on a host
    started_s: float
    jobs: Mapping[str, int]  # by status, over the whole manifest
    planned: int  # jobs this run set out to request
    endpoints: Mapping[str, EndpointCounts]
    last_success_s: float | None = None
    ended_s: float | None = None
    exit_code: int | None = None


def _labels(**labels: str) -> str:
    def quoted(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{quoted(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def render(snap: Snapshot) -> str:
    """The exposition text (format 0.0.4) of a snapshot."""
    out = snap.output
    families: list[tuple[str, str, str, list[tuple[str, float]]]] = []

    def family(name: str, kind: str, help_text: str,
               samples: Iterator[tuple[str, float]] | list[tuple[str, float]]) -> None:
        families.append((PREFIX + name, kind, help_text, list(samples)))

    running = snap.ended_s is None
    family("run_in_progress", "gauge", "1 while the run goes, 0 once it ended",
           [(_labels(output=out), 1 if running else 0)])
    family("run_start_timestamp_seconds", "gauge", "When the run started (Unix time)",
           [(_labels(output=out), snap.started_s)])
    if snap.ended_s is not None:
        family("run_end_timestamp_seconds", "gauge", "When the run ended (Unix time)",
               [(_labels(output=out), snap.ended_s)])
    if snap.exit_code is not None:
        family("run_exit_code", "gauge", "The run's exit code (0 all succeeded, 1 some "
               "failed or pending, 3 fatal API answer, 130/143 signal)",
               [(_labels(output=out), snap.exit_code)])
    if snap.last_success_s is not None:
        family("last_success_timestamp_seconds", "gauge",
               "When the run's last image was written (Unix time)",
               [(_labels(output=out), snap.last_success_s)])
    family("run_planned_jobs", "gauge", "Jobs this run had to request (not already done)",
           [(_labels(output=out), snap.planned)])
    family("jobs", "gauge", "Jobs of the manifest by status",
           [(_labels(output=out, status=s.value), snap.jobs.get(s.value, 0)) for s in Status])
    eps = sorted(snap.endpoints.items())

    def per_endpoint(name: str, help_text: str, value: Callable[[EndpointCounts], float]) -> None:
        family(name, "counter", help_text,
               [(_labels(output=out, endpoint=ep), value(c)) for ep, c in eps])

    per_endpoint("requests_total", "Requests sent in this run", lambda c: c.requests)
    family("retries_total", "counter", "Retries in this run by cause", [
        (_labels(output=out, endpoint=ep, cause=cause), n)
        for ep, c in eps for cause, n in sorted(c.retries.items())
    ])
    per_endpoint("rate_limited_total", "HTTP 429 answers in this run", lambda c: c.rate_limited)
    per_endpoint("jobs_succeeded_total", "Jobs that succeeded in this run", lambda c: c.succeeded)
    per_endpoint("jobs_failed_total", "Jobs that failed in this run", lambda c: c.failed)
    per_endpoint("images_written_total", "Images written in this run", lambda c: c.images)
    per_endpoint("written_bytes_total", "Bytes of images written in this run", lambda c: c.bytes)
    per_endpoint("estimated_cost_usd_total", "Estimated spend of this run in US dollars",
                 lambda c: round(c.cost_usd, 6))
    lines = []
    for name, kind, help_text, samples in families:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)
    return "\n".join(lines) + "\n"


class MetricsFile(Observer):
    """Counts a run's outcomes per endpoint and keeps ``path`` up to date."""

    def __init__(
        self,
        path: Path,
        *,
        output: str,
        endpoint_of: Callable[[Job], str],
        endpoints: Iterable[str] = (),
        interval_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._output = output
        self._endpoint_of = endpoint_of
        self._interval_s = interval_s
        self._clock = clock
        self._started_s = clock()
        self._planned = 0
        self._skipped = 0
        self._last_success_s: float | None = None
        # Known endpoints show zeros from the start: "nothing written" is a sample, not a gap.
        self.endpoints: dict[str, EndpointCounts] = {name: EndpointCounts() for name in endpoints}
        self._ticker: asyncio.Task[None] | None = None
        self._warned = False

    def _counts(self, job: Job) -> EndpointCounts:
        endpoint = self._endpoint_of(job)
        counts = self.endpoints.get(endpoint)
        if counts is None:
            counts = self.endpoints[endpoint] = EndpointCounts()
        return counts

    def snapshot(self, *, jobs: Mapping[str, int] | None = None, ended_s: float | None = None,
                 exit_code: int | None = None) -> Snapshot:
        if jobs is None:
            done = sum(c.succeeded for c in self.endpoints.values())
            failed = sum(c.failed for c in self.endpoints.values())
            jobs = {
                Status.SUCCEEDED.value: self._skipped + done,
                Status.FAILED.value: failed,
                Status.PENDING.value: self._planned - done - failed,
            }
        return Snapshot(self._output, self._started_s, dict(jobs), self._planned,
                        dict(self.endpoints), self._last_success_s, ended_s, exit_code)

    def write(self, snap: Snapshot | None = None) -> None:
        """Replace the file; a failure is logged once, never stops the run."""
        text = render(snap or self.snapshot())
        try:
            write_atomic(self.path, [text.encode()])
        except StorageError as exc:
            if not self._warned:
                log.error("metrics file not written: %s", exc)
                self._warned = True

    # -- the observer ----------------------------------------------------------

    def on_plan(self, todo: int, skipped: int) -> None:
        self._planned, self._skipped = todo, skipped
        self.write()
        if todo:
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            self.write()

    def on_attempt(self, job: Job) -> None:
        self._counts(job).requests += 1

    def on_retry(self, job: Job, error: JobError, wait_s: float) -> None:
        counts = self._counts(job)
        counts.retries[error.type] += 1

    def on_answer(self, job: Job, error: JobError | None = None) -> None:
        # Counted on the answer, not the retry: the last 429 before a stop is never retried.
        if isinstance(error, RateLimited):
            self._counts(job).rate_limited += 1

    def on_success(self, job: Job, state: JobState, cost_usd: float) -> None:
        counts = self._counts(job)
        counts.succeeded += 1
        counts.images += len(state.images)
        counts.bytes += sum(image.bytes for image in state.images)
        counts.cost_usd += cost_usd
        self._last_success_s = self._clock()

    def on_failure(self, job: Job, error: JobError) -> None:
        self._counts(job).failed += 1

    async def close(self, *, exit_code: int, jobs: Mapping[str, int]) -> None:
        """Stop the ticker and write the final figures: the run's end, exit code, job counts."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        self.write(self.snapshot(jobs=jobs, ended_s=self._clock(), exit_code=exit_code))
