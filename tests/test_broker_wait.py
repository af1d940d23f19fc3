"""Start-up that waits for the broker: roles started before their broker connect once it is up.

A compose runner that ignores health conditions, or a site whose broker restarts for maintenance,
starts the roles first: they must retry (one log line per attempt) for `--broker-wait` seconds and
then exit 3; one-shot commands keep failing at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.brokers import PrivateBroker, free_port
from tests.conftest import ROOT, child_env, fedmq_cmd, run_fedmq

pytestmark = pytest.mark.timeout(300)

ATTEMPT = "broker not reachable yet"


def _dead_url() -> str:
    return f"amqp://guest:s3cret@127.0.0.1:{free_port()}/%2F"


def _wait_for_text(path: Path, text: str, count: int, timeout: float, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + timeout
    while path.read_text(errors="replace").count(text) < count:
        exited = [p.args for p in procs if p.poll() is not None]
        assert not exited, f"exited while waiting for the broker: {exited}\n{path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{count}x {text!r} not logged within {timeout}s:\n{path.read_text()}"
        time.sleep(0.2)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def test_a_role_gives_up_after_its_wait_with_exit_3_and_one_log_line_per_attempt() -> None:
    url = _dead_url()
    started = time.monotonic()
    proc = run_fedmq("aggregator", "--job", "j", "--broker", url, "--broker-wait", "3", timeout=60)
    took = time.monotonic() - started
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    attempts = [ln for ln in lines if ATTEMPT in ln]
    assert len(attempts) >= 2 and all("attempt=" in ln and "retry_in=" in ln for ln in attempts), proc.stderr
    assert lines[-1].startswith("fedmq: broker amqp://guest:***@") and "did not answer within 3s" in lines[-1]
    assert "s3cret" not in proc.stderr
    assert 3 <= took < 30, took


def test_the_wait_comes_from_the_environment_and_one_shot_commands_fail_fast() -> None:
    url = _dead_url()
    started = time.monotonic()
    proc = run_fedmq("worker", "--job", "j", "--site", "s", "--data", "/nonexistent.npz", "--broker", url,
                     timeout=60, FEDMQ_BROKER_WAIT="1")
    # the site's data is read first: a bad file is exit 2 without any wait
    assert proc.returncode == 2 and ATTEMPT not in proc.stderr, proc.stderr
    for cmd in (["history", "--job", "j"], ["monitor", "--job", "j", "--once", "--json"]):
        started = time.monotonic()
        proc = run_fedmq(*cmd, "--broker", url, timeout=60, FEDMQ_BROKER_WAIT="120")
        assert proc.returncode == 3, (cmd, proc.stderr)
        assert ATTEMPT not in proc.stderr and time.monotonic() - started < 20, (cmd, proc.stderr)


@pytest.mark.broker
@pytest.mark.slow
def test_roles_started_before_their_broker_run_the_job_once_it_is_up(tmp_path: Path) -> None:
    if not PrivateBroker.available():
        pytest.skip("rabbitmq-server is not installed: cannot start a private node")
    job_toml = tmp_path / "job.toml"
    assert run_fedmq("init", "--out", str(job_toml), "--test", str(tmp_path / "data" / "test.npz")).returncode == 0
    part = run_fedmq("partition", "--dataset", "digits", "--sites", "2", "--out", str(tmp_path / "data"))
    assert part.returncode == 0, part.stderr
    (tmp_path / "rmq").mkdir()
    node = PrivateBroker(tmp_path / "rmq")  # its port is chosen now; nothing listens there yet
    log = tmp_path / "roles.log"
    env = child_env(FEDMQ_BROKER_URL=node.url, FEDMQ_JOB="wait-1", FEDMQ_BROKER_WAIT="120",
                    FEDMQ_COORDINATOR_TARGET_ACCURACY="0.8", FEDMQ_COORDINATOR_MAX_SECONDS="120",
                    FEDMQ_STRATEGY_BUFFER_SIZE="2", FEDMQ_STRATEGY_FLUSH_TIMEOUT="2", FEDMQ_TRAINING_LR="0.1")
    commands = [["coordinator", "--config", str(job_toml), "--json"], ["aggregator", "--name", "agg-a"],
                ["aggregator", "--name", "agg-b"],
                *(["worker", "--site", f"site_{i}", "--data", str(tmp_path / "data" / f"site_{i}.npz")]
                  for i in (0, 1))]
    procs: list[subprocess.Popen[bytes]] = []
    out = log.open("ab")
    coord_out = (tmp_path / "coordinator.json").open("wb")
    try:
        for cmd in commands:
            stdout = coord_out if cmd[0] == "coordinator" else out
            procs.append(subprocess.Popen(fedmq_cmd(*cmd), stdout=stdout, stderr=out, env=env, cwd=ROOT,
                                          start_new_session=True))
        # every role retries (two attempts each at least) while nothing listens
        _wait_for_text(log, ATTEMPT, 2 * len(commands), 60, procs)
        node.start()
        assert procs[0].wait(200) == 0, log.read_text()[-5000:]
        result = json.loads((tmp_path / "coordinator.json").read_text().strip().splitlines()[-1])
        assert result["stop_reason"] == "target_accuracy" and result["final_accuracy"] >= 0.8, result
        for p in procs[1:]:  # the job's end tells aggregators and workers to leave
            assert p.wait(60) == 0, log.read_text()[-5000:]
        # read once all have left: a role still in its retry backoff when a fast job ended logs it later
        text = log.read_text()
        assert text.count("broker reachable") >= len(commands), text[-5000:]
    finally:
        _stop(procs)
        out.close()
        coord_out.close()
        node.cleanup()


def test_a_handshake_cut_by_a_restarting_broker_is_transient_but_a_refusal_is_not(broker_url: str) -> None:
    """pika calls both a refused login and a socket closed mid-handshake (a broker restarting)
    ProbableAuthenticationError; only the first may stop a role for good."""
    import pika.exceptions as pex

    from fedmq.shared.broker import Connection, ConnectionLostError, amqp_errors
    from fedmq.shared.errors import BrokerAccessError

    with pytest.raises(ConnectionLostError, match="during the handshake"):
        with amqp_errors(broker_url):
            raise pex.ProbableAuthenticationError("StreamLostError: ('Transport indicated EOF',)")
    refused = broker_url.replace("guest:guest@", "guest:wrong@")
    with pytest.raises(BrokerAccessError, match="refused the credentials"):
        Connection(refused, name="fedmq-test-refused").open()
