"""fedmq on a RabbitMQ cluster: a node list with failover, replicated queues and streams.

The slow test starts a 3-node cluster of private nodes (tests/cluster_nodes.py), runs a real job
(every role an OS process, each given the node list in another order so clients sit on every
node), SIGKILLs the node leading the updates queue mid-job, and then requires from the streams
alone: the job reached its target, every logged update is in exactly one version or in dead
letters, and `fedmq replay` recomputes every version without a mismatch.

Set FEDMQ_TEST_CLUSTER_SUMMARY=path to keep the measured figures as JSON.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from fedmq.shared import broker
from fedmq.shared.broker import Connection, ConnectionLostError, JobNames, TopologyConfig, broker_urls, mask_url
from fedmq.shared.config import env_names, load_job_config
from fedmq.shared.ledger import read_ledger
from fedmq.shared.messages import Event, EventKind
from tests.brokers import PrivateBroker, free_port
from tests.chaos.harness import Fleet, Follower, recompute, wait_until, write_job
from tests.cluster_nodes import Cluster, ClusterError
from tests.conftest import ROOT, run_fedmq
from tests.test_compose import cli_env_names, fedmq_services, interpolate

SECRET = "s3cret-pw"
SITES = 4
AGGREGATORS = 2
BUFFER = 3
TARGET_ACCURACY = 0.93
KILL_AT_VERSION = 3
CLUSTER_COMPOSE = ROOT / "docker-compose.cluster.yml"


# ------------------------------------------------------------------------ node lists, no cluster


def test_a_node_list_connects_to_the_first_node_that_answers(broker_url: str) -> None:
    dead = f"amqp://guest:{SECRET}@127.0.0.1:{free_port()}/%2F"
    started = time.monotonic()
    with Connection(f"{dead},{broker_url}", name="fedmq-test-node-list").open() as conn:
        assert conn.node_url == broker_url
        conn.process(0)
    assert time.monotonic() - started < 5  # a refused node costs one refused connect, not a timeout


def test_every_password_of_a_node_list_is_masked() -> None:
    urls = f"amqp://a:{SECRET}@h1:5672/%2F, amqps://b:{SECRET}@h2:5671/v"
    masked = mask_url(urls)
    assert SECRET not in masked and masked.count("***") == 2
    assert SECRET not in mask_url(f"amqp://a:pa,{SECRET}@h/%2F")  # an unescaped comma in a password


@pytest.mark.parametrize("urls, words", [
    (f"amqp://guest:{SECRET}@h1/%2F,,amqp://guest:{SECRET}@h2/%2F", "has an empty entry"),
    (f"amqp://guest:{SECRET}@h1/%2F,", "has an empty entry"),
    (f"amqp://guest:{SECRET}@h1/%2F,notaurl://h2", "notaurl://h2 must start with amqp:// or amqps://"),
    (f"amqp://guest:{SECRET}@h1/%2F,amqp://guest:{SECRET}@h2:notaport/", "is not valid"),
    (" , ", "broker URL is empty"),
])
def test_a_malformed_node_list_exits_2_with_one_line(urls: str, words: str) -> None:
    for how in ("flag", "env") if "empty entry" in words else ("flag",):  # each CLI start costs seconds
        args = ["aggregator", "--job", "j", "--broker-wait", "0"]
        proc = (run_fedmq(*args, "--broker", urls, timeout=60) if how == "flag"
                else run_fedmq(*args, timeout=60, FEDMQ_BROKER_URL=urls))
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (how, proc.stderr)
        assert words in lines[0] and SECRET not in proc.stderr, (how, lines[0])


def test_replica_arguments_follow_the_config() -> None:
    three, none = TopologyConfig(), TopologyConfig(replicas=0)
    assert three.quorum_size() == {"x-quorum-initial-group-size": 3}
    assert three.stream_args() == {"x-queue-type": "stream", "x-initial-cluster-size": 3}
    assert none.quorum_size() == {} and none.stream_args() == {"x-queue-type": "stream"}


# ------------------------------------------------------------------------ the real cluster


@pytest.fixture()
def cluster() -> Iterator[Cluster]:
    """Three private nodes joined into one cluster; every node stopped by pid afterwards."""
    if not PrivateBroker.available():
        pytest.skip("rabbitmq-server is not installed: cannot start private nodes")
    nodes = Cluster(3)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.cleanup()


def _declared(cluster: Cluster, names: JobNames) -> dict[str, tuple[str, list[str]]]:
    """The cluster's queues once the job's whole topology exists (the tasks log comes last), else {}."""
    try:
        queues = cluster.queues()
    except ClusterError:  # every CLI call timed out (a loaded machine): ask again
        return {}
    return queues if names.tasks_log in queues else {}


def _new_leader(cluster: Cluster, queue: str, old: str) -> str:
    try:
        lead = cluster.queues().get(queue, ("", []))[0]
    except ClusterError:
        return ""
    return lead if lead and lead != old else ""


def _result(log: str) -> dict[str, Any]:
    lines = [line for line in log.splitlines() if line.startswith("{")]
    assert lines, "the coordinator printed no result"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


class Progress:
    """Follows the job's events stream over the cluster (the follower fails over too)."""

    def __init__(self, url: str, job: str) -> None:
        self.events = Follower(url, JobNames(job).events)
        self.version = 0
        self.published: list[tuple[float, int, str]] = []  # (event ts, version, replica)

    def poll(self) -> None:
        for d in self.events.poll(0.2):
            ev = Event.decode(d.body)
            if ev.event == EventKind.VERSION_PUBLISHED:
                self.version = max(self.version, int(ev.data["version"]))
                self.published.append((ev.ts, int(ev.data["version"]), str(ev.data.get("replica"))))

    def first_version_after(self, at: float) -> tuple[float, int, str] | None:
        return next((p for p in self.published if p[0] > at), None)


