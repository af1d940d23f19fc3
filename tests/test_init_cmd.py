"""`fedmq init`: the starter job.toml is loadable, complete and commented; `--check` names the bad
key in one line; and every subcommand's --help shows its defaults and the env names it reads."""

from __future__ import annotations

import argparse
import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from fedmq.cli import build_parser
from fedmq.init_cmd import starter_config
from fedmq.shared.config import SECTIONS, JobConfig, load_job_config
from tests.conftest import ROOT, run_fedmq

pytestmark = pytest.mark.timeout(120)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_starter_loads_to_the_schema_defaults_except_what_init_was_told(tmp_path: Path) -> None:
    out = tmp_path / "job.toml"
    res = run_fedmq("init", "--out", str(out), "--test", "/data/test.npz", timeout=60)
    assert res.returncode == 0, res.stderr
    cfg = load_job_config(out, environ={})
    assert cfg.data.test == "/data/test.npz"
    assert dataclasses.replace(cfg, data=JobConfig().data) == JobConfig()


def test_starter_lists_every_schema_key_with_a_comment_in_its_section() -> None:
    text = starter_config(JobConfig())
    tables = tomllib.loads(text)
    for section, cls in SECTIONS.items():
        assert set(tables[section]) == {f.name for f in dataclasses.fields(cls)}, section
    commented = [ln for ln in text.splitlines() if re.match(r"^\w+ = ", ln)]
    assert all("  # " in ln for ln in commented if not ln.startswith("args = ")), \
        [ln for ln in commented if "  # " not in ln]
    assert 'name = "fedbuff"  # aggregation strategy; one of: fedbuff, fedasync, fedavg' in text
    assert "# env: FEDMQ_STRATEGY_<KEY>" in text


def test_fedavg_starter_is_synchronous_and_valid(tmp_path: Path) -> None:
    out = tmp_path / "fedavg.toml"
    assert run_fedmq("init", "--out", str(out), "--strategy", "fedavg", "--job", "j-1", timeout=60).returncode == 0
    cfg = load_job_config(out, environ={})
    assert (cfg.job, cfg.strategy.name.value, cfg.strategy.max_staleness) == ("j-1", "fedavg", 0)


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    out = tmp_path / "job.toml"
    out.write_text("# mine\n")
    res = run_fedmq("init", "--out", str(out), timeout=60)
    assert res.returncode == 2 and "--force" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert out.read_text() == "# mine\n"
    assert run_fedmq("init", "--out", str(out), "--force", timeout=60).returncode == 0
    load_job_config(out, environ={})


@pytest.mark.parametrize(("body", "key"), [
    ("[strategy]\nbuffer_size = 0\n", "strategy.buffer_size"),
    ("[strategy]\nbufer_size = 3\n", "strategy.bufer_size"),
    ("[coordinator]\nconcurrency = \"many\"\n", "coordinator.concurrency"),
    ("[privacy]\nmechanism = \"laplace\"\n", "privacy.mechanism"),
])
def test_check_names_the_bad_key_in_one_line(tmp_path: Path, body: str, key: str) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(body)
    res = run_fedmq("init", "--check", str(bad), timeout=60)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and key in res.stderr


def test_every_subcommand_option_has_help_and_the_help_shows_defaults() -> None:
    for name, parser in subcommands().items():
        assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter), name
        for action in parser._actions:
            if action.option_strings and action.help != argparse.SUPPRESS:
                assert action.help and action.help.strip(), f"fedmq {name} {action.option_strings[0]} has no help"
    assert "(default: 30)" in subcommands()["worker"].format_help()


def test_every_fedmq_env_var_the_cli_reads_is_named_in_some_help() -> None:
    read = set()
    for path in (ROOT / "fedmq").glob("*.py"):
        read |= set(re.findall(r"""["'](FEDMQ_[A-Z0-9_]+)["']\s*(?:,|\)|not in os\.environ|in os\.environ)""",
                               path.read_text()))
    helps = " ".join(p.format_help() for p in subcommands().values())
    helps = re.sub(r"\s+", " ", helps)
    assert {"FEDMQ_BROKER_URL", "FEDMQ_JOB", "FEDMQ_METRICS_PORT", "FEDMQ_SITE_POOL"} <= read
    assert not {n for n in read if n not in helps}, sorted(n for n in read if n not in helps)


def test_help_masks_the_broker_password_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMQ_BROKER_URL", "amqps://site-7:s3cret-pw@broker.example:5671/%2F")
    text = subcommands()["worker"].format_help()
    assert "s3cret-pw" not in text and "site-7:***@broker.example" in re.sub(r"\s+", "", text)
