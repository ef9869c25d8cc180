"""The engine under random schedules and random stops, on a virtual clock.

Each example draws jobs with prices, a scripted answer per request (latency,
429 with Retry-After, 5xx, 400, 401, several images) and one stop cause at a
random instant: none, --max-cost, --max-runtime, a signal once or twice, a
storage error or a bug in the commit, endless 429s. Then for every example:
the run ends (no deadlock) within a bound computed from the schedule; no
request starts that could pass the cap; every job is exactly one of
succeeded / failed / pending; no request is sent for a job after it
succeeded; attempts match requests; a paid image is never lost; and a
re-run finishes the rest without a request for a finished job.

``IMGBATCH_SOAK_EXAMPLES`` sets the number of examples (``make soak``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batch.checkpoint import Checkpoint
from batch.cost import PriceTable
from batch.engine import Engine, EngineConfig, RunStats, StopReason
from batch.errors import JobError, StorageError
from batch.images import IMAGES_DIR
from batch.jobs import Job, Status
from batch.progress import Observer
from batch.results import rows, write_results
from batch.retry import RetryPolicy
from tests.scripted import Answer, ScriptedProvider, VirtualLoop, inline

EXAMPLES = int(os.environ.get("IMGBATCH_SOAK_EXAMPLES", "200"))
SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None
PRICES = PriceTable.with_overrides({})
KINDS = [("gemini-3.0-pro-image-preview", "1K"), ("gemini-3.0-pro-image-preview", "4K"),
         ("gemini-2.5-flash-image", "1K")]
CAUSES = ("none", "budget", "runtime", "signal", "signal2", "fatal", "storage", "bug",
          "endless429")
SLACK_S = 1e-6


@dataclass
class Scenario:
    jobs: list[Job]
    script: dict[str, tuple[Answer, ...]]
    cause: str
    concurrency: int
    adaptive: bool
    grace_s: float
    policy: RetryPolicy
    max_cost: float | None = None
    max_runtime: float | None = None
    signals: tuple[float, ...] = ()
    fail_batch: int = 0  # the commit batch (1-based) that fails, 0 for none
    endless: Answer | None = None
    notes: dict[str, Any] = field(default_factory=dict)


def answers() -> st.SearchStrategy[Answer]:
    latency = st.integers(0, 40).map(lambda n: n / 2)
    return st.builds(
        Answer,
        latency_s=latency,
        kind=st.sampled_from(["ok", "ok", "429", "429", "500", "400", "401"]),
        images=st.sampled_from([1, 1, 1, 2, 3]),
        retry_after_s=st.one_of(st.none(), st.integers(0, 120).map(float)),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    n = draw(st.integers(1, 10))
    jobs = []
    for i in range(n):
        model, size = draw(st.sampled_from(KINDS))
        jobs.append(Job(id=f"j{i}", prompt=f"p{i}", model=model, aspect_ratio="1:1",
                        image_size=size, index=i))
    cause = draw(st.sampled_from(CAUSES))
    script = {}
    for job in jobs:
        scripted = draw(st.lists(answers(), max_size=4))
        if cause != "fatal":
            scripted = [a for a in scripted if a.kind != "401"]
        script[job.id] = tuple(scripted)
    if cause == "fatal" and not any(a.kind == "401" for s in script.values() for a in s):
        script[jobs[0].id] = (Answer(draw(st.integers(0, 20)) / 2, "401"), *script[jobs[0].id])
    adaptive = draw(st.booleans())
    scenario = Scenario(
        jobs=jobs, script=script, cause=cause,
        concurrency=draw(st.integers(1, 5)), adaptive=adaptive,
        grace_s=draw(st.integers(0, 20)) / 2,
        policy=RetryPolicy(
            max_attempts=draw(st.integers(1, 4)), cap_s=8.0, max_server_wait_s=60.0,
            max_rate_limit_wait_s=draw(st.sampled_from([30.0, 120.0, 900.0])),
        ),
    )
    if cause == "budget":
        # Room for k images plus a remainder that fits no further one: the residue case.
        prices = [PRICES.job_micros(job) or 0 for job in jobs]
        k = draw(st.integers(0, n))
        remainder = draw(st.integers(0, 239_999))
        scenario.max_cost = max(1, sum(prices[:k]) + remainder) / 1_000_000
    elif cause == "runtime":
        scenario.max_runtime = float(draw(st.integers(0, 120)))
    elif cause in ("signal", "signal2"):
        first = draw(st.integers(0, 120)) / 2
        scenario.signals = (first,)
        if cause == "signal2":
            scenario.signals += (first + draw(st.integers(0, 40)) / 4,)
    elif cause in ("storage", "bug"):
        scenario.fail_batch = draw(st.integers(1, 6))
    elif cause == "endless429":
        scenario.endless = Answer(draw(st.integers(0, 6)) / 2, "429",
                                  retry_after_s=draw(st.sampled_from([None, 1.0, 60.0])))
    if adaptive and scenario.max_runtime is None:
        # The learnt pacing is the congestion controller's, not bounded here: a
        # deadline bounds the run instead.
        scenario.max_runtime = float(draw(st.integers(60, 1200)))
    return scenario


def serial_bound(s: Scenario) -> float:
    """How long the run could take with one request at a time and every wait paid in full."""
    worst_wait = max(s.policy.cap_s, s.policy.max_server_wait_s)
    total = 0.0
    for job in s.jobs:
        for answer in s.script[job.id]:
            total += answer.latency_s + 2 * worst_wait
        total += 1.0  # the provider's default answer after the script
    return total + 2.0  # the first-wave hold


def bound(s: Scenario) -> float:
    """The latest virtual instant the run may still be going."""
    # With adaptive pacing the learnt rate (the congestion controller's) decides how fast
    # requests go, so only the deadline bounds the run.
    ends = [] if s.adaptive else [serial_bound(s)]
    if s.endless is not None and not s.adaptive:
        per_429 = s.endless.latency_s + 2 * max(s.endless.retry_after_s or 0.0, s.policy.cap_s)
        ends = [s.policy.max_rate_limit_wait_s + 3 * per_429 + 2.0]
    if s.max_runtime is not None:
        ends.append(s.max_runtime)
    if s.signals:
        ends.append(s.signals[0])
    return min(ends) + s.grace_s + SLACK_S


class Counting(Observer):
    """Requests on the wire as progress counts them: one per on_attempt until on_answer."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.peak = 0

    def on_attempt(self, job: Job) -> None:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)

    def on_answer(self, job: Job, error: JobError | None = None) -> None:
        self.in_flight -= 1
        assert self.in_flight >= 0


