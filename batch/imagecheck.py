"""Full verification of a staged image: its compressed data is decoded, not only its structure.

:mod:`batch.imageinfo` walks an image's structure as it streams in; it cannot see a JPEG
scan whose entropy-coded data is garbage, or a WebP whose VP8 partition is cut short.
This module decodes the staged file before the image is recorded:

- PNG: the IDAT stream is inflated piece by piece (zlib's Adler-32 checks it) and its
  length and row filter bytes are checked against the header; no pixels are kept.
  zlib is memory-safe and the pieces are bounded, so this runs in the run's own
  process: on the event loop for a small image (a hand-off to a child costs more than
  the check), in a thread for a larger one.
- JPEG: libjpeg-turbo (simplejpeg) at 1/8 scale with warnings as errors. Pillow would
  hide libjpeg's "corrupt data" warnings and fill the gap with grey; the 1/8 scale still
  reads every entropy-coded bit but keeps ~1/64 of the pixels.
- WebP, GIF: Pillow decodes the first frame. libwebp's decoder holds two RGBA canvases
  and Pillow a third: a 4K WebP peaks near 300 MB, which is why these are decoded in a
  child process that gives it back, and not in the run's own; a native decoder that
  crashes on hostile data then takes down the child, not the run. The child starts
  with the first image that needs it: a run whose images are all PNG starts none.

What no decoder can see is not caught: JPEG and lossy WebP carry no checksum, so a
change that still parses (a flipped coefficient) decodes to other pixels.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import struct
import sys
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Generic, Protocol, TypeVar

from batch.imageinfo import ImageFormatError, ImageInfo
from batch.images import StagedImage
from batch.jobs import Job
from batch.storage.base import ImageSink

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

log = logging.getLogger(__name__)

# PNG data is read, and checked once inflated, in pieces of these sizes: memory stays flat.
_READ_PIECE = _INFLATE_PIECE = 1 << 20
# A PNG of at most this many pixels (512 KiB of rows at 16-bit RGBA, well under a
# millisecond to check) and bytes is checked on the event loop: a hand-off costs as much.
INLINE_PNG_PIXELS = 256 * 256
INLINE_PNG_BYTES = 1 << 20
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))


class Verify(StrEnum):
    """How far an answer's image is checked before it counts as done."""

    STRUCTURE = "structure"  # container walk and PNG chunk CRCs, while streaming
    DECODE = "decode"  # and the compressed data decoded, before it is recorded


def decode_check(path: Path, mime: str) -> None:
    """Decode the image at ``path``; ImageFormatError if its data does not decode cleanly."""
    try:
        with path.open("rb") as handle:
            if mime == "image/png":
                _png(handle)
            elif mime == "image/jpeg":
                _jpeg(handle.read())
            else:
                _pillow(handle)
    except ImageFormatError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, struct.error,
            zlib.error) as exc:
        # Pillow and simplejpeg raise these for data they cannot decode.
        raise ImageFormatError(f"{mime} does not decode: {exc}") from None


def decode_problem(path: Path, mime: str) -> str | None:
    """What is wrong with the image at ``path``, or None (a plain value, for a child process)."""
    try:
        decode_check(path, mime)
    except ImageFormatError as exc:
        return exc.message
    except Exception as exc:  # a decoder's own bug on hostile bytes
        # One bad answer must not end the run: the image is refused like a corrupt one.
        return f"{mime} decoder failed: {type(exc).__name__}: {exc}"
    return None


# The decoders are imported where they are used, in the child, on its first image of
# their kind: the run's own process never loads them.
def _pillow(handle: BinaryIO) -> None:
    from PIL import Image

    with Image.open(handle, formats=("WEBP", "GIF")) as image:
        image.load()


def _jpeg(data: bytes) -> None:
    import simplejpeg  # type: ignore[import-untyped]

    _, _, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    out = colorspace if colorspace in ("Gray", "CMYK") else "RGB"
    simplejpeg.decode_jpeg(data, colorspace=out, min_height=1, min_width=1, strict=True)


