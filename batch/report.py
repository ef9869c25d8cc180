"""What a run did, for the operator: ``DIR/summary.json`` and the lines printed at the end.

summary.json keeps the last ``KEEP_RUNS`` runs, newest last, each with start,
end, wall time, jobs by status, requests, retries by cause, 429s, bytes
written, tokens, estimated cost and exit code. It is rewritten atomically.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from batch.images import write_atomic
from batch.jobs import Status
from batch.runtypes import RunStats, StopReason
from batch.storage.base import StateStore

SUMMARY = "summary.json"
KEEP_RUNS = 50


def run_record(
    *,
    started_at: float,
    ended_at: float,
    counts: Mapping[str, int],
    stats: RunStats,
    exit_code: int,
    manifest: str,
) -> dict[str, Any]:
    """One run's entry in summary.json."""
    return {
        "manifest": manifest,
        "start": _iso(started_at),
        "end": _iso(ended_at),
        "wall_s": round(ended_at - started_at, 3),
        "jobs": {status.value: counts.get(status.value, 0) for status in Status},
        "skipped_already_done": stats.skipped,
        "requests": stats.requests,
        "retries": dict(sorted(stats.retries.items())),
        "rate_limited": stats.rate_limited,
        "images_written": stats.images_written,
        "bytes_written": stats.bytes_written,
        "tokens": dict(sorted(stats.tokens.items())),
        "estimated_cost_usd": round(stats.cost_usd, 4),
        "broken_answers_cost_usd": round(stats.broken_cost_usd, 4),
        "unpriced_images": stats.unpriced_images,
        "peak_in_flight": stats.peak_in_flight,
        "stopped": None if stats.stop is StopReason.NONE else stats.stop.value,
        "stop_message": stats.stop_message or None,
        "exit_code": exit_code,
    }


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))


def read_runs(root: Path) -> list[dict[str, Any]]:
    """The runs summary.json holds, oldest first; empty if there is none or it is unreadable."""
    try:
        document = json.loads((root / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    runs = document.get("runs") if isinstance(document, dict) else None
    return [run for run in runs if isinstance(run, dict)] if isinstance(runs, list) else []


def append_run(root: Path, record: Mapping[str, Any]) -> None:
    """Add ``record`` to summary.json (atomically); StorageError if it cannot be written."""
    runs = [*read_runs(root), dict(record)][-KEEP_RUNS:]
    text = json.dumps({"runs": runs}, indent=2, ensure_ascii=False) + "\n"
    write_atomic(root / SUMMARY, [text.encode("utf-8")])


def one_line(record: Mapping[str, Any], results_path: Path | str) -> str:
    """The summary line printed on stderr at the end of a run."""
    jobs = record["jobs"]
    total = sum(jobs.values())
    parts = ", ".join(f"{jobs[s.value]} {s.value}" for s in Status)
    retries = sum(record["retries"].values())
    cost = f"${record['estimated_cost_usd']:.2f}"
    if record["unpriced_images"]:
        cost += f" (+{record['unpriced_images']} image(s) of unknown price)"
    text = (
        f"{total} job(s): {parts}; {record['requests']} request(s) this run "
        f"({retries} retries, {record['rate_limited']} rate-limited); "
        f"{record['images_written']} image(s), {record['bytes_written'] / 1e6:.1f} MB, "
        f"~{cost}; {record['wall_s']:.1f}s; results in {results_path}"
    )
    if record["stop_message"]:
        text += f"; stopped: {record['stop_message']}"
    return text


def details(record: Mapping[str, Any]) -> list[str]:
    """A few more lines for a person at a terminal: what retried and why."""
    lines = []
    if record["retries"]:
        causes = ", ".join(f"{n} {cause}" for cause, n in record["retries"].items())
        lines.append(f"retries by cause: {causes}")
    if record.get("broken_answers_cost_usd"):
        lines.append(f"~${record['broken_answers_cost_usd']:.2f} more was most likely billed for "
                     "answers whose image came broken (retried; not in the cost above)")
    if record["skipped_already_done"]:
        lines.append(f"{record['skipped_already_done']} job(s) already done, not sent again")
    return lines


def status_lines(root: Path, store: StateStore, shown: str | None = None) -> list[str]:
    """What ``imgbatch status`` prints: counts, failures by type, the last runs.

    ``shown`` names the output when ``root`` is a local copy (an ``s3://`` output).
    """
    counts: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    attempts = 0
    tally = getattr(store.states, "tally", None)  # a million-job index counts by itself
    if tally is not None:
        found, attempts, errors = tally()
        counts.update(found)
    else:
        for state in store.states.values():
            counts[state.status.value] += 1
            attempts += state.attempts
            if state.status is Status.FAILED and state.error:
                errors[str(state.error.get("type"))] += 1
    lines = [f"{shown or root}: {len(store.states)} job(s): "
             + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
             + f"; {attempts} request(s) in all"]
    lines += [f"  failed with {kind}: {n}" for kind, n in errors.most_common()]
    starts = [r for r in store.runs if r.get("run") == "start"]
    ends = [r for r in store.runs if r.get("run") == "end"]
    if starts:
        lines.append(f"  last run started {_when(starts[-1]['t'])} (pid {starts[-1].get('pid')})")
    if ends:
        lines.append(f"  last run ended {_when(ends[-1]['t'])}: {ends[-1].get('summary', '')}")
    runs = read_runs(root)
    if runs:
        lines.append("  recent runs:")
        for run in runs[-5:]:
            jobs = run.get("jobs", {})
            lines.append(
                f"    {run.get('start')}  exit {run.get('exit_code')}  "
                f"{jobs.get('succeeded', 0)} ok / {jobs.get('failed', 0)} failed / "
                f"{jobs.get('pending', 0)} pending  {run.get('requests')} requests  "
                f"~${run.get('estimated_cost_usd', 0):.2f}  {run.get('wall_s')}s"
            )
    return lines


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
