"""The one error tree of imgbatch.

Every failure the tool knows about is an :class:`ImgbatchError`. Library
exceptions (aiohttp, OSError, json, yaml) are mapped to these at exactly one
boundary each: the manifest loader, the protocol client and the store.

::

    ImgbatchError
    ├── ManifestError          invalid manifest; carries every Problem found (exit 2)
    ├── UsageError             bad command line, missing API key (exit 2)
    ├── OutputError            output folder unusable (exit 2)
    │   └── LockHeld           another run holds the folder (exit 4)
    ├── StorageError           a write failed (disk full...): stop starting jobs
    │   ├── NotRecorded        the outcome never reached the journal: its temporaries may go
    │   └── Unpublished        the outcome is (or may be) in the journal: keep its temporaries,
    │                          the next open renames them (or drops them if it is not)
    └── JobError               one attempt at one job went wrong; carries job_id
        ├── RetryableError     worth another request
        │   ├── TransportError     connection refused / reset, server disconnected
        │   ├── RequestTimeout     no answer, or a stalled body, within the timeout
        │   ├── ServerError        408, 409 and every 5xx, whatever the body
        │   ├── RateLimited        429 (does not use up the job's attempts); says whether
        │   │                      the server called its shared quota spent
        │   ├── MalformedResponse  200 whose body is truncated, not JSON, bad base64,
        │   │                      or an image that is not complete
        │   └── NoImage            200 without an image (retried once, then the job fails)
        ├── RejectedError      400/404/413/422 and other 4xx: the job fails at once
        │   └── Blocked            the provider's safety system refused it (with its reason)
        └── FatalApiError      401/402/403: the whole run stops, unfinished jobs stay pending
            └── QuotaExhausted     a per-day quota is used up (Gemini): stop, jobs pending

Messages never contain the API key: the client builds them from status, body
and the job id only, never from request headers.
"""

from __future__ import annotations

from dataclasses import dataclass


class ImgbatchError(Exception):
    """Base of every error imgbatch raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a manifest, with where it is."""

    location: str  # "jobs/a.jsonl:12" or "jobs/a.yaml: job 3 (id 'cat')"
    field: str | None  # "aspect_ratio", "images[2]", or None for the whole entry
    message: str

    def __str__(self) -> str:
        where = f"{self.location}: {self.field}" if self.field else self.location
        return f"{where}: {self.message}"


class ManifestError(ImgbatchError):
    """The manifest is invalid; ``problems`` lists everything found (capped)."""

    def __init__(self, problems: list[Problem], more: int = 0) -> None:
        self.problems = problems
        self.more = more  # problems found beyond the cap
        lines = [str(p) for p in problems]
        if more:
            lines.append(f"... and {more} more problem(s)")
        super().__init__("\n".join(lines))


class UsageError(ImgbatchError):
    """Bad command line or environment (e.g. no API key)."""


class OutputError(ImgbatchError):
    """The output folder cannot be used."""


class LockHeld(OutputError):
    """Another run holds the output folder's lock."""

    def __init__(self, path: str, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        holder = f"process {pid}" if pid else "another process"
        super().__init__(f"{path} is in use by {holder}; refusing to start a second run")


class StorageError(ImgbatchError):
    """Writing to the output folder failed (disk full, I/O error)."""


class NotRecorded(StorageError):
    """A commit failed before its outcome reached the journal.

    Its staged images may be deleted: nothing points at them.
    """


class Unpublished(StorageError):
    """A commit failed after its outcome was (or may have been) written to the journal.

    Its staged images must stay under their temporary names: the next open
    renames them to their final names if the record is there, and removes
    them as strays if it is not. Deleting them would lose a paid image.
    """


class ClusterError(StorageError):
    """A cluster run's shared actor (limits, budget) stayed unreachable: the shard stops,
    its unsent jobs left pending (a stop like a storage error's, so nothing waits for good)."""


class JobError(ImgbatchError):
    """One attempt at one job failed.

    ``type`` is the stable name written to results.jsonl (``error.type``).
    """

    type = "error"
    # The provider most likely charged for this attempt: it answered 200 and generated an
    # image that reached us broken. Counted as spent, so --max-cost and the summary say so.
    billed = False

    def __init__(
        self,
        message: str,
        *,
        job_id: str = "",
        http_status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        self.message = message
        self.job_id = job_id
        self.http_status = http_status
        self.retry_after_s = retry_after_s  # the server's own wait, when it gave one
        super().__init__(message)

    def __str__(self) -> str:
        parts = [f"job {self.job_id}" if self.job_id else "", self.type]
        if self.http_status is not None:
            parts.append(f"HTTP {self.http_status}")
        head = " ".join(p for p in parts if p)
        return f"{head}: {self.message}"

    def as_record(self) -> dict[str, object]:
        """The ``error`` object of a results.jsonl line."""
        return {"type": self.type, "message": self.message, "http_status": self.http_status}


class RetryableError(JobError):
    """Another request may well succeed."""

    type = "retryable"


class TransportError(RetryableError):
    type = "connection"


class RequestTimeout(RetryableError):
    type = "timeout"


class ServerError(RetryableError):
    type = "server_error"


class RateLimited(RetryableError):
    """A 429. ``quota_used_up``: the server said the key's shared quota is spent (rate-limit
    headers at 0, a per-minute QuotaFailure), so the whole pool must wait, not only this
    request; False when it said nothing either way."""

    type = "rate_limited"

    def __init__(
        self,
        message: str,
        *,
        job_id: str = "",
        http_status: int | None = None,
        retry_after_s: float | None = None,
        quota_used_up: bool = False,
    ) -> None:
        super().__init__(message, job_id=job_id, http_status=http_status,
                         retry_after_s=retry_after_s)
        self.quota_used_up = quota_used_up


class MalformedResponse(RetryableError):
    type = "malformed_response"
    billed = True


class NoImage(RetryableError):
    """A 200 whose answer holds no image; ``message`` is the model's text."""

    type = "no_image"


class RejectedError(JobError):
    """The server refused this request; sending it again will not help."""

    type = "rejected"


class FatalApiError(JobError):
    """The key or account is unusable: stop the whole run."""

    type = "fatal"


class Blocked(RejectedError):
    """The provider's safety system refused the prompt or the image: the job fails at once."""

    type = "blocked"


class QuotaExhausted(FatalApiError):
    """A quota that will not clear tonight (per day): stop the run, jobs stay pending."""

    type = "quota_exhausted"
