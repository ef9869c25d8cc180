"""Group commit: the outcomes of requests that end together share their fsyncs.

With many requests in flight, outcomes arrive in clusters. Each one queues
here and waits for the next batch, which one worker thread makes durable
with one fsync per image, one of the images folder and one of the journal
(:meth:`batch.checkpoint.Checkpoint.commit_batch`), instead of paying those
on its own while the event loop hands off threads for each.

A batch that fails with :class:`StorageError` fails its outcomes and the
committer goes on. Any other exception is a bug: it fails every outcome
queued or in the batch with that exception, and every later ``commit``
raises it at once, so nobody waits for a commit task that is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from typing import TypeVar

from batch.checkpoint import JobState
from batch.errors import StorageError
from batch.images import StagedImage
from batch.storage.base import StateStore

T = TypeVar("T")
Offload = Callable[[Callable[[], T]], Awaitable[T]]


async def in_thread(work: Callable[[], T]) -> T:
    """Run blocking file work in the default executor (the committer's default)."""
    return await asyncio.to_thread(work)


class GroupCommitter:
    """Commits outcomes in batches: the fsyncs of a batch are shared by all its jobs.

    ``offload`` runs a batch's blocking work; tests pass one that runs it
    inline, so a virtual clock sees no threads.
    """

    def __init__(self, store: StateStore, offload: Offload[None] = in_thread) -> None:
        self._store = store
        self._offload = offload
        self._queue: list[tuple[JobState, tuple[StagedImage, ...], asyncio.Future[None]]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._in_batch: list[asyncio.Future[None]] = []
        self.broken: BaseException | None = None  # the bug that ended the commit task

    def submit(self, state: JobState, staged: tuple[StagedImage, ...] = ()) -> asyncio.Future[None]:
        """Queue ``state`` now, without yielding to the loop; the future ends once it is durable.

        Nothing between a provider's answer and this call may be a point
        where a cancellation lands, or a paid image could be dropped.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        # Nobody may await it (its job was cancelled): do not warn about an unread error.
        future.add_done_callback(_consume)
        if self.broken is not None:
            future.set_exception(self.broken)
            return future
        if self._task is None:
            self._task = loop.create_task(self._run())
        self._queue.append((state, staged, future))
        self._wakeup.set()
        return future

    async def commit(self, state: JobState, staged: tuple[StagedImage, ...] = ()) -> None:
        """Return once ``state`` is durable and its images published; StorageError if not."""
        # Shielded: once queued, the outcome is committed even if the job is cancelled.
        await asyncio.shield(self.submit(state, staged))

    async def _run(self) -> None:
        try:
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
                    await self._offload(functools.partial(self._store.commit_batch, states, staged))
                except StorageError as exc:
                    _finish(self._in_batch, exc)
                    continue
                _finish(self._in_batch, None)
                self._in_batch = []
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: fail every waiter instead of leaving it to hang
            self.broken = exc
            _finish(self._in_batch + [future for _, _, future in self._queue], exc)
            self._queue, self._in_batch = [], []

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


def _finish(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for future in futures:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


def _consume(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
