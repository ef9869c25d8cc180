"""kill -9 at random instants, many times over one batch, then resume.

After every kill: no broken file under a final name, and every job the
journal calls succeeded has its image on disk, byte for byte (or the complete
temporary file the next run will rename). At the end: every image intact
and made for its own job, and no more requests than the jobs plus those in
flight at the kills. The judges are Pillow, hashes computed here, the journal
read as JSON lines and the simulator's tag (tests/oracles.py), never the
code's own probe or checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from tests.conftest import ROOT, cli_env, imgbatch_argv, read_results, run_args, run_cli, simulator
from tests.oracles import Decoded, check_recorded_images, journal
from tests.test_e2e import catalog, check_outputs

KILLS = int(os.environ.get("IMGBATCH_CRASH_KILLS", "20"))
JOBS = 150
CONCURRENCY = 6


def prompts_of(manifest: Path) -> dict[str, str]:
    return {job["id"]: job["prompt"] for job in map(json.loads, manifest.read_text().splitlines())}


def started(out: Path, pid: int) -> bool:
    return any(record.get("pid") == pid for record in journal(out)[1])


def wait_for(
    condition: Callable[[], bool], timeout_s: float, run: subprocess.Popen[bytes] | None = None
) -> bool:
    """Poll ``condition`` (a fact another process changes) until it holds, or ``run`` ended."""
    deadline = time.monotonic() + timeout_s
    while (run is None or run.poll() is None) and not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


def all_gone(pids: list[int]) -> bool:
    """Whether none of ``pids`` is still a live process (zombies count as gone)."""
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if state != "Z":
            return False
    return True


def temporaries(out: Path) -> bool:
    folder = out / "images"
    return folder.is_dir() and any(p.name.endswith(".tmp") for p in folder.iterdir())


def test_kill_9_many_times_then_resume(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("IMGBATCH_CRASH_SEED", "1")))
    manifest = catalog(JOBS, tmp_path / "crash.jsonl")
    prompts = prompts_of(manifest)
    out = tmp_path / "out"
    argv = imgbatch_argv(
        "run", str(manifest), "--output", str(out), "--concurrency", str(CONCURRENCY)
    )
    kills = 0
    decoded: Decoded = {}  # images already judged by Pillow, by sha256
    during_writes = 0
    orphans_checked = 0
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
            # Instants are counted from the run being under way (its own start record in
            # the journal), so a slow machine does not turn every kill into one at start-up.
            # Half the kills then wait for an image being written; the rest come at random.
            assert wait_for(partial(started, out, run.pid), 60, run)
            if kills % 2 == 0:
                wait_for(partial(temporaries, out), 30, run)
            else:
                time.sleep(rng.uniform(0.0, 0.8))
            if run.poll() is not None:
                break  # the batch finished before we could kill it again
            during_writes += temporaries(out)
            kids = children(run.pid)
            run.send_signal(signal.SIGKILL)
            run.wait()
            # Its decode child (and multiprocessing's tracker) must not outlive it.
            assert wait_for(partial(all_gone, kids), 10), f"left running: {kids}"
            orphans_checked += len(kids)
            kills += 1
            check_recorded_images(out, prompts, decoded)
        final = run_cli(
            *run_args(manifest, out, sim),
            "--concurrency",
            str(CONCURRENCY),
        )
        stats = sim.stats()
    print(f"kills={kills} during_writes={during_writes} requests={stats['requests']} "
          f"children={orphans_checked}")
    assert final.returncode == 0, final.stderr
    assert kills >= min(KILLS, 10), "the batch finished too fast to be killed enough"
    assert during_writes >= 1
    rows = read_results(out)
    check_outputs(out, rows, scaled=0.25)
    assert check_recorded_images(out, prompts) == JOBS
    # Each kill can waste what was answered but not yet recorded: the requests in flight
    # and the answers queued for the group commit, at most one per worker (2 per slot).
    assert stats["requests"] <= JOBS + kills * 2 * CONCURRENCY
    # Every request the server saw was counted in the checkpoint (none unaccounted).
    assert stats["requests"] <= sum(r["attempts"] for r in rows)
    assert not temporaries(out)
