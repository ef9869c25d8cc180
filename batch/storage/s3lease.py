"""The lease on an ``s3://`` output: one run writes under a prefix at a time.

``prefix/.imgbatch/lease`` is a small JSON object (holder id, host, pid,
expiry). It is taken by a create-only put; a lease found there is taken over
only when it has expired, or at once when its holder ran on this host and
its process is gone, and the take-over is a conditional put on the etag that
was read, so of two runs racing for a dead lease exactly one wins. The
holder renews it every ``ttl_s / 3`` from a thread, again conditionally: a
renewal that fails its precondition means someone took the lease over, and
the store stops writing. A holder killed with SIGKILL leaves a lease that
expires within ``ttl_s`` (45 s).

The holder counts its lease valid until ``send time + ttl_s - margin_s`` of
its last successful put (acquire or renewal): a renewal that cannot get
through (a brownout, a partition) lets that pass, and the state store then
refuses every write and delete, before another run may take the lease over.
Lease calls use a store of their own whose retries end within ``ttl_s / 3``.
Release marks the lease released, conditionally on our etag, and leaves the
object: S3 has no conditional delete, and an unconditional one could remove
a new holder's lease.

Expiry is wall-clock time, so machines sharing a prefix need their clocks
within a few seconds (NTP).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from batch.errors import LockHeld, NotRecorded, OutputError
from batch.storage.s3client import describe

log = logging.getLogger(__name__)

LEASE = ".imgbatch/lease"
TTL_S = 45.0


@dataclass(frozen=True)
class LeaseInfo:
    holder: str
    host: str
    pid: int
    expires_at: float

    @staticmethod
    def parse(data: bytes) -> LeaseInfo | None:
        try:
            record = json.loads(data)
            return LeaseInfo(str(record["holder"]), str(record["host"]), int(record["pid"]),
                             float(record["expires_at"]))
        except (ValueError, KeyError, TypeError):
            return None

    def dead(self, now: float, host: str) -> bool:
        """True when nobody holds this lease any more."""
        if now > self.expires_at:
            return True
        return self.host == host and not _alive(self.pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """Held from :meth:`acquire` to :meth:`release`; ``lost`` is set if it was taken away."""

    def __init__(self, store: Any, key: str, url: str, ttl_s: float = TTL_S) -> None:
        self._store = store
        self._key = key
        self._url = url
        self.ttl_s = ttl_s
        self.holder = uuid.uuid4().hex
        self.host = socket.gethostname()
        self._etag: str | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Clocks differ a little between machines; the other run judges expiry by its own.
        self.margin_s = ttl_s / 9
        self._valid_until = 0.0  # time.monotonic()

    def _renewed(self, sent: float) -> None:
        self._valid_until = sent + self.ttl_s - self.margin_s

    def valid(self) -> bool:
        """Held for sure: not taken over, and renewed recently enough that it has not expired."""
        return not self.lost.is_set() and time.monotonic() < self._valid_until

    def check(self) -> None:
        """NotRecorded unless :meth:`valid`."""
        if self.lost.is_set():
            raise NotRecorded(f"the lease on {self._url} was taken over by another run")
        if time.monotonic() >= self._valid_until:
            raise NotRecorded(f"the lease on {self._url} could not be renewed in time; "
                              "another run may hold it now")

    def confirm(self) -> None:
        """Read the lease object back: NotRecorded unless it still names us (before deletes)."""
        import obstore

        self.check()
        try:
            info = LeaseInfo.parse(bytes(obstore.get(self._store, self._key).bytes()))
        except Exception as exc:
            raise NotRecorded(f"cannot read the lease on {self._url}: {describe(exc)}"
                              ) from None
        if info is None or info.holder != self.holder:
            self.lost.set()
        self.check()

    def _body(self) -> bytes:
        record = {"holder": self.holder, "host": self.host, "pid": os.getpid(),
                  "expires_at": time.time() + self.ttl_s}
        return json.dumps(record).encode()

    def acquire(self) -> None:
        """Take the lease or raise LockHeld (at once: no waiting for a live holder)."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        for _ in range(3):  # a holder that releases between our two requests: look again
            sent = time.monotonic()
            try:
                result = obstore.put(self._store, self._key, self._body(), mode="create")
                self._etag = result["e_tag"]
                self._renewed(sent)
                break
            except AlreadyExistsError:
                pass
            except Exception as exc:
                raise OutputError(f"cannot take the lease on {self._url}: {describe(exc)}"
                                  ) from None
            try:
                found = obstore.get(self._store, self._key)
                etag = found.meta["e_tag"]
                info = LeaseInfo.parse(bytes(found.bytes()))
            except FileNotFoundError:
                continue
            except Exception as exc:
                raise OutputError(f"cannot read the lease on {self._url}: {describe(exc)}"
                                  ) from None
            if info is not None and not info.dead(time.time(), self.host):
                raise LockHeld(self._url, info.pid if info.host == self.host else None)
            sent = time.monotonic()
            try:
                result = obstore.put(self._store, self._key, self._body(),
                                     mode={"e_tag": etag})
            except (PreconditionError, FileNotFoundError):
                continue  # another run took it (or it was released) in between
            except Exception as exc:
                raise OutputError(f"cannot take the lease on {self._url}: {describe(exc)}"
                                  ) from None
            if info is not None:
                log.warning("%s: took over the lease of process %d on %s, which is gone",
                            self._url, info.pid, info.host)
            self._etag = result["e_tag"]
            self._renewed(sent)
            break
        else:
            raise LockHeld(self._url, None)
        self._thread = threading.Thread(target=self._renew_loop, name="imgbatch-lease",
                                        daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        import obstore
        from obstore.exceptions import PreconditionError

        while not self._stop.wait(self.ttl_s / 3):
            sent = time.monotonic()
            try:
                result = obstore.put(self._store, self._key, self._body(),
                                     mode={"e_tag": self._etag})
                self._etag = result["e_tag"]
                self._renewed(sent)
            except (PreconditionError, FileNotFoundError):
                log.error("%s: the lease was taken over by another run; stopping writes",
                          self._url)
                self.lost.set()
                return
            except Exception as exc:  # a blip: the next renewal may get through
                log.warning("%s: renewing the lease failed: %s (writes stop in %.0fs unless "
                            "it gets through)", self._url, describe(exc),
                            max(0.0, self._valid_until - time.monotonic()))

    def release(self) -> None:
        """Stop renewing and mark the lease released if it is still ours."""
        self._stop.set()
        self._valid_until = 0.0
        if self._thread is not None:
            # A renewal in flight ends within the lease store's retry timeout.
            self._thread.join(self.ttl_s / 2)
            if self._thread.is_alive():
                log.warning("%s: a lease renewal is still in flight; the lease expires in "
                            "%gs", self._url, self.ttl_s)
                return
            self._thread = None
        if self._etag is None or self.lost.is_set():
            return
        import obstore

        try:
            # Conditional on our etag: a take-over in between keeps the new holder's lease.
            # Released, not deleted (no conditional delete); acquire takes it over.
            obstore.put(self._store, self._key, b'{"released": true}',
                        mode={"e_tag": self._etag})
        except Exception as exc:
            log.warning("%s: could not release the lease (it expires in %gs): %s",
                        self._url, self.ttl_s, describe(exc))
        self._etag = None
