"""Replay speed: versions/s and updates/s that `fedmq replay` verifies, against the live job's rate.

Three measurements:

1. a real demo job (``fedmq demo --json`` as child processes, or ``--job ID`` of a finished one):
   its live rate (versions and updates per second of wall time) and replay's rate on it;
2. a synthetic history with a larger model written straight onto a fresh job's streams
   (``--params`` weights per version, K = ``--buffer`` updates per version): replay's rate and MB/s
   read from the broker, the job deleted afterwards;
3. the same synthetic history verified in memory (`check_version` only, no broker): the compute
   bound, i.e. how much of (2) is reading the streams.

Usage: ``python -m bench.replay_bench [--job ID] [--repeats 3] [--versions 40] [--params 200000]``.
The last stdout line is one JSON object with every figure; a table goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from typing import Any

import numpy as np

from bench.common import run_group
from fedmq.aggregator.strategy import Accumulator
from fedmq.replay import check_version, replay
from fedmq.shared.broker import DEFAULT_URL, Connection, JobNames, TopologyConfig
from fedmq.shared.config import StrategyConfig
from fedmq.shared.messages import Event, EventKind, ModelVersion, Update, make_version


def _median_replay(url: str, job: str, repeats: int) -> dict[str, Any]:
    runs = []
    for _ in range(repeats):
        report = replay(url, job)
        if report.mismatches:
            raise SystemExit(f"bench: job {job} has {len(report.mismatches)} mismatch(es); not a speed run")
        runs.append(report)
    seconds = statistics.median(r.seconds for r in runs)
    d = runs[0].to_dict()
    return {"seconds": seconds, "versions": d["versions_recomputed"], "updates": d["updates_replayed"],
            "versions_per_s": d["versions_recomputed"] / seconds, "updates_per_s": d["updates_replayed"] / seconds,
            "all_seconds": [round(r.seconds, 3) for r in runs]}


def _live_rate(url: str, job: str) -> dict[str, Any]:
    """From the coordinator's JOB_FINISHED event: what the job itself achieved."""
    from fedmq.history import StreamCursor, decode_or_none

    with StreamCursor(url, JobNames(job).events, name="fedmq-bench-events", prefetch=256) as cur:
        finished = [ev.data for d in cur if (ev := decode_or_none(Event, d)) is not None
                    and ev.event == EventKind.JOB_FINISHED]
    if not finished:
        raise SystemExit(f"bench: job {job} has not finished (no job_finished event)")
    f = finished[-1]
    wall = float(f["wall_seconds"])
    return {"wall_seconds": wall, "versions": int(f["versions"]), "updates": int(f["updates_applied"]),
            "versions_per_s": int(f["versions"]) / wall, "updates_per_s": int(f["updates_applied"]) / wall}


def _run_demo(url: str) -> str:
    job = f"bench-replay-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    res = run_group([sys.executable, "-m", "fedmq", "demo", "--broker", url, "--job", job, "--json"],
                    timeout=600, env=env)  # a timeout kills the demo's children too
    if res.returncode != 0:
        with Connection(url, name="fedmq-bench-cleanup").open() as conn:
            conn.delete_job(JobNames(job))  # what the failed demo left
        raise SystemExit(f"bench: demo failed: {res.stderr[-1500:]}")
    return job