@dataclass
class Outcome:
    stats: RunStats | None
    error: BaseException | None
    ended_at: float
    batches_failed: int


def run_once(s: Scenario, root: Path, provider: ScriptedProvider, *, first: bool) -> Outcome:
    limit = bound(s) if first else 1e9
    loop = VirtualLoop(limit_s=limit + 1.0)
    store = Checkpoint.open(root)
    failed = [0]
    if first and s.fail_batch:
        real = store.commit_batch
        calls = [0]

        def commit_batch(states: Any, staged: Any) -> None:
            calls[0] += 1
            if calls[0] == s.fail_batch:
                failed[0] += 1
                if s.cause == "storage":
                    raise StorageError("injected: writing the checkpoint failed")
                raise RuntimeError("injected bug in commit_batch")
            real(states, staged)

        store.commit_batch = commit_batch  # type: ignore[method-assign]
    config = EngineConfig(
        concurrency=s.concurrency, policy=s.policy, adaptive=s.adaptive,
        max_runtime_s=s.max_runtime if first else None,
        max_cost_usd=s.max_cost if first else None,
        prices=PRICES, seed=0, grace_s=s.grace_s,
    )
    observer = Counting()
    engine = Engine(provider, store, config, observer, clock=loop.time, offload=inline)

    def check_budget(job: Job) -> None:
        budget = engine.budget
        if budget.cap is not None and budget.spent + budget.reserved > budget.cap:
            provider.violations.append(
                f"request for {job.id} started with {budget.spent} spent + "
                f"{budget.reserved} reserved > cap {budget.cap}"
            )

    provider.on_request = check_budget

    async def main() -> RunStats:
        if first:
            for at in s.signals:
                loop.call_later(at, engine.interrupt, "SIGTERM")
        return await engine.run(engine.plan(s.jobs))

    stats: RunStats | None = None
    error: BaseException | None = None
    try:
        try:
            stats = loop.run_until_complete(main())
        except (RuntimeError, ExceptionGroup) as exc:
            error = exc
        ended = loop.now
        write_results(s.jobs, store)
        assert observer.in_flight == 0 and observer.peak <= s.concurrency
        if stats is not None:
            assert stats.requests == sum(provider.requests.values())
        assert engine.budget.reserved == 0, engine.budget.reserved
    finally:
        _cancel_the_rest(loop)
        store.close()
        loop.close()
    return Outcome(stats, error, ended, failed[0])


