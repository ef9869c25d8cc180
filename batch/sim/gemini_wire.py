"""The simulated Gemini API: checking generateContent requests, writing answers and errors.

Strict where the real API is (python-genai and the Generative Language
reference): the key in ``x-goog-api-key``, unknown fields refused (camelCase or
the proto's snake_case names only), supported ratios and sizes per model. Pure
functions, no server state.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from batch.jobs import ASPECT_RATIOS, IMAGE_SIZES, MAX_INPUT_IMAGES
from batch.sim.wire import Parsed, Reject

PRO_MODEL = "gemini-3-pro-image-preview"
FLASH_MODEL = "gemini-2.5-flash-image"
MODELS = (PRO_MODEL, FLASH_MODEL)
STATUS_NAMES = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}
_RPC = "type.googleapis.com/google.rpc."
# Field names the API knows at each level, in both spellings it accepts.
_REQUEST = {"contents", "generationConfig", "generation_config", "safetySettings",
            "safety_settings", "systemInstruction", "system_instruction", "tools"}
_CONTENT = {"role", "parts"}
_PART = {"text", "inlineData", "inline_data", "thought"}
_BLOB = {"mimeType", "mime_type", "data"}
_CONFIG = {"responseModalities", "response_modalities", "imageConfig", "image_config",
           "temperature", "candidateCount", "candidate_count", "seed"}
_IMAGE_CONFIG = {"aspectRatio", "aspect_ratio", "imageSize", "image_size"}


def path_model(path_tail: str) -> str:
    """The model of ``models/{model}:generateContent``; Reject 404 for any other method."""
    model, sep, method = path_tail.partition(":")
    if not sep or method != "generateContent" or not model:
        raise Reject(404, f"method {method or path_tail!r} not found")
    return model


def _known(value: Any, names: set[str], where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Reject(400, f"Invalid value at '{where}': must be an object")
    for key in value:
        if key not in names:
            raise Reject(400, f"Invalid JSON payload received. Unknown name \"{key}\" at "
                         f"'{where}': Cannot find field.")
    return value


def _get(mapping: dict[str, Any], camel: str, snake: str) -> Any:
    return mapping.get(camel, mapping.get(snake))


def parse_request(model: str, body: Any) -> Parsed:
    if model not in MODELS:
        raise Reject(404, f"models/{model} is not found for API version v1beta")
    body = _known(body, _REQUEST, "request")
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise Reject(400, "contents is not specified")
    texts, images = [], 0
    for i, content in enumerate(contents):
        content = _known(content, _CONTENT, f"contents[{i}]")
        parts = content.get("parts")
        if not isinstance(parts, list) or not parts:
            raise Reject(400, f"contents[{i}].parts must not be empty")
        for j, part in enumerate(parts):
            where = f"contents[{i}].parts[{j}]"
            part = _known(part, _PART, where)
            blob = _get(part, "inlineData", "inline_data")
            if isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif blob is not None:
                blob = _known(blob, _BLOB, where + ".inline_data")
                mime = _get(blob, "mimeType", "mime_type")
                if not isinstance(mime, str) or not mime.startswith("image/"):
                    raise Reject(400, f"{where}.inline_data.mime_type must be an image type")
                try:
                    if not base64.b64decode(blob.get("data") or "", validate=True):
                        raise Reject(400, f"{where}.inline_data.data is empty")
                except (binascii.Error, TypeError):
                    raise Reject(400, f"Invalid value at '{where}.inline_data.data' (TYPE_BYTES),"
                                 " Base64 decoding failed") from None
                images += 1
            else:
                raise Reject(400, f"{where}: a part needs text or inline_data")
    if images > MAX_INPUT_IMAGES:
        raise Reject(400, f"too many input images: {images} > {MAX_INPUT_IMAGES}")
    config = _known(_get(body, "generationConfig", "generation_config") or {}, _CONFIG,
                    "generation_config")
    modalities = _get(config, "responseModalities", "response_modalities") or ["TEXT"]
    image_config = _known(_get(config, "imageConfig", "image_config") or {}, _IMAGE_CONFIG,
                          "generation_config.image_config")
    ratio = _get(image_config, "aspectRatio", "aspect_ratio") or "1:1"
    size = _get(image_config, "imageSize", "image_size") or "1K"
    if ratio not in ASPECT_RATIOS:
        raise Reject(400, f"Unsupported aspect ratio: {ratio}")
    if size not in IMAGE_SIZES or (model == FLASH_MODEL and size != "1K"):
        raise Reject(400, f"Unsupported image size {size} for {model}")
    return Parsed(model, "\n".join(texts), images, ratio, size, "IMAGE" in modalities)


def error_body(status: int, message: str, details: list[dict[str, Any]] | None = None) -> bytes:
    error: dict[str, Any] = {"code": status, "message": message,
                             "status": STATUS_NAMES.get(status, "UNKNOWN")}
    if details:
        error["details"] = details
    return json.dumps({"error": error}, indent=2).encode()


def bad_key() -> bytes:
    return error_body(400, "API key not valid. Please pass a valid API key.", [{
        "@type": _RPC + "ErrorInfo", "reason": "API_KEY_INVALID",
        "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"},
    }])


def rate_limited(seconds: float, per_day: bool = False, quota: bool = True) -> bytes:
    """A 429: a quota of the project (per minute, or per day), or without ``quota`` the
    service's own RESOURCE_EXHAUSTED, which names none."""
    if not quota:
        return error_body(429, "Resource has been exhausted (e.g. check quota).", [
            {"@type": _RPC + "RetryInfo", "retryDelay": f"{seconds:.6g}s"}])
    name = ("GenerateRequestsPerDayPerProjectPerModel" if per_day
            else "GenerateRequestsPerMinutePerProjectPerModel")
    details: list[dict[str, Any]] = [
        {"@type": _RPC + "QuotaFailure", "violations": [{
            "quotaMetric": "generativelanguage.googleapis.com/generate_requests_per_model",
            "quotaId": name}]},
    ]
    if not per_day:
        details.append({"@type": _RPC + "RetryInfo", "retryDelay": f"{seconds:.6g}s"})
    return error_body(429, "You exceeded your current quota, please check your plan and "
                      "billing details.", details)


