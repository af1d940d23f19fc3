"""Update compression: bytes on the wire and what they cost in accuracy and time to target.

The default demo job (`fedmq demo`: digits, 8 sites of which 2 are 5x slower, Dirichlet 0.5, MLP,
FedBuff K=3, target 0.90, update signing on) run as real processes once per setting of
`--compression` (none, float16, bfloat16, top-k at 10 % and 1 % with error feedback). Bytes per
update are measured from the job's updates log (every update body as the broker stored it, and
the tensor bytes inside), not computed from the model's size. Beside each run, the same job in
the zero-overhead simulation (`fedmq.simulate.simulate_demo`: the same partition, sites,
strategy and compression code on a simulated clock): its updates to target do not depend on the
shared machine's load, so they show the accuracy effect alone.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import ROOT, Machine, run_group, table
from bench.time_to_accuracy import _trace
from fedmq.shared.broker import DEFAULT_URL, Connection, JobNames, read_stream
from fedmq.shared.messages import Update
from fedmq.simulate import SimResult, simulate_demo

TARGET = 0.9
#: label -> demo flags
SETTINGS: dict[str, list[str]] = {
    "none": [],
    "float16": ["--compression", "float16"],
    "bfloat16": ["--compression", "bfloat16"],
    "topk 10 %": ["--compression", "topk", "--topk-fraction", "0.1"],
    "topk 1 %": ["--compression", "topk", "--topk-fraction", "0.01"],
}
QUICK = ("none", "bfloat16", "topk 10 %")


@dataclass(frozen=True)
class Run:
    label: str
    updates: int             # on the updates log
    body_bytes: float        # mean update message, as stored on the broker
    delta_bytes: float       # mean bytes of the delta's tensors inside it
    seconds_to_target: float | None
    final_accuracy: float    # the handed-over version's (the first at the target, else the newest)
    best_accuracy: float
    versions: int
    updates_applied: int
    dead_lettered: int
    wall_seconds: float
    sim: SimResult


def _update_sizes(url: str, job: str) -> tuple[int, float, float]:
    bodies, deltas = [], []
    for d in read_stream(url, JobNames(job).updates_log, "first"):
        bodies.append(len(d.body))
        u = Update.decode(d.body)
        deltas.append(sum(v.nbytes for v in (u.delta or {}).values()))
    if not bodies:
        raise RuntimeError(f"job {job}: no update on the updates log")
    return len(bodies), statistics.fmean(bodies), statistics.fmean(deltas)


def demo(url: str, label: str, flags: list[str], max_seconds: float) -> Run:
    job = f"bench-compress-{uuid.uuid4().hex[:6]}"
    work = Path(tempfile.mkdtemp(prefix=f"fedmq-{job}-"))
    cmd = [sys.executable, "-m", "fedmq", "demo", "--json", "--broker", url, "--job", job, "--workdir", str(work),
           "--target", str(TARGET), "--max-seconds", str(max_seconds), *flags]
    try:
        proc = run_group(cmd, timeout=max_seconds + 300, cwd=ROOT)  # a timeout kills the demo's children too
        if proc.returncode != 0:
            raise RuntimeError(f"{label}: demo exited {proc.returncode}: {proc.stderr[-2000:]}")
        res: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        count, body, delta = _update_sizes(url, job)
        best = _trace(url, job).best
        sim = simulate_demo(["--target", str(TARGET), "--max-seconds", str(max_seconds), *flags], work / "sim")
    finally:
        with Connection(url, name="fedmq-bench-cleanup").open() as conn:
            conn.delete_job(JobNames(job))
        shutil.rmtree(work, ignore_errors=True)
    return Run(label, count, body, delta, res["seconds_to_target"], float(res["final_accuracy"]), best,
               int(res["versions"]), int(res["updates_applied"]), int(res["updates_dead_lettered"]),
               float(res["wall_seconds"]), sim)


def _ratio(x: float | None, ref: float | None) -> str:
    return "—" if x is None or not ref else f"{x / ref:.2f}"


def _seconds(s: float | None) -> str:
    return "not reached" if s is None else f"{s:.1f}"


def render(runs: list[Run], machine_note: str, max_seconds: float) -> str:
    ref = next(r for r in runs if r.label == "none")
    rows = []
    for r in runs:
        sim_to = "not reached" if r.sim.seconds_to_target is None else \
            f"{r.sim.seconds_to_target:.1f} ({r.sim.updates_to_target})"
        rows.append([r.label, f"{r.body_bytes:,.0f}", f"{r.delta_bytes:,.0f}", _ratio(r.body_bytes, ref.body_bytes),
                     _seconds(r.seconds_to_target), _ratio(r.seconds_to_target, ref.seconds_to_target),
                     f"{r.final_accuracy:.4f}", f"{r.best_accuracy:.4f}", f"{r.versions} / {r.updates_applied}",
                     str(r.dead_lettered), sim_to, f"{r.sim.final_accuracy:.4f}"])
    header = ["--compression", "bytes per update (body)", "delta bytes", "bytes / none", "s to 0.90",
              "s / none", "final accuracy", "best accuracy", "versions / updates", "dead letters",
              "simulated s to 0.90 (updates)", "simulated final accuracy"]
    missed = [r.label for r in runs if r.seconds_to_target is None]
    notes = [
        f"Bytes are means over every update on the job's updates log (the msgpack body, signature, task proof and "
        f"metrics included; the delta bytes are its tensors alone). The digits MLP has "
        f"{_params(ref):,} float32 parameters. Seconds to 0.90 are the demo's `seconds_to_target` (v0 "
        f"published to the first version evaluated at or above it, worker start-up included); a job that "
        f"does not reach it runs to `--max-seconds {max_seconds:g}`, and its final accuracy is then the "
        f"newest version's. Best accuracy is the best central evaluation of the run. One run per setting, "
        f"one after the other on the shared machine: times move with the load (the simulated columns do not).",
    ]
    if missed:
        notes.append(f"Not reached in this run: {', '.join(missed)} (final and best accuracy say how far they got).")
    return "\n\n".join([
        machine_note,
        "`fedmq demo --json --compression none|float16|bfloat16|topk [--topk-fraction f]` (the default demo: "
        "digits, 8 sites of which 2 are 5x slower, Dirichlet 0.5, MLP, FedBuff K=3, target 0.90), as real "
        "processes, and the same job in `fedmq simulate` (zero overhead).",
        table(header, rows),
        *notes,
    ])


def _params(run: Run) -> int:
    return int(run.delta_bytes // 4)


def run(url: str = DEFAULT_URL, quick: bool = False) -> str:
    machine = Machine()
    max_seconds = 60.0 if quick else 120.0
    labels = QUICK if quick else tuple(SETTINGS)
    runs = []
    for label in labels:
        t0 = time.perf_counter()
        runs.append(demo(url, label, SETTINGS[label], max_seconds))
        print(f"bench compression: {label} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return render(runs, machine.note().markdown(), max_seconds)


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
