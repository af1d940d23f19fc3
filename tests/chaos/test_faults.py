"""One fault at a time, with real processes on the shared test broker: the faster companions of
test_chaos.py. Each test places its fault exactly (shared/faults.py) and checks the ledger."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedmq.shared.broker import Connection, JobNames, TopologyConfig, read_stream
from fedmq.shared.config import StrategyConfig, StrategyName
from fedmq.shared.ledger import DELIVERY_LIMIT, logged_update_id, read_dead_letter, read_ledger
from fedmq.shared.messages import Event, EventKind, ModelVersion, Update, make_version
from tests.brokers import PrivateBroker
from tests.chaos.harness import Fleet, close_connection, count_stream, holds_for, wait_until, write_job
from tests.jobkit import declare_job_with_v0, make_update, publish_updates, wait_for_version

TASK_RE = re.compile(r'msg="task received" .*?task=(\w+)')


def _tasks_received(log: str) -> list[str]:
    return TASK_RE.findall(log)


def _events(url: str, names: JobNames, kind: str) -> list[Event]:
    return [ev for d in read_stream(url, names.events, "first", idle=0.5)
            if (ev := Event.decode(d.body)).event == kind]


def _versions(url: str, names: JobNames) -> list[ModelVersion]:
    return [ModelVersion.decode(d.body) for d in read_stream(url, names.models, "first", idle=0.5)]


def _assert_ledger_ok(url: str, names: JobNames) -> None:
    report = read_ledger(url, names).check()
    assert report.ok, report.to_dict()


@pytest.fixture()
def fleet(broker_url: str, job: str, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(broker_url, job, tmp_path / "logs")
    yield f
    f.close()


@pytest.mark.timeout(300)
def test_worker_killed_after_publishing_before_acking_sends_a_duplicate_that_is_ignored(
        broker_url: str, job: str, tmp_path: Path, fleet: Fleet) -> None:
    names = JobNames(job)
    files = write_job(tmp_path, sites=2, strategy={"name": "fedasync", "flush_timeout": 1.0},
                      coordinator={"concurrency": 1, "max_versions": 3, "max_seconds": 200})
    arm = tmp_path / "arm-worker"
    arm.touch()
    fleet.start("coordinator", "coordinator", "--config", str(files.config))
    fleet.start("aggregator", "aggregator", "--name", "aggregator")
    fleet.start("site-a", "worker", "--site", "site-a", "--data", str(files.sites[0]),
                faults=f"worker.before_ack=stop:{arm}")
    wait_until(lambda: fleet.state("site-a") == "T", 150,
               "site-a to freeze between its update's confirm and its task's ack")
    task = _tasks_received(fleet.log("site-a"))[-1]
    fleet.kill("site-a")
    fleet.start("site-b", "worker", "--site", "site-b", "--data", str(files.sites[1]))
    assert fleet.wait("coordinator", 150) == 0, fleet.tail("coordinator")

    uid = f"u-{task}"
    copies = [Update.decode(d.body).site for d in read_stream(broker_url, names.updates_log, "first", idle=0.5)
              if logged_update_id(d) == uid]
    assert copies == ["site-a", "site-b"]  # the same update id, trained and published twice
    assert [v.version for v in _versions(broker_url, names) if uid in v.included] == [1]
    assert re.search(rf'msg="task received" .*task={task} .*redelivered=True', fleet.log("site-b"))
    wait_until(lambda: f"duplicate update dropped job={job} update={uid}" in fleet.log("aggregator"), 30,
               "the aggregator to drop the second copy")
    _assert_ledger_ok(broker_url, names)


@pytest.mark.timeout(300)
def test_a_worker_whose_connection_drops_while_publishing_republishes_without_training_again(
        private_broker: PrivateBroker, tmp_path: Path) -> None:
    job = f"t-{uuid.uuid4().hex[:10]}"
    names = JobNames(job)
    files = write_job(tmp_path, sites=1, strategy={"name": "fedasync", "flush_timeout": 1.0},
                      coordinator={"concurrency": 1, "max_versions": 2, "max_seconds": 200})
    arm = tmp_path / "arm-publish"
    arm.touch()
    fleet = Fleet(private_broker.url, job, tmp_path / "logs")
    try:
        fleet.start("coordinator", "coordinator", "--config", str(files.config))
        fleet.start("aggregator", "aggregator", "--name", "aggregator")
        fleet.start("site-0", "worker", "--site", "site-0", "--data", str(files.sites[0]),
                    faults=f"worker.before_publish=stop:{arm}")
        wait_until(lambda: fleet.state("site-0") == "T", 150, "the worker to freeze with its update trained")
        assert close_connection(private_broker, f"fedmq-worker-{job}-site-0") == 1
        fleet.resume("site-0")  # its publish now meets a closed connection: no confirm
        assert fleet.wait("coordinator", 150) == 0, fleet.tail("coordinator")
        assert fleet.wait("site-0", 60) == 0, fleet.tail("site-0")
    finally:
        fleet.close()
    log = fleet.log("site-0")
    task = _tasks_received(log)[0]
    assert log.count("republishing an unconfirmed update") == 1
    assert re.search(rf'msg="task redelivered after its update was confirmed: acked, not trained again" .*'
                     rf'task={task}', log)
    logged = [logged_update_id(d) for d in read_stream(private_broker.url, names.updates_log, "first", idle=0.5)]
    assert logged.count(f"u-{task}") == 1  # the first publish never reached the broker
    _assert_ledger_ok(private_broker.url, names)


@pytest.mark.timeout(200)
def test_a_replica_that_sees_another_replicas_version_rebuilds_instead_of_forking(
        broker_url: str, job: str, fleet: Fleet) -> None:
    """Two replicas active at once (e.g. around a lost connection) must not both extend a parent:
    the one that notices a version it did not build on drops its session and rebuilds."""
    names = JobNames(job)
    v0 = declare_job_with_v0(broker_url, job, StrategyConfig(name=StrategyName.FEDBUFF, buffer_size=2,
                                                              flush_timeout=30.0))
    fleet.start("agg", "aggregator", "--name", "agg")
    publish_updates(broker_url, job, [make_update(job, f"u-{i}", v0.weights, seed=i) for i in range(2)])
    v1 = wait_for_version(broker_url, job, 1)[-1]
    other = make_version(job=job, version=2, parent=1, weights=v1.weights, included=[], strategy=v1.strategy,
                         params=v1.params, model=v1.model)
    with Connection(broker_url, name="fedmq-test-other-replica").open() as conn:
        conn.publish(names.models_exchange, "", other.encode(), message_id="v2")
    # v2 is in the stream: the broker pushes it to the replica's fence consumer as to this reader,
    # long before the two updates below are delivered, folded and flushed
    wait_until(lambda: len(_versions(broker_url, names)) == 3, 30, "the foreign v2 in the models stream")
    publish_updates(broker_url, job, [make_update(job, f"u-{i}", v0.weights, base_version=1, seed=i)
                                      for i in range(2, 4)])
    got = wait_for_version(broker_url, job, 3)
    assert [v.version for v in got] == [0, 1, 2, 3]
    assert got[3].parent == 2 and set(got[3].included) == {"u-2", "u-3"}
    assert "version 2 was published by another replica" in fleet.log("agg")
    _assert_ledger_ok(broker_url, names)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("crash", ["raise", "exit"])
def test_a_poison_update_ends_in_dead_letters_through_the_delivery_limit(
        broker_url: str, job: str, fleet: Fleet, crash: str) -> None:
    """raise: a Python exception - only the poison is given back, the aggregator lives on.
    exit: the process dies on it each time (a native crash) and is restarted by a supervisor."""
    names = JobNames(job)
    v0 = declare_job_with_v0(broker_url, job, StrategyConfig(name=StrategyName.FEDBUFF, buffer_size=2,
                                                              flush_timeout=1.0))
    good = [make_update(job, f"u-good-{i}", v0.weights, seed=i) for i in range(4)]
    publish_updates(broker_url, job, [good[0], good[1], make_update(job, "u-poison", v0.weights, seed=9),
                                      good[2], good[3]])
    faults = f"aggregator.handle={crash}:u-poison"
    fleet.start("agg", "aggregator", "--name", "agg", faults=faults)
    crashes = 0

    def poison_dead() -> bool:
        nonlocal crashes
        if not fleet.alive("agg"):
            assert fleet.procs["agg"].returncode == 70, fleet.tail("agg")
            crashes += 1
            fleet.start("agg", "aggregator", "--name", "agg", faults=faults)
        return any(read_dead_letter(d).ident == "u-poison"
                   for d in read_stream(broker_url, names.dead_log, "first", idle=0.2))

    wait_until(poison_dead, 200, "the poison update in dead letters", poll=0.5)
    dead = {dl.ident: dl.reason for d in read_stream(broker_url, names.dead_log, "first", idle=0.5)
            if (dl := read_dead_letter(d)).ident}
    assert dead["u-poison"] == DELIVERY_LIMIT
    deliveries = TopologyConfig().update_delivery_limit + 1
    if crash == "raise":
        assert fleet.alive("agg")
        assert fleet.log("agg").count("update crashed the aggregator") == deliveries
        wait_until(lambda: {u.update_id for u in good} <= {i for v in _versions(broker_url, names)
                                                          for i in v.included}, 30, "every good update folded")
    else:
        assert crashes >= deliveries - 1  # the last crash may not have been reaped yet
        assert fleet.log("agg").count("fault injected: exit point=aggregator.handle key=u-poison") == deliveries
        # updates prefetched beside the poison die with it each time: folded, or dead with the limit
        wait_until(lambda: {u.update_id for u in good} <= {i for v in _versions(broker_url, names)
                                                          for i in v.included} | set(dead), 30,
                   "every good update resolved")
        assert {r for i, r in dead.items() if i.startswith("u-good")} <= {DELIVERY_LIMIT}
    _assert_ledger_ok(broker_url, names)


@pytest.mark.timeout(360)
def test_a_restarted_coordinator_resumes_without_issuing_work_twice(
        broker_url: str, job: str, tmp_path: Path, fleet: Fleet) -> None:
    names = JobNames(job)
    files = write_job(tmp_path, sites=2, strategy={"name": "fedbuff", "buffer_size": 2, "flush_timeout": 1.0},
                      coordinator={"concurrency": 3, "max_versions": 4, "max_seconds": 300})
    arm = tmp_path / "arm-coordinator"
    arm.touch()
    faults = f"coordinator.after_task_publish=stop:{arm}"
    fleet.start("coordinator", "coordinator", "--config", str(files.config), faults=faults)
    wait_until(lambda: fleet.state("coordinator") == "T", 150,
               "the coordinator to freeze right after publishing its first task")
    fleet.kill("coordinator")
    assert count_stream(broker_url, names.tasks_log) == 1
    assert len(_events(broker_url, names, EventKind.TASK_ISSUED)) == 1  # announced before it went out

    def ready_tasks() -> int:
        with Connection(broker_url, name="fedmq-test-stats").open() as conn:
            return conn.queue_stats(names.tasks)[0]

    for restart in range(2):  # killed mid-issue, then killed at rest
        fleet.restart("coordinator")
        wait_until(lambda: count_stream(broker_url, names.tasks_log) >= 3, 150, "three outstanding tasks")
        wait_until(lambda: "coordinator resumed" in fleet.log("coordinator"), 60, "the coordinator to resume")
        # its loop tops up right after resuming: a wrong top-up would show within this window
        holds_for(lambda: count_stream(broker_url, names.tasks_log) == 3, 3.0, f"3 tasks after restart {restart}")
        assert ready_tasks() == 3
        fleet.kill("coordinator")

    fleet.restart("coordinator")
    fleet.start("aggregator", "aggregator", "--name", "aggregator")
    for i in range(2):
        fleet.start(f"site-{i}", "worker", "--site", f"site-{i}", "--data", str(files.sites[i]))
    assert fleet.wait("coordinator", 200) == 0, fleet.tail("coordinator")
    finished = _events(broker_url, names, EventKind.JOB_FINISHED)
    assert len(finished) == 1 and finished[0].data["stop_reason"] == "max_versions"
    _assert_ledger_ok(broker_url, names)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("max_staleness", [50, 1])
def test_a_task_past_its_deadline_is_replaced_and_its_late_update_is_folded_or_dead_lettered_stale(
        broker_url: str, job: str, tmp_path: Path, fleet: Fleet, max_staleness: int) -> None:
    names = JobNames(job)
    files = write_job(tmp_path, sites=2,
                      strategy={"name": "fedasync", "flush_timeout": 1.0, "max_staleness": max_staleness},
                      coordinator={"concurrency": 2, "max_versions": 500, "max_seconds": 240, "task_deadline": 3})
    fleet.start("coordinator", "coordinator", "--config", str(files.config))
    fleet.start("aggregator", "aggregator", "--name", "aggregator")
    fleet.start("fast", "worker", "--site", "fast", "--data", str(files.sites[1]), "--min-task-seconds", "0.3")
    # the slow site joins a running job, so versions move on while it trains
    wait_until(lambda: "update published" in fleet.log("fast"), 150, "the fast site's first update")
    fleet.start("slow", "worker", "--site", "slow", "--data", str(files.sites[0]), "--min-task-seconds", "6")
    slow_task = wait_until(lambda: _tasks_received(fleet.log("slow")), 150, "the slow site's first task")[0]
    uid = f"u-{slow_task}"

    def resolved() -> bool:
        return (any(uid in v.included for v in _versions(broker_url, names))
                or any(read_dead_letter(d).ident == uid for d in read_stream(broker_url, names.dead_log, "first")))

    wait_until(resolved, 150, "the late update to be folded or dead-lettered", poll=1.0)
    fleet.terminate("coordinator")  # enough seen: finish the job now
    assert fleet.wait("coordinator", 120) == 0, fleet.tail("coordinator")

    assert f"task past deadline, reissuing job={job} task={slow_task}" in fleet.log("coordinator")
    if max_staleness == 50:
        folded = [c for v in _versions(broker_url, names) for c in v.contributions if c["update_id"] == uid]
        assert len(folded) == 1 and folded[0]["site"] == "slow" and folded[0]["staleness"] >= 1, folded
    else:
        dead = [read_dead_letter(d) for d in read_stream(broker_url, names.dead_log, "first", idle=0.5)]
        assert [dl.reason for dl in dead if dl.ident == uid] == ["stale"]
    _assert_ledger_ok(broker_url, names)
