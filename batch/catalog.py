"""A JSONL catalog, streamed: validated line by line, its jobs built again at each pass.

A catalog of a million lines is never held: the validation pass reads one
line at a time and keeps per job only its line's place and 8-byte digests of
its id and fingerprint (:class:`~batch.manifestjobs.JobDigests`), and one
job per distinct shape (:class:`~batch.manifestjobs.Shapes`). Ids that clash
are found from the digests once the pass ends, and named (with the first
place) by a second pass that runs only then. ``Manifest.jobs`` reads the
file again at each pass over it, building the same Jobs without the checks,
and refuses a file changed since it was validated.

With the output folder's line memo (:mod:`batch.linememo`) a line known from
an earlier run is not parsed at all: hashing its bytes gives its job's
digests. The resume plan joins every job's digests with the checkpoint's
index (:meth:`batch.checkpoint.Checkpoint.done_mask`) and builds, by seeking
to their lines, only the jobs not surely done.
"""

from __future__ import annotations

import itertools
import json
import logging
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from batch.checkpoint import fingerprint
from batch.endpoints import Endpoint
from batch.errors import ManifestError, Problem
from batch.jobs import InputKind, Job
from batch.linememo import MEMO, RECORD, LineMemo, build, context_digest, digest64, fp_digest
from batch.manifest import Manifest, _Builder, _Options
from batch.manifestfile import (
    FAILED,
    Problems,
    decode_line,
    identity,
    json_decoder,
    open_jsonl,
    raw_lines,
)
from batch.manifestjobs import JobDigests, ManifestJobs, Shape, Shapes

if TYPE_CHECKING:
    from batch.storage.base import StateStore

log = logging.getLogger(__name__)

_CHUNK = 4096  # lines hashed and looked up in the memo at once
_PLAN_BATCH = 4096  # jobs fingerprinted, then looked up in the index, at a time


def load_jsonl(path: Path, options: _Options, probs: Problems, memo_path: Path | None
               ) -> Manifest:
    """Validate a JSONL catalog in one streamed pass; ManifestError lists every problem."""
    catalog = _Catalog(path, options, memo_path)
    catalog.validate(probs)
    return Manifest(path, catalog.jobs(), {}, {})


