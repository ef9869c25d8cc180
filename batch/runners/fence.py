"""Fencing a cluster run's shard writers: an orphan never commits after a newer run took over.

A driver killed with SIGKILL (over ``ray://`` Ray keeps its session, and so
its shard tasks, for a while) can leave shard tasks writing while a re-run
already holds the output. The lock (a folder) or the lease (``s3://``) keeps
two drivers apart, but a shard writer holds neither. So the driver puts a
fencing token in every shard's spec, the token of the lock or lease it
holds, and a shard writer reads the current one before each commit: once a
newer run has taken the output over (it rewrote the lock file, or the lease
names another holder, or was released), the commit is refused with
``NotRecorded`` and the shard stops, its unrecorded jobs left to the new run.

- a folder: the lock file's bytes (every run that takes the lock rewrites
  them, with its process id), compared as opaque bytes;
- ``s3://``: the lease's holder id (:mod:`batch.storage.s3lease`), read
  from the lease object.

The check narrows the race to one commit (a take-over between the check and
the write is not seen): neither a folder nor S3 can make a write conditional
on another file. It costs one small read per group commit of a shard.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from batch.checkpoint import LOCK, STATE_DIR, JobState
from batch.errors import NotRecorded
from batch.images import StagedImage
from batch.runners.segments import SegmentStore

TAKEN_OVER = "a newer run took over this output (fencing token changed); this shard stops"


@dataclass(frozen=True)
class Fence:
    """The token of the lock or lease the run's driver holds (sent with every shard)."""

    token: str


def folder_token(root: Path) -> str:
    """The folder's current token: its lock file's content (the holder's pid)."""
    try:
        return (root / STATE_DIR / LOCK).read_bytes().decode("ascii", "replace")
    except OSError:
        return ""


def check_folder(root: Path, fence: Fence | None) -> None:
    """NotRecorded if a run other than ``fence``'s holds the folder now."""
    if fence is not None and folder_token(root) != fence.token:
        raise NotRecorded(f"{root}: {TAKEN_OVER}")


def check_holder(found: str | None, fence: Fence | None, where: str) -> None:
    """NotRecorded unless the lease holder ``found`` is ``fence``'s (None: no lease)."""
    if fence is not None and found != fence.token:
        raise NotRecorded(f"{where}: {TAKEN_OVER}")


class FencedSegments(SegmentStore):
    """A shard attempt's folder store that checks the fence before every write."""

    fence: Fence | None = None

    @classmethod
    def open_fenced(cls, root: Path, writer: str, shard: str, states: Iterable[JobState],
                    fence: Fence | None) -> FencedSegments:
        """:meth:`SegmentStore.open_segment`, refused at once if the fence is already down."""
        check_folder(root, fence)
        store = cls.open_segment(root, writer, shard, states)
        assert isinstance(store, FencedSegments)
        store.fence = fence
        return store

    def record(self, state: JobState, *, durable: bool) -> None:
        # Attempt counts too: a stale count from an orphan could outweigh a newer record.
        check_folder(self.root, self.fence)
        super().record(state, durable=durable)

    def commit_batch(self, states: list[JobState], staged: list[StagedImage]) -> None:
        check_folder(self.root, self.fence)
        super().commit_batch(states, staged)
