"""The checkpoint's index: every job's last state in a few flat arrays, read back by offset.

Holding a JobState per job costs about a kilobyte; a million-job checkpoint
would need a gigabyte before its first request. The table keeps per job id
what the plan joins on, 34 bytes: an 8-byte digest of the id, of the
fingerprint, the status, the attempts, where its last record is in the
journal (offset, length) and whether its images were found as recorded when
the journal was read. The full state is read back from the journal, by
offset, only when asked for (a job to run, a results row, ``status``).

The journal stays the only truth: the table is built by one pass over it at
open (:func:`scan`) and follows every append through :meth:`StateTable.put`.
"""

from __future__ import annotations

import json
import os
import re
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any, BinaryIO

import numpy as np

from batch.jobs import Status
from batch.linememo import digest64, fp_digest

STATUS_CODES = {status: n for n, status in enumerate(Status)}
_SUCCEEDED = STATUS_CODES[Status.SUCCEEDED]
_RECENT_STATES = 1024  # more than the jobs in flight at once, a few KB each
_BY_VALUE = {status.value: n for status, n in STATUS_CODES.items()}

Read = Callable[[int, int], bytes]  # (offset, length) -> the record's bytes


# The head of a record as JobState.to_line writes it, and its one image when it has one.
# Anything else (several images, an odd id, a hand-edited line) is read as JSON.
_HEAD = re.compile(rb'\{"id":"([A-Za-z0-9._-]{1,128})","fp":"([0-9a-f]{16})[0-9a-f]{48}",'
                   rb'"status":"(succeeded|failed|pending)","attempts":([0-9]{1,9}),"error":')
_DONE = re.compile(rb'\{"id":"([A-Za-z0-9._-]{1,128})","fp":"([0-9a-f]{16})[0-9a-f]{48}",'
                   rb'"status":"succeeded","attempts":([0-9]{1,9}),"error":null,'
                   rb'"images":\[\{"path":"([^"\\]+)","sha256":"[0-9a-f]{64}","bytes":'
                   rb'([0-9]{1,15}),"mime":"[^"\\]*","width":[0-9]+,"height":[0-9]+,"tmp":'
                   rb'(?:null|"[^"\\]*"),"mtime_ns":([0-9]{1,20})\}\],"usage":')
# The usual rest of that record (token counts, latency, no text), so that the line is
# known whole without a JSON parse; anything else is parsed (see _whole).
_TAIL = re.compile(rb'(?:null|\{"[a-z_]{1,64}":[0-9]{1,15}(?:,"[a-z_]{1,64}":[0-9]{1,15})*\}),'
                   rb'"latency_s":(?:null|[0-9]{1,9}(?:\.[0-9]{1,9})?),"text":null\}\n')
_IMAGE = re.compile(rb'"images":\[\{"path":"([^"\\]+)","sha256":"[0-9a-f]{64}","bytes":'
                    rb'([0-9]{1,15}),"mime":"[^"\\]*","width":[0-9]+,"height":[0-9]+,"tmp":'
                    rb'(?:null|"[^"\\]*"),"mtime_ns":([0-9]{1,20})\}\],"usage":')


def _whole(line: bytes, key_end: int) -> bool:
    """Whether the rest of a record, from the key a regex stopped at (``"usage":`` or
    ``"error":``, 8 bytes), is JSON: a line damaged past what the regex read must not count."""
    try:
        json.loads(b"{" + line[key_end - 8:])
    except ValueError:
        return False
    return True


