"""Hardening: bad input from either side ends in a clear message and a consistent checkpoint.

Never a traceback, a corrupt image marked done, a leaked key, a file outside the output
folder, or a process eating all memory. Every test drives the real CLI in a subprocess or
the real client over a loopback socket. The servers written here (the simulator, a gzip
bomb, a lying PNG, an endless body, an HTTP proxy, a CONNECT proxy, TLS) run in the event
loop of a background thread, so a CLI subprocess and in-process clients reach them alike.
Faults that cannot be produced from outside (an internal bug, a failed fsync) are injected
by running the CLI under ``python -c`` with one function or one module's ``os`` replaced.

docs/robustness.md is the table of what these tests pin.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import gc
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import socket
import ssl
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import urllib.request
import zlib
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from PIL import Image

from batch.checkpoint import Checkpoint, JobState
from batch.errors import (
    FatalApiError,
    MalformedResponse,
    RejectedError,
    StorageError,
    TransportError,
)
from batch.imageinfo import probe
from batch.images import LocalImages
from batch.jobs import DEFAULT_MODEL, InputImage, InputKind, Job, Status
from batch.providers import bodystream
from batch.providers.base import ClientConfig, Generation, Secret
from batch.providers.bodystream import INPUT_CHUNK_BYTES, stream_body
from batch.providers.chat import ChatCompletionsClient
from batch.providers.chat_wire import body_parts
from batch.providers.transport import env_proxy
from batch.sim.config import Faults, SimConfig
from batch.sim.server import build_app
from tests.conftest import KEY, ROOT, cli_env, read_results, run_cli
from tests.oracles import check_recorded_images, decode, journal, sha256_file
from tests.test_e2e import catalog

SCALE = 0.0625
PIXEL = (ROOT / "tests" / "data" / "manifests" / "pixel.png").read_bytes()
UA = {"User-Agent": "imgbatch-test"}


# -- servers on loopback, in a background event loop ------------------------------------


class LoopThread:
    """An event loop in a daemon thread that serves apps on 127.0.0.1 until closed."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._cleanups: list[Callable[[], Coroutine[Any, Any, Any]]] = []

    def __enter__(self) -> LoopThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for cleanup in reversed(self._cleanups):
                self.call(cleanup())
            self.call(_close_leftover_transports())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def on_close(self, cleanup: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        self._cleanups.append(cleanup)

    def serve(self, app: web.Application, ssl_context: ssl.SSLContext | None = None) -> int:
        async def up() -> tuple[web.AppRunner, int]:
            runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
            return runner, int(runner.addresses[0][1])

        runner, port = self.call(up())
        self.on_close(runner.cleanup)
        return int(port)

    def simulator(self, ssl_context: ssl.SSLContext | None = None, **config: Any) -> Sim:
        config.setdefault("scale", SCALE)
        port = self.serve(build_app(SimConfig(**config)), ssl_context)
        scheme = "https" if ssl_context else "http"
        return Sim(f"{scheme}://127.0.0.1:{port}/v1", port, ssl_context is not None)


async def _close_leftover_transports() -> None:
    """Close what the servers' shutdown left open on this loop, while it still runs.

    A transport still flushing its answer to a client that went away (a cap test, a
    reset) outlived the runner's cleanup and the loop; collected later, its
    ResourceWarning failed whichever test happened to run then.
    """
    loop = asyncio.get_running_loop()
    for obj in gc.get_objects():
        # Closing ones too: close() waits for the write buffer to drain, which never comes.
        if isinstance(obj, asyncio.Transport) and getattr(obj, "_loop", None) is loop:
            obj.abort()
    for _ in range(5):
        await asyncio.sleep(0)  # connection_lost closes each socket in the next steps


@dataclass
class Sim:
    url: str
    port: int
    tls: bool = False

    def stats(self, cafile: Path | None = None) -> dict[str, Any]:
        context = ssl.create_default_context(cafile=str(cafile)) if self.tls else None
        scheme = "https" if self.tls else "http"
        request = urllib.request.Request(f"{scheme}://127.0.0.1:{self.port}/_stats", headers=UA)
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]


@pytest.fixture
def servers() -> Iterator[LoopThread]:
    with LoopThread() as loop:
        yield loop


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def completion(url: str | bytes) -> bytes:
    """A minimal chat-completions answer carrying ``url`` as its one image."""
    mark = "@@URL@@"
    text = json.dumps({
        "id": "chatcmpl-test", "object": "chat.completion", "model": DEFAULT_MODEL,
        "choices": [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant", "content": "",
            "images": [{"type": "image_url", "image_url": {"url": mark}, "index": 0}]}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    })
    raw = url.encode() if isinstance(url, str) else url
    before, after = text.split(mark)
    return before.encode() + raw + after.encode()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_head(width: int, height: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + png_chunk(
        b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    )


# -- the CLI ------------------------------------------------------------------------------


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=env, timeout=60)


def run_patched(
    patch: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The real CLI, after ``patch`` (Python source) has run in its process."""
    code = (
        "import sys\n"
        + textwrap.dedent(patch)
        + "\nsys.argv[0] = 'imgbatch'\nfrom batch.cli import entry\nentry()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=env if env is not None else cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


# Makes os.write / os.fsync fail like a full disk (ENOSPC) for the files whose path matches
# a pattern, after ``after`` successful calls: wherever in batch/ the call is made from.
FAIL_DISK = """
import errno, os, re
def fail_disk(call, pattern, after=0):
    real = getattr(os, call)
    seen = []
    def failing(fd, *args):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if re.search(pattern, path):
            seen.append(path)
            if len(seen) > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, *args)
    setattr(os, call, failing)
