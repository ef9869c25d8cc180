"""Everything a cluster run shares, in one actor: the coordinator and each endpoint's limits.

The body of the run's one async Ray actor (:mod:`batch.runners.ray` wraps
it; this module imports no Ray). One actor, not one per endpoint plus a
coordinator: each is a Python process the cluster starts before the first
shard can run, on the driver's node, while the shard tasks' processes start
too, and on a busy node that start-up is most of what a cluster run adds to
a single machine's time. Each endpoint still has its own
:class:`~batch.runners.shared_limits.LimitsServer` (its own cap, pacing and
429 pause); the calls name the endpoint. A restarted actor restarts them
all: each limits server cautious, the coordinator stopped if capped.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from batch.congestion import ControlConfig
from batch.runners.coordinator import Control, Coordinator, Event
from batch.runners.limits_server import EndEvent, Grant, LimitsServer


class RunState:
    """The run's coordinator and its endpoints' limits servers, behind one set of methods."""

    def __init__(self, cap_usd: float | None, limits: Mapping[str, ControlConfig], *,
                 restarted: bool = False) -> None:
        self.coordinator = Coordinator(cap_usd, restarted=restarted)
        self.limits = {name: LimitsServer(config, cautious=restarted)
                       for name, config in limits.items()}

    # -- the coordinator's --------------------------------------------------------------

    async def take(self, worker: str, amount: int) -> tuple[int, int]:
        return await self.coordinator.take(worker, amount)

    async def give(self, worker: str, released: int, spent: int) -> None:
        await self.coordinator.give(worker, released, spent)

    async def attempt(self, shard: str) -> int:
        return await self.coordinator.attempt(shard)

    async def retire(self, prefix: str, keep: str) -> None:
        """Workers ``prefix...`` but ``keep`` are dead: what they held counts as spent now.
        Their permits end with their leases (limits_server's module doc says why)."""
        await self.coordinator.retire(prefix, keep)

    async def report(self, worker: str, events: list[Event]) -> Control:
        return await self.coordinator.report(worker, events)

    async def stop(self, reason: str, message: str, abort: bool = False) -> None:
        await self.coordinator.stop(reason, message, abort)

    async def drain(self) -> tuple[list[Event], float, str]:
        return await self.coordinator.drain()

    # -- an endpoint's limits ------------------------------------------------------------

    async def lease(self, endpoint: str, worker: str, want: int) -> Grant:
        return await self.limits[endpoint].lease(worker, want)

    async def end(self, endpoint: str, worker: str, epoch: str, events: list[EndEvent]) -> None:
        await self.limits[endpoint].end(worker, epoch, events)

    async def renew(self, endpoint: str, worker: str) -> str:
        return await self.limits[endpoint].renew(worker)

    async def adopt(self, endpoint: str, worker: str, count: int) -> Grant:
        return await self.limits[endpoint].adopt(worker, count)

    async def stats(self, endpoint: str) -> dict[str, Any]:
        return await self.limits[endpoint].stats()


class EndpointCalls:
    """One endpoint's :class:`~batch.runners.shared_limits.LimitsRemote` over a run's calls:
    ``lease(worker, want)`` is ``call("lease", endpoint, worker, want)``."""

    def __init__(self, call: Callable[..., Awaitable[Any]], endpoint: str) -> None:
        self._call = call
        self._endpoint = endpoint

    def lease(self, worker: str, want: int) -> Awaitable[Grant]:
        return self._call("lease", self._endpoint, worker, want)

    def end(self, worker: str, epoch: str, events: list[EndEvent]) -> Awaitable[None]:
        return self._call("end", self._endpoint, worker, epoch, events)

    def renew(self, worker: str) -> Awaitable[str]:
        return self._call("renew", self._endpoint, worker)

    def adopt(self, worker: str, count: int) -> Awaitable[Grant]:
        return self._call("adopt", self._endpoint, worker, count)