@pytest.mark.slow
@pytest.mark.timeout(540)
def test_a_job_survives_sigkill_of_the_node_leading_the_updates_queue(cluster: Cluster, tmp_path: Path) -> None:
    started = time.monotonic()
    job = f"cluster-{uuid.uuid4().hex[:8]}"
    names = JobNames(job)
    files = write_job(tmp_path, sites=SITES,
                      strategy={"name": "fedbuff", "buffer_size": BUFFER, "flush_timeout": 1.0, "max_staleness": 50},
                      coordinator={"concurrency": SITES, "max_versions": 150, "max_seconds": 300,
                                   "task_deadline": 60, "target_accuracy": TARGET_ACCURACY})
    fleet = Fleet(cluster.url, job, tmp_path / "logs")
    progress = Progress(cluster.rotated_url(1), job)
    summary: dict[str, Any] = {"job": job, "cluster_formed_seconds": round(cluster.formed_seconds or 0, 1)}
    try:
        # the last --broker wins: each role gets the node list starting at another node
        fleet.start("coordinator", "coordinator", "--config", str(files.config), "--json",
                    "--broker", cluster.rotated_url(0))
        for i in range(AGGREGATORS):
            fleet.start(f"agg-{i}", "aggregator", "--name", f"agg-{i}", "--broker", cluster.rotated_url(i + 1))
        for i, data in enumerate(files.sites):
            fleet.start(f"site-{i}", "worker", "--site", f"site-{i}", "--data", str(data),
                        "--min-task-seconds", "1.5", "--broker", cluster.rotated_url(i))
        deadline = time.monotonic() + 240

        # replicated on every node, as declared (asked once the topology exists, before work starts)
        queues = wait_until(lambda: _declared(cluster, names), 120, "the job's topology", poll=1.0)
        for q in (names.updates, names.tasks, names.dead, names.models, names.updates_log, names.events):
            assert len(queues[q][1]) == 3, (q, queues[q])
        leader = cluster.node_named(queues[names.updates][0])
        while progress.version < KILL_AT_VERSION:
            progress.poll()
            assert not fleet.exited_unexpectedly(), {n: fleet.tail(n) for n in fleet.exited_unexpectedly()}
            assert fleet.alive("coordinator"), fleet.tail("coordinator")
            assert time.monotonic() < deadline, f"job stuck at version {progress.version}"
        assert fleet.alive("coordinator") and progress.version < 8, "the job ran ahead of the kill"
        summary["killed_node"] = leader.name
        summary["version_at_kill"] = progress.version
        killed_at = cluster.kill(leader)
        survivors = cluster.alive()
        assert len(survivors) == 2

        new_leader = wait_until(lambda: _new_leader(cluster, names.updates, leader.name), 120,
                                "a new leader of the updates queue", poll=1.0)
        summary["new_updates_leader_seen_after_s"] = round(time.time() - killed_at, 2)  # includes rabbitmqctl
        while fleet.alive("coordinator"):
            progress.poll()
            bad = fleet.exited_unexpectedly()
            assert not bad, "\n".join(f"{n} exited {rc}:\n{fleet.tail(n)}" for n, rc in bad.items())
            assert time.monotonic() - started < 480, "the job did not finish in time"
        assert fleet.wait("coordinator", 1) == 0, fleet.tail("coordinator")
        for name in [f"site-{i}" for i in range(SITES)] + [f"agg-{i}" for i in range(AGGREGATORS)]:
            assert fleet.wait(name, 90) == 0, fleet.tail(name)
        progress.poll()
        result = _result(fleet.log("coordinator"))
        survivor_urls = ",".join(n.url for n in survivors)
        report = read_ledger(survivor_urls, names).check()
        redo = recompute(survivor_urls, names)
        replay = run_fedmq("replay", "--broker", cluster.url, "--job", job, "--json", timeout=180)
    finally:
        progress.events.close()
        fleet.close()

    after = progress.first_version_after(killed_at)
    logs = {n: fleet.log(n) for n in fleet.procs}
    summary.update({
        "wall_seconds": round(time.monotonic() - started, 1),
        "new_updates_leader": new_leader,
        "first_version_after_kill_s": round(after[0] - killed_at, 2) if after else None,
        "first_version_after_kill": after[1] if after else None,
        "failovers_logged": {n: t.count("failed over to another broker node") for n, t in logs.items()
                             if "failed over" in t},
        "updates_logged": report.logged, "updates_included": report.included,
        "updates_dead_lettered": report.dead_lettered, "versions": report.versions,
        "lost": len(report.lost), "double_counted": len(report.double_counted),
        "final_accuracy": result["final_accuracy"], "stop_reason": result["stop_reason"],
        "final_version": result["final_version"],
        "duplicates_dropped": sum(t.count("duplicate update dropped") for t in logs.values()),
        "updates_republished": sum(t.count("republishing an unconfirmed update") for t in logs.values()),
        "queue_gone_without_cancel": sum(t.count("consumed queue is gone") for t in logs.values()),
    })
    replayed: dict[str, Any] = json.loads(replay.stdout.strip().splitlines()[-1]) if replay.stdout.strip() else {}
    summary["replay"] = {k: replayed.get(k) for k in ("versions_checked", "versions_recomputed", "mismatches",
                                                      "first_mismatch", "updates_replayed", "seconds")}
    print(json.dumps(summary, indent=1))
    if os.environ.get("FEDMQ_TEST_CLUSTER_SUMMARY"):
        Path(os.environ["FEDMQ_TEST_CLUSTER_SUMMARY"]).write_text(json.dumps(summary, indent=1))

    assert result["stop_reason"] == "target_accuracy" and result["final_accuracy"] >= TARGET_ACCURACY, result
    assert result["versions"] > summary["version_at_kill"]
    assert after is not None, "no version was published after the node was killed"
    assert report.ok, report.to_dict()
    assert report.logged == report.included + report.dead_lettered
    assert redo.first_mismatch is None and redo.final_equal
    assert replay.returncode == 0, replay.stderr
    assert replayed["mismatches"] == 0 and replayed["first_mismatch"] is None, replayed
    assert replayed["versions_checked"] == report.versions and replayed["versions_recomputed"] == report.versions - 1
    # the roles connected to the killed node moved to a survivor
    assert summary["failovers_logged"], "no role logged a failover"


