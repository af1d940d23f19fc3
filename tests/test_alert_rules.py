"""The Prometheus alert rules in deploy/prometheus: they name only metrics fedmq exports, and
`promtool check rules` / `promtool test rules` accept them (promtool from Debian's prometheus
package, unpacked into a cache without installing or starting the server; skipped where neither
promtool nor apt-get is available)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from fedmq.shared import metrics
from tests.conftest import ROOT

RULES = ROOT / "deploy" / "prometheus" / "fedmq-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "fedmq-rules.test.yml"
CACHE = Path(os.environ.get("FEDMQ_PROMTOOL_CACHE", "/var/cache/fedmq-promtool"))


def _exported() -> set[str]:
    names = set()
    for family in metrics.REGISTRY.collect():
        for sample in family.samples:
            names.add(sample.name)
        names.add(family.name)
        names.add(f"{family.name}_total")  # counters are exposed with the suffix
    return names


def test_every_rule_uses_exported_metrics_and_says_what_to_do() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) >= 5
    exported = _exported()
    for rule in rules:
        used = set(re.findall(r"\bfedmq_[a-z_]+", rule["expr"]))
        assert used and used <= exported, (rule["alert"], used - exported)
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def _promtool() -> str | None:
    found = shutil.which("promtool") or (str(CACHE / "usr/bin/promtool") if (CACHE / "usr/bin/promtool").exists()
                                         else None)
    if found or not shutil.which("apt-get") or os.geteuid() != 0:
        return found
    CACHE.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["apt-get", "download", "prometheus"], cwd=CACHE, check=True, capture_output=True, timeout=300)
        debs = sorted(CACHE.glob("prometheus_*.deb"))
        subprocess.run(["dpkg", "-x", str(debs[-1]), str(CACHE)], check=True, capture_output=True, timeout=120)
        for deb in debs:
            deb.unlink()
    except (subprocess.SubprocessError, IndexError, OSError):
        return None
    return str(CACHE / "usr/bin/promtool") if (CACHE / "usr/bin/promtool").exists() else None


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    promtool = _promtool()
    if promtool is None:
        pytest.skip("promtool is not installed and could not be unpacked from Debian's prometheus package")
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent, capture_output=True,
                          text=True, timeout=60)
    assert test.returncode == 0, test.stdout + test.stderr


DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "fedmq.json"


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def test_the_grafana_dashboard_charts_only_exported_metrics() -> None:
    exprs = _dashboard_exprs()
    assert len(exprs) >= 10
    exported = _exported()
    for expr in exprs:
        used = {m.removesuffix("_bucket") for m in re.findall(r"\bfedmq_[a-z_]+", expr)}
        assert used and used <= exported, (expr, used - exported)
        assert '{job=~"$job"}' in expr  # every panel follows the job picker


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    promtool = _promtool()
    if promtool is None:
        pytest.skip("promtool is not installed and could not be unpacked from Debian's prometheus package")
    records = [{"record": f"fedmq:dashboard_{i}", "expr": e.replace("$job", ".*")}
               for i, e in enumerate(_dashboard_exprs())]
    rules = {"groups": [{"name": "dashboard", "rules": records}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    check = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
