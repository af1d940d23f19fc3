"""The coordinator: owns one job from declaration to the exported final model.

It keeps `concurrency` tasks outstanding (one new task per finished one, always from the newest
version it knows), evaluates every version on held-out data, and stops at the target accuracy,
the version limit or the time limit.

It keeps no local state: its journal is the broker's. Each (re)connection, after a restart or a
lost broker, rebuilds the job from the streams (`_resume`):

* tasks.log - every task issued. The tasks exchange routes one publish to the tasks queue *and*
  this stream, so a task is journaled exactly when it exists: a coordinator killed right after
  publishing finds it on restart and does not issue that work again;
* events - finished (UPDATE_PUBLISHED) and refused tasks, evaluated versions, job finishing;
* models - versions and the update ids they include;
* dead.log - dead-lettered update ids, whoever parked them (aggregator, or the broker's
  delivery limit).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmq.coordinator.keys import HostedKeyHolder, genesis_meta
from fedmq.shared import faults, metrics
from fedmq.shared.broker import (
    Connection,
    Delivery,
    JobNames,
    Retention,
    StreamGroup,
    StreamReader,
    TopologyConfig,
    run_forever,
)
from fedmq.shared.config import ExportPolicy, JobConfig, PrivacyMechanism, StrategyName
from fedmq.shared.datasets import fit_to_model, load_site
from fedmq.shared.errors import (
    BrokerUnavailableError,
    ConfigError,
    JobNotFoundError,
    MalformedMessageError,
    PrivacyBudgetError,
)
from fedmq.shared.evaluation import (
    EvalSource,
    FederatedEval,
    TaskKind,
    evaluate_model,
    reached,
    read_evaluated,
    read_report,
)
from fedmq.shared.jobstate import (
    PoisonCounter,
    SourcedEvent,
    emit,
    field_id,
    field_list,
    field_text,
    find_version,
    read_event_delivery,
)
from fedmq.shared.jobview import SummaryJournal
from fedmq.shared.ledger import credible_update, read_dead_letter
from fedmq.shared.messages import EventKind, ModelVersion, Task, make_version, update_id_for
from fedmq.shared.models import build_model, check_forward, get_weights, model_spec, set_weights
from fedmq.shared.privacy import check_privacy, privacy_strategy, resolve_options
from fedmq.shared.signing import (
    META_REGISTRY,
    META_TASK_KEY,
    JobTrust,
    load_or_create_task_key,
    public_hex,
    sign_task,
)

log = logging.getLogger(__name__)

#: seconds (beyond the strategy's flush timeout) a finishing job waits for updates in flight
FINISH_GRACE = 60.0
#: the updates log must be quiet this long before the coordinator believes it has read it all
LOG_QUIET = 1.0


@dataclass
class JobResult:
    job: str
    strategy: str
    final_version: int      # the version handed over (exported), see CoordinatorConfig.export
    final_accuracy: float | None  # its central test accuracy (None: no data.test, or a regression job)
    versions: int           # the newest version number (the chain's length)
    updates_applied: int
    stop_reason: str
    wall_seconds: float
    seconds_to_target: float | None
    export_path: str
    accuracy_curve: list[tuple[int, float, float]] = field(default_factory=list)  # (version, t, acc)
    #: logged updates neither in a version nor dead-lettered when the grace ran out (normally 0);
    #: the updates queue is then kept, so an aggregator started later can still fold them
    updates_unresolved: int = 0
    last_accuracy: float | None = None  # test accuracy of the newest version
    task_failures: dict[str, int] = field(default_factory=dict)  # site -> tasks whose training raised
    #: the handed-over version's metrics by name: central when the coordinator has test data, else
    #: the sites' (federated; of `metrics_version`, the newest version they evaluated up to it)
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_source: str = ""
    metrics_version: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


class Coordinator:
    #: what v0 says an update must prove (task key, site registry): read from v0 on the models
    #: stream (`_note_v0`); only updates that pass it count as in flight or as dead-lettered
    _trust: JobTrust | None = None
    #: entries of the events and dead-letter streams skipped (per reason); see `_poison_counter`
    _poison: PoisonCounter | None = None
    #: ids of tasks replaced after their deadline: still issued and unfinished, so their site may
    #: still report them (bounded by the tasks this coordinator issued); see `_late_tasks`
    _expired: set[str] | None = None

    def __init__(self, url: str, cfg: JobConfig, *, stop: threading.Event | None = None,
                 num_classes: int | None = None, input_shape: tuple[int, ...] | None = None) -> None:
        if not cfg.job:
            raise ConfigError("config.job: a job id is required (--job or [job] in the TOML)")
        cfg.check_evaluation()
        cfg = privacy_strategy(cfg)  # central DP noise: the strategy clips at the DP clip
        self.url = url
        self.cfg = cfg
        self.names = JobNames(cfg.job)
        self.stop = stop or threading.Event()
        self.task = cfg.model.task
        self.metric_names = cfg.evaluation.names(self.task)
        self.x_test: np.ndarray | None = None
        self.y_test: np.ndarray | None = None
        if cfg.data.test:
            self.x_test, self.y_test = load_site(cfg.data.test, task=self.task)
        self.num_classes = 1 if self.task is TaskKind.REGRESSION else (
            num_classes or cfg.model.num_classes or int(self.y_test.max()) + 1)  # type: ignore[union-attr]
        self.input_shape = input_shape or cfg.model.shape() or tuple(self.x_test.shape[1:])  # type: ignore[union-attr]
        self.spec = model_spec(cfg.model.name, self.input_shape, self.num_classes, self.task, **cfg.model.args)
        self.model = build_model(self.spec, seed=cfg.seed)
        # refuse test data the model cannot take now (exit 2), not at the first evaluation
        if self.x_test is not None and self.y_test is not None:
            source = f"data.test {cfg.data.test}"
            self.x_test = fit_to_model(self.x_test, self.y_test, self.spec, source=source)
            check_forward(self.model, self.x_test, self.num_classes, source=source)
        else:
            check_forward(self.model, np.zeros((2, *self.input_shape), np.float32), self.num_classes,
                          source=f"model.input_shape {list(self.input_shape)}")
        self.key_meta = genesis_meta(cfg)
        self.task_key: Ed25519PrivateKey | None = None  # loaded once the job's state is known (_serve)
        self.keyholder: HostedKeyHolder | None = None
        check_privacy(cfg)
        #: [privacy] as sites get it in Task.options and the aggregator in v0's meta (sigma resolved)
        self.privacy_options = (resolve_options(cfg.privacy)
                                if cfg.privacy.mechanism is not PrivacyMechanism.NONE else {})
        self.sites_seen: set[str] = set()   # sites that published an update
        self.sites_spent: set[str] = set()  # sites that refused a task: privacy budget spent
        self.update_site: dict[str, str] = {}  # update id -> site, to attribute budget dead letters
        self.task_failures: dict[str, int] = {}  # site -> tasks whose training raised (task_failed)
        self.outstanding: dict[str, Task] = {}  # issued, neither finished, refused nor expired
        self.finished_tasks: set[str] = set()
        self.included: set[str] = set()
        self.dead_ids: set[str] = set()
        self.latest: ModelVersion | None = None
        self.latest_offset: int | None = None
        self.curve: list[tuple[int, float, float]] = []
        #: every evaluation: (version, t, source, metrics), central and federated
        self.evals: list[tuple[int, float, str, dict[str, float]]] = []
        self.federated = FederatedEval(cfg.evaluation.min_sites)
        self.started = time.time()
        self.target_at: float | None = None
        self.target_version: int | None = None
        self.round_version = -1  # fedavg: the version the current cohort was issued from
        self.evaluated: set[int] = set()
        self.job_started = False
        self.finishing: str | None = None  # stop reason, once JOB_FINISHING is journaled
        self.finished: dict[str, Any] | None = None  # JOB_FINISHED data: nothing left to do
        self.job_summary = SummaryJournal(cfg.job)  # what JOB_SUMMARY journals (fedmq.shared.jobview)

    def _reset(self) -> None:
        """Forget all that the streams hold: each (re)connection reads it back (`_resume`)."""
        self.sites_seen, self.sites_spent, self.update_site = set(), set(), {}
        self.task_failures = {}
        self.outstanding, self.finished_tasks = {}, set()
        self.included, self.dead_ids = set(), set()
        self.latest, self.latest_offset = None, None
        self.curve, self.evaluated, self.target_at, self.target_version = [], set(), None, None
        self.evals, self.federated = [], FederatedEval(self.cfg.evaluation.min_sites)
        self.round_version = -1
        self.started, self.job_started = time.time(), False
        self.finishing, self.finished = None, None
        self._trust, self._expired = None, None  # read again from the streams
        self.job_summary = SummaryJournal(self.cfg.job)  # the monitor's view (JOB_SUMMARY), refolded

    # ------------------------------------------------------------------ setup

    def _topology(self) -> TopologyConfig:
        r = self.cfg.retention
        return TopologyConfig(retention=Retention(r.max_age or None, r.max_bytes or None),
                              replicas=self.cfg.cluster.replicas, sites=self.sites,
                              site_queue_limit=self.cfg.coordinator.site_queue_limit)

    @property
    def sites(self) -> tuple[str, ...]:
        """The registry's sites: each gets its own updates queue (none in a job without one)."""
        return tuple(sorted(self.key_meta.get(META_REGISTRY) or ()))

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
        meta[META_TASK_KEY] = public_hex(self._signing_key())
        return meta

    def _task_key_path(self) -> Path:
        c = self.cfg.coordinator
        return Path(c.task_key) if c.task_key else Path(c.out) / f"{self.cfg.job}.task.key"

    def _load_task_key(self, newest: tuple[ModelVersion, int] | None) -> None:
        """Create the key with the job; afterwards it must be the one v0 published."""
        key = load_or_create_task_key(self._task_key_path(), create=newest is None)
        published = newest[0].meta.get(META_TASK_KEY) if newest is not None else None
        if published is not None and published != public_hex(key):
            raise ConfigError(f"task key {self._task_key_path()} is not the key job {self.cfg.job} was "
                              "started with; updates signed for its tasks would all be refused")
        self.task_key = key

    def _signing_key(self) -> Ed25519PrivateKey:
        if self.task_key is None:
            raise RuntimeError("task key used before _serve loaded it")
        return self.task_key

    def _replay(self, stream: str, follow: dict[str, int | str]) -> Iterator[Delivery]:
        """Every entry of `stream` so far; records in `follow` the offset to follow it from."""
        with StreamReader(self.url, stream, name=f"fedmq-coord-replay-{self.cfg.job}") as reader:
            for d in reader.read("first"):
                follow[stream] = (d.stream_offset or 0) + 1
                yield d

    def _resume(self) -> tuple[tuple[ModelVersion, int] | None, dict[str, int | str]]:
        """Rebuild the job from its streams: (newest version and its offset, where to follow from).

        Tasks first (outstanding = issued), then events (minus finished and refused ones), versions
        (v0 says what an update must prove) and dead letters. Nothing is evaluated or issued here.
        """
        n = self.names
        follow: dict[str, int | str] = {n.models: "first", n.events: "first", n.dead_log: "first"}
        for d in self._replay(n.tasks_log, follow):
            try:
                t = Task.decode(d.body)
            except MalformedMessageError as exc:
                self._poison_counter().note(exc.reason, n.tasks_log, d.stream_offset, exc)
                continue
            self.outstanding[t.task_id] = t
            self.round_version = max(self.round_version, t.version)
        for d in self._replay(n.events, follow):
            self._on_event(d, replaying=True)
        newest: tuple[ModelVersion, int] | None = None
        for d in self._replay(n.models, follow):
            try:
                mv = ModelVersion.decode(d.body)
            except MalformedMessageError as exc:
                self._poison_counter().note(exc.reason, n.models, d.stream_offset, exc)
                continue
            self._note_v0(mv)
            self.included.update(mv.included)
            if newest is None or mv.version > newest[0].version:
                newest = (mv, d.stream_offset or 0)
        for d in self._replay(n.dead_log, follow):
            self._on_dead_letter(d)
        if self.job_started:
            log.info("coordinator resumed job=%s version=%s outstanding=%d finished=%d included=%d poison=%d",
                     self.cfg.job, newest[0].version if newest else None, len(self.outstanding),
                     len(self.finished_tasks), len(self.included), self._poison_counter().total)
        return newest, follow

    def _late_tasks(self) -> set[str]:
        if self._expired is None:
            self._expired = set()
        return self._expired

    def _poison_counter(self) -> PoisonCounter:
        if self._poison is None:
            self._poison = PoisonCounter("coordinator", self.cfg.job)
        return self._poison

    def _note_v0(self, mv: ModelVersion) -> None:
        """v0's meta is the job's trust anchor (JobTrust): the task key and the site registry."""
        if mv.version == 0 and mv.parent == -1:
            self._trust = JobTrust.from_meta(mv.meta)

    # ------------------------------------------------------------------ events

    def _on_event(self, d: Delivery, *, replaying: bool = False) -> None:
        """Read one entry of the events stream: skipped and counted unless the routing key vouches
        for it (`shared.jobstate.read_event`) and `_apply_event` finds it well-typed and relevant.
        Every entry also goes into the job summary monitors start from (`SummaryJournal`)."""
        self.job_summary.fold(d)
        try:
            sev = read_event_delivery(d)
        except MalformedMessageError as exc:
            self._poison_counter().note(exc.reason, self.names.events, d.stream_offset, exc)
            return
        why = self._apply_event(sev, replaying=replaying)
        if why:
            self._poison_counter().note(why, self.names.events, d.stream_offset,
                                        f"event={sev.event.event} site={sev.site}")

    def _apply_event(self, sev: SourcedEvent, *, replaying: bool = False) -> str:
        """Fold one vouched-for event into the job state; "" when used, else why it was ignored.

        Trusted roles' events are believed, but every field is type-checked (a wrong type is a
        skip). A site's event only concerns a task this coordinator has outstanding, and only ever
        the site of its routing key, so junk cannot grow memory or spend another site's budget."""
        if sev.site is not None:
            return self._apply_site_event(sev.site, sev)
        ev, data = sev.event, sev.data
        if ev.event == EventKind.JOB_STARTED:
            self.started, self.job_started = ev.ts, True
        elif ev.event == EventKind.VERSION_EVALUATED:
            if not replaying:
                return ""  # live ones are our own
            ev_read = read_evaluated(data)
            if ev_read is None:
                return "bad_field"
            if ev_read.scope == EvalSource.FEDERATED.value:
                self.federated.done.add(ev_read.version)
            else:
                self.evaluated.add(ev_read.version)
            self._record(ev_read.version, ev_read.t, ev_read.scope, ev_read.metrics)
        elif ev.event == EventKind.JOB_FINISHING:
            self.finishing = field_text(data, "reason", 64) or "interrupted"
        elif ev.event == EventKind.JOB_FINISHED:
            self.finished = dict(data)
        elif ev.event == EventKind.DEAD_LETTERED:
            # the dead log is what counts an update as resolved (`_on_dead_letter`); the event only
            # tells which site central DP found over budget, for an update this job saw published
            uid = field_id(data, "update_id")
            if field_text(data, "reason", 64) == PrivacyBudgetError.reason and uid in self.update_site:
                self.sites_spent.add(self.update_site[uid])
        elif ev.event == EventKind.VERSION_PUBLISHED:
            included = field_list(data, "included", lambda v: v if type(v) is str and len(v) <= 128 else None)
            if included is None:
                return "bad_field"
            self.included.update(included)
        return ""

    def _apply_site_event(self, site: str, sev: SourcedEvent) -> str:
        """UPDATE_PUBLISHED / TASK_REFUSED / TASK_FAILED from `site` (read_event has matched the
        routing key, the body's event and data["site"]) for a task that is outstanding here."""
        data = sev.data
        tid = field_id(data, "task_id")
        if tid is None:
            return "bad_field"
        late = self._late_tasks()
        if tid not in self.outstanding and tid not in late:
            return "unknown_task"
        if sev.event.event == EventKind.UPDATE_PUBLISHED:
            if field_id(data, "update_id") != update_id_for(tid):
                return "bad_field"
            task = self.outstanding.get(tid)
            report = read_report(data.get("eval")) if "eval" in data and self.cfg.evaluation.federated else None
            if report is not None and task is not None and report.version == task.version:
                self.federated.add(site, report)  # a site reports on the version its task brought, once
            self.finished_tasks.add(tid)
            self.outstanding.pop(tid, None)
            late.discard(tid)
            self.sites_seen.add(site)
            self.update_site[update_id_for(tid)] = site
        else:  # TASK_REFUSED / TASK_FAILED: _issue replaces the task for the other sites
            self.outstanding.pop(tid, None)
            late.discard(tid)
            if sev.event.event == EventKind.TASK_FAILED:
                self.task_failures[site] = self.task_failures.get(site, 0) + 1
                log.warning("site training failed", extra={
                    "job": self.names.job, "site": site, "task": tid,
                    "error": field_text(data, "error", 500) or "?"})
            elif field_text(data, "reason", 64) == PrivacyBudgetError.reason:
                self.sites_spent.add(site)
        return ""

    def _on_dead_letter(self, d: Delivery) -> None:
        """Dead updates count as resolved at job end, whoever parked them: the aggregator or the
        broker's delivery limit (no event, only the dead log). Only a credible update counts (it
        answers a task of this job, `credible_update`): what else lies here may be a site's bytes
        with headers of its choosing, which nothing needs to wait for."""
        u = credible_update(d.body, self._trust, None)
        if u is not None:
            self.dead_ids.add(u.update_id)
            return
        dl = read_dead_letter(d)
        if dl.kind != "task":
            self._poison_counter().note("not_credible", self.names.dead_log, d.stream_offset,
                                        f"kind={dl.kind} reason={dl.reason} id={dl.ident}")

    # ------------------------------------------------------------------ tasks

    def _issue(self, conn: Connection) -> None:
        """Top up to `concurrency` outstanding tasks. The publish itself journals the task (tasks.log);
        a lost confirm ends the session, and `_resume` then finds the task in the log or not: either
        way it is issued once.

        TASK_ISSUED (for the monitor) goes out first: a site takes a task within milliseconds, and
        its task_failed or update_published must not reach the events stream before the issue it
        answers (readers drop answers to tasks they never saw issued). A coordinator killed in
        between leaves one TASK_ISSUED for a task that never went out; the monitor counts it
        unanswered, and nothing else reads it."""
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
            task = sign_task(Task(
                job=self.cfg.job, task_id=uuid.uuid4().hex[:16], version=self.latest.version,
                model_offset=self.latest_offset, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, mu=t.mu,
                issued_at=now, deadline=now + c.task_deadline,
                options=self._task_options()), self._signing_key())
            emit(conn, self.names, "coordinator", EventKind.TASK_ISSUED, task=task.to_dict())
            conn.publish(self.names.tasks_exchange, "task", task.encode(), message_id=task.task_id)
            faults.point("coordinator.after_task_publish")
            self.outstanding[task.task_id] = task
            metrics.tasks_issued(self.cfg.job, 1, len(self.outstanding))

    def _task_options(self) -> dict[str, Any]:
        """The job-wide site options every task carries: DP parameters, federated evaluation."""
        options: dict[str, Any] = {}
        if self.privacy_options:
            options["privacy"] = self.privacy_options
        evaluation = self.cfg.evaluation.site_options(self.task)
        if evaluation:
            options["evaluation"] = evaluation
        return options

    def _expire(self) -> None:
        """Forget tasks past their deadline so replacements (new ids, newest version) are issued.

        The late task is not withdrawn: if its site still delivers, the aggregator folds the update
        with its staleness, or dead-letters it with reason "stale" past `max_staleness`. After a
        restart an expired task that was replaced before is dropped again here, not replaced twice.
        """
        now = time.time()
        for tid, task in list(self.outstanding.items()):
            if task.deadline < now:
                log.warning("task past deadline, reissuing job=%s task=%s", self.cfg.job, tid)
                del self.outstanding[tid]
                self._late_tasks().add(tid)

    # ------------------------------------------------------------------ versions

    def _on_version(self, conn: Connection, mv: ModelVersion, offset: int | None) -> None:
        self.included.update(mv.included)
        if self.latest is not None and mv.version <= self.latest.version:
            return
        self.latest, self.latest_offset = mv, offset
        set_weights(self.model, {k: np.asarray(v) for k, v in mv.weights.items()})
        if mv.version in self.evaluated or self.x_test is None or self.y_test is None:
            return  # evaluated before a restart (the result is in the events stream), or by the sites only
        self.evaluated.add(mv.version)
        names = self.metric_names
        if self.task is TaskKind.CLASSIFICATION:  # accuracy and loss always: the tools' headline figures
            names = tuple(dict.fromkeys(("accuracy", "loss", *names)))
        values = evaluate_model(self.model, self.x_test, self.y_test, names, self.task)
        t = time.time() - self.started
        self._record(mv.version, t, EvalSource.CENTRAL.value, values)
        extra = {k: values[k] for k in ("accuracy", "loss") if k in values}
        emit(conn, self.names, "coordinator", EventKind.VERSION_EVALUATED, version=mv.version, t=t,
             included=len(mv.included), sha256=mv.sha256, scope=EvalSource.CENTRAL.value, metrics=values, **extra)
        log.info("version evaluated", extra={"job": self.cfg.job, "version": mv.version, "source": "central",
                                              **{k: round(v, 4) for k, v in values.items()}, "t": round(t, 2)})

    def _emit_federated(self, conn: Connection) -> None:
        """Versions whose site reports reached `min_sites`: one VERSION_EVALUATED each (source federated)."""
        for version, summary in self.federated.ready():
            t = time.time() - self.started
            self._record(version, t, EvalSource.FEDERATED.value, summary["metrics"])
            emit(conn, self.names, "coordinator", EventKind.VERSION_EVALUATED, version=version, t=t,
                 scope=EvalSource.FEDERATED.value, metrics=summary["metrics"], sites=summary["sites"],
                 samples=summary["samples"])
            log.info("version evaluated", extra={"job": self.cfg.job, "version": version, "source": "federated",
                                                  "sites": summary["sites"], "t": round(t, 2),
                                                  **{k: round(v, 4) for k, v in summary["metrics"].items()}})

    def _record(self, version: int, t: float, source: str, values: dict[str, float]) -> None:
        """One evaluation of `version`: curves, Prometheus, and the stop criterion."""
        if source == EvalSource.CENTRAL.value and "accuracy" in values:
            self.curve.append((version, t, values["accuracy"]))
        self.evals.append((version, t, source, dict(values)))
        metrics.version_evaluated(self.cfg.job, version, source, values)
        target = self.cfg.target()
        if target is None or self.target_at is not None:
            return
        name, value, where = target
        if where.value == source and name in values and reached(name, values[name], value):
            self.target_at, self.target_version = t, version

    def _handover(self) -> tuple[ModelVersion, float | None]:
        """The version the job hands over and its accuracy (CoordinatorConfig.export)."""
        if self.latest is None:
            raise JobNotFoundError(f"job {self.cfg.job} has no model version to export")
        accuracy = {v: a for v, _, a in self.curve}
        chosen = self.latest
        if self.cfg.coordinator.export is ExportPolicy.TARGET and self.target_version is not None:
            if self.target_version != self.latest.version:
                chosen, _ = find_version(self.url, self.names, self.target_version)
        return chosen, accuracy.get(chosen.version)

    def _final_metrics(self, version: int) -> tuple[dict[str, float], str, int | None]:
        """(metrics, source, version they are of) for the handed-over `version`: its central
        figures, else the federated ones of the newest version up to it the sites evaluated."""
        central = [e for e in self.evals if e[2] == EvalSource.CENTRAL.value and e[0] == version]
        if central:
            return central[-1][3], EvalSource.CENTRAL.value, version
        fed = [e for e in self.evals if e[2] == EvalSource.FEDERATED.value and e[0] <= version]
        if fed:
            newest = max(fed, key=lambda e: e[0])
            return newest[3], EvalSource.FEDERATED.value, newest[0]
        return {}, "", None

    def _stop_reason(self) -> str | None:
        c = self.cfg.coordinator
        if self.stop.is_set():
            return "interrupted"
        if self.target_at is not None:
            target = self.cfg.target()
            return "target_accuracy" if target is not None and target[0] == "accuracy" else "target_metric"
        if self.latest is not None and self.latest.version >= c.max_versions:
            return "max_versions"
        if time.time() - self.started >= c.max_seconds:
            return "max_seconds"
        spent = len(self.sites_seen & self.sites_spent)
        if self.sites_seen and spent >= self.cfg.privacy.stop_when_spent * len(self.sites_seen):
            # the sites that trained have (mostly) spent their budgets: what is left would train on
            # a shrinking, biased minority (docs/privacy.md, caveats)
            return "privacy_budget"
        return None

    # ------------------------------------------------------------------ main loop

    def run(self) -> JobResult:
        """Run the job to its end. A lost broker (restart, network) ends only the session: the next
        one rebuilds the job from the streams, so nothing is issued or evaluated twice."""
        results: list[JobResult] = []
        try:
            run_forever(lambda: results.append(self._serve()), stop=self.stop,
                        what=f"coordinator job={self.cfg.job}",
                        on_reconnect=lambda _attempt: metrics.reconnected(self.cfg.job, "coordinator"))
        finally:
            if self.keyholder is not None:
                self.keyholder.close()
        if not results:
            raise BrokerUnavailableError(f"coordinator of job {self.cfg.job} stopped while the broker was "
                                         "unreachable; start it again to resume the job")
        return results[0]

    def _declare(self, conn: Connection) -> None:
        conn.declare_job(self.names, self._topology())
        if self.cfg.encryption.enabled:
            conn.declare_encrypted(self.names, self._topology())

    def _serve(self) -> JobResult:
        """One connection's life: resume (or create) the job, then keep it moving to its end."""
        self._reset()
        conn = Connection(self.url, name=f"fedmq-coordinator-{self.cfg.job}").open(retries=5)
        streams = _Streams(self.url, self.names)
        try:
            try:
                conn.queue_stats(self.names.events)
                fresh = False
            except JobNotFoundError:
                fresh = True
                self._declare(conn)
            newest, follow = self._resume() if not fresh else (None, {})
            if self.finished is not None:
                return self._journaled_result(self.finished)
            if self.finishing is None and not fresh:
                self._declare(conn)  # idempotent; never after JOB_FINISHING (it would revive the tasks queue)
            self._load_task_key(newest)
            if newest is None:
                self._publish_v0(conn)  # new job, or killed between declaring and publishing v0
            elif not self.job_started:
                emit(conn, self.names, "coordinator", EventKind.JOB_STARTED, strategy=newest[0].strategy,
                     params=newest[0].params, model=self.spec, concurrency=self.cfg.coordinator.concurrency)
            if self.cfg.encryption.secret_context and self.keyholder is None:
                self.keyholder = HostedKeyHolder(self.url, self.cfg.job, self.cfg.encryption.secret_context).start()
            if newest is not None:
                self._on_version(conn, newest[0], newest[1])
            streams.start(follow)
            reason = self.finishing
            while reason is None:
                self._poll(conn, streams)
                reason = self._stop_reason()
                if reason is None and self.latest is not None:
                    self._expire()
                    self._issue(conn)
                conn.process(0.0)  # heartbeats; the wait is on the streams (`_poll`)
            return self._finish(conn, streams, reason)
        finally:
            streams.close()
            conn.close()

    def _poll(self, conn: Connection, streams: _Streams, timeout: float = 0.05) -> None:
        """Whatever the streams hold, waiting up to `timeout` s for the first delivery on any."""
        got = streams.poll(timeout)
        for d in got["models"]:
            try:
                mv = ModelVersion.decode(d.body)
            except MalformedMessageError as exc:
                log.error("unreadable model version job=%s offset=%s error=%s", self.cfg.job, d.stream_offset, exc)
                continue
            self._note_v0(mv)
            self._on_version(conn, mv, d.stream_offset)
        for d in got["events"]:
            self._on_event(d)
        self.job_summary.maybe_emit(conn, self.names)
        self._emit_federated(conn)
        for d in got["dead"]:
            self._on_dead_letter(d)

    def _finish(self, conn: Connection, streams: _Streams, reason: str) -> JobResult:
        """Stop new work, let the aggregator fold what is in flight, export, announce the result.

        Safe to repeat after a crash (JOB_FINISHING is journaled, every step is idempotent): the
        tasks queue goes first (workers are cancelled and leave); the updates queue only once every
        update that reached the updates log is in a version or in dead letters (`_drain_updates`).
        """
        if self.finishing is None:
            log.info("job finishing job=%s reason=%s", self.cfg.job, reason)
            emit(conn, self.names, "coordinator", EventKind.JOB_FINISHING, reason=reason)
            self.finishing = reason
        conn.delete_queue(self.names.tasks)
        unresolved = self._drain_updates(conn, streams)
        if unresolved:
            log.error("updates still unresolved at the end; the updates queue is kept for an aggregator "
                      "to fold them job=%s count=%d first=%s", self.cfg.job, len(unresolved), min(unresolved))
        else:
            for queue in self.names.update_queues(self.sites)[1:]:
                conn.delete_queue(queue)
            conn.delete_queue(self.names.updates)  # the active aggregator is cancelled and leaves
            conn.delete_queue(self.names.aggregator_lock)  # so are the standbys
            if self.cfg.encryption.enabled:
                conn.delete_queue(self.names.aggregates)  # so are key holders (all sums are versions now)
        final, final_acc = self._handover()
        final_metrics, metrics_source, metrics_version = self._final_metrics(final.version)
        path = self.export(Path(self.cfg.coordinator.out), final, final_acc)
        newest = self.latest or final
        result = JobResult(
            job=self.cfg.job, strategy=self.cfg.strategy.name.value, final_version=final.version,
            final_accuracy=final_acc, versions=newest.version, updates_applied=len(self.included),
            stop_reason=reason, wall_seconds=time.time() - self.started, seconds_to_target=self.target_at,
            export_path=str(path), accuracy_curve=self.curve, updates_unresolved=len(unresolved),
            last_accuracy=self.curve[-1][2] if self.curve else None, task_failures=dict(self.task_failures),
            metrics=final_metrics, metrics_source=metrics_source, metrics_version=metrics_version,
        )
        emit(conn, self.names, "coordinator", EventKind.JOB_FINISHED, **{
            k: v for k, v in result.to_dict().items() if k != "accuracy_curve"})
        log.info("job finished job=%s reason=%s exported=%d metrics=%s newest=%d", self.cfg.job, reason,
                 final.version, {k: round(v, 4) for k, v in final_metrics.items()}, newest.version)
        return result

    def _drain_updates(self, conn: Connection, streams: _Streams) -> set[str]:
        """Wait until every update id in the updates log is included or dead; the ids still open.

        Reading the log (not UPDATE_PUBLISHED events) also covers a worker killed between its
        update and its event. Only credible updates are waited for (`credible_update`: a task proof
        of this job, sent by the site it names): junk in the log is the aggregator's to dead-letter,
        and only credible updates keep the log from counting as quiet. Once all is resolved and the
        log has been quiet for LOG_QUIET, the updates exchange is deleted, so nothing (e.g. a
        worker's republished update) can enter the log after the check, and the log is read to its
        end once more.
        """
        logged: set[str] = set()
        sealed = False
        deadline = time.monotonic() + self.cfg.strategy.flush_timeout + FINISH_GRACE
        with StreamReader(self.url, self.names.updates_log, name=f"fedmq-coord-ulog-{self.cfg.job}") as ulog:
            ulog.start("first")
            quiet_since = time.monotonic()
            while time.monotonic() < deadline:
                credible = [u.update_id for d in ulog.poll(0.05)
                            if (u := credible_update(d.body, self._trust, d.routing_key))]
                if credible:  # a site flooding the log with junk must not keep it from being quiet
                    quiet_since = time.monotonic()
                    logged.update(credible)
                self._poll(conn, streams, 0.0)
                open_ids = logged - self.included - self.dead_ids
                if open_ids or time.monotonic() - quiet_since < LOG_QUIET or self._updates_ready(conn):
                    continue
                if sealed:
                    return set()
                conn.delete_exchange(self.names.updates_exchange)
                sealed, quiet_since = True, time.monotonic()
        return logged - self.included - self.dead_ids

    def _updates_ready(self, conn: Connection) -> int:
        ready = 0
        for queue in self.names.update_queues(self.sites):
            with suppress(JobNotFoundError):  # deleted by an earlier run of `_finish`
                ready += conn.queue_stats(queue)[0]
        return ready

    def _journaled_result(self, data: dict[str, Any]) -> JobResult:
        """The job finished before this restart: report what JOB_FINISHED recorded."""
        known = set(JobResult.__dataclass_fields__) - {"accuracy_curve"}
        log.info("job already finished job=%s", self.cfg.job)
        return JobResult(**{k: v for k, v in data.items() if k in known}, accuracy_curve=self.curve)

    def export(self, out_dir: Path, mv: ModelVersion, accuracy: float | None) -> Path:
        """state_dict as .pt plus JSON metadata (version, sha256, accuracy) beside it."""
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{self.cfg.job}-v{mv.version}.pt"
        set_weights(self.model, {k: np.asarray(v) for k, v in mv.weights.items()})
        torch.save(self.model.state_dict(), path)
        meta = {"job": self.cfg.job, "version": mv.version, "sha256": mv.sha256,
                "accuracy": accuracy, "model": self.spec, "strategy": mv.strategy, "params": mv.params,
                "newest_version": self.latest.version if self.latest else mv.version,
                "export_policy": self.cfg.coordinator.export.value}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
        return path


class _Streams(StreamGroup):
    """The streams a running coordinator follows, on one connection of their own."""

    def __init__(self, url: str, names: JobNames) -> None:
        super().__init__(url, {"models": names.models, "events": names.events, "dead": names.dead_log},
                         name=f"fedmq-coord-streams-{names.job}")
