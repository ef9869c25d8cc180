"""``imgbatch run``: from parsed arguments to an exit code.

Loads and plans the manifest, opens the output (a folder or s3://), wires the
engine, the batch runner or the Ray runner, and writes results.jsonl, summary.json
and the gallery on every way out, so that the exit code and the records agree.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import ssl
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

from batch import capabilities, report, routing
from batch.checkpoint import STATE_DIR, Checkpoint
from batch.cost import PriceTable, to_usd
from batch.endpoints import Endpoint
from batch.engine import Engine, EngineConfig, Route, StopReason
from batch.errors import (
    OutputError,
    StorageError,
    UsageError,
)
from batch.imagecheck import DecodeChecked, Verify
from batch.images import IMAGES_DIR
from batch.jobs import Job, Status
from batch.manifest import Manifest
from batch.metrics import MetricsFile
from batch.pricing import price_key
from batch.progress import ConsoleProgress, Observers
from batch.providers.base import ClientConfig
from batch.results import RESULTS, write_results
from batch.retry import RetryPolicy
from batch.runners import batchcli
from batch.runners.batchledger import Ledger
from batch.storage import outputs
from batch.storage.base import StateStore

log = logging.getLogger("batch")

# Exit codes (the module docstring of batch.cli says what each means).
EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE, EXIT_FATAL, EXIT_LOCKED = 0, 1, 2, 3, 4
EXIT_INTERNAL = 70  # EX_SOFTWARE
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}



def metrics_file(path: Path | None, name: str, labels: dict[str, str],
                 interval_s: float) -> MetricsFile | None:
    """The metrics writer for --metrics-file, checked before anything is sent."""
    if path is None:
        return None
    if path.suffix != ".prom":
        raise UsageError(f"--metrics-file {path}: node_exporter's textfile collector reads "
                         "only files ending in .prom")
    if not path.parent.is_dir():
        raise UsageError(f"--metrics-file {path}: folder {path.parent} does not exist")
    return MetricsFile(path, output=name,
                       endpoint_of=lambda job: labels.get(job.endpoint, job.endpoint),
                       endpoints=labels.values(), interval_s=interval_s)


async def _build_gallery_apart(
    output: str, quiet: bool, stop: asyncio.Event, timeout_s: float | None,
    s3_endpoint: str | None = None,
) -> bool:
    """Rebuild the gallery in a child process: decoding 4K images for thumbnails takes
    tens of MB each, which must not count against the run's own flat memory.

    The child is killed when ``stop`` is set (a signal) or after ``timeout_s``
    (what is left of the process's deadline); ``imgbatch report`` rebuilds it later.
    """
    if stop.is_set() or (timeout_s is not None and timeout_s <= 0):
        return False
    argv = [sys.executable, "-m", "batch", "report", output]
    if s3_endpoint:
        argv += ["--s3-endpoint", s3_endpoint]
    if quiet:
        argv.append("--quiet")
    # Its one line goes with the run's other messages, on stderr.
    child = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL if quiet else sys.stderr.fileno()
    )
    exited = asyncio.ensure_future(child.wait())
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({exited, stopped}, timeout=timeout_s,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not exited.done():
            child.kill()
        code = await exited
    return code == 0


def enforce_capabilities(manifest: Manifest, provider: str) -> None:
    """Reject jobs their model cannot do, each checked against its endpoint's provider.

    One job per shape: what a model can do depends on nothing else of a job."""
    by_provider: dict[str, list[Job]] = {}
    for job in manifest.jobs.shapes.representatives():
        endpoint = manifest.endpoints.get(job.endpoint) if manifest.endpoints else None
        by_provider.setdefault(endpoint.provider if endpoint else provider, []).append(job)
    for name, jobs in by_provider.items():
        capabilities.enforce(jobs, name)


def cmd_run(args: argparse.Namespace, started: float | None = None) -> int:
    manifest = routing.load(args)
    enforce_capabilities(manifest, args.provider)
    settings = routing.Settings.from_args(args)
    endpoints = routing.endpoints_in_use(manifest, settings)
    # On a cluster the workers read the keys from their own environment.
    keys = routing.api_keys(endpoints, os.environ) if args.cluster is None else {}
    output: str = args.output or str(Path("output") / args.manifest.stem)
    s3 = outputs.is_s3_url(output)
    batched = batchcli.batch_names(endpoints, args.mode)
    if batched and args.force:
        raise UsageError("--force with batch mode would resubmit finished jobs on every run "
                         "(each paid again); use a new --output folder to redo them")
    if batched and (s3 or args.cluster is not None):
        # The batch ledger and request files live in the output folder's .imgbatch/.
        raise UsageError("batch mode (mode: batch / --mode batch) needs a local --output "
                         "folder; it is not available with s3:// outputs or --cluster yet")
    prices = PriceTable.with_overrides(manifest.pricing)
    if args.max_cost is not None:
        unpriced = sorted({(j.model, price_key(j)) for j in manifest.jobs.shapes.representatives()
                           if prices.job_price(j) is None})
        if unpriced:
            raise UsageError(
                "--max-cost needs a price for every job; none known for "
                + ", ".join(f"{m} {s}" for m, s in unpriced)
                + " (add them under pricing: in the manifest)"
            )
    check_ca_bundle(args.ca_bundle)
    if not s3:
        prepare_output(Path(output))
    # After the output folder exists, so the metrics file may live in it.
    # Each endpoint's label: its name, or the single endpoint's host.
    labels = {name: name or urlsplit(ep.base_url).hostname or ep.base_url
              for name, ep in endpoints.items()}
    name = output.rstrip("/").rsplit("/", 1)[-1] if s3 else Path(output).resolve().name
    metrics = metrics_file(args.metrics_file, name, labels, args.progress_interval)
    engine_config = EngineConfig(
        concurrency=args.concurrency,
        policy=RetryPolicy(
            max_attempts=args.max_attempts, max_rate_limit_wait_s=args.max_rate_limit_wait
        ),
        rpm=args.rpm,
        force=args.force,
        max_runtime_s=args.max_runtime,
        max_cost_usd=args.max_cost,
        prices=prices,
        grace_s=args.grace,
    )
    deadline = None
    if args.max_runtime is not None:
        deadline = (started if started is not None else time.monotonic()) + args.max_runtime
    if args.cluster is not None:
        return cmd_run_cluster(args, manifest, output, endpoints, settings, engine_config,
                               deadline, metrics)
    store: StateStore = (outputs.open_s3(output, args.s3_endpoint) if s3
                         else Checkpoint.open(Path(output)))
    # The manifest and checkpoint are live for the whole run; keep the cyclic
    # GC from walking 100,000 jobs over and over (it showed in profiles).
    gc.freeze()
    # Read even by a sync run: a job a live batch holds is not requested again. (An s3://
    # output has no batch ledger: batch mode is refused there, above.)
    ledger = None if s3 else Ledger.open(Path(output), writable=bool(batched))
    try:
        runner = None
        if batched and ledger is not None:
            from batch.runners.batchmode import BatchConfig, BatchRunner

            client = ClientConfig(timeout_s=args.timeout, stall_timeout_s=args.stall_timeout,
                                  ca_bundle=args.ca_bundle)
            runner = BatchRunner(
                batchcli.build_endpoints(endpoints, batched, keys, client,
                                         not args.no_embed_metadata), store, ledger,
                BatchConfig(wait=args.wait, poll_interval_s=args.poll_interval,
                            batch_size=args.batch_size, force=args.force,
                            max_cost_usd=args.max_cost, prices=prices,
                            decode_check=args.verify is Verify.DECODE,
                            fallback_sync=args.batch_fallback == "sync",
                            deadline_s=args.batch_deadline))
        batch = None if ledger is None else batchcli.BatchPart(
            runner, [job for job in manifest.jobs if job.endpoint in batched] if batched else [],
            ledger)
        # With --batch-fallback sync a batch endpoint may also send jobs one by one.
        sync = {name: ep for name, ep in endpoints.items()
                if name not in batched or args.batch_fallback == "sync"}
        return asyncio.run(
            _run(manifest, output, store, routing.build_routes(sync, keys, settings),
                 engine_config, deadline, args.quiet, args.progress_interval,
                 not args.no_gallery, metrics, args.verify, args.s3_endpoint, batch)
        )
    finally:
        if ledger is not None:
            ledger.close()
        store.close()


def cmd_run_cluster(
    args: argparse.Namespace, manifest: Manifest, output: str,
    endpoints: dict[str, Endpoint], settings: routing.Settings, engine_config: EngineConfig,
    deadline: float | None, metrics: MetricsFile | None,
) -> int:
    """``run --cluster``: the Ray runner (imported only here: one machine never loads Ray)."""
    try:
        from batch.runners import ray as ray_runner
    except ImportError as exc:
        raise UsageError(f"--cluster needs Ray: pip install 'imgbatch[ray]' ({exc})") from None
    options = ray_runner.ClusterOptions(args.cluster, args.shard_size, args.max_shards)
    progress = ConsoleProgress(sys.stderr, bar=sys.stderr.isatty() and not args.quiet,
                               interval_s=args.progress_interval)

    async def gallery(stop: asyncio.Event, limit_s: float | None) -> bool:
        return await _build_gallery_apart(output, args.quiet, stop, limit_s, args.s3_endpoint)

    code, line = asyncio.run(ray_runner.run_cluster(
        manifest, output, endpoints, settings, engine_config, options, deadline=deadline,
        verify=args.verify, progress=progress, gallery=None if args.no_gallery else gallery,
        s3_endpoint=args.s3_endpoint, metrics=metrics))
    if not args.quiet or code != EXIT_OK:
        print(f"imgbatch: {line}", file=sys.stderr)
    return code


def prepare_output(root: Path) -> None:
    """Create the output folder, or say why it cannot be used, before anything is sent.

    The folder itself may be a symbolic link (to a bigger disk, say); the
    folders imgbatch writes inside it may not, so nothing is ever written
    outside it through a link someone planted there.
    """
    if root.exists() and not root.is_dir():
        raise OutputError(f"output folder {root} exists and is not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {root}: {exc.strerror}") from None
    for name in (IMAGES_DIR, STATE_DIR):
        folder = root / name
        if folder.is_symlink():
            raise OutputError(f"{folder} is a symbolic link; refusing to write through it")
        try:
            folder.mkdir(exist_ok=True)
            # os.access says yes to root even on a read-only or immutable
            # folder: only creating a file tells.
            probe = folder / f".probe.{os.getpid()}.tmp"
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW))
            probe.unlink()
        except FileExistsError:
            raise OutputError(f"{folder} exists and is not a folder") from None
        except OSError as exc:
            raise OutputError(f"output folder {folder} is not writable: {exc.strerror}") from None


def check_ca_bundle(path: Path | None) -> None:
    """Read --ca-bundle now, so a bad one is a usage error and not a failure mid-run."""
    if path is None:
        return
    try:
        ssl.create_default_context(cafile=str(path))
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"--ca-bundle {path}: {getattr(exc, 'strerror', None) or exc}") from None


async def _run(
    manifest: Manifest,
    output: str,
    store: StateStore,
    routes: dict[str, Route],
    engine_config: EngineConfig,
    deadline: float | None,
    quiet: bool = False,
    progress_interval_s: float = 30.0,
    gallery: bool = True,
    metrics: MetricsFile | None = None,
    verify: Verify = Verify.DECODE,
    s3_endpoint: str | None = None,
    batch: batchcli.BatchPart | None = None,
) -> int:
    root = store.root  # results and summary are written here, then synced to the output
    progress = ConsoleProgress(
        sys.stderr, bar=sys.stderr.isatty() and not quiet, interval_s=progress_interval_s
    )
    if verify is Verify.DECODE:
        routes = {name: replace(route, provider=DecodeChecked(route.provider))
                  for name, route in routes.items()}
    observer = progress if metrics is None else Observers(progress, metrics)
    engine = Engine(routes, store, engine_config, observer)
    received: list[signal.Signals] = []
    signalled = asyncio.Event()  # ends the gallery child too
    loop = asyncio.get_running_loop()

    def on_signal(signum: signal.Signals) -> None:
        received.append(signum)
        signalled.set()
        engine.interrupt(signum.name)
        if batch is not None and batch.runner is not None:
            batch.runner.stop()

    for signum in EXIT_SIGNAL:
        loop.add_signal_handler(signum, on_signal, signum)
    started_at = time.time()
    store.record_run("start", jobs=len(manifest.jobs))
    stats = engine.stats
    counts: Counter[str] = Counter()
    code = EXIT_INCOMPLETE
    crashed = False
    batch_stats = None
    try:
        if batch is not None and batch.runner is not None:
            batch_stats = await batch.runner.run(batch.jobs)
        held = batch.held() if batch is not None else set()
        todo = engine.plan([job for job in manifest.jobs if job.id not in held] if held
                           else manifest.jobs)
        # What is left of the process's deadline once the manifest is loaded and planned.
        left = None if deadline is None else deadline - time.monotonic()
        stats = await engine.run(todo, runtime_left_s=left)
    except Exception:
        crashed = True  # entry() exits 70: the records below must say so too
        raise
    finally:
        await progress.close()
        for route in routes.values():
            await route.provider.close()
        if batch is not None and batch.runner is not None:
            for endpoint in batch.runner.endpoints.values():
                await endpoint.api.close()
            if batch_stats is not None:
                stats.images_written += batch_stats.images_written
                stats.bytes_written += batch_stats.bytes_written
                stats.succeeded += batch_stats.succeeded
                stats.cost_usd += to_usd(batch_stats.cost_micros)
        failures: list[str] = []
        try:
            counts = write_results(manifest.jobs, store)
        except StorageError as exc:
            failures.append(str(exc))
        if crashed:
            code = EXIT_INTERNAL
        elif received:
            code = EXIT_SIGNAL[received[0]]
        elif stats.stop is StopReason.FATAL or (batch_stats is not None and batch_stats.fatal):
            code = EXIT_FATAL
        elif counts.get(Status.SUCCEEDED.value, 0) == len(manifest.jobs) and not failures:
            code = EXIT_OK
        record = report.run_record(
            started_at=started_at, ended_at=time.time(), counts=counts, stats=stats,
            exit_code=code, manifest=str(manifest.path),
        )
        if batch_stats is not None:
            record["batch"] = batch_stats.as_record()
        try:
            report.append_run(root, record)
        except StorageError as exc:
            failures.append(str(exc))
        try:
            store.sync_out([RESULTS, report.SUMMARY])
        except StorageError as exc:
            failures.append(str(exc))
        if metrics is not None:
            await metrics.close(exit_code=code, jobs=counts)
        line = report.one_line(record, f"{output.rstrip('/')}/{RESULTS}"
                               if outputs.is_s3_url(output) else Path(output) / RESULTS)
        if batch_stats is not None:
            line += "; " + batch_stats.line()
            if batch_stats.stop_message:
                line += f"; stopped: {batch_stats.stop_message}"
        try:
            store.record_run("end", summary=line, exit_code=code)
        except StorageError as exc:
            failures.append(str(exc))
        # The gallery may take what is left of the deadline and its grace, no more.
        limit = None if deadline is None else deadline + engine_config.grace_s - time.monotonic()
        if gallery and not await _build_gallery_apart(output, quiet, signalled, limit,
                                                       s3_endpoint):
            failures.append(f"the gallery was not rebuilt; try: imgbatch report {output}")
        for signum in EXIT_SIGNAL:
            loop.remove_signal_handler(signum)
        for extra in report.details(record):
            log.info("%s", extra)
        for failure in failures:
            log.error("%s; the checkpoint holds every finished job, re-run to resume", failure)
        if not quiet or code != EXIT_OK:
            print(f"imgbatch: {line}", file=sys.stderr)
    return code