"""
IMAGE_TEMPORARY = r"/images/\.[^/]*\.tmp$"


# Linux starts a forked child's peak RSS at its parent's, and exec keeps it: a CLI
# forked straight from this (large) pytest process would report pytest's peak. A small
# fresh interpreter spawns it instead and reports what wait4 says of it.
_MEASURE = """
import json, os, sys
pid = os.posix_spawn(sys.executable, [sys.executable, "-m", "batch", *sys.argv[2:]], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as handle:
    json.dump([os.waitstatus_to_exitcode(status), usage.ru_maxrss], handle)
"""


def run_measured(*args: str, env: dict[str, str]) -> tuple[int, str, int]:
    """(exit code, stderr, peak RSS in KiB) of one CLI run, measured by wait4."""
    with tempfile.TemporaryDirectory() as scratch, tempfile.TemporaryFile() as err:
        result = Path(scratch) / "measure.json"
        subprocess.run(
            [sys.executable, "-c", _MEASURE, str(result), *args],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, check=False,
        )
        code, peak_kib = json.loads(result.read_text())
        err.seek(0)
        return code, err.read().decode(errors="replace"), peak_kib


def no_traceback(done: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in done.stderr + done.stdout, done.stderr


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def image_files(out: Path) -> list[str]:
    folder = out / "images"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def snapshot(folder: Path) -> dict[str, tuple[bytes, int, bool]]:
    """Every entry under ``folder``: content, mtime and whether it is a link."""
    out = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        content = path.read_bytes() if stat.S_ISREG(info.st_mode) else b""
        out[str(path.relative_to(folder))] = (content, info.st_mtime_ns, path.is_symlink())
    return out


def journal_is_consistent(out: Path) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Every line of the journal parses and every success has its image, byte for byte.

    Judged without the code under test: the journal read as JSON lines, sha256 computed
    here and Pillow decoding each image (tests/oracles.py).
    """
    for line in (out / ".imgbatch" / "journal.jsonl").read_bytes().splitlines():
        json.loads(line)
    check_recorded_images(out)
    return journal(out)


def check_published_images(
    out: Path, rows: list[dict[str, Any]], *, temporaries: bool = False
) -> None:
    """Only complete images under final names, each the one a succeeded row records."""
    recorded = {image["path"]: image for row in rows for image in row["images"]}
    for row in rows:
        assert row["status"] in ("succeeded", "pending"), row
        assert (row["status"] == "succeeded") == bool(row["images"]), row
    for name in image_files(out):
        if name.startswith(".") and name.endswith(".tmp") and temporaries:
            continue  # never under a final name; the next run's open removes it
        assert not name.endswith(".tmp"), name
        path = out / "images" / name
        image = recorded[f"images/{name}"]
        assert sha256_file(path) == image["sha256"], name
        assert decode(path)[0] == (image["width"], image["height"]), name


# -- tmpfs and read-only mounts (root in this sandbox) ------------------------------------


@contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A fresh tmpfs at ``path``; skips the test where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True, text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def fill(folder: Path) -> None:
    """Fill the file system of ``folder`` to the last byte."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 16, 1 << 10, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


@contextmanager
def immutable(path: Path) -> Iterator[Path]:
    """``chattr +i``: even root cannot create files in it (root ignores mode bits)."""
    if shutil.which("chattr") is None:
        pytest.skip("no chattr command")
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i not supported here")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


# == manifests ============================================================================

BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, c in zip("abcdefgh", "bcdefghi", strict=True)
) + "jobs: *i\n"


def bad_manifest(tmp_path: Path, case: str) -> tuple[Path, str]:
    """Write the bad manifest ``case``; return its path and a word the message must hold."""
    deep = "[" * 100_000 + "]" * 100_000
    block = "".join("  " * i + "-\n" for i in range(3000))
    contents: dict[str, tuple[str, bytes | None, str]] = {
        "latin1-yaml": ("m.yaml", "- id: caf\xe9\n  prompt: x\n".encode("latin-1"), "UTF-8"),
        "utf16-jsonl": ("m.jsonl", '{"prompt": "x"}\n'.encode("utf-16"), "UTF-8"),
        "huge-jsonl-line": ("m.jsonl", b'{"prompt": "' + b"x" * 2_000_000 + b'"}\n', "longer"),
        "deep-flow-yaml": ("m.yaml", deep.encode(), "nest"),
        "deep-block-yaml": ("m.yaml", block.encode(), "nest"),
        "deep-json": ("m.json", deep.encode(), "nest"),
        "deep-jsonl-line": ("m.jsonl", b'{"prompt": ' + deep.encode() + b"}\n", "recursion"),
        "billion-laughs": ("m.yaml", BILLION_LAUGHS.encode(), "aliases"),
        "python-tag-apply": (
            "m.yaml",
            f'- id: a\n  prompt: !!python/object/apply:os.system ["touch {tmp_path}/pwned"]\n'
            .encode(), "tags that build objects"),
        "python-tag-top": (
            "m.yaml", f'!!python/object/apply:os.system ["touch {tmp_path}/pwned"]\n'.encode(),
            "tags that build objects"),
        "python-tag-new": (
            "m.yaml",
            f'- id: a\n  prompt: !!python/object/new:os.system ["touch {tmp_path}/pwned"]\n'
            .encode(), "tags that build objects"),
        "runaway-cross-product": ("m.yaml", (
            '- prompt: "{a}{b}{c}{d}{e}{f}{g}"\n  vars: {'
            + ", ".join(f"{v}: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]" for v in "abcdefg") + "}\n"
        ).encode(), "expands to"),
        "empty-yaml": ("m.yaml", b"", "no jobs"),
        "empty-jsonl": ("m.jsonl", b"\n\n", "no jobs"),
        "empty-mapping": ("m.yaml", b"jobs: []\n", "no jobs"),
        "directory": ("m.yaml", None, "directory"),
        "missing": ("m.yaml", None, "not found"),
        "fifo": ("m.jsonl", None, "not a regular file"),
        "dev-zero-link": ("m.yaml", None, "not a regular file"),
        "over-256mb": ("m.yaml", None, "limit"),
    }
    name, data, word = contents[case]
    path = tmp_path / "manifests" / name
    path.parent.mkdir(exist_ok=True)
    if data is not None:
        path.write_bytes(data)
    elif case == "directory":
        path.mkdir()
    elif case == "fifo":
        os.mkfifo(path)
    elif case == "dev-zero-link":
        path.symlink_to("/dev/zero")
    elif case == "over-256mb":
        with path.open("wb") as handle:  # sparse: costs no disk
            handle.truncate(257 * 1024 * 1024)
    return path, word


BAD_MANIFESTS = [
    "latin1-yaml", "utf16-jsonl", "huge-jsonl-line", "deep-flow-yaml", "deep-block-yaml",
    "deep-json", "deep-jsonl-line", "billion-laughs", "python-tag-apply", "python-tag-top",
    "python-tag-new", "runaway-cross-product", "empty-yaml", "empty-jsonl", "empty-mapping",
    "directory", "missing", "fifo", "dev-zero-link", "over-256mb",
]


@pytest.mark.parametrize("case", BAD_MANIFESTS)
def test_bad_manifest_validate_exits_2_naming_the_file(tmp_path: Path, case: str) -> None:
    path, word = bad_manifest(tmp_path, case)
    done = cli("validate", str(path))
    assert done.returncode == 2, done.stderr
    assert str(path) in done.stderr
    assert word.lower() in done.stderr.lower(), done.stderr
    no_traceback(done)
    assert not (tmp_path / "pwned").exists()


def test_bad_manifests_run_exits_2_and_sends_nothing(tmp_path: Path, servers: LoopThread) -> None:
    sim = servers.simulator()
    for case in BAD_MANIFESTS:
        folder = tmp_path / case
        folder.mkdir()
        path, word = bad_manifest(folder, case)
        done = cli("run", str(path), "--output", str(folder / "out"), "--base-url", sim.url)
        assert done.returncode == 2, (case, done.stderr)
        assert str(path) in done.stderr and word.lower() in done.stderr.lower(), case
        no_traceback(done)
        assert not (folder / "out").exists(), case
        assert not (folder / "pwned").exists(), case
    assert sim.stats()["requests"] == 0


def test_utf8_bom_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf- id: a\n  prompt: a cat\n")
    done = cli("validate", str(path))
    assert done.returncode == 0, done.stderr
    assert "1 job(s)" in done.stdout


# == paths ================================================================================

BAD_IDS = [
    "..", ".", "../escape", "../../etc/passwd", "/etc/passwd", "/abs", "a/b", "a\\b",
    "..\\..\\win", "a\x00b", "\x00", "CON", "con.png", "nul", "Com1", "LPT9.jpg", "aux.tar.gz",
    ".hidden", "x.", "", " ", "a b", "a\nb", "a\u2215b", "caf\u00e9", "a" * 129, "~user",
    "a:b", "a*b", "a?b", "a|b", "<a>",
]


def test_ids_that_could_name_a_path_are_rejected_at_validation(tmp_path: Path) -> None:
    path = tmp_path / "ids.jsonl"
    lines = [json.dumps({"id": ident, "prompt": "x"}) for ident in BAD_IDS]
    lines.append(json.dumps({"id": 7, "prompt": "x"}))
    lines.append(json.dumps({"id": ["a", "b"], "prompt": "x"}))
    path.write_text("\n".join(lines) + "\n")
    done = cli("validate", str(path))
    assert done.returncode == 2
    no_traceback(done)
    for number in range(1, len(lines) + 1):
        assert f"{path}:{number}: id:" in done.stderr, (number, lines[number - 1])


def test_bad_id_in_run_sends_nothing(tmp_path: Path, servers: LoopThread) -> None:
    sim = servers.simulator()
    path = tmp_path / "ids.yaml"
    path.write_text("- {id: ok, prompt: fine}\n- {id: ../../outside, prompt: escape}\n")
    out = tmp_path / "out"
    done = cli("run", str(path), "--output", str(out), "--base-url", sim.url)
    assert done.returncode == 2 and "job 2" in done.stderr and "id" in done.stderr
    no_traceback(done)
    assert sim.stats()["requests"] == 0
    assert not out.exists() and not (tmp_path / "outside.png").exists()


@contextmanager
def unwritable(kind: str, tmp_path: Path) -> Iterator[Path]:
    """Set up an output folder that cannot be used; yield it while it stays so."""
    if kind == "regular-file":
        out = tmp_path / "out"
        out.write_text("not a folder\n")
        yield out
    elif kind == "under-a-file":
        (tmp_path / "file").write_text("x")
        yield tmp_path / "file" / "out"
    elif kind == "read-only-mount":
        with tmpfs(tmp_path / "ro", "ro,size=1m") as mnt:
            yield mnt / "out"
    elif kind == "read-only-mount-prepared":
        with tmpfs(tmp_path / "ro", "size=1m") as mnt:
            (mnt / "out" / "images").mkdir(parents=True)
            (mnt / "out" / ".imgbatch").mkdir()
            remount(mnt, "ro")
            yield mnt / "out"
    elif kind == "immutable":
        out = tmp_path / "out"
        (out / "images").mkdir(parents=True)
        with immutable(out):
            yield out
    elif kind == "immutable-images":
        out = tmp_path / "out"
        (out / "images").mkdir(parents=True)
        with immutable(out / "images"):
            yield out
    elif kind == "immutable-state":
        out = tmp_path / "out"
        (out / "images").mkdir(parents=True)
        (out / ".imgbatch").mkdir()
        with immutable(out / ".imgbatch"):
            yield out
    else:  # pragma: no cover
        raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "regular-file",
        "under-a-file",
        "read-only-mount",
        "read-only-mount-prepared",
        "immutable",
        "immutable-images",
        "immutable-state",
    ],
)
def test_unusable_output_folder_is_reported_before_anything_is_sent(
    tmp_path: Path, servers: LoopThread, kind: str
) -> None:
    sim = servers.simulator()
    manifest = catalog(6, tmp_path / "m.jsonl")
    with unwritable(kind, tmp_path) as out:
        done = cli("run", str(manifest), "--output", str(out), "--base-url", sim.url)
        assert done.returncode == 2, done.stderr
        assert "imgbatch:" in done.stderr and str(out) in done.stderr, done.stderr
        no_traceback(done)
        assert sim.stats()["requests"] == 0


def test_symlinked_output_folder_is_followed(tmp_path: Path, servers: LoopThread) -> None:
    """A user may point DIR at a big disk: the tool writes into the resolved folder only."""
    sim = servers.simulator()
    manifest = catalog(3, tmp_path / "m.jsonl")
    real = tmp_path / "big-disk" / "real"
    real.mkdir(parents=True)
    link = tmp_path / "out"
    link.symlink_to(real)
    done = cli("run", str(manifest), "--output", str(link), "--base-url", sim.url)
    assert done.returncode == 0, done.stderr
    assert link.is_symlink() and image_files(real) == ["job-000.png", "job-001.png", "job-002.png"]
    assert sorted(p.name for p in (tmp_path / "big-disk").iterdir()) == ["real"]
    again = cli("run", str(manifest), "--output", str(link), "--base-url", sim.url)
    assert again.returncode == 0 and sim.stats()["requests"] == 3


@pytest.mark.parametrize(
    ("planted", "target"),
    [
        ("images", "dir"),
        (".imgbatch", "dir"),
        (".imgbatch/lock", "file"),
        (".imgbatch/journal.jsonl", "file"),
        ("images/job-000.png", "file"),
        ("results.jsonl", "file"),
        ("summary.json", "file"),
    ],
)
def test_a_symlink_planted_inside_the_output_folder_writes_nothing_outside(
    tmp_path: Path, servers: LoopThread, planted: str, target: str
) -> None:
    sim = servers.simulator()
    manifest = catalog(2, tmp_path / "m.jsonl")
    outside = tmp_path / "outside"
    (outside / "victim-dir").mkdir(parents=True)
    (outside / "victim-dir" / "keep.txt").write_text("keep\n")
    (outside / "victim.txt").write_text("precious\n")
    before = snapshot(outside)
    out = tmp_path / "out"
    link = out / planted
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside / ("victim-dir" if target == "dir" else "victim.txt"))
    done = cli("run", str(manifest), "--output", str(out), "--base-url", sim.url)
    no_traceback(done)
    assert snapshot(outside) == before
    if done.returncode == 0:  # worked around the link: it was replaced, never followed
        assert not link.is_symlink()
        check_published_images(out, read_results(out))
    else:  # or refused before anything was sent
        assert done.returncode == 2 and sim.stats()["requests"] == 0


def test_local_input_images_are_read_never_written(tmp_path: Path, servers: LoopThread) -> None:
    sim = servers.simulator()
    catalog_dir = tmp_path / "catalog"
    (catalog_dir / "inputs").mkdir(parents=True)
    sketch = catalog_dir / "inputs" / "sketch.png"
    sketch.write_bytes(PIXEL)
    os.utime(sketch, ns=(1_000_000_000, 1_000_000_000))
    manifest = catalog_dir / "edit.yaml"
    manifest.write_text(
        "jobs:\n"
        "  - {id: red, prompt: make it red, images: [inputs/sketch.png]}\n"
        "  - {id: blue, prompt: make it blue, images: [inputs/sketch.png, inputs/sketch.png]}\n"
    )
    before = snapshot(catalog_dir)
    out = tmp_path / "out"
    done = cli("run", str(manifest), "--output", str(out), "--base-url", sim.url)
    assert done.returncode == 0, done.stderr
    assert snapshot(catalog_dir) == before
    assert sim.stats()["requests"] == 2


def input_file(path: Path, size: int) -> InputImage:
    """A PNG-headed file of ``size`` random bytes, as the manifest check records it."""
    data = PIXEL[:16] + os.urandom(size - 16)
    path.write_bytes(data)
    return InputImage(InputKind.FILE, str(path), path.name, "image/png",
                      hashlib.sha256(data).hexdigest(), len(data))


def recording_gateway() -> tuple[web.Application, list[dict[str, Any]]]:
    """Answers with one tiny PNG; records each request whose body arrived whole."""
    seen: list[dict[str, Any]] = []

    async def answer(request: web.Request) -> web.Response:
        body = await request.read()  # a body cut short raises here: not recorded
        seen.append({"headers": dict(request.headers), "body": body})
        return web.Response(body=completion("data:image/png;base64,"
                                            + base64.b64encode(PIXEL).decode()),
                            content_type="application/json")

    app = web.Application(client_max_size=256 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", answer)
    return app, seen


def test_local_input_images_are_streamed_byte_exact(tmp_path: Path, servers: LoopThread) -> None:
    app, seen = recording_gateway()
    config = ClientConfig(base_url=f"http://127.0.0.1:{servers.serve(app)}/v1",
                          api_key=Secret(KEY))
    # Sizes around the client's read piece: one short, several, one byte past a multiple.
    sizes = [1000, 3 * INPUT_CHUNK_BYTES, 2 * INPUT_CHUNK_BYTES + 1]
    files = [input_file(tmp_path / f"in{i}.png", size) for i, size in enumerate(sizes)]
    url = InputImage(InputKind.URL, "https://x/y.png", "https://x/y.png", None, "d")
    job = replace(a_job(), images=(files[0], url, files[1], files[2]))
    generate(config, tmp_path / "out", job)
    (request,) = seen
    assert request["headers"]["Content-Length"] == str(len(request["body"]))
    assert "Transfer-Encoding" not in request["headers"]
    content = json.loads(request["body"])["messages"][0]["content"]
    urls = [part["image_url"]["url"] for part in content[1:]]
    assert urls[1] == "https://x/y.png"
    for got, image in zip([urls[0], *urls[2:]], files, strict=True):
        head, data = got.split(",", 1)
        assert head == "data:image/png;base64"
        assert base64.b64decode(data, validate=True) == Path(image.ref).read_bytes()


@pytest.mark.parametrize("change", ["same size", "grown", "shrunk", "removed"])
def test_an_input_image_changed_since_the_check_is_never_sent_whole(
    tmp_path: Path, servers: LoopThread, change: str
) -> None:
    app, seen = recording_gateway()
    config = ClientConfig(base_url=f"http://127.0.0.1:{servers.serve(app)}/v1",
                          api_key=Secret(KEY))
    image = input_file(tmp_path / "in.png", 2 * INPUT_CHUNK_BYTES + 5)
    path = Path(image.ref)
    data = path.read_bytes()
    if change == "same size":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # only the last byte differs
    elif change == "grown":
        path.write_bytes(data + b"\0")
    elif change == "shrunk":
        path.write_bytes(data[:-1])
    else:
        path.unlink()
    with pytest.raises(RejectedError, match=r"changed since the manifest|cannot read input"):
        generate(config, tmp_path / "out", replace(a_job(), images=(image,)))
    assert seen == []  # the gateway never got a whole request, so nothing was generated

    async def yielded() -> tuple[int, list[str]]:
        """What the body stream gives before it fails: it must never be a whole body."""
        problems: list[str] = []
        sent = 0
        with contextlib.suppress(Exception):
            async for piece in stream_body(body_parts(job, "tok"), problems):
                sent += len(piece)
        return sent, problems

    job = replace(a_job(), images=(image,))
    sent, problems = asyncio.run(yielded())
    assert sent < body_parts(job, "tok").length() and len(problems) == 1


class ShortReads(io.BytesIO):
    """A file whose reads come back short, as a file being rewritten in place might."""

    def __init__(self, data: bytes, seed: int) -> None:
        super().__init__(data)
        self._rng = random.Random(seed)

    def read(self, size: int | None = -1, /) -> bytes:
        return super().read(min(size or 0, self._rng.randint(1, 5000)))


@pytest.mark.parametrize("seed", range(5))
def test_short_reads_still_stream_the_exact_base64(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    image = input_file(tmp_path / "in.png", 60_000 + seed)
    data = Path(image.ref).read_bytes()
    monkeypatch.setattr(bodystream, "_open_regular", lambda image: ShortReads(data, seed))
    job = replace(a_job(), images=(image,))
    parts = body_parts(job, "tok")

    async def streamed() -> bytes:
        return b"".join([piece async for piece in stream_body(parts, [])])

    body = asyncio.run(streamed())
    url = json.loads(body)["messages"][0]["content"][1]["image_url"]["url"]
    assert base64.b64decode(url.split(",", 1)[1], validate=True) == data
    assert len(body) == parts.length()


def test_an_input_image_replaced_by_a_fifo_is_refused_without_blocking(
    tmp_path: Path, servers: LoopThread
) -> None:
    app, seen = recording_gateway()
    config = ClientConfig(base_url=f"http://127.0.0.1:{servers.serve(app)}/v1",
                          api_key=Secret(KEY), timeout_s=30)
    image = input_file(tmp_path / "in.png", 1000)
    Path(image.ref).unlink()
    os.mkfifo(image.ref)  # nobody writes: a blocking open would wait forever
    with pytest.raises(RejectedError, match="no longer a regular file"):
        generate(config, tmp_path / "out", replace(a_job(), images=(image,)))
    assert seen == []


def test_input_image_that_is_a_device_is_rejected(tmp_path: Path) -> None:
    manifest = tmp_path / "dev.yaml"
    manifest.write_text("- {id: a, prompt: x, images: [/dev/zero]}\n")
    done = cli("validate", str(manifest))
    assert done.returncode == 2 and "not a regular file" in done.stderr
    no_traceback(done)


# == responses ============================================================================


def a_job(ident: str = "job") -> Job:
    return Job(ident, f"a picture for {ident}", DEFAULT_MODEL, "1:1", "1K")


def generate(config: ClientConfig, root: Path, job: Job | None = None) -> Generation:
    """One request through the real client, in a fresh event loop."""
    (root / "images").mkdir(parents=True, exist_ok=True)

    async def once() -> Generation:
        client = ChatCompletionsClient(config)
        try:
            return await client.generate(job or a_job(), LocalImages(root))
        finally:
            await client.close()

    return asyncio.run(once())


@pytest.mark.parametrize("gzipped", [False, True])
def test_response_size_cap_against_the_simulator(
    tmp_path: Path, servers: LoopThread, gzipped: bool
) -> None:
    sim = servers.simulator(payload_bytes=3_000_000, gzip=gzipped)
    small = ClientConfig(base_url=sim.url, api_key=Secret(KEY), max_response_bytes=1_000_000)
    with pytest.raises(MalformedResponse, match="once decoded") as caught:
        generate(small, tmp_path)
    assert caught.value.job_id == "job"
    assert image_files(tmp_path) == []  # the partial temporary file is gone
    roomy = ClientConfig(base_url=sim.url, api_key=Secret(KEY), max_response_bytes=10_000_000)
    staged = generate(roomy, tmp_path).images  # the same answer fits a bigger cap
    assert staged[0].bytes == 3_000_000
    assert ClientConfig().max_response_bytes == 200 * 1024 * 1024  # the CLI's cap


def gzip_app(members: list[bytes]) -> tuple[web.Application, list[int]]:
    """Answers every request with ``members`` as one gzip body; counts the requests."""
    body = b"".join(members)
    hits: list[int] = []

    async def answer(request: web.Request) -> web.Response:
        hits.append(1)
        await request.read()
        return web.Response(body=body, content_type="application/json",
                            headers={"Content-Encoding": "gzip"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    return app, hits


def test_gzip_bomb_in_a_data_url_is_stopped_by_the_cap(
    tmp_path: Path, servers: LoopThread
) -> None:
    # A PNG whose second chunk claims 2 GB, then 64 MiB of zeros (base64 "AAAA"), gzipped
    # into ~64 KB: the verifier keeps accepting, so only the response cap can stop it.
    head = png_head(64, 64) + struct.pack(">I", 0x7FFFFFF0) + b"IDAT" + b"\0"
    assert len(head) % 3 == 0
    prefix = completion(b"data:image/png;base64," + base64.b64encode(head) + b"@@")
    before, after = prefix.split(b"@@")
    mib = gzip.compress(b"A" * (1 << 20), 9)
    app, hits = gzip_app([gzip.compress(before), *[mib] * 64, gzip.compress(after)])
    port = servers.serve(app)
    config = ClientConfig(base_url=f"http://127.0.0.1:{port}/v1", api_key=Secret(KEY),
                          max_response_bytes=4 * 1024 * 1024)
    with pytest.raises(MalformedResponse, match="once decoded"):
        generate(config, tmp_path)
    assert image_files(tmp_path) == []
    assert hits == [1]


def test_gzip_bomb_through_the_cli_keeps_memory_bounded(
    tmp_path: Path, servers: LoopThread
) -> None:
    # 1 GiB of JSON whitespace in ~1 MB of gzip members, under the CLI's default caps.
    member = gzip.compress(b" " * (1 << 20), 9)
    app, _ = gzip_app([gzip.compress(b'{"choices": ['), *[member] * 1024, gzip.compress(b"]}")])
    port = servers.serve(app)
    manifest = catalog(1, tmp_path / "m.jsonl")
    out = tmp_path / "out"
    code, stderr, peak_kib = run_measured(
        "run", str(manifest), "--output", str(out), "--base-url",
        f"http://127.0.0.1:{port}/v1", "--max-attempts", "1", env=cli_env(),
    )
    assert code == 1, stderr
    assert "Traceback" not in stderr
    (row,) = read_results(out)
    assert row["status"] == "failed" and row["error"]["type"] == "malformed_response"
    assert "bytes" in row["error"]["message"]
    assert image_files(out) == []
    assert peak_kib < 200 * 1024, f"peak RSS {peak_kib} KiB"


def test_image_claiming_huge_dimensions_is_refused(tmp_path: Path, servers: LoopThread) -> None:
    liar = png_head(100_000, 100_000) + png_chunk(b"IEND", b"")
    body = completion("data:image/png;base64," + base64.b64encode(liar).decode())
    hits: list[int] = []

    async def answer(request: web.Request) -> web.Response:
        hits.append(1)
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    port = servers.serve(app)
    manifest = catalog(1, tmp_path / "m.jsonl")
    out = tmp_path / "out"
    done = cli("run", str(manifest), "--output", str(out), "--base-url",
               f"http://127.0.0.1:{port}/v1", "--max-attempts", "2")
    assert done.returncode == 1, done.stderr
    no_traceback(done)
    (row,) = read_results(out)
    assert row["status"] == "failed" and row["attempts"] == 2 and len(hits) == 2  # retried
    assert row["error"]["type"] == "malformed_response"
    assert "100000x100000" in row["error"]["message"] and "cap" in row["error"]["message"]
    assert image_files(out) == []


def corrupt_jpeg() -> bytes:
    """A JPEG whose structure is sound and whose scan is cut short before its end marker."""
    out = io.BytesIO()
    Image.effect_noise((128, 96), 60).convert("RGB").save(out, "JPEG", quality=90)
    data = out.getvalue()
    sos = data.index(b"\xff\xda")
    start = sos + 2 + struct.unpack(">H", data[sos + 2 : sos + 4])[0]
    end = data.rindex(b"\xff\xd9")
    return data[: (start + end) // 2] + data[end:]


@pytest.mark.parametrize("verify", ["decode", "structure"])
def test_jpeg_with_corrupt_data_is_never_marked_done(
    tmp_path: Path, servers: LoopThread, verify: str
) -> None:
    bad = corrupt_jpeg()
    assert probe(bad).width == 128  # sound structure: only a decode can tell
    body = completion("data:image/jpeg;base64," + base64.b64encode(bad).decode())
    hits: list[int] = []

    async def answer(request: web.Request) -> web.Response:
        hits.append(1)
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    port = servers.serve(app)
    manifest = catalog(1, tmp_path / "m.jsonl")
    out = tmp_path / "out"
    # --no-embed-metadata: the stored bytes are compared with the server's.
    args = ["run", str(manifest), "--output", str(out), "--base-url",
            f"http://127.0.0.1:{port}/v1", "--max-attempts", "2", "--no-embed-metadata"]
    if verify == "structure":
        args += ["--verify", "structure"]
    done = cli(*args)
    no_traceback(done)
    (row,) = read_results(out)
    if verify == "structure":  # what the flag gives up, stated by a test
        assert done.returncode == 0, done.stderr
        assert row["status"] == "succeeded"
        assert [p.read_bytes() for p in (out / "images").iterdir()] == [bad]
        return
    assert done.returncode == 1, done.stderr
    assert row["status"] == "failed" and row["attempts"] == 2 and len(hits) == 2  # retried
    assert row["error"]["type"] == "malformed_response"
    assert "does not decode" in row["error"]["message"]
    assert files_under(out / "images") == []  # no temporary left either


def test_endless_trickling_body_is_ended_by_the_timeout(
    tmp_path: Path, servers: LoopThread
) -> None:
    hits: list[int] = []

    async def trickle(request: web.Request) -> web.StreamResponse:
        hits.append(1)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        try:
            await response.write(b'{"choices": [')
            while True:  # a byte every 20 ms, forever: the read never stalls for long
                await response.write(b" ")
                await asyncio.sleep(0.02)
        except ConnectionError:
            return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", trickle)
    port = servers.serve(app)
    manifest = catalog(1, tmp_path / "m.jsonl")
    out = tmp_path / "out"
    done = cli("run", str(manifest), "--output", str(out), "--base-url",
               f"http://127.0.0.1:{port}/v1", "--timeout", "0.5", "--max-attempts", "2")
    assert done.returncode == 1, done.stderr
    no_traceback(done)
    (row,) = read_results(out)
    assert row["status"] == "failed" and row["attempts"] == 2 and len(hits) == 2
    assert row["error"]["type"] == "timeout"
    assert image_files(out) == []


# == secrets ==============================================================================

INTERNAL_BUG = """
import batch.recorder as recorder
original = recorder.Recorder.commit_answer
calls = []
async def broken_commit(self, job, fp, generation, old_paths):
    calls.append(job.id)
    nth = len(calls)  # taken now: commits of concurrent jobs overlap
    result = await original(self, job, fp, generation, old_paths)
    if nth == 2:  # the second image to commit, once it is recorded
        raise RuntimeError("simulated internal bug")
    return result
recorder.Recorder.commit_answer = broken_commit
"""


def assert_no_key(out: Path, *runs: subprocess.CompletedProcess[str]) -> None:
    for done in runs:
        assert KEY not in done.stdout + done.stderr
    for path in files_under(out):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_the_key_appears_nowhere_on_any_failure_path(tmp_path: Path, servers: LoopThread) -> None:
    many = catalog(12, tmp_path / "many.jsonl")
    few = catalog(2, tmp_path / "few.jsonl")
    every_fault = servers.simulator(faults=Faults.mix(1.0), fault_attempts=0, retry_after_s=0.01,
                                    seed=7)
    fine = servers.simulator()
    wrong_key = servers.simulator(api_key="another-key")
    slow = servers.simulator(latency_s=30)
    runs: dict[str, subprocess.CompletedProcess[str]] = {}

    def run(name: str, manifest: Path, url: str, *extra: str) -> list[str]:
        return ["run", str(manifest), "--output", str(tmp_path / name), "--base-url", url,
                "--max-attempts", "2", "--concurrency", "4", *extra]

    runs["faults"] = cli(*run("faults", many, every_fault.url, "--log-format", "json"))
    runs["401"] = cli(*run("401", few, wrong_key.url))
    runs["timeout"] = cli(*run("timeout", few, slow.url, "--timeout", "0.3"))
    runs["refused"] = cli(*run("refused", few, f"http://127.0.0.1:{closed_port()}/v1"))
    runs["internal"] = run_patched(INTERNAL_BUG, *run("internal", many, fine.url))
    faults = every_fault.stats()["faults"]
    for kind in ("reset", "server_error_json", "server_error_html", "server_error_text",
                 "truncate", "bad_base64", "incomplete_image", "error_200", "rate_limit"):
        assert faults.get(kind, 0) > 0, faults  # the failure paths really ran
    assert runs["faults"].returncode == 1 and runs["401"].returncode == 3
    assert runs["timeout"].returncode == 1 and runs["refused"].returncode == 1
    assert "simulated internal bug" in runs["internal"].stderr
    assert runs["internal"].returncode == 70, runs["internal"].stderr
    assert '"timeout"' in (tmp_path / "timeout" / "results.jsonl").read_text()
    assert '"connection"' in (tmp_path / "refused" / "results.jsonl").read_text()
    for name, done in runs.items():
        assert_no_key(tmp_path / name, done)


def test_internal_error_keeps_results_and_checkpoint_and_no_key(
    tmp_path: Path, servers: LoopThread
) -> None:
    sim = servers.simulator()
    manifest = catalog(6, tmp_path / "m.jsonl")
    out = tmp_path / "out"
    args = ("run", str(manifest), "--output", str(out), "--base-url", sim.url,
            "--concurrency", "2")
    done = run_patched(INTERNAL_BUG, *args)
    assert done.returncode == 70, done.stderr
    assert_no_key(out, done)
    rows = read_results(out)
    assert [r["id"] for r in rows] == [f"job-{i:03d}" for i in range(6)]
    done_first = sum(r["status"] == "succeeded" for r in rows)
    assert done_first >= 2  # the job whose commit raised had its image recorded first
    check_published_images(out, rows)
    _, runs = journal_is_consistent(out)
    assert runs[-1]["run"] == "end"
    first = sim.stats()["requests"]
    # Every request is recorded as a success, or was one of 2 in flight when it stopped.
    assert first <= done_first + 2
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert {r["status"] for r in read_results(out)} == {"succeeded"}
    # One request for each job not done: no recorded image is lost or paid for again.
    assert sim.stats()["requests"] - first == 6 - done_first
    assert not [n for n in image_files(out) if n.endswith(".tmp")]
    check_recorded_images(out)


def test_internal_error_prints_a_clear_message_not_a_traceback(
    tmp_path: Path, servers: LoopThread
) -> None:
    sim = servers.simulator()
    manifest = catalog(4, tmp_path / "m.jsonl")
    done = run_patched(INTERNAL_BUG, "run", str(manifest), "--output", str(tmp_path / "out"),
                       "--base-url", sim.url, "--concurrency", "1")
    assert done.returncode == 70, done.stderr
    assert "internal error" in done.stderr.lower(), done.stderr
    no_traceback(done)


def test_plain_http_to_a_remote_host_warns_without_sending(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("WARNING", logger="batch.providers.transport")
    for url, warns in [
        ("http://example.invalid/v1", True),
        ("http://203.0.113.5:8080/v1", True),
        ("https://example.invalid/v1", False),
        ("http://127.0.0.1:9/v1", False),
        ("http://localhost:9/v1", False),
        ("http://[::1]:9/v1", False),
    ]:
        caplog.clear()
        client = ChatCompletionsClient(ClientConfig(base_url=url, api_key=Secret(KEY)))
        warned = [r.getMessage() for r in caplog.records if "plain http" in r.getMessage()]
        assert bool(warned) is warns, url
        assert all(KEY not in m for m in warned)
        assert client.transport._session is None  # constructing sends nothing, opens nothing
        asyncio.run(client.close())


# == disk =================================================================================


def test_full_disk_stops_new_jobs_and_resumes(tmp_path: Path, servers: LoopThread) -> None:
    sim = servers.simulator(payload_bytes=300_000)
    manifest = catalog(20, tmp_path / "m.jsonl")
    with tmpfs(tmp_path / "small", "size=2m") as disk:
        out = disk / "out"
        args = ("run", str(manifest), "--output", str(out), "--base-url", sim.url,
                "--concurrency", "4")
        done = cli(*args)
        assert done.returncode == 1, done.stderr
        assert "No space left on device" in done.stderr and "re-run" in done.stderr
        no_traceback(done)
        rows = read_results(out)
        succeeded = sum(r["status"] == "succeeded" for r in rows)
        assert 0 < succeeded < 20
        assert {r["status"] for r in rows} == {"succeeded", "pending"}  # none failed
        check_published_images(out, rows)
        journal_is_consistent(out)
        first = sim.stats()["requests"]
        assert first <= succeeded + 4  # no job started after the disk filled
        remount(disk, "size=16m")
        again = cli(*args)
        assert again.returncode == 0, again.stderr
        rows = read_results(out)
        assert {r["status"] for r in rows} == {"succeeded"}
        check_published_images(out, rows)
        assert sim.stats()["requests"] <= 20 + 4


def test_injected_write_failure_stops_new_jobs_and_resumes(
    tmp_path: Path, servers: LoopThread
) -> None:
    """The same without a mount: writes to image temporaries fail from the 4th on."""
    sim = servers.simulator()
    manifest = catalog(12, tmp_path / "m.jsonl")
    out = tmp_path / "out"
    args = ("run", str(manifest), "--output", str(out), "--base-url", sim.url,
            "--concurrency", "2")
    patch = FAIL_DISK + f"fail_disk('write', {IMAGE_TEMPORARY!r}, after=3)\n"
    done = run_patched(patch, *args)
    assert done.returncode == 1, done.stderr
    assert "No space left on device" in done.stderr
    no_traceback(done)
    rows = read_results(out)
    succeeded = sum(r["status"] == "succeeded" for r in rows)
    assert {r["status"] for r in rows} == {"succeeded", "pending"}
    check_published_images(out, rows)
    journal_is_consistent(out)
    assert sim.stats()["requests"] <= succeeded + 2
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert sim.stats()["requests"] <= 12 + 2


def test_results_file_write_failure_keeps_the_old_one_and_resumes(
    tmp_path: Path, servers: LoopThread
) -> None:
    """Decision: exit 1 naming results.jsonl, old file untouched, the journal is the truth."""
    sim = servers.simulator()
    out = tmp_path / "out"
    small = catalog(2, tmp_path / "m.jsonl")
    assert cli("run", str(small), "--output", str(out), "--base-url", sim.url).returncode == 0
    old = (out / "results.jsonl").read_bytes()
    manifest = catalog(3, tmp_path / "m.jsonl")  # one more job
    args = ("run", str(manifest), "--output", str(out), "--base-url", sim.url)
    patch = FAIL_DISK + "fail_disk('fsync', r'/\\.results\\.jsonl\\.[^/]*\\.tmp$')\n"
    done = run_patched(patch, *args)
    assert done.returncode == 1, done.stderr
    assert "results.jsonl" in done.stderr and "No space left on device" in done.stderr
    assert "re-run" in done.stderr
    no_traceback(done)
    assert (out / "results.jsonl").read_bytes() == old
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    states, _ = journal_is_consistent(out)
    assert {s["status"] for s in states.values()} == {"succeeded"}
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert [r["status"] for r in read_results(out)] == ["succeeded"] * 3
    assert sim.stats()["requests"] == 3  # nothing paid twice


def test_summary_write_failure_is_reported_cleanly(tmp_path: Path, servers: LoopThread) -> None:
    sim = servers.simulator()
    manifest = catalog(2, tmp_path / "m.jsonl")
    out = tmp_path / "out"
    patch = FAIL_DISK + "fail_disk('fsync', r'/\\.summary\\.json\\.[^/]*\\.tmp$')\n"
    done = run_patched(patch, "run", str(manifest), "--output", str(out), "--base-url", sim.url)
    no_traceback(done)
    assert "summary.json" in done.stderr and "No space left on device" in done.stderr
    assert [r["status"] for r in read_results(out)] == ["succeeded"] * 2
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_starting_on_a_full_disk_is_a_clear_error(tmp_path: Path, servers: LoopThread) -> None:
    sim = servers.simulator()
    manifest = catalog(2, tmp_path / "m.jsonl")
    with tmpfs(tmp_path / "full", "size=64k") as disk:
        fill(disk)
        done = cli("run", str(manifest), "--output", str(disk / "out"), "--base-url", sim.url)
        assert sim.stats()["requests"] == 0
        no_traceback(done)
        assert done.returncode == 2, done.stderr  # docs/robustness.md: nothing sent, exit 2
        assert "No space left on device" in done.stderr


def test_journal_append_on_a_filling_disk_never_loses_an_acknowledged_record(
    tmp_path: Path,
) -> None:
    with tmpfs(tmp_path / "disk", "size=64k") as disk:
        root = disk / "out"
        root.mkdir()
        store = Checkpoint.open(root)
        try:
            store.record(JobState("first", "f" * 64, Status.PENDING, 1), durable=True)
            fill(disk)
            acknowledged = []
            for n in range(200):  # until the journal's last page is full
                state = JobState(f"job{n}", "f" * 64, Status.SUCCEEDED, 1, text="t" * 200)
                try:
                    store.record(state, durable=True)
                except Exception:
                    break
                acknowledged.append(state.id)
            (disk / "filler").unlink()  # space again (a finished job's temp file removed)
            try:
                store.record(JobState("later", "f" * 64, Status.PENDING, 1), durable=True)
                acknowledged.append("later")
            except StorageError:
                pass  # refusing appends after a failed one is fine too
        finally:
            store.close()
        states = Checkpoint.read(root).states
        assert len(acknowledged) > 1
        assert [i for i in acknowledged if i not in states] == []


# == network ==============================================================================


@dataclass
class Cert:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context


def make_cert(folder: Path) -> Cert:
    """A self-signed certificate for 127.0.0.1 made with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command")
    folder.mkdir(parents=True, exist_ok=True)
    made = Cert(folder / "cert.pem", folder / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext",
         "subjectAltName=IP:127.0.0.1", "-keyout", str(made.key), "-out", str(made.cert)],
        check=True, capture_output=True,
    )
    return made


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return make_cert(tmp_path_factory.mktemp("tls"))


