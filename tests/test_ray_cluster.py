"""The cluster runner on a real local Ray cluster: a head and a second node.

One cluster for the module (starting one costs ~10 s); each test drives the
real CLI (``imgbatch run --cluster ray``, RAY_ADDRESS pointing at it; one
test over Ray Client, ``--cluster ray://``) against the real simulator. The
judges are the simulator's own counters (requests in
flight, 429s of its rate window, complete images sent per prompt), the
journal and images read back independently (tests/oracles.py), never the
runner's own figures. A worker killed with os._exit mid-shard is the
s3:// test's (the folder's retry path is the removed node's). The API key
reaches the workers through the nodes' environment only: the driver runs
without it, and the key must appear nowhere in Ray's session files.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray_cluster_utils = pytest.importorskip("ray.cluster_utils")

from tests.conftest import KEY, ROOT, cli_env, imgbatch_argv, read_results, simulator  # noqa: E402
from tests.oracles import check_recorded_images  # noqa: E402
from tests.s3server import CREDENTIALS, S3Server  # noqa: E402
from tests.test_crash import prompts_of  # noqa: E402
from tests.test_e2e import catalog, check_outputs  # noqa: E402
from tests.test_metrics import samples, value  # noqa: E402
from tests.test_s3_e2e import check_bucket  # noqa: E402

SCALE = "0.0625"

# Ray's head opens the client server's log files in this process and leaves them to the
# garbage collector (a ResourceWarning, not ours).
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in.*ray_client_server:pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    temp = tmp_path_factory.mktemp("ray")
    saved = dict(os.environ)
    # The nodes (and so the workers) inherit these; Ray's files stay in the test's folder.
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=str(temp), QINIU_API_KEY=KEY,
                      **CREDENTIALS)
    (temp / "ray").mkdir()
    port = _free_port()
    cluster = ray_cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "temp_dir": str(temp / "ray"),
                        "include_dashboard": False, "ray_client_server_port": port,
                        # A removed node is declared dead in ~2 s, not ~15 s.
                        "_system_config": {"health_check_period_ms": 500,
                                           "health_check_timeout_ms": 500,
                                           "health_check_failure_threshold": 3}},
    )
    cluster.add_node(num_cpus=2)
    cluster.temp = temp
    cluster.client_port = port
    try:
        yield cluster
    finally:
        cluster.shutdown()
        os.environ.clear()
        os.environ.update(saved)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def driver_env(cluster: Any, **extra: str) -> dict[str, str]:
    env = cli_env(RAY_ADDRESS=cluster.address, RAY_USAGE_STATS_ENABLED="0",
                  RAY_TMPDIR=str(cluster.temp), **extra)
    del env["QINIU_API_KEY"]  # the workers read it from their own environment
    return env


def cluster_argv(manifest: Path, out: Path, url: str, *extra: str) -> list[str]:
    return imgbatch_argv("run", str(manifest), "--output", str(out), "--base-url", url,
                         "--cluster", "ray", "--verify", "structure", "--no-gallery",
                         "--progress-interval", "1", *extra)


def run_driver(cluster: Any, argv: list[str], **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, env=driver_env(cluster, **extra), capture_output=True,
                          text=True, timeout=180)


def running_shards(node: Any) -> int:
    """Shard tasks running on ``node`` now: its raylet's children titled ``ray::shard_task``."""
    from ray._private import ray_constants

    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    count = 0
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            title = (proc / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        count += ppid == raylet and title.startswith(b"ray::shard_task")
    return count


def segment_lines(out: Path) -> int:
    folder = out / ".imgbatch" / "segments"
    if not folder.is_dir():
        return 0
    return sum(p.read_bytes().count(b'"status":"succeeded"') for p in folder.iterdir())


def test_catalog_with_faults_keeps_global_limits(cluster: Any, tmp_path: Path) -> None:
    jobs, concurrency = 30, 6
    manifest = catalog(jobs, tmp_path / "cat.jsonl")
    out = tmp_path / "out"
    # The gateway allows 40 starts in any 5 s; the cluster is told 440/min (36.7 per 5 s).
    with simulator("--scale", SCALE, "--latency", "0.2", "--fault-mix", "0.15", "--seed", "3",
                   "--rpm-limit", "40", "--rate-window", "5") as sim:
        prom = tmp_path / "cluster.prom"
        done = run_driver(cluster, cluster_argv(manifest, out, sim.url, "--shard-size", "10",
                                                "--concurrency", str(concurrency),
                                                "--rpm", "440", "--metrics-file", str(prom)))
        stats = sim.stats()
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_results(out)
    assert [r["id"] for r in rows] == [f"job-{i:03d}" for i in range(jobs)]  # manifest order
    check_outputs(out, rows)
    assert stats["max_in_flight"] <= concurrency
    assert stats["faults"].get("rpm_limit", 0) == 0, stats["faults"]
    assert stats["faults"].get("rate_limit", 0) > 0  # background 429s were injected
    assert sorted(stats["paid_by_prompt"].values()) == [1] * jobs  # no image paid twice
    # One progress line for the cluster, each job counted once.
    assert f"progress: {jobs} succeeded, 0 failed, 0 retrying, 0 in flight, {jobs}/{jobs} done" \
        in done.stderr
    summary = (out / "summary.json").read_text()
    assert '"exit_code": 0' in summary
    # One metrics file for the cluster, written by the driver from every shard's events.
    found = samples(prom.read_text())
    assert value(found, "imgbatch_requests_total") == stats["requests"]
    assert value(found, "imgbatch_rate_limited_total") == stats["by_status"].get("429", 0) > 0
    assert value(found, "imgbatch_jobs", status="succeeded") == jobs
    assert value(found, "imgbatch_written_bytes_total") == sum(
        p.stat().st_size for p in (out / "images").iterdir())
    assert value(found, "imgbatch_run_exit_code") == 0
    leaked = [p for p in cluster.temp.rglob("*") if p.is_file() and _holds(p, KEY.encode())]
    assert leaked == []


def _holds(path: Path, needle: bytes) -> bool:
    try:
        return needle in path.read_bytes()
    except OSError:
        return False


def test_driver_killed_then_rerun(cluster: Any, tmp_path: Path) -> None:
    jobs, concurrency = 24, 4
    manifest = catalog(jobs, tmp_path / "cat.jsonl")
    out = tmp_path / "out"
    with simulator("--scale", SCALE, "--latency", "0.3") as sim:
        argv = cluster_argv(manifest, out, sim.url, "--shard-size", "10",
                            "--concurrency", str(concurrency))
        first = subprocess.Popen(argv, cwd=ROOT, env=driver_env(cluster),
                                 stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 90
        while segment_lines(out) < 4 and first.poll() is None:
            assert time.monotonic() < deadline, "the first run made no progress"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait()
        done = run_driver(cluster, argv)
        stats = sim.stats()
    assert done.returncode == 0, done.stderr[-3000:]
    check_outputs(out, read_results(out))
    assert check_recorded_images(out, prompts_of(manifest)) == jobs
    # The re-run adopted what was committed: at most the requests in flight were lost.
    assert stats["requests"] <= jobs + 2 * concurrency


def test_max_cost_is_one_budget_for_the_cluster_over_ray_client(cluster: Any,
                                                                tmp_path: Path) -> None:
    jobs = 20
    manifest = catalog(jobs, tmp_path / "cat.jsonl")
    out = tmp_path / "out"
    with simulator("--scale", SCALE, "--latency", "0.2") as sim:
        # $0.134 an image: $1.40 buys exactly 10, whichever shards ask for them.
        argv = cluster_argv(manifest, out, sim.url, "--shard-size", "5", "--concurrency", "4",
                            "--max-cost", "1.40")
        # Over Ray Client (the driver's session runs on the head), not RAY_ADDRESS.
        argv[argv.index("--cluster") + 1] = f"ray://127.0.0.1:{cluster.client_port}"
        done = run_driver(cluster, argv)
        paid = sum(sim.stats()["paid_by_prompt"].values())
    assert done.returncode == 1, done.stderr[-3000:]
    assert paid == 10
    assert [r["status"] for r in read_results(out)].count("succeeded") == 10
    assert '"stopped": "max_cost"' in (out / "summary.json").read_text()


def test_sigint_stops_every_shard_and_exits_130(cluster: Any, tmp_path: Path) -> None:
    jobs = 30
    manifest = catalog(jobs, tmp_path / "cat.jsonl")
    out = tmp_path / "out"
    with simulator("--scale", SCALE, "--latency", "0.4") as sim:
        argv = cluster_argv(manifest, out, sim.url, "--shard-size", "10", "--concurrency", "4",
                            "--grace", "5")
        run = subprocess.Popen(argv, cwd=ROOT, env=driver_env(cluster), stderr=subprocess.PIPE,
                               text=True)
        deadline = time.monotonic() + 90
        while segment_lines(out) < 4 and run.poll() is None:
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.05)
        run.send_signal(signal.SIGINT)
        _, stderr = run.communicate(timeout=60)
        requests = sim.stats()["requests"]
    assert run.returncode == 130, stderr[-3000:]
    rows = read_results(out)
    done = [r for r in rows if r["status"] == "succeeded"]
    assert 4 <= len(done) < jobs and {r["status"] for r in rows} == {"succeeded", "pending"}
    assert requests < jobs  # every shard stopped starting requests
    check_recorded_images(out, prompts_of(manifest))


def test_catalog_into_s3_from_the_cluster(cluster: Any, moto: S3Server, tmp_path: Path) -> None:
    jobs, concurrency = 20, 2
    bucket = moto.bucket("cluster")
    manifest = catalog(jobs, tmp_path / "cat.jsonl")
    url = f"s3://{bucket}/nightly"
    marker = tmp_path / "died"
    with simulator("--scale", SCALE, "--latency", "0.1", "--fault-mix", "0.1") as sim:
        argv = imgbatch_argv("run", str(manifest), "--output", url, "--s3-endpoint",
                             moto.endpoint, "--base-url", sim.url, "--cluster", "ray",
                             "--shard-size", "8", "--concurrency", str(concurrency),
                             "--no-gallery")
        done = run_driver(cluster, argv, IMGBATCH_RAY_TEST_EXIT=f"2:{marker}")
        stats = sim.stats()
    assert done.returncode == 0, done.stderr[-3000:]
    # A worker died mid-shard, after committing the jobs its marker lists; its retry
    # finished the shard without paying for those again.
    committed = marker.read_text().split()
    assert len(committed) == 2
    check_bucket(moto, bucket, "nightly", jobs)
    paid = stats["paid_by_prompt"]
    prompts = prompts_of(manifest)
    assert [paid[hashlib.sha256(prompts[id_].encode()).hexdigest()] for id_ in committed] == [1, 1]
    # Paid twice at most: what the dead worker had in flight or waiting for its commit,
    # one job per engine worker (twice --concurrency), fewer than its shard's 8 jobs.
    assert sum(n - 1 for n in paid.values()) <= 2 * concurrency
    # --force on the cluster redoes each job once (shards compare states by value).
    few = catalog(4, tmp_path / "few.jsonl")
    with simulator("--scale", SCALE, "--latency", "0.1") as sim:
        argv[argv.index(str(manifest))] = str(few)
        argv[argv.index("--base-url") + 1] = sim.url
        forced = run_driver(cluster, [*argv, "--force"])
        paid = sim.stats()["paid_by_prompt"]
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert sorted(paid.values()) == [1] * 4


def test_node_removed_mid_run(cluster: Any, tmp_path: Path) -> None:
    jobs, concurrency, shards = 24, 4, 2
    manifest = catalog(jobs, tmp_path / "cat.jsonl")
    out = tmp_path / "out"
    with simulator("--scale", SCALE, "--latency", "0.8") as sim:
        argv = cluster_argv(manifest, out, sim.url, "--shard-size", str(jobs // shards),
                            "--concurrency", str(concurrency))
        run = subprocess.Popen(argv, cwd=ROOT, env=driver_env(cluster), stderr=subprocess.PIPE,
                               text=True)
        node = next(iter(cluster.worker_nodes))
        try:
            deadline = time.monotonic() + 90
            # Removed while one of its shard tasks is mid-shard (some jobs committed).
            while (segment_lines(out) < 2 or not running_shards(node)) and run.poll() is None:
                assert time.monotonic() < deadline, "no shard ran on the second node"
                time.sleep(0.05)
            cluster.remove_node(node, allow_graceful=False)
            # Bounded: the driver always ends (the actors live on its node, every wait is
            # bounded); a hang fails here instead of hanging the suite.
            _, stderr = run.communicate(timeout=120)
        finally:
            run.kill()
            cluster.add_node(num_cpus=2)  # the other tests (any order) want two nodes
        stats = sim.stats()
    assert run.returncode == 0, stderr[-3000:]
    check_outputs(out, read_results(out))
    assert check_recorded_images(out, prompts_of(manifest)) == jobs
    assert stats["max_in_flight"] <= concurrency
    # Each shard attempt writes one segment: more segments than shards, a shard was retried.
    folded = re.search(r"folded \d+ record\(s\) from (\d+) journal segment", stderr)
    assert folded and int(folded.group(1)) > shards, stderr[-3000:]
    repaid = sum(n - 1 for n in stats["paid_by_prompt"].values())
    assert repaid <= 2 * concurrency
