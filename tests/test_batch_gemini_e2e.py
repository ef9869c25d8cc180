"""Batch mode against the simulated Gemini Batch API, through the real CLI over sockets.

Submit, collect and resubmit over several runs on the simulator's batch clock
(moved by the test, never slept on); batches that expire, fail or are
cancelled; SIGKILL during the upload, between the create call and the ledger
write, and during a results download, each followed by a run that creates no
duplicate batch and pays no image twice (the simulator's own counters say so).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from batch.sim.images import image_dims
from tests.conftest import (
    ROOT,
    Simulator,
    cli_env,
    read_results,
    run_cli,
    simulator,
    spawn_cli,
)

SCALE = "0.0625"
PIXEL = Path(__file__).parent / "data" / "manifests" / "pixel.png"


def env() -> dict[str, str]:
    return cli_env(GEMINI_API_KEY="gm-key")


def base(sim: Simulator) -> str:
    return sim.url.removesuffix("/v1") + "/v1beta"


def advance(sim: Simulator, seconds: float) -> None:
    request = urllib.request.Request(
        sim.url.removesuffix("/v1") + f"/_batch/advance?s={seconds}", data=b"",
        headers={"User-Agent": "imgbatch-test"})
    with urllib.request.urlopen(request, timeout=10):
        pass


def batch_stats(sim: Simulator) -> dict[str, Any]:
    stats: dict[str, Any] = sim.stats()["batch"]
    return stats


def write_catalog(folder: Path, n: int, *, extra: str = "", prefix: str = "j") -> Path:
    lines = ["endpoints:", "  nightly:", "    provider: gemini", "    mode: batch", "jobs:"]
    for i in range(n):
        size = ["1K", "2K"][i % 2]
        ratio = ["1:1", "3:2", "2:3", "16:9"][i % 4]
        image = f", images: [{json.dumps(str(PIXEL))}]" if i % 5 == 2 else ""
        lines.append(f"  - {{id: {prefix}{i:03d}, prompt: \"picture {i}{extra}\", "
                     f"aspect_ratio: \"{ratio}\", image_size: {size}{image}}}")
    path = folder / "catalog.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(sim: Simulator, manifest: Path, out: Path, *extra: str,
        decode: bool = False) -> subprocess.CompletedProcess[str]:
    """``imgbatch run``; the decode check (a spawned child per run) only where asked."""
    verify = () if decode else ("--verify", "structure")
    return run_cli("run", str(manifest), "--output", str(out), "--base-url",
                   f"nightly={base(sim)}", "--no-gallery", *verify, *extra, env=env(),
                   timeout=300)


def check_images(out: Path, manifest: Path) -> int:
    """Every succeeded job's image decodes at the size its job asked for; their count."""
    jobs = {row["id"]: row for row in read_results(out)}
    wanted = {}
    for line in manifest.read_text().splitlines():
        if "id:" in line:
            job_id = line.split("id: ")[1].split(",")[0]
            ratio = line.split('aspect_ratio: "')[1].split('"')[0]
            size = line.split("image_size: ")[1].split(",")[0].split("}")[0]
            wanted[job_id] = image_dims(ratio, size, float(SCALE))
    n = 0
    for job_id, row in jobs.items():
        if row["status"] != "succeeded":
            continue
        (image,) = row["images"]
        with Image.open(out / image["path"]) as picture:
            picture.load()
            assert picture.size == wanted[job_id]
        n += 1
    return n


def wait_for(sim: Simulator, predicate: Any, process: subprocess.Popen[str]) -> None:
    """Until the simulator's counters say ``predicate`` (the process still running)."""
    deadline = time.monotonic() + 60
    while not predicate(batch_stats(sim)):
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert time.monotonic() < deadline, batch_stats(sim)
        time.sleep(0.05)


