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

from batch.errors import NotRecorded
from batch.runners.fence import Fence, check_holder
from batch.storage.base import StateStore
from batch.storage.s3client import S3Location, describe
from batch.storage.s3lease import LEASE, LeaseInfo
from batch.storage.s3state import S3State


def open_shard(url: str, endpoint: str | None, writer: str, gen: int | None,
               keep: Iterable[str] | None = None, fence: Fence | None = None) -> S3State:
    """A shard writer's state; every segment read (a retry sees what its earlier attempt
    committed), the states of the jobs in ``keep`` kept (None: all); every segment
    written only while the lease names ``fence``'s holder (:mod:`batch.runners.fence`)."""
    if gen is None:
        raise ValueError("a shard of an s3:// output needs the driver's generation")
    cls = _shard_class(None if keep is None else frozenset(keep), fence)
    return cls.open(S3Location.parse(url, endpoint), writer=writer, shard_of=gen)


def lease_holder(state: S3State) -> str | None:
    """The holder the lease of ``state``'s output names now (None: none, or released)."""
    import obstore

    try:
        data = bytes(obstore.get(state._store, state.location.key(LEASE)).bytes())
    except FileNotFoundError:
        return None
    except Exception as exc:
        raise NotRecorded(f"cannot read the lease on {state.location.url}: {describe(exc)}"
                          ) from None
    info = LeaseInfo.parse(data)
    return None if info is None else info.holder


def _shard_class(keep: frozenset[str] | None, fence: Fence | None) -> type[S3State]:
    """An :class:`S3State` that drops, as it reads them, the states of jobs not in ``keep``
    (None: keeps all), and checks ``fence`` before every segment it writes."""

    class ShardState(S3State):
        def _flush(self, data: bytes) -> None:
            if fence is not None:
                check_holder(lease_holder(self), fence, self.location.url)
            super()._flush(data)

        def _load_line(self, line: bytes, name: str, number: int) -> None:
            if keep is None:
                super()._load_line(line, name, number)
                return
            before = len(self.states)
            super()._load_line(line, name, number)
            if len(self.states) > before:
                # A new id was added last (dicts keep insertion order).
                added = next(reversed(self.states))
                if added not in keep:
                    del self.states[added]

    return ShardState


def refresh(store: StateStore) -> None:
    """The driver's view once the shards ended: every segment read, crashes finished."""
    if not isinstance(store, S3State):
        raise TypeError(f"not an s3:// state: {store!r}")
    store.refresh()
