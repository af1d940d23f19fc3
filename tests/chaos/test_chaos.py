"""The chaos run: one real job, every role a real process, on a private broker node that the test
restarts. During >= 300 updates it SIGKILLs the active aggregator (at random moments and frozen
exactly between a version's confirm and its acks), SIGKILLs workers mid-task, drops workers'
connections, restarts the broker and kills the coordinator once. Then the streams alone must
account for every update: in exactly one version or in dead letters, none twice, and the final
weights must be what v0 plus the `included` lists give with the aggregator's own Accumulator.

Set FEDMQ_CHAOS_SUMMARY=path to keep the measured counts and takeover times as JSON.
"""

from __future__ import annotations

import json
import os
import random
import re
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

from shared.broker import JobNames
from shared.ledger import read_ledger
from shared.messages import Event, EventKind
from tests.brokers import PrivateBroker
from tests.chaos.harness import Fleet, Follower, close_connection, recompute, write_job

SITES = 6
REPLICAS = 3
BUFFER = 3
MAX_VERSIONS = 110  # x BUFFER updates: >= 300 with room for the ones a crash dead-letters
TARGET_ACCURACY = 0.9
MIN_TASK_SECONDS = "1.2"  # keeps the job long enough for the whole schedule

# (version reached, action); worker and aggregator kills alternate with the rarer faults
SCHEDULE: list[tuple[int, str]] = [
    (4, "kill_worker"), (8, "kill_aggregator"), (12, "kill_aggregator_before_ack"), (16, "kill_worker"),
    (20, "kill_aggregator"), (24, "drop_worker_connection"), (28, "kill_worker"),
    (32, "kill_aggregator_before_ack"), (38, "restart_broker"), (46, "kill_aggregator"), (50, "kill_worker"),
    (55, "kill_coordinator"), (60, "kill_aggregator_before_ack"), (66, "kill_worker"), (72, "kill_aggregator"),
    (78, "drop_worker_connection"), (84, "kill_aggregator_before_ack"), (90, "kill_worker"),
]


@dataclass
class Kill:
    role: str
    name: str
    kind: str
    at: float  # wall clock of the SIGKILL
    version: int  # newest version the test had seen
    active_after: float | None = None  # a standby's AGGREGATOR_ACTIVE, seconds after the kill
    takeover: float | None = None  # the next version by another replica, seconds after the kill


@dataclass
class Record:
    kills: list[Kill] = field(default_factory=list)
    broker_restarts: list[float] = field(default_factory=list)  # seconds the node took to come back
    #: seconds from the node answering again to the next version (every role reconnected)
    broker_recovery: list[float | None] = field(default_factory=list)
    connection_drops: int = 0
    missed: list[str] = field(default_factory=list)  # actions that found nothing to act on