def _png_rows(width: int, height: int, bits: int, interlaced: bool) -> Iterator[int]:
    """The byte length of each scanline after its filter byte, in stream order."""
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    for x0, y0, dx, dy in passes:
        w = (width - x0 + dx - 1) // dx
        h = (height - y0 + dy - 1) // dy
        if w > 0:
            yield from ((w * bits + 7) // 8 for _ in range(h))


def _png_chunks(handle: BinaryIO) -> Iterator[tuple[bytes, bytes]]:
    """(type, data) of each chunk; IDAT data in pieces, other chunks are skipped."""
    handle.read(8)
    while head := handle.read(8):
        length, ctype = struct.unpack(">I4s", head)
        if ctype in (b"IHDR", b"IDAT"):
            left = length
            while left:
                piece = handle.read(min(left, _READ_PIECE))
                if not piece:
                    raise ImageFormatError("PNG ends inside a chunk")
                left -= len(piece)
                yield ctype, piece
        else:
            handle.seek(length, 1)
        handle.seek(4, 1)  # CRC: checked while streaming
        if ctype == b"IEND":
            return


def _png(handle: BinaryIO, *, strided: bool = True) -> None:
    rows: Iterator[int] | None = None
    stride = total = seen = 0  # a plain image: row length with its filter byte, data length
    inflater = zlib.decompressobj()
    need = 0  # bytes of the current row still to come; 0: a filter byte is next
    for ctype, data in _png_chunks(handle):
        if ctype == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", data)
            bits = depth * _PNG_CHANNELS[color]
            rows = _png_rows(width, height, bits, interlace == 1)
            if strided and interlace != 1:
                # Rows all the same length: a piece's filter bytes are one slice of it, and
                # the check costs no Python per row (``strided=False``: the row walk, as for
                # Adam7, which the tests compare it with).
                stride = 1 + (width * bits + 7) // 8
                total = stride * height if width else 0
            continue
        assert rows is not None  # the streaming walk put IHDR first
        # Bytes after the end of the stream are let be, as decoders do; never fed again:
        # zlib would keep them as the unconsumed tail of a call that gives nothing back.
        while not inflater.eof:
            out = inflater.decompress(data, _INFLATE_PIECE)
            data = inflater.unconsumed_tail
            if stride:
                seen = _sliced(out, seen, stride, total)
            else:
                need = _walked(out, need, rows)
            if not data and len(out) < _INFLATE_PIECE:
                break  # all input taken, and no output held back by the piece's limit
    done = seen == total if stride else not need and rows is not None and next(rows, None) is None
    if not inflater.eof or not done:
        raise ImageFormatError("PNG image data ends before its last scanline")


def _sliced(out: bytes, seen: int, stride: int, total: int) -> int:
    """Check a piece of a plain image's data, ``seen`` bytes in; the bytes seen after it."""
    if seen + len(out) > total:
        raise ImageFormatError("PNG image data is longer than its header says")
    filters = out[-seen % stride::stride]
    if max(filters, default=0) > 4:
        bad = next(f for f in filters if f > 4)
        raise ImageFormatError(f"PNG scanline has filter type {bad}")
    return seen + len(out)


def _walked(out: bytes, need: int, rows: Iterator[int]) -> int:
    """Check a piece row by row, ``need`` bytes of a row still to come; what is left after."""
    pos = 0
    while pos < len(out):
        if need:
            take = min(need, len(out) - pos)
            need -= take
            pos += take
            continue
        row = next(rows, None)
        if row is None:
            raise ImageFormatError("PNG image data is longer than its header says")
        if out[pos] > 4:
            raise ImageFormatError(f"PNG scanline has filter type {out[pos]}")
        need = row
        pos += 1
    return need


_PR_SET_PDEATHSIG = 1


def decode_pool(workers: int = 1) -> ProcessPoolExecutor:
    """Decode children for ``--verify decode``: spawned (the run has threads, and a forked
    child would inherit their locks), and each ends with the run, even a SIGKILLed one."""
    # Imported here: a run whose images are all PNG never starts a child (module doc).
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=_die_with, initargs=(os.getpid(),),
    )


