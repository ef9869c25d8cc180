"""Cutting a catalog's unfinished jobs into shards for a cluster: pure, deterministic.

A shard is a run of at most ``shard_size`` unfinished jobs, taken in manifest
order, so the same manifest and the same state always give the same shards
(a re-run after the driver died before anything was recorded plans exactly
what it planned before). A shard's id names its position and its first and
last job, and hashes its ids: a shard task's journal segments carry it, so a
retried task finds what its earlier attempt already committed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

DEFAULT_SHARD_SIZE = 300


@dataclass(frozen=True)
class Shard:
    """One shard: its id and the positions of its jobs in the plan's ``todo`` list."""

    id: str
    positions: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.positions)


def shard_id(index: int, job_ids: Sequence[str]) -> str:
    """A stable, file-name-safe id: position and a hash of the job ids it holds."""
    digest = hashlib.sha256("\n".join(job_ids).encode("utf-8")).hexdigest()[:12]
    return f"s{index:05d}_{digest}"


def make_shards(job_ids: Sequence[str], shard_size: int = DEFAULT_SHARD_SIZE) -> list[Shard]:
    """Cut ``job_ids`` (the unfinished jobs, in manifest order) into shards of ``shard_size``.

    Every job lands in exactly one shard; the last shard may be smaller.
    """
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, not {shard_size}")
    return list(_cut(job_ids, shard_size))


def _cut(job_ids: Sequence[str], size: int) -> Iterator[Shard]:
    for index, start in enumerate(range(0, len(job_ids), size)):
        positions = tuple(range(start, min(start + size, len(job_ids))))
        yield Shard(shard_id(index, [job_ids[p] for p in positions]), positions)


def writer_id(run: str, shard: str, attempt: str) -> str:
    """The name of one shard task attempt's journal segment: ``<run>.<shard>.<attempt>``.

    Each attempt writes its own segment, so no two processes ever append to
    the same file; readers take the main journal and every segment.
    """
    for part in (run, shard, attempt):
        if not part or "." in part or "/" in part:
            raise ValueError(f"bad writer id part {part!r}")
    return f"{run}.{shard}.{attempt}"


class Backlog:
    """How many of each shard's jobs are still to end, from the driver's progress events.

    The driver starts the next shard when a running one is down to its last requests
    (:meth:`busy` counts the others): a shard's tail leaves permits free that only
    another shard with jobs queued can use, and without one the cluster would run below
    its concurrency at every shard's end.
    """

    def __init__(self, shards: Sequence[Shard], job_ids: Sequence[str]) -> None:
        self._left = {shard.id: len(shard) for shard in shards}
        self._shard_of = {job_ids[p]: shard.id for shard in shards for p in shard.positions}

    def ended(self, job_id: str) -> None:
        """``job_id`` succeeded or failed for good."""
        shard = self._shard_of.pop(job_id, None)
        if shard is not None:
            self._left[shard] -= 1

    def left(self, shard_id: str) -> int:
        return self._left.get(shard_id, 0)

    def busy(self, running: Iterable[str], tail: int) -> int:
        """How many of the ``running`` shards have more than ``tail`` jobs still to end."""
        return sum(1 for shard in running if self.left(shard) > tail)
