"""`make bench`: run every benchmark and rewrite its section of BENCHMARKS.md.

Each benchmark is a module with ``run(url, quick) -> str`` (the section's markdown) and a ``## ``
title listed in `BENCHMARKS`. To add one, write the module and add it to `BENCHMARKS`;
`replace_section` keeps every other section of the file as it is. A section is written as soon as it is measured, so
an interrupted run keeps what it finished. ``--only codec,tta`` runs a subset (by short name).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

from bench.common import BENCHMARKS as OUT
from bench.common import replace_section
from shared.broker import DEFAULT_URL, Connection
from shared.errors import FedmqError
from shared.logs import configure_logging

#: short name -> (module, title); the order is the order they run in
BENCHMARKS: dict[str, tuple[str, str]] = {
    "codec": ("bench.codec", "Codec"),
    "aggregator": ("bench.aggregator", "Aggregator throughput"),
    "overhead": ("bench.overhead", "Per-version overhead"),
    "tta": ("bench.time_to_accuracy", "Time to accuracy"),
    "he": ("bench.he_bench", "Homomorphic aggregation"),
    "he_tta": ("bench.he_tta", "Homomorphic aggregation: time to accuracy"),
    "dp": ("bench.dp_bench", "Differential privacy"),
    "replay": ("bench.replay_bench", "Replay"),
    "flood": ("bench.flood", "Flood from one site"),
    "byzantine": ("bench.byzantine", "Byzantine robustness"),
}


def _run(module: str, url: str, quick: bool) -> str:
    body: str = importlib.import_module(module).run(url, quick=quick)
    return body


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.splitlines()[0])
    p.add_argument("--broker", default=os.environ.get("FEDMQ_BROKER_URL", DEFAULT_URL))
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    p.add_argument("--quick", action="store_true", help="fewer repeats and messages (a smoke run)")
    args = p.parse_args(argv)
    configure_logging("warning")
    chosen = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in chosen if n not in BENCHMARKS]
    if unknown:
        print(f"bench: unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}", file=sys.stderr)
        return 2
    if any(n != "codec" for n in chosen):
        try:
            Connection(args.broker, name="fedmq-bench-check").open().close()
        except FedmqError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return exc.exit_code
    for name in chosen:
        module, title = BENCHMARKS[name]
        print(f"bench: {title} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        body = _run(module, args.broker, args.quick)
        replace_section(title, body)
        print(f"bench: {title} done in {time.perf_counter() - t0:.0f} s -> {OUT.name}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
