"""The command line: ``imgbatch run | validate | status | report | inspect | simulate``.

Thin on purpose: parse arguments into config objects, call the pipeline,
map outcomes onto exit codes. Exit codes: 0 every job succeeded; 1 some
failed or pending; 2 invalid manifest or usage, nothing sent; 3 run aborted
on a fatal API answer; 4 the output folder is in use by another run;
130 / 143 stopped by SIGINT / SIGTERM; 70 an internal error (a bug).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import ssl
import sys
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

from batch import __version__, capabilities, report, routing
from batch.checkpoint import STATE_DIR, Checkpoint
from batch.cost import PriceTable, estimate, to_usd
from batch.engine import Engine, EngineConfig, Route, StopReason
from batch.errors import (
    ImgbatchError,
    LockHeld,
    ManifestError,
    OutputError,
    StorageError,
    UsageError,
)
from batch.imagecheck import DecodeChecked, Verify
from batch.images import IMAGES_DIR
from batch.jobs import Job, Status
from batch.manifest import Manifest, summarize
from batch.metrics import MetricsFile
from batch.pricing import price_key
from batch.progress import ConsoleProgress, Observers, setup_logging
from batch.providers.base import ClientConfig
from batch.results import RESULTS, write_results
from batch.retry import RetryPolicy
from batch.runners import batchcli
from batch.runners.batchledger import Ledger
from batch.runners.batchmode import BatchConfig, BatchRunner
from batch.runners.batchplan import estimate_batch
from batch.sim import config as simconfig

log = logging.getLogger("batch")

EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE, EXIT_FATAL, EXIT_LOCKED = 0, 1, 2, 3, 4
EXIT_INTERNAL = 70  # EX_SOFTWARE
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgbatch",
        description="Turn a catalog of prompts into images through a paid generative API.",
    )
    parser.add_argument("--version", action="version", version=f"imgbatch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="generate every job of a manifest (re-run to resume)")
    run.add_argument("manifest", type=Path)
    run.add_argument("--output", type=Path, help="output folder (default output/<manifest name>)")
    routing.add_arguments(run, run=True)
    run.add_argument("--concurrency", type=_positive_int, default=8, help="requests in flight")
    run.add_argument("--max-attempts", type=_positive_int, default=5)
    run.add_argument("--timeout", type=_positive_float, default=300.0, metavar="S",
                     help="wait for an answer to start (the request sent, headers back)")
    run.add_argument("--stall-timeout", type=_positive_float, default=60.0, metavar="S",
                     help="end a body bringing under 16 KiB in S s (at most --timeout)")
    run.add_argument("--rpm", type=_positive_float, default=None, help="request starts/minute")
    run.add_argument("--max-rate-limit-wait", type=_positive_float, default=900.0, metavar="S")
    run.add_argument("--max-runtime", type=_positive_float, default=None, metavar="S")
    run.add_argument("--grace", type=_non_negative_float, default=30.0, metavar="S")
    run.add_argument("--max-cost", type=_positive_float, default=None, metavar="USD",
                     help="start no request that could push the estimated spend past USD")
    run.add_argument("--force", action="store_true", help="redo every job")
    run.add_argument("--no-gallery", action="store_true",
                     help="do not rebuild DIR/index.html at the end (imgbatch report does)")
    run.add_argument("--ca-bundle", type=Path, default=None)
    run.add_argument("--verify", type=Verify, choices=list(Verify), default=Verify.DECODE,
                     help="decode each image before it counts (default), or structure only")
    run.add_argument("--progress-interval", type=_positive_float, default=30.0, metavar="S",
                     help="seconds between progress lines when stderr is not a terminal")
    run.add_argument("--metrics-file", type=Path, default=None, metavar="PATH",
                     help="Prometheus textfile (.prom), replaced at each progress tick and "
                     "at the end")
    run.add_argument("--no-embed-metadata", action="store_true",
                     help="store the server's image bytes verbatim (no provenance XMP)")
    batchcli.add_arguments(run)
    _add_logging(run)

    validate = commands.add_parser("validate", help="check a manifest and print the plan")
    validate.add_argument("manifest", type=Path)
    routing.add_arguments(validate, run=False)
    _add_logging(validate)

    status = commands.add_parser("status", help="what an output folder holds (no network)")
    status.add_argument("output", type=Path)
    _add_logging(status)

    cancel = commands.add_parser("cancel", help="cancel the open provider batches of DIR "
                                 "(the next run collects what they finished)")
    cancel.add_argument("output", type=Path)
    _add_logging(cancel)

    report_cmd = commands.add_parser("report", help="rebuild DIR/index.html, the gallery")
    report_cmd.add_argument("output", type=Path)
    _add_logging(report_cmd)

    inspect = commands.add_parser("inspect", help="what an image says about itself")
    inspect.add_argument("image", type=Path)
    inspect.add_argument("--json", action="store_true", help="one JSON object")
    _add_logging(inspect)

    simulate = commands.add_parser("simulate", help="run the local gateway simulator")
    simconfig.add_arguments(simulate)
    _add_logging(simulate)
    return parser


def _add_logging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="errors only")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be zero or more, not {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()  # --max-runtime counts from here: a deadline for the process
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.quiet, args.log_format)
    try:
        if args.command == "validate":
            return cmd_validate(args)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "report":
            return cmd_report(args)
        if args.command == "cancel":
            return cmd_cancel(args)
        if args.command == "inspect":
            return cmd_inspect(args)
        if args.command == "simulate":
            try:
                config = simconfig.config_from_args(args)
            except ValueError as exc:
                raise UsageError(f"simulate: {exc}") from None
            from batch.sim import (
                server as simulator,  # the server (aiohttp.web) is not loaded for a run
            )

            return simulator.serve(config)
        return cmd_run(args, started)
    except ManifestError as exc:
        print(f"imgbatch: invalid manifest:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    except LockHeld as exc:
        print(f"imgbatch: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    except (UsageError, OutputError) as exc:
        print(f"imgbatch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StorageError as exc:
        print(f"imgbatch: {exc}; re-run to resume", file=sys.stderr)
        return EXIT_INCOMPLETE


def cmd_validate(args: argparse.Namespace) -> int:
    manifest = routing.load(args)
    enforce_capabilities(manifest, args.provider)
    plan = summarize(manifest)
    print(f"{args.manifest}: valid, {plan['jobs']} job(s)")
    for key, value in plan.items():
        if key != "jobs":
            print(f"  {key}: {json.dumps(value, ensure_ascii=False)}")
    prices = PriceTable.with_overrides(manifest.pricing)
    for line in routing.plan_lines(manifest, prices, args.provider):
        print(line)
    total, unknown = estimate(manifest.jobs, PriceTable.with_overrides(manifest.pricing))
    note = f" (+{unknown} job(s) of unknown price)" if unknown else ""
    batch_total, _ = estimate_batch(manifest.jobs, prices)
    print(f"  estimated cost: ${total:.2f} sync, ${batch_total:.2f} at the batch rate, "
          f"for one image per job{note}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    root: Path = args.output
    if not (root / STATE_DIR).is_dir():
        raise UsageError(f"{root} holds no imgbatch checkpoint")
    print("\n".join(report.status_lines(root, Checkpoint.read(root))
                    + batchcli.status_lines(root)))
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    root: Path = args.output
    if not (root / STATE_DIR).is_dir():
        raise UsageError(f"{root} holds no imgbatch checkpoint")
    cancelled = asyncio.run(batchcli.cancel(root, os.environ))
    print(f"{root}: {cancelled} batch(es) cancelled; the next run keeps what they finished "
          "and sends the rest back to pending")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from batch.gallery import build_gallery  # Pillow: only the report needs it

    stats = build_gallery(args.output)
    print(f"{stats.path}: {stats.images} image(s), {stats.failed_jobs} failed and "
          f"{stats.pending_jobs} pending job(s); {stats.thumbs_made} thumbnail(s) made, "
          f"{stats.thumbs_reused} reused")
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from batch.xmpread import NotReadable, describe

    try:
        kind, facts = describe(args.image)
    except NotReadable as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps({"path": str(args.image), "type": kind, "provenance": facts or None},
                         ensure_ascii=False))
    else:
        print(f"{args.image}: {kind or 'not a PNG, JPEG or WebP image'}")
        if not facts:
            print("  no imgbatch provenance (made elsewhere, or with --no-embed-metadata)")
        for name, value in facts.items():
            print(f"  {name.replace('_', ' ')}: {value}")
    return EXIT_OK if facts else EXIT_INCOMPLETE


def metrics_file(path: Path | None, root: Path, labels: dict[str, str],
                 interval_s: float) -> MetricsFile | None:
    """The metrics writer for --metrics-file, checked before anything is sent."""
    if path is None:
        return None
    if path.suffix != ".prom":
        raise UsageError(f"--metrics-file {path}: node_exporter's textfile collector reads "
                         "only files ending in .prom")
    if not path.parent.is_dir():
        raise UsageError(f"--metrics-file {path}: folder {path.parent} does not exist")
    return MetricsFile(path, output=root.resolve().name,
                       endpoint_of=lambda job: labels.get(job.endpoint, job.endpoint),
                       endpoints=labels.values(), interval_s=interval_s)


async def _build_gallery_apart(
    root: Path, quiet: bool, stop: asyncio.Event, timeout_s: float | None
) -> bool:
    """Rebuild the gallery in a child process: decoding 4K images for thumbnails takes
    tens of MB each, which must not count against the run's own flat memory.

    The child is killed when ``stop`` is set (a signal) or after ``timeout_s``
    (what is left of the process's deadline); ``imgbatch report`` rebuilds it later.
    """
    if stop.is_set() or (timeout_s is not None and timeout_s <= 0):
        return False
    argv = [sys.executable, "-m", "batch", "report", str(root)]
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
    """Reject jobs their model cannot do, each checked against its endpoint's provider."""
    by_provider: dict[str, list[Job]] = {}
    for job in manifest.jobs:
        endpoint = manifest.endpoints.get(job.endpoint) if manifest.endpoints else None
        by_provider.setdefault(endpoint.provider if endpoint else provider, []).append(job)
    for name, jobs in by_provider.items():
        capabilities.enforce(jobs, name)


def cmd_run(args: argparse.Namespace, started: float | None = None) -> int:
    manifest = routing.load(args)
    enforce_capabilities(manifest, args.provider)
    settings = routing.Settings.from_args(args)
    endpoints = routing.endpoints_in_use(manifest, settings)
    keys = routing.api_keys(endpoints, os.environ)
    batched = batchcli.batch_names(endpoints, args.mode)
    if batched and args.force:
        raise UsageError("--force with batch mode would resubmit finished jobs on every run "
                         "(each paid again); use a new --output folder to redo them")
    root: Path = args.output or Path("output") / args.manifest.stem
    prices = PriceTable.with_overrides(manifest.pricing)
    if args.max_cost is not None:
        unpriced = sorted({(j.model, price_key(j)) for j in manifest.jobs
                           if prices.job_price(j) is None})
        if unpriced:
            raise UsageError(
                "--max-cost needs a price for every job; none known for "
                + ", ".join(f"{m} {s}" for m, s in unpriced)
                + " (add them under pricing: in the manifest)"
            )
    check_ca_bundle(args.ca_bundle)
    prepare_output(root)
    # After the output folder exists, so the metrics file may live in it.
    # Each endpoint's label: its name, or the single endpoint's host.
    labels = {name: name or urlsplit(ep.base_url).hostname or ep.base_url
              for name, ep in endpoints.items()}
    metrics = metrics_file(args.metrics_file, root, labels, args.progress_interval)
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
    store = Checkpoint.open(root)
    # The manifest and checkpoint are live for the whole run; keep the cyclic
    # GC from walking 100,000 jobs over and over (it showed in profiles).
    gc.freeze()
    # Read even by a sync run: a job a live batch holds is not requested again.
    ledger = Ledger.open(root, writable=bool(batched))
    try:
        runner = None
        if batched:
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
        batch = batchcli.BatchPart(
            runner, [job for job in manifest.jobs if job.endpoint in batched], ledger)
        # With --batch-fallback sync a batch endpoint may also send jobs one by one.
        sync = {name: ep for name, ep in endpoints.items()
                if name not in batched or args.batch_fallback == "sync"}
        return asyncio.run(
            _run(manifest, root, store, routing.build_routes(sync, keys, settings),
                 engine_config, deadline, args.quiet, args.progress_interval,
                 not args.no_gallery, metrics, args.verify, batch)
        )
    finally:
        ledger.close()
        store.close()


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
    root: Path,
    store: Checkpoint,
    routes: dict[str, Route],
    engine_config: EngineConfig,
    deadline: float | None,
    quiet: bool = False,
    progress_interval_s: float = 30.0,
    gallery: bool = True,
    metrics: MetricsFile | None = None,
    verify: Verify = Verify.DECODE,
    batch: batchcli.BatchPart | None = None,
) -> int:
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
        todo = engine.plan([job for job in manifest.jobs if job.id not in held])
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
        if metrics is not None:
            await metrics.close(exit_code=code, jobs=counts)
        line = report.one_line(record, root / RESULTS)
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
        if gallery and not await _build_gallery_apart(root, quiet, signalled, limit):
            failures.append(f"the gallery was not rebuilt; try: imgbatch report {root}")
        for signum in EXIT_SIGNAL:
            loop.remove_signal_handler(signum)
        for extra in report.details(record):
            log.info("%s", extra)
        for failure in failures:
            log.error("%s; the checkpoint holds every finished job, re-run to resume", failure)
        if not quiet or code != EXIT_OK:
            print(f"imgbatch: {line}", file=sys.stderr)
    return code


def entry() -> None:
    """Console-script entry point: every failure becomes a message and an exit code."""
    try:
        code = main()
    except ImgbatchError as exc:
        print(f"imgbatch: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:  # a bug: say so plainly; results.jsonl was written on the way out
        inner: BaseException = exc
        while isinstance(inner, BaseExceptionGroup) and inner.exceptions:
            inner = inner.exceptions[0]
        print(
            f"imgbatch: internal error (a bug): {type(inner).__name__}: {inner}; the checkpoint "
            "is consistent, re-run the same command to resume (IMGBATCH_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        if os.environ.get("IMGBATCH_DEBUG"):
            traceback.print_exception(exc)
        code = EXIT_INTERNAL
    sys.exit(code)
