"""OpenAI's Batch API for image requests, without any I/O.

What was checked (openai-python ``resources/batches.py``, ``files.py``,
``types/batch*.py``; the API reference's request-input / request-output objects):

- input: JSONL, one ``{"custom_id", "method": "POST", "url", "body"}`` per line,
  ``url`` the batch's ``endpoint`` (``/v1/images/generations`` or ``/v1/images/edits``);
  at most 50,000 lines and 200 MB per file, and one model per file;
- the body is the sync Images API's JSON (:mod:`batch.providers.images_wire`); an
  edit goes in the JSON form ``images: [{"image_url": "data:..."}]`` (local files
  inline as data URLs), since a batch line cannot carry a multipart upload;
- output and error files: ``{"id", "custom_id", "response": {"status_code",
  "request_id", "body"}, "error"}``; an HTTP failure has ``response.status_code``
  != 200 and the usual error object in ``body``, a non-HTTP one has ``response``
  null and ``error: {"code", "message"}`` with ``batch_expired``,
  ``batch_cancelled`` or ``request_timeout``.

:class:`ResultLines` splits a results file into lines and streams every line's
``b64_json`` through the shared :class:`~batch.decoder.BodyDecoder`, so neither a
line nor an image is ever held whole.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from batch.decoder import BodyDecoder, Event, ImageBegin, ImageBytes, ImageEnd, placeholder
from batch.errors import (
    JobError,
    MalformedResponse,
    RequestTimeout,
    ServerError,
)
from batch.jobs import InputKind, Job
from batch.providers import images_wire
from batch.providers.bodies import BodyParts, cut_json, local_files
from batch.providers.chat_wire import data_url_head

GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"
COMPLETION_WINDOW = "24h"
MAX_LINES = 50_000
# "up to 200 MB": read as decimal megabytes, the smaller reading.
MAX_FILE_BYTES = 200_000_000
TAG_KEY = "imgbatch_tag"  # the metadata key our tag goes under (keys <= 64, values <= 512 chars)
# Line-level error codes (request-output object) that say "not run", not "refused".
_NOT_BLANK = re.compile(rb"[^ \t\r]")
RETRY_CODES = frozenset({"batch_expired", "batch_cancelled", "request_timeout"})

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


@dataclass(frozen=True, slots=True)
class Sized:
    """A job ready to be placed in a batch: its key, endpoint, model and line bytes."""

    key: str
    endpoint: str
    model: str
    line_bytes: int


@dataclass(frozen=True, slots=True)
class Group:
    """The keys of one batch, in file order, with its endpoint, model and file size."""

    endpoint: str
    model: str
    keys: tuple[str, ...]
    file_bytes: int


def plan_batches(
    items: Iterable[Sized], *, max_lines: int = MAX_LINES, max_bytes: int = MAX_FILE_BYTES
) -> tuple[list[Group], list[str]]:
    """Cut jobs into batches: one endpoint and one model each, under both limits.

    Returns the groups (in first-seen order of endpoint and model; jobs keep their
    order) and the keys whose line alone is over ``max_bytes`` (they cannot be
    batched). Greedy: a batch is closed when the next line would not fit.
    """
    open_groups: dict[tuple[str, str], tuple[list[str], int]] = {}
    order: list[tuple[str, str]] = []
    done: list[Group] = []
    too_big: list[str] = []
    for item in items:
        if item.line_bytes > max_bytes:
            too_big.append(item.key)
            continue
        slot = (item.endpoint, item.model)
        if slot not in open_groups:
            open_groups[slot] = ([], 0)
            order.append(slot)
        keys, size = open_groups[slot]
        if keys and (len(keys) >= max_lines or size + item.line_bytes > max_bytes):
            done.append(Group(slot[0], slot[1], tuple(keys), size))
            keys, size = [], 0
        keys.append(item.key)
        open_groups[slot] = (keys, size + item.line_bytes)
    for slot in order:
        keys, size = open_groups[slot]
        if keys:
            done.append(Group(slot[0], slot[1], tuple(keys), size))
    return done, too_big


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


@dataclass(frozen=True, slots=True)
class LineEnd:
    """A result line ended: its key, and either its error or its answer's images.

    ``images`` are the indexes (among this line's ImageBegin events) that are the
    answer's images; the others must be discarded.
    """

    key: str
    images: tuple[int, ...]
    usage: dict[str, Any] | None
    error: JobError | None
    end_offset: int  # bytes of the file consumed through this line's newline


LineEvent = ImageBegin | ImageBytes | ImageEnd | LineEnd


class ResultLines:
    """Push parser of an output or error file: feed chunks, get events per line.

    Image events carry indexes counted within their line; every line ends with
    a :class:`LineEnd`. A line that is not a result (bad JSON, no custom_id)
    raises MalformedResponse: the file is not what the API writes.
    """

    def __init__(self, *, start_offset: int = 0) -> None:
        self._decoder = BodyDecoder(raw_keys=images_wire.RAW_KEYS)
        self._offset = start_offset  # file offset of the next byte fed
        self._blank = True  # the current line holds only whitespace so far
        self._images = 0  # images begun in the current line
        self._partial = 0  # bytes of the current line fed so far (not yet in _offset)

    @property
    def offset(self) -> int:
        """File offset just past the last newline seen (where a resumed download starts)."""
        return self._offset

    def feed(self, chunk: bytes) -> Iterator[LineEvent]:
        """Events for ``chunk``; iterate to the end (the input is consumed as you go)."""
        pos, end = 0, len(chunk)
        while pos < end:
            cut = chunk.find(b"\n", pos)
            stop = end if cut < 0 else cut
            if stop > pos:
                if self._blank and _NOT_BLANK.search(chunk, pos, stop):
                    self._blank = False
                if not self._blank:
                    for event in self._decoder.feed(chunk[pos:stop]):
                        if type(event) is ImageBegin:
                            self._images += 1
                        yield event
            if cut < 0:
                self._partial += stop - pos
                return
            self._offset += self._partial + stop - pos + 1
            self._partial = 0
            pos = cut + 1
            yield from self._close()

    def finish(self) -> Iterator[LineEvent]:
        """The last line's events when the file does not end with a newline."""
        self._offset += self._partial
        self._partial = 0
        yield from self._close()

    def _close(self) -> Iterator[LineEvent]:
        decoder, blank, images = self._decoder, self._blank, self._images
        self._decoder = BodyDecoder(raw_keys=images_wire.RAW_KEYS)
        self._blank, self._images = True, 0
        if blank:
            return
        document = decoder.finish()
        streamed = {placeholder(i): i for i in range(images)}
        yield interpret_line(document, streamed, self._offset)


def interpret_line(document: Any, streamed: Mapping[str, int], end_offset: int) -> LineEnd:
    """What one result line (its images already streamed out) says."""
    if not isinstance(document, dict) or not isinstance(document.get("custom_id"), str):
        raise MalformedResponse("a results line has no custom_id")
    key = document["custom_id"]
    response = document.get("response")
    error = document.get("error")
    if isinstance(response, dict) and isinstance(response.get("status_code"), int):
        status = response["status_code"]
        body = response.get("body")
        if status == 200:
            try:
                answer = images_wire.interpret(body, streamed, key)
            except JobError as exc:
                return LineEnd(key, (), None, exc, end_offset)
            usage = dict(answer.usage) if answer.usage else None
            return LineEnd(key, answer.image_indexes, usage, None, end_offset)
        raw = json.dumps(body).encode() if body is not None else b""
        failure = images_wire.error_for_status(status, {}, raw, key, 0.0)
        return LineEnd(key, (), None, failure, end_offset)
    return LineEnd(key, (), None, line_error(key, error), end_offset)


def line_error(key: str, error: Any) -> JobError:
    """A non-HTTP line error: expired, cancelled and timed-out lines are retryable."""
    code = error.get("code") if isinstance(error, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    text = f"{code or 'error'}: {message or 'no message'}"
    if code == "request_timeout":
        return RequestTimeout(f"inside the batch: {text}", job_id=key)
    # batch_expired, batch_cancelled, and any code we do not know: the line was
    # not answered, so it is not paid for; sending it again is right.
    return ServerError(f"not run by the batch: {text}", job_id=key)


def events_of(chunks: Sequence[bytes]) -> list[Event | LineEnd]:
    """All events of a whole file given in ``chunks`` (for tests and small files)."""
    parser = ResultLines()
    out: list[Event | LineEnd] = []
    for chunk in chunks:
        out.extend(parser.feed(chunk))
    out.extend(parser.finish())
    return out