class Chaos:
    """Runs the schedule against a live job while following its events stream."""

    def __init__(self, node: PrivateBroker, job: str, fleet: Fleet, arm: Path) -> None:
        self.node = node
        self.job = job
        self.fleet = fleet
        self.arm = arm
        self.events = Follower(node.url, JobNames(job).events)
        self.record = Record()
        self.version = 0
        self.active: str | None = None
        self.replicas = [f"agg-{i}" for i in range(REPLICAS)]
        self.next_replica = REPLICAS
        self.rng = random.Random(1)
        self.schedule = list(SCHEDULE)
        self.armed_at: float | None = None
        self.finishing = False
        self.broker_back_at: float | None = None

    # -------------------------------------------------------------- observation

    def observe(self) -> None:
        for d in self.events.poll(0.1):
            ev = Event.decode(d.body)
            if ev.event == EventKind.VERSION_PUBLISHED:
                self.version = max(self.version, int(ev.data["version"]))
                self._took_over(str(ev.data.get("replica")), ev.ts, "takeover")
                if self.broker_back_at is not None and ev.ts > self.broker_back_at:
                    self.record.broker_recovery.append(round(ev.ts - self.broker_back_at, 2))
                    self.broker_back_at = None
            elif ev.event == EventKind.AGGREGATOR_ACTIVE:
                self._took_over(str(ev.data.get("replica")), ev.ts, "active_after")
            elif ev.event == EventKind.JOB_FINISHING:
                self.finishing = True

    def _took_over(self, replica: str, ts: float, what: str) -> None:
        self.active = replica
        for k in self.record.kills:
            if k.role == "aggregator" and k.name != replica and ts > k.at and getattr(k, what) is None:
                setattr(k, what, ts - k.at)

    def supervise(self) -> None:
        """A dead process the test did not kill is a failure of the very thing under test."""
        bad = self.fleet.exited_unexpectedly()
        assert not bad, "\n".join(f"{n} exited {rc}:\n{self.fleet.tail(n)}" for n, rc in bad.items())
        early = [n for n, p in self.fleet.procs.items() if p.poll() is not None and p.pid not in self.fleet.killed]
        if early and not self.finishing:  # before the job ends nobody may leave, not even with status 0
            deadline = time.monotonic() + 3  # unless JOB_FINISHING is merely not read yet
            while not self.finishing and time.monotonic() < deadline:
                self.observe()
            assert self.finishing, "\n".join(f"{n} left early:\n{self.fleet.tail(n)}" for n in early)
        for name in self.replicas:
            if self.fleet.state(name) == "T":  # claimed the armed point: frozen between confirm and acks
                self._kill_aggregator(name, "between confirm and ack")
                self.armed_at = None
        if self.armed_at is not None and time.monotonic() - self.armed_at > 30:
            self.arm.unlink(missing_ok=True)
            self.armed_at = None
            self.record.missed.append("kill_aggregator_before_ack")

    # -------------------------------------------------------------- actions

    def step(self) -> None:
        if self.schedule and self.version >= self.schedule[0][0] and self.armed_at is None:
            _, action = self.schedule.pop(0)
            act: Callable[[], None] = getattr(self, action)
            act()

    def kill_worker(self) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            busy = [n for n in (f"site-{i}" for i in range(SITES))
                    if self.fleet.alive(n) and _mid_task(self.fleet.log(n))]
            if busy:
                name = self.rng.choice(busy)
                self.record.kills.append(Kill("worker", name, "mid-task", self.fleet.kill(name), self.version))
                self.fleet.restart(name)
                return
            self.observe()
        self.record.missed.append("kill_worker")

    def kill_aggregator(self) -> None:
        time.sleep(self.rng.uniform(0.0, 1.5))  # a random point of its work
        self.observe()
        if self.active in self.replicas and self.fleet.alive(self.active):
            self._kill_aggregator(self.active, "random")
        else:
            self.record.missed.append("kill_aggregator")

    def _kill_aggregator(self, name: str, kind: str) -> None:
        self.record.kills.append(Kill("aggregator", name, kind, self.fleet.kill(name), self.version))
        new = f"agg-{self.next_replica}"
        self.next_replica += 1
        self.replicas = [r for r in self.replicas if r != name] + [new]
        self.fleet.restart(name, new)

    def kill_aggregator_before_ack(self) -> None:
        self.arm.touch()  # the active replica claims it at its next version (shared/faults.py)
        self.armed_at = time.monotonic()

    def drop_worker_connection(self) -> None:
        site = f"site-{self.rng.randrange(SITES)}"
        dropped = close_connection(self.node, f"fedmq-worker-{self.job}-{site}")
        if dropped:
            self.record.connection_drops += dropped
        else:
            self.record.missed.append("drop_worker_connection")

    def restart_broker(self) -> None:
        started = time.monotonic()
        self.node.restart()
        self.broker_back_at = time.time()
        self.record.broker_restarts.append(round(time.monotonic() - started, 2))

    def kill_coordinator(self) -> None:
        self.record.kills.append(Kill("coordinator", "coordinator", "random", self.fleet.kill("coordinator"),
                                      self.version))
        self.fleet.restart("coordinator")


def _mid_task(log: str) -> bool:
    return log.rfind('msg="task received"') > log.rfind('msg="update published"')


