"""The cluster runner's pure parts, without Ray: sharding, shared limits, shared budget, segments.

Also: a single-machine run never imports Ray (a fake ``ray`` package that
raises on import sits first on the path of the real CLI).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import math
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from batch.checkpoint import Checkpoint, JobState
from batch.congestion import ControlConfig
from batch.cost import PriceTable
from batch.engine import Engine, EngineConfig, Route, RunStats, StopReason
from batch.errors import ClusterError, RateLimited, StorageError
from batch.jobs import Job, Status
from batch.progress import Observer
from batch.runners.coordinator import (
    AGAIN,
    Control,
    Coordinator,
    Reporter,
    SharedBudget,
    StopRelay,
)
from batch.runners.limits_server import EndEvent, Grant, LimitsServer
from batch.runners.run_state import RunState
from batch.runners.s3segments import open_shard
from batch.runners.segments import DriverCheckpoint, SegmentStore, segment_files
from batch.runners.shard import forced
from batch.runners.shared_limits import SharedLimits
from batch.sharding import Backlog, Shard, make_shards, shard_id, writer_id
from batch.storage.s3client import S3Location
from batch.storage.s3state import S3State
from tests.conftest import cli_env, run_args, run_cli, simulator
from tests.s3server import CREDENTIALS, S3Server
from tests.scripted import ScriptedProvider
from tests.test_e2e import catalog

IDS = [f"j{i}" for i in range(7)]


def run_async(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """The test body on its own event loop (no asyncio plugin in this suite)."""

    @functools.wraps(test)
    def wrapper() -> None:
        asyncio.run(test())

    return wrapper


@pytest.mark.parametrize(
    ("ids", "size", "sizes"),
    [
        ([], 3, []),
        (IDS[:1], 3, [1]),
        (IDS[:3], 3, [3]),
        (IDS, 3, [3, 3, 1]),
        (IDS, 1, [1] * 7),
        (IDS, 300, [7]),
    ],
)
def test_shards_cover_every_job_once_in_order(ids: list[str], size: int, sizes: list[int]) -> None:
    shards = make_shards(ids, size)
    assert [len(s) for s in shards] == sizes
    assert [p for s in shards for p in s.positions] == list(range(len(ids)))
    assert make_shards(ids, size) == shards  # the same on a re-run
    assert len({s.id for s in shards}) == len(shards)


def test_shard_ids_name_position_and_content() -> None:
    first = make_shards(IDS, 3)[0]
    assert first == Shard(shard_id(0, IDS[:3]), (0, 1, 2))
    assert first.id.startswith("s00000_")
    assert make_shards(["x", *IDS[1:]], 3)[0].id != first.id  # other jobs, other shard


@pytest.mark.parametrize("size", [0, -1])
def test_shard_size_must_be_positive(size: int) -> None:
    with pytest.raises(ValueError):
        make_shards(IDS, size)


@pytest.mark.parametrize(("parts", "ok"), [
    (("r1", "s00000_ab", "a1"), True),
    (("r.1", "s", "a"), False),
    (("r", "s/x", "a"), False),
    (("", "s", "a"), False),
])
def test_writer_ids(parts: tuple[str, str, str], ok: bool) -> None:
    if ok:
        assert writer_id(*parts) == ".".join(parts)
    else:
        with pytest.raises(ValueError):
            writer_id(*parts)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@run_async
async def test_the_cluster_limits_hear_that_a_429_said_its_quota_is_spent() -> None:
    """Two 429s in a row that say so pause the cluster's pool; without the word, three."""
    paused = []
    for said in (True, False):
        server = LimitsServer(ControlConfig(max_limit=4, adaptive=False))
        limits = SharedLimits(server, "w")  # type: ignore[arg-type]
        for _ in range(2):
            async with limits.slot() as ticket:
                limits.on_answer(ticket, RateLimited("slow down", retry_after_s=30.0,
                                                     quota_used_up=said))
        await limits.close()
        paused.append(server.controller.pause_until > -math.inf)
    assert paused == [True, False]


