"""Each site of the registry has its own updates queue, bounded (its share), and one aggregator lock
decides which replica consumes them all: real broker, real connections."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import pytest

from fedmq.shared.broker import Connection, Delivery, JobNames, PublishRefusedError, TopologyConfig
from fedmq.worker.service import Worker, _Outgoing

T = TypeVar("T")
SITES = ("site-a", "site-b")
LIMIT = 5


def _until(check: Callable[[], T | None], conn: Connection, timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        conn.process(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture()
def owner(broker_url: str, job: str) -> Iterator[Connection]:
    conn = Connection(broker_url, name="fedmq-test-share-owner").open()
    try:
        conn.declare_job(JobNames(job), TopologyConfig(replicas=0, sites=SITES, site_queue_limit=LIMIT))
        yield conn
    finally:
        conn.delete_job(JobNames(job), sites=SITES)
        conn.close()


def _fill(conn: Connection, names: JobNames, site: str, most: int) -> int:
    """Publish as `site` until the broker refuses; the number accepted."""
    for i in range(most):
        try:
            conn.publish(names.updates_exchange, site, b"update %d" % i)
        except PublishRefusedError:
            return i
    raise AssertionError(f"{most} publishes as {site} and none refused: no per-site limit")


def test_a_site_at_its_limit_is_refused_while_the_others_still_publish(owner: Connection, job: str) -> None:
    names = JobNames(job)
    accepted = _fill(owner, names, "site-a", 100)
    assert LIMIT <= accepted <= LIMIT + 1  # quorum queues admit one past x-max-length (measured, 3.10)
    assert owner.queue_stats(names.site_updates("site-a"))[0] == accepted
    owner.publish(names.updates_exchange, "site-b", b"an honest update")  # not refused
    assert owner.queue_stats(names.site_updates("site-b"))[0] == 1
    assert owner.queue_stats(names.updates)[0] == 0  # listed sites never reach the shared queue


def test_a_name_outside_the_registry_reaches_the_shared_queue(owner: Connection, job: str) -> None:
    names = JobNames(job)
    owner.publish(names.updates_exchange, "site-z", b"from a name the registry does not list")
    assert owner.queue_stats(names.updates)[0] == 1
    assert all(owner.queue_stats(names.site_updates(s))[0] == 0 for s in SITES)


def test_the_lock_token_goes_to_one_replica_then_to_the_next(owner: Connection, job: str, broker_url: str) -> None:
    names = JobNames(job)
    got: dict[str, list[Delivery]] = {"r1": [], "r2": []}
    r1 = Connection(broker_url, name="fedmq-test-share-r1").open()
    r2 = Connection(broker_url, name="fedmq-test-share-r2").open()
    try:
        r1.open_consumer(names.aggregator_lock, got["r1"].append, prefetch=1)
        _until(lambda: got["r1"], r1, 10, "the token at the first replica")
        r2.open_consumer(names.aggregator_lock, got["r2"].append, prefetch=1)
        owner.declare_job(names, TopologyConfig(replicas=0, sites=SITES, site_queue_limit=LIMIT))  # a restart
        r2.process(0.5)  # a second token, had the restart put one in, would reach r2 now
        assert not got["r2"] and len(got["r1"]) == 1
        r1.close()  # the holder's connection ends: the broker passes the token on
        token = _until(lambda: got["r2"], r2, 10, "the token at the standby")[0]
        assert token.redelivered  # a takeover, as the new active replica reports it
    finally:
        r1.close()
        r2.close()
    # one token, back in the queue once the broker has seen both connections go
    _until(lambda: owner.queue_stats(names.aggregator_lock) == (1, 0), owner, 10, "the token back, alone")


def test_an_honest_worker_refused_at_its_limit_waits_and_publishes_once_there_is_room(
        owner: Connection, job: str, broker_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """The refusal is back-pressure, not a lost connection: the site keeps its connection (and so
    its task) and publishes again once the aggregator has taken updates off its queue."""
    names = JobNames(job)
    full = _fill(owner, names, "site-a", 100)
    rng = np.random.default_rng(0)
    worker = Worker(broker_url, job, "site-a", (rng.normal(size=(8, 4)).astype(np.float32), np.zeros(8, np.int64)))
    failed: list[BaseException] = []
    site = Connection(broker_url, name="fedmq-test-share-site").open()

    def publish() -> None:
        try:
            worker._publish_update(site, _Outgoing("t1", "u-t1", b"the honest update", {}))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            failed.append(exc)

    caplog.set_level(logging.WARNING, logger="fedmq.worker.service")
    thread = threading.Thread(target=publish)
    thread.start()
    try:
        _until(lambda: any("refused" in r.getMessage() for r in caplog.records) or failed, owner, 20,
               "the worker to be refused")
        assert not failed, failed
        taken: list[bytes] = []

        def take(d: Delivery) -> None:  # the aggregator's part: take updates off the site's queue
            taken.append(d.body)
            d.ack()

        owner.consume(names.site_updates("site-a"), take, prefetch=100)
        _until(lambda: b"the honest update" in taken or failed, owner, 30, "the honest update to arrive")
        thread.join(30)
        assert not thread.is_alive() and not failed, failed
        assert len(taken) == full + 1 and taken[-1] == b"the honest update"  # published once, last
    finally:
        thread.join(30)
        site.close()
