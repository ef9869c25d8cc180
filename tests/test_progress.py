"""Progress output on a pipe (cron) and on a pseudo-terminal (a person)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import termios
from pathlib import Path

from tests.conftest import ROOT, cli_env, imgbatch_argv, run_args, run_cli, simulator
from tests.test_e2e import catalog


def test_on_a_pipe_plain_lines_at_intervals_and_at_the_end(tmp_path: Path) -> None:
    manifest = catalog(12, tmp_path / "p.jsonl")
    with simulator(
        "--scale",
        "0.0625",
        "--latency",
        "0.3",
        "--fault-rate-limit",
        "0.3",
        "--retry-after",
        "0.2",
        "--seed",
        "2",
    ) as sim:
        done = run_cli(
            *run_args(manifest, tmp_path / "out", sim),
            "--concurrency",
            "2",
            "--progress-interval",
            "0.5",
        )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "progress:" in line]
    assert len(lines) >= 3  # periodic ones, plus the last
    assert "\r" not in done.stderr and "|" not in done.stderr  # no bar when not a terminal
    assert re.search(
        r"12 succeeded, 0 failed, 0 retrying, 0 in flight, 12/12 done; "
        r"[\d.]+ img/min; \$1\.61 spent",
        lines[-1],
    )
    assert re.search(r"retrying job-\d+ in [\d.]+s: .*rate_limited HTTP 429", done.stderr)


def test_quiet_prints_nothing_on_success(tmp_path: Path) -> None:
    manifest = catalog(3, tmp_path / "q.jsonl")
    with simulator("--scale", "0.0625") as sim:
        done = run_cli(
            *run_args(manifest, tmp_path / "out", sim),
            "--quiet",
        )
    assert done.returncode == 0
    assert done.stderr == "" and done.stdout == ""


def test_json_log_format(tmp_path: Path) -> None:
    import json

    manifest = catalog(3, tmp_path / "j.jsonl")
    with simulator("--scale", "0.0625") as sim:
        done = run_cli(
            *run_args(manifest, tmp_path / "out", sim),
            "--log-format",
            "json",
        )
    records = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert records and all({"t", "level", "message"} <= set(r) for r in records)


def test_on_a_terminal_a_bar(tmp_path: Path) -> None:
    manifest = catalog(8, tmp_path / "t.jsonl")
    with simulator("--scale", "0.0625", "--latency", "0.2") as sim:
        leader, follower = pty.openpty()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        try:
            run = subprocess.Popen(
                imgbatch_argv(
                    *run_args(manifest, tmp_path / "out", sim),
                    "--concurrency",
                    "2",
                ),
                cwd=ROOT,
                env=cli_env(COLUMNS="120"),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=follower,
            )
            os.close(follower)
            screen = b""
            while True:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # the other end closed
                    break
                if not chunk:
                    break
                screen += chunk
            assert run.wait(timeout=60) == 0
        finally:
            os.close(leader)
    text = screen.decode("utf-8", "replace")
    assert "\r" in text  # redrawn in place
    assert re.search(r"8/8 \[", text)  # tqdm's counter
    assert "ok 8 fail 0" in text and "$1.07" in text


def test_observers_forward_every_hook_of_the_observer_interface() -> None:
    """A hook added to Observer and not forwarded would leave, e.g., "in flight" counting up."""
    import inspect

    from batch.progress import Observer, Observers

    class Recorder(Observer):
        def __init__(self) -> None:
            self.calls: list[str] = []

        def __getattribute__(self, name: str) -> object:
            if name.startswith("on_"):
                return lambda *args: object.__getattribute__(self, "calls").append(name)
            return object.__getattribute__(self, name)

    hooks = [name for name, _ in inspect.getmembers(Observer, inspect.isfunction)
             if name.startswith("on_")]
    assert "on_answer" in hooks
    first, second = Recorder(), Recorder()
    fan = Observers(first, second)
    for name in hooks:
        arity = len(inspect.signature(getattr(Observer, name)).parameters) - 1
        getattr(fan, name)(*([None] * arity))
    assert first.calls == hooks
    assert second.calls == hooks
