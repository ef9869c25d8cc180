"""OpenAI's Batch API for image requests, without any I/O.

What was checked (openai-python ``resources/batches.py``, ``files.py``,
``types/batch*.py``; the API reference's request-input / request-output objects):

- input: JSONL, one ``{"custom_id", "method": "POST", "url", "body"}`` per line,
  ``url`` the batch's ``endpoint`` (``/v1/images/generations`` or ``/v1/images/edits``);
  at most 50,000 lines and 200 MB per file, and one model per file (the runner's
  :func:`batch.runners.batchplan.split` cuts by these, one (model, route) each);
- the body is the sync Images API's JSON (:mod:`batch.providers.images_wire`); an
  edit goes in the JSON form ``images: [{"image_url": "data:..."}]`` (local files
  inline as data URLs), since a batch line cannot carry a multipart upload;
- output and error files: ``{"id", "custom_id", "response": {"status_code",
  "request_id", "body"}, "error"}``; an HTTP failure has ``response.status_code``
  != 200 and the usual error object in ``body``, a non-HTTP one has ``response``
  null and ``error: {"code", "message"}`` with ``batch_expired``,
  ``batch_cancelled`` or ``request_timeout``.

:func:`read_line` reads one results line once
:func:`batch.providers.batchlines.decode_lines` has streamed its ``b64_json`` out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from batch.errors import JobError, MalformedResponse, RetryableError
from batch.images import StagedImage
from batch.jobs import InputKind, Job
from batch.providers import images_wire
from batch.providers.batchapi import LineError, LineErrorKind, ResultLine
from batch.providers.bodies import BodyParts, cut_json, local_files
from batch.providers.chat_wire import data_url_head

GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"
COMPLETION_WINDOW = "24h"
MAX_LINES = 50_000
# "up to 200 MB": read as decimal megabytes, the smaller reading.
MAX_FILE_BYTES = 200_000_000
TAG_KEY = "imgbatch_tag"  # the metadata key our tag goes under (keys <= 64, values <= 512 chars)

# The provider's batch states and what they mean for us. Only completed, failed,
# expired and cancelled are final; cancelling still ends in cancelled (with an
# output file of what finished), so it is polled like a running batch.
STATES: dict[str, str] = {
    "validating": "pending",
    "in_progress": "running",
    "finalizing": "running",
    "cancelling": "running",
    "completed": "succeeded",
    "failed": "failed",
    "expired": "expired",
    "cancelled": "cancelled",
}


def neutral_state(status: object) -> str:
    """The neutral name (BatchState value) of an OpenAI batch ``status``.

    An unknown status is treated as still running: guessing "finished" would
    resubmit jobs that may yet be paid for.
    """
    return STATES.get(status, "running") if isinstance(status, str) else "running"


def endpoint_for(job: Job) -> str:
    return EDITS if images_wire.is_edit(job) else GENERATIONS


# ----- request lines -----------------------------------------------------------------


def line_parts(job: Job, key: str, token: str) -> BodyParts:
    """One request line (newline included) for ``job`` under ``custom_id`` ``key``.

    Local input images are cut out of the text and streamed from disk as data
    URLs, as for a sync JSON body.
    """
    files = local_files(job)

    def build(file_url: Any) -> dict[str, Any]:
        body = images_wire.fields(job)
        if job.images:
            body["images"] = [
                {"image_url": file_url(image) if image.kind is InputKind.FILE else image.ref}
                for image in job.images
            ]
        return {"custom_id": key, "method": "POST", "url": endpoint_for(job), "body": body}

    heads = tuple(data_url_head(image) for image in files)
    parts = cut_json(build, files, heads, token)
    return BodyParts((*parts.pieces[:-1], parts.pieces[-1] + b"\n"), parts.files, parts.heads)


def create_body(input_file_id: str, endpoint: str, tag: str) -> dict[str, Any]:
    return {"input_file_id": input_file_id, "endpoint": endpoint,
            "completion_window": COMPLETION_WINDOW, "metadata": {TAG_KEY: tag}}


def tag_of(batch: Any) -> str | None:
    metadata = batch.get("metadata") if isinstance(batch, dict) else None
    tag = metadata.get(TAG_KEY) if isinstance(metadata, dict) else None
    return tag if isinstance(tag, str) else None


def next_page(page: Any) -> str | None:
    """The ``after`` cursor of the page after ``page``, or None at the end (as the SDK)."""
    if not isinstance(page, dict):
        return None
    data = page.get("data")
    if page.get("has_more") is False or not isinstance(data, list) or not data:
        return None
    last = data[-1].get("id") if isinstance(data[-1], dict) else None
    return last if isinstance(last, str) else None


def counts(batch: Any) -> tuple[int, int, int]:
    """(total, completed, failed) from ``request_counts`` (zeros when absent)."""
    found = batch.get("request_counts") if isinstance(batch, dict) else None
    found = found if isinstance(found, dict) else {}
    values = [found.get(k) for k in ("total", "completed", "failed")]
    total, completed, failed = (v if isinstance(v, int) else 0 for v in values)
    return total, completed, failed


def batch_errors(batch: Any) -> str:
    """A short message from a failed batch's ``errors.data`` (validation errors)."""
    errors = batch.get("errors") if isinstance(batch, dict) else None
    data = errors.get("data") if isinstance(errors, dict) else None
    if not isinstance(data, list) or not data:
        return ""
    parts = []
    for item in data[:3]:
        if isinstance(item, dict):
            line = f"line {item['line']}: " if isinstance(item.get("line"), int) else ""
            parts.append(f"{line}{item.get('code') or ''} {item.get('message') or ''}".strip())
    more = f" (+{len(data) - 3} more)" if len(data) > 3 else ""
    return "; ".join(parts) + more


