"""`make bench`: imgbatch against a naive peer script on the same workloads, one run.

Starts the simulator (a fresh one, on a free port, for every measured client
run), runs each workload through ``imgbatch run`` and ``bench/peer_naive.py``
as child processes, measures each child on its own (wall, user+sys CPU, peak
RSS via ``os.wait4``), checks every image on disk, and writes
``docs/benchmarks.md``. Each workload prints its result as it finishes.

    python bench/run.py                 # everything, writes docs/benchmarks.md
    python bench/run.py --only 1,4      # some workloads (doc goes to bench/out/)
    python bench/run.py --quick         # ~10x smaller, a smoke test (doc to bench/out/)

Scratch files go under bench/out/ (git-ignored); logs of every child are kept
in bench/out/logs/.
"""

from __future__ import annotations

import argparse
import compileall
import datetime
import itertools
import json
import os
import platform
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from procs import PY, ROOT, Measured, Simulator, kill_all, measure, simulator

# bench/ratelimits.py imports this module as ``run``: the script and the module are one.
sys.modules.setdefault("run", sys.modules[__name__])

BENCH = ROOT / "bench"
DOC = ROOT / "docs" / "benchmarks.md"
SMALL = ("--scale", "0.0625")  # 64x64 PNGs: the client's overhead, not the bytes, is measured

# Workload sizes (the numbers).
OVERHEAD_JOBS, OVERHEAD_CONC = 2000, 64
LATENCY_JOBS, LATENCY_CONC, LATENCY_S = 300, 50, 1.0
MEMORY_JOBS, MEMORY_CONC, MEMORY_PAYLOADS = 48, 16, (12_700_000, 25_400_000)
# Editing with the most input images a job may have, each near the 7 MiB limit: shown, no target.
EDIT_JOBS, EDIT_CONC, EDIT_INPUTS, EDIT_INPUT_BYTES = 16, 8, 14, 7_000_000
RATE_JOBS, RATE_CONC, RATE_RPM = 200, 64, 600
# 600/min enforced over a 6 s sliding window (60 per 6 s): with a 60 s window all
# 200 requests fit in one window and nothing would ever be rate limited.
RATE_WINDOW_S = 6.0
FAULT_JOBS, FAULT_CONC, FAULT_MIX = 300, 32, 0.3
SCALE_JOBS, SCALE_EVERY, SCALE_CONC = 100_000, 100, 64
MANY_FILES, TRASH = 500, "trash"  # see Ctx.dispose
SETTLED_CREATE_US, SETTLE_STEP_S, SETTLE_MAX_S = 60.0, 20.0, 300.0  # see settle_disk

# Targets.
OVERHEAD_MAX_RATIO = 0.5
LATENCY_MAX_OVER = 1.10
MEMORY_MAX_MB, MEMORY_MAX_GROWTH = 120.0, 1.15
RATE_MAX_OVER, RATE_MAX_429, RATE_MAX_429_RPM = 1.3, 0.10, 0.01
PLAN_MAX_S, PLAN_MAX_MB = 5.0, 300.0


@dataclass
class Row:
    workload: str
    metric: str
    imgbatch: str
    peer: str
    ratio: str
    target: str
    met: str  # "MET", "NOT MET" or "" (information only)


