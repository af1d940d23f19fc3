"""Per-version overhead: from the K-th update's arrival to the version being readable in the stream.

For each version: publish K-1 updates, let the aggregator fold them, then publish the K-th with a
confirm. "Arrival" is the moment that confirm returns (the broker holds the update). The version is
"readable" when a consumer attached to the models stream receives it. In between: delivery to the
aggregator, decode + validate + fold of that update, the new weights, the version's encode and
confirmed publish, and stream delivery to the reader. The version's ``created_at`` (set when the
aggregator built it, same clock) splits this into aggregator compute and publish-to-reader.
"""

from __future__ import annotations

import statistics
import time

from bench.common import Machine, fmt_seconds, table
from bench.jobs import MODELS, bench_job, publish_bodies, running_aggregator
from fedmq.shared.broker import Connection, StreamReader
from fedmq.shared.config import StrategyConfig
from fedmq.shared.messages import ModelVersion

K = 4
SETTLE = 0.3  # seconds for the aggregator to fold the first K-1 updates before the K-th


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def measure(url: str, versions: int) -> dict[str, dict[str, list[float]]]:
    """model -> {"total", "compute", "publish"} -> seconds per version."""
    out: dict[str, dict[str, list[float]]] = {}
    for label, spec in MODELS.items():
        strategy = StrategyConfig(buffer_size=K, max_staleness=versions + 1, flush_timeout=600.0)
        totals, computes, publishes = [], [], []
        with bench_job(url, spec, strategy, "bench-overhead") as job, \
                StreamReader(url, job.names.models, name="fedmq-bench-reader") as reader, \
                Connection(url, name="fedmq-bench-workers").open() as conn, \
                running_aggregator(url, job.job):
            reader.start("first")
            seen = 0  # versions received so far
            while seen < 1:  # v0: also proves the reader is attached before we start timing
                seen += len(reader.poll(0.1))
            for v in range(1, versions + 1):
                updates = [job.update(f"v{v}-u{i}", base_version=v - 1, seed=v * K + i) for i in range(K)]
                # published under the site each update names, as that site's credentials would
                bodies = [(u.update_id, u.site, u.encode()) for u in updates]
                publish_bodies(conn, job.names, bodies[:-1])
                time.sleep(SETTLE)
                publish_bodies(conn, job.names, bodies[-1:])
                arrived = time.time()
                got: list[ModelVersion] = []
                deadline = time.monotonic() + 60
                while not got and time.monotonic() < deadline:
                    got = [ModelVersion.decode(d.body) for d in reader.poll(0.0005)]
                readable = time.time()
                if not got or got[-1].version != v:
                    raise RuntimeError(f"expected version {v}, got {[mv.version for mv in got]}")
                totals.append(readable - arrived)
                computes.append(got[-1].created_at - arrived)
                publishes.append(readable - got[-1].created_at)
        out[label] = {"total": totals, "compute": computes, "publish": publishes}
    return out


def run(url: str, quick: bool = False) -> str:
    machine = Machine()
    n = 10 if quick else 40
    results = measure(url, n)
    rows = []
    for label, r in results.items():
        rows.append([label, str(n), fmt_seconds(statistics.median(r["total"])),
                     fmt_seconds(_percentile(r["total"], 0.9)), fmt_seconds(min(r["total"])),
                     fmt_seconds(statistics.median(r["compute"])), fmt_seconds(statistics.median(r["publish"]))])
    return "\n\n".join([
        machine.note().markdown(),
        f"FedBuff K={K}; the real aggregator on a thread, a models-stream reader and a publisher in the same "
        "process, broker on loopback. Per version: K-1 updates, a pause, then the K-th update published "
        "with a confirm (= its arrival). Overhead = arrival of the K-th update -> the version received by a "
        "stream consumer. Split at the version's `created_at`: \"to built\" = delivery, decode, validate, "
        "fold and new weights; \"built to readable\" = encode, confirmed publish of the version, stream "
        "delivery (the aggregator also publishes an event per version).",
        table(["model", "versions", "median", "p90", "best", "median to built", "median built to readable"], rows),
    ])
