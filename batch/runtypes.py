"""What goes into a run and what comes out of it: the engine's config, an endpoint's route,
the run's counters and why it stopped. Kept apart from :mod:`batch.engine` so that readers
of a run's outcome (report, cluster driver) need not load the engine.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field

from batch.cost import PriceTable
from batch.limits import Limits
from batch.limits import build as build_limits
from batch.providers.base import Provider
from batch.retry import RetryPolicy


class StopReason(enum.StrEnum):
    NONE = "completed"
    FATAL = "fatal_api_error"
    STORAGE = "storage_error"
    SIGNAL = "signal"
    RUNTIME = "max_runtime"
    RATE_LIMIT = "rate_limit_wait_exceeded"
    BUDGET = "max_cost"


@dataclass(frozen=True)
class EngineConfig:
    concurrency: int = 8
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    rpm: float | None = None
    adaptive: bool = True
    force: bool = False
    max_runtime_s: float | None = None
    max_cost_usd: float | None = None
    prices: PriceTable = field(default_factory=lambda: PriceTable.with_overrides({}))
    seed: int | None = None
    grace_s: float = 30.0  # requests in flight may finish this long after a stop


@dataclass
class RunStats:
    """Counters of one run (mutable: the engine adds to them as it goes)."""

    planned: int = 0
    skipped: int = 0  # already done with the same fingerprint
    requests: int = 0
    succeeded: int = 0
    failed: int = 0
    retries: Counter[str] = field(default_factory=Counter)
    rate_limited: int = 0
    bytes_written: int = 0
    images_written: int = 0
    peak_in_flight: int = 0
    cost_usd: float = 0.0
    broken_cost_usd: float = 0.0  # 200s whose image came broken: most likely billed, not kept
    unpriced_images: int = 0
    tokens: Counter[str] = field(default_factory=Counter)
    stop: StopReason = StopReason.NONE
    stop_message: str = ""


@dataclass(frozen=True)
class Route:
    """Where one endpoint's jobs go: its provider and its own limits (a 429 stays there)."""

    provider: Provider
    limits: Limits
    concurrency: int


def make_limits(
    concurrency: int, rpm: float | None, adaptive: bool, max_pause_s: float = 900.0,
    name: str = "",
) -> Limits:
    """One endpoint's limits (see :mod:`batch.limits`)."""
    return build_limits(concurrency, rpm=rpm, adaptive=adaptive, max_pause_s=max_pause_s,
                        name=name)
