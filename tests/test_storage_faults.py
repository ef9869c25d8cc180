"""Storage faults injected into every write, fsync, rename and directory fsync of the store.

The store touches the disk only through :mod:`batch.fsops`; :class:`FaultyDisk`
replaces those functions for the length of a ``with`` block, failing the Nth
call of one kind on one target (the journal, the image temporaries, the
images folder, results.jsonl, summary.json) with ENOSPC or EIO, or writing
short. The randomized test runs the real ``imgbatch run`` (``batch.cli.main``,
in-process) with a scripted provider instead of the HTTP client, injects a
fault, opens the folder again, re-runs, and judges the result with oracles
of its own: the bytes the provider really sent (hashed here), Pillow
decoding each final file, and the journal parsed here line by line, never
the store's own ``intact``/``probe``.

``IMGBATCH_SOAK_EXAMPLES=20000 .venv/bin/pytest -q -p no:randomly
tests/test_storage_faults.py -k randomized`` runs far more schedules than
the default 300.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import batch.cli
from batch import fsops
from batch.checkpoint import Checkpoint, JobState
from batch.cli import EXIT_INCOMPLETE, EXIT_OK
from batch.errors import MalformedResponse, NotRecorded, RejectedError, StorageError
from batch.images import StagedImage
from batch.jobs import Job, Status
from batch.providers import registry
from batch.providers.base import Generation
from batch.storage.base import ImageSink, ImageStream

SOAK = int(os.environ.get("IMGBATCH_SOAK_EXAMPLES", "0"))
EXAMPLES = SOAK or 300
KEY_ENV = "IMGBATCH_FAULT_TEST_KEY"

# == the fault layer ======================================================================


@dataclass(frozen=True)
class Fault:
    """Fail call number ``nth`` (0-based) of ``kind`` on ``target`` with ``err``.

    ``err`` 0 means a short write instead: that call writes half of what it
    was given, which is not an error, and the caller must carry on.
    """

    kind: str  # write, fsync, replace, fsync_dir, ftruncate, open, unlink
    target: str  # journal, image, images_dir, results, summary, other
    nth: int
    err: int = errno.ENOSPC


def target_of(path: str) -> str:
    """Which file of the output folder ``path`` is, by its name."""
    name = os.path.basename(path.rstrip("/"))
    if name.startswith("journal."):
        return "journal"
    if name == "images":
        return "images_dir"
    if name == ".imgbatch":
        return "state_dir"
    if os.path.basename(os.path.dirname(path)) == "images":
        return "image"
    if name.startswith((".results.jsonl", "results.jsonl")):
        return "results"
    if name.startswith((".summary.json", "summary.json")):
        return "summary"
    return "other"


def fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


class FaultyDisk:
    """Replaces the functions of :mod:`batch.fsops` with ones that fail on schedule.

    Thread-safe: the journal is written from the event loop and a worker thread.
    ``fired`` lists the faults that happened; ``before_fault`` (if set) runs
    just before a fault is raised, on the thread that hits it.
    """

    def __init__(self, faults: list[Fault]) -> None:
        self.faults = faults
        self.calls: Counter[tuple[str, str]] = Counter()
        self.fired: list[Fault] = []
        self.before_fault: Callable[[Fault], None] | None = None
        self._lock = threading.Lock()

    def _due(self, kind: str, path: str) -> Fault | None:
        target = target_of(path)
        with self._lock:
            n = self.calls[kind, target]
            self.calls[kind, target] += 1
            for fault in self.faults:
                if (fault.kind, fault.target, fault.nth) == (kind, target, n):
                    self.fired.append(fault)
                    return fault
        return None

    def _fail(self, fault: Fault) -> None:
        if self.before_fault is not None:
            self.before_fault(fault)
        raise OSError(fault.err, os.strerror(fault.err))

    @contextlib.contextmanager
    def installed(self) -> Iterator[FaultyDisk]:
        real = {name: getattr(fsops, name) for name in
                ("open_fd", "write", "fsync", "fsync_dir", "replace", "unlink", "ftruncate")}

        def by_path(kind: str) -> Callable[..., Any]:
            def call(path: Any, *args: Any) -> Any:
                fault = self._due(kind, str(path))
                if fault is not None:
                    self._fail(fault)
                return real[kind](path, *args)

            return call

        def by_fd(kind: str) -> Callable[..., Any]:
            def call(fd: int, *args: Any) -> Any:
                fault = self._due(kind, fd_path(fd))
                if fault is not None:
                    self._fail(fault)
                return real[kind](fd, *args)

            return call

        def write(fd: int, data: bytes | memoryview) -> int:
            fault = self._due("write", fd_path(fd))
            if fault is not None and fault.err == 0 and len(data) > 1:
                return int(real["write"](fd, data[: len(data) // 2]))
            if fault is not None and fault.err:
                self._fail(fault)
            return int(real["write"](fd, data))

        patched = {
            "open_fd": by_path("open_fd"),
            "write": write,
            "fsync": by_fd("fsync"),
            "fsync_dir": by_path("fsync_dir"),
            "replace": by_path("replace"),
            "unlink": by_path("unlink"),
            "ftruncate": by_fd("ftruncate"),
        }
        with pytest.MonkeyPatch.context() as mp:
            for name, function in patched.items():
                mp.setattr(fsops, name, function)
            yield self


# == a scripted provider ==================================================================


def png(seed: str) -> bytes:
    """A small PNG whose pixels depend on ``seed``: every image sent is distinct."""
    digest = hashlib.sha256(seed.encode()).digest()
    side = 4 + digest[0] % 12
    image = Image.new("RGB", (side, side + digest[1] % 5), tuple(digest[2:5]))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Scripted:
    """Answers each job from a script: ``ok1``/``ok2`` (images), ``rejected``, ``broken``.

    ``broken`` streams half an image, then fails like a truncated body.
    Jobs without a script succeed with one image. ``sent`` holds the sha256
    of every image this provider handed over, by job id: what was paid for.
    """

    scripts: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    sent: dict[str, set[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    async def _yield(self) -> None:
        for _ in range(self._rng.randrange(3)):
            await asyncio.sleep(0)  # interleave jobs differently for each seed

    async def generate(self, job: Job, sink: ImageSink) -> Generation:
        self.requests[job.id] += 1
        attempt = self.requests[job.id]
        script = self.scripts.get(job.id, "ok1")
        await self._yield()
        if script == "rejected":
            raise RejectedError("refused by the script", job_id=job.id, http_status=400)
        count = 2 if script == "ok2" else 1
        writers: list[ImageStream] = []
        staged: list[StagedImage] = []
        try:
            for index in range(count):
                data = png(f"{job.id}/{attempt}/{index}/{self.seed}")
                writer = sink.open(job.id, index, max_pixels=1 << 20)
                writers.append(writer)
                half = len(data) // 2
                writer.write(data[:half])
                await self._yield()
                if script == "broken":
                    raise MalformedResponse("the body ended early", job_id=job.id)
                writer.write(data[half:])
                staged.append(writer.finish())
                self.sent.setdefault(job.id, set()).add(hashlib.sha256(data).hexdigest())
        except BaseException:
            for writer in writers:
                writer.abort()
            for image in staged:
                sink.discard(image)
            raise
        return Generation(images=tuple(staged), usage=None, text="", latency_s=0.01)

    async def close(self) -> None:
        pass


# == running and judging ==================================================================


def manifest(folder: Path, jobs: int) -> Path:
    path = folder / "m.jsonl"
    path.write_text("".join(
        json.dumps({"id": f"j{i}", "prompt": f"picture {i}"}) + "\n" for i in range(jobs)
    ))
    return path


@contextlib.contextmanager
def quiet_logging() -> Iterator[None]:
    """``main`` points the root logger at stderr; give pytest its handlers back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def run(
    folder: Path, out: Path, provider: Scripted, concurrency: int, verify: str = "decode"
) -> int:
    """``imgbatch run`` in this process, with ``provider`` in place of the HTTP client."""
    argv = ["run", str(folder / "m.jsonl"), "--output", str(out), "--api-key-env", KEY_ENV,
            "--base-url", "http://127.0.0.1:9/v1", "--concurrency", str(concurrency),
            "--max-attempts", "1", "--no-gallery", "--quiet", "--verify", verify]
    with pytest.MonkeyPatch.context() as mp, quiet_logging():
        mp.setenv(KEY_ENV, "sk-test")
        mp.setattr(registry, "build", lambda name, config: provider)
        return batch.cli.main(argv)


