"""Real `fedmq` processes against a real broker, and the tools to hurt them.

`Fleet` starts roles as OS processes (logs in files), kills them by pid and restarts them;
`Follower` reads a stream across broker restarts; `recompute` re-derives every version with the
aggregator's own `Accumulator`. Nothing here mocks the broker or a process.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from fedmq.aggregator.strategy import Accumulator
from fedmq.demo import write_job_toml
from fedmq.shared.broker import Delivery, JobNames, StreamReader, read_stream
from fedmq.shared.codec import Weights, weights_sha256
from fedmq.shared.config import StrategyConfig
from fedmq.shared.datasets import write_partition
from fedmq.shared.errors import BrokerUnavailableError, JobNotFoundError, MalformedMessageError
from fedmq.shared.messages import ModelVersion, Update
from tests.brokers import SERVER, PrivateBroker
from tests.conftest import ROOT, child_env, fedmq_cmd

T = TypeVar("T")
log = logging.getLogger(__name__)


def wait_until(check: Callable[[], T], timeout: float, what: str, poll: float = 0.1) -> T:
    """Poll `check` until it returns something truthy; fail the test naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def holds_for(check: Callable[[], bool], seconds: float, what: str, poll: float = 0.2) -> None:
    """Fail as soon as `check` is false during the next `seconds`: for what must *not* happen
    (work issued twice), which no event announces; a positive condition uses `wait_until`."""
    deadline = time.monotonic() + seconds
    while True:
        if not check():
            raise AssertionError(f"no longer true: {what}")
        if time.monotonic() >= deadline:
            return
        time.sleep(poll)


# --------------------------------------------------------------------------- job files


@dataclass(frozen=True)
class JobFiles:
    config: Path
    sites: list[Path]
    test: Path


def write_job(workdir: Path, *, sites: int, strategy: dict[str, Any], coordinator: dict[str, Any],
              training: dict[str, Any] | None = None, model: str = "mlp", scheme: str = "iid",
              extra: dict[str, dict[str, Any]] | None = None) -> JobFiles:
    """Digits split over `sites` plus a job TOML: small and fast enough for hundreds of updates.
    `extra`: more sections, e.g. ``{"encryption": {...}}``."""
    part = write_partition(workdir / "data", "digits", sites, scheme=scheme, seed=0)
    config = workdir / "job.toml"
    write_job_toml(config, {
        "model": {"name": model},
        "data": {"test": str(part.test_file)},
        "strategy": strategy,
        "training": training or {"epochs": 1, "batch_size": 16, "lr": 0.1},
        "coordinator": {"out": str(workdir / "model"), **coordinator},
        **(extra or {}),
    })
    return JobFiles(config, part.site_files, part.test_file)


# --------------------------------------------------------------------------- processes


