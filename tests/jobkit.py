"""Helpers for broker tests that drive one role directly: declare a job, publish v0 and updates,
run an in-process aggregator, read back versions and dead letters. Real broker, no mocks."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmq.aggregator.service import Aggregator
from fedmq.shared.broker import REASON_HEADER, UPDATE_ID_HEADER, Connection, JobNames, TopologyConfig, read_stream
from fedmq.shared.codec import Weights
from fedmq.shared.config import StrategyConfig
from fedmq.shared.messages import ModelVersion, Update, make_version, task_proof_bytes, update_id_for
from fedmq.shared.models import build_model, get_weights, model_spec


def declare_job_with_v0(url: str, job: str, strategy: StrategyConfig, *, model: str = "logreg",
                        input_shape: tuple[int, ...] = (64,), num_classes: int = 10,
                        meta: dict[str, Any] | None = None) -> ModelVersion:
    """What a coordinator does first: the whole topology, then v0 on the models stream (`meta`:
    v0's meta, e.g. a job's ``privacy`` options)."""
    names = JobNames(job)
    spec = model_spec(model, input_shape, num_classes)
    v0 = make_version(job=job, version=0, parent=-1, weights=get_weights(build_model(spec, seed=0)),
                      included=[], strategy=strategy.name.value, params=strategy.to_params(), model=spec,
                      meta=meta or {})
    with Connection(url, name="fedmq-test-setup").open() as conn:
        conn.declare_job(names, TopologyConfig())
        conn.publish(names.models_exchange, "", v0.encode(), message_id="v0")
    return v0


def declare_encrypted_job(url: str, job: str, strategy: StrategyConfig, public: bytes) -> ModelVersion:
    """What the coordinator does for a CKKS job: topology, aggregates queue + log, v0 carrying the
    public context (never the secret). The digits-sized MLP: 2,410 parameters, one ciphertext."""
    from fedmq.shared import he

    names = JobNames(job)
    spec = model_spec("mlp", (64,), 10, hidden=32)
    meta = {he.META_ENCRYPTION: he.encryption_meta(public), he.META_PUBLIC_CONTEXT: public}
    v0 = make_version(job=job, version=0, parent=-1, weights=get_weights(build_model(spec, seed=0)),
                      included=[], strategy=strategy.name.value, params=strategy.to_params(), model=spec,
                      meta=meta)
    with Connection(url, name="fedmq-test-setup").open() as conn:
        conn.declare_job(names, TopologyConfig())
        conn.declare_encrypted(names, TopologyConfig())
        conn.publish(names.models_exchange, "", v0.encode(), message_id="v0")
    return v0


def make_update(job: str, uid: str, template: Weights, *, base_version: int = 0, site: str = "site-0",
                num_samples: int = 10, scale: float = 0.01, seed: int = 0) -> Update:
    rng = np.random.default_rng(seed)
    delta = {k: (scale * rng.normal(size=v.shape)).astype(v.dtype) for k, v in template.items()}
    return Update(job=job, update_id=uid, task_id=uid, site=site, base_version=base_version,
                  num_samples=num_samples, delta=delta)


def with_task_proof(update: Update, task_key: Ed25519PrivateKey) -> Update:
    """The update as the answer to a task the coordinator holding `task_key` issued: its id becomes
    the task's update id and it carries the task's signature."""
    task_id = update.task_id
    proof = task_key.sign(task_proof_bytes(update.job, task_id, update.base_version))
    return dataclasses.replace(update, update_id=update_id_for(task_id), task_proof=proof)


def publish_raw(url: str, job: str, body: bytes, *, site: str = "site-0", update_id: str | None = None) -> None:
    """Publish bytes to the job's updates exchange exactly as a worker would."""
    names = JobNames(job)
    headers = {UPDATE_ID_HEADER: update_id} if update_id else None
    with Connection(url, name="fedmq-test-publisher").open() as conn:
        conn.publish(names.updates_exchange, site, body, headers=headers, message_id=update_id)


def publish_updates(url: str, job: str, updates: list[Update]) -> None:
    names = JobNames(job)
    with Connection(url, name="fedmq-test-publisher").open() as conn:
        for u in updates:
            conn.publish(names.updates_exchange, u.site, u.encode(), headers={UPDATE_ID_HEADER: u.update_id},
                         message_id=u.update_id)


def versions(url: str, job: str) -> list[ModelVersion]:
    return [ModelVersion.decode(d.body) for d in read_stream(url, JobNames(job).models, "first")]


def wait_for_version(url: str, job: str, version: int, timeout: float = 60.0) -> list[ModelVersion]:
    deadline = time.monotonic() + timeout
    while True:
        got = versions(url, job)
        if got and got[-1].version >= version:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job}: version {version} not published in {timeout}s "
                               f"(newest {got[-1].version if got else None})")
        time.sleep(0.2)


@dataclass(frozen=True)
class DeadLetter:
    reason: str
    update_id: str | None
    detail: str
    body: bytes


def dead_letters(url: str, job: str) -> list[DeadLetter]:
    out = []
    for d in read_stream(url, JobNames(job).dead_log, "first"):
        h: dict[str, Any] = d.headers
        out.append(DeadLetter(str(h.get(REASON_HEADER)), h.get(UPDATE_ID_HEADER),
                              str(h.get("x-fedmq-detail", "")), d.body))
    return out


@contextmanager
def running_aggregator(url: str, job: str, name: str = "aggregator-test") -> Iterator[Aggregator]:
    """An aggregator replica on a thread; stopped (and joined) on exit."""
    stop = threading.Event()
    agg = Aggregator(url, job, stop=stop, name=name)
    errors: list[BaseException] = []

    def _run() -> None:
        try:
            agg.run()
        except BaseException as exc:  # surfaced to the test below
            errors.append(exc)

    t = threading.Thread(target=_run, name=name, daemon=True)
    t.start()
    try:
        yield agg
    finally:
        stop.set()
        t.join(30)
    if errors:
        raise errors[0]


def run_threaded_job(coord: Any, agg: Aggregator, workers: list[Any]) -> Any:
    """Run a coordinator to its end with an aggregator and workers on threads of this process
    (one torch thread each, as in separate processes); returns the coordinator's JobResult."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    roles = [threading.Thread(target=agg.run, daemon=True)]
    roles += [threading.Thread(target=w.run, daemon=True) for w in workers]
    try:
        for t in roles:
            t.start()
        return coord.run()
    finally:
        coord.stop.set()
        agg.stop.set()
        for w in workers:
            w.stop.set()
        for t in roles:
            t.join(30)
        torch.set_num_threads(threads)