def journal_states(out: Path) -> dict[str, dict[str, Any]]:
    """The last record of every job id, parsed here: each complete line must be JSON."""
    path = out / ".imgbatch" / "journal.jsonl"
    if not path.exists():
        return {}
    states: dict[str, dict[str, Any]] = {}
    for line in path.read_bytes().splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break  # a torn last line is allowed (a crash); nothing may follow it
        record = json.loads(line)
        if "run" not in record:
            states[record["id"]] = record
    return states


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def decodes(path: Path) -> None:
    with Image.open(path) as image:
        image.load()


def job_of(name: str) -> str:
    return name.split(".", 1)[0].split("~", 1)[0]


def check_folder(out: Path, sent: dict[str, set[str]]) -> dict[str, dict[str, Any]]:
    """After an open: every recorded image is in place, and every final file is recorded.

    Returns the succeeded records.
    """
    succeeded = {i: s for i, s in journal_states(out).items() if s["status"] == "succeeded"}
    recorded: dict[str, str] = {}
    for job_id, state in succeeded.items():
        for image in state["images"]:
            path = out / image["path"]
            assert path.is_file(), f"{job_id}: recorded image {image['path']} is missing"
            assert sha_of(path) == image["sha256"], f"{job_id}: {image['path']} is not as recorded"
            assert image["sha256"] in sent.get(job_id, ()), f"{job_id}: not what was sent for it"
            recorded[image["path"]] = image["sha256"]
    images = out / "images"
    for path in images.iterdir() if images.is_dir() else []:
        assert not path.name.endswith(".tmp"), f"temporary {path.name} left after the open"
        decodes(path)
        rel = f"images/{path.name}"
        assert recorded.get(rel) == sha_of(path), f"{rel} is under a final name, not recorded"
    leftovers = [p.name for p in [*out.iterdir(), *(out / ".imgbatch").iterdir()]
                 if p.name.endswith(".tmp")]
    assert leftovers == []
    return succeeded


