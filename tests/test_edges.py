"""Bad input at the edges: every bad flag, config value and data file ends the real `fedmq` process
with exit 2 and one stderr line (no traceback), and nothing out of range is silently accepted.

The CLI cases need no broker: each one fails before a connection is attempted (or points at a
port nobody listens on, which would be exit 3, never 2)."""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from fedmq.shared.broker import Connection, mask_url
from fedmq.shared.config import SECTIONS, In, JobConfig, StrategyConfig, TrainingConfig, load_job_config, range_of
from fedmq.shared.datasets import check_site_data, fit_data, fit_to_model, load_site, save_site
from fedmq.shared.errors import ConfigError
from fedmq.shared.evaluation import TaskKind
from fedmq.shared.models import model_spec
from tests.brokers import free_port
from tests.conftest import run_fedmq

pytestmark = pytest.mark.timeout(300)

SECRET = "s3cr3t-pw"


def fixed_width_model(**_: typing.Any) -> nn.Module:
    """A custom model (package.module:callable) that ignores the data's shape: 5 inputs, 3 classes."""
    return nn.Linear(5, 3)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FEDMQ_JOB", "FEDMQ_CONFIG", "FEDMQ_BROKER_URL", "FEDMQ_SITE", "FEDMQ_DATA"):
        monkeypatch.delenv(name, raising=False)


def _unreachable() -> str:
    return f"amqp://fedmq:{SECRET}@127.0.0.1:{free_port()}/%2F"


