"""The gateway simulator, exercised over real HTTP on an ephemeral port.

Image sides are the documented table size x size factor (1K/2K/4K = 1/2/4) x ``scale``,
rounded half up, at least 1 px; at scale 1/16 every table size divides exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import gzip
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import urllib.request
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from batch.imageinfo import sniff_mime
from batch.sim.config import Faults, SimConfig, add_arguments, config_from_args
from batch.sim.server import BASE_DIMS, image_dims, start

HEADERS = {"User-Agent": "imgbatch-test/1", "Authorization": "Bearer test-key"}
PATH = "/v1/chat/completions"
Scenario = Callable[[str, aiohttp.ClientSession], Awaitable[None]]


def run(config: SimConfig, scenario: Scenario, headers: dict[str, str] | None = None) -> None:
    """Start a simulator, run ``scenario(base_url, session)`` against it, stop it."""

    async def main() -> None:
        runner, port = await start(config)
        try:
            hdrs = HEADERS if headers is None else headers
            async with aiohttp.ClientSession(headers=hdrs) as session:
                await scenario(f"http://127.0.0.1:{port}", session)
        finally:
            await runner.cleanup()

    asyncio.run(main())


def request_body(prompt: str = "a red fox", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "gemini-3.0-pro-image-preview",
        "stream": False,
        "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}],
        "image_config": {"aspect_ratio": "1:1", "image_size": "1K"},
    }
    body.update(extra)
    return body


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk, checking signature and CRCs."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind, data = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", png[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + data), kind
        out.append((kind, data))
        pos += 12 + length
    return out


def decode_png(png: bytes) -> tuple[int, int, dict[str, Any]]:
    """Width, height and the imgbatch-request metadata of a complete, valid PNG."""
    parts = chunks(png)
    assert parts[0][0] == b"IHDR" and parts[-1] == (b"IEND", b"")
    width, height, depth, colour = struct.unpack(">IIBB", parts[0][1][:10])
    assert (depth, colour) == (8, 2)
    raw = zlib.decompress(b"".join(d for k, d in parts if k == b"IDAT"))
    assert len(raw) == height * (1 + 3 * width)
    texts = [d for k, d in parts if k == b"tEXt"]
    keyword, _, meta = texts[0].partition(b"\0")
    assert keyword == b"imgbatch-request"
    return width, height, json.loads(meta)


def image_bytes(payload: dict[str, Any], index: int = 0) -> bytes:
    url = payload["choices"][0]["message"]["images"][index]["image_url"]["url"]
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return base64.b64decode(url[len(prefix) :], validate=True)


async def post(session: aiohttp.ClientSession, base: str, body: Any) -> tuple[int, Any]:
    async with session.post(base + PATH, json=body) as resp:
        return resp.status, await resp.json(content_type=None)


async def stats(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with session.get(base + "/_stats") as resp:
        result: dict[str, Any] = await resp.json()
        return result


def test_valid_requests_get_real_pngs_of_the_documented_size() -> None:
    cases = [("1:1", "1K"), ("16:9", "1K"), ("2:3", "2K"), ("21:9", "4K")]

    async def scenario(base: str, s: aiohttp.ClientSession) -> None:
        for n, (ratio, size) in enumerate(cases, start=1):
            prompt = f"a lighthouse {ratio} {size}"
            body = request_body(
                prompt,
                image_config={"aspect_ratio": ratio, "image_size": size},
                seed=7,
                temperature=0.3,
            )  # pass-through extras are fine
            status, payload = await post(s, base, body)
            assert status == 200
            assert payload["object"] == "chat.completion" and payload["id"] == f"chatcmpl-{n}"
            choice = payload["choices"][0]
            assert choice["finish_reason"] == "stop" and choice["message"]["content"] == ""
            assert choice["message"]["reasoning_content"].startswith("**")
            width, height, meta = decode_png(image_bytes(payload))
            base_w, base_h = BASE_DIMS[ratio]
            factor = {"1K": 1, "2K": 2, "4K": 4}[size]
            assert (width, height) == (base_w * factor // 16, base_h * factor // 16)
            assert meta == {"prompt_sha256": sha(prompt), "n": n}
            usage = payload["usage"]
            image_tokens = 2000 if size == "4K" else 1120
            details = usage["completion_tokens_details"]
            assert details["image_tokens"] == image_tokens
            assert usage["completion_tokens"] == image_tokens + details["reasoning_tokens"]
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    run(SimConfig(scale=1 / 16), scenario)


def test_image_dims_rounding() -> None:
    assert image_dims("1:1", "1K") == (1024, 1024)
    assert image_dims("21:9", "4K") == (6336, 2688)
    assert image_dims("9:16", "1K", 1 / 1000) == (1, 1)  # 0.768 -> 1, 1.376 -> 1
    assert image_dims("2:3", "1K", 0.5 / 848) == (1, 1)  # 0.5 rounds up; min 1


def test_input_images_count_toward_prompt_tokens_and_string_content_works() -> None:
    png = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()
    parts: list[dict[str, Any]] = [{"type": "text", "text": "x" * 40}]
    parts += [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}]
    parts += [{"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}]

    async def scenario(base: str, s: aiohttp.ClientSession) -> None:
        status, payload = await post(
            s, base, request_body(messages=[{"role": "user", "content": parts}])
        )
        assert status == 200 and payload["usage"]["prompt_tokens"] == 10 + 2 * 560
        body = request_body(
            model="gemini-2.5-flash-image",
            messages=[
                {"role": "system", "content": "be nice"},
                {"role": "user", "content": "a cat"},
            ],
        )
        del body["image_config"]
        status, payload = await post(s, base, body)
        assert status == 200 and payload["model"] == "gemini-2.5-flash-image"
        assert decode_png(image_bytes(payload))[2]["prompt_sha256"] == sha("a cat")

    run(SimConfig(scale=1 / 64), scenario)


def test_api_key_required() -> None:
    async def scenario(base: str, s: aiohttp.ClientSession) -> None:
        for auth in (None, "Bearer wrong", "Bearer ", "secret"):
            headers = {"User-Agent": "imgbatch-test/1"}
            if auth is not None:
                headers["Authorization"] = auth
            async with aiohttp.ClientSession(headers=headers) as other:
                status, payload = await post(other, base, request_body())
            assert status == 401
            assert payload == {
                "error": {
                    "message": "invalid api key",
                    "type": "invalid_request_error",
                    "code": "invalid_api_key",
                }
            }
        status, _ = await post(s, base, request_body())
        assert status == 200

    run(SimConfig(api_key="test-key", scale=1 / 64), scenario)


@pytest.mark.parametrize("agent", [None, "Python-urllib/3.11", "python-requests/2.32", ""])
def test_default_library_user_agents_are_refused(agent: str | None) -> None:
    headers = {"Authorization": "Bearer k"}
    if agent is not None:
        headers["User-Agent"] = agent

    async def scenario(base: str, s: aiohttp.ClientSession) -> None:
        async with s.post(base + PATH, json=request_body()) as resp:
            assert resp.status == 403
            assert await resp.text() == "error code: 1010"

    run(SimConfig(), scenario, headers=headers)


BAD_BODIES: list[tuple[Any, int]] = [
    (request_body(model=""), 400),
    (request_body(model="dall-e-3"), 404),
    (request_body(stream=True), 400),
    (request_body(messages=[]), 400),
    (request_body(messages="hi"), 400),
    (request_body(messages=[{"content": "hi"}]), 400),
    (request_body(messages=[{"role": "system", "content": "hi"}]), 400),
    (request_body(messages=[{"role": "user", "content": [{"type": "audio"}]}]), 400),
    (
        request_body(
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]
        ),
        400,
    ),
    (
        request_body(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}],
                }
            ]
        ),
        400,
    ),
    (
        request_body(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,ab*d"}}
                    ],
                }
            ]
        ),
        400,
    ),
    (
        request_body(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "https://e.com/i.png"}}]
                    * 15,
                }
            ]
        ),
        400,
    ),
    (request_body(image_config=[]), 400),
    (request_body(image_config={"aspect_ratio": "7:3"}), 400),
    (request_body(image_config={"image_size": "1k"}), 400),
    (request_body(model="gemini-2.5-flash-image", image_config={"image_size": "2K"}), 400),
    ([1, 2], 400),
]


@pytest.mark.parametrize(("body", "status"), BAD_BODIES)
def test_invalid_requests_are_rejected(body: Any, status: int) -> None:
    async def scenario(base: str, s: aiohttp.ClientSession) -> None:
        got, payload = await post(s, base, body)
        assert got == status
        assert payload["error"]["type"] == "invalid_request_error"
        assert payload["error"]["message"]
        if status == 404:
            assert payload["error"]["message"] == "model not found"

    run(SimConfig(), scenario)


def test_invalid_json_and_unknown_paths() -> None:
    async def scenario(base: str, s: aiohttp.ClientSession) -> None:
        headers = {"Content-Type": "application/json"}
        async with s.post(base + PATH, data=b"{not json", headers=headers) as resp:
            assert resp.status == 400
        for method, path in (("POST", "/chat/completions"), ("GET", PATH), ("POST", "/v2" + PATH)):
            async with s.request(method, base + path, json=request_body()) as resp:
                assert resp.status == 404
                assert (await resp.json())["error"]["message"] == "not found"

    run(SimConfig(), scenario)


def test_rpm_limit_answers_429_with_retry_after() -> None:
    async def scenario(base: str, s: aiohttp.ClientSession) -> None:
        for i in range(3):
            assert (await post(s, base, request_body(f"p{i}")))[0] == 200
        async with s.post(base + PATH, json=request_body("p3")) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "2"  # ~1.99 s left, rounded up
            assert 1000 < int(resp.headers["retry-after-ms"]) <= 2000
            assert (await resp.json())["error"]["type"] == "rate_limit_error"
        assert (await stats(s, base))["faults"]["rpm_limit"] == 1

    run(SimConfig(rpm_limit=3, rate_window_s=2.0, scale=1 / 64), scenario)


def test_quota_headers_name_the_spent_window_and_only_it() -> None:
    async def scenario(base: str, s: aiohttp.ClientSession) -> None:
        # The first request meets the rate_limit fault: the gateway's own 429, no quota named.
        async with s.post(base + PATH, json=request_body("p0")) as resp:
            assert resp.status == 429 and "x-ratelimit-remaining-requests" not in resp.headers
        assert (await post(s, base, request_body("p0")))[0] == 200
        async with s.post(base + PATH, json=request_body("p1")) as resp:
            assert resp.status == 429  # the window of two requests is spent
            assert resp.headers["x-ratelimit-remaining-requests"] == "0"
            assert 1.0 < float(resp.headers["x-ratelimit-reset-requests"].rstrip("s")) <= 2.0
        gemini = base + "/v1beta/models/gemini-3-pro-image-preview:generateContent"
        async with s.post(gemini, json={"contents": [{"parts": [{"text": "p2"}]}]},
                          headers={"x-goog-api-key": "k"}) as resp:
            assert resp.status == 429
            details = (await resp.json())["error"]["details"]
            assert any(d["@type"].endswith("QuotaFailure") for d in details)

    faults = replace(Faults(), rate_limit=1.0)
    run(SimConfig(rpm_limit=2, rate_window_s=2.0, scale=1 / 64, quota_headers=True,
                  faults=faults), scenario)


def test_a_gemini_429_of_its_own_names_no_quota() -> None:
    async def scenario(base: str, s: aiohttp.ClientSession) -> None:
        gemini = base + "/v1beta/models/gemini-3-pro-image-preview:generateContent"
        async with s.post(gemini, json={"contents": [{"parts": [{"text": "p"}]}]},
                          headers={"x-goog-api-key": "k"}) as resp:
            assert resp.status == 429
            details = (await resp.json())["error"]["details"]
            assert [d["@type"].rsplit(".", 1)[-1] for d in details] == ["RetryInfo"]

    run(SimConfig(scale=1 / 64, faults=replace(Faults(), rate_limit=1.0)), scenario)


async def _expect_fault(fault: str, base: str, s: aiohttp.ClientSession) -> None:
    """One request hit by ``fault``; the retry of the same prompt then succeeds."""
    async with s.post(base + PATH, json=request_body()) as resp:
        if fault == "rate_limit":
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "1"
            assert resp.headers["retry-after-ms"] == "50"
            assert (await resp.json())["error"]["message"] == "Rate limit exceeded"
        elif fault == "server_error_json":
            assert resp.status in (500, 503)
            assert (await resp.json())["error"]["code"] == resp.status
        elif fault == "server_error_html":
            assert resp.status == 502 and resp.content_type == "text/html"
            assert "nginx" in await resp.text()
        elif fault == "server_error_text":
            assert resp.status == 525 and await resp.text() == "SSL Handshake Failed"
        elif fault == "truncate":
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        elif fault == "bad_base64":
            with pytest.raises(binascii.Error):
                image_bytes(await resp.json())
        elif fault == "no_image":
            message = (await resp.json())["choices"][0]["message"]
            assert "images" not in message
            assert message["content"] == "I can't generate that image."
        elif fault == "error_200":
            assert resp.status == 200
            assert (await resp.json())["error"] == {"message": "upstream error", "code": 502}
        elif fault == "incomplete_image":
            png = image_bytes(await resp.json())
            assert png.startswith(b"\x89PNG") and not png.endswith(b"IEND\xaeB`\x82")
        elif fault == "bad_json":
            assert resp.status == 200
            with pytest.raises(ValueError):
                json.loads(await resp.read())
        else:
            raise AssertionError(fault)
    status, payload = await post(s, base, request_body())
    assert status == 200 and decode_png(image_bytes(payload))[2]["n"] == 2


@pytest.mark.parametrize("fault", Faults.names())
def test_each_fault_hits_the_first_attempt_only(fault: str) -> None:
    config = SimConfig(faults=Faults(**{fault: 1.0}), retry_after_s=0.05, scale=1 / 64, seed=1)

    async def scenario(base: str, s: aiohttp.ClientSession) -> None:
        if fault == "reset":
            with pytest.raises(aiohttp.ClientConnectionError):
                await post(s, base, request_body())
            status, _ = await post(s, base, request_body())
            assert status == 200
        else:
            await _expect_fault(fault, base, s)
        counts = await stats(s, base)
        assert counts["faults"] == {fault: 1} and counts["by_prompt"] == {sha("a red fox"): 2}

    run(config, scenario)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_truncate_cuts_gzipped_bodies_too(seed: int) -> None:
    config = SimConfig(faults=Faults(truncate=1.0), gzip=True, seed=seed, scale=1 / 16)

    async def scenario(base: str, s: aiohttp.ClientSession) -> None:
        async with s.post(base + PATH, json=request_body()) as resp:
            assert resp.status == 200 and resp.headers["Content-Encoding"] == "gzip"
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()

    run(config, scenario)


def test_fault_attempts_zero_means_always() -> None:
    async def scenario(base: str, s: aiohttp.ClientSession) -> None:
        for _ in range(3):
            async with s.post(base + PATH, json=request_body()) as resp:
                assert resp.status == 502
        assert (await stats(s, base))["faults"] == {"server_error_html": 3}

    config = SimConfig(faults=Faults(server_error_html=1.0), fault_attempts=0)
    run(config, scenario)


def test_wire_variants_jpeg_lie_slashes_gzip_padding_several_images() -> None:
    config = SimConfig(scale=1 / 32, jpeg_lie=1.0, escape_slashes=True, gzip=True)

    async def scenario(base: str, s: aiohttp.ClientSession) -> None:
        async with (
            aiohttp.ClientSession(headers=HEADERS, auto_decompress=False) as raw,
            raw.post(base + PATH, json=request_body()) as resp,
        ):
            assert resp.headers["Content-Encoding"] == "gzip"
            text = gzip.decompress(await resp.read()).decode()
        assert "\\/" in text and "/" not in text.replace("\\/", "")
        jpeg = image_bytes(json.loads(text))
        assert sniff_mime(jpeg) == "image/jpeg" and jpeg.endswith(b"\xff\xd9")
        assert b'imgbatch-request\0{"prompt_sha256": "' + sha("a red fox").encode() in jpeg

    run(config, scenario)

    config = SimConfig(scale=1 / 16, payload_bytes=300_000, images_per_response=3)

    async def padded(base: str, s: aiohttp.ClientSession) -> None:
        status, payload = await post(s, base, request_body())
        assert status == 200
        images = [image_bytes(payload, i) for i in range(3)]
        assert [im["index"] for im in payload["choices"][0]["message"]["images"]] == [0, 1, 2]
        assert len(set(images)) == 3 and all(len(im) == 300_000 for im in images)
        assert all(decode_png(im)[:2] == (64, 64) for im in images)
        assert any(kind == b"npAd" for kind, _ in chunks(images[0]))
        assert payload["usage"]["completion_tokens_details"]["image_tokens"] == 3 * 1120

    run(config, padded)


def test_stats_count_outcomes_concurrency_and_reset() -> None:
    async def scenario(base: str, s: aiohttp.ClientSession) -> None:
        results = await asyncio.gather(*(post(s, base, request_body(f"p{i}")) for i in range(4)))
        assert [status for status, _ in results] == [200] * 4
        await post(s, base, request_body("p0"))
        await post(s, base, request_body(stream=True))
        counts = await stats(s, base)
        assert counts["requests"] == 6 and counts["in_flight"] == 0
        assert counts["by_status"] == {"200": 5, "400": 1}
        assert counts["max_in_flight"] == 4  # the latency keeps all four open together
        assert counts["by_prompt"] == {sha("p0"): 2, sha("p1"): 1, sha("p2"): 1, sha("p3"): 1}
        async with s.post(base + "/_reset") as resp:
            assert resp.status == 200
        counts = await stats(s, base)
        assert counts["requests"] == 0 and counts["by_prompt"] == {} and counts["by_status"] == {}

    run(SimConfig(latency_s=0.3, latency_jitter_s=0.05, scale=1 / 64), scenario)


def test_command_line_options() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(
        parser.parse_args(
            [
                "--fault-mix",
                "0.5",
                "--fault-reset",
                "0.2",
                "--rpm-limit",
                "10",
                "--retry-after",
                "0.5",
                "--scale",
                "0.25",
                "--escape-slashes",
                "--images-per-response",
                "2",
            ]
        )
    )
    assert config.port == 8765 and config.host == "127.0.0.1"
    assert config.faults.reset == 0.2 and config.faults.truncate == pytest.approx(0.05)
    assert config.rpm_limit == 10 and config.retry_after_s == 0.5 and config.scale == 0.25
    assert config.escape_slashes and not config.gzip and config.images_per_response == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["--fault-reset", "1.5"])
    with pytest.raises(ValueError):
        config_from_args(parser.parse_args(["--fault-mix", "1", "--fault-reset", "1"]))


def test_serve_prints_its_address_and_stops_on_sigint() -> None:
    code = (
        "import argparse, sys\n"
        "from batch.sim.config import add_arguments, config_from_args\n"
        "from batch.sim.server import serve\n"
        "p = argparse.ArgumentParser(); add_arguments(p)\n"
        "sys.exit(serve(config_from_args(p.parse_args(sys.argv[1:]))))\n"
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--port", "0"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        prefix = "imgbatch simulator listening on http://127.0.0.1:"
        assert line.startswith(prefix) and line.endswith("/v1\n")
        port = int(line[len(prefix) : -4])
        request = urllib.request.Request(f"http://127.0.0.1:{port}/_stats", headers=HEADERS)
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert json.load(resp)["requests"] == 0
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_simulator_takes_its_batch_files_with_it(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Each simulator started used to leave a folder in /tmp (5,664 of them, 12 GB of batch
    files, on this machine after a day of tests): made on the first upload, gone at stop."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    async def scenario(url: str, session: aiohttp.ClientSession) -> None:
        assert not list(tmp_path.iterdir())  # none until a batch file comes
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", b'{"custom_id": "a"}\n', filename="in.jsonl")
        async with session.post(f"{url}/v1/files", data=form) as resp:
            assert resp.status == 200, await resp.text()
        assert [p.name[:13] for p in tmp_path.iterdir()] == ["imgbatch-sim-"]

    run(SimConfig(), scenario)
    assert not list(tmp_path.iterdir())
