"""The real thing: the images built, docker-compose.yml run with podman, a job to its target.

Where podman can run containers (installed first when running as root on Debian, as
scripts/container-base.sh does; skipped with one line elsewhere): builds both images of the
Dockerfile on a local Debian base (no registry needed), starts the compose file with the broker
(a local RabbitMQ 3.10 image, host ports remapped away from this machine's own 5672/15672), three
worker replicas, the coordinator and both aggregators; runs `monitor --once --json` and `report`
as the compose file's header documents; kills the active aggregator's container mid-job (the
standby must take over and the job still reach its target); copies the results out of the named
volume; then removes every container, network, volume and image of its own.

Kept between runs, outside the checkout (the cache; FEDMQ_CONTAINER_CACHE=0 removes it too):
the two base images (scripts/container-base.sh: debootstrap checks Debian's signatures), a wheel
directory the host's pip filled (/var/cache/fedmq-containers/wheels, so builds need no network),
and one tagged image of the Dockerfile's dependency stages, so a second run rebuilds only the
layers holding fedmq's code.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fedmq.monitor import Monitor
from fedmq.shared.broker import JobNames, read_stream
from fedmq.shared.errors import FedmqError
from fedmq.shared.messages import Update
from tests.brokers import free_port
from tests.conftest import ROOT, run_fedmq

pytestmark = [pytest.mark.slow, pytest.mark.containers, pytest.mark.timeout(1500)]

CACHE = Path(os.environ.get("FEDMQ_CONTAINER_CACHE_DIR", "/var/cache/fedmq-containers"))
WHEELS = CACHE / "wheels"
COMPOSE_BIN = CACHE / "podman-compose" / "bin" / "podman-compose"
PYTHON_BASE = "localhost/fedmq-base/python:bookworm"
RABBITMQ_BASE = "localhost/fedmq-base/rabbitmq:bookworm"
DEPS_CACHE = "localhost/fedmq-cache/deps"
TARGET = 0.85
SITES = 3


def _run(cmd: list[str], timeout: float = 600, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _podman_or_skip() -> None:
    """podman that can run a container here, installed when we are root on Debian."""
    if platform.system() != "Linux":
        pytest.skip("containers: podman runs Linux containers on Linux only")
    root_debian = os.geteuid() == 0 and Path("/etc/debian_version").exists()
    if shutil.which("podman") is None and not root_debian:
        pytest.skip("containers: podman is not installed (and not root on Debian to install it)")
    if root_debian:
        setup = _run(["bash", str(ROOT / "scripts" / "container-base.sh"), "setup"], timeout=600, check=False)
        if setup.returncode != 0:
            pytest.skip(f"containers: podman setup failed: {setup.stderr.strip().splitlines()[-1:]}")
    if shutil.which("podman") is None or not COMPOSE_BIN.exists():
        pytest.skip("containers: podman or podman-compose missing (scripts/container-base.sh setup)")
    info = _run(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"], timeout=60, check=False)
    if info.returncode != 0:
        pytest.skip(f"containers: podman cannot run here: {(info.stderr.strip().splitlines() or ['?'])[-1]}")


def _dependencies() -> list[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch = re.search(r"^ARG TORCH_VERSION=(\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert torch, "Dockerfile pins no TORCH_VERSION"
    return [*pyproject["project"]["dependencies"], f"torch=={torch.group(1)}", "setuptools>=68"]


def _fill_wheels() -> None:
    """Every wheel the image installs, fetched once by the host's pip (its index, proxy, CA)."""
    deps = _dependencies()
    stamp = WHEELS / f".complete-{hashlib.sha256(json.dumps(deps).encode()).hexdigest()[:16]}"
    if stamp.exists():
        return
    WHEELS.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary", ":all:", "-d", str(WHEELS), *deps],
         timeout=900)
    stamp.touch()


def _deps_key() -> str:
    """What the dependency stages are built from: the Dockerfile and pyproject.toml."""
    h = hashlib.sha256()
    for name in ("Dockerfile", "pyproject.toml"):
        h.update((ROOT / name).read_bytes())
    return h.hexdigest()[:16]


