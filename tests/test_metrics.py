"""Prometheus metrics: the hooks land in /metrics, a real aggregator process serves its counters
on --metrics-port, and the container health check tells a live endpoint from a dead one."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedmq.shared import metrics
from fedmq.shared.config import StrategyConfig
from fedmq.shared.errors import ConfigError
from tests.brokers import free_port
from tests.conftest import ROOT, child_env, fedmq_cmd
from tests.jobkit import declare_job_with_v0, make_update, publish_updates, wait_for_version

pytestmark = pytest.mark.timeout(120)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a text exposition."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture(scope="module")
def endpoint() -> str:
    return f"http://127.0.0.1:{metrics.serve(0, addr='127.0.0.1')}/metrics"


def test_hooks_are_scraped_with_their_labels(endpoint: str) -> None:
    job = f"m-{uuid.uuid4().hex[:8]}"
    for tau in (0, 1, 1, 5):
        metrics.update_folded(job, tau, 0.002)
    metrics.version_published(job, 1, 4, 0.01)
    metrics.update_dead_lettered(job, "norm_bound")
    metrics.update_dead_lettered(job, "norm_bound")
    metrics.update_dead_lettered(job, "stale")
    metrics.task_trained(job, "site-3", 2.5)
    metrics.reconnected(job, "worker")
    got = samples(metrics.scrape(endpoint))
    j = (("job", job),)
    assert got[("fedmq_updates_applied_total", j)] == 4
    assert got[("fedmq_versions_published_total", j)] == 1
    assert got[("fedmq_model_version", j)] == 1
    assert got[("fedmq_updates_dead_lettered_total", (("job", job), ("reason", "norm_bound")))] == 2
    assert got[("fedmq_updates_dead_lettered_total", (("job", job), ("reason", "stale")))] == 1
    assert got[("fedmq_update_staleness_versions_count", j)] == 4
    assert got[("fedmq_update_staleness_versions_sum", j)] == 7
    assert got[("fedmq_update_staleness_versions_bucket", (("job", job), ("le", "1.0")))] == 3
    assert got[("fedmq_training_seconds_count", (("job", job), ("site", "site-3")))] == 1
    assert got[("fedmq_reconnects_total", (("job", job), ("role", "worker")))] == 1
    assert ("process_start_time_seconds", ()) in got


def test_a_port_in_use_is_a_config_error(endpoint: str) -> None:
    port = int(endpoint.split(":")[2].split("/")[0])
    with pytest.raises(ConfigError, match="cannot listen"):
        metrics.serve(port, addr="127.0.0.1")


def test_healthcheck_passes_on_a_live_endpoint_and_fails_on_a_dead_one(endpoint: str, broker_url: str) -> None:
    port = endpoint.split(":")[2].split("/")[0]
    assert metrics.healthcheck({"FEDMQ_METRICS_PORT": port}) == 0
    assert metrics.healthcheck({"FEDMQ_METRICS_PORT": str(free_port())}) == 1
    assert metrics.healthcheck({"FEDMQ_METRICS_PORT": "0", "FEDMQ_BROKER_URL": broker_url}) == 0
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"
    assert metrics.healthcheck({"FEDMQ_METRICS_PORT": "0", "FEDMQ_BROKER_URL": dead}) == 1


def test_aggregator_process_serves_its_counters_on_metrics_port(broker_url: str, job: str) -> None:
    v0 = declare_job_with_v0(broker_url, job, StrategyConfig(buffer_size=2))
    port = free_port()
    proc = subprocess.Popen(fedmq_cmd("aggregator", "--broker", broker_url, "--job", job, "--name", "agg-m",
                                      "--metrics-port", str(port)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env(), cwd=ROOT)
    try:
        publish_updates(broker_url, job, [make_update(job, f"u{i}", dict(v0.weights), site=f"s{i}", seed=i)
                                          for i in range(4)])
        wait_for_version(broker_url, job, 2, timeout=60)
        deadline = time.monotonic() + 20
        while True:
            try:
                got = samples(metrics.scrape(f"http://127.0.0.1:{port}/metrics"))
                if got.get(("fedmq_versions_published_total", (("job", job),))) == 2:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "aggregator /metrics never showed 2 versions"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    j = (("job", job),)
    assert got[("fedmq_updates_applied_total", j)] == 4
    assert got[("fedmq_aggregator_active", j)] == 1
    assert got[("fedmq_update_staleness_versions_count", j)] == 4
    assert got[("fedmq_publish_seconds_count", j)] == 2
    assert got[("fedmq_fold_seconds_count", j)] == 4
    assert proc.returncode == 0, err.decode()[-2000:]


def test_a_replica_with_nothing_delivered_exports_active_0(broker_url: str, job: str) -> None:
    """A standby (no delivery yet) says so on /metrics, so `sum(fedmq_aggregator_active)` alerts work."""
    declare_job_with_v0(broker_url, job, StrategyConfig(buffer_size=2))
    port = free_port()
    proc = subprocess.Popen(fedmq_cmd("aggregator", "--broker", broker_url, "--job", job, "--name", "agg-standby",
                                      "--metrics-port", str(port)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env(), cwd=ROOT)
    key = ("fedmq_aggregator_active", (("job", job),))
    try:
        deadline = time.monotonic() + 30
        got: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        while key not in got:
            assert time.monotonic() < deadline, "aggregator /metrics never showed fedmq_aggregator_active"
            try:
                got = samples(metrics.scrape(f"http://127.0.0.1:{port}/metrics"))
            except OSError:
                pass
            time.sleep(0.2)
        assert got[key] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()[-2000:]
