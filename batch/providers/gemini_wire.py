"""Google's Gemini API (generateContent), without any I/O.

Request bodies, error answers and 200 answers, as python-genai and the
Generative Language API reference lay them out: ``x-goog-api-key``, camelCase
fields (snake_case accepted in answers, as some proxies rewrite them),
``inlineData`` parts with bare base64, ``thought`` parts that are drafts,
``finishReason`` and ``promptFeedback.blockReason``, and errors whose
``details`` carry ``RetryInfo.retryDelay`` and ``QuotaFailure`` violations.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from batch.errors import (
    Blocked,
    FatalApiError,
    JobError,
    MalformedResponse,
    NoImage,
    QuotaExhausted,
    RateLimited,
)
from batch.jobs import InputImage, InputKind, Job
from batch.providers.base import Answer
from batch.providers.bodies import BodyParts, cut_json, local_files
from batch.providers.http_errors import (
    clip,
    error_for_code,
    error_object,
    redirect_error,
    server_message,
)
from batch.retry import parse_retry_after

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com/v1beta"
DEFAULT_KEY_ENV = "GEMINI_API_KEY"
RAW_KEYS = frozenset({"data"})  # inlineData.data / inline_data.data: bare base64
# Finish reasons that mean the model will not draw this prompt: the job fails at once.
BLOCKING = frozenset({
    "SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "RECITATION",
    "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION",
})
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)s\s*")


def endpoint_url(base_url: str, model: str) -> str:
    return f"{base_url.rstrip('/')}/models/{model}:generateContent"


def build_body(job: Job, file_data: Callable[[InputImage], str]) -> dict[str, Any]:
    """The JSON body for ``job``; ``file_data`` stands for each local file's base64."""
    parts: list[dict[str, Any]] = [{"text": job.prompt}]
    for image in job.images:
        if image.kind is InputKind.FILE:
            data = file_data(image)
        elif image.kind is InputKind.DATA:
            data = image.ref.split(",", 1)[1]
        else:  # the provider fetches URLs into local files before the body is laid out
            raise ValueError(f"input image {image.source} must be fetched first")
        parts.append({"inlineData": {"mimeType": image.mime, "data": data}})
    image_config = {"aspectRatio": job.aspect_ratio}
    if job.image_size != "1K":  # the default; Gemini 2.5 Flash Image takes no imageSize
        image_config["imageSize"] = job.image_size
    body: dict[str, Any] = dict(job.params)
    config = body.get("generationConfig")
    body["generationConfig"] = {
        **(config if isinstance(config, dict) else {}),
        "responseModalities": ["TEXT", "IMAGE"],
        "imageConfig": image_config,
    }
    body["contents"] = [{"role": "user", "parts": parts}]
    return body


def body_parts(job: Job, token: str) -> BodyParts:
    """``job``'s body cut where its local images' base64 goes."""
    files = local_files(job)
    return cut_json(lambda name: build_body(job, name), files, (b"",) * len(files), token)


def parse_duration(value: Any) -> float | None:
    """Seconds of a protobuf Duration in JSON ("47s", "45.837906927s"), or None."""
    if not isinstance(value, str):
        return None
    match = _DURATION.fullmatch(value)
    return float(match.group(1)) if match else None


def _field(mapping: Mapping[str, Any], camel: str, snake: str) -> Any:
    value = mapping.get(camel)
    return mapping.get(snake) if value is None else value


def _details(error: Mapping[str, Any]) -> tuple[float | None, list[str]]:
    """RetryInfo's delay and the quota ids QuotaFailure names (ErrorInfo's reason as one)."""
    delay, quotas = None, []
    details = error.get("details")
    for item in details if isinstance(details, list) else []:
        if not isinstance(item, dict):
            continue
        kind = str(item.get("@type", ""))
        if kind.endswith("google.rpc.ErrorInfo") and isinstance(item.get("reason"), str):
            quotas.append("reason:" + item["reason"])
        elif kind.endswith("google.rpc.RetryInfo"):
            delay = parse_duration(_field(item, "retryDelay", "retry_delay"))
        elif kind.endswith("google.rpc.QuotaFailure"):
            for violation in item.get("violations") or []:
                if isinstance(violation, dict):
                    quota = _field(violation, "quotaId", "quota_id")
                    if isinstance(quota, str):
                        quotas.append(quota)
    return delay, quotas


