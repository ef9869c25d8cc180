"""From a manifest's endpoints to what the engine drives: one provider and limits each.

The command line's single endpoint (``--provider``, ``--base-url``,
``--api-key-env``) when the manifest names none; a key missing for any endpoint
that has jobs is a usage error before anything is sent; ``validate``'s plan
and cost per endpoint.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from batch.checkpoint import STATE_DIR
from batch.cost import PriceTable, estimate_weighted
from batch.endpoints import CHAT, PROVIDERS, Endpoint
from batch.engine import Route, make_limits
from batch.errors import UsageError
from batch.jobs import Job
from batch.linememo import MEMO
from batch.manifest import Manifest, load_manifest
from batch.provenance import Stamper
from batch.providers import registry
from batch.providers.base import ClientConfig, Secret
from batch.retry import RetryPolicy


def add_arguments(parser: argparse.ArgumentParser, *, run: bool) -> None:
    """The command line's say on endpoints, for ``run`` and ``validate``."""
    add = parser.add_argument
    add("--provider", choices=PROVIDERS, default=CHAT,
        help="the provider of a manifest that names no endpoints")
    add("--endpoint", default=None, metavar="NAME",
        help="the endpoint for jobs that name none (default: the first)")
    add("--model", default=None, help="model for jobs that name none (default: the endpoint's)")
    if run:
        add("--base-url", action="append", default=[], metavar="[NAME=]URL",
            help="the single endpoint's base URL (default: the provider's own); "
                 "NAME=URL moves the manifest's endpoint NAME")
        add("--api-key-env", default=None, metavar="VAR", help="the single endpoint's key "
            "variable (QINIU_API_KEY, GEMINI_API_KEY, OPENAI_API_KEY)")


def load(args: argparse.Namespace) -> Manifest:
    """The manifest, its jobs resolved against the endpoint flags.

    ``run`` into a local folder reads the folder's line memo (:mod:`batch.linememo`):
    a resumed catalog then parses only the lines it does not know.
    """
    memo = None
    if getattr(args, "command", None) == "run" and getattr(args, "cluster", None) is None:
        output = getattr(args, "output", None) or str(Path("output") / args.manifest.stem)
        if "://" not in output:
            memo = Path(output) / STATE_DIR / MEMO
    return load_manifest(args.manifest, default_model=args.model, provider=args.provider,
                         endpoint=args.endpoint, memo=memo)


@dataclass(frozen=True)
class Settings:
    """The command line's say: the single endpoint, and defaults for every endpoint."""

    provider: str
    base_urls: tuple[str, ...]  # --base-url URL (the single endpoint) or NAME=URL (repeatable)
    api_key_env: str | None
    concurrency: int
    rpm: float | None
    timeout_s: float = 300.0
    stall_timeout_s: float = 60.0
    ca_bundle: Path | None = None
    embed_metadata: bool = True  # provenance XMP streamed into each image
    max_pause_s: float = 900.0  # a shared 429 pause, at most --max-rate-limit-wait

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        return cls(
            provider=args.provider, base_urls=tuple(args.base_url),
            api_key_env=args.api_key_env, concurrency=args.concurrency, rpm=args.rpm,
            timeout_s=args.timeout, stall_timeout_s=args.stall_timeout, ca_bundle=args.ca_bundle,
            embed_metadata=not getattr(args, "no_embed_metadata", False),
            max_pause_s=RetryPolicy(
                max_rate_limit_wait_s=getattr(args, "max_rate_limit_wait", 900.0)).max_pause_s,
        )


_NAMED_URL = re.compile(r"([A-Za-z0-9_-]{1,64})=(.+)")


