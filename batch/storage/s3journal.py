"""The journal of an ``s3://`` output as objects: segment names, their order, and reading them.

Pure naming and ordering (tested with tables) apart from the one function
that fetches segments.

- ``g<gen>-w-<writer>-<seq>.jsonl``: one group commit of one writer;
- ``g<gen>-a-snapshot.jsonl``: every job's last state and the last 50 runs,
  written by the open of generation ``gen``; it sorts before that
  generation's segments and makes every older generation redundant.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from batch.storage.s3client import S3Location

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
