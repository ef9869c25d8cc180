"""OpenAI's Images API (/images/generations, /images/edits), without any I/O.

As openai-python sends it: JSON for text-to-image; an edit uploads its files as
multipart ``image[]`` parts, or, when it names images by URL, goes as JSON
``images: [{"image_url": ...}]`` (local files then ride as data URLs). Answers
carry ``data[].b64_json``: bare base64 the decoder streams out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from batch.errors import Blocked, JobError, MalformedResponse, NoImage, QuotaExhausted
from batch.jobs import InputKind, Job
from batch.providers.base import Answer
from batch.providers.bodies import BodyParts, cut_json, local_files, multipart
from batch.providers.chat_wire import data_url_head
from batch.providers.http_errors import error_for_code, error_object, redirect_error, server_message
from batch.retry import parse_retry_after

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
RAW_KEYS = frozenset({"b64_json"})
# What gpt-image can draw: a job's aspect_ratio becomes one of these sizes.
SIZES = {"1:1": "1024x1024", "3:2": "1536x1024", "2:3": "1024x1536"}
OPTIONS = {
    "quality": ("low", "medium", "high", "auto"),
    "output_format": ("png", "jpeg", "webp"),
    "background": ("transparent", "opaque", "auto"),
}


def is_edit(job: Job) -> bool:
    return bool(job.images)


def uses_json(job: Job) -> bool:
    """An edit naming an image by URL (or data URL) cannot go as multipart uploads."""
    return any(image.kind is not InputKind.FILE for image in job.images)


def fields(job: Job) -> dict[str, Any]:
    """The request's fields besides the images: params, then what imgbatch sets."""
    out: dict[str, Any] = dict(job.params)
    out.update({"model": job.model, "prompt": job.prompt, "n": 1,
                "size": SIZES[job.aspect_ratio]})
    out.update(job.options)
    return out


def body_parts(job: Job, token: str) -> tuple[BodyParts, str]:
    """``job``'s body and its Content-Type; local files are streamed into it."""
    files = local_files(job)
    if not is_edit(job) or uses_json(job):
        def build(file_url: Any) -> dict[str, Any]:
            body = fields(job)
            if job.images:
                body["images"] = [
                    {"image_url": file_url(image) if image.kind is InputKind.FILE
                     else image.ref} for image in job.images
                ]
            return body

        heads = tuple(data_url_head(image) for image in files)
        return cut_json(build, files, heads, token), "application/json"
    text = [(name, value if isinstance(value, str) else json.dumps(value))
            for name, value in fields(job).items()]
    parts = multipart(text, [("image[]", image) for image in files], token)
    return parts, f"multipart/form-data; boundary={token}"


def error_for_status(
    status: int, headers: Mapping[str, str], body: bytes, job_id: str, now_s: float
) -> JobError:
    """The error a non-200 Images API answer stands for."""
    if 300 <= status < 400:
        return redirect_error(status, headers, job_id)
    message = server_message(body, headers.get("Content-Type", "") or "")
    code = error_object(body).get("code")
    if code in ("moderation_blocked", "content_policy_violation"):  # gpt-image, dall-e
        return Blocked(f"refused by the safety system: {message}", job_id=job_id,
                       http_status=status)
    if status == 429 and code == "insufficient_quota":  # credit gone: waiting will not help
        return QuotaExhausted(f"{message} (insufficient_quota); the rest stays pending",
                              job_id=job_id, http_status=status)
    retry_after = parse_retry_after(headers, now_s)
    return error_for_code(status, message, job_id=job_id, retry_after_s=retry_after,
                          headers=headers)


def interpret(document: Any, streamed: Mapping[str, int], job_id: str) -> Answer:
    """Read a decoded 200 answer: ``data[].b64_json`` are the images."""
    if not isinstance(document, dict):
        raise MalformedResponse("answer is not a JSON object", job_id=job_id, http_status=200)
    data = document.get("data")
    if not isinstance(data, list):
        raise MalformedResponse("answer has no data list", job_id=job_id, http_status=200)
    indexes: list[int] = []
    for item in data:
        if not isinstance(item, dict):
            continue
        b64 = item.get("b64_json")
        if isinstance(b64, str) and b64 in streamed:
            indexes.append(streamed[b64])
        elif isinstance(item.get("url"), str):
            raise MalformedResponse("answer links an image by URL instead of embedding it; "
                                    "not supported", job_id=job_id, http_status=200)
    if not indexes:
        raise NoImage("no image in the answer", job_id=job_id, http_status=200)
    usage = document.get("usage")
    text = document.get("revised_prompt") if isinstance(document.get("revised_prompt"), str) \
        else ""
    return Answer(tuple(indexes), str(text), usage if isinstance(usage, dict) else None, None)
