"""Resume: re-running the same command finishes the batch and pays for nothing twice."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT, cli_env, read_results, run_args, run_cli, simulator, spawn_cli
from tests.test_e2e import catalog, check_outputs

SCALE = "0.0625"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def wait_for(predicate: object, timeout_s: float = 30.0) -> None:
    """Poll until ``predicate()`` is true: the test waits on a fact, not a duration."""
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def succeeded_in_journal(out: Path) -> int:
    journal = out / ".imgbatch" / "journal.jsonl"
    if not journal.exists():
        return 0
    return journal.read_text(errors="replace").count('"status":"succeeded"')


def test_failed_quarter_is_finished_by_the_same_command(tmp_path: Path) -> None:
    manifest = catalog(40, tmp_path / "q.jsonl")
    out = tmp_path / "out"
    command = ["run", str(manifest), "--output", str(out), "--max-attempts", "1"]
    with simulator("--scale", SCALE, "--fault-server-error-json", "0.25", "--seed", "11") as sim:
        first = run_cli(*command, "--base-url", sim.url)
        failed = [r for r in read_results(out) if r["status"] == "failed"]
        assert first.returncode == 1
        before = sim.stats()["requests"]
        # --max-attempts 1: each injected 500 fails exactly one job, and nothing else does.
        assert len(failed) == sim.stats()["faults"]["server_error_json"] >= 1
        second = run_cli(*command, "--base-url", sim.url)
        after = sim.stats()
    assert second.returncode == 0, second.stderr
    assert after["requests"] - before == len(failed)  # only the failed ones were sent
    rows = read_results(out)
    check_outputs(out, rows)
    by_id = {r["id"]: r for r in rows}
    for row in failed:
        assert by_id[row["id"]]["attempts"] == 2  # attempts keep counting across runs


def test_edited_prompt_and_deleted_image_rerun_only_those_jobs(tmp_path: Path) -> None:
    manifest = catalog(8, tmp_path / "e.jsonl")
    out = tmp_path / "out"
    with simulator("--scale", SCALE) as sim:
        assert run_cli(*run_args(manifest, out, sim)).returncode == 0
        rows = read_results(out)
        lines = manifest.read_text().splitlines()
        edited = json.loads(lines[2])
        edited["prompt"] = "an entirely new picture"
        lines[2] = json.dumps(edited)
        manifest.write_text("\n".join(lines) + "\n")
        (out / rows[5]["images"][0]["path"]).unlink()
        altered = out / rows[6]["images"][0]["path"]
        altered.write_bytes(altered.read_bytes()[:-20] + b"\0" * 20)
        again = run_cli(*run_args(manifest, out, sim))
        stats = sim.stats()
    assert again.returncode == 0, again.stderr
    assert stats["requests"] == 8 + 3
    assert stats["by_prompt"][sha("an entirely new picture")] == 1
    assert stats["by_prompt"][sha(rows[5]["prompt"])] == 2
    assert stats["by_prompt"][sha(rows[6]["prompt"])] == 2
    check_outputs(out, read_results(out))


def test_force_redoes_everything(tmp_path: Path) -> None:
    manifest = catalog(3, tmp_path / "f.jsonl")
    out = tmp_path / "out"
    with simulator("--scale", SCALE) as sim:
        run_cli(*run_args(manifest, out, sim))
        forced = run_cli(*run_args(manifest, out, sim), "--force")
        assert sim.stats()["requests"] == 6
    assert forced.returncode == 0
    rows = read_results(out)
    check_outputs(out, rows)
    assert all(r["attempts"] == 2 for r in rows)


def test_torn_journal_record_is_tolerated(tmp_path: Path) -> None:
    manifest = catalog(5, tmp_path / "t.jsonl")
    out = tmp_path / "out"
    with simulator("--scale", SCALE) as sim:
        run_cli(*run_args(manifest, out, sim))
        journal = out / ".imgbatch" / "journal.jsonl"
        with journal.open("ab") as handle:
            handle.write(b'{"id":"job-000","fp":"abc","status":"succ')  # a crash mid-append
        again = run_cli(*run_args(manifest, out, sim))
        assert sim.stats()["requests"] == 5
    assert again.returncode == 0, again.stderr
    assert "torn" in again.stderr
    assert journal.read_bytes().endswith(b"\n")
    check_outputs(out, read_results(out))


def test_second_run_on_the_same_folder_exits_4_naming_the_holder(tmp_path: Path) -> None:
    manifest = catalog(6, tmp_path / "l.jsonl")
    out = tmp_path / "out"
    with simulator("--scale", SCALE, "--latency", "0.5") as sim:
        first = spawn_cli(*run_args(manifest, out, sim), "--concurrency", "1")
        lock = out / ".imgbatch" / "lock"
        wait_for(lambda: lock.exists() and lock.read_text().strip() == str(first.pid))
        second = run_cli(*run_args(manifest, out, sim))
        assert second.returncode == 4
        assert str(first.pid) in second.stderr
        _, err = first.communicate(timeout=60)
        assert first.returncode == 0, err
        assert sim.stats()["requests"] == 6


def test_stale_lock_from_a_dead_process_does_not_block(tmp_path: Path) -> None:
    manifest = catalog(2, tmp_path / "s.jsonl")
    out = tmp_path / "out"
    (out / ".imgbatch").mkdir(parents=True)
    (out / ".imgbatch" / "lock").write_text("999999\n")
    with simulator("--scale", SCALE) as sim:
        done = run_cli(*run_args(manifest, out, sim))
    assert done.returncode == 0, done.stderr


def test_sigterm_stops_cleanly_and_the_rerun_finishes(tmp_path: Path) -> None:
    manifest = catalog(30, tmp_path / "s.jsonl")
    out = tmp_path / "out"
    with simulator("--scale", SCALE, "--latency", "0.3") as sim:
        run = spawn_cli(
            *run_args(manifest, out, sim),
            "--concurrency",
            "3",
            "--grace",
            "10",
        )
        wait_for(lambda: succeeded_in_journal(out) >= 3)
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=60)
        assert run.returncode == 143, err
        assert "SIGTERM" in err
        rows = read_results(out)
        done = [r for r in rows if r["status"] == "succeeded"]
        assert 3 <= len(done) < 30
        assert {r["status"] for r in rows} == {"succeeded", "pending"}
        sent_first = sim.stats()["requests"]
        assert sent_first == len(done)  # in-flight requests were let finish and recorded
        again = run_cli(*run_args(manifest, out, sim))
        assert again.returncode == 0, again.stderr
        assert sim.stats()["requests"] == 30
    check_outputs(out, read_results(out))


def test_max_runtime_leaves_the_rest_pending(tmp_path: Path) -> None:
    manifest = catalog(40, tmp_path / "m.jsonl")
    out = tmp_path / "out"
    with simulator("--scale", SCALE, "--latency", "0.25") as sim:
        started = time.monotonic()
        done = run_cli(
            *run_args(manifest, out, sim),
            "--concurrency",
            "2",
            "--max-runtime",
            "1",
        )
        wall = time.monotonic() - started
        sent = sim.stats()["requests"]
    assert done.returncode == 1, done.stderr
    rows = read_results(out)
    finished = sum(r["status"] == "succeeded" for r in rows)
    assert finished == sent  # requests in flight at the deadline were let finish
    assert 2 <= finished < 40
    assert {r["status"] for r in rows} == {"succeeded", "pending"}
    assert wall < 10
    assert "max-runtime" in done.stderr


def test_status_reports_counts_without_network(tmp_path: Path) -> None:
    manifest = catalog(4, tmp_path / "st.jsonl")
    out = tmp_path / "out"
    with simulator("--scale", SCALE) as sim:
        run_cli(*run_args(manifest, out, sim))
    status = run_cli("status", str(out), env={k: v for k, v in os.environ.items()})
    assert status.returncode == 0, status.stderr
    assert "4 succeeded" in status.stdout
    assert "last run ended" in status.stdout


def test_a_second_sigint_cuts_the_grace_period_short(tmp_path: Path) -> None:
    manifest = catalog(6, tmp_path / "i.jsonl")
    out = tmp_path / "out"
    with simulator("--scale", SCALE, "--latency", "60") as sim:
        run = spawn_cli(
            *run_args(manifest, out, sim),
            "--concurrency",
            "3",
            "--grace",
            "120",
        )
        wait_for(lambda: sim.stats()["in_flight"] == 3)
        started = time.monotonic()
        run.send_signal(signal.SIGINT)
        assert run.stderr is not None
        seen = ""
        while "SIGINT received" not in seen:  # two signals at once may merge into one
            line = run.stderr.readline()
            assert line, seen
            seen += line
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=30)
        assert time.monotonic() - started < 10
    assert run.returncode == 130, err
    rows = read_results(out)
    assert {r["status"] for r in rows} == {"pending"}
    assert sum(r["attempts"] for r in rows) == 3


# Every rename of an image temporary to its final name fails with EIO, in the CLI's process.
FAIL_IMAGE_RENAMES = """
import errno, os
from batch import fsops
real = fsops.replace
def replace(src, dst):
    if "/images/." in str(src):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    return real(src, dst)
