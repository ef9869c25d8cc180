"""The provider interface and its first implementation: OpenAI-compatible chat completions.

:class:`Provider` is all the engine knows of a provider. The chat-completions
client sends the body laid out by :mod:`batch.protocol` (local input images
streamed from disk into it), streams the answer through :mod:`batch.decoder`
straight into temporary image files, and maps
every aiohttp and OS exception onto :mod:`batch.errors` here and nowhere
else. Nothing it raises or logs carries the API key: messages are built
from the status, the body and the exception's class, never request headers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import logging
import os
import secrets
import ssl
import stat
import time
import urllib.request
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import unquote, urlsplit

import aiohttp

from batch import __version__
from batch.decoder import BodyDecoder, ImageBegin, ImageBytes, ImageEnd, Inflater, placeholder
from batch.errors import (
    JobError,
    MalformedResponse,
    RejectedError,
    RequestTimeout,
    TransportError,
)
from batch.imageinfo import DEFAULT_MAX_PIXELS
from batch.images import ImageWriter, StagedImage, StreamTransform, discard
from batch.jobs import InputImage, Job
from batch.protocol import (
    BodyParts,
    body_parts,
    data_url_head,
    error_for_status,
    interpret,
)

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.qnaigc.com/v1"
CHUNK_BYTES = 64 * 1024
# Local input images are read in pieces of this size, a multiple of 3, so the base64
# of each piece needs no padding (a short read is carried over to the next piece).
INPUT_CHUNK_BYTES = 3 * 256 * 1024
ERROR_BODY_BYTES = 64 * 1024


class Secret(str):
    """A string that does not show itself in reprs, logs or tracebacks."""

    def __repr__(self) -> str:
        return "Secret('***')"


@dataclass(frozen=True)
class ClientConfig:
    base_url: str = DEFAULT_BASE_URL
    api_key: Secret = field(default=Secret(""), repr=False)
    timeout_s: float = 300.0
    connect_timeout_s: float = 30.0
    max_connections: int = 8
    max_response_bytes: int = 200 * 1024 * 1024
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    ca_bundle: Path | None = None
    user_agent: str = f"imgbatch/{__version__}"
    # Per image: rewrites it as it streams (provenance); None stores the server's bytes.
    stamp: Callable[[Job], StreamTransform] | None = None


@dataclass(frozen=True)
class Generation:
    """A successful answer: its images staged on disk, and what the server said."""

    images: tuple[StagedImage, ...]
    usage: dict[str, Any] | None
    text: str
    latency_s: float


class Provider(Protocol):
    """What the engine needs from any image provider."""

    async def generate(self, job: Job, root: Path) -> Generation:
        """Send one request for ``job``; stage its images under ``root``, or raise a JobError."""
        ...

    async def close(self) -> None: ...


def tls_context(ca_bundle: Path) -> ssl.SSLContext:
    """The system's trusted roots plus the certificates in ``ca_bundle`` (added, not instead)."""
    context = ssl.create_default_context()  # loads the default verify paths
    context.load_verify_locations(cafile=str(ca_bundle))
    return context


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


class _InputProblem(Exception):
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
        except _InputProblem as exc:
            problems.append(str(exc))
            raise


