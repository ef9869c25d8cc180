"""The real CLI against the real simulator, over a socket."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from batch.sim.server import image_dims
from tests.conftest import KEY, cli_env, read_results, run_args, run_cli, simulator

SCALE = "0.0625"
RATIOS = ["1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9"]


def catalog(n: int, path: Path, prefix: str = "job") -> Path:
    lines = []
    for i in range(n):
        lines.append(
            json.dumps(
                {
                    "id": f"{prefix}-{i:03d}",
                    "prompt": f"picture number {i} of {prefix}",
                    "aspect_ratio": RATIOS[i % len(RATIOS)],
                    "image_size": ["1K", "2K"][i % 2],
                }
            )
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def png_text(data: bytes) -> dict[str, Any]:
    """The simulator's tEXt record: which prompt this image was made for."""
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"tEXt" and body.startswith(b"imgbatch-request\0"):
            return json.loads(body.split(b"\0", 1)[1])  # type: ignore[no-any-return]
        pos += 12 + length
    raise AssertionError("no imgbatch-request text chunk")


def check_outputs(out: Path, rows: list[dict[str, Any]], scaled: float = 0.0625) -> None:
    """Every succeeded row points at an intact image made for its own prompt."""
    for row in rows:
        assert row["status"] == "succeeded", row
        assert row["error"] is None
        assert len(row["images"]) == 1
        image = row["images"][0]
        data = (out / image["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == image["sha256"]
        assert len(data) == image["bytes"]
        assert image["mime"] == "image/png" and image["path"].endswith(".png")
        want = image_dims(row["aspect_ratio"], row["image_size"], scaled)
        assert (image["width"], image["height"]) == want
        made_for = png_text(data)["prompt_sha256"]
        assert made_for == hashlib.sha256(row["prompt"].encode()).hexdigest()
    leftovers = [p for p in (out / "images").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_clean_run(tmp_path: Path) -> None:
    manifest = catalog(24, tmp_path / "cat.jsonl")
    out = tmp_path / "out"
    with simulator("--scale", SCALE, "--latency", "0.2") as sim:
        done = run_cli(*run_args(manifest, out, sim), "--concurrency", "6")
        stats = sim.stats()
    assert done.returncode == 0, done.stderr
    rows = read_results(out)
    assert [r["id"] for r in rows] == [f"job-{i:03d}" for i in range(24)]
    check_outputs(out, rows)
    assert all(r["attempts"] == 1 for r in rows)
    assert rows[0]["usage"]["completion_tokens_details"]["image_tokens"] == 1120
    assert stats["requests"] == 24
    assert stats["max_in_flight"] == 6
    assert "24 succeeded" in done.stderr.splitlines()[-1]


def test_heavy_faults_still_finish_every_job(tmp_path: Path) -> None:
    manifest = catalog(80, tmp_path / "faults.jsonl")
    out = tmp_path / "out"
    with simulator(
        "--scale", SCALE, "--fault-mix", "0.4", "--retry-after", "0.05", "--seed", "3"
    ) as sim:
        done = run_cli(
            *run_args(manifest, out, sim),
            "--concurrency",
            "16",
            "--max-attempts",
            "6",
        )
        stats = sim.stats()
    assert done.returncode == 0, done.stderr
    rows = read_results(out)
    check_outputs(out, rows)
    assert sum(stats["faults"].values()) >= 15  # the faults really happened
    by_prompt = stats["by_prompt"]
    for row in rows:
        sha = hashlib.sha256(row["prompt"].encode()).hexdigest()
        # Every request the server saw for a job is one we counted: none after success.
        assert by_prompt[sha] == row["attempts"], row["id"]
    assert sum(r["attempts"] for r in rows) == stats["requests"]


def test_rerun_sends_nothing_for_finished_jobs(tmp_path: Path) -> None:
    manifest = catalog(10, tmp_path / "again.jsonl")
    out = tmp_path / "out"
    with simulator("--scale", SCALE) as sim:
        first = run_cli(*run_args(manifest, out, sim))
        second = run_cli(*run_args(manifest, out, sim))
        stats = sim.stats()
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    assert stats["requests"] == 10
    check_outputs(out, read_results(out))


def test_invalid_manifest_exits_2_naming_the_place_and_sends_nothing(tmp_path: Path) -> None:
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text(
        '{"id": "ok", "prompt": "fine"}\n'
        '{"id": "two", "prompt": "x", "aspect_ratio": "7:3"}\n'
        '{"id": "three", "promt": "typo"}\n'
    )
    with simulator("--scale", SCALE) as sim:
        done = run_cli(
            "run", str(manifest), "--output", str(tmp_path / "out"), "--base-url", sim.url
        )
        stats = sim.stats()
    assert done.returncode == 2
    assert f"{manifest}:2" in done.stderr and "aspect_ratio" in done.stderr
    assert f"{manifest}:3" in done.stderr and "promt" in done.stderr
    assert "Traceback" not in done.stderr
    assert stats["requests"] == 0


def test_missing_key_is_a_usage_error(tmp_path: Path) -> None:
    manifest = catalog(1, tmp_path / "k.jsonl")
    env = cli_env()
    del env["QINIU_API_KEY"]
    done = run_cli("run", str(manifest), "--output", str(tmp_path / "out"), env=env)
    assert done.returncode == 2
    assert "QINIU_API_KEY" in done.stderr and "Traceback" not in done.stderr


def test_bad_key_stops_the_run_and_leaves_jobs_pending(tmp_path: Path) -> None:
    manifest = catalog(30, tmp_path / "auth.jsonl")
    out = tmp_path / "out"
    with simulator("--scale", SCALE, "--api-key", "the-right-key") as sim:
        done = run_cli(*run_args(manifest, out, sim), "--concurrency", "2")
        assert done.returncode == 3, done.stderr
        rows = read_results(out)
        assert {r["status"] for r in rows} == {"pending"}
        assert sim.stats()["requests"] <= 4  # stopped quickly: no request after the first 401s
        assert "401" in done.stderr and "invalid api key" in done.stderr
        fixed = run_cli(
            *run_args(manifest, out, sim),
            env=cli_env(QINIU_API_KEY="the-right-key"),
        )
    assert fixed.returncode == 0, fixed.stderr
    check_outputs(out, read_results(out))
    assert KEY not in done.stderr + done.stdout


def test_rejected_and_no_image_jobs_fail_with_the_servers_words(tmp_path: Path) -> None:
    manifest = tmp_path / "mixed.yaml"
    manifest.write_text(
        "jobs:\n"
        "  - {id: good, prompt: a good one}\n"
        "  - {id: unknown-model, prompt: x, model: no-such-model}\n"
    )
    out = tmp_path / "out"
    with simulator("--scale", SCALE) as sim:
        done = run_cli(*run_args(manifest, out, sim))
    assert done.returncode == 1
    rows = {r["id"]: r for r in read_results(out)}
    assert rows["good"]["status"] == "succeeded"
    bad = rows["unknown-model"]
    assert bad["status"] == "failed" and bad["attempts"] == 1
    assert bad["error"]["http_status"] == 404 and "model" in bad["error"]["message"]
    with simulator("--scale", SCALE, "--fault-no-image", "1", "--fault-attempts", "0") as sim:
        done = run_cli(
            "run", str(manifest), "--output", str(tmp_path / "out2"), "--base-url", sim.url
        )
    rows = {r["id"]: r for r in read_results(tmp_path / "out2")}
    assert rows["good"]["status"] == "failed"
    assert rows["good"]["error"]["type"] == "no_image"
    assert rows["good"]["attempts"] == 2
    assert "can't generate" in rows["good"]["error"]["message"]


def test_lying_mime_type_is_named_by_the_real_type(tmp_path: Path) -> None:
    manifest = catalog(3, tmp_path / "lie.jsonl")
    out = tmp_path / "out"
    with simulator("--scale", SCALE, "--jpeg-lie", "1") as sim:
        done = run_cli(*run_args(manifest, out, sim))
    assert done.returncode == 0, done.stderr
    for row in read_results(out):
        image = row["images"][0]
        assert image["mime"] == "image/jpeg" and image["path"].endswith(".jpg")
        assert (out / image["path"]).read_bytes()[:3] == b"\xff\xd8\xff"
        assert (image["width"], image["height"]) == (16, 16)


@pytest.mark.parametrize(
    "flags", [["--escape-slashes"], ["--gzip"], ["--images-per-response", "2"]]
)
def test_answer_variants(tmp_path: Path, flags: list[str]) -> None:
    manifest = catalog(4, tmp_path / "v.jsonl")
    out = tmp_path / "out"
    with simulator("--scale", SCALE, *flags) as sim:
        done = run_cli(*run_args(manifest, out, sim))
    assert done.returncode == 0, done.stderr
    rows = read_results(out)
    expected = 2 if "--images-per-response" in flags else 1
    for row in rows:
        assert len(row["images"]) == expected
        for image in row["images"]:
            data = (out / image["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == image["sha256"]


def test_validate_prints_the_plan_without_network(tmp_path: Path) -> None:
    done = run_cli("validate", "jobs/example.yaml")
    assert done.returncode == 0, done.stderr
    assert "8 job(s)" in done.stdout


def test_a_stalled_answer_is_ended_by_the_timeout(tmp_path: Path) -> None:
    manifest = catalog(2, tmp_path / "slow.jsonl")
    out = tmp_path / "out"
    with simulator("--scale", SCALE, "--latency", "30") as sim:
        done = run_cli(
            *run_args(manifest, out, sim), "--timeout", "0.5", "--max-attempts", "2", timeout=30
        )
        assert sim.stats()["requests"] == 4
    assert done.returncode == 1
    for row in read_results(out):
        assert row["status"] == "failed" and row["attempts"] == 2
        assert row["error"]["type"] == "timeout"


def test_the_key_appears_nowhere(tmp_path: Path) -> None:
    """A canary key through faults, a 401 and a refused connection: no trace of it."""
    manifest = catalog(20, tmp_path / "canary.jsonl")
    out = tmp_path / "out"
    outputs = []
    with simulator("--scale", SCALE, "--fault-mix", "0.6", "--retry-after", "0.05") as sim:
        outputs.append(run_cli(*run_args(manifest, out, sim)))
    with simulator("--scale", SCALE, "--api-key", "another") as sim:
        outputs.append(run_cli(*run_args(manifest, out, sim), "--force"))
    outputs.append(
        run_cli(
            "run",
            str(manifest),
            "--output",
            str(out),
            "--force",
            "--base-url",
            "http://127.0.0.1:9/v1",
            "--max-attempts",
            "1",
        )
    )
    for done in outputs:
        assert KEY not in done.stdout + done.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_endless_rate_limiting_gives_up_with_jobs_pending(tmp_path: Path) -> None:
    """429s use up no attempts; only --max-rate-limit-wait of continuous 429s stops the run."""
    manifest = catalog(5, tmp_path / "rl.jsonl")
    out = tmp_path / "out"
    with simulator(
        "--scale", SCALE, "--fault-rate-limit", "1", "--fault-attempts", "0", "--retry-after", "0.1"
    ) as sim:
        done = run_cli(
            *run_args(manifest, out, sim), "--max-attempts", "1", "--max-rate-limit-wait", "1.5"
        )
        stats = sim.stats()
    assert done.returncode == 1, done.stderr
    assert "rate limited continuously" in done.stderr
    rows = read_results(out)
    assert {r["status"] for r in rows} == {"pending"}  # not failed: the next run finishes them
    assert stats["by_status"] == {"429": stats["requests"]}
    assert stats["requests"] > 5  # more than --max-attempts 1 per job: 429s are not attempts


def test_a_burst_allowance_smaller_than_the_pool_costs_a_few_429s(tmp_path: Path) -> None:
    """10 per 1 s window, 16 in flight, instant answers: slow start finds the limit.

    Sending the whole pool at once would have 6 refused, refilling the freed
    slots at once 10 more; slow start (8, then 16 spread out) meets the limit
    with a few, the run pauses, learns the pace and finishes.
    """
    manifest = catalog(40, tmp_path / "burst.jsonl")
    out = tmp_path / "out"
    with simulator("--scale", SCALE, "--rpm-limit", "10", "--rate-window", "1") as sim:
        done = run_cli(*run_args(manifest, out, sim), "--concurrency", "16")
        stats = sim.stats()
    assert done.returncode == 0, done.stderr
    check_outputs(out, read_results(out))
    assert stats["by_status"]["200"] == 40
    # Slow start refuses a few of its first round (fewer if it straddles a window),
    # never a wave: the pool of 16 is not sent at once.
    assert 1 <= stats["by_status"]["429"] <= 8, stats["by_status"]
    assert "learnt from the 429s" in done.stderr
