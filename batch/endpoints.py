"""Named endpoints: which provider serves a job, where, with which key and limits.

Pure logic: reading a manifest's ``endpoints:`` mapping, the defaults of each
provider, and what each provider can draw (a job asking for more is a manifest
problem naming what the provider can do, found before anything is sent).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from batch.jobs import IMAGE_SIZES, Job

CHAT, GEMINI, OPENAI_IMAGES = "chat", "gemini", "openai-images"
PROVIDERS = (CHAT, GEMINI, OPENAI_IMAGES)
# provider -> (base URL, key variable, model for jobs that name none)
DEFAULTS: Mapping[str, tuple[str, str, str]] = {
    CHAT: ("https://api.qnaigc.com/v1", "QINIU_API_KEY", "gemini-3.0-pro-image-preview"),
    GEMINI: ("https://generativelanguage.googleapis.com/v1beta", "GEMINI_API_KEY",
             "gemini-3-pro-image-preview"),
    OPENAI_IMAGES: ("https://api.openai.com/v1", "OPENAI_API_KEY", "gpt-image-1"),
}
OPTION_FIELDS = ("quality", "output_format", "background")  # gpt-image's own settings
OPTION_VALUES: Mapping[str, tuple[str, ...]] = {
    "quality": ("low", "medium", "high", "auto"),
    "output_format": ("png", "jpeg", "webp"),
    "background": ("transparent", "opaque", "auto"),
}
# What gpt-image draws: aspect_ratio -> size.
OPENAI_SIZES: Mapping[str, str] = {"1:1": "1024x1024", "3:2": "1536x1024", "2:3": "1024x1536"}
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_KEYS = ("provider", "base_url", "api_key_env", "model", "rpm", "concurrency", "mode")
SYNC, BATCH = "sync", "batch"  # an endpoint's mode: a request per job, or provider batches
MODES = (SYNC, BATCH)
_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

Found = Iterator[tuple[str, str]]  # (field suffix, message)


@dataclass(frozen=True)
class Endpoint:
    """One place jobs are sent: a provider at a base URL, with its key and own limits."""

    name: str
    provider: str
    base_url: str
    api_key_env: str
    model: str  # for jobs that name none
    rpm: float | None = None
    concurrency: int | None = None
    mode: str = SYNC

    @classmethod
    def default(cls, provider: str, name: str = "") -> Endpoint:
        base_url, key_env, model = DEFAULTS[provider]
        return cls(name, provider, base_url, key_env, model)


def parse_endpoints(raw: Any) -> tuple[dict[str, Endpoint], list[tuple[str, str]]]:
    """The ``endpoints:`` mapping, in order, and its problems as (field, message)."""
    if not isinstance(raw, dict) or not raw:
        return {}, [("endpoints", "must be a mapping of names to endpoints")]
    found: list[tuple[str, str]] = []
    out: dict[str, Endpoint] = {}
    for name, spec in raw.items():
        where = f"endpoints.{str(name)[:64]}"
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            found.append((where, "an endpoint name is 1-64 characters from A-Z a-z 0-9 _ -"))
            continue
        problems = list(_check_endpoint(spec))
        found += [(where + suffix, message) for suffix, message in problems]
        if not problems:
            base = Endpoint.default(spec["provider"], name)
            rpm = spec.get("rpm")
            out[name] = Endpoint(
                name, base.provider, spec.get("base_url", base.base_url).rstrip("/"),
                spec.get("api_key_env", base.api_key_env), spec.get("model", base.model),
                float(rpm) if rpm is not None else None, spec.get("concurrency"),
                spec.get("mode", SYNC),
            )
    return out, found


def _check_endpoint(spec: Any) -> Found:
    if not isinstance(spec, dict):
        yield "", "must be a mapping with provider: and optional base_url, api_key_env, ..."
        return
    for key in spec:
        if key not in _KEYS:
            yield f".{str(key)[:40]}", f"unknown endpoint setting; known: {', '.join(_KEYS)}"
    provider = spec.get("provider")
    if provider not in PROVIDERS:
        yield ".provider", f"must be one of {', '.join(PROVIDERS)}, got {provider!r}"
    url = spec.get("base_url")
    if url is not None and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
        yield ".base_url", "must be an http(s) URL"
    env = spec.get("api_key_env")
    if env is not None and not (isinstance(env, str) and _ENV.fullmatch(env)):
        yield ".api_key_env", "must name an environment variable"
    model = spec.get("model")
    if model is not None and not (isinstance(model, str) and model.strip()):
        yield ".model", "must be a non-empty string"
    rpm = spec.get("rpm")
    if rpm is not None and (isinstance(rpm, bool) or not isinstance(rpm, int | float)
                            or not math.isfinite(rpm) or rpm <= 0):
        yield ".rpm", "must be a number > 0"
    mode = spec.get("mode", SYNC)
    if mode not in MODES:
        yield ".mode", f"must be {' or '.join(MODES)}, got {mode!r}"
    elif mode == BATCH and provider == CHAT:
        yield ".mode", "chat completions have no batch API for images; use gemini or " \
            "openai-images"
    concurrency = spec.get("concurrency")
    if concurrency is not None and (isinstance(concurrency, bool)
                                    or not isinstance(concurrency, int) or concurrency < 1):
        yield ".concurrency", "must be a whole number >= 1"


def check_option(value: Any) -> Found:
    """A provider option's type (its value is checked against the job's provider)."""
    if not isinstance(value, str) or not value:
        yield "", "must be a non-empty string"


def check_job(provider: str, job: Job) -> Found:
    """What ``job`` asks of ``provider`` that it cannot do, as (field, message)."""
    if provider != OPENAI_IMAGES:
        for name in job.options:
            yield name, f"is a setting of openai-images; this job's provider is {provider}"
        if provider == GEMINI and "flash" in job.model and job.image_size != "1K":
            yield "image_size", f"{job.model} draws 1K only"
        return
    if job.aspect_ratio not in OPENAI_SIZES:
        can = ", ".join(f"{ratio} ({size})" for ratio, size in OPENAI_SIZES.items())
        yield "aspect_ratio", f"openai-images cannot draw {job.aspect_ratio}; it can draw {can}"
    if job.image_size != IMAGE_SIZES[0]:
        yield "image_size", ("openai-images has no image_size; its sizes follow aspect_ratio "
                             f"({', '.join(OPENAI_SIZES.values())})")
    for name, value in job.options.items():
        if value not in OPTION_VALUES[name]:
            yield name, f"must be one of {', '.join(OPTION_VALUES[name])}, got {value!r}"
    if job.options.get("background") == "transparent" and \
            job.options.get("output_format") == "jpeg":
        yield "background", "transparent needs output_format png or webp"


def resolve(
    endpoints: Mapping[str, Endpoint], job_endpoint: str, chosen: str | None
) -> tuple[Endpoint | None, str]:
    """The endpoint a job goes to (its own, else ``chosen``, else the first); or a problem."""
    name = job_endpoint or chosen or next(iter(endpoints))
    found = endpoints.get(name)
    if found is None:
        return None, f"no endpoint named {name!r}; the manifest names {', '.join(endpoints)}"
    return found, ""
