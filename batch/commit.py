"""Group commit: the outcomes of requests that end together share their fsyncs.

With many requests in flight, outcomes arrive in clusters. Each one queues
here and waits for the next batch, which one worker thread makes durable
with one fsync per image, one of the images folder and one of the journal
(:meth:`batch.checkpoint.Checkpoint.commit_batch`), instead of paying those
on its own while the event loop hands off threads for each.
"""

from __future__ import annotations

import asyncio
import contextlib

from batch.checkpoint import Checkpoint, JobState
from batch.errors import StorageError
from batch.images import StagedImage


class GroupCommitter:
    """Commits outcomes in batches: the fsyncs of a batch are shared by all its jobs.

    With many requests in flight, outcomes arrive together; each waits for
    the next batch instead of paying two fsyncs of its own.
    """

    def __init__(self, store: Checkpoint) -> None:
        self._store = store
        self._queue: list[tuple[JobState, tuple[StagedImage, ...], asyncio.Future[None]]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._in_batch: list[asyncio.Future[None]] = []

    async def commit(self, state: JobState, staged: tuple[StagedImage, ...] = ()) -> None:
        """Return once ``state`` is durable and its images published; StorageError if not."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((state, staged, future))
        self._wakeup.set()
        # Shielded: once queued, the outcome is committed even if the job is cancelled.
        await asyncio.shield(future)

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            batch, self._queue = self._queue, []
            if not batch:
                continue
            self._in_batch = [future for _, _, future in batch]
            states = [state for state, _, _ in batch]
            staged = [image for _, images, _ in batch for image in images]
            try:
                await asyncio.to_thread(self._store.commit_batch, states, staged)
            except StorageError as exc:
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for _, _, future in batch:
                if not future.done():
                    future.set_result(None)

    async def close(self) -> None:
        """Commit what is queued, then stop."""
        if self._task is None:
            return
        waiting = [future for _, _, future in self._queue] + list(self._in_batch)
        if waiting:
            await asyncio.wait(waiting)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
