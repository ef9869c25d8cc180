"""Google's Gemini API: ``POST {base}/models/{model}:generateContent``.

Bodies, errors and answers are read by :mod:`batch.providers.gemini_wire`; the
request goes through the shared :class:`~batch.providers.transport.Transport`,
local input images streamed from disk into ``inlineData`` and URL inputs
fetched first (:mod:`batch.providers.fetch`), as the API does not fetch them.
"""

from __future__ import annotations

import secrets

from batch.jobs import Job
from batch.providers import gemini_wire as wire
from batch.providers.base import ClientConfig, Generation
from batch.providers.bodystream import stream_body
from batch.providers.fetch import urls_fetched
from batch.providers.transport import Request, Transport
from batch.storage.base import ImageSink


class GeminiClient:
    """One Gemini endpoint; see the module docstring."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.transport = Transport(config)

    async def close(self) -> None:
        await self.transport.close()

    async def generate(self, job: Job, sink: ImageSink) -> Generation:
        """Send one request for ``job``; stage its images in ``sink``, or raise a JobError."""
        async with urls_fetched(self.transport, job) as ready:
            parts = wire.body_parts(ready, secrets.token_hex(16))
            request = Request(
                wire.endpoint_url(self.config.base_url, job.model),
                self.transport.headers({
                    "x-goog-api-key": self.config.api_key,
                    "Content-Type": "application/json",
                }),
                b"",
                parts.length(),
                raw_keys=wire.RAW_KEYS,
            )
            request.body = (
                parts.pieces[0] if not parts.files else stream_body(parts, request.problems)
            )
            return await self.transport.generate(
                ready, sink, request, wire.error_for_status, wire.interpret
            )
