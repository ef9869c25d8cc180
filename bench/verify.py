"""What ``--verify decode`` costs on 4K images: time per image, throughput, peak memory.

    .venv/bin/python bench/verify.py [--size 4096x4096] [--images 48] [--concurrency 16]

Makes one 4K PNG, JPEG (quality 90) and WebP (quality 85) of gradient plus noise (noise
so the compressed data is long, the worst case for a decoder), then for each format:
the wall and CPU time of one ``decode_check`` (median of 3), and ``--images`` answers
checked through ``DecodeChecked`` with ``--concurrency`` requests in flight at once,
with 1 and 2 decode workers: wall time, images per second, the peak RSS the checks
added to the run's own process (VmHWM after against before), and the peak RSS of the
largest decode child (the run's process is a fresh child of this script per row).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from batch.imagecheck import DecodeChecked, decode_check  # noqa: E402
from batch.imageinfo import probe  # noqa: E402
from batch.images import LocalImages, OpenFile, StagedImage  # noqa: E402
from batch.jobs import DEFAULT_MODEL, Job  # noqa: E402
from batch.storage.base import ImageSink  # noqa: E402

FORMATS = {"png": ("PNG", {"compress_level": 6}), "jpg": ("JPEG", {"quality": 90}),
           "webp": ("WEBP", {"quality": 85})}


def make_images(folder: Path, width: int, height: int) -> None:
    from PIL import Image

    size = (width, height)
    gradient = Image.linear_gradient("L").resize(size)
    turned = gradient.transpose(Image.Transpose.ROTATE_90).resize(size)
    image = Image.merge("RGB", (gradient, Image.effect_noise(size, 40), turned))
    for ext, (fmt, options) in FORMATS.items():
        path = folder / f"4k.{ext}"
        if not path.exists():
            image.save(path, fmt, **options)


def hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass(frozen=True)
class Answer:
    images: tuple[StagedImage, ...]


class Instant:
    """A provider whose every answer is the same staged file, at once."""

    def __init__(self, root: Path, rel: str) -> None:
        self.root, self.rel = root, rel
        self.info = probe((root / rel).read_bytes())

    async def generate(self, job: Job, sink: ImageSink) -> Answer:
        fd = os.open(self.root / self.rel, os.O_RDONLY)
        return Answer((StagedImage(self.rel, self.rel, "", 0, self.info, 0, OpenFile(fd)),))

    async def close(self) -> None:
        pass


async def through_wrapper(root: Path, rel: str, images: int, concurrency: int,
                          workers: int) -> float:
    provider = DecodeChecked(Instant(root, rel), workers=workers)
    gate = asyncio.Semaphore(concurrency)
    job = Job("bench", "p", DEFAULT_MODEL, "1:1", "4K")

    async def one() -> None:
        async with gate:
            answer = await provider.generate(job, LocalImages(root))
            answer.images[0].file.close()

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(images)))
    wall = time.perf_counter() - started
    pool = provider.children.pool
    if pool is not None:  # reap the children, so their peak RSS is counted
        pool.shutdown(wait=True)
    await provider.close()
    return wall


def child(args: argparse.Namespace) -> None:
    root = Path(args.folder)
    rel = f"4k.{args.child}"
    (root / rel).read_bytes()  # the file is in the page cache, as a just-written one is
    before = hwm_mb()
    cpu = time.process_time()
    wall = asyncio.run(through_wrapper(root, rel, args.images, args.concurrency, args.workers))
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"wall_s": wall, "cpu_s": time.process_time() - cpu,
                      "rss_before_mb": before, "rss_peak_mb": hwm_mb(),
                      "child_peak_mb": children}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="4096x4096")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "imgbatch-verify"))
    parser.add_argument("--child", choices=list(FORMATS), help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    folder = Path(args.folder)
    folder.mkdir(exist_ok=True)
    width, height = map(int, args.size.split("x"))
    make_images(folder, width, height)
    print(f"{args.size}, {args.images} answers, {args.concurrency} in flight, "
          f"{os.cpu_count()} CPUs")
    print("| format | file MB | one check: wall s / CPU s | workers | images/s | "
          "run's peak RSS added MB | decode child peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    mime = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}
    for ext in FORMATS:
        path = folder / f"4k.{ext}"
        walls, cpus = [], []
        for _ in range(3):
            wall, cpu = time.perf_counter(), time.process_time()
            decode_check(path, mime[ext])
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        one = f"{statistics.median(walls):.3f} / {statistics.median(cpus):.3f}"
        for workers in (1, 2):
            out = subprocess.run(
                [sys.executable, __file__, "--child", ext, "--workers", str(workers),
                 "--folder", str(folder), "--images", str(args.images),
                 "--concurrency", str(args.concurrency)],
                check=True, capture_output=True, text=True,
            )
            got = json.loads(out.stdout)
            print(f"| {ext} | {path.stat().st_size / 1e6:.1f} | {one} | {workers} | "
                  f"{args.images / got['wall_s']:.2f} | "
                  f"{got['rss_peak_mb'] - got['rss_before_mb']:.0f} | "
                  f"{got['child_peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
