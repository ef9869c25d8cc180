"""The lease on an s3:// output: the real CLI, racing and dying, on a real S3 server."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from batch.storage.s3client import S3Location
from batch.storage.s3lease import LeaseInfo
from tests.conftest import ROOT, cli_env, imgbatch_argv, run_cli, simulator
from tests.s3server import S3Server
from tests.test_e2e import catalog
from tests.test_s3_e2e import check_bucket


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [
        ("s3://b", "b", ""),
        ("s3://b/", "b", ""),
        ("s3://b/p", "b", "p"),
        ("s3://b/p/q/", "b", "p/q"),
    ],
)
def test_s3_urls(url: str, bucket: str, prefix: str) -> None:
    location = S3Location.parse(url, None, env={})
    assert (location.bucket, location.prefix) == (bucket, prefix)
    assert location.key("images/a.png") == (f"{prefix}/images/a.png" if prefix else "images/a.png")


@pytest.mark.parametrize("url", ["s3://", "s3:///p", "s3://b/p//q", "s3://b/../x", "/tmp/x"])
def test_bad_s3_urls_are_usage_errors(url: str) -> None:
    from batch.errors import UsageError

    with pytest.raises(UsageError):
        S3Location.parse(url, None, env={})


@pytest.mark.parametrize(
    ("host", "pid_alive", "expires_in_s", "dead"),
    [
        ("here", True, 30, False),  # a live holder here
        ("here", False, 30, True),  # its process is gone: at once
        ("there", False, 30, False),  # elsewhere: its pid says nothing here
        ("there", True, -1, True),  # expired
    ],
)
def test_when_a_lease_is_dead(host: str, pid_alive: bool, expires_in_s: float,
                              dead: bool) -> None:
    import os

    pid = os.getpid() if pid_alive else 2**22 + 12345  # above pid_max: never a process
    info = LeaseInfo("h", host, pid, 1000.0 + expires_in_s)
    assert info.dead(1000.0, "here") is dead


def test_the_signature_matches_botocore(monkeypatch: pytest.MonkeyPatch) -> None:
    """The two requests signed here (multipart list and abort) are signed as AWS's SDK does."""
    import datetime

    auth = pytest.importorskip("botocore.auth")
    credentials = pytest.importorskip("botocore.credentials")
    awsrequest = pytest.importorskip("botocore.awsrequest")
    from batch.storage.s3client import signed_request

    location = S3Location("bkt", "p", "http://127.0.0.1:9000", "eu-west-1")
    env = {"AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "s3cr3t/+key"}
    now = datetime.datetime(2026, 12, 1, 10, 0, 0, tzinfo=datetime.UTC)
    for method, key, query in [("GET", None, {"uploads": "", "prefix": "p/"}),
                               ("DELETE", "p/images/a b~2.png", {"uploadId": "X/y+z"})]:
        ours = signed_request(location, method, key, query, env=env, now=now)
        theirs = awsrequest.AWSRequest(method=method, url=ours.full_url, headers={
            "x-amz-content-sha256": ours.headers["X-amz-content-sha256"]})
        signer = auth.S3SigV4Auth(credentials.Credentials("AKID", "s3cr3t/+key"), "s3",
                                  "eu-west-1")
        monkeypatch.setattr(auth, "get_current_datetime", lambda: now)
        signer.add_auth(theirs)
        assert ours.headers["Authorization"] == theirs.headers["Authorization"]


def put_lease(server: S3Server, bucket: str, prefix: str, host: str, pid: int,
              expires_at: float) -> None:
    import obstore

    record = {"holder": "other", "host": host, "pid": pid, "expires_at": expires_at}
    obstore.put(server.store(bucket), f"{prefix}/.imgbatch/lease", json.dumps(record).encode())


def test_two_runs_race_one_exits_4_at_once(tmp_path: Path, moto: S3Server) -> None:
    bucket = moto.bucket("race")
    url = f"s3://{bucket}/p"
    manifest = catalog(8, tmp_path / "race.jsonl")
    env = cli_env(**moto.env())
    with simulator("--scale", "0.0625", "--latency", "0.4", "--seed", "2") as sim:
        argv = imgbatch_argv("run", str(manifest), "--output", url, "--s3-endpoint",
                             moto.endpoint, "--base-url", sim.url, "--concurrency", "1",
                             "--no-gallery")
        logs = [tmp_path / f"run{n}.log" for n in range(2)]
        runs = []
        for log in logs:
            with log.open("w") as handle:
                runs.append(subprocess.Popen(argv, cwd=ROOT, env=env, stderr=handle))
        # The loser exits while the winner still has seconds of requests ahead of it.
        while all(run.poll() is None for run in runs):
            time.sleep(0.01)
        lost = next(n for n, run in enumerate(runs) if run.poll() is not None)
        winner = runs[1 - lost]
        assert winner.poll() is None
        assert runs[lost].returncode == 4, logs[lost].read_text()
        assert "in use" in logs[lost].read_text()
        assert winner.wait(timeout=120) == 0, logs[1 - lost].read_text()
        stats = sim.stats()
    assert stats["requests"] == 8  # the loser sent nothing
    check_bucket(moto, bucket, "p", 8)


def test_a_lease_held_elsewhere_refuses_then_expires(tmp_path: Path, moto: S3Server) -> None:
    bucket = moto.bucket("held")
    url = f"s3://{bucket}/p"
    manifest = catalog(3, tmp_path / "held.jsonl")
    env = cli_env(**moto.env())
    with simulator("--scale", "0.0625", "--seed", "2") as sim:
        args = ["run", str(manifest), "--output", url, "--s3-endpoint", moto.endpoint,
                "--base-url", sim.url, "--no-gallery"]
        put_lease(moto, bucket, "p", "another-host", 1, time.time() + 40)
        held = run_cli(*args, env=env)
        assert held.returncode == 4, held.stderr
        assert sim.stats()["requests"] == 0
        put_lease(moto, bucket, "p", "another-host", 1, time.time() - 1)  # its holder died
        taken = run_cli(*args, env=env)
        assert taken.returncode == 0, taken.stderr
        assert "took over the lease" in taken.stderr
    check_bucket(moto, bucket, "p", 3)
    # Released at the end: marked so (conditionally), not deleted (which could remove a
    # new holder's lease).
    assert moto.read(bucket, "p/.imgbatch/lease") == b'{"released": true}'


def test_a_killed_holder_on_this_host_is_replaced_at_once(tmp_path: Path,
                                                          moto: S3Server) -> None:
    bucket = moto.bucket("killed")
    url = f"s3://{bucket}/p"
    manifest = catalog(6, tmp_path / "k.jsonl")
    env = cli_env(**moto.env())
    with simulator("--scale", "0.0625", "--latency", "0.3", "--seed", "2") as sim:
        args = ["run", str(manifest), "--output", url, "--s3-endpoint", moto.endpoint,
                "--base-url", sim.url, "--concurrency", "1", "--no-gallery"]
        run = subprocess.Popen(imgbatch_argv(*args), cwd=ROOT, env=env,
                               stderr=subprocess.DEVNULL)
        while run.poll() is None and "p/.imgbatch/lease" not in moto.objects(bucket, "p"):
            time.sleep(0.01)
        run.send_signal(signal.SIGKILL)
        run.wait()
        assert "p/.imgbatch/lease" in moto.objects(bucket, "p")
        again = run_cli(*args, env=env)  # no 45 s wait: its pid is gone on this host
        assert again.returncode == 0, again.stderr
    check_bucket(moto, bucket, "p", 6)


@pytest.mark.parametrize(
    ("names", "next_gen", "live", "stale"),
    [
        ([], 1, [], []),
        (["g00000001-w-main-00000002.jsonl", "g00000001-w-main-00000001.jsonl"], 2,
         ["g00000001-w-main-00000001.jsonl", "g00000001-w-main-00000002.jsonl"], []),
        # A snapshot sorts before its own generation's segments; older generations go.
        (["g00000002-w-main-00000001.jsonl", "g00000002-a-snapshot.jsonl",
          "g00000001-w-main-00000001.jsonl", "g00000001-a-snapshot.jsonl"], 3,
         ["g00000002-a-snapshot.jsonl", "g00000002-w-main-00000001.jsonl"],
         ["g00000001-a-snapshot.jsonl", "g00000001-w-main-00000001.jsonl"]),
        # Shards of one generation, and names that are not segments at all.
        (["g00000003-w-shard1-00000001.jsonl", "g00000003-w-shard0-00000001.jsonl",
          "notes.txt", "g3-w-x-1.jsonl"], 4,
         ["g00000003-w-shard0-00000001.jsonl", "g00000003-w-shard1-00000001.jsonl"], []),
    ],
)
def test_journal_order(names: list[str], next_gen: int, live: list[str],
                       stale: list[str]) -> None:
    from batch.storage import s3journal

    journal = s3journal.plan(names)
    where = s3journal.JOURNAL_DIR + "/"
    assert journal.next_gen == next_gen
    assert journal.live == tuple(where + n for n in live)
    assert journal.stale == tuple(where + n for n in stale)
