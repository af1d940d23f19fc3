"""The command-line contract (README, `fedmq --help`): bad arguments or config exit 2 with one stderr line; an
unreachable broker exits 3 naming the URL with its password masked. Runs the real entry point."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedmq.shared.datasets import save_site
from tests.brokers import free_port
from tests.conftest import run_fedmq

pytestmark = pytest.mark.timeout(120)

SECRET = "s3cr3t-pw"


def _unreachable() -> str:
    return f"amqp://fedmq:{SECRET}@127.0.0.1:{free_port()}/%2F"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The children inherit our environment: no job, config or broker from the caller's shell."""
    for name in ("FEDMQ_JOB", "FEDMQ_CONFIG", "FEDMQ_BROKER_URL", "FEDMQ_SITE", "FEDMQ_DATA"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def site_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "site.npz"
    rng = np.random.default_rng(0)
    save_site(path, rng.normal(size=(20, 8)).astype(np.float32), rng.integers(0, 3, 20))
    return path


def _one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("fedmq"), stderr
    return lines[0]


@pytest.mark.parametrize("args, words", [
    (["nosuchcommand"], "invalid choice: 'nosuchcommand'"),
    ([], "required"),
    (["worker", "--job", "bad/id", "--site", "s", "--data", "x.npz"], "job id 'bad/id'"),
    (["worker", "--job", "j", "--site", "s"], "--data"),
    (["worker", "--job", "j", "--site", "s", "--data", "/nonexistent/site.npz"], "does not exist"),
    (["worker", "--job", "j", "--site", "s", "--data", "{site}", "--slowdown", "0.5"], "must be in [1, 1000]"),
    (["worker", "--job", "j", "--site", "bad site", "--data", "{site}"], "site name 'bad site'"),
    (["aggregator", "--job", "j", "--heartbeat", "often"], "invalid int value: 'often'"),
    (["aggregator", "--job", "j", "--broker", "notaurl://x"], "must start with amqp:// or amqps://"),
    (["aggregator", "--job", "j", "--broker", "amqp://x:notaport/"], "broker URL amqp://x:notaport/ is not valid"),
    (["coordinator", "--job", "j", "--config", "/nonexistent/job.toml"], "config file /nonexistent/job.toml"),
    (["coordinator", "--job", "j"], "data.test"),
    (["demo", "--sites", "0"], "argument --sites: must be in [1, 10000], got 0"),
    (["demo", "--slow", "9"], "--slow must be between 0 and --sites"),
    (["demo", "--strategy", "fedsgd"], "'fedsgd' is not one of fedasync, fedavg, fedbuff or package.module:callable"),
    (["demo", "--target", "1.5"], "argument --target: must be in [0, 1], got 1.5"),
    (["partition", "--out", "{tmp}", "--sites", "0"], "argument --sites: must be in [1, 10000], got 0"),
])
def test_bad_arguments_exit_2_with_one_line(args: list[str], words: str, site_file: Path, tmp_path: Path) -> None:
    args = [a.replace("{site}", str(site_file)).replace("{tmp}", str(tmp_path)) for a in args]
    proc = run_fedmq(*args, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert words in _one_line(proc.stderr)
    assert proc.stdout == ""


def test_a_bad_env_config_value_exits_2_naming_the_key(site_file: Path) -> None:
    proc = run_fedmq("coordinator", "--job", "j", "--test", str(site_file), "--broker", _unreachable(),
                     timeout=60, FEDMQ_STRATEGY_BUFFER_SIZE="lots")
    assert proc.returncode == 2, proc.stderr
    assert "strategy.buffer_size: 'lots' is not an integer" in _one_line(proc.stderr)


@pytest.mark.parametrize("role", ["aggregator", "worker", "coordinator", "demo"])
def test_an_unreachable_broker_exits_3_with_the_password_masked(role: str, site_file: Path) -> None:
    url = _unreachable()
    extra = {"aggregator": [], "worker": ["--site", "s", "--data", str(site_file)],
             "coordinator": ["--test", str(site_file)], "demo": []}[role]
    # FEDMQ_BROKER_WAIT=0: the roles' start-up wait off, so the refusal is the one stderr line
    proc = run_fedmq(role, "--job", "j", "--broker", url, *extra, timeout=60, FEDMQ_BROKER_WAIT="0")
    assert proc.returncode == 3, proc.stderr
    line = _one_line(proc.stderr)
    assert url.replace(SECRET, "***") in line
    assert SECRET not in proc.stderr + proc.stdout


def test_the_broker_url_may_come_from_the_environment() -> None:
    url = _unreachable()
    proc = run_fedmq("aggregator", "--job", "j", timeout=60, FEDMQ_BROKER_URL=url, FEDMQ_BROKER_WAIT="0")
    assert proc.returncode == 3
    assert url.replace(SECRET, "***") in _one_line(proc.stderr)


def test_help_is_not_an_error() -> None:
    proc = run_fedmq("--help", timeout=60)
    assert proc.returncode == 0 and "demo" in proc.stdout