def test_three_runs_submit_collect_resubmit(tmp_path: Path) -> None:
    """Run 1 submits; run 2 (batches still running) collects nothing; run 3 collects, the
    failed lines go back and are resubmitted; run 4 collects the rest. One paid image per
    job, the summary at the batch price."""
    manifest = write_catalog(tmp_path, 40)
    out = tmp_path / "out"
    with simulator("--scale", SCALE, "--batch-delay", "3600", "--batch-line-fail", "0.25",
                   "--block-word", "picture 7") as sim:
        first = run(sim, manifest, out, "--batch-size", "15")
        assert first.returncode == 1, first.stderr
        assert "40 jobs in 3 batches submitted" in first.stderr
        second = run(sim, manifest, out, "--batch-size", "15")
        assert second.returncode == 1 and "40 jobs in 3 batches submitted" in second.stderr
        assert batch_stats(sim)["calls"]["create"] == 3
        advance(sim, 3600)
        third = run(sim, manifest, out, "--batch-size", "15", decode=True)
        assert third.returncode == 1, third.stderr
        rows = {row["id"]: row for row in read_results(out)}
        back = [r for r in rows.values() if r["status"] == "pending"]
        assert back, "some lines should have failed retryably"
        assert f"{len(back)} jobs in 1 batches submitted" in third.stderr
        assert "at the batch price" in third.stderr
        advance(sim, 3600)
        fourth = run(sim, manifest, out, "--batch-size", "15")
        stats = batch_stats(sim)
    rows = {row["id"]: row for row in read_results(out)}
    assert fourth.returncode == 1  # the blocked job
    assert rows["j007"]["status"] == "failed" and rows["j007"]["error"]["type"] == "batch_refused"
    assert sum(r["status"] == "succeeded" for r in rows.values()) == 39
    assert check_images(out, manifest) == 39
    inspected = run_cli("inspect", "--json", str(out / rows["j001"]["images"][0]["path"]))
    facts = json.loads(inspected.stdout)["provenance"]  # stamped as sync mode stamps
    assert facts["job_id"] == "j001" and facts["provider"] == "gemini"
    assert stats["paid_images"] == 39 and stats["paid_twice"] == 0
    assert stats["calls"]["create"] == 4
    summary = json.loads((out / "summary.json").read_text())["runs"]
    collected = summary[2]["batch"]
    assert collected["cost_usd"] * 2 == collected["sync_usd"] > 0  # half the sync price


def test_expired_batch_keeps_finished_lines(tmp_path: Path) -> None:
    manifest = write_catalog(tmp_path, 20)
    out = tmp_path / "out"
    with simulator("--scale", SCALE, "--batch-expire", "1", "--batch-expire-keep", "0.5") as sim:
        first = run(sim, manifest, out)
        assert first.returncode == 1
        second = run(sim, manifest, out)  # collects the expired batch, resubmits the rest
        kept = sum(r["status"] == "succeeded" for r in read_results(out))
        assert 0 < kept < 20, second.stderr
        assert "expired" in (out / ".imgbatch" / "batches.jsonl").read_text()
        third = run(sim, manifest, out)
        stats = batch_stats(sim)
    assert third.returncode == 0, third.stderr
    assert check_images(out, manifest) == 20
    assert stats["paid_images"] == 20 and stats["paid_twice"] == 0
    assert stats["calls"]["create"] == 2


def test_failed_batch_resubmits_every_job(tmp_path: Path) -> None:
    manifest = write_catalog(tmp_path, 6)
    out = tmp_path / "out"
    with simulator("--scale", SCALE, "--batch-fail", "1") as sim:
        run(sim, manifest, out)
        second = run(sim, manifest, out)
        assert all(r["status"] == "pending" for r in read_results(out)), second.stderr
        third = run(sim, manifest, out)
        stats = batch_stats(sim)
    assert third.returncode == 0, third.stderr
    assert stats["paid_images"] == 6 and stats["calls"]["create"] == 2


def test_wait_polls_until_done_through_faults(tmp_path: Path) -> None:
    """--wait with faults on every kind of control call and downloads cut half way
    (resumed with Range): one run ends with every image."""
    manifest = write_catalog(tmp_path, 12)
    out = tmp_path / "out"
    with simulator("--scale", SCALE, "--batch-fault-poll", "0.3", "--batch-fault-upload", "0.3",
                   "--batch-fault-download", "0.5", "--seed", "7") as sim:
        done = run(sim, manifest, out, "--wait", "--poll-interval", "0.05", "--batch-size", "4")
        stats = batch_stats(sim)
    assert done.returncode == 0, done.stderr
    assert check_images(out, manifest) == 12
    assert stats["paid_twice"] == 0 and stats["calls"]["create"] == 3
    assert stats["calls"].get("download_cut", 0) >= 1  # and resumed with Range


