"""Operator commands on a long job: `fedmq monitor --once --json`, the live monitor's refresh,
`fedmq history`, `fedmq replay` and `fedmq report`, timed on a job of 1,000+ versions.

Training 1,000 versions for real would take the better part of an hour, so `write_job` writes what
a real job leaves on its streams straight onto a fresh job, built the ways the roles build it:

* the coordinator's side: v0 (task key and site registry in its meta), every task signed with the
  task key on the tasks exchange (tasks log), TASK_ISSUED / VERSION_EVALUATED / JOB_STARTED (and
  JOB_FINISHING / JOB_FINISHED when the job is finished) under the trusted routing keys;
* the sites' side: each update answers one issued task (task proof), is signed with its site's
  key, goes to the updates exchange under the site's routing key, followed by its
  UPDATE_PUBLISHED under `site.<site>.update_published`;
* the aggregator's side: AGGREGATOR_ACTIVE, every version folded by `Accumulator` (FedBuff,
  staleness from tasks issued at older versions) on the models stream with its VERSION_PUBLISHED;
  a few dead letters (dead-letter log and DEADLETTERED events) and a few hostile entries on the
  events stream (a site's junk bytes, a forged trusted event), which readers must skip and count.

Replay verifies every version of such a job bit for bit, so each command does its real work.

Usage: ``python -m bench.ops_bench [--versions 1000]``; the last stdout line is JSON (`make bench`
runs `run`, which writes the BENCHMARKS.md section).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.common import run_group
from fedmq.aggregator.strategy import Accumulator
from fedmq.monitor import Monitor, Snapshot, _refresh
from fedmq.shared.broker import (
    DEFAULT_URL,
    DETAIL_HEADER,
    REASON_HEADER,
    UPDATE_ID_HEADER,
    Connection,
    JobNames,
    StreamReader,
    TopologyConfig,
    read_stream,
)
from fedmq.shared.config import StrategyConfig
from fedmq.shared.jobstate import site_event_key
from fedmq.shared.jobview import SummaryJournal
from fedmq.shared.messages import Event, EventKind, ModelVersion, Task, Update, make_version
from fedmq.shared.signing import META_REGISTRY, META_TASK_KEY, public_hex, sign_task, sign_update

#: the digits MLP of `fedmq demo` (model_spec("mlp", (64,), 10, hidden=32)): 2,410 float32 weights
SPEC: dict[str, Any] = {"name": "mlp", "args": {"input_dim": 64, "input_shape": [64], "num_classes": 10,
                                                "hidden": 32}}
SHAPES = {"1.weight": (32, 64), "1.bias": (32,), "3.weight": (10, 32), "3.bias": (10,)}


@dataclass
class JobWriter:
    """Writes a FedBuff job's streams as its coordinator, aggregator and sites would, one version
    at a time (`step`), so a benchmark can keep a job "running" while it measures."""

    conn: Connection
    job: str
    sites: int = 8
    buffer: int = 4             # K: updates per version
    concurrency: int = 6        # tasks outstanding: > K gives updates of staleness 1 and 2
    seed: int = 0
    names: JobNames = field(init=False)
    cfg: StrategyConfig = field(init=False)
    #: follow the events stream and journal JOB_SUMMARY as the coordinator does (False: a job of
    #: a release before summaries)
    summaries: bool = True
    counts: dict[str, int] = field(default_factory=lambda: {"tasks": 0, "updates": 0, "versions": 0,
                                                           "events": 0, "dead": 0, "poison": 0})

    def __post_init__(self) -> None:
        self.names = JobNames(self.job)
        self.cfg = StrategyConfig(buffer_size=self.buffer)
        self.rng = np.random.default_rng(self.seed)
        self.task_key = Ed25519PrivateKey.generate()
        self.site_names = [f"site-{i}" for i in range(self.sites)]
        self.site_keys = {s: Ed25519PrivateKey.generate() for s in self.site_names}
        self.outstanding: deque[Task] = deque()
        self.started = time.time()
        self.latest: ModelVersion | None = None
        self.latest_offset = 0
        self.acc = Accumulator(self.cfg)
        self.next_site = 0
        self.journal = SummaryJournal(self.job)
        self.follower: StreamReader | None = None

    # ------------------------------------------------------------------ the roles' publishes

    def _event(self, source: str, event: str, key: str | None = None, **data: Any) -> None:
        body = Event(job=self.job, event=event, source=source, data=data).encode()
        self.conn.publish(self.names.events_exchange, key or event, body)
        self.counts["events"] += 1

    def start(self) -> None:
        """Topology, v0, JOB_STARTED, the active aggregator, the first `concurrency` tasks."""
        self.conn.declare_job(self.names, TopologyConfig())
        if self.summaries:
            self.follower = StreamReader(self.conn.url, self.names.events, name="fedmq-bench-ops-follower",
                                         prefetch=256)
            self.follower.start("first")
        weights = {n: (0.1 * self.rng.normal(size=s)).astype(np.float32) for n, s in SHAPES.items()}
        meta = {"seed": self.seed, META_TASK_KEY: public_hex(self.task_key),
                META_REGISTRY: {s: public_hex(k) for s, k in self.site_keys.items()}}
        v0 = make_version(job=self.job, version=0, parent=-1, weights=weights, included=[], strategy="fedbuff",
                          params=self.cfg.to_params(), model=SPEC, meta=meta)
        self.conn.publish(self.names.models_exchange, "", v0.encode(), message_id="v0")
        self.latest, self.latest_offset = v0, 0
        self._event("coordinator", EventKind.JOB_STARTED, strategy="fedbuff", params=v0.params, model=SPEC,
                    concurrency=self.concurrency)
        self._event("aggregator-0", EventKind.AGGREGATOR_ACTIVE, replica="aggregator-0", takeover=False)
        for _ in range(self.concurrency):
            self._issue()

    def _issue(self) -> None:
        assert self.latest is not None
        now = time.time()
        task = sign_task(Task(job=self.job, task_id=uuid.uuid4().hex[:16], version=self.latest.version,
                              model_offset=self.latest_offset, epochs=1, batch_size=32, lr=0.05,
                              issued_at=now, deadline=now + 120.0), self.task_key)
        self.conn.publish(self.names.tasks_exchange, "task", task.encode(), message_id=task.task_id)
        self._event("coordinator", EventKind.TASK_ISSUED, task=task.to_dict())
        self.outstanding.append(task)
        self.counts["tasks"] += 1

    def _answer(self, task: Task) -> Update:
        """The oldest outstanding task's update, signed by the site that trained it."""
        site = self.site_names[self.next_site % len(self.site_names)]
        self.next_site += 1
        samples = int(40 + self.rng.integers(0, 40))
        delta = {n: (0.01 * self.rng.normal(size=s)).astype(np.float32) for n, s in SHAPES.items()}
        update = sign_update(Update(
            job=self.job, update_id=task.update_id, task_id=task.task_id, site=site, base_version=task.version,
            num_samples=samples, delta=delta, metrics={"loss": float(self.rng.uniform(0.1, 2.0)),
                                                       "task_seconds": 0.05},
            task_proof=task.signature), self.site_keys[site])
        self.conn.publish(self.names.updates_exchange, site, update.encode(),
                          headers={UPDATE_ID_HEADER: update.update_id}, message_id=update.update_id)
        self._event(site, EventKind.UPDATE_PUBLISHED, site_event_key(site, EventKind.UPDATE_PUBLISHED),
                    task_id=task.task_id, update_id=update.update_id, site=site, base_version=task.version,
                    num_samples=samples, loss=update.metrics["loss"], task_seconds=0.05, epsilon=None)
        self.counts["updates"] += 1
        return update

    def _flush(self) -> None:
        assert self.latest is not None
        cur = self.latest
        weights, contributions = self.acc.flush(cur.weights)
        mv = make_version(job=self.job, version=cur.version + 1, parent=cur.version, weights=weights,
                          included=[c.update_id for c in contributions], strategy=cur.strategy, params=cur.params,
                          model=cur.model, contributions=[c.to_dict() for c in contributions], meta=dict(cur.meta))
        self.conn.publish(self.names.models_exchange, "", mv.encode(), message_id=f"v{mv.version}")
        self.latest = mv
        self.latest_offset += 1  # the models stream holds versions only
        self.counts["versions"] += 1
        self.acc = Accumulator(self.cfg)
        self._event("aggregator", EventKind.VERSION_PUBLISHED, version=mv.version, parent=mv.parent,
                    included=list(mv.included), sha256=mv.sha256, replica="aggregator-0",
                    sites=[c.site for c in contributions], staleness=[c.staleness for c in contributions],
                    epsilon=None)
        acc = float(min(0.97, 0.2 + 0.77 * (1 - np.exp(-mv.version / 150))))
        loss = float(2.3 * (1 - acc))
        self._event("coordinator", EventKind.VERSION_EVALUATED, version=mv.version, t=time.time() - self.started,
                    included=len(mv.included), sha256=mv.sha256, scope="central",
                    metrics={"accuracy": acc, "loss": loss}, accuracy=acc, loss=loss)

    def step(self) -> None:
        """One version: K updates arrive (each frees a task slot, refilled at once), then the flush."""
        assert self.latest is not None
        while len(self.acc.contributions) < self.buffer:
            task = self.outstanding.popleft()
            update = self._answer(task)
            assert update.delta is not None
            self.acc.fold(update_id=update.update_id, site=update.site, delta=update.delta,
                          tau=self.latest.version - task.version, num_samples=update.num_samples,
                          base_version=task.version)
            self._issue()
        self._flush()
        self.follow()

    def follow(self, wait: float = 0.0) -> None:
        """The coordinator's loop: fold what the events stream delivered, journal a summary when due."""
        if self.follower is None:
            return
        for d in self.follower.poll(wait):
            self.journal.fold(d)
        before = self.journal.written
        self.journal.maybe_emit(self.conn, self.names)
        self.counts["events"] += self.journal.written - before
        self.counts["summaries"] = self.journal.written

    def close(self) -> None:
        if self.follower is not None:
            self.follower.close()
            self.follower = None

    def hostile(self, n: int = 0) -> None:
        """What a site can write that is no valid event: junk bytes under its own key and a trusted
        kind under a site key; and junk it sent as an update, dead-lettered with its DEAD_LETTERED."""
        site = self.site_names[n % len(self.site_names)]
        self.conn.publish(self.names.events_exchange, site_event_key(site, EventKind.UPDATE_PUBLISHED),
                          b"\xc1 not msgpack " + str(n).encode())
        forged = Event(job=self.job, event=EventKind.VERSION_PUBLISHED, source=site,
                       data={"version": 10**6, "included": [], "site": site}).encode()
        self.conn.publish(self.names.events_exchange, site_event_key(site, EventKind.VERSION_PUBLISHED), forged)
        self.counts["poison"] += 2
        junk = b"\x92 junk update " + str(n).encode()  # into the updates log, dead-lettered by the aggregator
        self.conn.publish(self.names.updates_exchange, site, junk)
        self.conn.publish(self.names.dead_exchange, site, junk, headers={
            REASON_HEADER: "malformed", DETAIL_HEADER: "update: not msgpack"})
        self._event("aggregator", EventKind.DEAD_LETTERED, update_id=None, reason="malformed",
                    detail="update: not msgpack", site=site, rejected_in_bulk={})
        self.counts["dead"] += 1

    def finish(self) -> None:
        """What the coordinator does at the end: JOB_FINISHING, tasks and updates queues deleted, JOB_FINISHED."""
        assert self.latest is not None
        self._event("coordinator", EventKind.JOB_FINISHING, reason="max_versions")
        self.conn.delete_queue(self.names.tasks)
        self.conn.delete_queue(self.names.updates)
        self._event("coordinator", EventKind.JOB_FINISHED, job=self.job, strategy="fedbuff",
                    final_version=self.latest.version, final_accuracy=None, versions=self.latest.version,
                    updates_applied=self.counts["updates"], stop_reason="max_versions",
                    wall_seconds=time.time() - self.started, seconds_to_target=None, export_path="",
                    updates_unresolved=0, last_accuracy=None, task_failures={}, metrics={},
                    metrics_source="", metrics_version=None)

    def drain_queues(self) -> None:
        """The workers took the tasks and the aggregator the updates: empty queues, as on a healthy job."""
        self.conn.purge_queue(self.names.tasks)
        self.conn.purge_queue(self.names.updates)


