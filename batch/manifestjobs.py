"""The jobs of a loaded manifest as a sequence that need not be held in memory.

:class:`ManifestJobs` is what ``Manifest.jobs`` is: ``len()``, iteration in
manifest order and indexing, whether the jobs are kept (YAML, JSON: small by
nature) or built again from the file at each pass (a JSONL catalog, see
:mod:`batch.catalog`). What needs only the kinds of jobs (``validate``'s
plan, prices, endpoints in use, capability checks) reads :class:`Shapes`:
one representative job and a count per distinct shape, gathered while the
manifest was validated, so none of it walks a million jobs again.

A streamed catalog also keeps, per job, 8-byte digests of its id and
fingerprint (:class:`JobDigests`): the resume plan joins them with the
checkpoint's index and builds again only the jobs not surely done.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

import numpy as np

from batch.jobs import ASPECT_RATIOS, IMAGE_SIZES, InputImage, InputKind, Job

# endpoint, model, image size, aspect ratio, options, input kinds (count each), input bytes
Shape = tuple[str, str, str, str, tuple[tuple[str, str], ...], tuple[int, int, int], int]
_KINDS = tuple(InputKind)


def shape_of(job: Job) -> Shape:
    """What prices, plans and capability checks look at: not the prompt, id or params."""
    if not job.images and not job.options:
        return (job.endpoint, job.model, job.image_size, job.aspect_ratio, (), (0, 0, 0), 0)
    kinds = [0, 0, 0]
    for image in job.images:
        kinds[_KINDS.index(image.kind)] += 1
    return (job.endpoint, job.model, job.image_size, job.aspect_ratio,
            tuple(sorted(job.options.items())), (kinds[0], kinds[1], kinds[2]),
            sum(image.size_bytes or 0 for image in job.images))


def stand_in(shape: Shape) -> Job:
    """A job of ``shape`` for the checks that read only its shape (prices, capabilities)."""
    endpoint, model, size, ratio, options, kinds, _ = shape
    images = tuple(InputImage(kind, "", "", None, "") for kind, n in zip(_KINDS, kinds,
                                                                        strict=True)
                   for _ in range(n))
    return Job("", "", model, ratio, size, images, {}, 0, "", endpoint, dict(options))


class Shapes:
    """Jobs counted by shape, each with its first job."""

    def __init__(self) -> None:
        self._first: dict[Shape, Job | None] = {}
        self._count: Counter[Shape] = Counter()

    def add(self, job: Job) -> Shape:
        key = shape_of(job)
        if self._first.get(key) is None:
            self._first[key] = job
        self._count[key] += 1
        return key

    def add_shape(self, key: Shape, count: int) -> None:
        """``count`` jobs of ``key`` known without a Job (the line memo's)."""
        self._first.setdefault(key, None)
        self._count[key] += count

    def weighted(self) -> list[tuple[Job, int]]:
        """(first job of the shape, number of jobs of that shape), in manifest order."""
        return [(job if job is not None else stand_in(key), self._count[key])
                for key, job in self._first.items()]

    def representatives(self) -> list[Job]:
        return [job for job, _ in self.weighted()]

    def input_kinds(self) -> dict[str, int]:
        out = {kind.value: 0 for kind in InputKind}
        for key, count in self._count.items():
            for kind, n in zip(_KINDS, key[5], strict=True):
                out[kind.value] += n * count
        return out

    def input_bytes(self) -> int:
        return sum(key[6] * count for key, count in self._count.items())


class JobDigests:
    """Per job of a streamed catalog: where its line is and digests of its id and fingerprint.

    About 36 bytes a job, in flat arrays; the fingerprint digest is 0 until known.
    """

    def __init__(self) -> None:
        self.offsets = array("Q")  # of the job's line in the file
        self.numbers = array("I")  # the line's number
        self.ids = array("Q")  # digest64 of the id
        self.lower = array("Q")  # digest64 of the lowercased id (clashes on case-blind disks)
        self.fps = array("Q")  # fp_digest of the fingerprint
        self.ordinals: dict[int, int] = {}  # first job of an entry -> n, for "-n" derived ids


Build = Callable[[Sequence[int]], Iterator[Job]]  # the jobs at these positions, in order
Plan = Callable[[Any], list[tuple[Job, str]] | None]  # store -> the jobs to do, with fingerprints


class ManifestJobs(Sequence[Job]):
    """The jobs in manifest order: kept, or built again from the file at each pass."""

    def __init__(self, count: int, shapes: Shapes, kept: tuple[Job, ...] | None,
                 replay: Callable[[], Iterator[Job]] | None, plan: Plan | None = None) -> None:
        self._count = count
        self.shapes = shapes
        self._kept = kept
        self._replay = replay
        self._plan = plan
        self._fps: np.ndarray | None = None
        self._ids: np.ndarray | None = None

    @classmethod
    def held(cls, jobs: Sequence[Job]) -> ManifestJobs:
        """Jobs kept in memory (YAML, JSON, tests)."""
        shapes = Shapes()
        for job in jobs:
            shapes.add(job)
        return cls(len(jobs), shapes, tuple(jobs), None)

    @classmethod
    def streamed(cls, count: int, shapes: Shapes, replay: Callable[[], Iterator[Job]],
                 plan: Plan | None) -> ManifestJobs:
        """``count`` jobs that ``replay()`` builds again, one at a time, at every pass."""
        return cls(count, shapes, None, replay, plan)

    @property
    def streaming(self) -> bool:
        return self._kept is None

    def todo(self, store: Any) -> list[tuple[Job, str]] | None:
        """The jobs ``store`` has not done, with fingerprints, if this catalog can plan
        by digest against it; None: plan job by job."""
        if self._plan is None:
            return None
        return self._plan(store)

    def __len__(self) -> int:
        return self._count

    def id_digests(self) -> np.ndarray | None:
        """Per job (by index), the digest of its id, for a streamed catalog."""
        return self._ids

    def fp_digests(self) -> np.ndarray | None:
        """Per job (by index), the digest of its fingerprint if the load computed it (else 0)."""
        return self._fps


    def __iter__(self) -> Iterator[Job]:
        if self._kept is not None:
            return iter(self._kept)
        assert self._replay is not None
        return self._replay()

    @overload
    def __getitem__(self, index: int) -> Job: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Job]: ...

    def __getitem__(self, index: int | slice) -> Job | Sequence[Job]:
        if self._kept is not None:
            return self._kept[index]
        if isinstance(index, slice):  # a pass over the file
            return list(self)[index]
        position = index + self._count if index < 0 else index
        if not 0 <= position < self._count:
            raise IndexError(index)
        for n, job in enumerate(self):
            if n == position:
                return job
        raise IndexError(index)


def summarize(jobs: ManifestJobs) -> dict[str, Any]:
    """A plan for `imgbatch validate`: job counts by size/ratio and model, input images."""
    shapes = jobs.shapes
    pairs: Counter[tuple[str, str]] = Counter()
    models: Counter[str] = Counter()
    for job, n in shapes.weighted():
        pairs[(job.image_size, job.aspect_ratio)] += n
        models[job.model] += n
    by_size: dict[str, dict[str, int]] = {}
    for size, ratio in sorted(pairs, key=lambda p: (_rank(IMAGE_SIZES, p[0]),
                                                   _rank(ASPECT_RATIOS, p[1]))):
        by_size.setdefault(size, {})[ratio] = pairs[(size, ratio)]
    return {
        "jobs": len(jobs),
        "by_size_and_ratio": by_size,
        "by_model": dict(sorted(models.items())),
        "input_images": shapes.input_kinds(),
        # bytes sent over the whole run: a file used by 10 jobs counts 10 times
        "input_image_bytes": shapes.input_bytes(),
    }


def _rank(order: tuple[str, ...], value: str) -> int:
    return order.index(value) if value in order else len(order)