@dataclass
class Stack:
    """One compose project of the test's own: its name labels everything podman-compose creates."""

    project: str
    workdir: Path
    env: dict[str, str]
    images: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    last: dict[str, Any] = field(default_factory=dict)  # the newest snapshot, for failure messages
    #: image ids before the test, and the ones kept afterwards as the cache (the deps image's chain)
    images_before: set[str] = field(default_factory=lambda: _image_ids())
    keep: set[str] = field(default_factory=set)

    @property
    def amqp_url(self) -> str:
        return f"amqp://fedmq:fedmq@127.0.0.1:{self.env['RABBITMQ_PORT']}/%2F"

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run([str(COMPOSE_BIN), "-p", self.project, "-f", str(self.workdir / "docker-compose.yml"), *args],
                    timeout=timeout, check=check, cwd=self.workdir, env={**os.environ, **self.env})

    def run_tool(self, service: str, *args: str, tries: int = 3, timeout: float = 180
                 ) -> subprocess.CompletedProcess[str]:
        """`compose run --rm` of a tools-profile service. A fresh container's first DNS lookup can
        fail with EAI_AGAIN while podman's resolver attaches it to the network (CI saw
        `gaierror(-3, 'Temporary failure in name resolution')` once): that, and only that, is
        tried again."""
        for attempt in range(tries):
            res = self.compose("--profile", "tools", "run", "--rm", service, *args, timeout=timeout, check=False)
            if res.returncode == 0 or "Temporary failure in name resolution" not in res.stdout + res.stderr \
                    or attempt == tries - 1:
                break
        assert res.returncode == 0, f"{service} {' '.join(args)} -> {res.returncode}\n{res.stdout[-3000:]}\n" \
                                    f"{res.stderr[-3000:]}"
        return res

    def container(self, service: str, index: int = 1) -> str:
        return f"{self.project}_{service}_{index}"

    def snapshot(self) -> dict[str, Any] | None:
        """What `monitor --once --json` prints, read in this process through the remapped port: a
        poll takes a second (a container or a fresh process takes several). Events are read until
        the stream is quiet for 0.3 s (monitor's own --once default) or for at most 5 s."""
        try:
            with Monitor(self.amqp_url, self.env["FEDMQ_JOB"]) as mon:
                self.last = mon.snapshot(idle=0.3, budget=5).to_dict()
        except FedmqError as exc:
            self.last = {"error": str(exc)}  # the broker still booting, or the job not created yet
            return None
        return self.last

    def leftovers(self) -> list[str]:
        label = f"label=io.podman.compose.project={self.project}"
        out = []
        for kind in (["ps", "-a"], ["volume", "ls"], ["network", "ls"]):
            res = _run(["podman", *kind, "--filter", label, "--format", "{{.Names}}" if kind[0] == "ps" else
                        "{{.Name}}"], check=False, timeout=60)
            out += [f"{kind[0]}:{n}" for n in res.stdout.split()]
        for image in self.images:
            if _run(["podman", "image", "exists", image], check=False, timeout=60).returncode == 0:
                out.append(f"image:{image}")
        out += [f"intermediate image:{i[:12]}" for i in _image_ids() - self.images_before - self.keep]
        return out

    def teardown(self) -> None:
        self.compose("down", "-v", "-t", "5", timeout=300, check=False)
        label = f"label=io.podman.compose.project={self.project}"
        for kind, rm in ((["ps", "-a", "-q"], ["rm", "-f"]), (["volume", "ls", "-q"], ["volume", "rm", "-f"]),
                         (["network", "ls", "-q"], ["network", "rm", "-f"])):
            ids = _run(["podman", *kind, "--filter", label], check=False, timeout=60).stdout.split()
            if ids:
                _run(["podman", *rm, *ids], check=False, timeout=120)
        if self.images:
            _run(["podman", "rmi", "-f", *self.images], check=False, timeout=300)
        # the builds' intermediate images (podman keeps one per step): all but the cache's chain,
        # children before parents (a parent with children cannot be removed)
        for _ in range(50):
            extra = _image_ids() - self.images_before - self.keep
            if not extra:
                break
            parents = {_parent(i) for i in extra}
            _run(["podman", "rmi", *(extra - parents or extra)], check=False, timeout=300)


def _image_ids() -> set[str]:
    """Full image ids, written as `{{.Id}}` and `{{.Parent}}` write them (no "sha256:")."""
    out = _run(["podman", "images", "-a", "--format", "{{.ID}}", "--no-trunc"], check=False, timeout=60).stdout
    return {i.removeprefix("sha256:") for i in out.split()}


