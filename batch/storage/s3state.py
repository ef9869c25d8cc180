"""The state of an ``s3://`` output: journal segments in the bucket, under a lease.

S3 has no append, so every group commit writes one immutable object,
``prefix/.imgbatch/journal/g<gen>-w-<writer>-<seq>.jsonl``, create-only,
holding the same JSON lines as a local journal (job states and run records;
the last line for an id wins). ``gen`` is one more than the highest
generation found at open, so a later run's segments sort after an earlier
one's; ``writer`` names a writer of that generation (``main``, or a shard
under one driver's lease), ``seq`` counts its segments. An open reads the
segments in name order. When it finds more than 32 it writes a snapshot,
``g<gen>-a-snapshot.jsonl`` (one line per job and the last 50 run records),
which sorts before the segments of its own generation, makes every older
generation redundant, and lets them be deleted; a crash in between leaves
them ignored.

A success is recorded before its image is copied from its staging key to
its final key (:mod:`batch.storage.s3images`); an open copies what a crash
left unpublished (:mod:`batch.storage.s3recovery`), then, only under a lease
read back and still ours, deletes staging keys nobody needs and aborts
multipart uploads left under the prefix; a shard writer publishes and never
deletes. Every write and delete refuses once the lease is lost or was not
renewed in time. ``root`` is a local folder for results.jsonl,
summary.json and the gallery, copied to the bucket by :meth:`sync_out`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from batch.checkpoint import JobState
from batch.errors import NotRecorded, OutputError, StorageError, Unpublished
from batch.images import StagedImage
from batch.jobs import Job, Status
from batch.storage import s3client, s3journal, s3lease, s3recovery
from batch.storage.s3client import S3Location, describe
from batch.storage.s3images import STAGING, S3Images
from batch.storage.s3lease import LEASE, Lease

log = logging.getLogger(__name__)

MIRRORED = ("summary.json",)  # downloaded at open: the run appends to it


class S3State:
    """The :class:`~batch.storage.base.StateStore` of an ``s3://`` output."""

    def __init__(self, location: S3Location, store: Any, *, writer: str = "main") -> None:
        if not s3journal.WRITER.fullmatch(writer):
            raise ValueError(f"writer {writer!r}: letters, digits, '_' and '.' only")
        self.location = location
        self._store = store
        self.writer = writer
        self.root = Path(tempfile.mkdtemp(prefix="imgbatch-s3-"))
        self.states: dict[str, JobState] = {}
        self.runs: list[dict[str, Any]] = []
        self.gen = 1
        self._seq = 0
        self._pending: list[bytes] = []  # records not yet durable (attempt counts)
        self._lock = threading.Lock()
        self._objects: dict[str, int] = {}  # published image rel -> size
        self._intact: set[str] = set()
        self._lease: Lease | None = None
        self.put_retry_delays_s: tuple[float, ...] = (1.0, 4.0, 10.0)
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="imgbatch-s3")
        self.sink = S3Images(store, location, self.root / ".spool", f"g{self.gen:08d}-{writer}")
        self._closed = False

    # -- opening ---------------------------------------------------------------------

    @classmethod
    def open(cls, location: S3Location, *, writer: str = "main",
             shard_of: int | None = None, store: Any = None) -> S3State:
        """Take the lease, load the journal, finish interrupted publications, clean up.

        ``shard_of=GEN`` opens a shard writer under a driver that holds the lease
        and opened generation ``GEN``: no lease, no compaction and no clean-up
        (they would delete or abort what other shards are writing); ``writer``
        must then be unique among the driver's shards. ``store``: an obstore store
        instead of one from the environment.
        """
        state = cls(location, store or s3client.open_store(location), writer=writer)
        try:
            if shard_of is None:
                ttl_s = s3lease.TTL_S
                lease_store = s3client.open_store(location, retry_timeout_s=ttl_s / 3,
                                                  timeout_s=ttl_s / 3)
                state._lease = Lease(lease_store, location.key(LEASE), location.url, ttl_s)
                state._lease.acquire()
                state._load(writable=True)
                state._recover()
            else:
                state._load(writable=False)
                state._use_generation(shard_of)
                # An earlier attempt of this shard may have recorded jobs and died before
                # publishing them: publish (never delete) so they are done, not paid again.
                state._recover(clean=False)
            state._download(MIRRORED)
        except BaseException:
            state.close()
            raise
        return state

    @classmethod
    def read(cls, location: S3Location) -> S3State:
        """Load the journal without the lease or any change (for ``status``, ``report``)."""
        state = cls(location, s3client.open_store(location))
        try:
            state._load(writable=False)
            state._list_images()
            state._download(MIRRORED)
        except BaseException:
            state.close()
            raise
        return state

    def refresh(self) -> None:
        """Read every segment again (shard writers' too) and finish what they left staged.

        For the driver of a cluster run once every shard has ended; the lease stays held
        (NotRecorded if it is not: the deletes would hit another run's staged images).
        """
        self._hold_lease(confirm=True)
        gen = self.gen
        self.states.clear()
        self.runs.clear()
        self._objects.clear()
        self._intact.clear()
        self._load(writable=False)
        self._use_generation(gen)
        self._recover()

    def _use_generation(self, gen: int) -> None:
        self.gen = gen
        self.sink = S3Images(self._store, self.location, self.root / ".spool",
                             f"g{self.gen:08d}-{self.writer}")

    def _list(self, rel: str) -> list[Any]:
        import obstore

        try:
            return [meta for batch in obstore.list(self._store, self.location.key(rel) + "/")
                    for meta in batch]
        except Exception as exc:
            raise OutputError(f"cannot list {self.location.url}/{rel}: {describe(exc)}") from None

    def _load(self, *, writable: bool) -> None:
        journal = s3journal.plan(meta["path"].rsplit("/", 1)[-1]
                                 for meta in self._list(s3journal.JOURNAL_DIR))
        self._use_generation(journal.next_gen)
        live = list(journal.live)
        try:
            segments = s3journal.fetch_all(self._store, self.location, live)
        except Exception as exc:
            raise OutputError(f"cannot read the journal of {self.location.url}: "
                              f"{describe(exc)}") from None
        for name, data in zip(live, segments, strict=True):
            for number, line in enumerate(data.splitlines(), 1):
                self._load_line(line, name, number)
        if not writable:
            return
        stale = journal.stale
        if stale or journal.compact:
            self._hold_lease(confirm=True)
        if journal.compact:
            self._compact()
            stale = journal.stale + journal.live
        for rel in stale:
            self._delete(rel)

    def _load_line(self, line: bytes, name: str, number: int) -> None:
        if not line.strip():
            return
        try:
            record = json.loads(line)
            if "run" in record:
                self.runs.append(record)
            else:
                state = JobState.from_record(record)
                # A dead shard attempt's segments may sort after its retry's (node clocks
                # differ); attempts only grow, so the one with more is the later record.
                old = self.states.get(state.id)
                if old is None or state.attempts >= old.attempts:
                    self.states[state.id] = state
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("%s:%d: skipping an unreadable record (%s)", name, number, exc)

    def _compact(self) -> None:
        self.runs = self.runs[-50:]
        lines = [json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in self.runs]
        lines += [state.to_line() for state in self.states.values()]
        self._put(s3journal.snapshot_name(self.gen), b"".join(lines))

    def _list_images(self) -> None:
        prefix = self.location.key("")
        for meta in self._list("images"):
            self._objects[meta["path"][len(prefix):]] = int(meta["size"])

    def _recover(self, *, clean: bool = True) -> None:
        """Publish what a crash left staged; ``clean``: then, under a lease confirmed still
        ours, drop staging keys and multipart leftovers."""
        self._list_images()
        staged = {self.location.rel(meta["path"]) for meta in self._list(STAGING)}
        self._intact |= s3recovery.publish_recorded(
            self.states.values(), self._objects, staged, self.sink, tolerant=not clean)
        if not clean:
            return
        self._hold_lease(confirm=True)
        for rel in staged:
            self._delete(rel)
        s3recovery.abort_uploads(self.location)

    def _hold_lease(self, *, confirm: bool = False) -> None:
        """NotRecorded unless this store holds a valid lease (``confirm``: read back)."""
        if self._lease is None:
            raise NotRecorded(f"{self.location.url}: deleting needs the lease")
        if confirm:
            self._lease.confirm()
        else:
            self._lease.check()

    def _download(self, names: Iterable[str]) -> None:
        import obstore

        for name in names:
            try:
                data = bytes(obstore.get(self._store, self.location.key(name)).bytes())
            except FileNotFoundError:
                continue
            except Exception as exc:
                raise OutputError(f"cannot read {self.location.url}/{name}: "
                                  f"{describe(exc)}") from None
            (self.root / name).write_bytes(data)

    # -- questions --------------------------------------------------------------------

    def is_done(self, job: Job, fp: str, *, verify: bool = False) -> bool:
        state = self.states.get(job.id)
        if state is None or state.status is not Status.SUCCEEDED or state.fingerprint != fp:
            return False
        return self.intact(state, verify=verify)

    def intact(self, state: JobState, *, verify: bool = False) -> bool:
        """Every image of ``state`` is published with its recorded size (content if ``verify``)."""
        if not verify and state.id in self._intact:
            return True
        for image in state.images:
            if self._objects.get(image.path) != image.bytes:
                return False
            if verify and self.sha256_of(image.path) != image.sha256:
                return False
        return True

    def sha256_of(self, rel: str) -> str | None:
        import obstore

        digest = hashlib.sha256()
        try:
            for chunk in obstore.get(self._store, self.location.key(rel)).stream():
                digest.update(chunk)
        except Exception:
            return None
        return digest.hexdigest()

    def attempts(self, job_id: str) -> int:
        state = self.states.get(job_id)
        return state.attempts if state else 0

    # -- writing ----------------------------------------------------------------------

    def mark_attempt(self, job: Job, fp: str) -> JobState:
        state = JobState(id=job.id, fingerprint=fp, status=Status.PENDING,
                         attempts=self.attempts(job.id) + 1)
        # Not written now: an attempt count rides with the next segment.
        self.record(state, durable=False)
        return state

    def record(self, state: JobState, *, durable: bool) -> None:
        with self._lock:
            self._pending.append(state.to_line())
            self._remember([state])
        if durable:
            self._flush(b"")

    def commit_batch(self, states: list[JobState], staged: list[StagedImage]) -> None:
        """One segment for ``states``, then each staged image copied to its final key."""
        data = b"".join(state.to_line() for state in states)
        try:
            self._flush(data)
        except NotRecorded:
            raise
        except StorageError as exc:
            with self._lock:
                self._remember(states)
            raise Unpublished(f"{exc}; its images wait under staging keys for the next run"
                              ) from None
        with self._lock:
            self._remember(states)
        failures = [str(exc) for exc in self._pool.map(self._publish, staged) if exc]
        if failures:
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            raise Unpublished(
                f"{failures[0]}{more}; recorded, the next run publishes it without paying again"
            )

    def _publish(self, staged: StagedImage) -> StorageError | None:
        try:
            self.sink.publish(staged)
        except StorageError as exc:
            return exc
        with self._lock:
            self._objects[staged.final_rel] = staged.bytes
        return None

    def record_run(self, event: str, **fields: Any) -> None:
        record = {"run": event, "t": time.time(), "pid": os.getpid(), **fields}
        self.runs.append(record)
        self._flush(json.dumps(record, separators=(",", ":")).encode() + b"\n")

    def _remember(self, states: list[JobState]) -> None:
        for state in states:
            self._intact.discard(state.id)
            self.states[state.id] = state

    def _flush(self, data: bytes) -> None:
        """Write the pending records and ``data`` as the next segment (create-only)."""
        if self._closed:
            raise NotRecorded("the state store is closed")
        if self._lease is not None:
            self._lease.check()
        with self._lock:
            pending, self._pending = self._pending, []
            self._seq += 1
            name = s3journal.segment_name(self.gen, self.writer, self._seq)
        self._put(name, b"".join(pending) + data)

    def _put(self, rel: str, data: bytes) -> None:
        s3journal.put_new(self._store, self.location, rel, data, self.put_retry_delays_s,
                          held=lambda: self._lease is None or self._lease.valid())

    def _delete(self, rel: str) -> None:
        import obstore

        self._hold_lease()
        try:
            obstore.delete(self._store, self.location.key(rel))
        except Exception as exc:
            log.warning("could not delete %s: %s", self.location.key(rel), describe(exc))

    def sync_out(self, names: Iterable[str]) -> None:
        """Upload ``names`` from ``root`` to the bucket (each replaced whole)."""
        import obstore

        for name in names:
            path = self.root / name
            if not path.is_file():
                continue
            try:
                obstore.put(self._store, self.location.key(name), path)
            except Exception as exc:
                raise StorageError(f"uploading {self.location.url}/{name} failed: {describe(exc)}"
                                   ) from None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._pending and (self._lease is None or self._lease.valid()):
                self._closed = False
                try:
                    self._flush(b"")
                except StorageError as exc:
                    log.warning("attempt counts not saved: %s", exc)
                self._closed = True
        finally:
            self._pool.shutdown(wait=True)
            if self._lease is not None:
                self._lease.release()
            shutil.rmtree(self.root, ignore_errors=True)
