"""The batch records of an output folder: which provider batches hold which jobs.

``<DIR>/.imgbatch/batches.jsonl``, one full record per line, the last line of a
tag wins; written under the folder's lock (the checkpoint holds it). The order
of writes is what keeps a batch from being paid twice:

1. ``intend``: the jobs, the request file and its sha256, and the unique tag,
   fsynced *before* the create call;
2. ``submitted``: the provider's batch id, fsynced right after it answers;
3. ``closed``: once every line of the finished batch is committed.

A record with no id is an intent whose create may or may not have happened:
the run mode asks the provider (``find(tag)``) before anything is submitted
again. A crash can only tear the last line, which loading drops.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from batch import fsops
from batch.checkpoint import STATE_DIR
from batch.errors import StorageError

log = logging.getLogger(__name__)

LEDGER = "batches.jsonl"
REQUESTS_DIR = "batches"  # request files, under .imgbatch/


@dataclass(frozen=True)
class BatchRecord:
    """One provider batch of this folder, from intent to close."""

    tag: str
    endpoint: str
    provider: str
    base_url: str  # where it was created, so `imgbatch cancel` needs no manifest
    api_key_env: str
    model: str
    route: str
    keys: tuple[str, ...]  # job ids, one line each
    fingerprints: tuple[str, ...]  # of each job when submitted
    file_sha256: str
    request_file: str  # relative to the output folder
    created_s: float
    price_micros: int  # the jobs' estimate at the batch rate
    batch_id: str = ""
    state: str = ""  # the provider's last known BatchState value ("" before any poll)
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    closed: bool = False
    note: str = ""

    def to_line(self) -> bytes:
        record = asdict(self)
        return (json.dumps(record, separators=(",", ":")) + "\n").encode()

    @staticmethod
    def from_line(line: bytes) -> BatchRecord:
        raw: dict[str, Any] = json.loads(line)
        raw["keys"] = tuple(raw["keys"])
        raw["fingerprints"] = tuple(raw["fingerprints"])
        return BatchRecord(**raw)


class Ledger:
    """The batch records of one output folder; see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / STATE_DIR / LEDGER
        self.records: dict[str, BatchRecord] = {}
        self._fd: int | None = None

    @classmethod
    def open(cls, root: Path, *, writable: bool = True) -> Ledger:
        ledger = cls(root)
        try:
            data = ledger.path.read_bytes()
        except FileNotFoundError:
            data = b""
        except OSError as exc:
            raise StorageError(f"cannot read {ledger.path}: {exc.strerror}") from None
        good = 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # torn by a crash: never acted on, since its fsync never returned
            try:
                record = BatchRecord.from_line(line)
            except (ValueError, KeyError, TypeError):
                log.warning("%s: an unreadable line dropped", ledger.path)
                break
            ledger.records[record.tag] = record
            good += len(line)
        if writable:
            (root / STATE_DIR / REQUESTS_DIR).mkdir(parents=True, exist_ok=True)
            try:
                fd = fsops.open_fd(ledger.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
                os.ftruncate(fd, good)  # drop a torn tail so appends start on a line
                os.lseek(fd, 0, os.SEEK_END)
            except OSError as exc:
                raise StorageError(f"cannot open {ledger.path}: {exc.strerror}") from None
            ledger._fd = fd
        return ledger

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fsops.close(fd)

    def _write(self, record: BatchRecord, *, durable: bool) -> BatchRecord:
        if self._fd is None:
            raise StorageError(f"{self.path} is not open for writing")
        try:
            fsops.write_all(self._fd, record.to_line())
            if durable:
                fsops.fsync(self._fd)
        except OSError as exc:
            raise StorageError(f"writing {self.path} failed: {exc.strerror}") from None
        self.records[record.tag] = record
        return record

    # -- the three steps ---------------------------------------------------------

    def intend(self, record: BatchRecord) -> BatchRecord:
        """Record a batch about to be created (durable before the create call)."""
        return self._write(record, durable=True)

    def submitted(self, tag: str, batch_id: str) -> BatchRecord:
        """The provider's id for ``tag`` (durable: a lost id means an orphan batch)."""
        return self._write(replace(self.records[tag], batch_id=batch_id), durable=True)

    def update(self, tag: str, **changes: Any) -> BatchRecord:
        """A poll's news (state, counts): not fsynced, the next poll says it again."""
        record = replace(self.records[tag], **changes)
        if record == self.records[tag]:
            return record
        return self._write(record, durable=False)

    def close_batch(self, tag: str, state: str, note: str = "") -> BatchRecord:
        """Every line of ``tag`` is committed: its jobs are free to go in another batch."""
        record = self._write(replace(self.records[tag], state=state, closed=True, note=note),
                             durable=True)
        request_file = self.root / record.request_file
        with contextlib.suppress(OSError):
            request_file.unlink(missing_ok=True)
        return record

    # -- questions ---------------------------------------------------------------

    def open_batches(self) -> list[BatchRecord]:
        return [r for r in self.records.values() if not r.closed]

    def live_keys(self) -> set[str]:
        return {key for record in self.open_batches() for key in record.keys}

    def new_tag(self, serial_base: str) -> Iterator[str]:
        """Tags unique to this folder and moment: ``imgbatch-<base>-<n>``."""
        n = 0
        while True:
            n += 1
            tag = f"imgbatch-{serial_base}-{n:04d}"
            if tag not in self.records:
                yield tag


def run_id() -> str:
    """A tag base unique to this run: time and a random part (two folders never clash)."""
    return f"{time.strftime('%Y%m%d%H%M%S', time.gmtime())}-{os.urandom(3).hex()}"
