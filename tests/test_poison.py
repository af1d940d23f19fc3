"""Every reader survives every stream: poison entries a site (or a thief of its broker
credentials) can put on the broker are skipped and reported, never fatal, and never change the
real results. Real broker; hostile publishing uses the test user (the test broker has no per-site
users, so the routing keys below are what per-site topic permissions would pin)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedmq.export import export_version
from fedmq.history import decode_or_none, read_history
from fedmq.monitor import Monitor, render_text
from fedmq.replay import Status, replay
from fedmq.report import collect, write_report
from fedmq.shared.broker import REASON_HEADER, UPDATE_ID_HEADER, Connection, JobNames, read_stream
from fedmq.shared.config import StrategyConfig, load_job_config
from fedmq.shared.errors import FedmqError, MalformedMessageError
from fedmq.shared.jobstate import ForgedEventError, emit, emit_site, read_event, site_event_key
from fedmq.shared.ledger import read_ledger
from fedmq.shared.messages import Event, EventKind, ModelVersion
from tests.jobkit import (
    declare_job_with_v0,
    make_update,
    publish_raw,
    publish_updates,
    running_aggregator,
)

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

CFG = StrategyConfig(buffer_size=2, flush_timeout=120.0)


def _event(job: str, kind: str, source: str = "x", **data: Any) -> bytes:
    return Event(job=job, event=kind, source=source, data=data).encode()


def _trusted(routing_key: str, body: bytes) -> Event | None:
    try:
        sev = read_event(routing_key, body)
    except MalformedMessageError:
        return None
    return sev.event if sev.site is None else None


def _strict_json(obj: Any) -> str:
    """What a JSON consumer other than Python accepts: no NaN / Infinity."""
    return json.dumps(obj, default=str, allow_nan=False)


@pytest.fixture()
def cleanup(broker_url: str) -> Iterator[list[str]]:
    jobs: list[str] = []
    yield jobs
    with Connection(broker_url, name="fedmq-test-cleanup").open() as conn:
        for job in jobs:
            conn.delete_job(JobNames(job))


def _new_job(cleanup: list[str]) -> str:
    job = f"t-poison-{uuid.uuid4().hex[:8]}"
    cleanup.append(job)
    return job


# ------------------------------------------------------------------ the gate (pure)


def test_read_event_believes_only_what_the_routing_key_vouches_for() -> None:
    good = _event("j", EventKind.UPDATE_PUBLISHED, site="site-3", task_id="t1")
    assert read_event(site_event_key("site-3", "update_published"), good).site == "site-3"
    trusted = _event("j", EventKind.VERSION_EVALUATED, version=1, accuracy=0.5)
    assert read_event("version_evaluated", trusted).site is None
    forged = [
        (site_event_key("site-3", "update_published"), good.replace(b"site-3", b"site-4")),  # another site
        (site_event_key("site-3", "version_evaluated"), trusted),                            # trusted kind
        (site_event_key("site-3", "task_refused"), good),                                    # body != key
        ("update_published", good),                                                          # site kind, bare key
        ("job_finishing", trusted),                                                          # key != event
        ("site.a.b.update_published", good),                                                 # no site name
    ]
    for key, body in forged:
        with pytest.raises(ForgedEventError):
            read_event(key, body)
    with pytest.raises(MalformedMessageError):
        read_event("version_evaluated", b"\xc1 not msgpack")


# ------------------------------------------------------------------ replay, history, export, ledger


def _wait_for_version(url: str, job: str, version: int, timeout: float = 30.0) -> None:
    """jobkit.wait_for_version, but past the junk this test puts on the models stream."""
    deadline = time.monotonic() + timeout
    while True:
        entries = read_stream(url, JobNames(job).models, "first")
        if any(v.version >= version for d in entries if (v := decode_or_none(ModelVersion, d)) is not None):
            return
        assert time.monotonic() < deadline, f"job {job}: version {version} not published in {timeout}s"
        time.sleep(0.2)


def _poison_logs(url: str, job: str, template: Any) -> None:
    """Junk in the updates log (before any real update) and in the dead log."""
    names = JobNames(job)
    far = make_update(job, "u-far-future", template, base_version=10**9, seed=7)  # unsigned, no task
    publish_updates(url, job, [far])
    publish_raw(url, job, b"\x92\xc1 not msgpack")
    liar = make_update(job, "u-liar", template, site="site-1", seed=8)
    publish_raw(url, job, liar.encode(), site="site-0")  # the body names another site
    with Connection(url, name="fedmq-test-hostile").open() as conn:
        conn.publish(names.models_exchange, "", b"\x00 no version")  # only trusted roles write here; still
        for headers in ({UPDATE_ID_HEADER: "x" * 50_000, REASON_HEADER: b"\x00" * 10},
                        {UPDATE_ID_HEADER: b"\xff\xfe bytes", "x-first-death-reason": 12345},
                        {UPDATE_ID_HEADER: 7, REASON_HEADER: "r" * 20_000}):
            conn.publish(names.dead_exchange, "site-0", b"\x00junk", headers=headers)
        conn.publish(names.events_exchange, "version_evaluated", b"\xc1 not msgpack")
        conn.publish(names.events_exchange, "version_evaluated",
                     _event(job, EventKind.VERSION_EVALUATED, version="1", accuracy=0.9))
        conn.publish(names.events_exchange, "version_evaluated",
                     _event(job, EventKind.VERSION_EVALUATED, version=1, accuracy=1e300))
        conn.publish(names.events_exchange, site_event_key("site-0", "version_evaluated"),
                     _event(job, EventKind.VERSION_EVALUATED, version=2, accuracy=0.01, site="site-0"))


def test_replay_history_export_and_ledger_skip_and_count_poison_with_real_results_unchanged(
        broker_url: str, cleanup: list[str], tmp_path: Path) -> None:
    job = _new_job(cleanup)
    v0 = declare_job_with_v0(broker_url, job, CFG)
    _poison_logs(broker_url, job, v0.weights)
    with running_aggregator(broker_url, job):
        for v in range(4):
            publish_updates(broker_url, job, [
                make_update(job, f"u-{v}-a", v0.weights, base_version=v, seed=2 * v),
                make_update(job, f"u-{v}-b", v0.weights, base_version=v, site="site-1", seed=2 * v + 1)])
            _wait_for_version(broker_url, job, v + 1)

    report = replay(broker_url, job).to_dict()
    assert report["mismatches"] == 0, report["versions"]
    assert [c["status"] for c in report["versions"]] == [Status.ROOT.value] + [Status.OK.value] * 4
    assert report["poison"]["updates_unreadable"] == 2  # not msgpack; names another site than its sender
    assert report["poison"]["updates_not_credible"] == 1  # based on version 10**9
    assert report["poison"]["models_unreadable"] == 1
    _strict_json(report)

    hist = read_history(broker_url, job)
    assert [v.version for v in hist.versions] == [0, 1, 2, 3, 4]
    assert hist.poison["update_unreadable"] == 1 and hist.poison["update_wrong_site"] == 1
    assert hist.poison["dead_unreadable"] == 4  # the three above, and the aggregator's of the raw bytes
    assert hist.poison["event_forged"] == 1 and hist.poison["event_malformed"] == 1
    assert hist.poison["event_bad_field"] == 2 and hist.poison["model_unreadable"] == 1
    unknown = [d for d in hist.dead_letters if d.kind == "unknown"]
    assert len(unknown) == 4 and all(d.update_id is None for d in unknown)
    assert sorted(d.reason for d in unknown) == ["malformed"] + ["unreadable_reason"] * 3
    assert set(hist.sites) == {"site-0", "site-1"}
    _strict_json(hist.to_dict())

    ledger = read_ledger(broker_url, JobNames(job))
    check = ledger.check()
    assert check.ok, check
    assert check.unreadable == {"models": 1, "updates_log": 1, "dead_log": 4}

    done = export_version(broker_url, job, None, tmp_path / "m.pt")
    assert done.version == 4 and done.unreadable == 1


# ------------------------------------------------------------------ monitor and report


def _events_with_poison(url: str, job: str) -> None:
    names = JobNames(job)
    with Connection(url, name="fedmq-test-events").open() as conn:
        emit(conn, names, "coordinator", EventKind.JOB_STARTED, strategy="fedbuff", params={"buffer_size": 2})
        for v in (1, 2):
            ids = [f"u-{v}-{s}" for s in ("site-0", "site-1")]
            for uid in ids:  # the monitor counts a site's update only as the answer to an issued task
                emit(conn, names, "coordinator", EventKind.TASK_ISSUED, task={"task_id": uid[2:]})
            for uid, site in zip(ids, ("site-0", "site-1"), strict=True):
                emit_site(conn, names, site, EventKind.UPDATE_PUBLISHED, update_id=uid, base_version=v - 1,
                          task_seconds=0.5, loss=0.3, epsilon=None)
            emit(conn, names, "aggregator", EventKind.VERSION_PUBLISHED, version=v, parent=v - 1, included=ids,
                 sites=["site-0", "site-1"], staleness=[0, 1])
            emit(conn, names, "coordinator", EventKind.VERSION_EVALUATED, version=v, accuracy=0.4 * v, t=float(v))
        hostile: list[tuple[str, bytes]] = [
            # a site claiming another site, a trusted kind under a site key, a site kind under a bare key
            (site_event_key("site-0", "update_published"),
             _event(job, EventKind.UPDATE_PUBLISHED, update_id="u-x1", site="site-1")),
            (site_event_key("site-0", "version_evaluated"),
             _event(job, EventKind.VERSION_EVALUATED, version=9, accuracy=1.0, t=1.0, site="site-0")),
            ("update_published", _event(job, EventKind.UPDATE_PUBLISHED, update_id="u-x2", site="evil")),
            ("version_published", b"\xc1 not msgpack"),
            # well vouched for, but with fields no table, plot or JSON can take
            (site_event_key("site-0", "update_published"),
             _event(job, EventKind.UPDATE_PUBLISHED, update_id="u-x3", site="site-0", task_seconds=1e300,
                    epsilon="e" * 1_000_000, base_version=0)),
            (site_event_key("site-1", "update_published"),
             _event(job, EventKind.UPDATE_PUBLISHED, update_id=b"\x00" * 64, site="site-1")),
            ("version_published", _event(job, EventKind.VERSION_PUBLISHED, version=3, included=["u-1-site-0"],
                                         sites=["site-0"], staleness=[10**15])),
            ("version_evaluated", _event(job, EventKind.VERSION_EVALUATED, version=3, accuracy=float("inf"),
                                         t=1.0)),
            ("version_evaluated", _event(job, EventKind.VERSION_EVALUATED, version=4, accuracy="0.9", t=1.0)),
        ]
        for key, body in hostile:
            conn.publish(names.events_exchange, key, body)
        emit(conn, names, "coordinator", EventKind.JOB_FINISHED, stop_reason=["not", "text"], wall_seconds="x",
             seconds_to_target=float("-inf"))


def test_monitor_and_report_skip_forged_and_mistyped_events(broker_url: str, cleanup: list[str],
                                                            tmp_path: Path) -> None:
    job = _new_job(cleanup)
    declare_job_with_v0(broker_url, job, CFG)
    _events_with_poison(broker_url, job)

    with Monitor(broker_url, job) as mon:
        snap = mon.snapshot(idle=0.5)
    d = snap.to_dict()
    assert set(d["sites"]) == {"site-0", "site-1"}
    assert d["updates_published"] == 4 and d["updates_applied"] == 4
    assert [a["version"] for a in d["accuracy_history"]] == [1, 2]
    assert d["latest_version"] == 2
    # forged (3), not msgpack (1), mistyped (1 MB epsilon, bytes id, 10**15 staleness, inf / str accuracy)
    assert d["poison_reasons"]["forged"] == 3 and d["poison_reasons"]["malformed"] == 1
    assert d["poison_reasons"]["bad_field"] == 5
    assert all(row["epsilon"] is None for row in d["sites"].values())
    _strict_json(d)
    text = render_text(snap)
    assert "site-0" in text and "eeee" not in text

    data = collect(broker_url, job)
    assert data.poison["forged"] == 3 and data.poison["malformed"] == 1 and data.poison["bad_field"] == 5
    result = write_report(data, tmp_path / "r")
    summary = result.summary
    assert summary["updates_published"] == 4 and summary["updates_applied"] == 4 and summary["versions"] == 2
    assert summary["best_accuracy"] == pytest.approx(0.8) and summary["poison"] == 9
    assert summary["stop_reason"] is None and summary["wall_seconds"] is None
    report_json = (tmp_path / "r" / "report.json").read_text()
    json.loads(report_json, parse_constant=lambda c: pytest.fail(f"{c} in report.json"))
    assert "eeee" not in result.html.read_text()


# ------------------------------------------------------------------ the coordinator


def _hostile_events(url: str, job: str, stop: threading.Event) -> int:
    """Publish junk events and dead letters while the job runs; returns how many were sent."""
    names = JobNames(job)
    sent = 0
    with Connection(url, name="fedmq-test-hostile").open() as conn:
        while not stop.is_set():
            batch: list[tuple[str, str, bytes, dict[str, Any] | None]] = [
                # tasks nobody issued (memory must not grow), a trusted kind under a site key
                (names.events_exchange, site_event_key("evil", "update_published"),
                 _event(job, EventKind.UPDATE_PUBLISHED, site="evil", task_id=uuid.uuid4().hex[:16],
                        update_id="u-x"), None),
                (names.events_exchange, site_event_key("evil", "task_refused"),
                 _event(job, EventKind.TASK_REFUSED, site="evil", task_id=uuid.uuid4().hex,
                        reason="privacy_budget"), None),
                (names.events_exchange, site_event_key("evil", "job_finishing"),
                 _event(job, EventKind.JOB_FINISHING, site="evil", reason="evil"), None),
                # another site's budget, spent by name
                (names.events_exchange, site_event_key("evil", "task_refused"),
                 _event(job, EventKind.TASK_REFUSED, site="site-0", task_id="t", reason="privacy_budget"), None),
                # wrong types everywhere
                (names.events_exchange, site_event_key("evil", "update_published"),
                 _event(job, EventKind.UPDATE_PUBLISHED, site="evil", task_id=7, version="x", update_id=[1]), None),
                (names.events_exchange, "version_published",
                 _event(job, EventKind.VERSION_PUBLISHED, version="x", included=[b"\x00"] * 3), None),
                (names.events_exchange, "dead_lettered",
                 _event(job, EventKind.DEAD_LETTERED, update_id=b"\xff" * 64, reason=3), None),
                (names.events_exchange, "task_refused", b"\xc1 not msgpack", None),
                (names.dead_exchange, "site-0", b"\x00junk",
                 {UPDATE_ID_HEADER: "y" * 40_000, REASON_HEADER: 12}),
                (names.updates_exchange, "evil", b"\x00 raw bytes", {UPDATE_ID_HEADER: b"\x01" * 100}),
            ]
            for exchange, key, body, headers in batch:
                try:
                    conn.publish(exchange, key, body, headers=headers)
                    sent += 1
                except FedmqError:
                    return sent  # the job's exchanges are gone: it finished
            stop.wait(0.2)
    return sent


def test_a_real_job_reaches_its_target_while_sites_publish_poison(broker_url: str, cleanup: list[str],
                                                                  tmp_path: Path) -> None:
    from fedmq.aggregator.service import Aggregator
    from fedmq.coordinator.service import Coordinator
    from fedmq.shared.datasets import write_partition
    from fedmq.worker.service import Worker, WorkerOptions
    from tests.jobkit import run_threaded_job

    job = _new_job(cleanup)
    part = write_partition(tmp_path / "data", "digits", 2, scheme="iid", seed=0)
    cfg = load_job_config(overrides={
        "job": job, "data": {"test": str(part.test_file)}, "model": {"name": "logreg"},
        "strategy": {"name": "fedbuff", "buffer_size": 2, "flush_timeout": 2.0},
        "training": {"epochs": 1, "batch_size": 64, "lr": 0.3},
        "coordinator": {"concurrency": 2, "max_versions": 4, "max_seconds": 90, "out": str(tmp_path / "out")},
    }, environ={})
    coord = Coordinator(broker_url, cfg, stop=threading.Event())
    agg = Aggregator(broker_url, job, stop=threading.Event(), name="agg-poison")
    workers = [Worker(broker_url, job, f"site-{i}", f, options=WorkerOptions(device="cpu"))
               for i, f in enumerate(part.site_files)]
    stop_hostile = threading.Event()
    sent: list[int] = []

    def hostile() -> None:
        names = JobNames(job)
        with Connection(broker_url, name="fedmq-test-wait").open() as conn:
            while not conn.job_exists(names) and not stop_hostile.is_set():
                time.sleep(0.1)
        sent.append(_hostile_events(broker_url, job, stop_hostile))

    t = threading.Thread(target=hostile, daemon=True)
    t.start()
    started = time.monotonic()
    try:
        result = run_threaded_job(coord, agg, workers)
    finally:
        stop_hostile.set()
        t.join(30)
    assert result.stop_reason == "max_versions", result
    assert result.versions >= 4 and result.updates_unresolved == 0
    finishing = {ev.event: ev.ts for d in read_stream(broker_url, JobNames(job).events, "first")
                 if (ev := _trusted(d.routing_key, d.body)) is not None}
    drain = finishing[EventKind.JOB_FINISHED] - finishing[EventKind.JOB_FINISHING]
    assert drain < 20, f"the finish waited {drain:.1f}s (job {time.monotonic() - started:.1f}s)"  # not for junk
    assert sent and sent[0] > 20
    assert coord.sites_spent == set() and coord.sites_seen <= {"site-0", "site-1"}
    assert all(len(tid) == 16 for tid in coord.finished_tasks)  # only tasks it issued
    assert coord._poison is not None and coord._poison.total > 0
    assert {"forged", "unknown_task", "bad_field", "malformed", "not_credible"} <= set(coord._poison.counts)