@run_async
async def test_shared_limits_never_exceed_the_cap_across_workers() -> None:
    server = LimitsServer(ControlConfig(max_limit=5, adaptive=False))
    clients = [SharedLimits(server, f"w{i}", batch=3) for i in range(4)]  # type: ignore[arg-type]
    in_flight = peak = 0

    async def request(limits: SharedLimits, n: int) -> None:
        nonlocal in_flight, peak
        async with limits.slot() as ticket:
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.001 * (n % 3))
            in_flight -= 1
            limits.on_answer(ticket)

    await asyncio.gather(*(request(c, n) for n, c in zip(range(80), itertools.cycle(clients))))
    for client in clients:
        await client.close()
    stats = await server.stats()
    assert peak == 5 and stats["peak"] == 5
    assert stats["in_flight"] == 0 and stats["granted"] == 80
    # Batches: fewer lease round trips than requests.
    assert sum(c.round_trips for c in clients) < 2 * 80


@run_async
async def test_a_dead_workers_permits_expire() -> None:
    clock = Clock()
    server = LimitsServer(ControlConfig(max_limit=2, adaptive=False), lease_ttl_s=10,
                          clock=clock)
    grant = await server.lease("dead", 2)
    assert len(grant.seqs) == 2
    waiting = asyncio.ensure_future(server.lease("alive", 1))
    await asyncio.sleep(0.01)
    assert not waiting.done()  # the dead worker holds both slots
    clock.t += 11
    got = await asyncio.wait_for(waiting, 5)  # the server looks again within a second
    assert len(got.seqs) == 1 and (await server.stats())["expired"] == 2


@run_async
async def test_a_restarted_server_starts_cautious() -> None:
    clock = Clock()
    config = ControlConfig(max_limit=8)
    fresh = LimitsServer(config, clock=clock)
    restarted = LimitsServer(config, cautious=True, clock=clock)
    assert fresh.controller.wait_s(clock()) == 0
    # Paused, as after a 429, and for every live client to adopt what it has in flight.
    assert restarted.controller.wait_s(clock()) >= 6.0
    clock.t += 7.5
    assert len((await restarted.lease("w", 8)).seqs) == 1  # then slow start from one


@run_async
async def test_a_shared_429_pauses_every_worker() -> None:
    server = LimitsServer(ControlConfig(max_limit=8, adaptive=True, initial_limit=8))
    a, b = (SharedLimits(server, w) for w in "ab")  # type: ignore[arg-type]

    async def refused() -> None:
        async with a.slot() as ticket:
            await asyncio.sleep(0.01)
            a.on_answer(ticket, RateLimited("429", retry_after_s=30))

    await asyncio.gather(*(refused() for _ in range(8)))
    await a.close()
    assert server.controller.pause_until > server._clock()  # the whole cluster waits
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3), b.slot():
            pass
    await b.close()


@run_async
async def test_the_budget_is_shared_and_never_passed() -> None:
    coordinator = Coordinator(1.0)  # $1: 7 requests of $0.134
    price = 134_000
    budgets = [SharedBudget(coordinator, f"w{i}", 1.0, price) for i in range(3)]  # type: ignore[arg-type]
    paid = 0
    for _ in range(5):
        for budget in budgets:
            token = await budget.acquire()
            if budget.could_ever_fit(price) and budget.try_reserve(price):
                budget.settle(price, price)
                paid += 1
            budget.release(token)
            await budget.close()
    assert paid == 7 and coordinator.spent == 7 * price
    assert not any(b.could_ever_fit(price) for b in budgets if b._exhausted)


@run_async
async def test_leases_held_at_once_never_pass_the_cap() -> None:
    coordinator = Coordinator(1.0)
    price = 134_000
    budgets = [SharedBudget(coordinator, f"w{i}", 1.0, price) for i in range(10)]  # type: ignore[arg-type]
    tasks = [asyncio.ensure_future(b.acquire()) for b in budgets]
    done, pending = await asyncio.wait(tasks, timeout=0.3)
    assert len(done) == 7 and len(pending) == 3  # the rest wait: those in flight may fail
    for budget, task in zip(budgets, tasks, strict=True):
        if task in done:
            assert budget.try_reserve(price)
            budget.settle(price, price)  # all seven paid
            budget.release(task.result())
    await asyncio.gather(*(b.close() for b in budgets))
    assert await asyncio.wait_for(asyncio.gather(*pending), 5) == [0, 0, 0]  # never fits now
    assert coordinator.spent == 7 * price


@run_async
async def test_a_silent_workers_budget_counts_as_spent() -> None:
    clock = Clock()
    coordinator = Coordinator(1.0, lease_ttl_s=10, clock=clock)
    assert await coordinator.take("dead", 500_000) == (500_000, 0)
    clock.t += 11
    assert await coordinator.take("alive", 600_000) == (0, 500_000)