def _parent(image: str) -> str:
    res = _run(["podman", "image", "inspect", "--format", "{{.Parent}}", image], check=False, timeout=60)
    return res.stdout.strip()


def _chain(image: str) -> set[str]:
    """An image and its parents up the build: the entries podman's layer cache looks up."""
    out: set[str] = set()
    res = _run(["podman", "image", "inspect", "--format", "{{.Id}}", image], check=False, timeout=60)
    current = res.stdout.strip() if res.returncode == 0 else ""
    while current and current not in out:
        out.add(current)
        current = _parent(current)
    return out


def _build(stack: Stack) -> None:
    """Both images from the unchanged Dockerfile; only the build arguments point at local sources."""
    args = ["podman", "build", "--format", "docker",  # docker format keeps HEALTHCHECK
            "--build-arg", f"BASE_IMAGE={PYTHON_BASE}", "--build-arg", "PIP_INDEX_URL=file:///wheels",
            "--build-arg", "TORCH_INDEX_URL=file:///wheels", "--build-arg", "PIP_FIND_LINKS=/wheels",
            "--build-arg", "PIP_RETRIES=0", "-v", f"{WHEELS}:/wheels:ro"]
    deps = f"{DEPS_CACHE}:{_deps_key()}"
    started = time.monotonic()
    _run([*args, "--target", "tools-deps", "-t", deps, str(ROOT)], timeout=1200)
    stack.timings["build_deps"] = time.monotonic() - started
    if os.environ.get("FEDMQ_CONTAINER_CACHE") != "0":
        stack.keep = _chain(deps) | _chain(PYTHON_BASE) | _chain(RABBITMQ_BASE)
    for old in _run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}", DEPS_CACHE],
                    check=False).stdout.split():
        if old != deps:  # an older key: its layers are no use any more
            _run(["podman", "rmi", old], check=False)
    started = time.monotonic()
    for target, name in (("site", stack.env["FEDMQ_SITE_IMAGE"]), ("full", stack.env["FEDMQ_IMAGE"])):
        stack.images.append(name)
        _run([*args, "--target", target, "-t", name, str(ROOT)], timeout=1200)
    stack.timings["build_images"] = time.monotonic() - started


#: a site operator's trainer, for the image docs/tutorial.md ("In containers") derives from the site image:
#: the bundled loop, plus a metric that says whose code trained the update; each task takes 1 s (a real
#: site's compute), so the job is still running when the test kills its active aggregator
SITE_CODE = """
import time

from fedmq.site import TrainResult, sgd_trainer


def train(ctx):
    time.sleep(1.0)
    r = sgd_trainer(ctx)
    return TrainResult(delta=r.delta, num_samples=r.num_samples, metrics={**r.metrics, "trainer": "site-code"})
"""


def _derive_site_image(stack: Stack) -> None:
    """docs/tutorial.md's Dockerfile, verbatim but for the base tag; the workers then run it with
    FEDMQ_TRAINER naming the code, as the tutorial's compose line does."""
    build = stack.workdir / "site-code"
    build.mkdir()
    (build / "mytrain.py").write_text(SITE_CODE)
    (build / "myeval.py").write_text("from fedmq.site import default_evaluator as evaluate\n")
    (build / "Dockerfile").write_text(f"FROM {stack.env['FEDMQ_SITE_IMAGE']}\n"
                                      "COPY mytrain.py myeval.py /opt/site-code/\n"
                                      "ENV PYTHONPATH=/opt/site-code\n")
    derived = stack.env["FEDMQ_SITE_IMAGE"].replace("fedmq-site:", "my-site:")
    stack.images.append(derived)
    _run(["podman", "build", "--format", "docker", "-t", derived, str(build)], timeout=300)
    stack.env.update(FEDMQ_SITE_IMAGE=derived, FEDMQ_TRAINER="mytrain:train", FEDMQ_EVALUATOR="myeval:evaluate")


def _trainers(url: str, job: str) -> set[str]:
    """The `trainer` metric of every update in the job's updates log."""
    out = set()
    for d in read_stream(url, JobNames(job).updates_log, "first"):
        out.add(str(Update.decode(d.body).metrics.get("trainer", "bundled")))
    return out


def _size_mb(image: str) -> float:
    return int(_run(["podman", "image", "inspect", "--format", "{{.Size}}", image]).stdout.strip()) / 1e6


