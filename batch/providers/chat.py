"""OpenAI-compatible chat completions (Qiniu AIToken, OpenRouter, ...).

The body is laid out by :mod:`batch.providers.chat_wire` (local input images
streamed from disk into their data URLs) and sent through the shared
:class:`~batch.providers.transport.Transport`, which streams the data URLs of
the answer into temporary image files.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from batch.errors import JobError
from batch.jobs import Job
from batch.providers.base import Answer, ClientConfig, Generation
from batch.providers.bodystream import stream_body
from batch.providers.chat_wire import body_parts, error_for_status, interpret
from batch.providers.transport import Request, Transport
from batch.storage.base import ImageSink


class ChatCompletionsClient:
    """``POST {base_url}/chat/completions`` with images streamed out of the answer."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self.transport = Transport(config)

    async def close(self) -> None:
        await self.transport.close()

    async def generate(self, job: Job, sink: ImageSink) -> Generation:
        """Send one request for ``job``; stage its images in ``sink``, or raise a JobError."""
        request = Request(self.url, {}, b"", 0)
        request.body, request.length = self._body(job, request.problems)
        request.headers = self.transport.headers({
            "Authorization": f"Bearer {self.config.api_key}",
            "Content-Type": "application/json",
        })
        return await self.transport.generate(job, sink, request, _errors, _interpret)

    @staticmethod
    def _body(
        job: Job, problems: list[str]
    ) -> tuple[bytes | AsyncGenerator[bytes, None], int]:
        """The request body and its length; local input images are streamed, not held."""
        parts = body_parts(job, secrets.token_hex(16))
        if not parts.files:
            return parts.pieces[0], len(parts.pieces[0])
        return stream_body(parts, problems), parts.length()


def _errors(
    status: int, headers: Mapping[str, str], body: bytes, job_id: str, now_s: float
) -> JobError:
    return error_for_status(status, headers, body, job_id=job_id, now_s=now_s)


def _interpret(document: Any, streamed: Mapping[str, int], job_id: str) -> Answer:
    return interpret(document, streamed, job_id=job_id)