def _state_line(job_id: str, status: str = "succeeded") -> str:
    return json.dumps({"id": job_id, "fp": "f", "status": status, "attempts": 1,
                       "images": []}) + "\n"


def test_segments_are_read_by_a_retry_and_folded_by_the_driver(tmp_path: Path) -> None:
    first = SegmentStore.open_segment(tmp_path, "r.s1.a1", "s1", [])
    first._append(_state_line("x").encode(), durable=True)
    first.close()
    folder = tmp_path / ".imgbatch" / "segments"
    with (folder / "r.s1.a1.jsonl").open("a") as handle:
        handle.write('{"id": "torn"')  # the writer died mid-append
    retry = SegmentStore.open_segment(tmp_path, "r.s1.a2", "s1", [])
    other = SegmentStore.open_segment(tmp_path, "r.s2.a1", "s2", [])
    assert set(retry.states) == {"x"} and other.states == {}
    retry.close()
    other.close()
    driver = DriverCheckpoint.open(tmp_path)
    assert set(driver.states) == {"x"} and segment_files(tmp_path) == []
    driver.close()
    assert _state_line("x").strip() in (tmp_path / ".imgbatch" / "journal.jsonl").read_text()


def test_a_single_machine_run_never_imports_ray(tmp_path: Path) -> None:
    fake = tmp_path / "fake" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('a single-machine run imported ray')\n")
    manifest = catalog(3, tmp_path / "cat.jsonl")
    env = cli_env(PYTHONPATH=f"{fake.parent}")
    with simulator("--scale", "0.0625") as sim:
        done = run_cli(*run_args(manifest, tmp_path / "out", sim), "--no-gallery", env=env)
        assert done.returncode == 0, done.stderr
        clustered = run_cli(*run_args(manifest, tmp_path / "out2", sim), "--cluster", "ray",
                            env=env)
    assert clustered.returncode == 2 and "pip install 'imgbatch[ray]'" in clustered.stderr


class FlakyLimits:
    """A remote whose ``lease`` raises ``failures`` times (an actor restarting, or a bug)."""

    def __init__(self, server: LimitsServer, failures: float) -> None:
        self.server = server
        self.failures = failures
        self.calls = 0

    async def lease(self, worker: str, want: int) -> Grant:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("actor unavailable")
        return await self.server.lease(worker, want)

    async def end(self, worker: str, epoch: str, events: list[EndEvent]) -> None:
        await self.server.end(worker, epoch, events)

    async def renew(self, worker: str) -> str:
        return await self.server.renew(worker)

    async def adopt(self, worker: str, count: int) -> Grant:
        return await self.server.adopt(worker, count)


async def _take_slots(limits: SharedLimits, n: int) -> list[BaseException | None]:
    async def one() -> None:
        async with limits.slot() as ticket:
            limits.on_answer(ticket)

    async with asyncio.timeout(10):  # a hang fails the test, it does not hang the suite
        return list(await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True))


@run_async
async def test_a_lease_that_fails_for_a_while_is_tried_again() -> None:
    remote = FlakyLimits(LimitsServer(ControlConfig(max_limit=4, adaptive=False)), failures=3)
    limits = SharedLimits(remote, "w", lease_retries=5, retry_s=0.001)  # type: ignore[arg-type]
    assert await _take_slots(limits, 6) == [None] * 6
    await limits.close()
    assert remote.calls > 3


@run_async
async def test_a_lease_that_keeps_failing_fails_every_waiter() -> None:
    remote = FlakyLimits(LimitsServer(ControlConfig(max_limit=4)), failures=math.inf)
    limits = SharedLimits(remote, "w", lease_retries=3, retry_s=0.001)  # type: ignore[arg-type]
    outcomes = await _take_slots(limits, 5)
    # A StorageError to the engine: it stops the run with these jobs pending.
    assert all(isinstance(o, ClusterError) and isinstance(o, StorageError) for o in outcomes)
    assert remote.calls == 4
    await limits.close()