def endpoints_in_use(manifest: Manifest, settings: Settings) -> dict[str, Endpoint]:
    """The endpoints that have jobs, in manifest order, with the command line's say.

    ``--base-url NAME=URL`` moves a named endpoint (to a simulator, a proxy); a
    plain ``--base-url URL`` is the single endpoint of a manifest that names none.
    """
    named = {m.group(1): m.group(2) for url in settings.base_urls
             if (m := _NAMED_URL.fullmatch(url)) and "://" not in m.group(1)}
    plain = [url for url in settings.base_urls if not _NAMED_URL.fullmatch(url)]
    if not manifest.endpoints:
        if named:
            raise UsageError(f"--base-url {next(iter(named))}=...: the manifest names no "
                             "endpoints")
        single = Endpoint.default(settings.provider)
        return {"": replace(
            single,
            base_url=plain[-1] if plain else single.base_url,
            api_key_env=settings.api_key_env or single.api_key_env,
        )}
    if plain:
        raise UsageError("the manifest names endpoints: move one with --base-url NAME=URL")
    for name in named:
        if name not in manifest.endpoints:
            raise UsageError(f"--base-url {name}=...: no endpoint named {name!r} "
                             f"(the manifest names {', '.join(manifest.endpoints)})")
    used = {job.endpoint for job in manifest.jobs.shapes.representatives()}
    return {name: replace(ep, base_url=named.get(name, ep.base_url))
            for name, ep in manifest.endpoints.items() if name in used}


def api_keys(endpoints: Mapping[str, Endpoint], environ: Mapping[str, str]) -> dict[str, Secret]:
    """Each endpoint's key; UsageError naming every variable that is unset."""
    keys, missing = {}, []
    for name, endpoint in endpoints.items():
        key = environ.get(endpoint.api_key_env, "").strip()
        if key:
            keys[name] = Secret(key)
        else:
            missing.append(endpoint.api_key_env + (f" (endpoint {name})" if name else ""))
    if missing:
        raise UsageError("no API key: set the environment variable " + ", ".join(missing))
    return keys


def build_routes(
    endpoints: Mapping[str, Endpoint], keys: Mapping[str, Secret], settings: Settings
) -> dict[str, Route]:
    """One provider client and one set of limits per endpoint (nothing is sent yet)."""
    routes = {}
    for name, endpoint in endpoints.items():
        concurrency = endpoint.concurrency or settings.concurrency
        config = ClientConfig(
            base_url=endpoint.base_url,
            api_key=keys[name],
            timeout_s=settings.timeout_s,
            stall_timeout_s=settings.stall_timeout_s,
            max_connections=concurrency,
            ca_bundle=settings.ca_bundle,
            stamp=(Stamper(endpoint.provider, endpoint.base_url)
                   if settings.embed_metadata else None),
        )
        limits = make_limits(concurrency, endpoint.rpm or settings.rpm, adaptive=True,
                             max_pause_s=settings.max_pause_s, name=name)
        routes[name] = Route(registry.build(endpoint.provider, config), limits, concurrency)
    return routes


def plan_lines(manifest: Manifest, table: PriceTable, provider: str) -> list[str]:
    """``validate``'s lines per endpoint: provider, where, jobs by model, cost of one image each."""
    endpoints = manifest.endpoints or {"(single)": Endpoint.default(provider)}
    by_endpoint: dict[str, list[tuple[Job, int]]] = {}
    for job, n in manifest.jobs.shapes.weighted():
        by_endpoint.setdefault(job.endpoint or "(single)", []).append((job, n))
    lines = []
    for name, endpoint in endpoints.items():
        jobs = by_endpoint.get(name, [])
        total, unknown = estimate_weighted(jobs, table)
        per_model: Counter[str] = Counter()
        for job, n in jobs:
            per_model[job.model] += n
        models = ", ".join(f"{m} x{n}" for m, n in per_model.items())
        count = sum(n for _, n in jobs)
        note = f" (+{unknown} of unknown price)" if unknown else ""
        lines.append(f"  endpoint {name}: {endpoint.provider} at {endpoint.base_url}, key "
                     f"${endpoint.api_key_env}; {count} job(s){': ' + models if jobs else ''}"
                     f"; ${total:.2f}{note}")
    return lines
