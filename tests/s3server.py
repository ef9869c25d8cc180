"""A real S3 server on loopback for the tests: moto's server mode, in a subprocess.

Read back with obstore (what a user's own pipeline would use) and with plain
HTTP for what obstore cannot ask (multipart uploads in progress).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen[bytes]
    buckets: list[str] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        """The variables a run needs to reach this server (the endpoint goes in --s3-endpoint)."""
        return {**CREDENTIALS, **extra}

    def bucket(self, name: str) -> str:
        request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        urllib.request.urlopen(request, timeout=10).close()
        self.buckets.append(name)
        return name

    def store(self, bucket: str) -> Any:
        from obstore.store import S3Store

        return S3Store(bucket, endpoint=self.endpoint, access_key_id="testing",
                       secret_access_key="testing", region="us-east-1",
                       client_options={"allow_http": True})

    def objects(self, bucket: str, prefix: str = "") -> dict[str, int]:
        import obstore

        return {meta["path"]: meta["size"]
                for batch in obstore.list(self.store(bucket), prefix or None) for meta in batch}

    def read(self, bucket: str, key: str) -> bytes:
        import obstore

        return bytes(obstore.get(self.store(bucket), key).bytes())

    def sha256(self, bucket: str, key: str) -> str:
        return hashlib.sha256(self.read(bucket, key)).hexdigest()

    def uploads_in_progress(self, bucket: str) -> list[str]:
        with urllib.request.urlopen(f"{self.endpoint}/{bucket}?uploads", timeout=10) as answer:
            body = answer.read().decode()
        return re.findall(r"<Key>([^<]*)</Key>", body)


@contextmanager
def s3_server() -> Iterator[S3Server]:
    port = free_port()
    env = {**os.environ, **CREDENTIALS}
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.05)
        yield S3Server(f"http://127.0.0.1:{port}", process)
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def moto() -> Iterator[S3Server]:
    pytest.importorskip("obstore")
    pytest.importorskip("moto")
    with s3_server() as server:
        yield server
