"""Child processes for the benchmark: measured runs, the simulator, and cleanup.

Every child runs in its own session (process group) and is registered, so a
timeout, an exception or a signal to bench/run.py always ends it. A measured
child runs under bench/timed.py, which reaps it with ``os.wait4`` and records
that one process's own rusage: user and system CPU time and peak RSS, never a
running maximum over children.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
KEY = "sk-bench-not-a-secret"
_live: dict[int, subprocess.Popen[Any]] = {}


def child_env(**extra: str) -> dict[str, str]:
    """The environment of every child: the bench key, and never a proxy for loopback."""
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    env.update(QINIU_API_KEY=KEY, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
               PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    env.update(extra)
    return env


def _spawn(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    process = subprocess.Popen(list(argv), cwd=ROOT, env=child_env(), stdin=subprocess.DEVNULL,
                               start_new_session=True, **kwargs)
    _live[process.pid] = process
    return process


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def kill_all() -> None:
    """End every child still registered (SIGTERM, then SIGKILL after 3 s)."""
    for pid in list(_live):
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + 3
    for pid, process in list(_live.items()):
        with contextlib.suppress(subprocess.TimeoutExpired, ChildProcessError):
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        if process.returncode is None:
            _signal_group(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired, ChildProcessError):
                process.wait(timeout=3)
        _live.pop(pid, None)


@dataclass
class Measured:
    """One child process, measured from spawn to exit."""

    name: str
    rc: int | None
    wall_s: float
    user_s: float
    sys_s: float
    maxrss_mb: float
    timed_out: bool
    log: Path

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    def tail(self, lines: int = 5) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def last_json(self) -> dict[str, Any] | None:
        """The last line of the log that is a JSON object (our helpers print one)."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return None
        for line in reversed(text.splitlines()):
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    value = json.loads(line)
                    if isinstance(value, dict):
                        return value
        return None


def measure(name: str, argv: Sequence[str], *, logs: Path, timeout: float) -> Measured:
    """Run ``argv`` to its end (or ``timeout``) and return its own wall, CPU and peak RSS.

    The command runs under bench/timed.py (see there why), in its own process group.
    """
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    result = logs / f"{name}.rusage.json"
    result.unlink(missing_ok=True)
    with log.open("wb") as handle:
        started = time.perf_counter()
        process = _spawn([PY, str(Path(__file__).with_name("timed.py")), str(result), "--",
                          *argv], stdout=handle, stderr=subprocess.STDOUT)
        timed_out = False
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True  # not reaped yet, so the group id cannot have been reused
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        elapsed = time.perf_counter() - started
    _live.pop(process.pid, None)
    try:
        usage = json.loads(result.read_text())
    except (OSError, ValueError):
        usage = {"wall_s": elapsed, "user_s": 0.0, "sys_s": 0.0, "maxrss_kb": 0, "rc": None}
    return Measured(
        name=name, rc=None if timed_out else usage["rc"], wall_s=usage["wall_s"],
        user_s=usage["user_s"], sys_s=usage["sys_s"], maxrss_mb=usage["maxrss_kb"] / 1024,
        timed_out=timed_out, log=log,
    )


@dataclass
class Simulator:
    url: str
    process: subprocess.Popen[Any]

    def _call(self, path: str, method: str = "GET") -> dict[str, Any]:
        request = urllib.request.Request(
            self.url.removesuffix("/v1") + path, method=method,
            headers={"User-Agent": "imgbatch-bench"}, data=b"" if method == "POST" else None,
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=10) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]

    def stats(self) -> dict[str, Any]:
        return self._call("/_stats")

    def reset(self) -> None:
        self._call("/_reset", "POST")

    def cpu_s(self) -> float | None:
        """CPU time the simulator used so far (psutil), or None."""
        try:
            import psutil
        except ImportError:
            return None
        with contextlib.suppress(Exception):
            times = psutil.Process(self.process.pid).cpu_times()
            return float(times.user + times.system)
        return None


@contextlib.contextmanager
def simulator(*args: str, logs: Path, name: str, timeout: float = 20) -> Iterator[Simulator]:
    """Start ``python -m batch simulate --port 0 ARGS``; always stop it afterwards."""
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / f"{name}.simulator.log").open("wb") as errors:
        process = _spawn([PY, "-m", "batch", "simulate", "--port", "0", *args],
                         stdout=subprocess.PIPE, stderr=errors)
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], timeout)
        line = process.stdout.readline().decode(errors="replace") if ready else ""
        match = re.search(r"(http://\S+/v1)", line)
        if match is None:
            raise RuntimeError(f"the simulator did not start within {timeout:g}s: {line!r}")
        yield Simulator(match.group(1), process)
    finally:
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
        _live.pop(process.pid, None)