def test_tls_is_verified_by_default(tmp_path: Path, servers: LoopThread, cert: Cert) -> None:
    sim = servers.simulator(ssl_context=cert.server_context())
    plain = ClientConfig(base_url=sim.url, api_key=Secret(KEY), timeout_s=10)
    with pytest.raises(TransportError) as caught:
        generate(plain, tmp_path)
    assert "certificate" in str(caught.value).lower()
    assert KEY not in str(caught.value)
    assert sim.stats(cert.cert)["requests"] == 0  # no HTTP request got through
    trusted = ClientConfig(base_url=sim.url, api_key=Secret(KEY), ca_bundle=cert.cert)
    generation = generate(trusted, tmp_path)
    assert len(generation.images) == 1 and sim.stats(cert.cert)["requests"] == 1


def test_cli_ca_bundle(tmp_path: Path, servers: LoopThread, cert: Cert) -> None:
    sim = servers.simulator(ssl_context=cert.server_context())
    manifest = catalog(2, tmp_path / "m.jsonl")
    args = ("run", str(manifest), "--base-url", sim.url, "--max-attempts", "1")
    refused = cli(*args, "--output", str(tmp_path / "untrusted"))
    assert refused.returncode == 1
    no_traceback(refused)
    for row in read_results(tmp_path / "untrusted"):
        assert row["status"] == "failed" and row["error"]["type"] == "connection"
        assert "certificate" in row["error"]["message"].lower()
    assert_no_key(tmp_path / "untrusted", refused)
    trusted = cli(*args, "--output", str(tmp_path / "trusted"), "--ca-bundle", str(cert.cert))
    assert trusted.returncode == 0, trusted.stderr
    assert sim.stats(cert.cert)["requests"] == 2


