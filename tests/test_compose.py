"""docker-compose.yml and Dockerfile, without a Docker engine: static checks, then the compose
services' very commands run as plain processes against the test broker.

What "the same" means here: each service's `command` after the image's `fedmq` entrypoint, with
its `environment` (compose-interpolated with the file's own defaults) and its volumes mapped to
directories of a temp "project": only the broker URL (no `rabbitmq` host outside compose), the job
id, the metrics ports (each container has its own network namespace; processes share one) and a
few FEDMQ_* speed settings differ.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from fedmq.cli import build_parser
from fedmq.shared import metrics
from fedmq.shared.config import env_names
from tests.brokers import free_port
from tests.conftest import ROOT, child_env, run_fedmq

pytestmark = pytest.mark.timeout(120)

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ROLES = {"coordinator", "aggregator", "aggregator-standby", "worker"}
_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)")


# ----------------------------------------------------------------------------- helpers


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default} and $VAR substitution ($$ is a literal $)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value
    parts = value.split("$$")
    return "$".join(_VAR.sub(lambda m: env.get(m.group(1) or m.group(3)) or (m.group(2) or ""), p) for p in parts)


def load_compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), env or {})


def fedmq_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services that run the fedmq image (their entrypoint is `fedmq`)."""
    return {n: s for n, s in compose["services"].items() if "build" in s or "fedmq" in str(s.get("image", ""))}


def subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def cli_env_names() -> set[str]:
    """FEDMQ_* names the subcommands' --help documents as env (the CLI's half of the schema)."""
    text = re.sub(r"\s+", " ", " ".join(p.format_help() for p in subcommands().values()))
    return set(re.findall(r"\b(FEDMQ_[A-Z0-9_]*[A-Z0-9])\b", text)) - {"FEDMQ_SECTION"}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


# ----------------------------------------------------------------------------- compose, static


