"""The site-side Python API: train with PyTorch code of your own, run a site from your own script.

A trainer is a plain function of one `TrainContext` that returns a `TrainResult`::

    import torch
    from fedmq.site import TrainContext, TrainResult, run_site

    def train(ctx: TrainContext) -> TrainResult:
        model = ctx.model                                  # the task's version, on ctx.device
        opt = torch.optim.Adam(model.parameters(), lr=ctx.lr)
        x, y = ctx.tensors()
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                             batch_size=ctx.batch_size, shuffle=True,
                                             generator=ctx.generator())
        for _ in range(ctx.epochs):
            for xb, yb in loader:
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(xb.to(ctx.device)), yb.to(ctx.device))
                (loss + ctx.proximal_term()).backward()
                opt.step()
        return TrainResult(model=model, metrics={"loss": float(loss)})

    stats = run_site("amqp://guest:guest@127.0.0.1:5672/%2F", "job-1", "site-3", "site_3.npz",
                     trainer=train, device="cpu")

or, without Python glue, ``fedmq worker --trainer mypackage.train:train`` (env FEDMQ_TRAINER).
Both run the one worker (`worker.service.Worker`): tasks, redelivery, deduplication, signing,
CKKS encryption and the DP-FedAvg ledger work as with the bundled trainer, and every result is
checked before it leaves (`worker.train.finish`). DP-SGD needs the bundled trainer (Opacus owns
the training loop it accounts for); a worker with a trainer of its own leaves a DP-SGD job with a
ConfigError on its first task, before anything is charged or trained.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any

from fedmq.shared.broker import validate_job_id
from fedmq.shared.errors import ConfigError
from fedmq.worker.service import SiteData, Worker, WorkerOptions, WorkerStats
from fedmq.worker.train import (
    EvalContext,
    Evaluator,
    TrainContext,
    Trainer,
    TrainResult,
    TrainResultError,
    default_evaluator,
    load_evaluator,
    load_trainer,
    sgd_trainer,
)

__all__ = [
    "EvalContext", "Evaluator", "SiteData", "SiteHandle", "TrainContext", "TrainResult", "TrainResultError",
    "Trainer", "WorkerOptions", "WorkerStats", "default_evaluator", "load_evaluator", "load_trainer", "make_site",
    "run_site", "sgd_trainer", "start_site",
]


def make_site(broker: str, job: str, site: str, data: SiteData, *, trainer: Trainer | str | None = None,
              evaluator: Evaluator | str | None = None, stop: threading.Event | None = None,
              options: WorkerOptions | None = None, **option_values: Any) -> Worker:
    """The worker of one site, not started yet (`run_site` runs it; `start_site` on a thread).

    `data` is an NPZ/CSV file or the (x, y) arrays; `trainer` a callable, a
    ``package.module:callable`` string, or None for the bundled SGD loop; `evaluator` likewise
    (EvalContext -> {metric: value}) for federated evaluation, None for the job's metrics;
    `option_values` are
    `WorkerOptions` fields (device="cpu", max_tasks=10, key=..., ledger=..., ...). Bad values
    raise ConfigError here, before anything connects.
    """
    validate_job_id(job)
    fn = load_trainer(trainer) if isinstance(trainer, str) else trainer
    if fn is not None and not callable(fn):
        raise ConfigError(f"trainer must be a callable or 'package.module:callable', got {type(fn).__name__}")
    opts = options or WorkerOptions()
    try:
        opts = dataclasses.replace(opts, **option_values)
    except TypeError as exc:
        known = ", ".join(f.name for f in dataclasses.fields(WorkerOptions))
        raise ConfigError(f"unknown worker option ({exc}); known: {known}") from None
    ev = load_evaluator(evaluator) if isinstance(evaluator, str) else evaluator
    if ev is not None and not callable(ev):
        raise ConfigError(f"evaluator must be a callable or 'package.module:callable', got {type(ev).__name__}")
    return Worker(broker, job, site, data, options=opts, stop=stop, trainer=fn, evaluator=ev)


def run_site(broker: str, job: str, site: str, data: SiteData, *, trainer: Trainer | str | None = None,
             evaluator: Evaluator | str | None = None, stop: threading.Event | None = None,
             options: WorkerOptions | None = None, **option_values: Any) -> WorkerStats:
    """Run one site until the job ends (or `stop` is set, or `max_tasks` are done); its stats.

    Raises what `fedmq worker` would exit with: ConfigError (bad data, options or trainer),
    JobNotFoundError (no such job within `wait_for_job` seconds), TrainingFailedError (the
    trainer failed on `max_failures` tasks in a row; each failure was a task_failed event).
    """
    return make_site(broker, job, site, data, trainer=trainer, evaluator=evaluator, stop=stop, options=options,
                     **option_values).run()


@dataclass
class SiteHandle:
    """A site running on a thread of this process (a notebook keeps its prompt)."""

    worker: Worker
    thread: threading.Thread
    error: BaseException | None = field(default=None)

    @property
    def stats(self) -> WorkerStats:
        return self.worker.stats

    def running(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        """Finish the step in progress and leave (a task being trained is redelivered to another site)."""
        self.worker.stop.set()

    def join(self, timeout: float | None = None) -> WorkerStats:
        """Wait for the site to end; re-raises what ended it; TimeoutError if it still runs."""
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"site {self.worker.site} still running after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.worker.stats


def start_site(broker: str, job: str, site: str, data: SiteData, *, trainer: Trainer | str | None = None,
               evaluator: Evaluator | str | None = None, options: WorkerOptions | None = None,
               **option_values: Any) -> SiteHandle:
    """`run_site` on a daemon thread: returns at once with a handle to stop, join or read stats."""
    worker = make_site(broker, job, site, data, trainer=trainer, evaluator=evaluator, options=options,
                       **option_values)

    def _run() -> None:
        try:
            worker.run()
        except BaseException as exc:  # handed to whoever joins
            handle.error = exc

    handle = SiteHandle(worker, threading.Thread(target=_run, name=f"fedmq-site-{site}", daemon=True))
    handle.thread.start()
    return handle