def write_job(url: str, job: str, versions: int, *, hostile_every: int = 250, finished: bool = False,
              **kw: Any) -> dict[str, int]:
    """A FedBuff job of `versions` versions on fresh streams; returns what was written."""
    with Connection(url, name="fedmq-bench-ops-writer").open() as conn:
        w = JobWriter(conn, job, **kw)
        try:
            extend(w, versions, hostile_every)
            w.drain_queues()
            if finished:
                w.finish()
        finally:
            w.close()
        return dict(w.counts)


def extend(w: JobWriter, versions: int, hostile_every: int = 250, pace: float = 0.0) -> None:
    """`versions` more versions (started first if need be), one every `pace` s at most."""
    if w.latest is None:
        w.start()
    for _ in range(versions):
        t0 = time.monotonic()
        w.step()
        v = w.counts["versions"]
        if hostile_every and v % hostile_every == hostile_every // 2:
            w.hostile(v)
        if pace:
            time.sleep(max(0.0, pace - (time.monotonic() - t0)))


# ----------------------------------------------------------------------------- measuring


def _cli(url: str, args: list[str], timeout: float = 900.0) -> tuple[float, dict[str, Any]]:
    """(wall seconds, the JSON of its last stdout line) of `fedmq <args>` as a child process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    res = run_group([sys.executable, "-m", "fedmq", *args, "--broker", url], timeout=timeout, env=env)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"bench: fedmq {args[0]} exited {res.returncode}: {res.stderr[-800:]}")
    return seconds, json.loads(res.stdout.strip().splitlines()[-1])


def _check_monitor(d: dict[str, Any], counts: dict[str, int], versions: int) -> None:
    """The snapshot must say what was written: a fast wrong answer is no answer."""
    want = {"latest_version": versions, "tasks_issued": counts["tasks"], "updates_published": counts["updates"],
            "updates_applied": counts["updates"], "dead_letters": counts["dead"],
            "poison_events": counts["poison"]}
    got = {k: d.get(k) for k in want}
    if got != want:
        raise SystemExit(f"bench: monitor reported {got}, the job holds {want}")


def _raw_read(url: str, names: JobNames) -> tuple[float, int]:
    t0 = time.perf_counter()
    entries = read_stream(url, names.events, idle=0.3)
    return time.perf_counter() - t0 - 0.3, len(entries)  # minus the idle wait that ends the read


def _monitor_from_first(url: str, job: str) -> float:
    """In this process, the fold from the stream's first entry (a job without summaries)."""
    logging.getLogger("fedmq.monitor").setLevel(logging.ERROR)  # the hostile events are expected
    t0 = time.perf_counter()
    with Monitor(url, job, summaries=False) as mon:
        mon.snapshot()
    return time.perf_counter() - t0


