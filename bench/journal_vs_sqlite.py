"""Design check: the append-only JSONL journal vs SQLite for the checkpoint.

The same succeeded-job record (as bench/hotpath.py writes) is made durable one
at a time, and in groups of 20 (as the engine's group commit does): the
journal through the real ``Checkpoint``, SQLite as one table keyed by job id
(WAL, ``synchronous=FULL``, one transaction per group). Then 100,000 records
are loaded back: ``Checkpoint.open`` against ``SELECT`` + ``json.loads``.

    .venv/bin/python bench/journal_vs_sqlite.py [--seconds 2] [--load 100000]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from batch.checkpoint import Checkpoint, JobState

IMAGE = {"path": "images/x.png", "sha256": "0" * 64, "bytes": 123456, "mime": "image/png",
         "width": 1024, "height": 1024, "tmp": "images/.x.tmp", "mtime_ns": 1}


def record(n: int) -> dict[str, Any]:
    return {"id": f"job-{n:07d}", "fp": "f" * 64, "status": "succeeded", "attempts": 1,
            "images": [IMAGE], "usage": {"prompt_tokens": 10, "completion_tokens": 1290},
            "latency_s": 12.345}


def journal_rate(folder: Path, seconds: float, group: int) -> float:
    store = Checkpoint.open(Path(tempfile.mkdtemp(prefix="journal-", dir=folder)))
    n, t0 = 0, time.perf_counter()
    try:
        while time.perf_counter() < t0 + seconds:
            for i in range(group):
                store.record(JobState.from_record(record(n)), durable=i == group - 1)
                n += 1
    finally:
        store.close()
    return n / (time.perf_counter() - t0)


def sqlite_db(folder: Path) -> sqlite3.Connection:
    db = sqlite3.connect(Path(tempfile.mkdtemp(prefix="sqlite-", dir=folder)) / "state.db",
                         isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, state TEXT NOT NULL)")
    return db


def sqlite_rate(folder: Path, seconds: float, group: int) -> float:
    db = sqlite_db(folder)
    n, t0 = 0, time.perf_counter()
    try:
        while time.perf_counter() < t0 + seconds:
            db.execute("BEGIN")
            for _ in range(group):
                state = JobState.from_record(record(n))  # the same object work as the journal
                db.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?)",
                           (state.id, state.to_line().decode()))
                n += 1
            db.execute("COMMIT")
    finally:
        db.close()
    return n / (time.perf_counter() - t0)


def load_times(folder: Path, count: int) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="load-", dir=folder))
    store = Checkpoint.open(root)
    db = sqlite_db(folder)
    db.execute("BEGIN")
    for n in range(count):
        state = JobState.from_record(record(n))
        store.record(state, durable=False)
        db.execute("INSERT INTO jobs VALUES (?, ?)", (state.id, state.to_line().decode()))
    db.execute("COMMIT")
    store.close()
    t0 = time.perf_counter()
    Checkpoint.open(root).close()
    journal_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    states = {row[0]: JobState.from_record(json.loads(row[1]))
              for row in db.execute("SELECT id, state FROM jobs")}
    sqlite_s = time.perf_counter() - t0
    db.close()
    assert len(states) == count
    return {"journal_open_s": journal_s, "sqlite_select_s": sqlite_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--load", type=int, default=100_000)
    parser.add_argument("--dir", type=Path, default=Path("output/bench-journal"))
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        figures = {}
        for group in (1, 20):
            figures[f"journal_durable_per_s_group{group}"] = journal_rate(folder, args.seconds,
                                                                          group)
            figures[f"sqlite_durable_per_s_group{group}"] = sqlite_rate(folder, args.seconds,
                                                                        group)
        figures |= load_times(folder, args.load)
    print(json.dumps({k: round(v, 3) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
