"""Batch mode's part of the command line: flags, building the batch clients, status, cancel.

Kept beside the run mode so ``batch/cli.py`` only calls in: which endpoints go
as provider batches (``mode: batch`` in the manifest, or ``--mode``), their
clients (:data:`BATCH_CLIENTS`, imported on first use), the lines ``imgbatch
status`` adds for open batches (from the ledger: no network), and ``imgbatch
cancel``.
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from batch.checkpoint import Checkpoint
from batch.cost import to_usd
from batch.endpoints import BATCH, CHAT, GEMINI, OPENAI_IMAGES, SYNC, Endpoint
from batch.errors import UsageError
from batch.jobs import Job
from batch.provenance import Stamper
from batch.providers.base import ClientConfig, Secret
from batch.runners.batchledger import Ledger

if TYPE_CHECKING:  # the batch machinery is loaded by the runs that use it
    from batch.providers.batchapi import BatchApi
    from batch.runners.batchmode import BatchEndpoint, BatchRunner

# provider -> "module:class" of its BatchApi client (imported when a run needs it).
BATCH_CLIENTS: Mapping[str, str] = {
    GEMINI: "batch.providers.batch_gemini:GeminiBatchClient",
    OPENAI_IMAGES: "batch.providers.batch_openai:OpenAIBatchClient",
}


def add_arguments(run: argparse.ArgumentParser) -> None:
    add = run.add_argument
    add("--mode", choices=(SYNC, BATCH), default=None,
        help="send every endpoint's jobs one request each (sync) or as provider batches at "
             "about half the price (batch); default: each endpoint's mode: in the manifest")
    add("--wait", action="store_true",
        help="batch mode: keep polling until every batch has finished and is collected")
    add("--poll-interval", type=float, default=60.0, metavar="S",
        help="batch mode with --wait: seconds between polls (grows by half each time, "
             "up to 15 min)")
    add("--batch-fallback", choices=("none", SYNC), default="none",
        help="batch mode: jobs still not done --batch-deadline after their first submission "
             "run synchronously (an overdue batch is cancelled first, its finished lines kept)")
    add("--batch-deadline", type=float, default=86400.0, metavar="S",
        help="with --batch-fallback sync: seconds a job may wait in batches (default 24 h)")
    add("--batch-size", type=int, default=None, metavar="N",
        help="batch mode: at most N requests per provider batch (default: the provider's "
             "limit)")


@dataclass
class BatchPart:
    """A run's batch side: the runner (None when no endpoint is in batch mode), its jobs,
    and the folder's ledger, which also keeps jobs of live batches from the sync engine."""

    runner: BatchRunner | None
    jobs: list[Job]
    ledger: Ledger

    def held(self) -> set[str]:
        """Job ids the sync engine must leave alone: those of batch endpoints (but the
        overdue ones of --batch-fallback sync) and any a live batch holds."""
        fallback = {job.id for job in self.runner.fallback} if self.runner else set()
        return ({job.id for job in self.jobs} - fallback) | self.ledger.live_keys()


def batch_names(endpoints: Mapping[str, Endpoint], mode: str | None) -> set[str]:
    """The endpoints whose jobs go as provider batches."""
    names = {name for name, ep in endpoints.items()
             if mode == BATCH or (mode is None and ep.mode == BATCH)}
    for name in names:
        if endpoints[name].provider == CHAT:
            raise UsageError(f"endpoint {name or '(single)'}: chat completions have no batch "
                             "API for images; use provider gemini or openai-images")
    return names


def build_client(provider: str, config: ClientConfig) -> BatchApi:
    where = BATCH_CLIENTS.get(provider)
    if where is None:
        raise UsageError(f"provider {provider} has no batch API")
    module, _, name = where.partition(":")
    try:
        client: BatchApi = getattr(importlib.import_module(module), name)(config)
    except (ImportError, AttributeError):
        raise UsageError(f"provider {provider}: batch mode is not in this build") from None
    return client


def build_endpoints(endpoints: Mapping[str, Endpoint], names: set[str],
                    keys: Mapping[str, Secret], config: ClientConfig,
                    embed_metadata: bool = True) -> dict[str, BatchEndpoint]:
    """One batch client per batch endpoint (``config`` gives timeouts and TLS)."""
    from batch.runners.batchmode import BatchEndpoint

    out = {}
    for name in names:
        ep = endpoints[name]
        client_config = ClientConfig(
            base_url=ep.base_url, api_key=keys[name], timeout_s=config.timeout_s,
            stall_timeout_s=config.stall_timeout_s, ca_bundle=config.ca_bundle)
        out[name] = BatchEndpoint(name, ep.provider, ep.base_url, ep.api_key_env,
                                  build_client(ep.provider, client_config),
                                  Stamper(ep.provider, ep.base_url) if embed_metadata else None)
    return out


def status_lines(root: Path) -> list[str]:
    """The open batches of ``root`` as the ledger last saw them."""
    from batch.runners.batchplan import describe_age

    ledger = Ledger.open(root, writable=False)
    opened = ledger.open_batches()
    if not opened:
        return []
    now = time.time()
    lines = [f"  open batches: {len(opened)}, {sum(len(r.keys) for r in opened)} job(s), "
             f"~${to_usd(sum(r.price_micros for r in opened)):.2f} at the batch rate"]
    for r in opened:
        counts = f"{r.succeeded} ok / {r.failed} failed of {r.total or len(r.keys)}"
        lines.append(f"    {r.batch_id or '(not yet created: ' + r.tag + ')'}  "
                     f"{r.state or 'submitted'}  {counts}  age {describe_age(now - r.created_s)}"
                     f"  ~${to_usd(r.price_micros):.2f}  {r.provider} endpoint "
                     f"{r.endpoint or '(single)'} tag {r.tag}")
    return lines


async def cancel(root: Path, environ: Mapping[str, str]) -> int:
    """Cancel every open batch of ``root``; how many were cancelled.

    They stay in the ledger: the next run polls them (CANCELLED), keeps what
    they finished and sends the rest back to pending.
    """
    store = Checkpoint.open(root)  # the folder's lock: no run may submit meanwhile
    ledger = Ledger.open(root)
    clients: dict[str, BatchApi] = {}
    try:
        cancelled = 0
        for record in ledger.open_batches():
            api = clients.get(record.endpoint)
            if api is None:
                key = environ.get(record.api_key_env, "").strip()
                if not key:
                    raise UsageError(f"no API key: set {record.api_key_env} (endpoint "
                                     f"{record.endpoint or '(single)'})")
                config = ClientConfig(base_url=record.base_url, api_key=Secret(key))
                api = clients[record.endpoint] = build_client(record.provider, config)
            batch_id = record.batch_id
            if not batch_id:
                found = await api.find(record.tag)
                if found is None:  # never created: nothing to cancel, nothing to collect
                    ledger.close_batch(record.tag, "cancelled", "cancelled before creation")
                    continue
                batch_id = ledger.submitted(record.tag, found.batch_id).batch_id
            await api.cancel(batch_id)
            ledger.update(record.tag, state="cancelling")
            cancelled += 1
        return cancelled
    finally:
        for api in clients.values():
            await api.close()
        ledger.close()
        store.close()
