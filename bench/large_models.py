"""Big models end to end: a real `fedmq demo` job (coordinator, aggregator, workers as processes)
on a ~10M- and a ~50M-parameter MLP, then `fedmq replay` on it.

The 50M model's versions and updates are 200 MB as float32, over RabbitMQ's 128 MiB message
limit: they travel in parts (docs/architecture.md, "Messages in parts"). Baseline in the same run:
one message of the same size published (in parts where it must be) and consumed on the same
broker, with nothing else: how long the broker alone takes to move it once.

Usage: ``python -m bench.large_models [--quick]``; quick: a 100k-parameter model whose messages
go in 64 KiB parts (the same code path, seconds instead of minutes).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import Machine, broker_rss_mb, run_group, table
from fedmq.replay import replay
from fedmq.shared.broker import Connection, Delivery, JobNames
from fedmq.shared.parts import part_bytes_from_env, parts_for

ROOT = Path(__file__).resolve().parent.parent
#: (label, hidden width of a 64-input, 10-class MLP: 74 parameters per hidden unit + 10)
SIZES = (("~10M", 135_000), ("~50M", 675_000))
QUICK_SIZES = (("~100k", 1_350),)
QUICK_PART_BYTES = 65_536

EXAMPLE = """[demo]
dataset = "digits"
sites = 2
partition = "iid"
slow = 0

[model]
name = "mlp"
args = {{ hidden = {hidden} }}

[strategy]
buffer_size = 2

[coordinator]
target_accuracy = 0
max_versions = 3
max_seconds = 600
"""


class _PeakRss:
    """The broker node's peak RSS while the job runs, sampled every 0.5 s."""

    def __init__(self) -> None:
        self.peak = self.before = broker_rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            now = broker_rss_mb()
            if now is not None and (self.peak is None or now > self.peak):
                self.peak = now

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def raw_round_trip(url: str, nbytes: int, part_bytes: int) -> float:
    """Seconds to publish one message of `nbytes` (confirmed, in parts if it must) and consume it."""
    queue = f"bench-large-{uuid.uuid4().hex[:8]}"
    with Connection(url, name="fedmq-bench-large", part_bytes=part_bytes).open() as conn:
        conn.channel().queue_declare(queue, durable=True)
        try:
            body = os.urandom(nbytes)
            got: list[Delivery] = []
            t0 = time.perf_counter()
            conn.publish("", queue, body)
            conn.consume(queue, got.append, prefetch=parts_for(nbytes, part_bytes) + 1)
            while not got:
                conn.process(0.05)
            got[0].ack()
            return time.perf_counter() - t0
        finally:
            conn.delete_queue(queue)


def measure(url: str, label: str, hidden: int, part_bytes: int) -> dict[str, Any]:
    params = 64 * hidden + hidden + hidden * 10 + 10
    job = f"bench-large-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, FEDMQ_PART_BYTES=str(part_bytes), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory(prefix="fedmq-large-") as tmp:
        example = Path(tmp) / "example"
        example.mkdir()
        (example / "example.toml").write_text(EXAMPLE.format(hidden=hidden))
        try:
            with _PeakRss() as rss:
                demo = run_group([sys.executable, "-m", "fedmq", "demo", "--broker", url, "--job", job, "--example",
                                  str(example), "--workdir", str(Path(tmp) / "work"), "--json"],
                                 timeout=1200, env=env, cwd=ROOT)
            if demo.returncode != 0:
                raise SystemExit(f"bench: the {label} job failed: {demo.stderr.strip().splitlines()[-1:]}")
            result = json.loads(demo.stdout.strip().splitlines()[-1])
            report = replay(url, job).to_dict()  # a reader: parts of any size are put together
        finally:
            with Connection(url, name="fedmq-bench-cleanup").open() as conn:
                conn.delete_job(JobNames(job))
    model_bytes = params * 4
    return {"label": label, "params": params, "model_bytes": model_bytes,
            "parts": parts_for(model_bytes, part_bytes), "versions": result["versions"],
            "updates": result["updates_applied"], "accuracy": result["final_accuracy"],
            "wall": result["wall_seconds"], "startup": result["startup_seconds"],
            "replay_seconds": report["seconds"], "mismatches": report["mismatches"],
            "replayed": report["updates_replayed"], "rss_before": rss.before, "rss_peak": rss.peak,
            "raw": raw_round_trip(url, model_bytes, part_bytes)}


def run(url: str, quick: bool = False) -> str:
    machine = Machine()
    part_bytes = QUICK_PART_BYTES if quick else part_bytes_from_env()
    rows = []
    for label, hidden in QUICK_SIZES if quick else SIZES:
        m = measure(url, label, hidden, part_bytes)
        per_update = m["wall"] / max(1, m["updates"] + m["versions"])
        broker = "-" if m["rss_peak"] is None else f"{m['rss_before']:.0f} / {m['rss_peak']:.0f} MB"
        rows.append([f"{m['label']} ({m['params']:,})", f"{m['model_bytes'] / 1e6:.0f} MB", str(m["parts"]),
                     f"{m['versions']} / {m['updates']}", f"{m['accuracy']:.3f}", f"{m['startup']:.1f} s",
                     f"{m['wall']:.1f} s", f"{per_update:.2f} s", f"{m['raw']:.2f} s",
                     f"{per_update / m['raw']:.1f}x",
                     f"{m['replay_seconds']:.1f} s, {m['replayed']} updates, {m['mismatches']} mismatches",
                     broker])
    return "\n\n".join([
        machine.note().markdown(),
        "A real `fedmq demo` job per row (coordinator, one aggregator and 2 workers as processes on this "
        "machine; digits, FedBuff K=2, 3 versions, one local epoch), then `fedmq replay` of it. Parts: "
        f"broker messages per version or update at a part size of {part_bytes:,} bytes "
        "(over RabbitMQ's 128 MiB limit a message must go in parts). Per message = the job's wall time "
        "(v0 published to its end: local training, evaluation of each version and every transfer) "
        "over the versions and updates it moved. Baseline, same run: one message of the model's size "
        "published (confirmed, in the same parts) and consumed on the same broker, with nothing else. "
        "Broker RSS: the node's whole process before the job / its peak during it.",
        table(["model (parameters)", "message", "parts", "versions / updates", "final accuracy",
               "start-up", "job wall", "per message", "raw broker round trip", "per message / raw",
               "replay", "broker RSS"], rows),
    ])


if __name__ == "__main__":
    from bench.common import replace_section
    from fedmq.shared.broker import DEFAULT_URL

    quick = "--quick" in sys.argv
    body = run(os.environ.get("FEDMQ_BROKER_URL", DEFAULT_URL), quick=quick)
    print(body)
    if not quick:
        replace_section("Large models", body)
