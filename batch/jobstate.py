"""One job's recorded state (what it cost and produced), its journal line, and the
fingerprint that says whether a finished job still matches its manifest entry.

Pure data and encoding; the store that keeps these states is :mod:`batch.checkpoint`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batch.jobs import ImageRecord, Job, Status


def fingerprint(job: Job) -> str:
    """A hash of what shapes the image: not the id, nor the endpoint (a job moved to
    another gateway serving the same model is not paid for again)."""
    shape: list[Any] = [job.model, job.prompt, job.aspect_ratio, job.image_size, job.params,
                        [image.digest for image in job.images]]
    if job.options:  # only when set, so older checkpoints still match
        shape.append(dict(job.options))
    canonical = json.dumps(
        shape,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        default=str,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class FileMeta:
    """Where a recorded image was staged, and the mtime that vouches for it unchanged."""

    tmp: str | None  # temporary name, to finish a rename a crash cut short
    mtime_ns: int | None


@dataclass(frozen=True, slots=True)
class JobState:
    """The last known state of one job id.

    ``usage`` is kept as JSON text: a checkpoint of 100,000 jobs holds one per
    job, and text is a fifth of the memory of the nested dicts.
    """

    id: str
    fingerprint: str
    status: Status
    attempts: int  # requests sent for this id, across all runs
    error: Mapping[str, Any] | None = None
    images: tuple[ImageRecord, ...] = ()
    image_meta: tuple[FileMeta, ...] = ()
    usage_json: str | None = None
    latency_s: float | None = None
    text: str | None = None

    @property
    def usage(self) -> Any:
        return json.loads(self.usage_json) if self.usage_json else None

    def to_line(self) -> bytes:
        record = {
            "id": self.id,
            "fp": self.fingerprint,
            "status": self.status.value,
            "attempts": self.attempts,
            "error": self.error,
            "images": [
                {**image.as_dict(), "tmp": meta.tmp, "mtime_ns": meta.mtime_ns}
                for image, meta in zip(self.images, self.image_meta, strict=True)
            ],
            "usage": self.usage,
            "latency_s": self.latency_s,
            "text": self.text,
        }
        return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()

    @staticmethod
    def from_record(record: Mapping[str, Any]) -> JobState:
        images = []
        metas = []
        for item in record.get("images") or []:
            images.append(
                ImageRecord(
                    path=item["path"],
                    sha256=item["sha256"],
                    bytes=item["bytes"],
                    mime=item["mime"],
                    width=item["width"],
                    height=item["height"],
                )
            )
            metas.append(FileMeta(item.get("tmp"), item.get("mtime_ns")))
        usage = record.get("usage")
        return JobState(
            id=record["id"],
            fingerprint=record["fp"],
            status=Status(record["status"]),
            attempts=int(record["attempts"]),
            error=record.get("error"),
            images=tuple(images),
            image_meta=tuple(metas),
            usage_json=json.dumps(usage, separators=(",", ":")) if usage else None,
            latency_s=record.get("latency_s"),
            text=record.get("text"),
        )
