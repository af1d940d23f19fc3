"""Aggregator throughput against the broker's own ceiling for messages of the same size.

Per model size, on one fresh job (so both runs use the same quorum queue and updates-log stream):

* baseline: N update-sized bodies published to the updates exchange with a confirm each (as
  workers do), then consumed from the updates queue and acked one by one, nothing else
  (pika's BlockingConnection through `shared.broker.Connection`, prefetch as the aggregator's);
* aggregator: N real updates published the same way, then the real `Aggregator` service folds
  them (decode, validate, fold, publish each version + event with a confirm, then ack).

Like with like: both rates are taken over the same window, from the K-th message consumed (when the
aggregator publishes its first version) to the last one, so start-up (connection set-up, reading
the models stream) is excluded from both and publishing from both. The headline ratio is
aggregator / consume+ack of the same bytes; the workers' publish rate is shown beside it, not
divided into it (the aggregator runs after the publishing has finished).

Memory: the aggregator as a process of its own (`fedmq aggregator`) on a ~10M-parameter model,
per mean strategy: its peak RSS while folding, over its RSS once ready, in models.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Machine, table
from bench.jobs import MODELS, BenchJob, bench_job, publish_bodies, running_aggregator
from fedmq.shared.broker import Connection, Delivery, JobNames, StreamReader, read_stream
from fedmq.shared.config import StrategyConfig, StrategyName
from fedmq.shared.messages import ModelVersion
from fedmq.shared.models import model_spec

K = 10

#: the memory table's model: ~10M float32 parameters (40 MB per update, per version)
LARGE_MODEL = model_spec("mlp", (1, 28, 28), 10, hidden=12_600)
#: --quick (a smoke run): ~1M parameters
QUICK_LARGE_MODEL = model_spec("mlp", (1, 28, 28), 10, hidden=1_260)


def _strategy(n: int) -> StrategyConfig:
    # every update is based on v0, so the last ones are n / K versions stale: allow it
    return StrategyConfig(buffer_size=K, max_staleness=n, flush_timeout=600.0)


def _raw(job: BenchJob, n: int, size: int, prefetch: int) -> tuple[float, float, int]:
    """(publish seconds, consume+ack seconds after the K-th delivery, messages in that window) for
    n bodies of `size` bytes."""
    body = bytes(size)
    names = job.names
    with Connection(job.url, name="fedmq-bench-raw").open() as conn:
        t0 = time.perf_counter()
        publish_bodies(conn, names, [(f"raw-{i}", "site-0", body) for i in range(n)])
        t_pub = time.perf_counter() - t0
        got = 0
        window_start: float | None = None
        last = 0.0

        def _take(d: Delivery) -> None:
            nonlocal got, window_start, last
            d.ack()
            got += 1
            last = time.perf_counter()
            if got == K:  # where the aggregator's window starts: its first version
                window_start = last

        conn.consume(names.updates, _take, prefetch=prefetch)
        deadline = time.monotonic() + 600
        while got < n and time.monotonic() < deadline:
            conn.process(0.05)
        if got < n or window_start is None:
            raise RuntimeError(f"baseline consumed {got} of {n} messages")
    return t_pub, last - window_start, n - K


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


def _status_kb(pid: int, field: str) -> int:
    """A `VmRSS` / `VmHWM` line of /proc/<pid>/status, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def _memory_strategies() -> dict[str, StrategyConfig]:
    return {
        f"fedbuff K={K}": StrategyConfig(buffer_size=K, max_staleness=1000, flush_timeout=600.0),
        f"fedavg cohort={K}": StrategyConfig(name=StrategyName.FEDAVG, buffer_size=K, max_staleness=0,
                                            flush_timeout=600.0),
        "fedasync": StrategyConfig(name=StrategyName.FEDASYNC, max_staleness=1000, flush_timeout=600.0),
    }


