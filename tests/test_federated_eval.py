"""Federated evaluation, pluggable metrics and regression.

Sites evaluate the version each task brings on rows they hold out (or an --eval-data file) before
training it; the coordinator folds their reports, sample-weighted, once `min_sites` sites reported
on a version, and may stop on any metric, central or federated. Jobs run on the real broker
(coordinator, aggregator and sites on threads of this process).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedmq.aggregator.service import Aggregator
from fedmq.coordinator.service import Coordinator
from fedmq.shared.broker import JobNames, read_stream
from fedmq.shared.config import load_job_config
from fedmq.shared.datasets import load_site, write_partition
from fedmq.shared.errors import ConfigError
from fedmq.shared.evaluation import FederatedEval, SiteReport, TaskKind, compute, make_report, read_report
from fedmq.shared.jobstate import SourcedEvent, read_event_delivery
from fedmq.shared.messages import Event, EventKind, Task, Update
from fedmq.site import EvalContext, start_site
from fedmq.worker.service import Worker, WorkerOptions
from tests.jobkit import dead_letters, run_threaded_job

pytestmark = pytest.mark.timeout(180)


# ---------------------------------------------------------------------------- metrics, no broker


def test_classification_metrics_match_their_definitions() -> None:
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    y = np.array([0, 1, 1, 1])
    got = compute(("accuracy", "auc", "f1", "loss"), TaskKind.CLASSIFICATION, logits, y)
    assert got["accuracy"] == 0.75
    # positives' scores p1: 0.73, 0.27, 0.95 against the negative's 0.12: every pair ranked right
    assert got["auc"] == 1.0
    assert got["f1"] == pytest.approx((2 / 3 + 0.8) / 2)  # macro over classes 0 and 1
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert got["loss"] == pytest.approx(-np.mean(np.log(p[np.arange(4), y])), rel=1e-6)


def test_auc_is_left_out_where_undefined_and_multiclass_averages_present_classes() -> None:
    one_class = compute(("auc", "accuracy"), TaskKind.CLASSIFICATION, np.array([[1.0, 0.0], [2.0, 0.0]]),
                        np.array([0, 0]))
    assert "auc" not in one_class and one_class["accuracy"] == 1.0
    logits = np.eye(3)[[0, 1, 2, 0]] * 3.0  # perfect scores, class 2 present once
    assert compute(("auc",), TaskKind.CLASSIFICATION, logits, np.array([0, 1, 2, 0]))["auc"] == 1.0


def test_regression_metrics() -> None:
    out, y = np.array([[1.0], [2.0], [4.0]]), np.array([1.0, 3.0, 3.0], np.float32)
    got = compute(("mse", "mae", "r2", "loss"), TaskKind.REGRESSION, out, y)
    assert got["mse"] == pytest.approx(2 / 3) and got["loss"] == got["mse"]
    assert got["mae"] == pytest.approx(2 / 3)
    assert got["r2"] == pytest.approx(1 - 2 / (np.var(y) * 3))


@pytest.mark.parametrize("raw", [
    None, [], {"version": True, "samples": 5, "metrics": {}},
    {"version": 1, "samples": 0, "metrics": {}}, {"version": 1, "samples": 10**12, "metrics": {}},
    {"version": 1, "samples": 5, "metrics": {"accuracy": 1.5}},
    {"version": 1, "samples": 5, "metrics": {"accuracy": float("nan")}},
    {"version": 1, "samples": 5, "metrics": {"auc": True}},
    {"version": 1, "samples": 5, "metrics": {"mse": -1.0}},
    {"version": 1, "samples": 5, "metrics": {f"m{i}": 0.5 for i in range(17)}},
    {"version": -1, "samples": 5, "metrics": {}}, {"version": 1.0, "samples": 5, "metrics": {}},
])
def test_a_sites_report_is_taken_whole_or_not_at_all(raw: Any) -> None:
    assert read_report(raw) is None


def test_reports_fold_sample_weighted_once_enough_sites_reported() -> None:
    fed = FederatedEval(min_sites=2)
    fed.add("a", SiteReport(3, 10, {"accuracy": 0.5, "auc": 0.6}))
    assert fed.ready() == []
    fed.add("a", SiteReport(3, 1000, {"accuracy": 1.0}))  # a second report of a site changes nothing
    fed.add("b", SiteReport(3, 30, {"accuracy": 0.9}))
    [(version, summary)] = fed.ready()
    assert version == 3 and summary["sites"] == 2 and summary["samples"] == 40
    assert summary["metrics"]["accuracy"] == pytest.approx((0.5 * 10 + 0.9 * 30) / 40)
    assert summary["metrics"]["auc"] == pytest.approx(0.6)  # over the sites that reported it
    assert fed.ready() == []  # handed out once
    assert read_report(make_report(3, 10, {"accuracy": 0.5, "extra": 7.0})) == SiteReport(3, 10, {"accuracy": 0.5})


@pytest.mark.parametrize("overrides, words", [
    ({"coordinator": {"target_metric": "auc", "target_value": 0.9}}, "auc is not evaluated"),
    ({"coordinator": {"target_metric": "accuracy", "target_value": 0.9, "target_source": "federated"}},
     "federated needs evaluation.federated = true"),
    ({"coordinator": {"target_metric": "accuracy", "target_value": 0.9, "target_accuracy": 0.9}},
     "set either target_accuracy or target_metric"),
    ({"evaluation": {"metrics": "accuracy,mse"}}, "mse is a regression metric"),
    ({"evaluation": {"metrics": "accuracy,top5"}}, "metric 'top5' is not one of"),
    ({"model": {"task": "regression", "num_classes": 3}}, "a regression model has one output"),
    ({"model": {"input_shape": "8,x"}}, "must be positive integers"),
    ({"evaluation": {"site_fraction": 0.95}}, "evaluation.site_fraction: must be in [0, 0.9]"),
])
def test_bad_evaluation_settings_are_refused_with_one_line(overrides: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        load_job_config(overrides=overrides, environ={})
    assert words in str(info.value)


def test_a_coordinator_needs_something_to_evaluate_with() -> None:
    cfg = load_job_config(overrides={"job": "j"}, environ={})
    with pytest.raises(ConfigError, match="nothing would evaluate the job"):
        Coordinator("amqp://127.0.0.1:1/", cfg)
    cfg = load_job_config(overrides={"job": "j", "evaluation": {"federated": True}}, environ={})
    with pytest.raises(ConfigError, match="model.input_shape: without data.test"):
        Coordinator("amqp://127.0.0.1:1/", cfg)


def test_the_coordinator_counts_only_a_report_on_its_own_tasks_version(tmp_path: Path) -> None:
    cfg = load_job_config(overrides={
        "job": "j", "model": {"name": "logreg", "input_shape": "4", "num_classes": 2},
        "evaluation": {"federated": True, "min_sites": 1}, "coordinator": {"out": str(tmp_path)}}, environ={})
    coord = Coordinator("amqp://127.0.0.1:1/", cfg)
    for tid, version in (("a" * 16, 2), ("b" * 16, 2)):
        coord.outstanding[tid] = Task(job="j", task_id=tid, version=version, model_offset=None, epochs=1,
                                      batch_size=8, lr=0.1, mu=0.0, issued_at=0.0, deadline=1e12)

    def published(tid: str, report: Any) -> SourcedEvent:
        data = {"task_id": tid, "update_id": f"u-{tid}", "site": "s1", "eval": report}
        return SourcedEvent(Event(job="j", event=EventKind.UPDATE_PUBLISHED, source="s1", data=data), "s1")

    assert coord._apply_site_event("s1", published("a" * 16, make_report(7, 10, {"accuracy": 1.0}))) == ""
    assert coord.federated.ready() == []  # version 7 is not what task a brought
    coord._apply_site_event("s1", published("b" * 16, make_report(2, 10, {"accuracy": 0.4})))
    assert coord.federated.ready() == [(2, {"metrics": {"accuracy": 0.4}, "samples": 10, "sites": 1})]
    assert coord._apply_site_event("s1", published("c" * 16, make_report(2, 10, {"accuracy": 1.0}))) \
        == "unknown_task"


# ---------------------------------------------------------------------------- jobs on the broker


def _events(url: str, job: str, kind: EventKind) -> list[SourcedEvent]:
    return [sev for d in read_stream(url, JobNames(job).events, "first")
            if (sev := read_event_delivery(d)).event.event == kind]


def _run(url: str, cfg: Any, workers: list[Worker]) -> Any:
    coord = Coordinator(url, cfg, stop=threading.Event())
    agg = Aggregator(url, cfg.job, stop=threading.Event(), name="agg-fedeval")
    return run_threaded_job(coord, agg, workers)


@pytest.mark.broker
def test_a_job_without_central_test_data_stops_on_the_sites_auc(broker_url: str, job: str, tmp_path: Path) -> None:
    part = write_partition(tmp_path / "data", "breast_cancer", 3, scheme="iid", seed=0)
    cfg = load_job_config(overrides={
        "job": job, "model": {"name": "logreg", "input_shape": "30", "num_classes": 2},
        "strategy": {"name": "fedbuff", "buffer_size": 2, "flush_timeout": 2.0},
        "training": {"epochs": 1, "batch_size": 16, "lr": 0.05},
        "evaluation": {"federated": True, "metrics": "auc,accuracy,f1", "site_fraction": 0.25, "min_sites": 2},
        "coordinator": {"concurrency": 3, "target_metric": "auc", "target_value": 0.98,
                        "target_source": "federated", "max_seconds": 120, "out": str(tmp_path / "out")},
    }, environ={})
    workers = [Worker(broker_url, job, f"site-{i}", part.site_files[i], options=WorkerOptions(device="cpu"))
               for i in range(3)]
    started = time.monotonic()
    result = _run(broker_url, cfg, workers)
    assert result.stop_reason == "target_metric", result
    assert result.metrics_source == "federated" and result.metrics["auc"] >= 0.98, result
    assert result.final_accuracy is None  # no central test data: nothing claims a test accuracy
    evaluated = _events(broker_url, job, EventKind.VERSION_EVALUATED)
    assert evaluated and all(sev.data["scope"] == "federated" and sev.data["sites"] >= 2 for sev in evaluated)
    assert [sev.data["version"] for sev in evaluated] == sorted({sev.data["version"] for sev in evaluated})
    # each site held out a quarter of its rows: it trains on the rest and reports on those
    rows = {f"site-{i}": len(load_site(f)[1]) for i, f in enumerate(part.site_files)}
    held = {s: int(round(0.25 * n)) for s, n in rows.items()}
    updates = [Update.decode(d.body) for d in read_stream(broker_url, JobNames(job).updates_log, "first")]
    assert all(u.num_samples == rows[u.site] - held[u.site] for u in updates)
    reports = [(sev.site, sev.data["eval"]) for sev in _events(broker_url, job, EventKind.UPDATE_PUBLISHED)
               if "eval" in sev.data]
    assert reports and all(r["samples"] == held[s] for s, r in reports)
    per_site_versions = [(s, r["version"]) for s, r in reports]
    assert len(per_site_versions) == len(set(per_site_versions))  # a site reports on a version once
    assert not dead_letters(broker_url, job)
    print(f"federated AUC job: {result.versions} versions, {result.wall_seconds:.1f} s "
          f"({time.monotonic() - started:.1f} s with start-up), metrics {result.metrics}")


def _fixed_evaluator(ctx: EvalContext) -> dict[str, float]:
    """A site's own evaluation: its model's accuracy, and a metric the coordinator does not know."""
    pred = ctx.model(__import__("torch").from_numpy(ctx.x)).argmax(1).numpy()
    return {"accuracy": float((pred == ctx.y).mean()), "site_specific": 1.0}


@pytest.mark.broker
def test_sites_with_their_own_evaluator_and_eval_file_report_alongside_central_figures(
        broker_url: str, job: str, tmp_path: Path) -> None:
    part = write_partition(tmp_path / "data", "digits", 2, scheme="iid", seed=4)
    cfg = load_job_config(overrides={
        "job": job, "data": {"test": str(part.test_file)}, "model": {"name": "logreg"},
        "strategy": {"name": "fedbuff", "buffer_size": 2, "flush_timeout": 2.0},
        "training": {"epochs": 1, "batch_size": 16, "lr": 0.05},
        "evaluation": {"federated": True, "metrics": "accuracy,loss", "min_sites": 2},
        "coordinator": {"concurrency": 2, "target_accuracy": 0.85, "max_seconds": 120, "out": str(tmp_path / "out")},
    }, environ={})
    coord = Coordinator(broker_url, cfg, stop=threading.Event())
    agg = Aggregator(broker_url, job, stop=threading.Event(), name="agg-fedeval2")
    sites = [start_site(broker_url, job, "site-0", part.site_files[0], evaluator=_fixed_evaluator, device="cpu",
                        eval_data=str(part.test_file)),
             start_site(broker_url, job, "site-1", part.site_files[1],
                        evaluator="tests.test_federated_eval:_fixed_evaluator", device="cpu",
                        eval_data=str(part.test_file))]
    try:
        result = run_threaded_job(coord, agg, [])
        for h in sites:
            h.join(60)
    finally:
        for h in sites:
            h.stop()
    assert result.stop_reason == "target_accuracy" and result.metrics_source == "central", result
    assert set(result.metrics) >= {"accuracy", "loss"}
    evaluated = _events(broker_url, job, EventKind.VERSION_EVALUATED)
    central = {sev.data["version"]: sev.data["metrics"] for sev in evaluated if sev.data["scope"] == "central"}
    federated = {sev.data["version"]: sev.data["metrics"] for sev in evaluated if sev.data["scope"] == "federated"}
    assert federated, "no version got reports from both sites"
    for version, fm in federated.items():
        # both sites evaluate on the coordinator's own test file: the same accuracy, and no loss
        # (their evaluator does not compute it) nor the coordinator-unknown metric
        assert set(fm) == {"accuracy"} and fm["accuracy"] == pytest.approx(central[version]["accuracy"])
    rows = {f"site-{i}": len(load_site(f)[1]) for i, f in enumerate(part.site_files)}
    updates = [Update.decode(d.body) for d in read_stream(broker_url, JobNames(job).updates_log, "first")]
    assert all(u.num_samples == rows[u.site] for u in updates)  # an eval file: nothing held out


@pytest.mark.broker
def test_a_regression_job_trains_on_real_targets_and_stops_on_mse(broker_url: str, job: str, tmp_path: Path) -> None:
    part = write_partition(tmp_path / "data", "diabetes", 3, scheme="iid", seed=0)
    x, y = load_site(part.site_files[0], task=TaskKind.REGRESSION)
    assert y.dtype == np.float32 and not np.array_equal(y, np.round(y))  # real targets, not classes
    cfg = load_job_config(overrides={
        "job": job, "data": {"test": str(part.test_file)}, "model": {"name": "mlp", "task": "regression"},
        "strategy": {"name": "fedbuff", "buffer_size": 2, "flush_timeout": 2.0},
        "training": {"epochs": 2, "batch_size": 16, "lr": 0.02},
        "evaluation": {"metrics": "mse,mae,r2"},
        "coordinator": {"concurrency": 3, "target_metric": "mse", "target_value": 0.6, "max_seconds": 120,
                        "out": str(tmp_path / "out")},
    }, environ={})
    workers = [Worker(broker_url, job, f"site-{i}", part.site_files[i], options=WorkerOptions(device="cpu"))
               for i in range(3)]
    result = _run(broker_url, cfg, workers)
    assert result.stop_reason == "target_metric", result
    assert result.metrics["mse"] <= 0.6 and result.metrics["r2"] > 0.3 and result.final_accuracy is None, result
    first = _events(broker_url, job, EventKind.VERSION_EVALUATED)[0].data["metrics"]
    assert first["mse"] > 0.6  # v0 does not predict: the target was learned
    assert not dead_letters(broker_url, job)


@pytest.mark.parametrize("returned, words", [
    ([0.5], "the evaluator's result is a list, not a dict"),
    ({"accuracy": float("nan")}, "metric accuracy is NaN"),
    ({"accuracy": "high"}, "evaluation metric accuracy = 'high' is not a finite number"),
    ({"accuracy": True}, "is not a finite number"),
    ({f"m{i}": 1.0 for i in range(17)}, "holds 17 values, at most 16"),
])
def test_an_evaluators_result_that_cannot_travel_fails_the_task(returned: Any, words: str) -> None:
    import torch

    from fedmq.worker.train import TrainResultError, run_evaluator

    ctx = EvalContext(model=torch.nn.Linear(2, 2), x=np.zeros((2, 2), np.float32), y=np.zeros(2, np.int64),
                      metrics=("accuracy",), task=TaskKind.CLASSIFICATION, device=torch.device("cpu"), version=0)
    with pytest.raises(TrainResultError, match=None) as info:
        run_evaluator(lambda _ctx: returned, ctx)
    assert words in str(info.value)
