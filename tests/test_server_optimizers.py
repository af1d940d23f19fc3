"""FedAdam, FedYogi and FedAdagrad on the buffered mean delta (Reddi et al., ICLR 2021).

The math against an independent float64 transcription of the paper's Algorithm 2; the state's
round trip through the models stream, a replica taking over mid-job and replay bit for bit on a
real broker; the combinations that are refused."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedmq.aggregator.strategy import Accumulator, server_step
from fedmq.replay import Status, replay
from fedmq.shared.broker import Connection, JobNames
from fedmq.shared.codec import unpack, unpack_any, weights_sha256
from fedmq.shared.config import (
    ClipCenter,
    JobConfig,
    PrivacyConfig,
    ServerOptimizer,
    StrategyConfig,
    StrategyName,
    load_job_config,
)
from fedmq.shared.errors import ConfigError, ServerStateError
from fedmq.shared.he import check_strategy
from fedmq.shared.messages import FRAMED_SCHEMA, ModelVersion, make_version
from fedmq.shared.privacy import check_privacy
from tests.jobkit import declare_job_with_v0, make_update, publish_updates, running_aggregator, wait_for_version

OPTIMIZERS = [ServerOptimizer.ADAM, ServerOptimizer.YOGI, ServerOptimizer.ADAGRAD]


def _reference(opt: ServerOptimizer, x: np.ndarray, deltas: list[np.ndarray], *, lr: float, b1: float,
               b2: float, tau: float) -> np.ndarray:
    """Algorithm 2 of the paper, written out once more with no shared code: m_{-1} = 0, v_{-1} = tau^2."""
    m, v = np.zeros_like(x), np.full_like(x, tau ** 2)
    for g in deltas:
        m = b1 * m + (1 - b1) * g
        if opt is ServerOptimizer.ADAGRAD:
            v = v + g ** 2
        elif opt is ServerOptimizer.ADAM:
            v = b2 * v + (1 - b2) * g ** 2
        else:
            v = v - (1 - b2) * g ** 2 * np.sign(v - g ** 2)
        x = x + lr * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=[o.value for o in OPTIMIZERS])
def test_three_steps_follow_the_papers_algorithm(opt: ServerOptimizer) -> None:
    cfg = StrategyConfig(server_optimizer=opt, server_lr=0.05, server_beta1=0.8, server_beta2=0.9, server_tau=0.01)
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(3, 4))  # float64 weights: no rounding between steps
    deltas = [rng.normal(scale=s, size=(3, 4)) for s in (0.1, 1.0, 0.01)]
    weights, state = {"w": x0}, None
    for g in deltas:
        weights, state = server_step(cfg, weights, {"w": g}, state)
    expected = _reference(opt, x0, deltas, lr=0.05, b1=0.8, b2=0.9, tau=0.01)
    np.testing.assert_allclose(weights["w"], expected, rtol=1e-12, atol=0)
    assert state is not None and set(state) == {"m:w", "v:w"} and bool(np.all(state["v:w"] > 0))


def test_an_adaptive_step_normalises_the_size_of_the_mean_delta() -> None:
    """Why a researcher picks one: the first Adam step has length ~lr per coordinate whatever the
    scale of the deltas, where the plain step is lr x the delta."""
    cfg = StrategyConfig(server_optimizer=ServerOptimizer.ADAM, server_lr=0.01, server_beta1=0.0, server_tau=1e-9)
    for scale in (1e-4, 1.0, 1e3):
        new, _ = server_step(cfg, {"w": np.zeros(5)}, {"w": np.full(5, scale)}, None)
        np.testing.assert_allclose(new["w"], 0.01 / np.sqrt(0.01), rtol=1e-3)  # lr x m / sqrt((1 - b2) g^2)


def test_state_is_cast_to_the_models_dtype_and_integer_buffers_keep_the_plain_step() -> None:
    cfg = StrategyConfig(server_optimizer=ServerOptimizer.YOGI, server_lr=0.1)
    current = {"w": np.ones(3, np.float32), "count": np.array(7, np.int64)}
    new, state = server_step(cfg, current, {"w": np.full(3, 0.5), "count": np.array(1.0)}, None)
    assert new["w"].dtype == np.float32 and new["count"].dtype == np.int64 and int(new["count"]) == 7
    assert state is not None and set(state) == {"m:w", "v:w"} and state["m:w"].dtype == np.float32


def test_a_state_that_does_not_fit_the_model_is_a_typed_error() -> None:
    cfg = StrategyConfig(server_optimizer=ServerOptimizer.ADAM)
    with pytest.raises(ServerStateError, match="'w'"):
        server_step(cfg, {"w": np.zeros(3)}, {"w": np.ones(3)}, {"m:w": np.zeros(4), "v:w": np.ones(4)})
    with pytest.raises(ServerStateError):
        server_step(cfg, {"w": np.zeros(3)}, {"w": np.ones(3)}, {"m:other": np.zeros(3)})


def test_a_version_without_state_leaves_the_field_out_in_both_forms() -> None:
    """Framed (schema 3, this release) or map form (schema 1 without state, 2 with: the bodies of
    the release that added server optimizers, still read on replay)."""
    common = dict(job="j", parent=0, included=["u"], strategy="fedbuff", params={}, model={})
    plain = make_version(version=1, weights={"w": np.ones(2, np.float32)}, **common)
    assert plain.schema == FRAMED_SCHEMA and "server_state" not in unpack_any(plain.encode())
    assert "server_state" not in unpack(dataclasses.replace(plain, schema=1).encode())
    with_state = make_version(version=1, weights={"w": np.ones(2, np.float32)},
                              server_state={"m:w": np.zeros(2, np.float32), "v:w": np.ones(2, np.float32)}, **common)
    for schema in (2, FRAMED_SCHEMA):
        back = ModelVersion.decode(dataclasses.replace(with_state, schema=schema).encode())
        assert back.schema == schema and back.server_state is not None
        assert weights_sha256(back.server_state) == weights_sha256(with_state.server_state or {})


def test_flush_without_the_parents_state_is_refused_for_an_optimizer() -> None:
    acc = Accumulator(StrategyConfig(server_optimizer=ServerOptimizer.ADAM))
    acc.fold(update_id="u", site="s", delta={"w": np.ones(2)}, tau=0, num_samples=1, base_version=0)
    with pytest.raises(ValueError, match="step"):
        acc.flush({"w": np.zeros(2)})


def test_combinations_that_would_misread_the_step_are_refused() -> None:
    with pytest.raises(ConfigError, match="fedasync"):
        StrategyConfig(name=StrategyName.FEDASYNC, server_optimizer=ServerOptimizer.ADAM).check()
    with pytest.raises(ConfigError, match="last_step"):
        StrategyConfig(server_optimizer=ServerOptimizer.ADAM, clip_median_factor=2,
                       clip_center=ClipCenter.LAST_STEP).check()
    with pytest.raises(ConfigError, match="encrypted"):
        check_strategy(StrategyConfig(server_optimizer=ServerOptimizer.YOGI))
    central = PrivacyConfig.from_options({"mechanism": "dp_fedavg", "epsilon": 4.0, "noise_at": "aggregator"})
    with pytest.raises(ConfigError, match="server_optimizer"):
        check_privacy(JobConfig(privacy=central, strategy=StrategyConfig(
            sample_weighted=False, server_optimizer=ServerOptimizer.ADAM)))


def test_a_job_file_names_the_optimizer(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text('[strategy]\nname = "fedbuff"\nserver_optimizer = "yogi"\nserver_lr = 0.03\n')
    cfg = load_job_config(path, environ={})
    assert cfg.strategy.server_optimizer is ServerOptimizer.YOGI and cfg.strategy.server_lr == 0.03
    with pytest.raises(ConfigError, match="server_optimizer"):
        load_job_config(overrides={"strategy": {"server_optimizer": "sgdm"}}, environ={})
    with pytest.raises(ConfigError, match="server_beta1"):
        load_job_config(overrides={"strategy": {"server_optimizer": "adam", "server_beta1": 1.0}}, environ={})


# ------------------------------------------------------------------ on the broker


@pytest.fixture
def job(broker_url: str) -> Iterator[str]:
    name = f"t-fedopt-{uuid.uuid4().hex[:8]}"
    try:
        yield name
    finally:
        with Connection(broker_url, name="fedmq-test-cleanup").open() as conn:
            conn.delete_job(JobNames(name))


@pytest.mark.broker
@pytest.mark.timeout(240)
def test_a_replica_taking_over_continues_from_the_published_state_and_replay_agrees(
        broker_url: str, job: str) -> None:
    cfg = StrategyConfig(buffer_size=2, flush_timeout=120.0, server_optimizer=ServerOptimizer.ADAM, server_lr=0.02)
    v0 = declare_job_with_v0(broker_url, job, cfg)
    updates = [make_update(job, f"u{i}", v0.weights, base_version=i // 2, site=f"site-{i % 2}", seed=i)
               for i in range(6)]
    with running_aggregator(broker_url, job, name="replica-a"):
        publish_updates(broker_url, job, updates[:2])
        wait_for_version(broker_url, job, 1)
    with running_aggregator(broker_url, job, name="replica-b"):  # a fresh process's view: the stream only
        publish_updates(broker_url, job, updates[2:4])
        wait_for_version(broker_url, job, 2)
        publish_updates(broker_url, job, updates[4:])
        chain = wait_for_version(broker_url, job, 3)
    got: dict[int, ModelVersion] = {mv.version: mv for mv in chain}
    assert got[0].server_state is None
    assert all(got[v].server_state and set(got[v].server_state) == {f"{p}:{k}" for p in "mv" for k in v0.weights}
               for v in (1, 2, 3))

    # the same chain computed in memory, with no broker and no takeover
    weights, state = v0.weights, None
    for v in (1, 2, 3):
        acc = Accumulator(cfg)
        for u in updates[2 * (v - 1):2 * v]:
            acc.fold(update_id=u.update_id, site=u.site, delta=u.delta or {}, tau=(v - 1) - u.base_version,
                     num_samples=u.num_samples, base_version=u.base_version)
        weights, _, state = acc.step(weights, state)
        assert weights_sha256(weights) == got[v].sha256
        assert weights_sha256(state or {}) == weights_sha256(got[v].server_state or {})

    report = replay(broker_url, job)
    assert [c.status for c in report.checks] == [Status.ROOT, Status.OK, Status.OK, Status.OK], report.to_dict()
