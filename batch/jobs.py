"""The data that flows through the pipeline: jobs in, image records and results out.

All frozen dataclasses; statuses are an Enum whose values are what
results.jsonl and the checkpoint store.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MODEL = "gemini-3.0-pro-image-preview"
DEFAULT_ASPECT_RATIO = "1:1"
DEFAULT_IMAGE_SIZE = "1K"
ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
IMAGE_SIZES = ("1K", "2K", "4K")
MAX_INPUT_IMAGES = 14
MAX_INPUT_IMAGE_BYTES = 7 * 1024 * 1024


class Status(enum.StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    PENDING = "pending"


class InputKind(enum.StrEnum):
    FILE = "file"  # a local file, sent as a base64 data URL
    URL = "url"  # http(s), passed through untouched
    DATA = "data"  # a data: URL written in the manifest, passed through


@dataclass(frozen=True, slots=True)
class InputImage:
    """One input image of a job.

    Local files are not held in memory: ``ref`` is the absolute path and the
    bytes are read when the request is built. ``digest`` (sha256 hex of the
    bytes for files and data URLs, of the URL text for URLs) feeds the job's
    fingerprint.
    """

    kind: InputKind
    ref: str  # absolute path, or the URL as written
    source: str  # as written in the manifest, for messages
    mime: str | None  # sniffed for files; declared for data URLs; None for URLs
    digest: str
    size_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class Job:
    """One request to make: everything that shapes it, already validated."""

    id: str
    prompt: str
    model: str
    aspect_ratio: str
    image_size: str
    images: tuple[InputImage, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    index: int = 0  # position in the (expanded) manifest
    location: str = ""  # where it was written, for messages: "jobs/a.yaml: job 3"
    endpoint: str = ""  # the manifest's endpoint that serves it ("": the only one)
    # Settings only some providers have (gpt-image's quality, output_format, background).
    options: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One image on disk, verified: what results.jsonl lists under ``images``."""

    path: str  # relative to the output folder, always with "/"
    sha256: str
    bytes: int
    mime: str
    width: int
    height: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "bytes": self.bytes,
            "mime": self.mime,
            "width": self.width,
            "height": self.height,
        }
