"""The simulated OpenAI Batch API for image requests, on the batch clock tests control.

``POST /v1/files`` (multipart, purpose ``batch``, streamed to disk),
``POST /v1/batches``, ``GET /v1/batches[/{id}]`` (newest first, ``after`` /
``has_more``), ``POST /v1/batches/{id}/cancel`` and ``GET /v1/files/{id}/content``
(with ``Range``). A batch is validated as the API does (one endpoint, one model,
unique custom_ids, at most 50,000 lines and 200 MB, each body a valid Images API
JSON body); an invalid file makes a *failed* batch with ``errors.data``. When
its time has come (:mod:`batch.sim.batchclock`) its results are written to disk
once: successful lines to the output file, failed and unfinished ones to the
error file, as the real API does, and every image billed is counted per
custom_id and per prompt, so tests can prove nothing was paid for twice.

Test controls: ``POST /_openai_batch/advance`` ``{"seconds": S}``, ``POST
/_openai_batch/config`` (a BatchSimConfig's fields; ``ignore_range``: answer every
download whole, as a server without Range support; ``create_status``: make the
batch, then answer with this status), ``GET /_openai_batch/stats``.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import re
import secrets
from typing import Any

from aiohttp import BodyPartReader, web

from batch.sim import batch_openai_wire as wire
from batch.sim import images_wire
from batch.sim.batch_openai_wire import BatchRec, FileRec
from batch.sim.batchclock import (
    BatchSimConfig,
    BatchSimState,
    End,
    Progress,
    line_fails,
    line_finished_before_expiry,
    planned_end,
    progress,
)
from batch.sim.config import SimConfig
from batch.sim.images import PngMaker, colour, label_lines, request_text
from batch.sim.wire import Parsed

CHUNK = 64 * 1024
_RANGE = re.compile(r"bytes=(\d+)-$")


class OpenAIBatchSim:
    """All files and batches of one simulator; see the module docstring."""

    def __init__(self, config: SimConfig, state: BatchSimState) -> None:
        self.config = config
        self.state = state
        self.pngs = PngMaker(config.payload_bytes)
        self.files: dict[str, FileRec] = {}
        self.batches: dict[str, BatchRec] = {}
        self.paid_by_key: dict[str, int] = {}
        self.serial = 0
        self.ignore_range = False  # answer Range requests with the whole file (a 200)
        self.create_status = 200  # what a create answers after making the batch

    def _id(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}{self.serial:06d}{secrets.token_hex(4)}"

    # ----- routes --------------------------------------------------------------------

    def install(self, app: web.Application) -> None:
        add = app.router.add_route
        add("POST", "/v1/files", self.upload)
        add("GET", "/v1/files/{file_id}/content", self.content)
        add("POST", "/v1/batches", self.create)
        add("GET", "/v1/batches", self.list_batches)
        add("GET", "/v1/batches/{batch_id}", self.retrieve)
        add("POST", "/v1/batches/{batch_id}/cancel", self.cancel)
        add("POST", "/_openai_batch/advance", self.advance)
        add("POST", "/_openai_batch/config", self.set_config)
        add("GET", "/_openai_batch/stats", self.stats)

    def _auth(self, request: web.Request) -> web.Response | None:
        header = request.headers.get("Authorization", "")
        key = header[7:].strip() if header.startswith("Bearer ") else ""
        wanted = self.config.api_key
        if key and (wanted is None or key == wanted):
            return None
        return _error(401, "Incorrect API key provided.", "invalid_api_key")

    async def upload(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._auth(request)) is not None:
            return refused
        n = self.state.count("upload")
        if not request.content_type.startswith("multipart/"):
            return _error(400, "expected multipart/form-data", "invalid_request")
        reader = await request.multipart()
        purpose, saved, name = "", None, ""
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                return _error(400, "nested multipart is not accepted", "invalid_request")
            if part.name == "purpose":
                purpose = (await part.read()).decode()
            elif part.name == "file":
                name = part.filename or ""
                saved = self.state.new_path("upload-")
                size = 0
                with saved.open("wb") as out:
                    while chunk := await part.read_chunk(CHUNK):
                        size += len(chunk)
                        if size > wire.MAX_FILE_BYTES:
                            saved.unlink()
                            return _error(400, "File is too large: a batch file may have at "
                                          "most 200 MB", "file_too_large")
                        out.write(chunk)
        if saved is None:
            return _error(400, "Missing required parameter: 'file'.", "missing_required_parameter")
        if purpose != "batch":
            return _error(400, f"imgbatch's simulator takes purpose 'batch', not {purpose!r}",
                          "invalid_value")
        if self.state.fault(self.state.config.fault_upload):
            self.state.count("fault_upload")
            return _error(503, "The server is overloaded, try again later", "server_error",
                          kind="server_error")
        rec = FileRec(self._id("file-"), saved, saved.stat().st_size, purpose, name,
                      int(self.state.clock.now()))
        self.files[rec.id] = rec
        if n == self.state.config.hang_upload:
            await self.state.hang()
        return web.json_response(wire.file_object(rec))

    async def create(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._auth(request)) is not None:
            return refused
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _error(400, "We could not parse the JSON body of your request.", None)
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object", None)
        for name in ("input_file_id", "endpoint", "completion_window"):
            if not isinstance(body.get(name), str):
                return _error(400, f"Missing required parameter: '{name}'.",
                              "missing_required_parameter", param=name)
        if body["completion_window"] != "24h":
            return _error(400, "Invalid value for 'completion_window': only '24h'.",
                          "invalid_value", param="completion_window")
        if body["endpoint"] not in wire.ENDPOINTS:
            return _error(400, f"Invalid value for 'endpoint': {body['endpoint']!r} (the "
                          "simulator serves image batches only).", "invalid_value",
                          param="endpoint")
        metadata = body.get("metadata") or {}
        if not wire.metadata_ok(metadata):
            return _error(400, "metadata: at most 16 string pairs, keys <= 64 and values "
                          "<= 512 characters", "invalid_value", param="metadata")
        source = self.files.get(body["input_file_id"])
        if source is None:
            return _error(400, f"Invalid 'input_file_id': {body['input_file_id']!r}.",
                          "invalid_value", param="input_file_id")
        n = self.state.count("create")
        rec = BatchRec(self._id("batch_"), n, source.id, body["endpoint"], dict(metadata),
                       self.state.clock.now())
        wire.validate(rec, source.path, self.state.config.max_requests or wire.MAX_LINES)
        if not rec.errors:
            for _key, sha, _body in rec.lines:
                self.state.batch_attempts[sha] = self.state.batch_attempts.get(sha, 0) + 1
        self.batches[rec.id] = rec
        if n == self.state.config.hang_create:
            await self.state.hang()
        if self.create_status != 200:  # made, but the answer says otherwise (a gateway's 502)
            return _error(self.create_status, "upstream error", None, kind="server_error")
        return web.json_response(self._object(rec))

    async def retrieve(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._auth(request)) is not None:
            return refused
        self.state.count("poll")
        if self.state.fault(self.state.config.fault_poll):
            self.state.count("fault_poll")
            return _error(503, "Service unavailable", None, kind="server_error")
        rec = self.batches.get(request.match_info["batch_id"])
        if rec is None:
            return _error(404, "No batch found with that id.", None)
        return web.json_response(self._object(rec))

    async def list_batches(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._auth(request)) is not None:
            return refused
        self.state.count("list")
        if self.state.fault(self.state.config.fault_poll):
            self.state.count("fault_poll")
            return _error(503, "Service unavailable", None, kind="server_error")
        try:
            limit = int(request.query.get("limit", "20"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            return _error(400, "limit must be between 1 and 100", "invalid_value", param="limit")
        newest_first = list(reversed(self.batches.values()))
        after = request.query.get("after")
        if after is not None:
            ids = [rec.id for rec in newest_first]
            if after not in ids:
                return _error(400, f"Invalid 'after': {after!r}.", "invalid_value")
            newest_first = newest_first[ids.index(after) + 1:]
        page = newest_first[:limit]
        data = [self._object(rec) for rec in page]
        body = json.dumps({
            "object": "list", "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(newest_first) > limit,
        }).encode()
        # In pieces, as a page of 100 crosses a real network: a client must read to the end.
        response = web.StreamResponse()
        response.content_type = "application/json"
        response.content_length = len(body)
        await response.prepare(request)
        for start in range(0, len(body), 4096):
            await response.write(body[start:start + 4096])
            await asyncio.sleep(0.002)
        await response.write_eof()
        return response

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._auth(request)) is not None:
            return refused
        self.state.count("cancel")
        rec = self.batches.get(request.match_info["batch_id"])
        if rec is None:
            return _error(404, "No batch found with that id.", None)
        if self._status(rec) not in ("validating", "in_progress"):
            return _error(409, f"Cannot cancel a batch with status '{self._status(rec)}'.",
                          None)
        rec.cancelled_s = self.state.clock.now()
        # The real API answers "cancelling"; the next poll sees "cancelled".
        return web.json_response(wire.batch_object(rec, "cancelling"))

    async def content(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._auth(request)) is not None:
            return refused
        n = self.state.count("download")
        rec = self.files.get(request.match_info["file_id"])
        if rec is None:
            return _error(404, "No such File object.", None)
        start, status = 0, 200
        found = _RANGE.match(request.headers.get("Range", "").strip())
        if found is not None and int(found.group(1)) < rec.bytes and not self.ignore_range:
            start, status = int(found.group(1)), 206
            self.state.count("download_range")
        response = web.StreamResponse(status=status)
        response.content_type = "application/octet-stream"
        response.content_length = rec.bytes - start
        if status == 206:
            response.headers["Content-Range"] = f"bytes {start}-{rec.bytes - 1}/{rec.bytes}"
        response.headers["Accept-Ranges"] = "bytes"
        cut = self.state.fault(self.state.config.fault_download)
        hang = n == self.state.config.hang_download
        limit = start + (rec.bytes - start) // 2 if cut or hang else rec.bytes
        if cut:
            self.state.count("fault_download")
        await response.prepare(request)
        try:
            with rec.path.open("rb") as handle:
                handle.seek(start)
                sent = start
                while sent < limit:
                    chunk = handle.read(min(CHUNK, limit - sent))
                    if not chunk:
                        break
                    await response.write(chunk)
                    sent += len(chunk)
            if hang:
                await self.state.hang()
            if cut and request.transport is not None:
                request.transport.close()  # what was written goes out, then FIN
                return response
        except ConnectionError:
            return response
        await response.write_eof()
        return response

    async def advance(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.state.clock.advance(float(body.get("seconds", 0)))
        return web.json_response({"offset_s": self.state.clock.offset_s})

    async def set_config(self, request: web.Request) -> web.Response:
        body = await request.json()
        known = {f.name for f in dataclasses.fields(BatchSimConfig)}
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in body.items()
                  if k in known}
        self.state.config = dataclasses.replace(self.state.config, **values)
        self.ignore_range = bool(body.get("ignore_range", False))
        self.create_status = int(body.get("create_status", 200))
        return web.json_response({"ok": True})

    async def stats(self, request: web.Request) -> web.Response:
        results = sum(f.bytes for f in self.files.values() if f.purpose == "batch_output")
        return web.json_response({**self.state.stats(), "paid_by_key": self.paid_by_key,
                                  "batches": len(self.batches), "result_file_bytes": results})

    # ----- batches -------------------------------------------------------------------

    def _object(self, rec: BatchRec) -> dict[str, Any]:
        return wire.batch_object(rec, self._status(rec))

    def _status(self, rec: BatchRec) -> str:
        if rec.status:
            return rec.status
        if rec.errors:
            rec.status = "failed"
            return rec.status
        now = self.state.clock.now()
        if rec.cancelled_s is not None:
            self._finish(rec, End.EXPIRED, "batch_cancelled")
            rec.status = "cancelled"
            return rec.status
        stage = progress(rec.created_s, now, self.state.config.delay_s)
        if stage is Progress.PENDING:
            return "validating"
        if stage is Progress.RUNNING:
            return "in_progress"
        end = planned_end(rec.ordinal, self.state.config)
        if end is End.FAILED:
            rec.errors.append({"code": "simulated_failure", "line": None, "param": None,
                               "message": "the batch failed (simulated)"})
            rec.status = "failed"
            return rec.status
        self._finish(rec, end, "batch_expired")
        rec.status = "expired" if end is End.EXPIRED else "completed"
        return rec.status

    def _finish(self, rec: BatchRec, end: End, unfinished_code: str) -> None:
        """Run every line once: write the output and error files, bill the images."""
        out_path, err_path = self.state.new_path("output-"), self.state.new_path("errors-")
        with out_path.open("wb") as out, err_path.open("wb") as err:
            for key, sha, body in rec.lines:
                line_id = self._id("batch_req_")
                finished = line_finished_before_expiry(key, self.state.config)
                if end is not End.SUCCEEDED and not finished:
                    why = ("This request could not be executed before the completion window "
                           "ended." if unfinished_code == "batch_expired" else
                           "The batch was cancelled before this request executed.")
                    err.write(wire.output_line(line_id, key, None,
                                               {"code": unfinished_code, "message": why}))
                    rec.failed += 1
                    continue
                status, pieces = self._run(key, sha, body)
                target = out if status == 200 else err
                head, tail = wire.output_line(line_id, key, (status, f"req_{line_id[-8:]}"), None,
                                   split=True)
                target.write(head)
                for piece in pieces:
                    target.write(piece)
                target.write(tail)
                if status == 200:
                    rec.completed += 1
                else:
                    rec.failed += 1
        for path, attr in ((out_path, "output_file_id"), (err_path, "error_file_id")):
            size = path.stat().st_size
            if size:
                rec_file = FileRec(self._id("file-"), path, size, "batch_output",
                                   path.name + ".jsonl", int(self.state.clock.now()))
                self.files[rec_file.id] = rec_file
                setattr(rec, attr, rec_file.id)

    def _run(self, key: str, sha: str, body: dict[str, Any]) -> tuple[int, list[bytes]]:
        """One line's answer: (status, body pieces); a 200 is billed."""
        prompt = str(body.get("prompt", ""))
        attempt = self.state.batch_attempts.get(sha, 1)
        block = self.config.block_word or self.config.refuse_prompt
        if block and block.lower() in prompt.lower():
            return 400, [images_wire.moderation_blocked()]
        if line_fails(prompt, attempt, self.state.config):
            if int(sha[:2], 16) % 2:
                return 429, [images_wire.error_body("Rate limit reached for images",
                                                    "rate_limit_error", "rate_limit_exceeded")]
            return 500, [images_wire.error_body("The server had an error processing your "
                                                "request.", "server_error", None)]
        edit = "images" in body
        fields = {k: v for k, v in body.items() if k != "images"}
        parsed = images_wire.parse_fields(fields, len(body.get("images") or []), edit=edit)
        self.state.paid_lines[sha] = self.state.paid_lines.get(sha, 0) + 1
        self.paid_by_key[key] = self.paid_by_key.get(key, 0) + 1
        b64 = base64.b64encode(self._png(parsed, key, sha))
        return 200, images_wire.answer_body(parsed, [b64], str(body.get("quality", "auto")))

    def _png(self, parsed: Parsed, key: str, sha: str) -> bytes:
        width, height = parsed.pixels or (1024, 1024)
        dims = [max(1, round(side * self.config.scale)) for side in (width, height)]
        label = tuple(label_lines(key, parsed.prompt))
        return self.pngs.png(dims[0], dims[1], colour(sha, 0),
                             request_text(sha, self.state.batch_attempts.get(sha, 1)), label)

def _error(status: int, message: str, code: str | None, *, param: str | None = None,
           kind: str = "invalid_request_error") -> web.Response:
    return web.Response(status=status, body=images_wire.error_body(message, kind, code, param),
                        content_type="application/json")


def install(app: web.Application, config: SimConfig,
            state: BatchSimState | None = None) -> OpenAIBatchSim:
    """Serve the OpenAI Batch API on ``app``, sharing ``state`` with the other batch sim."""
    sim = OpenAIBatchSim(config, state or BatchSimState(config.batch))
    sim.install(app)
    return sim
