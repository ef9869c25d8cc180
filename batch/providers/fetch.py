"""Input images given by http(s) URL, fetched by imgbatch for APIs that only take bytes.

Gemini's generateContent does not fetch URLs: each one is downloaded at send
time into a temporary file (streamed, capped at the manifest's size limit, its
type sniffed from the bytes) and then sent like a local file, so memory stays
flat whatever the inputs weigh. aiohttp and OS failures become JobErrors here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import tempfile
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from batch.errors import RejectedError, RequestTimeout, TransportError
from batch.imageinfo import sniff_mime
from batch.jobs import MAX_INPUT_IMAGE_BYTES, InputImage, InputKind, Job
from batch.providers.transport import CHUNK_BYTES, Transport, describe, env_proxy

_SNIFF_BYTES = 64


@contextlib.asynccontextmanager
async def urls_fetched(transport: Transport, job: Job) -> AsyncIterator[Job]:
    """``job`` with each URL input replaced by a local copy, removed afterwards."""
    if not any(image.kind is InputKind.URL for image in job.images):
        yield job
        return
    folder = Path(tempfile.mkdtemp(prefix="imgbatch-inputs-"))
    try:
        images = []
        for n, image in enumerate(job.images):
            if image.kind is InputKind.URL:
                image = await fetch(transport, image, folder / f"{n}", job.id)
            images.append(image)
        yield replace(job, images=tuple(images))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def fetch(transport: Transport, image: InputImage, path: Path, job_id: str) -> InputImage:
    """Download ``image`` (a URL input) to ``path``; the local input image it becomes."""
    session = transport.open()
    proxy, auth = env_proxy(image.ref, urllib.request.getproxies(),
                            urllib.request.proxy_bypass) or (None, {})
    # As the transport does: credentials go with the CONNECT of an https tunnel, or
    # with the request itself to a plain-http proxy.
    tunnel = urlsplit(image.ref).scheme == "https"
    digest, size, head = hashlib.sha256(), 0, b""
    where = f"input image {image.source}"
    try:
        async with asyncio.timeout(transport.config.timeout_s):
            async with session.get(
                image.ref,
                headers={"User-Agent": transport.config.user_agent, **({} if tunnel else auth)},
                proxy=proxy,
                proxy_headers=auth if tunnel and auth else None,
            ) as response:
                if response.status != 200:
                    error = TransportError if response.status >= 500 else RejectedError
                    raise error(f"{where}: HTTP {response.status} {response.reason or ''}"
                                .rstrip(), job_id=job_id)
                with open(path, "wb") as out:
                    async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                        size += len(chunk)
                        if size > MAX_INPUT_IMAGE_BYTES:
                            raise RejectedError(
                                f"{where} is over {MAX_INPUT_IMAGE_BYTES} bytes", job_id=job_id
                            )
                        if len(head) < _SNIFF_BYTES:
                            head += chunk[:_SNIFF_BYTES]
                        digest.update(chunk)
                        out.write(chunk)
    except TimeoutError:
        raise RequestTimeout(f"{where}: not fetched within {transport.config.timeout_s:g}s",
                             job_id=job_id) from None
    except aiohttp.ClientError as exc:
        raise TransportError(f"{where}: {describe(exc)}", job_id=job_id) from None
    except OSError as exc:
        raise TransportError(f"{where}: cannot store a copy: {exc.strerror}",
                             job_id=job_id) from None
    mime = sniff_mime(head)
    if mime is None:
        raise RejectedError(f"{where} is not a PNG, JPEG, WebP or GIF image", job_id=job_id)
    os.chmod(path, 0o600)
    return InputImage(InputKind.FILE, str(path), image.source, mime, digest.hexdigest(), size)
