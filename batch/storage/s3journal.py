"""The journal of an ``s3://`` output as objects: segment names, their order, and reading them.

Pure naming and ordering (tested with tables) apart from the two functions
that fetch segments and create one.

- ``g<gen>-w-<writer>-<seq>.jsonl``: one group commit of one writer;
- ``g<gen>-a-snapshot.jsonl``: every job's last state and the last 50 runs,
  written by the open of generation ``gen``; it sorts before that
  generation's segments and makes every older generation redundant.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from batch.errors import StorageError
from batch.storage.s3client import S3Location, describe

log = logging.getLogger(__name__)

JOURNAL_DIR = ".imgbatch/journal"
COMPACT_AFTER = 32  # segments an open reads before it writes a snapshot
_NAME = re.compile(r"g(\d{8})-(a-snapshot|w-[A-Za-z0-9_.]+-\d{8})\.jsonl$")
WRITER = re.compile(r"[A-Za-z0-9_.]+")


def segment_name(gen: int, writer: str, seq: int) -> str:
    return f"{JOURNAL_DIR}/g{gen:08d}-w-{writer}-{seq:08d}.jsonl"


def snapshot_name(gen: int) -> str:
    return f"{JOURNAL_DIR}/g{gen:08d}-a-snapshot.jsonl"


@dataclass(frozen=True)
class Plan:
    """What an open does with the segments it lists."""

    next_gen: int  # the generation this open writes
    live: tuple[str, ...]  # to read, in this order (paths under the output)
    stale: tuple[str, ...]  # older than the last snapshot: redundant

    @property
    def compact(self) -> bool:
        return len(self.live) > COMPACT_AFTER


def plan(names: Iterable[str]) -> Plan:
    """Order the journal objects ``names`` (file names); anything else is ignored."""
    found = []
    for name in names:
        match = _NAME.fullmatch(name)
        if match:
            found.append((name, int(match.group(1)), match.group(2) == "a-snapshot"))
    found.sort()
    floor = max((gen for _, gen, snap in found if snap), default=0)
    return Plan(
        next_gen=1 + max((gen for _, gen, _ in found), default=0),
        live=tuple(f"{JOURNAL_DIR}/{n}" for n, gen, _ in found if gen >= floor),
        stale=tuple(f"{JOURNAL_DIR}/{n}" for n, gen, _ in found if gen < floor),
    )


def fetch_all(store: Any, location: S3Location, rels: list[str]) -> list[bytes]:
    """The objects ``rels``, 16 requests at a time, in the order given."""
    import obstore

    async def fetch() -> list[bytes]:
        gate = asyncio.Semaphore(16)

        async def one(rel: str) -> bytes:
            async with gate:
                got = await obstore.get_async(store, location.key(rel))
                return bytes(await got.bytes_async())

        return list(await asyncio.gather(*(one(rel) for rel in rels)))

    return asyncio.run(fetch()) if rels else []


def put_new(store: Any, location: S3Location, rel: str, data: bytes,
            delays_s: Sequence[float], *, held: Callable[[], bool]) -> None:
    """Create ``rel`` holding ``data``; StorageError unless it is there, whole, after.

    A failure past obstore's retries is tried again under the same name after
    each of ``delays_s`` while ``held()`` (the writer's lease) is true: a
    segment given up on leaves its records out, and the next open deletes the
    staging keys of its images as unreferenced.
    """
    import obstore
    from obstore.exceptions import AlreadyExistsError

    key = location.key(rel)
    delays = list(delays_s)
    refused = 0
    while refused < 5:
        try:
            obstore.put(store, key, data, mode="create")
            return
        except AlreadyExistsError:
            refused += 1
        except Exception as exc:
            failed = f"writing {location.url}/{rel} failed: {describe(exc)}"
            if not delays:
                raise StorageError(failed) from None
            log.warning("%s; trying again in %gs", failed, delays[0])
            time.sleep(delays.pop(0))
            if not held():
                raise StorageError(f"{failed}, and the lease is no longer held") from None
            continue
        # Only this writer names this object, so it is most likely a retry finding its
        # own first try; a 412 from a confused gateway is not believed unread.
        try:
            found = bytes(obstore.get(store, key).bytes())
        except FileNotFoundError:
            continue
        except Exception as exc:
            raise StorageError(f"checking {location.url}/{rel} failed: {describe(exc)}"
                               ) from None
        if found == data:
            return
        raise StorageError(f"{location.url}/{rel} exists with other content: is "
                           "another writer using this prefix?")
    raise StorageError(f"writing {location.url}/{rel}: the server keeps refusing "
                       "a create-only write of an object that does not exist")
