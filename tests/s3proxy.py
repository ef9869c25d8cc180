"""A fault-injecting HTTP proxy in front of the S3 server, over real sockets.

moto answers every request correctly; the faults a real bucket shows under
load are injected here, between the run and moto: ``503 SlowDown`` (at
random, or on every request to some keys for a while: a brownout), a
connection reset half way through a part upload's body, and a ``412
Precondition Failed`` on a create-only write (``If-None-Match: *``) that
moto would have accepted. Requests are forwarded verbatim (moto does not
check signatures, so the changed Host does not matter).
"""

from __future__ import annotations

import asyncio
import io
import random
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

_SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
_PRECONDITION = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>PreconditionFailed'
                 b"</Code><Message>At least one of the pre-conditions you specified did not "
                 b"hold</Message><Condition>If-None-Match</Condition></Error>")
_HOP = {"host", "content-length", "transfer-encoding", "connection"}


@dataclass
class Faults:
    slowdown: float = 0.0  # share of requests answered 503 SlowDown
    reset_parts: int = 0  # the first N part uploads are cut half way through their body
    # The first N create-only writes to a key containing each string get a 412 they did
    # not earn: {"/journal/": 1, "/images/": 2}.
    precondition: dict[str, int] = field(default_factory=dict)
    # The first N requests to a key containing each string get a 503 (a brownout longer
    # than the client's retries): {"/.imgbatch/staging/": 3}; may be raised mid-test.
    brownout: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    seen: Counter[str] = field(default_factory=Counter)


class FaultProxy:
    """Serves on 127.0.0.1:<port> in a thread of its own; ``url`` is its endpoint."""

    def __init__(self, upstream: str, faults: Faults) -> None:
        self.upstream = upstream
        self.faults = faults
        self._rng = random.Random(faults.seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.url = ""

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> int:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return int(self._runner.addresses[0][1])

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        faults = self.faults
        is_part = request.method == "PUT" and "partNumber" in request.query
        create_only = request.headers.get("If-None-Match") == "*"
        if faults.slowdown and self._rng.random() < faults.slowdown:
            faults.seen["slowdown"] += 1
            await request.read()
            return web.Response(status=503, body=_SLOWDOWN, content_type="application/xml")
        if is_part and faults.seen["reset"] < faults.reset_parts:
            faults.seen["reset"] += 1
            await request.content.read(max(1, (request.content_length or 2) // 2))
            assert request.transport is not None
            request.transport.abort()  # a reset, half way through the part's body
            raise asyncio.CancelledError
        for part, count in faults.brownout.items():
            if part in request.path and faults.seen[f"503{part}"] < count:
                faults.seen[f"503{part}"] += 1
                await request.read()
                return web.Response(status=503, body=_SLOWDOWN, content_type="application/xml")
        for part, count in faults.precondition.items():
            if create_only and part in request.path and faults.seen[f"412{part}"] < count:
                faults.seen[f"412{part}"] += 1
                await request.read()
                return web.Response(status=412, body=_PRECONDITION,
                                    content_type="application/xml")
        faults.seen["forwarded"] += 1
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        assert self._session is not None
        async with self._session.request(request.method, self.upstream + request.path_qs,
                                         data=io.BytesIO(body), headers=headers,
                                         allow_redirects=False) as answer:
            data = await answer.read()
            out: dict[str, Any] = {k: v for k, v in answer.headers.items()
                                   if k.lower() not in _HOP}
            return web.Response(status=answer.status, body=data, headers=out)
