"""Local stand-in for the image APIs imgbatch speaks, all three on one port.

Chat completions at ``/v1/chat/completions`` (Qiniu, OpenRouter), Gemini's
``/v1beta/models/{model}:generateContent`` and OpenAI's ``/v1/images/generations``
and ``/v1/images/edits``. It answers with real PNGs and injects the same faults,
latency and rate limits into each, in each protocol's own shapes
(:mod:`batch.sim.protocols`), so the clients can be tested and shown offline.
The images are made by :mod:`batch.sim.images`.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import gzip
import hashlib
import random
import signal
import time

from aiohttp import web

from batch.sim import batch_openai
from batch.sim.batch_gemini import GeminiBatchSim
from batch.sim.batchclock import BatchSimState
from batch.sim.config import SimConfig
from batch.sim.images import BASE_DIMS as BASE_DIMS
from batch.sim.images import SIZE_FACTOR as SIZE_FACTOR
from batch.sim.images import TEXT_KEYWORD as TEXT_KEYWORD
from batch.sim.images import PngMaker, colour, image_dims, jpeg, label_lines, request_text
from batch.sim.protocols import Chat, Gemini, Images, Outcome, Wire
from batch.sim.wire import FLASH_MODEL as FLASH_MODEL
from batch.sim.wire import KNOWN_MODELS as KNOWN_MODELS
from batch.sim.wire import Parsed, Refusal, Reject, error_body, server_error

CHUNK = 64 * 1024
_BLOCKED_AGENTS = ("python-urllib", "python-requests", "python/")


class _Simulator:
    """All per-server state: counters, fault bookkeeping, caches."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.serial = 0
        self.in_flight = 0
        self.pngs = PngMaker(config.payload_bytes)
        self.wires: dict[str, Wire] = {
            "chat": Chat(config.escape_slashes), "gemini": Gemini(), "images": Images(),
        }
        # The batch APIs: their clock, counters and files (not cleared by /_reset).
        self.batches = BatchSimState(config.batch)
        self.gemini_batch = GeminiBatchSim(self.batches, self._draw, self._gemini_key,
                                           config.block_word, config.refuse_prompt)
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.served = 0  # answers that counted against a daily quota
        self.max_in_flight = self.in_flight
        self.by_status: collections.Counter[str] = collections.Counter()
        self.faults: collections.Counter[str] = collections.Counter()
        self.by_prompt: collections.Counter[str] = collections.Counter()
        self.attempts: collections.Counter[str] = collections.Counter()
        self.paid: collections.Counter[str] = collections.Counter()  # clean image answers
        self.window: collections.deque[float] = collections.deque()

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({
            "requests": self.requests, "by_status": dict(self.by_status),
            "faults": dict(self.faults), "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight, "by_prompt": dict(self.by_prompt),
            "paid_by_prompt": dict(self.paid),
            "batch": self.batches.stats(),
        })

    async def advance_batches(self, request: web.Request) -> web.Response:
        """Move the batch clock: ``POST /_batch/advance?s=SECONDS``."""
        self.batches.clock.advance(float(request.query.get("s", "0")))
        return web.json_response({"clock_offset_s": self.batches.clock.offset_s})

    def _gemini_key(self, request: web.Request) -> web.Response | None:
        refused = self.wires["gemini"].auth(request, self.config.api_key)
        if refused is None:
            return None
        status, pieces, headers = refused
        return web.Response(status=status, body=b"".join(pieces), headers=headers,
                            content_type="application/json")

    def _draw(self, parsed: Parsed, key: str, serial: int) -> bytes:
        """One batch line's image (base64), drawn as a generateContent answer's would be."""
        sha = hashlib.sha256(parsed.prompt.encode()).hexdigest()
        label = tuple(label_lines(key, parsed.prompt))
        return self._image(parsed, sha, serial, 0, "", 0.0, label)

    async def input_image(self, request: web.Request) -> web.Response:
        """A PNG to name as a URL input image: ``/_inputs/{width}x{height}.png``."""
        try:
            width, height = (int(side) for side in request.match_info["dims"].split("x"))
        except ValueError:
            raise web.HTTPNotFound() from None
        if not (0 < width <= 4096 and 0 < height <= 4096):
            raise web.HTTPNotFound()
        png = self.pngs.png(width, height, bytes.fromhex("4080c0"), b"input")
        return web.Response(body=png, content_type="image/png")

    async def reset_handler(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    async def not_found(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        return await self._gate(request) or await self._error(request, 404, "not found")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, self.wires["chat"])

    async def gemini(self, request: web.Request) -> web.StreamResponse:
        model, _, method = request.match_info.get("tail", "").partition(":")
        if method == "batchGenerateContent" and request.method == "POST":
            self.requests += 1
            return await self.gemini_batch.create(request, model)
        return await self._serve(request, self.wires["gemini"])

    async def images(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, self.wires["images"])

    async def _serve(self, request: web.Request, wire: Wire) -> web.StreamResponse:
        self.requests += 1
        self.serial += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request, wire, self.serial)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request, wire: Wire, n: int) -> web.StreamResponse:
        cfg = self.config
        blocked = await self._gate(request)
        if blocked is not None:
            return blocked
        if request.method != "POST":
            return await self._error(request, 404, "not found")
        refused = wire.auth(request, cfg.api_key)
        if refused is not None:
            return await self._out(request, refused)
        try:
            parsed = await wire.parse(request)
        except Reject as exc:
            return await self._out(request, wire.reject(exc))
        if cfg.refuse_prompt and cfg.refuse_prompt.lower() in parsed.prompt.lower():
            refusal = Reject(400, "The prompt was blocked by the content policy "
                             "(PROHIBITED_CONTENT)", "content_policy_violation")
            return await self._out(request, wire.reject(refusal))
        sha = hashlib.sha256(parsed.prompt.encode()).hexdigest()
        self.by_prompt[sha] += 1
        if cfg.daily_quota and self.served >= cfg.daily_quota:
            self.faults["daily_quota"] += 1
            return await self._out(request, wire.rate_limited(cfg.retry_after_s, Refusal.DAY,
                                                                    cfg.quota_headers))
        wait = self._admit()
        if wait is not None:
            self.faults["rpm_limit"] += 1
            return await self._out(request, wire.rate_limited(wait, Refusal.WINDOW,
                                                                    cfg.quota_headers))
        self.attempts[sha] += 1
        picked = None
        if cfg.fault_attempts == 0 or self.attempts[sha] <= cfg.fault_attempts:
            picked = cfg.faults.pick(self.rng.random())
        fault, where = picked if picked is not None else ("", 0.0)
        if fault:
            self.faults[fault] += 1
        if fault == "rate_limit":  # quota rejections come back at once, before any latency
            return await self._out(request, wire.rate_limited(cfg.retry_after_s, Refusal.NOISE,
                                                                    cfg.quota_headers))
        delay = cfg.latency_s + cfg.latency_jitter_s * self.rng.random()
        if delay > 0:
            await asyncio.sleep(delay)
        if fault == "reset":
            if request.transport is not None:
                request.transport.abort()
            return web.Response()  # aiohttp fails to write it and drops the connection
        if fault == "server_error_json":
            status = 500 if where < 0.5 else 503
            message = "internal server error" if status == 500 else "model overloaded, try later"
            return await self._out(request, wire.server_error(status, message))
        canned = server_error(fault, where)
        if canned is not None:  # what a proxy in front says, the same for every protocol
            status, body, content_type, reason = canned
            return await self._send(request, status, [body], content_type, reason=reason)
        if cfg.block_word and cfg.block_word.lower() in parsed.prompt.lower():
            self.faults["blocked"] += 1
            fault = "blocked"
        self.served += 1
        if fault == "bad_json":  # a proxy's page served as 200
            page = b"<html><body>upstream returned an invalid response</body></html>"
            return await self._send(request, 200, [page], "application/json")
        label = tuple(label_lines(request.headers.get("X-Imgbatch-Job", ""), parsed.prompt))
        images = [] if fault in ("no_image", "blocked", "error_200") else [
            wire.image_prefix + self._image(parsed, sha, n, i, fault, where, label)
            for i in range(cfg.images_per_response)
        ]
        if not fault:
            self.paid[sha] += 1  # what a real API bills: a complete image sent back
        status, pieces, headers = wire.answer(parsed, images, fault, sha, n)
        cut = where if fault == "truncate" else None
        return await self._send(request, status, pieces, "application/json", headers=headers,
                                cut=cut)

    async def _out(self, request: web.Request, outcome: Outcome) -> web.StreamResponse:
        status, pieces, headers = outcome
        return await self._send(request, status, pieces, "application/json", headers=headers)

    async def _gate(self, request: web.Request) -> web.StreamResponse | None:
        agent = request.headers.get("User-Agent", "").strip().lower()
        if not agent or agent.startswith(_BLOCKED_AGENTS):
            return await self._send(request, 403, [b"error code: 1010"], "text/plain")
        return None

    def _admit(self) -> float | None:
        """Seconds until a slot frees if the sliding window is full, else take a slot."""
        limit, window = self.config.rpm_limit, self.config.rate_window_s
        if limit <= 0:
            return None
        now = time.monotonic()
        while self.window and self.window[0] <= now - window:
            self.window.popleft()
        if len(self.window) >= limit:
            return self.window[0] + window - now
        self.window.append(now)
        return None

    async def _error(self, request: web.Request, status: int, message: str,
                     code: str | None = None) -> web.StreamResponse:
        body = error_body(message, "invalid_request_error", code)
        return await self._send(request, status, [body], "application/json")

    async def _send(self, request: web.Request, status: int, pieces: list[bytes],
                    content_type: str, headers: dict[str, str] | None = None,
                    reason: str | None = None, cut: float | None = None) -> web.StreamResponse:
        """Write the body in CHUNKs under a full Content-Length.

        With ``cut`` (0..1), hang up after that fraction of the bytes, at least one
        byte short of the end.
        """
        self.by_status[str(status)] += 1
        headers = dict(headers or {})
        if self.config.gzip and "gzip" in request.headers.get("Accept-Encoding", "").lower():
            pieces = [gzip.compress(b"".join(pieces), compresslevel=1)]
            headers["Content-Encoding"] = "gzip"
        total = sum(len(p) for p in pieces)
        resp = web.StreamResponse(status=status, reason=reason, headers=headers)
        resp.content_type = content_type
        resp.content_length = total
        limit = total if cut is None else 1 + int(cut * (total - 2))
        try:
            await resp.prepare(request)
            sent = 0
            for piece in pieces:
                view = memoryview(piece)
                for start in range(0, len(view), CHUNK):
                    if sent >= limit:
                        break
                    part = view[start:start + min(CHUNK, limit - sent)]
                    await resp.write(part)
                    sent += len(part)
            if cut is not None and request.transport is not None:
                request.transport.close()  # flushes what was written, then FIN
        except ConnectionError:
            pass  # the client left; aiohttp notices on write_eof and drops the connection
        return resp

    def _image(self, parsed: Parsed, sha: str, n: int, index: int, fault: str,
               where: float, label: tuple[str, ...] = ()) -> bytes:
        """One answer image's base64."""
        meta = request_text(sha, n)
        cfg = self.config
        if parsed.output_format == "jpeg":
            data = jpeg(meta)
        elif cfg.jpeg_lie and self.rng.random() < cfg.jpeg_lie:
            self.faults["jpeg_lie"] += 1
            data = jpeg(meta)
        else:
            if parsed.pixels is not None:
                dims = tuple(max(1, round(side * cfg.scale)) for side in parsed.pixels)
            else:
                dims = image_dims(parsed.aspect_ratio, parsed.image_size, cfg.scale)
            data = self.pngs.png(dims[0], dims[1], colour(sha, index), meta, label)
        if fault == "incomplete_image":  # somewhere after the header, always before the end
            data = data[:33 + int(where * (len(data) - 45))]
        b64 = base64.b64encode(data)
        if fault == "bad_base64":
            middle = len(b64) // 2
            b64 = b64[:middle] + b"***" + b64[middle:]
        return b64


