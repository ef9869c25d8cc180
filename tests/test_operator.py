"""What the operator sees and spends: cost cap, summary.json, validate's estimate."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batch.cost import Budget, PriceTable, to_micros
from batch.errors import ServerError
from batch.jobs import Job
from batch.progress import ConsoleProgress
from tests.conftest import (
    ROOT,
    cli_env,
    read_results,
    run_args,
    run_cli,
    simulator,
    spawn_cli,
)
from tests.test_e2e import catalog
from tests.test_resume import wait_for


@pytest.mark.parametrize(
    ("cap", "prices", "started"),
    [
        (1.0, [0.24] * 10, 4),
        (0.24, [0.24] * 3, 1),
        (0.2, [0.24] * 3, 0),
        (1.0, [0.134] * 10, 7),
        (3.0, [0.24] * 30, 12),  # 12 x 0.24 in floats leaves a residue above 0 once settled
        (0.3, [0.1] * 5, 3),  # 0.1 + 0.2 != 0.3 in floats
        (None, [0.24] * 10, 10),
    ],
)
def test_budget_never_lets_a_request_start_past_the_cap(
    cap: float | None, prices: list[float], started: int
) -> None:
    budget = Budget(cap)
    micros = [to_micros(p) for p in prices]
    reserved = [p for p in micros if budget.try_reserve(p)]
    assert len(reserved) == started
    for price in reserved:
        budget.settle(price, price)
    assert budget.reserved == 0  # exact: nothing is left to wait for
    assert budget.spent == sum(reserved)
    if cap is not None:
        assert budget.spent <= budget.cap
        # The next job can never fit: the engine stops instead of waiting.
        assert not budget.could_ever_fit(micros[0])


def test_budget_releases_a_failed_request_and_counts_extra_images() -> None:
    budget = Budget(0.5)
    assert budget.try_reserve(240_000) and budget.try_reserve(240_000)
    assert not budget.try_reserve(240_000)
    assert budget.could_ever_fit(240_000)  # in flight may fail: worth waiting
    budget.settle(240_000, 0)  # failed: released
    assert budget.try_reserve(240_000)
    budget.settle(240_000, 2 * 240_000)  # an answer with two images spends both
    budget.settle(240_000, 240_000)
    assert budget.reserved == 0 and budget.spent == 720_000 > budget.cap


def test_price_table_overrides() -> None:
    table = PriceTable.with_overrides(
        {"gemini-3.0-pro-image-preview": {"4K": 0.3}, "my-model": {"1K": 0.01}}
    )
    assert table.price("gemini-3.0-pro-image-preview", "4K") == 0.3
    assert table.price("gemini-3.0-pro-image-preview", "1K") == 0.134
    assert table.price("my-model", "1K") == 0.01
    assert table.price("my-model", "2K") is None


def test_max_cost_that_does_not_divide_the_price_stops_at_once_and_resumes(
    tmp_path: Path,
) -> None:
    # The reproduction: 30 jobs at 4K ($0.24), --concurrency 16, --max-cost 3.0.
    # Twelve images cost $2.88; a thirteenth could never fit, so the run ends at once
    # (it used to wait for ever on a float residue left in the reservations).
    manifest = tmp_path / "fourk.yaml"
    manifest.write_text(
        "defaults: {image_size: 4K}\njobs:\n"
        + "".join(f"  - {{id: p{i:02d}, prompt: poster {i}}}\n" for i in range(30))
    )
    out = tmp_path / "out"
    with simulator("--scale", "0.02", "--latency", "0.2") as sim:
        done = run_cli(*run_args(manifest, out, sim), "--max-cost", "3.0",
                       "--concurrency", "16", "--no-gallery", timeout=60)
        first = sim.stats()["requests"]
        assert done.returncode == 1, done.stderr
        rows = read_results(out)
        statuses = [r["status"] for r in rows]
        assert statuses.count("succeeded") == 12 and statuses.count("pending") == 18
        assert first == 12  # no request could pass the cap, none was wasted
        assert "max-cost" in done.stderr
        summary = json.loads((out / "summary.json").read_text())["runs"][-1]
        assert summary["estimated_cost_usd"] == pytest.approx(2.88)
        assert summary["jobs"] == {"succeeded": 12, "failed": 0, "pending": 18}
        assert summary["stopped"] == "max_cost" and summary["exit_code"] == 1
        again = run_cli(*run_args(manifest, out, sim), "--concurrency", "16", "--no-gallery",
                        timeout=60)
        assert again.returncode == 0, again.stderr
        assert sim.stats()["requests"] - first == 18  # only the pending jobs were sent
    assert {r["status"] for r in read_results(out)} == {"succeeded"}


def test_answers_that_came_broken_are_counted_as_most_likely_billed(tmp_path: Path) -> None:
    """A 200 whose image is broken was generated, and most providers charge for it: the
    summary says what it probably cost, and --max-cost counts it as spent."""
    manifest = tmp_path / "m.yaml"
    manifest.write_text("jobs:\n" + "".join(
        f"  - {{id: j{i}, prompt: picture {i}}}\n" for i in range(8)))
    out = tmp_path / "out"
    with simulator("--scale", "0.05", "--fault-bad-base64", "0.5", "--seed", "3") as sim:
        done = run_cli(*run_args(manifest, out, sim), "--no-gallery")
        broken = sim.stats()["faults"].get("bad_base64", 0)
    assert done.returncode == 0, done.stderr
    assert broken > 0
    summary = json.loads((out / "summary.json").read_text())["runs"][-1]
    assert summary["estimated_cost_usd"] == pytest.approx(8 * 0.134)
    assert summary["broken_answers_cost_usd"] == pytest.approx(broken * 0.134), \
        f"{broken} answers came broken after a 200: each is most likely billed"
    assert "most likely billed" in done.stderr


def test_max_cost_refuses_unpriced_models(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text("- {prompt: x, model: mystery-model}\n")
    done = run_cli("run", str(manifest), "--output", str(tmp_path / "out"), "--max-cost", "5")
    assert done.returncode == 2
    assert "mystery-model" in done.stderr and "pricing" in done.stderr


def test_validate_estimates_cost() -> None:
    done = run_cli("validate", "jobs/example.yaml")
    assert done.returncode == 0, done.stderr
    # 7 images at $0.134 and one flash 1K image at $0.039
    assert "estimated cost: $0.98 sync, $0.49 at the batch rate, for one image per job\n" \
        in done.stdout


def test_catalog_with_vars_and_count_runs_resumes_and_reports_per_job(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # 13 jobs, 2 at a time, 0.3 s each: the 1 s runtime cuts the first run short, and the
    # requests in flight at the deadline finish, so it leaves between 2 and 12 done.
    with simulator("--scale", "0.03", "--latency", "0.3") as sim:
        first = run_cli(
            "run",
            "jobs/catalog.yaml",
            "--output",
            str(out),
            "--base-url",
            sim.url,
            "--max-runtime",
            "1",
            "--concurrency",
            "2",
        )
        partial = read_results(out)
        again = run_cli("run", "jobs/catalog.yaml", "--output", str(out), "--base-url", sim.url)
        stats = sim.stats()
    assert first.returncode == 1 and again.returncode == 0, again.stderr
    rows = read_results(out)
    ids = [r["id"] for r in rows]
    assert len(ids) == 13 == len(set(ids))
    assert "poster-retro-fox" in ids and "poster-art-deco-owl" in ids
    assert {"skyline-tokyo-1", "skyline-tokyo-2", "skyline-lisbon-2", "mascot-3"} <= set(ids)
    prompts = {r["id"]: r["prompt"] for r in rows}
    assert prompts["poster-minimalist-owl"] == (
        "A minimalist travel poster of a owl in the mountains"
    )
    assert all(r["status"] == "succeeded" for r in rows)
    done_first = {r["id"] for r in partial if r["status"] == "succeeded"}
    assert 2 <= len(done_first) < 13
    # Each expanded job is its own image, tracked and resumed on its own.
    assert len({r["images"][0]["sha256"] for r in rows}) == 13
    assert sum(r["attempts"] for r in rows) == stats["requests"]
    validate = run_cli("validate", "jobs/catalog.yaml")
    assert "13 job(s)" in validate.stdout


def test_sigterm_during_a_long_retry_after_ends_within_the_grace(tmp_path: Path) -> None:
    # The reproduction: every first attempt is answered 429 with Retry-After: 60;
    # a SIGTERM while the pool waits out that pause must end the run within --grace.
    manifest = catalog(20, tmp_path / "m.jsonl")
    out = tmp_path / "out"
    with simulator("--scale", "0.02", "--fault-rate-limit", "1", "--fault-attempts", "1",
                   "--retry-after", "60") as sim:
        run = spawn_cli(*run_args(manifest, out, sim), "--concurrency", "4", "--grace", "5",
                        "--no-gallery")
        wait_for(lambda: sim.stats()["faults"].get("rate_limit", 0) >= 1)
        started = time.monotonic()
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=30)
        took = time.monotonic() - started
        first = sim.stats()["requests"]
    assert run.returncode == 143, err
    assert took < 5 + 5, took  # nothing was in flight: it need not even use the grace
    rows = read_results(out)
    assert {r["status"] for r in rows} == {"pending"}
    assert sum(r["attempts"] for r in rows) == first
    with simulator("--scale", "0.02") as sim:
        again = run_cli(*run_args(manifest, out, sim), "--no-gallery")
        assert again.returncode == 0, again.stderr
        assert sim.stats()["requests"] == 20
    assert {r["status"] for r in read_results(out)} == {"succeeded"}


COMMIT_BUG = """
import batch.checkpoint as checkpoint
real = checkpoint.Checkpoint.commit_batch
calls = []
def commit_batch(self, states, staged):
    calls.append(1)
    if len(calls) == 2:
        raise RuntimeError("injected bug in commit_batch")
    return real(self, states, staged)
