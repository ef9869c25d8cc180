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
from batch.retry import header

MAX_MESSAGE_CHARS = 500
FATAL_STATUSES = frozenset({401, 402, 403})
RETRYABLE_STATUSES = frozenset({408, 409})
# What is left of a key's quota, and when it resets (OpenAI's names first, then the generic).
_QUOTA_HEADERS = (
    ("x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"),
    ("x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"),
    ("x-ratelimit-remaining", "x-ratelimit-reset"),
)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


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


def quota_used_up(headers: Mapping[str, str]) -> tuple[bool, float | None]:
    """Whether a 429's rate-limit headers say the key's quota is spent, and in how many
    seconds it resets when they say (``x-ratelimit-remaining-requests: 0`` with
    ``x-ratelimit-reset-requests: 1s``). Headers that are absent or unreadable say nothing."""
    for remaining, reset in _QUOTA_HEADERS:
        raw = header(headers, remaining)
        if raw is None:
            continue
        try:
            left = float(raw.strip())
        except ValueError:
            continue
        if left <= 0:
            return True, parse_duration(header(headers, reset))
    return False, None


def parse_duration(text: str | None) -> float | None:
    """OpenAI's reset durations (``1s``, ``6m0s``, ``20ms``, ``1h2m3.5s``) or plain seconds,
    in seconds; None if unreadable (a generic ``x-ratelimit-reset`` may be an epoch time)."""
    if text is None:
        return None
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION_PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            return None
        scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
        return sum(float(n) * scale[u] for n, u in parts)
    # A bare number beyond a day is an epoch time, not a wait.
    return seconds if 0 <= seconds <= 86_400 else None


def error_for_code(
    status: int,
    message: str,
    *,
    job_id: str,
    retry_after_s: float | None = None,
    headers: Mapping[str, str] | None = None,
) -> JobError:
    kwargs: dict[str, Any] = {"job_id": job_id, "http_status": status}
    if status == 429:
        spent, reset_s = quota_used_up(headers) if headers is not None else (False, None)
        return RateLimited(message, retry_after_s=retry_after_s if retry_after_s is not None
                           else reset_s, quota_used_up=spent, **kwargs)
    if status in FATAL_STATUSES:
        return FatalApiError(message, **kwargs)
    if status in RETRYABLE_STATUSES or status >= 500:
        return ServerError(message, retry_after_s=retry_after_s, **kwargs)
    return RejectedError(message, **kwargs)