def test_ca_bundle_adds_to_the_system_roots(
    tmp_path: Path, servers: LoopThread, cert: Cert
) -> None:
    # OpenSSL reads the system roots from SSL_CERT_FILE when it is set: a second CA stands
    # in for them. With --ca-bundle naming the first, both servers must be trusted.
    system = make_cert(tmp_path / "system")
    env = {**cli_env(), "SSL_CERT_FILE": str(system.cert)}
    for name, server_cert in (("bundle", cert), ("system", system)):
        sim = servers.simulator(ssl_context=server_cert.server_context())
        manifest = catalog(1, tmp_path / f"{name}.jsonl")
        done = cli("run", str(manifest), "--output", str(tmp_path / name), "--base-url", sim.url,
                   "--max-attempts", "1", "--ca-bundle", str(cert.cert), env=env)
        assert done.returncode == 0, (name, done.stderr)
        assert sim.stats(server_cert.cert)["requests"] == 1


@pytest.mark.parametrize("bundle", ["missing", "garbage"])
def test_unusable_ca_bundle_is_a_usage_error(
    tmp_path: Path, servers: LoopThread, bundle: str
) -> None:
    sim = servers.simulator()
    path = tmp_path / "ca.pem"
    if bundle == "garbage":
        path.write_text("not a certificate\n")
    manifest = catalog(2, tmp_path / "m.jsonl")
    done = cli("run", str(manifest), "--output", str(tmp_path / "out"), "--base-url", sim.url,
               "--ca-bundle", str(path))
    no_traceback(done)
    assert done.returncode == 2 and str(path) in done.stderr