def test_compose_has_the_broker_coordinator_two_aggregators_and_a_scalable_worker() -> None:
    compose = load_compose()
    services = compose["services"]
    assert ROLES <= set(services)
    rmq = services["rabbitmq"]
    assert "management" in rmq["image"] and rmq["image"].startswith("rabbitmq:3.10")
    assert rmq["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
    for name in ROLES:
        assert services[name]["depends_on"]["rabbitmq"]["condition"] == "service_healthy", name
    assert services["aggregator"]["command"] == services["aggregator-standby"]["command"] == ["aggregator"]
    names = {services[n]["environment"]["FEDMQ_AGGREGATOR_NAME"] for n in ("aggregator", "aggregator-standby")}
    assert len(names) == 2
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker  # both would break --scale
    assert "FEDMQ_SITE" not in worker["environment"] and "FEDMQ_DATA" not in worker["environment"]
    pool = worker["environment"]["FEDMQ_SITE_POOL"]
    assert any(pool.startswith(v.split(":")[1] + "/") for v in worker["volumes"]), "site pool is not mounted"
    assert worker["build"]["target"] == "site" and worker["image"] != services["coordinator"]["image"]


def test_compose_host_ports_images_and_broker_wait_can_be_moved() -> None:
    """A host whose own broker holds 5672/15672, or whose images live in its own registry."""
    env = {"RABBITMQ_PORT": "25672", "RABBITMQ_MANAGEMENT_PORT": "35672", "RABBITMQ_IMAGE": "reg.example/rmq:3.10",
           "FEDMQ_IMAGE": "reg.example/fedmq:1", "FEDMQ_SITE_IMAGE": "reg.example/fedmq-site:1",
           "FEDMQ_BROKER_WAIT": "42"}
    services = load_compose(env)["services"]
    assert services["rabbitmq"]["ports"] == ["25672:5672", "35672:15672"]
    assert services["rabbitmq"]["image"] == "reg.example/rmq:3.10"
    assert services["worker"]["image"] == "reg.example/fedmq-site:1"
    assert {services[n]["image"] for n in ROLES - {"worker"}} == {"reg.example/fedmq:1"}
    assert {services[n]["environment"]["FEDMQ_BROKER_WAIT"] for n in ROLES} == {"42"}
    defaults = load_compose()["services"]
    assert defaults["rabbitmq"]["ports"] == ["5672:5672", "15672:15672"]
    assert int(defaults["worker"]["environment"]["FEDMQ_BROKER_WAIT"]) >= 60  # long enough for a broker to boot


def test_every_service_command_is_a_real_subcommand_whose_help_succeeds(monkeypatch: pytest.MonkeyPatch) -> None:
    services = fedmq_services(load_compose())
    assert ROLES | {"monitor", "report"} <= set(services)
    known = subcommands()
    for name, svc in services.items():
        command = svc["command"]
        assert command[0] in known, f"{name}: `fedmq {command[0]}` is not a subcommand"
        res = run_fedmq(command[0], "--help", timeout=60)
        assert res.returncode == 0 and "usage: fedmq" in res.stdout, (name, res.stderr)
        # the whole command line parses with the service's environment (flags and required values)
        for key, value in svc["environment"].items():
            monkeypatch.setenv(key, str(value))
        try:
            build_parser().parse_args(command)
        except SystemExit as exc:  # argparse's way of refusing
            pytest.fail(f"{name}: `fedmq {' '.join(command)}` does not parse ({exc})")
        for key in svc["environment"]:
            monkeypatch.delenv(key)


def test_every_env_name_exists_in_the_config_schema_or_the_cli() -> None:
    known = set(env_names()) | cli_env_names()
    for name, svc in fedmq_services(load_compose()).items():
        unknown = {k for k in svc["environment"] if k.startswith("FEDMQ_") and k not in known}
        assert not unknown, f"{name}: {sorted(unknown)} are read by nothing"
        assert all(k.startswith("FEDMQ_") or k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
                   for k in svc["environment"]), name


def test_roles_are_configured_only_by_env_and_the_mounted_job_toml() -> None:
    services = load_compose()["services"]
    for name in ROLES:
        assert services[name]["command"] == [services[name]["command"][0]], f"{name} passes flags"
    coord = services["coordinator"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in coord["volumes"]}
    assert coord["environment"]["FEDMQ_CONFIG"] in mounts
    assert mounts[coord["environment"]["FEDMQ_CONFIG"]] == "./job.toml"


# ----------------------------------------------------------------------------- Dockerfile, static


def dockerfile_args() -> dict[str, str]:
    """ARG defaults (the first declaration with a value wins, as for the global ARGs)."""
    out: dict[str, str] = {}
    for w, a in dockerfile_instructions():
        if w == "ARG":
            for item in a.split():
                name, eq, value = item.partition("=")
                if eq and name not in out:
                    out[name] = value.strip('"')
    return out


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (after its FROM)."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for w, a in dockerfile_instructions():
        if w == "FROM":
            current = stages.setdefault(a.split()[-1], [])
        elif current is not None:
            current.append((w, a))
    return stages


def test_dockerfile_is_slim_non_root_healthchecked_with_fedmq_entrypoint() -> None:
    ins = dockerfile_instructions()
    base = next(a for w, a in ins if w == "FROM").split()[0]
    assert base == "${BASE_IMAGE}"
    default = dockerfile_args()["BASE_IMAGE"]
    assert default.startswith("python:3.11") and "slim" in default
    stages = dockerfile_stages()
    assert list(stages)[-1] == "full" and "site" in stages  # `docker build .` gives the full image
    for name in ("site", "full"):  # the images people run: their last USER is the unprivileged one
        user = [a for w, a in stages[name] if w == "USER"][-1]
        assert user == "10001:10001", name
    health = next(a for w, a in ins if w == "HEALTHCHECK")
    cmd = json.loads(health.split("CMD", 1)[1].strip())
    assert cmd[:2] == ["python", "-m"] and cmd[2] == metrics.__name__
    assert json.loads(next(a for w, a in ins if w == "ENTRYPOINT")) == ["fedmq"]


def test_dockerfile_user_and_group_ids_agree_and_own_the_volumes() -> None:
    run = " ".join(a for w, a in dockerfile_instructions() if w == "RUN" and "useradd" in a)
    assert re.search(r"groupadd [^&]*--gid 10001 fedmq", run), run
    assert re.search(r"useradd [^&]*--uid 10001 --gid 10001", run), run
    assert "chown 10001:10001 /out /state" in run


def test_dockerfile_package_sources_are_build_arguments_with_public_defaults() -> None:
    args = dockerfile_args()
    assert args["PIP_INDEX_URL"] == "https://pypi.org/simple"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    text = DOCKERFILE.read_text()
    assert "https://" not in text.split("ARG TORCH_INDEX_URL=")[1].split("\n", 1)[1]  # no URL past the ARGs
    for name, stage in dockerfile_stages().items():  # an ARG's value ends with its stage
        if any(w == "RUN" and "pip install" in a for w, a in stage):
            declared = {n for w, a in stage if w == "ARG" for n in a.split()}
            assert {"PIP_INDEX_URL", "PIP_FIND_LINKS", "PIP_CERT"} <= declared, name


def test_dockerfile_pins_cpu_torch_inside_the_pyproject_range() -> None:
    ins = dockerfile_instructions()
    pinned = dockerfile_args()["TORCH_VERSION"]
    install = next(a for w, a in ins if w == "RUN" and "torch==" in a)
    assert '--index-url "${TORCH_INDEX_URL}"' in install
    assert dockerfile_args()["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_spec = next(d for d in deps if re.match(r"^torch\b", d))
    assert pinned in SpecifierSet(torch_spec[len("torch"):]), (pinned, torch_spec)
    bootstrap = re.search(r"TORCH_VERSION=(\S+)", (ROOT / "scripts" / "bootstrap.sh").read_text())
    assert bootstrap and bootstrap.group(1) == pinned, "image and dev venv would run different torch"


def test_dockerfile_copies_every_package_pip_installs_and_nothing_ignored() -> None:
    ins = dockerfile_instructions()
    copied = {src for w, a in ins if w == "COPY" and "--from=" not in a for src in a.split()[:-1]}
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert include == ["fedmq", "fedmq.*"], include
    # fedmq/<role> are symlinks to the top-level role folders: the image needs those folders too
    links = {p.resolve().relative_to(ROOT).parts[0] for p in (ROOT / "fedmq").iterdir() if p.is_symlink()}
    assert links == {"shared", "coordinator", "worker", "aggregator"}, links
    packages = {"fedmq", *links}
    assert packages <= copied, f"not copied into the image: {sorted(packages - copied)}"
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    assert {".git", ".venv"} <= ignored
    for src in copied:
        assert (ROOT / src).exists(), src
        assert src not in ignored, f"{src} is copied but .dockerignore drops it"


# ----------------------------------------------------------------------------- integration


class Project:
    """A compose project directory outside Docker: bind mounts and named volumes as directories."""

    def __init__(self, root: Path, compose: dict[str, Any]) -> None:
        self.root = root
        self.compose = compose

    def host_path(self, source: str) -> Path:
        if source.startswith(("./", "../", "/")):
            return (self.root / source).resolve()
        return self.root / "volumes" / source  # a named volume

    def mounts(self, svc: dict[str, Any]) -> list[tuple[str, Path]]:
        pairs = [(v.split(":")[1], self.host_path(v.split(":")[0])) for v in svc.get("volumes", [])]
        return sorted(pairs, key=lambda p: -len(p[0]))

    def rewrite(self, value: str, svc: dict[str, Any]) -> str:
        for target, host in self.mounts(svc):
            if value == target or value.startswith(target + "/"):
                return str(host) + value[len(target):]
        return value

    def start(self, name: str, extra_env: dict[str, str], logs: Path,
              command: list[str] | None = None) -> subprocess.Popen[bytes]:
        svc = self.compose["services"][name]
        env = {k: self.rewrite(str(v), svc) for k, v in svc["environment"].items()}
        env.update(extra_env)
        argv = [self.rewrite(a, svc) for a in (command or svc["command"])]
        out = (logs / f"{name}-{len(list(logs.iterdir()))}.log").open("wb")
        return subprocess.Popen([sys.executable, "-m", "fedmq", *argv], stdout=out, stderr=subprocess.STDOUT,
                                env=child_env(**env), cwd=self.root, start_new_session=True)

    def run(self, name: str, extra_env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
        svc = self.compose["services"][name]
        env = {k: self.rewrite(str(v), svc) for k, v in svc["environment"].items()} | extra_env
        argv = [self.rewrite(a, svc) for a in [*svc["command"], *args]]
        return subprocess.run([sys.executable, "-m", "fedmq", *argv], capture_output=True, text=True, timeout=120,
                              env=child_env(**env), cwd=self.root)


def _metrics(port: int) -> dict[str, float]:
    """{name{labels}: value} of a role's /metrics, {} while it does not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = metrics.scrape(f"http://127.0.0.1:{port}/metrics")
    except OSError:
        return {}
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name.startswith("fedmq_")}


def _stop(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    for p in procs.values():
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs.values():
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_compose_commands_run_a_job_outside_containers(broker_url: str, job: str, tmp_path: Path) -> None:
    # the set-up the compose file's header tells operators to do
    assert run_fedmq("init", "--out", str(tmp_path / "job.toml"), "--test", "/data/test.npz").returncode == 0
    part = run_fedmq("partition", "--dataset", "digits", "--sites", "2", "--out", str(tmp_path / "data"))
    assert part.returncode == 0, part.stderr
    project = Project(tmp_path, load_compose({"FEDMQ_JOB": job}))
    logs = tmp_path / "logs"
    logs.mkdir()
    common = {"FEDMQ_BROKER_URL": broker_url}
    # no accuracy target and no version limit in reach: the job runs its 40 s, long enough to watch
    # every role at work (init's 200 versions took 6 s once a task cost 9 ms beyond its compute)
    fast = {"FEDMQ_COORDINATOR_TARGET_ACCURACY": "0", "FEDMQ_COORDINATOR_MAX_SECONDS": "40",
            "FEDMQ_COORDINATOR_MAX_VERSIONS": "10000000",
            "FEDMQ_COORDINATOR_CONCURRENCY": "4", "FEDMQ_STRATEGY_BUFFER_SIZE": "2",
            "FEDMQ_STRATEGY_FLUSH_TIMEOUT": "2", "FEDMQ_TRAINING_LR": "0.1", "FEDMQ_TRAINING_BATCH_SIZE": "16"}
    ports = {n: free_port() for n in ("coordinator", "aggregator", "aggregator-standby", "worker-1", "worker-2")}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        procs["coordinator"] = project.start("coordinator", {**common, **fast,
                                                             "FEDMQ_METRICS_PORT": str(ports["coordinator"])}, logs)
        for name in ("aggregator", "aggregator-standby"):
            procs[name] = project.start(name, {**common, "FEDMQ_METRICS_PORT": str(ports[name])}, logs)
        for i in (1, 2):  # docker compose up --scale worker=2
            procs[f"worker-{i}"] = project.start("worker", {**common, "FEDMQ_METRICS_PORT": str(ports[f"worker-{i}"])},
                                                 logs)
        snap = _watch_running_job(project, common, procs, logs)
        assert snap["queues"]["tasks"]["consumers"] == 2  # both scaled workers
        assert snap["queues"]["updates"]["consumers"] == 1  # single active consumer: the standby waits
        assert snap["active_aggregator"] in {"aggregator-a", "aggregator-b"}
        assert set(snap["sites"]) <= {"site_0", "site_1"}  # each replica claimed its own site file

        # /metrics of the live roles, and the image's health check against them
        worker_port = ports["worker-1"]
        deadline = time.monotonic() + 60
        while not _metrics(worker_port).get("fedmq_training_seconds_count") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _metrics(worker_port)["fedmq_training_seconds_count"] >= 1
        agg = [_metrics(ports[n]) for n in ("aggregator", "aggregator-standby")]
        assert sorted(m.get("fedmq_aggregator_active", 0) for m in agg) == [0, 1]
        assert max(m.get("fedmq_updates_applied_total", 0) for m in agg) >= 1
        assert _metrics(ports["coordinator"])["fedmq_tasks_issued_total"] >= 4
        assert metrics.healthcheck({"FEDMQ_METRICS_PORT": str(worker_port)}) == 0

        assert procs["coordinator"].wait(240) == 0, _tail(logs, "coordinator")
        for name, p in procs.items():
            assert p.wait(60) == 0, f"{name}:\n{_tail(logs, name.split('-')[0])}"
    finally:
        _stop(procs)
    sites = sorted(re.findall(r"site claimed.*?site=(\S+)", "".join(f.read_text() for f in logs.glob("worker-*"))))
    assert sites == ["site_0", "site_1"]
    assert list((tmp_path / "volumes" / "fedmq-out" / "model").glob(f"{job}-v*.pt")), "no exported model"

    done = json.loads(project.run("monitor", common, "--once", "--json").stdout.strip().splitlines()[-1])
    assert done["status"] == "finished" and done["queues"]["tasks"]["exists"] is False
    report = project.run("report", common)
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "volumes" / "fedmq-out" / "report" / "index.html").is_file()


def _watch_running_job(project: Project, env: dict[str, str], procs: dict[str, subprocess.Popen[bytes]],
                       logs: Path) -> dict[str, Any]:
    """`monitor --once --json` until a version beyond v0 is out and every role is consuming."""
    deadline = time.monotonic() + 150
    while True:
        failed = [n for n, p in procs.items() if p.poll() not in (None, 0)]
        assert not failed, f"{failed[0]} exited:\n{_tail(logs, failed[0].split('-')[0])}"
        res = project.run("monitor", env, "--once", "--json")
        if res.returncode == 0:
            snap: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
            q = snap["queues"]
            if (snap["status"] == "running" and (snap["latest_version"] or 0) >= 1 and snap["sites"]
                    and q["tasks"]["consumers"] == 2 and snap["active_aggregator"]):
                return snap
            assert snap["status"] in ("waiting", "running"), f"job ended before every role was seen: {snap}"
        assert time.monotonic() < deadline, f"job never ran with every role: {res.stdout[-2000:]} {res.stderr}"
        time.sleep(1)


def _tail(logs: Path, prefix: str) -> str:
    return "\n".join(f.read_text(errors="replace")[-3000:] for f in sorted(logs.glob(f"{prefix}*.log")))
