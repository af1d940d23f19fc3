"""A worker whose local training outlasts several heartbeat intervals keeps its connection:
training runs off the I/O thread, which keeps answering heartbeats (measured on RabbitMQ 3.10: a silent
connection is closed after 2-3 x the interval)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from sklearn.datasets import load_digits

from fedmq.shared.broker import Connection, ConnectionLostError, Delivery, JobNames
from fedmq.shared.config import StrategyConfig
from fedmq.shared.datasets import save_site
from fedmq.shared.messages import Task, Update
from tests.conftest import ROOT, child_env, fedmq_cmd
from tests.jobkit import declare_job_with_v0

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(120)]

HEARTBEAT = 2
TASK_SECONDS = 8  # > 3 heartbeat intervals


def test_a_connection_that_stops_pumping_io_is_dropped_by_the_broker(broker_url: str) -> None:
    """Control: with this heartbeat, a blocked I/O thread really does lose its connection, so the
    worker test below would fail if training ran on the connection's thread."""
    conn = Connection(broker_url, name="fedmq-test-silent", heartbeat=HEARTBEAT).open()
    try:
        time.sleep(5 * HEARTBEAT)  # stands in for training on the I/O thread
        with pytest.raises(ConnectionLostError):
            for _ in range(20):
                conn.process(0.1)
    finally:
        conn.close()


def test_a_worker_training_longer_than_three_heartbeats_keeps_its_connection(
        broker_url: str, job: str, tmp_path: Path) -> None:
    v0 = declare_job_with_v0(broker_url, job, StrategyConfig())
    digits = load_digits()
    data = tmp_path / "site.npz"
    save_site(data, (digits.data[:200] / 16).astype("float32"), digits.target[:200])
    names = JobNames(job)
    now = time.time()
    task = Task(job=job, task_id="long-task", version=v0.version, epochs=1, batch_size=32, lr=0.05,
                issued_at=now, deadline=now + 300)
    with Connection(broker_url, name="fedmq-test-coordinator").open() as conn:
        conn.publish(names.tasks_exchange, "task", task.encode(), message_id=task.task_id)

    proc = subprocess.run(
        fedmq_cmd("worker", "--broker", broker_url, "--job", job, "--site", "slow-site", "--data", str(data),
                  "--heartbeat", str(HEARTBEAT), "--min-task-seconds", str(TASK_SECONDS), "--max-tasks", "1"),
        capture_output=True, text=True, timeout=90, env=child_env(), cwd=ROOT)

    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "reconnecting" not in proc.stderr and "lost the broker" not in proc.stderr, proc.stderr[-2000:]
    with Connection(broker_url, name="fedmq-test-check").open() as conn:
        assert conn.queue_stats(names.tasks)[0] == 0  # the task was acked, not redelivered
        ready, _ = conn.queue_stats(names.updates)
        assert ready == 1  # exactly one update: training was not restarted after a reconnect
        got: list[bytes] = []

        def _take(d: Delivery) -> None:
            got.append(d.body)
            d.ack()

        conn.consume(names.updates, _take, prefetch=1)
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            conn.process(0.1)
    update = Update.decode(got[0])
    assert update.update_id == task.update_id and update.site == "slow-site"
    assert update.metrics["task_seconds"] >= 3 * HEARTBEAT