def _project_dir() -> Path:
    """Bind mounts must be readable by uid 10001: pytest's own temp dirs are private (0700)."""
    workdir = Path(tempfile.mkdtemp(prefix="fedmq-compose-", dir="/var/tmp"))
    workdir.chmod(0o755)
    shutil.copy(ROOT / "docker-compose.yml", workdir / "docker-compose.yml")
    assert run_fedmq("init", "--out", str(workdir / "job.toml"), "--test", "/data/test.npz").returncode == 0
    toml = (workdir / "job.toml").read_text()
    # what an operator edits after `fedmq init`: a target, and a pace a 2-core CI machine keeps
    for key, value in (("target_accuracy", str(TARGET)), ("max_seconds", "240.0"), ("buffer_size", "2"),
                       ("flush_timeout", "2.0"), ("concurrency", "6")):
        toml, n = re.subn(rf"^{key} = \S+", f"{key} = {value}", toml, count=1, flags=re.M)
        assert n == 1, key
    (workdir / "job.toml").write_text(toml)
    part = run_fedmq("partition", "--dataset", "digits", "--sites", str(SITES), "--scheme", "iid",
                     "--out", str(workdir / "data"))
    assert part.returncode == 0, part.stderr
    for path in [workdir / "data", *(workdir / "data").iterdir(), workdir / "job.toml"]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return workdir


@pytest.fixture()
def stack() -> Iterator[Stack]:
    _podman_or_skip()
    tag = f"{os.getpid()}-{int(time.time())}"
    project = f"fedmqtest{tag.replace('-', '')}"
    workdir = _project_dir()
    env = {"FEDMQ_JOB": f"ct-{tag}", "RABBITMQ_IMAGE": RABBITMQ_BASE,
           "RABBITMQ_PORT": str(free_port()), "RABBITMQ_MANAGEMENT_PORT": str(free_port()),
           "FEDMQ_IMAGE": f"localhost/fedmq-test/fedmq:{tag}",
           "FEDMQ_SITE_IMAGE": f"localhost/fedmq-test/fedmq-site:{tag}"}
    st = Stack(project, workdir, env)
    try:
        yield st
    finally:
        st.teardown()
        shutil.rmtree(workdir, ignore_errors=True)
        if os.environ.get("FEDMQ_CONTAINER_CACHE") == "0":
            _run(["bash", str(ROOT / "scripts" / "container-base.sh"), "remove"], check=False)
            for old in _run(["podman", "images", "-q", DEPS_CACHE], check=False).stdout.split():
                _run(["podman", "rmi", "-f", old], check=False)
            shutil.rmtree(WHEELS, ignore_errors=True)
        left = st.leftovers()
        print(f"containers: timings {json.dumps({k: round(v, 1) for k, v in st.timings.items()})}")
        assert not left, f"left behind: {left}"


def _wait(what: str, timeout: float, probe: Any, stack: Stack) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            brief = {k: stack.last.get(k) for k in ("error", "status", "stop_reason", "latest_version",
                                                     "active_aggregator", "queues")}
            raise AssertionError(f"{what}: not within {timeout}s; last snapshot {brief}")
        time.sleep(1)