def test_cancel_sends_jobs_back_to_pending(tmp_path: Path) -> None:
    manifest = write_catalog(tmp_path, 5)
    out = tmp_path / "out"
    with simulator("--scale", SCALE, "--batch-delay", "3600") as sim:
        run(sim, manifest, out)
        synced = run(sim, manifest, out, "--mode", "sync")  # a live batch holds them all
        assert synced.returncode == 1 and sim.stats()["by_prompt"] == {}, synced.stderr
        status = run_cli("status", str(out), env=env())
        assert "open batches: 1, 5 job(s)" in status.stdout and "batches/" in status.stdout
        cancelled = run_cli("cancel", str(out), env=env())
        assert cancelled.returncode == 0 and "1 batch(es) cancelled" in cancelled.stdout
        again = run(sim, manifest, out)  # collects the cancelled batch, resubmits its jobs
        stats = batch_stats(sim)
    assert again.returncode == 1 and "5 jobs in 1 batches submitted" in again.stderr
    assert stats["calls"]["cancel"] == 1 and stats["calls"]["create"] == 2
    assert stats["paid_images"] == 0


def kill_then_rerun(tmp_path: Path, hang: str, reached: Any) -> tuple[dict[str, Any], Path]:
    manifest = write_catalog(tmp_path, 10)
    out = tmp_path / "out"
    with simulator("--scale", SCALE, f"--batch-hang-{hang}", "1") as sim:
        if hang == "download":
            assert run(sim, manifest, out).returncode == 1  # submitted; collected next run
        process = spawn_cli("run", str(manifest), "--output", str(out), "--base-url",
                            f"nightly={base(sim)}", "--no-gallery", "--verify", "structure",
                            env=env())
        try:
            wait_for(sim, reached, process)
        finally:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
            if process.stderr is not None:
                process.stderr.close()
        for _ in range(2):  # collect (and, after an upload killed, create first)
            final = run(sim, manifest, out)
            if final.returncode == 0:
                break
        stats = batch_stats(sim)
    assert final.returncode == 0, final.stderr
    assert check_images(out, manifest) == 10
    assert stats["paid_images"] == 10 and stats["paid_twice"] == 0
    return stats, out


def test_kill_during_upload_creates_one_batch(tmp_path: Path) -> None:
    stats, _ = kill_then_rerun(tmp_path, "upload", lambda s: s["hung"] >= 1)
    assert stats["calls"]["create"] == 1  # the killed run never created one


def test_kill_between_create_and_ledger_adopts_the_batch(tmp_path: Path) -> None:
    stats, _ = kill_then_rerun(tmp_path, "create", lambda s: s["hung"] >= 1)
    assert stats["calls"]["create"] == 1  # found by its tag and adopted, not created again
    assert stats["calls"]["list"] >= 1


def test_kill_during_download_collects_once(tmp_path: Path) -> None:
    stats, _ = kill_then_rerun(tmp_path, "download", lambda s: s["hung"] >= 1)
    assert stats["calls"]["create"] == 1 and stats["calls"]["download"] == 2


@pytest.mark.skipif(not os.environ.get("IMGBATCH_SOAK_BATCH"),
                    reason="11 s on 2 cores: make soak runs it (IMGBATCH_SOAK_BATCH=1)")
def test_catalog_of_500_in_three_runs(tmp_path: Path) -> None:
    """Issue 13's "done when" for Gemini: submit; collect part and resubmit the failed
    lines; collect the rest. Every image intact, one paid image per job, the batch price
    in the summary."""
    manifest = write_catalog(tmp_path, 500)
    out = tmp_path / "out"
    with simulator("--scale", SCALE, "--batch-line-fail", "0.1", "--batch-max-requests",
                   "200") as sim:
        first = run(sim, manifest, out, "--batch-size", "200")
        assert first.returncode == 1 and "500 jobs in 3 batches submitted" in first.stderr
        second = run(sim, manifest, out, "--batch-size", "200")
        assert second.returncode == 1, second.stderr
        pending = sum(r["status"] == "pending" for r in read_results(out))
        assert 0 < pending < 100 and f"{pending} jobs in 1 batches submitted" in second.stderr
        third = run(sim, manifest, out, "--batch-size", "200")
        stats = batch_stats(sim)
    assert third.returncode == 0, third.stderr
    assert check_images(out, manifest) == 500
    assert stats["paid_images"] == 500 and stats["paid_twice"] == 0
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert sum(run["batch"]["succeeded"] for run in runs) == 500
    assert all(run["batch"]["cost_usd"] * 2 == pytest.approx(run["batch"]["sync_usd"])
               for run in runs)
    assert "at the batch price" in third.stderr


