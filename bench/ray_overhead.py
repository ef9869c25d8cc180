"""What the Ray runner costs, and whether a shared limit stays shared (issue 15).

1. Overhead: N jobs (default 2,000) at 1 s latency, the same total concurrency
   (default 32), once on one machine (``imgbatch run``) and once over a local
   cluster of two nodes (``--cluster ray``, shards of 300): the cluster's wall
   time over the single machine's (target: at most 1.10).
2. A rate-limited gateway shared by 4 workers: a sliding window of
   ``--limit`` requests per ``--window`` seconds, no ``--rpm`` (the limits
   actor learns the pace for all four shard tasks at once): the share of
   requests answered 429 by the window (target: under 2%).

Both against the real simulator on loopback, tiny images, ``--verify
structure`` (the decode check is the same work either way). On one 2-core
machine the "two nodes" share the CPUs, so this measures Ray's own overhead
(scheduling, leases, the actors' round trips), not a gain.

The cluster is started before any run is timed (its start-up is printed
apart): a user of ``--cluster ray`` joins a cluster that is already running.
A cluster run's wall time is the whole ``imgbatch run`` process: joining,
the run actor and the shard tasks' worker processes starting, the end.

    .venv/bin/python bench/ray_overhead.py [--jobs 2000] [--concurrency 32]
        [--part overhead|limited|all]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import KEY, cli_env, imgbatch_argv, simulator  # noqa: E402
from tests.test_e2e import catalog  # noqa: E402


def run(argv: list[str], env: dict[str, str]) -> tuple[int, float, str]:
    started = time.monotonic()
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    return done.returncode, time.monotonic() - started, done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency", type=float, default=1.0)
    parser.add_argument("--limited-jobs", type=int, default=1200)
    parser.add_argument("--limit", type=int, default=120)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--part", choices=("overhead", "limited", "all"), default="all")
    parser.add_argument("--rounds", type=int, default=1,
                        help="overhead runs of each kind, in the order ABBA... (the load of "
                             "a shared machine drifts)")
    args = parser.parse_args()

    import ray.cluster_utils

    tmp = Path(tempfile.mkdtemp(prefix="imgbatch-raybench-"))
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=str(tmp), QINIU_API_KEY=KEY)
    (tmp / "ray").mkdir()
    started = time.monotonic()
    cluster = ray.cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "temp_dir": str(tmp / "ray"), "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    print(f"starting the 2-node cluster (not part of any run below): "
          f"{time.monotonic() - started:.1f} s", flush=True)
    env = cli_env(RAY_ADDRESS=cluster.address, RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=str(tmp))
    common = ["--verify", "structure", "--no-gallery", "--quiet"]
    results: dict[str, object] = {}
    try:
        if args.part in ("overhead", "all"):
            results.update(overhead(args, tmp, env, common))
        if args.part in ("limited", "all"):
            results.update(limited(args, tmp, env, common))
        print(json.dumps(results))
    finally:
        cluster.shutdown()


def overhead(args: argparse.Namespace, tmp: Path, env: dict[str, str],
             common: list[str]) -> dict[str, object]:
    manifest = catalog(args.jobs, tmp / "overhead.jsonl")
    kinds = [("one machine", []), ("2-node cluster", ["--cluster", "ray", "--shard-size", "300"])]
    walls: dict[str, float] = {}
    for n in range(args.rounds):
        for label, extra in kinds if n % 2 == 0 else kinds[::-1]:
            with simulator("--scale", "0.0625", "--latency", str(args.latency)) as sim:
                code, wall, err = run(imgbatch_argv(
                    "run", str(manifest), "--output", str(tmp / f"{label}-{n}".replace(" ", "-")),
                    "--base-url", sim.url, "--concurrency", str(args.concurrency),
                    *common, *extra), env)
                stats = sim.stats()
            assert code == 0, err[-2000:]
            walls[label] = walls.get(label, 0.0) + wall / args.rounds
            print(f"{label}: {args.jobs} jobs at {args.latency:g} s, {args.concurrency} in "
                  f"flight: {wall:.1f} s wall, {stats['requests']} requests, "
                  f"peak {stats['max_in_flight']} in flight", flush=True)
    ratio = walls["2-node cluster"] / walls["one machine"]
    print(f"cluster / one machine (mean of {args.rounds}): {ratio:.3f} (target <= 1.10: "
          f"{'met' if ratio <= 1.10 else 'NOT met'})", flush=True)
    # The fixed part: joining the cluster, the actors and a worker process per task.
    tiny = catalog(args.concurrency, tmp / "tiny.jsonl")
    with simulator("--scale", "0.0625", "--latency", str(args.latency)) as sim:
        code, fixed, err = run(imgbatch_argv(
            "run", str(tiny), "--output", str(tmp / "tiny"), "--base-url", sim.url,
            "--concurrency", str(args.concurrency), "--cluster", "ray", *common), env)
    assert code == 0, err[-2000:]
    print(f"fixed cost: {args.concurrency} jobs (one round of {args.latency:g} s) take "
          f"{fixed:.1f} s on the cluster; without it the ratio is "
          f"{(walls['2-node cluster'] - fixed + args.latency) / walls['one machine']:.3f}",
          flush=True)

    return {"overhead_ratio": round(ratio, 4), "walls_s": walls, "fixed_s": fixed}


def limited(args: argparse.Namespace, tmp: Path, env: dict[str, str],
            common: list[str]) -> dict[str, object]:
    limited = catalog(args.limited_jobs, tmp / "limited.jsonl")
    shares = {}
    for label, extra in (("one machine", []), ("4 shard tasks", [
            "--cluster", "ray", "--max-shards", "4",
            "--shard-size", str(-(-args.limited_jobs // 4))])):
        with simulator("--scale", "0.0625", "--latency", "0.2", "--rpm-limit",
                       str(args.limit), "--rate-window", str(args.window)) as sim:
            code, wall, err = run(imgbatch_argv(
                "run", str(limited), "--output", str(tmp / f"limited-{len(extra)}"),
                "--base-url", sim.url, "--concurrency", "64", *common, *extra), env)
            stats = sim.stats()
        assert code == 0, err[-2000:]
        refused = stats["faults"].get("rpm_limit", 0)
        shares[label] = refused / stats["requests"]
        print(f"shared limit of {args.limit} per {args.window:g} s, {label}, "
              f"{args.limited_jobs} jobs: {wall:.1f} s wall ({args.limited_jobs / wall:.2f} "
              f"jobs/s of {args.limit / args.window:.2f} allowed), {stats['requests']} "
              f"requests, {refused} answered 429 = {shares[label]:.2%}", flush=True)
    share = shares["4 shard tasks"]
    print(f"429 share over 4 shard tasks: {share:.2%} (target < 2%: "
          f"{'met' if share < 0.02 else 'NOT met'})", flush=True)
    return {"429_shares": shares}


if __name__ == "__main__":
    main()
