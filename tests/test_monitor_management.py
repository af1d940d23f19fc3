"""`fedmq monitor --management-url`: with the management plugin on (a private node of the test's
own, never the shared broker), queue rows gain unacked counts that passive declares cannot see."""

from __future__ import annotations

import time
import urllib.request

import pytest

from fedmq.monitor import Monitor
from fedmq.shared.broker import Connection, JobNames
from fedmq.shared.config import StrategyConfig
from fedmq.shared.jobstate import emit
from fedmq.shared.messages import EventKind
from tests.brokers import PrivateBroker, free_port
from tests.jobkit import declare_job_with_v0
from tests.test_monitor import _publish_tasks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_management_api_adds_unacked_counts_to_the_snapshot() -> None:
    if not PrivateBroker.available():
        pytest.skip("rabbitmq-server is not installed: cannot start a private node")
    node = PrivateBroker()
    http = free_port()
    (node.base / "enabled_plugins").write_text("[rabbitmq_management].\n")
    with (node.base / "rabbitmq.conf").open("a") as conf:
        conf.write(f"management.tcp.port = {http}\nmanagement.tcp.ip = 127.0.0.1\n")
    node.start()
    try:
        api = f"http://127.0.0.1:{http}"
        _wait_http(api)
        job, names = "mgmt-job", JobNames("mgmt-job")
        declare_job_with_v0(node.url, job, StrategyConfig())
        with Connection(node.url, name="fedmq-test").open() as conn:
            emit(conn, names, "coordinator", EventKind.JOB_STARTED, strategy="fedbuff", params={})
            _publish_tasks(conn, names, 3)
        worker = Connection(node.url, name="fedmq-test-worker").open()
        try:
            worker.consume(names.tasks, lambda d: None, prefetch=1)
            worker.process(0.3)
            with Monitor(node.url, job, management_url=api) as mon:
                deadline = time.monotonic() + 30  # the API's queue stats refresh every few seconds
                while True:
                    snap = mon.snapshot().to_dict()
                    tasks = snap["queues"]["tasks"]
                    if tasks["unacked"] == 1 or time.monotonic() > deadline:
                        break
                    time.sleep(1)
            with Monitor(node.url, job) as plain:
                amqp_only = plain.snapshot().to_dict()
        finally:
            worker.close()
    finally:
        node.cleanup()
    assert snap["management_api"] is True
    assert (tasks["messages"], tasks["unacked"], tasks["consumers"]) == (3, 1, 1)
    assert amqp_only["management_api"] is False
    assert (amqp_only["queues"]["tasks"]["messages"], amqp_only["queues"]["tasks"]["unacked"]) == (2, None)
