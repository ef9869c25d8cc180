"""A shard task's state in an ``s3://`` output: its own segments, no clean-up.

The S3 state (:mod:`batch.storage.s3state`) already writes immutable journal
segments named by writer, ``g<gen>-w-<writer>-<seq>.jsonl``; a shard task
attempt writes under its own writer id (``<run>.<shard>.<attempt>``), so
any number of them record into one bucket at once. Unlike the driver's
open, a shard's never recovers, compacts or deletes: staging keys and
segments of other shards are live. The driver, which holds the lease,
re-opens the state once every shard has ended, and that open publishes what
a dead worker left staged and drops the rest.
"""

from __future__ import annotations

from batch.storage import s3client
from batch.storage.s3client import S3Location
from batch.storage.s3state import S3State


class S3ShardState(S3State):
    """See the module docstring."""

    @classmethod
    def open_shard(cls, url: str, endpoint: str | None, writer: str) -> S3ShardState:
        """Read every segment (a retry sees what its earlier attempt committed)."""
        location = S3Location.parse(url, endpoint)
        state = cls(location, s3client.open_store(location), writer=writer)
        try:
            state._load(writable=False)
            state._list_images()
        except BaseException:
            state.close()
            raise
        return state


def reopen(url: str, endpoint: str | None) -> S3State:
    """The driver's view once the shards ended: every segment read, crashes finished.

    Opened without taking the lease again: the driver's first open holds it.
    """
    return S3State.open(S3Location.parse(url, endpoint), lease=False)
