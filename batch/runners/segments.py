"""Journal segments: how several shard tasks record into one output folder at once.

The main journal has one writer, the driver, which holds the folder's lock.
Each shard task attempt appends to its own segment instead,
``.imgbatch/segments/<run>.<shard>.<attempt>.jsonl`` (the same line format),
so no two processes ever append to one file, on NFS or a local disk alike.

- :class:`SegmentStore` is a shard task's store: it starts from the states
  the driver planned with (passed in the task, so a shard never reads a
  journal of a million jobs), adds what earlier attempts of the same shard
  recorded (a retried task skips their committed jobs), finishes their
  interrupted renames, and writes its own segment. It never removes stray
  temporaries: other tasks are staging images beside it.
- :class:`DriverCheckpoint` is the driver's: at open, under the lock and
  before crash recovery, it folds every segment into the main journal
  (appended, fsynced, then the segment removed), so the plan, the results
  and the next run see one journal. A crash between the append and the
  removal only repeats identical lines.

Which line of a segment wins: not simply the last read. Segments are read in
name order, and two attempts of a shard may write the same job (the first
died after marking it, the retry finished it); a line never replaces a state
with more attempts (every request counts one more), so a dead attempt's
``pending`` never hides its retry's ``succeeded``, whatever order the names
sort in. The driver appends only the lines that won, so the main journal,
read with "the last line wins", says the same.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from batch import fsops
from batch.checkpoint import JOURNAL, STATE_DIR, Checkpoint, JobState
from batch.errors import OutputError, StorageError
from batch.images import file_matches, sha256_of
from batch.jobs import Status
from batch.journal import Journal

log = logging.getLogger(__name__)

SEGMENTS_DIR = "segments"
SUFFIX = ".jsonl"


def segments_dir(root: Path) -> Path:
    return root / STATE_DIR / SEGMENTS_DIR


def segment_files(root: Path, shard: str | None = None) -> list[Path]:
    """Segments in name order (an attempt's name sorts after its shard's earlier ones)."""
    folder = segments_dir(root)
    pattern = f"*.{shard}.*{SUFFIX}" if shard else f"*{SUFFIX}"
    try:
        return sorted(folder.glob(pattern))
    except OSError as exc:
        raise OutputError(f"cannot list {folder}: {exc.strerror}") from None


def fold_line(states: dict[str, JobState], runs: list[dict[str, Any]], line: bytes,
              path: Path, number: int) -> bool:
    """Apply one segment line to ``states``/``runs``; False: it lost (fewer attempts than
    the state already there) or is unreadable, and is not kept."""
    try:
        record = json.loads(line)
        if "run" in record:
            runs.append(record)
            return True
        state = JobState.from_record(record)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("%s:%d: skipping an unreadable record (%s)", path, number, exc)
        return False
    known = states.get(state.id)
    if known is not None and state.attempts < known.attempts:
        log.info("%s:%d: %s at %d attempt(s) is older than the %d known; not kept",
                 path, number, state.id, state.attempts, known.attempts)
        return False
    states[state.id] = state
    return True


def complete_lines(path: Path) -> list[bytes]:
    """The whole lines of a segment; a torn last one (its writer died mid-append) is dropped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise OutputError(f"cannot read {path}: {exc.strerror}") from None
    lines = data.split(b"\n")
    if lines and lines[-1]:
        log.warning("%s: dropping a torn last record (%d bytes)", path, len(lines[-1]))
    return [line + b"\n" for line in lines[:-1] if line.strip()]


class SegmentStore(Checkpoint):
    """A shard task attempt's store; see the module docstring."""

    @classmethod
    def open_segment(
        cls, root: Path, writer: str, shard: str, states: Iterable[JobState]
    ) -> SegmentStore:
        """Start from ``states``, add the shard's earlier segments, open ``writer``'s own."""
        store = cls(root)
        store.states = {state.id: state for state in states}
        folder = segments_dir(root)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create {folder}: {exc.strerror}") from None
        for path in segment_files(root, shard):
            for number, line in enumerate(complete_lines(path), 1):
                fold_line(store.states, store.runs, line, path, number)
        store._journal = Journal.open(folder / f"{writer}{SUFFIX}", lines=0, torn_at=None)
        try:
            store._finish_renames()
        except BaseException:
            store.close()
            raise
        return store

    def _finish_renames(self) -> None:
        """Publish what an earlier attempt recorded but did not rename (its own jobs only)."""
        base = f"{self.root}{os.sep}"
        for state in self.states.values():
            if state.status is not Status.SUCCEEDED:
                continue
            intact = True
            for image, meta in zip(state.images, state.image_meta, strict=True):
                final = base + image.path
                if file_matches(final, image.bytes, meta.mtime_ns or -1):
                    continue
                intact = False
                if meta.tmp and sha256_of(self.root / meta.tmp) == image.sha256:
                    try:
                        fsops.replace(self.root / meta.tmp, final)
                    except OSError as exc:
                        raise StorageError(f"cannot rename the recorded image {meta.tmp} to "
                                           f"{image.path}: {exc.strerror}") from None
                    log.info("recovered %s from an interrupted shard attempt", image.path)
            if intact:
                self._intact.add(state.id)


class _Fallback(dict[str, JobState]):
    """A dict whose misses are looked up in ``table`` (the driver's index)."""

    def __init__(self, table: Mapping[str, JobState]) -> None:
        super().__init__()
        self.table = table

    def get(self, key: str, default: Any = None) -> Any:
        found = super().get(key)
        return found if found is not None else self.table.get(key, default)


class DriverCheckpoint(Checkpoint):
    """The driver's checkpoint: the main journal with every segment folded in at open."""

    def _load(self, path: Path, *, writable: bool = True) -> None:
        super()._load(path, writable=writable)
        if writable:
            self.fold_segments()

    def fold_segments(self) -> int:
        """Append every segment to the main journal, then remove it; returns the records."""
        assert self._journal is not None
        folded = 0
        paths = segment_files(self.root)
        for path in paths:
            # fold_line reads and writes a dict: the states it has not seen come from the index.
            seen = _Fallback(self.states)
            lines = [line for number, line in enumerate(complete_lines(path), 1)
                     if fold_line(seen, self.runs, line, path, number)]
            if lines:
                offset = self._journal.append(b"".join(lines), durable=True, lines=len(lines))
                folded += len(lines)
                for line in lines:
                    state = self._parse_record(line)
                    if state is not None:
                        self._remember([state], [line], offset)
                    offset += len(line)
            try:
                fsops.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StorageError(f"cannot remove the folded segment {path}: "
                                   f"{exc.strerror}") from None
        if paths:
            fsops.fsync_dir(segments_dir(self.root))
            log.info("folded %d record(s) from %d journal segment(s)", folded, len(paths))
        return folded

    def recover(self) -> None:
        """Crash recovery now that no shard task writes: renames finished, strays removed."""
        self._recover()


__all__ = ["JOURNAL", "DriverCheckpoint", "SegmentStore", "segment_files"]