def _live(url: str, w: JobWriter, refreshes: int, pace: float) -> dict[str, Any]:
    """`fedmq monitor`'s refreshes (`_refresh`, interval 1 s) while the job gains a version every
    `pace` s: wall time of each, and how many versions behind the writer each one was."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            while not stop.is_set():
                extend(w, 1, pace=pace)
        except BaseException as exc:  # reported below: a benchmark must not hide a broken writer
            errors.append(exc)

    writer = threading.Thread(target=write, name="bench-ops-writer", daemon=True)
    times, lags = [], []
    with Monitor(url, w.job) as mon:
        t0 = time.perf_counter()
        _refresh(mon, 1.0)
        first = time.perf_counter() - t0
        v0 = w.counts["versions"]
        writer.start()
        try:
            for _ in range(refreshes):
                time.sleep(1.0)  # the CLI's --interval
                t0 = time.perf_counter()
                got = _refresh(mon, 1.0)
                times.append(time.perf_counter() - t0)
                if isinstance(got, Snapshot):
                    lags.append(w.counts["versions"] - (got.view.latest_version or 0))
        finally:
            stop.set()
            writer.join(30)
    if errors:
        raise SystemExit(f"bench: the writer failed during the live run: {errors[0]!r}")
    return {"first": first, "median": statistics.median(times), "max": max(times), "refreshes": len(times),
            "max_lag": max(lags) if lags else None, "versions_added": w.counts["versions"] - v0,
            "versions_per_s": (w.counts["versions"] - v0) / max(sum(times) + len(times), 1e-9)}


def measure(url: str, versions: int, *, repeats: int, refreshes: int, pace: float = 0.1) -> dict[str, Any]:
    """Build the job, time every command on it, delete it."""
    job = f"bench-ops-{uuid.uuid4().hex[:8]}"
    names = JobNames(job)
    out: dict[str, Any] = {"job": job}
    try:
        with Connection(url, name="fedmq-bench-ops-writer").open() as conn:
            w = JobWriter(conn, job)
            try:
                t0 = time.perf_counter()
                extend(w, versions)
                w.drain_queues()
                out["build_seconds"] = time.perf_counter() - t0
                out["built_versions"] = w.counts["versions"]
                time.sleep(0.5)
                w.follow(0.2)
                out["raw_seconds"], out["entries"] = _raw_read(url, names)
                once = [_cli(url, ["monitor", "--job", job, "--once", "--json"]) for _ in range(repeats)]
                for _, d in once:
                    _check_monitor(d, w.counts, versions)
                out["once"] = [s for s, _ in once]
                out["from_first"] = _monitor_from_first(url, job)
                out["live"] = _live(url, w, refreshes, pace)
                w.drain_queues()
                w.follow(0.2)
                w.finish()
            finally:
                w.close()
            out["counts"] = dict(w.counts)
        n_updates, n_versions = w.counts["updates"], w.counts["versions"]
        out["history"], hist = _cli(url, ["history", "--job", job, "--json"])
        out["replay"], rep = _cli(url, ["replay", "--job", job, "--json"])
        if rep.get("mismatches") or rep.get("versions_recomputed") != n_versions:
            raise SystemExit(f"bench: replay did not verify the job: {str(rep)[:500]}")
        with tempfile.TemporaryDirectory() as tmp:
            out["report"], _ = _cli(url, ["report", "--job", job, "--out", tmp, "--json"])
        out["updates"], out["versions"] = n_updates, n_versions
        out["history_versions"] = len(hist.get("versions", []))
    finally:
        with Connection(url, name="fedmq-bench-cleanup").open() as conn:
            conn.delete_job(names)
    return out


def run(url: str = DEFAULT_URL, quick: bool = False) -> str:
    """The "## Operator commands on a long job" section of BENCHMARKS.md (`make bench`)."""
    from bench.common import Machine, fmt_seconds, table

    machine = Machine()
    versions = 150 if quick else 1000
    m = measure(url, versions, repeats=1 if quick else 3, refreshes=4 if quick else 20)
    c, live, built = m["counts"], m["live"], m["built_versions"]
    once = statistics.median(m["once"])
    raw = m["raw_seconds"]
    u, v = m["updates"], m["versions"]

    def rate(seconds: float) -> str:
        return f"{u / seconds:,.0f} updates/s, {v / seconds:,.0f} versions/s"

    rows = [
        [f"raw read of the events stream (`read_stream`, {m['entries']:,} entries, no decode)", fmt_seconds(raw),
         "-", "1.0x (baseline)"],
        ["`fedmq monitor --once --json` (child process: start-up, newest summary, tail, queues)",
         f"{fmt_seconds(once)} (median of {len(m['once'])}: {', '.join(f'{x:.2f}' for x in m['once'])} s)",
         "-", f"{once / raw:.2f}x"],
        ["the same fold from the first entry, in process (a job without summaries)",
         fmt_seconds(m["from_first"]), "-", f"{m['from_first'] / raw:.2f}x"],
        [f"live `fedmq monitor` refresh while the job runs ({live['versions_added']} versions added, "
         f"{live['refreshes']} refreshes at --interval 1)",
         f"median {fmt_seconds(live['median'])}, max {fmt_seconds(live['max'])}; first {fmt_seconds(live['first'])}",
         f"at most {live['max_lag']} versions behind the writer", "-"],
        [f"`fedmq history --json` ({m['history_versions']:,} versions listed)", fmt_seconds(m["history"]),
         rate(m["history"]), f"{m['history'] / raw:.1f}x"],
        ["`fedmq replay --json` (every version recomputed bit for bit, 0 mismatches)", fmt_seconds(m["replay"]),
         rate(m["replay"]), f"{m['replay'] / raw:.1f}x"],
        ["`fedmq report --json` (plots, HTML, report.json)", fmt_seconds(m["report"]), rate(m["report"]),
         f"{m['report'] / raw:.1f}x"],
    ]
    return "\n\n".join([
        machine.note().markdown(),
        f"A FedBuff job of {built:,} versions (K=4, 8 sites, digits MLP of 2,410 weights; {v:,} versions and "
        f"{u:,} updates once the live rows had added theirs) written "
        f"straight onto fresh streams as its roles write them (`bench/ops_bench.py`: signed tasks and updates, "
        f"{c['tasks']:,} task_issued, {c['updates']:,} update_published under the sites' keys, version_published, "
        f"version_evaluated, {c['dead']} dead letter(s), {c['poison']} hostile events, and the coordinator's "
        f"{c.get('summaries', 0)} job_summary events), built in {m['build_seconds']:.0f} s. Each command is the "
        "real CLI as a child process (Python start-up included) unless said otherwise; the monitor's snapshot was "
        f"checked against what was written (versions, tasks, updates, dead letters, poison) at {built:,} versions. "
        f"The live rows ran while the job gained a version every {0.1:g} s; the history, replay and report rows "
        f"on the finished job of {v:,} versions (rates = its updates and versions / wall).",
        table(["command", "wall", "rate", "/ raw read"], rows),
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ops_bench", description=__doc__.splitlines()[0])
    p.add_argument("--broker", default=os.environ.get("FEDMQ_BROKER_URL", DEFAULT_URL))
    p.add_argument("--versions", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--refreshes", type=int, default=20)
    args = p.parse_args(argv)
    m = measure(args.broker, args.versions, repeats=args.repeats, refreshes=args.refreshes)
    print(json.dumps(m, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