def test_collect_memory_stays_flat(tmp_path: Path) -> None:
    """Peak RSS of the run that collects a results file of 12 images of 4 MB (about 64 MB
    of base64), measured by bench/batch_rss.py in its own child; the 200 x 7.5 MB case
    (a 2 GB file) is the bench itself."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "batch_rss.py"), "--images", "12",
         "--image-bytes", "4000000", "--max-rss-mb", "100"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["ok"], (done.stdout, done.stderr)
    assert report["collect_peak_rss_mb"] < 100


def test_max_cost_counts_open_batches_and_sync_jobs_are_not_resubmitted(tmp_path: Path) -> None:
    """--max-cost holds what open batches will cost as spent; jobs a sync run finished
    are never submitted; validate shows both estimates."""
    small = write_catalog(tmp_path, 3)
    out = tmp_path / "out"
    with simulator("--scale", SCALE, "--batch-delay", "3600") as sim:
        synced = run(sim, small, out, "--mode", "sync")
        assert synced.returncode == 0, synced.stderr
        manifest = write_catalog(tmp_path, 10)
        plan_text = run_cli("validate", str(manifest), env=env()).stdout
        assert "sync, $" in plan_text and "at the batch rate" in plan_text
        # 7 jobs left at $0.067 each: $0.30 buys 4 of them.
        first = run(sim, manifest, out, "--max-cost", "0.30")
        assert "4 jobs in 1 batches submitted" in first.stderr, first.stderr
        second = run(sim, manifest, out, "--max-cost", "0.30")  # $0.268 already committed
        assert "4 jobs in 1 batches submitted" in second.stderr, second.stderr
        ledger = [json.loads(line) for line in
                  (out / ".imgbatch" / "batches.jsonl").read_text().splitlines()]
        submitted = {key for record in ledger for key in record["keys"]}
        forced = run(sim, manifest, out, "--force")
    assert submitted.isdisjoint({"j000", "j001", "j002"})  # done by the sync run
    assert forced.returncode == 2 and "--force" in forced.stderr


def test_fallback_sync_after_the_deadline(tmp_path: Path) -> None:
    """--batch-fallback sync: a batch past --batch-deadline is cancelled and its jobs are
    sent one request each in the same run; none is paid twice."""
    manifest = write_catalog(tmp_path, 6)
    out = tmp_path / "out"
    with simulator("--scale", SCALE, "--batch-delay", "3600") as sim:
        first = run(sim, manifest, out, "--batch-fallback", "sync", "--batch-deadline", "0")
        assert "6 jobs in 1 batches submitted" in first.stderr, first.stderr
        second = run(sim, manifest, out, "--batch-fallback", "sync", "--batch-deadline", "0")
        stats = sim.stats()
    assert second.returncode == 0, second.stderr
    assert check_images(out, manifest) == 6
    assert stats["batch"]["calls"]["cancel"] == 1 and stats["batch"]["paid_images"] == 0
    assert stats["requests"] >= 6 and max(stats["by_prompt"].values()) == 1


def test_wait_gives_up_on_lines_that_keep_failing(tmp_path: Path) -> None:
    """--wait never loops for ever: a job whose line fails every time is submitted three
    times in a run, then left pending with the provider's reason."""
    manifest = write_catalog(tmp_path, 2)
    out = tmp_path / "out"
    with simulator("--scale", SCALE, "--batch-line-fail", "1", "--batch-line-fail-attempts",
                   "99") as sim:
        done = run(sim, manifest, out, "--wait", "--poll-interval", "0.01")
        stats = batch_stats(sim)
    assert done.returncode == 1, done.stderr
    assert stats["calls"]["create"] == 3 and stats["paid_images"] == 0
    rows = read_results(out)
    assert {row["status"] for row in rows} == {"pending"}
    assert {row["error"]["type"] for row in rows} == {"batch_retryable"}
