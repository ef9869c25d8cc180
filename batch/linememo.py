"""The line memo: what a JSONL catalog line was found to be, so a resume need not parse it.

A resumed run of a million-line catalog spends most of its time parsing,
validating and fingerprinting lines whose jobs are long done. Yet a line's
job (its id and its fingerprint) is a pure function of the line's bytes and
of a *context*: the command line's say (``--model``, ``--provider``,
``--endpoint``), the imgbatch version and its capability table. The memo,
``<DIR>/.imgbatch/lines.memo``, maps an 8-byte digest of each line to the
digests of its job's id (exact and lowercased) and fingerprint, and to its
shape (model, size, ratio, ...; see :mod:`batch.manifestjobs`), under one
context digest. A line found in it is not parsed: its job is joined with the
checkpoint by digest, and built in full only if it is not done.

Only lines that can be memoised are: one job per line, an explicit id (a
derived id's ``-2`` depends on the lines before it) and no local input image
(the fingerprint hashes the file's content, which can change under the same
line). The memo is a cache, never the truth: it is rewritten (temporary file,
atomic rename, no fsync) after every plan, a torn or foreign one fails its
checksum or context and is ignored, and a stale one cannot lie, since what it
says of a line holds for as long as the line and the context are the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from batch.manifestjobs import Shape

log = logging.getLogger(__name__)

MEMO = "lines.memo"
SCHEMA = 1  # bump when what a line yields changes meaning (fields, defaults, fingerprint)
_MAGIC = b"IMGMEMO1"
_SUM = 16  # bytes of the checksum at the end
RECORD = np.dtype([("line", "<u8"), ("id", "<u8"), ("lower", "<u8"), ("fp", "<u8"),
                   ("shape", "<u4")])


def digest64(data: bytes) -> int:
    """An 8-byte digest of ``data`` as an unsigned int (ids, lines)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def fp_digest(fp: str) -> int:
    """The first 8 bytes of a fingerprint (itself a sha256 hex) as an unsigned int."""
    return int(fp[:16], 16)


# The code that turns a line into a job: any change to it (a default, a rule, the
# fingerprint) makes every memo stale, without anyone having to remember to bump SCHEMA.
CODE_FILES = ("manifest.py", "manifestfile.py", "manifestjobs.py", "catalog.py", "expand.py",
              "inputs.py", "jobs.py", "jobstate.py", "endpoints.py", "capabilities.py",
              "pricing.py", "linememo.py")


def context_digest(default_model: str | None, provider: str, endpoint: str | None,
                   read: Callable[[str], bytes] | None = None) -> bytes:
    """What, besides a line's bytes, shapes the job it yields. ``read``: a file of the
    package by name (tests give their own)."""
    from importlib import resources

    from batch import __version__
    from batch.capabilities import DATA_FILE

    def packaged(name: str) -> bytes:
        try:
            return resources.files("batch").joinpath(name).read_bytes()
        except OSError:
            return b"?"  # not shipped as source: the version stands for it

    read = read or packaged
    code = hashlib.sha256()
    for name in (DATA_FILE, *CODE_FILES):
        code.update(name.encode() + b"\0" + hashlib.sha256(read(name)).digest())
    text = json.dumps([SCHEMA, __version__, code.hexdigest(), default_model, provider, endpoint])
    return hashlib.sha256(text.encode()).digest()


@dataclass(frozen=True)
class LineMemo:
    """A loaded memo: records sorted by line digest, and the shapes they refer to."""

    context: bytes
    shapes: list[Shape]
    records: np.ndarray

    @classmethod
    def empty(cls, context: bytes) -> LineMemo:
        return cls(context, [], np.zeros(0, RECORD))

    @classmethod
    def load(cls, path: Path, context: bytes) -> LineMemo:
        """The memo at ``path`` if it is whole and of ``context``; else an empty one."""
        try:
            data = path.read_bytes()
        except OSError:
            return cls.empty(context)
        memo = cls.decode(data, context)
        if memo is None:
            log.info("%s: not used (another context, or not whole)", path)
            return cls.empty(context)
        return memo

    @classmethod
    def decode(cls, data: bytes, context: bytes) -> LineMemo | None:
        head = len(_MAGIC) + 32 + 8
        if len(data) < head + _SUM or not data.startswith(_MAGIC):
            return None
        # Views, not copies: a million lines' memo is 36 MB.
        body, total = memoryview(data)[:-_SUM], data[-_SUM:]
        if hashlib.blake2b(body, digest_size=_SUM).digest() != total:
            return None
        if data[len(_MAGIC):len(_MAGIC) + 32] != context:
            return None
        size = int.from_bytes(data[head - 8:head], "little")
        try:
            shapes = [_shape(item) for item in json.loads(bytes(body[head:head + size]))]
        except (ValueError, TypeError):
            return None
        raw = body[head + size:]
        if len(raw) % RECORD.itemsize:
            return None
        return cls(context, shapes, np.frombuffer(raw, RECORD))

    def pieces(self) -> list[bytes | memoryview]:
        """The file's bytes in pieces (the records not copied), the checksum last."""
        shapes = json.dumps([list(shape) for shape in self.shapes]).encode()
        pieces: list[bytes | memoryview] = [
            _MAGIC, self.context, len(shapes).to_bytes(8, "little"), shapes,
            np.ascontiguousarray(self.records).view(np.uint8).data]
        total = hashlib.blake2b(digest_size=_SUM)
        for piece in pieces:
            total.update(piece)
        return [*pieces, total.digest()]

    def encode(self) -> bytes:
        return b"".join(self.pieces())

    def find(self, lines: np.ndarray) -> np.ndarray:
        """The record index of each line digest, or -1 where the memo has none."""
        keys = self.records["line"]
        if not len(keys):
            return np.full(len(lines), -1, np.int64)
        at = np.searchsorted(keys, lines)
        at[at == len(keys)] = 0
        return np.where(keys[at] == lines, at, -1)

    def save(self, path: Path) -> None:
        """Write atomically; a failure only logs (the memo is a cache)."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with tmp.open("wb") as handle:
                for piece in self.pieces():
                    handle.write(piece)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("could not write %s (%s); the next run parses every line", path,
                        exc.strerror)
            with contextlib.suppress(OSError):
                tmp.unlink()


def _shape(item: Any) -> Shape:
    endpoint, model, size, ratio, options, kinds, size_bytes = item
    return (str(endpoint), str(model), str(size), str(ratio),
            tuple((str(k), str(v)) for k, v in options),
            (int(kinds[0]), int(kinds[1]), int(kinds[2])), int(size_bytes))


def build(context: bytes, shapes: list[Shape], parts: list[np.ndarray]) -> LineMemo:
    """A memo of ``parts`` (arrays of RECORD), sorted by line digest, repeats dropped."""
    records = (parts[0] if len(parts) == 1 else np.concatenate(parts) if parts
               else np.zeros(0, RECORD))
    del parts[:]  # the caller's copies go as soon as they are joined
    records = records[np.argsort(records["line"], kind="stable")]
    if len(records):
        keep = np.ones(len(records), bool)
        keep[1:] = records["line"][1:] != records["line"][:-1]
        records = records[keep]
    return LineMemo(context, shapes, records)
