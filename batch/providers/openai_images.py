"""OpenAI's Images API: ``/images/generations``, and ``/images/edits`` for jobs with inputs.

Bodies, errors and answers are read by :mod:`batch.providers.images_wire`; the
request goes through the shared :class:`~batch.providers.transport.Transport`,
local input images streamed from disk as multipart parts (or data URLs).
"""

from __future__ import annotations

import secrets

from batch.jobs import Job
from batch.providers import images_wire as wire
from batch.providers.base import ClientConfig, Generation
from batch.providers.bodystream import stream_body
from batch.providers.transport import Request, Transport
from batch.storage.base import ImageSink


class OpenAIImagesClient:
    """One Images API endpoint; see the module docstring."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.transport = Transport(config)
        base = config.base_url.rstrip("/")
        self.urls = (base + "/images/generations", base + "/images/edits")

    async def close(self) -> None:
        await self.transport.close()

    async def generate(self, job: Job, sink: ImageSink) -> Generation:
        """Send one request for ``job``; stage its images in ``sink``, or raise a JobError."""
        parts, content_type = wire.body_parts(job, secrets.token_hex(16))
        request = Request(
            self.urls[wire.is_edit(job)],
            self.transport.headers({
                "Authorization": f"Bearer {self.config.api_key}",
                "Content-Type": content_type,
            }),
            b"",
            parts.length(),
            raw_keys=wire.RAW_KEYS,
        )
        request.body = parts.pieces[0] if not parts.files else stream_body(parts, request.problems)
        return await self.transport.generate(
            job, sink, request, wire.error_for_status, wire.interpret
        )
