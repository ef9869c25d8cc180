"""Tables for the pure parts of the OpenAI Batch API client (batch_openai_wire)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from batch.decoder import ImageBegin, ImageBytes, ImageEnd
from batch.errors import Blocked, JobError, MalformedResponse, RateLimited, ServerError
from batch.jobs import InputImage, InputKind, Job
from batch.providers import batch_openai_wire as wire
from batch.providers.batch_openai import _skip_for, info_of, line_error
from batch.providers.batchapi import BatchState, LineErrorKind
from batch.providers.transport import stream_body

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40


@pytest.mark.parametrize(("status", "state"), [
    ("validating", BatchState.PENDING),
    ("in_progress", BatchState.RUNNING),
    ("finalizing", BatchState.RUNNING),
    ("cancelling", BatchState.RUNNING),
    ("completed", BatchState.SUCCEEDED),
    ("failed", BatchState.FAILED),
    ("expired", BatchState.EXPIRED),
    ("cancelled", BatchState.CANCELLED),
    ("something_new", BatchState.RUNNING),  # never guess "finished"
    (None, BatchState.RUNNING),
])
def test_states(status: Any, state: BatchState) -> None:
    assert BatchState(wire.neutral_state(status)) is state


G, E = wire.GENERATIONS, wire.EDITS


def sized(key: str, endpoint: str = G, model: str = "gpt-image-1", size: int = 10) -> wire.Sized:
    return wire.Sized(key, endpoint, model, size)


@pytest.mark.parametrize(("items", "limits", "groups", "too_big"), [
    ([], (3, 100), [], []),
    ([sized("a"), sized("b")], (3, 100), [(G, "gpt-image-1", ("a", "b"), 20)], []),
    # the line count closes a batch
    ([sized(k) for k in "abcd"], (3, 100),
     [(G, "gpt-image-1", ("a", "b", "c"), 30), (G, "gpt-image-1", ("d",), 10)], []),
    # bytes close a batch: 10 + 10 + 10 > 25
    ([sized(k) for k in "abc"], (9, 25),
     [(G, "gpt-image-1", ("a", "b"), 20), (G, "gpt-image-1", ("c",), 10)], []),
    # exactly at the byte limit fits
    ([sized("a", size=15), sized("b", size=10)], (9, 25),
     [(G, "gpt-image-1", ("a", "b"), 25)], []),
    # one endpoint and one model per batch, jobs keep their order within each
    ([sized("a"), sized("b", E), sized("c", model="gpt-image-1-mini"), sized("d")], (9, 100),
     [(G, "gpt-image-1", ("a", "d"), 20), (E, "gpt-image-1", ("b",), 10),
      (G, "gpt-image-1-mini", ("c",), 10)], []),
    # a line alone over the file limit cannot be batched
    ([sized("a", size=26), sized("b")], (9, 25), [(G, "gpt-image-1", ("b",), 10)], ["a"]),
])
def test_plan_batches(items: list[wire.Sized], limits: tuple[int, int],
                      groups: list[tuple[str, str, tuple[str, ...], int]],
                      too_big: list[str]) -> None:
    found, big = wire.plan_batches(items, max_lines=limits[0], max_bytes=limits[1])
    assert [(g.endpoint, g.model, g.keys, g.file_bytes) for g in found] == groups
    assert big == too_big


def test_plan_batches_default_limits_are_the_apis() -> None:
    found, _ = wire.plan_batches(sized(str(i), size=1) for i in range(50_001))
    assert [len(g.keys) for g in found] == [50_000, 1]
    found, _ = wire.plan_batches([sized("a", size=150_000_000), sized("b", size=50_000_000),
                                  sized("c", size=1)])
    assert [g.keys for g in found] == [("a", "b"), ("c",)]


def job(images: tuple[InputImage, ...] = (), **options: str) -> Job:
    return Job(id="j1", prompt="a red \"fox\"\n", model="gpt-image-1", aspect_ratio="3:2",
               image_size="1K", images=images, options=options)


async def _collect(parts: Any) -> bytes:
    if not parts.files:
        return b"".join(parts.pieces)
    return b"".join([c async for c in stream_body(parts, [])])


def test_generation_line() -> None:
    parts = wire.line_parts(job(quality="low"), "key-1", "tok")
    text = asyncio.run(_collect(parts))
    assert text.endswith(b"}\n") and text.count(b"\n") == 1
    assert len(text) == parts.length()
    line = json.loads(text)
    assert line == {"custom_id": "key-1", "method": "POST", "url": "/v1/images/generations",
                    "body": {"model": "gpt-image-1", "prompt": "a red \"fox\"\n", "n": 1,
                             "size": "1536x1024", "quality": "low"}}


def test_edit_line_inlines_local_files_as_data_urls(tmp_path: Path) -> None:
    path = tmp_path / "in.png"
    path.write_bytes(PNG)
    local = InputImage(InputKind.FILE, str(path), "in.png", "image/png",
                       hashlib.sha256(PNG).hexdigest(), len(PNG))
    remote = InputImage(InputKind.URL, "https://example.com/a.png", "a", None, "d")
    parts = wire.line_parts(job((local, remote)), "k", "tok")
    text = asyncio.run(_collect(parts))
    assert len(text) == parts.length()
    line = json.loads(text)
    assert line["url"] == "/v1/images/edits"
    assert line["body"]["images"] == [
        {"image_url": "data:image/png;base64," + base64.b64encode(PNG).decode()},
        {"image_url": "https://example.com/a.png"},
    ]


def out_line(key: str, status: int | None, body: Any = None, error: Any = None) -> bytes:
    response = None if status is None else {"status_code": status, "request_id": "req_1",
                                            "body": body}
    return json.dumps({"id": "batch_req_1", "custom_id": key, "response": response,
                       "error": error}).encode() + b"\n"


def image_body(data: bytes) -> dict[str, Any]:
    return {"created": 1, "data": [{"b64_json": base64.b64encode(data).decode()}],
            "usage": {"input_tokens": 5, "output_tokens": 272}}


def run_lines(blob: bytes, chunk: int) -> tuple[list[bytes], list[wire.LineEnd]]:
    """Feed ``blob`` in ``chunk``-byte pieces; the images (joined) and the line ends."""
    parser = wire.ResultLines()
    images: list[bytes] = []
    ends: list[wire.LineEnd] = []
    current = bytearray()
    pieces = [blob[i:i + chunk] for i in range(0, len(blob), chunk)]
    for event in [e for p in pieces for e in parser.feed(p)] + list(parser.finish()):
        if isinstance(event, ImageBegin):
            current = bytearray()
        elif isinstance(event, ImageBytes):
            current += event.data
        elif isinstance(event, ImageEnd):
            images.append(bytes(current))
        else:
            ends.append(event)
    return images, ends


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1000, 1 << 20])
def test_result_lines_stream_images_and_errors(chunk: int) -> None:
    other = PNG[::-1]
    blob = (
        out_line("ok", 200, image_body(PNG))
        + b"\r\n"  # a blank (CRLF) line is no result
        + out_line("blocked", 400, {"error": {"message": "Your request was rejected by the "
                                              "safety system.", "type": "image_generation_"
                                              "user_error", "code": "moderation_blocked"}})
        + out_line("busy", 429, {"error": {"message": "Rate limit", "code": None}})
        + out_line("oops", 500, {"error": {"message": "server had an error"}})
        + out_line("late", None, None, {"code": "batch_expired", "message": "not run"})
        + out_line("slow", None, None, {"code": "request_timeout", "message": "timed out"})
        + out_line("empty", 200, {"created": 1, "data": []})
        + out_line("ok2", 200, image_body(other)).rstrip(b"\n")  # no final newline
    )
    images, ends = run_lines(blob, chunk)
    assert images == [PNG, other]
    assert [e.key for e in ends] == ["ok", "blocked", "busy", "oops", "late", "slow", "empty",
                                     "ok2"]
    errors = {e.key: e.error for e in ends}
    assert errors["ok"] is None and errors["ok2"] is None
    assert isinstance(errors["blocked"], Blocked)
    assert isinstance(errors["busy"], RateLimited)
    assert isinstance(errors["oops"], ServerError)
    assert ends[0].images == (0,) and ends[-1].images == (0,)  # indexes count within the line
    assert ends[0].usage == {"input_tokens": 5, "output_tokens": 272}
    assert ends[-1].end_offset == len(blob)
    assert ends[0].end_offset == len(out_line("ok", 200, image_body(PNG)))
    kinds = {e.key: line_error(e.error).kind for e in ends if e.error is not None}
    assert kinds == {"blocked": LineErrorKind.REFUSED, "busy": LineErrorKind.RETRYABLE,
                     "oops": LineErrorKind.RETRYABLE, "late": LineErrorKind.RETRYABLE,
                     "slow": LineErrorKind.RETRYABLE, "empty": LineErrorKind.RETRYABLE}
    refused = line_error(errors["blocked"])  # type: ignore[arg-type]
    assert refused.code == "400" and "safety system" in refused.message
    assert "moderation_blocked" not in line_error(errors["late"]).message  # type: ignore[arg-type]


@pytest.mark.parametrize(("status", "code", "kind"), [
    (400, "invalid_value", LineErrorKind.REFUSED),
    (400, "moderation_blocked", LineErrorKind.REFUSED),
    (408, None, LineErrorKind.RETRYABLE),
    (429, "rate_limit_exceeded", LineErrorKind.RETRYABLE),
    (429, "insufficient_quota", LineErrorKind.RETRYABLE),  # pending until credit returns
    (500, None, LineErrorKind.RETRYABLE),
    (503, None, LineErrorKind.RETRYABLE),
])
def test_http_line_errors(status: int, code: str | None, kind: LineErrorKind) -> None:
    body = {"error": {"message": f"m{status}", "code": code}}
    _, ends = run_lines(out_line("k", status, body), 1 << 20)
    assert ends[0].error is not None
    assert line_error(ends[0].error).kind is kind


def test_a_line_that_is_not_a_result_is_malformed() -> None:
    with pytest.raises(MalformedResponse):
        run_lines(b'{"id": "x"}\n', 100)
    with pytest.raises(MalformedResponse):
        run_lines(b'{"custom_id": "x", \n', 100)


def test_offset_is_the_end_of_the_last_whole_line() -> None:
    first = out_line("a", 200, image_body(PNG))
    parser = wire.ResultLines(start_offset=1000)
    list(parser.feed(first + first[:50]))
    assert parser.offset == 1000 + len(first)


@pytest.mark.parametrize(("page", "after"), [
    ({"data": [{"id": "b1"}, {"id": "b2"}], "has_more": True}, "b2"),
    ({"data": [{"id": "b1"}], "has_more": False}, None),
    ({"data": [], "has_more": True}, None),
    ({"data": [{"id": "b1"}]}, "b1"),  # no has_more: go on while pages come (as the SDK)
    ("nonsense", None),
])
def test_next_page(page: Any, after: str | None) -> None:
    assert wire.next_page(page) == after


def test_batch_objects() -> None:
    batch = {"id": "batch_1", "status": "expired", "created_at": 1700000000,
             "output_file_id": "file-out", "error_file_id": "file-err",
             "metadata": {wire.TAG_KEY: "t-1"},
             "request_counts": {"total": 3, "completed": 2, "failed": 1}}
    info = info_of(batch)
    assert (info.batch_id, info.state, info.tag, info.total, info.succeeded, info.failed) == \
        ("batch_1", BatchState.EXPIRED, "t-1", 3, 2, 1)
    assert info.result_files == ("file-out", "file-err")
    assert info_of({"id": "b", "status": "failed", "output_file_id": None,
                    "errors": {"data": [{"code": "invalid_value", "line": 2,
                                         "message": "bad size"}]}}).message \
        == "line 2: invalid_value bad size"
    with pytest.raises(MalformedResponse):
        info_of({"status": "completed"})
    assert wire.create_body("file-1", G, "t") == {
        "input_file_id": "file-1", "endpoint": "/v1/images/generations",
        "completion_window": "24h", "metadata": {"imgbatch_tag": "t"}}


@pytest.mark.parametrize(("status", "content_range", "offset", "skip"), [
    (200, None, 0, 0),
    (200, None, 500, 500),  # Range ignored: read again, drop what was consumed
    (206, "bytes 500-999/1000", 500, 0),
    (206, "bytes 500-999/*", 500, 0),
])
def test_skip_for(status: int, content_range: str | None, offset: int, skip: int) -> None:
    assert _skip_for(status, content_range, offset) == skip


@pytest.mark.parametrize("content_range", [None, "bytes 0-999/1000", "garbage"])
def test_skip_for_refuses_a_wrong_range(content_range: str | None) -> None:
    with pytest.raises(MalformedResponse):
        _skip_for(206, content_range, 500)


def test_line_error_of_a_fatal_answer_is_refused() -> None:
    _, ends = run_lines(out_line("k", 401, {"error": {"message": "bad key"}}), 100)
    assert isinstance(ends[0].error, JobError)
    assert line_error(ends[0].error).kind is LineErrorKind.REFUSED
