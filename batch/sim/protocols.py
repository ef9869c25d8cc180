"""The three protocols the simulator speaks, each on its own paths and in its own shapes.

The server (:mod:`batch.sim.server`) decides what happens to a request (faults,
rate limits, latency, a blocked prompt); a :class:`Protocol` checks the request
the way that API does and says the outcome in that API's words.
"""

from __future__ import annotations

import hmac
import json
from typing import Any, Protocol

from aiohttp import BodyPartReader, web

from batch.sim import gemini_wire as gemini
from batch.sim import images_wire as images
from batch.sim.wire import (
    Parsed,
    Refusal,
    Reject,
    completion_body,
    error_body,
    parse_request,
    quota_headers,
    retry_headers,
)

Outcome = tuple[int, list[bytes], dict[str, str]]  # status, body pieces, headers


def _bearer(request: web.Request) -> str:
    auth = request.headers.get("Authorization", "")
    return auth[7:].strip() if auth.startswith("Bearer ") else ""


def _key_ok(given: str, wanted: str | None) -> bool:
    return bool(given) and (wanted is None or hmac.compare_digest(given, wanted))


async def _json(request: web.Request) -> Any:
    if request.content_type != "application/json":
        raise Reject(400, "Content-Type must be application/json")
    try:
        return json.loads(await request.read())
    except ValueError:
        raise Reject(400, "invalid JSON body") from None


class Wire(Protocol):
    image_prefix: bytes  # before each image's base64 (a data URL's head, or nothing)

    def auth(self, request: web.Request, key: str | None) -> Outcome | None: ...
    async def parse(self, request: web.Request) -> Parsed: ...
    def reject(self, exc: Reject) -> Outcome: ...
    def rate_limited(self, seconds: float, why: Refusal, headers: bool) -> Outcome:
        """A 429 for ``why``; ``headers``: say a spent window quota in rate-limit headers."""
        ...
    def server_error(self, status: int, message: str) -> Outcome: ...
    def answer(self, parsed: Parsed, images: list[bytes], fault: str, sha: str,
               n: int) -> Outcome: ...


class Chat:
    """OpenAI-compatible chat completions (Qiniu, OpenRouter) at /v1/chat/completions."""

    image_prefix = b"data:image/png;base64,"

    def __init__(self, escape_slashes: bool) -> None:
        self.escape_slashes = escape_slashes

    def auth(self, request: web.Request, key: str | None) -> Outcome | None:
        if _key_ok(_bearer(request), key):
            return None
        return 401, [error_body("invalid api key", "invalid_request_error", "invalid_api_key")], {}

    async def parse(self, request: web.Request) -> Parsed:
        return parse_request(await _json(request))

    def reject(self, exc: Reject) -> Outcome:
        return exc.status, [error_body(exc.message, "invalid_request_error", exc.code)], {}

    def rate_limited(self, seconds: float, why: Refusal, headers: bool) -> Outcome:
        body = error_body("Rate limit exceeded", "rate_limit_error", 429)
        said = quota_headers(seconds) if headers and why is Refusal.WINDOW else {}
        return 429, [body], retry_headers(seconds) | said

    def server_error(self, status: int, message: str) -> Outcome:
        return status, [error_body(message, "server_error", status)], {}

    def answer(self, parsed: Parsed, images: list[bytes], fault: str, sha: str,
               n: int) -> Outcome:
        if fault == "error_200":
            return 200, [json.dumps({"error": {"message": "upstream error",
                                               "code": 502}}).encode()], {}
        if fault == "blocked":
            return 400, [error_body("Your request was flagged by the content policy",
                                    "invalid_request_error", "content_policy_violation")], {}
        return 200, completion_body(parsed, sha, n, images, self.escape_slashes), {}