def test_an_engine_whose_shared_limits_stay_unreachable_stops_with_its_jobs_pending(
    tmp_path: Path,
) -> None:
    remote = FlakyLimits(LimitsServer(ControlConfig(max_limit=4)), failures=math.inf)
    provider = ScriptedProvider({}, PriceTable.with_overrides({}))
    jobs = [Job(id=f"j{i}", prompt="p", model="gemini-2.5-flash-image", aspect_ratio="1:1",
                image_size="1K") for i in range(5)]
    store = Checkpoint.open(tmp_path)

    async def main() -> RunStats:
        limits = SharedLimits(remote, "w", lease_retries=3, retry_s=0.001)  # type: ignore[arg-type]
        engine = Engine({"": Route(provider, limits, 4)}, store, EngineConfig(concurrency=4),
                        Observer())
        try:
            async with asyncio.timeout(20):
                return await engine.run(engine.plan(jobs))
        finally:
            await limits.close()

    try:
        stats = asyncio.run(main())
    finally:
        store.close()
    assert stats.stop is StopReason.STORAGE and "shared limits" in stats.stop_message
    assert sum(provider.requests.values()) == 0 and stats.succeeded == 0


class Swappable:
    """One endpoint's actor handle: ``server`` is replaced as when Ray restarts the actor."""

    def __init__(self, server: LimitsServer) -> None:
        self.server = server

    def __getattr__(self, name: str) -> Any:
        return lambda *args: getattr(self.server, name)(*args)


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0.005)


@run_async
async def test_a_restarted_limits_server_adopts_the_requests_in_flight() -> None:
    clock = Clock()
    config = ControlConfig(max_limit=2, adaptive=False)
    remote = Swappable(LimitsServer(config, clock=clock))
    holder = SharedLimits(remote, "holder", renew_s=0.005)  # type: ignore[arg-type]
    release = asyncio.Event()
    held = 0

    async def hold() -> None:
        nonlocal held
        async with holder.slot() as ticket:
            held += 1
            await release.wait()
            holder.on_answer(ticket)

    holding = [asyncio.ensure_future(hold()) for _ in range(2)]
    await _until(lambda: held == 2)
    restarted = LimitsServer(config, cautious=True, clock=clock)
    remote.server = restarted  # the actor died and came back, knowing nothing
    await _until(lambda: restarted.controller.in_flight == 2)  # the holder's renewal adopted
    clock.t += 60  # past the restart's pause
    other = SharedLimits(restarted, "other")  # type: ignore[arg-type]
    waiting = asyncio.ensure_future(_take_slots(other, 1))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # both slots are held by requests of the earlier life
    release.set()
    await asyncio.gather(*holding)
    assert await waiting == [None]
    for limits in (holder, other):
        await limits.close()
    stats = await restarted.stats()
    assert stats["in_flight"] == 0 and stats["peak"] == 2


@run_async
async def test_a_restarted_coordinator_with_a_cap_stops_and_leases_nothing() -> None:
    capped = Coordinator(1.0, restarted=True)
    assert await capped.take("w", 1000) == (0, 0)
    control = await capped.report("w", [])
    assert control.stop == StopReason.BUDGET.value and not control.abort
    uncapped = Coordinator(None, restarted=True)
    assert await uncapped.take("w", 1000) == (1000, 0)
    assert (await uncapped.report("w", [])).stop is None
    fresh = Coordinator(1.0)
    assert await fresh.take("w", 1000) == (1000, 0) and (await fresh.report("w", [])).stop is None


@run_async
async def test_the_driver_sends_its_stop_again_to_a_restarted_coordinator() -> None:
    relay = StopRelay()
    first = Coordinator(None)
    relay.again((await first.drain())[2])
    await first.stop(*relay.stop("signal", "SIGINT received"))
    assert relay.again((await first.drain())[2]) is None  # the same actor: nothing again
    await first.stop(*relay.stop("signal", "again: stop now", True))
    second = Coordinator(None, restarted=True)
    assert (await second.report("w", [])).stop is None  # the stop was lost with the actor
    again = relay.again((await second.drain())[2])
    assert again == ("signal", "SIGINT received", True)
    await second.stop(*again)
    assert await second.report("w", []) == Control("signal", "SIGINT received", True)


@run_async
async def test_attempts_of_a_shard_are_numbered_by_the_coordinator() -> None:
    coordinator = Coordinator(None)
    assert [await coordinator.attempt(s) for s in ("s1", "s1", "s2", "s1")] == [1, 2, 1, 3]


def _segment(root: Path, writer: str, *lines: str) -> None:
    folder = root / ".imgbatch" / "segments"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{writer}.jsonl").write_text("".join(lines))


def _line(job_id: str, status: str, attempts: int) -> str:
    return json.dumps({"id": job_id, "fp": "f", "status": status, "attempts": attempts,
                       "images": []}) + "\n"


