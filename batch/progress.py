"""What the operator sees while a run goes: a bar on a terminal, a log line every 30 s elsewhere.

The engine reports to an :class:`Observer`; :class:`ConsoleProgress` is the
one the CLI uses. On a terminal it draws a tqdm bar on stderr; when stderr
is not a terminal (cron), it logs one plain line every ``interval_s`` and
one at the end, with the same figures.
"""

from __future__ import annotations

import logging
import time
from typing import IO, TYPE_CHECKING, Any

from tqdm import tqdm

from batch.errors import JobError
from batch.jobs import Job

if TYPE_CHECKING:
    from batch.checkpoint import JobState

log = logging.getLogger("batch")


class Observer:
    """Hooks the engine calls; the default does nothing."""

    def on_plan(self, todo: int, skipped: int) -> None: ...

    def on_attempt(self, job: Job) -> None: ...

    def on_retry(self, job: Job, error: JobError, wait_s: float) -> None: ...

    def on_success(self, job: Job, state: JobState) -> None: ...

    def on_failure(self, job: Job, error: JobError) -> None: ...

    def on_stop(self, message: str) -> None: ...

    def close(self) -> None: ...


class ConsoleProgress(Observer):
    """Counts outcomes and shows them: a bar on a terminal, periodic lines otherwise."""

    def __init__(self, stream: IO[str], *, bar: bool, interval_s: float = 30.0) -> None:
        self._stream = stream
        self._use_bar = bar
        self._interval_s = interval_s
        self._bar: tqdm[Any] | None = None
        self._started = time.monotonic()
        self._last_line = self._started
        self.total = 0
        self.succeeded = 0
        self.failed = 0
        self.retrying: set[str] = set()
        self.in_flight = 0

    def on_plan(self, todo: int, skipped: int) -> None:
        self.total = todo
        if skipped:
            log.info("%d job(s) already done, %d to run", skipped, todo)
        if self._use_bar and todo:
            self._bar = tqdm(total=todo, file=self._stream, unit="img", dynamic_ncols=True)

    def on_attempt(self, job: Job) -> None:
        self.in_flight += 1
        self._refresh()

    def on_retry(self, job: Job, error: JobError, wait_s: float) -> None:
        self.in_flight -= 1
        self.retrying.add(job.id)
        log.info("retrying %s in %.1fs: %s", job.id, wait_s, error)
        self._refresh()

    def on_success(self, job: Job, state: JobState) -> None:
        self._done(job)
        self.succeeded += 1
        self._refresh(advance=1)

    def on_failure(self, job: Job, error: JobError) -> None:
        self._done(job)
        self.failed += 1
        log.warning("failed %s: %s", job.id, error)
        self._refresh(advance=1)

    def on_stop(self, message: str) -> None:
        self._refresh()

    def _done(self, job: Job) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        self.retrying.discard(job.id)

    def figures(self) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        per_min = self.succeeded * 60.0 / elapsed
        done = self.succeeded + self.failed
        eta = (self.total - done) / (done / elapsed) if done else None
        eta_text = f"{eta:.0f}s" if eta is not None else "?"
        return (
            f"{self.succeeded} succeeded, {self.failed} failed, {len(self.retrying)} retrying, "
            f"{self.in_flight} in flight of {self.total}; {per_min:.1f} img/min; ETA {eta_text}"
        )

    def _refresh(self, advance: int = 0) -> None:
        if self._bar is not None:
            if advance:
                self._bar.update(advance)
            self._bar.set_postfix_str(
                f"ok={self.succeeded} fail={self.failed} retry={len(self.retrying)} "
                f"flight={self.in_flight}",
                refresh=False,
            )
            return
        now = time.monotonic()
        if now - self._last_line >= self._interval_s:
            self._last_line = now
            log.info("progress: %s", self.figures())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.total:
            log.info("progress: %s", self.figures())
