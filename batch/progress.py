"""What the operator sees while a run goes: a bar on a terminal, a log line every 30 s elsewhere.

The engine reports to an :class:`Observer`; :class:`ConsoleProgress` is the
one the CLI uses. On a terminal it draws a tqdm bar on stderr; when stderr
is not a terminal (cron), it logs one plain line every ``interval_s`` and one
at the end, with the same figures: succeeded, failed, retrying, in flight,
images per minute, spend so far and ETA.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from typing import IO, TYPE_CHECKING, Any

from batch.errors import JobError
from batch.jobs import Job

if TYPE_CHECKING:
    from tqdm import tqdm

    from batch.checkpoint import JobState

log = logging.getLogger("batch")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "t": round(record.created, 3),
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": record.getMessage(),
            },
            ensure_ascii=False,
        )


class _BarAwareHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes through tqdm, so log lines land above a progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        bars = sys.modules.get("tqdm")
        if bars is None:  # tqdm is imported only to draw a bar: there is none to write around
            super().emit(record)
            return
        try:
            bars.tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def setup_logging(quiet: bool, fmt: str) -> None:
    """Log to stderr: text or one JSON object per line; errors only when quiet."""
    handler = _BarAwareHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("imgbatch: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.ERROR if quiet else logging.INFO)
    logging.getLogger("aiohttp").setLevel(logging.WARNING)


class Observer:
    """Hooks the engine calls; the default does nothing."""

    def on_plan(self, todo: int, skipped: int) -> None: ...

    def on_attempt(self, job: Job) -> None: ...

    def on_answer(self, job: Job, error: JobError | None = None) -> None:
        """The request of ``on_attempt`` ended: answered, failed with ``error``, or abandoned."""

    def on_retry(self, job: Job, error: JobError, wait_s: float) -> None: ...

    def on_success(self, job: Job, state: JobState, cost_usd: float) -> None: ...

    def on_failure(self, job: Job, error: JobError) -> None: ...

    def on_stop(self, message: str) -> None: ...


class Observers(Observer):
    """Several observers as one: each hook goes to each, in order."""

    def __init__(self, *observers: Observer) -> None:
        self.observers = observers

    def on_plan(self, todo: int, skipped: int) -> None:
        for o in self.observers:
            o.on_plan(todo, skipped)

    def on_attempt(self, job: Job) -> None:
        for o in self.observers:
            o.on_attempt(job)

    def on_answer(self, job: Job, error: JobError | None = None) -> None:
        for o in self.observers:
            o.on_answer(job, error)

    def on_retry(self, job: Job, error: JobError, wait_s: float) -> None:
        for o in self.observers:
            o.on_retry(job, error, wait_s)

    def on_success(self, job: Job, state: JobState, cost_usd: float) -> None:
        for o in self.observers:
            o.on_success(job, state, cost_usd)

    def on_failure(self, job: Job, error: JobError) -> None:
        for o in self.observers:
            o.on_failure(job, error)

    def on_stop(self, message: str) -> None:
        for o in self.observers:
            o.on_stop(message)


class ConsoleProgress(Observer):
    """Counts outcomes and shows them: a bar on a terminal, periodic lines otherwise."""

    def __init__(self, stream: IO[str], *, bar: bool, interval_s: float = 30.0) -> None:
        self._stream = stream
        self._use_bar = bar
        self._interval_s = interval_s
        self._bar: tqdm[Any] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._started = time.monotonic()
        self.total = 0
        self.succeeded = 0
        self.failed = 0
        self.spent_usd = 0.0
        self.retrying: set[str] = set()
        self.in_flight = 0

    def on_plan(self, todo: int, skipped: int) -> None:
        self.total = todo
        self._started = time.monotonic()
        log.info("%d job(s) to run, %d already done", todo, skipped)
        if self._use_bar and todo:
            from tqdm import tqdm  # ~10 ms of start-up, paid only on a terminal

            self._bar = tqdm(total=todo, file=self._stream, unit="img", dynamic_ncols=True)
        if todo:
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s if self._bar is None else 1.0)
            if self._bar is not None:
                self._bar.refresh()
            else:
                log.info("progress: %s", self.figures())

    def on_attempt(self, job: Job) -> None:
        self.in_flight += 1
        self.retrying.discard(job.id)
        self._show()

    def on_answer(self, job: Job, error: JobError | None = None) -> None:
        # A job waiting for its commit is no longer in flight: its request is over.
        self.in_flight = max(0, self.in_flight - 1)

    def on_retry(self, job: Job, error: JobError, wait_s: float) -> None:
        self.retrying.add(job.id)
        log.info("retrying %s in %.1fs: %s", job.id, wait_s, error)
        self._show()

    def on_success(self, job: Job, state: JobState, cost_usd: float) -> None:
        self._done(job)
        self.succeeded += 1
        self.spent_usd += cost_usd
        self._show(advance=1)

    def on_failure(self, job: Job, error: JobError) -> None:
        self._done(job)
        self.failed += 1
        log.warning("failed %s: %s", job.id, error)
        self._show(advance=1)

    def on_stop(self, message: str) -> None:
        self._show()

    def _done(self, job: Job) -> None:
        self.retrying.discard(job.id)

    def figures(self) -> str:
        """The progress line: counts, rate, spend and ETA."""
        elapsed = max(time.monotonic() - self._started, 1e-9)
        done = self.succeeded + self.failed
        per_min = done * 60.0 / elapsed
        eta = f"{(self.total - done) / (done / elapsed):.0f}s" if done else "?"
        return (
            f"{self.succeeded} succeeded, {self.failed} failed, {len(self.retrying)} retrying, "
            f"{self.in_flight} in flight, {done}/{self.total} done; {per_min:.1f} img/min; "
            f"${self.spent_usd:.2f} spent; ETA {eta}"
        )

    def _show(self, advance: int = 0) -> None:
        if self._bar is None:
            return
        if advance:
            self._bar.update(advance)
        self._bar.set_postfix_str(
            f"ok {self.succeeded} fail {self.failed} retry {len(self.retrying)} "
            f"flight {self.in_flight} ${self.spent_usd:.2f}",
            refresh=False,
        )

    async def close(self) -> None:
        """Stop the ticker and print the last figures."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.total:
            log.info("progress: %s", self.figures())
