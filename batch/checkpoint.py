"""The checkpoint: what every job of an output folder has cost and produced, across runs.

Store: a JSON-lines journal, ``<DIR>/.imgbatch/journal.jsonl``, one full job
state per line (the last line for an id wins). During a run records are only
appended, each outcome fsynced; it is *compacted*, not append-only forever:
an open that finds more than 1,000 lines and over twice the live records
rewrites it with one line per job and the last 50 run records (temporary
file, fsync, atomic rename), so the earlier states of a job are not kept.
Chosen over SQLite because the only process writing is this one (the lock
guarantees it), appends of a few hundred bytes are atomic enough that a
crash can only tear the last line (which loading drops), and the file is
greppable by an operator at 3 a.m.

The file itself, with its one-writer rule and compaction, is
:class:`batch.journal.Journal`. The states are not held in memory: one pass
over the journal at open builds a compact index of every job's last record
(:class:`batch.statetable.StateTable`, 34 bytes a job, images checked on the
way), and a state is read back by offset when asked for. A streamed catalog
plans against that index by digest (:meth:`Checkpoint.done_mask`).

A success is recorded *before* its image is renamed to the final name, with
the temporary name beside it: a crash or a failed rename between the two is
finished on the next open (the temporary file is complete, fsynced and
hashed), so an image that was paid for and recorded is never deleted.
:meth:`Checkpoint.commit_batch` says which side of that line a failure fell
on (:class:`~batch.errors.NotRecorded` or :class:`~batch.errors.Unpublished`).
Every write goes through :mod:`batch.fsops`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterable
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from batch import fsops
from batch.errors import LockHeld, NotRecorded, OutputError, StorageError, Unpublished
from batch.images import (
    IMAGES_DIR,
    LocalImages,
    StagedImage,
    file_matches,
    publish,
    remove_quietly,
    sha256_of,
    stray_temporaries,
)
from batch.jobs import Job, Status

# Re-exported: the checkpoint's callers name the state types through it.
from batch.jobstate import FileMeta as FileMeta
from batch.jobstate import JobState as JobState
from batch.jobstate import fingerprint as fingerprint
from batch.journal import Journal
from batch.statetable import Scan, StateTable

log = logging.getLogger(__name__)

STATE_DIR = ".imgbatch"
JOURNAL = "journal.jsonl"
LOCK = "lock"


class Checkpoint:
    """The journal of one output folder, held under an exclusive lock while open."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sink = LocalImages(root)
        # The main journal's states are a StateTable; a Ray shard's store holds a dict.
        self.states: Any = {}
        self.runs: list[dict[str, Any]] = []
        self._lock_fd: int | None = None
        self._journal: Journal | None = None
        self._intact: set[str] = set()  # succeeded ids whose files were found as recorded
        self._path = root / STATE_DIR / JOURNAL
        self._read_fd: int | None = None

    # -- opening -------------------------------------------------------------

    @classmethod
    def open(cls, root: Path) -> Checkpoint:
        """Lock the folder, load the journal, finish interrupted renames, drop stray temps."""
        store = cls(root)
        state_dir = root / STATE_DIR
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create {state_dir}: {exc.strerror}") from None
        store._lock(state_dir / LOCK)
        try:
            store._load(state_dir / JOURNAL)
            store._recover()
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def read(cls, root: Path) -> Checkpoint:
        """Load the journal without locking or changing anything (for ``status``)."""
        store = cls(root)
        store._load(root / STATE_DIR / JOURNAL, writable=False)
        return store

    def _lock(self, path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot open the lock {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise LockHeld(str(self.root), int(holder) if holder.isdigit() else None) from None
        # The kernel drops a flock when its holder dies, so a stale lock never blocks.
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise OutputError(f"cannot write the lock {path}: {exc.strerror}") from None
        self._lock_fd = fd

    def _load(self, path: Path, *, writable: bool = True) -> None:
        # Line by line into the index: a journal of a million jobs is never held.
        self._path = path
        end = 0  # bytes up to the end of the last complete line
        torn = 0  # only the last line can lack its newline
        count = 0
        scan = Scan()
        base = f"{self.root}{os.sep}"

        def other(line: bytes, number: int, offset: int) -> None:
            self._load_line(line, path, number, scan, offset, base)

        try:
            with path.open("rb", buffering=1 << 20) as handle:
                end, torn, count = scan.read(handle, str(self.root), other)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise OutputError(f"cannot read {path}: {exc.strerror}") from None
        table = StateTable(scan, self._read_record, self._parse_record)  # empties the scan
        self.states = table
        if torn:
            log.warning("%s: dropping a torn last record (%d bytes)", path, torn)
        if not writable:
            return
        lines = count - (1 if torn else 0)
        self._journal = Journal.open(path, lines=lines, torn_at=end if torn else None)
        if lines > 1000 and lines > 2 * (len(table) + len(self.runs)):
            self._compact(table)

    def _compact(self, table: StateTable) -> None:
        assert self._journal is not None
        self.runs = self.runs[-50:]
        runs = [json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in self.runs]
        offsets, lengths = table.live()
        states = (self._read_record(int(offset), int(length))
                  for offset, length in zip(offsets, lengths, strict=True))
        if self._journal.compact(chain(runs, states), len(runs) + len(offsets)):
            self._close_reader()  # the file was replaced
            sizes = lengths.astype(np.uint64)
            starts = np.cumsum(sizes) - sizes + np.uint64(sum(map(len, runs)))
            table.moved(starts)

    def _load_line(self, line: bytes, path: Path, number: int, scan: Scan, offset: int,
                   base: str) -> None:
        if not line.strip():
            return
        try:
            record = json.loads(line)
            if "run" in record:
                self.runs.append(record)
            else:
                scan.add(record, offset, len(line), base)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("%s:%d: skipping an unreadable record (%s)", path, number, exc)

    def _read_record(self, offset: int, length: int) -> bytes:
        if self._read_fd is None:
            self._read_fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        return os.pread(self._read_fd, length, offset)

    @staticmethod
    def _parse_record(data: bytes) -> JobState | None:
        try:
            return JobState.from_record(json.loads(data))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def _close_reader(self) -> None:
        if self._read_fd is not None:
            fd, self._read_fd = self._read_fd, None
            os.close(fd)

    def _recover(self) -> None:
        """Finish renames cut short by a crash, then drop temporaries nobody needs."""
        wanted: set[str] = set()
        base = f"{self.root}{os.sep}"
        table = self.states
        assert isinstance(table, StateTable)
        # Only the successes whose files were not found as recorded when the journal was read.
        for offset, length in table.unchecked_successes():
            state = self._parse_record(self._read_record(offset, length))
            if state is None or state.status is not Status.SUCCEEDED:
                continue
            intact = True
            for image, meta in zip(state.images, state.image_meta, strict=True):
                final = base + image.path
                if file_matches(final, image.bytes, meta.mtime_ns or -1):
                    continue
                intact = False
                tmp_rel = meta.tmp
                if not tmp_rel:
                    continue
                tmp = self.root / tmp_rel
                if tmp.exists() and sha256_of(tmp) == image.sha256:
                    try:
                        fsops.replace(tmp, final)
                    except OSError as exc:
                        # Nothing is removed: the next open tries again.
                        raise StorageError(
                            f"cannot rename the recorded image {tmp_rel} to {image.path}: "
                            f"{exc.strerror}"
                        ) from None
                    wanted.add(tmp.name)
                    log.info("recovered %s from an interrupted run", image.path)
            if intact:
                self._intact.add(state.id)
        for stray in stray_temporaries(self.root):
            if stray.name not in wanted:
                remove_quietly(stray)
        # Atomic rewrites (results.jsonl, a compaction) cut short by a crash.
        for leftover in [*self.root.glob(".*.tmp"), *(self.root / STATE_DIR).glob("*.tmp")]:
            remove_quietly(leftover)

    # -- questions -----------------------------------------------------------

    def is_done(self, job: Job, fp: str, *, verify: bool = False) -> bool:
        """True if ``job`` succeeded with this fingerprint and its files are intact."""
        state = self.states.get(job.id)
        if state is None or state.status is not Status.SUCCEEDED or state.fingerprint != fp:
            return False
        return self.intact(state, verify=verify)

    def done_mask(self, ids: np.ndarray, fps: np.ndarray) -> np.ndarray:
        """Per job (digests of id and fingerprint): surely done, from the index alone."""
        if not isinstance(self.states, StateTable):
            return np.zeros(len(ids), bool)
        return self.states.done_mask(ids, fps)

    def intact(self, state: JobState, *, verify: bool = False) -> bool:
        """True if every image of ``state`` is on disk with its recorded content."""
        if not verify and (state.id in self._intact or (
                isinstance(self.states, StateTable) and self.states.checked_intact(state.id))):
            return True
        for image, meta in zip(state.images, state.image_meta, strict=True):
            path = self.root / image.path
            if not verify and file_matches(path, image.bytes, meta.mtime_ns or -1):
                continue
            # Size or mtime moved (or asked to verify): only the content decides.
            if sha256_of(path) != image.sha256:
                return False
        return True

    def attempts(self, job_id: str) -> int:
        state = self.states.get(job_id)
        return state.attempts if state else 0

    # -- writing -------------------------------------------------------------

    def record(self, state: JobState, *, durable: bool) -> None:
        """Append ``state``; ``durable`` fsyncs it before returning."""
        line = state.to_line()
        try:
            offset = self._append(line, durable=durable)
        except NotRecorded:
            raise
        except StorageError:
            self._remember([state], [line], None)  # it may well be in the journal
            raise
        self._remember([state], [line], offset)

    def commit_batch(self, states: list[JobState], staged: list[StagedImage]) -> None:
        """Make ``staged`` images and ``states`` durable, then publish the images.

        Blocking: run it in a thread. The images' own fsyncs, one directory
        fsync for their names and one journal write and fsync for every state
        are shared by the batch; the renames after them need no fsync of
        their own, since a lost rename is finished by the next open.

        Raises :class:`NotRecorded` when nothing of the batch reached the
        journal (the caller may delete the staged files), and
        :class:`Unpublished` when the states are, or may be, in the journal
        but an image is not under its final name: the caller must keep the
        staged files, which the next open renames (or drops as strays if the
        record never reached the disk).
        """
        try:
            for image in staged:
                image.file.fsync()
            if staged:
                fsops.fsync_dir(self.root / IMAGES_DIR)
        except OSError as exc:
            raise NotRecorded(f"fsync of a new image failed: {exc.strerror}") from None
        finally:
            for image in staged:
                image.file.close()
        lines = [state.to_line() for state in states]
        try:
            offset = self._append(b"".join(lines), durable=True, lines=len(states))
        except NotRecorded:
            raise
        except StorageError as exc:
            self._remember(states, lines, None)
            raise Unpublished(
                f"{exc}; its images wait under temporary names for the next run"
            ) from None
        self._remember(states, lines, offset)
        failures = []
        for image in staged:
            try:
                publish(self.root, image)
            except StorageError as exc:
                failures.append(str(exc))
        if failures:
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            raise Unpublished(
                f"{failures[0]}{more}; recorded, the next run renames it without paying again"
            )

    def record_run(self, event: str, **fields: Any) -> None:
        record = {"run": event, "t": time.time(), "pid": os.getpid(), **fields}
        self.runs.append(record)
        self._append(json.dumps(record, separators=(",", ":")).encode() + b"\n", durable=True)

    def _remember(self, states: list[JobState], lines: list[bytes], offset: int | None) -> None:
        """``states`` were appended as ``lines`` at ``offset`` (None: unknown, after a failure)."""
        if offset is None and self._journal is not None:
            offset = self._journal.last_offset  # the bytes were written; only the fsync failed
        for state, line in zip(states, lines, strict=True):
            self._intact.discard(state.id)
            if not isinstance(self.states, StateTable):
                self.states[state.id] = state
            elif offset is not None:
                self.states.put(state.id, offset, len(line), state)
            if offset is not None:
                offset += len(line)

    def _append(self, data: bytes, *, durable: bool, lines: int = 1) -> int:
        if self._journal is None:
            raise NotRecorded("the checkpoint is closed")
        return self._journal.append(data, durable=durable, lines=lines)

    def mark_attempt(self, job: Job, fp: str) -> JobState:
        """Count one more request for ``job`` before it is sent."""
        state = JobState(id=job.id, fingerprint=fp, status=Status.PENDING,
                         attempts=self.attempts(job.id) + 1)
        # Not fsynced: losing an attempt count in a crash costs nothing but accuracy.
        self.record(state, durable=False)
        return state

    def sync_out(self, names: Iterable[str]) -> None:
        """Nothing to copy: the files are written in the output folder itself."""

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
        self._close_reader()
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            os.close(fd)
