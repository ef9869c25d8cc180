"""The simulated OpenAI Batch API's records and layouts, without the server.

Files and batches as the simulator keeps them, the input file's validation as
the API's ``validating`` step does it (one endpoint, one model, unique
custom_ids, each body a valid Images API JSON body, at most 50,000 lines), and
the JSON the API answers with: Batch and File objects, request-output lines.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batch.sim import images_wire
from batch.sim.wire import Reject

ENDPOINTS = ("/v1/images/generations", "/v1/images/edits")
MAX_LINES = 50_000
MAX_FILE_BYTES = 200_000_000


@dataclass
class FileRec:
    id: str
    path: Path
    bytes: int
    purpose: str
    filename: str
    created_at: int


@dataclass
class BatchRec:
    id: str
    ordinal: int
    input_file_id: str
    endpoint: str
    metadata: dict[str, str]
    created_s: float
    lines: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)  # key, sha, body
    errors: list[dict[str, Any]] = field(default_factory=list)  # validation errors
    cancelled_s: float | None = None
    status: str = ""  # set once final
    output_file_id: str | None = None
    error_file_id: str | None = None
    completed: int = 0
    failed: int = 0


def validate(rec: BatchRec, path: Path, limit: int) -> None:
    """Read the input file as the API's validation step does: ``rec.lines`` (key, prompt
    sha256, body) of the valid lines, ``rec.errors`` as ``errors.data`` has them."""
    seen: set[str] = set()
    models: set[str] = set()
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            problem = check_line(raw, rec.endpoint, seen, models, rec)
            if problem is not None:
                rec.errors.append({"code": problem[0], "message": problem[1],
                                   "param": None, "line": number})
            if len(rec.errors) >= 10:
                break
    if len(rec.lines) > limit:
        rec.errors.append({"code": "too_many_requests", "line": None, "param": None,
                           "message": f"{len(rec.lines)} requests, over {limit}"})
    if len(models) > 1:
        rec.errors.append({"code": "mismatched_model", "line": None, "param": None,
                           "message": "all requests of a batch must use one model, "
                           f"found {sorted(models)}"})
    if not rec.lines and not rec.errors:
        rec.errors.append({"code": "empty_file", "line": None, "param": None,
                           "message": "the input file has no requests"})

def check_line(raw: bytes, endpoint: str, seen: set[str], models: set[str],
               rec: BatchRec) -> tuple[str, str] | None:
    """(code, message) of what is wrong with one input line, or None (it joins rec.lines)."""
    try:
        line = json.loads(raw)
    except ValueError:
        return "invalid_json", "the line is not valid JSON"
    if not isinstance(line, dict):
        return "invalid_request", "the line is not a JSON object"
    key, body = line.get("custom_id"), line.get("body")
    if not isinstance(key, str) or not key:
        return "invalid_request", "custom_id is required"
    if key in seen:
        return "duplicate_custom_id", f"custom_id {key!r} appears more than once"
    seen.add(key)
    if line.get("method") != "POST":
        return "invalid_request", "method must be POST"
    if line.get("url") != endpoint:
        return "mismatched_endpoint", f"url {line.get('url')!r} is not the batch's " \
            f"endpoint {endpoint}"
    if not isinstance(body, dict):
        return "invalid_request", "body must be a JSON object"
    try:
        edit = endpoint.endswith("/edits")
        count = images_wire.json_images(body) if edit else 0
        fields = {k: v for k, v in body.items() if k != "images"}
        parsed = images_wire.parse_fields(fields, count, edit=edit)
    except Reject as exc:
        return exc.code or "invalid_request", exc.message
    models.add(parsed.model)
    rec.lines.append((key, hashlib.sha256(parsed.prompt.encode()).hexdigest(), body))
    return None


def batch_object(rec: BatchRec, status: str) -> dict[str, Any]:
    """The Batch object the API answers with for ``rec`` in ``status``."""
    created = int(rec.created_s)
    return {
        "id": rec.id, "object": "batch", "endpoint": rec.endpoint,
        "errors": {"object": "list", "data": rec.errors} if rec.errors else None,
        "input_file_id": rec.input_file_id, "completion_window": "24h",
        "status": status, "output_file_id": rec.output_file_id,
        "error_file_id": rec.error_file_id, "created_at": created,
        "expires_at": created + 86400,
        "cancelled_at": int(rec.cancelled_s) if status == "cancelled" and rec.cancelled_s
        else None,
        "request_counts": {"total": len(rec.lines), "completed": rec.completed,
                           "failed": rec.failed},
        "metadata": rec.metadata or None,
    }


def output_line(line_id: str, key: str, response: tuple[int, str] | None,
          error: dict[str, str] | None, split: bool = False) -> Any:
    """A request-output line; with ``split``, (head, tail) around the response body."""
    mark = "@@BODY@@"
    document: dict[str, Any] = {"id": line_id, "custom_id": key, "response": None,
                                "error": error}
    if response is not None:
        document["response"] = {"status_code": response[0], "request_id": response[1],
                                "body": mark}
    text = json.dumps(document)
    if not split:
        return text.encode() + b"\n"
    head, tail = text.split(json.dumps(mark), 1)
    return head.encode(), tail.encode() + b"\n"


def metadata_ok(metadata: Any) -> bool:
    return isinstance(metadata, dict) and len(metadata) <= 16 and all(
        isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
        for k, v in metadata.items())


def file_object(rec: FileRec) -> dict[str, Any]:
    return {"id": rec.id, "object": "file", "bytes": rec.bytes, "created_at": rec.created_at,
            "filename": rec.filename, "purpose": rec.purpose, "status": "processed",
            "expires_at": rec.created_at + 30 * 86400}
