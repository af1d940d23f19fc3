"""`fedmq.site_launcher`, which `fedmq demo` starts its sites with: every site is a process of its
own (its own pid, log and exit status; killing one leaves the others running), SIGTERM reaches
them all, and the launcher's status is the first failing site's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from contextlib import suppress
from pathlib import Path

import numpy as np
import pytest

from tests.chaos.harness import wait_until
from tests.conftest import ROOT, child_env

pytestmark = pytest.mark.timeout(120)


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _launch(tmp_path: Path, sites: list[tuple[str, list[str]]], job: str) -> subprocess.Popen[bytes]:
    spec = tmp_path / "sites.json"
    spec.write_text(json.dumps([{"name": n, "args": a, "log": str(tmp_path / f"{n}.log")} for n, a in sites]))
    return subprocess.Popen([sys.executable, "-m", "fedmq.site_launcher", "--job", job, str(spec)], cwd=ROOT,
                            env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own group: cleaned up whole


def test_the_launcher_exits_with_the_first_failing_sites_status_and_each_site_logs_apart(tmp_path: Path) -> None:
    proc = _launch(tmp_path, [("ok", ["--help"]), ("bad", ["--site", "x", "--no-such-flag"])], "j")
    assert proc.wait(60) == 2
    assert "usage: fedmq worker" in (tmp_path / "ok.log").read_text()
    assert "fedmq worker: " in (tmp_path / "bad.log").read_text()  # the one-line usage error


@pytest.mark.broker
def test_sites_are_separate_processes_a_killed_one_leaves_the_others_and_sigterm_reaches_all(
        broker_url: str, tmp_path: Path) -> None:
    data = tmp_path / "site.npz"
    np.savez(data, x=np.zeros((4, 3), np.float32), y=np.zeros(4, np.int64))
    job = f"t-absent-{uuid.uuid4().hex[:8]}"  # never created: the sites wait for it
    args = ["--broker", broker_url, "--job", job, "--data", str(data)]
    proc = _launch(tmp_path, [(f"s{i}", [*args, "--site", f"s{i}"]) for i in range(3)], job)
    try:
        pids = wait_until(lambda: len(_children(proc.pid)) == 3 and _children(proc.pid), 30, "three site processes")
        assert proc.pid not in pids and len(set(pids)) == 3
        os.kill(pids[0], signal.SIGKILL)
        wait_until(lambda: not _alive(pids[0]), 10, "the killed site to be gone")
        assert _alive(pids[1]) and _alive(pids[2]) and proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) != 0  # the killed site's status
        assert not any(_alive(p) for p in pids)
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
