"""`make demo`: start the simulator on a free port, run jobs/example.yaml against it, stop it.

Images, results and the gallery land in output/example/. The simulator
injects a few faults (rate limits, proxy errors, a reset) so the log shows
retries; one job of the example is refused by the gateway, so the results and
the gallery show a failure too. Running it again resumes: nothing is re-sent.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    simulator = subprocess.Popen(
        [sys.executable, "-m", "batch", "simulate", "--port", "0", "--latency", "0.3",
         "--fault-rate-limit", "0.1", "--fault-server-error-html", "0.1", "--fault-reset", "0.05",
         "--retry-after", "1", "--seed", "7"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        assert simulator.stdout is not None
        line = simulator.stdout.readline()
        match = re.search(r"(http://\S+)", line)
        if match is None:
            print(f"demo: the simulator did not start: {line!r}", file=sys.stderr)
            return 1
        base_url = match.group(1)
        print(f"demo: simulator at {base_url}", file=sys.stderr)
        env = {**os.environ, "QINIU_API_KEY": "demo-key-not-secret"}
        code = subprocess.call(
            [sys.executable, "-m", "batch", "run", "jobs/example.yaml",
             "--base-url", base_url, "--concurrency", "4"],
            cwd=ROOT, env=env,
        )
        print(f"demo: imgbatch exited {code}; open output/example/index.html for the gallery "
              "(images/, results.jsonl and summary.json are beside it)", file=sys.stderr)
        if code == 1:
            # jobs/example.yaml holds one job the gateway refuses, to show a failure.
            print("demo: exit 1 means some jobs failed or are pending: here the "
                  "flash-4k-refused job, on purpose", file=sys.stderr)
            return 0
        return code
    finally:
        simulator.terminate()
        simulator.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
