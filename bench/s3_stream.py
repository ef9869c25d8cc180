"""Why s3:// images are spooled to disk: the memory of 16 uploads at once, two ways.

    .venv/bin/python bench/s3_stream.py [stream|spool|spool-path] [--images 16] [--mb 16]

``stream``: each image goes straight from its (simulated) response into
``obstore.put_async`` as an async iterator of 64 KiB pieces (a multipart
upload; obstore buffers a 5 MiB part per upload, more while parts are in
flight). ``spool``: each image is written to a local file in 64 KiB pieces,
then uploaded from the file at most 4 at a time, one part in flight each,
fed in 64 KiB pieces (what batch.storage.s3images does); ``spool-path``
hands obstore the file's path instead, which it reads whole. Prints this
process's peak RSS (VmHWM) over its baseline after importing obstore.
Starts moto on a free loopback port.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.s3server import s3_server  # noqa: E402

PIECE = 64 * 1024
PARTS = 1  # parts in flight per spooled upload


def hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def pieces(size: int, block: bytes) -> AsyncIterator[bytes]:
    for _ in range(size // PIECE):
        await asyncio.sleep(0)  # a response arriving piece by piece
        yield bytes(bytearray(block))  # a new object each time, as a decoder's output is


async def read_file(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as handle:
        while block := handle.read(PIECE):
            await asyncio.sleep(0)
            yield block


async def run(mode: str, images: int, size: int, store: object, spool: Path) -> None:
    import obstore

    block = os.urandom(PIECE)
    gate = asyncio.Semaphore(4)

    async def one(n: int) -> None:
        if mode == "stream":
            await obstore.put_async(store, f"s/{n}.png", pieces(size, block),  # type: ignore[arg-type]
                                    chunk_size=5 * 1024 * 1024)
            return
        path = spool / f"{n}.tmp"
        with path.open("wb") as handle:
            async for piece in pieces(size, block):
                handle.write(piece)
        async with gate:
            if mode == "spool":
                await obstore.put_async(store, f"f/{n}.png", read_file(path),  # type: ignore[arg-type]
                                        chunk_size=5 * 1024 * 1024, max_concurrency=PARTS)
            else:
                await obstore.put_async(store, f"f/{n}.png", path,  # type: ignore[arg-type]
                                        chunk_size=5 * 1024 * 1024, max_concurrency=PARTS)
        path.unlink()

    await asyncio.gather(*(one(n) for n in range(images)))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("stream", "spool", "spool-path"))
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--mb", type=float, default=16.0)
    args = parser.parse_args()
    from obstore.store import S3Store

    with s3_server() as s3, tempfile.TemporaryDirectory() as tmp:
        urllib.request.urlopen(urllib.request.Request(f"{s3.endpoint}/bench", method="PUT"))
        store = S3Store("bench", endpoint=s3.endpoint, access_key_id="t", secret_access_key="t",
                        region="us-east-1", client_options={"allow_http": True})
        base = hwm_mb()
        asyncio.run(run(args.mode, args.images, int(args.mb * 1e6), store, Path(tmp)))
        peak = hwm_mb()
        import obstore

        sizes = [m["size"] for b in obstore.list(store) for m in b]
        whole = int(args.mb * 1e6) // PIECE * PIECE
        assert len(sizes) == args.images and min(sizes) >= whole, sizes
        print(f"{len(sizes)} objects of {min(sizes)} bytes")
    print(f"{args.mode}: {args.images} images of {args.mb:g} MB at once: peak RSS "
          f"{peak:.0f} MB, {peak - base:.0f} MB over the {base:.0f} MB baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
