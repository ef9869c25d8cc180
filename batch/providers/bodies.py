"""Request bodies that stream local input images from disk, laid out without I/O.

A body is text pieces around the local files it carries: the transport writes
``pieces[0]``, ``heads[0]``, the bytes of ``files[0]`` (base64 for JSON bodies,
raw for multipart), ``pieces[1]`` and so on, so a job with 14 inputs of 7 MB is
never held in memory. The length is known before the first byte is sent.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from batch.jobs import InputImage, InputKind, Job


def base64_length(size: int) -> int:
    return 4 * ((size + 2) // 3)


@dataclass(frozen=True, slots=True)
class BodyParts:
    """Text pieces around local files; see the module docstring."""

    pieces: tuple[bytes, ...]  # one more than files
    files: tuple[InputImage, ...]
    heads: tuple[bytes, ...]  # written before each file (a data URL's "data:...;base64,")
    encoded: bool = True  # files go as base64 (JSON) or as they are (multipart)

    def length(self) -> int:
        sizes = (image.size_bytes or 0 for image in self.files)
        files = sum(base64_length(s) if self.encoded else s for s in sizes)
        return sum(map(len, self.pieces)) + sum(map(len, self.heads)) + files


def local_files(job: Job) -> tuple[InputImage, ...]:
    return tuple(image for image in job.images if image.kind is InputKind.FILE)


def cut_json(
    build: Callable[[Callable[[InputImage], str]], dict[str, Any]],
    files: tuple[InputImage, ...],
    heads: tuple[bytes, ...],
    token: str,
) -> BodyParts:
    """The JSON ``build`` makes, cut where each local file's text goes.

    ``build`` is given a function that names each local file by a marker (in order);
    ``token`` is a random string no prompt holds.
    """
    marks = iter(range(len(files)))
    rest = json.dumps(build(lambda image: f"{token}-{next(marks)}"),
                      ensure_ascii=False).encode("utf-8")
    pieces = []
    for i in range(len(files)):
        # Quotes included: inside a JSON string a quote is always escaped.
        before, found, rest = rest.partition(f'"{token}-{i}"'.encode("ascii"))
        if not found:
            raise ValueError(f"marker {i} is missing from the body")
        pieces.append(before + b'"')
        rest = b'"' + rest
    pieces.append(rest)
    return BodyParts(tuple(pieces), files, heads)


def multipart(
    fields: list[tuple[str, str]], files: list[tuple[str, InputImage]], boundary: str
) -> BodyParts:
    """A multipart/form-data body: text ``fields``, then ``files`` as (field name, image)."""
    dash = f"--{boundary}\r\n".encode("ascii")
    text = b"".join(
        dash
        + f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        + value.encode("utf-8")
        + b"\r\n"
        for name, value in fields
    )
    pieces, heads = [text], []
    for n, (name, image) in enumerate(files):
        heads.append(
            dash
            + (f'Content-Disposition: form-data; name="{name}"; filename="image-{n}.'
               f'{(image.mime or "image/png").rsplit("/", 1)[-1]}"\r\n').encode()
            + f"Content-Type: {image.mime or 'application/octet-stream'}\r\n\r\n".encode()
        )
        pieces.append(b"\r\n")
    pieces[-1] += f"--{boundary}--\r\n".encode("ascii")
    # heads go before each file: the first piece is the text fields, the others close a file.
    return BodyParts(tuple(pieces), tuple(image for _, image in files), tuple(heads),
                     encoded=False)
