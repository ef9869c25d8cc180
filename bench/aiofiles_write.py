"""Design check: writing streamed image chunks with aiofiles (a thread hop per chunk) vs os.write.

imgbatch's ImageWriter calls os.write on the event loop for each decoded piece
(about 48 KiB per 64 KiB of base64 read). The design card names aiofiles; this
measures what its thread hop per chunk would cost on the workload that matters
most: 4K-class images (8 MB each by default) streamed by 16 requests at once.
Each "request" writes its image chunk by chunk, yielding to the loop between
chunks as a socket read would; a ticker measures how late the loop runs
(what a blocking write would hurt). Every file is fsynced at the end in a
worker thread in both variants, as the commit does.

    .venv/bin/python bench/aiofiles_write.py [--images 48] [--in-flight 16] [--mb 8]

Prints one JSON object per variant (median of --repeat runs) and a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiofiles

CHUNK = 48 * 1024  # decoded bytes per 64 KiB of base64


async def write_os(path: Path, payload: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(payload)
        for start in range(0, len(view), CHUNK):
            piece = view[start:start + CHUNK]
            while piece:
                piece = piece[os.write(fd, piece):]
            await asyncio.sleep(0)  # the next chunk arrives from the socket
        await asyncio.to_thread(os.fsync, fd)
    finally:
        os.close(fd)


async def write_aiofiles(path: Path, payload: bytes) -> None:
    async with aiofiles.open(path, "xb", buffering=0) as handle:
        view = memoryview(payload)
        for start in range(0, len(view), CHUNK):
            await handle.write(view[start:start + CHUNK])
            await asyncio.sleep(0)
        await asyncio.to_thread(os.fsync, handle.fileno())


async def one_run(folder: Path, writer: Callable[[Path, bytes], Awaitable[None]],
                  images: int, in_flight: int, payload: bytes) -> dict[str, float]:
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        period = 0.005
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(period)
            lags.append(time.perf_counter() - before - period)

    slots = asyncio.Semaphore(in_flight)

    async def job(n: int) -> None:
        async with slots:
            await writer(folder / f"img-{n}.png", payload)

    tick = asyncio.create_task(ticker())
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(job(n) for n in range(images)))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    stop.set()
    await tick
    lags.sort()
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "mb_per_s": images * len(payload) / wall / 1e6,
        "loop_lag_p99_ms": 1000 * lags[int(0.99 * (len(lags) - 1))] if lags else 0.0,
        "loop_lag_max_ms": 1000 * lags[-1] if lags else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--mb", type=float, default=8.0, help="image size in MB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("output/bench-aiofiles"),
                        help="where to write (same disk as real output; emptied)")
    args = parser.parse_args()
    payload = os.urandom(int(args.mb * 1e6))
    results: dict[str, list[dict[str, float]]] = {"os.write": [], "aiofiles": []}
    writers = {"os.write": write_os, "aiofiles": write_aiofiles}
    for _ in range(args.repeat):
        for name, writer in writers.items():  # alternate, so drift hits both
            shutil.rmtree(args.dir, ignore_errors=True)
            args.dir.mkdir(parents=True)
            results[name].append(asyncio.run(
                one_run(args.dir, writer, args.images, args.in_flight, payload)))
    shutil.rmtree(args.dir, ignore_errors=True)
    medians = {}
    for name, runs in results.items():
        medians[name] = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
        print(json.dumps({"variant": name, "images": args.images, "in_flight": args.in_flight,
                          "mb": args.mb, "chunk": CHUNK, **medians[name]}))
    a, o = medians["aiofiles"], medians["os.write"]
    print(f"aiofiles vs os.write: wall x{a['wall_s'] / o['wall_s']:.2f}, "
          f"cpu x{a['cpu_s'] / o['cpu_s']:.2f}, loop lag p99 {a['loop_lag_p99_ms']} vs "
          f"{o['loop_lag_p99_ms']} ms")


if __name__ == "__main__":
    main()