def test_compose_stack_runs_a_job_to_its_target_through_an_aggregator_kill(stack: Stack) -> None:
    t0 = time.monotonic()
    started = time.monotonic()
    _run(["bash", str(ROOT / "scripts" / "container-base.sh"), "base"], timeout=1200)
    _fill_wheels()
    stack.timings["bases"] = time.monotonic() - started
    _build(stack)
    site, full = stack.env["FEDMQ_SITE_IMAGE"], stack.env["FEDMQ_IMAGE"]
    sizes = {name: round(_size_mb(name)) for name in (site, full)}
    print(f"containers: image sizes MB {sizes}")
    assert sizes[site] < sizes[full]

    # the image's user and its volumes: 10001:10001 with a real group entry, /out and /state its own
    # (and the site image really has no plotting stack, but the metrics federated evaluation computes)
    ids = _run(["podman", "run", "--rm", "--entrypoint", "sh", site, "-c",
                "id; stat -c '%n %u:%g' /out /state; touch /out/x /state/x; "
                "python -c 'import matplotlib' 2>/dev/null && echo plotting || echo no-plotting; "
                "python -c 'import sklearn.metrics' && echo site-metrics"]).stdout
    assert "uid=10001(fedmq) gid=10001(fedmq)" in ids and "/out 10001:10001" in ids and "/state 10001:10001" in ids
    assert "no-plotting" in ids and "site-metrics" in ids, ids  # federated AUC/F1/R2 need scikit-learn
    health = _run(["podman", "image", "inspect", "--format", "{{json .Config.Healthcheck}}", site]).stdout
    assert "fedmq.shared.metrics" in health, health
    _derive_site_image(stack)  # the workers run site code of their own, as docs/tutorial.md shows

    # up: broker and roles at once (podman-compose ignores `condition: service_healthy`: the
    # roles wait for the broker themselves)
    started = time.monotonic()
    stack.compose("up", "-d", "--no-build", "--scale", f"worker={SITES}", timeout=300)
    snap = _wait("every role at work", 180, lambda: (
        (s := stack.snapshot()) and s["status"] == "running" and (s["latest_version"] or 0) >= 1
        and s["queues"]["tasks"]["consumers"] == SITES and s["active_aggregator"] and s), stack)
    stack.timings["up_to_first_version"] = time.monotonic() - started
    # the images' HEALTHCHECK, run by hand (periodic checks need systemd): a role's /metrics, the broker
    for container in (stack.container("worker"), stack.container("rabbitmq")):
        assert _run(["podman", "healthcheck", "run", container], check=False, timeout=120).returncode == 0, container

    # kill the active aggregator's container mid-job: the standby takes over
    active = snap["active_aggregator"]
    service = {"aggregator-a": "aggregator", "aggregator-b": "aggregator-standby"}[active]
    killed_at = snap["latest_version"]
    _run(["podman", "kill", stack.container(service)])
    after = _wait("the standby's takeover", 120, lambda: (
        (s := stack.snapshot()) and s["active_aggregator"] not in (None, active)
        and (s["latest_version"] or 0) > killed_at and s), stack)
    state = _run(["podman", "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", stack.container(service)])
    assert state.stdout.split() == ["exited", "137"], state.stdout  # killed, and not restarted
    assert after["status"] == "running" or after["stop_reason"] == "target_accuracy", after

    # the compose file's own monitor service, as its header documents
    # (podman-compose 1.6 needs the profile named; docker compose enables it for a named service)
    mon = stack.run_tool("monitor", "monitor", "--once", "--json")
    doc = json.loads(mon.stdout.strip().splitlines()[-1])
    assert doc["job"] == stack.env["FEDMQ_JOB"] and {"queues", "latest_version", "sites"} <= set(doc)
    assert doc["latest_version"] >= after["latest_version"] and doc["active_aggregator"] == after["active_aggregator"]
    assert set(doc["sites"]) == {f"site_{i}" for i in range(SITES)}  # each replica claimed its own site file

    # the job reaches its target; the coordinator exports the model into the fedmq-out volume
    coordinator = stack.container("coordinator")
    code = _run(["podman", "wait", coordinator], timeout=300).stdout.strip()
    logs = _run(["podman", "logs", coordinator], check=False).stderr[-3000:]
    assert code == "0", logs
    final = stack.snapshot()
    assert final and final["status"] == "finished" and final["stop_reason"] == "target_accuracy", final
    assert max(a["accuracy"] for a in final["accuracy_history"]) >= TARGET
    assert _trainers(stack.amqp_url, stack.env["FEDMQ_JOB"]) == {"site-code"}  # every update: the derived image's
    stack.timings["job"] = time.monotonic() - started

    # report as a tool service, then the results out of the named volume (docs/deploy.md)
    stack.run_tool("report", timeout=300)
    results = stack.workdir / "results"
    results.mkdir()
    stack.compose("--profile", "tools", "run", "--rm", "--no-deps", "--user", f"{os.getuid()}:{os.getgid()}",
                  "-v", f"{results}:/results", "--entrypoint", "cp", "report", "-r", "/out/.", "/results/",
                  timeout=180)
    assert list((results / "model").glob(f"{stack.env['FEDMQ_JOB']}-v*.pt")), sorted(results.rglob("*"))
    assert (results / "report" / "index.html").is_file()
    archive = stack.workdir / "fedmq-out.tar"
    _run(["podman", "volume", "export", "-o", str(archive), f"{stack.project}_fedmq-out"])
    with tarfile.open(archive) as tar:
        assert any(n.endswith("report/index.html") for n in tar.getnames())
    stack.timings["total_test_body"] = time.monotonic() - t0