def _open_regular(image: InputImage) -> BinaryIO:
    # O_NONBLOCK: a FIFO put in the file's place must not block the open forever.
    fd = os.open(image.ref, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _InputProblem(f"input image {image.source} is no longer a regular file")
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
                    raise _InputProblem(changed)
                data = carry + chunk if carry else chunk
                cut = len(data) - len(data) % 3
                carry = data[cut:]
                yield base64.b64encode(data[:cut])
    except OSError as exc:
        raise _InputProblem(f"cannot read input image {image.source}: {exc.strerror}") from None
    if size != image.size_bytes or digest.hexdigest() != image.digest:
        raise _InputProblem(changed)
    yield base64.b64encode(carry)


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ChatCompletionsClient:
    """``POST {base_url}/chat/completions`` with images streamed out of the answer."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        if urlsplit(self.url).scheme == "http" and not is_loopback(self.url):
            log.warning("sending the API key over plain http to %s", urlsplit(self.url).hostname)
        self._session: aiohttp.ClientSession | None = None
        # Looked up once: aiohttp's trust_env would look up the proxy and ~/.netrc
        # again for every request, in a worker thread (two thread handoffs each).
        proxy = env_proxy(self.url, urllib.request.getproxies(), urllib.request.proxy_bypass)
        self._proxy_url: str | None = proxy[0] if proxy else None
        auth = proxy[1] if proxy else {}
        # aiohttp sends proxy_headers only with the CONNECT of an https tunnel; a plain
        # http request goes to the proxy itself, so its credentials ride along with it.
        tunnel = urlsplit(self.url).scheme == "https"
        self._proxy_headers = auth if tunnel and auth else None
        self._proxy_auth = {} if tunnel else auth

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            ssl_context: ssl.SSLContext | bool = True
            if self.config.ca_bundle is not None:
                ssl_context = tls_context(self.config.ca_bundle)
            connector = aiohttp.TCPConnector(limit=self.config.max_connections, ssl=ssl_context)
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,  # we inflate ourselves, with a cap
                trust_env=False,  # the proxy is passed on each request instead
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self.config.connect_timeout_s
                ),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self.config.api_key}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Accept-Encoding": "gzip, deflate",
            "User-Agent": self.config.user_agent,
            **self._proxy_auth,
        }

    async def generate(self, job: Job, root: Path) -> Generation:
        """Send one request for ``job``; stage its images under ``root``, or raise a JobError."""
        problems: list[str] = []  # what stopped a local input image from being sent
        body = self._body(job, problems)
        started = time.monotonic()
        writers: dict[int, ImageWriter] = {}
        staged: dict[int, StagedImage] = {}
        try:
            try:
                async with asyncio.timeout(self.config.timeout_s):
                    document, streamed = await self._exchange(job, root, body, writers, staged)
            except TimeoutError:
                raise RequestTimeout(
                    f"no complete answer within {self.config.timeout_s:g}s", job_id=job.id
                ) from None
            except (aiohttp.ClientError, _InputProblem) as exc:
                if problems:
                    # The body was cut short, so nothing was generated: not worth a retry.
                    raise RejectedError(problems[0], job_id=job.id) from None
                raise TransportError(_describe(exc), job_id=job.id) from None
            answer = interpret(document, streamed, job_id=job.id)
        except BaseException as exc:
            if isinstance(exc, JobError) and not exc.job_id:
                exc.job_id = job.id
            self._abort(root, writers, staged)
            raise
        finally:
            if not isinstance(body[0], bytes):
                # The answer can come before the whole body went (an error, a redirect).
                await body[0].aclose()
        keep = [staged.pop(i) for i in answer.image_indexes if i in staged]
        self._abort(root, {}, staged)  # data URLs outside message.images
        return Generation(
            tuple(keep),
            dict(answer.usage) if answer.usage else None,
            answer.text,
            time.monotonic() - started,
        )

    @staticmethod
    def _body(
        job: Job, problems: list[str]
    ) -> tuple[bytes | AsyncGenerator[bytes, None], int]:
        """The request body and its length; local input images are streamed, not held."""
        parts = body_parts(job, secrets.token_hex(16))
        if not parts.files:
            return parts.pieces[0], len(parts.pieces[0])
        return stream_body(parts, problems), parts.length()

    async def _exchange(
        self,
        job: Job,
        root: Path,
        body: tuple[bytes | AsyncGenerator[bytes, None], int],
        writers: dict[int, ImageWriter],
        staged: dict[int, StagedImage],
    ) -> tuple[Any, dict[str, int]]:
        session = self._open()
        data, length = body
        # A stated length, so a streamed body is not sent chunked (and is known to be cut
        # short if it fails half way).
        # The job id lets a log (and the simulator's pictures) name the job.
        headers = {**self._headers(), "Content-Length": str(length), "X-Imgbatch-Job": job.id}
        async with session.post(
            self.url,
            data=data,
            headers=headers,
            proxy=self._proxy_url,
            proxy_headers=self._proxy_headers,
            # A redirect is reported, not followed: a streamed body cannot be sent twice,
            # and a gateway that moved should be configured where it is.
            allow_redirects=False,
        ) as response:
            if response.status != 200:
                raw = await response.content.read(ERROR_BODY_BYTES)
                raise error_for_status(
                    response.status, response.headers, raw, job_id=job.id, now_s=time.time()
                )
            inflater = Inflater(
                response.headers.get("Content-Encoding"),
                max_output_bytes=self.config.max_response_bytes,
            )
            decoder = BodyDecoder()
            streamed: dict[str, int] = {}
            current: list[int] = []

            def handle(pieces: Any) -> None:
                for piece in pieces:
                    for event in decoder.feed(piece):
                        if type(event) is ImageBytes:
                            writers[current[-1]].write(event.data)
                        elif type(event) is ImageBegin:
                            current.append(event.index)
                            writers[event.index] = ImageWriter(
                                root, job.id, event.index,
                                max_pixels=self.config.max_image_pixels,
                                transform=self.config.stamp(job) if self.config.stamp else None,
                            )
                            streamed[placeholder(event.index)] = event.index
                        elif type(event) is ImageEnd:
                            staged[event.index] = writers[event.index].finish()
                            del writers[event.index]

            async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                handle(inflater.feed(chunk))
            handle(inflater.finish())
            document = decoder.finish()
            if writers:
                raise MalformedResponse("answer ended inside an image", job_id=job.id)
            return document, streamed

    @staticmethod
    def _abort(
        root: Path, writers: dict[int, ImageWriter], staged: dict[int, StagedImage] | None = None
    ) -> None:
        for writer in writers.values():
            writer.abort()
        writers.clear()
        for image in (staged or {}).values():
            discard(root, image)


def _describe(exc: BaseException) -> str:
    """A message for a transport failure that cannot leak headers."""
    name = type(exc).__name__
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{name}: HTTP {exc.status} {exc.message}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"{name}: cannot connect to {exc.host}:{exc.port} ({exc.strerror or exc.os_error})"
    text = str(exc)
    return f"{name}: {text}" if text else name