def test_a_dead_attempts_pending_never_hides_its_retrys_success(tmp_path: Path) -> None:
    # The retry's name sorts first (a node whose clock was behind, or a restarted counter).
    _segment(tmp_path, "r.s1.a1", _line("x", "pending", 2), _line("x", "succeeded", 2),
             _line("y", "failed", 3))
    _segment(tmp_path, "r.s1.a2", _line("x", "pending", 1), _line("y", "pending", 3))
    retry = SegmentStore.open_segment(tmp_path, "r.s1.a3", "s1", [])
    assert retry.states["x"].status is Status.SUCCEEDED
    assert retry.states["y"].status is Status.PENDING  # as many attempts: the later line
    retry.close()
    driver = DriverCheckpoint.open(tmp_path)
    assert driver.states["x"].status is Status.SUCCEEDED
    driver.close()
    again = DriverCheckpoint.open(tmp_path)  # the main journal alone, last line wins
    assert again.states["x"].status is Status.SUCCEEDED and again.states["x"].attempts == 2
    again.close()


def test_force_redoes_a_job_once_per_run_even_from_a_store_read_anew(tmp_path: Path) -> None:
    todo = [(Job(id=i, prompt="p", model="m", aspect_ratio="1:1", image_size="1K"), "f")
            for i in ("same", "redone", "new")]
    prior = [JobState.from_record(json.loads(_line(i, "succeeded", 1)))
             for i in ("same", "redone")]
    # What a shard of an s3:// output reads itself: equal states, not the same objects.
    _segment(tmp_path, "r.s1.a1", _line("same", "succeeded", 1), _line("redone", "succeeded", 2))
    store = SegmentStore.open_segment(tmp_path, "r.s1.a2", "s1", [])
    assert store.states["same"] == prior[0] and store.states["same"] is not prior[0]
    assert forced(todo, store, prior, force=True) == [todo[0], todo[2]]
    assert forced(todo, store, prior, force=False) == todo
    store.close()


