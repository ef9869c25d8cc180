"""What every provider shares on the wire, written once.

:class:`Transport` owns the one aiohttp session of an endpoint (TLS, proxy,
User-Agent, no redirects, the response cap) and the exchange every protocol
makes: send a body (local input images streamed from disk into it by
:mod:`batch.providers.bodystream`), wait for the answer to start, stream its
body through :mod:`batch.inflate` and :mod:`batch.decoder` into temporary
image files, with a stall timeout while bytes flow. aiohttp and OS
exceptions become :mod:`batch.errors` here; a protocol's own error bodies are
mapped by the function each provider passes in. Nothing here raises or logs the
API key: messages come from the status, the body and the exception's class.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import ipaddress
import logging
import ssl
import time
import urllib.request
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp

from batch.decoder import BodyDecoder, ImageBegin, ImageBytes, ImageEnd, placeholder
from batch.errors import (
    JobError,
    MalformedResponse,
    RejectedError,
    RequestTimeout,
    TransportError,
)
from batch.images import StagedImage, final_name
from batch.inflate import Inflater
from batch.jobs import Job
from batch.providers.base import Answer, ClientConfig, Generation
from batch.providers.bodystream import InputProblem
from batch.storage.base import ImageSink, ImageStream

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024
ERROR_BODY_BYTES = 64 * 1024
# A body that brings fewer bytes than this in a whole stall window is stalled, even
# if it trickles a byte now and then.
MIN_PROGRESS_BYTES = 16 * 1024

# (status, headers, body, job id, now) -> the error that answer stands for
ErrorMap = Callable[[int, Mapping[str, str], bytes, str, float], JobError]
# (decoded skeleton, placeholder -> streamed image index, job id) -> what the answer means
Interpret = Callable[[Any, Mapping[str, int], str], Answer]


@dataclass
class Request:
    """One request as a protocol lays it out; ``problems`` collects why a streamed body stopped."""

    url: str
    headers: Mapping[str, str]
    body: bytes | AsyncGenerator[bytes, None]
    length: int
    raw_keys: frozenset[str] = frozenset()  # where bare base64 images sit, for the decoder
    problems: list[str] = field(default_factory=list)


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



class _Stalled(Exception):
    """The answer's body stopped flowing."""


