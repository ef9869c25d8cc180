"""A shard task's state in an ``s3://`` output: its own segments, its own jobs, no clean-up.

The S3 state (:mod:`batch.storage.s3state`) writes immutable journal segments
named by writer, ``g<gen>-w-<writer>-<seq>.jsonl``; a shard task attempt
writes under its own writer id (``<run>.<shard>.<attempt>``) in the
generation the driver opened, so any number of them record into one bucket
at once. Unlike the driver's open, a shard's never recovers, compacts or
deletes: staging keys and segments of other shards are live. The driver,
which holds the lease, reads the state again once every shard has ended,
and that publishes what a dead worker left staged and drops the rest.

A shard reads every segment (a retry must see what its earlier attempt
committed) but keeps the states of its own jobs only, so what it holds
grows with its shard, not with the catalog.
"""

from __future__ import annotations

from collections.abc import Iterable

from batch.storage.base import StateStore
from batch.storage.s3client import S3Location
from batch.storage.s3state import S3State


def open_shard(url: str, endpoint: str | None, writer: str, gen: int | None,
               keep: Iterable[str] | None = None) -> S3State:
    """A shard writer's state; every segment read (a retry sees what its earlier attempt
    committed), the states of the jobs in ``keep`` kept (None: all)."""
    if gen is None:
        raise ValueError("a shard of an s3:// output needs the driver's generation")
    cls = S3State if keep is None else _keeping(frozenset(keep))
    return cls.open(S3Location.parse(url, endpoint), writer=writer, shard_of=gen)


def _keeping(keep: frozenset[str]) -> type[S3State]:
    """An :class:`S3State` that drops, as it reads them, the states of jobs not in ``keep``."""

    class OwnJobs(S3State):
        def _load_line(self, line: bytes, name: str, number: int) -> None:
            before = len(self.states)
            super()._load_line(line, name, number)
            if len(self.states) > before:
                # A new id was added last (dicts keep insertion order).
                added = next(reversed(self.states))
                if added not in keep:
                    del self.states[added]

    return OwnJobs


def refresh(store: StateStore) -> None:
    """The driver's view once the shards ended: every segment read, crashes finished."""
    if not isinstance(store, S3State):
        raise TypeError(f"not an s3:// state: {store!r}")
    store.refresh()
