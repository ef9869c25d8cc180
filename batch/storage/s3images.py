"""Images of an ``s3://`` output: spooled, verified, uploaded to a staging key, then published.

Path of one image (the local rule, with keys for names):

1. The decoder streams it into a temporary file in a local spool folder,
   verified (structure, dimensions, sha256) as it comes, exactly as for a
   local output; the decode check reads that file.
2. :meth:`S3Images.prepare` uploads it to ``prefix/.imgbatch/staging/...``
   (one PUT up to 5 MiB; above, a multipart upload fed from the file in
   256 KiB pieces, one 5 MiB part in flight; at most ``upload_slots``
   uploads at once) and deletes the spool file. A failed upload leaves no
   object: obstore aborts the multipart upload, and one a kill cut short is
   aborted by the next open. One that fails past obstore's retries is tried
   again from the spool (``retry_delays_s``); if it still fails, the answer's
   spool files move to ``keep_dir`` and the run stops with a StorageError
   naming it, rather than delete a paid image. An uploaded image the state
   could not record (:meth:`S3Images.discard`, the lease lost) is downloaded
   there too before its staging key goes.
3. The state store records the job, with the staging key beside it.
4. :meth:`S3Images.publish` copies the staging key to the final key
   server-side, create-only (``If-None-Match: *`` on the completion), then
   deletes the staging key. A crash before that is finished by the next open.

A spool was measured against streaming each answer straight into a
multipart upload (bench/s3_stream.py, 16 answers of 16 MB at once): 120-140 MB
over the baseline streamed (obstore buffers a 5 MiB part per upload, more
while parts are in flight), 25 MB spooled (an image in flight holds the
64 KiB piece the decoder hands over; four uploads hold a part each). The
spool also keeps the decode check reading a local file, and an upload that
fails can be retried from it without another request to the paid API.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from batch.errors import StorageError
from batch.images import (
    IMAGES_DIR,
    ImageWriter,
    StagedImage,
    StreamTransform,
    remove_quietly,
)
from batch.storage.s3client import S3Location, describe

log = logging.getLogger(__name__)

STAGING = ".imgbatch/staging"
PART_BYTES = 5 * 1024 * 1024
PARTS_IN_FLIGHT = 1
READ_BYTES = 256 * 1024
UPLOAD_RETRY_DELAYS_S = (2.0, 8.0, 30.0)  # after obstore's own retries gave up


def default_keep_dir(location: S3Location) -> Path:
    """Where images that could not be uploaded are kept: ``$XDG_CACHE_HOME`` (or
    ``~/.cache``) ``/imgbatch/unuploaded/<bucket>/<prefix>``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base, "imgbatch", "unuploaded", location.bucket, location.prefix)


def staged_done(staged: StagedImage) -> None:
    """Close and delete the spool file of an image that is now under its staging key."""
    staged.file.close()
    if staged.spool is not None:
        remove_quietly(staged.spool)


async def _pieces(path: Path) -> AsyncIterator[bytes]:
    """The spool file in pieces (just written: read from the page cache, no thread needed)."""
    with path.open("rb") as handle:
        while piece := handle.read(READ_BYTES):
            yield piece
            await asyncio.sleep(0)


class _SpoolWriter:
    """An ImageWriter into the spool whose staged name is a staging key."""

    def __init__(self, inner: ImageWriter, spool_root: Path, staging_rel: str) -> None:
        self._inner = inner
        self._spool_root = spool_root
        self._staging_rel = staging_rel

    def write(self, data: bytes) -> None:
        self._inner.write(data)

    def finish(self) -> StagedImage:
        staged = self._inner.finish()
        return dataclasses.replace(staged, tmp_rel=self._staging_rel, mtime_ns=None,
                                   spool=self._spool_root / staged.tmp_rel)

    def abort(self) -> None:
        self._inner.abort()


