"""A shard task's state in an ``s3://`` output: its own segments, no clean-up.

The S3 state (:mod:`batch.storage.s3state`) writes immutable journal segments
named by writer, ``g<gen>-w-<writer>-<seq>.jsonl``; a shard task attempt
writes under its own writer id (``<run>.<shard>.<attempt>``) in the
generation the driver opened, so any number of them record into one bucket
at once. Unlike the driver's open, a shard's never recovers, compacts or
deletes: staging keys and segments of other shards are live. The driver,
which holds the lease, reads the state again once every shard has ended,
and that publishes what a dead worker left staged and drops the rest.
"""

from __future__ import annotations

from batch.storage.base import StateStore
from batch.storage.s3client import S3Location
from batch.storage.s3state import S3State


def open_shard(url: str, endpoint: str | None, writer: str, gen: int | None) -> S3State:
    """A shard writer's state; every segment read (a retry sees what its earlier attempt
    committed)."""
    if gen is None:
        raise ValueError("a shard of an s3:// output needs the driver's generation")
    return S3State.open(S3Location.parse(url, endpoint), writer=writer, shard_of=gen)


def refresh(store: StateStore) -> None:
    """The driver's view once the shards ended: every segment read, crashes finished."""
    if not isinstance(store, S3State):
        raise TypeError(f"not an s3:// state: {store!r}")
    store.refresh()
