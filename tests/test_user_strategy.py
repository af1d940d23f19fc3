"""User strategies (`strategy.name = "package.module:callable"`): the interface, bit for bit
against the built-in fold, a real job to its target, replay agreeing and catching changed code,
bad names exiting 2 and the refused combinations."""

from __future__ import annotations

import importlib
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from fedmq.aggregator.strategy import Accumulator, mean_strategy
from fedmq.replay import Status, replay
from fedmq.shared.codec import weights_sha256
from fedmq.shared.config import (
    JobConfig,
    PrivacyConfig,
    Robust,
    ServerOptimizer,
    StrategyConfig,
    StrategyName,
    build,
    load_job_config,
)
from fedmq.shared.errors import ConfigError
from fedmq.shared.he import check_strategy
from fedmq.shared.privacy import check_privacy
from tests import user_strategy
from tests.conftest import run_fedmq
from tests.jobkit import declare_job_with_v0, make_update, publish_updates, running_aggregator, wait_for_version

FEDAVGM = "tests.user_strategy:fedavgm"


def _fold(cfg: StrategyConfig, template: dict[str, np.ndarray], n: int, seed: int = 0) -> Accumulator:
    acc = Accumulator(cfg)
    rng = np.random.default_rng(seed)
    for i in range(n):
        acc.fold(update_id=f"u{i}", site=f"s{i}", delta={k: rng.normal(size=np.shape(v)).astype(np.float32)
                                                         for k, v in template.items()},
                 tau=i % 3, num_samples=10 + i, base_version=0)
    return acc


def test_the_builtin_mean_through_the_interface_is_bit_identical() -> None:
    """`mean_strategy` as a user strategy gives the Accumulator's own bits (the interface carries
    everything the built-in fold uses)."""
    template = {"w": np.ones((4, 3), np.float32), "b": np.zeros(3, np.float32)}
    builtin = _fold(StrategyConfig(buffer_size=5, server_lr=0.7), template, 5).step(template, None)[0]
    user = _fold(StrategyConfig(name=StrategyName("fedmq.aggregator.strategy:mean_strategy"), buffer_size=5,
                                server_lr=0.7), template, 5).step(template, None)[0]
    assert weights_sha256(user) == weights_sha256(builtin)
    assert mean_strategy is not None


def test_fedavgm_keeps_its_velocity_in_the_state() -> None:
    cfg = StrategyConfig(name=StrategyName(FEDAVGM), buffer_size=1, server_lr=1.0)
    w = {"w": np.zeros(2, np.float64)}
    state = None
    for step in range(2):
        acc = Accumulator(cfg)
        acc.fold(update_id=f"u{step}", site="s", delta={"w": np.ones(2)}, tau=0, num_samples=1, base_version=step)
        w, _, state = acc.step(w, state)
    # u1 = 1, u2 = 0.5 * 1 + 1 = 1.5; w = 1 + 1.5
    np.testing.assert_array_equal(w["w"], [2.5, 2.5])
    assert state is not None and np.array_equal(state["u:w"], [1.5, 1.5])


@pytest.mark.parametrize(("name", "text"), [
    ("tests.user_strategy:no_such", "cannot be imported"),
    ("tests.no_such_module:fn", "cannot be imported"),
    ("tests.user_strategy:not_callable", "is not callable"),
    ("fed:", "is not one of"),
])
def test_bad_names_exit_2_with_one_line(tmp_path: Path, name: str, text: str) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[strategy]\nname = "{name}"\n')
    res = run_fedmq("init", "--check", str(bad), timeout=60)
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "strategy.name" in res.stderr and text in res.stderr


def test_init_writes_a_user_strategy(tmp_path: Path) -> None:
    out = tmp_path / "job.toml"
    assert run_fedmq("init", "--out", str(out), "--strategy", FEDAVGM, timeout=60).returncode == 0
    assert load_job_config(out, environ={}).strategy.name.value == FEDAVGM
    res = run_fedmq("init", "--out", str(tmp_path / "x.toml"), "--strategy", "nonsense", timeout=60)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("extra", [{"robust": Robust.MEDIAN}, {"server_optimizer": ServerOptimizer.ADAM}])
def test_refused_with_options_a_user_strategy_would_bypass(extra: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="strategy.name"):
        StrategyConfig(name=StrategyName(FEDAVGM), **extra).check()  # type: ignore[arg-type]


def test_refused_with_encryption_and_central_dp() -> None:
    cfg = StrategyConfig(name=StrategyName(FEDAVGM), sample_weighted=False)
    with pytest.raises(ConfigError, match="user strategy"):
        check_strategy(cfg)
    job = JobConfig(strategy=cfg, privacy=build(
        PrivacyConfig, {"mechanism": "dp_fedavg", "noise_at": "aggregator", "noise_multiplier": 1.0}, "privacy"))
    with pytest.raises(ConfigError, match="central DP"):
        check_privacy(job)


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_real_job_reaches_its_target_and_replays_bit_for_bit(broker_url: str, job: str, tmp_path: Path) -> None:
    proc = run_fedmq("demo", "--json", "--broker", broker_url, "--job", job, "--workdir", str(tmp_path),
                     "--max-seconds", "240", "--strategy", FEDAVGM, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["strategy"] == FEDAVGM and res["seconds_to_target"] is not None and res["final_accuracy"] >= 0.9
    report = replay(broker_url, job)
    statuses = [c.status for c in report.checks]
    assert statuses[0] is Status.ROOT and len(statuses) == res["versions"] + 1
    assert Status.MISMATCH not in statuses and statuses.count(Status.OK) >= 1, report.to_dict()


@pytest.mark.broker
def test_changed_strategy_code_makes_replay_report_mismatches(
        broker_url: str, job: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    module = tmp_path / "my_strategy_mod.py"
    source = Path(user_strategy.__file__).read_text()
    module.write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_strategy_mod", None)
    cfg = StrategyConfig(name=StrategyName("my_strategy_mod:fedavgm"), buffer_size=2, flush_timeout=120.0)
    v0 = declare_job_with_v0(broker_url, job, cfg)
    updates = [make_update(job, f"u{i}", v0.weights, base_version=i // 2, seed=i) for i in range(4)]
    with running_aggregator(broker_url, job):
        publish_updates(broker_url, job, updates[:2])
        wait_for_version(broker_url, job, 1)
        publish_updates(broker_url, job, updates[2:])
        chain = wait_for_version(broker_url, job, 2)
    assert chain[2].server_state and chain[2].meta["user_strategy"]["name"] == "my_strategy_mod:fedavgm"
    assert [c.status for c in replay(broker_url, job).checks] == [Status.ROOT, Status.OK, Status.OK]

    module.write_text(source.replace("MOMENTUM = 0.5", "MOMENTUM = 0.25"))
    importlib.reload(importlib.import_module("my_strategy_mod"))
    with caplog.at_level(logging.WARNING, logger="fedmq.replay"):
        statuses = [c.status for c in replay(broker_url, job).checks]
    # v1 starts from no state (same numbers); v2 uses the momentum
    assert statuses == [Status.ROOT, Status.OK, Status.MISMATCH]
    assert any("user strategy changed" in r.getMessage() for r in caplog.records)
    sys.modules.pop("my_strategy_mod", None)