def check_results(out: Path, jobs: int) -> None:
    """results.jsonl, when written, claims only what is on disk."""
    path = out / "results.jsonl"
    if not path.exists():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"j{i}" for i in range(jobs)]
    for row in rows:
        for image in row["images"]:
            assert sha_of(out / image["path"]) == image["sha256"], row


# (kind, target) pairs the store really performs during a run.
CALLS = [
    ("write", "journal"), ("fsync", "journal"),
    ("write", "image"), ("fsync", "image"), ("replace", "image"), ("open_fd", "image"),
    ("fsync_dir", "images_dir"),
    ("write", "results"), ("fsync", "results"), ("replace", "results"),
    ("write", "summary"), ("fsync", "summary"), ("replace", "summary"),
]
# A journal write that writes half, then fails, and whose cut-off fails too: a torn record.
TORN = ("ftruncate", "journal")
# The randomized runs check images by structure: spawning the decode child is ~85% of
# an example's time with --verify decode, and no fault reaches it (it reads in its own
# process, not through fsops). The oracles here decode every final file with Pillow and
# hash it against what was sent; the one-at-a-time tests below keep the default.
RANDOM_VERIFY = "structure"


@st.composite
def torn_journal(draw: st.DrawFn) -> list[Fault]:
    nth = draw(st.integers(0, 8))
    return [Fault("write", "journal", nth, 0), Fault("write", "journal", nth + 1, errno.ENOSPC),
            Fault("ftruncate", "journal", 0, errno.EIO)]


