"""The s3:// state store through its own interface, on a real S3 server (moto)."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import obstore
import pytest

from batch.checkpoint import FileMeta, JobState, fingerprint
from batch.errors import MalformedResponse
from batch.images import StagedImage
from batch.jobs import DEFAULT_MODEL, ImageRecord, Job, Status
from batch.sim.images import PngMaker
from batch.storage.s3client import S3Location
from batch.storage.s3state import COMPACT_AFTER, S3State
from tests.s3server import CREDENTIALS, S3Server


@pytest.fixture
def location(moto: S3Server, monkeypatch: pytest.MonkeyPatch,
             request: pytest.FixtureRequest) -> S3Location:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    bucket = moto.bucket(request.node.name.replace("_", "-")[:50].lower())
    return S3Location.parse(f"s3://{bucket}/out", moto.endpoint)


def a_job(n: int) -> Job:
    return Job(f"job-{n}", f"prompt {n}", DEFAULT_MODEL, "1:1", "1K")


def stage(store: S3State, job: Job, data: bytes) -> StagedImage:
    writer = store.sink.open(job.id, 0, max_pixels=1 << 24)
    writer.write(data)
    return writer.finish()


def succeeded(store: S3State, job: Job, staged: StagedImage) -> JobState:
    record = ImageRecord(path=staged.final_rel, sha256=staged.sha256, bytes=staged.bytes,
                         mime=staged.info.mime, width=staged.info.width,
                         height=staged.info.height)
    return JobState(job.id, fingerprint(job), Status.SUCCEEDED, store.attempts(job.id),
                    images=(record,), image_meta=(FileMeta(staged.tmp_rel, None),))


def png(n: int) -> bytes:
    return PngMaker(0).png(8, 8, bytes([n, 2 * n, 3]), f"image {n}".encode())


def test_states_survive_compaction(location: S3Location, moto: S3Server) -> None:
    store = S3State.open(location)
    for n in range(COMPACT_AFTER + 5):
        store.record(JobState(f"job-{n}", "fp", Status.FAILED, n + 1), durable=True)
    store.record_run("start", jobs=1)
    store.close()
    again = S3State.open(location)  # compacts: over COMPACT_AFTER segments
    again.close()
    keys = [k for k in moto.objects(location.bucket, "out/.imgbatch/journal")]
    assert len(keys) == 1 and keys[0].endswith("-a-snapshot.jsonl"), keys
    final = S3State.read(location)
    try:
        assert {s.id: s.attempts for s in final.states.values()} == {
            f"job-{n}": n + 1 for n in range(COMPACT_AFTER + 5)}
        assert [r["run"] for r in final.runs] == ["start"]
    finally:
        final.close()


def test_a_recorded_image_left_in_staging_is_published_by_the_next_open(
    location: S3Location, moto: S3Server
) -> None:
    job = a_job(1)
    data = png(1)
    store = S3State.open(location)
    staged = stage(store, job, data)
    (uploaded,) = asyncio.run(store.sink.prepare([staged]))
    state = succeeded(store, job, uploaded)
    # A crash between the record and the copy: the record is written, the copy never is.
    store._flush(state.to_line())
    store.close()
    assert f"out/{uploaded.final_rel}" not in moto.objects(location.bucket, "out")
    again = S3State.open(location)
    try:
        assert again.is_done(job, fingerprint(job), verify=True)
    finally:
        again.close()
    objects = moto.objects(location.bucket, "out")
    assert hashlib.sha256(moto.read(location.bucket, f"out/{uploaded.final_rel}")).hexdigest() \
        == hashlib.sha256(data).hexdigest()
    assert not [k for k in objects if "/staging/" in k]


def test_an_unrecorded_staged_image_is_dropped(location: S3Location, moto: S3Server) -> None:
    store = S3State.open(location)
    staged = stage(store, a_job(2), png(2))
    asyncio.run(store.sink.prepare([staged]))
    store.close()  # never recorded: a stray
    S3State.open(location).close()
    assert [k for k in moto.objects(location.bucket, "out") if "/images/" in k
            or "/staging/" in k] == []


def test_a_broken_answer_leaves_nothing(location: S3Location, moto: S3Server,
                                        tmp_path: Path) -> None:
    store = S3State.open(location)
    try:
        writer = store.sink.open("job-3", 0, max_pixels=1 << 24)
        with pytest.raises(MalformedResponse):
            writer.write(b"\x89PNG\r\n\x1a\n" + b"not a chunk stream at all" * 10)
            writer.finish()
        writer.abort()
        assert not list((store.root / ".spool" / "images").iterdir())
    finally:
        store.close()
    assert [k for k in moto.objects(location.bucket, "out") if "/images/" in k
            or "/staging/" in k] == []


def test_a_changed_object_is_not_done_under_verify(location: S3Location,
                                                   moto: S3Server) -> None:
    job = a_job(4)
    store = S3State.open(location)
    staged = stage(store, job, png(4))
    (uploaded,) = asyncio.run(store.sink.prepare([staged]))
    store.commit_batch([succeeded(store, job, uploaded)], [uploaded])
    store.close()
    key = location.key(uploaded.final_rel)
    original = moto.read(location.bucket, key)
    obstore.put(moto.store(location.bucket), key, original[:-1] + b"\x00")  # same size
    reader = S3State.read(location)
    try:
        assert reader.is_done(job, fingerprint(job))  # size only: cheap
        assert not reader.is_done(job, fingerprint(job), verify=True)
    finally:
        reader.close()


def test_a_lease_taken_over_stops_every_write(location: S3Location, moto: S3Server) -> None:
    from batch.errors import NotRecorded
    from batch.storage.s3lease import LEASE, Lease

    store = S3State.open(location)
    assert store._lease is not None
    store._lease.release()
    short = Lease(store._store, location.key(LEASE), location.url, ttl_s=0.3)
    short.acquire()
    store._lease = short
    obstore.put(moto.store(location.bucket), location.key(LEASE), b'{"holder": "thief"}')
    assert short.lost.wait(30)  # its next renewal finds someone else's etag
    with pytest.raises(NotRecorded):
        store.record(JobState("job-9", "fp", Status.FAILED, 1), durable=True)
    store.close()
    assert moto.read(location.bucket, location.key(LEASE)) == b'{"holder": "thief"}'