fsops.replace = replace
from batch.cli import entry
entry()
"""


def test_a_paid_image_whose_rename_failed_is_published_by_the_next_run(tmp_path: Path) -> None:
    """The success is in the journal before the rename: the image is kept, never paid twice."""
    manifest = catalog(6, tmp_path / "r.jsonl")
    out = tmp_path / "out"
    with simulator("--scale", SCALE) as sim:
        first = subprocess.run(
            [sys.executable, "-c", FAIL_IMAGE_RENAMES, *run_args(manifest, out, sim),
             "--concurrency", "2"],
            cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=60,
        )
        assert first.returncode == 1, first.stderr
        assert "Input/output error" in first.stderr and "re-run" in first.stderr
        assert "Traceback" not in first.stderr
        journal = out / ".imgbatch" / "journal.jsonl"
        kept = {}
        for line in journal.read_text().splitlines():
            record = json.loads(line)
            if record.get("status") == "succeeded":
                kept[record["id"]] = record["images"][0]
        assert kept  # at least the job whose rename failed was recorded
        for image in kept.values():
            assert not (out / image["path"]).exists()
            data = (out / image["tmp"]).read_bytes()  # still there, under its temporary name
            assert hashlib.sha256(data).hexdigest() == image["sha256"]
        paid = sim.stats()["requests"]
        again = run_cli(*run_args(manifest, out, sim))
        assert again.returncode == 0, again.stderr
        assert sim.stats()["requests"] - paid == 6 - len(kept)  # the recorded ones: not again
    rows = read_results(out)
    check_outputs(out, rows)
    for job_id, image in kept.items():
        assert next(r for r in rows if r["id"] == job_id)["images"][0]["sha256"] == image["sha256"]
    assert not [p for p in (out / "images").iterdir() if p.name.endswith(".tmp")]
