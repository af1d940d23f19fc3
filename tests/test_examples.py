"""Every example in examples/ runs as a real multi-process job (`fedmq demo --example NAME --json`)
to its target, with the example's own site code, and reports the final version's metrics."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from fedmq.demo import EXAMPLES, example_names, load_example
from fedmq.shared.broker import Connection, JobNames, read_stream
from fedmq.shared.evaluation import reached
from fedmq.shared.messages import Update
from tests.conftest import run_fedmq

pytestmark = [pytest.mark.slow, pytest.mark.broker, pytest.mark.timeout(420)]


def test_there_are_at_least_three_documented_examples() -> None:
    names = example_names()
    assert {"tabular_auc", "mnist_cnn", "regression_mse"} <= set(names)
    for name in names:
        text = (EXAMPLES / name / "example.toml").read_text()
        assert text.startswith("#") and "fedmq demo --example" in text  # says what it is and how to run it


def _target(name: str) -> tuple[str, float, str]:
    _, sections = load_example(name)
    c = sections["coordinator"]
    if "target_metric" in c:
        return c["target_metric"], c["target_value"], c.get("target_source", "central")
    return "accuracy", c["target_accuracy"], "central"


#: which trainer made every update: (metric key, present?): a key only the example's trainer
#: reports, or the bundled loop's `train_seconds`, absent with a trainer of the example's own
OWN_TRAINER: dict[str, Any] = {"tabular_auc": ("train_seconds", False), "mnist_cnn": ("last_lr", True),
                               "regression_mse": ("train_seconds", True)}


@pytest.mark.parametrize("name", ["tabular_auc", "mnist_cnn", "regression_mse"])
def test_an_example_runs_to_its_target_with_its_own_code(name: str, broker_url: str) -> None:
    job = f"t-example-{name.replace('_', '-')}"
    try:
        proc = run_fedmq("demo", "--example", name, "--json", "--job", job, "--broker", broker_url, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        metric, value, source = _target(name)
        assert res["example"] == name and res["metrics_source"] == source, res
        assert reached(metric, res["metrics"][metric], value), res
        assert res["seconds_to_target"] is not None and res["updates_dead_lettered"] == 0, res
        updates = [Update.decode(d.body) for d in read_stream(broker_url, JobNames(job).updates_log, "first")]
        key, present = OWN_TRAINER[name]
        assert updates and all((key in u.metrics) is present for u in updates)
    finally:
        with Connection(broker_url, name="fedmq-test-cleanup").open() as conn:
            conn.delete_job(JobNames(job))


def test_an_unknown_example_exits_2_with_one_line() -> None:
    proc = run_fedmq("demo", "--example", "nosuch", "--broker", "amqp://guest:guest@127.0.0.1:1/%2F", timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "is not an example (known: mnist_cnn, regression_mse, tabular_auc)" in proc.stderr


OWN_EXAMPLE = """
[demo]
sites = 3
slow = 0
trainer = "my_job.train:train"

[coordinator]
target_accuracy = 0.8
max_seconds = 120
"""

OWN_TRAINER_CODE = """
from fedmq.site import TrainResult, sgd_trainer


def train(ctx):
    r = sgd_trainer(ctx)
    return TrainResult(delta=r.delta, num_samples=r.num_samples, metrics={**r.metrics, "trainer": "mine"})
"""


def test_a_directory_of_ones_own_runs_as_an_example_with_its_site_code(broker_url: str, tmp_path: Path) -> None:
    own = tmp_path / "my_job"
    own.mkdir()
    (own / "example.toml").write_text(OWN_EXAMPLE)
    (own / "train.py").write_text(OWN_TRAINER_CODE)
    job = f"t-own-example-{uuid.uuid4().hex[:8]}"
    try:
        proc = run_fedmq("demo", "--example", str(own), "--json", "--job", job, "--broker", broker_url, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        assert res["example"] == str(own) and res["final_accuracy"] >= 0.8, res
        updates = [Update.decode(d.body) for d in read_stream(broker_url, JobNames(job).updates_log, "first")]
        assert updates and all(u.metrics.get("trainer") == "mine" for u in updates)
    finally:
        with Connection(broker_url, name="fedmq-test-cleanup").open() as conn:
            conn.delete_job(JobNames(job))


def test_a_directory_without_example_toml_exits_2_with_one_line(tmp_path: Path) -> None:
    proc = run_fedmq("demo", "--example", str(tmp_path), "--broker", "amqp://guest:guest@127.0.0.1:1/%2F", timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "no example.toml in that directory" in proc.stderr
