"""The simulated OpenAI Images API: /images/generations and /images/edits, strictly.

As openai-python and the API reference lay them out: a Bearer key; JSON for
generations and for edits that name images by URL (``images: [{"image_url"}]``);
multipart for edits that upload files (``image[]``, or ``image`` for one, each
part with an image Content-Type); unknown parameters and values the model does
not take refused with OpenAI's error object. Pure functions, no server state.
"""

from __future__ import annotations

import json
import time
from typing import Any

from batch.sim.wire import Parsed, Reject

MODELS = ("gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5")
SIZES = {"1024x1024": (1024, 1024), "1536x1024": (1536, 1024), "1024x1536": (1024, 1536),
         "auto": (1024, 1024)}
CHOICES = {
    "quality": ("low", "medium", "high", "auto"),
    "output_format": ("png", "jpeg", "webp"),
    "background": ("transparent", "opaque", "auto"),
    "moderation": ("low", "auto"),
}
_GENERATE = {"model", "prompt", "n", "size", "quality", "output_format", "output_compression",
             "background", "moderation", "user", "response_format"}
_EDIT = _GENERATE - {"moderation"} | {"image", "image[]", "images", "mask", "input_fidelity"}
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")
MAX_EDIT_IMAGES = 16


def parse_fields(fields: dict[str, Any], images: int, *, edit: bool) -> Parsed:
    """Check a request's fields (JSON, or multipart text fields) and its image count."""
    allowed = _EDIT if edit else _GENERATE
    for key in fields:
        if key not in allowed:
            raise Reject(400, f"Unknown parameter: '{key}'.", "unknown_parameter")
    model = fields.get("model")
    if not isinstance(model, str) or model not in MODELS:
        raise Reject(400, f"Invalid value for 'model': {model!r}.", "invalid_value")
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise Reject(400, "Missing required parameter: 'prompt'.", "missing_required_parameter")
    if str(fields.get("n", 1)) != "1":
        raise Reject(400, "imgbatch's simulator draws n=1 only", "invalid_value")
    size = fields.get("size", "auto")
    if size not in SIZES:
        raise Reject(400, f"Invalid value: '{size}'. Supported values are: "
                     + ", ".join(f"'{s}'" for s in SIZES), "invalid_value")
    for name, choices in CHOICES.items():
        if name in fields and fields[name] not in choices:
            raise Reject(400, f"Invalid value for '{name}': '{fields[name]}'. Supported "
                         f"values are: {', '.join(choices)}.", "invalid_value")
    output = fields.get("output_format", "png")
    if fields.get("background") == "transparent" and output == "jpeg":
        raise Reject(400, "Transparent background requires png or webp output_format.",
                     "invalid_value")
    if edit and not 1 <= images <= MAX_EDIT_IMAGES:
        raise Reject(400, f"an edit takes 1 to {MAX_EDIT_IMAGES} images, got {images}",
                     "invalid_value")
    return Parsed(model, prompt, images, "1:1", "1K", True, SIZES[size], output)


def json_images(body: dict[str, Any]) -> int:
    """How many images a JSON edit names; Reject unless each is ``{"image_url": ...}``."""
    images = body.get("images")
    if not isinstance(images, list) or not images:
        raise Reject(400, "Missing required parameter: 'images'.", "missing_required_parameter")
    for i, item in enumerate(images):
        url = item.get("image_url") if isinstance(item, dict) else None
        if not isinstance(url, str) or not url.startswith(("http://", "https://", "data:image/")):
            raise Reject(400, f"Invalid value for 'images[{i}]': needs image_url or file_id.",
                         "invalid_value")
    return len(images)


def error_body(message: str, kind: str = "invalid_request_error",
               code: str | None = None, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": param,
                                 "code": code}}).encode()


def moderation_blocked() -> bytes:
    return error_body("Your request was rejected by the safety system. safety_violations="
                      "[violence].", "image_generation_user_error", "moderation_blocked")


def answer_body(parsed: Parsed, images: list[bytes], quality: str) -> list[bytes]:
    """``{created, data: [{b64_json}], usage, ...}`` with ``images`` (base64), in pieces."""
    mark = "@@IMAGE_{}@@"
    width, height = parsed.pixels or (1024, 1024)
    out_tokens = {"low": 272, "medium": 1056, "high": 4160}.get(quality, 1056) * len(images)
    in_tokens = len(parsed.prompt) // 4 + 323 * parsed.input_images
    text = json.dumps({
        "created": int(time.time()),
        "data": [{"b64_json": mark.format(i)} for i in range(len(images))],
        "background": "opaque", "output_format": parsed.output_format,
        "quality": quality if quality != "auto" else "medium", "size": f"{width}x{height}",
        "usage": {"input_tokens": in_tokens, "output_tokens": out_tokens,
                  "total_tokens": in_tokens + out_tokens,
                  "input_tokens_details": {"text_tokens": in_tokens, "image_tokens": 0}},
    })
    pieces: list[bytes] = []
    for i, data in enumerate(images):
        before, text = text.split(mark.format(i), 1)
        pieces += [before.encode(), data]
    pieces.append(text.encode())
    return pieces
