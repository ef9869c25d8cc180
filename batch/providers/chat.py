"""OpenAI-compatible chat completions (Qiniu AIToken, OpenRouter, ...).

The client sends the body laid out by :mod:`batch.providers.chat_wire` (local input
images streamed from disk into it), streams the answer through :mod:`batch.decoder`
straight into temporary image files, and maps
every aiohttp and OS exception onto :mod:`batch.errors` here and nowhere
else. Nothing it raises or logs carries the API key: messages are built
from the status, the body and the exception's class, never request headers.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
import time
import urllib.request
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from batch.decoder import BodyDecoder, ImageBegin, ImageBytes, ImageEnd, Inflater, placeholder
from batch.errors import (
    JobError,
    MalformedResponse,
    RejectedError,
    RequestTimeout,
    TransportError,
)
from batch.images import ImageWriter, StagedImage, discard
from batch.jobs import Job
from batch.providers.base import ClientConfig, Generation
from batch.providers.chat_wire import body_parts, error_for_status, interpret
from batch.providers.transport import (
    CHUNK_BYTES,
    ERROR_BODY_BYTES,
    InputProblem,
    describe,
    env_proxy,
    is_loopback,
    stream_body,
)

log = logging.getLogger(__name__)


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
                ssl_context = ssl.create_default_context(cafile=str(self.config.ca_bundle))
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
            except (aiohttp.ClientError, InputProblem) as exc:
                if problems:
                    # The body was cut short, so nothing was generated: not worth a retry.
                    raise RejectedError(problems[0], job_id=job.id) from None
                raise TransportError(describe(exc), job_id=job.id) from None
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
        headers = {**self._headers(), "Content-Length": str(length)}
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