# ------------------------------------------------------------------------ compose variant, static


def test_the_cluster_compose_file_runs_three_nodes_and_gives_every_role_all_of_them() -> None:
    compose = interpolate(yaml.safe_load(CLUSTER_COMPOSE.read_text()), {})
    services = compose["services"]
    nodes = {n: s for n, s in services.items() if n.startswith("rabbitmq-")}
    assert len(nodes) == 3
    hosts = [s["hostname"] for s in nodes.values()]
    assert sorted(hosts) == sorted(nodes)  # the node name rabbit@<hostname> must not change
    assert len({s["environment"]["RABBITMQ_ERLANG_COOKIE"] for s in nodes.values()}) == 1
    conf = (ROOT / "deploy" / "rabbitmq-cluster.conf").read_text()
    listed = re.findall(r"^cluster_formation\.classic_config\.nodes\.\d+ = rabbit@([\w-]+)$", conf, re.M)
    assert sorted(listed) == sorted(hosts)
    for s in nodes.values():
        assert any(v.startswith("./deploy/rabbitmq-cluster.conf:/etc/rabbitmq/conf.d/") for v in s["volumes"])
    assert {p.split(":")[0] for s in nodes.values() for p in s["ports"]} >= {"5672", "5673", "5674"}

    known = set(env_names()) | cli_env_names()
    roles = fedmq_services(compose)
    assert {"coordinator", "aggregator", "aggregator-standby", "worker"} <= set(roles)
    for name, svc in roles.items():
        env = svc["environment"]
        urls = broker_urls(env["FEDMQ_BROKER_URL"])
        assert [urlsplit(u).hostname for u in urls] == sorted(hosts), name
        assert not {k for k in env if k.startswith("FEDMQ_") and k not in known}, name
        Connection(env["FEDMQ_BROKER_URL"])  # parses (no connect)
    assert load_job_config(None, environ={"FEDMQ_CLUSTER_REPLICAS": roles["coordinator"]["environment"]
                                          ["FEDMQ_CLUSTER_REPLICAS"]}).cluster.replicas == 3


def test_a_publish_whose_confirm_does_not_come_in_time_drops_the_connection(
        broker_url: str, job: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deadline itself, on the real broker: with CONFIRM_TIMEOUT 0 the timer fires before any
    confirm can arrive, so the publish raises ConnectionLostError (the callers' cue to re-send on a
    new connection) instead of waiting, and the connection is given up."""
    names = JobNames(job)
    with Connection(broker_url, name="fedmq-test-confirm") as conn:
        conn.declare_job(names, TopologyConfig())
        monkeypatch.setattr(broker, "CONFIRM_TIMEOUT", 0.0)
        started = time.monotonic()
        with pytest.raises(ConnectionLostError, match="no publisher confirm"):
            conn.publish(names.events_exchange, "probe", b"x")
        assert time.monotonic() - started < 5 and not conn.is_open
    monkeypatch.setattr(broker, "CONFIRM_TIMEOUT", 30.0)
    with Connection(broker_url, name="fedmq-test-confirm-again") as conn:
        conn.publish(names.events_exchange, "probe", b"x")  # a new connection publishes as before
