"""What the engine knows of a provider: the Provider protocol and what it returns.

Each protocol (chat completions, Gemini, the OpenAI Images API) implements
:class:`Provider` in its own module beside this one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from batch import __version__
from batch.imageinfo import DEFAULT_MAX_PIXELS
from batch.images import StagedImage, StreamTransform
from batch.jobs import Job
from batch.storage.base import ImageSink

DEFAULT_BASE_URL = "https://api.qnaigc.com/v1"


class Secret(str):
    """A string that does not show itself in reprs, logs or tracebacks."""

    def __repr__(self) -> str:
        return "Secret('***')"


@dataclass(frozen=True)
class ClientConfig:
    base_url: str = DEFAULT_BASE_URL
    api_key: Secret = field(default=Secret(""), repr=False)
    timeout_s: float = 300.0  # for the answer to start: the request sent, the headers back
    stall_timeout_s: float = 60.0  # the longest pause while the answer's body flows
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


@dataclass(frozen=True)
class Answer:
    """What a 200 answer holds once its images have been streamed out."""

    image_indexes: tuple[int, ...]  # which streamed images are the answer's images, in order
    text: str
    usage: Mapping[str, Any] | None
    finish_reason: str | None


class Provider(Protocol):
    """What the engine needs from any image provider."""

    async def generate(self, job: Job, sink: ImageSink) -> Generation:
        """Send one request for ``job``; stage its images in ``sink``, or raise a JobError."""
        ...

    async def close(self) -> None: ...
