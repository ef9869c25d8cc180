"""The million-job state: line memo, checkpoint index, and the plan joined by digest.

The plan a resumed catalog gets from the fast path (memo hits, index join)
must be exactly the plan asked job by job; Hypothesis draws catalogs,
journals, edits, changed settings and torn memos to look for a difference.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import batch
from batch.checkpoint import STATE_DIR, Checkpoint, FileMeta, JobState, fingerprint
from batch.errors import ManifestError
from batch.jobs import ImageRecord, Status
from batch.linememo import (
    CODE_FILES,
    MEMO,
    RECORD,
    LineMemo,
    build,
    context_digest,
    digest64,
    fp_digest,
)
from batch.manifest import load_manifest
from batch.results import row, rows
from batch.statetable import Scan, StateTable


@pytest.mark.parametrize(("data", "blake2b_8"), [
    (b"", "e4a6a0577479b2b4"), (b"sku-0000001", "243b0f60fb983eb6"),
])
def test_digest64_is_blake2b_of_8_bytes_little_endian(data: bytes, blake2b_8: str) -> None:
    assert digest64(data) == int.from_bytes(bytes.fromhex(blake2b_8), "little")


@pytest.mark.parametrize(("fp", "expected"), [
    ("00" * 32, 0), ("ff" * 8 + "00" * 24, 2**64 - 1), ("0123456789abcdef" + "0" * 48,
                                                        0x0123456789ABCDEF),
])
def test_fp_digest_is_the_first_8_bytes(fp: str, expected: int) -> None:
    assert fp_digest(fp) == expected


def test_the_memo_round_trips_and_refuses_a_torn_or_foreign_copy() -> None:
    context = context_digest(None, "chat", None)
    records = np.zeros(3, RECORD)
    records["line"] = [30, 10, 20]
    records["id"] = [1, 2, 3]
    shape = ("", "m", "1K", "1:1", (), (0, 0, 0), 0)
    memo = build(context, [shape], [records])
    data = memo.encode()
    back = LineMemo.decode(data, context)
    assert back is not None and back.shapes == [shape]
    assert back.records["line"].tolist() == [10, 20, 30]
    assert back.find(np.array([20, 25], np.uint64)).tolist() == [1, -1]
    assert LineMemo.decode(data[:-1], context) is None
    assert LineMemo.decode(data, context_digest("other-model", "chat", None)) is None
    flipped = bytearray(data)
    flipped[60] ^= 1
    assert LineMemo.decode(bytes(flipped), context) is None


def _record(job_id: str, status: str, attempts: int, fp: str = "ab" * 32) -> dict[str, object]:
    return {"id": job_id, "fp": fp, "status": status, "attempts": attempts, "images": []}


def test_the_index_keeps_the_last_record_of_each_id(tmp_path: Path) -> None:
    scan = Scan()
    for n, (job_id, status, attempts) in enumerate([("a", "pending", 1), ("b", "failed", 1),
                                                    ("a", "succeeded", 2)]):
        scan.add(_record(job_id, status, attempts), n * 10, 10, f"{tmp_path}/")
    table = StateTable(scan, lambda offset, length: b"", lambda data: None)
    assert len(table) == 2
    assert table.where("a") == (20, 10) and table.where("b") == (10, 10)
    ids = np.array([digest64(b"a"), digest64(b"b"), digest64(b"c")], np.uint64)
    fps = np.full(3, fp_digest("ab" * 32), np.uint64)
    # "a" succeeded with no images to check: surely done; "b" failed; "c" unknown.
    assert table.done_mask(ids, fps).tolist() == [True, False, False]
    assert table.done_mask(ids, np.zeros(3, np.uint64)).tolist() == [False, False, False]
    table.put("a", 99, 5)
    assert table.where("a") == (99, 5) and table.done_mask(ids, fps).tolist() == [False] * 3


# -- the plan: fast path against the slow one -----------------------------------------

LINE = st.fixed_dictionaries(
    {"prompt": st.sampled_from(["a cat", "a cat", "a dog", "a fox in snow"])},
    optional={"id": st.sampled_from(["j1", "j2", "j3", "J3", "j4", "j5", "j6"]),
              "aspect_ratio": st.sampled_from(["1:1", "16:9"]),
              "images": st.just(["https://example.com/x.png"]),
              "count": st.just(2)})


def _write(path: Path, lines: list[dict[str, object]]) -> None:
    # Every other line spaced differently: the same job from other bytes.
    path.write_text("".join(json.dumps(line, separators=(",", ":") if n % 2 else None) + "\n"
                            for n, line in enumerate(lines)))


def _plan(catalog: Path, out: Path, model: str | None, fast: bool,
          memo: bool = True) -> list[tuple[str, str]] | str:
    """The plan: ``fast`` the catalog's (by digest: with the memo's fingerprints, or with
    none and fingerprinted at the plan), else asked job by job."""
    try:
        manifest = load_manifest(catalog, default_model=model,
                                 memo=out / STATE_DIR / MEMO if fast and memo else None)
    except ManifestError as exc:
        return f"invalid: {sorted(str(p) for p in exc.problems)}"
    store = Checkpoint.open(out)
    try:
        if fast:
            todo = manifest.jobs.todo(store)
            assert todo is not None
            # results.jsonl's rows, read from the records by offset, as JobStates would say.
            assert list(rows(manifest.jobs, store)) == [
                row(job, store.states.get(job.id), fingerprint(job), store)
                for job in manifest.jobs]
        else:
            todo = [(job, fp) for job in manifest.jobs
                    if not store.is_done(job, fp := fingerprint(job))]
        return [(job.id, fp) for job, fp in todo]
    finally:
        store.close()


def _record_some(catalog: Path, out: Path, model: str | None, picks: list[int]) -> None:
    """Record states for some jobs: done (image on disk), done with the image gone, failed."""
    jobs = list(load_manifest(catalog, default_model=model).jobs)
    store = Checkpoint.open(out)
    try:
        for n, pick in zip(range(len(jobs)), picks, strict=False):
            job = jobs[n]
            if pick == 0:
                continue
            status = Status.FAILED if pick == 3 else Status.SUCCEEDED
            rel = f"images/{job.id}.png"
            images: tuple[ImageRecord, ...] = ()
            metas: tuple[FileMeta, ...] = ()
            if status is Status.SUCCEEDED:
                path = out / rel
                path.write_bytes(b"png" + job.id.encode())
                images = (ImageRecord(rel, "0" * 64, path.stat().st_size, "image/png", 1, 1),)
                metas = (FileMeta(None, path.stat().st_mtime_ns),)
            store.record(JobState(job.id, fingerprint(job), status, 1, None, images, metas),
                         durable=False)
            if pick == 2 and status is Status.SUCCEEDED:
                os.unlink(out / rel)
    finally:
        store.close()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(LINE, min_size=1, max_size=8),
       picks=st.lists(st.integers(0, 3), min_size=8, max_size=8),
       edits=st.lists(st.tuples(st.integers(0, 7), st.sampled_from(["a cat", "an owl"])),
                      max_size=3),
       model=st.sampled_from([None, "m2"]), tear=st.booleans())
def test_the_fast_plan_is_the_plan_asked_job_by_job(
    tmp_path_factory: pytest.TempPathFactory, lines: list[dict[str, object]], picks: list[int],
    edits: list[tuple[int, str]], model: str | None, tear: bool,
) -> None:
    tmp = tmp_path_factory.mktemp("plan")
    catalog, out = tmp / "c.jsonl", tmp / "out"
    (out / "images").mkdir(parents=True)
    _write(catalog, lines)
    with contextlib.suppress(ManifestError):  # duplicate ids: nothing to record
        _record_some(catalog, out, None, picks)
    # Validated without fingerprints (no memo: an s3:// or cluster run's manifest).
    assert _plan(catalog, out, None, True, memo=False) == _plan(catalog, out, None, False)
    # First resume: no memo yet; it writes one.
    assert _plan(catalog, out, None, True) == _plan(catalog, out, None, False)
    # Lines edited, another --model, a torn memo: the memo must not lie.
    for at, prompt in edits:
        if at < len(lines):
            lines[at] = {**lines[at], "prompt": prompt}
    _write(catalog, lines)
    if tear and (out / STATE_DIR / MEMO).exists():
        memo = out / STATE_DIR / MEMO
        memo.write_bytes(memo.read_bytes()[:-3])
    assert _plan(catalog, out, model, True) == _plan(catalog, out, model, False)
    assert _plan(catalog, out, model, True) == _plan(catalog, out, model, False)
    assert _plan(catalog, out, model, True, memo=False) == _plan(catalog, out, model, False)


def test_states_read_back_by_offset_survive_compaction_and_a_torn_tail(tmp_path: Path) -> None:
    store = Checkpoint.open(tmp_path)
    try:
        for attempt in range(1, 4):  # 3 records per job: the open after compacts
            for n in range(400):
                store.record(JobState(f"j{n}", "ab" * 32, Status.PENDING, attempt),
                             durable=False)
        store.record(JobState("j7", "cd" * 32, Status.FAILED, 9, {"type": "x"}), durable=True)
        assert store.states["j7"].attempts == 9 and store.attempts("j3") == 3
    finally:
        store.close()
    journal = tmp_path / STATE_DIR / "journal.jsonl"
    with journal.open("ab") as handle:
        handle.write(b'{"id":"j1","fp":"')  # a torn last record
    store = Checkpoint.open(tmp_path)
    try:
        assert len(journal.read_bytes().splitlines()) <= 402  # compacted: one line a job
        assert len(store.states) == 400
        assert store.states["j7"] == JobState("j7", "cd" * 32, Status.FAILED, 9, {"type": "x"})
        assert store.states["j1"].attempts == 3 and "j400" not in store.states
        store.record(JobState("j1", "ab" * 32, Status.PENDING, 4), durable=True)
        store.record(JobState("j500", "ab" * 32, Status.FAILED, 1, {"type": "y"}), durable=True)
        assert store.attempts("j1") == 4
        # status's tally from the arrays says what the states read back say.
        counts, attempts, errors = store.states.tally()
        states = list(store.states.values())
        assert counts == {"pending": 399, "failed": 2} and errors == {"x": 1, "y": 1}
        assert attempts == sum(state.attempts for state in states) == 399 * 3 + 1 + 9 + 1
        assert sorted(state.id for state in states) == sorted(
            [*(f"j{n}" for n in range(400)), "j500"])
        assert len(store.states) == 401
    finally:
        store.close()


def test_states_written_this_session_read_back_as_the_journal_says(tmp_path: Path) -> None:
    """The table keeps the last states appended (a job in flight reads its own back): with
    more jobs than it keeps, each read must still be the job's last record, as a new
    reader of the journal sees it."""
    rng = random.Random(7)
    last: dict[str, JobState] = {}
    store = Checkpoint.open(tmp_path)
    try:
        store.record(JobState("seed", "ab" * 32, Status.PENDING, 1), durable=True)
    finally:
        store.close()
    store = Checkpoint.open(tmp_path)  # the index now has arrays, and states come after
    try:
        for n in range(6000):
            job = f"j{rng.randrange(3000)}"
            state = JobState(job, "ab" * 32, Status.PENDING, n + 1)
            store.record(state, durable=False)
            last[job] = state
            probe = rng.choice(list(last))
            assert store.states[probe] == last[probe]
        assert all(store.states[job] == state for job, state in last.items())
    finally:
        store.close()
    store = Checkpoint.open(tmp_path)
    try:
        assert all(store.states[job] == state for job, state in last.items())
    finally:
        store.close()


def test_results_rows_of_states_written_this_session_match_a_later_readers(
    tmp_path: Path,
) -> None:
    """results.jsonl at the end of a run takes the states it just wrote from memory; a
    later reader (``imgbatch report``, the next run) builds the rows from the journal:
    the same lines, whatever the status, error, usage or fingerprint said."""
    catalog, out = tmp_path / "c.jsonl", tmp_path / "out"
    catalog.write_text("".join(json.dumps({"id": f"j{n}", "prompt": f"p {n}"}) + "\n"
                               for n in range(8)))
    (out / "images").mkdir(parents=True)
    jobs = list(load_manifest(catalog).jobs)
    store = Checkpoint.open(out)
    try:
        for n, job in enumerate(jobs[:7]):
            fp = fingerprint(job) if n != 5 else "ef" * 32  # j5: of another fingerprint
            images: tuple[ImageRecord, ...] = ()
            metas: tuple[FileMeta, ...] = ()
            status = [Status.SUCCEEDED, Status.FAILED, Status.PENDING][n % 3]
            if status is Status.SUCCEEDED:
                path = out / f"images/{job.id}.png"
                path.write_bytes(b"png" + job.id.encode())
                images = (ImageRecord(f"images/{job.id}.png", "0" * 64, path.stat().st_size,
                                      "image/png", 1, 1),)
                metas = (FileMeta(None, path.stat().st_mtime_ns),)
            error = {"type": "http", "status": 500, "message": "boom"} if n % 3 else None
            usage = [None, "{}", '{"prompt_tokens":3}'][n % 3]
            store.record(JobState(job.id, fp, status, n + 1, error, images, metas,
                                  usage_json=usage, latency_s=0.5 * n), durable=n == 6)
        os.unlink(out / "images/j3.png")  # gone since: pending on both paths
        assert isinstance(store.states, StateTable)
        assert all(store.states.recent(job.id) is not None for job in jobs[:7])
        # As built, and streamed from the catalog with the digests its memo gives.
        streamed = load_manifest(catalog, memo=out / STATE_DIR / MEMO).jobs
        now, now_streamed = list(rows(jobs, store)), list(rows(streamed, store))
    finally:
        store.close()
    store = Checkpoint.open(out)
    try:
        assert isinstance(store.states, StateTable) and store.states.recent("j0") is None
        later = list(rows(jobs, store))
    finally:
        store.close()
    assert now == later and now_streamed == later
    assert [r["status"] for r in now] == ["succeeded", "failed", "pending", "pending",
                                          "failed", "pending", "succeeded", "pending"]


@pytest.mark.parametrize("damage", [
    lambda line: line[:-5] + b"XXXXX",  # the end of the record replaced
    lambda line: line.replace(b'"usage":', b'"usage":{{', 1),  # broken just past the regex
    lambda line: line.replace(b'"error":null', b'"error":nul!', 1),  # ... and before it
])
def test_a_record_damaged_past_what_the_fast_read_checks_counts_for_neither_path(
    tmp_path: Path, damage: Callable[[bytes], bytes],
) -> None:
    """A hand edit or bit rot inside a line: the index must not call the job done when the
    full parse that reads its state back refuses the record (results.jsonl says pending)."""
    catalog, out = tmp_path / "c.jsonl", tmp_path / "out"
    (out / "images").mkdir(parents=True)
    _write(catalog, [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}])
    _record_some(catalog, out, None, [1, 1])
    journal = out / STATE_DIR / "journal.jsonl"
    lines = journal.read_bytes().split(b"\n")
    lines = [damage(line) if line.startswith(b'{"id":"a"') else line for line in lines]
    journal.write_bytes(b"\n".join(lines))
    fast, slow = _plan(catalog, out, None, True), _plan(catalog, out, None, False)
    assert fast == slow and [job for job, _ in fast] == ["a"]


def test_the_memo_goes_stale_when_the_code_that_reads_a_line_changes() -> None:
    """A new default model, id rule or fingerprint in an upgrade: the memo of the old code
    must not be trusted, whether or not anyone bumped SCHEMA."""
    sources: dict[str, bytes] = {}

    def read(name: str) -> bytes:
        return sources.get(name, b"the code as shipped: " + name.encode())

    before = context_digest(None, "chat", None, read)
    assert context_digest(None, "chat", None, read) == before
    for name in CODE_FILES:
        sources[name] = b"changed"
        assert context_digest(None, "chat", None, read) != before, name
        del sources[name]
    # The real files are found: a missing one would make the code part of the digest blind.
    for name in CODE_FILES:
        assert (Path(batch.__file__).parent / name).is_file(), name
