"""A site: take one task, train on local data, publish the update (confirmed), then ack the task.

The order matters: the task is acked only after the broker confirmed the update, so a worker that
dies anywhere in between leaves the task unacked and the broker hands it to another site. The
update id is derived from the task id, so if the first update did get through, the second one is
recognised by the aggregator as a duplicate.

Training runs on a separate thread while this thread keeps servicing the connection: heartbeats
keep flowing through minutes of local compute.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.shared import faults, he, metrics
from fedmq.shared.broker import (
    UPDATE_ID_HEADER,
    Connection,
    Delivery,
    JobNames,
    PublishRefusedError,
    run_forever,
    validate_site,
)
from fedmq.shared.compression import CompressionSpec, ErrorFeedback
from fedmq.shared.config import Compression, PrivacyMechanism, StrategyConfig
from fedmq.shared.datasets import check_site_data, fit_data, load_site
from fedmq.shared.errors import (
    BrokerUnavailableError,
    ConfigError,
    JobNotFoundError,
    MalformedMessageError,
    NonFiniteError,
    PrivacyBudgetError,
    TrainingFailedError,
)
from fedmq.shared.evaluation import make_report, parse_metrics, task_of
from fedmq.shared.jobstate import ModelFeed, emit_site, find_version
from fedmq.shared.messages import COMPRESSED_UPDATE_SCHEMA, EventKind, ModelVersion, Task, Update
from fedmq.shared.models import pick_device
from fedmq.shared.signing import load_private_key, sign_update
from fedmq.worker.privacy import DpPlan, SitePrivacy
from fedmq.worker.train import (
    EvalContext,
    Evaluator,
    LocalResult,
    TrainContext,
    Trainer,
    base_model,
    default_evaluator,
    run_evaluator,
    run_trainer,
    sgd_trainer,
    task_seed,
    train_local,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerOptions:
    slowdown: float = 1.0          # F: the site is F x slower than its own compute
    min_task_seconds: float = 0.0  # pad each task to at least this long (simulated local compute)
    device: str = "auto"
    heartbeat: int = 30
    model_cache: int = 4           # versions kept in memory
    max_tasks: int = 0             # stop after this many tasks (0 = until the job ends)
    wait_for_job: float = 60.0     # seconds to wait for the job's topology to appear
    ledger: str = ""               # DP budget ledger file ("" = <data stem>.<site>.dp-ledger.json beside the data)
    epsilon_budget: float = 0.0    # the site's own epsilon cap; the job's budget applies too (0 = none)
    key: str = ""                  # the site's Ed25519 key (fedmq keys --site); "" = updates go unsigned
    max_failures: int = 3          # consecutive training failures before the worker stops (0 = never)
    eval_data: str = ""            # held-out rows for federated evaluation ("" = hold out the job's site_fraction)


#: how much of a training error's text a task_failed event carries (readers bound it too)
ERROR_TEXT = 500
#: seconds a site keeps publishing an update the broker refuses (its own queue full) on one connection
REFUSED_WAIT = 60.0


@dataclass(frozen=True)
class _Outgoing:
    """An update on its way out, with its UPDATE_PUBLISHED event data."""

    task_id: str
    update_id: str
    body: bytes
    event: dict[str, Any]


@dataclass
class WorkerStats:
    tasks: int = 0
    failures: int = 0              # tasks whose training raised (reported as task_failed)
    reconnects: int = 0
    train_seconds: list[float] = field(default_factory=list)


#: a site's data: a file (NPZ or CSV) or the (x, y) arrays themselves (the Python API, fedmq.site)
SiteData = str | Path | tuple[np.ndarray, np.ndarray]


class Worker:
    def __init__(self, url: str, job: str, site: str, data: SiteData, *,
                 options: WorkerOptions | None = None, stop: threading.Event | None = None,
                 trainer: Trainer | None = None, evaluator: Evaluator | None = None,
                 feed: ModelFeed | None = None, pool: ThreadPoolExecutor | None = None) -> None:
        """`feed` and `pool` are shared by the sites of a fleet (`fedmq.fleet`): one models-stream
        reader and one training pool for all of them; by default each worker has its own."""
        self.url = url
        self.names = JobNames(job)
        self.site = validate_site(site)
        self.options = options or WorkerOptions()
        if isinstance(data, tuple):
            self._data_source = f"site {self.site}'s data"
            # the labels are checked once the job's model says classes or regression (`_model`)
            self.x, self.y = check_site_data(*data, source=self._data_source, task=None)
            ledger = Path(f"{self.site}.dp-ledger.json")  # arrays have no file to keep it beside
        else:
            self.x, self.y = load_site(data, task=None)
            self._data_source = f"data file {data}"
            ledger = default_ledger_path(data, self.site)
        self.privacy = SitePrivacy(self.site, self.options.ledger or ledger, site_budget=self.options.epsilon_budget)
        #: the local training: the bundled SGD loop unless the site operator installed their own
        self.trainer: Trainer = trainer or sgd_trainer
        self.custom_trainer = trainer is not None
        self.evaluator: Evaluator = evaluator or default_evaluator
        #: held-out rows for federated evaluation, split off on the first task that asks for it
        self._eval_rows: tuple[np.ndarray, np.ndarray] | None = None
        self._held_out = False
        self._evaluated: OrderedDict[int, None] = OrderedDict()  # versions this site reported on
        self.device = pick_device(self.options.device)
        self.key = load_private_key(self.options.key) if self.options.key else None
        self._he_context: tuple[str, Any] | None = None  # (context sha256, public TenSEAL context)
        #: top-k's residual (what this site has not sent yet) for this job; lost when the process ends
        self.feedback = ErrorFeedback()
        self.stop = stop or threading.Event()
        self.finished = False
        self.stats = WorkerStats()
        self._models: OrderedDict[int, ModelVersion] = OrderedDict()
        #: follows the models stream, so a task's version is usually read before the task arrives
        self._feed = feed or ModelFeed(url, self.names, cache=self.options.model_cache)
        self._owns_feed = feed is None
        #: updates whose confirm (or event) never came: republished after a reconnect, not retrained
        self._outbox: dict[str, _Outgoing] = {}
        self._failures = 0  # consecutive tasks whose training raised
        #: task ids whose update is confirmed but whose ack died with the connection
        self._delivered: OrderedDict[str, None] = OrderedDict()
        self._joined = False  # consumed the tasks queue once: its absence now means the job ended
        self._pool = pool or ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"train-{site}")
        self._owns_pool = pool is None

    def run(self) -> WorkerStats:
        try:
            run_forever(self._serve, stop=self.stop, what=f"worker site={self.site}",
                        on_reconnect=self._count_reconnect)
        finally:
            if self._owns_pool:
                self._pool.shutdown(wait=False, cancel_futures=True)
            if self._owns_feed:
                self._feed.close()
        return self.stats

    def _count_reconnect(self, _attempt: int) -> None:
        self.stats.reconnects += 1
        metrics.reconnected(self.names.job, "worker")

    def _job_finished(self) -> None:
        log.info("job finished, worker leaving job=%s site=%s", self.names.job, self.site)
        self.finished = True
        self.stop.set()

    def _wait_for_job(self, conn: Connection) -> bool:
        """True once the job exists; False when the worker was told to stop while waiting."""
        deadline = time.monotonic() + self.options.wait_for_job
        while not conn.job_exists(self.names):
            if self.stop.is_set():
                return False
            if self._joined or time.monotonic() > deadline:
                raise JobNotFoundError(f"job {self.names.job} does not exist on the broker "
                                       "(start its coordinator first, or check --job)")
            conn.sleep(0.5)
        return True

    def _serve(self) -> None:
        conn = Connection(self.url, name=f"fedmq-worker-{self.names.job}-{self.site}",
                          heartbeat=self.options.heartbeat)
        conn.open(retries=3)
        try:
            pending: list[Delivery] = []
            if not self.attach(conn, lambda: conn.consume(self.names.tasks, pending.append, prefetch=1,
                                                          on_cancel=self._job_finished)):
                return
            log.info("worker ready job=%s site=%s samples=%d", self.names.job, self.site, len(self.y))
            while not self.stop.is_set():
                conn.process(0.2)
                while pending and not self.stop.is_set():
                    self._handle(conn, pending.pop(0))
                if self.options.max_tasks and self.stats.tasks >= self.options.max_tasks:
                    self.stop.set()
        finally:
            conn.close()

    def attach(self, conn: Connection, consume: Callable[[], object]) -> bool:
        """On a (re)opened connection: wait for the job, republish unconfirmed updates, then call
        `consume` (which starts this site's task consumer). False when the job this worker had
        joined is gone (it ended) or it was told to stop; JobNotFoundError when it never appeared."""
        try:
            if not self._wait_for_job(conn):
                return False
            self._resend(conn)
            consume()
        except JobNotFoundError:
            if not self._joined:
                raise
            self._outbox.clear()  # the coordinator closed the job: nobody consumes updates now
            self._job_finished()
            return False
        self._joined = True
        return True

    def handle(self, conn: Connection, d: Delivery) -> None:
        """One task delivery, start to ack, on `conn` (a fleet drives many workers this way)."""
        self._handle(conn, d)

    def _handle(self, conn: Connection, d: Delivery) -> None:
        try:
            task = Task.decode(d.body)
        except MalformedMessageError as exc:
            self._park(conn, d, exc.reason, str(exc))
            return
        if task.job != self.names.job:
            self._park(conn, d, "wrong_job", f"task for {task.job}")
            return
        log.info("task received", extra={"job": task.job, "site": self.site, "task": task.task_id,
                                         "version": task.version, "redelivered": d.redelivered})
        if task.task_id in self._delivered:
            log.info("task redelivered after its update was confirmed: acked, not trained again",
                     extra={"job": task.job, "site": self.site, "task": task.task_id})
            d.ack()
            del self._delivered[task.task_id]
            return
        try:
            metric_names = self._eval_options(task)
        except ConfigError as exc:
            self._park(conn, d, "bad_options", str(exc))
            return
        try:
            # accounting can take a second (sigma calibration): off the connection's thread
            plan = conn.wait_for(self._pool.submit(self.privacy.plan, task, len(self.y)))
        except PrivacyBudgetError as exc:
            self._refuse(conn, d, task, exc)
            return
        except ConfigError as exc:
            self._park(conn, d, "bad_options", str(exc))
            return
        if plan is not None and plan.cfg.mechanism is PrivacyMechanism.DP_SGD and self.custom_trainer:
            # Opacus must own the optimizer, the sampler and the step count the ledger is charged
            # for; a loop of the user's own could spend more than accounted. Nothing was charged
            # yet; the task is not acked, so it goes back to the other sites when we leave.
            raise ConfigError(f"site {self.site}: job {task.job} uses DP-SGD, which needs the bundled trainer: "
                              "start this worker without --trainer (DP-FedAvg works with a trainer of your own)")
        started = time.monotonic()
        base = self._model(task)
        try:
            report = conn.wait_for(self._pool.submit(self._evaluate, task, base, metric_names))
            result: LocalResult = conn.wait_for(self._pool.submit(self._train, task, base, started, plan))
        except BrokerUnavailableError:
            raise  # the connection, not the training: reconnect, the task is redelivered
        except Exception as exc:  # the model's or the trainer's code raised: report it, go on
            self._failed(conn, d, task, exc)
            return
        self._failures = 0
        if self.stop.is_set() and self.finished:
            return  # the job ended while we trained: nothing to deliver to
        update = Update(
            job=task.job, update_id=task.update_id, task_id=task.task_id, site=self.site,
            base_version=base.version, num_samples=result.num_samples, delta=result.delta,
            metrics={**result.metrics, "task_seconds": time.monotonic() - started},
            privacy=plan.privacy_record() if plan else {}, task_proof=task.signature,
        )
        try:
            update = conn.wait_for(self._pool.submit(self._seal, update, base))
        except NonFiniteError as exc:  # training diverged; CKKS cannot carry it (plaintext: dead letter)
            self._park(conn, d, exc.reason, str(exc))
            return
        if not self._send(conn, _Outgoing(task.task_id, update.update_id, update.encode(), dict(
            task_id=task.task_id, update_id=update.update_id, site=self.site, base_version=base.version,
            num_samples=result.num_samples, loss=result.metrics.get("loss"),
            task_seconds=update.metrics["task_seconds"], epsilon=update.privacy.get("epsilon"),
            **({"eval": report} if report else {})))):
            return  # the job was closed while we trained
        faults.point("worker.before_ack")
        d.ack()
        self._delivered.pop(task.task_id, None)
        self.stats.tasks += 1
        self.stats.train_seconds.append(update.metrics["task_seconds"])
        metrics.task_trained(task.job, self.site, update.metrics["task_seconds"])
        log.info("update published", extra={"job": task.job, "site": self.site, "task": task.task_id,
                                             "base_version": base.version,
                                             "seconds": round(update.metrics["task_seconds"], 3)})

    def _failed(self, conn: Connection, d: Delivery, task: Task, exc: Exception) -> None:
        """Tell the coordinator why (it reissues the task to the others; monitor, history and
        report show the error), reject the task, and stop after `max_failures` in a row: code that
        fails on every task would otherwise take and fail every task of the job."""
        error = f"{type(exc).__name__}: {exc}"[:ERROR_TEXT]
        self._failures += 1
        self.stats.failures += 1
        metrics.task_failed(task.job, self.site)
        log.error("training failed", exc_info=exc, extra={
            "job": task.job, "site": self.site, "task": task.task_id, "failures_in_a_row": self._failures})
        emit_site(conn, self.names, self.site, EventKind.TASK_FAILED, task_id=task.task_id,
                  reason="training_failed", error=error)
        d.reject()
        if self.options.max_failures and self._failures >= self.options.max_failures:
            raise TrainingFailedError(f"site {self.site}: training failed on {self._failures} tasks in a row, "
                                      f"last: {error}; fix the model, trainer or data and start the worker again")

    def _park(self, conn: Connection, d: Delivery, reason: str, detail: str) -> None:
        """A task this site cannot train is rejected: the broker itself dead-letters it (reason
        "rejected", x-death headers), since a site has no write permission on dead letters."""
        log.warning("task rejected", extra={"job": self.names.job, "site": self.site, "reason": reason,
                                             "detail": detail[:300]})
        d.reject()

    def _send(self, conn: Connection, out: _Outgoing) -> bool:
        """Publish the update (confirmed), then its event; False when the job is closed.

        The update stays in the outbox until both went through; a copy that did arrive before the
        connection died is dropped by the aggregator as a duplicate (same update id), so
        republishing is safe and training again is not needed.
        """
        self._outbox[out.task_id] = out
        faults.point("worker.before_publish")
        try:
            self._publish_update(conn, out)
        except JobNotFoundError:
            # the coordinator deletes the updates exchange once the job's last updates are in
            self._outbox.clear()
            self._job_finished()
            return False
        emit_site(conn, self.names, self.site, EventKind.UPDATE_PUBLISHED, **out.event)
        del self._outbox[out.task_id]
        self._delivered[out.task_id] = None
        while len(self._delivered) > 1000:
            self._delivered.popitem(last=False)
        return True

    def _publish_update(self, conn: Connection, out: _Outgoing) -> None:
        """Publish, waiting while the broker refuses: this site's own updates queue is at its
        length limit (the aggregator is behind, or away). Waiting keeps the connection and so the
        task; only past REFUSED_WAIT does the refusal count as a lost connection (reconnect)."""
        deadline = time.monotonic() + REFUSED_WAIT
        pause = 0.1
        while True:
            try:
                conn.publish(self.names.updates_exchange, self.site, out.body,
                             headers={UPDATE_ID_HEADER: out.update_id}, message_id=out.update_id)
                return
            except PublishRefusedError:
                if time.monotonic() + pause > deadline or self.stop.is_set():
                    raise
                log.warning("update refused by the broker, waiting", extra={
                    "job": self.names.job, "site": self.site, "update": out.update_id, "pause": pause})
                conn.sleep(pause)
                pause = min(2 * pause, 5.0)

    def _resend(self, conn: Connection) -> None:
        for out in list(self._outbox.values()):
            log.info("republishing an unconfirmed update", extra={
                "job": self.names.job, "site": self.site, "update": out.update_id})
            if not self._send(conn, out):
                return

    def _refuse(self, conn: Connection, d: Delivery, task: Task, exc: PrivacyBudgetError) -> None:
        """Say why in the events (the coordinator reissues the task to the others), ack, leave:
        every later task of the job would cost at least as much."""
        emit_site(conn, self.names, self.site, EventKind.TASK_REFUSED, task_id=task.task_id,
                  reason=exc.reason, epsilon=exc.spent, epsilon_next=exc.would_be, epsilon_budget=exc.budget)
        d.ack()
        log.warning("task refused, privacy budget spent; site leaving",
                    extra={"job": task.job, "site": self.site, "task": task.task_id,
                           "epsilon": round(exc.spent, 4), "budget": exc.budget})
        self.stop.set()

    def _seal(self, update: Update, base: ModelVersion) -> Update:
        """Compress or encrypt, as the job says, then sign, so the signature covers what travels.
        Runs on the training thread: a 1M-parameter delta takes about a second to encrypt."""
        update = self._compress(update, base)
        if he.is_encrypted(base.meta):
            enc = base.meta[he.META_ENCRYPTION]
            sha = str(enc["context_sha256"])
            if self._he_context is None or self._he_context[0] != sha:
                v0, _ = find_version(self.url, self.names, 0, 0)
                self._he_context = (sha, he.public_context_from_meta(v0.meta, sha))
            update = he.encrypt_update(update, self._he_context[1], sha, int(enc["slots"]))
        return sign_update(update, self.key) if self.key is not None else update

    def _compress(self, update: Update, base: ModelVersion) -> Update:
        """The delta in the job's wire form (strategy.compression, read from the version's params like
        the aggregator reads it): whatever the trainer returned, the bundled loop's or the site's own."""
        spec = CompressionSpec.of(StrategyConfig.from_params(base.params))
        if spec.kind is Compression.NONE or update.delta is None:
            return update
        wire = self.feedback.compress(update.delta, spec)
        return dataclasses.replace(update, delta=wire, compression=spec.tag, schema=COMPRESSED_UPDATE_SCHEMA)

    def _model(self, task: Task) -> ModelVersion:
        mv = self._models.get(task.version)
        if mv is None:
            mv = self._feed.get(task.version, task.model_offset)
            if not self._models:
                # the job's model is known only now: data that does not fit it stops the site (exit 2)
                # before it trains garbage, e.g. the wrong feature count or labels past num_classes
                self.x, self.y = fit_data(self.x, self.y, mv.model, source=self._data_source)
                if self._eval_rows is not None:
                    self._eval_rows = fit_data(*self._eval_rows, mv.model, source=self._eval_source())
                self._warm_up(mv)
            self._models[task.version] = mv
            while len(self._models) > self.options.model_cache:
                self._models.popitem(last=False)
        return mv

    def _eval_options(self, task: Task) -> tuple[str, ...]:
        """The metrics the job asks the sites for (none: no federated evaluation); the held-out
        rows are split off the first time, before the privacy plan counts the training rows."""
        opts = task.options.get("evaluation")
        if not opts:
            return ()
        names, fraction = opts.get("metrics") if isinstance(opts, dict) else None, \
            opts.get("site_fraction") if isinstance(opts, dict) else None
        if (not isinstance(names, list) or not all(isinstance(n, str) for n in names)
                or isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction <= 0.9):
            raise ConfigError(f"task {task.task_id}: malformed evaluation options {str(opts)[:200]}")
        names_checked = parse_metrics(",".join(names), task_of(self._spec_hint(task)), "task evaluation metrics") \
            if names else ()
        if not self._held_out:
            self._hold_out(float(fraction))
        return names_checked if self._eval_rows is not None else ()

    def _spec_hint(self, task: Task) -> dict[str, Any]:
        """The job's model spec, for the task kind: the cached version's (the first task reads it)."""
        mv = self._models.get(task.version) or self._model(task)
        return mv.model

    def _eval_source(self) -> str:
        return f"evaluation data file {self.options.eval_data}" if self.options.eval_data else \
            f"{self._data_source} (held-out rows)"

    def _hold_out(self, fraction: float) -> None:
        """--eval-data, else `fraction` of the site's rows, fixed by the site's name, so a restarted
        site holds out the same rows and never trains on what it evaluated on before."""
        self._held_out = True
        if self.options.eval_data:
            self._eval_rows = load_site(self.options.eval_data, task=None)
            if self._models:
                self._eval_rows = fit_data(*self._eval_rows, next(iter(self._models.values())).model,
                                           source=self._eval_source())
            return
        n = len(self.y)
        k = int(round(fraction * n))
        if k < 1 or n - k < 1:
            log.warning("too few rows to hold any out: this site reports no evaluation",
                        extra={"job": self.names.job, "site": self.site, "rows": n, "fraction": fraction})
            return
        seed = int.from_bytes(hashlib.sha256(self.site.encode()).digest()[:4], "little")
        order = np.random.default_rng(seed).permutation(n)
        held, kept = np.sort(order[:k]), np.sort(order[k:])
        self._eval_rows = (self.x[held], self.y[held])
        self.x, self.y = self.x[kept], self.y[kept]

    def _evaluate(self, task: Task, base: ModelVersion, names: tuple[str, ...]) -> dict[str, Any] | None:
        """Runs on the training thread: the version the task brought, on the held-out rows, once
        per version (a later task on the same version has nothing new to say)."""
        if not names or self._eval_rows is None or base.version in self._evaluated:
            return None
        x, y = self._eval_rows
        model = base_model(base.model, base.weights, self.device)
        values = run_evaluator(self.evaluator, EvalContext(
            model=model.eval(), x=x, y=y, metrics=names, task=task_of(base.model), device=self.device,
            version=base.version, job=task.job, site=self.site))
        self._evaluated[base.version] = None
        while len(self._evaluated) > 256:
            self._evaluated.popitem(last=False)
        return make_report(base.version, len(y), values)

    def _warm_up(self, mv: ModelVersion) -> None:
        """One throw-away step, so torch's first-call set-up is not billed to the first task
        (it would be multiplied by --slowdown and make a slow site look stuck)."""
        n = min(len(self.y), 8)
        train_local(mv.model, mv.weights, self.x[:n], self.y[:n], epochs=1, batch_size=n, lr=1e-3,
                    device=self.device)

    def _train(self, task: Task, base: ModelVersion, started: float, plan: DpPlan | None = None) -> LocalResult:
        """Runs on the training thread: compute, then simulate a slower site if asked to."""
        t0 = time.monotonic()
        if plan is None:
            result = run_trainer(self.trainer, self._context(task, base))
        else:
            own = (lambda: run_trainer(self.trainer, self._context(task, base))) if self.custom_trainer else None
            result = self.privacy.train(plan, task, base.model, base.weights, self.x, self.y, device=self.device,
                                        local=own)
        compute = time.monotonic() - t0
        pad = max(0.0, (self.options.slowdown - 1.0) * compute)
        pad = max(pad, self.options.min_task_seconds * self.options.slowdown - (time.monotonic() - started))
        if pad > 0:
            self.stop.wait(pad)
        return result


    def _context(self, task: Task, base: ModelVersion) -> TrainContext:
        """The trainer's view of one task: a fresh model holding the base version's weights."""
        return TrainContext(
            model=base_model(base.model, base.weights, self.device), x=self.x, y=self.y, epochs=task.epochs,
            batch_size=task.batch_size, lr=task.lr, mu=task.mu, seed=task_seed(task.task_id), device=self.device,
            task_id=task.task_id, version=base.version, job=task.job, site=self.site, base=base.weights,
            model_spec=base.model, options=task.options)


def default_ledger_path(data: str | Path, site: str) -> Path:
    """Beside the site's data: the budget belongs to the records, whichever job trains on them."""
    p = Path(data)
    return p.with_name(f"{p.stem}.{site}.dp-ledger.json")
