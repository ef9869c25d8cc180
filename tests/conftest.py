"""Shared fixtures: the real simulator in a subprocess, and the real CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-canary-5f1d8e2a9c7b4e60"  # must never show up in any output


@dataclass
class Simulator:
    url: str
    process: subprocess.Popen[str]

    def stats(self) -> dict[str, Any]:
        request = urllib.request.Request(
            self.url.removesuffix("/v1") + "/_stats", headers={"User-Agent": "imgbatch-test"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]


@contextmanager
def simulator(*args: str) -> Iterator[Simulator]:
    """Start ``imgbatch simulate`` on a free port; stop it afterwards."""
    process = subprocess.Popen(
        [sys.executable, "-m", "batch", "simulate", "--port", "0", *args],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"(http://\S+/v1)", line)
        assert match, f"simulator did not start: {line!r}"
        yield Simulator(match.group(1), process)
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def run_args(manifest: Path, out: Path, sim: Simulator, *extra: str) -> list[str]:
    """The arguments of ``imgbatch run`` for ``manifest`` into ``out`` against ``sim``."""
    return ["run", str(manifest), "--output", str(out), "--base-url", sim.url, *extra]


def imgbatch_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "batch", *args]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "QINIU_API_KEY"}
    env["QINIU_API_KEY"] = KEY
    env.update(extra)
    return env


def run_cli(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the real ``imgbatch`` command and capture what it prints."""
    return subprocess.run(
        imgbatch_argv(*args),
        cwd=cwd,
        env=env if env is not None else cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def spawn_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start the real ``imgbatch`` command without waiting; stderr is a text pipe."""
    return subprocess.Popen(
        imgbatch_argv(*args),
        cwd=ROOT,
        env=env if env is not None else cli_env(),
        stderr=subprocess.PIPE,
        text=True,
    )


def read_results(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture
def write_manifest(tmp_path: Path) -> Any:
    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


from tests.s3server import moto  # noqa: E402, F401  (the S3 server fixture, for tests/test_s3_*.py)