class Scan:
    """What one pass over the journal found, in arrays (one entry per record read)."""

    def __init__(self) -> None:
        self.ids = array("Q")
        self.fps = array("Q")
        self.status = array("B")
        self.attempts = array("I")
        self.offsets = array("Q")
        self.lengths = array("I")
        self.intact = array("B")

    def read(self, handle: BinaryIO, root: str,
             other: Callable[[bytes, int, int], None]) -> tuple[int, int, int]:
        """Every complete line of ``handle``: the usual ones here, ``other(line, number,
        offset)`` for the rest. Returns (bytes of complete lines, torn bytes, lines).
        Written for speed (a million records at every open): one regex for the commonest
        record (a success with one image), stat relative to the folder's descriptor."""
        done, tail = _DONE.match, _TAIL.fullmatch
        ids, fps, status, attempts = (self.ids.append, self.fps.append, self.status.append,
                                      self.attempts.append)
        offsets, lengths, intact = self.offsets.append, self.lengths.append, self.intact.append
        stat = os.stat
        folder = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        end = count = 0
        try:
            for count, line in enumerate(handle, 1):
                if line[-1:] != b"\n":
                    return end, len(line), count
                found = done(line)
                if found is not None and tail(line, found.end()) is None \
                        and not _whole(line, found.end()):
                    found = None  # damaged after what the regex read: JSON decides (skips it)
                if found is None:
                    if not self.add_line(line, end, root + os.sep):
                        other(line, count, end)
                    end += len(line)
                    continue
                ident, fp, tries, path, size, mtime_ns = found.groups()
                try:
                    st = stat(path, dir_fd=folder)
                    ok = st.st_size == int(size) and st.st_mtime_ns == int(mtime_ns)
                except (OSError, ValueError):
                    ok = False
                ids(digest64(ident))
                fps(int(fp, 16))
                status(_SUCCEEDED)
                attempts(int(tries))
                offsets(end)
                lengths(len(line))
                intact(ok)
                end += len(line)
        finally:
            os.close(folder)
        return end, 0, count

    def add_line(self, line: bytes, offset: int, base: str) -> bool:
        """One record in the usual form, read without a JSON parse (a million of them are
        read at every open); False: read it as JSON with :meth:`add`."""
        head = _HEAD.match(line)
        if head is None or not _whole(line, head.end()):
            return False
        ident, fp, status_text, attempts = head.groups()
        status = _BY_VALUE[status_text.decode()]
        intact = False
        if status == _SUCCEEDED:
            image = _IMAGE.search(line, head.end())
            if image is None:
                return False
            path, size, mtime_ns = image.groups()
            try:
                st = os.stat(base + path.decode())
                intact = st.st_size == int(size) and st.st_mtime_ns == int(mtime_ns)
            except (OSError, UnicodeDecodeError, ValueError):
                intact = False
        self.ids.append(digest64(ident))
        self.fps.append(int(fp, 16))
        self.status.append(status)
        self.attempts.append(int(attempts))
        self.offsets.append(offset)
        self.lengths.append(len(line))
        self.intact.append(intact)
        return True

    def add(self, record: Mapping[str, Any], offset: int, length: int, base: str) -> None:
        """One job record; its images are checked now if it succeeded (size and mtime)."""
        status = _BY_VALUE[record["status"]]
        images = record.get("images") or ()
        intact = status == _SUCCEEDED
        if intact:
            for image in images:
                try:
                    st = os.stat(base + image["path"])
                except OSError:
                    intact = False
                    break
                if st.st_size != image["bytes"] or st.st_mtime_ns != (image.get("mtime_ns")
                                                                        or -1):
                    intact = False
                    break
        try:
            fp = fp_digest(record["fp"])
        except (ValueError, TypeError):
            fp = 0
        self.ids.append(digest64(str(record["id"]).encode()))
        self.fps.append(fp)
        self.status.append(status)
        self.attempts.append(int(record["attempts"]))
        self.offsets.append(offset)
        self.lengths.append(length)
        self.intact.append(intact)