class Fleet:
    """Role processes of one job. Every process it started is SIGKILLed (by pid) at `close`."""

    def __init__(self, url: str, job: str, logdir: Path) -> None:
        self.url = url
        self.job = job
        self.logdir = logdir
        logdir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.args: dict[str, tuple[str, tuple[str, ...], str]] = {}
        self.killed: set[int] = set()  # pids this test SIGKILLed on purpose
        self.log_offset: dict[str, int] = {}  # where the current process's lines start in its log

    def start(self, name: str, role: str, *args: str, faults: str = "") -> subprocess.Popen[bytes]:
        self.args[name] = (role, args, faults)
        path = self.logdir / f"{name}.log"
        self.log_offset[name] = path.stat().st_size if path.exists() else 0
        log = path.open("ab")
        env = child_env(FEDMQ_FAULTS=faults) if faults else child_env()
        proc = subprocess.Popen(
            fedmq_cmd(role, "--broker", self.url, "--job", self.job, "--log-level", "info", *args),
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        log.close()
        self.procs[name] = proc
        return proc

    def restart(self, name: str, new_name: str | None = None) -> subprocess.Popen[bytes]:
        role, args, faults = self.args[name]
        if role in ("aggregator", "keyholder") and new_name:
            args = tuple(new_name if a == name else a for a in args)
        return self.start(new_name or name, role, *args, faults=faults)

    def kill(self, name: str) -> float:
        """SIGKILL by pid; returns the wall-clock time of the kill."""
        proc = self.procs[name]
        self.killed.add(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        at = time.time()
        proc.wait(10)
        return at

    def terminate(self, name: str) -> None:
        """SIGTERM by pid: the role finishes the step it is in and leaves (a coordinator finishes the job)."""
        os.kill(self.procs[name].pid, signal.SIGTERM)

    def resume(self, name: str) -> None:
        """SIGCONT a process a `stop:` fault froze."""
        os.kill(self.procs[name].pid, signal.SIGCONT)

    def state(self, name: str) -> str:
        """Kernel state letter (R, S, T = stopped, ...), or "" once the process has exited."""
        proc = self.procs[name]
        if proc.poll() is not None:
            return ""
        try:
            return Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return ""

    def alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def exited_unexpectedly(self) -> dict[str, int]:
        """Processes that ended on their own with a non-zero status."""
        return {n: p.returncode for n, p in self.procs.items()
                if p.poll() is not None and p.returncode != 0 and p.pid not in self.killed}

    def log(self, name: str) -> str:
        path = self.logdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def own_log(self, name: str) -> str:
        """The lines of the process now called `name` (a restart appends to the same file)."""
        path = self.logdir / f"{name}.log"
        if not path.exists():
            return ""
        with path.open("rb") as f:
            f.seek(self.log_offset.get(name, 0))
            return f.read().decode(errors="replace")

    def tail(self, name: str, lines: int = 15) -> str:
        return "\n".join(self.log(name).splitlines()[-lines:])

    def wait(self, name: str, timeout: float) -> int:
        return self.procs[name].wait(timeout)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with suppress(Exception):
                    os.kill(proc.pid, signal.SIGCONT)  # a SIGSTOPped child must be able to die
                    os.kill(proc.pid, signal.SIGKILL)
                with suppress(Exception):
                    proc.wait(10)


def close_connection(node: PrivateBroker, name_part: str, timeout: float = 30.0) -> int:
    """Drop (server-side, like a network cut) every connection whose name contains `name_part`;
    returns how many. 0 as well when the listing does not answer within `timeout`: it asks every
    connection process, and on a loaded node one busy with large bodies can hold it for a minute."""
    ctl = str(Path(SERVER).with_name("rabbitmqctl"))
    env = dict(os.environ, HOME=str(node.base))
    try:
        listing = subprocess.run([ctl, "-n", node.name, "-q", "--no-table-headers", "list_connections", "pid",
                                  "client_properties"], env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("list_connections did not answer node=%s timeout=%.0f", node.name, timeout)
        return 0
    pids = [line.split("\t")[0] for line in listing.stdout.splitlines() if name_part in line]
    for pid in pids:
        subprocess.run([ctl, "-n", node.name, "-q", "close_connection", pid, "chaos test"], env=env,
                       capture_output=True, text=True, timeout=60, check=True)
    return len(pids)


# --------------------------------------------------------------------------- streams


class Follower:
    """Follows a stream from its start, reattaching at the next offset after a broker restart."""

    def __init__(self, url: str, stream: str) -> None:
        self.url = url
        self.stream = stream
        self.next: int | str = "first"
        self.reader: StreamReader | None = None

    def poll(self, timeout: float = 0.1) -> list[Delivery]:
        try:
            if self.reader is None:
                self.reader = StreamReader(self.url, self.stream, name="fedmq-chaos-follower")
                self.reader.start(self.next)
            got = self.reader.poll(timeout)
        except (BrokerUnavailableError, JobNotFoundError):
            self.close()
            time.sleep(0.3)
            return []
        if got:
            self.next = (got[-1].stream_offset or 0) + 1
        return got

    def close(self) -> None:
        if self.reader is not None:
            with suppress(Exception):
                self.reader.close()
            self.reader = None


def count_stream(url: str, stream: str) -> int:
    return len(read_stream(url, stream, "first", idle=0.5))


# --------------------------------------------------------------------------- recomputation


@dataclass(frozen=True)
class Recomputation:
    versions_checked: int
    first_mismatch: int | None
    final_equal: bool  # recomputed final weights == the newest published version's, element-wise


def recompute(url: str, names: JobNames) -> Recomputation:
    """Re-derive every version from v0, its parent and its `included` updates (plaintext jobs).

    Staleness is parent - base_version, what the aggregator's validation computes, and each
    version runs through a fresh `Accumulator` with the version's own params: the same code path
    as the service, so a match means the broker's history alone explains the final model.
    """
    updates: dict[str, Update] = {}
    for d in read_stream(url, names.updates_log, "first", idle=0.5):
        try:
            u = Update.decode(d.body)
        except MalformedMessageError:
            continue
        updates.setdefault(u.update_id, u)
    weights: Weights | None = None
    published: Weights = {}
    first_mismatch: int | None = None
    checked = 0
    for d in read_stream(url, names.models, "first", idle=0.5):
        mv = ModelVersion.decode(d.body)
        published = mv.weights
        if weights is None:
            weights = {k: np.asarray(v) for k, v in mv.weights.items()}
            continue
        acc = Accumulator(StrategyConfig.from_params(mv.params))
        for uid in mv.included:
            u = updates[uid]
            if u.delta is None:
                raise AssertionError(f"update {uid} is encrypted: recompute covers plaintext jobs")
            acc.fold(update_id=uid, site=u.site, delta=u.delta, tau=mv.parent - u.base_version,
                     num_samples=u.num_samples, base_version=u.base_version)
        weights = acc.flush(weights)[0]
        checked += 1
        if first_mismatch is None and weights_sha256(weights) != mv.sha256:
            first_mismatch = mv.version
    final_equal = (weights is not None and set(weights) == set(published)
                   and all(np.array_equal(weights[k], published[k]) for k in published))
    return Recomputation(checked, first_mismatch, final_equal)