class _Catalog:
    def __init__(self, path: Path, options: _Options, memo_path: Path | None) -> None:
        self.path = path
        self.where = str(path)
        self.options = options
        self.memo_path = memo_path
        self.context = (context_digest(options.default_model, options.provider,
                                       options.endpoint) if memo_path is not None else b"")
        self.memo = (LineMemo.load(memo_path, self.context) if memo_path is not None
                     else LineMemo.empty(b""))
        self.digests = JobDigests()
        self.shapes = Shapes()
        self.stamp: tuple[int, int, int, int] | None = None
        # The memo written after the plan: the records it gave that were seen again,
        # and the lines memoised now (their shapes numbered after the old memo's).
        self.hits = array("q")
        self.shape_ids: dict[Shape, int] = {shape: n for n, shape in enumerate(self.memo.shapes)}
        self.fresh = [array("Q") for _ in range(4)]  # line, id, lower, fp
        self.fresh_shapes = array("I")
        self.decoder = json_decoder()

    def _reset(self) -> None:
        """Forget the first pass and the memo (its records are not to be trusted here)."""
        self.memo = LineMemo.empty(self.context)
        self.digests = JobDigests()
        self.shapes = Shapes()
        self.hits = array("q")
        self.shape_ids = {}
        self.fresh = [array("Q") for _ in range(4)]
        self.fresh_shapes = array("I")

    def builder(self, probs: Problems) -> _Builder:
        builder = _Builder(self.path, self.options.default_model, probs)
        builder.single = Endpoint.default(self.options.provider)
        builder.chosen = self.options.endpoint
        builder.keep = False
        return builder

    # -- the validation pass ---------------------------------------------------

    def validate(self, probs: Problems) -> None:
        clean = Problems(probs.cap)
        if self._pass(probs) and self.hits:
            # Two lines yield one id. A derived id's "-2" depends on the lines before it,
            # which the memo did not parse: only a pass without it tells which is which.
            log.info("%s: ids clash; reading every line again", self.where)
            self._reset()
            probs.items, probs.more = clean.items, clean.more
            self._pass(probs)
        if probs:
            raise ManifestError(probs.items, probs.more)
        log.debug("%s: %d job(s), %d line(s) known from the memo", self.where,
                  len(self.digests.ids), len(self.hits))

    def _pass(self, probs: Problems) -> bool:
        """One pass over the file; True if ids clash (named in ``probs``)."""
        handle = open_jsonl(self.path, self.where, probs)
        if handle is None:
            raise ManifestError(probs.items, probs.more)
        builder = self.builder(probs)
        builder.digests = self.digests
        counts = np.zeros(len(self.memo.shapes), np.int64)
        with handle:
            self.stamp = identity(self.path)
            offset = 0
            chunk: list[tuple[bytes | None, int, int]] = []
            for number, (data, length) in enumerate(raw_lines(handle), 1):
                chunk.append((data, number, offset))
                offset += length
                if len(chunk) >= _CHUNK:
                    self._chunk(chunk, builder, probs, counts)
                    chunk = []
            self._chunk(chunk, builder, probs, counts)
        for n, count in enumerate(counts.tolist()):
            if count:
                self.shapes.add_shape(self.memo.shapes[n], count)
        if builder.entries == 0 and not probs:
            probs.add(self.where, None, "the manifest lists no jobs")
        if self.options.endpoint is not None:
            probs.add(self.where, "endpoints", f"--endpoint {self.options.endpoint}: the "
                      "manifest names no such endpoint")
        return not probs and self._clashes(probs)

    def _chunk(self, chunk: list[tuple[bytes | None, int, int]], builder: _Builder,
               probs: Problems, counts: np.ndarray) -> None:
        if not chunk:
            return
        memoise = self.memo_path is not None
        lines: list[int] = []
        found: list[int] = []
        if memoise:
            lines = [digest64(data) if data is not None else 0 for data, _, _ in chunk]
            found = self.memo.find(np.array(lines, np.uint64)).tolist()
            known = [k for k in found if k >= 0]
            if known:
                records = self.memo.records[known]
                rows = iter(zip(records["id"].tolist(), records["lower"].tolist(),
                                records["fp"].tolist(), strict=True))
                counts += np.bincount(records["shape"], minlength=len(counts))[:len(counts)]
                self.hits.extend(known)
                builder.entries += len(known)
        digests = self.digests
        offsets, numbers, ids = digests.offsets.append, digests.numbers.append, digests.ids
        lowers, fps = digests.lower.append, digests.fps.append
        for n, (data, number, offset) in enumerate(chunk):
            if memoise and found[n] >= 0:
                ident, lower, fp = next(rows)
                builder.count += 1
                offsets(offset)
                numbers(number)
                ids.append(ident)
                lowers(lower)
                fps(fp)
                continue
            raw = decode_line(data, number, offset, self.where, self.decoder, probs)
            if raw is None:
                continue
            builder.entries += 1
            if raw is FAILED:
                continue
            location = f"{self.where}:{number}"
            quick = builder.quick(raw, location) if type(raw) is dict else None
            made = [quick] if quick is not None else builder.entry(raw, location)
            for job in made:
                key = self.shapes.add(job)
                fp = fp_digest(fingerprint(job)) if memoise else 0
                digests.offsets.append(offset)
                digests.numbers.append(number)
                digests.ids.append(digest64(job.id.encode()))
                lower = job.id.lower()
                digests.lower.append(digests.ids[-1] if lower == job.id
                                     else digest64(lower.encode()))
                digests.fps.append(fp)
                # A derived id is memoised only without its "-n" (see validate).
                if memoise and len(made) == 1 and job.index not in digests.ordinals and not any(
                        image.kind is InputKind.FILE for image in job.images):
                    for column, value in zip(self.fresh, (lines[n], digests.ids[-1],
                                                          digests.lower[-1], fp), strict=True):
                        column.append(value)
                    self.fresh_shapes.append(self.shape_ids.setdefault(key, len(self.shape_ids)))

    def _clashes(self, probs: Problems) -> bool:
        """Name ids that occur twice (or differ only in case) by a second pass, if any do."""
        lower = np.frombuffer(self.digests.lower, np.uint64)
        ordered = np.sort(lower)
        repeated = ordered[1:][ordered[1:] == ordered[:-1]]
        if not len(repeated):
            return False
        builder = self.builder(Problems(probs.cap))
        builder.naming = set(repeated.tolist())
        for raw, location in self._entries():
            builder.entry(raw, location)
        for problem in builder.probs.items:
            if problem.field == "id":
                probs.add(problem.location, problem.field, problem.message)
        return True

    # -- passes over the validated file ------------------------------------------

    def _entries(self) -> Iterator[tuple[Any, str]]:
        if self.stamp is not None and identity(self.path) != self.stamp:
            raise ManifestError([Problem(self.where, None, "changed since it was validated; "
                                         "run again")])
        decoder = json.JSONDecoder()
        ignored = Problems(1)
        with self.path.open("rb", buffering=1 << 20) as handle:
            offset = 0
            for number, (data, length) in enumerate(raw_lines(handle), 1):
                raw = decode_line(data, number, offset, self.where, decoder, ignored)
                offset += length
                if raw is not None and raw is not FAILED:
                    yield raw, f"{self.where}:{number}"

    def replay(self) -> Iterator[Job]:
        builder = self.builder(Problems(1))
        builder.replaying = True
        for raw, location in self._entries():
            quick = builder.quick(raw, location) if type(raw) is dict else None
            if quick is not None:
                yield quick
            else:
                yield from builder.entry(raw, location)

    def build(self, positions: Sequence[int]) -> Iterator[Job]:
        """The jobs at ``positions`` (ascending), each built again from its own line."""
        if self.stamp is not None and identity(self.path) != self.stamp:
            raise ManifestError([Problem(self.where, None, "changed since it was validated; "
                                         "run again")])
        offsets, numbers = self.digests.offsets, self.digests.numbers
        decoder = json.JSONDecoder()
        builder = self.builder(Problems(1))
        builder.replaying = True
        wanted = iter(positions)
        position = next(wanted, None)
        with self.path.open("rb") as handle:
            while position is not None:
                first = position
                while first > 0 and offsets[first - 1] == offsets[position]:
                    first -= 1
                handle.seek(offsets[position])
                data = handle.readline()
                raw = decode_line(data.rstrip(b"\n"), numbers[position], offsets[position],
                                  self.where, decoder, Problems(1))
                builder.count = first
                builder.ordinal = self.digests.ordinals.get(first, 1)
                made = builder.entry(raw, f"{self.where}:{numbers[position]}")
                while position is not None and position < first + len(made):
                    yield made[position - first]
                    position = next(wanted, None)

    def plan(self, store: StateStore) -> list[tuple[Job, str]] | None:
        """The jobs ``store`` has not done: a join by digest, then the rest built and asked."""
        done_mask = getattr(store, "done_mask", None)
        if done_mask is None:
            return None
        ids = np.frombuffer(self.digests.ids, np.uint64)
        if self.memo_path is None:  # validated without fingerprints: none surely done yet
            asked = np.arange(len(ids))
        else:
            fps = np.frombuffer(self.digests.fps, np.uint64)
            asked = np.flatnonzero(~done_mask(ids, fps))
        jobs = self.build(asked.tolist())
        todo = []
        for start in range(0, len(asked), _PLAN_BATCH):
            part = list(itertools.islice(jobs, _PLAN_BATCH))
            prints = [fingerprint(job) for job in part]
            if self.memo_path is None:
                # Fingerprinted now: the index answers for most, as the memo's digests
                # would have; reading a job's record back to ask it costs ~30 µs.
                again = done_mask(ids[asked[start:start + len(part)]], np.array(
                    [fp_digest(fp) for fp in prints], np.uint64)).tolist()
            else:  # the index was asked with the memo's digests above
                again = [False] * len(part)
            for job, fp, done in zip(part, prints, again, strict=True):
                if not done and not store.is_done(job, fp):
                    todo.append((job, fp))
        self.save_memo()
        return todo

    def save_memo(self) -> None:
        if self.memo_path is None:
            return
        old = self.memo.records
        # Records of lines no longer in the catalog are harmless (they cannot lie), so a
        # memo is rewritten only when it learnt lines, or when most of it is of old lines.
        bloated = len(old) > 2 * len(self.hits) + 1000
        if not len(self.fresh_shapes) and not bloated:
            return
        # The records seen again, in the old memo's (sorted) order; the old memo then goes.
        parts = [] if not len(old) else [
            old[np.sort(np.frombuffer(self.hits, np.int64))] if bloated else old.copy()]
        del old
        self.memo = LineMemo.empty(self.context)
        self.hits = array("q")
        fresh = np.zeros(len(self.fresh_shapes), RECORD)
        # Each column let go once copied: a first resume memoises a million lines at once.
        for name, column in zip(("line", "id", "lower", "fp"), self.fresh, strict=True):
            fresh[name] = np.frombuffer(column, np.uint64)
            del column[:]
        fresh["shape"] = np.frombuffer(self.fresh_shapes, np.uint32)
        self.fresh_shapes = array("I")
        parts.append(fresh)
        del fresh
        shapes = sorted(self.shape_ids, key=self.shape_ids.__getitem__)
        build(self.context, shapes, parts).save(self.memo_path)

    def jobs(self) -> ManifestJobs:
        jobs = ManifestJobs.streamed(len(self.digests.ids), self.shapes, self.replay, self.plan)
        jobs._ids = np.frombuffer(self.digests.ids, np.uint64)
        if self.memo_path is not None:
            jobs._fps = np.frombuffer(self.digests.fps, np.uint64)
        return jobs


def memo_path(output: Path) -> Path:
    """Where a local output folder keeps its line memo."""
    from batch.checkpoint import STATE_DIR

    return output / STATE_DIR / MEMO