def proxy_env(**proxies: str) -> dict[str, str]:
    env = {k: v for k, v in cli_env().items() if not k.lower().endswith("_proxy")}
    env.update(proxies)
    return env


@pytest.mark.parametrize(
    ("url", "proxies", "no_proxy", "expected"),
    [
        ("https://api.example/v1", {}, (), None),
        ("https://api.example/v1", {"http": "http://p:3128"}, (), None),  # scheme must match
        ("https://api.example/v1", {"https": "http://p:3128"}, (), ("http://p:3128", {})),
        ("http://api.example/v1", {"http": "http://p:3128"}, ("api.example",), None),
        ("https://api.example/v1", {"https": "http://u%40corp:s%3Acret@p:3128"}, (),
         ("http://p:3128", {"Proxy-Authorization": "Basic dUBjb3JwOnM6Y3JldA=="})),
        ("https://api.example/v1", {"https": "http://u@[::1]:3128"}, (),
         ("http://[::1]:3128", {"Proxy-Authorization": "Basic dTo="})),
    ],
)
def test_env_proxy_table(
    url: str, proxies: dict[str, str], no_proxy: tuple[str, ...],
    expected: tuple[str, dict[str, str]] | None,
) -> None:
    assert env_proxy(url, proxies, lambda host: host in no_proxy) == expected


