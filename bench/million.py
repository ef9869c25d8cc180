"""The million-job goal (issue 14): validate, plan and status of a 1,000,000-job catalog.

``setup`` writes, once per size, under ``--workdir`` (default bench/out/million):

* ``catalog-<N>.jsonl``: N jobs, prompts of 100-200 characters built from a
  product vocabulary, a few settings (aspect ratio, image size, some params;
  one job in ten has no id, so its id is derived from its content);
* ``out-<N>/``: an output folder where all but every ``--every``-th job is done:
  one 70-byte PNG per done job under images/, and the checkpoint written
  through the real store, ``Checkpoint.record`` with the states the engine
  records (fsynced once at the end instead of per group: the bytes on disk are
  the same, only the setup is faster).

Then every measurement is a child process, measured alone through ``os.wait4``
(wall time and its own peak RSS):

* ``validate``: ``imgbatch validate catalog.jsonl``;
* ``plan``: what ``imgbatch run`` does before its first request (load and
  validate the manifest, check capabilities, lock and open the checkpoint,
  plan), in a child running :func:`probe_plan`; it prints its phases;
* ``run``: the real ``imgbatch run --max-cost 0.000001 --no-gallery``: no
  job fits that budget, so the run stops before its first request, and
  writes results.jsonl for every job: the whole run path without the network;
* ``status``: ``imgbatch status out-<N>``.

``plan-cold`` is ``plan`` without the output folder's line memo (``batch.linememo``):
the first resume after an upgrade or a new ``--model``; it writes the memo ``plan`` uses.
The ``plan s`` column of ``run`` is the wall time from spawn until the run logged its plan.

    .venv/bin/python bench/million.py                   # 1,000,000 jobs, 990,000 done
    .venv/bin/python bench/million.py --before ../main  # and a checkout of main, side by side
    .venv/bin/python bench/million.py --only plan-cold,plan  # without and with the line memo
    .venv/bin/python bench/million.py --jobs 100000     # a tenth
    .venv/bin/python bench/million.py --only validate,plan
    .venv/bin/python bench/million.py --only plan,sqlite-plan,status,sqlite-status

``sqlite-plan`` and ``sqlite-status`` measure the alternative state store on the same
states: a SQLite table (WAL) keyed by job id, built once from the journal, the plan one
indexed ``SELECT`` per job (and the same stat of its image), status one ``GROUP BY``.

Goal: validate and plan (and status) each under 20 s and 250 MB peak RSS.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The tree measured: this one, or (--before) another checkout, e.g. of main.
TREE = Path(os.environ.get("IMGBATCH_BENCH_TREE", str(ROOT)))
sys.path.insert(0, str(TREE))

GOAL_S, GOAL_MB = 20.0, 250.0
COLORS = ("crimson", "teal", "ochre", "ivory", "slate grey", "coral", "olive green", "plum",
          "midnight blue", "sand")
THINGS = ("ceramic mug", "leather messenger bag", "desk lamp", "trail running shoe",
          "wool scarf", "hand-blown glass vase", "oak dining chair", "steel kettle",
          "linen cushion", "analog wristwatch", "porcelain teapot", "canvas backpack")
SCENES = ("on a seamless white background, soft studio light",
          "on a weathered wooden table by a sunny window",
          "in a minimalist Scandinavian living room, morning light",
          "on a marble kitchen counter with a few fresh herbs",
          "outdoors on a mossy rock, overcast diffuse light")
STYLES = ("50mm lens, f/2.8, shallow depth of field",
          "top-down flat lay, crisp shadows",
          "editorial product photograph, high detail",
          "three-quarter view, catalog style, neutral colors")
RATIOS = ("1:1", "4:3", "3:4", "16:9", "2:3")
SIZES = ("1K", "1K", "1K", "2K")


def catalog_line(i: int) -> str:
    """Job ``i`` of the catalog: ~100-200 characters of prompt and a few settings."""
    prompt = (f"A {COLORS[i % 10]} {THINGS[(i // 10) % 12]} {SCENES[(i // 120) % 5]}, "
              f"{STYLES[(i // 600) % 4]}, SKU {i * 7919 % 1_000_003:07d}")
    job: dict[str, object] = {"prompt": prompt}
    if i % 10:
        job["id"] = f"sku-{i:07d}"
    job["aspect_ratio"] = RATIOS[i % 5]
    if i % 3 == 0:
        job["image_size"] = SIZES[(i // 3) % 4]
    if i % 50 == 7:
        job["params"] = {"temperature": 0.7}
    return json.dumps(job) + "\n"


def tiny_png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(data, zlib.crc32(kind))
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x80\x00")) + chunk(b"IEND", b""))


def setup(workdir: Path, jobs: int, every: int) -> tuple[Path, Path]:
    """The catalog and the output folder for ``jobs`` (made once; reused after)."""
    catalog = workdir / f"catalog-{jobs}.jsonl"
    root = workdir / f"out-{jobs}"
    ready = root / ".bench-ready"
    if ready.exists() and catalog.exists():
        return catalog, root
    from batch.checkpoint import Checkpoint, JobState, fingerprint
    from batch.images import IMAGES_DIR
    from batch.jobs import ImageRecord, Status
    from batch.manifest import load_manifest

    t0 = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    with catalog.open("w", encoding="utf-8") as handle:
        for i in range(jobs):
            handle.write(catalog_line(i))
    png = tiny_png()
    digest = hashlib.sha256(png).hexdigest()
    (root / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    store = Checkpoint.open(root)
    done = 0
    try:
        for n, job in enumerate(load_manifest(catalog).jobs):
            if n % every == every - 1:
                continue  # left to do
            rel = f"{IMAGES_DIR}/{job.id}.png"
            fd = os.open(root / rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, png)
                mtime_ns = os.fstat(fd).st_mtime_ns
            finally:
                os.close(fd)
            state = JobState.from_record({
                "id": job.id, "fp": fingerprint(job), "status": Status.SUCCEEDED.value,
                "attempts": 1, "error": None,
                "images": [{**ImageRecord(rel, digest, len(png), "image/png", 1, 1).as_dict(),
                            "tmp": None, "mtime_ns": mtime_ns}],
                "usage": {"prompt_tokens": 30, "completion_tokens": 1400},
                "latency_s": 21.5, "text": None,
            })
            store.record(state, durable=False)
            done += 1
        store.record_run("bench-setup", jobs=jobs, done=done)  # durable: fsyncs the lot
    finally:
        store.close()
    ready.write_text(f"{jobs} jobs, {done} done, {time.perf_counter() - t0:.0f} s\n")
    print(f"setup: {jobs} jobs, {done} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return catalog, root


def probe_plan(catalog: Path, root: Path, cold: bool = False) -> None:
    """In a child: the steps of ``imgbatch run`` before its first request, timed by phase.

    ``cold``: without the line memo of an earlier run (the first resume after an upgrade
    or a change of --model), which this plan then writes."""
    if cold:
        (root / ".imgbatch" / "lines.memo").unlink(missing_ok=True)
    import argparse as ap

    from batch import routing, runcommand
    from batch.checkpoint import Checkpoint
    from batch.engine import Engine, EngineConfig
    from batch.progress import Observer

    # As `imgbatch run` loads it: with the output folder's line memo, where there is one.
    args = ap.Namespace(manifest=catalog, model=None, provider="chat", endpoint=None,
                        command="run", output=str(root), cluster=None)
    t0 = time.perf_counter()
    manifest = routing.load(args)
    runcommand.enforce_capabilities(manifest, "chat")
    t1 = time.perf_counter()
    peaks = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]
    store = Checkpoint.open(root)
    t2 = time.perf_counter()
    peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    try:
        engine = Engine(None, store, EngineConfig(), Observer())  # type: ignore[arg-type]
        todo = engine.plan(manifest.jobs)
    finally:
        store.close()
    t3 = time.perf_counter()
    peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    print(json.dumps({"load_s": round(t1 - t0, 2), "open_s": round(t2 - t1, 2),
                      "plan_s": round(t3 - t2, 2), "todo": len(todo),
                      "peak_mb": [round(p / 1024) for p in peaks]}), flush=True)


def build_sqlite(root: Path) -> Path:
    """The same states in SQLite (WAL), to measure the alternative: one row per job id with
    the columns a plan reads (fingerprint, status, attempts, images) and the full state."""
    import sqlite3

    db_path = root.parent / f"{root.name}.sqlite"
    if db_path.exists():
        return db_path
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, fp TEXT NOT NULL, status TEXT NOT NULL,"
               " attempts INTEGER NOT NULL, images TEXT, state TEXT NOT NULL)")
    db.execute("BEGIN")
    with (root / ".imgbatch" / "journal.jsonl").open("rb") as journal:
        for line in journal:
            record = json.loads(line)
            if "run" in record:
                continue
            images = json.dumps([[i["path"], i["bytes"], i["mtime_ns"]]
                                 for i in record.get("images") or []])
            db.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?)",
                       (record["id"], record["fp"], record["status"], record["attempts"],
                        images, line.decode()))
    db.execute("COMMIT")
    db.close()
    return db_path


def probe_sqlite(catalog: Path, root: Path, db_path: Path, what: str) -> None:
    """In a child: the plan (or status) of the same catalog against the SQLite store."""
    import sqlite3

    from batch.checkpoint import fingerprint
    from batch.images import file_matches
    from batch.manifest import load_manifest

    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    if what == "status":
        rows = db.execute("SELECT status, count(*), sum(attempts) FROM jobs GROUP BY status")
        print(json.dumps({status: n for status, n, _ in rows}))
        return
    t0 = time.perf_counter()
    manifest = load_manifest(catalog)
    t1 = time.perf_counter()
    base = f"{root}{os.sep}"
    todo = 0
    query = "SELECT fp, status, images FROM jobs WHERE id = ?"
    for job in manifest.jobs:
        row = db.execute(query, (job.id,)).fetchone()
        done = (row is not None and row[1] == "succeeded" and row[0] == fingerprint(job)
                and all(file_matches(base + p, b, m or -1) for p, b, m in json.loads(row[2])))
        todo += not done
    print(json.dumps({"load_s": round(t1 - t0, 2), "plan_s": round(time.perf_counter() - t1, 2),
                      "todo": todo}), flush=True)


PLANNED = b"already done"  # the run's log line once its plan is ready (batch.progress)


def measure(argv: list[str], env: dict[str, str], cwd: Path
            ) -> tuple[float, float, float, int, str, float | None]:
    """Wall and CPU (user+sys) seconds, peak RSS (MB) and exit code of one child, its
    last output line, and the wall seconds until it logged its plan (``run``). On a
    shared machine the CPU time is closer to what an idle one would take."""
    t0 = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env=env, cwd=cwd)
    assert child.stdout is not None
    planned = None
    lines = []
    for line in child.stdout:
        if planned is None and PLANNED in line:
            planned = time.perf_counter() - t0
        lines.append(line.decode("utf-8", "replace").strip())
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    lines = [line for line in lines if line]
    cpu = usage.ru_utime + usage.ru_stime
    return (wall, cpu, usage.ru_maxrss / 1024, child.returncode, lines[-1] if lines else "",
            planned)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--every", type=int, default=100, help="every N-th job is left to do")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "million")
    parser.add_argument("--only", default="validate,plan,run,status")
    parser.add_argument("--before", type=Path, help="another checkout (say, of main) "
                        "measured first on the same files, side by side")
    parser.add_argument("--probe-plan", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--setup-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe-sqlite", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_plan:
        probe_plan(*args.probe_plan, cold=args.cold)
        return 0
    if args.probe_sqlite:
        catalog_arg, root_arg, db_arg, what = args.probe_sqlite
        probe_sqlite(Path(catalog_arg), Path(root_arg), Path(db_arg), what)
        return 0
    if args.setup_only:
        setup(args.workdir, args.jobs, args.every)
        return 0
    # In a child: Linux counts a parent's peak RSS at fork into its children's peak.
    subprocess.run([sys.executable, __file__, "--setup-only", "--jobs", str(args.jobs),
                    "--every", str(args.every), "--workdir", str(args.workdir)], check=True)
    catalog = args.workdir / f"catalog-{args.jobs}.jsonl"
    root = args.workdir / f"out-{args.jobs}"
    if "sqlite" in args.only:  # the alternative store, built once from the same states
        subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                        "import million; million.build_sqlite(million.Path(sys.argv[2]))",
                        str(ROOT / "bench"), str(root)], check=True, cwd=ROOT)
    db = root.parent / f"{root.name}.sqlite"
    imgbatch = [sys.executable, "-m", "batch"]
    env = {**os.environ, "QINIU_API_KEY": "bench", "PYTHONPATH": str(ROOT)}
    commands = {
        "validate": [*imgbatch, "validate", str(catalog), "--quiet"],
        "plan": [sys.executable, __file__, "--probe-plan", str(catalog), str(root)],
        "plan-cold": [sys.executable, __file__, "--probe-plan", str(catalog), str(root),
                      "--cold"],
        "run": [*imgbatch, "run", str(catalog), "--output", str(root), "--max-cost",
                "0.000001", "--no-gallery", "--base-url", "http://127.0.0.1:9/v1"],
        "status": [*imgbatch, "status", str(root)],
        "sqlite-plan": [sys.executable, __file__, "--probe-sqlite", str(catalog), str(root),
                        str(db), "plan"],
        "sqlite-status": [sys.executable, __file__, "--probe-sqlite", str(catalog), str(root),
                          str(db), "status"],
    }
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.jobs} jobs, {args.jobs - args.jobs // args.every} done; this process "
          f"{own:.0f} MB; goal: under {GOAL_S:.0f} s and {GOAL_MB:.0f} MB", flush=True)
    trees = [("before", args.before.resolve())] if args.before else []
    trees.append(("after" if args.before else "this", ROOT))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          + ", ".join(f"{name}: {tree}" for name, tree in trees))
    print(f"| {'step':13} | {'tree':6} | {'wall s':>7} | {'CPU s':>7} | {'peak MB':>7} | "
          f"{'plan s':>6} | exit | last line")
    print(f"|{'-' * 15}|--------|{'-' * 9}|{'-' * 9}|{'-' * 9}|--------|------|----------")
    for name in args.only.split(","):
        for label, tree in trees:
            if label == "before" and name.startswith("sqlite"):
                continue
            tree_env = {**env, "PYTHONPATH": str(tree), "IMGBATCH_BENCH_TREE": str(tree)}
            wall, cpu, rss, code, last, planned = measure(commands[name], tree_env, tree)
            shown = f"{planned:6.1f}" if planned is not None else " " * 6
            print(f"| {name:13} | {label:6} | {wall:7.1f} | {cpu:7.1f} | {rss:7.0f} | {shown} | "
                  f"{code:4} | {last[:80]}", flush=True)
        print(f"  load average {os.getloadavg()[0]:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
