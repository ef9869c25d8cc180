"""Peak memory of the run that collects a large OpenAI Batch API results file.

Starts the simulator with images padded to ``--mb`` MB (base64 in the results
file: 4/3 of that per line), submits ``--images`` jobs on a ``mode: batch``
openai-images endpoint with the real CLI, lets the batch finish, then times the
collecting run and reads its peak RSS (``ru_maxrss`` of that child alone: each
run is its own process, waited for in turn).

    .venv/bin/python bench/batch_openai_rss.py [--images 200] [--mb 10]

Prints one JSON object: results file bytes, collect seconds, peak RSS (MB).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def control(base: str, path: str, data: bytes | None = None) -> object:
    request = urllib.request.Request(base + path, data=data,
                                     headers={"User-Agent": "imgbatch-bench"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def run(manifest: Path, out: Path, url: str) -> tuple[float, float]:
    """One ``imgbatch run``: (seconds, its own peak RSS in MB, from wait4)."""
    env = {**os.environ, "OPENAI_API_KEY": "sk-bench"}
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "batch", "run", str(manifest), "--output", str(out),
         "--base-url", f"nightly={url}", "--no-gallery"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert process.stderr is not None
    stderr = process.stderr.read()  # a summary line or two; drained before the wait
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - started
    if process.returncode not in (0, 1):
        raise SystemExit(stderr.decode(errors="replace"))
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--mb", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imgbatch-rss-") as folder:
        work = Path(folder)
        manifest = work / "catalog.yaml"
        lines = ["endpoints:", "  nightly:", "    provider: openai-images", "    mode: batch",
                 "jobs:"]
        lines += [f"  - {{id: j{i:04d}, prompt: \"big picture {i}\"}}"
                  for i in range(args.images)]
        manifest.write_text("\n".join(lines) + "\n")
        sim = subprocess.Popen(
            [sys.executable, "-m", "batch", "simulate", "--port", "0",
             "--payload-bytes", str(int(args.mb * 1_000_000)), "--batch-delay", "60"],
            cwd=ROOT, stdout=subprocess.PIPE, text=True)
        try:
            assert sim.stdout is not None
            url = re.search(r"(http://\S+/v1)", sim.stdout.readline())
            assert url, "simulator did not start"
            base = url.group(1).removesuffix("/v1")
            submit_s, submit_mb = run(manifest, work / "out", url.group(1))
            # (The simulator writes the results file at the first poll after the end, in
            # the collect run: its time counts the writing too, not its memory.)
            control(base, "/_batch/advance?s=100000", b"")
            collect_s, collect_mb = run(manifest, work / "out", url.group(1))
            stats = control(base, "/_openai_batch/stats")
            results = stats["result_file_bytes"]  # type: ignore[index]
        finally:
            sim.terminate()
            sim.wait(timeout=30)
    print(json.dumps({"images": args.images, "image_mb": args.mb,
                      "results_file_bytes": results, "submit_s": round(submit_s, 1),
                      "collect_s": round(collect_s, 1), "peak_rss_mb": round(collect_mb, 1),
                      "submit_peak_rss_mb": round(submit_mb, 1),
                      "paid_twice": stats["paid_twice"]}))  # type: ignore[index]


if __name__ == "__main__":
    main()