def error_for_status(
    status: int, headers: Mapping[str, str], body: bytes, job_id: str, now_s: float
) -> JobError:
    """The error a non-200 Gemini answer stands for."""
    if 300 <= status < 400:
        return redirect_error(status, headers, job_id)
    message = server_message(body, headers.get("Content-Type", "") or "")
    error = error_object(body)
    delay, quotas = _details(error) if error else (None, [])
    # Gemini sends no Retry-After; a proxy in front of it may.
    wait = delay if delay is not None else parse_retry_after(headers, now_s)
    if "reason:API_KEY_INVALID" in quotas:  # a 400, yet no job can succeed with this key
        return FatalApiError(message, job_id=job_id, http_status=status)
    if status == 429:
        daily = [quota for quota in quotas if "perday" in quota.lower()]
        if daily:
            return QuotaExhausted(
                f"the per-day quota {daily[0]} is used up; it will not clear by waiting, "
                "the rest stays pending for a later run",
                job_id=job_id, http_status=status,
            )
        # A QuotaFailure names a per-minute quota of the project: every request meets it.
        return RateLimited(message, job_id=job_id, http_status=status, retry_after_s=wait,
                           quota_used_up=bool(quotas))
    return error_for_code(status, message, job_id=job_id, retry_after_s=wait)


def interpret(document: Any, streamed: Mapping[str, int], job_id: str) -> Answer:
    """Read a decoded 200 generateContent answer; raise the error it stands for, if any."""
    if not isinstance(document, dict):
        raise MalformedResponse("answer is not a JSON object", job_id=job_id, http_status=200)
    if isinstance(document.get("error"), dict):  # a proxy that already sent 200
        code = document["error"].get("code")
        status = code if isinstance(code, int) and 400 <= code <= 599 else 502
        raw = json.dumps(document).encode()
        raise error_for_status(status, {}, raw, job_id, 0.0)
    feedback = _field(document, "promptFeedback", "prompt_feedback")
    if isinstance(feedback, dict):
        reason = _field(feedback, "blockReason", "block_reason")
        if reason:
            said = _field(feedback, "blockReasonMessage", "block_reason_message")
            raise Blocked(f"the prompt was blocked: {reason}" + (f" ({clip(said)})"
                          if isinstance(said, str) and said else ""),
                          job_id=job_id, http_status=200)
    candidates = document.get("candidates")
    if not isinstance(candidates, list) or not candidates or not isinstance(candidates[0], dict):
        raise MalformedResponse("answer has no candidates", job_id=job_id, http_status=200)
    candidate = candidates[0]
    finish = _field(candidate, "finishReason", "finish_reason")
    finish = finish if isinstance(finish, str) else None
    content = candidate.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    indexes: list[int] = []
    texts: list[str] = []
    for part in parts if isinstance(parts, list) else []:
        if not isinstance(part, dict) or part.get("thought") is True:
            continue  # the model's drafts are not results
        inline = _field(part, "inlineData", "inline_data")
        if isinstance(inline, dict) and inline.get("data") in streamed:
            indexes.append(streamed[inline["data"]])
        if isinstance(part.get("text"), str):
            texts.append(part["text"])
    text = "".join(texts)
    usage = _field(document, "usageMetadata", "usage_metadata")
    if not indexes:
        said = clip(text) or f"finishReason {finish or 'missing'}"
        if finish in BLOCKING:
            message = _field(candidate, "finishMessage", "finish_message")
            raise Blocked(f"the model refused: {finish}" + (f" ({clip(message)})"
                          if isinstance(message, str) and message else ""),
                          job_id=job_id, http_status=200)
        raise NoImage(f"no image in the answer: {said}", job_id=job_id, http_status=200)
    return Answer(tuple(indexes), text, usage if isinstance(usage, dict) else None, finish)
