"""`make demo`: start the simulator on a free port, run jobs/example.yaml against it, stop it.

Images, results, the gallery and Prometheus metrics land in output/example/.
The simulator injects a few faults (rate limits, proxy errors, a reset) so the
log shows retries, draws each job's id and prompt on its picture, and refuses
the lighthouse prompt (a content-policy 400), so the results and the gallery
show a failure too; the catalog itself holds no job that fails on purpose.
Running it again resumes: nothing is re-sent.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFUSED = "lighthouse"  # the simulator refuses this prompt: the demo's failure


def main() -> int:
    simulator = subprocess.Popen(
        [sys.executable, "-m", "batch", "simulate", "--port", "0", "--latency", "0.3",
         "--fault-rate-limit", "0.1", "--fault-server-error-html", "0.1", "--fault-reset", "0.05",
         "--retry-after", "1", "--seed", "7", "--refuse-prompt", REFUSED],
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
             "--base-url", base_url, "--concurrency", "4",
             "--metrics-file", "output/example/metrics.prom"],
            cwd=ROOT, env=env,
        )
        for line in (
            f"imgbatch exited {code}; open output/example/index.html for the gallery "
            "(images/, results.jsonl and summary.json are beside it)",
            "each picture names its job; each file carries its provenance: "
            ".venv/bin/imgbatch inspect output/example/images/orange-cat.png",
            "Prometheus metrics for alerting: output/example/metrics.prom "
            "(README: Metrics and alerts)",
        ):
            print(f"demo: {line}", file=sys.stderr)
        if code == 1:
            print(f"demo: exit 1 means some jobs failed or are pending: here the simulator "
                  f"refused the {REFUSED} prompt, on purpose (--refuse-prompt)", file=sys.stderr)
            return 0
        return code
    finally:
        simulator.terminate()
        simulator.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
