"""Google's Gemini Batch API, as the BatchApi of :mod:`batch.providers.batchapi`.

Requests go as a JSONL file (``{"key": ..., "request": GenerateContentRequest}``
per line, the body built by :mod:`batch.providers.gemini_wire`, local input
images inline) through the Files API's resumable upload
(``POST {root}/upload/v1beta/files``, then the bytes to the session URL), then
``POST models/{model}:batchGenerateContent`` with ``inputConfig.fileName`` and
our tag as ``displayName``. A batch is an Operation: ``GET batches/{id}`` gives
``metadata.state`` (``BATCH_STATE_*``), ``metadata.batchStats`` (counts as int64
strings) and ``metadata.output.responsesFile``; ``GET batches`` (paged by
``pageToken``) lists ``operations``, which is how :meth:`find` adopts a batch
a killed run created. Results come from ``{root}/download/v1beta/{file}:download
?alt=media``, streamed, resumed with ``Range`` after a cut.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from batch.errors import (
    Blocked,
    JobError,
    MalformedResponse,
    NoImage,
    RejectedError,
    RequestTimeout,
    RetryableError,
    TransportError,
)
from batch.images import StagedImage
from batch.jobs import InputKind, Job
from batch.providers import gemini_wire as wire
from batch.providers.base import ClientConfig
from batch.providers.batchapi import (
    BatchInfo,
    BatchLimits,
    BatchSpec,
    BatchState,
    BatchSubmitUnknown,
    ImageStage,
    LineError,
    LineErrorKind,
    RequestLine,
    ResultLine,
)
from batch.providers.batchlines import decode_lines
from batch.providers.batchretry import CONTROL_POLICY, retrying
from batch.providers.bodystream import stream_body
from batch.providers.transport import Transport, describe
from batch.retry import decide

log = logging.getLogger(__name__)

CHUNK_BYTES = 256 * 1024
# The Files API takes files up to 2 GB; the Batch API documents no request count
# limit for file input, so a generous one keeps each batch's file manageable.
LIMITS = BatchLimits(max_requests=50_000, max_file_bytes=2 * 1024**3 - 1)
STATES: Mapping[str, BatchState] = {
    "BATCH_STATE_PENDING": BatchState.PENDING, "BATCH_STATE_RUNNING": BatchState.RUNNING,
    "BATCH_STATE_SUCCEEDED": BatchState.SUCCEEDED, "BATCH_STATE_FAILED": BatchState.FAILED,
    "BATCH_STATE_CANCELLED": BatchState.CANCELLED, "BATCH_STATE_EXPIRED": BatchState.EXPIRED,
    # The SDK's names for the same states (some proxies pass those through).
    "JOB_STATE_PENDING": BatchState.PENDING, "JOB_STATE_QUEUED": BatchState.PENDING,
    "JOB_STATE_RUNNING": BatchState.RUNNING, "JOB_STATE_SUCCEEDED": BatchState.SUCCEEDED,
    "JOB_STATE_FAILED": BatchState.FAILED, "JOB_STATE_CANCELLING": BatchState.RUNNING,
    "JOB_STATE_CANCELLED": BatchState.CANCELLED, "JOB_STATE_EXPIRED": BatchState.EXPIRED,
}
# google.rpc.Code values a line's error may carry that are worth another request:
# CANCELLED, UNKNOWN, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, INTERNAL, UNAVAILABLE.
RETRYABLE_RPC_CODES = frozenset({1, 2, 4, 8, 10, 13, 14})


def state_of(name: Any) -> BatchState:
    """A ``metadata.state`` as a BatchState (an unknown one counts as still running)."""
    return STATES.get(str(name), BatchState.RUNNING)


def classify_code(code: Any) -> LineErrorKind:
    """Whether a result line's ``error.code`` (gRPC, or an HTTP status) is worth a retry."""
    if not isinstance(code, int) or isinstance(code, bool):
        return LineErrorKind.RETRYABLE
    if code >= 100:  # an HTTP status
        return (LineErrorKind.RETRYABLE if code in (408, 409, 429) or code >= 500
                else LineErrorKind.REFUSED)
    return LineErrorKind.RETRYABLE if code in RETRYABLE_RPC_CODES else LineErrorKind.REFUSED


def info_of(operation: Mapping[str, Any]) -> BatchInfo:
    """A ``batches/{id}`` Operation (or a listing's entry) as a BatchInfo."""
    meta = operation.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    stats = meta.get("batchStats") or meta.get("batch_stats") or {}
    output = meta.get("output") or {}
    response = operation.get("response")
    results = output.get("responsesFile") or output.get("responses_file")
    if not results and isinstance(response, dict):  # the Operation's response carries it too
        results = response.get("responsesFile") or response.get("responses_file")
    created = meta.get("createTime") or meta.get("create_time")
    error = operation.get("error")

    def count(name: str, snake: str) -> int:
        value: Any = stats.get(name, stats.get(snake, 0)) if isinstance(stats, dict) else 0
        try:
            return int(value)  # int64 comes as a JSON string
        except (TypeError, ValueError):
            return 0

    return BatchInfo(
        batch_id=str(operation.get("name", "")),
        state=state_of(meta.get("state")),
        tag=str(meta.get("displayName") or meta.get("display_name") or ""),
        total=count("requestCount", "request_count"),
        succeeded=count("successfulRequestCount", "successful_request_count"),
        failed=count("failedRequestCount", "failed_request_count"),
        created_s=_timestamp(created),
        result_files=(str(results),) if results else (),
        message=str(error.get("message", "")) if isinstance(error, dict) else "",
    )


