"""Fixtures and helpers clean up after themselves, on failure too: a timed-out `fedmq` command
takes its whole process group with it, and a private broker node that boots too slowly is stopped
before the error is raised."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from bench.common import run_group
from fedmq.shared.broker import Connection, JobNames
from tests.brokers import PrivateBroker, broker_answers
from tests.chaos.harness import wait_until
from tests.conftest import run_fedmq

#: starts a child that sleeps, writes its pid to argv[1], then sleeps itself (or, with "exit", leaves)
SPAWNER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
open(sys.argv[1], "w").write(str(child.pid))
if sys.argv[2:] != ["exit"]:
    time.sleep(120)
"""


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _pids_with(text: str) -> list[int]:
    """Processes whose command line contains `text`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                cmdline = entry.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and _alive(int(entry.name)):
                pids.append(int(entry.name))
    return pids


def test_a_timed_out_command_takes_its_children_with_it(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    with pytest.raises(subprocess.TimeoutExpired):
        run_group([sys.executable, "-c", SPAWNER, str(pidfile)], timeout=5)
    child = int(pidfile.read_text())
    wait_until(lambda: not _alive(child), 10, f"the grandchild {child} to be killed with its group")


def test_a_finished_command_leaves_no_orphan_behind(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    out = run_group([sys.executable, "-c", SPAWNER, str(pidfile), "exit"], timeout=30)
    assert out.returncode == 0, out.stderr
    child = int(pidfile.read_text())
    wait_until(lambda: not _alive(child), 10, f"the orphaned grandchild {child} to be killed")


@pytest.mark.broker
@pytest.mark.timeout(180)
def test_a_demo_that_times_out_leaves_no_coordinator_aggregator_or_worker(broker_url: str,
                                                                          tmp_path: Path) -> None:
    job = f"t-timeout-{uuid.uuid4().hex[:8]}"
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            # long enough for the demo to start its roles; a job with an unreachable target runs to
            # its --max-seconds, far past the timeout (the whole demo to 0.90 takes ~11 s now)
            run_fedmq("demo", "--json", "--broker", broker_url, "--job", job, "--workdir", str(tmp_path),
                      "--sites", "2", "--target", "1.0", "--max-seconds", "300", timeout=20)
        assert (tmp_path / "logs").is_dir(), "the demo never started its roles: the test proves nothing"
        wait_until(lambda: not _pids_with(f"--job {job}"), 15, f"every process of job {job} to be gone")
    finally:
        with Connection(broker_url, name="fedmq-test-cleanup").open() as conn:
            conn.delete_job(JobNames(job))


@pytest.mark.timeout(120)
def test_a_private_node_that_starts_too_slowly_is_stopped_before_the_error() -> None:
    if not PrivateBroker.available():
        pytest.skip("rabbitmq-server is not installed")
    node = PrivateBroker()
    try:
        with pytest.raises(RuntimeError, match="did not answer within"):
            node.start(timeout=0.5)  # a node needs seconds to boot
        assert node.proc is not None and node.proc.poll() is not None
        assert not broker_answers(node.url, timeout=1.0)
    finally:
        node.cleanup()
