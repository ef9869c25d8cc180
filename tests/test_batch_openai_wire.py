"""Tables for the pure parts of the OpenAI Batch API client (batch_openai_wire)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from batch.errors import MalformedResponse
from batch.imageinfo import DEFAULT_MAX_PIXELS
from batch.images import ImageWriter, StagedImage, discard
from batch.jobs import InputImage, InputKind, Job
from batch.providers import batch_openai_wire as wire
from batch.providers import images_wire
from batch.providers.base import ClientConfig
from batch.providers.batch_openai import OpenAIBatchClient, _skip_for, info_of
from batch.providers.batchapi import BatchLimits, BatchState, LineErrorKind, ResultLine
from batch.providers.batchlines import decode_lines
from batch.providers.bodystream import stream_body
from batch.runners.batchplan import Line, LineTooBig, grouped, split
from batch.sim import batch_openai_wire as simwire
from batch.sim.images import PngMaker

PNG = PngMaker(0).png(4, 4, b"\x10\x20\x30", b"one")
PNG2 = PngMaker(3000).png(8, 2, b"\x30\x20\x10", b"two")


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
LIMITS = OpenAIBatchClient.limits


def line(key: str, route: str = G, model: str = "gpt-image-1", size: int = 10) -> Line:
    return Line(key, (model, route), size)


def cuts(lines: list[Line], limits: BatchLimits = LIMITS) -> list[tuple[str, str, int, int]]:
    return [(c.group[1], c.group[0], c.start, c.stop) for c in split(lines, limits)]


def test_limits_are_the_apis() -> None:
    """50,000 requests and 200 MB (read as 200,000,000 bytes, the smaller reading)."""
    assert (LIMITS.max_requests, LIMITS.max_file_bytes) == (50_000, 200_000_000)
    assert cuts([line(str(i), size=1) for i in range(50_001)]) == \
        [(G, "gpt-image-1", 0, 50_000), (G, "gpt-image-1", 50_000, 50_001)]
    assert cuts([line("a", size=150_000_000), line("b", size=50_000_000), line("c", size=1)]) \
        == [(G, "gpt-image-1", 0, 2), (G, "gpt-image-1", 2, 3)]
    with pytest.raises(LineTooBig):
        split([line("a", size=200_000_001)], LIMITS)


@pytest.mark.parametrize(("jobs", "wanted"), [
    # one endpoint and one model per batch; manifest order kept inside each
    ([("a", False, "gpt-image-1"), ("b", True, "gpt-image-1"),
      ("c", False, "gpt-image-1-mini"), ("d", False, "gpt-image-1")],
     [(G, "gpt-image-1", ("a", "d")), (E, "gpt-image-1", ("b",)),
      (G, "gpt-image-1-mini", ("c",))]),
    ([("a", True, "gpt-image-1"), ("b", True, "gpt-image-1")],
     [(E, "gpt-image-1", ("a", "b"))]),
])
def test_batches_split_by_endpoint_and_model(
        jobs: list[tuple[str, bool, str]],
        wanted: list[tuple[str, str, tuple[str, ...]]]) -> None:
    """The runner's split with this client's routes: edits (jobs with input images) and
    generations never share a batch, nor do two models."""
    api = OpenAIBatchClient(ClientConfig())
    made = []
    for key, edit, model in jobs:
        images = (InputImage(InputKind.URL, "https://example.com/a.png", "a", None, "d"),) \
            if edit else ()
        made.append(Job(id=key, prompt="p", model=model, aspect_ratio="1:1",
                        image_size="1K", images=images))
    pairs = grouped((job, api.route(job)) for job in made)
    lines = [Line(job.id, (job.model, route), 10) for job, route in pairs]
    found = [(c.group[1], c.group[0], tuple(lines[i].key for i in range(c.start, c.stop)))
             for c in split(lines, LIMITS)]
    assert found == wanted


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


class Stage:
    """Stages images under ``root`` as the runner's sink does; remembers discards."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "images").mkdir(parents=True, exist_ok=True)
        self.discarded: list[StagedImage] = []

    def open(self, n: int) -> ImageWriter:
        return ImageWriter(self.root, f"r{n}", 0, max_pixels=DEFAULT_MAX_PIXELS)

    def discard(self, image: StagedImage) -> None:
        self.discarded.append(image)
        image.file.close()
        discard(self.root, image)


def run_lines(blob: bytes, chunk: int, root: Path) -> list[ResultLine]:
    """``blob`` fed in ``chunk``-byte pieces through the shared line decoder."""

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(blob), chunk):
            yield blob[i:i + chunk]

    async def run() -> list[ResultLine]:
        stage = Stage(root)
        return [line async for line in decode_lines(
            pieces(), raw_keys=images_wire.RAW_KEYS, stage=stage, read=wire.read_line)]

    return asyncio.run(run())


