"""Local training at a site: plain PyTorch, no broker, so it can be tested and timed alone.

A *trainer* is any callable ``TrainContext -> TrainResult`` (re-exported for users as
``fedmq.site``): the worker hands it the task's model (built from the version's spec, the
version's weights loaded, on the site's device), the site's data and the task's options, and
takes back the trained model or a delta, the number of samples and a metrics dict. The bundled
trainer (`sgd_trainer`, the same loop as `train_local`) is one such callable; a site operator may
install their own (``fedmq worker --trainer package.module:callable``).

Whatever a trainer returns is checked here before it can become an update (`finish`): a result
of the wrong type, tensors whose names, shapes or dtypes differ from the model's, NaN or Inf
values, a sample count outside [1, rows of the site's data] or metrics that are not plain values
raise, and the worker reports the task as failed instead of publishing it.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmq.shared.codec import Weights
from fedmq.shared.errors import ConfigError, FedmqError, NonFiniteError, ShapeMismatchError
from fedmq.shared.evaluation import MAX_REPORTED, TaskKind, evaluate_model, loss_fn, task_of
from fedmq.shared.models import build_model, get_weights, set_weights
from fedmq.shared.plugins import import_callable


@dataclass(frozen=True)
class LocalResult:
    delta: Weights
    num_samples: int
    metrics: dict[str, Any]


@dataclass(frozen=True)
class TrainContext:
    """What a trainer gets for one task.

    `model` is a fresh module per task, in train mode on `device`, holding the weights of the
    task's base version (`base`, as numpy arrays, is the same state: the delta is taken against
    it). `x` (float32, in the model's input shape) and `y` (int64 class indices; float32 targets
    in a regression job, see `task`) are the site's training rows as the worker loaded them (minus
    the rows it holds out for federated evaluation). The hyper-parameters are the task's (the
    job's `[training]` section); `seed` is derived from the task id, so a redelivered task can train the same way.
    `options` are the job-wide site options the task carries (e.g. its privacy settings).
    """

    model: nn.Module
    x: np.ndarray
    y: np.ndarray
    epochs: int
    batch_size: int
    lr: float
    mu: float
    seed: int
    device: torch.device
    task_id: str
    version: int
    job: str = ""
    site: str = ""
    base: Weights = field(default_factory=dict, repr=False)
    model_spec: dict[str, Any] = field(default_factory=dict, repr=False)
    options: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_samples(self) -> int:
        """Rows of the site's data: the upper bound of `TrainResult.num_samples`."""
        return len(self.y)

    @property
    def num_classes(self) -> int:
        """Classes of the job's model (its spec's `num_classes`; else one more than the largest label)."""
        n = self.model_spec.get("args", {}).get("num_classes")
        return int(n) if n else int(self.y.max()) + 1

    @property
    def task(self) -> TaskKind:
        """classification (y: int64 class indices) or regression (y: float32 targets, one output)."""
        return task_of(self.model_spec)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The bundled trainer's loss for the job's task: cross-entropy, or squared error."""
        return loss_fn(self.task)(out, y)  # type: ignore[no-any-return]

    def generator(self) -> torch.Generator:
        """A new CPU generator seeded with `seed` (e.g. for a DataLoader's shuffling)."""
        return torch.Generator().manual_seed(self.seed)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) as CPU tensors sharing memory with the arrays (move batches to `device` yourself)."""
        return torch.from_numpy(np.ascontiguousarray(self.x)), torch.from_numpy(np.ascontiguousarray(self.y))

    @functools.cached_property
    def _anchor(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        base = {k: torch.from_numpy(np.array(v, copy=True)).to(self.device) for k, v in self.base.items()}
        return [(p, base[name]) for name, p in self.model.named_parameters() if name in base]

    def proximal_term(self) -> torch.Tensor:
        """FedProx's mu/2 * ||w - w_base||^2 over `model`'s parameters (0 when mu is 0): add it to
        your loss to keep a heterogeneous site from drifting far from the global model."""
        if self.mu <= 0:
            return torch.zeros((), device=self.device)
        prox = sum(((p - a) ** 2).sum() for p, a in self._anchor)
        return 0.5 * self.mu * torch.as_tensor(prox, device=self.device)


@dataclass(frozen=True)
class TrainResult:
    """What a trainer returns: the trained `model` (usually `ctx.model` itself) *or* a `delta`
    (trained minus base weights, {state_dict name: tensor or array}, every name of the model's
    state dict with its shape and dtype); `num_samples`, the rows it trained on (None = all of
    the site's data; it weights the update in the aggregate); `metrics`, plain values (numbers,
    strings, booleans) that travel with the update (`loss` is shown by the tools if present)."""

    model: nn.Module | None = None
    delta: Mapping[str, Any] | None = None
    num_samples: int | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)


Trainer = Callable[[TrainContext], TrainResult]


@dataclass(frozen=True)
class EvalContext:
    """What an evaluator gets for one version: the model holding the version's weights (in eval
    mode, on `device`) and the site's held-out rows (never trained on). `metrics` are the names
    the job asks for; the coordinator folds the built-in ones (accuracy, loss, auc, f1, mse, mae,
    r2) it receives into its sample-weighted federated figure and ignores the rest."""

    model: nn.Module
    x: np.ndarray
    y: np.ndarray
    metrics: tuple[str, ...]
    task: TaskKind
    device: torch.device
    version: int
    job: str = ""
    site: str = ""


#: a site's own evaluation: EvalContext -> {metric name: value}
Evaluator = Callable[[EvalContext], Mapping[str, float]]


def default_evaluator(ctx: EvalContext) -> dict[str, float]:
    """The job's metrics, computed as the coordinator computes them on its test data."""
    return evaluate_model(ctx.model, ctx.x, ctx.y, ctx.metrics, ctx.task, ctx.device)