@st.composite
def faults(draw: st.DrawFn, call: tuple[str, str] | None = None) -> Fault:
    kind, target = call or draw(st.sampled_from(CALLS))
    # results.jsonl and summary.json see one call of each kind a run; the others more.
    nth = 0 if target in ("results", "summary") else draw(
        st.one_of(st.integers(0, 2), st.integers(0, 8))
    )
    errors = [errno.ENOSPC, errno.EIO] + ([0] if kind == "write" else [])  # 0: short write
    return Fault(kind, target, nth, draw(st.sampled_from(errors)))


@pytest.mark.timeout(0 if SOAK else 120)
@pytest.mark.parametrize("call", [*CALLS, TORN], ids="-".join)
@settings(
    max_examples=max(10, EXAMPLES // (len(CALLS) + 1)),
    deadline=None,
    derandomize=not SOAK,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    jobs=st.integers(1, 6),
    scripts=st.lists(st.sampled_from(["ok1", "ok1", "ok1", "ok2", "ok2", "rejected", "broken"]),
                     min_size=6, max_size=6),
    data=st.data(),
    concurrency=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_randomized_storage_faults_lose_nothing_recorded_and_pay_once(
    tmp_path_factory: pytest.TempPathFactory,
    call: tuple[str, str],
    jobs: int,
    scripts: list[str],
    data: st.DataObject,
    concurrency: int,
    seed: int,
) -> None:
    """One fault at ``call`` (each kind of call gets its share of examples), maybe another."""
    first_fault = data.draw(torn_journal()) if call == TORN else [data.draw(faults(call))]
    injected = [*first_fault, *data.draw(st.lists(faults(), max_size=1))]
    folder = tmp_path_factory.mktemp("faults")
    out = folder / "out"
    manifest(folder, jobs)
    first = Scripted({f"j{i}": scripts[i] for i in range(jobs)}, seed=seed)
    disk = FaultyDisk(injected)
    with disk.installed():
        code = run(folder, out, first, concurrency, RANDOM_VERIFY)
    errors = {f.target for f in disk.fired if f.err}
    # EXIT_INCOMPLETE: stopped by the storage error, or some job failed.
    assert code in (EXIT_OK, EXIT_INCOMPLETE)
    if errors & {"image", "images_dir", "results"}:
        assert code == EXIT_INCOMPLETE  # (a failed "end" record or summary.json is only logged)
    if code == EXIT_OK:
        states = journal_states(out)
        assert all(states.get(f"j{i}", {}).get("status") == "succeeded" for i in range(jobs))
    check_results(out, jobs)

    Checkpoint.open(out).close()  # the next open: finishes renames, drops strays
    recorded = check_folder(out, first.sent)
    assert all(first.requests[j] == 1 for j in first.requests)

    second = Scripted(seed=seed + 1)
    assert run(folder, out, second, concurrency, RANDOM_VERIFY) == EXIT_OK
    # The re-run pays for exactly what was not recorded as done.
    assert set(second.requests) == {f"j{i}" for i in range(jobs)} - set(recorded)
    assert all(n == 1 for n in second.requests.values())
    sent = {j: first.sent.get(j, set()) | second.sent.get(j, set()) for j in
            {*first.sent, *second.sent}}
    done = check_folder(out, sent)
    assert set(done) == {f"j{i}" for i in range(jobs)}
    for job_id in recorded:
        assert done[job_id]["images"] == recorded[job_id]["images"]  # kept, not redone
    check_results(out, jobs)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["status"] for r in rows} == {"succeeded"}


# == the paths one at a time ==============================================================


def test_a_failed_rename_keeps_the_recorded_image_for_the_next_open(tmp_path: Path) -> None:
    """The journal holds the success before the rename: the image must outlive the failure."""
    out = tmp_path / "out"
    manifest(tmp_path, 3)
    first = Scripted()
    with FaultyDisk([Fault("replace", "image", 0, errno.EIO)]).installed():
        assert run(tmp_path, out, first, 1) == EXIT_INCOMPLETE  # the storage error stops it
    recorded = journal_states(out)["j0"]
    assert recorded["status"] == "succeeded"
    image = recorded["images"][0]
    assert not (out / image["path"]).exists()
    assert sha_of(out / image["tmp"]) == image["sha256"]  # kept under its temporary name
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert rows[0]["status"] == "pending" and rows[0]["images"] == []  # not on disk yet

    # An open whose rename fails again removes nothing, and says so.
    with FaultyDisk([Fault("replace", "image", 0, errno.EIO)]).installed(), \
            pytest.raises(StorageError, match="cannot rename the recorded image"):
        Checkpoint.open(out)
    assert (out / image["tmp"]).exists()

    second = Scripted(seed=1)
    assert run(tmp_path, out, second, 1) == EXIT_OK
    assert "j0" not in second.requests  # published by the open, not paid again
    assert sha_of(out / image["path"]) == image["sha256"]
    decodes(out / image["path"])
    check_folder(out, {j: first.sent.get(j, set()) | second.sent.get(j, set())
                       for j in ("j0", "j1", "j2")})


def test_a_failed_attempt_record_never_cuts_what_the_other_thread_committed(
    tmp_path: Path,
) -> None:
    """One writer: the event loop's append fails while a worker thread commits a success.

    With two writers the commit lands between the failing append's fstat and
    its ftruncate, and is cut off after it was acknowledged.
    """
    root = tmp_path / "out"
    root.mkdir()
    store = Checkpoint.open(root)
    job = Job(id="tried", prompt="p", model="m", aspect_ratio="1:1", image_size="1K")
    done = threading.Event()
    outcome: list[object] = []

    def commit() -> None:
        try:
            store.commit_batch([JobState("other", "f" * 64, Status.SUCCEEDED, 1)], [])
            outcome.append("committed")
        except StorageError as exc:
            outcome.append(exc)
        done.set()

    committer = threading.Thread(target=commit)

    def meanwhile(fault: Fault) -> None:
        committer.start()
        # One writer: the commit cannot finish while this append is failing, so
        # this wait runs out; with two writers it ends as soon as the commit did.
        done.wait(timeout=1.0)

    disk = FaultyDisk([Fault("write", "journal", 0, errno.ENOSPC)])
    disk.before_fault = meanwhile
    try:
        with disk.installed():
            with pytest.raises(NotRecorded):
                store.mark_attempt(job, "f" * 64)
            committer.join(timeout=30)
    finally:
        store.close()
    assert outcome == ["committed"]
    states = journal_states(root)
    assert states["other"]["status"] == "succeeded"  # acknowledged, so it must be there
    assert "tried" not in states


def long_journal(root: Path) -> dict[str, int]:
    """A journal of 1,200 lines for 10 jobs: the next open compacts it."""
    store = Checkpoint.open(root)
    try:
        for n in range(1200):
            store.record(JobState(f"job{n % 10}", "f" * 64, Status.PENDING, n), durable=False)
    finally:
        store.close()
    return {f"job{i}": 1190 + i for i in range(10)}


@pytest.mark.parametrize("fault", [
    Fault("open_fd", "journal", 1), Fault("write", "journal", 0), Fault("fsync", "journal", 0),
    Fault("replace", "journal", 0, errno.EIO), Fault("fsync_dir", "state_dir", 0, errno.EIO),
    Fault("write", "journal", 0, 0),
], ids=lambda f: f"{f.kind}-{f.err}")
def test_a_failed_compaction_keeps_every_record(tmp_path: Path, fault: Fault) -> None:
    root = tmp_path / "out"
    root.mkdir()
    attempts = long_journal(root)
    disk = FaultyDisk([fault])
    with disk.installed():
        try:
            Checkpoint.open(root).close()  # compacts, or keeps the long journal
        except StorageError:
            assert fault.kind == "fsync_dir"  # the rename done, its durability unknown
    assert disk.fired == [fault]
    assert {i: s["attempts"] for i, s in journal_states(root).items()} == attempts
    store = Checkpoint.open(root)
    store.close()
    assert {i: s.attempts for i, s in store.states.items()} == attempts
    assert len((root / ".imgbatch" / "journal.jsonl").read_bytes().splitlines()) <= 20
    assert [p.name for p in (root / ".imgbatch").iterdir() if p.suffix == ".tmp"] == []
