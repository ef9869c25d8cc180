"""Result files of the batch APIs, decoded as they stream: one ResultLine per JSONL line.

A result file can be gigabytes, one 4K image per line. The bytes are cut at
newlines as they arrive (a raw newline never occurs inside JSON text) and each
line goes through the same :class:`~batch.decoder.BodyDecoder` as a sync answer:
its images stream into writers the caller's :class:`ImageStage` opens while
the small JSON around them is kept as a skeleton. At the line's end the
provider's ``read`` turns the skeleton into a :class:`ResultLine` (key, which
staged images count, or the error). Neither a line nor an image is ever held
whole. Shared by batch_gemini.py and batch_openai.py.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from batch.decoder import BodyDecoder, ImageBegin, ImageBytes, ImageEnd, placeholder
from batch.errors import JobError, MalformedResponse, StorageError
from batch.images import StagedImage
from batch.providers.batchapi import (
    ImageOut,
    ImageStage,
    LineError,
    LineErrorKind,
    ResultLine,
)

log = logging.getLogger(__name__)

# (skeleton document, placeholder -> image index, staged images by index) -> the line;
# it may raise a JobError when the line is not a result at all.
ReadLine = Callable[[Any, Mapping[str, int], Mapping[int, StagedImage]], ResultLine]


class _Line:
    """The line being decoded: its decoder, open writers and staged images."""

    def __init__(self, raw_keys: frozenset[str], stage: ImageStage, first_image: int) -> None:
        self.decoder = BodyDecoder(raw_keys=raw_keys)
        self.stage = stage
        self.next_image = first_image
        self.writers: dict[int, ImageOut] = {}
        self.current: int | None = None
        self.streamed: dict[str, int] = {}
        self.staged: dict[int, StagedImage] = {}
        self.broken: str = ""  # why an image of this line failed verification
        self.empty = True

    def feed(self, data: bytes) -> None:
        if self.empty and data.strip():
            self.empty = False
        for event in self.decoder.feed(data):
            if type(event) is ImageBytes:
                writer = self.writers.get(self.current) if self.current is not None else None
                if writer is not None:
                    self._write(writer, event.data)
            elif type(event) is ImageBegin:
                self.current = event.index
                self.streamed[placeholder(event.index)] = event.index
                self.writers[event.index] = self.stage.open(self.next_image)
                self.next_image += 1
            elif type(event) is ImageEnd:
                writer = self.writers.pop(event.index, None)
                if writer is not None:
                    try:
                        self.staged[event.index] = writer.finish()
                    except MalformedResponse as exc:
                        self.broken = exc.message
                self.current = None

    def _write(self, writer: ImageOut, data: bytes) -> None:
        try:
            writer.write(data)
        except MalformedResponse as exc:  # not an image: drop it, read on for the key
            writer.abort()
            self.writers = {i: w for i, w in self.writers.items() if w is not writer}
            self.broken = exc.message

    def abort(self, keep: tuple[StagedImage, ...] = ()) -> None:
        for writer in self.writers.values():
            writer.abort()
        self.writers.clear()
        for image in self.staged.values():
            if image not in keep:
                self.stage.discard(image)
        self.staged.clear()


async def decode_lines(
    chunks: AsyncIterator[bytes], *, raw_keys: frozenset[str], stage: ImageStage,
    read: ReadLine,
) -> AsyncIterator[ResultLine]:
    """Each line of the JSONL byte stream ``chunks`` as a ResultLine, in order.

    A line that is not JSON, or whose ``read`` raises, is skipped with a log
    line: its key (if any) then counts as missing, so its job goes back to
    pending. A line whose image fails verification yields a retryable error.
    """
    images = 0
    line: _Line | None = None
    skipping = False  # the rest of a line the decoder gave up on
    number = 0
    try:
        async for chunk in chunks:
            view = memoryview(chunk)
            start = 0
            while start < len(view):
                end = chunk.find(b"\n", start)
                piece = view[start:len(view) if end < 0 else end]
                if not skipping:
                    if line is None:
                        line = _Line(raw_keys, stage, images)
                    try:
                        line.feed(bytes(piece))
                    except (MalformedResponse, StorageError) as exc:
                        if isinstance(exc, StorageError):
                            raise
                        log.warning("result line %d is not JSON (%s): skipped", number + 1, exc)
                        images = line.next_image
                        line.abort()
                        line, skipping = None, True
                if end < 0:
                    break
                start = end + 1
                number += 1
                if skipping:
                    skipping = False
                    continue
                if line is None:
                    continue
                finished, line = line, None
                images = finished.next_image
                result = _finish(finished, read, number)
                if result is not None:
                    yield result
        if line is not None and not skipping:
            finished, line = line, None
            result = _finish(finished, read, number + 1)
            if result is not None:
                yield result
    finally:
        if line is not None:
            line.abort()


def _finish(line: _Line, read: ReadLine, number: int) -> ResultLine | None:
    if line.empty:
        line.abort()
        return None
    try:
        document = line.decoder.finish()
        if line.writers:
            raise MalformedResponse("the line ended inside an image")
        result = read(document, line.streamed, line.staged)
    except JobError as exc:
        log.warning("result line %d unusable (%s): skipped", number, exc)
        line.abort()
        return None
    except BaseException:
        line.abort()
        raise
    if line.broken and result.error is None:
        line.abort()
        return ResultLine(result.key, error=LineError(
            LineErrorKind.RETRYABLE, "malformed_image", line.broken))
    line.abort(keep=result.images)
    return result
