"""The simulated gateway's wire format: checking chat-completion requests, writing bodies.

Pure functions and values, no server state: :mod:`batch.sim.server` decides what
to answer (faults, rate limits, latency) and uses these to say it.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from batch.jobs import ASPECT_RATIOS, DEFAULT_MODEL, IMAGE_SIZES, MAX_INPUT_IMAGES

FLASH_MODEL = "gemini-2.5-flash-image"
KNOWN_MODELS = (DEFAULT_MODEL, FLASH_MODEL, "google/gemini-3-pro-image-preview")
_HTTP_URL = re.compile(r"https?://[^/\s]")
_DATA_URL = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,")
_IMAGE_MARK = "@@IMAGE_{}@@"
_NGINX_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)


@dataclass(frozen=True)
class Parsed:
    """What the simulator needs of a valid request."""

    model: str
    prompt: str
    input_images: int
    aspect_ratio: str
    image_size: str
    wants_image: bool = True  # Gemini draws only when responseModalities has IMAGE
    pixels: tuple[int, int] | None = None  # the Images API's size, in place of ratio and size
    output_format: str = "png"


class Reject(Exception):
    """A request the gateway refuses: HTTP status, message and optional error code."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def _check_url(url: Any, where: str) -> None:
    if not isinstance(url, str) or not url:
        raise Reject(400, f"{where}.image_url.url is required")
    if _HTTP_URL.match(url):
        return
    match = _DATA_URL.match(url)
    if match is None:
        raise Reject(400, f"{where}: url must be http(s) or data:image/...;base64,")
    try:
        if not base64.b64decode(url[match.end():], validate=True):
            raise Reject(400, f"{where}: empty image data")
    except binascii.Error as exc:
        raise Reject(400, f"{where}: invalid base64 in data URL") from exc


def parse_request(body: Any) -> Parsed:
    if not isinstance(body, dict):
        raise Reject(400, "request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise Reject(400, "model is required")
    if model not in KNOWN_MODELS:
        raise Reject(404, "model not found", "model_not_found")
    if "stream" in body and body["stream"] is not False:
        raise Reject(400, "stream must be false")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Reject(400, "messages must be a non-empty list")
    texts: list[str] = []
    images = 0
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
            raise Reject(400, f"{where} must be an object with role user, system or assistant")
        content = msg.get("content")
        if isinstance(content, str) and content:
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list) or not content:
            raise Reject(400, f"{where}.content must be a non-empty string or list")
        for j, part in enumerate(content):
            pwhere = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                if msg["role"] == "user":
                    texts.append(part["text"])
            elif kind == "image_url":
                image_url = part.get("image_url")
                _check_url(image_url.get("url") if isinstance(image_url, dict) else None, pwhere)
                images += 1
            else:
                raise Reject(400, f"{pwhere}: unknown content part type {kind!r}")
    if not any(m["role"] == "user" for m in messages):
        raise Reject(400, "messages must include a user message")
    if images > MAX_INPUT_IMAGES:
        raise Reject(400, f"too many input images: {images} > {MAX_INPUT_IMAGES}")
    config = body.get("image_config", {})
    if not isinstance(config, dict):
        raise Reject(400, "image_config must be an object")
    ratio, size = config.get("aspect_ratio", "1:1"), config.get("image_size", "1K")
    if ratio not in ASPECT_RATIOS:
        raise Reject(400, f"unsupported aspect_ratio {ratio!r}")
    if size not in IMAGE_SIZES:
        raise Reject(400, f"unsupported image_size {size!r}")
    if model == FLASH_MODEL and size != "1K":
        raise Reject(400, f"image_size {size} is not supported by {FLASH_MODEL}")
    return Parsed(model, "\n".join(texts), images, ratio, size)


class Refusal(enum.Enum):
    """Why the simulator answers 429."""

    NOISE = "noise"  # the gateway's own hiccup (an upstream overloaded): no quota is named
    WINDOW = "window"  # the key's per-window quota (--rpm-limit)
    DAY = "day"  # the key's per-day quota (--daily-quota)


def retry_headers(seconds: float) -> dict[str, str]:
    # Retry-After only carries whole seconds; the precise value rides in retry-after-ms.
    headers = {"Retry-After": str(max(1, math.ceil(seconds)))}
    if seconds != int(seconds):
        headers["retry-after-ms"] = str(max(1, math.ceil(seconds * 1000)))
    return headers


def quota_headers(seconds: float) -> dict[str, str]:
    """OpenAI's rate-limit headers for a request quota that is spent (--quota-headers)."""
    return {"x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": f"{max(seconds, 0.001):.3f}s"}


def error_body(message: str, kind: str, code: str | int | None = None) -> bytes:
    err: dict[str, Any] = {"message": message, "type": kind}
    if code is not None:
        err["code"] = code
    return json.dumps({"error": err}).encode()


def server_error(fault: str, where: float) -> tuple[int, bytes, str, str | None] | None:
    """Status, body, content type and reason of a server-error fault; None for other faults."""
    if fault == "server_error_json":
        status = 500 if where < 0.5 else 503
        message = "internal server error" if status == 500 else "model overloaded, try later"
        return status, error_body(message, "server_error", status), "application/json", None
    if fault == "server_error_html":
        return 502, _NGINX_502.encode(), "text/html", None
    if fault == "server_error_text":
        return 525, b"SSL Handshake Failed", "text/plain", "SSL Handshake Failed"
    return None


def completion_body(parsed: Parsed, sha: str, n: int, urls: list[bytes],
                    escape_slashes: bool) -> list[bytes]:
    """A chat completion carrying ``urls`` (none: the model declines), in pieces."""
    reasoning_tokens = 150 + int(sha[:4], 16) % 350
    message: dict[str, Any] = {
        "role": "assistant", "content": "",
        "reasoning_content": (
            f"**Composing the scene**\n\nLaying out a {parsed.aspect_ratio} frame at "
            f"{parsed.image_size}, settling light and palette before rendering."
        ),
    }
    if not urls:
        message["content"] = "I can't generate that image."
        image_tokens = 0
    else:
        message["images"] = [
            {"type": "image_url", "image_url": {"url": _IMAGE_MARK.format(i)}, "index": i}
            for i in range(len(urls))
        ]
        image_tokens = (2000 if parsed.image_size == "4K" else 1120) * len(urls)
    prompt_tokens = len(parsed.prompt) // 4 + 560 * parsed.input_images
    completion_tokens = image_tokens + reasoning_tokens
    text = json.dumps({
        "id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()),
        "model": parsed.model,
        "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
        "usage": {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens_details": {
                "reasoning_tokens": reasoning_tokens, "image_tokens": image_tokens,
            },
        },
    })
    # The image data is spliced in rather than passed through json.dumps: no copy of it.
    pieces: list[bytes] = []
    for i, url in enumerate(urls):
        before, text = text.split(_IMAGE_MARK.format(i), 1)
        pieces += [before.encode(), url]
    pieces.append(text.encode())
    if escape_slashes:  # "/" only occurs inside JSON strings, so this is safe
        pieces = [p.replace(b"/", b"\\/") for p in pieces]
    return pieces
