"""Server-side faults between the run and the bucket: 503 SlowDown, a reset mid-part, a 412.

The real CLI writes into moto through :mod:`tests.s3proxy`, while the
simulator answers with images big enough (6 MB) to go up in two parts.
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import cli_env, run_cli, simulator
from tests.s3proxy import FaultProxy, Faults
from tests.s3server import S3Server
from tests.test_e2e import catalog
from tests.test_s3_crash import bucket_journal
from tests.test_s3_e2e import check_bucket


def test_slowdown_resets_and_false_412s_still_end_with_every_image(
    tmp_path: Path, moto: S3Server
) -> None:
    bucket = moto.bucket("faults")
    manifest = catalog(6, tmp_path / "f.jsonl")
    faults = Faults(slowdown=0.15, reset_parts=2,
                    precondition={"/.imgbatch/journal/": 3, "/images/": 2}, seed=4)
    with (simulator("--scale", "0.0625", "--payload-bytes", "6000000", "--seed", "4") as sim,
          FaultProxy(moto.endpoint, faults) as proxy):
        done = run_cli("run", str(manifest), "--output", f"s3://{bucket}/p", "--s3-endpoint",
                       proxy.url, "--base-url", sim.url, "--concurrency", "3",
                       env=cli_env(**moto.env()), timeout=300)
        requests = sim.stats()["requests"]
    assert done.returncode == 0, done.stderr
    # Every fault really happened, and none cost a request to the image API.
    assert faults.seen["slowdown"] >= 3, faults.seen
    assert faults.seen["reset"] == 2, faults.seen
    assert faults.seen["412/.imgbatch/journal/"] == 3, faults.seen
    assert faults.seen["412/images/"] == 2, faults.seen
    assert requests == 6
    check_bucket(moto, bucket, "p", 6)
    # What the next run will read: a segment refused with a false 412 was written again.
    states = bucket_journal(moto, bucket, "p")
    assert sorted(s["status"] for s in states.values()) == ["succeeded"] * 6
    sizes = [size for key, size in moto.objects(bucket, "p/images").items()]
    assert min(sizes) > 5 * 1024 * 1024  # multipart: the resets hit real parts
