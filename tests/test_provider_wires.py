"""Tables for the pure parts of the native providers: errors, answers, bodies, endpoints, prices."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batch.checkpoint import fingerprint
from batch.cost import PriceTable
from batch.decoder import BodyDecoder, ImageBytes, placeholder
from batch.endpoints import Endpoint, check_job, parse_endpoints
from batch.errors import (
    Blocked,
    FatalApiError,
    NoImage,
    QuotaExhausted,
    RateLimited,
    RejectedError,
    ServerError,
)
from batch.jobs import Job
from batch.providers import gemini_wire, http_errors, images_wire

RPC = "type.googleapis.com/google.rpc."


def gemini_error(status: int, *details: dict[str, Any]) -> bytes:
    return json.dumps({"error": {"code": status, "message": "said", "status": "X",
                                 "details": list(details)}}).encode()


@pytest.mark.parametrize(("details", "spent"), [
    ([{"@type": RPC + "QuotaFailure", "violations": [
        {"quotaId": "GenerateRequestsPerMinutePerProjectPerModel"}]},
      {"@type": RPC + "RetryInfo", "retryDelay": "47s"}], True),
    # RESOURCE_EXHAUSTED naming no quota: the service's own capacity, not this key's limit.
    ([{"@type": RPC + "RetryInfo", "retryDelay": "2s"}], False),
    ([], False),
])
def test_a_gemini_429_naming_a_quota_says_the_quota_is_spent(
    details: list[dict[str, Any]], spent: bool,
) -> None:
    error = gemini_wire.error_for_status(429, {}, gemini_error(429, *details), "j", 0.0)
    assert isinstance(error, RateLimited) and error.quota_used_up is spent


@pytest.mark.parametrize(("headers", "expected"), [
    ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s"},
     (True, 360.0)),
    ({"X-Ratelimit-Remaining-Requests": "0", "X-Ratelimit-Reset-Requests": "20ms"},
     (True, 0.02)),
    ({"x-ratelimit-remaining-requests": "3", "x-ratelimit-remaining-tokens": "0",
      "x-ratelimit-reset-tokens": "1h2m3.5s"}, (True, 3723.5)),
    ({"x-ratelimit-remaining": "0", "x-ratelimit-reset": "1764547200"}, (True, None)),
    ({"x-ratelimit-remaining": "0", "x-ratelimit-reset": "7"}, (True, 7.0)),
    ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "soon"},
     (True, None)),
    ({"x-ratelimit-remaining-requests": "5"}, (False, None)),
    ({"x-ratelimit-remaining-requests": "many"}, (False, None)),
    ({}, (False, None)),
])
def test_rate_limit_headers(headers: dict[str, str],
                            expected: tuple[bool, float | None]) -> None:
    spent, reset_s = http_errors.quota_used_up(headers)
    assert (spent, reset_s) == (expected[0], pytest.approx(expected[1]) if expected[1]
                                else expected[1])


@pytest.mark.parametrize(("status", "body", "kind", "wait"), [
    (429, gemini_error(429, {"@type": RPC + "RetryInfo", "retryDelay": "45.837906927s"}),
     RateLimited, 45.837906927),
    (429, gemini_error(429, {"@type": RPC + "QuotaFailure", "violations": [
        {"quotaId": "GenerateRequestsPerMinutePerProjectPerModel"}]},
        {"@type": RPC + "RetryInfo", "retryDelay": "47s"}), RateLimited, 47.0),
    (429, gemini_error(429, {"@type": RPC + "QuotaFailure", "violations": [
        {"quota_id": "GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]}),
     QuotaExhausted, None),
    (400, gemini_error(400, {"@type": RPC + "ErrorInfo", "reason": "API_KEY_INVALID"}),
     FatalApiError, None),
    (400, gemini_error(400), RejectedError, None),
    (503, gemini_error(503), ServerError, None),
    (500, b"<html><title>oops</title></html>", ServerError, None),
])
def test_gemini_errors(status: int, body: bytes, kind: type, wait: float | None) -> None:
    error = gemini_wire.error_for_status(status, {}, body, "j", 0.0)
    assert type(error) is kind and error.http_status == status
    assert error.retry_after_s == wait
    if kind is QuotaExhausted:
        assert "GenerateRequestsPerDayPerProjectPerModel-FreeTier" in str(error)


def answer(parts: list[dict[str, Any]], finish: str = "STOP", **extra: Any) -> dict[str, Any]:
    return {"candidates": [{"content": {"parts": parts}, "finishReason": finish}], **extra}


IMG = placeholder(0)
DRAFT = placeholder(1)


@pytest.mark.parametrize(("document", "outcome"), [
    (answer([{"text": "hi"}, {"inlineData": {"mimeType": "image/png", "data": IMG}}]), (0,)),
    (answer([{"inline_data": {"mime_type": "image/png", "data": IMG}}]), (0,)),
    (answer([{"inlineData": {"data": DRAFT}, "thought": True},
             {"inlineData": {"data": IMG}}]), (0,)),
    (answer([{"inlineData": {"data": DRAFT}, "thought": True}], "NO_IMAGE"), NoImage),
    (answer([{"text": "no"}], "IMAGE_OTHER"), NoImage),
    (answer([], "IMAGE_SAFETY"), Blocked),
    (answer([], "PROHIBITED_CONTENT"), Blocked),
    (answer([], "RECITATION"), Blocked),
    ({"promptFeedback": {"blockReason": "SAFETY"}}, Blocked),
    ({"prompt_feedback": {"block_reason": "OTHER"}}, Blocked),
    ({"candidates": []}, Exception),
])
def test_gemini_answers(document: Any, outcome: Any) -> None:
    streamed = {IMG: 0, DRAFT: 1}
    if isinstance(outcome, tuple):
        assert gemini_wire.interpret(document, streamed, "j").image_indexes == outcome
    else:
        with pytest.raises(outcome):
            gemini_wire.interpret(document, streamed, "j")


def test_gemini_body_is_camel_case_with_bare_base64() -> None:
    job = Job("j", "a cat", "gemini-3-pro-image-preview", "16:9", "4K")
    (piece,) = gemini_wire.body_parts(job, "tok").pieces
    body = json.loads(piece)
    assert body["contents"] == [{"role": "user", "parts": [{"text": "a cat"}]}]
    assert body["generationConfig"]["imageConfig"] == {"aspectRatio": "16:9", "imageSize": "4K"}
    flash = replace(job, model="gemini-2.5-flash-image", image_size="1K")
    (piece,) = gemini_wire.body_parts(flash, "tok").pieces
    assert json.loads(piece)["generationConfig"]["imageConfig"] == {"aspectRatio": "16:9"}
    assert body["generationConfig"]["responseModalities"] == ["TEXT", "IMAGE"]


@pytest.mark.parametrize("keys", [frozenset({"data"}), frozenset({"b64_json"})])
@pytest.mark.parametrize("step", [1, 5, 4096])
def test_decoder_streams_bare_base64_under_its_keys(keys: frozenset[str], step: int) -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 3
    (key,) = keys
    text = json.dumps({"x": {"note": "data", key: base64.b64encode(png).decode(),
                             "other": "dGVzdA=="}}).encode()
    decoder = BodyDecoder(raw_keys=keys)
    got = b"".join(event.data for i in range(0, len(text), step)
                   for event in decoder.feed(text[i:i + step]) if type(event) is ImageBytes)
    assert got == png
    assert decoder.finish()["x"] == {"note": "data", key: IMG, "other": "dGVzdA=="}


@pytest.mark.parametrize(("status", "error", "kind"), [
    (400, {"code": "moderation_blocked", "type": "image_generation_user_error"}, Blocked),
    (429, {"code": "insufficient_quota", "type": "insufficient_quota"}, QuotaExhausted),
    (429, {"code": "rate_limit_exceeded", "type": "requests"}, RateLimited),
    (401, {"code": "invalid_api_key"}, FatalApiError),
    (400, {"code": "invalid_value"}, RejectedError),
])
def test_images_errors(status: int, error: dict[str, Any], kind: type) -> None:
    body = json.dumps({"error": {"message": "said", **error}}).encode()
    assert type(images_wire.error_for_status(status, {}, body, "j", 0.0)) is kind


def test_images_answer_needs_b64_json() -> None:
    document = {"data": [{"b64_json": IMG}], "usage": {"output_tokens": 3}}
    assert images_wire.interpret(document, {IMG: 0}, "j").image_indexes == (0,)
    with pytest.raises(NoImage):
        images_wire.interpret({"data": []}, {}, "j")


def gpt(ratio: str = "1:1", size: str = "1K", **options: str) -> Job:
    return Job("j", "p", "gpt-image-1", ratio, size, options=options)


@pytest.mark.parametrize(("provider", "job", "problem"), [
    ("openai-images", gpt("3:2", quality="low"), None),
    ("openai-images", gpt("16:9"), "it can draw 1:1 (1024x1024), 3:2 (1536x1024), 2:3"),
    ("openai-images", gpt(size="4K"), "no image_size"),
    ("openai-images", gpt(quality="ultra"), "must be one of low, medium, high, auto"),
    ("openai-images", gpt(background="transparent", output_format="jpeg"), "png or webp"),
    ("gemini", gpt(quality="low"), "setting of openai-images"),
    ("gemini", replace(gpt(size="2K"), model="gemini-2.5-flash-image"), "1K only"),
    ("chat", gpt(output_format="png"), "setting of openai-images"),
])
def test_jobs_are_checked_against_their_provider(provider: str, job: Job,
                                                 problem: str | None) -> None:
    found = [message for _, message in check_job(provider, job)]
    assert (problem is None and not found) or any(problem and problem in m for m in found)


def test_endpoints_take_provider_defaults_and_report_problems() -> None:
    endpoints, found = parse_endpoints({
        "google": {"provider": "gemini", "rpm": 20, "concurrency": 4},
        "bad": {"provider": "dalle", "rpm": -1, "colour": "red"},
    })
    assert endpoints == {"google": Endpoint(
        "google", "gemini", "https://generativelanguage.googleapis.com/v1beta",
        "GEMINI_API_KEY", "gemini-3-pro-image-preview", 20.0, 4)}
    assert {field for field, _ in found} == {"endpoints.bad.provider", "endpoints.bad.rpm",
                                             "endpoints.bad.colour"}


def test_prices_by_quality_and_size_and_the_fingerprint_ignores_the_endpoint() -> None:
    table = PriceTable.with_overrides({})
    assert table.job_price(gpt(quality="low")) == 0.011
    assert table.job_price(gpt("3:2", quality="medium")) == 0.063
    assert table.job_price(gpt()) == 0.167  # quality auto is priced as high
    assert table.job_price(Job("j", "p", "gemini-3-pro-image-preview", "1:1", "4K")) == 0.24
    job = gpt(quality="low")
    assert fingerprint(replace(job, endpoint="a")) == fingerprint(replace(job, endpoint="b"))
    assert fingerprint(job) != fingerprint(replace(job, options={"quality": "high"}))
    plain = Job("j", "p", "m", "1:1", "1K")
    assert fingerprint(plain) == fingerprint(replace(plain, endpoint="x"))


@settings(max_examples=150, deadline=None)
@given(
    images=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=3),
    noise=st.lists(st.text(max_size=20), max_size=4),
    snake=st.booleans(),
    cuts=st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=30),
)
def test_bare_base64_survives_any_chunking(
    images: list[bytes], noise: list[str], snake: bool, cuts: list[int]
) -> None:
    """Gemini-shaped answers cut anywhere: each image out byte for byte, the rest intact."""
    blob = "inline_data" if snake else "inlineData"
    parts: list[dict[str, Any]] = [{"text": text} for text in noise]
    parts += [{blob: {"mimeType": "image/png", "data": base64.b64encode(data).decode()}}
              for data in images]
    body = json.dumps({"candidates": [{"content": {"parts": parts}}], "data": noise}).encode()
    decoder = BodyDecoder(raw_keys=gemini_wire.RAW_KEYS)
    out: list[bytearray] = []
    pos, n = 0, 0
    while pos < len(body):
        step = cuts[n % len(cuts)]
        for event in decoder.feed(body[pos:pos + step]):
            if type(event) is ImageBytes:
                out[-1] += event.data
            elif type(event).__name__ == "ImageBegin":
                out.append(bytearray())
        pos, n = pos + step, n + 1
    document = decoder.finish()
    assert [bytes(image) for image in out] == images
    got = document["candidates"][0]["content"]["parts"]
    assert [part[blob]["data"] for part in got[len(noise):]] == \
        [placeholder(i) for i in range(len(images))]
    assert document["data"] == noise  # a "data" key holding a list is left alone
