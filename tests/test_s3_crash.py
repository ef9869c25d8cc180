"""kill -9 during uploads into s3://, many times, then resume: the local promises, in a bucket.

After every kill: every job the journal segments call succeeded has its image
in the bucket byte for byte (under its final key, or under the staging key
the record names, which the next open publishes), and every object under a
final key is one of those. At the end: every job succeeded, every object
matches its recorded sha256, no staging key, no multipart upload in
progress, and requests <= jobs + what was in flight at each kill. The judges
are hashes and Pillow here, the segments read as JSON lines, and moto's own
listings; never the store's code.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from PIL import Image

from tests.conftest import ROOT, cli_env, imgbatch_argv, run_cli, simulator
from tests.s3server import S3Server
from tests.test_e2e import catalog
from tests.test_s3_e2e import check_bucket, results

JOBS = int(os.environ.get("IMGBATCH_S3_CRASH_JOBS", "40"))
KILLS = int(os.environ.get("IMGBATCH_S3_CRASH_KILLS", "3"))
CONCURRENCY = 6
_NAME = re.compile(r"g(\d{8})-(a-snapshot|w-.+)\.jsonl$")


def bucket_journal(server: S3Server, bucket: str, prefix: str) -> dict[str, dict[str, Any]]:
    """The last state of each job, from the segments in name order after the last snapshot."""
    keys = sorted(k for k in server.objects(bucket, f"{prefix}/.imgbatch/journal"))
    named = [(k, _NAME.search(k)) for k in keys]
    floor = max((int(m.group(1)) for _, m in named if m and m.group(2) == "a-snapshot"),
                default=0)
    states: dict[str, dict[str, Any]] = {}
    for key, match in named:
        assert match, f"unexpected object {key}"
        if int(match.group(1)) < floor:
            continue
        for line in server.read(bucket, key).splitlines():
            record = json.loads(line)  # segments are whole objects: never a torn line
            if "run" not in record:
                states[record["id"]] = record
    return states


def check_recorded(server: S3Server, bucket: str, prefix: str) -> int:
    """Every recorded success is in the bucket, intact; every final object is recorded."""
    objects = server.objects(bucket, prefix)
    recorded: set[str] = set()
    count = 0
    for job_id, state in bucket_journal(server, bucket, prefix).items():
        if state["status"] != "succeeded":
            continue
        for image in state["images"]:
            keys = [f"{prefix}/{image['path']}"]
            if image.get("tmp"):
                keys.append(f"{prefix}/{image['tmp']}")
            found = [k for k in keys if k in objects
                     and server.sha256(bucket, k) == image["sha256"]]
            assert found, f"{job_id}: recorded image {image['path']} is lost"
            with Image.open(io.BytesIO(server.read(bucket, found[0]))) as picture:
                picture.load()
                assert picture.size == (image["width"], image["height"]), job_id
            recorded.add(image["sha256"])
            count += 1
    for key in objects:
        if key.startswith(f"{prefix}/images/"):
            assert server.sha256(bucket, key) in recorded, f"unrecorded object {key}"
    return count


def test_kill_9_during_uploads_then_resume(tmp_path: Path, moto: S3Server) -> None:
    rng = random.Random(int(os.environ.get("IMGBATCH_CRASH_SEED", "1")))
    bucket = moto.bucket("crash")
    prefix = "nightly"
    url = f"s3://{bucket}/{prefix}"
    manifest = catalog(JOBS, tmp_path / "crash.jsonl")
    env = cli_env(**moto.env())
    kills = 0
    with simulator("--scale", "0.25", "--payload-bytes", "600000", "--fault-mix", "0.3",
                   "--retry-after", "0.05", "--latency", "0.05", "--latency-jitter", "0.2",
                   "--seed", "7") as sim:
        argv = imgbatch_argv("run", str(manifest), "--output", url, "--s3-endpoint",
                             moto.endpoint, "--base-url", sim.url, "--concurrency",
                             str(CONCURRENCY), "--no-gallery")
        while kills < KILLS:
            published = len(moto.objects(bucket, f"{prefix}/images/"))
            run = subprocess.Popen(argv, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
            # Instants counted in work, not seconds: after 1-3 more images are published
            # (and a random instant after that), so a fast machine cannot finish the
            # catalog before it was killed KILLS times, nor a slow start turn every kill
            # into one at start-up.
            target = published + rng.randint(1, 3)
            deadline = time.monotonic() + 60
            while run.poll() is None and time.monotonic() < deadline and len(
                    moto.objects(bucket, f"{prefix}/images/")) < target:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.3))
            if run.poll() is not None:
                break  # finished before we could kill it again
            run.send_signal(signal.SIGKILL)
            run.wait()
            kills += 1
            check_recorded(moto, bucket, prefix)
        final = run_cli("run", str(manifest), "--output", url, "--s3-endpoint", moto.endpoint,
                        "--base-url", sim.url, "--concurrency", str(CONCURRENCY),
                        "--no-gallery", env=env)
        stats = sim.stats()
    assert final.returncode == 0, final.stderr
    assert kills >= min(KILLS, 3), "the batch finished too fast to be killed enough"
    check_bucket(moto, bucket, prefix, JOBS)
    assert check_recorded(moto, bucket, prefix) == JOBS
    rows = results(moto, bucket, prefix)
    # Each kill can waste the requests in flight and the answers queued for the commit;
    # the requests the simulator failed on purpose were retries, not images paid twice.
    good = stats["requests"] - sum(stats["faults"].values())
    assert good <= JOBS + kills * 2 * CONCURRENCY
    # Attempt counts ride with the next segment (no write per request): a kill may lose
    # those of the jobs its engine workers held (2x --concurrency), in flight or answered
    # and waiting for their commit, never more.
    counted = sum(int(row["attempts"]) for row in rows)  # type: ignore[call-overload]
    assert counted <= stats["requests"] <= counted + kills * 2 * CONCURRENCY
    print(f"kills={kills} requests={stats['requests']} good answers={good} counted={counted}")
