"""The chat-completions image protocol, without any I/O.

What a request body looks like for a job, how an HTTP status and body map
onto the error tree, and what a decoded 200 answer means. The transport
(:mod:`batch.providers.chat`) calls these; tests call them with tables.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from batch.errors import (
    JobError,
    MalformedResponse,
    NoImage,
    ServerError,
)
from batch.jobs import InputImage, InputKind, Job
from batch.providers.base import Answer
from batch.providers.bodies import BodyParts, base64_length, cut_json, local_files
from batch.providers.http_errors import clip, error_for_code, redirect_error
from batch.providers.http_errors import server_message as server_message
from batch.retry import parse_retry_after


def build_body(job: Job, file_url: Callable[[InputImage], str]) -> dict[str, Any]:
    """The JSON body for ``job``; ``file_url`` gives the URL of each local input image."""
    content: str | list[dict[str, Any]]
    if job.images:
        parts: list[dict[str, Any]] = [{"type": "text", "text": job.prompt}]
        for image in job.images:
            url = file_url(image) if image.kind is InputKind.FILE else image.ref
            parts.append({"type": "image_url", "image_url": {"url": url}})
        content = parts
    else:
        content = job.prompt
    body: dict[str, Any] = dict(job.params)
    body.update(
        {
            "model": job.model,
            "stream": False,
            "messages": [{"role": "user", "content": content}],
            "image_config": {"aspect_ratio": job.aspect_ratio, "image_size": job.image_size},
        }
    )
    return body


def data_url_head(image: InputImage) -> bytes:
    """What comes before a local image's base64 text in its data URL."""
    return f"data:{image.mime};base64,".encode("ascii")


def data_url_length(image: InputImage) -> int:
    """Bytes of a local image's data URL, from the size it had when the manifest was read."""
    return len(data_url_head(image)) + base64_length(image.size_bytes or 0)


def body_parts(job: Job, token: str) -> BodyParts:
    """``job``'s body cut where its local images go; ``token`` is a random marker."""
    files = local_files(job)
    heads = tuple(data_url_head(image) for image in files)
    return cut_json(lambda name: build_body(job, name), files, heads, token)


def error_for_status(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    job_id: str,
    now_s: float,
) -> JobError:
    """The error a non-200 answer stands for."""
    if 300 <= status < 400:
        return redirect_error(status, headers, job_id)
    message = server_message(body, headers.get("Content-Type", "") or "")
    retry_after = parse_retry_after(headers, now_s)
    return error_for_code(status, message, job_id=job_id, retry_after_s=retry_after,
                          headers=headers)


def interpret(document: Any, streamed: Mapping[str, int], *, job_id: str) -> Answer:
    """Read a decoded 200 body; raise the error it stands for, if any.

    ``document`` is the JSON with each data URL replaced by a placeholder;
    ``streamed`` maps each placeholder to the index of the image streamed out.
    """
    if not isinstance(document, dict):
        raise MalformedResponse("answer is not a JSON object", job_id=job_id, http_status=200)
    error = document.get("error")
    if error:
        # Gateways that already sent 200 report late failures in the body.
        code = error.get("code") if isinstance(error, dict) else None
        status = code if isinstance(code, int) and 400 <= code <= 599 else 502
        said = server_message(json.dumps({"error": error}).encode(), "application/json")
        raise error_for_code(status, f"error in a 200 answer: {said}", job_id=job_id)
    choices = document.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise MalformedResponse("answer has no choices", job_id=job_id, http_status=200)
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        raise MalformedResponse("answer has no message", job_id=job_id, http_status=200)
    finish_reason = choice.get("finish_reason")
    finish = finish_reason if isinstance(finish_reason, str) else None
    content = message.get("content")
    text = content if isinstance(content, str) else ""
    usage = document.get("usage")
    usage = usage if isinstance(usage, dict) else None
    if finish == "error":
        raise ServerError(
            f"generation failed: {clip(text) or 'finish_reason error'}",
            job_id=job_id,
            http_status=200,
        )
    indexes: list[int] = []
    images = message.get("images")
    if isinstance(images, list):
        for item in images:
            url = _image_url(item)
            if url is None:
                continue
            if url in streamed:
                indexes.append(streamed[url])
            elif url.startswith(("http://", "https://")):
                raise MalformedResponse(
                    "answer links an image by URL instead of embedding it; not supported",
                    job_id=job_id,
                    http_status=200,
                )
    if not indexes:
        said = clip(text) or f"finish_reason {finish or 'missing'}"
        raise NoImage(f"no image in the answer: {said}", job_id=job_id, http_status=200)
    return Answer(tuple(indexes), text, usage, finish)


def _image_url(item: Any) -> str | None:
    if not isinstance(item, dict):
        return None
    image_url = item.get("image_url")
    if isinstance(image_url, dict):
        url = image_url.get("url")
        return url if isinstance(url, str) else None
    if isinstance(image_url, str):
        return image_url
    return None
