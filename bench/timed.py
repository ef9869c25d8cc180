"""Run a command and write its own wall time, CPU time and peak RSS to a JSON file.

    python bench/timed.py RESULT.json -- COMMAND [ARG...]

Why a wrapper: Linux carries the peak RSS of the process that spawns a child
into the child's ``ru_maxrss`` (exec keeps the old address space's high-water
mark), so a child of the benchmark's orchestrator, which has read large images,
would report the orchestrator's peak. This small, fresh interpreter is the
parent instead: the floor it adds (a bare interpreter, ~10 MB) is below any
client's own peak. The child keeps this process's stdin/stdout/stderr; the exit
code is the child's (128 + N if a signal N ended it).
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> int:
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    result, argv = sys.argv[1], sys.argv[3:]
    started = time.perf_counter()
    pid = os.posix_spawnp(argv[0], argv, os.environ)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    with open(result, "w", encoding="utf-8") as handle:
        json.dump({"wall_s": wall, "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
                   "maxrss_kb": usage.ru_maxrss, "rc": code}, handle)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
