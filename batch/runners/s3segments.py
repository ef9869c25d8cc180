"""A shard task's state in an ``s3://`` output: its own segments, its own jobs, no clean-up.

The S3 state (:mod:`batch.storage.s3state`) writes immutable journal segments
named by writer, ``g<gen>-w-<writer>-<seq>.jsonl``; a shard task attempt
writes under its own writer id (``<run>.<shard>.<attempt>``) in the
generation the driver opened, so any number of them record into one bucket
at once. Unlike the driver's open, a shard's never recovers, compacts or
deletes: staging keys and segments of other shards are live. The driver,
which holds the lease, reads the state again once every shard has ended,
and that publishes what a dead worker left staged and drops the rest.

A shard reads only what it needs: the driver sends the states of its jobs
as it read them at its open (``prior``), and the shard adds the segments
its own earlier attempts wrote in this run (a retry must see what they
committed), listed by name and read one at a time. What it holds and reads
grows with its shard, not with the catalog or the run. (It still lists the
journal's and the images' names once.)

Every segment it writes is fenced (:mod:`batch.runners.fence`): written only
while the lease names the driver that sent the shard.
"""

from __future__ import annotations

from collections.abc import Iterable

from batch.checkpoint import JobState
from batch.errors import NotRecorded, OutputError
from batch.runners.fence import Fence, check_holder
from batch.storage import s3journal
from batch.storage.base import StateStore
from batch.storage.s3client import S3Location, describe
from batch.storage.s3lease import LEASE, LeaseInfo
from batch.storage.s3state import S3State


def open_shard(url: str, endpoint: str | None, writer: str, gen: int | None,
               prior: Iterable[JobState] | None = None, fence: Fence | None = None) -> S3State:
    """A shard writer's state in the driver's generation ``gen``.

    ``prior`` (the driver's states of the shard's jobs) given: those, then the segments
    of this shard's earlier attempts in this run (``writer`` is ``<run>.<shard>.<attempt>``).
    None: every segment, every job (for tests and tools). Every segment written only while
    the lease names ``fence``'s holder.
    """
    if gen is None:
        raise ValueError("a shard of an s3:// output needs the driver's generation")
    if prior is None:
        cls = _shard_class(None, fence)
    else:
        run, shard, _attempt = writer.split(".")
        cls = _shard_class(f"g{gen:08d}-w-{run}.{shard}.", fence)
    state = cls.open(S3Location.parse(url, endpoint), writer=writer, shard_of=gen)
    for before in prior or ():
        state.states.setdefault(before.id, before)  # this run's attempts are newer
    return state


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


def _shard_class(own: str | None, fence: Fence | None) -> type[S3State]:
    """An :class:`S3State` that reads only the segments whose names start with ``own``
    (None: all), one at a time, and checks ``fence`` before every segment it writes."""

    class ShardState(S3State):
        def _flush(self, data: bytes) -> None:
            if fence is not None:
                check_holder(lease_holder(self), fence, self.location.url)
            super()._flush(data)

        def _load(self, *, writable: bool) -> None:
            if own is None:
                super()._load(writable=writable)
                return
            import obstore

            names = sorted(meta["path"].rsplit("/", 1)[-1]
                           for meta in self._list(s3journal.JOURNAL_DIR))
            for name in names:
                if not name.startswith(own):
                    continue
                rel = f"{s3journal.JOURNAL_DIR}/{name}"
                try:  # one segment at a time: a shard never holds more than one
                    data = bytes(obstore.get(self._store, self.location.key(rel)).bytes())
                except Exception as exc:
                    raise OutputError(f"cannot read {self.location.url}/{rel}: "
                                      f"{describe(exc)}") from None
                for number, line in enumerate(data.splitlines(), 1):
                    self._load_line(line, rel, number)

    return ShardState


def refresh(store: StateStore) -> None:
    """The driver's view once the shards ended: every segment read, crashes finished."""
    if not isinstance(store, S3State):
        raise TypeError(f"not an s3:// state: {store!r}")
    store.refresh()