def recording_proxy() -> tuple[web.Application, list[tuple[str, str]]]:
    """A plain-http forward proxy that answers every request itself with one tiny PNG."""
    seen: list[tuple[str, str]] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append((request.method, str(request.url)))
        await request.read()
        return web.Response(body=completion("data:image/png;base64,"
                                            + base64.b64encode(PIXEL).decode()),
                            content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app, seen


def test_http_proxy_from_the_environment_is_used(tmp_path: Path, servers: LoopThread) -> None:
    proxy, seen = recording_proxy()
    proxy_port = servers.serve(proxy)
    target = f"http://127.0.0.1:{closed_port()}/v1"  # direct, it would be refused
    manifest = catalog(1, tmp_path / "m.jsonl")
    env = proxy_env(HTTP_PROXY=f"http://127.0.0.1:{proxy_port}")
    # --no-embed-metadata: the server's bytes verbatim, so they can be compared.
    done = cli("run", str(manifest), "--output", str(tmp_path / "out"), "--base-url", target,
               "--no-embed-metadata", env=env)
    assert done.returncode == 0, done.stderr
    assert seen == [("POST", f"{target}/chat/completions")]
    (row,) = read_results(tmp_path / "out")
    assert (tmp_path / "out" / row["images"][0]["path"]).read_bytes() == PIXEL
    bypass = cli("run", str(manifest), "--output", str(tmp_path / "bypass"), "--base-url", target,
                 "--max-attempts", "1", env={**env, "NO_PROXY": "127.0.0.1"})
    assert bypass.returncode == 1 and len(seen) == 1  # NO_PROXY honoured too
    assert read_results(tmp_path / "bypass")[0]["error"]["type"] == "connection"
    assert_no_key(tmp_path / "bypass", bypass)


def test_proxy_credentials_reach_a_plain_http_proxy(tmp_path: Path, servers: LoopThread) -> None:
    proxy, seen = recording_gateway()  # a forward proxy that answers by itself
    proxy_port = servers.serve(proxy)
    manifest = catalog(1, tmp_path / "m.jsonl")
    env = proxy_env(HTTP_PROXY=f"http://u%40corp:s%3Acret@127.0.0.1:{proxy_port}")
    done = cli("run", str(manifest), "--output", str(tmp_path / "out"), "--base-url",
               f"http://127.0.0.1:{closed_port()}/v1", env=env)
    assert done.returncode == 0, done.stderr
    assert [r["headers"].get("Proxy-Authorization") for r in seen] == [
        "Basic " + base64.b64encode(b"u@corp:s:cret").decode()
    ]


def test_a_redirecting_gateway_is_reported_not_followed(
    tmp_path: Path, servers: LoopThread
) -> None:
    hits: list[str] = []

    async def moved(request: web.Request) -> web.Response:
        hits.append(request.path)
        raise web.HTTPPermanentRedirect("/v2/chat/completions")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", moved)
    config = ClientConfig(base_url=f"http://127.0.0.1:{servers.serve(app)}/v1",
                          api_key=Secret(KEY))
    image = input_file(tmp_path / "in.png", 1000)
    with pytest.raises(FatalApiError, match="redirect to /v2/chat/completions"):
        generate(config, tmp_path / "out", replace(a_job(), images=(image,)))
    assert hits == ["/v1/chat/completions"]


class ConnectProxy:
    """A CONNECT tunnel to loopback ports, recording each request line."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            self.seen.append(line)
            method, target, _ = line.split(" ", 2)
            host, port = target.rsplit(":", 1)
            if method != "CONNECT" or host != "127.0.0.1":
                writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            self._writers.add(up_writer)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(1 << 16):
            sink.write(data)
            await sink.drain()
    except ConnectionError:
        pass
    finally:
        sink.close()


def test_https_proxy_tunnel_with_ca_bundle(
    tmp_path: Path, servers: LoopThread, cert: Cert
) -> None:
    sim = servers.simulator(ssl_context=cert.server_context())
    tunnel = ConnectProxy()
    proxy_port = servers.call(tunnel.start())
    servers.on_close(tunnel.stop)
    manifest = catalog(2, tmp_path / "m.jsonl")
    env = proxy_env(HTTPS_PROXY=f"http://127.0.0.1:{proxy_port}")
    done = cli("run", str(manifest), "--output", str(tmp_path / "out"), "--base-url", sim.url,
               "--ca-bundle", str(cert.cert), env=env)
    assert done.returncode == 0, done.stderr
    assert tunnel.seen and set(tunnel.seen) == {f"CONNECT 127.0.0.1:{sim.port} HTTP/1.1"}
    assert sim.stats(cert.cert)["requests"] == 2
