"""What the simulated batch APIs (Gemini Batch, OpenAI Batch) share: clock, plan, faults.

A simulated batch runs on a clock tests control: it is PENDING for the first
tenth of ``delay_s`` after its creation, RUNNING until ``delay_s`` has passed,
then ends (succeeded, or expired / failed when told to). ``POST /_batch/advance``
moves the clock forward, so a test never sleeps. Which lines fail is decided per
prompt from a hash (the same prompt fails the same way on every run) and only
for the first ``line_fail_attempts`` batches that carry it, so a resubmission
succeeds. The hang switches make the server stop answering at one exact step
(it still does the work), which is where crash tests send SIGKILL.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import hashlib
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


class Progress(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"  # finished; the batch's planned end (succeeded / expired / failed) applies


class End(enum.StrEnum):
    SUCCEEDED = "succeeded"
    EXPIRED = "expired"
    FAILED = "failed"


@dataclass(frozen=True)
class BatchSimConfig:
    """How the simulated batch APIs behave; see ``add_arguments`` for the meanings."""

    delay_s: float = 0.0
    line_fail: float = 0.0  # share of prompts whose line comes back with a retryable error
    line_fail_attempts: int = 1
    expire: tuple[int, ...] = ()  # batch ordinals (1 = first created) that expire
    expire_keep: float = 0.5  # share of an expired batch's lines that finished
    fail: tuple[int, ...] = ()  # batch ordinals that fail as a whole
    fault_upload: float = 0.0  # probability of a 503 per upload call
    fault_poll: float = 0.0  # per poll / list call
    fault_download: float = 0.0  # per download: the connection is cut half way
    hang_upload: int = 0  # the n-th upload (1-based) receives its bytes, then never answers
    hang_create: int = 0  # the n-th create makes the batch, then never answers
    hang_download: int = 0  # the n-th download sends half the file, then stalls
    max_requests: int = 0  # reject a batch with more lines (0: the provider's own limit)
    seed: int | None = None


def progress(created_s: float, now_s: float, delay_s: float) -> Progress:
    """Where a batch created at ``created_s`` is at ``now_s``."""
    age = now_s - created_s
    if age >= delay_s:
        return Progress.DONE
    return Progress.PENDING if age < delay_s / 10 else Progress.RUNNING


def planned_end(ordinal: int, config: BatchSimConfig) -> End:
    if ordinal in config.fail:
        return End.FAILED
    return End.EXPIRED if ordinal in config.expire else End.SUCCEEDED


def share(text: str, salt: str) -> float:
    """A stable draw in [0, 1) for ``text``."""
    digest = hashlib.sha256(f"{salt}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def line_fails(prompt: str, attempt: int, config: BatchSimConfig) -> bool:
    """Whether the line for ``prompt`` in its ``attempt``-th batch fails retryably."""
    return attempt <= config.line_fail_attempts and share(prompt, "fail") < config.line_fail


def line_finished_before_expiry(key: str, config: BatchSimConfig) -> bool:
    return share(key, "expire") < config.expire_keep


class BatchClock:
    """Wall time plus an offset tests move with ``advance``."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def now(self) -> float:
        return time.time() + self.offset_s

    def advance(self, seconds: float) -> None:
        self.offset_s += max(0.0, seconds)


@dataclass
class BatchSimState:
    """Counters and storage one simulator's batch APIs share (and report in /_stats)."""

    config: BatchSimConfig
    clock: BatchClock = field(default_factory=BatchClock)
    folder: Path | None = None  # uploads and results, made on first use; gone at cleanup
    calls: dict[str, int] = field(default_factory=dict)  # upload, create, poll, download...
    paid_lines: dict[str, int] = field(default_factory=dict)  # prompt sha -> images billed
    batch_attempts: dict[str, int] = field(default_factory=dict)  # prompt sha -> batches
    hung: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        self.rng.seed(self.config.seed)

    def count(self, call: str) -> int:
        """Count one ``call``; its 1-based number."""
        self.calls[call] = self.calls.get(call, 0) + 1
        return self.calls[call]

    def fault(self, probability: float) -> bool:
        return probability > 0 and self.rng.random() < probability

    async def hang(self) -> None:
        """Never answer (the test kills the client; the server is stopped after)."""
        self.hung += 1
        await asyncio.Event().wait()

    def stats(self) -> dict[str, object]:
        paid = self.paid_lines
        return {"calls": dict(self.calls), "hung": self.hung, "paid_images": sum(paid.values()),
                "paid_twice": sum(1 for n in paid.values() if n > 1),
                "clock_offset_s": self.clock.offset_s}

    def new_path(self, prefix: str) -> Path:
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="imgbatch-sim-"))
        handle, name = tempfile.mkstemp(prefix=prefix, dir=self.folder)
        os.close(handle)
        return Path(name)

    async def remove(self, _app: object = None) -> None:
        """Delete the folder of uploads and results (an aiohttp cleanup hook): every
        simulator started used to leave one in /tmp, batch files and all."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def _ordinals(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: a comma-separated list of numbers") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--batch-delay", type=float, default=0.0, metavar="S",
        help="seconds (on the batch clock) from a batch's creation to its end")
    add("--batch-line-fail", type=float, default=0.0, metavar="P",
        help="share of prompts whose batch line fails retryably (first batch only)")
    add("--batch-line-fail-attempts", type=int, default=1, metavar="N")
    add("--batch-expire", type=_ordinals, default=(), metavar="N,..",
        help="these batches (1 = first created) expire")
    add("--batch-expire-keep", type=float, default=0.5, metavar="P",
        help="share of an expired batch's lines that finished")
    add("--batch-fail", type=_ordinals, default=(), metavar="N,..",
        help="these batches fail as a whole")
    for name in ("upload", "poll", "download"):
        add(f"--batch-fault-{name}", type=float, default=0.0, metavar="P",
            help=f"probability that a batch {name} call fails")
    for name in ("upload", "create", "download"):
        add(f"--batch-hang-{name}", type=int, default=0, metavar="N",
            help=f"the N-th {name} does its work, then never answers (crash tests)")
    add("--batch-max-requests", type=int, default=0, metavar="N",
        help="reject batches of more than N lines (0: the provider's limit)")


def config_from_args(args: argparse.Namespace) -> BatchSimConfig:
    return BatchSimConfig(
        delay_s=args.batch_delay, line_fail=args.batch_line_fail,
        line_fail_attempts=args.batch_line_fail_attempts, expire=args.batch_expire,
        expire_keep=args.batch_expire_keep, fail=args.batch_fail,
        fault_upload=args.batch_fault_upload, fault_poll=args.batch_fault_poll,
        fault_download=args.batch_fault_download, hang_upload=args.batch_hang_upload,
        hang_create=args.batch_hang_create, hang_download=args.batch_hang_download,
        max_requests=args.batch_max_requests, seed=getattr(args, "seed", None),
    )
