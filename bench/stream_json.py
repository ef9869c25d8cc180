"""Design check: imgbatch's stream decoder vs a streaming JSON library (ijson) on one answer.

One ~17 MB chat-completions body (a 12.7 MB image as base64 in a data URL) is
fed in 64 KiB pieces. A streaming JSON parser streams the structure but hands
each string value over whole, so the base64 text (and its decoded bytes) are
held at once; the stream decoder emits image bytes as they arrive. Throughput
is the best of 2 untraced runs; peak memory is traced (tracemalloc) in a third.

    .venv/bin/pip install ijson   # not a dependency of imgbatch
    .venv/bin/python bench/stream_json.py
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
import tracemalloc
from collections.abc import Callable, Iterator

from batch.decoder import BodyDecoder, ImageBytes

PIECE = 64 * 1024


def make_body(size: int) -> tuple[bytes, int]:
    raw = os.urandom(size)
    url = "data:image/png;base64," + base64.b64encode(raw).decode()
    answer = {"choices": [{"message": {"role": "assistant", "content": "", "images": [
        {"type": "image_url", "image_url": {"url": url}}]}}]}
    return json.dumps(answer).encode(), size


def pieces(body: bytes) -> Iterator[bytes]:
    for start in range(0, len(body), PIECE):
        yield body[start:start + PIECE]


class _Stream(io.RawIOBase):
    def __init__(self, body: bytes) -> None:
        self._pieces = pieces(body)
        self._left = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        if not self._left:
            self._left = next(self._pieces, b"")
        n = min(len(buffer), len(self._left))
        buffer[:n] = self._left[:n]
        self._left = self._left[n:]
        return n


def with_decoder(body: bytes) -> int:
    decoder, out = BodyDecoder(), 0
    for piece in pieces(body):
        for event in decoder.feed(piece):
            if type(event) is ImageBytes:
                out += len(event.data)
    decoder.finish()
    return out


def with_ijson(body: bytes) -> int:
    import ijson  # type: ignore[import-not-found]

    out = 0
    for prefix, _, value in ijson.parse(io.BufferedReader(_Stream(body), PIECE)):
        if prefix.endswith("image_url.url"):
            out += len(base64.b64decode(value.partition(",")[2]))
    return out


def measure(name: str, run: Callable[[bytes], int], body: bytes, size: int) -> None:
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        assert run(body) == size
        best = min(best, time.perf_counter() - t0)
    tracemalloc.start()
    run(body)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(json.dumps({"what": name, "mb_per_s_of_body": round(len(body) / best / 1e6, 1),
                      "peak_traced_mb": round(peak / 1e6, 2), "body_mb": len(body) / 1e6}))


def main() -> None:
    body, size = make_body(12_700_000)
    measure("imgbatch BodyDecoder", with_decoder, body, size)
    try:
        import ijson
    except ImportError:
        print('{"what": "ijson", "skipped": "pip install ijson to compare"}')
        return
    measure(f"ijson ({ijson.backend})", with_ijson, body, size)


if __name__ == "__main__":
    main()
