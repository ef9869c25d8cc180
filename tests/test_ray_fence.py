"""Fencing: a shard writer of a dead driver never commits once a newer run holds the output.

The newer run is the real CLI in its own process (it takes the folder's lock
or the bucket's lease as any run does); the orphan is a shard writer opened
here with the old driver's fencing token, as a shard task of a SIGKILLed
driver would hold it. Before the take-over it commits; after, every write is
refused (NotRecorded) and nothing of it reaches the journal.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from batch.checkpoint import JobState
from batch.errors import NotRecorded
from batch.jobs import Status
from batch.runners.fence import Fence, FencedSegments, folder_token
from batch.runners.s3segments import lease_holder, open_shard
from batch.runners.segments import DriverCheckpoint, segment_files
from batch.storage.s3client import S3Location
from batch.storage.s3state import S3State
from tests.conftest import cli_env, run_args, run_cli, simulator
from tests.s3server import CREDENTIALS, S3Server
from tests.test_e2e import SCALE, catalog


def _state(job_id: str, attempts: int = 1) -> JobState:
    return JobState(job_id, "f", Status.PENDING, attempts)


def test_an_orphan_shard_cannot_commit_into_a_folder_a_newer_run_holds(tmp_path: Path) -> None:
    out = tmp_path / "out"
    driver = DriverCheckpoint.open(out)
    orphan = FencedSegments.open_fenced(out, "r.s1.a1", "s1", [], Fence(folder_token(out)))
    try:
        orphan.record(_state("before"), durable=True)  # the driver still holds the folder
        driver.close()  # SIGKILLed: the kernel drops its lock
        with simulator("--scale", SCALE, "--latency", "0.01") as sim:
            newer = run_cli(*run_args(catalog(1, tmp_path / "one.jsonl"), out, sim,
                                      "--no-gallery"))
        assert newer.returncode == 0, newer.stderr[-2000:]
        with pytest.raises(NotRecorded, match="newer run took over"):
            orphan.record(_state("after"), durable=True)
        with pytest.raises(NotRecorded, match="newer run took over"):
            orphan.commit_batch([_state("after", 2)], [])
        with pytest.raises(NotRecorded):  # a retry of the orphan's shard is refused at open
            FencedSegments.open_fenced(out, "r.s1.a2", "s1", [], orphan.fence)
    finally:
        orphan.close()
        driver.close()
    written = b"".join(p.read_bytes() for p in segment_files(out))
    assert b'"before"' in written and b'"after"' not in written


def test_an_orphan_shard_cannot_commit_into_a_bucket_a_newer_run_holds(
    moto: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    bucket = moto.bucket("ray-fence")
    url = f"s3://{bucket}/out"
    driver = S3State.open(S3Location.parse(url, moto.endpoint))
    fence = Fence(lease_holder(driver) or "")
    orphan = open_shard(url, moto.endpoint, "r.s1.a1", driver.gen, None, fence)
    try:
        orphan.record(_state("before"), durable=True)
        driver.close()  # (a SIGKILLed driver's lease expires instead: the same for the orphan)
        with pytest.raises(NotRecorded, match="newer run took over"):
            orphan.record(_state("released"), durable=True)  # a released lease fences too
        with simulator("--scale", SCALE, "--latency", "0.01") as sim:
            newer = run_cli("run", str(catalog(1, tmp_path / "one.jsonl")), "--output", url,
                            "--s3-endpoint", moto.endpoint, "--base-url", sim.url,
                            "--no-gallery", env=cli_env(**CREDENTIALS))
        assert newer.returncode == 0, newer.stderr[-2000:]
        with pytest.raises(NotRecorded, match="newer run took over"):
            orphan.commit_batch([_state("after", 2)], [])
    finally:
        orphan.close()
        driver.close()
    journal = b"".join(moto.read(bucket, key) for key in moto.objects(bucket, "out/.imgbatch")
                       if "/journal/" in key)
    assert b'"before"' in journal
    assert b'"released"' not in journal and b'"after"' not in journal