@dataclass
class Ctx:
    out: Path
    logs: Path
    quick: bool
    keep: bool
    rows: list[Row] = field(default_factory=list)
    hot: dict[str, float] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    incidents: list[str] = field(default_factory=list)  # recovered by running again
    deadline: float = float("inf")  # time.monotonic() after which every child gets 10 s
    settle_s: float = 0.0  # waited for the disk, see settle_disk
    create_us: list[float] = field(default_factory=list)  # the probe before each run

    def dispose(self, folder: Path, *, many: bool = False) -> None:
        """Remove a run's files, or set them aside until the bench ends if they are many.

        ext4 allocates new files slowly for minutes after thousands were deleted
        (it skips the recently freed inodes one by one), which would slow the
        next timed run; a few big files are removed at once, so that they are
        not flushed to disk for nothing.
        """
        if self.keep or not folder.exists():
            return
        if not many and sum(1 for _ in itertools.islice(folder.rglob("*"), MANY_FILES)) \
                < MANY_FILES:
            shutil.rmtree(folder, ignore_errors=True)
            return
        trash = self.out / TRASH
        trash.mkdir(parents=True, exist_ok=True)
        folder.rename(trash / f"{len(list(trash.iterdir()))}-{folder.name}")

    def n(self, jobs: int) -> int:
        return max(8, jobs // 10) if self.quick else jobs

    def timeout(self, wanted: float) -> float:
        return max(10.0, min(wanted, self.deadline - time.monotonic()))


@dataclass
class ClientRun:
    label: str
    m: Measured
    jobs: int
    valid: int
    stats: dict[str, Any]
    sim_cpu_s: float | None
    report: dict[str, Any] | None  # the peer's closing JSON line

    @property
    def requests(self) -> int:
        return int(self.stats.get("requests", 0))

    @property
    def r429(self) -> int:
        return int(self.stats.get("by_status", {}).get("429", 0))

    def summary(self) -> str:
        if self.m.timed_out:
            return f"{self.label}: TIMED OUT after {self.m.wall_s:.0f}s"
        return (f"{self.label}: {self.valid}/{self.jobs} ok in {self.m.wall_s:.2f}s, "
                f"cpu {self.m.cpu_s:.2f}s, rss {self.m.maxrss_mb:.0f} MB, "
                f"{self.requests} req ({self.r429} x 429)")

    def as_raw(self) -> dict[str, Any]:
        return {
            "wall_s": self.m.wall_s, "user_s": self.m.user_s, "sys_s": self.m.sys_s,
            "maxrss_mb": self.m.maxrss_mb, "rc": self.m.rc, "timed_out": self.m.timed_out,
            "jobs": self.jobs, "valid": self.valid, "simulator_stats": {
                k: v for k, v in self.stats.items() if k != "by_prompt"},
            "simulator_cpu_s": self.sim_cpu_s, "peer_report": self.report,
            "log": str(self.m.log.relative_to(ROOT)),
        }


# -- helpers -----------------------------------------------------------------------


def valid_png(path: Path) -> bool:
    """A complete PNG: signature, every chunk's CRC, IEND exactly at the end."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return False
    pos = 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        end = pos + 12 + length
        if end > len(data):
            return False
        kind = data[pos + 4:pos + 8]
        (crc,) = struct.unpack_from(">I", data, end - 4)
        if zlib.crc32(data[pos + 8:end - 4], zlib.crc32(kind)) != crc:
            return False
        if kind == b"IEND":
            return end == len(data)
        pos = end
    return False


def write_manifest(path: Path, prefix: str, jobs: int) -> list[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = [f"{prefix}-{i:05d}" for i in range(jobs)]
    with path.open("w", encoding="utf-8") as handle:
        for i, ident in enumerate(ids):
            prompt = f"{prefix} #{i}: a watercolour lighthouse at dusk, gulls, soft light"
            handle.write(json.dumps({"id": ident, "prompt": prompt}) + "\n")
    return ids


def run_client(ctx: Ctx, workload: str, label: str, manifest: Path, ids: list[str],
               sim_args: Sequence[str], concurrency: int, extra: Sequence[str] = (),
               timeout: float = 120) -> ClientRun:
    """One measured client run against a fresh simulator; images checked, then removed.

    If the simulator is gone when the client ends (something else on the machine
    killed it), the run says nothing about the client: it is noted and run once more.
    """
    name = f"{workload}.{label}"
    for attempt in (1, 2):
        out = ctx.out / workload / label
        shutil.rmtree(out, ignore_errors=True)
        # Start on a quiet disk: the last run's files are otherwise still being
        # flushed while this run is timed.
        os.sync()
        settle_disk(ctx, out.parent)
        with simulator(*sim_args, logs=ctx.logs, name=name) as sim:
            if label.startswith("imgbatch"):
                # The peer makes no gallery: measure the job pipeline alike, and the
                # gallery step only where the label says so.
                no_gallery = () if label == "imgbatch+gallery" else ("--no-gallery",)
                argv = [PY, "-m", "batch", "run", str(manifest), "--output", str(out),
                        "--base-url", sim.url, "--concurrency", str(concurrency), *extra,
                        *no_gallery]
                images = out / "images"
            else:
                argv = [PY, str(BENCH / "peer_naive.py"), str(manifest), "--out", str(out),
                        "--base-url", sim.url, "--concurrency", str(concurrency), *extra]
                images = out
            m = measure(name, argv, logs=ctx.logs, timeout=ctx.timeout(timeout))
            died = sim.process.poll()
            stats = _stats(sim)
            sim_cpu = sim.cpu_s()
        valid = sum(valid_png(images / f"{ident}.png") for ident in ids)
        run = ClientRun(label, m, len(ids), valid, stats, sim_cpu,
                        m.last_json() if label == "peer" else None)
        ctx.dispose(out)
        if died is None:
            break
        note = f"{name}: the simulator exited (status {died}) during run {attempt}"
        print(f"[{workload}] {note}" + ("; running it again" if attempt == 1 else ""),
              flush=True)
        (ctx.incidents if attempt == 1 else ctx.failures).append(note)
    ctx.raw.setdefault(workload, {})[label] = run.as_raw()
    if m.timed_out:
        ctx.failures.append(f"{name} timed out")
    return run


def _stats(sim: Simulator) -> dict[str, Any]:
    try:
        return sim.stats()
    except OSError as exc:
        return {"error": str(exc)}


def met(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "—"


def pct(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100 * part / whole:.1f}%)" if whole else "0/0"


def emit(ctx: Ctx, tag: str, runs: Sequence[ClientRun], verdicts: Sequence[str]) -> None:
    print(f"[{tag}] " + " | ".join(run.summary() for run in runs), flush=True)
    for verdict in verdicts:
        print(f"[{tag}]   {verdict}", flush=True)


# -- the workloads -----------------------------------------------------------------------


def w_overhead(ctx: Ctx) -> None:
    jobs = ctx.n(OVERHEAD_JOBS)
    manifest = ctx.out / "manifests" / "overhead.jsonl"
    ids = write_manifest(manifest, "overhead", jobs)
    runs = [run_client(ctx, "overhead", label, manifest, ids, SMALL, OVERHEAD_CONC)
            for label in ("imgbatch", "peer")]
    ib, peer = runs
    wall_ok = not ib.m.timed_out and ib.valid == jobs and (
        ib.m.wall_s <= OVERHEAD_MAX_RATIO * peer.m.wall_s)
    w = f"1. overhead ({jobs} small, {OVERHEAD_CONC} in flight)"
    ctx.rows += [
        Row(w, "images valid", f"{ib.valid}/{jobs}", f"{peer.valid}/{jobs}", "—", "all", ""),
        Row(w, "wall time", f"{ib.m.wall_s:.2f} s", f"{peer.m.wall_s:.2f} s",
            ratio(ib.m.wall_s, peer.m.wall_s), f"imgbatch ≤ {OVERHEAD_MAX_RATIO:g}x peer",
            met(wall_ok)),
        Row(w, "CPU (user+sys) per job", f"{1000 * ib.m.cpu_s / jobs:.2f} ms",
            f"{1000 * peer.m.cpu_s / jobs:.2f} ms", ratio(ib.m.cpu_s, peer.m.cpu_s), "", ""),
        Row(w, "simulator CPU during the run", _sim_cpu(ib), _sim_cpu(peer), "—", "", ""),
    ]
    emit(ctx, "1 overhead", runs, [
        f"wall ratio imgbatch/peer {ib.m.wall_s / peer.m.wall_s:.3f}x "
        f"(target ≤ {OVERHEAD_MAX_RATIO:g}x): {met(wall_ok)}"])


def _sim_cpu(run: ClientRun) -> str:
    return f"{run.sim_cpu_s:.2f} s" if run.sim_cpu_s is not None else "?"


def w_latency(ctx: Ctx) -> None:
    jobs = ctx.n(LATENCY_JOBS)
    ideal = -(-jobs // LATENCY_CONC) * LATENCY_S
    manifest = ctx.out / "manifests" / "latency.jsonl"
    ids = write_manifest(manifest, "latency", jobs)
    sim_args = (*SMALL, "--latency", str(LATENCY_S))
    runs = [run_client(ctx, "latency", label, manifest, ids, sim_args, LATENCY_CONC)
            for label in ("imgbatch", "peer")]
    ib, peer = runs
    ok = not ib.m.timed_out and ib.valid == jobs and ib.m.wall_s <= LATENCY_MAX_OVER * ideal
    own = re.search(r"; (\d+(?:\.\d+)?)s; results in", ib.m.tail(3))
    own_text = f"; {own.group(1)} s by its own clock, after start-up" if own else ""
    w = f"2. latency-bound ({jobs} jobs, {LATENCY_S:g} s latency, {LATENCY_CONC} in flight)"
    ctx.rows += [
        Row(w, "images valid", f"{ib.valid}/{jobs}", f"{peer.valid}/{jobs}", "—", "all", ""),
        Row(w, f"wall time (ideal {ideal:g} s)",
            f"{ib.m.wall_s:.2f} s ({ib.m.wall_s / ideal:.2f}x ideal{own_text})",
            f"{peer.m.wall_s:.2f} s ({peer.m.wall_s / ideal:.2f}x ideal)",
            ratio(ib.m.wall_s, peer.m.wall_s),
            f"imgbatch ≤ {LATENCY_MAX_OVER * ideal:.1f} s (ideal +10%)", met(ok)),
    ]
    emit(ctx, "2 latency", runs, [f"imgbatch {ib.m.wall_s / ideal:.2f}x ideal {ideal:g}s "
                                  f"(target ≤ {LATENCY_MAX_OVER:g}x): {met(ok)}"])


def w_memory(ctx: Ctx) -> None:
    jobs = ctx.n(MEMORY_JOBS)
    manifest = ctx.out / "manifests" / "memory.jsonl"
    ids = write_manifest(manifest, "memory", jobs)
    w = f"3. memory ({jobs} jobs of 4K-class payloads, {MEMORY_CONC} in flight)"
    sizes = " · ".join(f"{p / 1e6:.1f} MB" for p in MEMORY_PAYLOADS)
    ctx.rows.append(Row(w, f"images valid ({sizes})", "", "", "—", "all", ""))
    valid_row = ctx.rows[-1]
    peaks: list[float] = []
    for payload in MEMORY_PAYLOADS:
        sim_args = (*SMALL, "--payload-bytes", str(payload))
        tag = f"memory-{payload // 100_000 / 10:g}MB"
        # The streaming run alone (--no-gallery) is what the target is about; the same
        # run with its gallery step (thumbnails decoded in a child process) is shown too.
        runs = [run_client(ctx, tag, label, manifest, ids, sim_args, MEMORY_CONC)
                for label in ("imgbatch", "peer")]
        ib, peer = runs
        full = run_client(ctx, tag, "imgbatch+gallery", manifest, ids, sim_args, MEMORY_CONC)
        b64_mb = payload * 4 / 3 / 1e6
        ok = not ib.m.timed_out and ib.valid == jobs and ib.m.maxrss_mb < MEMORY_MAX_MB
        peaks.append(ib.m.maxrss_mb)
        sep = "" if payload == MEMORY_PAYLOADS[0] else " · "
        valid_row.imgbatch += f"{sep}{ib.valid}/{jobs}"
        valid_row.peer += f"{sep}{peer.valid}/{jobs}"
        ctx.rows += [
            Row(w, f"peak RSS, {payload / 1e6:.1f} MB images (~{b64_mb:.0f} MB base64), "
                "--no-gallery",
                f"{ib.m.maxrss_mb:.0f} MB", f"{peer.m.maxrss_mb:.0f} MB",
                ratio(ib.m.maxrss_mb, peer.m.maxrss_mb), f"imgbatch < {MEMORY_MAX_MB:g} MB",
                met(ok)),
            Row(w, f"peak RSS with the end-of-run gallery, {payload / 1e6:.1f} MB images",
                f"{full.m.maxrss_mb:.0f} MB", "", "", "", ""),
            Row(w, f"wall time, {payload / 1e6:.1f} MB images", f"{ib.m.wall_s:.2f} s",
                f"{peer.m.wall_s:.2f} s", ratio(ib.m.wall_s, peer.m.wall_s), "", ""),
        ]
        emit(ctx, f"3 {tag}", runs, [f"imgbatch peak RSS {ib.m.maxrss_mb:.0f} MB "
                                     f"(target < {MEMORY_MAX_MB:g} MB): {met(ok)}"])
    growth = peaks[1] / peaks[0] if peaks[0] else float("inf")
    ok = growth <= MEMORY_MAX_GROWTH
    ctx.rows.append(Row(w, "peak RSS growth when payloads double", f"{growth:.2f}x",
                        _peer_growth(ctx), "—", f"imgbatch ≤ {MEMORY_MAX_GROWTH:g}x (flat)",
                        met(ok)))
    print(f"[3 memory]   imgbatch RSS growth x{growth:.2f} when payloads double "
          f"(target ≤ {MEMORY_MAX_GROWTH:g}x): {met(ok)}", flush=True)
    w_memory_edits(ctx, w)


def w_memory_edits(ctx: Ctx, w: str) -> None:
    """Request bodies, not answers: jobs that send 14 large input images each."""
    jobs = ctx.n(EDIT_JOBS)
    size = EDIT_INPUT_BYTES // 10 if ctx.quick else EDIT_INPUT_BYTES
    folder = ctx.out / "manifests"
    (folder / "inputs").mkdir(parents=True, exist_ok=True)
    head = b"\x89PNG\r\n\x1a\n"  # the sniffed type; the rest need not be a picture
    names = [f"inputs/edit-{i:02d}.png" for i in range(EDIT_INPUTS)]
    for name in names:
        (folder / name).write_bytes(head + os.urandom(size - len(head)))
    manifest = folder / "edits.jsonl"
    ids = [f"edit-{i:05d}" for i in range(jobs)]
    manifest.write_text("".join(json.dumps({"id": ident, "prompt": f"edit {ident}",
                                            "images": names}) + "\n" for ident in ids))
    runs = [run_client(ctx, "memory-edit", label, manifest, ids, SMALL, EDIT_CONC)
            for label in ("imgbatch", "peer")]
    ib, peer = runs
    body_mb = EDIT_INPUTS * size * 4 / 3 / 1e6
    what = (f"{jobs} edit jobs, {EDIT_INPUTS} input images of {size / 1e6:.1f} MB each "
            f"(~{body_mb:.0f} MB request bodies), {EDIT_CONC} in flight")
    ctx.rows += [
        Row(w, f"peak RSS, {what}", f"{ib.m.maxrss_mb:.0f} MB", f"{peer.m.maxrss_mb:.0f} MB",
            ratio(ib.m.maxrss_mb, peer.m.maxrss_mb), "", ""),
        Row(w, "images valid and wall time, the same edit jobs",
            f"{ib.valid}/{jobs} in {ib.m.wall_s:.1f} s", f"{peer.valid}/{jobs} in "
            f"{peer.m.wall_s:.1f} s", ratio(ib.m.wall_s, peer.m.wall_s), "", ""),
    ]
    emit(ctx, "3 memory-edit", runs, [f"imgbatch peak RSS {ib.m.maxrss_mb:.0f} MB sending "
                                      f"~{body_mb:.0f} MB bodies (shown, no target)"])


def _peer_growth(ctx: Ctx) -> str:
    tags = [f"memory-{p // 100_000 / 10:g}MB" for p in MEMORY_PAYLOADS]
    try:
        a, b = (ctx.raw[t]["peer"]["maxrss_mb"] for t in tags)
    except KeyError:
        return "?"
    return f"{b / a:.2f}x"


def w_rate(ctx: Ctx) -> None:
    jobs = ctx.n(RATE_JOBS)
    ideal = jobs * 60 / RATE_RPM
    limit = round(RATE_RPM * RATE_WINDOW_S / 60)
    manifest = ctx.out / "manifests" / "rate.jsonl"
    ids = write_manifest(manifest, "rate", jobs)
    sim_args = (*SMALL, "--rpm-limit", str(limit), "--rate-window", f"{RATE_WINDOW_S:g}")
    ib = run_client(ctx, "rate", "imgbatch", manifest, ids, sim_args, RATE_CONC)
    ib_rpm = run_client(ctx, "rate", "imgbatch-rpm", manifest, ids, sim_args, RATE_CONC,
                        extra=("--rpm", str(RATE_RPM)))
    peer = run_client(ctx, "rate", "peer", manifest, ids, sim_args, RATE_CONC)
    w = (f"4. rate limit ({jobs} jobs, {RATE_RPM}/min as {limit} per {RATE_WINDOW_S:g} s "
         f"window, {RATE_CONC} in flight)")
    verdicts = []
    for run, cap, flag in ((ib, RATE_MAX_429, "no --rpm"), (ib_rpm, RATE_MAX_429_RPM,
                                                            f"--rpm {RATE_RPM}")):
        share = run.r429 / run.requests if run.requests else 1.0
        done_ok = run.valid == jobs and not run.m.timed_out
        wall_ok = done_ok and run.m.wall_s <= RATE_MAX_OVER * ideal
        share_ok = done_ok and share < cap
        peer_cell = (lambda text: text) if flag == "no --rpm" else (lambda text: "(one run, above)")
        ctx.rows += [
            Row(w, f"jobs done, imgbatch {flag}", f"{run.valid}/{jobs}",
                peer_cell(f"{peer.valid}/{jobs}"), "—", f"{jobs}/{jobs}", met(done_ok)),
            Row(w, f"wall vs ideal {ideal:g} s, imgbatch {flag}",
                f"{run.m.wall_s:.1f} s ({run.m.wall_s / ideal:.2f}x)",
                peer_cell(f"{peer.m.wall_s:.1f} s ({peer.m.wall_s / ideal:.2f}x)"),
                ratio(run.m.wall_s, peer.m.wall_s) if flag == "no --rpm" else "—",
                f"≤ {RATE_MAX_OVER:g}x ideal", met(wall_ok)),
            Row(w, f"requests answered 429, imgbatch {flag}", pct(run.r429, run.requests),
                peer_cell(pct(peer.r429, peer.requests)), "—", f"< {cap:.0%}", met(share_ok)),
        ]
        verdicts.append(f"imgbatch {flag}: {run.valid}/{jobs} done {met(done_ok)}, "
                        f"{run.m.wall_s / ideal:.2f}x ideal {met(wall_ok)}, "
                        f"429 share {share:.1%} {met(share_ok)}")
    emit(ctx, "4 rate", [ib, ib_rpm, peer], verdicts)


def w_faults(ctx: Ctx) -> None:
    jobs = ctx.n(FAULT_JOBS)
    manifest = ctx.out / "manifests" / "faults.jsonl"
    ids = write_manifest(manifest, "faults", jobs)
    sim_args = (*SMALL, "--fault-mix", f"{FAULT_MIX:g}", "--fault-attempts", "1",
                "--retry-after", "0.1", "--seed", "42")
    runs = [run_client(ctx, "faults", label, manifest, ids, sim_args, FAULT_CONC)
            for label in ("imgbatch", "peer")]
    ib, peer = runs
    ok = ib.valid == jobs and not ib.m.timed_out
    claimed = peer.report.get("ok") if peer.report else None
    w = f"5. faults ({jobs} jobs, {FAULT_MIX:.0%} mixed faults on first attempts, " \
        f"{FAULT_CONC} in flight)"
    ctx.rows += [
        Row(w, "success rate (complete, valid image on disk)", pct(ib.valid, jobs),
            pct(peer.valid, jobs) + (f"; it claimed {claimed}" if claimed is not None else "")
            + (f"; failed with {_errors(peer.report)}" if peer.report else ""),
            "—", "100%", met(ok)),
        Row(w, "requests sent", str(ib.requests), str(peer.requests), "—", "", ""),
        Row(w, "wall time", f"{ib.m.wall_s:.2f} s", f"{peer.m.wall_s:.2f} s",
            ratio(ib.m.wall_s, peer.m.wall_s), "", ""),
    ]
    if peer.report:
        ctx.raw["faults"]["peer_errors"] = peer.report.get("errors")
    emit(ctx, "5 faults", runs, [f"imgbatch success {ib.valid}/{jobs}: {met(ok)}; peer "
                                 f"{peer.valid}/{jobs} valid (claimed {claimed})"])


def _errors(report: dict[str, Any]) -> str:
    errors = report.get("errors") or {}
    return ", ".join(f"{n} {name}" for name, n in sorted(errors.items(), key=lambda i: -i[1]))


def w_scale(ctx: Ctx) -> None:
    jobs = ctx.n(SCALE_JOBS)
    left = jobs // SCALE_EVERY
    folder = ctx.out / "scale"
    shutil.rmtree(folder, ignore_errors=True)
    catalog, output = folder / "catalog.jsonl", folder / "output"
    common = ["--catalog", str(catalog), "--output", str(output)]
    setup = measure("scale.setup", [PY, str(BENCH / "scale.py"), "setup", *common,
                                    "--jobs", str(jobs), "--every", str(SCALE_EVERY)],
                    logs=ctx.logs, timeout=ctx.timeout(180))
    made = setup.last_json()
    if setup.rc != 0 or not made:
        raise RuntimeError(f"scale setup failed (rc {setup.rc}): {setup.tail()}")
    print(f"[6 scale] built {made['jobs']} jobs, {made['done']} done, in {setup.wall_s:.1f}s "
          "(journal + tiny PNGs, no API calls)", flush=True)
    probe = measure("scale.probe", [PY, str(BENCH / "scale.py"), "probe", *common],
                    logs=ctx.logs, timeout=ctx.timeout(60))
    plan = probe.last_json()
    if probe.rc != 0 or not plan:
        raise RuntimeError(f"scale probe failed (rc {probe.rc}): {probe.tail()}")
    settle_disk(ctx, folder)
    with simulator(*SMALL, logs=ctx.logs, name="scale.imgbatch") as sim:
        run = measure("scale.imgbatch", [PY, "-m", "batch", "run", str(catalog), "--output",
                                         str(output), "--base-url", sim.url, "--concurrency",
                                         str(SCALE_CONC), "--no-gallery"], logs=ctx.logs,
                      timeout=ctx.timeout(180))
        stats = _stats(sim)
    # The gallery of 100,000 results, built apart as `imgbatch report` (the run's end does
    # the same in a child process unless --no-gallery): shown, not a target.
    gallery = measure("scale.report", [PY, "-m", "batch", "report", str(output)],
                      logs=ctx.logs, timeout=ctx.timeout(300))
    ctx.raw["scale"] = {"setup": made, "probe": plan, "probe_process": {
        "wall_s": probe.wall_s, "maxrss_mb": probe.maxrss_mb}, "run": {
        "wall_s": run.wall_s, "cpu_s": run.cpu_s, "maxrss_mb": run.maxrss_mb, "rc": run.rc,
        "timed_out": run.timed_out, "requests": stats.get("requests")}}
    ctx.dispose(folder)
    w = f"6. manifest scale ({jobs:,} jobs JSONL, {jobs - left:,} already done)"
    peer_na = f"n/a — no resume, re-sends all {jobs:,}"
    plan_ok = plan["total_s"] < PLAN_MAX_S and plan["todo"] == left
    mem_ok = plan["maxrss_mb"] < PLAN_MAX_MB
    run_ok = run.rc == 0 and stats.get("requests") == left and run.maxrss_mb < PLAN_MAX_MB
    ctx.rows += [
        Row(w, "plan time (load manifest + open checkpoint + plan, in-process)",
            f"{plan['total_s']:.2f} s (load {plan['load_s']:.2f} + open {plan['open_s']:.2f} "
            f"+ plan {plan['plan_s']:.2f}); {plan['todo']} to do", peer_na, "—",
            f"< {PLAN_MAX_S:g} s", met(plan_ok)),
        Row(w, "peak RSS of the planning process", f"{plan['maxrss_mb']:.0f} MB", peer_na, "—",
            f"< {PLAN_MAX_MB:g} MB", met(mem_ok)),
        Row(w, f"`imgbatch run`: plan + {left:,} remaining jobs, wall / requests",
            f"{run.wall_s:.2f} s / {stats.get('requests')} requests (exit {run.rc})", peer_na,
            "—", f"only {left:,} requests", met(run.rc == 0 and stats.get("requests") == left)),
        Row(w, "`imgbatch run`: peak RSS", f"{run.maxrss_mb:.0f} MB", peer_na, "—",
            f"< {PLAN_MAX_MB:g} MB", met(run_ok and run.maxrss_mb < PLAN_MAX_MB)),
        Row(w, f"`imgbatch report` (gallery of {jobs:,} results), wall / peak RSS",
            f"{gallery.wall_s:.2f} s / {gallery.maxrss_mb:.0f} MB (exit {gallery.rc})", peer_na,
            "—", "", ""),
    ]
    print(f"[6 scale] plan {plan['total_s']:.2f}s (load {plan['load_s']:.2f}, open "
          f"{plan['open_s']:.2f}, plan {plan['plan_s']:.2f}), {plan['maxrss_mb']:.0f} MB: "
          f"time {met(plan_ok)}, memory {met(mem_ok)}", flush=True)
    print(f"[6 scale] imgbatch run: {run.wall_s:.2f}s wall, {run.maxrss_mb:.0f} MB peak, "
          f"{stats.get('requests')} requests, exit {run.rc}", flush=True)


def w_hotpath(ctx: Ctx) -> None:
    probe = measure("hotpath", [PY, str(BENCH / "hotpath.py"), "--tmp", str(ctx.out / "hot"),
                                "--seconds", "1" if ctx.quick else "2"],
                    logs=ctx.logs, timeout=ctx.timeout(120))
    figures = probe.last_json()
    shutil.rmtree(ctx.out / "hot", ignore_errors=True)
    if probe.rc != 0 or not figures:
        raise RuntimeError(f"hotpath failed (rc {probe.rc}): {probe.tail()}")
    ctx.hot = figures
    print(f"[hot path] decoder {figures['decoder_mbps_plain']:.0f} MB/s plain, "
          f"{figures['decoder_mbps_escaped']:.0f} MB/s with \\/ escapes; a2b_base64 "
          f"{figures['a2b_base64_mbps']:.0f} MB/s; json.loads+b64decode "
          f"{figures['peer_json_b64_mbps_plain']:.0f} MB/s; checkpoint "
          f"{figures['checkpoint_fsync_per_s']:.0f} records/s fsynced, "
          f"{figures['checkpoint_nofsync_per_s']:.0f} without", flush=True)


import ratelimits  # noqa: E402  (needs the helpers above)

WORKLOADS: dict[str, Callable[[Ctx], None]] = {
    "1": w_overhead, "2": w_latency, "3": w_memory, "4": w_rate, "5": w_faults, "6": w_scale,
    "7": ratelimits.w_mixed, "8": ratelimits.w_sporadic, "9": ratelimits.w_window,
    "hot": w_hotpath,
}


# -- the machine and the report ------------------------------------------------------------


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(),
                            "platform": platform.platform(), "cores": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["ram_gb"] = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    info.setdefault("cpu", platform.processor() or "unknown")
    try:
        import psutil
        info["physical_cores"] = psutil.cpu_count(logical=False)
    except ImportError:
        pass
    info["load_avg_start"] = [round(x, 2) for x in os.getloadavg()]
    info["date"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "batch"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        info["commit"] = commit + (" (batch/ has uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        info["commit"] = "unknown"
    try:
        from importlib.metadata import version
        info["openai"] = version("openai")
        info["aiohttp"] = version("aiohttp")
    except Exception:
        pass
    return info


def startup(ctx: Ctx) -> dict[str, float]:
    """Interpreter + import time of each client, included in every wall figure."""
    ib = measure("startup.imgbatch", [PY, "-m", "batch", "--version"], logs=ctx.logs,
                 timeout=60)
    peer = measure("startup.peer", [PY, "-c", "import openai"], logs=ctx.logs, timeout=60)
    return {"imgbatch_s": ib.wall_s, "peer_s": peer.wall_s}


def create_us(near: Path, files: int = 200) -> float:
    """Microseconds to create one empty file beside ``near`` (set aside until the end)."""
    near.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".create-probe-", dir=near))
    started = time.perf_counter()
    for i in range(files):
        os.close(os.open(folder / str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    return (time.perf_counter() - started) / files * 1e6


def settle_disk(ctx: Ctx, near: Path) -> None:
    """Before a timed run: wait while creating a file beside ``near`` is slow.

    For minutes after thousands of files were deleted nearby (another bench's
    clean-up, say), ext4 creates files several times slower, which workload 1
    (2,000 files in two seconds) would report as client overhead. The probe's
    files are set aside with the runs' and removed when the bench ends.
    """
    while (took := create_us(near)) > SETTLED_CREATE_US and ctx.settle_s < SETTLE_MAX_S:
        print(f"bench: creating a file takes {took:.0f} us here (~20 us on a quiet disk; "
              f"thousands of files deleted nearby lately?); waiting {SETTLE_STEP_S:g} s",
              flush=True)
        time.sleep(SETTLE_STEP_S)
        ctx.settle_s += SETTLE_STEP_S
    ctx.create_us.append(took)
    for probe in near.glob(".create-probe-*"):
        ctx.dispose(probe, many=True)


def cell(text: str) -> str:
    return text.replace("|", "\\|").strip()


def render(ctx: Ctx, info: dict[str, Any], wall: float) -> str:
    met_n = sum(row.met == "MET" for row in ctx.rows)
    judged = sum(row.met in ("MET", "NOT MET") for row in ctx.rows)
    out = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`bench/run.py`); do not edit by hand, re-run it. imgbatch is",
        "compared with `bench/peer_naive.py`, what a user writes from the provider's notebook:",
        "AsyncOpenAI with its default retries (`max_retries=2`), an `asyncio.Semaphore`, one",
        "task per job under `gather`, the SDK's parsed answer, `base64.b64decode`, a file write.",
        "Both run as child processes against the bundled simulator (`python -m batch simulate`,",
        "a fresh one on a free port for every run) on loopback; each child is measured on its",
        "own (`os.wait4`: wall from spawn to exit, user+sys CPU, peak RSS), so every wall time",
        "includes interpreter start-up and imports. An image counts only if it is on disk as a",
        "complete PNG (every chunk CRC checked). Ratio = imgbatch / peer. imgbatch runs with",
        "`--no-gallery`, since the peer makes no gallery; workload 3 also shows the peak with",
        "the end-of-run gallery step (thumbnails decoded one at a time in a child process,",
        "whose peak `os.wait4` folds into the run's).",
        "",
        "Run it with `make bench` (installs the `bench` extras once: openai, psutil; takes a",
        "few minutes). `python bench/run.py --only 1,4` runs some workloads, `--quick` a 10x",
        "smaller smoke test; both write to `bench/out/benchmarks.md` instead of this file.",
        "",
        "## Machine",
        "",
        f"- CPU: {info.get('cpu')}, {info.get('cores')} logical cores"
        + (f" ({info['physical_cores']} physical)" if info.get("physical_cores") else ""),
        f"- RAM: {info.get('ram_gb', '?')} GB; {info.get('platform')}",
        f"- Python {info.get('python')}; aiohttp {info.get('aiohttp', '?')}; "
        f"openai {info.get('openai', '?')} (peer)",
        f"- Date: {info.get('date')}; imgbatch commit {info.get('commit')}",
        f"- Load average at start {info.get('load_avg_start')}, at end "
        f"{info.get('load_avg_end')}: the simulator shares the machine with the client, and",
        "  other work on the machine makes every figure noisier.",
    ]
    if "startup" in ctx.raw:
        s = ctx.raw["startup"]
        out.append(f"- Start-up alone (interpreter + imports): imgbatch {s['imgbatch_s']:.2f} s, "
                   f"peer {s['peer_s']:.2f} s")
    if ctx.create_us:
        waited = f", after waiting {ctx.settle_s:.0f} s for the disk" if ctx.settle_s else ""
        out.append(f"- Creating an empty file beside each timed run's output, just before it: "
                   f"{min(ctx.create_us):.0f}-{max(ctx.create_us):.0f} µs{waited}")
    out.append(f"- Whole benchmark: {wall / 60:.1f} min")
    if ctx.quick:
        out += ["", "**Quick mode: workloads about 10x smaller than the issue's; not the "
                "reference figures.**"]
    out += ["", "## Results", "", f"{met_n} of {judged} targets met.", "",
            "| workload | metric | imgbatch | peer | ratio | target | met |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    last = None
    for row in ctx.rows:
        name = row.workload if row.workload != last else ""
        last = row.workload
        out.append("| " + " | ".join(cell(x) for x in (
            name, row.metric, row.imgbatch, row.peer, row.ratio, row.target, row.met)) + " |")
    if ctx.failures:
        out += ["", "Failures while benchmarking:", ""] + [f"- {f}" for f in ctx.failures]
    if ctx.incidents:
        out += ["", "Runs repeated (the figures above are from the repeat):", ""]
        out += [f"- {f}" for f in ctx.incidents]
    if ctx.hot:
        h = ctx.hot
        out += [
            "", "## Hot path", "",
            f"One ~{h['body_mb_plain']:.0f} MB chat-completions body (a 12.7 MB image as base64 "
            "in a data URL), best of 3, in one process:", "",
            "| what | MB/s of body | vs a2b_base64 |", "| --- | --- | --- |",
            f"| `binascii.a2b_base64` on the base64 text, one call (the floor) | "
            f"{h['a2b_base64_mbps']:.0f} | 1.00x |",
            f"| `BodyDecoder` fed 64 KiB chunks, plain JSON | {h['decoder_mbps_plain']:.0f} | "
            f"{h['decoder_mbps_plain'] / h['a2b_base64_mbps']:.2f}x |",
            f"| `BodyDecoder` fed 64 KiB chunks, every `/` escaped as `\\/` | "
            f"{h['decoder_mbps_escaped']:.0f} | "
            f"{h['decoder_mbps_escaped'] / h['a2b_base64_mbps']:.2f}x |",
            f"| peer: `json.loads` + `base64.b64decode`, plain | "
            f"{h['peer_json_b64_mbps_plain']:.0f} | "
            f"{h['peer_json_b64_mbps_plain'] / h['a2b_base64_mbps']:.2f}x |",
            f"| peer: `json.loads` + `base64.b64decode`, escaped | "
            f"{h['peer_json_b64_mbps_escaped']:.0f} | "
            f"{h['peer_json_b64_mbps_escaped'] / h['a2b_base64_mbps']:.2f}x |",
            "", f"Checkpoint appends (`Checkpoint.record`, one succeeded job per line): "
            f"{h['checkpoint_fsync_per_s']:,.0f} records/s fsynced, "
            f"{h['checkpoint_nofsync_per_s']:,.0f} records/s without fsync.",
        ]
    out += [
        "", "## Notes", "",
        f"- Workload 4: the limit is {RATE_RPM}/min enforced over a {RATE_WINDOW_S:g} s sliding "
        f"window ({round(RATE_RPM * RATE_WINDOW_S / 60)} requests per {RATE_WINDOW_S:g} s), not "
        "a 60 s one: with a 60 s window all 200 requests fit in one window and nothing is ever "
        "rate limited. The ideal is 200 requests at 600/min = 20 s (the window lets a bursty "
        "client finish the last 20 at 18 s). Without `--rpm`, the run's first wave of 64 "
        "requests is not sent at once: slow start (`batch.slowstart`) sends 16, then rounds "
        "twice as large spread out so that a 429 comes back before much more is sent; the "
        "429s that find the burst allowance pause the pool, and the pace learnt from them "
        "keeps the rest of the run nearly free of 429s.",
        f"- Workload 5: `--fault-mix {FAULT_MIX:g} --fault-attempts 1 --retry-after 0.1`, every "
        "fault kind of the simulator in equal shares (429, 5xx JSON/HTML/text, connection reset, "
        "truncated body, bad base64, no image, error in a 200, truncated image). The peer's own "
        "count of successes is shown beside the images that are really complete.",
        "- Workload 6: the 99,000 done jobs are written straight into the checkpoint format "
        "(journal lines from `JobState.to_line()`, a tiny PNG per job with its size and "
        "mtime_ns), no API call. Plan time is measured in a child process "
        "(`bench/scale.py probe`: `load_manifest` + `Checkpoint.open` + `Engine.plan`); the "
        "`imgbatch run` row is the real command from start to exit, 1,000 requests included.",
        f"- Workload 3: \"flat\" is read as: peak RSS grows by at most "
        f"{MEMORY_MAX_GROWTH - 1:.0%} when the payloads double.",
        "- Every timed run starts after `os.sync()`, with imgbatch byte-compiled (as a pip "
        "install or any first run leaves it; this machine sets `PYTHONDONTWRITEBYTECODE`). "
        "Runs that wrote hundreds of files keep them until the bench ends: ext4 creates files "
        "several times slower for minutes after thousands were deleted (perf shows the time "
        "in `recently_deleted`), which would slow whatever runs next. For the same reason the "
        "bench waits before each timed run (up to 5 min in all) while creating a file beside "
        f"its output takes over {SETTLED_CREATE_US:.0f} µs (about 20 µs on a quiet disk here), "
        "as it does for minutes after another bench's clean-up.",
        *ratelimits.NOTES,
        "- Raw figures: `bench/out/results.json`; every child's output: `bench/out/logs/`.",
    ]
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description="imgbatch vs the naive peer")
    parser.add_argument("--only", default="", help="comma list of 1-9,hot (default: all)")
    parser.add_argument("--quick", action="store_true", help="~10x smaller workloads")
    parser.add_argument("--keep", action="store_true", help="keep the images under bench/out/")
    parser.add_argument("--doc", type=Path, help="where to write the report")
    parser.add_argument("--budget", type=float, default=900, metavar="S",
                        help="after S seconds every remaining child gets 10 s (default 900)")
    args = parser.parse_args()
    selected = [w.strip() for w in args.only.split(",") if w.strip()] or list(WORKLOADS)
    unknown = [w for w in selected if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")
    partial = args.quick or len(selected) < len(WORKLOADS)
    doc = args.doc or (BENCH / "out" / "benchmarks.md" if partial else DOC)

    def on_signal(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    out = BENCH / "out"
    ctx = Ctx(out=out, logs=out / "logs", quick=args.quick, keep=args.keep,
              deadline=time.monotonic() + args.budget)
    shutil.rmtree(ctx.logs, ignore_errors=True)
    # What a killed bench left in TRASH goes at the end with this one's: deleting it
    # now would slow file creation for the timed runs (see settle_disk).
    # Byte-compiled as a pip install or any first run leaves it: this machine sets
    # PYTHONDONTWRITEBYTECODE, which would add ~40 ms of compiling to every start-up.
    compileall.compile_dir(ROOT / "batch", quiet=1)
    started = time.monotonic()
    try:
        info = machine()
        print(f"bench: {info['cpu']}, {info['cores']} cores, {info.get('ram_gb')} GB, "
              f"Python {info['python']}, load {info['load_avg_start']}", flush=True)
        ctx.raw["startup"] = startup(ctx)
        for key in selected:
            try:
                WORKLOADS[key](ctx)
            except (RuntimeError, OSError, KeyError, ValueError) as exc:
                traceback.print_exc()
                ctx.failures.append(f"workload {key}: {exc}")
                print(f"[{key}] FAILED: {exc}", flush=True)
        info["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
        wall = time.monotonic() - started
        ctx.raw |= {"machine": info, "hotpath": ctx.hot, "bench_wall_s": wall,
                    "rows": [row.__dict__ for row in ctx.rows]}
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(ctx.raw, indent=1, default=str))
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(render(ctx, info, wall), encoding="utf-8")
        missed = [f"{r.workload.split(' (')[0]}: {r.metric}" for r in ctx.rows
                  if r.met == "NOT MET"]
        print(f"bench: done in {wall / 60:.1f} min; wrote {doc.relative_to(ROOT)}; "
              f"{len(missed)} target(s) not met" + "".join(f"\n  - {m}" for m in missed),
              flush=True)
        return 1 if ctx.failures else 0
    finally:
        kill_all()
        shutil.rmtree(out / TRASH, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
