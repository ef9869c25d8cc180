"""The simulated Gemini Batch API: Files API upload, batchGenerateContent, poll, list, download.

Shapes as python-genai's batches.py reads them: a batch is an Operation
``{"name": "batches/…", "metadata": {displayName, state: BATCH_STATE_*, createTime,
batchStats{requestCount…} (int64 as strings), output{responsesFile}}, "done"}``;
``GET batches`` lists ``operations`` with ``nextPageToken``. The results file is
written when the batch ends on the batch clock (:mod:`batch.sim.batchclock`):
one line per key with a ``response`` (an image drawn as generateContent would),
or an ``error`` with a google.rpc code (13 for the lines told to fail, 3 for an
invalid request). A key billed twice shows in ``/_stats`` (``batch.paid_twice``).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from batch.sim import gemini_wire as gemini
from batch.sim.batchclock import (
    BatchSimState,
    End,
    Progress,
    line_fails,
    line_finished_before_expiry,
    planned_end,
    progress,
)
from batch.sim.wire import Parsed, Reject

# (parsed request, key, serial) -> one image's base64
DrawImage = Callable[[Parsed, str, int], bytes]
STATE_NAMES = {Progress.PENDING: "BATCH_STATE_PENDING", Progress.RUNNING: "BATCH_STATE_RUNNING",
               End.SUCCEEDED: "BATCH_STATE_SUCCEEDED", End.EXPIRED: "BATCH_STATE_EXPIRED",
               End.FAILED: "BATCH_STATE_FAILED"}
_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main."
CHUNK = 64 * 1024


@dataclass
class _Batch:
    name: str
    model: str
    tag: str
    ordinal: int
    created_s: float
    input_path: Path
    requests: int
    end: End
    cancelled: bool = False
    results: str = ""  # files/… once written
    succeeded: int = 0
    failed: int = 0
    finished: bool = False


@dataclass
class _File:
    path: Path
    display_name: str
    size: int = 0


@dataclass
class GeminiBatchSim:
    """The Gemini Batch API's state in one simulator."""

    shared: BatchSimState
    draw: DrawImage
    check_key: Callable[[web.Request], web.Response | None]
    block_word: str = ""
    refuse_prompt: str = ""
    batches: dict[str, _Batch] = field(default_factory=dict)
    files: dict[str, _File] = field(default_factory=dict)
    uploads: dict[str, str] = field(default_factory=dict)  # upload id -> display name

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/upload/v1beta/files", self.upload)
        app.router.add_get("/v1beta/batches", self.listing)
        app.router.add_route("*", "/v1beta/batches/{tail}", self.batch)
        app.router.add_get("/download/v1beta/files/{tail}", self.download)
        app.router.add_get("/v1beta/files/{tail}", self.download)

    # -- upload ---------------------------------------------------------------

    async def upload(self, request: web.Request) -> web.StreamResponse:
        refused = self.check_key(request)
        if refused is not None:
            return refused
        command = request.headers.get("X-Goog-Upload-Command", "").replace(" ", "")
        if command == "start":
            if self.shared.fault(self.shared.config.fault_upload):
                return _error(503, "The service is currently unavailable.")
            body = await request.json()
            name = (body.get("file") or {}).get("displayName", "") if isinstance(body, dict) \
                else ""
            upload_id = secrets.token_hex(8)
            self.uploads[upload_id] = str(name)
            url = request.url.with_query({"upload_id": upload_id})
            return web.json_response({}, headers={"X-Goog-Upload-URL": str(url),
                                                  "X-Goog-Upload-Status": "active"})
        upload_id = request.query.get("upload_id", "")
        if command != "upload,finalize" or upload_id not in self.uploads:
            return _error(400, "unknown upload session or command")
        number = self.shared.count("upload")
        path = self.shared.new_path("input-")
        size = 0
        with path.open("wb") as handle:
            async for chunk in request.content.iter_chunked(CHUNK):
                handle.write(chunk)
                size += len(chunk)
        if number == self.shared.config.hang_upload:
            await self.shared.hang()
        file_id = "files/" + secrets.token_hex(6)
        self.files[file_id] = _File(path, self.uploads.pop(upload_id), size)
        return web.json_response({"file": {"name": file_id, "sizeBytes": str(size),
                                           "mimeType": "application/jsonl", "state": "ACTIVE"}})

    # -- create, poll, list, cancel -------------------------------------------

    async def create(self, request: web.Request, model: str) -> web.StreamResponse:
        refused = self.check_key(request)
        if refused is not None:
            return refused
        try:
            body = await request.json()
            batch = body["batch"]
            tag, file_id = batch["displayName"], batch["inputConfig"]["fileName"]
        except (ValueError, KeyError, TypeError):
            return _error(400, "batch.displayName and batch.inputConfig.fileName are required")
        if file_id not in self.files:
            return _error(404, f"{file_id} is not found")
        if model not in gemini.MODELS:
            return _error(404, f"models/{model} is not found for API version v1beta")
        source = self.files[file_id]
        with source.path.open("rb") as handle:
            requests = sum(1 for line in handle if line.strip())
        limit = self.shared.config.max_requests
        if limit and requests > limit:
            return _error(400, f"a batch holds at most {limit} requests, got {requests}")
        ordinal = self.shared.count("create")
        name = "batches/" + secrets.token_hex(8)
        self.batches[name] = _Batch(name, model, str(tag), ordinal, self.shared.clock.now(),
                                    source.path, requests, planned_end(ordinal,
                                                                       self.shared.config))
        if ordinal == self.shared.config.hang_create:
            await self.shared.hang()  # the batch exists; its creator never hears of it
        return web.json_response(self._operation(self.batches[name]))

    async def listing(self, request: web.Request) -> web.StreamResponse:
        refused = self.check_key(request) or self._poll_fault()
        if refused is not None:
            return refused
        self.shared.count("list")
        size = max(1, min(int(request.query.get("pageSize", "50") or 50), 50))
        start = int(request.query.get("pageToken", "0") or 0)
        names = list(self.batches)[::-1]  # newest first, as the API lists them
        page = [self._operation(self._advance(self.batches[n])) for n in
                names[start:start + size]]
        answer: dict[str, Any] = {"operations": page}
        if start + size < len(names):
            answer["nextPageToken"] = str(start + size)
        return web.json_response(answer)

    async def batch(self, request: web.Request) -> web.StreamResponse:
        refused = self.check_key(request) or self._poll_fault()
        if refused is not None:
            return refused
        tail = request.match_info["tail"]
        batch_id, _, method = tail.partition(":")
        found = self.batches.get("batches/" + batch_id)
        if found is None:
            return _error(404, f"batches/{batch_id} is not found")
        if method == "cancel" and request.method == "POST":
            self.shared.count("cancel")
            if not self._advance(found).finished:
                found.cancelled = found.finished = True
            return web.json_response({})
        if method or request.method != "GET":
            return _error(404, f"method {method!r} not found")
        self.shared.count("poll")
        return web.json_response(self._operation(self._advance(found)))

    def _poll_fault(self) -> web.Response | None:
        if self.shared.fault(self.shared.config.fault_poll):
            return _error(503, "The service is currently unavailable.")
        return None

    def _advance(self, batch: _Batch) -> _Batch:
        """Bring ``batch`` to where the clock says; write its results when it ends."""
        now = self.shared.clock.now()
        if batch.finished or progress(batch.created_s, now, self.shared.config.delay_s) \
                is not Progress.DONE:
            return batch
        batch.finished = True
        if batch.end is not End.FAILED:
            self._write_results(batch)
        return batch

    def _operation(self, batch: _Batch) -> dict[str, Any]:
        self._advance(batch)
        now = self.shared.clock.now()
        if batch.cancelled:
            state = "BATCH_STATE_CANCELLED"
        elif batch.finished:
            state = STATE_NAMES[batch.end]
        else:
            state = STATE_NAMES[progress(batch.created_s, now, self.shared.config.delay_s)]
        done = batch.finished
        meta: dict[str, Any] = {
            "@type": _TYPE + "GenerateContentBatch", "name": batch.name,
            "model": f"models/{batch.model}", "displayName": batch.tag, "state": state,
            "createTime": _iso(batch.created_s), "updateTime": _iso(now),
            "batchStats": {"requestCount": str(batch.requests),
                           "successfulRequestCount": str(batch.succeeded),
                           "failedRequestCount": str(batch.failed),
                           "pendingRequestCount": str(0 if done else batch.requests)},
        }
        operation: dict[str, Any] = {"name": batch.name, "metadata": meta, "done": done}
        if batch.results:
            meta["output"] = {"responsesFile": batch.results}
            operation["response"] = {"@type": _TYPE + "GenerateContentBatchOutput",
                                     "responsesFile": batch.results}
        if done and batch.end is End.FAILED and not batch.cancelled:
            operation["error"] = {"code": 13, "message": "The batch failed: internal error."}
        return operation

    # -- results --------------------------------------------------------------

    def _write_results(self, batch: _Batch) -> None:
        out = self.shared.new_path("results-")
        config = self.shared.config
        serial = 0
        with batch.input_path.open("rb") as source, out.open("wb") as sink:
            for raw in source:
                if not raw.strip():
                    continue
                serial += 1
                try:
                    line = json.loads(raw)
                    key = str(line["key"])
                    request = line["request"]
                except (ValueError, KeyError, TypeError):
                    continue  # no key to answer to: the client finds the key missing
                if batch.end is End.EXPIRED and not line_finished_before_expiry(key, config):
                    continue
                attempts = self.shared.batch_attempts
                attempts[key] = attempts.get(key, 0) + 1
                pieces = self._answer(batch.model, key, request, attempts[key], serial)
                for piece in pieces:
                    sink.write(piece)
                sink.write(b"\n")
        file_id = "files/" + secrets.token_hex(6)
        self.files[file_id] = _File(out, f"batch-{batch.name}", out.stat().st_size)
        batch.results = file_id

    def _answer(self, model: str, key: str, request: Any, attempt: int,
                serial: int) -> list[bytes]:
        head = b'{"key":' + json.dumps(key).encode() + b","
        try:
            parsed = gemini.parse_request(model, request)
        except Reject as exc:
            return [head, _line_error(3, exc.message)]
        if line_fails(key, attempt, self.shared.config):
            return [head, _line_error(13, "Internal error encountered.")]
        if self.refuse_prompt and self.refuse_prompt.lower() in parsed.prompt.lower():
            return [head, _line_error(3, "The prompt was refused by the content policy.")]
        if self.block_word and self.block_word.lower() in parsed.prompt.lower():
            body = gemini.answer_body(parsed, [], blocked="PROHIBITED_CONTENT")
            return [head, b'"response":', *body, b"}"]
        image = self.draw(parsed, key, serial)
        paid = self.shared.paid_lines
        paid[key] = paid.get(key, 0) + 1
        return [head, b'"response":', *gemini.answer_body(parsed, [image]), b"}"]

    # -- download -------------------------------------------------------------

    async def download(self, request: web.Request) -> web.StreamResponse:
        refused = self.check_key(request)
        if refused is not None:
            return refused
        tail = request.match_info["tail"]
        file_id, _, method = tail.partition(":")
        found = self.files.get("files/" + file_id)
        if method != "download" or request.query.get("alt") != "media" or found is None:
            return _error(404, f"files/{file_id} is not found")
        number = self.shared.count("download")
        size = found.size
        start = 0
        ranged = request.headers.get("Range", "")
        if ranged.startswith("bytes=") and ranged.endswith("-"):
            start = min(int(ranged[6:-1] or 0), size)
        response = web.StreamResponse(status=206 if start else 200)
        response.content_type = "application/octet-stream"
        response.content_length = size - start
        if start:
            response.headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        cut = size // 2 if self.shared.fault(self.shared.config.fault_download) else None
        hang = number == self.shared.config.hang_download
        await response.prepare(request)
        sent = start
        with found.path.open("rb") as handle:
            handle.seek(start)
            while chunk := handle.read(CHUNK):
                if (cut is not None or hang) and sent + len(chunk) > max(start, size // 2):
                    if hang:
                        await self.shared.hang()
                    self.shared.count("download_cut")
                    if request.transport is not None:
                        request.transport.close()
                    return response
                await response.write(chunk)
                sent += len(chunk)
                await asyncio.sleep(0)
        await response.write_eof()
        return response


def _line_error(code: int, message: str) -> bytes:
    return b'"error":' + json.dumps({"code": code, "message": message}).encode() + b"}"


def _error(status: int, message: str) -> web.Response:
    return web.Response(status=status, body=gemini.error_body(status, message),
                        content_type="application/json")


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")
