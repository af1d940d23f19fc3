"""Throw-away jobs on the broker for the benchmarks that drive the aggregator directly."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmq.aggregator.service import Aggregator
from fedmq.shared.broker import UPDATE_ID_HEADER, Connection, JobNames, TopologyConfig
from fedmq.shared.codec import Weights
from fedmq.shared.config import StrategyConfig
from fedmq.shared.messages import ModelVersion, Update, make_version
from fedmq.shared.models import build_model, get_weights, model_spec

#: model sizes the aggregator benchmarks run at: the demo's MLP on digits, and a ~1 MB MLP
MODELS: dict[str, dict[str, Any]] = {
    "digits MLP (4,810 params, 19 KB)": model_spec("mlp", (64,), 10, hidden=64),
    "MNIST MLP (238,510 params, 0.95 MB)": model_spec("mlp", (1, 28, 28), 10, hidden=300),
}


@dataclass(frozen=True)
class BenchJob:
    url: str
    job: str
    v0: ModelVersion

    @property
    def names(self) -> JobNames:
        return JobNames(self.job)

    @property
    def template(self) -> Weights:
        return {k: np.asarray(v) for k, v in self.v0.weights.items()}

    @property
    def update_bytes(self) -> int:
        return len(self.update("size-probe").encode())

    def update(self, uid: str, *, base_version: int = 0, seed: int = 0) -> Update:
        rng = np.random.default_rng(seed)
        delta = {k: (0.001 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in self.template.items()}
        return Update(job=self.job, update_id=uid, task_id=uid, site=f"site-{seed % 8}",
                      base_version=base_version, num_samples=100, delta=delta)


@contextmanager
def bench_job(url: str, spec: dict[str, Any], strategy: StrategyConfig, prefix: str) -> Iterator[BenchJob]:
    """A fresh job with its topology and v0; every queue and stream of it is deleted afterwards."""
    job = f"{prefix}-{uuid.uuid4().hex[:8]}"
    names = JobNames(job)
    v0 = make_version(job=job, version=0, parent=-1, weights=get_weights(build_model(spec, seed=0)),
                      included=[], strategy=strategy.name.value, params=strategy.to_params(), model=spec)
    with Connection(url, name="fedmq-bench-setup").open() as conn:
        conn.declare_job(names, TopologyConfig())
        conn.publish(names.models_exchange, "", v0.encode(), message_id="v0")
    try:
        yield BenchJob(url, job, v0)
    finally:
        with Connection(url, name="fedmq-bench-cleanup").open() as conn:
            conn.delete_job(names)


def publish_bodies(conn: Connection, names: JobNames, bodies: list[tuple[str, str, bytes]]) -> None:
    """Publish (update id, site, body) to the updates exchange as workers do: confirmed, one by one."""
    for uid, site, body in bodies:
        conn.publish(names.updates_exchange, site, body, headers={UPDATE_ID_HEADER: uid}, message_id=uid)


@contextmanager
def running_aggregator(url: str, job: str) -> Iterator[Aggregator]:
    """The real aggregator service on a thread of this process; stopped and joined on exit."""
    stop = threading.Event()
    agg = Aggregator(url, job, stop=stop, name="aggregator-bench")
    failure: list[BaseException] = []

    def _run() -> None:
        try:
            agg.run()
        except BaseException as exc:  # re-raised in the benchmark's thread below
            failure.append(exc)

    thread = threading.Thread(target=_run, name="aggregator-bench", daemon=True)
    thread.start()
    try:
        yield agg
    finally:
        stop.set()
        thread.join(60)
    if failure:
        raise failure[0]
