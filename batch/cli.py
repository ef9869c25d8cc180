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
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from batch import __version__, report, routing
from batch.checkpoint import STATE_DIR, Checkpoint
from batch.cost import PriceTable, estimate_weighted
from batch.errors import (
    ImgbatchError,
    LockHeld,
    ManifestError,
    OutputError,
    StorageError,
    UsageError,
)
from batch.imagecheck import Verify
from batch.manifestjobs import summarize
from batch.progress import setup_logging
from batch.runcommand import (  # the exit codes are the CLI's contract; they live with run
    EXIT_INCOMPLETE,
    EXIT_INTERNAL,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_USAGE,
    cmd_run,
    enforce_capabilities,
)
from batch.runners import batchcli
from batch.sim import config as simconfig
from batch.storage import outputs

log = logging.getLogger("batch")



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgbatch",
        description="Turn a catalog of prompts into images through a paid generative API.",
    )
    parser.add_argument("--version", action="version", version=f"imgbatch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="generate every job of a manifest (re-run to resume)")
    run.add_argument("manifest", type=Path)
    run.add_argument("--output", help="output folder, or s3://bucket/prefix "
                     "(default output/<manifest name>)")
    _add_s3(run)
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
    run.add_argument("--cluster", default=None, metavar="ray|ray://HOST:PORT|local-ray",
                     help="run shards of the catalog on a Ray cluster (pip install "
                     "'imgbatch[ray]'); keys are read from the workers' environment")
    run.add_argument("--shard-size", type=_positive_int, default=300, metavar="N",
                     help="with --cluster: jobs per shard task")
    run.add_argument("--max-shards", type=_positive_int, default=None, metavar="N",
                     help="with --cluster: shard tasks kept busy (default: one per node)")
    batchcli.add_arguments(run)
    _add_logging(run)

    validate = commands.add_parser("validate", help="check a manifest and print the plan")
    validate.add_argument("manifest", type=Path)
    routing.add_arguments(validate, run=False)
    _add_logging(validate)

    status = commands.add_parser("status", help="what an output folder holds (no network)")
    status.add_argument("output", help="output folder or s3://bucket/prefix")
    _add_s3(status)
    _add_logging(status)

    cancel = commands.add_parser("cancel", help="cancel the open provider batches of DIR "
                                 "(the next run collects what they finished)")
    cancel.add_argument("output", type=Path)
    _add_logging(cancel)

    report_cmd = commands.add_parser("report", help="rebuild DIR/index.html, the gallery")
    report_cmd.add_argument("output", help="output folder or s3://bucket/prefix")
    _add_s3(report_cmd)
    _add_logging(report_cmd)

    inspect = commands.add_parser("inspect", help="what an image says about itself")
    inspect.add_argument("image", type=Path)
    inspect.add_argument("--json", action="store_true", help="one JSON object")
    _add_logging(inspect)

    simulate = commands.add_parser("simulate", help="run the local gateway simulator")
    simconfig.add_arguments(simulate)
    _add_logging(simulate)
    return parser


def _add_s3(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--s3-endpoint", default=None, metavar="URL",
                        help="S3-compatible endpoint for s3:// outputs (default "
                        "AWS_ENDPOINT_URL, else AWS); http:// allowed")


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
    plan = summarize(manifest.jobs)
    print(f"{args.manifest}: valid, {plan['jobs']} job(s)")
    for key, value in plan.items():
        if key != "jobs":
            print(f"  {key}: {json.dumps(value, ensure_ascii=False)}")
    prices = PriceTable.with_overrides(manifest.pricing)
    for line in routing.plan_lines(manifest, prices, args.provider):
        print(line)
    shapes = manifest.jobs.shapes.weighted()  # a million jobs are a few shapes
    total, unknown = estimate_weighted(shapes, prices)
    note = f" (+{unknown} job(s) of unknown price)" if unknown else ""
    from batch.runners.batchplan import estimate_batch

    batch_total = sum(estimate_batch([job], prices)[0] * n for job, n in shapes)
    print(f"  estimated cost: ${total:.2f} sync, ${batch_total:.2f} at the batch rate, "
          f"for one image per job{note}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    if outputs.is_s3_url(args.output):
        store = outputs.read_s3(args.output, args.s3_endpoint)
        try:
            if not store.states and not store.runs:
                raise UsageError(f"{args.output} holds no imgbatch checkpoint")
            print("\n".join(report.status_lines(store.root, store, shown=args.output)))
        finally:
            store.close()
        return EXIT_OK
    root = Path(args.output)
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

    where: Path | str
    if outputs.is_s3_url(args.output):
        stats = outputs.build_s3_gallery(args.output, args.s3_endpoint)
        where = f"{args.output.rstrip('/')}/index.html"
    else:
        stats = build_gallery(Path(args.output))
        where = stats.path
    print(f"{where}: {stats.images} image(s), {stats.failed_jobs} failed and "
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
