"""What every provider shares on the wire: proxy, input streaming, error messages.

Nothing here raises or logs the API key: messages are built from the status,
the body and the exception's class, never request headers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import os
import stat
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

import aiohttp

from batch.jobs import InputImage
from batch.providers.chat_wire import BodyParts, data_url_head

CHUNK_BYTES = 64 * 1024
# Local input images are read in pieces of this size, a multiple of 3, so the base64
# of each piece needs no padding (a short read is carried over to the next piece).
INPUT_CHUNK_BYTES = 3 * 256 * 1024
ERROR_BODY_BYTES = 64 * 1024


def env_proxy(
    url: str, proxies: Mapping[str, str], bypass: Callable[[str], bool]
) -> tuple[str, dict[str, str]] | None:
    """The proxy ``url`` goes through, and its headers, or None for a direct connection.

    ``proxies`` is ``urllib.request.getproxies()`` (HTTP(S)_PROXY) and ``bypass``
    ``urllib.request.proxy_bypass`` (NO_PROXY). Credentials in the proxy URL
    become a Proxy-Authorization header.
    """
    parts = urlsplit(url)
    proxy = proxies.get(parts.scheme)
    if not proxy or (parts.hostname is not None and bypass(parts.hostname)):
        return None
    found = urlsplit(proxy)
    if found.username is None:
        return proxy, {}
    login = f"{unquote(found.username)}:{unquote(found.password or '')}"
    try:
        raw = login.encode("latin-1")  # as aiohttp's BasicAuth does
    except UnicodeEncodeError:
        raw = login.encode("utf-8")
    bare = found._replace(netloc=found.netloc.rpartition("@")[2]).geturl()
    return bare, {"Proxy-Authorization": "Basic " + base64.b64encode(raw).decode()}


class InputProblem(Exception):
    """A local input image cannot be sent as the manifest check saw it."""


async def stream_body(parts: BodyParts, problems: list[str]) -> AsyncGenerator[bytes, None]:
    """The body of ``parts``, each local image read and base64-encoded piece by piece.

    Each image is checked against the size and sha256 the manifest check saw
    before the rest of the body follows (and never sends more than that size), so
    a file changed since leaves the server a body cut short of its Content-Length,
    which it neither answers nor bills. Why is appended to ``problems`` before
    raising, as aiohttp wraps what a body raises.
    """
    for piece, image in zip(parts.pieces, (*parts.files, None), strict=True):
        yield piece
        if image is None:
            return
        yield data_url_head(image)
        try:
            # Closed at once if the body is dropped half way, and the file with it.
            async with contextlib.aclosing(_encoded(image)) as pieces:
                async for encoded in pieces:
                    yield encoded
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


async def _encoded(image: InputImage) -> AsyncGenerator[bytes, None]:
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
                cut = len(data) - len(data) % 3
                carry = data[cut:]
                yield base64.b64encode(data[:cut])
    except OSError as exc:
        raise InputProblem(f"cannot read input image {image.source}: {exc.strerror}") from None
    if size != image.size_bytes or digest.hexdigest() != image.digest:
        raise InputProblem(changed)
    yield base64.b64encode(carry)


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False



def describe(exc: BaseException) -> str:
    """A message for a transport failure that cannot leak headers."""
    name = type(exc).__name__
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{name}: HTTP {exc.status} {exc.message}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"{name}: cannot connect to {exc.host}:{exc.port} ({exc.strerror or exc.os_error})"
    text = str(exc)
    return f"{name}: {text}" if text else name

