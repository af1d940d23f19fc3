"""Metrics and evaluation: what a version is judged by, centrally and at the sites.

The coordinator evaluates each version on its own test data when it has some (central); sites
evaluate the version a task brings on their own held-out rows before training it (federated: no
extra round trip in an asynchronous job) and report the numbers with the update's event. Both use
`evaluate_model`, so a central and a federated figure of one version mean the same thing.

Federated figures are sample-weighted means over the sites that reported on a version
(`FederatedEval`, a pure fold the coordinator and `fedmq history` share). They are only as honest
as the sites: a site chooses what it reports (docs/security.md). A stop on a federated metric waits
for `min_sites` sites, and every report is type- and range-checked (`read_report`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmq.shared.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where a model is run: the config and readers need none of it
    import torch
    from torch import nn


class TaskKind(StrEnum):
    """What the model predicts: class logits (cross-entropy) or one real value (squared error)."""

    CLASSIFICATION = "classification"
    REGRESSION = "regression"


class EvalSource(StrEnum):
    CENTRAL = "central"      # the coordinator, on data.test
    FEDERATED = "federated"  # the sites, on their own held-out rows


@dataclass(frozen=True)
class Metric:
    name: str
    task: TaskKind
    higher_is_better: bool
    lo: float  # the range a report must lie in (a site's number outside it is refused)
    hi: float


_BIG = 1e12
METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("accuracy", TaskKind.CLASSIFICATION, True, 0.0, 1.0),
    Metric("auc", TaskKind.CLASSIFICATION, True, 0.0, 1.0),
    Metric("f1", TaskKind.CLASSIFICATION, True, 0.0, 1.0),
    Metric("mse", TaskKind.REGRESSION, False, 0.0, _BIG),
    Metric("mae", TaskKind.REGRESSION, False, 0.0, _BIG),
    Metric("r2", TaskKind.REGRESSION, True, -_BIG, 1.0),
)}
#: `loss` exists for both tasks: cross-entropy for classifiers, squared error for regression
LOSS = Metric("loss", TaskKind.CLASSIFICATION, False, 0.0, _BIG)

DEFAULT_METRICS = {TaskKind.CLASSIFICATION: ("accuracy", "loss"), TaskKind.REGRESSION: ("mse", "mae", "loss")}


def metric(name: str) -> Metric:
    """The metric `name`; ConfigError listing the known ones otherwise."""
    if name == "loss":
        return LOSS
    if name not in METRICS:
        raise ConfigError(f"metric {name!r} is not one of loss, {', '.join(METRICS)}")
    return METRICS[name]


def parse_metrics(text: str, task: TaskKind, key: str = "evaluation.metrics") -> tuple[str, ...]:
    """A comma-separated list of metric names (empty: the task's defaults), checked against the task."""
    names = tuple(n.strip() for n in text.split(",") if n.strip()) or DEFAULT_METRICS[task]
    for n in names:
        try:
            m = metric(n)
        except ConfigError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        if n != "loss" and m.task is not task:
            raise ConfigError(f"{key}: {n} is a {m.task.value} metric, the model is a {task.value} model")
    if len(set(names)) != len(names):
        raise ConfigError(f"{key}: {text!r} names a metric twice")
    return names


def reached(name: str, value: float, target: float) -> bool:
    """Whether `value` of metric `name` meets `target` (>= for accuracy-like, <= for errors)."""
    return value >= target if metric(name).higher_is_better else value <= target


def task_of(spec: Mapping[str, Any]) -> TaskKind:
    """The task of a ModelVersion's model spec (specs without one are classifiers, as before)."""
    return TaskKind.REGRESSION if spec.get("task") == TaskKind.REGRESSION.value else TaskKind.CLASSIFICATION


def loss_fn(task: TaskKind) -> Any:
    """The training loss of `task` as a torch callable (outputs, targets) -> mean loss: cross-entropy
    on logits, or squared error of the single output against float targets."""
    import torch

    if task is TaskKind.REGRESSION:
        return lambda out, y: torch.nn.functional.mse_loss(out.reshape(-1), y.to(out.dtype))
    return torch.nn.functional.cross_entropy


# ---------------------------------------------------------------------------- computing metrics


def predict(model: nn.Module, x: np.ndarray, device: torch.device | None = None, batch_size: int = 1024) -> np.ndarray:
    """The model's raw outputs on `x` (eval mode), as float64 numpy: logits [n, C] or values [n, 1]."""
    import torch

    device = device or torch.device("cpu")
    was_training = model.training
    model.eval().to(device)
    try:
        with torch.no_grad():
            outs = [model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size])).to(device)).float().cpu()
                    for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(outs).numpy().astype(np.float64) if outs else np.zeros((0, 1))


