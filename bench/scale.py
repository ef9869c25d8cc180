"""Manifest-scale workload helpers, run in child processes by bench/run.py.

``setup``: write a JSONL catalog of N jobs and an output folder in which all but
every ``--every``-th job is already done, in imgbatch's checkpoint format (journal
lines from ``JobState.to_line()``, fingerprints from ``batch.checkpoint.fingerprint``,
a tiny PNG per done job with its size and mtime_ns recorded), without a single
API request.

``probe``: time what ``imgbatch run`` does before its first request -- load the
manifest, open the checkpoint, plan -- in this process, and report its peak RSS.
Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import struct
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batch.checkpoint import JOURNAL, STATE_DIR, Checkpoint, JobState, fingerprint
from batch.engine import Engine, EngineConfig
from batch.images import IMAGES_DIR
from batch.jobs import Status
from batch.manifest import load_manifest
from batch.progress import Observer

COLORS = ("red", "teal", "ochre", "ivory", "slate", "coral", "olive", "plum")
THINGS = ("ceramic mug", "leather bag", "desk lamp", "running shoe", "wool scarf",
          "glass vase", "wooden chair", "steel kettle")
RATIOS = ("1:1", "4:3", "3:4", "16:9")


def tiny_png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(data, zlib.crc32(kind))
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x80\x00")) + chunk(b"IEND", b""))


def write_catalog(path: Path, jobs: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for i in range(jobs):
            prompt = (f"Catalog shot {i}: a {COLORS[i % 8]} {THINGS[(i // 8) % 8]} on a seamless "
                      f"white background, soft studio light, 50mm lens, SKU {i * 7919 % 1000003}")
            handle.write(json.dumps({"id": f"sku-{i:06d}", "prompt": prompt,
                                     "aspect_ratio": RATIOS[i % 4]}) + "\n")


def setup(catalog: Path, root: Path, jobs: int, every: int) -> dict[str, float]:
    t0 = time.perf_counter()
    write_catalog(catalog, jobs)
    manifest = load_manifest(catalog)
    png = tiny_png()
    digest = hashlib.sha256(png).hexdigest()
    images = root / IMAGES_DIR
    images.mkdir(parents=True, exist_ok=True)
    (root / STATE_DIR).mkdir(parents=True, exist_ok=True)
    done = 0
    with (root / STATE_DIR / JOURNAL).open("wb") as journal:
        for n, job in enumerate(manifest.jobs):
            if n % every == every - 1:
                continue  # left to do
            rel = f"{IMAGES_DIR}/{job.id}.png"
            fd = os.open(root / rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, png)
                mtime_ns = os.fstat(fd).st_mtime_ns
            finally:
                os.close(fd)
            # Built from the journal's on-disk record format, which outlives refactors of
            # the in-memory JobState; to_line() then writes exactly what imgbatch writes.
            journal.write(JobState.from_record({
                "id": job.id, "fp": fingerprint(job), "status": Status.SUCCEEDED.value,
                "attempts": 1, "error": None,
                "images": [{"path": rel, "sha256": digest, "bytes": len(png),
                            "mime": "image/png", "width": 1, "height": 1, "tmp": None,
                            "mtime_ns": mtime_ns}],
                "usage": {"prompt_tokens": 30, "completion_tokens": 1400},
                "latency_s": 21.5, "text": None,
            }).to_line())
            done += 1
    return {"jobs": len(manifest.jobs), "done": done, "setup_s": time.perf_counter() - t0}


def probe(catalog: Path, root: Path) -> dict[str, float]:
    t0 = time.perf_counter()
    manifest = load_manifest(catalog)
    t1 = time.perf_counter()
    store = Checkpoint.open(root)
    t2 = time.perf_counter()
    try:
        engine = Engine(None, store, EngineConfig(concurrency=64), Observer())  # type: ignore[arg-type]
        todo = engine.plan(manifest.jobs)
    finally:
        store.close()
    t3 = time.perf_counter()
    return {
        "load_s": t1 - t0, "open_s": t2 - t1, "plan_s": t3 - t2, "total_s": t3 - t0,
        "todo": len(todo), "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=("setup", "probe"))
    parser.add_argument("--catalog", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--every", type=int, default=100, help="every N-th job is left to do")
    args = parser.parse_args()
    if args.command == "setup":
        result = setup(args.catalog, args.output, args.jobs, args.every)
    else:
        result = probe(args.catalog, args.output)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
