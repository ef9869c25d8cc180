"""What every protocol's error answers have in common: short messages, the status table.

Each protocol module reads its own error shape, then maps the status here.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping
from typing import Any

from batch.errors import (
    FatalApiError,
    JobError,
    RateLimited,
    RejectedError,
    ServerError,
)

MAX_MESSAGE_CHARS = 500
FATAL_STATUSES = frozenset({401, 402, 403})
RETRYABLE_STATUSES = frozenset({408, 409})


def redirect_error(status: int, headers: Mapping[str, str], job_id: str) -> JobError:
    """Redirects are not followed (a streamed body cannot be sent twice): every job meets it."""
    where = headers.get("Location") or "an address it does not give"
    return FatalApiError(
        f"the gateway answers with a redirect to {where}; set the base URL to the "
        "address that answers itself",
        job_id=job_id,
        http_status=status,
    )


def error_object(body: bytes) -> dict[str, Any]:
    """The ``error`` object of a JSON error body (OpenAI's and Google's shape), or {}."""
    try:
        document = json.loads(body)
    except ValueError:
        return {}
    error = document.get("error") if isinstance(document, dict) else None
    return error if isinstance(error, dict) else {}


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
                    return clip(value)
        elif isinstance(error, str) and error:
            return clip(error)
        return clip(json.dumps(document, ensure_ascii=False))
    if "html" in content_type.lower() or text.lstrip().startswith("<"):
        title = re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
        if title is None:
            title = re.search(r"<h1[^>]*>(.*?)</h1>", text, re.IGNORECASE | re.DOTALL)
        if title is not None:
            return clip(html.unescape(re.sub(r"\s+", " ", title.group(1)).strip()))
        return clip(re.sub(r"<[^>]+>", " ", text))
    return clip(text)


def clip(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) > MAX_MESSAGE_CHARS:
        return text[: MAX_MESSAGE_CHARS - 3] + "..."
    return text


def error_for_code(
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


