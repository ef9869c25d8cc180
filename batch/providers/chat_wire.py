"""The chat-completions image protocol, without any I/O.

What a request body looks like for a job, how an HTTP status and body map
onto the error tree, and what a decoded 200 answer means. The transport
(:mod:`batch.providers.chat`) calls these; tests call them with tables.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

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
from batch.providers.base import Answer
from batch.retry import parse_retry_after

MAX_MESSAGE_CHARS = 500
FATAL_STATUSES = frozenset({401, 402, 403})
RETRYABLE_STATUSES = frozenset({408, 409})


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
    return len(data_url_head(image)) + 4 * (((image.size_bytes or 0) + 2) // 3)


@dataclass(frozen=True, slots=True)
class BodyParts:
    """A request body as JSON text around the local input images it inlines.

    The body is ``pieces[0]``, the data URL of ``files[0]``, ``pieces[1]`` and so
    on: the client streams each image from disk into its data URL, so the body of a
    job with 14 inputs of 7 MB is never held in memory.
    """

    pieces: tuple[bytes, ...]  # one more than files
    files: tuple[InputImage, ...]

    def length(self) -> int:
        return sum(map(len, self.pieces)) + sum(map(data_url_length, self.files))


def body_parts(job: Job, token: str) -> BodyParts:
    """``job``'s body cut where its local images go; ``token`` is a random marker."""
    files = tuple(image for image in job.images if image.kind is InputKind.FILE)
    marks = iter(range(len(files)))  # build_body asks for the files in order
    document = build_body(job, lambda image: f"{token}-{next(marks)}")
    rest = json.dumps(document, ensure_ascii=False).encode("utf-8")
    pieces = []
    for i in range(len(files)):
        # Quotes included: inside a JSON string a quote is always escaped.
        before, found, rest = rest.partition(f'"{token}-{i}"'.encode("ascii"))
        if not found:
            raise ValueError(f"marker {i} is missing from the body")
        pieces.append(before + b'"')
        rest = b'"' + rest
    pieces.append(rest)
    return BodyParts(tuple(pieces), files)


def server_message(body: bytes, content_type: str) -> str:
    """A short human message from an error body: JSON, HTML or plain text."""
    text = body.decode("utf-8", errors="replace").strip()
    if not text:
        return "(empty body)"
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if isinstance(document, dict):
        error = document.get("error", document)
        if isinstance(error, dict):
            for key in ("message", "msg", "detail"):
                value = error.get(key)
                if isinstance(value, str) and value:
                    return _clip(value)
        elif isinstance(error, str) and error:
            return _clip(error)
        return _clip(json.dumps(document, ensure_ascii=False))
    if "html" in content_type.lower() or text.lstrip().startswith("<"):
        title = re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
        if title is None:
            title = re.search(r"<h1[^>]*>(.*?)</h1>", text, re.IGNORECASE | re.DOTALL)
        if title is not None:
            return _clip(html.unescape(re.sub(r"\s+", " ", title.group(1)).strip()))
        return _clip(re.sub(r"<[^>]+>", " ", text))
    return _clip(text)


def _clip(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) > MAX_MESSAGE_CHARS:
        return text[: MAX_MESSAGE_CHARS - 3] + "..."
    return text


def error_for_status(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    job_id: str,
    now_s: float,
) -> JobError:
    """The error a non-200 answer stands for."""
    if 300 <= status < 400:  # not followed, see the client: every job would meet it
        where = headers.get("Location") or "an address it does not give"
        return FatalApiError(
            f"the gateway answers with a redirect to {where}; set the base URL to the "
            "address that answers itself",
            job_id=job_id,
            http_status=status,
        )
    message = server_message(body, headers.get("Content-Type", "") or "")
    retry_after = parse_retry_after(headers, now_s)
    return _error_for_code(status, message, job_id=job_id, retry_after_s=retry_after)


def _error_for_code(
    status: int, message: str, *, job_id: str, retry_after_s: float | None = None
) -> JobError:
    kwargs: dict[str, Any] = {"job_id": job_id, "http_status": status}
    if status == 429:
        return RateLimited(message, retry_after_s=retry_after_s, **kwargs)
    if status in FATAL_STATUSES:
        return FatalApiError(message, **kwargs)
    if status in RETRYABLE_STATUSES or status >= 500:
        return ServerError(message, retry_after_s=retry_after_s, **kwargs)
    return RejectedError(message, **kwargs)


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
        raise _error_for_code(status, f"error in a 200 answer: {said}", job_id=job_id)
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
            f"generation failed: {_clip(text) or 'finish_reason error'}",
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
        said = _clip(text) or f"finish_reason {finish or 'missing'}"
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
