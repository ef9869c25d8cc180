"""Batch mode against the simulated OpenAI Batch API, through the real CLI over sockets.

A 500-job catalog (60 in make test; generations and edits with a local input image,
so two endpoints and split batches) finishes over three runs: submit; collect part and
resubmit the failed lines; collect the rest. An expired batch keeps its finished
lines, and so does a cancelled one. A run killed (SIGKILL) during the upload,
after the create call went out but before the ledger recorded the batch id (the
next run adopts the batch by its tag instead of creating another), or during a
results download is followed by runs that finish the catalog. The simulator's
counters prove every job was paid for exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.conftest import Simulator, cli_env, read_results, run_cli, simulator, spawn_cli

SCALE = "0.0625"
PIXEL = Path(__file__).parent / "data" / "manifests" / "pixel.png"
DIMS = {"1:1": (64, 64), "3:2": (96, 64), "2:3": (64, 96)}  # 1024-based sizes x 0.0625


def env() -> dict[str, str]:
    return cli_env(OPENAI_API_KEY="sk-openai-batch-test")


def advance(sim: Simulator, seconds: float) -> None:
    request = urllib.request.Request(
        sim.url.removesuffix("/v1") + f"/_batch/advance?s={seconds}", data=b"",
        headers={"User-Agent": "imgbatch-test"})
    with urllib.request.urlopen(request, timeout=10):
        pass


def openai_stats(sim: Simulator) -> dict[str, Any]:
    request = urllib.request.Request(sim.url.removesuffix("/v1") + "/_openai_batch/stats",
                                     headers={"User-Agent": "imgbatch-test"})
    with urllib.request.urlopen(request, timeout=10) as response:
        stats: dict[str, Any] = json.loads(response.read())
    return stats


def write_catalog(folder: Path, n: int) -> tuple[Path, dict[str, str]]:
    """``n`` jobs, every fifth an edit of a local image, job 7's prompt "forbidden";
    the path and each job's ratio."""
    lines = ["endpoints:", "  nightly:", "    provider: openai-images", "    mode: batch",
             "jobs:"]
    ratios = {}
    for i in range(n):
        ratio = ["1:1", "3:2", "2:3"][i % 3]
        image = f", images: [{json.dumps(str(PIXEL))}]" if i % 5 == 2 else ""
        ratios[f"j{i:03d}"] = ratio
        blocked = " forbidden" if i == 7 else ""
        lines.append(f"  - {{id: j{i:03d}, prompt: \"picture {i}{blocked}\", "
                     f"aspect_ratio: \"{ratio}\""
                     f"{image}}}")
    path = folder / "catalog.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path, ratios


