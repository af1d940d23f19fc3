"""Aggregator throughput against the broker's own ceiling for messages of the same size.

Per model size, on one fresh job (so both runs use the same quorum queue and updates-log stream):

* baseline: N update-sized bodies published to the updates exchange with a confirm each (as
  workers do), then consumed from the updates queue and acked one by one, nothing else
  (pika's BlockingConnection through `shared.broker.Connection`, prefetch as the aggregator's);
* aggregator: N real updates published the same way, then the real `Aggregator` service folds
  them (decode, validate, fold, publish each version + event with a confirm, then ack).

The aggregator rate is taken between its first and last version's ``created_at``, so start-up
(reading the models stream) is excluded, as the baseline's connection set-up is.
"""

from __future__ import annotations

import time

from bench.common import Machine, table
from bench.jobs import MODELS, BenchJob, bench_job, publish_bodies, running_aggregator
from shared.broker import Connection, Delivery, read_stream
from shared.config import StrategyConfig
from shared.messages import ModelVersion

K = 10


def _strategy(n: int) -> StrategyConfig:
    # every update is based on v0, so the last ones are n / K versions stale: allow it
    return StrategyConfig(buffer_size=K, max_staleness=n, flush_timeout=600.0)


def _raw(job: BenchJob, n: int, size: int, prefetch: int) -> tuple[float, float]:
    """(publish seconds, consume+ack seconds) for n bodies of `size` bytes."""
    body = bytes(size)
    names = job.names
    with Connection(job.url, name="fedmq-bench-raw").open() as conn:
        t0 = time.perf_counter()
        publish_bodies(conn, names, [(f"raw-{i}", "site-0", body) for i in range(n)])
        t_pub = time.perf_counter() - t0
        got = 0
        first: float | None = None

        def _take(d: Delivery) -> None:
            nonlocal got, first
            if first is None:
                first = time.perf_counter()
            d.ack()
            got += 1

        conn.consume(names.updates, _take, prefetch=prefetch)
        deadline = time.monotonic() + 600
        while got < n and time.monotonic() < deadline:
            conn.process(0.05)
        if got < n or first is None:
            raise RuntimeError(f"baseline consumed {got} of {n} messages")
        t_cons = time.perf_counter() - first
    return t_pub, t_cons


def _aggregated(job: BenchJob, n: int) -> tuple[float, float, int]:
    """(publish seconds, aggregation seconds for the measured updates, measured updates)."""
    bodies = [(f"u{i}", f"site-{i % 8}", job.update(f"u{i}", seed=i).encode()) for i in range(n)]
    with Connection(job.url, name="fedmq-bench-workers").open() as conn:
        t0 = time.perf_counter()
        publish_bodies(conn, job.names, bodies)
        t_pub = time.perf_counter() - t0
    want = n // K
    with running_aggregator(job.url, job.job) as agg:
        deadline = time.monotonic() + 900
        while agg.stats.versions < want and time.monotonic() < deadline:
            time.sleep(0.1)
    if agg.stats.versions < want:
        raise RuntimeError(f"aggregator published {agg.stats.versions} of {want} versions")
    mvs = [ModelVersion.decode(d.body) for d in read_stream(job.url, job.names.models, "first")]
    mvs = [mv for mv in mvs if mv.version >= 1]
    folded_after_first = sum(len(mv.included) for mv in mvs[1:])
    return t_pub, mvs[-1].created_at - mvs[0].created_at, folded_after_first


def measure(url: str, counts: dict[str, int]) -> list[dict[str, float | str | int]]:
    rows: list[dict[str, float | str | int]] = []
    for label, spec in MODELS.items():
        n = counts[label]
        strategy = _strategy(n)
        prefetch = max(2 * strategy.effective_buffer, 16)
        with bench_job(url, spec, strategy, "bench-agg") as job:
            size = job.update_bytes
            raw_pub, raw_cons = _raw(job, n, size, prefetch)
            with Connection(url, name="fedmq-bench-check").open() as conn:
                conn.purge_queue(job.names.updates)
            agg_pub, agg_seconds, agg_updates = _aggregated(job, n)
        rows.append({"model": label, "n": n, "bytes": size,
                     "raw_publish_per_s": n / raw_pub, "raw_consume_per_s": n / raw_cons,
                     "raw_pipeline_per_s": n / (raw_pub + raw_cons),
                     "worker_publish_per_s": n / agg_pub, "aggregator_per_s": agg_updates / agg_seconds})
    return rows


def run(url: str, quick: bool = False) -> str:
    machine = Machine()
    labels = list(MODELS)
    counts = {labels[0]: 300 if quick else 2000, labels[1]: 60 if quick else 300}
    rows = measure(url, counts)
    out = []
    for r in rows:
        agg = float(r["aggregator_per_s"])
        out.append([str(r["model"]), f"{int(r['bytes']):,}", str(r["n"]),
                    f"{float(r['raw_publish_per_s']):,.0f}", f"{float(r['raw_consume_per_s']):,.0f}",
                    f"{float(r['raw_pipeline_per_s']):,.0f}", f"{agg:,.0f}",
                    f"{agg / float(r['raw_pipeline_per_s']):.2f}", f"{agg / float(r['raw_consume_per_s']):.2f}",
                    f"{agg * int(r['bytes']) / 1e6:,.1f}"])
    return "\n\n".join([
        machine.note().markdown(),
        f"FedBuff K={K}, sample-weighted, one aggregator on a thread of the benchmark process, broker on "
        "loopback. Baseline = the same number of same-size bodies through the same updates exchange and "
        "quorum queue: confirmed publish one by one (as workers publish), then consume + ack one by one. "
        "\"pipeline\" = N / (publish time + consume time), the messaging ceiling for one update. The "
        "aggregator rate counts updates folded between its first and last version (decode, validate, "
        "float64 fold, and per version: publish the version and an event with a confirm, then ack).",
        table(["model", "update bytes", "N", "baseline publish/s", "baseline consume+ack/s",
               "baseline publish+consume+ack/s", "aggregator updates/s", "aggregator / pipeline",
               "aggregator / consume+ack", "aggregator MB/s"], out),
        "Ratios are figures of the same run. On this 2-core machine the broker, the publisher and the "
        "aggregator share the two cores (the load average above says what else ran), so absolute rates are low.",
    ])