def compute(names: tuple[str, ...] | list[str], task: TaskKind, out: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Each named metric of outputs `out` against targets `y`; a metric undefined on this data
    (AUC with one class present) is left out rather than reported as a made-up number."""
    if task is TaskKind.REGRESSION:
        pred = out.reshape(len(out), -1)[:, 0]
        err = pred - y.astype(np.float64)
        values = {"mse": lambda: float(np.mean(err ** 2)), "loss": lambda: float(np.mean(err ** 2)),
                  "mae": lambda: float(np.mean(np.abs(err))), "r2": lambda: _r2(y, pred)}
    else:
        labels = y.astype(np.int64)
        values = {"accuracy": lambda: float(np.mean(out.argmax(1) == labels)),
                  "loss": lambda: _cross_entropy(out, labels),
                  "auc": lambda: _auc(out, labels), "f1": lambda: _f1(out, labels)}
    result: dict[str, float] = {}
    for n in names:
        v = values[n]() if n in values else None
        if v is not None and math.isfinite(v):
            result[n] = v
    return result


def evaluate_model(model: nn.Module, x: np.ndarray, y: np.ndarray, names: tuple[str, ...] | list[str],
                   task: TaskKind, device: torch.device | None = None) -> dict[str, float]:
    """The named metrics of `model` on held-out (x, y)."""
    return compute(names, task, predict(model, x, device), y) if len(y) else {}


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    import torch

    return float(torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)))


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _auc(logits: np.ndarray, labels: np.ndarray) -> float | None:
    """ROC AUC: binary on the positive class's probability; multi-class one-vs-rest, the mean over
    the classes present with both positives and negatives (None when no class has both)."""
    from sklearn.metrics import roc_auc_score  # scipy-heavy import: only for jobs that ask for AUC

    probs = _softmax(logits)
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1])) if len(np.unique(labels)) == 2 else None
    scores = [roc_auc_score(labels == c, probs[:, c]) for c in np.unique(labels)
              if c < probs.shape[1] and 0 < int((labels == c).sum()) < len(labels)]
    return float(np.mean(scores)) if scores else None


def _f1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Macro F1 over the classes present in the labels or the predictions."""
    from sklearn.metrics import f1_score

    return float(f1_score(labels, logits.argmax(1), average="macro", zero_division=0))


def _r2(y: np.ndarray, pred: np.ndarray) -> float | None:
    from sklearn.metrics import r2_score

    return float(r2_score(y, pred)) if len(y) > 1 and float(np.var(y)) > 0 else None


# ---------------------------------------------------------------------------- federated reports

#: bounds on one site's report (it travels in a site's UPDATE_PUBLISHED event, which a site writes)
MAX_REPORTED = 16
MAX_EVAL_SAMPLES = 1_000_000_000


@dataclass(frozen=True)
class SiteReport:
    version: int
    samples: int
    metrics: dict[str, float]


def make_report(version: int, samples: int, values: Mapping[str, float]) -> dict[str, Any]:
    """The `eval` field of a site's UPDATE_PUBLISHED event."""
    return {"version": int(version), "samples": int(samples), "metrics": {k: float(v) for k, v in values.items()}}


def read_report(raw: Any) -> SiteReport | None:
    """A site's `eval` field, or None when any part is missing, mistyped or out of range: a report
    is taken whole or not at all. Unknown metric names are dropped (a site may compute extra ones)."""
    if not isinstance(raw, dict):
        return None
    version, samples, values = raw.get("version"), raw.get("samples"), raw.get("metrics")
    if type(version) is not int or not 0 <= version < 2**62:
        return None
    if type(samples) is not int or not 1 <= samples <= MAX_EVAL_SAMPLES:
        return None
    if not isinstance(values, dict) or len(values) > MAX_REPORTED:
        return None
    out: dict[str, float] = {}
    for k, v in values.items():
        known = LOSS if k == "loss" else METRICS.get(k) if type(k) is str else None
        if known is None:
            continue
        if type(v) not in (int, float) or not math.isfinite(v) or not known.lo <= v <= known.hi:
            return None
        out[k] = float(v)
    return SiteReport(version, samples, out)


@dataclass
class FederatedEval:
    """Site reports per version, folded into sample-weighted means once `min_sites` have reported.

    The first report of a site on a version counts (a redelivered task's second evaluation would
    only repeat it); `ready` hands each version out once. Memory is bounded by `keep` versions.
    """

    min_sites: int
    keep: int = 1000
    reports: dict[int, dict[str, SiteReport]] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)

    def add(self, site: str, report: SiteReport) -> None:
        per_site = self.reports.setdefault(report.version, {})
        per_site.setdefault(site, report)
        while len(self.reports) > self.keep:
            self.reports.pop(min(self.reports))

    def summary(self, version: int) -> dict[str, Any] | None:
        """{"metrics", "sites", "samples"} of `version`, or None below `min_sites` reports."""
        per_site = self.reports.get(version, {})
        if len(per_site) < self.min_sites:
            return None
        return summarise(list(per_site.values())) | {"sites": len(per_site)}

    def ready(self) -> list[tuple[int, dict[str, Any]]]:
        """Versions that reached `min_sites` and were not handed out yet, oldest first."""
        out = []
        for version in sorted(self.reports):
            if version in self.done:
                continue
            s = self.summary(version)
            if s is not None:
                self.done.add(version)
                out.append((version, s))
        return out


def summarise(reports: list[SiteReport]) -> dict[str, Any]:
    """Sample-weighted mean of each metric over the reports that hold it."""
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    for r in reports:
        for k, v in r.metrics.items():
            sums[k] = sums.get(k, 0.0) + v * r.samples
            weights[k] = weights.get(k, 0) + r.samples
    return {"metrics": {k: sums[k] / weights[k] for k in sorted(sums)}, "samples": sum(r.samples for r in reports)}