def run(sim: Simulator, manifest: Path, out: Path,
        *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli("run", str(manifest), "--output", str(out), "--base-url",
                   f"nightly={sim.url}", "--no-gallery", *extra, env=env(), timeout=300)


def check_images(out: Path, ratios: dict[str, str]) -> int:
    """Every succeeded job's one image decodes at its ratio's size; how many there are."""
    n = 0
    for row in read_results(out):
        if row["status"] != "succeeded":
            continue
        (image,) = row["images"]
        with Image.open(out / image["path"]) as picture:
            picture.load()
            assert picture.size == DIMS[ratios[row["id"]]], row["id"]
        n += 1
    return n


# The 500 jobs in make soak (IMGBATCH_SOAK_BATCH=1, ~12 s on 2 loaded cores);
# make test runs the same three runs on 60 (4 of 5 generations, 1 of 5 edits).
JOBS, BATCH_SIZE = (500, "200") if os.environ.get("IMGBATCH_SOAK_BATCH") else (60, "25")


def test_a_catalog_in_three_runs(tmp_path: Path) -> None:
    manifest, ratios = write_catalog(tmp_path, JOBS)
    out = tmp_path / "out"
    with simulator("--scale", SCALE, "--batch-delay", "3600", "--batch-line-fail", "0.2",
                   "--block-word", "forbidden") as sim:
        first = run(sim, manifest, out, "--batch-size", BATCH_SIZE)
        assert first.returncode == 1, first.stderr
        # generations in 2 batches, edits in 1: one endpoint per batch, at most BATCH_SIZE
        assert f"{JOBS} jobs in 3 batches submitted" in first.stderr, first.stderr
        assert openai_stats(sim)["calls"]["create"] == 3
        advance(sim, 3600)
        second = run(sim, manifest, out, "--batch-size", BATCH_SIZE)
        assert second.returncode == 1, second.stderr
        rows = {row["id"]: row for row in read_results(out)}
        back = [r for r in rows.values() if r["status"] == "pending"]
        assert 0 < len(back) < JOBS
        assert f"{len(back)} jobs in" in second.stderr and "at the batch price" in second.stderr
        advance(sim, 3600)
        third = run(sim, manifest, out, "--batch-size", BATCH_SIZE)
        stats = openai_stats(sim)
    rows = {row["id"]: row for row in read_results(out)}
    assert third.returncode == 1, third.stderr  # the one blocked job failed
    assert rows["j007"]["status"] == "failed"
    assert "safety system" in rows["j007"]["error"]["message"]
    assert sum(r["status"] == "succeeded" for r in rows.values()) == JOBS - 1
    assert check_images(out, ratios) == JOBS - 1
    assert stats["paid_by_key"] == {key: 1 for key in ratios if key != "j007"}
    assert stats["paid_twice"] == 0 and stats["batches"] > 3
    runs = json.loads((out / "summary.json").read_text())["runs"]
    collected = runs[1]["batch"]
    assert collected["cost_usd"] * 2 == collected["sync_usd"] > 0  # half the sync price


def test_expired_batch_keeps_finished_lines(tmp_path: Path) -> None:
    manifest, ratios = write_catalog(tmp_path, 20)
    out = tmp_path / "out"
    with simulator("--scale", SCALE, "--batch-expire", "1", "--batch-expire-keep", "0.5") as sim:
        assert run(sim, manifest, out).returncode == 1
        second = run(sim, manifest, out)  # collects the expired batch, resubmits the rest
        kept = sum(r["status"] == "succeeded" for r in read_results(out))
        assert 0 < kept < 20, second.stderr
        third = run(sim, manifest, out)
        stats = openai_stats(sim)
    assert third.returncode == 0, third.stderr
    assert check_images(out, ratios) == 20
    assert stats["paid_by_key"] == dict.fromkeys(ratios, 1)


@pytest.mark.parametrize("step", ["upload", "create", "download"])
def test_kill_at_each_step_then_rerun(tmp_path: Path, step: str) -> None:
    """SIGKILL while the server holds its answer to the first upload, create or download
    (it did the work: stored the file, made the batch, sent half the results); the next
    runs create no duplicate batch and pay no image twice."""
    manifest, ratios = write_catalog(tmp_path, 10)
    out = tmp_path / "out"
    with simulator("--scale", SCALE, f"--batch-hang-{step}", "1") as sim:
        if step == "download":
            assert run(sim, manifest, out).returncode == 1  # submitted; collected next
        process = spawn_cli("run", str(manifest), "--output", str(out), "--base-url",
                            f"nightly={sim.url}", "--no-gallery", env=env())
        try:
            deadline = time.monotonic() + 60
            while openai_stats(sim)["hung"] < 1:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                assert time.monotonic() < deadline
                time.sleep(0.05)
        finally:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
            if process.stderr is not None:
                process.stderr.close()
        created = openai_stats(sim)["calls"].get("create", 0)
        for _ in range(3):  # adopt or create; then the other endpoint's batch; then collect
            final = run(sim, manifest, out)
            if final.returncode == 0:
                break
        stats = openai_stats(sim)
    assert final.returncode == 0, final.stderr
    assert check_images(out, ratios) == 10
    assert stats["paid_by_key"] == dict.fromkeys(ratios, 1) and stats["paid_twice"] == 0
    # one batch per endpoint (generations, edits), whatever the kill interrupted
    assert stats["calls"]["create"] == stats["batches"] == 2
    if step == "create":
        # the killed run's batch was found by its tag, not created again
        assert created == 1 and stats["calls"]["list"] >= 1
    if step == "upload":
        assert created == 0


def test_cancel_keeps_the_images_finished_before_it(tmp_path: Path) -> None:
    """A cancelled OpenAI batch has the lines that finished (and were paid) in its output
    file: they are collected, the others go back to pending and are resubmitted."""
    manifest, ratios = write_catalog(tmp_path, 12)
    out = tmp_path / "out"
    with simulator("--scale", SCALE, "--batch-delay", "3600") as sim:
        assert run(sim, manifest, out).returncode == 1
        advance(sim, 600)  # running
        cancelled = run_cli("cancel", str(out), env=env())
        assert cancelled.returncode == 0, cancelled.stderr
        again = run(sim, manifest, out)  # collects what finished, resubmits the rest
        kept = sum(r["status"] == "succeeded" for r in read_results(out))
        assert 0 < kept < 12, again.stderr
        advance(sim, 3600)
        final = run(sim, manifest, out)
        stats = openai_stats(sim)
    assert final.returncode == 0, final.stderr
    assert check_images(out, ratios) == 12
    assert stats["paid_by_key"] == dict.fromkeys(ratios, 1)
    assert stats["calls"]["cancel"] >= 1