def _synthetic_chain(job: str, n_versions: int, params: int, k: int) -> tuple[list[ModelVersion], list[Update]]:
    """A FedBuff history with staleness, built exactly as the aggregator builds it."""
    cfg = StrategyConfig(buffer_size=k)
    rng = np.random.default_rng(0)
    cols = 100
    shapes = {"w": (params // cols, cols), "b": (cols,)}
    v0 = make_version(job=job, version=0, parent=-1, included=[], strategy="fedbuff", params=cfg.to_params(),
                      model={"name": "bench"}, weights={n: rng.normal(size=s).astype(np.float32)
                                                        for n, s in shapes.items()})
    chain, updates = [v0], []
    for v in range(1, n_versions + 1):
        acc = Accumulator(cfg)
        for i in range(k):
            base = max(0, v - 1 - (i % 3))
            u = Update(job=job, update_id=f"u{v}-{i}", task_id=f"t{v}-{i}", site=f"site-{i}", base_version=base,
                       num_samples=50 + i, delta={n: (0.01 * rng.normal(size=s)).astype(np.float32)
                                                  for n, s in shapes.items()})
            assert u.delta is not None
            acc.fold(update_id=u.update_id, site=u.site, delta=u.delta, tau=v - 1 - base,
                     num_samples=u.num_samples, base_version=base)
            updates.append(u)
        weights, contributions = acc.flush(chain[-1].weights)
        chain.append(make_version(job=job, version=v, parent=v - 1, weights=weights,
                                  included=[c.update_id for c in contributions], strategy="fedbuff",
                                  params=cfg.to_params(), model=v0.model,
                                  contributions=[c.to_dict() for c in contributions]))
    return chain, updates


def _synthetic(url: str, n_versions: int, params: int, k: int, repeats: int) -> dict[str, Any]:
    job = f"bench-replay-syn-{uuid.uuid4().hex[:8]}"
    names = JobNames(job)
    chain, updates = _synthetic_chain(job, n_versions, params, k)
    body_bytes = sum(len(mv.encode()) for mv in chain) + sum(len(u.encode()) for u in updates)
    with Connection(url, name="fedmq-bench-writer").open() as conn:
        try:
            conn.declare_job(names, TopologyConfig())
            by_version: dict[int, list[Update]] = {}
            for u in updates:
                by_version.setdefault(int(u.update_id[1:].split("-")[0]), []).append(u)
            conn.publish(names.models_exchange, "", chain[0].encode())
            for mv in chain[1:]:
                for u in by_version[mv.version]:
                    conn.publish(names.updates_exchange, u.site, u.encode())
                conn.publish(names.models_exchange, "", mv.encode())
            measured = _median_replay(url, job, repeats)
        finally:
            conn.delete_job(names)
    measured["mb_per_s"] = body_bytes / 1e6 / measured["seconds"]
    measured["stream_mb"] = body_bytes / 1e6
    measured["params"] = params
    measured["buffer"] = k
    started = time.perf_counter()
    by_id = {u.update_id: [Update.decode(u.encode())] for u in updates}
    wire = [ModelVersion.decode(mv.encode()) for mv in chain]
    decode_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for parent, mv in zip(wire, wire[1:], strict=False):
        check = check_version(parent, mv, {uid: by_id[uid] for uid in mv.included}).check
        if check.status.value != "ok":
            raise SystemExit(f"bench: synthetic v{mv.version} did not verify: {check.detail}")
    compute = time.perf_counter() - started
    measured["in_memory"] = {"seconds": compute, "decode_seconds": decode_seconds,
                             "versions_per_s": n_versions / compute, "updates_per_s": len(updates) / compute}
    return measured


def run(url: str = DEFAULT_URL, quick: bool = False) -> str:
    """The "## Replay" section of BENCHMARKS.md (`make bench`): a fresh demo job and a synthetic history."""
    from bench.common import Machine, table

    machine = Machine()
    repeats = 1 if quick else 3
    job = _run_demo(url)
    try:
        live, rep = _live_rate(url, job), _median_replay(url, job, repeats)
    finally:
        with Connection(url, name="fedmq-bench-cleanup").open() as conn:
            conn.delete_job(JobNames(job))
    syn = _synthetic(url, 10 if quick else 40, 200_000, 4, repeats)
    mem = syn["in_memory"]
    rows = [
        [f"demo job ({live['versions']} versions, {live['updates']} updates, live {live['wall_seconds']:.1f} s)",
         f"{live['versions_per_s']:.2f} versions/s, {live['updates_per_s']:.2f} updates/s",
         f"{rep['versions_per_s']:.1f} versions/s, {rep['updates_per_s']:.1f} updates/s ({rep['seconds']:.2f} s)",
         f"{rep['versions_per_s'] / live['versions_per_s']:.0f}x"],
        [f"synthetic, {syn['params']:,} float32 params, K={syn['buffer']} ({syn['stream_mb']:.0f} MB of bodies)",
         "-", f"{syn['versions_per_s']:.1f} versions/s, {syn['updates_per_s']:.1f} updates/s, "
              f"{syn['mb_per_s']:.0f} MB/s read", "-"],
        ["the same, in memory (no broker: `check_version` only)", "-",
         f"{mem['versions_per_s']:.1f} versions/s, {mem['updates_per_s']:.1f} updates/s", "-"],
    ]
    return "\n\n".join([
        machine.note().markdown(),
        "`fedmq replay` (`fedmq.replay.replay()`, wall time from opening the streams to the verdict, median of "
        f"{repeats}) on a fresh `fedmq demo` job against that job's own rate, and on a synthetic FedBuff "
        "history written straight onto a fresh job; every version verified bit for bit (0 mismatches).",
        table(["run", "live job", "replay", "replay / live"], rows),
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.replay_bench", description=__doc__.splitlines()[0])
    p.add_argument("--broker", default=os.environ.get("FEDMQ_BROKER_URL", DEFAULT_URL))
    p.add_argument("--job", help="a finished job to replay (default: run `fedmq demo` first)")
    p.add_argument("--repeats", type=int, default=3, help="replays per job; the median is reported")
    p.add_argument("--versions", type=int, default=40, help="synthetic history: versions")
    p.add_argument("--params", type=int, default=200_000, help="synthetic history: float32 weights per version")
    p.add_argument("--buffer", type=int, default=4, help="synthetic history: updates per version (K)")
    args = p.parse_args(argv)
    job = args.job or _run_demo(args.broker)
    try:
        demo = {"job": job, "live": _live_rate(args.broker, job),
                "replay": _median_replay(args.broker, job, args.repeats)}
    finally:
        if not args.job:
            with Connection(args.broker, name="fedmq-bench-cleanup").open() as conn:
                conn.delete_job(JobNames(job))
    syn = _synthetic(args.broker, args.versions, args.params, args.buffer, args.repeats)
    live, rep = demo["live"], demo["replay"]
    print(f"demo job {job}: live {live['versions_per_s']:.2f} versions/s, {live['updates_per_s']:.2f} updates/s; "
          f"replay {rep['versions_per_s']:.1f} versions/s, {rep['updates_per_s']:.1f} updates/s "
          f"({rep['versions_per_s'] / live['versions_per_s']:.0f}x live) in {rep['seconds']:.2f}s", file=sys.stderr)
    print(f"synthetic {args.versions} versions x K={args.buffer}, {args.params} params: replay "
          f"{syn['versions_per_s']:.1f} versions/s, {syn['updates_per_s']:.1f} updates/s, {syn['mb_per_s']:.0f} MB/s "
          f"read; in memory {syn['in_memory']['versions_per_s']:.1f} versions/s", file=sys.stderr)
    print(json.dumps({"demo": demo, "synthetic": syn}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