def _memory_run(url: str, label: str, strategy: StrategyConfig, n: int,
                spec: dict[str, Any]) -> dict[str, float | str | int]:
    """Aggregator RSS growth while it folds n updates of model `spec`, in a process of its own.

    The aggregator's RSS is read once its consumer is attached (v0 read, state loaded), and its
    peak (VmHWM) reset there through /proc/<pid>/clear_refs; the updates are then published
    (confirmed, as workers do) while it runs, and the peak read after its last version."""
    with bench_job(url, spec, strategy, "bench-aggmem") as job:
        model_bytes = sum(v.nbytes for v in job.template.values())
        params = sum(v.size for v in job.template.values())
        # FedAvg takes updates of the current version only: every version's from its parent
        bases = [i // K if strategy.name is StrategyName.FEDAVG else 0 for i in range(n)]
        want = n // strategy.effective_buffer
        # encoded before the aggregator starts, so they go out at the broker's pace, not numpy's:
        # a backlog, as after a burst of sites finishing together (the peak that sizes a machine)
        bodies = [(f"u{i}", f"site-{i % 8}", job.update(f"u{i}", base_version=bases[i], seed=i).encode())
                  for i in range(n)]
        env = {**os.environ, "FEDMQ_LOG_LEVEL": "warning"}
        log = tempfile.TemporaryFile()  # not a pipe: nobody reads it while the aggregator runs
        proc = subprocess.Popen([sys.executable, "-m", "fedmq", "aggregator", "--broker", url, "--job", job.job,
                                 "--name", "aggregator-bench-mem"], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=log)
        try:
            with Connection(url, name="fedmq-bench-mem").open() as conn:
                deadline = time.monotonic() + 120
                while conn.queue_stats(job.names.updates)[1] < 1:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        err = log.read().decode(errors="replace")
                        raise RuntimeError(f"aggregator did not attach: {err[-2000:]}")
                    conn.sleep(0.1)
                before = _status_kb(proc.pid, "VmRSS")
                Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
                reader = StreamReader(url, JobNames(job.job).models, name="fedmq-bench-mem-models", prefetch=2)
                reader.start("next")
                published = seen = 0
                deadline = time.monotonic() + 900
                while seen < want and time.monotonic() < deadline:
                    # publish as fast as confirms come, but FedAvg's next cohort only after its parent
                    while published < n and bases[published] <= seen:
                        publish_bodies(conn, job.names, [bodies[published]])
                        published += 1
                        seen += len(reader.take())
                    seen += len(reader.poll(0.2))
                reader.close()
                if seen < want:
                    raise RuntimeError(f"aggregator published {seen} of {want} versions")
                peak = _status_kb(proc.pid, "VmHWM")
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
    return {"strategy": label, "n": n, "versions": want, "model_bytes": model_bytes, "params": params,
            "before_mb": before / 1024, "peak_mb": peak / 1024,
            "growth_models": (peak - before) * 1024 / model_bytes}


def measure_memory(url: str, n: int, spec: dict[str, Any] = LARGE_MODEL) -> list[dict[str, float | str | int]]:
    return [_memory_run(url, label, cfg, n, spec) for label, cfg in _memory_strategies().items()]


def measure(url: str, counts: dict[str, int]) -> list[dict[str, float | str | int]]:
    rows: list[dict[str, float | str | int]] = []
    for label, spec in MODELS.items():
        n = counts[label]
        strategy = _strategy(n)
        prefetch = max(2 * strategy.effective_buffer, 16)
        with bench_job(url, spec, strategy, "bench-agg") as job:
            size = job.update_bytes
            raw_pub, raw_cons, raw_window = _raw(job, n, size, prefetch)
            with Connection(url, name="fedmq-bench-check").open() as conn:
                conn.purge_queue(job.names.updates)
            agg_pub, agg_seconds, agg_updates = _aggregated(job, n)
        rows.append({"model": label, "n": n, "bytes": size, "window": agg_updates,
                     "raw_publish_per_s": n / raw_pub, "raw_consume_per_s": raw_window / raw_cons,
                     "worker_publish_per_s": n / agg_pub, "aggregator_per_s": agg_updates / agg_seconds})
    return rows


def run(url: str, quick: bool = False) -> str:
    machine = Machine()
    labels = list(MODELS)
    # 6000 small updates: the baseline drains them at ~10k/s, and a 0.2 s window (2000) was noise
    counts = {labels[0]: 300 if quick else 6000, labels[1]: 60 if quick else 300}
    rows = measure(url, counts)
    memory = measure_memory(url, K, QUICK_LARGE_MODEL) if quick else measure_memory(url, 2 * K)
    out = []
    for r in rows:
        agg, consume = float(r["aggregator_per_s"]), float(r["raw_consume_per_s"])
        out.append([str(r["model"]), f"{int(r['bytes']):,}", str(r["n"]), str(r["window"]),
                    f"{float(r['raw_publish_per_s']):,.0f}", f"{consume:,.0f}", f"{agg:,.0f}",
                    f"{agg / consume:.2f}", f"{agg * int(r['bytes']) / 1e6:,.1f}"])
    mem = [[str(m["strategy"]), str(m["n"]), str(m["versions"]), f"{float(m['before_mb']):,.0f}",
            f"{float(m['peak_mb']):,.0f}", f"{float(m['growth_models']):.1f}"] for m in memory]
    params = int(memory[0]["params"])
    return "\n\n".join([
        machine.note().markdown(),
        f"FedBuff K={K}, sample-weighted, one aggregator on a thread of the benchmark process, broker on "
        "loopback. N updates are published first (confirmed, one by one, as workers publish; the rate is "
        "shown, not part of the ratio), then consumed. Baseline = the same number of same-size bodies "
        "through the same updates exchange and quorum queue, consumed and acked one by one and nothing "
        "else. Both rates are timed over the same window: from the K-th message consumed (the aggregator's "
        "first version) to the last, counting the N - K messages in it. The aggregator's work in that "
        "window: decode, validate, float64 fold, and per version publish the version and an event with a "
        "confirm, then ack (one multiple ack where that acks nothing else, aggregator/acks.py). Both rates "
        "are one Python thread on the benchmark machine's shared cores, and the baseline moves most with "
        "the load average stated above: compare ratios measured under similar load.",
        table(["model", "update bytes", "N", "timed", "publish/s (confirmed)", "baseline consume+ack/s",
               "aggregator updates/s", "aggregator / consume+ack", "aggregator MB/s"], out),
        f"Memory: the `fedmq aggregator` process on a {params:,}-parameter float32 MLP "
        f"({float(memory[0]['model_bytes']) / 1e6:.0f} MB per update and per version). RSS before = its "
        "VmRSS once its consumer is attached (v0 read); its peak (VmHWM) is reset there and read after "
        "the last version; the updates, encoded beforehand, are published meanwhile, confirmed one by "
        "one, as fast as the broker confirms (FedAvg's cohort of version v after v is out): a backlog. "
        "Growth = (peak - before) / model bytes. With a backlog the prefetch window is full: K+1 "
        "deliveries for models over 6 MB (aggregator/service.py, `_Session.prefetch`), each body whole "
        "in memory until folded; the rest is the float64 running sum (2 models) and transient copies "
        "(decoded tensors, the norm's float64 squares, the new version and its encoding).",
        table(["strategy", "updates", "versions", "RSS before (MB)", "peak RSS (MB)", "growth (models)"], mem),
    ])

