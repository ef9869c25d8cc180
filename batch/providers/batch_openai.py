"""OpenAI's Batch API for image requests: upload, create, poll, list, cancel, collect.

Implements :class:`~batch.providers.batchapi.BatchApi`; every layout and reading
is in :mod:`batch.providers.batch_openai_wire`. The request file is uploaded as a
multipart body streamed from disk and checked against the sha256 the runner
recorded (so the file sent is the one the intent names); results are downloaded
in chunks, each line's ``b64_json`` decoded straight into the writers ``stage``
opens (through the shared :func:`~batch.providers.batchlines.decode_lines`). A
download cut part way resumes with ``Range`` at the byte it reached (or reads
again from the start, dropping those bytes, when the server ignores ``Range``).
Control calls (upload, poll, list, cancel, download) are retried with the sync
policy (:mod:`batch.providers.batchretry`); the create call is never retried: an
answer that does not come back is :class:`BatchSubmitUnknown`, and the next run
looks the batch up by its tag. Errors are :mod:`batch.errors` JobErrors.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import re
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from batch.errors import (
    JobError,
    MalformedResponse,
    RateLimited,
    RejectedError,
    RequestTimeout,
    RetryableError,
    TransportError,
)
from batch.jobs import InputImage, InputKind, Job
from batch.providers import batch_openai_wire as wire
from batch.providers import images_wire
from batch.providers.base import ClientConfig
from batch.providers.batchapi import (
    BatchInfo,
    BatchLimits,
    BatchSpec,
    BatchState,
    BatchSubmitUnknown,
    ImageStage,
    RequestLine,
    ResultLine,
)
from batch.providers.batchlines import decode_lines
from batch.providers.batchretry import CONTROL_POLICY, retrying
from batch.providers.bodies import BodyParts
from batch.providers.bodystream import InputProblem, stream_body
from batch.providers.http_errors import error_object
from batch.providers.transport import CHUNK_BYTES, ERROR_BODY_BYTES, Transport, describe
from batch.retry import RetryPolicy, decide

log = logging.getLogger(__name__)

MAX_JSON_BYTES = 4 * 1024 * 1024  # a batch object or a page of 100 of them
PAGE_SIZE = 100  # the most GET /batches gives per page
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")


class OpenAIBatchClient:
    """One OpenAI endpoint's Batch API; see the module docstring."""

    limits = BatchLimits(max_requests=wire.MAX_LINES, max_file_bytes=wire.MAX_FILE_BYTES)
    page_size = PAGE_SIZE
    # Upload, poll, list, cancel and download are retried (the create call never is).
    retry_policy: RetryPolicy = CONTROL_POLICY

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.transport = Transport(config)
        self.base = config.base_url.rstrip("/")

    async def close(self) -> None:
        await self.transport.close()

    # ----- the request file ----------------------------------------------------------

    def route(self, job: Job) -> str:
        return wire.endpoint_for(job)

    def request_line(self, key: str, job: Job) -> RequestLine:
        parts = wire.line_parts(job, key, secrets.token_hex(16))

        async def chunks() -> AsyncGenerator[bytes, None]:
            if not parts.files:
                yield parts.pieces[0]
                return
            problems: list[str] = []
            try:
                async for piece in stream_body(parts, problems):
                    yield piece
            except InputProblem:
                raise RejectedError(problems[0], job_id=job.id) from None

        return RequestLine(key, parts.length(), chunks())

    # ----- calls ---------------------------------------------------------------------

    async def submit(self, spec: BatchSpec, path: Path) -> str:
        """Upload ``path`` (purpose batch), then create the batch once; its id."""
        file_id = await retrying(lambda: self._upload(spec, path), self.retry_policy)
        body = wire.create_body(file_id, spec.route or wire.GENERATIONS, spec.tag)
        try:
            batch = await self._json("POST", "/batches", body=body)
        except RetryableError as exc:
            if isinstance(exc, RateLimited):
                raise  # refused before any work: no batch was made
            # A lost answer, a 5xx or a 200 we cannot read: the batch may well exist, and
            # only a listing by its tag can tell (the next run looks).
            raise BatchSubmitUnknown(
                f"creating batch {spec.tag}: {exc.message}; the next run looks it up by tag",
                http_status=exc.http_status,
            ) from None
        batch_id = batch.get("id") if isinstance(batch, dict) else None
        if not isinstance(batch_id, str) or not batch_id:
            raise BatchSubmitUnknown(f"creating batch {spec.tag}: the answer has no id")
        return batch_id

    async def find(self, tag: str) -> BatchInfo | None:
        """Walk ``GET /batches`` (newest first, ``after`` cursor) for ``tag``."""
        after: str | None = None
        while True:
            query = f"?limit={self.page_size}" + (f"&after={quote(after)}" if after else "")
            page = await retrying(functools.partial(self._json, "GET", "/batches" + query),
                                  self.retry_policy)
            data = page.get("data") if isinstance(page, dict) else None
            for batch in data if isinstance(data, list) else ():
                if wire.tag_of(batch) == tag:
                    return info_of(batch)
            after = wire.next_page(page)
            if after is None:
                return None

    async def poll(self, batch_id: str) -> BatchInfo:
        path = f"/batches/{quote(batch_id, safe='')}"
        return info_of(await retrying(lambda: self._json("GET", path), self.retry_policy))

    async def cancel(self, batch_id: str) -> None:
        """Ask the batch to stop; a batch that already ended (409/400) is fine."""
        path = f"/batches/{quote(batch_id, safe='')}/cancel"

        async def attempt() -> None:
            try:
                await self._json("POST", path, body={})
            except JobError as exc:
                # 409 is retryable elsewhere; here it says the batch already ended.
                if exc.http_status not in (400, 409):
                    raise
                log.info("batch %s: not cancelled (%s)", batch_id, exc.message)

        await retrying(attempt, self.retry_policy)

    def results(self, info: BatchInfo, stage: ImageStage) -> AsyncIterator[ResultLine]:
        """Every line of the output file, then of the error file, as ResultLines."""
        return self._results(info, stage)

    async def _results(self, info: BatchInfo,
                       stage: ImageStage) -> AsyncGenerator[ResultLine, None]:
        for file_id in info.result_files:
            async for line in decode_lines(self._download(file_id), stage=stage,
                                           raw_keys=images_wire.RAW_KEYS, read=wire.read_line):
                yield line

    # ----- HTTP ----------------------------------------------------------------------

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        own = {"Authorization": f"Bearer {self.config.api_key}"}
        if content_type:
            own["Content-Type"] = content_type
        headers = self.transport.headers(own)
        # Bodies are read as they come: a gzip stream cannot be resumed by Range.
        headers["Accept-Encoding"] = "identity"
        return headers

    async def _json(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = self._headers("application/json" if data is not None else None)
        return await self._send(method, path, data, headers, len(data or b""))

    async def _send(self, method: str, path: str, data: Any, headers: dict[str, str],
                    length: int) -> Any:
        """One call whose answer is JSON; JobErrors for everything else."""
        session = self.transport.open()
        if data is not None:
            headers = {**headers, "Content-Length": str(length)}
        try:
            async with asyncio.timeout(self.config.timeout_s):
                async with session.request(
                    method, self.base + path, data=data, headers=headers,
                    proxy=self.transport._proxy_url, allow_redirects=False,
                    proxy_headers=self.transport._proxy_headers,
                ) as response:
                    # read(n) gives what has arrived, not the whole body: read to the end.
                    raw = await _read_all(response, MAX_JSON_BYTES + 1)
                    if response.status != 200:
                        raise _error(response.status, response.headers, raw[:ERROR_BODY_BYTES],
                                     path)
                    if len(raw) > MAX_JSON_BYTES:
                        raise MalformedResponse(f"{method} {path}: answer over "
                                                f"{MAX_JSON_BYTES} bytes", http_status=200)
        except TimeoutError:
            raise RequestTimeout(f"{method} {path}: no answer within "
                                 f"{self.config.timeout_s:g}s") from None
        except aiohttp.ClientError as exc:
            raise TransportError(f"{method} {path}: {describe(exc)}") from None
        try:
            return json.loads(raw)
        except ValueError:
            raise MalformedResponse(f"{method} {path}: answer is not JSON",
                                    http_status=200) from None

    async def _upload(self, spec: BatchSpec, path: Path) -> str:
        """``POST /files`` multipart (purpose ``batch``), the file streamed and checked."""
        size = path.stat().st_size
        if size > wire.MAX_FILE_BYTES:
            raise RejectedError(f"{path.name}: {size} bytes, over the {wire.MAX_FILE_BYTES} "
                                "a batch file may have")
        boundary = secrets.token_hex(16)
        dash = f"--{boundary}\r\n".encode()
        head = (dash + b'Content-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
                + dash + f'Content-Disposition: form-data; name="file"; filename='
                f'"{spec.tag}.jsonl"\r\nContent-Type: application/jsonl\r\n\r\n'.encode())
        tail = f"\r\n--{boundary}--\r\n".encode()
        # The sha256 recorded in the intent: a file changed since is not sent whole.
        image = InputImage(InputKind.FILE, str(path), path.name, "application/jsonl",
                           spec.file_sha256, size)
        parts = BodyParts((b"", tail), (image,), (head,), encoded=False)
        problems: list[str] = []
        body = stream_body(parts, problems)
        try:
            found = await self._send(
                "POST", "/files", body,
                self._headers(f"multipart/form-data; boundary={boundary}"), parts.length())
        except TransportError:
            if problems:
                # Not the file the intent names: refused, so its jobs are planned afresh.
                raise RejectedError(f"request file {path.name}: {problems[0]}") from None
            raise
        finally:
            await body.aclose()
        file_id = found.get("id") if isinstance(found, dict) else None
        if not isinstance(file_id, str) or not file_id:
            raise MalformedResponse("POST /files: the answer has no file id", http_status=200)
        return file_id

    async def _download(self, file_id: str) -> AsyncGenerator[bytes, None]:
        """The file's bytes; a cut download resumes at the byte it reached."""
        offset, at_failure = 0, 0
        history: list[JobError] = []
        rng = random.Random()
        while True:
            try:
                async for chunk in self._download_from(file_id, offset):
                    offset += len(chunk)
                    yield chunk
                return
            except RetryableError as exc:
                if offset > at_failure:
                    history.clear()  # progress since the last cut: a fresh count
                at_failure = offset
                history.append(exc)
                decision = decide(history, self.retry_policy, rng.random())
                if not decision.retry:
                    raise
                log.info("results file %s cut at byte %d (%s); resuming in %.1fs",
                         file_id, offset, exc.message, decision.wait_s)
                await asyncio.sleep(decision.wait_s)

    async def _download_from(self, file_id: str, offset: int) -> AsyncGenerator[bytes, None]:
        """The bytes of ``GET /files/{id}/content`` from ``offset`` on."""
        session = self.transport.open()
        headers = self._headers()
        if offset:
            headers["Range"] = f"bytes={offset}-"
        url = f"{self.base}/files/{quote(file_id, safe='')}/content"
        try:
            async with contextlib.AsyncExitStack() as stack:
                async with asyncio.timeout(self.config.timeout_s):
                    response = await stack.enter_async_context(session.get(
                        url, headers=headers, proxy=self.transport._proxy_url,
                        proxy_headers=self.transport._proxy_headers, allow_redirects=False))
                    if response.status not in (200, 206):
                        raw = await response.content.read(ERROR_BODY_BYTES)
                        raise _error(response.status, response.headers, raw, url)
                skip = _skip_for(response.status, response.headers.get("Content-Range"), offset)
                while True:
                    async with asyncio.timeout(self.transport.stall_s):
                        chunk = await response.content.read(CHUNK_BYTES)
                    if not chunk:
                        return
                    if skip:
                        drop = min(skip, len(chunk))
                        chunk, skip = chunk[drop:], skip - drop
                        if not chunk:
                            continue
                    yield chunk
        except TimeoutError:
            raise RequestTimeout(f"results file {file_id}: the download stalled") from None
        except aiohttp.ClientError as exc:
            raise TransportError(f"results file {file_id}: {describe(exc)}") from None


async def _read_all(response: aiohttp.ClientResponse, cap: int) -> bytes:
    """The body up to ``cap`` bytes (the end, or the first ``cap`` bytes of a longer one)."""
    pieces: list[bytes] = []
    size = 0
    while size < cap and (piece := await response.content.read(cap - size)):
        pieces.append(piece)
        size += len(piece)
    return b"".join(pieces)


def _skip_for(status: int, content_range: str | None, offset: int) -> int:
    """Bytes to drop from a resumed download: all before ``offset`` if Range was ignored."""
    if status == 200:
        return offset
    found = _CONTENT_RANGE.fullmatch((content_range or "").strip())
    if found is None or int(found.group(1)) != offset:
        raise MalformedResponse(f"a resumed download starts at {content_range!r}, "
                                f"not at byte {offset}", http_status=206)
    return 0


def _error(status: int, headers: Any, raw: bytes, where: str) -> JobError:
    exc = images_wire.error_for_status(status, headers, raw, "", time.time())
    code = error_object(raw).get("code")
    exc.message = f"{where}: {exc.message}" + (f" ({code})" if isinstance(code, str) else "")
    return exc


def info_of(batch: Any) -> BatchInfo:
    """A batch object as the neutral BatchInfo."""
    if not isinstance(batch, dict) or not isinstance(batch.get("id"), str):
        raise MalformedResponse("a batch object has no id", http_status=200)
    total, completed, failed = wire.counts(batch)
    files = tuple(batch[k] for k in ("output_file_id", "error_file_id")
                  if isinstance(batch.get(k), str) and batch[k])
    created = batch.get("created_at")
    return BatchInfo(
        batch_id=batch["id"], state=BatchState(wire.neutral_state(batch.get("status"))),
        tag=wire.tag_of(batch) or "", total=total, succeeded=completed, failed=failed,
        created_s=float(created) if isinstance(created, int | float) else None,
        result_files=files, message=wire.batch_errors(batch),
    )

