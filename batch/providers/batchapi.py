"""What the batch run mode needs from a provider's batch API (Gemini Batch, OpenAI Batch).

A provider batch is asynchronous and not idempotent: the runner writes a request
file (one JSONL line per job, its key the job id), records the intent, calls
:meth:`BatchApi.submit` once, polls, and streams the results back through the
same stream decoder and image verification as sync mode. Each provider
implements :class:`BatchApi` in its own module (``batch_gemini.py``,
``batch_openai.py``); the line splitting and decoding they share is in
:mod:`batch.providers.batchlines`.

Contract, for implementers:

- ``submit`` uploads ``path`` and creates one batch whose display name / metadata
  carries ``spec.tag`` verbatim; it is called once per tag (the runner calls
  ``find(tag)`` first after a crash), so it must not retry the *create* call on an
  ambiguous failure (a timeout after the request went out): raise
  :class:`BatchSubmitUnknown` and let the next run find the batch.
- ``find`` lists the provider's batches and returns the one whose tag is ``tag``
  (None when there is none); it is how a killed run's batch is adopted.
- ``results`` yields one :class:`ResultLine` per line of the batch's result
  file(s), in file order, never holding a line or a file whole: images go to
  writers opened with ``stage.open`` while the line streams. A key may be missing (the
  runner sends that job back to pending).
- Errors are :mod:`batch.errors` JobErrors (RetryableError for 429/5xx/timeouts,
  which the caller retries with backoff; FatalApiError for 401/403).
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from batch.errors import RetryableError
from batch.images import StagedImage
from batch.jobs import Job


class BatchState(enum.StrEnum):
    """A provider batch's state, the same for every provider."""

    PENDING = "pending"  # accepted, not started (Gemini PENDING, OpenAI validating)
    RUNNING = "running"  # OpenAI in_progress / finalizing / cancelling
    SUCCEEDED = "succeeded"  # ended; lines may still carry errors
    FAILED = "failed"  # the batch as a whole failed (no or some results)
    CANCELLED = "cancelled"
    EXPIRED = "expired"  # not done within the window; finished lines are kept

    @property
    def finished(self) -> bool:
        return self not in (BatchState.PENDING, BatchState.RUNNING)


class LineErrorKind(enum.StrEnum):
    RETRYABLE = "retryable"  # 429, 5xx, timeout, expired inside the batch: back to pending
    REFUSED = "refused"  # blocked or invalid request: the job fails with this reason


@dataclass(frozen=True)
class BatchLimits:
    """The most one batch may hold (the runner splits by these)."""

    max_requests: int
    max_file_bytes: int


@dataclass(frozen=True)
class BatchSpec:
    """One batch to create: everything the create call sends besides the file."""

    tag: str  # unique; sent as displayName (Gemini) or metadata (OpenAI)
    model: str
    route: str  # the provider's sub-endpoint for these lines ("" when it has one)
    requests: int
    file_sha256: str


@dataclass(frozen=True)
class BatchInfo:
    """What a poll or a listing says of one batch."""

    batch_id: str
    state: BatchState
    tag: str = ""
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    created_s: float | None = None  # unix seconds, when the provider says
    result_files: tuple[str, ...] = ()  # provider file ids to stream, in order
    message: str = ""  # why a batch failed, as the provider said


@dataclass(frozen=True)
class LineError:
    kind: LineErrorKind
    code: str  # the provider's code ("13", "429", "moderation_blocked")
    message: str


@dataclass(frozen=True)
class ResultLine:
    """One line of a result file: a key and its verified staged images, or an error."""

    key: str
    images: tuple[StagedImage, ...] = ()
    error: LineError | None = None
    usage: Mapping[str, Any] | None = None
    text: str = ""


class ImageOut(Protocol):
    """Where one streamed image goes (an ImageWriter or a sink's writer)."""

    def write(self, data: bytes) -> None: ...

    def finish(self) -> StagedImage: ...

    def abort(self) -> None: ...


class ImageStage(Protocol):
    """Where a results stream's images are staged (the runner's image sink)."""

    def open(self, n: int) -> ImageOut:
        """A writer for the ``n``-th image of the stream (0-based, over all lines)."""
        ...

    def discard(self, image: StagedImage) -> None:
        """Drop a staged image no result line keeps."""
        ...


class BatchSubmitUnknown(RetryableError):
    """The create call went out but its answer did not come back: the batch may exist."""


@dataclass(frozen=True)
class RequestLine:
    """One JSONL request line, streamed (local input images inline), with its length."""

    key: str
    length: int  # bytes, newline included
    chunks: AsyncIterator[bytes] = field(repr=False)


class BatchApi(Protocol):
    """A provider's batch API; see the module docstring for the contract."""

    limits: BatchLimits

    def route(self, job: Job) -> str:
        """The sub-endpoint ``job``'s line goes to (one per batch, with one model)."""
        ...

    def request_line(self, key: str, job: Job) -> RequestLine:
        """``job`` as one line of the request file, keyed ``key``."""
        ...

    async def submit(self, spec: BatchSpec, path: Path) -> str:
        """Upload ``path`` and create the batch (once); its provider id."""
        ...

    async def find(self, tag: str) -> BatchInfo | None:
        """The provider's batch carrying ``tag``, if any."""
        ...

    async def poll(self, batch_id: str) -> BatchInfo: ...

    def results(self, info: BatchInfo, stage: ImageStage) -> AsyncIterator[ResultLine]:
        """Stream the result lines of a finished batch; see the module docstring."""
        ...

    async def cancel(self, batch_id: str) -> None: ...

    async def close(self) -> None: ...