def answer_body(parsed: Parsed, images: list[bytes], *, finish: str = "STOP",
                blocked: str | None = None) -> list[bytes]:
    """A generateContent answer with ``images`` (base64), a draft before them, in pieces."""
    if blocked is not None:
        return [json.dumps({"promptFeedback": {"blockReason": blocked},
                            "usageMetadata": {"promptTokenCount": 12}}).encode()]
    mark = "@@IMAGE_{}@@"
    parts: list[dict[str, Any]] = [{"text": "Composing the scene.", "thought": True}]
    if images:  # a draft image the client must skip, as the real model sends with thinking
        parts.append({"inlineData": {"mimeType": "image/png", "data": mark.format("d")},
                      "thought": True})
    parts.append({"text": "Here is your image." if images else "I could not draw that."})
    parts += [{"inlineData": {"mimeType": "image/png", "data": mark.format(i)}}
              for i in range(len(images))]
    tokens = (2000 if parsed.image_size == "4K" else 1120) * len(images)
    text = json.dumps({
        "candidates": [{"content": {"role": "model", "parts": parts},
                        "finishReason": finish if images or finish != "STOP" else "NO_IMAGE",
                        "index": 0}],
        "usageMetadata": {"promptTokenCount": len(parsed.prompt) // 4 + 560 * parsed.input_images,
                          "candidatesTokenCount": tokens, "thoughtsTokenCount": 180,
                          "totalTokenCount": tokens + 180},
        "modelVersion": parsed.model,
    })
    pieces: list[bytes] = []
    if images:
        before, text = text.split(mark.format("d"), 1)
        pieces += [before.encode(), images[0]]
    for i, data in enumerate(images):
        before, text = text.split(mark.format(i), 1)
        pieces += [before.encode(), data]
    pieces.append(text.encode())
    return pieces
