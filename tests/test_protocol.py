"""Request bodies and answer interpretation, as tables."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from batch.errors import (
    FatalApiError,
    JobError,
    MalformedResponse,
    NoImage,
    RateLimited,
    RejectedError,
    ServerError,
)
from batch.jobs import InputImage, InputKind, Job
from batch.providers.chat_wire import (
    body_parts,
    build_body,
    data_url_head,
    error_for_status,
    interpret,
    server_message,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"rest"


def inline(image: InputImage, files: dict[str, bytes]) -> str:
    return f"data:{image.mime};base64,{base64.b64encode(files[image.ref]).decode()}"


def _job(**fields: Any) -> Job:
    base: dict[str, Any] = {
        "id": "cat",
        "prompt": "a cat",
        "model": "m",
        "aspect_ratio": "16:9",
        "image_size": "4K",
    }
    base.update(fields)
    return Job(**base)


def test_text_only_body_follows_the_notebook() -> None:
    body = build_body(_job(params={"temperature": 0.5}), lambda image: "unused")
    assert body == {
        "temperature": 0.5,
        "model": "m",
        "stream": False,
        "messages": [{"role": "user", "content": "a cat"}],
        "image_config": {"aspect_ratio": "16:9", "image_size": "4K"},
    }


def test_edit_body_sends_files_as_data_urls_and_urls_untouched() -> None:
    images = (
        InputImage(InputKind.FILE, "/abs/a.png", "a.png", "image/png", "d1"),
        InputImage(InputKind.URL, "https://x/y.jpg", "https://x/y.jpg", None, "d2"),
    )
    body = build_body(_job(images=images), lambda image: inline(image, {"/abs/a.png": PNG}))
    content = body["messages"][0]["content"]
    assert content[0] == {"type": "text", "text": "a cat"}
    assert content[1] == {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64,iVBORw0KGgpyZXN0"},
    }
    assert content[2] == {"type": "image_url", "image_url": {"url": "https://x/y.jpg"}}


def test_body_parts_around_streamed_images_make_the_same_json() -> None:
    files = {"/abs/a.png": PNG, "/abs/b.png": PNG * 3 + b"x"}
    images = tuple(
        InputImage(InputKind.FILE, ref, ref, "image/png", "d", len(data))
        for ref, data in files.items()
    )
    url = InputImage(InputKind.URL, "https://x/y.jpg", "u", None, "d2")
    # The prompt and a parameter hold what the markers look like, quotes and all.
    job = _job(images=(images[0], url, images[1]), prompt='a "tok-0" and tok-1',
               params={"user": "tok-1\"", "n": 1})
    parts = body_parts(job, "tok")
    body = parts.pieces[0]
    for piece, image in zip(parts.pieces[1:], parts.files, strict=True):
        body += data_url_head(image) + base64.b64encode(files[image.ref]) + piece
    whole = json.dumps(build_body(job, lambda image: inline(image, files)), ensure_ascii=False)
    assert body == whole.encode()
    assert parts.length() == len(body)


@pytest.mark.parametrize(
    ("body", "ctype", "expected"),
    [
        (
            b'{"error":{"message":"invalid api key","type":"x"}}',
            "application/json",
            "invalid api key",
        ),
        (b'{"error":"quota"}', "application/json", "quota"),
        (b'{"detail":"nope"}', "application/json", "nope"),
        (
            b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
            "text/html",
            "502 Bad Gateway",
        ),
        (b"<html><body><h1>Service &amp; down</h1></body></html>", "text/html", "Service & down"),
        (b"SSL Handshake Failed", "text/plain", "SSL Handshake Failed"),
        (b"error code: 1010", "text/plain", "error code: 1010"),
        (b"", "text/plain", "(empty body)"),
        (b"\xff\xfe garbage", "", "\ufffd\ufffd garbage"),
    ],
)
def test_server_message(body: bytes, ctype: str, expected: str) -> None:
    assert server_message(body, ctype) == expected


def test_server_message_is_clipped() -> None:
    assert len(server_message(b"x" * 10_000, "text/plain")) == 500


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_stops_the_run_naming_where_it_points(status: int) -> None:
    error = error_for_status(status, {"Location": "https://new.example/v1/chat/completions"},
                             b"", job_id="j", now_s=0.0)
    assert isinstance(error, FatalApiError) and error.http_status == status
    assert "https://new.example/v1/chat/completions" in str(error)


P0, P1 = "\x00img-0", "\x00img-1"
STREAMED = {P0: 0, P1: 1}


def _answer(message: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "finish_reason": "stop", "message": message}], **extra}


def test_interpret_qiniu_and_openrouter_shapes() -> None:
    qiniu = _answer(
        {"content": "", "images": [{"type": "image_url", "image_url": {"url": P0}, "index": 0}]},
        usage={"total_tokens": 3},
    )
    answer = interpret(qiniu, STREAMED, job_id="j")
    assert answer.image_indexes == (0,)
    assert answer.usage == {"total_tokens": 3}
    openrouter = _answer(
        {
            "content": "here",
            "images": [
                {"type": "image_url", "image_url": {"url": P1}},
                {"type": "image_url", "image_url": {"url": P0}},
            ],
        }
    )
    assert interpret(openrouter, STREAMED, job_id="j").image_indexes == (1, 0)


@pytest.mark.parametrize(
    ("document", "kind", "status"),
    [
        ([], MalformedResponse, 200),
        ({"choices": []}, MalformedResponse, 200),
        ({"choices": [{"message": "x"}]}, MalformedResponse, 200),
        (_answer({"content": "I can't draw that"}), NoImage, 200),
        (_answer({"content": "", "images": []}), NoImage, 200),
        (
            _answer({"content": "", "images": [{"image_url": {"url": "not streamed"}}]}),
            NoImage,
            200,
        ),
        (
            {"choices": [{"finish_reason": "error", "message": {"content": "boom"}}]},
            ServerError,
            200,
        ),
        ({"error": {"message": "upstream error", "code": 502}}, ServerError, 502),
        ({"error": {"message": "slow down", "code": 429}}, RateLimited, 429),
        ({"error": {"message": "no credits", "code": 402}}, FatalApiError, 402),
        ({"error": {"message": "bad", "code": 400}}, RejectedError, 400),
        ({"error": "weird"}, ServerError, 502),
        (
            _answer({"images": [{"image_url": {"url": "https://cdn/x.png"}}]}),
            MalformedResponse,
            200,
        ),
    ],
)
def test_interpret_errors(document: Any, kind: type[JobError], status: int) -> None:
    with pytest.raises(kind) as caught:
        interpret(document, STREAMED, job_id="j")
    assert type(caught.value) is kind
    assert caught.value.http_status == status
    assert caught.value.job_id == "j"


def test_no_image_carries_the_models_text() -> None:
    with pytest.raises(NoImage, match="I can't draw that"):
        interpret(_answer({"content": "I can't draw that"}), STREAMED, job_id="j")