class S3Images:
    """The :class:`~batch.storage.base.ImageSink` of an ``s3://`` output."""

    def __init__(self, store: Any, location: S3Location, spool_root: Path, tag: str,
                 upload_slots: int = 4,
                 retry_delays_s: Sequence[float] = UPLOAD_RETRY_DELAYS_S,
                 keep_dir: Path | None = None) -> None:
        self._store = store
        self.location = location
        self._spool_root = spool_root
        (spool_root / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        self._tag = tag  # unique to this writer: staging keys never collide across runs
        self._count = 0
        self._slots = upload_slots
        self._gate: asyncio.Semaphore | None = None
        self.retry_delays_s = tuple(retry_delays_s)
        self.keep_dir = keep_dir if keep_dir is not None else default_keep_dir(location)

    def open(
        self, job_id: str, index: int, *, max_pixels: int,
        transform: StreamTransform | None = None,
    ) -> _SpoolWriter:
        self._count += 1
        staging = f"{STAGING}/{self._tag}/{job_id}~{index}.{self._count}"
        inner = ImageWriter(self._spool_root, job_id, index, max_pixels=max_pixels,
                            transform=transform)
        return _SpoolWriter(inner, self._spool_root, staging)

    def local_path(self, staged: StagedImage) -> Path:
        if staged.spool is None:
            raise StorageError(f"{staged.tmp_rel} is no longer spooled on this machine")
        return staged.spool

    async def prepare(self, staged: Sequence[StagedImage]) -> tuple[StagedImage, ...]:
        """Upload every image of one answer to its staging key, each retried from the spool.

        If one still fails, none of them is deleted: the spool files move to
        :attr:`keep_dir` (they are paid for) and the StorageError names it.
        """
        if self._gate is None:
            self._gate = asyncio.Semaphore(self._slots)
        results = await asyncio.gather(*(self._upload(image) for image in staged),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if not errors:
            for image in staged:
                staged_done(image)
            return tuple(r for r in results if isinstance(r, StagedImage))
        for result in results:
            if isinstance(result, StagedImage):
                self._delete(result.tmp_rel)  # the answer is kept whole, locally
        kept = [path for image in staged if (path := self._keep(image)) is not None]
        first = errors[0]
        if not isinstance(first, StorageError):
            raise first
        where = f"; its paid image(s) are kept in {kept[0].parent}" if kept else ""
        raise StorageError(f"{first}{where}") from None

    async def _upload(self, staged: StagedImage) -> StagedImage:
        import obstore

        if staged.spool is None:
            return staged
        assert self._gate is not None
        async with self._gate:
            for delay_s in (*self.retry_delays_s, None):
                try:
                    # Over a part: fed in pieces, so only the part being sent is held; a
                    # whole file handed to obstore is read into memory at once
                    # (bench/s3_stream.py).
                    body: Any = (staged.spool if staged.bytes <= PART_BYTES
                                 else _pieces(staged.spool))
                    await obstore.put_async(
                        self._store, self.location.key(staged.tmp_rel), body,
                        chunk_size=PART_BYTES, max_concurrency=PARTS_IN_FLIGHT,
                        attributes={"Content-Type": staged.info.mime},
                    )
                    break
                except Exception as exc:
                    message = (f"uploading {staged.final_rel} to {self.location.url} failed: "
                               f"{describe(exc)}")
                if delay_s is None:
                    raise StorageError(message)
                # Past obstore's own retries (a brownout, a reset): the spool still has
                # it, so trying again costs nothing at the paid API.
                log.warning("%s; trying again in %gs", message, delay_s)
                await asyncio.sleep(delay_s)
        return dataclasses.replace(staged, spool=None)

    def _keep(self, staged: StagedImage) -> Path | None:
        """Move a spooled image that could not be uploaded out of the spool (which a close
        deletes) into :attr:`keep_dir`."""
        staged.file.close()
        if staged.spool is None or not staged.spool.exists():
            return None
        target = self.keep_dir / self._tag / staged.final_rel
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(staged.spool, target)
        except OSError as exc:
            log.error("could not keep %s (%s); it stays at %s until the run ends",
                      staged.final_rel, exc, staged.spool)
            return None
        log.error("%s could not be uploaded; the paid image is kept in %s", staged.final_rel,
                  target)
        return target

    def discard(self, staged: StagedImage) -> None:
        """Drop a spooled image (a broken answer); one already uploaded is paid for and
        was not recorded (the lease was lost): kept in :attr:`keep_dir` first."""
        staged.file.close()
        if staged.spool is not None:
            remove_quietly(staged.spool)
            return
        import obstore

        target = self.keep_dir / self._tag / staged.final_rel
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as out:
                for chunk in obstore.get(self._store, self.location.key(staged.tmp_rel)).stream():
                    out.write(chunk)
        except Exception as exc:  # left under its staging key, for whoever comes next
            log.error("could not keep %s, paid but not recorded, from %s: %s",
                      staged.final_rel, staged.tmp_rel, describe(exc))
            return
        log.error("%s was paid for but not recorded; kept in %s", staged.final_rel, target)
        self._delete(staged.tmp_rel)

    def release(self, staged: StagedImage) -> None:
        staged.file.close()

    def remove(self, rel: str) -> None:
        self._delete(rel)

    def publish(self, staged: StagedImage) -> None:
        """Copy the staging key to the final key (create-only where it can), drop staging."""
        self.copy_to_final(staged.tmp_rel, staged.final_rel)
        self._delete(staged.tmp_rel)

    def copy_to_final(self, staging_rel: str, final_rel: str) -> None:
        import obstore
        from obstore.exceptions import AlreadyExistsError

        source, target = self.location.key(staging_rel), self.location.key(final_rel)
        try:
            try:
                obstore.copy(self._store, source, target, overwrite=False)
            except AlreadyExistsError:
                # The key holds this job's image of an earlier fingerprint (--force, an
                # edited prompt): the record just written says the new one replaces it.
                obstore.copy(self._store, source, target, overwrite=True)
        except Exception as exc:
            raise StorageError(f"publishing {final_rel} failed: {describe(exc)}") from None

    def _delete(self, rel: str) -> None:
        import obstore

        try:
            obstore.delete(self._store, self.location.key(rel))
        except Exception as exc:  # a stray the next open removes
            log.warning("could not delete %s: %s", self.location.key(rel), describe(exc))
