"""The coordinator: owns one job from declaration to the exported final model.

It keeps `concurrency` tasks outstanding (one new task per finished one, always from the newest
version it knows), evaluates every version on held-out data, and stops at the target accuracy,
the version limit or the time limit. Its journal is the job's events stream: which tasks were
issued and which finished is read back from there after a restart, so it keeps no local state.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coordinator.keys import HostedKeyHolder, genesis_meta
from shared import metrics
from shared.broker import Connection, JobNames, Retention, StreamReader, TopologyConfig, read_stream
from shared.config import JobConfig, PrivacyMechanism, StrategyName
from shared.datasets import load_site
from shared.errors import ConfigError, MalformedMessageError, PrivacyBudgetError
from shared.jobstate import emit
from shared.messages import Event, EventKind, ModelVersion, Task, make_version
from shared.models import build_model, evaluate, get_weights, model_spec, set_weights
from shared.privacy import check_privacy, resolve_options

log = logging.getLogger(__name__)


@dataclass
class OutstandingTask:
    task: Task
    issued_mono: float


@dataclass
class JobResult:
    job: str
    strategy: str
    final_version: int
    final_accuracy: float
    versions: int
    updates_applied: int
    stop_reason: str
    wall_seconds: float
    seconds_to_target: float | None
    export_path: str
    accuracy_curve: list[tuple[int, float, float]] = field(default_factory=list)  # (version, t, acc)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


class Coordinator:
    def __init__(self, url: str, cfg: JobConfig, *, stop: threading.Event | None = None,
                 num_classes: int | None = None, input_shape: tuple[int, ...] | None = None) -> None:
        if not cfg.job:
            raise ConfigError("config.job: a job id is required (--job or [job] in the TOML)")
        if not cfg.data.test:
            raise ConfigError("data.test: the coordinator needs held-out test data to evaluate versions")
        self.url = url
        self.cfg = cfg
        self.names = JobNames(cfg.job)
        self.stop = stop or threading.Event()
        self.x_test, self.y_test = load_site(cfg.data.test)
        self.num_classes = num_classes or int(self.y_test.max()) + 1
        self.input_shape = input_shape or tuple(self.x_test.shape[1:])
        self.spec = model_spec(cfg.model.name, self.input_shape, self.num_classes, **cfg.model.args)
        self.model = build_model(self.spec, seed=cfg.seed)
        self.key_meta = genesis_meta(cfg)
        self.keyholder: HostedKeyHolder | None = None
        check_privacy(cfg)
        #: [privacy] as sites get it in Task.options and the aggregator in v0's meta (sigma resolved)
        self.privacy_options = (resolve_options(cfg.privacy)
                                if cfg.privacy.mechanism is not PrivacyMechanism.NONE else {})
        self.sites_seen: set[str] = set()   # sites that published an update
        self.sites_spent: set[str] = set()  # sites that refused a task: privacy budget spent
        self.outstanding: dict[str, OutstandingTask] = {}
        self.finished_tasks: set[str] = set()
        self.update_ids: list[str] = []
        self.included: set[str] = set()
        self.dead_ids: set[str] = set()
        self.latest: ModelVersion | None = None
        self.latest_offset: int | None = None
        self.curve: list[tuple[int, float, float]] = []
        self.started = time.time()
        self.target_at: float | None = None
        self.round_version = -1  # fedavg: the version the current cohort was issued from

    # ------------------------------------------------------------------ setup

    def _topology(self) -> TopologyConfig:
        r = self.cfg.retention
        return TopologyConfig(retention=Retention(r.max_age or None, r.max_bytes or None))

    def _publish_v0(self, conn: Connection) -> None:
        weights = get_weights(self.model)
        v0 = make_version(job=self.cfg.job, version=0, parent=-1, weights=weights, included=[],
                          strategy=self.cfg.strategy.name.value, params=self.cfg.strategy.to_params(),
                          model=self.spec, meta=self._v0_meta())
        conn.publish(self.names.models_exchange, "", v0.encode(), message_id="v0")
        emit(conn, self.names, "coordinator", EventKind.JOB_STARTED, strategy=v0.strategy,
             params=v0.params, model=self.spec, concurrency=self.cfg.coordinator.concurrency)
        log.info("job started job=%s strategy=%s", self.cfg.job, v0.strategy)

    def _v0_meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"seed": self.cfg.seed}
        if self.privacy_options:
            meta["privacy"] = self.privacy_options  # read by the aggregator (aggregator/dp.py)
        meta.update(self.key_meta)  # site registry, CKKS public context (coordinator/keys.py)
        return meta

    def _resume(self) -> tuple[bool, int | str]:
        """Replay the events stream: (job already started?, offset to follow the stream from)."""
        started = False
        follow_from: int | str = "first"
        for d in read_stream(self.url, self.names.events, "first"):
            follow_from = (d.stream_offset or 0) + 1
            try:
                ev = Event.decode(d.body)
            except MalformedMessageError:
                continue
            started |= self._apply_event(ev, replaying=True)
        if started:
            log.info("coordinator resumed job=%s outstanding=%d finished=%d", self.cfg.job,
                     len(self.outstanding), len(self.finished_tasks))
        return started, follow_from

    # ------------------------------------------------------------------ events

    def _apply_event(self, ev: Event, *, replaying: bool = False) -> bool:
        data = ev.data
        if ev.event == EventKind.JOB_STARTED:
            self.started = ev.ts
            return True
        if ev.event == EventKind.TASK_ISSUED and replaying:
            t = Task.from_dict(data["task"])
            self.outstanding[t.task_id] = OutstandingTask(t, time.monotonic() - (time.time() - t.issued_at))
        elif ev.event == EventKind.UPDATE_PUBLISHED:
            tid = data.get("task_id", "")
            if tid not in self.finished_tasks:
                self.finished_tasks.add(tid)
                self.update_ids.append(data.get("update_id", ""))
            self.outstanding.pop(tid, None)
            self.sites_seen.add(data.get("site", ""))
        elif ev.event == EventKind.TASK_REFUSED:
            self.outstanding.pop(data.get("task_id", ""), None)  # _issue replaces it for the others
            if data.get("reason") == PrivacyBudgetError.reason:
                self.sites_spent.add(data.get("site", ""))
        elif ev.event == EventKind.DEAD_LETTERED and data.get("update_id"):
            self.dead_ids.add(data["update_id"])
        elif ev.event == EventKind.VERSION_PUBLISHED:
            self.included.update(data.get("included", []))
        return False

    # ------------------------------------------------------------------ tasks

    def _issue(self, conn: Connection) -> None:
        assert self.latest is not None
        c, t = self.cfg.coordinator, self.cfg.training
        if self.cfg.strategy.name is StrategyName.FEDAVG:
            # synchronous rounds: a whole cohort from one version, the next only after it is merged
            if self.outstanding or self.latest.version == self.round_version:
                return
            self.round_version = self.latest.version
            want = c.concurrency
        else:
            want = c.concurrency - len(self.outstanding)
        now = time.time()
        for _ in range(max(want, 0)):
            task = Task(job=self.cfg.job, task_id=uuid.uuid4().hex[:16], version=self.latest.version,
                        model_offset=self.latest_offset, epochs=t.epochs, batch_size=t.batch_size,
                        lr=t.lr, mu=t.mu, issued_at=now, deadline=now + c.task_deadline,
                        options={"privacy": self.privacy_options} if self.privacy_options else {})
            conn.publish(self.names.tasks_exchange, "task", task.encode(), message_id=task.task_id)
            emit(conn, self.names, "coordinator", EventKind.TASK_ISSUED, task=task.to_dict())
            self.outstanding[task.task_id] = OutstandingTask(task, time.monotonic())
            metrics.tasks_issued(self.cfg.job, 1, len(self.outstanding))

    def _expire(self) -> None:
        """Forget tasks past their deadline so replacements are issued; a late update still counts."""
        now = time.time()
        for tid, o in list(self.outstanding.items()):
            if o.task.deadline < now:
                log.warning("task past deadline, reissuing job=%s task=%s", self.cfg.job, tid)
                del self.outstanding[tid]

    # ------------------------------------------------------------------ versions

    def _on_version(self, conn: Connection, mv: ModelVersion, offset: int | None) -> None:
        if self.latest is not None and mv.version <= self.latest.version:
            return
        self.latest, self.latest_offset = mv, offset
        set_weights(self.model, {k: np.asarray(v) for k, v in mv.weights.items()})
        acc, loss = evaluate(self.model, self.x_test, self.y_test)
        t = time.time() - self.started
        self.curve.append((mv.version, t, acc))
        metrics.version_evaluated(self.cfg.job, mv.version, acc)
        target = self.cfg.coordinator.target_accuracy
        if target and acc >= target and self.target_at is None:
            self.target_at = t
        emit(conn, self.names, "coordinator", EventKind.VERSION_EVALUATED, version=mv.version,
             accuracy=acc, loss=loss, t=t, included=len(mv.included), sha256=mv.sha256)
        log.info("version evaluated", extra={"job": self.cfg.job, "version": mv.version,
                                              "accuracy": round(acc, 4), "t": round(t, 2)})

    def _stop_reason(self) -> str | None:
        c = self.cfg.coordinator
        if self.stop.is_set():
            return "interrupted"
        if self.target_at is not None:
            return "target_accuracy"
        if self.latest is not None and self.latest.version >= c.max_versions:
            return "max_versions"
        if time.time() - self.started >= c.max_seconds:
            return "max_seconds"
        if self.sites_seen and self.sites_seen <= self.sites_spent:
            return "privacy_budget"  # every site that trained has spent its budget: nobody left
        return None

    # ------------------------------------------------------------------ main loop

    def run(self) -> JobResult:
        conn = Connection(self.url, name=f"fedmq-coordinator-{self.cfg.job}").open(retries=5)
        models = StreamReader(self.url, self.names.models, name=f"fedmq-coord-models-{self.cfg.job}")
        events = StreamReader(self.url, self.names.events, name=f"fedmq-coord-events-{self.cfg.job}")
        try:
            conn.declare_job(self.names, self._topology())
            if self.cfg.encryption.enabled:
                conn.declare_encrypted(self.names, self._topology())
            resumed, follow_from = self._resume()
            if not resumed:
                self._publish_v0(conn)
            if self.cfg.encryption.secret_context:
                self.keyholder = HostedKeyHolder(self.url, self.cfg.job, self.cfg.encryption.secret_context).start()
            models.start("first")
            events.start(follow_from)
            reason = None
            while reason is None:
                for d in models.poll(0.05):
                    self._on_version(conn, ModelVersion.decode(d.body), d.stream_offset)
                for d in events.poll(0.0):
                    try:
                        self._apply_event(Event.decode(d.body))
                    except MalformedMessageError:
                        continue
                reason = self._stop_reason()
                if reason is None and self.latest is not None:
                    self._expire()
                    self._issue(conn)
                conn.process(0.05)
            return self._finish(conn, models, events, reason)
        finally:
            if self.keyholder is not None:
                self.keyholder.close()
            models.close()
            events.close()
            conn.close()

    def _finish(self, conn: Connection, models: StreamReader, events: StreamReader, reason: str) -> JobResult:
        """Stop new work, let the aggregator fold what is in flight, export, announce the result."""
        log.info("job finishing job=%s reason=%s", self.cfg.job, reason)
        emit(conn, self.names, "coordinator", EventKind.JOB_FINISHING, reason=reason)
        conn.delete_queue(self.names.tasks)  # workers are cancelled and leave
        grace = self.cfg.strategy.flush_timeout + 10.0
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            for d in events.poll(0.05):
                self._apply_event(Event.decode(d.body))
            for d in models.poll(0.05):
                self._on_version(conn, ModelVersion.decode(d.body), d.stream_offset)
            pending = [u for u in self.update_ids if u not in self.included and u not in self.dead_ids]
            ready, _ = conn.queue_stats(self.names.updates)
            if not pending and ready == 0:
                break
        conn.delete_queue(self.names.updates)  # aggregators are cancelled and leave
        if self.cfg.encryption.enabled:
            conn.delete_queue(self.names.aggregates)  # so are key holders (all sums are versions now)
        assert self.latest is not None
        path = self.export(Path(self.cfg.coordinator.out))
        final_acc = self.curve[-1][2] if self.curve else 0.0
        result = JobResult(
            job=self.cfg.job, strategy=self.cfg.strategy.name.value, final_version=self.latest.version,
            final_accuracy=final_acc, versions=self.latest.version, updates_applied=len(self.included),
            stop_reason=reason, wall_seconds=time.time() - self.started, seconds_to_target=self.target_at,
            export_path=str(path), accuracy_curve=self.curve,
        )
        emit(conn, self.names, "coordinator", EventKind.JOB_FINISHED, **{
            k: v for k, v in result.to_dict().items() if k != "accuracy_curve"})
        log.info("job finished job=%s reason=%s version=%d accuracy=%.4f", self.cfg.job, reason,
                 self.latest.version, final_acc)
        return result

    def export(self, out_dir: Path) -> Path:
        """state_dict as .pt plus JSON metadata (version, sha256, accuracy) beside it."""
        assert self.latest is not None
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{self.cfg.job}-v{self.latest.version}.pt"
        torch.save(self.model.state_dict(), path)
        meta = {"job": self.cfg.job, "version": self.latest.version, "sha256": self.latest.sha256,
                "accuracy": self.curve[-1][2] if self.curve else None, "model": self.spec,
                "strategy": self.latest.strategy, "params": self.latest.params}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
        return path
