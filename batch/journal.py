"""The journal file of a checkpoint: appends by one writer at a time, and compaction.

The event loop appends attempt counts while a worker thread commits outcomes,
so every append holds one lock from its ``fstat`` to its ``ftruncate``-on-error:
a failed append can only ever cut off its own bytes, never a record another
thread had already made durable. The fsync runs after the lock is released,
so an attempt record on the event loop never waits for a commit's fsync
(which makes the attempt's bytes durable too).

What a failure leaves is said by its type: :class:`~batch.errors.NotRecorded`
if none of the appended bytes are in the file, a plain
:class:`~batch.errors.StorageError` if some may be. After the latter the
journal refuses every later append: a later fsync can succeed over data an
earlier one lost, and a record appended after a partial one would merge
into it. All writes go through :mod:`batch.fsops`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from batch import fsops
from batch.errors import NotRecorded, OutputError, StorageError

log = logging.getLogger(__name__)


class Journal:
    """The journal open for appending; see the module docstring."""

    def __init__(self, path: Path, fd: int, lines: int) -> None:
        self.path = path
        self.lines = lines  # complete records in the file
        self._fd: int | None = fd
        self._lock = threading.Lock()
        self._refused: str | None = None  # why appends are refused after a failed one
        self.last_offset: int | None = None  # where the last whole append began

    @classmethod
    def open(cls, path: Path, *, lines: int, torn_at: int | None) -> Journal:
        """Open ``path`` for appending, cutting a torn last record off at ``torn_at``."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = fsops.open_fd(path, flags, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot open {path}: {exc.strerror}") from None
        try:
            if torn_at is not None:
                fsops.ftruncate(fd, torn_at)
        except OSError as exc:
            fsops.close(fd)
            raise OutputError(f"cannot open {path}: {exc.strerror}") from None
        return cls(path, fd, lines)

    def append(self, data: bytes, *, durable: bool, lines: int = 1) -> int:
        """Append whole records (``lines`` of them); ``durable`` fsyncs them. Any thread.

        Returns the offset the records start at (also ``last_offset``, kept when only
        the fsync fails: the bytes are then in the file, maybe not durable)."""
        with self._lock:
            if self._fd is None:
                raise NotRecorded("the checkpoint is closed")
            if self._refused is not None:
                raise NotRecorded(f"the checkpoint refuses writes after: {self._refused}")
            fd = self._fd
            self.last_offset = None
            try:
                size = os.fstat(fd).st_size
            except OSError as exc:
                raise NotRecorded(f"writing the checkpoint failed: {exc.strerror}") from None
            try:
                fsops.write_all(fd, data)  # a nearly full disk writes short before it fails
            except OSError as exc:
                message = f"writing the checkpoint failed: {exc.strerror}"
                try:
                    # Cut a partial record off, so the next append does not merge into it.
                    fsops.ftruncate(fd, size)
                except OSError:
                    self._refused = message
                    raise StorageError(message) from None
                raise NotRecorded(message) from None
            self.lines += lines
            self.last_offset = size
        if durable:
            try:
                fsops.fsync(fd)
            except OSError as exc:
                message = f"fsync of the checkpoint failed: {exc.strerror}"
                self._refused = message
                raise StorageError(message) from None
        return size

    def compact(self, records: Iterable[bytes], count: int) -> bool:
        """Replace the file with ``records`` (``count`` lines), atomically.

        A failure before the rename leaves the long file as it was and only
        logs (returns False): compacting is an optimisation. After the rename, a failure to
        make it durable is a StorageError: a record appended to the new file
        could vanish with the rename in a crash.
        """
        tmp = self.path.with_suffix(".compact.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = fsops.open_fd(tmp, flags, 0o644)
            try:
                chunk: list[bytes] = []
                for record in records:
                    chunk.append(record)
                    if len(chunk) >= 4096:
                        fsops.write_all(fd, b"".join(chunk))
                        chunk = []
                fsops.write_all(fd, b"".join(chunk))
                fsops.fsync(fd)
            finally:
                fsops.close(fd)
            fsops.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):  # else the next open removes it
                fsops.unlink(tmp)
            log.warning("could not compact %s (%s); keeping it as it is", self.path, exc.strerror)
            return False
        with self._lock:
            if self._fd is not None:
                fsops.close(self._fd)
            self._fd = None
            try:
                self._fd = fsops.open_fd(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                fsops.fsync_dir(self.path.parent)
            except OSError as exc:
                raise StorageError(f"compacting {self.path} failed: {exc.strerror}") from None
            log.info("compacted %s from %d to %d records", self.path, self.lines, count)
            self.lines = count
        return True

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                fsops.close(fd)
