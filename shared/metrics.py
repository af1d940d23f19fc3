"""Prometheus metrics of the roles, served on ``/metrics`` when ``--metrics-port`` is set.

The roles call the small functions below (one line per hook); prometheus-client only appears here.
All metrics live in this module's own `REGISTRY` (plus the process and platform collectors), so a
test can scrape exactly what fedmq exports, and several roles in one test process do not collide.

Labels are kept low-cardinality on purpose: ``job`` everywhere, ``reason`` for dead letters,
``site`` only on worker metrics (a worker process serves one site), ``role`` for reconnects.

``python -m shared.metrics`` is the container health check: it scrapes this process's own
endpoint on ``FEDMQ_METRICS_PORT`` (a process that answers is alive and serving); with metrics
off it checks that ``FEDMQ_BROKER_URL`` answers instead.
"""

from __future__ import annotations

import logging
import os
import sys
import urllib.error
import urllib.request

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from fedmq.shared.errors import ConfigError

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

#: staleness is an integer number of versions; buckets cover FedBuff's usual range up to max_staleness
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 50, 100)
#: fold and publish take ms (small models) to seconds (100 MB models over a WAN)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
#: local training: sub-second demo tasks to hour-long site jobs
TRAINING_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

UPDATES_APPLIED = Counter("fedmq_updates_applied", "Updates folded into a published version",
                          ["job"], registry=REGISTRY)
UPDATES_DUPLICATE = Counter("fedmq_updates_duplicate", "Redelivered updates recognised as already "
                            "included and dropped", ["job"], registry=REGISTRY)
UPDATES_DEAD_LETTERED = Counter("fedmq_updates_dead_lettered", "Updates parked on the dead-letter "
                                "queue, by reason", ["job", "reason"], registry=REGISTRY)
VERSIONS_PUBLISHED = Counter("fedmq_versions_published", "Model versions published (confirmed) by "
                             "this aggregator", ["job"], registry=REGISTRY)
MODEL_VERSION = Gauge("fedmq_model_version", "Newest model version this process knows",
                      ["job"], registry=REGISTRY)
AGGREGATOR_ACTIVE = Gauge("fedmq_aggregator_active", "1 while this replica is the active consumer "
                          "of the updates queue, 0 while standby", ["job"], registry=REGISTRY)
STALENESS = Histogram("fedmq_update_staleness_versions", "Staleness tau (current - base version) of "
                      "folded updates", ["job"], buckets=STALENESS_BUCKETS, registry=REGISTRY)
FOLD_SECONDS = Histogram("fedmq_fold_seconds", "Validate + fold time of one update", ["job"],
                         buckets=LATENCY_BUCKETS, registry=REGISTRY)
