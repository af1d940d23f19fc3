"""The monitor starts from the coordinator's newest job_summary instead of the events stream's first
entry: it must report what a fold from the first entry reports, skip and count poison around it,
believe no summary but the coordinator's, and stay right across a coordinator restart and for jobs
written without summaries. Real broker; the job is written by bench.ops_bench.JobWriter, which
publishes what the coordinator, aggregator and sites publish (and journals summaries with the
coordinator's own `SummaryJournal`)."""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any

import pytest

from bench.ops_bench import JobWriter, extend
from fedmq import monitor as mon_mod
from fedmq.monitor import Monitor, Snapshot
from fedmq.shared import jobview
from fedmq.shared.broker import Connection, JobNames, StreamReader, read_stream
from fedmq.shared.jobstate import read_event_delivery, site_event_key
from fedmq.shared.jobview import JobView, SummaryJournal, checkpoint, restore
from fedmq.shared.messages import Event, EventKind

#: the fields that must not depend on where the fold started
COUNTS = ("latest_version", "status", "strategy", "tasks_issued", "updates_published", "updates_applied",
          "dead_letters", "dead_letter_reasons", "poison_events", "poison_reasons", "active_aggregator",
          "latest_accuracy", "accuracy_history", "metrics", "metrics_history", "roster")


def _summary_every(monkeypatch: pytest.MonkeyPatch, entries: int) -> None:
    """Summaries every `entries` entries: where the coordinator writes them and where the monitor looks."""
    monkeypatch.setattr(jobview, "SUMMARY_EVERY", entries)
    monkeypatch.setattr(mon_mod, "SUMMARY_EVERY", entries)


def _site_counts(d: dict[str, Any]) -> dict[str, Any]:
    return {s: {k: v for k, v in row.items() if k not in ("last_seen", "last_seen_seconds_ago")}
            for s, row in d["sites"].items()}


def _view_dict(view: JobView) -> dict[str, Any]:
    return Snapshot(view.job, 5003.0, view, {}, {}, [], 60.0).to_dict()


def _snapshots(url: str, job: str) -> tuple[dict[str, Any], dict[str, Any], int | None]:
    with Monitor(url, job) as fast:
        a = fast.snapshot().to_dict()
        restored = fast.restored_from
    with Monitor(url, job, summaries=False) as full:
        b = full.snapshot().to_dict()
    return a, b, restored


def _assert_same(fast: dict[str, Any], full: dict[str, Any]) -> None:
    assert {k: fast[k] for k in COUNTS} == {k: full[k] for k in COUNTS}
    assert _site_counts(fast) == _site_counts(full)
    assert fast["streams"] == full["streams"]


def _writer_job(url: str, job: str, versions: int, **kw: Any) -> dict[str, int]:
    with Connection(url, name="fedmq-test-writer").open() as conn:
        w = JobWriter(conn, job, **kw)
        try:
            extend(w, versions, hostile_every=40)
            w.drain_queues()
            w.follow(0.5)
        finally:
            w.close()
        return dict(w.counts)


