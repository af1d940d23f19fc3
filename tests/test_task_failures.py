"""A site whose training raises is visible, not silent: it reports task_failed (site, task, error),
its task goes to the others, and it stops after --max-failures in a row with one line.

The job runs on the real broker (coordinator, aggregator, workers on threads); the failing site is
the product worker with `_train` replaced by code that raises, as a user's broken trainer would.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from fedmq.aggregator.service import Aggregator
from fedmq.coordinator.service import Coordinator
from fedmq.history import read_history
from fedmq.monitor import JobView, Thresholds, alerts
from fedmq.report import collect
from fedmq.shared.broker import JobNames, read_stream
from fedmq.shared.config import load_job_config
from fedmq.shared.datasets import write_partition
from fedmq.shared.errors import TrainingFailedError
from fedmq.shared.jobstate import read_event_delivery
from fedmq.shared.messages import EventKind
from fedmq.worker.service import Worker, WorkerOptions
from tests.conftest import ROOT, child_env, fedmq_cmd
from tests.jobkit import run_threaded_job

pytestmark = [pytest.mark.broker, pytest.mark.timeout(300)]


class BrokenTrainer(Worker):
    """The product worker whose local training raises on every task."""

    def _train(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("CUDA out of memory (simulated)")


def test_a_failing_site_is_reported_everywhere_and_the_job_reaches_its_target(
        broker_url: str, job: str, tmp_path: Path) -> None:
    part = write_partition(tmp_path / "data", "digits", 3, scheme="iid", seed=0)
    cfg = load_job_config(overrides={
        "job": job, "data": {"test": str(part.test_file)}, "model": {"name": "logreg"},
        "strategy": {"name": "fedbuff", "buffer_size": 2, "flush_timeout": 2.0},
        "training": {"epochs": 1, "batch_size": 16, "lr": 0.1},
        "coordinator": {"concurrency": 3, "target_accuracy": 0.85, "max_seconds": 180, "max_versions": 200,
                        "out": str(tmp_path / "out")},
    }, environ={})
    coord = Coordinator(broker_url, cfg, stop=threading.Event())
    agg = Aggregator(broker_url, job, stop=threading.Event(), name="agg-fail")
    broken = BrokenTrainer(broker_url, job, "site-2", part.site_files[2],
                           options=WorkerOptions(device="cpu", max_failures=3))
    errors: list[BaseException] = []
    run = broken.run

    def run_broken() -> None:
        try:
            run()
        except BaseException as exc:  # what ends the broken site is asserted below
            errors.append(exc)

    broken.run = run_broken  # type: ignore[method-assign]
    workers = [Worker(broker_url, job, f"site-{i}", part.site_files[i], options=WorkerOptions(device="cpu"))
               for i in range(2)]
    result = run_threaded_job(coord, agg, [*workers, broken])
    assert result.stop_reason == "target_accuracy", result

    # the broken site stopped after 3 failures in a row, with an error that says what to do
    assert len(errors) == 1 and isinstance(errors[0], TrainingFailedError), errors
    assert "3 tasks in a row" in str(errors[0]) and "CUDA out of memory" in str(errors[0])
    assert broken.stats.failures == 3 and broken.stats.tasks == 0
    assert result.task_failures == {"site-2": 3}

    names = JobNames(job)
    failed = [sev for d in read_stream(broker_url, names.events, "first")
              if (sev := read_event_delivery(d)).event.event == EventKind.TASK_FAILED]
    assert [sev.site for sev in failed] == ["site-2"] * 3
    assert all(sev.data["error"] == "RuntimeError: CUDA out of memory (simulated)" for sev in failed)

    # history, report and monitor all show it, per site
    hist = read_history(broker_url, job)
    assert hist.sites["site-2"].task_failures == 3
    assert [f.task_id for f in hist.task_failures] == [sev.data["task_id"] for sev in failed]
    summary = collect(broker_url, job).summary()
    assert summary["task_failures"] == 3 and "site-2: 3 (RuntimeError" in summary["sites_failing"]
    view = JobView(job)
    for d in read_stream(broker_url, names.events, "first"):
        view.apply(read_event_delivery(d).event)
    assert view.sites["site-2"].failed == 3 and "CUDA" in (view.sites["site-2"].last_error or "")
    now = max(sev.event.ts for sev in failed)
    codes = [a.code for a in alerts(view, {}, now, Thresholds())]
    assert "training_failing" in codes


def test_max_failures_is_checked_on_the_command_line() -> None:
    out = subprocess.run(fedmq_cmd("worker", "--job", "j", "--site", "s", "--data", "x.npz", "--max-failures", "-1"),
                         capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=60)
    assert out.returncode == 2 and "--max-failures" in out.stderr and "Traceback" not in out.stderr