def _die_with(parent: int) -> None:
    """Make this decode child end when the run does, even one killed with SIGKILL.

    A pool child holds both ends of its task pipe, so it would never see the run go.
    Ctrl-C reaches the whole process group: the run decides what a SIGINT stops, so
    the child ignores it rather than drop the image it is checking.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the run ended before the line above
        os._exit(0)


class _Answer(Protocol):
    @property
    def images(self) -> tuple[StagedImage, ...]: ...


A = TypeVar("A", bound=_Answer, covariant=True)


class _Provider(Protocol[A]):
    async def generate(self, job: Job, sink: ImageSink) -> A: ...

    async def close(self) -> None: ...


class DecodeChecked(Generic[A]):
    """A provider whose answers' images are decoded before they count as received.

    JPEG, WebP and GIF are decoded in ``workers`` child processes (spawned on first
    use), so a decode's memory is paid ``workers`` times whatever the concurrency, is
    given back between images, and a decoder that crashes on hostile data takes down a
    child, not the run; PNG in the run's own process (:meth:`DecodeChildren.check`).
    An image that does not decode fails the request as a malformed answer (retried), and
    every image of that answer is discarded.
    """

    def __init__(self, inner: _Provider[A], *, workers: int = 1) -> None:
        self._inner = inner
        self.children = DecodeChildren(workers)

    async def generate(self, job: Job, sink: ImageSink) -> A:
        answer = await self._inner.generate(job, sink)
        try:
            for staged in answer.images:
                problem = await self.children.check(sink.local_path(staged), staged.info,
                                                    staged.bytes)
                if problem is not None:
                    raise ImageFormatError(problem, job_id=job.id)
        except asyncio.CancelledError:
            # The run is being aborted (a second signal, the end of --grace) while a paid,
            # fully received answer waits for its decode. Dropping it would pay for it again
            # next run; it already passed the streaming structure check, so it is handed on
            # with the decode skipped, and the cancellation re-armed for the caller's next
            # await (the engine queues the commit in the same step as the answer).
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
                task.cancel()
            log.warning("%s: run aborted during the decode check; its image is kept with the "
                        "structure check only", job.id)
            return answer
        except BaseException:
            for staged in answer.images:
                sink.discard(staged)
            raise
        return answer

    async def close(self) -> None:
        self.children.close()
        await self._inner.close()


class DecodeChildren:
    """The decoders of one run (sync or batch mode): ``check`` says whether an image decodes.

    PNG is checked in this process (module doc): on the loop when small, else in a thread of
    its own, so that a wave of big PNGs does not hold up the commits in the loop's default
    pool. ``problem`` asks a child: one that dies (a decoder crash, the OOM killer) fails
    every image it held; each is tried once more in a fresh child before it is refused, so
    an image queued behind the culprit is not paid for again."""

    def __init__(self, workers: int = 1) -> None:
        self._workers = workers
        self.pool: ProcessPoolExecutor | None = None
        self._thread: ThreadPoolExecutor | None = None

    async def check(self, path: Path, info: ImageInfo, size_bytes: int) -> str | None:
        """What is wrong with the image at ``path`` once decoded, or None."""
        if info.mime != "image/png":
            return await self.problem(path, info.mime)
        if info.width * info.height <= INLINE_PNG_PIXELS and size_bytes <= INLINE_PNG_BYTES:
            return decode_problem(path, info.mime)
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="imgbatch-png")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, decode_problem, path, info.mime)

    async def problem(self, path: Path, mime: str) -> str | None:
        """What is wrong with the image at ``path`` (decoded in a child), or None."""
        from concurrent.futures.process import BrokenProcessPool

        loop = asyncio.get_running_loop()
        for _ in range(2):
            pool = self._executor()
            try:
                return await loop.run_in_executor(pool, decode_problem, path, mime)
            except BrokenProcessPool:
                if self.pool is pool:
                    self.pool = None
                pool.shutdown(wait=False, cancel_futures=True)
        return f"{mime} decoder crashed on it twice"

    def _executor(self) -> ProcessPoolExecutor:
        if self.pool is None:
            self.pool = decode_pool(self._workers)
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        if self._thread is not None:
            self._thread.shutdown(wait=False, cancel_futures=True)
