"""The OpenAI Batch API client against the real simulator over sockets.

One simulator process serves the module; each test sets the batch settings it
needs through ``/_openai_batch/config`` and moves the batch clock with
``/_openai_batch/advance`` (no sleeps).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batch.errors import RejectedError, RetryableError, ServerError
from batch.imageinfo import probe
from batch.jobs import Job
from batch.providers.base import ClientConfig, Secret
from batch.providers.batch_openai import OpenAIBatchClient
from batch.providers.batchapi import (
    BatchInfo,
    BatchSpec,
    BatchState,
    BatchSubmitUnknown,
    LineErrorKind,
    ResultLine,
)
from batch.retry import RetryPolicy
from tests.conftest import KEY, Simulator, simulator
from tests.test_batch_openai_wire import Stage

DEFAULTS: dict[str, Any] = {
    "delay_s": 100.0, "line_fail": 0.0, "line_fail_attempts": 1, "expire": [], "fail": [],
    "expire_keep": 0.5, "fault_upload": 0.0, "fault_poll": 0.0, "fault_download": 0.0,
    "hang_upload": 0, "hang_create": 0, "hang_download": 0, "max_requests": 0,
}


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with simulator("--scale", "0.0625", "--api-key", KEY, "--block-word", "forbidden",
                   "--seed", "7") as running:
        yield running


def control(sim: Simulator, path: str, body: Any = None) -> Any:
    url = sim.url.removesuffix("/v1") + path
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={
        "User-Agent": "imgbatch-test", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def configure(sim: Simulator, **settings: Any) -> None:
    control(sim, "/_openai_batch/config", {**DEFAULTS, **settings})


def next_ordinal(sim: Simulator) -> int:
    return int(control(sim, "/_openai_batch/stats")["calls"].get("create", 0)) + 1


def advance(sim: Simulator, seconds: float = 1000.0) -> None:
    control(sim, "/_openai_batch/advance", {"seconds": seconds})


FAST = RetryPolicy(max_attempts=3, base_s=0.01, cap_s=0.05, max_server_wait_s=0.05)


def client(sim: Simulator, **config: Any) -> OpenAIBatchClient:
    api = OpenAIBatchClient(ClientConfig(base_url=sim.url, api_key=Secret(KEY), **config))
    api.retry_policy = FAST  # the same decisions, without the waits
    return api


def jobs(prefix: str, n: int, model: str = "gpt-image-1") -> list[Job]:
    return [Job(id=f"{prefix}{i}", prompt=f"{prefix} prompt number {i}", model=model,
                aspect_ratio="1:1", image_size="1K") for i in range(n)]


async def write_file(api: OpenAIBatchClient, path: Path, batch: list[Job]) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for job in batch:
            line = api.request_line(job.id, job)
            async for chunk in line.chunks:
                digest.update(chunk)
                out.write(chunk)
    return digest.hexdigest()


async def submit(api: OpenAIBatchClient, tmp: Path, tag: str, batch: list[Job]) -> str:
    path = tmp / f"{tag}.jsonl"
    sha = await write_file(api, path, batch)
    spec = BatchSpec(tag, batch[0].model, api.route(batch[0]), len(batch), sha)
    return await api.submit(spec, path)


async def collect(api: OpenAIBatchClient, info: BatchInfo, root: Path,
                  after_first: Any = None) -> list[ResultLine]:
    lines = []
    async for line in api.results(info, Stage(root)):
        lines.append(line)
        if after_first is not None and len(lines) == 1:
            after_first()
    return lines


def check_images(root: Path, lines: list[ResultLine]) -> None:
    for line in lines:
        for image in line.images:
            data = (root / image.tmp_rel).read_bytes()
            assert probe(data).mime == "image/png"
            assert hashlib.sha256(data).hexdigest() == image.sha256
            image.file.close()


def paid(sim: Simulator) -> dict[str, int]:
    return dict(control(sim, "/_openai_batch/stats")["paid_by_key"])


def test_submit_poll_find_collect(sim: Simulator, tmp_path: Path) -> None:
    configure(sim)

    async def run() -> None:
        api = client(sim)
        try:
            batch = jobs("happy", 5)
            batch_id = await submit(api, tmp_path, "tag-happy", batch)
            info = await api.poll(batch_id)
            assert info.state is BatchState.PENDING and info.tag == "tag-happy"
            advance(sim, 20)
            assert (await api.poll(batch_id)).state is BatchState.RUNNING
            found = await api.find("tag-happy")
            assert found is not None and found.batch_id == batch_id
            assert await api.find("tag-nobody") is None
            advance(sim)
            info = await api.poll(batch_id)
            assert (info.state, info.total, info.succeeded, info.failed) == \
                (BatchState.SUCCEEDED, 5, 5, 0)
            lines = await collect(api, info, tmp_path / "out")
            assert sorted(line.key for line in lines) == [job.id for job in batch]
            assert all(line.error is None and len(line.images) == 1 for line in lines)
            assert all(line.usage and line.usage["output_tokens"] > 0 for line in lines)
            check_images(tmp_path / "out", lines)
        finally:
            await api.close()

    asyncio.run(run())
    assert {k: v for k, v in paid(sim).items() if k.startswith("happy")} == \
        {f"happy{i}": 1 for i in range(5)}


def test_failed_lines_are_resubmitted_and_paid_once(sim: Simulator, tmp_path: Path) -> None:
    configure(sim, line_fail=0.5)

    async def run() -> None:
        api = client(sim)
        try:
            batch = [*jobs("retry", 12), Job(id="bad", prompt="something forbidden",
                                              model="gpt-image-1", aspect_ratio="1:1",
                                              image_size="1K")]
            first = await submit(api, tmp_path, "tag-retry-1", batch)
            advance(sim)
            info = await api.poll(first)
            assert info.state is BatchState.SUCCEEDED and len(info.result_files) == 2
            lines = await collect(api, info, tmp_path / "out")
            assert len(lines) == 13
            by_key = {line.key: line for line in lines}
            refused = by_key["bad"].error
            assert refused is not None and refused.kind is LineErrorKind.REFUSED
            assert "safety system" in refused.message
            again = [job for job in batch if by_key[job.id].error is not None
                     and by_key[job.id].error.kind is LineErrorKind.RETRYABLE]  # type: ignore[union-attr]
            assert again, "line_fail=0.5 failed no line"
            second = await submit(api, tmp_path, "tag-retry-2", again)
            advance(sim)
            info = await api.poll(second)
            lines2 = await collect(api, info, tmp_path / "out2")
            assert all(line.error is None for line in lines2)
            check_images(tmp_path / "out", lines)
            check_images(tmp_path / "out2", lines2)
        finally:
            await api.close()

    asyncio.run(run())
    assert {k: v for k, v in paid(sim).items() if k.startswith("retry")} == \
        {f"retry{i}": 1 for i in range(12)}
    assert "bad" not in paid(sim)


def test_expired_batch_keeps_finished_lines(sim: Simulator, tmp_path: Path) -> None:
    configure(sim, expire=[next_ordinal(sim)], expire_keep=0.5)

    async def run() -> list[ResultLine]:
        api = client(sim)
        try:
            batch_id = await submit(api, tmp_path, "tag-expire", jobs("exp", 16))
            advance(sim)
            info = await api.poll(batch_id)
            assert info.state is BatchState.EXPIRED
            return await collect(api, info, tmp_path / "out")
        finally:
            await api.close()

    lines = asyncio.run(run())
    done = {line.key for line in lines if line.images}
    late = {line.key for line in lines if line.error is not None}
    assert done and late and not done & late and len(done | late) == 16
    assert all(line.error.kind is LineErrorKind.RETRYABLE  # type: ignore[union-attr]
               and "batch_expired" in line.error.message  # type: ignore[union-attr]
               for line in lines if line.error is not None)
    assert {k for k in paid(sim) if k.startswith("exp")} == done


def test_failed_and_invalid_batches(sim: Simulator, tmp_path: Path) -> None:
    configure(sim, fail=[next_ordinal(sim)])

    async def run() -> None:
        api = client(sim)
        try:
            failed = await submit(api, tmp_path, "tag-fail", jobs("fail", 2))
            advance(sim)
            info = await api.poll(failed)
            assert info.state is BatchState.FAILED and info.result_files == ()
            assert "simulated" in info.message
            # two models in one file: the API's validation fails the batch
            mixed = [*jobs("mix", 1), *jobs("mixmini", 1, model="gpt-image-1-mini")]
            invalid = await submit(api, tmp_path, "tag-mixed", mixed)
            info = await api.poll(invalid)
            assert info.state is BatchState.FAILED and "one model" in info.message
        finally:
            await api.close()

    asyncio.run(run())
    assert not [k for k in paid(sim) if k.startswith(("fail", "mix"))]


def test_cancel_keeps_what_finished(sim: Simulator, tmp_path: Path) -> None:
    configure(sim)

    async def run() -> None:
        api = client(sim)
        try:
            batch_id = await submit(api, tmp_path, "tag-cancel", jobs("cancel", 8))
            advance(sim, 20)
            await api.cancel(batch_id)
            info = await api.poll(batch_id)
            assert info.state is BatchState.CANCELLED
            await api.cancel(batch_id)  # already ended: not an error
            lines = await collect(api, info, tmp_path / "out")
            assert len(lines) == 8
            cancelled = [line for line in lines if line.error is not None]
            assert cancelled and all("batch_cancelled" in line.error.message  # type: ignore[union-attr]
                                     for line in cancelled)
            check_images(tmp_path / "out", lines)
        finally:
            await api.close()

    asyncio.run(run())


@pytest.mark.parametrize("ignore_range", [False, True])
def test_a_cut_download_resumes(sim: Simulator, tmp_path: Path, ignore_range: bool) -> None:
    """Cut half way: resumed by Range, or read again from the start without the lines
    already given, when the server ignores Range."""
    configure(sim, fault_download=1.0, ignore_range=ignore_range)
    tag = f"tag-cut-{ignore_range}"

    def calls() -> dict[str, int]:
        return dict(control(sim, "/_openai_batch/stats")["calls"])

    async def run() -> list[ResultLine]:
        api = client(sim)
        try:
            batch_id = await submit(api, tmp_path, tag, jobs(tag, 150))  # > 64 KiB
            advance(sim)
            info = await api.poll(batch_id)
            before = calls()
            lines = await collect(api, info, tmp_path / "out",
                                  after_first=lambda: configure(sim, ignore_range=ignore_range))
            after = calls()
            assert after.get("download", 0) - before.get("download", 0) == 2
            ranged = after.get("download_range", 0) - before.get("download_range", 0)
            assert ranged == (0 if ignore_range else 1)
            return lines
        finally:
            await api.close()

    lines = asyncio.run(run())
    configure(sim)
    assert sorted(line.key for line in lines) == sorted(f"{tag}{i}" for i in range(150))
    assert all(len(line.images) == 1 for line in lines)
    check_images(tmp_path / "out", lines)


def test_upload_and_poll_faults_are_retryable(sim: Simulator, tmp_path: Path) -> None:
    async def run() -> None:
        api = client(sim)
        try:
            configure(sim, fault_upload=1.0)
            creates = control(sim, "/_openai_batch/stats")["calls"].get("create", 0)
            with pytest.raises(ServerError):
                await submit(api, tmp_path, "tag-upload-fault", jobs("up", 1))
            assert control(sim, "/_openai_batch/stats")["calls"].get("create", 0) == creates
            configure(sim)
            batch_id = await submit(api, tmp_path, "tag-upload-ok", jobs("up", 1))
            configure(sim, fault_poll=1.0)
            with pytest.raises(RetryableError):
                await api.poll(batch_id)
            with pytest.raises(RetryableError):
                await api.find("tag-upload-ok")
        finally:
            configure(sim)
            await api.close()

    asyncio.run(run())


def test_a_changed_request_file_is_not_uploaded(sim: Simulator, tmp_path: Path) -> None:
    configure(sim)

    async def run() -> None:
        api = client(sim)
        try:
            path = tmp_path / "t.jsonl"
            batch = jobs("changed", 2)
            sha = await write_file(api, path, batch)
            path.write_bytes(path.read_bytes().replace(b"changed prompt", b"chanGed prompt"))
            spec = BatchSpec("tag-changed", "gpt-image-1", api.route(batch[0]), 2, sha)
            with pytest.raises(RejectedError, match="changed since"):
                await api.submit(spec, path)
        finally:
            await api.close()

    uploads = control(sim, "/_openai_batch/stats")["calls"].get("upload", 0)
    asyncio.run(run())
    # the server saw a body cut short of its Content-Length: no file was stored
    assert control(sim, "/_openai_batch/stats")["calls"].get("upload", 0) - uploads <= 1
    assert control(sim, "/_openai_batch/stats")["batches"] >= 0


def test_find_walks_the_pages(sim: Simulator, tmp_path: Path) -> None:
    configure(sim)

    async def run() -> None:
        api = client(sim)
        api.page_size = 2
        try:
            first = await submit(api, tmp_path, "tag-page-0", jobs("page0", 1))
            for n in range(1, 6):
                await submit(api, tmp_path, f"tag-page-{n}", jobs(f"page{n}", 1))
            found = await api.find("tag-page-0")
            assert found is not None and found.batch_id == first
        finally:
            await api.close()

    lists = control(sim, "/_openai_batch/stats")["calls"].get("list", 0)
    asyncio.run(run())
    assert control(sim, "/_openai_batch/stats")["calls"]["list"] - lists >= 3


@pytest.mark.parametrize("how", ["no answer", "502 after making it"])
def test_an_unanswered_create_is_found_by_its_tag(sim: Simulator, tmp_path: Path,
                                                  how: str) -> None:
    """Neither a create whose answer never came nor one answered 5xx is retried: the
    batch may exist, and is found by its tag."""
    if how == "no answer":
        configure(sim, hang_create=next_ordinal(sim))
    else:
        configure(sim, create_status=502)
    tag = f"tag-hang-{how}"

    async def run() -> None:
        api = client(sim, timeout_s=2.0)
        try:
            creates = control(sim, "/_openai_batch/stats")["calls"].get("create", 0)
            with pytest.raises(BatchSubmitUnknown):
                await submit(api, tmp_path, tag, jobs("hang", 1))
            assert control(sim, "/_openai_batch/stats")["calls"]["create"] == creates + 1
            found = await api.find(tag)
            assert found is not None and found.tag == tag
        finally:
            await api.close()

    asyncio.run(run())
    configure(sim)


def test_a_full_page_is_read_whole(sim: Simulator, tmp_path: Path) -> None:
    """100 batch objects (tens of KB) arrive in several reads; the page is parsed whole."""
    configure(sim)

    async def run() -> None:
        api = client(sim)
        try:
            first = await submit(api, tmp_path, "tag-full-0", jobs("full0", 1))
            for n in range(1, 101):
                await submit(api, tmp_path, f"tag-full-{n}", jobs(f"full{n}", 1))
            found = await api.find("tag-full-0")  # on the second page of 100
            assert found is not None and found.batch_id == first
        finally:
            await api.close()

    asyncio.run(run())