PUBLISH_SECONDS = Histogram("fedmq_publish_seconds", "Flush + confirmed publish time of one version",
                            ["job"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
TRAINING_SECONDS = Histogram("fedmq_training_seconds", "Wall time of one task at a site (model fetch, "
                             "local training, padding)", ["job", "site"], buckets=TRAINING_BUCKETS,
                             registry=REGISTRY)
UPDATES_PUBLISHED = Counter("fedmq_updates_published", "Updates a site published (confirmed)",
                            ["job", "site"], registry=REGISTRY)
TASKS_ISSUED = Counter("fedmq_tasks_issued", "Tasks the coordinator published", ["job"],
                       registry=REGISTRY)
TEST_ACCURACY = Gauge("fedmq_test_accuracy", "Held-out accuracy of the newest evaluated version",
                      ["job"], registry=REGISTRY)
VERSION_METRIC = Gauge("fedmq_version_metric", "Newest evaluated version's value of each metric the job "
                       "evaluates (source: central = the coordinator's test data, federated = the sites' "
                       "sample-weighted mean)", ["job", "source", "metric"], registry=REGISTRY)
OUTSTANDING_TASKS = Gauge("fedmq_outstanding_tasks", "Tasks issued and not yet answered",
                          ["job"], registry=REGISTRY)
TASK_FAILURES = Counter("fedmq_task_failures", "Tasks whose local training raised at a site (task_failed)",
                        ["job", "site"], registry=REGISTRY)
RECONNECTS = Counter("fedmq_reconnects", "Reconnects after a lost broker connection",
                     ["job", "role"], registry=REGISTRY)


# ----------------------------------------------------------------------------- hooks (one per event)


def update_folded(job: str, tau: int, seconds: float) -> None:
    STALENESS.labels(job).observe(tau)
    FOLD_SECONDS.labels(job).observe(seconds)


def update_duplicate(job: str) -> None:
    UPDATES_DUPLICATE.labels(job).inc()


def update_dead_lettered(job: str, reason: str) -> None:
    UPDATES_DEAD_LETTERED.labels(job, reason).inc()


def version_published(job: str, version: int, applied: int, seconds: float) -> None:
    VERSIONS_PUBLISHED.labels(job).inc()
    UPDATES_APPLIED.labels(job).inc(applied)
    MODEL_VERSION.labels(job).set(version)
    PUBLISH_SECONDS.labels(job).observe(seconds)


def aggregator_active(job: str, active: bool) -> None:
    AGGREGATOR_ACTIVE.labels(job).set(1 if active else 0)


def task_failed(job: str, site: str) -> None:
    TASK_FAILURES.labels(job, site).inc()


def task_trained(job: str, site: str, seconds: float) -> None:
    TRAINING_SECONDS.labels(job, site).observe(seconds)
    UPDATES_PUBLISHED.labels(job, site).inc()


def tasks_issued(job: str, count: int, outstanding: int) -> None:
    TASKS_ISSUED.labels(job).inc(count)
    OUTSTANDING_TASKS.labels(job).set(outstanding)


def version_evaluated(job: str, version: int, source: str, values: dict[str, float]) -> None:
    for name, value in values.items():
        VERSION_METRIC.labels(job, source, name).set(value)
    if source == "central":
        MODEL_VERSION.labels(job).set(version)
        if "accuracy" in values:
            TEST_ACCURACY.labels(job).set(values["accuracy"])


def reconnected(job: str, role: str) -> None:
    RECONNECTS.labels(job, role).inc()


# ----------------------------------------------------------------------------- endpoint


def serve(port: int, addr: str = "0.0.0.0") -> int:
    """Serve `REGISTRY` on http://addr:port/metrics in a daemon thread; returns the bound port.

    Port 0 binds a free port (tests); the CLI treats 0 as "off" and never calls this then.
    A port in use is a configuration error (exit 2), not a crash mid-job.
    """
    if not 0 <= port <= 65535:
        raise ConfigError(f"--metrics-port must be 0-65535, got {port}")
    try:
        server, _thread = start_http_server(port, addr=addr, registry=REGISTRY)
    except OSError as exc:
        raise ConfigError(f"--metrics-port {port}: cannot listen on {addr}:{port} ({exc.strerror})") from exc
    bound = int(server.server_port)
    log.info("metrics endpoint up", extra={"url": f"http://{addr}:{bound}/metrics"})
    return bound


def scrape(url: str, timeout: float = 3.0) -> str:
    """The text exposition at `url` (the health check, tests, `fedmq monitor` need nothing more)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - operator-given URL
        return str(resp.read().decode())


def healthcheck(environ: dict[str, str] | None = None) -> int:
    """0 when this container's role is alive: its /metrics answers (or, metrics off, the broker)."""
    env = dict(os.environ if environ is None else environ)
    try:
        port = int(env.get("FEDMQ_METRICS_PORT", "0") or 0)
    except ValueError:
        print(f"unhealthy: FEDMQ_METRICS_PORT={env['FEDMQ_METRICS_PORT']!r} is not a port", file=sys.stderr)
        return 1
    if port:
        try:
            text = scrape(f"http://127.0.0.1:{port}/metrics")
        except (OSError, urllib.error.URLError) as exc:
            print(f"unhealthy: /metrics on port {port} does not answer: {exc}", file=sys.stderr)
            return 1
        return 0 if "process_start_time_seconds" in text else 1
    from fedmq.shared.broker import DEFAULT_URL, Connection
    from fedmq.shared.errors import FedmqError

    try:
        Connection(env.get("FEDMQ_BROKER_URL", DEFAULT_URL), name="fedmq-healthcheck").open().close()
    except FedmqError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(healthcheck())
