"""Least privilege, on a real broker: a site user with exactly `site_permissions` can do what a
site needs and nothing else. Every AMQP operation a credential could attempt is tried; each one a
site does not need must be refused by the broker itself (403 ACCESS_REFUSED).

Runs on a private node (own users); the shared broker is never reconfigured."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedmq.shared.broker import Connection, JobNames, TopologyConfig, amqp_errors, site_permissions
from fedmq.shared.errors import BrokerAccessError
from fedmq.shared.messages import Event
from tests.brokers import PrivateBroker
from tests.conftest import ROOT, run_fedmq

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

JOB, SITE, OTHER, PASSWORD = "job-1", "site-3", "site-4", "s1te-3-pw"
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
N = JobNames(JOB)


def test_documented_commands_are_the_ones_the_code_grants() -> None:
    doc = re.sub(r"\s+", " ", (ROOT / "docs" / "security.md").read_text())
    for cmd in site_permissions(JOB, SITE).commands():
        quoted = " ".join(a if re.fullmatch(r"[\w./-]+", a) else f"'{a}'" for a in cmd)
        assert f"rabbitmqctl {quoted}" in doc, quoted


def _ctl(node: PrivateBroker, *args: str) -> None:
    env = dict(os.environ, RABBITMQ_NODENAME=node.name, HOME=str(node.base))
    res = subprocess.run([CTL, "-n", node.name, *args], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, f"rabbitmqctl {' '.join(args)}: {res.stdout} {res.stderr}"


@pytest.fixture(scope="module")
def site_url() -> Iterator[str]:
    if not (PrivateBroker.available() and Path(CTL).exists()):
        pytest.skip("rabbitmq-server is not installed: cannot start a private node")
    node = PrivateBroker()
    node.start()
    try:
        with Connection(node.url, name="fedmq-test-owner").open() as owner:
            owner.declare_job(N, TopologyConfig(sites=(SITE, OTHER)))
            owner.declare_encrypted(N, TopologyConfig(sites=(SITE, OTHER)))
            owner.publish(N.tasks_exchange, "task", b"a task")
        _ctl(node, "add_user", SITE, PASSWORD)
        for cmd in site_permissions(JOB, SITE).commands():
            _ctl(node, *cmd)
        yield f"amqp://{SITE}:{PASSWORD}@127.0.0.1:{node.port}/%2F"
    finally:
        node.cleanup()


def _as_site(url: str, op: Callable[[Connection], object]) -> None:
    conn = Connection(url, name="fedmq-test-site").open()
    try:
        op(conn)
    finally:
        conn.close()


def _bind_queue(queue: str, exchange: str) -> Callable[[Connection], None]:
    def op(c: Connection) -> None:
        ch = c.channel()
        with amqp_errors(c.url):
            ch.queue_bind(queue, exchange, routing_key="#")
    return op


def _bind_exchange(dest: str, source: str) -> Callable[[Connection], None]:
    def op(c: Connection) -> None:
        ch = c.channel()
        with amqp_errors(c.url):
            ch.exchange_bind(dest, source, routing_key="#")
    return op


def _declare_exchange(name: str) -> Callable[[Connection], None]:
    def op(c: Connection) -> None:
        ch = c.channel()
        with amqp_errors(c.url):
            ch.exchange_declare(name, "fanout", durable=True)
    return op


def _consume(queue: str, offset: bool = False) -> Callable[[Connection], str]:
    args = {"x-stream-offset": "first"} if offset else None
    return lambda c: c.consume(queue, lambda d: None, prefetch=1, arguments=args)


def _event(kind: str) -> bytes:
    return Event(job=JOB, event=kind, source=SITE, data={"site": SITE}).encode()


#: everything a site does: take tasks, read model versions, publish its updates and its events
ALLOWED: dict[str, Callable[[Connection], object]] = {
    "consume tasks": _consume(N.tasks),
    "consume models stream": _consume(N.models, offset=True),
    "publish update as itself": lambda c: c.publish(N.updates_exchange, SITE, b"update"),
    "publish update_published event": lambda c: c.publish(
        N.events_exchange, f"site.{SITE}.update_published", _event("update_published")),
    "publish task_refused event": lambda c: c.publish(
        N.events_exchange, f"site.{SITE}.task_refused", _event("task_refused")),
}

#: every other operation on the job's resources (and a few beyond them), each refused by the broker
FORBIDDEN: dict[str, Callable[[Connection], object]] = {
    # publish: as another site, trusted events, other exchanges, the default exchange
    "publish update as another site": lambda c: c.publish(N.updates_exchange, OTHER, b"forged"),
    "publish site event as another site": lambda c: c.publish(
        N.events_exchange, f"site.{OTHER}.update_published", _event("update_published")),
    "publish a trusted event": lambda c: c.publish(N.events_exchange, "job_finished", _event("job_finished")),
    "publish a trusted kind under its own key": lambda c: c.publish(
        N.events_exchange, f"site.{SITE}.dead_lettered", _event("dead_lettered")),
    "publish a task": lambda c: c.publish(N.tasks_exchange, "task", b"x"),
    "publish a model version": lambda c: c.publish(N.models_exchange, "", b"x"),
    "publish a dead letter": lambda c: c.publish(N.dead_exchange, "", b"x"),
    "publish an encrypted aggregate": lambda c: c.publish(N.aggregates_exchange, "", b"x"),
    "publish to the default exchange (updates queue)": lambda c: c.publish("", N.updates, b"x"),
    "publish to the default exchange (tasks queue)": lambda c: c.publish("", N.tasks, b"x"),
    "publish to the default exchange (own updates queue)": lambda c: c.publish("", N.site_updates(SITE), b"x"),
    "publish to the default exchange (aggregator lock)": lambda c: c.publish("", N.aggregator_lock, b"x"),
    "publish to the internal sites exchange": lambda c: c.publish(N.sites_exchange, OTHER, b"x"),
    "publish to the internal unlisted exchange": lambda c: c.publish(N.unlisted_exchange, "", b"x"),
    # consume what belongs to the aggregator, the coordinator or the auditor
    "consume updates": _consume(N.updates),
    "consume updates log": _consume(N.updates_log, offset=True),
    "consume events": _consume(N.events, offset=True),
    "consume dead letters": _consume(N.dead),
    "consume dead log": _consume(N.dead_log, offset=True),
    "consume tasks log": _consume(N.tasks_log, offset=True),
    "consume aggregates": _consume(N.aggregates),
    "consume own updates queue": _consume(N.site_updates(SITE)),
    "consume another site's updates queue": _consume(N.site_updates(OTHER)),
    "consume the aggregator lock (take the token)": _consume(N.aggregator_lock),
    # re-route: bindings into queues and between exchanges
    "bind models exchange into updates queue": _bind_queue(N.updates, N.models_exchange),
    "bind updates exchange into tasks queue": _bind_queue(N.tasks, N.updates_exchange),
    "bind tasks exchange into updates queue": _bind_queue(N.updates, N.tasks_exchange),
    "bind models exchange into updates exchange": _bind_exchange(N.updates_exchange, N.models_exchange),
    "bind updates exchange into events exchange": _bind_exchange(N.events_exchange, N.updates_exchange),
    "bind tasks exchange into updates exchange": _bind_exchange(N.updates_exchange, N.tasks_exchange),
    "bind updates exchange into another site's queue": _bind_queue(N.site_updates(OTHER), N.updates_exchange),
    "bind sites exchange into tasks queue": _bind_queue(N.tasks, N.sites_exchange),
    # declare, delete, purge
    "declare a job": lambda c: c.declare_job(JobNames("job-2"), TopologyConfig()),
    "declare an exchange": _declare_exchange("fedmq.job-1.mine.x"),
    "delete tasks queue": lambda c: c.delete_queue(N.tasks),
    "delete updates queue": lambda c: c.delete_queue(N.updates),
    "delete models stream": lambda c: c.delete_queue(N.models),
    "delete updates exchange": lambda c: c.delete_exchange(N.updates_exchange),
    "purge updates queue": lambda c: c.purge_queue(N.updates),
    "purge dead letters": lambda c: c.purge_queue(N.dead),
    "purge own updates queue": lambda c: c.purge_queue(N.site_updates(SITE)),
    "delete another site's updates queue": lambda c: c.delete_queue(N.site_updates(OTHER)),
    "delete the aggregator lock": lambda c: c.delete_queue(N.aggregator_lock),
}


@pytest.mark.parametrize("name", list(ALLOWED))
def test_a_site_can_do_what_it_needs(site_url: str, name: str) -> None:
    _as_site(site_url, ALLOWED[name])


@pytest.mark.parametrize("name", list(FORBIDDEN))
def test_the_broker_refuses_a_site_everything_else(site_url: str, name: str) -> None:
    with pytest.raises(BrokerAccessError, match="ACCESS_REFUSED|refused"):
        _as_site(site_url, FORBIDDEN[name])


def test_read_on_tasks_still_allows_purging_it_the_one_residual(site_url: str) -> None:
    """RabbitMQ ties queue.purge to read permission, which consuming needs: docs/security.md lists
    this residual and its bound (the coordinator reissues a purged task at its deadline)."""
    _as_site(site_url, lambda c: c.purge_queue(N.tasks))


def test_fedmq_permissions_prints_exactly_these_grants() -> None:
    res = run_fedmq("permissions", "--job", JOB, "--site", SITE, "--json", timeout=60)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])["commands"]
    assert got == [["rabbitmqctl", *c] for c in site_permissions(JOB, SITE).commands()]
    bad = run_fedmq("permissions", "--job", JOB, "--site", "no such site", timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
