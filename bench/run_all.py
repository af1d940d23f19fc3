"""`make bench`: run every benchmark and rewrite its section of BENCHMARKS.md.

Each benchmark is a module with ``run(url, quick) -> str`` (the section's markdown) and a ``## ``
title listed in `BENCHMARKS`. To add one, write the module and add it to `BENCHMARKS`;
`replace_section` keeps every other section of the file as it is. A section is written as soon as it
is measured, so an interrupted run keeps what it finished. A benchmark that fails does not stop the
others: its section is left as it was, and the run exits 1 at the end. Every run also rewrites the
"Last run" section: per benchmark its status, wall time and the load average before and after,
and the commit measured, so which sections this run re-measured is on the page.
``--only codec,tta`` runs a subset (by short name).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import BENCHMARKS as OUT
from bench.common import git_commit, load_average, replace_section, table
from fedmq.shared.broker import DEFAULT_URL, Connection
from fedmq.shared.errors import FedmqError
from fedmq.shared.logs import configure_logging

log = logging.getLogger(__name__)

#: short name -> (module, title); the order is the order they run in
BENCHMARKS: dict[str, tuple[str, str]] = {
    "codec": ("bench.codec", "Codec"),
    "aggregator": ("bench.aggregator", "Aggregator throughput"),
    "overhead": ("bench.overhead", "Per-version overhead"),
    "tta": ("bench.time_to_accuracy", "Time to accuracy"),
    "fedeval": ("bench.fedeval", "Federated evaluation"),
    "he": ("bench.he_bench", "Homomorphic aggregation"),
    "he_tta": ("bench.he_tta", "Homomorphic aggregation: time to accuracy"),
    "dp": ("bench.dp_bench", "Differential privacy"),
    "replay": ("bench.replay_bench", "Replay"),
    "ops": ("bench.ops_bench", "Operator commands on a long job"),
    "flood": ("bench.flood", "Flood from one site"),
    "site_queues": ("bench.site_queues", "Per-site updates queues"),
    "byzantine": ("bench.byzantine", "Byzantine robustness"),
    "many_jobs": ("bench.many_jobs", "Many jobs on one broker"),
    "fleet": ("bench.fleet", "Fleet"),
    "compression": ("bench.compression", "Update compression"),
    "large_models": ("bench.large_models", "Large models"),
}
RUN_TITLE = "Last run"


@dataclass(frozen=True)
class Outcome:
    name: str
    status: str  # "measured" or "failed: <error>"
    seconds: float
    load_start: tuple[float, float, float]
    load_end: tuple[float, float, float]


def _run(module: str, url: str, quick: bool) -> str:
    body: str = importlib.import_module(module).run(url, quick=quick)
    return body


def measure(name: str, url: str, quick: bool, path: Path = OUT) -> Outcome:
    """Run one benchmark and write its section of `path`; a failure is recorded, not raised."""
    module, title = BENCHMARKS[name]
    load_start, t0 = load_average(), time.perf_counter()
    try:
        body = _run(module, url, quick)
    except Exception as exc:  # any benchmark bug: the others still run, the exit status says so
        log.exception("benchmark failed name=%s", name)
        status = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
    except SystemExit as exc:  # benchmarks that give up with SystemExit(message)
        status = f"failed: {exc.code}"
    else:
        replace_section(title, body, path)
        status = "measured"
    return Outcome(name, status, time.perf_counter() - t0, load_start, load_average())


def run_section(outcomes: list[Outcome], *, quick: bool, commit: str, started: str, previous: str = "") -> str:
    """The "Last run" section: per benchmark, when and at which commit it was last measured, how
    long it took and under what load. Rows of benchmarks this run did not measure are kept from
    `previous` (the section as it was), so a run of `--only` a few does not erase the others'."""
    def fmt(load: tuple[float, float, float]) -> str:
        return " / ".join(f"{x:.2f}" for x in load)

    when = f"{started}, commit {commit}{', --quick' if quick else ''}"
    rows = {o.name: [f"{BENCHMARKS[o.name][1]} (`{o.name}`)", o.status, f"{o.seconds:.0f} s", fmt(o.load_start),
                     fmt(o.load_end), when] for o in outcomes}
    for line in previous.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = re.search(r"\(`(\w+)`\)", cells[0]) if len(cells) == 6 else None
        if name and name.group(1) in BENCHMARKS and name.group(1) not in rows:
            rows[name.group(1)] = cells
    skipped = [n for n in BENCHMARKS if n not in rows]
    lines = [
        f"_On {os.cpu_count()} cores; the latest `python -m bench.run_all` started {started}. Each row says when "
        "its benchmark was last measured; load average 1/5/15 min before and after it._",
        table(["section", "status", "wall", "load before", "load after", "when"],
              [rows[n] for n in BENCHMARKS if n in rows]),
    ]
    if skipped:
        lines.append("Not measured by any run recorded here (their sections, if any, say when): "
                     + ", ".join(f"`{n}`" for n in skipped) + ".")
    return "\n\n".join(lines)


def _section(title: str, path: Path = OUT) -> str:
    """The body of ``## title`` in `path` ("" when absent)."""
    text = path.read_text() if path.exists() else ""
    m = re.search(rf"^## {re.escape(title)}[ \t]*\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    return m.group(1) if m else ""


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
    started, commit = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), git_commit()
    outcomes: list[Outcome] = []
    previous = _section(RUN_TITLE)
    for name in chosen:
        title = BENCHMARKS[name][1]
        print(f"bench: {title} ...", file=sys.stderr, flush=True)
        outcomes.append(measure(name, args.broker, args.quick))
        replace_section(RUN_TITLE, run_section(outcomes, quick=args.quick, commit=commit, started=started,
                                               previous=previous))
        print(f"bench: {title} {outcomes[-1].status} in {outcomes[-1].seconds:.0f} s -> {OUT.name}",
              file=sys.stderr, flush=True)
    return 0 if all(o.status == "measured" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
