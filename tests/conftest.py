"""Fixtures: one real broker for the session, a fresh job id per test, and helpers to run roles
as real processes. Never a mock broker."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedmq.shared.broker import Connection, JobNames
from tests.brokers import LOCAL_URL, PrivateBroker, broker_answers, docker_available

ROOT = Path(__file__).resolve().parent.parent


def _find_broker() -> Iterator[str]:
    env_url = os.environ.get("FEDMQ_BROKER_URL")
    if env_url:
        if not broker_answers(env_url):
            pytest.exit("FEDMQ_BROKER_URL is set but the broker does not answer", returncode=3)
        yield env_url
        return
    if broker_answers(LOCAL_URL):
        yield LOCAL_URL
        return
    if docker_available():
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:3.10") as rmq:
            host, port = rmq.get_container_host_ip(), rmq.get_exposed_port(5672)
            yield f"amqp://guest:guest@{host}:{port}/%2F"
        return
    if PrivateBroker.available():
        node = PrivateBroker()
        try:
            node.start()
            yield node.url
        finally:
            node.cleanup()
        return
    pytest.exit("no RabbitMQ broker: set FEDMQ_BROKER_URL, start one on localhost, "
                "or install rabbitmq-server (make test does that)", returncode=3)


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    yield from _find_broker()


@pytest.fixture()
def job(broker_url: str) -> Iterator[str]:
    """A unique job id; its queues and streams are deleted after the test."""
    job_id = f"t-{uuid.uuid4().hex[:10]}"
    yield job_id
    try:
        with Connection(broker_url, name="fedmq-test-cleanup").open() as conn:
            conn.delete_job(JobNames(job_id))
    except Exception:
        pass


@pytest.fixture()
def private_broker() -> Iterator[PrivateBroker]:
    """A broker node of the test's own, which it may stop and restart."""
    if not PrivateBroker.available():
        pytest.skip("rabbitmq-server is not installed: cannot start a private node")
    node = PrivateBroker()
    try:
        node.start()
        yield node
    finally:
        node.cleanup()


def fedmq_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedmq", *args]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    env.update(extra)
    return env


def run_fedmq(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the real console entry point in a child process of its own process group: on a timeout
    the whole group (a demo's coordinator, aggregators and workers too) is SIGKILLed."""
    from bench.common import run_group

    return run_group(fedmq_cmd(*args), timeout=timeout, env=child_env(**env), cwd=ROOT)