@pytest.mark.broker
@pytest.mark.timeout(300)
def test_monitor_from_the_newest_summary_reports_what_the_whole_stream_says(broker_url: str, job: str,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _summary_every(monkeypatch, 100)
    counts = _writer_job(broker_url, job, 90)  # ~900 entries, 8 summaries, hostile entries between them
    assert counts["summaries"] >= 5 and counts["poison"] > 0
    fast, full, restored = _snapshots(broker_url, job)
    assert restored is not None and restored > 500  # it did start near the tail
    _assert_same(fast, full)
    assert fast["latest_version"] == 90 and fast["tasks_issued"] == counts["tasks"]
    assert fast["updates_published"] == fast["updates_applied"] == counts["updates"]
    assert fast["poison_events"] == counts["poison"] == 4
    assert fast["poison_reasons"] == {"forged": 2, "malformed": 2}
    assert fast["dead_letters"] == counts["dead"]


@pytest.mark.broker
@pytest.mark.timeout(300)
def test_no_summary_but_the_coordinators_is_believed(broker_url: str, job: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A site's job_summary (own key: forged) and one under the bare key from another source (a
    setup without per-site permissions) claim 10**6 tasks: both are skipped and counted."""
    _summary_every(monkeypatch, 100)
    names = JobNames(job)
    with Connection(broker_url, name="fedmq-test-writer").open() as conn:
        w = JobWriter(conn, job)
        try:
            extend(w, 60, hostile_every=0)
            w.follow(0.5)
            lie = checkpoint(w.journal.view)
            lie["tasks_issued"] = 10**6
            covers = w.journal.covers
            for key, source in ((site_event_key("site-0", EventKind.JOB_SUMMARY), "site-0"),
                                (EventKind.JOB_SUMMARY.value, "site-0")):
                data = {"covers": covers, "view": lie, "site": "site-0"}
                conn.publish(names.events_exchange, key,
                             Event(job=job, event=EventKind.JOB_SUMMARY, source=source, data=data).encode())
            extend(w, 3, hostile_every=0)  # the coordinator's own summary stays older than the lies
            w.drain_queues()
        finally:
            w.close()
        tasks = w.counts["tasks"]
    fast, full, restored = _snapshots(broker_url, job)
    assert restored is not None
    _assert_same(fast, full)
    assert fast["tasks_issued"] == tasks
    assert fast["poison_reasons"] == {"bad_field": 1, "forged": 1}


@pytest.mark.broker
@pytest.mark.timeout(300)
def test_summaries_stay_right_across_a_coordinator_restart_and_without_any(broker_url: str, job: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A restarted coordinator folds the stream from its first entry again (`_resume`), its own
    old summaries included, and journals on from there; a job of a release before summaries is
    read from the first entry."""
    _summary_every(monkeypatch, 100)
    old = f"{job}-old"
    try:
        counts = _writer_job(broker_url, old, 40, summaries=False)
        fast, full, restored = _snapshots(broker_url, old)
        assert restored is None and counts.get("summaries", 0) == 0
        _assert_same(fast, full)
        assert fast["updates_published"] == counts["updates"]
    finally:
        with Connection(broker_url, name="fedmq-test-cleanup").open() as conn:
            conn.delete_job(JobNames(old))

    names = JobNames(job)
    with Connection(broker_url, name="fedmq-test-writer").open() as conn:
        w = JobWriter(conn, job)
        try:
            extend(w, 50, hostile_every=20)
            w.follow(0.5)
            before = w.journal.written
            # the restart: a new journal that reads everything from "first", as `_resume` does
            assert w.follower is not None
            w.follower.close()
            w.journal = SummaryJournal(job)
            w.follower = StreamReader(broker_url, names.events, name="fedmq-test-follower")
            w.follower.start("first")
            extend(w, 50, hostile_every=20)
            w.drain_queues()
            w.follow(0.5)
        finally:
            w.close()
        assert w.journal.written >= 2 and before >= 2
        updates = w.counts["updates"]
    fast, full, restored = _snapshots(broker_url, job)
    assert restored is not None
    _assert_same(fast, full)
    assert fast["updates_published"] == updates and fast["latest_version"] == 100


def test_a_checkpoint_restores_the_view_and_a_damaged_one_is_refused() -> None:
    view = JobView("j")
    for i in range(3000):  # more versions and ids than a summary lists: the counts stay whole
        view.apply(Event(job="j", event=EventKind.TASK_ISSUED, source="coordinator",
                         data={"task": {"task_id": f"t{i}"}}, ts=1000.0 + i))
        view.apply(Event(job="j", event=EventKind.UPDATE_PUBLISHED, source="site-1",
                         data={"update_id": f"u-t{i}", "site": f"site-{i % 3}"}, ts=1000.5 + i))
        view.apply(Event(job="j", event=EventKind.VERSION_PUBLISHED, source="aggregator",
                         data={"version": i + 1, "included": [f"u-t{i}"], "sites": [f"site-{i % 3}"],
                               "staleness": [i % 2]}, ts=1000.7 + i))
        view.apply(Event(job="j", event=EventKind.DEAD_LETTERED, source="aggregator",
                         data={"reason": "stale" if i % 2 else "malformed"}, ts=1000.8 + i))
    view.skip("forged")
    data = checkpoint(view)
    back = restore("j", copy.deepcopy(data))
    assert back is not None
    for v in (view, back):  # the same events after the summary fold the same way
        v.apply(Event(job="j", event=EventKind.UPDATE_PUBLISHED, source="site-1",  # a republished one
                      data={"update_id": "u-t2999", "site": "site-0"}, ts=5000.0))
        v.apply(Event(job="j", event=EventKind.TASK_ISSUED, source="coordinator",
                      data={"task": {"task_id": "late"}}, ts=5001.0))
        v.apply(Event(job="j", event=EventKind.UPDATE_PUBLISHED, source="site-1",
                      data={"update_id": "u-late", "site": "site-2"}, ts=5002.0))
    a, b = _view_dict(view), _view_dict(back)
    assert {k: a[k] for k in COUNTS} == {k: b[k] for k in COUNTS} and _site_counts(a) == _site_counts(b)
    assert a["versions_per_min"] == b["versions_per_min"]
    assert a["updates_published"] == 3001 and a["dead_letters"] == 3000
    assert len(data["published"]) < 3000 and len(data["version_times"]["dt"]) < 3000
    for damage in ({"schema": 99}, {"tasks_issued": -1}, {"sites": {"site-0": [1, 2]}}, {"published": [7]},
                   {"version_times": {"t0": 1.0, "v0": 0, "dt": [1], "dv": []}}, {"poison": {"x": "y"}}):
        assert restore("j", {**copy.deepcopy(data), **damage}) is None, damage


@pytest.mark.broker
@pytest.mark.timeout(600)
def test_a_real_coordinator_journals_summaries_the_monitor_starts_from(broker_url: str, job: str, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Coordinator, aggregator and two workers on threads: the coordinator's job_summary events are
    on the stream, and the monitor restored from the newest says what the whole stream says."""
    from fedmq.aggregator.service import Aggregator
    from fedmq.coordinator.service import Coordinator
    from fedmq.shared.config import load_job_config
    from fedmq.shared.datasets import write_partition
    from fedmq.worker.service import Worker, WorkerOptions
    from tests.jobkit import run_threaded_job

    _summary_every(monkeypatch, 30)
    part = write_partition(tmp_path / "data", "digits", 2, scheme="iid", seed=0)
    cfg = load_job_config(overrides={
        "job": job, "data": {"test": str(part.test_file)}, "model": {"name": "logreg"},
        "strategy": {"name": "fedbuff", "buffer_size": 2, "flush_timeout": 2.0},
        "training": {"epochs": 1, "batch_size": 32, "lr": 0.1},
        "coordinator": {"concurrency": 3, "max_seconds": 240, "max_versions": 40, "out": str(tmp_path / "out")},
    }, environ={})
    coord = Coordinator(broker_url, cfg, stop=threading.Event())
    agg = Aggregator(broker_url, job, stop=threading.Event(), name="agg-summary")
    workers = [Worker(broker_url, job, f"site-{i}", part.site_files[i], options=WorkerOptions(device="cpu"))
               for i in range(2)]
    result = run_threaded_job(coord, agg, workers)
    assert result.versions >= 40
    entries = read_stream(broker_url, JobNames(job).events)
    summaries = [sev for d in entries if d.routing_key == EventKind.JOB_SUMMARY
                 and (sev := read_event_delivery(d)).event.source == "coordinator"]
    assert len(summaries) >= 3
    fast, full, restored = _snapshots(broker_url, job)
    assert restored is not None
    _assert_same(fast, full)
    assert fast["status"] == "finished" and fast["updates_applied"] >= 80 and fast["poison_events"] == 0


def test_operator_commands_start_without_importing_torch_or_every_command() -> None:
    """`monitor --once --json` has ~1 s in all: torch alone costs 2 s to import, the other commands'
    modules 0.3 s. The full parser (`fedmq --help`) must not import torch either."""
    import subprocess
    import sys

    code = ("import sys; from fedmq.cli import build_parser; build_parser({}); "
            "print('torch' in sys.modules, 'fedmq.demo' in sys.modules)")
    for only, demo in (("'monitor'", False), ("None", True)):
        out = subprocess.run([sys.executable, "-c", code.format(only)], capture_output=True, text=True, timeout=60,
                             check=True).stdout.split()
        assert out == ["False", str(demo)], (only, out)
