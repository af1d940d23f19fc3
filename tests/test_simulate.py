"""`fedmq simulate`: the zero-overhead job on a simulated clock follows the coordinator's and the
aggregator's rules (concurrency, FedAvg cohorts, buffers, staleness) and nothing else costs time."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from fedmq.shared.config import JobConfig, load_job_config
from fedmq.shared.datasets import write_partition
from fedmq.shared.errors import ConfigError
from fedmq.simulate import SimSite, simulate
from tests.conftest import ROOT, child_env, fedmq_cmd


@pytest.fixture(scope="module")
def partition(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return write_partition(tmp_path_factory.mktemp("sim") / "data", "digits", 3, scheme="iid", seed=0)


def _cfg(partition: Any, strategy: dict[str, Any], **coordinator: Any) -> JobConfig:
    return load_job_config(overrides={
        "job": "sim", "model": {"name": "logreg"}, "data": {"test": str(partition.test_file)},
        "strategy": strategy, "training": {"epochs": 1, "batch_size": 32, "lr": 0.1},
        "coordinator": {"concurrency": 3, "target_accuracy": 0.0, "max_seconds": 1000, **coordinator},
    }, environ={})


def _sites(partition: Any, seconds: list[float]) -> list[SimSite]:
    return [SimSite(f"site-{i}", Path(f), task_seconds=s) for i, (f, s) in enumerate(zip(partition.site_files,
                                                                                          seconds, strict=True))]


def test_fedavg_rounds_last_as_long_as_the_slowest_site(partition: Any) -> None:
    cfg = _cfg(partition, {"name": "fedavg", "buffer_size": 3, "max_staleness": 0}, max_versions=3)
    r = simulate(cfg, _sites(partition, [1.0, 2.0, 3.0]))
    assert [(v, t) for v, t, _ in r.curve] == [(0, 0.0), (1, 3.0), (2, 6.0), (3, 9.0)]
    assert r.updates == 9 and r.stale == 0 and r.stop_reason == "max_versions"


def test_fedbuff_folds_the_fast_sites_and_weighs_the_straggler_by_staleness(partition: Any) -> None:
    cfg = _cfg(partition, {"name": "fedbuff", "buffer_size": 2, "flush_timeout": 100.0}, max_versions=6)
    r = simulate(cfg, _sites(partition, [1.0, 1.0, 5.5]))
    # two fast sites finish together every second; the straggler's first update lands at 5.5 s
    assert [t for _, t, _ in r.curve[1:]] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert r.task_seconds == {"site-0": 1.0, "site-1": 1.0, "site-2": 5.5}
    assert r.updates == 12


def test_fedasync_makes_a_version_per_update_and_staleness_is_enforced(partition: Any) -> None:
    cfg = _cfg(partition, {"name": "fedasync", "alpha": 0.6}, max_versions=8)
    r = simulate(cfg, _sites(partition, [1.0, 1.5, 4.0]))
    assert r.versions == r.updates == 8
    strict = _cfg(partition, {"name": "fedbuff", "buffer_size": 1, "max_staleness": 0}, max_versions=8)
    r = simulate(strict, _sites(partition, [1.0, 1.5, 4.0]))
    assert r.stale > 0 and r.versions == 8  # the slow site's updates are always behind


def test_a_simulation_is_repeatable_and_stops_at_the_target(partition: Any) -> None:
    cfg = _cfg(partition, {"name": "fedbuff", "buffer_size": 2}, target_accuracy=0.85)
    a, b = (simulate(cfg, _sites(partition, [0.2, 0.3, 2.0])) for _ in range(2))
    assert a.stop_reason == "target_accuracy" and a.curve == b.curve
    assert a.seconds_to_target is not None and a.final_accuracy >= 0.85
    assert a.seconds_to_target == a.curve[-1][1] and a.updates_to_target == a.updates


def test_padding_follows_the_worker_rule(partition: Any) -> None:
    cfg = _cfg(partition, {"name": "fedbuff", "buffer_size": 3}, max_versions=2)
    sites = [SimSite(f"site-{i}", Path(f), slowdown=10.0 if i == 2 else 1.0, min_task_seconds=0.5)
             for i, f in enumerate(partition.site_files)]
    r = simulate(cfg, sites)
    assert r.task_seconds["site-0"] == pytest.approx(0.5, abs=0.1)  # logreg on ~600 rows: compute << 0.5 s
    assert r.task_seconds["site-2"] == pytest.approx(5.0, abs=1.0)


def test_what_cannot_be_simulated_is_refused(partition: Any) -> None:
    cfg = load_job_config(overrides={"job": "sim", "data": {"test": str(partition.test_file)},
                                     "privacy": {"mechanism": "dp_fedavg", "epsilon": 5.0}}, environ={})
    with pytest.raises(ConfigError, match="privacy.mechanism"):
        simulate(cfg, _sites(partition, [1.0, 1.0, 1.0]))


def test_the_cli_prints_the_bound_and_refuses_mismatched_lists(partition: Any, tmp_path: Path) -> None:
    config = tmp_path / "job.toml"
    config.write_text(f'[model]\nname = "logreg"\n[data]\ntest = "{partition.test_file}"\n'
                      '[strategy]\nbuffer_size = 2\n[coordinator]\nconcurrency = 3\ntarget_accuracy = 0.8\n')
    data = [str(f) for f in partition.site_files]
    ok = subprocess.run(fedmq_cmd("simulate", "--config", str(config), "--data", *data, "--task-seconds", "0.3",
                                  "--json"), capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=120)
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout.strip().splitlines()[-1])
    assert out["stop_reason"] == "target_accuracy" and out["task_seconds"] == {f"site-{i}": 0.3 for i in range(3)}
    bad = subprocess.run(fedmq_cmd("simulate", "--config", str(config), "--data", *data, "--task-seconds", "1", "2"),
                         capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "--task-seconds" in bad.stderr and "Traceback" not in bad.stderr
