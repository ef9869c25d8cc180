"""Peak memory of collecting a big Gemini batch results file (images streamed to disk).

    .venv/bin/python bench/batch_rss.py [--images 200] [--image-bytes 7500000]

Starts the simulator with every image padded to ``--image-bytes`` (7.5 MB of PNG is
10 MB of base64: 200 of them make a results file of about 2 GB, the 200 x 4K case of
issue 13), submits one batch with the real CLI, then collects it with the real CLI and
reports that process's peak RSS (``wait4``), the results file's size, the wall time
and whether every image arrived intact. Exit 1 if the peak is over ``--max-rss-mb``.
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


def measure(argv: list[str], env: dict[str, str]) -> tuple[int, float, float, str]:
    """Run ``argv``; its exit code, peak RSS in MB, wall seconds and stderr."""
    started = time.monotonic()
    with tempfile.TemporaryFile() as err:
        child = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read().decode(errors="replace")
    return child.returncode, usage.ru_maxrss / 1024, time.monotonic() - started, text


def run(images: int, image_bytes: int, max_rss_mb: float, quiet: bool = False) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="imgbatch-rss-") as folder:
        root = Path(folder)
        manifest = root / "catalog.yaml"
        jobs = "\n".join(f"  - {{id: big{i:03d}, prompt: \"a 4K picture {i}\", "
                         f"image_size: 4K, aspect_ratio: \"16:9\"}}" for i in range(images))
        manifest.write_text("endpoints:\n  nightly:\n    provider: gemini\n    mode: batch\n"
                            f"jobs:\n{jobs}\n")
        sim = subprocess.Popen(
            [sys.executable, "-m", "batch", "simulate", "--port", "0", "--scale", "0.02",
             "--payload-bytes", str(image_bytes)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        try:
            assert sim.stdout is not None
            match = re.search(r"(http://\S+)/v1", sim.stdout.readline())
            assert match, "the simulator did not start"
            url = match.group(1)
            env = {**os.environ, "GEMINI_API_KEY": "bench"}
            argv = [sys.executable, "-m", "batch", "run", str(manifest), "--output",
                    str(root / "out"), "--base-url", f"nightly={url}/v1beta", "--no-gallery"]
            submit = measure(argv, env)
            assert submit[0] == 1, submit[3]
            code, rss_mb, wall_s, err = measure(argv, env)
            request = urllib.request.Request(url + "/_stats",
                                             headers={"User-Agent": "imgbatch-bench"})
            with urllib.request.urlopen(request, timeout=30) as answer:
                stats = json.loads(answer.read())["batch"]
            results = [json.loads(line) for line in
                       (root / "out" / "results.jsonl").read_text().splitlines()]
            intact = sum(1 for row in results if row["status"] == "succeeded")
            file_bytes = sum(p.stat().st_size for p in (root / "out" / "images").iterdir())
        finally:
            sim.terminate()
            sim.wait(timeout=30)
    report = {"images": images, "image_bytes": image_bytes, "collect_exit": code,
              "collect_peak_rss_mb": round(rss_mb, 1), "collect_wall_s": round(wall_s, 1),
              "images_written_mb": round(file_bytes / 1e6, 1), "succeeded": intact,
              "paid_twice": stats["paid_twice"], "submit_peak_rss_mb": round(submit[1], 1),
              "max_rss_mb": max_rss_mb, "ok": code == 0 and intact == images
              and rss_mb < max_rss_mb}
    if not quiet:
        print(json.dumps(report, indent=2))
        if code != 0:
            print(err, file=sys.stderr)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--image-bytes", type=int, default=7_500_000)
    parser.add_argument("--max-rss-mb", type=float, default=150.0)
    args = parser.parse_args()
    return 0 if run(args.images, args.image_bytes, args.max_rss_mb)["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
