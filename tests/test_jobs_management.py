"""`fedmq jobs` discovering every job through a real management plugin: a private node of our own
with rabbitmq_management enabled on its own HTTP port (the shared test broker runs without it)."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator

import pytest

from fedmq.shared.broker import Connection
from fedmq.shared.config import StrategyConfig
from tests.brokers import PrivateBroker
from tests.conftest import run_fedmq
from tests.jobkit import declare_job_with_v0

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def node() -> Iterator[PrivateBroker]:
    if not PrivateBroker.available():
        pytest.skip("rabbitmq-server is not installed here: no private node with the management plugin")
    broker = PrivateBroker(management=True)
    try:
        broker.start(timeout=120)
        _wait_for_http(broker.management_url + "/api/overview", 60)
        yield broker
    finally:
        broker.stop()


def _wait_for_http(url: str, timeout: float) -> None:
    """The plugin's listener comes up a little after AMQP answers."""
    req = urllib.request.Request(url, headers={"Authorization": "Basic Z3Vlc3Q6Z3Vlc3Q="})  # guest:guest
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(req, timeout=2):  # noqa: S310 - our own node
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_jobs_discovers_every_job_through_the_management_api(node: PrivateBroker) -> None:
    jobs = ["mgmt-a", "mgmt-b"]
    for job in jobs:
        declare_job_with_v0(node.url, job, StrategyConfig())
    with Connection(node.url, name="fedmq-test-unrelated").open() as conn:
        conn.channel().queue_declare("not-a-fedmq-queue")  # a broker holds other queues too
    proc = run_fedmq("jobs", "--broker", node.url, "--management-url", node.management_url, "--json", timeout=90)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout.strip().splitlines()[-1])["jobs"]
    assert sorted(r["job"] for r in rows) == jobs
    assert all(r["latest_version"] == 0 and r["state"] != "finished" for r in rows), rows
    proc = run_fedmq("delete", "--broker", node.url, "--job", "mgmt-a", "--force", timeout=60)
    assert proc.returncode == 0, proc.stderr
    proc = run_fedmq("jobs", "--broker", node.url, "--management-url", node.management_url, "--json", timeout=90)
    assert [r["job"] for r in json.loads(proc.stdout.strip().splitlines()[-1])["jobs"]] == ["mgmt-b"]