class TrainResultError(FedmqError):
    """A trainer returned something that cannot become an update (wrong type, bad sample count or
    metrics); reported as a failed task, like an exception raised inside the trainer."""


#: bounds on a trainer's metrics: they travel in every update (Update.metrics holds 256 values)
MAX_METRICS = 64
MAX_METRIC_TEXT = 200


def task_seed(task_id: str) -> int:
    """A seed fixed by the task, so a redelivered task trains the same way."""
    return int.from_bytes(hashlib.sha256(task_id.encode()).digest()[:4], "little")


def train_local(model_spec: dict[str, Any], base: Weights, x: np.ndarray, y: np.ndarray, *,
                epochs: int, batch_size: int, lr: float, mu: float = 0.0, seed: int = 0,
                device: torch.device | None = None) -> LocalResult:
    """SGD for `epochs` over (x, y) from `base`; returns delta = local - base.

    mu > 0 adds FedProx's proximal term mu/2 * ||w - w_base||^2, which keeps heterogeneous sites
    from drifting far from the global model during long local work.
    """
    device = device or torch.device("cpu")
    model = base_model(model_spec, base, device)
    return _sgd(model, base, x, y, epochs=epochs, batch_size=batch_size, lr=lr, mu=mu, seed=seed, device=device,
                task=task_of(model_spec))


def sgd_trainer(ctx: TrainContext) -> TrainResult:
    """The bundled trainer as a `Trainer`: the task's loss (cross-entropy, or squared error for a
    regression job), plain SGD, FedProx when mu > 0; the same
    loop, seeds and result as `train_local`."""
    r = _sgd(ctx.model, ctx.base, ctx.x, ctx.y, epochs=ctx.epochs, batch_size=ctx.batch_size, lr=ctx.lr,
             mu=ctx.mu, seed=ctx.seed, device=ctx.device, task=ctx.task)
    return TrainResult(delta=r.delta, num_samples=r.num_samples, metrics=r.metrics)


def base_model(model_spec: dict[str, Any], base: Weights, device: torch.device) -> nn.Module:
    """The spec's model holding `base`, on `device`, in train mode."""
    model = build_model(model_spec)
    set_weights(model, base)
    model.to(device).train()
    return model


