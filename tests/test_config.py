"""Job configuration: TOML < FEDMQ_* env < flags, and every bad value is a ConfigError naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmq.shared.config import (
    JobConfig,
    Robust,
    StalenessFn,
    StrategyConfig,
    StrategyName,
    env_names,
    env_overrides,
    load_job_config,
)
from fedmq.shared.errors import ConfigError

TOML = """
job = "j-toml"
seed = 3

[strategy]
name = "fedbuff"
buffer_size = 6
staleness = "hinge"

[training]
epochs = 2
lr = 0.01

[coordinator]
target_accuracy = 0.8
"""


@pytest.fixture()
def toml_file(tmp_path: Path) -> Path:
    p = tmp_path / "job.toml"
    p.write_text(TOML)
    return p


def test_defaults_need_no_file() -> None:
    cfg = load_job_config(None, environ={})
    assert cfg == JobConfig()
    assert cfg.strategy.name is StrategyName.FEDBUFF


def test_toml_values_are_read_and_typed(toml_file: Path) -> None:
    cfg = load_job_config(toml_file, environ={})
    assert cfg.job == "j-toml" and cfg.seed == 3
    assert cfg.strategy.buffer_size == 6 and cfg.strategy.staleness is StalenessFn.HINGE
    assert cfg.training.epochs == 2 and cfg.training.lr == 0.01
    assert cfg.coordinator.target_accuracy == 0.8


def test_env_overrides_toml_and_flags_override_env(toml_file: Path) -> None:
    env = {"FEDMQ_STRATEGY_BUFFER_SIZE": "9", "FEDMQ_TRAINING_LR": "0.5",
           "FEDMQ_STRATEGY_SAMPLE_WEIGHTED": "false", "FEDMQ_BROKER_URL": "amqp://x", "HOME": "/root"}
    cfg = load_job_config(toml_file, environ=env)
    assert cfg.strategy.buffer_size == 9
    assert cfg.training.lr == 0.5
    assert cfg.strategy.sample_weighted is False
    assert cfg.strategy.staleness is StalenessFn.HINGE  # untouched TOML value survives
    cfg = load_job_config(toml_file, environ=env, overrides={"strategy": {"buffer_size": 2}})
    assert cfg.strategy.buffer_size == 2


def test_env_override_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMQ_STRATEGY_BUFFER_SIZE", "11")
    assert load_job_config(None).strategy.buffer_size == 11


def test_env_names_cover_every_config_key() -> None:
    names = env_names()
    assert "FEDMQ_STRATEGY_BUFFER_SIZE" in names and "FEDMQ_COORDINATOR_MAX_SECONDS" in names
    assert env_overrides({"FEDMQ_STRATEGY_BUFFER_SIZE": "8"}) == {"strategy": {"buffer_size": "8"}}
    assert env_overrides({"FEDMQ_JOB": "x", "FEDMQ_LOG_LEVEL": "debug", "OTHER": "1"}) == {}


@pytest.mark.parametrize("text, key", [
    ("[strategy]\nbufer_size = 3\n", "strategy.bufer_size: unknown key"),
    ("[stratgy]\nname = 'fedbuff'\n", "config.stratgy: unknown key"),
    ("colour = 'red'\n", "config.colour: unknown key"),
])
def test_an_unknown_key_is_named(tmp_path: Path, text: str, key: str) -> None:
    p = tmp_path / "job.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=key):
        load_job_config(p, environ={})


@pytest.mark.parametrize("env, match", [
    ({"FEDMQ_STRATEGY_BUFFER_SIZE": "many"}, "strategy.buffer_size: 'many' is not an integer"),
    ({"FEDMQ_STRATEGY_BUFFER_SIZE": "2.5"}, "strategy.buffer_size: '2.5' is not an integer"),
    ({"FEDMQ_STRATEGY_BUFFER_SIZE": "0"}, r"strategy.buffer_size: must be in \[1, 10000\], got 0"),
    ({"FEDMQ_STRATEGY_NAME": "fedsgd"}, "strategy.name: 'fedsgd' is not one of fedbuff, fedasync, fedavg"),
    ({"FEDMQ_STRATEGY_ALPHA": "1.5"}, r"strategy.alpha: must be in \(0, 1\], got 1.5"),
    ({"FEDMQ_STRATEGY_SAMPLE_WEIGHTED": "maybe"}, "strategy.sample_weighted: 'maybe' is not a boolean"),
    ({"FEDMQ_STRATEGY_TRIM_FRACTION": "0.5"}, "strategy.trim_fraction"),
    ({"FEDMQ_STRATEGY_SERVER_LR": "nan-ish"}, "strategy.server_lr: 'nan-ish' is not a number"),
    ({"FEDMQ_TRAINING_EPOCHS": "0"}, r"training.epochs: must be in \[1, 10000\]"),
    ({"FEDMQ_TRAINING_LR": "-1"}, r"training.lr: must be in \(0, 1000\]"),
    ({"FEDMQ_COORDINATOR_TARGET_ACCURACY": "1.2"}, "coordinator.target_accuracy"),
    ({"FEDMQ_COORDINATOR_CONCURRENCY": "0"}, r"coordinator.concurrency: must be in \[1, 10000\]"),
    ({"FEDMQ_MODEL_ARGS": "{not json"}, "model.args: .* is not a table / JSON object"),
    ({"FEDMQ_STRATEGY_NAME": "fedavg"}, "strategy.max_staleness: synchronous fedavg needs max_staleness = 0"),
])
def test_bad_values_are_config_errors_naming_the_key(env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_job_config(None, environ=env)


def test_fedavg_with_zero_staleness_is_accepted() -> None:
    cfg = load_job_config(None, environ={"FEDMQ_STRATEGY_NAME": "fedavg", "FEDMQ_STRATEGY_MAX_STALENESS": "0"})
    assert cfg.strategy.name is StrategyName.FEDAVG


def test_toml_with_a_wrong_type_is_a_config_error(tmp_path: Path) -> None:
    p = tmp_path / "job.toml"
    p.write_text("[strategy]\nbuffer_size = true\n")
    with pytest.raises(ConfigError, match="strategy.buffer_size: True is not an integer"):
        load_job_config(p, environ={})
    p.write_text("strategy = 3\n")
    with pytest.raises(ConfigError, match="config.strategy: must be a table"):
        load_job_config(p, environ={})


def test_a_missing_or_invalid_toml_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_job_config(tmp_path / "nope.toml", environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[strategy\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_job_config(bad, environ={})


def test_model_args_accept_json_from_env() -> None:
    cfg = load_job_config(None, environ={"FEDMQ_MODEL_ARGS": '{"hidden": 32}'})
    assert cfg.model.args == {"hidden": 32}


def test_strategy_params_round_trip_through_a_model_version() -> None:
    cfg = StrategyConfig(name=StrategyName.FEDASYNC, robust=Robust.MEDIAN, alpha=0.3)
    params = cfg.to_params()
    assert params["name"] == "fedasync" and params["robust"] == "median"
    assert StrategyConfig.from_params(params) == cfg
    assert cfg.effective_buffer == 1