class StateTable(Mapping[str, Any]):
    """Job id -> its last JobState, indexed in arrays; see the module docstring."""

    def __init__(self, scan: Scan, read: Read, parse: Callable[[bytes], Any]) -> None:
        self._read = read
        self._parse = parse
        ids = np.frombuffer(scan.ids, np.uint64)
        # The last record of each id wins: a stable sort by id keeps journal order within one.
        order = np.argsort(ids, kind="stable")
        ids = ids[order]
        scan.ids = array("Q")
        last = np.ones(len(ids), bool)
        last[:-1] = ids[1:] != ids[:-1]
        keep = order[last]
        del order
        self.ids = ids[last]
        del ids, last
        # Column by column, each scan array let go once copied: the peak stays near one copy.
        self.fps = np.frombuffer(scan.fps, np.uint64)[keep]
        scan.fps = array("Q")
        self.offsets = np.frombuffer(scan.offsets, np.uint64)[keep]
        scan.offsets = array("Q")
        self.status = np.frombuffer(scan.status, np.uint8)[keep]
        self.attempts = np.frombuffer(scan.attempts, np.uint32)[keep]
        self.lengths = np.frombuffer(scan.lengths, np.uint32)[keep]
        self.intact = np.frombuffer(scan.intact, np.uint8)[keep].astype(bool)
        scan.status, scan.attempts, scan.lengths, scan.intact = (
            array("B"), array("I"), array("I"), array("B"))
        # Records appended since: id digest -> (offset, length). Their files are unchecked.
        self.later: dict[int, tuple[int, int]] = {}
        self._new = 0  # ids in ``later`` that the arrays do not hold
        # The states appended last: a job in flight reads its own back (pread + parse).
        self._recent: dict[str, Any] = {}

    def _find(self, key: int) -> int:
        if not len(self.ids):  # a new output: every job of its first run asks
            return -1
        # As a uint64 scalar: a Python int above 2**63 would turn the search into a copy.
        at = int(self.ids.searchsorted(np.uint64(key)))
        return at if at < len(self.ids) and int(self.ids[at]) == key else -1

    def _in_later(self, ids: np.ndarray) -> np.ndarray:
        """Per id digest: appended to since the open? (np.isin sorts through np.unique and
        imports numpy.ma: 20 ms for 300 ids, where a search takes 20 µs.)"""
        keys = np.sort(np.fromiter(self.later, np.uint64, len(self.later)))
        at = np.minimum(np.searchsorted(keys, ids), max(len(keys) - 1, 0))
        return np.asarray(keys[at] == ids) if len(keys) else np.zeros(len(ids), bool)

    def where(self, job_id: str) -> tuple[int, int] | None:
        """(offset, length) of the last record of ``job_id``, if any."""
        key = digest64(job_id.encode())
        found = self.later.get(key)
        if found is not None:
            return found
        at = self._find(key)
        return None if at < 0 else (int(self.offsets[at]), int(self.lengths[at]))

    def put(self, job_id: str, offset: int, length: int, state: Any = None) -> None:
        """A record of ``job_id`` (saying ``state``) appended at ``offset``: it now counts."""
        key = digest64(job_id.encode())
        if key not in self.later and self._find(key) < 0:
            self._new += 1
        self.later[key] = (offset, length)
        self._recent.pop(job_id, None)  # re-inserted last: the dict's order is the age
        if state is not None:
            self._recent[job_id] = state
            if len(self._recent) > _RECENT_STATES:
                del self._recent[next(iter(self._recent))]

    def recent(self, job_id: str) -> Any:
        """The state of ``job_id`` if appended lately (among the last 1,024), else None."""
        return self._recent.get(job_id)

    def record(self, job_id: str) -> tuple[dict[str, Any] | None, bool]:
        """The last record of ``job_id`` as read from the journal (no JobState built), and
        whether its images were found as recorded at open (see :meth:`checked_intact`)."""
        key = digest64(job_id.encode())
        found = self.later.get(key)
        intact = False
        if found is None:
            at = self._find(key)
            if at < 0:
                return None, False
            found = (int(self.offsets[at]), int(self.lengths[at]))
            intact = bool(self.intact[at])
        try:
            record = json.loads(self._read(*found))
        except ValueError:
            return None, False
        if isinstance(record, dict) and record.get("id") == job_id:
            return record, intact
        return None, False

    def places(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per id digest: (offset, length) of its last record (length 0: none) and whether
        its images were found as recorded at open; for a pass over every job at once."""
        if len(self.ids):
            at = np.searchsorted(self.ids, ids)
            at[at == len(self.ids)] = 0
            found = self.ids[at] == ids
            offsets = np.where(found, self.offsets[at], 0)
            lengths = np.where(found, self.lengths[at], 0)
            intact = found & self.intact[at]
        else:
            offsets = np.zeros(len(ids), np.uint64)
            lengths = np.zeros(len(ids), np.uint32)
            intact = np.zeros(len(ids), bool)
        if self.later:
            for n in np.flatnonzero(self._in_later(ids)).tolist():
                offsets[n], lengths[n] = self.later[int(ids[n])]
                intact[n] = False
        return offsets, lengths, intact

    def read_record(self, job_id: str, offset: int, length: int) -> dict[str, Any] | None:
        """The record at ``offset`` as read, if it is ``job_id``'s (no JobState built)."""
        if not length:
            return None
        try:
            record = json.loads(self._read(offset, length))
        except ValueError:
            return None
        return record if isinstance(record, dict) and record.get("id") == job_id else None

    def checked_intact(self, job_id: str) -> bool:
        """Were the images of ``job_id``'s state found as recorded when the journal was read?"""
        key = digest64(job_id.encode())
        if key in self.later:
            return False
        at = self._find(key)
        return at >= 0 and bool(self.intact[at])

    def done_mask(self, ids: np.ndarray, fps: np.ndarray) -> np.ndarray:
        """Per (id digest, fingerprint digest): surely done (succeeded with that
        fingerprint, images found as recorded). False means: ask in full."""
        if not len(self.ids):
            return np.zeros(len(ids), bool)
        at = np.searchsorted(self.ids, ids)
        at[at == len(self.ids)] = 0
        done: np.ndarray = ((self.ids[at] == ids) & (self.fps[at] == fps) & (fps != 0)
                & (self.status[at] == _SUCCEEDED) & self.intact[at])
        if self.later:
            done &= ~self._in_later(ids)
        return done

    def unchecked_successes(self) -> list[tuple[int, int]]:
        """(offset, length) of succeeded records whose images were not found as recorded."""
        wanted = (self.status == _SUCCEEDED) & ~self.intact
        return list(zip(self.offsets[wanted].tolist(), self.lengths[wanted].tolist(),
                        strict=True))

    def live(self) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, lengths) of every job's last record, in journal order."""
        offsets, lengths = self.offsets, self.lengths
        if self.later:
            keep = ~self._in_later(self.ids)
            extra = np.array(list(self.later.values()), np.uint64).reshape(-1, 2)
            offsets = np.concatenate([offsets[keep], extra[:, 0]])
            lengths = np.concatenate([lengths[keep], extra[:, 1].astype(np.uint32)])
        order = np.argsort(offsets, kind="stable")
        return offsets[order], lengths[order]

    def tally(self) -> tuple[dict[str, int], int, Counter[str]]:
        """Jobs by status, requests in all, and failures by error type (``status``): from
        the arrays, reading back only the records of failures and of this session."""
        counts: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        later = np.zeros(len(self.ids), bool)
        if self.later:
            later = self._in_later(self.ids)
        codes = np.bincount(self.status[~later], minlength=len(STATUS_CODES))
        for status, code in STATUS_CODES.items():
            counts[status.value] += int(codes[code])
        attempts = int(self.attempts[~later].sum(dtype=np.uint64))
        failed = (self.status == STATUS_CODES[Status.FAILED]) & ~later
        failures = zip(self.offsets[failed].tolist(), self.lengths[failed].tolist(), strict=True)
        for is_later, (offset, length) in [*((False, p) for p in failures),
                                            *((True, p) for p in self.later.values())]:
            state = self._parse(self._read(offset, length))
            if state is None:
                continue
            if is_later:
                counts[state.status.value] += 1
                attempts += state.attempts
            if state.status is Status.FAILED and state.error:
                errors[str(state.error.get("type"))] += 1
        return {k: n for k, n in counts.items() if n}, attempts, errors

    def moved(self, offsets: np.ndarray) -> None:
        """After compaction: the records now sit at ``offsets`` (in the order of ``live``)."""
        assert not self.later
        order = np.argsort(self.offsets, kind="stable")
        self.offsets[order] = offsets

    # -- Mapping -------------------------------------------------------------------

    def __getitem__(self, job_id: str) -> Any:
        recent = self._recent.get(job_id) if isinstance(job_id, str) else None
        if recent is not None:
            return recent
        found = self.where(job_id) if isinstance(job_id, str) else None
        if found is not None:
            state = self._parse(self._read(*found))
            if state is not None and state.id == job_id:  # not a digest collision
                return state
        raise KeyError(job_id)

    def __contains__(self, job_id: object) -> bool:
        return isinstance(job_id, str) and self.get(job_id) is not None

    def __len__(self) -> int:
        return len(self.ids) + self._new

    def __iter__(self) -> Iterator[str]:
        for state in self.values():
            yield state.id

    def values(self) -> Iterator[Any]:  # type: ignore[override]
        offsets, lengths = self.live()
        for offset, length in zip(offsets, lengths, strict=True):
            state = self._parse(self._read(int(offset), int(length)))
            if state is not None:
                yield state