# ----- result lines ------------------------------------------------------------------


def read_line(document: Any, streamed: Mapping[str, int],
              staged: Mapping[int, StagedImage]) -> ResultLine:
    """One output / error file line, its images already streamed out (a ReadLine of
    :func:`batch.providers.batchlines.decode_lines`); MalformedResponse if it is no result.
    """
    if not isinstance(document, dict) or not isinstance(document.get("custom_id"), str):
        raise MalformedResponse("a results line has no custom_id")
    key = document["custom_id"]
    response = document.get("response")
    if not (isinstance(response, dict) and isinstance(response.get("status_code"), int)):
        return ResultLine(key, error=unrun_error(document.get("error")))
    status, body = response["status_code"], response.get("body")
    if status != 200:
        raw = json.dumps(body).encode() if body is not None else b""
        return ResultLine(key, error=line_error(
            images_wire.error_for_status(status, {}, raw, key, 0.0)))
    try:
        answer = images_wire.interpret(body, streamed, key)
    except JobError as exc:
        return ResultLine(key, error=line_error(exc))
    images = tuple(staged[i] for i in answer.image_indexes if i in staged)
    return ResultLine(key, images=images, usage=answer.usage, text=answer.text)


def line_error(exc: JobError) -> LineError:
    """An HTTP line error in neutral terms: retryable (429, 5xx, no image), or refused
    (blocked, invalid, and 401/403, which no resubmission mends)."""
    code = error_code(exc)
    # insufficient_quota: the line is sound, the account is not; pending until it is.
    retry = isinstance(exc, RetryableError) or exc.type == "quota_exhausted"
    kind = LineErrorKind.RETRYABLE if retry else LineErrorKind.REFUSED
    return LineError(kind, code, exc.message)


def error_code(exc: JobError) -> str:
    """The HTTP status of a refusal; for a 200 without a usable image, the error's type."""
    return str(exc.http_status) if exc.http_status not in (None, 200) else exc.type


def unrun_error(error: Any) -> LineError:
    """A non-HTTP line error (``batch_expired``, ``batch_cancelled``,
    ``request_timeout``): the line was not answered, so not paid for; retryable,
    as is a code we do not know."""
    code = error.get("code") if isinstance(error, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    code = code if isinstance(code, str) and code else "error"
    return LineError(LineErrorKind.RETRYABLE, code,
                     f"not run by the batch: {code}: {message or 'no message'}")
