"""The few operating-system calls the store makes on the output folder, in one place.

The checkpoint (journal, compaction, recovery), the image writer and the
atomic rewrite of results.jsonl and summary.json touch the disk only through
these functions, and reach them through this module's namespace
(``fsops.write(...)``, never ``from batch.fsops import write``). That is the
seam the storage fault tests use: they replace a function here to make the
Nth write, fsync, rename or directory fsync fail with ENOSPC or EIO, or to
write short, and so reach every failure path of the store in-process (see
tests/test_storage_faults.py). Reads and ``fstat`` go straight to ``os``:
a failing read loses nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

PathLike = str | Path


def open_fd(path: PathLike, flags: int, mode: int = 0o644) -> int:
    """``os.open``: a file the store will write."""
    return os.open(path, flags, mode)


def write(fd: int, data: bytes | memoryview) -> int:
    """One ``os.write``; it may write less than asked (a nearly full disk does)."""
    return os.write(fd, data)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data``, continuing after short writes."""
    view = memoryview(data)
    while view:
        view = view[write(fd, view) :]


def fsync(fd: int) -> None:
    os.fsync(fd)


def fsync_dir(path: PathLike) -> None:
    """Make the creations and renames in the folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(src: PathLike, dst: PathLike) -> None:
    """``os.replace``: atomic on POSIX, the only way a final name gets its content."""
    os.replace(src, dst)


def unlink(path: PathLike) -> None:
    os.unlink(path)


def ftruncate(fd: int, size: int) -> None:
    os.ftruncate(fd, size)


def close(fd: int) -> None:
    os.close(fd)
