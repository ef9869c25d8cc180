"""The shared transport: its two timeouts, and URL inputs fetched for Gemini.

A 4K body still flowing after --timeout must arrive (it is paid for); a body that
stops flowing, or only trickles, must be ended. A URL input is capped and sniffed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from batch.errors import RejectedError, RequestTimeout
from batch.jobs import MAX_INPUT_IMAGE_BYTES, InputImage, InputKind
from batch.providers.base import ClientConfig, Secret
from batch.providers.fetch import fetch
from batch.providers.transport import MIN_PROGRESS_BYTES, Transport
from tests.conftest import KEY
from tests.test_hardening import PIXEL, LoopThread, a_job, completion, generate


def slow_gateway(pause_s: float, pieces: int, stop_after: int | None = None) -> web.Application:
    """Headers at once, then the body in ``pieces`` parts ``pause_s`` apart.

    With ``stop_after``, the body stops (the connection stays open) after that many.
    """
    # Leading whitespace is valid JSON: each part moves enough bytes not to count as a stall.
    padding = b" " * (2 * MIN_PROGRESS_BYTES)
    body = completion("data:image/png;base64," + base64.b64encode(PIXEL).decode())
    parts = [padding] * (pieces - 1) + [body]

    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = sum(map(len, parts))
        await response.prepare(request)
        for n, part in enumerate(parts):
            if stop_after is not None and n == stop_after:
                await asyncio.sleep(3600)
            await response.write(part)
            await asyncio.sleep(pause_s)
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    return app


def config(port: int, timeout_s: float, stall_s: float) -> ClientConfig:
    return ClientConfig(base_url=f"http://127.0.0.1:{port}/v1", api_key=Secret(KEY),
                        timeout_s=timeout_s, stall_timeout_s=stall_s)


@pytest.fixture
def servers() -> Iterator[LoopThread]:
    with LoopThread() as loop:
        yield loop


def test_a_body_flowing_past_the_timeout_is_received(tmp_path: Path, servers: LoopThread) -> None:
    # 6 parts 0.2 s apart: 1.2 s of body, four times the wait allowed for the answer to start.
    port = servers.serve(slow_gateway(0.2, 6))
    generation = generate(config(port, timeout_s=0.3, stall_s=0.3), tmp_path, a_job())
    assert len(generation.images) == 1 and generation.latency_s > 0.9


def test_a_body_that_stops_is_ended_by_the_stall_timeout(
    tmp_path: Path, servers: LoopThread
) -> None:
    port = servers.serve(slow_gateway(0.05, 6, stop_after=2))
    with pytest.raises(RequestTimeout, match="stalled"):
        generate(config(port, timeout_s=30, stall_s=0.4), tmp_path, a_job())
    assert list((tmp_path / "images").iterdir()) == []


def input_server(body: bytes, content_type: str = "image/png") -> web.Application:
    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type)

    app = web.Application()
    app.router.add_get("/in.png", serve)
    return app


@pytest.mark.parametrize(("body", "problem"), [
    (b"\x89PNG\r\n\x1a\n" + b"\0" * (MAX_INPUT_IMAGE_BYTES + 1), "over 7340032 bytes"),
    (b"<html>not an image</html>", "is not a PNG, JPEG, WebP or GIF"),
])
def test_url_inputs_are_fetched_with_a_cap_and_a_sniff(
    tmp_path: Path, servers: LoopThread, body: bytes, problem: str
) -> None:
    port = servers.serve(input_server(body))
    url = f"http://127.0.0.1:{port}/in.png"
    image = InputImage(InputKind.URL, url, url, None, "d")
    transport = Transport(config(port, timeout_s=10, stall_s=10))

    async def once() -> None:
        try:
            await fetch(transport, image, tmp_path / "copy", "job")
        finally:
            await transport.close()

    with pytest.raises(RejectedError, match=problem):
        asyncio.run(once())


def test_a_fetched_url_input_is_a_local_file_with_its_own_digest(
    tmp_path: Path, servers: LoopThread
) -> None:
    port = servers.serve(input_server(PIXEL, "application/octet-stream"))  # the bytes decide
    url = f"http://127.0.0.1:{port}/in.png"
    transport = Transport(config(port, timeout_s=10, stall_s=10))

    async def once() -> InputImage:
        try:
            return await fetch(transport, InputImage(InputKind.URL, url, url, None, "d"),
                               tmp_path / "copy", "job")
        finally:
            await transport.close()

    got = asyncio.run(once())
    assert (got.kind, got.mime, got.size_bytes) == (InputKind.FILE, "image/png", len(PIXEL))
    assert got.digest == hashlib.sha256(PIXEL).hexdigest()
    assert Path(got.ref).read_bytes() == PIXEL
