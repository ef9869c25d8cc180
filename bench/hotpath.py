"""Micro-benchmarks of imgbatch's hot path, run in a child process by bench/run.py.

- the stream decoder (``batch.decoder.BodyDecoder``) on a ~17 MB chat-completions
  body fed in 64 KiB chunks, plain and with every ``/`` written ``\\/``, against
  ``binascii.a2b_base64`` on the same base64 text in one call (the floor) and
  against ``json.loads`` + ``base64.b64decode`` (what the naive peer does);
- checkpoint appends (``Checkpoint.record``) per second, fsynced and not.

Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batch.checkpoint import Checkpoint, JobState
from batch.decoder import BodyDecoder, ImageBytes

CHUNK = 64 * 1024  # what batch.providers.transport reads per chunk


def make_body(payload_bytes: int, *, escape: bool) -> tuple[bytes, bytes, bytes]:
    """(body, its base64 text, the decoded image bytes) shaped like the simulator's answer."""
    raw = os.urandom(payload_bytes)
    b64 = base64.b64encode(raw)
    head = json.dumps({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant", "content": "",
            "images": [{"type": "image_url", "image_url": {"url": "@@"}, "index": 0}]}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1200, "total_tokens": 1210},
    }).encode()
    before, after = head.split(b"@@")
    body = before + b"data:image/png;base64," + b64 + after
    if escape:
        body = body.replace(b"/", b"\\/")
    return body, b64, raw


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def decode_stream(body: bytes) -> int:
    decoder = BodyDecoder()
    view = memoryview(body)
    size = 0
    for start in range(0, len(body), CHUNK):
        for event in decoder.feed(bytes(view[start:start + CHUNK])):
            if type(event) is ImageBytes:
                size += len(event.data)
    decoder.finish()
    return size


def peer_decode(body: bytes) -> int:
    document = json.loads(body)
    url = document["choices"][0]["message"]["images"][0]["image_url"]["url"]
    return len(base64.b64decode(url.split(",", 1)[1]))


def decoder_figures(payload_bytes: int, repeat: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for label, escape in (("plain", False), ("escaped", True)):
        body, b64, raw = make_body(payload_bytes, escape=escape)
        assert decode_stream(body) == len(raw), "decoder lost bytes"
        mb = len(body) / 1e6
        out[f"body_mb_{label}"] = mb
        out[f"decoder_mbps_{label}"] = mb / best_of(repeat, lambda body=body: decode_stream(body))
        out[f"peer_json_b64_mbps_{label}"] = mb / best_of(
            repeat, lambda body=body: peer_decode(body))
        if not escape:
            out["a2b_base64_mbps"] = len(b64) / 1e6 / best_of(
                repeat, lambda b64=b64: binascii.a2b_base64(b64, strict_mode=True))
    return out


def checkpoint_figures(seconds: float, folder: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    image = {"path": "images/x.png", "sha256": "0" * 64, "bytes": 123456, "mime": "image/png",
             "width": 1024, "height": 1024, "tmp": "images/.x.tmp", "mtime_ns": 1}
    for durable in (True, False):
        root = Path(tempfile.mkdtemp(prefix="ckpt-", dir=folder))
        store = Checkpoint.open(root)
        try:
            n = 0
            t0 = time.perf_counter()
            deadline = t0 + seconds
            while time.perf_counter() < deadline:
                for _ in range(20):
                    # From the on-disk record format, which outlives JobState refactors.
                    store.record(JobState.from_record({
                        "id": f"job-{n:07d}", "fp": "f" * 64, "status": "succeeded",
                        "attempts": 1, "images": [image],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 1290},
                        "latency_s": 12.345,
                    }), durable=durable)
                    n += 1
            elapsed = time.perf_counter() - t0
        finally:
            store.close()
        out["checkpoint_fsync_per_s" if durable else "checkpoint_nofsync_per_s"] = n / elapsed
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--payload-bytes", type=int, default=12_700_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per checkpoint figure")
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    args.tmp.mkdir(parents=True, exist_ok=True)
    figures = decoder_figures(args.payload_bytes, args.repeat)
    figures |= checkpoint_figures(args.seconds, args.tmp)
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
