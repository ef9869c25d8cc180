"""What the engine, the providers and the CLI need from an output: where images go, and state.

Two protocols, each with a local-folder and an object-storage implementation:

- :class:`ImageSink`: where an answer's images are streamed (``open`` -> an
  :class:`ImageStream` the decoder writes into -> ``finish`` gives a
  :class:`~batch.images.StagedImage`), made durable before they are recorded
  (``prepare``), published under their final name (``publish``, done by the
  store's group commit, after the record) or dropped (``discard``), and
  checked later (``intact``).
- :class:`StateStore`: what every job has cost and produced: plan look-ups
  (``states``, ``is_done``, ``attempts``), writes (``mark_attempt``,
  ``record``, ``commit_batch`` as one group commit, ``record_run``), held
  under a lease or lock from open to ``close``.

The rule both implementations keep: a success is recorded *before* its image
appears under its final name, with the staged name beside it, and an open
finishes any publication a crash cut short. A final name only ever holds a
complete, verified image, and a paid, recorded image is never deleted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from batch.checkpoint import JobState
    from batch.images import StagedImage, StreamTransform
    from batch.jobs import Job


class ImageStream(Protocol):
    """One image being received: bytes in, verified as they come."""

    def write(self, data: bytes) -> None:
        """Append decoded bytes; MalformedResponse once they stop being an image."""
        ...

    def finish(self) -> StagedImage:
        """Check the image is complete; it is then staged (not yet under its final name)."""
        ...

    def abort(self) -> None:
        """Drop what was written (idempotent)."""
        ...


class ImageSink(Protocol):
    """Where images go: staged as they stream, published after they are recorded."""

    def open(
        self, job_id: str, index: int, *, max_pixels: int,
        transform: StreamTransform | None = None,
    ) -> ImageStream:
        """A stream for image ``index`` of ``job_id`` (the decoder writes into it)."""
        ...

    def local_path(self, staged: StagedImage) -> Path:
        """Where the staged bytes can be read on this machine (the decode check reads them)."""
        ...

    async def prepare(self, staged: Sequence[StagedImage]) -> tuple[StagedImage, ...]:
        """Make staged images durable where any later open can find them, before the record.

        Raises StorageError if it cannot, having kept the images somewhere it names (they
        are paid for); the caller then releases them.
        """
        ...

    def discard(self, staged: StagedImage) -> None:
        """Drop a staged image that will not be recorded."""
        ...

    def release(self, staged: StagedImage) -> None:
        """Let go of a staged image that is (maybe) recorded: kept for the next open."""
        ...

    def remove(self, rel: str) -> None:
        """Remove a published image no state refers to any more (a redo's old extra image)."""
        ...


class StateStore(Protocol):
    """The state of an output: per-job records, the run log, and the lease on it.

    ``root`` is a local folder for the files written beside the state
    (results.jsonl, summary.json, the gallery); an object store mirrors it
    to the bucket with :meth:`sync_out`.
    """

    @property
    def root(self) -> Path: ...

    @property
    def sink(self) -> ImageSink: ...

    @property
    def runs(self) -> Sequence[Mapping[str, Any]]: ...

    @property
    def states(self) -> Mapping[str, JobState]: ...

    def is_done(self, job: Job, fp: str, *, verify: bool = False) -> bool:
        """True if ``job`` succeeded with this fingerprint and its images are intact."""
        ...

    def intact(self, state: JobState, *, verify: bool = False) -> bool:
        """True if every image of ``state`` is published with its recorded content."""
        ...

    def attempts(self, job_id: str) -> int: ...

    def mark_attempt(self, job: Job, fp: str) -> JobState:
        """Count one more request for ``job`` before it is sent (need not be durable)."""
        ...

    def record(self, state: JobState, *, durable: bool) -> None: ...

    def commit_batch(self, states: list[JobState], staged: list[StagedImage]) -> None:
        """One group commit: ``states`` durable, then ``staged`` published (blocking).

        NotRecorded: nothing of it was recorded (the staged images may go).
        Unpublished: recorded, or maybe; the staged images must be kept.
        """
        ...

    def record_run(self, event: str, **fields: Any) -> None: ...

    def sync_out(self, names: Iterable[str]) -> None:
        """Copy the files ``names`` (relative to ``root``) to where the output lives."""
        ...

    def close(self) -> None:
        """Flush, release the lease or lock (idempotent)."""
        ...