def _timestamp(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    from datetime import datetime

    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def read_line(document: Any, streamed: Mapping[str, int],
              staged: Mapping[int, StagedImage]) -> ResultLine:
    """One result line: ``{"key", "response"}`` or ``{"key", "error": {code, message}}``."""
    if not isinstance(document, dict) or not isinstance(document.get("key"), str):
        raise MalformedResponse("a result line without a key")
    key = document["key"]
    error = document.get("error") or document.get("status")
    if isinstance(error, dict) and error.get("code") not in (None, 0):
        code = error.get("code")
        return ResultLine(key, error=LineError(
            classify_code(code), str(code), str(error.get("message", ""))[:500]))
    try:
        answer = wire.interpret(document.get("response"), streamed, key)
    except (Blocked, RejectedError) as exc:
        return ResultLine(key, error=LineError(LineErrorKind.REFUSED, exc.type, exc.message))
    except (NoImage, MalformedResponse) as exc:
        return ResultLine(key, error=LineError(LineErrorKind.RETRYABLE, exc.type, exc.message))
    except JobError as exc:
        kind = LineErrorKind.RETRYABLE if exc.http_status in (None, 429) or \
            (exc.http_status or 0) >= 500 else LineErrorKind.REFUSED
        return ResultLine(key, error=LineError(kind, exc.type, exc.message))
    images = tuple(staged[i] for i in answer.image_indexes if i in staged)
    return ResultLine(key, images=images, usage=answer.usage, text=answer.text)


class GeminiBatchClient:
    """One Gemini endpoint's Batch API; see the module docstring."""

    limits = LIMITS

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.transport = Transport(config)
        base = config.base_url.rstrip("/")
        self.base = base
        root, _, version = base.rpartition("/")
        # Uploads and downloads live beside the API: {root}/upload/v1beta/files.
        self.root, self.version = (root, version) if version.startswith("v1") else (base, "v1beta")

    async def close(self) -> None:
        await self.transport.close()

    def route(self, job: Job) -> str:
        return ""

    def request_line(self, key: str, job: Job) -> RequestLine:
        if any(image.kind is InputKind.URL for image in job.images):
            raise RejectedError("URL input images are not sent in batch mode (a batch line "
                                "carries its images inline); use a local file or sync mode",
                                job_id=job.id)
        parts = wire.body_parts(job, secrets.token_hex(16))
        head = b'{"key":' + json.dumps(key).encode() + b',"request":'
        length = len(head) + parts.length() + 2

        async def chunks() -> AsyncIterator[bytes]:
            yield head
            if parts.files:
                problems: list[str] = []
                async for piece in stream_body(parts, problems):
                    yield piece
                if problems:
                    raise RejectedError(problems[0], job_id=job.id)
            else:
                yield parts.pieces[0]
            yield b"}\n"

        return RequestLine(key, length, chunks())

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = self.transport.headers({"x-goog-api-key": self.config.api_key})
        headers["Accept-Encoding"] = "identity"  # a results file streams as it is
        return {**headers, **(extra or {})}

    async def _json(self, method: str, url: str, body: Any = None,
                    headers: Mapping[str, str] | None = None) -> tuple[Any, Mapping[str, str]]:
        """One small JSON exchange; its answer and headers, or the error it stands for."""
        session = self.transport.open()
        data = None if body is None else json.dumps(body).encode()
        extra = {"Content-Type": "application/json"} if data is not None else {}
        try:
            async with session.request(
                method, url, data=data, headers=self._headers({**extra, **(headers or {})}),
                proxy=self.transport._proxy_url, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
            ) as response:
                raw = await response.content.read(8 * 1024 * 1024)
                if response.status != 200:
                    raise wire.error_for_status(response.status, response.headers, raw, "",
                                                time.time())
                try:
                    return (json.loads(raw) if raw.strip() else {}), response.headers
                except ValueError:
                    raise MalformedResponse(f"{method} {url}: answer is not JSON") from None
        except TimeoutError:
            raise RequestTimeout(f"{method} {url}: no answer in {self.config.timeout_s:g}s") \
                from None
        except aiohttp.ClientError as exc:
            raise TransportError(f"{method} {url}: {describe(exc)}") from None

    async def submit(self, spec: BatchSpec, path: Path) -> str:
        """Upload ``path`` (retried), then create the batch once."""
        file_name = await retrying(lambda: self._upload(spec, path))
        body = {"batch": {"displayName": spec.tag, "inputConfig": {"fileName": file_name}}}
        url = f"{self.base}/models/{quote(spec.model)}:batchGenerateContent"
        try:
            answer, _ = await self._json("POST", url, body)
        except (TransportError, RequestTimeout) as exc:
            raise BatchSubmitUnknown(f"creating batch {spec.tag}: {exc.message}") from None
        name = answer.get("name") if isinstance(answer, dict) else None
        if not isinstance(name, str) or not name:
            raise BatchSubmitUnknown(f"creating batch {spec.tag}: the answer names no batch")
        return name

    async def _upload(self, spec: BatchSpec, path: Path) -> str:
        size = path.stat().st_size
        _, headers = await self._json("POST", f"{self.root}/upload/{self.version}/files",
                                      {"file": {"displayName": spec.tag}}, {
            "X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start",
            "X-Goog-Upload-Header-Content-Length": str(size),
            "X-Goog-Upload-Header-Content-Type": "application/jsonl",
        })
        session_url = headers.get("X-Goog-Upload-URL")
        if not session_url:
            raise MalformedResponse("the upload start named no X-Goog-Upload-URL")

        async def body() -> AsyncIterator[bytes]:
            with path.open("rb") as handle:
                while chunk := handle.read(CHUNK_BYTES):
                    yield chunk

        session = self.transport.open()
        try:
            async with session.post(
                session_url, data=body(), proxy=self.transport._proxy_url,
                headers=self._headers({
                    "Content-Length": str(size), "X-Goog-Upload-Offset": "0",
                    "X-Goog-Upload-Command": "upload, finalize",
                }),
                allow_redirects=False,
            ) as response:
                raw = await response.content.read(1024 * 1024)
                if response.status != 200:
                    raise wire.error_for_status(response.status, response.headers, raw, "",
                                                time.time())
        except aiohttp.ClientError as exc:
            raise TransportError(f"uploading {path.name}: {describe(exc)}") from None
        try:
            name = json.loads(raw)["file"]["name"]
        except (ValueError, KeyError, TypeError):
            raise MalformedResponse("the upload's answer names no file") from None
        return str(name)

    async def find(self, tag: str) -> BatchInfo | None:
        token = ""
        while True:
            query = "?pageSize=100" + (f"&pageToken={quote(token)}" if token else "")
            page, _ = await retrying(functools.partial(
                self._json, "GET", f"{self.base}/batches{query}"))
            for operation in page.get("operations") or []:
                if isinstance(operation, dict):
                    info = info_of(operation)
                    if info.tag == tag:
                        return info
            token = page.get("nextPageToken") or ""
            if not token:
                return None

    async def poll(self, batch_id: str) -> BatchInfo:
        answer, _ = await retrying(lambda: self._json("GET", f"{self.base}/{batch_id}"))
        return info_of(answer if isinstance(answer, dict) else {})

    async def cancel(self, batch_id: str) -> None:
        await retrying(lambda: self._json("POST", f"{self.base}/{batch_id}:cancel", {}))

    def results(self, info: BatchInfo, stage: ImageStage) -> AsyncIterator[ResultLine]:
        return self._results(info, stage)

    async def _results(self, info: BatchInfo, stage: ImageStage) -> AsyncIterator[ResultLine]:
        for file_name in info.result_files:
            async for line in decode_lines(self._download(file_name), raw_keys=wire.RAW_KEYS,
                                           stage=stage, read=read_line):
                yield line

    async def _download(self, file_name: str) -> AsyncIterator[bytes]:
        """The file's bytes in chunks; a cut connection resumes at the offset reached."""
        url = f"{self.root}/download/{self.version}/{file_name}:download?alt=media"
        offset, at_failure = 0, 0
        history: list[JobError] = []
        rng = random.Random()
        while True:
            try:
                async for chunk in self._download_from(url, offset):
                    offset += len(chunk)
                    yield chunk
                return
            except RetryableError as exc:
                if offset > at_failure:
                    history.clear()  # progress since the last cut: a fresh count
                at_failure = offset
                history.append(exc)
                decision = decide(history, CONTROL_POLICY, rng.random())
                if not decision.retry:
                    raise
                log.info("download of %s cut at byte %d (%s); resuming in %.1fs",
                         file_name, offset, exc, decision.wait_s)
                await asyncio.sleep(decision.wait_s)

    async def _download_from(self, url: str, offset: int) -> AsyncIterator[bytes]:
        session = self.transport.open()
        headers = self._headers({"Range": f"bytes={offset}-"} if offset else {})
        try:
            async with session.get(
                url, headers=headers, proxy=self.transport._proxy_url,
                timeout=aiohttp.ClientTimeout(total=None, sock_read=self.transport.stall_s),
            ) as response:
                if response.status not in (200, 206):
                    raw = await response.content.read(64 * 1024)
                    raise wire.error_for_status(response.status, response.headers, raw, "",
                                                time.time())
                skip = offset if response.status == 200 else 0  # Range ignored: skip ahead
                async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                    if skip:
                        if len(chunk) <= skip:
                            skip -= len(chunk)
                            continue
                        chunk, skip = chunk[skip:], 0
                    yield chunk
        except TimeoutError:
            raise RequestTimeout(f"download of {url} stalled") from None
        except aiohttp.ClientError as exc:
            raise TransportError(f"download of {url}: {describe(exc)}") from None