@torch.no_grad()
def _sgd_step(params: list[nn.Parameter], lr: float) -> None:
    """p -= lr * grad, what torch.optim.SGD does without momentum or weight decay (the same
    `_foreach_add_`). Why not torch.optim: building any torch optimizer first imports
    torch._dynamo, 1.6 s of CPU per process (torch 2.13), which 8 sites starting on 2 cores paid
    in their first task (6.6 s to the first update)."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_add_([p for p in params if p.grad is not None], grads, alpha=-lr)


def _sgd(model: nn.Module, base: Weights, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int,
         lr: float, mu: float, seed: int, device: torch.device,
         task: TaskKind = TaskKind.CLASSIFICATION) -> LocalResult:
    criterion = loss_fn(task)
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in model.parameters()] if mu > 0 else []
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
    n = len(xt)
    loss_sum, seen, t0 = 0.0, 0, time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            xb, yb = xt[idx].to(device), yt[idx].to(device)
            for p in params:
                p.grad = None
            loss = criterion(model(xb), yb)
            if mu > 0:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
                loss = loss + 0.5 * mu * prox
            loss.backward()
            _sgd_step(params, lr)
            loss_sum += float(loss.detach()) * len(idx)
            seen += len(idx)
    local = get_weights(model)
    delta = {k: (local[k] - np.asarray(base[k])).astype(np.asarray(base[k]).dtype) for k in base}
    metrics = {"loss": loss_sum / max(seen, 1), "train_seconds": time.perf_counter() - t0, "epochs": epochs}
    return LocalResult(delta, n, metrics)


# ---------------------------------------------------------------------------- user trainers


def load_trainer(target: str) -> Trainer:
    """The trainer `package.module:callable` names, checked to take one argument (a TrainContext);
    ConfigError otherwise (the worker exits 2 before it joins a job)."""
    return _one_argument_callable(target, "trainer", "fedmq.site.TrainContext")


def _one_argument_callable(target: str, what: str, argument: str) -> Any:
    fn = import_callable(target, what)
    try:
        inspect.signature(fn).bind(None)
    except TypeError:
        raise ConfigError(f"{what} {target!r} must take one argument (a {argument})") from None
    except ValueError:  # no signature to inspect (some builtins): the call will tell
        pass
    return fn


def load_evaluator(target: str) -> Evaluator:
    """The evaluator `package.module:callable` names (one argument: an EvalContext); else ConfigError."""
    return _one_argument_callable(target, "evaluator", "fedmq.site.EvalContext")  # type: ignore[no-any-return]


def run_evaluator(evaluator: Evaluator, ctx: EvalContext) -> dict[str, float]:
    """Call `evaluator` and keep what can travel: finite numbers under names of 1-64 characters."""
    values = _metrics(evaluator(ctx), what="the evaluator's result", limit=MAX_REPORTED)
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise TrainResultError(f"evaluation metric {k} = {v!r} is not a finite number")
    return {k: float(v) for k, v in values.items()}


def run_trainer(trainer: Trainer, ctx: TrainContext) -> LocalResult:
    """Call `trainer` and check what it returned (`finish`)."""
    return finish(trainer(ctx), ctx)


def finish(result: Any, ctx: TrainContext) -> LocalResult:
    """A trainer's result as the worker's LocalResult, or the reason it cannot be an update."""
    if not isinstance(result, TrainResult):
        raise TrainResultError(f"the trainer returned {type(result).__name__}, not a fedmq.site.TrainResult")
    if (result.model is None) == (result.delta is None):
        raise TrainResultError("the trainer's TrainResult must hold a model or a delta, exactly one of them")
    if result.model is not None:
        if not isinstance(result.model, nn.Module):
            raise TrainResultError(f"TrainResult.model is a {type(result.model).__name__}, not a torch nn.Module")
        delta = _model_delta(get_weights(result.model), ctx.base)
    else:
        delta = _as_delta(result.delta, ctx.base)
    check_delta(delta, ctx.base)
    return LocalResult(delta, _num_samples(result.num_samples, ctx), _metrics(result.metrics))


def _model_delta(local: Weights, base: Weights) -> Weights:
    _same_names(local, base, "the trained model's state dict")
    for k, ref in base.items():
        _same_layout(k, local[k], np.asarray(ref), "the trained model's")
    return {k: (local[k] - np.asarray(base[k])).astype(np.asarray(base[k]).dtype) for k in base}


def _as_delta(raw: Any, base: Weights) -> Weights:
    if not isinstance(raw, Mapping):
        raise TrainResultError(f"TrainResult.delta is a {type(raw).__name__}, not a mapping of tensors")
    _same_names(raw, base, "the delta")
    out: Weights = {}
    for k in base:  # in the model's order, whatever order the trainer built its dict in
        v = raw[k]
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().numpy()
        if not isinstance(v, np.ndarray):
            raise TrainResultError(f"delta tensor {k} is a {type(v).__name__}, not a torch tensor or numpy array")
        out[k] = v
    return out


def _same_names(got: Mapping[str, Any], base: Weights, what: str) -> None:
    if set(got) != set(base):
        missing, extra = sorted(set(base) - set(got)), sorted(set(got) - set(base))
        raise ShapeMismatchError(f"{what} does not fit the job's model: missing {missing[:5]}, unexpected "
                                 f"{extra[:5]} (return the model's state_dict names, or TrainResult(model=...))")


def _same_layout(name: str, got: np.ndarray, ref: np.ndarray, what: str) -> None:
    if got.shape != ref.shape or got.dtype != ref.dtype:
        hint = "" if got.dtype == ref.dtype else f" (return {ref.dtype} weights, e.g. model.float() after .half())"
        raise ShapeMismatchError(f"{what} tensor {name} is {got.dtype}{list(got.shape)}, the job's model has "
                                 f"{ref.dtype}{list(ref.shape)}{hint}")


def check_delta(delta: Weights, base: Weights) -> None:
    """Same names, shapes and dtypes as the model, only finite values: what the aggregator would
    otherwise dead-letter (shape_mismatch, non_finite) after the site spent the task on it."""
    _same_names(delta, base, "the delta")
    for k, ref in base.items():
        _same_layout(k, delta[k], np.asarray(ref), "delta")
        if delta[k].dtype.kind == "f" and not np.isfinite(delta[k]).all():
            raise NonFiniteError(f"delta tensor {k} has NaN or Inf values: training diverged (lower lr?)")


def _num_samples(raw: Any, ctx: TrainContext) -> int:
    if raw is None:
        return ctx.num_samples
    if isinstance(raw, bool) or not isinstance(raw, int | np.integer):
        raise TrainResultError(f"TrainResult.num_samples is a {type(raw).__name__}, not an int")
    n = int(raw)
    if not 1 <= n <= ctx.num_samples:
        raise TrainResultError(f"TrainResult.num_samples is {n}, must be in [1, {ctx.num_samples}] "
                               "(the rows of the site's data)")
    return n


def _metrics(raw: Any, what: str = "TrainResult.metrics", limit: int = MAX_METRICS) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise TrainResultError(f"{what} is a {type(raw).__name__}, not a dict")
    if len(raw) > limit:
        raise TrainResultError(f"{what} holds {len(raw)} values, at most {limit}")
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if not isinstance(k, str) or not 0 < len(k) <= 64:
            raise TrainResultError(f"metric name {k!r} must be a string of 1-64 characters")
        out[k] = _metric_value(k, v)
    return out


def _metric_value(name: str, v: Any) -> Any:
    if isinstance(v, torch.Tensor | np.ndarray | np.generic):  # e.g. loss.detach(), np.float32(...)
        if (v.numel() if isinstance(v, torch.Tensor) else v.size) != 1:
            raise TrainResultError(f"metric {name} is an array; metrics are single values")
        v = v.item()
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int):
        if not -2**63 <= v < 2**63:
            raise TrainResultError(f"metric {name} = {v} does not fit 64 bits")
        return v
    if isinstance(v, float):
        if math.isnan(v):
            raise TrainResultError(f"metric {name} is NaN: training diverged (lower lr?)")
        return v
    if isinstance(v, str):
        return v[:MAX_METRIC_TEXT]
    raise TrainResultError(f"metric {name} is a {type(v).__name__}; metrics are numbers, strings or booleans")
