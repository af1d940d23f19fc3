"""`fedmq jobs` and `fedmq delete` on the real broker: state from the job's own streams, delete
removes every JobNames queue, stream and exchange, refuses a job that has not finished."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator

import pytest

from fedmq.jobs import FINISHED, IDLE, RUNNING, delete_job, job_info, list_job_ids
from fedmq.monitor import ManagementAPI
from fedmq.shared.broker import Connection, JobNames
from fedmq.shared.config import StrategyConfig
from fedmq.shared.errors import JobNotFoundError
from fedmq.shared.jobstate import emit
from fedmq.shared.messages import EventKind
from tests.conftest import run_fedmq
from tests.jobkit import declare_job_with_v0


def _finished_job(url: str, job: str) -> None:
    declare_job_with_v0(url, job, StrategyConfig())
    with Connection(url, name="fedmq-test").open() as conn:
        names = JobNames(job)
        emit(conn, names, "coordinator", EventKind.JOB_STARTED, strategy="fedbuff", params={})
        emit(conn, names, "coordinator", EventKind.JOB_FINISHED, stop_reason="max_versions", versions=0)


def assert_gone(url: str, job: str) -> None:
    """Every queue and stream answers 404 to a passive declare, every exchange to a publish."""
    names = JobNames(job)
    with Connection(url, name="fedmq-test-check").open() as conn:
        for q in names.queues():
            with pytest.raises(JobNotFoundError):
                conn.queue_stats(q)
        for x in names.exchanges():
            with pytest.raises(JobNotFoundError):
                conn.publish(x, "probe", b"{}")


def test_a_finished_job_is_listed_with_its_stop_reason_and_deleted(broker_url: str, job: str) -> None:
    _finished_job(broker_url, job)
    proc = run_fedmq("jobs", "--broker", broker_url, "--job", job, "--json", timeout=60)
    assert proc.returncode == 0, proc.stderr
    [row] = json.loads(proc.stdout.strip().splitlines()[-1])["jobs"]
    assert (row["job"], row["state"], row["stop_reason"], row["latest_version"]) == (job, FINISHED, "max_versions", 0)
    assert row["created_at"] is not None and row["finished_at"] >= row["created_at"]
    proc = run_fedmq("delete", "--broker", broker_url, "--job", job, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert_gone(broker_url, job)
    proc = run_fedmq("delete", "--broker", broker_url, "--job", job, timeout=60)
    assert proc.returncode == 4 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "not found" in proc.stderr


def test_a_consumed_job_is_running_and_delete_refuses_it_without_force(broker_url: str, job: str) -> None:
    declare_job_with_v0(broker_url, job, StrategyConfig())
    names = JobNames(job)
    assert job_info(broker_url, job).state == IDLE  # declared, nobody consumes: abandoned or restarting
    with Connection(broker_url, name="fedmq-test-aggregator").open() as agg:
        agg.consume(names.updates, lambda d: None, prefetch=1)
        assert job_info(broker_url, job).state == RUNNING
        proc = run_fedmq("delete", "--broker", broker_url, "--job", job, timeout=60)
        assert proc.returncode == 5, proc.stderr
        assert proc.stderr.strip().splitlines() == [f"fedmq: job {job} is running, not finished: "
                                                    "stop it first or pass --force"]
        assert job_info(broker_url, job).state == RUNNING  # nothing was removed
    info = delete_job(broker_url, job, force=True)
    assert info.state == IDLE
    assert_gone(broker_url, job)


def test_poison_events_are_skipped_and_counted(broker_url: str, job: str) -> None:
    _finished_job(broker_url, job)
    names = JobNames(job)
    with Connection(broker_url, name="fedmq-test").open() as conn:
        conn.publish(names.events_exchange, "job_finished", b"\xff not an event")
        conn.publish(names.events_exchange, "site.s1.update_published", b"{\"kind\": \"event\"}")
    info = job_info(broker_url, job)
    assert (info.state, info.stop_reason, info.poison_events) == (FINISHED, "max_versions", 2)


def test_finished_before_refuses_a_job_that_finished_too_recently(broker_url: str, job: str) -> None:
    _finished_job(broker_url, job)
    proc = run_fedmq("delete", "--broker", broker_url, "--job", job, "--finished-before", "1d", timeout=60)
    assert proc.returncode == 5 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "less than --finished-before" in proc.stderr
    assert job_info(broker_url, job).state == FINISHED


@pytest.mark.parametrize(("args", "words"), [
    (["delete", "--job", "bad id"], "job id"),
    (["delete", "--job", "x", "--finished-before", "3y"], "must look like"),
    (["delete"], "--job"),
    (["jobs", "--job", "a/b"], "job id"),
    (["jobs"], "--management-url"),
])
def test_bad_arguments_exit_2_with_one_line(args: list[str], words: str, monkeypatch: pytest.MonkeyPatch) -> None:
    proc = run_fedmq(*args, timeout=60, FEDMQ_JOB="", FEDMQ_MANAGEMENT_URL="")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], proc.stderr


# ----------------------------------------------------------------------------- discovery decoding


class _Listing(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture()
def listing() -> Iterator[tuple[str, type[_Listing]]]:
    """A local HTTP server answering the management API's queue listing with fixed bytes: the
    shared broker runs no management plugin, and what is tested here is the decoder's totality."""
    handler = type("Handler", (_Listing,), {})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", handler
    finally:
        server.shutdown()
        server.server_close()


def test_listing_keeps_only_event_streams_names_and_skips_junk(listing: tuple[str, type[_Listing]],
                                                               broker_url: str) -> None:
    url, handler = listing
    handler.body = json.dumps([
        {"name": "fedmq.job-a.events"}, {"name": "fedmq.job-a.models"}, {"name": "fedmq.job-b.events"},
        {"name": "fedmq.bad id.events"}, {"name": 7}, "junk", {}, {"name": "other.events"},
    ]).encode()
    assert list_job_ids(ManagementAPI(url, broker_url)) == ["job-a", "job-b"]
    handler.body = b"{not json"
    with pytest.raises(Exception, match="not JSON"):
        list_job_ids(ManagementAPI(url, broker_url))
    handler.body = b'{"error": "x"}'
    assert list_job_ids(ManagementAPI(url, broker_url)) == []