class Gemini:
    """Google's generateContent at /v1beta/models/{model}:generateContent."""

    image_prefix = b""

    def auth(self, request: web.Request, key: str | None) -> Outcome | None:
        given = request.headers.get("x-goog-api-key", "")
        if not given:
            return 403, [gemini.error_body(
                403, "Method doesn't allow unregistered callers (callers without established "
                "identity). Please use API Key or other form of API consumer identity to call "
                "this API.")], {}
        if _key_ok(given, key):
            return None
        return 400, [gemini.bad_key()], {}

    async def parse(self, request: web.Request) -> Parsed:
        model = gemini.path_model(request.match_info.get("tail", ""))
        return gemini.parse_request(model, await _json(request))

    def reject(self, exc: Reject) -> Outcome:
        return exc.status, [gemini.error_body(exc.status, exc.message)], {}

    def rate_limited(self, seconds: float, why: Refusal, headers: bool) -> Outcome:
        # No Retry-After header; the quota, when one is met, is named in the body.
        body = gemini.rate_limited(seconds, why is Refusal.DAY, why is not Refusal.NOISE)
        return 429, [body], {}

    def server_error(self, status: int, message: str) -> Outcome:
        said = "The model is overloaded. Please try again later." if status == 503 else message
        return status, [gemini.error_body(status, said)], {}

    def answer(self, parsed: Parsed, images: list[bytes], fault: str, sha: str,
               n: int) -> Outcome:
        if fault == "error_200":  # a generation that ended without saying why
            return 200, gemini.answer_body(parsed, [], finish="IMAGE_OTHER"), {}
        if fault == "blocked":
            return 200, gemini.answer_body(parsed, [], blocked="PROHIBITED_CONTENT"), {}
        if not parsed.wants_image:
            images = []
        return 200, gemini.answer_body(parsed, images), {}


class Images:
    """OpenAI's Images API at /v1/images/generations and /v1/images/edits."""

    image_prefix = b""

    def auth(self, request: web.Request, key: str | None) -> Outcome | None:
        if _key_ok(_bearer(request), key):
            return None
        return 401, [images.error_body("Incorrect API key provided.", "invalid_request_error",
                                       "invalid_api_key")], {}

    async def parse(self, request: web.Request) -> Parsed:
        edit = request.path.endswith("/images/edits")
        if edit and request.content_type == "multipart/form-data":
            fields, count = await _multipart(request)
            return images.parse_fields(fields, count, edit=True)
        body = await _json(request)
        if not isinstance(body, dict):
            raise Reject(400, "request body must be a JSON object")
        count = images.json_images(body) if edit else 0
        fields = {k: v for k, v in body.items() if k != "images"}
        return images.parse_fields(fields, count, edit=edit)

    def reject(self, exc: Reject) -> Outcome:
        return exc.status, [images.error_body(exc.message, code=exc.code)], {}

    def rate_limited(self, seconds: float, why: Refusal, headers: bool) -> Outcome:
        if why is Refusal.DAY:
            return 429, [images.error_body(
                "You exceeded your current quota, please check your plan and billing details.",
                "insufficient_quota", "insufficient_quota")], {}
        body = images.error_body("Rate limit reached for images per minute.", "requests",
                                 "rate_limit_exceeded")
        said = quota_headers(seconds) if headers and why is Refusal.WINDOW else {}
        return 429, [body], retry_headers(seconds) | said

    def server_error(self, status: int, message: str) -> Outcome:
        return status, [images.error_body(message, "server_error")], {}

    def answer(self, parsed: Parsed, found: list[bytes], fault: str, sha: str,
               n: int) -> Outcome:
        if fault == "blocked":
            return 400, [images.moderation_blocked()], {}
        if fault == "error_200":
            return 500, [images.error_body("The server had an error processing your request.",
                                           "server_error")], {}
        return 200, images.answer_body(parsed, found, "medium"), {}


async def _multipart(request: web.Request) -> tuple[dict[str, Any], int]:
    """Text fields and the count of image parts of a multipart edit; strict on part types."""
    fields: dict[str, Any] = {}
    count = 0
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader) or part.name is None:
            raise Reject(400, "nested or unnamed multipart part")
        if part.name in ("image", "image[]"):
            kind = part.headers.get("Content-Type", "")
            data = await part.read()
            if kind not in images.IMAGE_TYPES:
                raise Reject(400, f"Invalid file 'image': unsupported mimetype ('{kind}'). "
                             "Supported file formats are 'image/jpeg', 'image/png', and "
                             "'image/webp'.", "invalid_image_file")
            if not data:
                raise Reject(400, "Invalid file 'image': empty", "invalid_image_file")
            count += 1
        else:
            fields[part.name] = await part.text()
    return fields, count
