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
from batch.linememo import fp_digest
from batch.statetable import StateTable
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
        "usage": (state.usage or None) if state is not None and current else None,
        "latency_s": state.latency_s if state is not None and current else None,
    }


def rows(jobs: Sequence[Job], store: StateStore) -> Iterator[dict[str, Any]]:
    table = store.states
    if not isinstance(table, StateTable):
        for job in jobs:
            yield row(job, table.get(job.id), fingerprint(job), store)
        return
    # A million rows: from the journal's records as read, no JobState built, and the
    # fingerprint compared by the digest the load computed when it can.
    fps = getattr(jobs, "fp_digests", lambda: None)()
    ids = getattr(jobs, "id_digests", lambda: None)()
    # Every job's record located at once, when the catalog knows its ids' digests.
    places = table.places(ids) if ids is not None else None
    for job in jobs:
        known = int(fps[job.index]) if fps is not None else 0
        state = table.recent(job.id)
        if state is not None:  # just written: no record to read back and parse
            current = _is_current(state.fingerprint, known, job)
            yield row(job, state, state.fingerprint if current else "", store)
            continue
        if places is not None:
            n = job.index
            record = table.read_record(job.id, int(places[0][n]), int(places[1][n]))
            intact = bool(places[2][n])
        else:
            record, intact = table.record(job.id)
        if record is None:
            yield row(job, None, "", store)
            continue
        yield _record_row(job, record, _is_current(record.get("fp"), known, job), intact, store)


def _is_current(fp: Any, known: int, job: Job) -> bool:
    """Whether a recorded fingerprint is ``job``'s: by the digest the load computed when
    ``known``. A record may say anything (a hand edit, a shard's segment): not current."""
    try:
        return bool(fp_digest(fp) == known if known else fp == fingerprint(job))
    except (ValueError, TypeError):
        return False


def _record_row(job: Job, record: dict[str, Any], current: bool, intact: bool,
                store: StateStore) -> dict[str, Any]:
    """:func:`row` of a journal record as read."""
    status = record.get("status") if current else Status.PENDING.value
    images = record.get("images") or [] if current else []
    if status == Status.SUCCEEDED.value and not intact:
        state = JobState.from_record(record)
        if not store.intact(state):
            status, images = Status.PENDING.value, []
    succeeded = status == Status.SUCCEEDED.value
    return {
        "id": job.id,
        "status": status,
        "attempts": record.get("attempts", 0),
        "images": [{key: image[key] for key in _IMAGE_KEYS} for image in images]
        if succeeded else [],
        "error": record.get("error") if current and not succeeded else None,
        "prompt": job.prompt,
        "model": job.model,
        "aspect_ratio": job.aspect_ratio,
        "image_size": job.image_size,
        "usage": (record.get("usage") or None) if current else None,
        "latency_s": record.get("latency_s") if current else None,
    }


_IMAGE_KEYS = ("path", "sha256", "bytes", "mime", "width", "height")


def write_results(jobs: Sequence[Job], store: StateStore) -> Counter[str]:
    """Write ``DIR/results.jsonl`` atomically; return the counts by status."""
    counts: Counter[str] = Counter()

    def lines() -> Iterator[bytes]:
        for line in rows(jobs, store):
            counts[line["status"]] += 1
            yield (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")

    write_atomic(store.root / RESULTS, lines())
    return counts
