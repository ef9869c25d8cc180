"""Batch mode's pure parts as tables: splitting, outcomes, prices, Gemini's states and
codes, and the result-line decoder fed hostile chunkings (Hypothesis)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
import json
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batch.cost import PriceTable
from batch.images import ImageWriter, StagedImage, discard
from batch.jobs import Job
from batch.providers import batch_gemini as gem
from batch.providers.batchapi import (
    BatchLimits,
    BatchState,
    LineError,
    LineErrorKind,
    ResultLine,
)
from batch.providers.batchlines import decode_lines
from batch.runners import batchplan as plan
from batch.runners.batchledger import BatchRecord, Ledger
from batch.runners.batchplan import BatchStats, JobFate, Line


def lines(*spec: tuple[str, int]) -> list[Line]:
    return [Line(f"k{n}", (model, ""), size) for n, (model, size) in enumerate(spec)]


@pytest.mark.parametrize(("spec", "limits", "cuts"), [
    ([], BatchLimits(10, 100), []),
    ([("m", 10)] * 3, BatchLimits(10, 100), [(0, 3)]),
    ([("m", 10)] * 5, BatchLimits(2, 100), [(0, 2), (2, 4), (4, 5)]),
    ([("m", 40)] * 3, BatchLimits(10, 100), [(0, 2), (2, 3)]),  # bytes: 80 fits, 120 not
    ([("m", 50), ("m", 50), ("m", 1)], BatchLimits(10, 100), [(0, 2), (2, 3)]),  # exactly full
    ([("a", 1), ("a", 1), ("b", 1), ("a", 1)], BatchLimits(10, 100), [(0, 2), (2, 3), (3, 4)]),
    ([("m", 100)], BatchLimits(1, 100), [(0, 1)]),
])
def test_split(spec: list[tuple[str, int]], limits: BatchLimits,
               cuts: list[tuple[int, int]]) -> None:
    got = plan.split(lines(*spec), limits)
    assert [(c.start, c.stop) for c in got] == cuts
    for cut in got:
        assert {line.group for line in lines(*spec)[cut.start:cut.stop]} == {cut.group}


def test_split_refuses_a_line_over_the_file_limit() -> None:
    with pytest.raises(plan.LineTooBig, match="job k1"):
        plan.split(lines(("m", 1), ("m", 101)), BatchLimits(10, 100))


@given(st.lists(st.tuples(st.sampled_from("ab"), st.integers(1, 50)), max_size=60),
       st.integers(1, 7), st.integers(50, 200))
def test_split_covers_every_line_once_within_limits(
        spec: list[tuple[str, int]], most: int, size: int) -> None:
    ordered = sorted(spec, key=lambda item: item[0])  # grouped, as the runner orders them
    items = lines(*ordered)
    cuts = plan.split(items, BatchLimits(most, size))
    assert [i for c in cuts for i in range(c.start, c.stop)] == list(range(len(items)))
    for cut in cuts:
        part = items[cut.start:cut.stop]
        assert len(part) <= most and sum(line.size_bytes for line in part) <= size


def job(model: str = "gemini-3-pro-image-preview", size: str = "1K", **kw: Any) -> Job:
    return Job(id=kw.pop("id", "j"), prompt="p", model=model, aspect_ratio="1:1",
               image_size=size, **kw)


def test_grouped_keeps_manifest_order_inside_groups() -> None:
    a, b, c = job("m1", id="a"), job("m2", id="b"), job("m1", id="c")
    assert [j.id for j, _ in plan.grouped([(a, ""), (b, ""), (c, "")])] == ["a", "c", "b"]


ERR_R = LineError(LineErrorKind.RETRYABLE, "13", "internal")
ERR_X = LineError(LineErrorKind.REFUSED, "3", "invalid")


@pytest.mark.parametrize(("images", "error", "fate"), [
    (True, None, JobFate.SUCCEEDED),
    (False, None, JobFate.PENDING),  # neither image nor error: try again
    (False, ERR_R, JobFate.PENDING),
    (False, ERR_X, JobFate.FAILED),
    (True, ERR_X, JobFate.FAILED),
])
def test_line_outcome(images: bool, error: LineError | None, fate: JobFate) -> None:
    assert plan.line_outcome(images, error) is fate


@pytest.mark.parametrize(("state", "fate"), [
    (BatchState.PENDING, None), (BatchState.RUNNING, None),
    (BatchState.SUCCEEDED, JobFate.PENDING), (BatchState.FAILED, JobFate.PENDING),
    (BatchState.CANCELLED, JobFate.PENDING), (BatchState.EXPIRED, JobFate.PENDING),
])
def test_batch_end(state: BatchState, fate: JobFate | None) -> None:
    assert plan.batch_end(state) is fate


@pytest.mark.parametrize(("overrides", "the_job", "micros"), [
    ({}, job(), 67_000),  # half of $0.134
    ({}, job(size="4K"), 120_000),
    ({"gemini-3-pro-image-preview@batch": {"1K": 0.05}}, job(), 50_000),
    ({}, job("unknown-model"), None),
    ({"unknown-model": {"1K": 0.1}}, job("unknown-model"), 50_000),
])
def test_batch_price(overrides: dict[str, dict[str, float]], the_job: Job,
                     micros: int | None) -> None:
    assert plan.batch_micros(PriceTable.with_overrides(overrides), the_job) == micros


def test_estimate_batch_counts_unknown() -> None:
    total, unknown = plan.estimate_batch([job(), job("x")], PriceTable.with_overrides({}))
    assert (round(total, 3), unknown) == (0.067, 1)


@pytest.mark.parametrize(("age", "text"), [
    (5, "5s"), (125, "2m"), (3 * 3600 + 300, "3h05m"), (2 * 86400 + 4 * 3600, "2d04h")])
def test_describe_age(age: float, text: str) -> None:
    assert plan.describe_age(age) == text


@pytest.mark.parametrize(("name", "state"), [
    ("BATCH_STATE_PENDING", BatchState.PENDING), ("BATCH_STATE_RUNNING", BatchState.RUNNING),
    ("BATCH_STATE_SUCCEEDED", BatchState.SUCCEEDED), ("BATCH_STATE_FAILED", BatchState.FAILED),
    ("BATCH_STATE_CANCELLED", BatchState.CANCELLED), ("BATCH_STATE_EXPIRED", BatchState.EXPIRED),
    ("JOB_STATE_SUCCEEDED", BatchState.SUCCEEDED), ("SOMETHING_NEW", BatchState.RUNNING),
    (None, BatchState.RUNNING),
])
def test_gemini_states(name: Any, state: BatchState) -> None:
    assert gem.state_of(name) is state


@pytest.mark.parametrize(("code", "kind"), [
    (13, LineErrorKind.RETRYABLE), (14, LineErrorKind.RETRYABLE), (8, LineErrorKind.RETRYABLE),
    (4, LineErrorKind.RETRYABLE), (3, LineErrorKind.REFUSED), (7, LineErrorKind.REFUSED),
    (9, LineErrorKind.REFUSED), (429, LineErrorKind.RETRYABLE), (503, LineErrorKind.RETRYABLE),
    (400, LineErrorKind.REFUSED), ("13", LineErrorKind.RETRYABLE), (None, LineErrorKind.RETRYABLE),
])
def test_gemini_line_codes(code: Any, kind: LineErrorKind) -> None:
    assert gem.classify_code(code) is kind


def test_gemini_operation() -> None:
    info = gem.info_of({"name": "batches/x", "done": True, "metadata": {
        "displayName": "imgbatch-t-0001", "state": "BATCH_STATE_SUCCEEDED",
        "createTime": "2026-12-01T10:00:00.123Z", "output": {"responsesFile": "files/r"},
        "batchStats": {"requestCount": "5", "successfulRequestCount": "4",
                       "failedRequestCount": "1"}}})
    assert (info.batch_id, info.tag, info.state, info.result_files) == (
        "batches/x", "imgbatch-t-0001", BatchState.SUCCEEDED, ("files/r",))
    assert (info.total, info.succeeded, info.failed) == (5, 4, 1)
    assert info.created_s == pytest.approx(1796119200.123)
    assert gem.info_of({"name": "batches/y", "response": {"responsesFile": "files/z"}}
                       ).result_files == ("files/z",)


# -- the result-line decoder ------------------------------------------------------------



def png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")
    header = chunk(b"IHDR", (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + b"\x08\x02\0\0\0")
    pixels = zlib.compress(b"".join(b"\0" + b"\x10\x20\x30" * 2 for _ in range(3)))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


class Stage:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "images").mkdir(exist_ok=True)
        self.discarded = 0

    def open(self, n: int) -> ImageWriter:
        return ImageWriter(self.root, "t", n, max_pixels=10**8)

    def discard(self, image: StagedImage) -> None:
        self.discarded += 1
        discard(self.root, image)


def response_line(key: str, image: bytes | None, *, error: dict[str, Any] | None = None) -> bytes:
    if error is not None:
        return json.dumps({"key": key, "error": error}).encode()
    parts: list[dict[str, Any]] = [{"text": "ok"}]
    if image is not None:
        parts.append({"inlineData": {"mimeType": "image/png",
                                     "data": base64.b64encode(image).decode()}})
    return json.dumps({"response": {"candidates": [{"content": {"parts": parts},
                                                    "finishReason": "STOP"}]},
                       "key": key}).encode()  # the key after the image: order is free


def decode(root: Path, data: bytes, cuts: list[int]) -> tuple[list[ResultLine], Stage]:
    stage = Stage(root)
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})

    async def chunks() -> Any:
        for start, stop in itertools.pairwise(bounds):
            yield data[start:stop]

    async def collect() -> list[ResultLine]:
        return [line async for line in decode_lines(chunks(), raw_keys=gem.wire.RAW_KEYS,
                                                    stage=stage, read=gem.read_line)]
    return asyncio.run(collect()), stage


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(0, 10**6), max_size=30))
def test_decoder_any_chunking(tmp_path: Path, cuts: list[int]) -> None:
    image = png()
    data = b"\n".join([
        response_line("a", image),
        b"",
        response_line("b", None, error={"code": 13, "message": "internal"}),
        b"this is not json",
        response_line("c", image[:40]),  # an image cut short: verification refuses it
        response_line("d", None, error={"code": 3, "message": "bad request"}),
        response_line("e", None),  # no image, no error
        response_line("f", image),
    ]) + b"\n"
    got, _stage = decode(tmp_path, data, cuts)
    by_key = {line.key: line for line in got}
    assert sorted(by_key) == ["a", "b", "c", "d", "e", "f"]
    for key in "af":
        (staged,) = by_key[key].images
        assert (tmp_path / staged.tmp_rel).read_bytes() == image
        staged.file.close()
        discard(tmp_path, staged)
    assert by_key["b"].error == LineError(LineErrorKind.RETRYABLE, "13", "internal")
    assert by_key["c"].error is not None and by_key["c"].error.kind is LineErrorKind.RETRYABLE
    assert by_key["d"].error is not None and by_key["d"].error.kind is LineErrorKind.REFUSED
    assert by_key["e"].error is not None and by_key["e"].error.kind is LineErrorKind.RETRYABLE
    assert not list((tmp_path / "images").iterdir())  # nothing left behind


def record(tag: str, **changes: Any) -> BatchRecord:
    base = BatchRecord(tag=tag, endpoint="e", provider="gemini", base_url="http://x/v1beta",
                       api_key_env="K", model="m", route="", keys=("a", "b"),
                       fingerprints=("fa", "fb"), file_sha256="0" * 64,
                       request_file=f".imgbatch/batches/{tag}.jsonl", created_s=1.0,
                       price_micros=10)
    return dataclasses.replace(base, **changes)


def test_ledger_steps_and_a_torn_tail(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path)
    ledger.intend(record("t1"))
    ledger.intend(record("t2"))
    ledger.submitted("t1", "batches/1")
    ledger.close_batch("t2", "succeeded")
    ledger.close()
    with (tmp_path / ".imgbatch" / "batches.jsonl").open("ab") as handle:
        handle.write(record("t3").to_line()[:40])  # a crash in the middle of an intent
    again = Ledger.open(tmp_path)
    assert [r.tag for r in again.open_batches()] == ["t1"]
    assert again.records["t1"].batch_id == "batches/1" and "t3" not in again.records
    assert again.live_keys() == {"a", "b"}
    again.intend(record("t4"))  # appends start on a line of their own
    again.close()
    assert sorted(Ledger.open(tmp_path, writable=False).records) == ["t1", "t2", "t4"]


@pytest.mark.parametrize(("stats", "shown", "hidden"), [
    (BatchStats(), "batch: no batch open", "submitted"),
    (BatchStats(open_batches=3, open_jobs=40, submitted_jobs=40, open_micros=2_680_000),
     "batch: 40 jobs in 3 batches submitted (40 this run, ~$2.68 at the batch rate)",
     "collected"),
    (BatchStats(collected_batches=2, succeeded=4, cost_micros=154_500, sync_micros=309_000),
     "2 batch(es) collected: 4 succeeded, 0 failed, 0 back to pending, ~$0.15 at the batch "
     "price (sync ~$0.31)", "submitted"),
])
def test_the_batch_line_says_what_is_open_and_what_was_collected(
    stats: BatchStats, shown: str, hidden: str
) -> None:
    assert shown in stats.line() and hidden not in stats.line()
