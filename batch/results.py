"""results.jsonl: one line per job of the current manifest, in manifest order, from the checkpoint.

Rewritten atomically (temporary file, fsync, rename) at the end of every
run, interrupted runs included, so a reader never sees half a file.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from batch.checkpoint import JobState, fingerprint
from batch.images import write_atomic
from batch.jobs import Job, Status
from batch.storage.base import StateStore

RESULTS = "results.jsonl"


def row(job: Job, state: JobState | None, fp: str, store: StateStore) -> dict[str, Any]:
    """The results.jsonl line of ``job``, given its checkpoint state."""
    current = state is not None and state.fingerprint == fp
    status = state.status if state is not None and current else Status.PENDING
    images = state.images if state is not None and current else ()
    if status is Status.SUCCEEDED and state is not None and not store.intact(state):
        status, images = Status.PENDING, ()
    return {
        "id": job.id,
        "status": status.value,
        "attempts": state.attempts if state is not None else 0,
        "images": [image.as_dict() for image in images] if status is Status.SUCCEEDED else [],
        "error": state.error if state is not None and current and status is not Status.SUCCEEDED
        else None,
        "prompt": job.prompt,
        "model": job.model,
        "aspect_ratio": job.aspect_ratio,
        "image_size": job.image_size,
        "usage": state.usage if state is not None and current else None,
        "latency_s": state.latency_s if state is not None and current else None,
    }


def rows(jobs: Sequence[Job], store: StateStore) -> Iterator[dict[str, Any]]:
    for job in jobs:
        yield row(job, store.states.get(job.id), fingerprint(job), store)


def write_results(jobs: Sequence[Job], store: StateStore) -> Counter[str]:
    """Write ``DIR/results.jsonl`` atomically; return the counts by status."""
    counts: Counter[str] = Counter()

    def lines() -> Iterator[bytes]:
        for line in rows(jobs, store):
            counts[line["status"]] += 1
            yield (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")

    write_atomic(store.root / RESULTS, lines())
    return counts