def _result(log: str) -> dict[str, Any]:
    lines = [line for line in log.splitlines() if line.startswith("{")]
    assert lines, "the coordinator printed no result"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _seconds(values: list[float | None]) -> dict[str, Any]:
    got = sorted(v for v in values if v is not None)
    if not got:
        return {"n": 0}
    return {"n": len(got), "min": round(got[0], 3), "median": round(statistics.median(got), 3),
            "max": round(got[-1], 3), "all": [round(v, 3) for v in got]}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_job_survives_kills_broker_restart_and_dropped_connections(
        private_broker: PrivateBroker, tmp_path: Path) -> None:
    url = private_broker.url
    job = f"chaos-{uuid.uuid4().hex[:8]}"
    names = JobNames(job)
    files = write_job(tmp_path, sites=SITES,
                      strategy={"name": "fedbuff", "buffer_size": BUFFER, "flush_timeout": 1.0,
                                "max_staleness": 50},
                      coordinator={"concurrency": SITES, "max_versions": MAX_VERSIONS, "max_seconds": 480,
                                   "task_deadline": 60})
    arm = tmp_path / "arm-aggregator"
    fleet = Fleet(url, job, tmp_path / "logs")
    chaos = Chaos(private_broker, job, fleet, arm)
    started = time.monotonic()
    try:
        fleet.start("coordinator", "coordinator", "--config", str(files.config), "--json")
        for name in chaos.replicas:
            fleet.start(name, "aggregator", "--name", name, faults=f"aggregator.before_ack=stop:{arm}")
        for i, data in enumerate(files.sites):
            fleet.start(f"site-{i}", "worker", "--site", f"site-{i}", "--data", str(data),
                        "--min-task-seconds", MIN_TASK_SECONDS)
        while fleet.alive("coordinator"):
            chaos.observe()
            chaos.supervise()
            chaos.step()
            assert time.monotonic() - started < 540, "the chaos job did not finish in time"
        assert fleet.wait("coordinator", 1) == 0
        for name in [f"site-{i}" for i in range(SITES)] + chaos.replicas:  # they leave on their own
            assert fleet.wait(name, 60) == 0, fleet.tail(name)
        chaos.observe()
        result = _result(fleet.log("coordinator"))
        ledger = read_ledger(url, names)
        report = ledger.check()
        redo = recompute(url, names)
    finally:
        chaos.events.close()
        fleet.close()

    logs = {n: fleet.log(n) for n in fleet.procs}
    kills = chaos.record.kills
    agg_kills = [k for k in kills if k.role == "aggregator"]
    summary = {
        "job": job, "wall_seconds": round(time.monotonic() - started, 1),
        "updates_logged": report.logged, "updates_included": report.included,
        "updates_dead_lettered": report.dead_lettered, "versions": report.versions,
        "lost": len(report.lost), "double_counted": len(report.double_counted),
        "included_and_dead": len(report.included_and_dead),
        "redundant_dead_letters": len(report.redundant_dead_letters),
        "aggregator_kills": len(agg_kills),
        "aggregator_kills_between_confirm_and_ack": sum(k.kind == "between confirm and ack" for k in agg_kills),
        "worker_kills_mid_task": sum(k.role == "worker" for k in kills),
        "coordinator_kills": sum(k.role == "coordinator" for k in kills),
        "broker_restarts": chaos.record.broker_restarts, "broker_recovery": chaos.record.broker_recovery,
        "connection_drops": chaos.record.connection_drops,
        "missed_actions": chaos.record.missed,
        "duplicates_dropped": sum(t.count("duplicate update dropped") for t in logs.values()),
        "tasks_redelivered": sum(len(re.findall(r'msg="task received" .*redelivered=True', t))
                                 for t in logs.values()),
        "updates_republished": sum(t.count("republishing an unconfirmed update") for t in logs.values()),
        "takeover_seconds": _seconds([k.takeover for k in agg_kills]),
        "standby_active_seconds": _seconds([k.active_after for k in agg_kills]),
        "final_accuracy": result["final_accuracy"], "final_version": result["final_version"],
        "recomputed_versions": redo.versions_checked, "first_mismatch": redo.first_mismatch,
        "kills": [asdict(k) for k in kills],
    }
    print(json.dumps(summary, indent=1))
    if os.environ.get("FEDMQ_CHAOS_SUMMARY"):
        Path(os.environ["FEDMQ_CHAOS_SUMMARY"]).write_text(json.dumps(summary, indent=1))

    assert report.ok, report.to_dict()
    assert report.logged >= 300
    assert redo.first_mismatch is None and redo.final_equal
    assert redo.versions_checked == result["versions"] == report.versions - 1
    assert result["final_accuracy"] >= TARGET_ACCURACY
    assert summary["aggregator_kills"] >= 5 and summary["aggregator_kills_between_confirm_and_ack"] >= 1
    assert summary["worker_kills_mid_task"] >= 5
    assert len(chaos.record.broker_restarts) >= 1 and chaos.record.connection_drops >= 1
    assert all(k.takeover is not None for k in agg_kills), "a kill after which no standby published"
