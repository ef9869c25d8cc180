"""s3:// output against a local folder: peak RSS with 16 4K images in flight, and time per image.

    .venv/bin/python bench/s3.py [--jobs-4k 16] [--payload-mb 16] [--jobs-small 96]

Starts moto's S3 server and the simulator on free loopback ports, then runs
the real CLI (under bench/timed.py, which records that one process's own
peak RSS and CPU) four times: 16 4K jobs at --concurrency 16 into a local
folder and into s3:// (each answer padded to ~16 MB, as a real 4K PNG), and
96 small jobs at --concurrency 8 into each, for the time per image.
The gallery is off (it runs in a child of its own either way).
The goal of issue 14: the s3:// run's peak RSS under 150 MB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import simulator  # noqa: E402
from tests.s3server import CREDENTIALS, s3_server  # noqa: E402
from tests.test_e2e import catalog  # noqa: E402

KEY = "sk-bench-not-a-secret"


def four_k(n: int, path: Path) -> Path:
    lines = [json.dumps({"id": f"big-{i:03d}", "prompt": f"4K picture {i}", "aspect_ratio": "1:1",
                         "image_size": "4K"}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def timed(work: Path, name: str, argv: list[str], env: dict[str, str]) -> dict[str, float]:
    result = work / f"{name}.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "timed.py"), str(result), "--",
                           sys.executable, "-m", "batch", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed ({done.returncode}):\n{done.stderr}")
    data: dict[str, float] = json.loads(result.read_text())
    return data


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs-4k", type=int, default=16)
    parser.add_argument("--payload-mb", type=float, default=16.0)
    parser.add_argument("--jobs-small", type=int, default=96)
    args = parser.parse_args()
    import os

    env = {**os.environ, **CREDENTIALS, "QINIU_API_KEY": KEY, "NO_PROXY": "127.0.0.1"}
    with tempfile.TemporaryDirectory() as tmp, s3_server() as s3:
        work = Path(tmp)
        urllib.request.urlopen(urllib.request.Request(f"{s3.endpoint}/bench", method="PUT"))
        rows = []
        payload = str(int(args.payload_mb * 1e6))
        with simulator("--payload-bytes", payload, "--latency", "0.5", "--seed", "1") as sim:
            big = four_k(args.jobs_4k, work / "big.jsonl")
            common = ["--base-url", sim.url, "--concurrency", "16", "--no-gallery"]
            for name, output in [("local-4k", str(work / "local-4k")),
                                 ("s3-4k", "s3://bench/big")]:
                argv = ["run", str(big), "--output", output, "--s3-endpoint", s3.endpoint,
                        *common]
                if not output.startswith("s3://"):
                    argv = [a for a in argv if a not in ("--s3-endpoint", s3.endpoint)]
                rows.append((name, args.jobs_4k, timed(work, name, argv, env)))
        with simulator("--scale", "0.25", "--latency", "0.2", "--seed", "1") as sim:
            small = catalog(args.jobs_small, work / "small.jsonl")
            for name, output in [("local-small", str(work / "local-small")),
                                 ("s3-small", "s3://bench/small")]:
                argv = ["run", str(small), "--output", output, "--base-url", sim.url,
                        "--concurrency", "8", "--no-gallery"]
                if output.startswith("s3://"):
                    argv += ["--s3-endpoint", s3.endpoint]
                rows.append((name, args.jobs_small, timed(work, name, argv, env)))
    print(f"{'run':<12} {'jobs':>5} {'wall s':>8} {'cpu s':>7} {'peak RSS MB':>12}")
    for name, jobs, r in rows:
        print(f"{name:<12} {jobs:>5} {r['wall_s']:>8.2f} {r['user_s'] + r['sys_s']:>7.2f} "
              f"{r['maxrss_kb'] / 1024:>12.1f}")
    by = {name: (jobs, r) for name, jobs, r in rows}
    for kind in ("4k", "small"):
        jobs, local = by[f"local-{kind}"]
        _, remote = by[f"s3-{kind}"]
        extra_ms = (remote["wall_s"] - local["wall_s"]) / jobs * 1000
        cpu_ms = ((remote["user_s"] + remote["sys_s"]) - (local["user_s"] + local["sys_s"])
                  ) / jobs * 1000
        print(f"{kind}: s3 costs {extra_ms:+.1f} ms wall and {cpu_ms:+.1f} ms CPU per image "
              "over a local folder")
    peak = by["s3-4k"][1]["maxrss_kb"] / 1024
    print(f"s3 peak RSS with {args.jobs_4k} 4K images in flight: {peak:.0f} MB "
          f"({'under' if peak < 150 else 'OVER'} the 150 MB goal)")
    return 0 if peak < 150 else 1


if __name__ == "__main__":
    sys.exit(main())