def _cancel_the_rest(loop: VirtualLoop) -> None:
    """After a failed example, end what is left on the loop, so the report shows one error."""
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    loop.limit_s = float("inf")
    with contextlib.suppress(BaseException):
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


def check(s: Scenario, root: Path) -> None:
    provider = ScriptedProvider(s.script, PRICES, endless=s.endless)
    out = run_once(s, root, provider, first=True)
    assert not provider.violations, provider.violations
    # A bug in the commit ends the run with the error (exit 70), and only then.
    if s.cause == "bug" and out.batches_failed:
        assert out.error is not None
        assert "injected bug" in repr(out.error)
    else:
        assert out.error is None, repr(out.error)
        assert out.stats is not None
    assert out.ended_at <= bound(s), (out.ended_at, bound(s))

    store = Checkpoint.read(root)
    results = list(rows(s.jobs, store))
    assert [r["id"] for r in results] == [job.id for job in s.jobs]
    status = {r["id"]: r["status"] for r in results}
    assert set(status.values()) <= {"succeeded", "failed", "pending"}
    for r in results:
        assert r["attempts"] == provider.requests[r["id"]], (r, provider.requests)
        if r["status"] == "succeeded":
            assert r["id"] in provider.answered_ok
            for image in r["images"]:
                assert (root / image["path"]).is_file()
    if s.cause not in ("storage", "bug"):
        # Every answer paid for was committed, whatever stopped the run.
        assert {i for i, v in status.items() if v == "succeeded"} == provider.answered_ok
    if s.max_cost is not None:
        cap = round(s.max_cost * 1_000_000)
        assert provider.paid_micros - provider.extra_micros <= cap
        if out.stats is not None and out.stats.stop is StopReason.BUDGET:
            assert any(v == "pending" for v in status.values())

    again = ScriptedProvider({}, PRICES)
    rerun = run_once(s, root, again, first=False)
    assert rerun.error is None, repr(rerun.error)
    assert not again.violations, again.violations
    finished = {i for i, v in status.items() if v == "succeeded"}
    assert not finished & set(again.requests), (finished, again.requests)
    assert set(again.requests) == {job.id for job in s.jobs} - finished
    final = {r["id"]: r for r in rows(s.jobs, Checkpoint.read(root))}
    assert {r["status"] for r in final.values()} == {Status.SUCCEEDED.value}
    for job in s.jobs:
        assert final[job.id]["attempts"] == provider.requests[job.id] + again.requests[job.id]


@pytest.mark.timeout(60 + EXAMPLES // 5)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenarios())
def test_engine_ends_in_bounded_time_and_loses_nothing(s: Scenario) -> None:
    with tempfile.TemporaryDirectory(dir=SHM) as tmp:
        (Path(tmp) / IMAGES_DIR).mkdir()
        check(s, Path(tmp))
