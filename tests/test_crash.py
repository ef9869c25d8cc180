"""kill -9 at random instants, many times over one batch, then resume.

After every kill: no broken file under a final name, and every job the
journal calls succeeded has its verified image on disk (or the complete
temporary file the next run will rename). At the end: every image intact
and made for its own job, and no more requests than the jobs plus those in
flight at the kills.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import time
from pathlib import Path

from batch.checkpoint import Checkpoint
from batch.imageinfo import probe
from batch.jobs import Status
from tests.conftest import ROOT, cli_env, imgbatch_argv, read_results, run_args, run_cli, simulator
from tests.test_e2e import catalog, check_outputs

KILLS = int(os.environ.get("IMGBATCH_CRASH_KILLS", "20"))
JOBS = 150
CONCURRENCY = 6


def final_images(out: Path) -> list[Path]:
    folder = out / "images"
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if not p.name.startswith(".")]


def check_after_kill(out: Path) -> None:
    for path in final_images(out):
        probe(path.read_bytes(), max_pixels=1 << 30)  # raises if broken
    store = Checkpoint.read(out)
    for state in store.states.values():
        if state.status is not Status.SUCCEEDED:
            continue
        for image, meta in zip(state.images, state.image_meta, strict=True):
            candidates = [out / image.path, out / str(meta.tmp)]
            hashes = {hashlib.sha256(p.read_bytes()).hexdigest() for p in candidates if p.exists()}
            assert image.sha256 in hashes, f"{state.id}: recorded image lost"


def temporaries(out: Path) -> bool:
    folder = out / "images"
    return folder.is_dir() and any(p.name.endswith(".tmp") for p in folder.iterdir())


def test_kill_9_many_times_then_resume(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("IMGBATCH_CRASH_SEED", "1")))
    manifest = catalog(JOBS, tmp_path / "crash.jsonl")
    out = tmp_path / "out"
    argv = imgbatch_argv(
        "run", str(manifest), "--output", str(out), "--concurrency", str(CONCURRENCY)
    )
    kills = 0
    during_writes = 0
    with simulator(
        "--scale",
        "0.25",
        "--payload-bytes",
        "600000",
        "--latency",
        "0.05",
        "--latency-jitter",
        "0.2",
        "--seed",
        "5",
    ) as sim:
        argv += ["--base-url", sim.url]
        while kills < KILLS:
            run = subprocess.Popen(argv, cwd=ROOT, env=cli_env(), stderr=subprocess.DEVNULL)
            # The instant is random; half the kills wait for an image being written.
            deadline = time.monotonic() + rng.uniform(0.3, 1.2)
            want_write = kills % 2 == 0
            while time.monotonic() < deadline and run.poll() is None:
                if want_write and temporaries(out) and time.monotonic() > deadline - 0.6:
                    during_writes += 1
                    break
                time.sleep(0.002)
            if run.poll() is not None:
                break  # the batch finished before we could kill it again
            run.send_signal(signal.SIGKILL)
            run.wait()
            kills += 1
            check_after_kill(out)
        final = run_cli(
            *run_args(manifest, out, sim),
            "--concurrency",
            str(CONCURRENCY),
        )
        stats = sim.stats()
    print(f"kills={kills} during_writes={during_writes} requests={stats['requests']}")
    assert final.returncode == 0, final.stderr
    assert kills >= min(KILLS, 10), "the batch finished too fast to be killed enough"
    assert during_writes >= 1
    rows = read_results(out)
    check_outputs(out, rows, scaled=0.25)
    # Each kill can waste at most the requests in flight at that instant.
    assert stats["requests"] <= JOBS + kills * CONCURRENCY
    # Every request the server saw was counted in the checkpoint (none unaccounted).
    assert stats["requests"] <= sum(r["attempts"] for r in rows)
    assert not temporaries(out)