class Transport:
    """One endpoint's session and the exchange every protocol makes through it."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        base = config.base_url
        if urlsplit(base).scheme == "http" and not is_loopback(base):
            log.warning("sending the API key over plain http to %s", urlsplit(base).hostname)
        self._session: aiohttp.ClientSession | None = None
        # Looked up once: aiohttp's trust_env would look up the proxy and ~/.netrc
        # again for every request, in a worker thread (two thread handoffs each).
        proxy = env_proxy(base, urllib.request.getproxies(), urllib.request.proxy_bypass)
        self._proxy_url: str | None = proxy[0] if proxy else None
        auth = proxy[1] if proxy else {}
        # aiohttp sends proxy_headers only with the CONNECT of an https tunnel; a plain
        # http request goes to the proxy itself, so its credentials ride along with it.
        tunnel = urlsplit(base).scheme == "https"
        self._proxy_headers = auth if tunnel and auth else None
        self.proxy_auth: dict[str, str] = {} if tunnel else auth
        # A pause longer than the wait allowed for the answer to start is never right.
        self.stall_s = min(config.stall_timeout_s, config.timeout_s)

    def open(self) -> aiohttp.ClientSession:
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

    def headers(self, own: Mapping[str, str]) -> dict[str, str]:
        """``own`` (the protocol's auth and content type) and what every request carries."""
        return {
            **own,
            "Accept": "application/json",
            "Accept-Encoding": "gzip, deflate",
            "User-Agent": self.config.user_agent,
            **self.proxy_auth,
        }

    async def generate(
        self, job: Job, sink: ImageSink, request: Request, errors: ErrorMap,
        interpret: Interpret,
    ) -> Generation:
        """Send ``request``; stage the images ``interpret`` names in ``sink``, or raise."""
        started = time.monotonic()
        writers: dict[int, ImageStream] = {}
        staged: dict[int, StagedImage] = {}
        try:
            try:
                document, streamed = await self._exchange(
                    job, sink, request, errors, writers, staged
                )
            except TimeoutError:
                raise RequestTimeout(
                    f"no answer within {self.config.timeout_s:g}s", job_id=job.id
                ) from None
            except _Stalled:
                raise RequestTimeout(
                    f"the answer stalled: under {MIN_PROGRESS_BYTES // 1024} KiB in "
                    f"{self.stall_s:g}s", job_id=job.id,
                ) from None
            except (aiohttp.ClientError, InputProblem) as exc:
                if request.problems:
                    # The body was cut short, so nothing was generated: not worth a retry.
                    raise RejectedError(request.problems[0], job_id=job.id) from None
                raise TransportError(describe(exc), job_id=job.id) from None
            answer = interpret(document, streamed, job.id)
        except BaseException as exc:
            if isinstance(exc, JobError) and not exc.job_id:
                exc.job_id = job.id
            _abort(sink, writers, staged)
            raise
        finally:
            if not isinstance(request.body, bytes):
                # The answer can come before the whole body went (an error, a redirect).
                await request.body.aclose()
        # Named by their place among the answer's images, not in the body: a draft
        # streamed before them must not push the first image to "<id>~2".
        keep = [_renamed(staged.pop(i), job.id, n)
                for n, i in enumerate(i for i in answer.image_indexes if i in staged)]
        _abort(sink, {}, staged)  # images the answer does not count (drafts, stray data URLs)
        return Generation(
            tuple(keep),
            dict(answer.usage) if answer.usage else None,
            answer.text,
            time.monotonic() - started,
        )

    async def _exchange(
        self,
        job: Job,
        sink: ImageSink,
        request: Request,
        errors: ErrorMap,
        writers: dict[int, ImageStream],
        staged: dict[int, StagedImage],
    ) -> tuple[Any, dict[str, int]]:
        session = self.open()
        # A stated length, so a streamed body is not sent chunked (and is known to be cut
        # short if it fails half way).
        # The job id lets a log (and the simulator's pictures) name the job.
        headers = {**request.headers, "Content-Length": str(request.length),
                   "X-Imgbatch-Job": job.id}
        async with contextlib.AsyncExitStack() as stack:
            # The wait for the answer to start (the body sent, the headers back) has
            # its own deadline; the body then flows for as long as it keeps moving.
            async with asyncio.timeout(self.config.timeout_s):
                response = await stack.enter_async_context(session.post(
                    request.url,
                    data=request.body,
                    headers=headers,
                    proxy=self._proxy_url,
                    proxy_headers=self._proxy_headers,
                    # A redirect is reported, not followed: a streamed body cannot be
                    # sent twice, and a gateway that moved should be configured where it is.
                    allow_redirects=False,
                ))
                if response.status != 200:
                    raw = await response.content.read(ERROR_BODY_BYTES)
                    raise errors(response.status, response.headers, raw, job.id, time.time())
            inflater = Inflater(
                response.headers.get("Content-Encoding"),
                max_output_bytes=self.config.max_response_bytes,
            )
            decoder = BodyDecoder(raw_keys=request.raw_keys)
            streamed: dict[str, int] = {}
            current: list[int] = []

            def handle(pieces: Any) -> None:
                for piece in pieces:
                    for event in decoder.feed(piece):
                        if type(event) is ImageBytes:
                            writers[current[-1]].write(event.data)
                        elif type(event) is ImageBegin:
                            current.append(event.index)
                            writers[event.index] = sink.open(
                                job.id, event.index,
                                max_pixels=self.config.max_image_pixels,
                                transform=self.config.stamp(job) if self.config.stamp else None,
                            )
                            streamed[placeholder(event.index)] = event.index
                        elif type(event) is ImageEnd:
                            staged[event.index] = writers[event.index].finish()
                            del writers[event.index]

            async for chunk in self._body(response):
                handle(inflater.feed(chunk))
            handle(inflater.finish())
            document = decoder.finish()
            if writers:
                raise MalformedResponse("answer ended inside an image", job_id=job.id)
            return document, streamed
        raise AssertionError("unreachable")  # mypy: the exit stack may swallow

    async def _body(self, response: aiohttp.ClientResponse) -> AsyncGenerator[bytes, None]:
        """The body's chunks; _Stalled when a stall window brings under MIN_PROGRESS_BYTES."""
        loop = asyncio.get_running_loop()
        window_end = loop.time() + self.stall_s
        moved = 0
        while True:
            try:
                async with asyncio.timeout_at(window_end):
                    chunk = await response.content.read(CHUNK_BYTES)
            except TimeoutError:
                if moved < MIN_PROGRESS_BYTES:
                    raise _Stalled from None
                window_end, moved = loop.time() + self.stall_s, 0
                continue
            if not chunk:
                return
            moved += len(chunk)
            yield chunk


def _renamed(image: StagedImage, job_id: str, position: int) -> StagedImage:
    ext = image.final_rel.rsplit(".", 1)[-1]
    return dataclasses.replace(image, final_rel=final_name(job_id, position, ext))


def _abort(
    sink: ImageSink, writers: dict[int, ImageStream],
    staged: dict[int, StagedImage] | None = None,
) -> None:
    for writer in writers.values():
        writer.abort()
    writers.clear()
    for image in (staged or {}).values():
        sink.discard(image)
