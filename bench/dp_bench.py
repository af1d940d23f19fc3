"""Differential privacy: time-to-accuracy on digits with DP at epsilon 1, 4 and 8 against no DP.

Each configuration is one `fedmq demo --json` job (real processes on the broker: coordinator, one
aggregator, 8 sites of which 2 are 5x slower, FedBuff K=3, MLP, Dirichlet(0.5) partition, the
same seed). The demo stops at 90 % test accuracy, when every site that trained has spent its
budget (``privacy_budget``), or after ``--max-seconds``. From the job's streams the benchmark reads
the accuracy curve (coordinator's evaluation of every version), the stop reason and the sites'
training seconds per task; the job is deleted afterwards.

Usage: ``python -m bench.dp_bench [--only none,sgd-8,...] [--max-seconds 300] [--no-write]``.
The last stdout line is one JSON object with every figure (curves included); the table goes to
stderr and, unless ``--no-write``, into the "Differential privacy" section of BENCHMARKS.md.
``--from-json FILE`` renders (and writes) a saved run again without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any

from bench.common import Machine, replace_section, run_group, table
from fedmq.shared.broker import DEFAULT_URL, Connection, JobNames, read_stream
from fedmq.shared.errors import MalformedMessageError
from fedmq.shared.messages import Event, EventKind, Update

THRESHOLDS = (0.5, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class Setting:
    name: str
    label: str
    args: tuple[str, ...]


SETTINGS = [
    Setting("none", "no DP", ()),
    Setting("sgd-8", "DP-SGD, epsilon 8", ("--privacy", "dp", "--dp", "sgd", "--epsilon", "8")),
    Setting("sgd-4", "DP-SGD, epsilon 4", ("--privacy", "dp", "--dp", "sgd", "--epsilon", "4")),
    Setting("sgd-1", "DP-SGD, epsilon 1", ("--privacy", "dp", "--dp", "sgd", "--epsilon", "1")),
    Setting("sgd-4-all", "DP-SGD, epsilon 4, until every site is spent",
            ("--privacy", "dp", "--dp", "sgd", "--epsilon", "4", "--stop-when-spent", "1")),
    Setting("local-4", "DP-FedAvg local noise, epsilon 4",
            ("--privacy", "dp", "--dp", "fedavg-local", "--epsilon", "4")),
    Setting("central-4", "DP-FedAvg central noise, epsilon 4",
            ("--privacy", "dp", "--dp", "fedavg-central", "--epsilon", "4")),
]


def run_setting(url: str, s: Setting, max_seconds: float) -> dict[str, Any]:
    job = f"bench-dp-{s.name}-{uuid.uuid4().hex[:6]}"
    work = tempfile.mkdtemp(prefix=f"fedmq-{job}-")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("FEDMQ_DP_NOISE_KEY_FILE", None)  # the demo writes one into its workdir
    cmd = [sys.executable, "-m", "fedmq", "demo", "--json", "--broker", url, "--job", job, "--workdir", work,
           "--target", "0.9", "--max-seconds", str(max_seconds), *s.args]
    t0 = time.time()
    try:  # the job is deleted whatever happens, and a timeout kills the demo's whole process group
        out = run_group(cmd, env=env, timeout=max_seconds + 300)
        if out.returncode != 0:
            raise SystemExit(f"bench: {s.name} failed ({out.returncode}): {out.stderr.strip()[-800:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        return {"setting": s.name, "label": s.label, "demo": result, "total_seconds": time.time() - t0,
                **_from_streams(url, job)}
    finally:
        with Connection(url, name="fedmq-bench-cleanup").open() as conn:
            conn.delete_job(JobNames(job))


def _from_streams(url: str, job: str) -> dict[str, Any]:
    names = JobNames(job)
    curve: list[tuple[int, float, float]] = []
    stop_reason = None
    for d in read_stream(url, names.events, "first", idle=0.5):
        try:
            ev = Event.decode(d.body)
        except MalformedMessageError:
            continue
        if ev.event == EventKind.VERSION_EVALUATED:
            curve.append((int(ev.data["version"]), float(ev.data["t"]), float(ev.data["accuracy"])))
        elif ev.event == EventKind.JOB_FINISHED:
            stop_reason = ev.data.get("stop_reason")
    train = []
    for d in read_stream(url, names.updates_log, "first", idle=0.5):
        try:
            train.append(float(Update.decode(d.body).metrics["train_seconds"]))
        except (MalformedMessageError, KeyError, TypeError, ValueError):
            continue
    return {"curve": curve, "stop_reason": stop_reason,
            "best_accuracy": max((a for _, _, a in curve), default=None),
            "train_seconds_median": statistics.median(train) if train else None, "updates_logged": len(train)}


def seconds_to(curve: list[list[float]], threshold: float) -> float | None:
    """Seconds from job start to the first evaluated version at or above `threshold`."""
    return next((float(t) for _, t, a in curve if a >= threshold), None)


def _fmt_t(t: float | None) -> str:
    return "not reached" if t is None else f"{t:.1f} s"


def render(runs: list[dict[str, Any]]) -> str:
    header = ["setting", "epsilon spent", *(f"t to {th:.2f}" for th in THRESHOLDS), "best acc", "final acc",
              "versions", "updates", "stop", "train s/task (median)"]
    rows = []
    for r in runs:
        d = r["demo"]
        eps = d.get("epsilon")
        rows.append([r["label"], "—" if eps is None else f"{eps:.2f}",
                     *(_fmt_t(seconds_to(r["curve"], th)) for th in THRESHOLDS),
                     f"{r['best_accuracy']:.3f}" if r["best_accuracy"] is not None else "—",
                     f"{d['final_accuracy']:.3f}", str(d["versions"]), str(d["updates_applied"]),
                     str(r["stop_reason"]),
                     "—" if r["train_seconds_median"] is None else f"{r['train_seconds_median'] * 1e3:.0f} ms"])
    return table(header, rows)


METHOD = """`python -m bench.dp_bench` (bench/dp_bench.py): one `fedmq demo --json` job per row, all with
the demo's defaults (digits, 8 sites, Dirichlet 0.5, 2 sites 5x slower, FedBuff K=3, MLP 4,810
parameters, batch 16, lr 0.1, 1 local epoch, seed 0), target 90 % test accuracy. DP rows add
`--privacy dp --dp {sgd,fedavg-local,fedavg-central} --epsilon E` (delta 1e-5, per-site budget
calibrated to last 20 tasks: `--planned-tasks 20`; the job ends when half of the sites that
trained have spent their budget, `--stop-when-spent 0.5`, unless the row says otherwise).
Times are seconds from job start to the first version the coordinator evaluated at or above the
threshold; "epsilon spent" is the worst site's
(DP-SGD and local noise: the sites' own ledgers; central noise: the aggregator's account of the
released versions). One run per row on a shared machine: the accuracies are what the noise
costs, the times are indicative only."""


def run(url: str, quick: bool = False) -> str:
    """`make bench` (bench.run_all): every setting (quick: no DP and DP-SGD at epsilon 4 only)."""
    chosen = [s for s in SETTINGS if not quick or s.name in ("none", "sgd-4")]
    machine = Machine()
    runs = [run_setting(url, s, 120.0 if quick else 300.0) for s in chosen]
    return f"{METHOD}\n\n{machine.note().markdown()}\n\n{render(runs)}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--broker", default=os.environ.get("FEDMQ_BROKER_URL", DEFAULT_URL))
    p.add_argument("--only", default="", help="comma-separated setting names (default: all)")
    p.add_argument("--max-seconds", type=float, default=300.0)
    p.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    p.add_argument("--from-json", help="a saved run (this script's stdout): render it, run nothing")
    args = p.parse_args(argv)
    if args.from_json:
        saved = json.loads(open(args.from_json).read().strip().splitlines()[-1])
        body = f"{METHOD}\n\n{saved['machine']}\n\n{render(saved['runs'])}"
        print(body, file=sys.stderr)
        if not args.no_write:
            replace_section("Differential privacy", body)
        return 0
    chosen = [s for s in SETTINGS if not args.only or s.name in args.only.split(",")]
    machine = Machine()
    runs = []
    for s in chosen:
        print(f"bench: {s.label} ...", file=sys.stderr, flush=True)
        runs.append(run_setting(args.broker, s, args.max_seconds))
        print(render(runs[-1:]), file=sys.stderr, flush=True)
    note = machine.note()
    body = f"{METHOD}\n\n{note.markdown()}\n\n{render(runs)}"
    print(body, file=sys.stderr)
    if not args.no_write:
        replace_section("Differential privacy", body)
    print(json.dumps({"machine": note.markdown(), "runs": runs}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
