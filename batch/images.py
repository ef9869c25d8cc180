"""The images folder: streamed writes to temporary files, verification, atomic publication.

An image goes ``images/.<id>~<n>.<pid>.<rand>.tmp`` -> verified, fsynced ->
(recorded in the checkpoint) -> renamed to ``images/<id>[~<n>].<ext>``. A
final name therefore only ever holds a complete, verified image; the
temporary name is what the checkpoint uses to finish a rename a crash
interrupted. ``~`` cannot occur in a job id, so extra images of one job never
collide with another job's name.

Every write, fsync, rename and unlink here goes through :mod:`batch.fsops`,
where the storage fault tests inject their failures.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from batch import fsops
from batch.errors import StorageError
from batch.imageinfo import ImageInfo, ImageVerifier

log = logging.getLogger(__name__)

IMAGES_DIR = "images"
TMP_SUFFIX = ".tmp"


class OpenFile:
    """A file descriptor that is closed exactly once (a reused number is never closed twice)."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def fsync(self) -> None:
        if self.fd is not None:
            fsops.fsync(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            fsops.close(fd)


@dataclass(frozen=True)
class StagedImage:
    """A verified image under its temporary name, still open: the commit fsyncs and closes it.

    Deferring the fsync to the commit lets one worker thread sync a whole
    batch, instead of one thread hand-off per image while a request slot waits.
    """

    tmp_rel: str  # relative to the output folder
    final_rel: str
    sha256: str
    bytes: int
    info: ImageInfo
    mtime_ns: int | None
    file: OpenFile = field(compare=False, repr=False)
    # Where the bytes sit on this machine when not at ``root / tmp_rel`` (an object
    # store's local spool; ``tmp_rel`` is then the staging key the journal records).
    spool: Path | None = field(default=None, compare=False)


def discard(root: Path, staged: StagedImage) -> None:
    """Close and delete a staged image that will not be published."""
    staged.file.close()
    remove_quietly(root / staged.tmp_rel)


class LocalImages:
    """The images folder of a local output: :class:`~batch.storage.base.ImageSink` on disk.

    Staged files are fsynced by the group commit (one thread for a batch), so
    ``prepare`` has nothing to do; ``publish`` is the rename after the record.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def open(
        self, job_id: str, index: int, *, max_pixels: int,
        transform: StreamTransform | None = None,
    ) -> ImageWriter:
        return ImageWriter(self.root, job_id, index, max_pixels=max_pixels, transform=transform)

    def local_path(self, staged: StagedImage) -> Path:
        return staged.spool or self.root / staged.tmp_rel

    async def prepare(self, staged: Sequence[StagedImage]) -> tuple[StagedImage, ...]:
        return tuple(staged)

    def discard(self, staged: StagedImage) -> None:
        discard(self.root, staged)

    def release(self, staged: StagedImage) -> None:
        staged.file.close()

    def remove(self, rel: str) -> None:
        remove_quietly(self.root / rel)


def final_name(job_id: str, index: int, ext: str) -> str:
    """The published file name of image ``index`` of a job."""
    stem = job_id if index == 0 else f"{job_id}~{index + 1}"
    return f"{IMAGES_DIR}/{stem}.{ext}"


class StreamTransform(Protocol):
    """Rewrites an image as it streams (provenance): bytes in, bytes to store out."""

    def feed(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class ImageWriter:
    """Writes one streamed image to a temporary file while verifying and hashing it.

    With a ``transform``, what is verified, hashed and stored is its output.
    """

    def __init__(
        self, root: Path, job_id: str, index: int, *, max_pixels: int,
        transform: StreamTransform | None = None,
    ) -> None:
        self._root = root
        self._transform = transform
        self._job_id = job_id
        self._index = index
        # Unique among live writers; O_EXCL below refuses any leftover of the same name.
        unique = f"{os.getpid()}.{id(self):x}"
        self.tmp_rel = f"{IMAGES_DIR}/.{job_id}~{index}.{unique}{TMP_SUFFIX}"
        self._path = root / self.tmp_rel
        self._sha = hashlib.sha256()
        self._verifier = ImageVerifier(max_pixels=max_pixels)
        self._size = 0
        try:
            self._fd: int | None = fsops.open_fd(
                self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644
            )
        except OSError as exc:
            raise StorageError(f"cannot create {self._path}: {exc.strerror}") from None

    def write(self, data: bytes) -> None:
        """Append decoded bytes; raises MalformedResponse if they stop being an image.

        The caller aborts the writer on any error.
        """
        if self._transform is not None:
            data = self._transform.feed(data)
        self._store(data)

    def _store(self, data: bytes) -> None:
        if not data:
            return
        self._verifier.feed(data)
        self._sha.update(data)
        self._size += len(data)
        assert self._fd is not None
        try:
            fsops.write_all(self._fd, data)
        except OSError as exc:
            raise StorageError(f"writing {self._path} failed: {exc.strerror}") from None

    def finish(self) -> StagedImage:
        """Verify the image is complete; hand its still-open file to the commit."""
        try:
            if self._transform is not None:
                self._store(self._transform.finish())
            info = self._verifier.finish()
            assert self._fd is not None
            mtime_ns = os.fstat(self._fd).st_mtime_ns
        except OSError as exc:
            self.abort()
            raise StorageError(f"stat of {self._path} failed: {exc.strerror}") from None
        except BaseException:
            self.abort()
            raise
        fd, self._fd = self._fd, None
        return StagedImage(
            tmp_rel=self.tmp_rel,
            final_rel=final_name(self._job_id, self._index, info.ext),
            sha256=self._sha.hexdigest(),
            bytes=self._size,
            info=info,
            mtime_ns=mtime_ns,
            file=OpenFile(fd),
        )

    def abort(self) -> None:
        """Drop the temporary file (idempotent)."""
        self._close()
        remove_quietly(self._path)

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fsops.close(fd)


def remove_quietly(path: Path) -> None:
    try:
        fsops.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc.strerror)


def publish(root: Path, staged: StagedImage) -> None:
    """Rename a staged image to its final name (atomic on POSIX)."""
    try:
        fsops.replace(root / staged.tmp_rel, root / staged.final_rel)
    except OSError as exc:
        raise StorageError(f"renaming {staged.tmp_rel} failed: {exc.strerror}") from None


def write_atomic(path: Path, chunks: Iterable[bytes]) -> None:
    """Replace ``path`` with ``chunks`` so a reader sees the old or the new file, never half.

    The chunks are streamed, so a results file for 100,000 jobs is never
    held whole in memory. The temporary file is created with O_EXCL |
    O_NOFOLLOW, so a link planted under its name cannot redirect the write
    outside the output folder.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        remove_quietly(tmp)
        fd = fsops.open_fd(tmp, flags, 0o644)
        try:
            pending: list[bytes] = []
            size = 0
            for chunk in chunks:
                pending.append(chunk)
                size += len(chunk)
                if size >= 1 << 20:  # a results line is small: write a megabyte at a time
                    fsops.write_all(fd, b"".join(pending))
                    pending, size = [], 0
            fsops.write_all(fd, b"".join(pending))
            fsops.fsync(fd)
        finally:
            fsops.close(fd)
        fsops.replace(tmp, path)
    except OSError as exc:
        remove_quietly(tmp)
        raise StorageError(f"writing {path} failed: {exc.strerror or exc}") from None


def stray_temporaries(root: Path) -> list[Path]:
    """Temporary image files left behind by earlier runs."""
    folder = root / IMAGES_DIR
    try:
        # scandir and names: a Path per file of a million-image folder costs seconds.
        with os.scandir(folder) as entries:
            return [folder / entry.name for entry in entries
                    if entry.name.startswith(".") and entry.name.endswith(TMP_SUFFIX)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def file_matches(path: Path | str, size: int, mtime_ns: int) -> bool:
    """Cheap check that a published file is the one recorded (size and mtime)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_size == size and st.st_mtime_ns == mtime_ns


def sha256_of(path: Path) -> str | None:
    """Hash of a file's content, or None if it cannot be read."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()
