"""The Prometheus textfile: checked with the official prometheus_client parser."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from batch.metrics import EndpointCounts, Snapshot, render
from tests.conftest import run_args, run_cli, simulator

NAME = re.compile(r"imgbatch_[a-z_]+")


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        assert NAME.fullmatch(family.name), family.name
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples)
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    matches = [v for (n, ls), v in found.items() if n == name and set(labels.items()) <= ls]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0]


def test_a_snapshot_renders_to_text_prometheus_parses_with_escaped_labels() -> None:
    counts = EndpointCounts(requests=12, retries=Counter({"rate_limited": 3, "timeout": 1}),
                            rate_limited=3, succeeded=9, failed=1, images=9, bytes=123_456,
                            cost_usd=1.206)
    snap = Snapshot(output='night"ly\\\n', started_s=1_700_000_000.5,
                    jobs={"succeeded": 20, "failed": 1, "pending": 2}, planned=12,
                    endpoints={"api.qnaigc.com": counts}, last_success_s=1_700_000_100.0,
                    ended_s=1_700_000_200.0, exit_code=1)
    found = samples(render(snap))
    assert value(found, "imgbatch_run_in_progress") == 0
    assert value(found, "imgbatch_run_exit_code") == 1
    assert value(found, "imgbatch_run_end_timestamp_seconds") == 1_700_000_200.0
    assert value(found, "imgbatch_jobs", status="pending") == 2
    assert value(found, "imgbatch_retries_total", cause="timeout") == 1
    assert value(found, "imgbatch_written_bytes_total", endpoint="api.qnaigc.com") == 123_456
    assert value(found, "imgbatch_estimated_cost_usd_total") == pytest.approx(1.206)
    assert value(found, "imgbatch_requests_total", output='night"ly\\\n') == 12


def test_a_running_snapshot_has_no_end_and_says_so() -> None:
    snap = Snapshot("out", 1.0, {}, 0, {})
    found = samples(render(snap))
    assert value(found, "imgbatch_run_in_progress") == 1
    assert not any(n == "imgbatch_run_end_timestamp_seconds" for n, _ in found)
    assert not any(n == "imgbatch_run_exit_code" for n, _ in found)


def test_a_run_leaves_a_metrics_file_that_shows_it(tmp_path: Path) -> None:
    manifest = tmp_path / "nightly.yaml"
    manifest.write_text("jobs:\n" + "".join(
        f"  - {{id: j{i}, prompt: picture {i}}}\n" for i in range(6)
    ) + "  - {id: bad, prompt: a forbidden picture}\n")
    prom = tmp_path / "imgbatch.prom"
    out = tmp_path / "out"
    with simulator("--scale", "0.05", "--fault-rate-limit", "0.3", "--retry-after", "0.05",
                   "--seed", "5", "--refuse-prompt", "forbidden") as sim:
        done = run_cli(*run_args(manifest, out, sim, "--metrics-file", str(prom),
                                 "--no-gallery"))
        seen = sim.stats()
    assert done.returncode == 1, done.stderr
    found = samples(prom.read_text())
    endpoint = "127.0.0.1"
    assert value(found, "imgbatch_requests_total", endpoint=endpoint) == seen["requests"]
    assert value(found, "imgbatch_rate_limited_total") == seen["by_status"].get("429", 0) > 0
    assert value(found, "imgbatch_retries_total", cause="rate_limited") > 0
    assert value(found, "imgbatch_images_written_total", output="out") == 6
    assert value(found, "imgbatch_written_bytes_total") == sum(
        p.stat().st_size for p in (out / "images").iterdir())
    assert value(found, "imgbatch_jobs", status="succeeded") == 6
    assert value(found, "imgbatch_jobs", status="failed") == 1
    assert value(found, "imgbatch_run_exit_code") == 1
    assert value(found, "imgbatch_estimated_cost_usd_total") == pytest.approx(6 * 0.134)
    start = value(found, "imgbatch_run_start_timestamp_seconds")
    assert start <= value(found, "imgbatch_last_success_timestamp_seconds") <= value(
        found, "imgbatch_run_end_timestamp_seconds")
    assert not list(tmp_path.glob(".*.tmp"))  # replaced atomically, nothing left behind


@pytest.mark.parametrize(("name", "message"), [
    ("metrics.txt", "only files ending in .prom"),
    ("missing/metrics.prom", "does not exist"),
])
def test_a_bad_metrics_path_is_a_usage_error_before_anything_is_sent(
    tmp_path: Path, name: str, message: str
) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text("- {prompt: x}\n")
    with simulator("--scale", "0.05") as sim:
        done = run_cli(*run_args(manifest, tmp_path / "out", sim, "--metrics-file",
                                 str(tmp_path / name)))
        assert sim.stats()["requests"] == 0
    assert done.returncode == 2 and message in done.stderr


def test_every_429_is_counted_also_the_last_one_before_a_stop(tmp_path: Path) -> None:
    """A run that ends on endless 429s never retries the last ones; they still count."""
    manifest = tmp_path / "nightly.yaml"
    manifest.write_text("jobs:\n" + "".join(
        f"  - {{id: j{i}, prompt: picture {i}}}\n" for i in range(4)))
    prom = tmp_path / "imgbatch.prom"
    with simulator("--scale", "0.05", "--fault-rate-limit", "1.0", "--fault-attempts", "1000",
                   "--retry-after", "0.05", "--seed", "2") as sim:
        done = run_cli(*run_args(manifest, tmp_path / "out", sim, "--metrics-file", str(prom),
                                 "--max-rate-limit-wait", "0.3", "--no-gallery"))
        seen = sim.stats()
    assert done.returncode == 1, done.stderr
    found = samples(prom.read_text())
    refused = seen["by_status"].get("429", 0)
    assert refused > 0 and value(found, "imgbatch_requests_total") == seen["requests"]
    assert value(found, "imgbatch_rate_limited_total") == refused
