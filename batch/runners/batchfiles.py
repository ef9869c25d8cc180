"""Batch mode's files: request files out, result images in.

Request files: every line written once to a spool, each batch's range copied out.

The spool holds the request lines of one submit pass in (model, route) groups,
local input images inline (streamed from disk as base64, never held whole); its
line sizes feed :func:`batch.runners.batchplan.split`, and each batch's lines,
a contiguous range, become that batch's request file, fsynced, with the sha256
its intent records. Result images: staged through the store's image sink
(:class:`SinkStage`), their commits queued and drained in bounded groups.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from batch import fsops
from batch.errors import JobError, RejectedError, StorageError
from batch.images import StagedImage, StreamTransform, final_name
from batch.jobs import Job
from batch.providers.batchapi import BatchApi
from batch.runners import batchplan as plan
from batch.storage.base import ImageSink, ImageStream

COPY_BYTES = 1024 * 1024


@dataclass
class Spool:
    """The spool's lines (in file order), their start offsets (and the end), refusals."""

    lines: list[plan.Line] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    refused: list[tuple[Job, JobError]] = field(default_factory=list)


async def write_spool(api: BatchApi, jobs: Sequence[Job], path: Path,
                      max_line_bytes: int) -> Spool:
    """Write ``jobs``' request lines to ``path``, grouped; a job whose line cannot be
    made (a URL input, an unreadable file) or is over ``max_line_bytes`` is refused."""
    spool = Spool()
    try:
        out = path.open("wb")
    except OSError as exc:
        raise StorageError(f"cannot create {path}: {exc.strerror}") from None
    with out:
        for job, route in plan.grouped((job, api.route(job)) for job in jobs):
            start = out.tell()
            try:
                request = api.request_line(job.id, job)
                if request.length > max_line_bytes:
                    raise RejectedError(f"its request line is {request.length} bytes, over "
                                        f"the batch file limit of {max_line_bytes}",
                                        job_id=job.id)
                async for chunk in request.chunks:
                    out.write(chunk)
            except JobError as exc:
                out.truncate(start)
                out.seek(start)
                spool.refused.append((job, exc))
                continue
            except OSError as exc:
                raise StorageError(f"writing {path} failed: {exc.strerror}") from None
            spool.offsets.append(start)
            spool.lines.append(plan.Line(job.id, (job.model, route), out.tell() - start))
        spool.offsets.append(out.tell())
    return spool


def copy_range(source: Path, start: int, stop: int, target: Path) -> str:
    """Copy bytes [start, stop) of ``source`` to ``target`` (fsynced); their sha256."""
    sha = hashlib.sha256()
    with source.open("rb") as handle, target.open("wb") as out:
        handle.seek(start)
        left = stop - start
        while left > 0:
            chunk = handle.read(min(COPY_BYTES, left))
            if not chunk:
                raise StorageError(f"{source} ended early")
            sha.update(chunk)
            out.write(chunk)
            left -= len(chunk)
        out.flush()
        fsops.fsync(out.fileno())
    return sha.hexdigest()


class SinkStage:
    """Stages a results stream's images in the store's image sink, named for the batch
    until a line says whose they are; ``stamp`` (provenance) is applied then."""

    def __init__(self, sink: ImageSink, tag: str, max_pixels: int,
                 stamp: Callable[[Job], StreamTransform] | None = None) -> None:
        self.sink, self.tag, self.max_pixels, self.stamp = sink, tag, max_pixels, stamp

    def open(self, n: int) -> ImageStream:
        return self.sink.open(self.tag, n, max_pixels=self.max_pixels)

    def discard(self, image: StagedImage) -> None:
        self.sink.discard(image)

    async def owned(self, image: StagedImage, job: Job, index: int) -> StagedImage:
        """``image`` as image ``index`` of ``job``: renamed, or, with a stamp, copied
        through it (the provenance packet streamed in, as sync mode does while receiving)."""
        ext = image.final_rel.rsplit(".", 1)[-1]
        if self.stamp is None:
            return dataclasses.replace(image, final_rel=final_name(job.id, index, ext))
        stamp = self.stamp

        def copy() -> StagedImage:
            stream = self.sink.open(job.id, index, max_pixels=self.max_pixels,
                                    transform=stamp(job))
            try:
                with self.sink.local_path(image).open("rb") as handle:
                    while chunk := handle.read(COPY_BYTES):
                        stream.write(chunk)
                return stream.finish()
            except BaseException:
                stream.abort()
                raise

        try:
            stamped = await asyncio.to_thread(copy)
        except BaseException:
            self.discard(image)
            raise
        self.discard(image)
        return stamped


async def drain(queued: list[asyncio.Future[None]]) -> None:
    """Wait for the queued commits; the first failure is raised (the rest still finish)."""
    if not queued:
        return
    done = await asyncio.gather(*queued, return_exceptions=True)
    queued.clear()
    for result in done:
        if isinstance(result, BaseException):
            raise result