def staged_bytes(root: Path, line: ResultLine) -> list[bytes]:
    out = []
    for image in line.images:
        out.append((root / image.tmp_rel).read_bytes())
        image.file.close()
    return out


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1000, 1 << 20])
def test_result_lines_stream_images_and_errors(chunk: int, tmp_path: Path) -> None:
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
        + out_line("ok2", 200, image_body(PNG2)).rstrip(b"\n")  # no final newline
    )
    lines = run_lines(blob, chunk, tmp_path)
    assert [line.key for line in lines] == ["ok", "blocked", "busy", "oops", "late", "slow",
                                            "empty", "ok2"]
    by_key = {line.key: line for line in lines}
    assert staged_bytes(tmp_path, by_key["ok"]) == [PNG]
    assert staged_bytes(tmp_path, by_key["ok2"]) == [PNG2]
    assert by_key["ok"].usage == {"input_tokens": 5, "output_tokens": 272}
    kinds = {line.key: (line.error.kind, line.error.code) for line in lines if line.error}
    assert kinds == {
        "blocked": (LineErrorKind.REFUSED, "400"), "busy": (LineErrorKind.RETRYABLE, "429"),
        "oops": (LineErrorKind.RETRYABLE, "500"),
        "late": (LineErrorKind.RETRYABLE, "batch_expired"),
        "slow": (LineErrorKind.RETRYABLE, "request_timeout"),
        "empty": (LineErrorKind.RETRYABLE, "no_image"),
    }
    blocked = by_key["blocked"].error
    assert blocked is not None and "safety system" in blocked.message


@pytest.mark.parametrize(("status", "code", "kind"), [
    (400, "invalid_value", LineErrorKind.REFUSED),
    (400, "moderation_blocked", LineErrorKind.REFUSED),
    (401, None, LineErrorKind.REFUSED),
    (408, None, LineErrorKind.RETRYABLE),
    (429, "rate_limit_exceeded", LineErrorKind.RETRYABLE),
    (429, "insufficient_quota", LineErrorKind.RETRYABLE),  # pending until credit returns
    (500, None, LineErrorKind.RETRYABLE),
    (503, None, LineErrorKind.RETRYABLE),
])
def test_http_line_errors(status: int, code: str | None, kind: LineErrorKind,
                          tmp_path: Path) -> None:
    body = {"error": {"message": f"m{status}", "code": code}}
    lines = run_lines(out_line("k", status, body), 1 << 20, tmp_path)
    assert lines[0].error is not None and lines[0].error.kind is kind
    assert lines[0].error.code == str(status)


def test_a_line_that_is_not_a_result_is_skipped(tmp_path: Path) -> None:
    """Its key (if any) counts as missing: the runner sends that job back to pending."""
    blob = b'{"id": "x"}\n{"custom_id": "cut", \n' + out_line("ok", 200, image_body(PNG))
    lines = run_lines(blob, 5, tmp_path)
    assert [line.key for line in lines] == ["ok"]
    assert staged_bytes(tmp_path, lines[0]) == [PNG]


def test_an_image_in_an_error_line_is_discarded(tmp_path: Path) -> None:
    """A 200 whose answer links a URL besides its b64_json keeps no half answer."""
    body = {"data": [{"b64_json": base64.b64encode(PNG).decode()}, {"url": "http://x"}]}
    lines = run_lines(out_line("odd", 200, body), 1000, tmp_path)
    assert lines[0].error is not None and lines[0].images == ()
    assert not list((tmp_path / "images").iterdir())


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


def input_line(key: str = "k", url: str = G, method: str = "POST", **body: Any) -> bytes:
    fields = {"model": "gpt-image-1", "prompt": "p", "size": "1024x1024", **body}
    return json.dumps({"custom_id": key, "method": method, "url": url,
                       "body": fields}).encode() + b"\n"


@pytest.mark.parametrize(("lines", "codes"), [
    ([input_line("a"), input_line("b")], []),
    ([input_line("a"), input_line("a")], ["duplicate_custom_id"]),
    ([input_line(url=E)], ["mismatched_endpoint"]),
    ([input_line(method="GET")], ["invalid_request"]),
    ([input_line(style="vivid")], ["unknown_parameter"]),
    ([input_line(size="512x512")], ["invalid_value"]),
    ([b"not json\n"], ["invalid_json"]),
    ([input_line("a"), input_line("b", model="gpt-image-1-mini")], ["mismatched_model"]),
    ([input_line(str(i)) for i in range(4)], ["too_many_requests"]),
    ([b"\n"], ["empty_file"]),
])
def test_simulated_validation(lines: list[bytes], codes: list[str], tmp_path: Path) -> None:
    """The simulator refuses a file as strictly as the API's validating step."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(lines))
    rec = simwire.BatchRec("b", 1, "f", G, {}, 0.0)
    simwire.validate(rec, path, limit=3)
    assert [e["code"] for e in rec.errors] == codes


def test_simulated_edit_lines_take_data_urls(tmp_path: Path) -> None:
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    path = tmp_path / "in.jsonl"
    path.write_bytes(input_line(url=E, images=[{"image_url": url}])
                     + input_line("b", url=E, images=[{"file": "x"}]))
    rec = simwire.BatchRec("b", 1, "f", E, {}, 0.0)
    simwire.validate(rec, path, limit=10)
    assert [e["line"] for e in rec.errors] == [2] and [k for k, _, _ in rec.lines] == ["k"]
