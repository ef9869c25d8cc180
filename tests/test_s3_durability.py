"""Paid images survive the bucket failing, and a run that lost its lease deletes nothing.

On a real S3 server (moto), faults injected by :mod:`tests.s3proxy`; the
stores here are built without obstore's own retries, so a brownout of a few
requests is longer than the client's patience and the retries under test are
ours.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import obstore
import pytest

from batch.checkpoint import JobState, fingerprint
from batch.errors import NotRecorded, StorageError
from batch.jobs import Status
from batch.storage import s3client, s3lease
from batch.storage.s3client import S3Location
from batch.storage.s3state import S3State
from tests.s3proxy import FaultProxy, Faults
from tests.s3server import CREDENTIALS, S3Server
from tests.test_s3_state import a_job, png, stage, succeeded

FAST = (0.01, 0.01, 0.01)


@pytest.fixture
def faults() -> Faults:
    return Faults()


@pytest.fixture
def proxied(moto: S3Server, faults: Faults, monkeypatch: pytest.MonkeyPatch,
            request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[S3Location]:
    """An output reached through the fault proxy."""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bucket = moto.bucket(request.node.name.replace("_", "-")[:50].lower())
    with FaultProxy(moto.endpoint, faults) as proxy:
        yield S3Location.parse(f"s3://{bucket}/out", proxy.url)


def open_fast(location: S3Location, **kwargs: object) -> S3State:
    """An open whose object calls are not retried by obstore, and ours without delays."""
    store = S3State.open(location, store=s3client.open_store(location, max_retries=0),
                         **kwargs)  # type: ignore[arg-type]
    store.sink.retry_delays_s = FAST
    store.put_retry_delays_s = FAST
    return store


def test_an_upload_failing_past_the_client_retries_is_sent_again_from_the_spool(
    proxied: S3Location, faults: Faults, moto: S3Server
) -> None:
    store = open_fast(proxied)
    try:
        staged = stage(store, a_job(1), png(1))
        assert staged.spool is not None
        faults.brownout["/.imgbatch/staging/"] = 2
        (uploaded,) = asyncio.run(store.sink.prepare([staged]))
        assert faults.seen["503/.imgbatch/staging/"] == 2
        assert moto.read(proxied.bucket, proxied.key(uploaded.tmp_rel)) == png(1)
        assert not staged.spool.exists()
    finally:
        store.close()


def test_an_upload_that_keeps_failing_keeps_the_paid_image(
    proxied: S3Location, faults: Faults, moto: S3Server, tmp_path: Path
) -> None:
    store = open_fast(proxied)
    try:
        first = stage(store, a_job(2), png(2))
        writer = store.sink.open("job-2", 1, max_pixels=1 << 24)
        writer.write(png(3))
        second = writer.finish()
        # One image of the answer goes up, the other never does.
        faults.brownout[first.tmp_rel.rsplit("/", 1)[-1]] = 10**6
        with pytest.raises(StorageError, match="kept in"):
            asyncio.run(store.sink.prepare([first, second]))
    finally:
        store.close()  # deletes the spool folder
    kept = sorted((tmp_path / "cache" / "imgbatch" / "unuploaded").rglob("*.png"))
    assert sorted(p.read_bytes() for p in kept) == sorted([png(2), png(3)])
    # The half that did go up is not left as a stray.
    assert not [k for k in moto.objects(proxied.bucket, "out") if "/staging/" in k]


def test_an_uploaded_image_that_cannot_be_recorded_is_kept(
    location: S3Location, moto: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    store = S3State.open(location)
    job = a_job(6)
    (uploaded,) = asyncio.run(store.sink.prepare([stage(store, job, png(6))]))
    assert store._lease is not None
    store._lease.lost.set()
    with pytest.raises(NotRecorded):
        store.commit_batch([succeeded(store, job, uploaded)], [uploaded])
    store.sink.discard(uploaded)  # what the engine does with what is not recorded
    store.close()
    (kept,) = (tmp_path / "cache" / "imgbatch" / "unuploaded").rglob("*.png")
    assert kept.read_bytes() == png(6)
    assert not [k for k in moto.objects(location.bucket, "out") if "/staging/" in k]


def test_a_segment_write_failing_past_the_client_retries_is_written_again(
    proxied: S3Location, faults: Faults, moto: S3Server
) -> None:
    store = open_fast(proxied)
    job = a_job(3)
    try:
        (uploaded,) = asyncio.run(store.sink.prepare([stage(store, job, png(3))]))
        faults.brownout["/.imgbatch/journal/"] = 2
        store.commit_batch([succeeded(store, job, uploaded)], [uploaded])
        assert faults.seen["503/.imgbatch/journal/"] == 2
    finally:
        store.close()
    again = S3State.read(proxied)
    try:
        assert again.is_done(job, fingerprint(job), verify=True)
    finally:
        again.close()


def test_a_store_whose_lease_was_taken_deletes_nothing(
    location: S3Location, moto: S3Server
) -> None:
    store = S3State.open(location)
    # Another run took the lease over (this one has not renewed since) and staged an image.
    obstore.put(moto.store(location.bucket), location.key(s3lease.LEASE),
                b'{"holder": "thief", "host": "elsewhere", "pid": 1, "expires_at": 1e12}')
    theirs = location.key(".imgbatch/staging/g00000002-main/job-1~0.1")
    obstore.put(moto.store(location.bucket), theirs, png(1))
    with pytest.raises(NotRecorded, match="taken over"):
        store._recover()  # what an open does after loading
    store._lease.lost.clear()  # type: ignore[union-attr]  (as if not noticed yet)
    with pytest.raises(NotRecorded, match="taken over"):
        store.refresh()
    store.close()
    assert moto.read(location.bucket, theirs) == png(1)
    assert b"thief" in moto.read(location.bucket, location.key(s3lease.LEASE))


def test_a_lease_that_cannot_be_renewed_stops_writes_before_it_expires(
    proxied: S3Location, faults: Faults, moto: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3lease, "TTL_S", 1.5)
    store = open_fast(proxied)
    lease = store._lease
    assert lease is not None
    store.record(JobState("job-1", "fp", Status.FAILED, 1), durable=True)
    faults.brownout["/.imgbatch/lease"] = 10**6  # every renewal fails from now on
    deadline = time.monotonic() + 30
    while lease.valid() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not lease.valid() and not lease.lost.is_set()
    with pytest.raises(NotRecorded, match="renewed in time"):
        store.record(JobState("job-2", "fp", Status.FAILED, 1), durable=True)
    with pytest.raises(NotRecorded):
        store._delete(".imgbatch/journal/anything")
    started = time.monotonic()
    store.close()
    assert time.monotonic() - started < 1.5  # no wait on a renewal stuck in a brownout
    journal = moto.objects(proxied.bucket, "out/.imgbatch/journal")
    assert len(journal) == 1, journal


def test_a_shard_retry_publishes_what_its_dead_attempt_recorded(
    location: S3Location, moto: S3Server
) -> None:
    driver = S3State.open(location)
    job = a_job(4)
    first = S3State.open(location, writer="run.s0.a1", shard_of=driver.gen)
    (uploaded,) = asyncio.run(first.sink.prepare([stage(first, job, png(4))]))
    first._flush(succeeded(first, job, uploaded).to_line())  # recorded; dies before the copy
    first.close()
    final = location.key(uploaded.final_rel)
    assert final not in moto.objects(location.bucket, "out")
    retry = S3State.open(location, writer="run.s0.a2", shard_of=driver.gen)
    try:
        assert retry.is_done(job, fingerprint(job))
        assert hashlib.sha256(moto.read(location.bucket, final)).hexdigest() == \
            hashlib.sha256(png(4)).hexdigest()
        # A shard deletes nothing: the driver's refresh does, under the lease.
        assert location.key(uploaded.tmp_rel) in moto.objects(location.bucket, "out")
    finally:
        retry.close()
    driver.refresh()
    assert driver.is_done(job, fingerprint(job), verify=True)
    driver.close()
    assert not [k for k in moto.objects(location.bucket, "out") if "/staging/" in k]


def test_a_dead_attempts_segment_sorting_last_does_not_undo_its_retry(
    location: S3Location, moto: S3Server
) -> None:
    driver = S3State.open(location)
    # The retry ("a1" by its node's clock) counted the dead attempt's request; the dead
    # attempt's segment ("a2": its node's clock runs ahead) sorts after it.
    for writer, states in [
        ("run.s0.a1", [JobState("job-5", "fp", Status.PENDING, 2),
                       JobState("job-5", "fp", Status.FAILED, 2, error={"type": "refused"})]),
        ("run.s0.a2", [JobState("job-5", "fp", Status.PENDING, 1)]),
    ]:
        shard = S3State.open(location, writer=writer, shard_of=driver.gen)
        shard._flush(b"".join(state.to_line() for state in states))
        shard.close()
    driver.close()
    reader = S3State.read(location)
    try:
        state = reader.states["job-5"]
        assert (state.status, state.attempts) == (Status.FAILED, 2)
    finally:
        reader.close()


@pytest.fixture
def location(moto: S3Server, monkeypatch: pytest.MonkeyPatch,
             request: pytest.FixtureRequest) -> S3Location:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    bucket = moto.bucket(request.node.name.replace("_", "-")[:50].lower())
    return S3Location.parse(f"s3://{bucket}/out", moto.endpoint)