checkpoint.Checkpoint.commit_batch = commit_batch
"""


def test_a_bug_in_the_group_commit_ends_the_run_with_exit_70(tmp_path: Path) -> None:
    # The reproduction: a RuntimeError in commit_batch used to kill the commit
    # task and leave every later commit() waiting for ever.
    manifest = catalog(12, tmp_path / "m.jsonl")
    out = tmp_path / "out"
    with simulator("--scale", "0.02", "--latency", "0.1") as sim:
        args = run_args(manifest, out, sim, "--concurrency", "3", "--no-gallery")
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-c", COMMIT_BUG + "from batch.cli import entry\nentry()\n",
             *args],
            cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=60,
        )
        took = time.monotonic() - started
        first = sim.stats()["requests"]
        assert done.returncode == 70, done.stderr
        assert took < 30
        message = [line for line in done.stderr.splitlines() if "internal error" in line]
        assert len(message) == 1 and "injected bug in commit_batch" in message[0]
        assert "re-run" in message[0] and "Traceback" not in done.stderr
        # What the run records of itself says 70 too (summary.json, read by alerting).
        summary = json.loads((out / "summary.json").read_text())
        assert summary["runs"][-1]["exit_code"] == 70, summary["runs"][-1]
        rows = read_results(out)
        statuses = [r["status"] for r in rows]
        assert "pending" in statuses and set(statuses) <= {"succeeded", "pending"}
        for row in rows:
            for image in row["images"]:
                assert (out / image["path"]).is_file()
        again = run_cli(*args)
        assert again.returncode == 0, again.stderr
        done_first = statuses.count("succeeded")
        assert sim.stats()["requests"] - first == 12 - done_first


def test_progress_counts_a_job_waiting_for_its_commit_as_no_longer_in_flight() -> None:
    progress = ConsoleProgress(io.StringIO(), bar=False)
    job = Job(id="a", prompt="p", model="m", aspect_ratio="1:1", image_size="1K")
    progress.on_attempt(job)
    assert progress.in_flight == 1
    progress.on_answer(job)  # answered; its commit may still be under way
    assert progress.in_flight == 0
    progress.on_attempt(job)
    progress.on_answer(job)
    progress.on_retry(job, ServerError("x"), 1.0)
    assert progress.in_flight == 0 and progress.retrying == {"a"}
    assert "0 in flight" in progress.figures()


def test_max_runtime_is_a_deadline_for_the_whole_process(tmp_path: Path) -> None:
    # Answers take 8 s: the deadline (1 s) plus the grace (1 s) cuts the requests in
    # flight, writes results.jsonl and summary.json, and skips the gallery.
    manifest = catalog(6, tmp_path / "m.jsonl")
    out = tmp_path / "out"
    with simulator("--scale", "0.02", "--latency", "8") as sim:
        started = time.monotonic()
        done = run_cli(*run_args(manifest, out, sim), "--concurrency", "3",
                       "--max-runtime", "1", "--grace", "1", timeout=60)
        took = time.monotonic() - started
        sent = sim.stats()["requests"]
    assert done.returncode == 1, done.stderr
    assert took < 1 + 1 + 6, took  # a few seconds for the interpreter and the files
    rows = read_results(out)
    assert {r["status"] for r in rows} == {"pending"}
    assert sum(r["attempts"] for r in rows) == sent == 3
    summary = json.loads((out / "summary.json").read_text())["runs"][-1]
    assert summary["stopped"] == "max_runtime" and summary["exit_code"] == 1
    assert "imgbatch report" in done.stderr  # the gallery was left for later