def _site(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("edges")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 8)).astype(np.float32), rng.integers(0, 3, 30)
    good = _site(d / "good.npz", x, y)
    body = good.read_bytes()
    (d / "truncated.npz").write_bytes(body[: len(body) // 2])
    (d / "empty.npz").write_bytes(b"")
    (d / "latin1.toml").write_bytes("# caf\xe9\n[strategy]\nbuffer_size = 4\n".encode("latin-1"))
    nan_x = x.copy()
    nan_x[4, 2] = np.nan
    return {
        "good": good, "truncated": d / "truncated.npz", "empty": d / "empty.npz", "latin1": d / "latin1.toml",
        "zero_rows": _site(d / "zero_rows.npz", np.zeros((0, 8), np.float32), np.zeros(0, np.int64)),
        "nan": _site(d / "nan.npz", nan_x, y),
        "label_999": _site(d / "label_999.npz", x, np.where(np.arange(30) == 7, 999, y)),
        "label_neg": _site(d / "label_neg.npz", x, np.where(np.arange(30) == 7, -1, y)),
        "label_float": _site(d / "label_float.npz", x, y + 0.5),
        "wide": _site(d / "wide.npz", rng.normal(size=(30, 9)).astype(np.float32), y),
        "dir": d,
    }


def _toml(dir_: Path, name: str, body: str, test: Path) -> Path:
    path = dir_ / name
    path.write_text(f'data = {{ test = "{test}" }}\n{body}')
    return path


def _one_error_line(proc: typing.Any) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fedmq"), proc.stderr
    return lines[0]


WORKER = ["worker", "--job", "j", "--site", "s"]


@pytest.mark.parametrize("args, words", [
    (["aggregator", "--job", "j", "--heartbeat", "-1"], "argument --heartbeat: must be in [1, 3600], got -1"),
    (["aggregator", "--job", "j", "--heartbeat", "0"], "argument --heartbeat: must be in [1, 3600], got 0"),
    (["aggregator", "--job", "j", "--metrics-port", "70000"], "argument --metrics-port: must be in [0, 65535]"),
    ([*WORKER, "--data", "{good}", "--heartbeat", "-5"], "argument --heartbeat"),
    ([*WORKER, "--data", "{good}", "--max-tasks", "-1"], "argument --max-tasks: must be in [0, "),
    ([*WORKER, "--data", "{good}", "--wait", "nan"], "argument --wait: invalid float value: 'nan'"),
    ([*WORKER, "--data", "{good}", "--min-task-seconds", "-1"], "argument --min-task-seconds"),
    ([*WORKER, "--data", "{good}", "--epsilon-budget", "-1"], "argument --epsilon-budget: must be in [0, 1000]"),
    (["demo", "--max-seconds", "-5"], "argument --max-seconds: must be in (0, 315360000], got -5.0"),
    (["demo", "--epochs", "2.5"], "argument --epochs: invalid int value: '2.5'"),
    (["demo", "--lr", "inf"], "argument --lr: invalid float value: 'inf'"),
    (["partition", "--out", "{dir}/p", "--test-fraction", "1"], "argument --test-fraction: must be in (0, 1)"),
    (["partition", "--out", "{dir}/p", "--seed", "-1"], "argument --seed: must be in [0, 4294967295]"),
    (["keyholder", "--job", "j", "--secret", "x", "--heartbeat", "0"], "argument --heartbeat"),
])
def test_numeric_flags_out_of_range_exit_2(args: list[str], words: str, files: dict[str, Path]) -> None:
    args = [a.format(**files) for a in args]
    assert words in _one_error_line(run_fedmq(*args, timeout=60))


def test_a_bad_env_number_is_a_usage_error_not_a_traceback(files: dict[str, Path]) -> None:
    proc = run_fedmq(*WORKER, "--data", str(files["good"]), timeout=60, FEDMQ_SITE_EPSILON_BUDGET="lots")
    assert "argument --epsilon-budget: invalid float value: 'lots'" in _one_error_line(proc)


@pytest.mark.parametrize("url, shown", [
    (f"amqp://guest:{SECRET}@[::1:5672/%2F", "Invalid IPv6 URL"),
    ("amqp://[zz]/", "does not appear to be an IPv4 or IPv6 address"),
    (f"amqp://guest:{SECRET}@host:99999/%2F", "Port out of range"),
])
def test_an_unparsable_broker_url_exits_2_with_the_password_masked(url: str, shown: str) -> None:
    line = _one_error_line(run_fedmq("aggregator", "--job", "j", "--broker", url, timeout=60))
    assert "is not valid" in line and shown in line
    assert SECRET not in line


@pytest.mark.parametrize("url", [
    "amqp://guest:guest@[::1:5672/%2F", "amqp://[zz]/", "amqp://u:p@h:notaport/", "", "://", "amqp://@",
    "amqp://a:b@[", "amqp://:@", "not a url", "amqp://u:pw@h/v?q=1#f",
])
def test_mask_url_never_raises_and_never_shows_the_password(url: str) -> None:
    masked = mask_url(url)
    assert isinstance(masked, str)
    if ":p@" in url or ":pw@" in url or "guest:guest@" in url:
        assert ":***@" in masked


def test_connection_refuses_a_bad_heartbeat_as_a_config_error() -> None:
    with pytest.raises(ConfigError, match="heartbeat"):
        Connection("amqp://guest:guest@127.0.0.1:5672/%2F", heartbeat=-1)


# ---------------------------------------------------------------------------- config files


@pytest.mark.parametrize("body, words", [
    ("[coordinator]\nmax_seconds = inf\n", "coordinator.max_seconds: must be a finite number, got inf"),
    ("[coordinator]\nmax_seconds = -5.0\n", "coordinator.max_seconds: must be in (0, 315360000]"),
    ("[strategy]\nbuffer_size = 12345678901234567890\n", "strategy.buffer_size: must be in [1, 10000]"),
    ("[strategy]\nbuffer_size = 4.0\n", "strategy.buffer_size: 4.0 is not an integer"),
    ("[training]\nlr = nan\n", "training.lr: must be a finite number, got nan"),
    ("[privacy]\nepsilon = nan\n", "privacy.epsilon: must be a finite number"),
    ("[model]\nargs = { hidden = nan }\n", "model.args.hidden: must be a finite number"),
    ("[model]\nargs = { num_classes = 3 }\n", "model.args.num_classes: is derived from the data"),
    ("[retention]\nmax_age = \"thirty days\"\n", "retention.max_age"),
    ("seed = -1\n", "config.seed: must be in [0, 4294967295], got -1"),
])
def test_coordinator_refuses_bad_config_values(body: str, words: str, files: dict[str, Path], tmp_path: Path) -> None:
    cfg = _toml(tmp_path, "job.toml", body, files["good"])
    proc = run_fedmq("coordinator", "--job", "j", "--config", str(cfg), "--broker", _unreachable(), timeout=60)
    assert words in _one_error_line(proc)


def test_a_non_utf8_config_file_exits_2(files: dict[str, Path]) -> None:
    latin1 = str(files["latin1"])
    for cmd in (["coordinator", "--job", "j", "--config", latin1], ["init", "--check", latin1]):
        assert "is not UTF-8 text (byte 0xe9" in _one_error_line(run_fedmq(*cmd, timeout=60))


@pytest.mark.parametrize("env, words", [
    ({"FEDMQ_COORDINATOR_MAX_SECONDS": "inf"}, "coordinator.max_seconds: must be a finite number"),
    ({"FEDMQ_TRAINING_EPOCHS": "true"}, "training.epochs: 'true' is not an integer"),
    ({"FEDMQ_TRAINING_EPOCHS": "1e3"}, "training.epochs: '1e3' is not an integer"),
    ({"FEDMQ_STRATEGY_SERVER_LR": "NaN"}, "strategy.server_lr: must be a finite number"),
    ({"FEDMQ_MODEL_ARGS": '{"hidden": Infinity}'}, "model.args.hidden: must be a finite number"),
    ({"FEDMQ_COORDINATOR_CONCURRENCY": "99999999"}, "coordinator.concurrency: must be in [1, 10000]"),
])
def test_bad_env_values_are_refused(env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_job_config(None, environ=env)
    assert words in str(err.value)


def test_a_bool_or_float_is_not_an_int_and_ranges_hold_however_a_section_is_built() -> None:
    with pytest.raises(ConfigError, match=r"strategy.buffer_size: True is not an integer"):
        StrategyConfig(buffer_size=True)
    with pytest.raises(ConfigError, match=r"training.epochs: 2.0 is not an integer"):
        TrainingConfig(epochs=2.0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"strategy.flush_timeout: must be a finite number"):
        StrategyConfig.from_params({**StrategyConfig().to_params(), "flush_timeout": float("inf")})
    assert StrategyConfig(flush_timeout=5).flush_timeout == 5  # an int is a fine float


def test_every_numeric_config_key_declares_a_bounded_range() -> None:
    for cls in [JobConfig, *SECTIONS.values()]:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] in (int, float):
                kind, interval = range_of(cls, f.name)
                assert kind is hints[f.name], f"{cls.__name__}.{f.name}"
                assert math.isfinite(interval.lo) and math.isfinite(interval.hi), f"{cls.__name__}.{f.name}"
                assert getattr(cls(), f.name) in interval, f"{cls.__name__}.{f.name} default is out of range"


def test_intervals_read_like_maths() -> None:
    half_open = In("(0, 1]")
    assert 1 in half_open and 0 not in half_open and float("nan") not in half_open
    assert str(In("[1, 10_000]")) == "[1, 10000]"
    assert In("[0, 0.5)").violation(0.5) == "must be in [0, 0.5), got 0.5"
    with pytest.raises(ValueError):
        In("0..1")


# ---------------------------------------------------------------------------- data files


@pytest.mark.parametrize("name, words", [
    ("truncated", "empty, truncated or corrupt"),
    ("empty", "empty, truncated or corrupt"),
    ("zero_rows", "needs at least one row with features"),
    ("nan", "1 rows have NaN or infinite features (first: row 4)"),
])
def test_worker_refuses_a_bad_site_file(name: str, words: str, files: dict[str, Path]) -> None:
    proc = run_fedmq(*WORKER, "--data", str(files[name]), "--broker", _unreachable(), timeout=60)
    line = _one_error_line(proc)
    assert words in line and str(files[name]) in line


@pytest.mark.parametrize("name, words", [
    ("label_neg", "label -1 (row 7) is not a class index"),
    ("label_float", "is not a class index"),
])
def test_labels_a_classifier_cannot_take_are_refused_once_the_model_says_classifier(
        name: str, words: str, files: dict[str, Path]) -> None:
    """A site learns whether the job classifies or regresses from the job's model (its first
    task): until then real-valued targets are a regression job's data; then they are refused."""
    x, y = load_site(files[name], task=None)
    assert y.dtype == np.float32
    with pytest.raises(ConfigError, match=re.escape(words)):
        fit_data(x, y, model_spec("mlp", (8,), 3), source=f"data file {files[name]}")
    fit_data(x, y, model_spec("mlp", (8,), 1, TaskKind.REGRESSION), source="regression")  # fine as targets


def test_check_site_data_refuses_what_no_model_can_learn() -> None:
    x, y = np.ones((4, 3), np.float32), np.array([0, 1, 2, 1])
    with pytest.raises(ConfigError, match="site: labels must be one class index per row.*one-hot"):
        check_site_data(x, np.eye(4), source="site")
    with pytest.raises(ConfigError, match="4 inputs but 3 labels"):
        check_site_data(x, y[:3], source="site")
    with pytest.raises(ConfigError, match="needs at least one row with features"):
        check_site_data(np.ones((4, 0)), y, source="site")
    with pytest.raises(ConfigError, match="NaN or infinite"):
        check_site_data(np.full((4, 3), 1e39), y, source="site")  # overflows float32
    with pytest.raises(ConfigError, match="features must be numbers"):
        check_site_data(np.array([["a"]] * 4), y, source="site")
    with pytest.raises(ConfigError, match=r"label 2 \(row 2\) is outside the model's 2 classes \(0-1\)"):
        check_site_data(x, y, num_classes=2, source="site")
    with pytest.raises(ConfigError, match=r"3 features per row but the model takes 4 \(input shape \[2, 2\]\)"):
        check_site_data(x, y, input_shape=(2, 2), source="site")
    gx, gy = check_site_data(np.ones((4, 4)), y, input_shape=(1, 2, 2), num_classes=3, source="site")
    assert gx.shape == (4, 1, 2, 2) and gx.dtype == np.float32 and gy.dtype == np.int64


def test_fit_to_model_checks_against_a_model_spec_and_shapes_x() -> None:
    spec = model_spec("cnn", (1, 2, 2), 3)
    x, y = np.ones((4, 4), np.float32), np.array([0, 1, 2, 1])
    assert fit_to_model(x, y, spec, source="site").shape == (4, 1, 2, 2)
    with pytest.raises(ConfigError, match="outside the model's 2 classes"):
        fit_to_model(x, y, model_spec("mlp", (4,), 2), source="site")
    with pytest.raises(ConfigError, match="4 features per row but the model takes 64"):
        fit_to_model(x, y, model_spec("mlp", (64,), 3), source="site")


def test_a_headerless_csv_keeps_its_first_row(tmp_path: Path) -> None:
    path = tmp_path / "raw.csv"
    path.write_text("1,0.5,2\n0,1.5,-3\n2,0,0\n")
    x, y = load_site(path)
    assert y.tolist() == [1, 0, 2] and x.shape == (3, 2) and x[0].tolist() == [0.5, 2.0]
    with_header = tmp_path / "header.csv"
    save_site(with_header, x, y)
    hx, hy = load_site(with_header)
    assert hy.tolist() == [1, 0, 2] and np.array_equal(hx, x)


@pytest.mark.parametrize("text, words", [
    ("", "needs at least one row"),
    ("label,f0\n", "needs at least one row"),
    ("label,f0\n1,2\n1,2,3\n", "row 2 has 3 columns, the first has 2"),
    ("label,f0\n1.5,2\n", "label 1.5 (row 0) is not a class index"),
    ("label,f0\n1,abc\n", "is not a fedmq NPZ"),
])
def test_bad_csv_files_are_config_errors_naming_the_file(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "site.csv"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_site(path)
    assert words in str(err.value) and str(path) in str(err.value)


def test_a_non_utf8_csv_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "site.csv"
    path.write_bytes(b"label,f\xe9\n1,2\n")
    with pytest.raises(ConfigError, match="is not a fedmq NPZ"):
        load_site(path)


# ---------------------------------------------------------------------------- init --check


@pytest.mark.parametrize("body, test, extra, words", [
    ("", "missing.npz", [], "missing.npz does not exist"),
    ("", "truncated", [], "empty, truncated or corrupt"),
    ("[model]\nname = \"nosuch_pkg.mod:build\"\n", "good", [], "cannot be imported on this machine"),
    ("[model]\nname = \"tests.test_edges:fixed_width_model\"\n", "good", [], "does not fit the model"),
    ("[model]\nname = \"mlp\"\nargs = { hidden = -3 }\n", "good", [], "cannot be built with args"),
    ("", "good", ["--data", "{label_999}"], "label 999 (row 7) is outside the model's 3 classes (0-2)"),
    ("", "good", ["--data", "{wide}"], "9 features per row but the model takes 8"),
    ("", "good", ["--data", "{nan}"], "NaN or infinite features"),
    ("[signing]\nregistry = \"/nonexistent/registry.json\"\n", "good", [], "site registry /nonexistent/registry.json"),
])
def test_init_check_refuses_what_the_job_would_fail_on(body: str, test: str, extra: list[str], words: str,
                                                      files: dict[str, Path], tmp_path: Path) -> None:
    test_file = files.get(test, tmp_path / test)
    cfg = _toml(tmp_path, "job.toml", body, test_file)
    proc = run_fedmq("init", "--check", str(cfg), *[a.format(**files) for a in extra], timeout=120)
    assert words in _one_error_line(proc)


def test_init_check_passes_a_job_whose_data_fits_its_model(files: dict[str, Path], tmp_path: Path) -> None:
    cfg = _toml(tmp_path, "job.toml", "", files["good"])
    proc = run_fedmq("init", "--check", str(cfg), "--data", str(files["good"]), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout and "[8] -> 3 classes" in proc.stdout and "30 rows" in proc.stdout


def test_coordinator_refuses_test_data_its_model_cannot_take(files: dict[str, Path], tmp_path: Path) -> None:
    cfg = _toml(tmp_path, "job.toml", "[model]\nname = \"tests.test_edges:fixed_width_model\"\n", files["good"])
    proc = run_fedmq("coordinator", "--job", "j", "--config", str(cfg), "--broker", _unreachable(), timeout=120)
    assert "does not fit the model" in _one_error_line(proc)
