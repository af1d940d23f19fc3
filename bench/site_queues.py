"""What per-site updates queues cost the broker: a job with N registry sites, against the same job
without a registry (one shared updates queue), in the same run.

Per N: the coordinator's `declare_job` (one quorum queue per site, bound through the sites
exchange), the broker's RSS after it (the node's beam process, read from /proc; the broker is
shared, so other load shows up here too), the active aggregator's subscribe to every updates
queue, one update per site published and all of them consumed and acked, and `delete_job`.
"""

from __future__ import annotations

import time
import uuid

from bench.common import Machine, broker_rss_mb, table
from fedmq.shared.broker import Connection, Delivery, JobNames, TopologyConfig

SIZES = (8, 100, 1000)
QUICK_SIZES = (8, 50)
BODY = b"\0" * 19_590  # a digits-MLP update's size


def measure(url: str, sites: int) -> dict[str, float | None]:
    """One job with `sites` listed sites (0: no registry); seconds per step and broker RSS."""
    names = JobNames(f"bench-sq-{uuid.uuid4().hex[:8]}")
    listed = tuple(f"site-{i}" for i in range(sites))
    out: dict[str, float | None] = {"rss_before": broker_rss_mb()}
    with Connection(url, name="fedmq-bench-site-queues").open() as conn:
        try:
            t0 = time.perf_counter()
            conn.declare_job(names, TopologyConfig(sites=listed))
            out["declare"] = time.perf_counter() - t0
            out["rss_after"] = broker_rss_mb()
            got: list[Delivery] = []
            t0 = time.perf_counter()
            for queue in names.update_queues(listed):
                conn.consume(queue, got.append, prefetch=16)
            out["subscribe"] = time.perf_counter() - t0
            senders = listed or tuple(f"unlisted-{i}" for i in range(8))
            t0 = time.perf_counter()
            for site in senders:
                conn.publish(names.updates_exchange, site, BODY)
            deadline = time.monotonic() + 120
            while len(got) < len(senders) and time.monotonic() < deadline:
                conn.process(0.05)
            for d in got:
                d.ack()
            out["round_trip"] = time.perf_counter() - t0
            out["senders"] = float(len(senders))
            if len(got) != len(senders):
                raise RuntimeError(f"{len(got)} of {len(senders)} updates consumed within 120 s")
        finally:
            t0 = time.perf_counter()
            conn.delete_job(names, sites=listed)
            out["delete"] = time.perf_counter() - t0
    return out


def _mb(before: float | None, after: float | None) -> str:
    return f"{after - before:+,.0f} MB" if before is not None and after is not None else "—"


def run(url: str, quick: bool = False) -> str:
    machine = Machine()
    rows = []
    for n in (0, *(QUICK_SIZES if quick else SIZES)):
        m = measure(url, n)
        per = (m["round_trip"] or 0.0) / (m["senders"] or 1.0)
        rows.append([f"{n:,}" if n else "none (shared queue only)", f"{m['declare']:.2f} s",
                     _mb(m["rss_before"], m["rss_after"]), f"{m['subscribe']:.2f} s",
                     f"{m['round_trip']:.2f} s ({per * 1000:.1f} ms each)", f"{m['delete']:.2f} s"])
    return "\n\n".join([
        machine.note().markdown(),
        "One job per row on the broker `make bench` uses (one node: quorum queues of one member). "
        "Per-site queues exist only for the sites of a job's registry; without one every update "
        "goes to the shared queue (the first row: 8 senders under unlisted names). Broker RSS is "
        "the node's whole process after the declare, minus before it: other jobs on the broker move it too.",
        table(["registry sites", "declare_job", "broker RSS", "aggregator subscribes to all",
               "one 19 KB update per sender, published + consumed", "delete_job"], rows),
    ])


if __name__ == "__main__":
    import os
    import sys

    from bench.common import replace_section
    from fedmq.shared.broker import DEFAULT_URL

    replace_section("Per-site updates queues",
                    run(os.environ.get("FEDMQ_BROKER_URL", DEFAULT_URL), "--quick" in sys.argv))
