"""Local input images streamed from disk into a request body, checked as they go.

:func:`stream_body` writes a :class:`~batch.providers.bodies.BodyParts` body:
its text pieces, and each local image read in bounded pieces (base64 for JSON
bodies, raw for multipart), checked against the size and sha256 the manifest
check saw. A file changed or gone since is an :class:`InputProblem` that cuts
the body short of its Content-Length, so the server neither answers nor bills it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import stat
from collections.abc import AsyncGenerator
from typing import BinaryIO

from batch.jobs import InputImage
from batch.providers.bodies import BodyParts

# Local input images are read in pieces of this size, a multiple of 3, so the base64
# of each piece needs no padding (a short read is carried over to the next piece).
INPUT_CHUNK_BYTES = 3 * 256 * 1024


class InputProblem(Exception):
    """A local input image cannot be sent as the manifest check saw it."""


async def stream_body(parts: BodyParts, problems: list[str]) -> AsyncGenerator[bytes, None]:
    """The body of ``parts``, each local image read (and base64-encoded) piece by piece.

    Each image is checked against the size and sha256 the manifest check saw
    before the rest of the body follows (and never sends more than that size), so
    a file changed since leaves the server a body cut short of its Content-Length,
    which it neither answers nor bills. Why is appended to ``problems`` before
    raising, as aiohttp wraps what a body raises.
    """
    for piece, image, head in zip(
        parts.pieces, (*parts.files, None), (*parts.heads, b""), strict=True
    ):
        yield piece
        if image is None:
            return
        yield head
        try:
            # Closed at once if the body is dropped half way, and the file with it.
            async with contextlib.aclosing(_read(image, parts.encoded)) as pieces:
                async for data in pieces:
                    yield data
        except InputProblem as exc:
            problems.append(str(exc))
            raise


def _open_regular(image: InputImage) -> BinaryIO:
    # O_NONBLOCK: a FIFO put in the file's place must not block the open forever.
    fd = os.open(image.ref, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputProblem(f"input image {image.source} is no longer a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


async def _read(image: InputImage, encoded: bool) -> AsyncGenerator[bytes, None]:
    changed = f"input image {image.source} changed since the manifest was checked; not sent"
    digest = hashlib.sha256()
    size = 0
    carry = b""  # bytes short of a group of 3, encoded with the next piece
    try:
        # Opened here, not in a thread: a thread's open that outlives a cancelled
        # request leaks its file; O_NONBLOCK keeps a FIFO from blocking the loop.
        with _open_regular(image) as handle:
            while chunk := await asyncio.to_thread(handle.read, INPUT_CHUNK_BYTES):
                digest.update(chunk)
                size += len(chunk)
                if size > (image.size_bytes or 0):
                    raise InputProblem(changed)
                data = carry + chunk if carry else chunk
                if not encoded:
                    # The last byte waits for the checks below: a file changed since
                    # must leave the body short, unanswered and unbilled.
                    carry = data[-1:]
                    yield data[:-1]
                    continue
                cut = len(data) - len(data) % 3
                carry = data[cut:]
                yield base64.b64encode(data[:cut])
    except OSError as exc:
        raise InputProblem(f"cannot read input image {image.source}: {exc.strerror}") from None
    if size != image.size_bytes or digest.hexdigest() != image.digest:
        raise InputProblem(changed)
    yield base64.b64encode(carry) if encoded else carry