def build_app(config: SimConfig) -> web.Application:
    sim = _Simulator(config)
    # 14 input images of up to 7 MiB each, base64-encoded, must fit.
    app = web.Application(client_max_size=256 * 1024 * 1024)
    app.router.add_get("/_stats", sim.stats)
    app.router.add_post("/_reset", sim.reset_handler)
    app.router.add_get(r"/_inputs/{dims:\d+x\d+}.png", sim.input_image)
    app.router.add_post("/_batch/advance", sim.advance_batches)
    sim.gemini_batch.routes(app)
    app.router.add_route("*", "/v1/chat/completions", sim.chat)
    app.router.add_route("*", "/v1beta/models/{tail}", sim.gemini)
    app.router.add_route("*", "/v1/images/generations", sim.images)
    app.router.add_route("*", "/v1/images/edits", sim.images)
    batch_openai.install(app, config, sim.batches)
    app.router.add_route("*", "/{tail:.*}", sim.not_found)
    app.on_cleanup.append(sim.batches.remove)
    return app


async def start(config: SimConfig) -> tuple[web.AppRunner, int]:
    """Start serving; returns the runner (call ``cleanup()``) and the bound port."""
    runner = web.AppRunner(build_app(config), handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, config.host, config.port).start()
    return runner, int(runner.addresses[0][1])


async def _serve(config: SimConfig) -> None:
    runner, port = await start(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    host = f"[{config.host}]" if ":" in config.host else config.host
    print(f"imgbatch simulator listening on http://{host}:{port}/v1", flush=True)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await runner.cleanup()


def serve(config: SimConfig) -> int:
    """Run until SIGINT/SIGTERM. Prints one line with the address once listening."""
    asyncio.run(_serve(config))
    return 0
