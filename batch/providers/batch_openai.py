"""OpenAI's Batch API for image requests: upload, create, poll, list, cancel, collect.

Implements :class:`~batch.providers.batchapi.BatchApi`; every layout and reading
is in :mod:`batch.providers.batch_openai_wire`. The request file is uploaded as a
multipart body streamed from disk and checked against the sha256 the runner
recorded (so the file sent is the one the intent names); results are downloaded
in chunks, each line's ``b64_json`` decoded straight into the writers ``stage``
opens. A download cut part way resumes with ``Range`` from the end of the last
whole line (or reads again from the start, skipping those bytes, when the server
ignores ``Range``). Errors are :mod:`batch.errors` JobErrors; the runner retries
the retryable ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from batch.decoder import ImageBegin, ImageBytes, ImageEnd
from batch.errors import (
    JobError,
    MalformedResponse,
    RequestTimeout,
    RetryableError,
    TransportError,
)
from batch.images import StagedImage
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
    ImageOut,
    LineError,
    LineErrorKind,
    RequestLine,
    ResultLine,
    Stage,
)
from batch.providers.bodies import BodyParts
from batch.providers.http_errors import error_object
from batch.providers.transport import (
    CHUNK_BYTES,
    ERROR_BODY_BYTES,
    Transport,
    describe,
    stream_body,
)

log = logging.getLogger(__name__)

MAX_JSON_BYTES = 4 * 1024 * 1024  # a batch object or a page of 100 of them
PAGE_SIZE = 100  # the most GET /batches gives per page
# Cuts in a row, with no new line between them, before a download gives up.
MAX_RESUMES = 5
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")


class OpenAIBatchClient:
    """One OpenAI endpoint's Batch API; see the module docstring."""

    limits = BatchLimits(max_requests=wire.MAX_LINES, max_file_bytes=wire.MAX_FILE_BYTES)
    page_size = PAGE_SIZE

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
        problems: list[str] = []
        chunks = stream_body(parts, problems) if parts.files else _once(parts.pieces[0])
        return RequestLine(key, parts.length(), chunks)

    # ----- calls ---------------------------------------------------------------------

    async def submit(self, spec: BatchSpec, path: Path) -> str:
        """Upload ``path`` (purpose batch), then create the batch once; its id."""
        file_id = await self._upload(spec, path)
        body = wire.create_body(file_id, spec.route or wire.GENERATIONS, spec.tag)
        try:
            batch = await self._json("POST", "/batches", body=body)
        except (TransportError, RequestTimeout) as exc:
            # The create may have reached the server: only a listing can tell.
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
            page = await self._json("GET", "/batches" + query)
            data = page.get("data") if isinstance(page, dict) else None
            for batch in data if isinstance(data, list) else ():
                if wire.tag_of(batch) == tag:
                    return info_of(batch)
            after = wire.next_page(page)
            if after is None:
                return None

    async def poll(self, batch_id: str) -> BatchInfo:
        return info_of(await self._json("GET", f"/batches/{quote(batch_id, safe='')}"))

    async def cancel(self, batch_id: str) -> None:
        """Ask the batch to stop; a batch that already ended (409/400) is fine."""
        try:
            await self._json("POST", f"/batches/{quote(batch_id, safe='')}/cancel", body={})
        except JobError as exc:
            if exc.http_status in (400, 409):
                log.info("batch %s: not cancelled (%s)", batch_id, exc.message)
                return
            raise

    async def results(self, info: BatchInfo, stage: Stage) -> AsyncGenerator[ResultLine, None]:
        """Every line of the output file, then of the error file, as ResultLines."""
        counter = [0]
        for file_id in info.result_files:
            async for line in self._file_lines(file_id, stage, counter):
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
                    raw = await response.content.read(MAX_JSON_BYTES + 1)
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
            raise ValueError(f"{path}: {size} bytes, over the {wire.MAX_FILE_BYTES} a batch "
                             "file may have")
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
                raise ValueError(f"{path}: {problems[0]}") from None
            raise
        finally:
            await body.aclose()
        file_id = found.get("id") if isinstance(found, dict) else None
        if not isinstance(file_id, str) or not file_id:
            raise MalformedResponse("POST /files: the answer has no file id", http_status=200)
        return file_id

    async def _file_lines(self, file_id: str, stage: Stage,
                          counter: list[int]) -> AsyncGenerator[ResultLine, None]:
        """One results file, resumed where it was cut; see the module docstring."""
        offset, cuts = 0, 0
        while True:
            parser = wire.ResultLines(start_offset=offset)
            writers: dict[int, ImageOut] = {}
            staged: dict[int, StagedImage] = {}
            current: list[int] = []
            try:
                async for chunk in self._download(file_id, offset):
                    for event in parser.feed(chunk):
                        if isinstance(event, wire.LineEnd):
                            yield _line(event, staged)
                            staged.clear()
                            cuts = 0
                        else:
                            _image_event(event, stage, counter, writers, staged, current)
                for event in parser.finish():
                    if type(event) is wire.LineEnd:
                        yield _line(event, staged)
                if writers:
                    raise MalformedResponse(f"results file {file_id} ends inside an image")
                return
            except (TransportError, RequestTimeout) as exc:
                cuts += 1
                if cuts > MAX_RESUMES:
                    raise
                log.info("results file %s cut at byte %d (%s); resuming", file_id,
                         parser.offset, exc.message)
                offset = parser.offset
            finally:
                for writer in writers.values():
                    writer.abort()

    async def _download(self, file_id: str, offset: int) -> AsyncGenerator[bytes, None]:
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


def _skip_for(status: int, content_range: str | None, offset: int) -> int:
    """Bytes to drop from a resumed download: all before ``offset`` if Range was ignored."""
    if status == 200:
        return offset
    found = _CONTENT_RANGE.fullmatch((content_range or "").strip())
    if found is None or int(found.group(1)) != offset:
        raise MalformedResponse(f"a resumed download starts at {content_range!r}, "
                                f"not at byte {offset}", http_status=206)
    return 0


def _image_event(event: ImageBegin | ImageBytes | ImageEnd, stage: Stage, counter: list[int],
                 writers: dict[int, ImageOut], staged: dict[int, StagedImage],
                 current: list[int]) -> None:
    if type(event) is ImageBytes:
        writers[current[-1]].write(event.data)
    elif type(event) is ImageBegin:
        current.append(event.index)
        writers[event.index] = stage(counter[0])
        counter[0] += 1
    elif type(event) is ImageEnd:
        staged[event.index] = writers.pop(event.index).finish()


def _line(end: wire.LineEnd, staged: dict[int, StagedImage]) -> ResultLine:
    images = tuple(staged[i] for i in end.images if i in staged)
    if end.error is not None:
        return ResultLine(end.key, (), line_error(end.error), None)
    return ResultLine(end.key, images, None, end.usage)


def line_error(exc: JobError) -> LineError:
    """A line's JobError in the neutral terms: retryable, or refused with the reason."""
    retry = isinstance(exc, RetryableError) or exc.type == "quota_exhausted"
    code = exc.message.split(":", 1)[0] if exc.http_status is None else str(exc.http_status)
    kind = LineErrorKind.RETRYABLE if retry else LineErrorKind.REFUSED
    return LineError(kind, code, exc.message)


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


async def _once(data: bytes) -> AsyncGenerator[bytes, None]:
    yield data