def test_a_shard_of_an_s3_output_reads_only_its_own_attempts(
    moto: S3Server, monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    url = f"s3://{moto.bucket('ray-shard-reads-its-own')}/out"
    driver = S3State.open(S3Location.parse(url, moto.endpoint))
    try:
        for n in range(6):
            driver.record(JobState(f"j{n}", "f", Status.FAILED, 1), durable=True)
        prior = [driver.states["j1"], driver.states["j4"]]
        first = open_shard(url, moto.endpoint, "r.s1.a1", driver.gen, prior)
        first.record(JobState("j1", "f", Status.PENDING, 2), durable=True)
        first.close()  # (it died)
        other = open_shard(url, moto.endpoint, "r.s2.a1", driver.gen, [driver.states["j2"]])
        other.record(JobState("j2", "f", Status.PENDING, 5), durable=True)
        other.close()
        retry = open_shard(url, moto.endpoint, "r.s1.a2", driver.gen, prior)
        everything = open_shard(url, moto.endpoint, "r.s1.a3", driver.gen)
    finally:
        driver.close()
    try:
        # The retry holds its jobs: the driver's states and what its first attempt recorded.
        assert set(retry.states) == {"j1", "j4"} and retry.states["j1"].attempts == 2
        assert retry.states["j4"] == prior[1]
        # Without prior (tools, tests): every segment, every job.
        assert set(everything.states) == {f"j{n}" for n in range(6)}
        assert everything.states["j2"].attempts == 5
    finally:
        retry.close()
        everything.close()


class Hanging:
    """An actor handle whose calls never answer (a hung actor, or one on a node that is gone
    while Ray keeps the call for a restart that never comes)."""

    def __init__(self) -> None:
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        async def never(*args: Any) -> Any:
            self.calls += 1
            await asyncio.Event().wait()

        return never


@run_async
async def test_a_lease_call_that_never_answers_fails_every_waiter_in_bounded_time() -> None:
    remote = Hanging()
    limits = SharedLimits(remote, "w", lease_retries=2, retry_s=0.001,  # type: ignore[arg-type]
                          call_timeout_s=0.05)
    outcomes = await _take_slots(limits, 3)
    assert all(isinstance(o, ClusterError) for o in outcomes) and remote.calls == 3
    async with asyncio.timeout(5):
        await limits.close()  # its own calls are bounded too


@run_async
async def test_the_server_answers_a_lease_within_its_poll_even_when_nothing_may_start() -> None:
    server = LimitsServer(ControlConfig(max_limit=1, adaptive=False), poll_s=0.05)
    assert len((await server.lease("a", 1)).seqs) == 1
    async with asyncio.timeout(5):
        assert (await server.lease("b", 1)).seqs == ()  # empty: b asks again
    # A client waits through empty grants until the slot frees.
    limits = SharedLimits(server, "b")  # type: ignore[arg-type]
    waiting = asyncio.ensure_future(_take_slots(limits, 1))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await server.end("a", server.epoch, [(0, "admitted", None, False)])
    assert await waiting == [None]
    await limits.close()


@run_async
async def test_the_coordinator_answers_take_within_its_poll() -> None:
    coordinator = Coordinator(1.0, poll_s=0.05)
    assert await coordinator.take("a", 1_000_000) == (1_000_000, 0)
    async with asyncio.timeout(5):
        assert await coordinator.take("b", 1) == (AGAIN, 0)  # held elsewhere: ask again
    budget = SharedBudget(coordinator, "b", 1.0, 1)  # type: ignore[arg-type]
    waiting = asyncio.ensure_future(budget.acquire())
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await coordinator.give("a", 1_000_000, 0)  # a's request failed: nothing paid
    assert await asyncio.wait_for(waiting, 5) == 1


@run_async
async def test_a_shard_whose_coordinator_hangs_abandons_its_work() -> None:
    stopped: list[str] = []

    class Engine:
        stopping = False

        def stop(self, reason: StopReason, message: str) -> None:
            stopped.append(message)

        def abort(self) -> None:
            stopped.append("abort")

    reporter = Reporter(Hanging(), "w", interval_s=0.01, orphan_s=0.1,  # type: ignore[arg-type]
                        call_timeout_s=0.05)
    reporter.start(Engine())
    async with asyncio.timeout(5):
        while "abort" not in stopped:
            await asyncio.sleep(0.01)
        await reporter.close()
    assert stopped == ["the driver is gone", "abort"]


@pytest.mark.parametrize(
    ("ended", "tail", "busy"),
    [
        ([], 2, 2),  # both shards have more than their tail left
        (["j0", "j1"], 2, 1),  # the first is down to one job: the next shard may start
        (["j0", "j1", "j2", "j3"], 2, 0),
        (["j0", "j0", "x"], 1, 2),  # an id counts once; unknown ids count for nothing
        ([], 3, 0),  # shards no bigger than the tail are always in it
    ],
)
def test_a_shard_in_its_tail_lets_the_next_one_start(ended: list[str], tail: int,
                                                     busy: int) -> None:
    shards = make_shards(IDS[:6], 3)
    backlog = Backlog(shards, IDS[:6])
    for job_id in ended:
        backlog.ended(job_id)
    assert backlog.busy([shard.id for shard in shards], tail) == busy


@run_async
async def test_a_retry_leaves_its_dead_attempts_slots_to_their_leases() -> None:
    """A node's death does not end the requests it sent: the gateway may still be working on
    them (a node-removal run saw 5 in flight at a cap of 4 when a retry took their slots at
    once). Its budget counts as spent at once; its slots come back when its leases end."""
    now = [0.0]
    state = RunState(1.0, {"": ControlConfig(max_limit=3, adaptive=False)})
    server = state.limits[""]
    server._clock = lambda: now[0]
    dead, other = writer_id("r", "s1", "a1x"), writer_id("r", "s10", "a1y")
    assert len((await state.lease("", dead, 2)).seqs) == 2
    assert len((await state.lease("", other, 1)).seqs) == 1
    assert await state.take(dead, 400_000) == (400_000, 0)
    retry = writer_id("r", "s1", "a2z")
    await state.retire(writer_id("r", "s1", "a")[:-1], retry)
    assert state.coordinator.spent == 400_000 and state.coordinator.held == {}
    assert (await server.stats())["in_flight"] == 3  # still the gateway's, maybe
    now[0] += server.lease_ttl_s / 2
    server._touch(other, now[0])  # the live shard's calls renew its lease
    now[0] += server.lease_ttl_s / 2 + 1
    assert len((await state.lease("", retry, 2)).seqs) == 2  # the dead attempt's expired
    stats = await server.stats()
    assert stats["in_flight"] == 3 and stats["expired"] == 2  # the other shard's slot stays
