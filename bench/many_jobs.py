"""Many jobs on one broker: N concurrent `fedmq demo` jobs (each its own coordinator, aggregator
and sites, real processes, a logistic regression on synthetic data) against one job alone in the
same run; then `fedmq jobs` must list every one as finished and `fedmq delete` removes them.

`python -m bench.many_jobs [--jobs 20]` prints the section; `make bench` writes it to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from bench.common import fmt_seconds, load_average, run_group, table
from fedmq.jobs import FINISHED, delete_job, job_info
from fedmq.shared.broker import DEFAULT_URL

TITLE = "Many jobs on one broker"
VERSIONS = 5


def _demo(url: str, job: str, timeout: float) -> dict[str, object]:
    cmd = [sys.executable, "-m", "fedmq", "demo", "--broker", url, "--job", job, "--json",
           "--dataset", "synthetic", "--model", "logreg", "--sites", "2", "--slow", "0",
           "--max-versions", str(VERSIONS), "--log-level", "warning"]
    t0 = time.monotonic()
    proc = run_group(cmd, timeout=timeout)
    took = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"demo {job} exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    out: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["seconds"] = took
    return out


def run(url: str = DEFAULT_URL, quick: bool = False, jobs: int | None = None) -> str:
    n = jobs or (5 if quick else 20)
    prefix = f"many-{uuid.uuid4().hex[:6]}"
    alone = _demo(url, f"{prefix}-alone", 300)
    load0 = load_average()
    t0 = time.monotonic()
    ids = [f"{prefix}-{i:02d}" for i in range(n)]
    with ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(lambda j: _demo(url, j, 900), ids))
    wall = time.monotonic() - t0
    load1 = load_average()
    states = {j: job_info(url, j).state for j in [f"{prefix}-alone", *ids]}
    if any(s != FINISHED for s in states.values()):
        raise RuntimeError(f"not every job finished: {states}")
    for j in states:
        delete_job(url, j)
    per = sorted(float(str(r["seconds"])) for r in results)
    base = float(str(alone["seconds"]))
    rows = [["1 (alone)", fmt_seconds(base), "-", "1.00"],
            [f"{n} concurrent", fmt_seconds(per[len(per) // 2]), fmt_seconds(per[-1]),
             f"{per[len(per) // 2] / base:.2f}"]]
    return (f"{n} concurrent `fedmq demo` jobs (coordinator, aggregator, 2 sites each: "
            f"{n * 4} role processes), logistic regression on synthetic data, {VERSIONS} versions each, "
            "one broker. Per-job time = the whole demo command (process start-up to stop).\n\n"
            + table(["jobs", "per-job median", "per-job max", "median / alone"], rows)
            + f"\n\nWall time for all {n}: {fmt_seconds(wall)}; every job listed `finished` by "
            f"`fedmq jobs` and removed by `fedmq delete`. Load average {load0[0]:.1f} before, "
            f"{load1[0]:.1f} after.\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--broker", default=DEFAULT_URL)
    ap.add_argument("--jobs", type=int, default=20)
    args = ap.parse_args()
    print(run(args.broker, jobs=args.jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
